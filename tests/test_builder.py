"""Builder: settings held for a service's life, the one-shot wrappers, the async facade."""

from __future__ import annotations

import asyncio
import inspect
import threading
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import attrs
import pytest
from conftest import fake_nix

from nixery_core.build import BuildSettings, build_image
from nixery_core.builder import Builder
from nixery_core.cache import BuildCache
from nixery_core.errors import InvalidInput, UnknownPackages
from nixery_core.graph import RuntimeGraph
from nixery_core.layering import DEFAULT_STRATEGY, SizeFirst
from nixery_core.multiarch import build_multiarch
from nixery_core.names import AMD64, ARM64, Image
from nixery_core.protocols import JSONValue, LayerGroup, LogCallback, RunResult
from nixery_core.results import ProgressEvent
from nixery_core.testing.runners import FakeNix
from nixery_core.testing.sources import FixedSource
from nixery_core.testing.storage import MemoryStore

IMAGE = Image.from_name("shell/hello")


def _builder(runner: FakeNix | SlowNix) -> Builder:
    return Builder(runner=runner, uploader=MemoryStore(), store_root=runner.store_root)


def _thread_names() -> set[str]:
    return {t.name for t in threading.enumerate()}


# --- settings and the one-shot forms ------------------------------------------------


def test_every_setting_is_a_keyword_of_builder_and_both_one_shot_forms_with_one_default() -> None:
    """Builder, build_image and build_multiarch take every setting, each with the same default."""
    fields = {f.name: f for f in attrs.fields(BuildSettings)}
    one_shot: tuple[Callable[..., object], ...] = (Builder.__init__, build_image, build_multiarch)
    for function in one_shot:
        parameters = inspect.signature(function).parameters
        for name, field in fields.items():
            assert name in parameters, (function, name)
            default = parameters[name].default
            assert default is field.default or default == field.default, (function, name)
    # No catch-all keywords: every argument is typed and checked by mypy.
    typed: tuple[Callable[..., object], ...] = (
        Builder.__init__, Builder.build, Builder.build_multiarch, build_image, build_multiarch
    )
    for function in typed:
        kinds = {p.kind for p in inspect.signature(function).parameters.values()}
        assert inspect.Parameter.VAR_KEYWORD not in kinds, function


def test_builder_and_build_image_give_the_same_bytes(tmp_path: Path) -> None:
    """A Builder's build is byte for byte the one-shot build_image with the same settings."""
    runner = fake_nix(tmp_path / "root")
    one_shot = build_image(
        IMAGE, FixedSource(), runner=runner, uploader=MemoryStore(), store_root=runner.store_root
    )
    with Builder(runner=runner, uploader=MemoryStore(), store_root=runner.store_root) as builder:
        kept = builder.build(IMAGE, FixedSource())
    assert kept.manifest == one_shot.manifest
    assert kept.config == one_shot.config
    assert kept.cache_key == one_shot.cache_key


def test_per_call_arguments_are_only_what_varies(tmp_path: Path) -> None:
    """One builder serves OCI and Docker manifests and several images; the cache is shared."""
    runner = fake_nix(tmp_path / "root")
    store = MemoryStore()
    with (
        BuildCache(tmp_path / "cache") as cache,
        Builder(runner=runner, uploader=store, cache=cache, store_root=runner.store_root) as b,
    ):
        oci = b.build(IMAGE, FixedSource())
        docker = b.build(IMAGE, FixedSource(), format="docker")
        again = b.build(IMAGE, FixedSource())
        other = b.build(Image.from_name("hello"), FixedSource())
    assert oci.manifest_media_type.startswith("application/vnd.oci")
    assert docker.manifest_media_type == "application/vnd.docker.distribution.manifest.v2+json"
    assert again.from_cache
    assert again.manifest_digest == oci.manifest_digest
    assert not other.from_cache
    assert all(layer.reused for layer in docker.layers)  # same layers as the OCI build


def test_build_multiarch_on_a_builder_matches_the_one_shot_form(tmp_path: Path) -> None:
    """Builder.build_multiarch makes the same index as build_multiarch."""
    runner = fake_nix(tmp_path / "root")
    with Builder(runner=runner, uploader=MemoryStore(), store_root=runner.store_root) as b:
        kept = b.build_multiarch(IMAGE, FixedSource(), archs=(AMD64, ARM64))
    one_shot = build_multiarch(
        IMAGE, FixedSource(), archs=(AMD64, ARM64), runner=runner, uploader=MemoryStore(),
        store_root=runner.store_root,
    )
    assert kept.index == one_shot.index
    assert kept.architectures == ("amd64", "arm64")


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"layer_budget": 1}, "layer_budget must be at least 2"),
        ({"timeout": 0}, "timeout must be a positive"),
        ({"max_workers": 0}, "max_workers must be a positive"),
        ({"max_workers": True}, "max_workers must be a positive"),
        ({"max_concurrent_builds": 0}, "max_concurrent_builds must be a positive"),
        ({"nix_options": {"cores": 2}}, "nix_options must map strings"),
        ({"archive": "gzip"}, "archive must be ArchiveOptions"),
        ({"executor": object()}, "executor must be"),
        ({"prior_layers_from_cache": 1}, "prior_layers_from_cache must be True or False"),
        ({"prior_layers_from_cache": True}, "prior_layers_from_cache needs a cache"),
        (
            {"prior_layers_from_cache": True, "cache": BuildCache(shared=False),
             "strategy": SizeFirst()},
            "size-first does not",
        ),
    ],
)
def test_bad_settings_fail_when_the_builder_is_made(
    kwargs: dict[str, object], message: str
) -> None:
    """A bad setting is an InvalidInput from the constructor, not from the first build."""
    with pytest.raises(InvalidInput, match=message):
        Builder(uploader=MemoryStore(), **kwargs)  # type: ignore[arg-type]


@attrs.frozen
class _ToldStrategy:
    """The default strategy, recording the prior layers each build tells it."""

    told: list[frozenset[tuple[str, ...]]]
    prior: frozenset[tuple[str, ...]] = frozenset()

    @property
    def name(self) -> str:
        return "told"

    def parameters(self) -> Mapping[str, JSONValue]:
        return {}

    def with_prior_layers(self, layers: Sequence[Sequence[str]]) -> _ToldStrategy:
        prior = frozenset(tuple(layer) for layer in layers)
        self.told.append(prior)
        return _ToldStrategy(self.told, prior)

    def group(self, graph: RuntimeGraph, budget: int) -> Sequence[LayerGroup]:
        return DEFAULT_STRATEGY.with_prior_layers(self.prior).group(graph, budget)


def test_prior_layers_from_cache_tells_the_strategy_every_stored_image_layer(
    tmp_path: Path,
) -> None:
    """With ``prior_layers_from_cache``, each build's strategy is told the store layers of
    every image the cache's local tier holds (none for the first); a stored layer the next
    image holds whole comes out as that layer, its blob reused; the option is in the key."""
    runner = fake_nix(tmp_path / "root")
    told: list[frozenset[tuple[str, ...]]] = []
    with BuildCache(tmp_path / "cache", shared=False) as cache:
        assert cache.stored_layers() == frozenset()
        with Builder(
            runner=runner, uploader=MemoryStore(), cache=cache, store_root=runner.store_root,
            strategy=_ToldStrategy(told), prior_layers_from_cache=True, layer_budget=4,
        ) as builder:
            first = builder.build(IMAGE, FixedSource())
            second = builder.build(Image.from_name("hello"), FixedSource())
        stored = {layer.paths for layer in first.layers if layer.kind == "store"}
        kept = {layer.paths for layer in second.layers if layer.kind == "store"}
        # Each build's manifest key is made from the strategy told no layers, then the
        # build tells it the record: none for the first image, the first's layers next.
        assert told == [frozenset(), frozenset(), frozenset(), stored]
        assert cache.stored_layers() == stored | kept
        second_paths = {p for layer in second.layers for p in layer.paths}
        whole = {s for s in stored if set(s) <= second_paths and len(s) > 1}
        assert whole
        assert whole <= kept
        assert all(layer.reused for layer in second.layers if layer.paths in whole)
        plain = build_image(
            IMAGE, FixedSource(), runner=runner, uploader=MemoryStore(),
            store_root=runner.store_root, strategy=_ToldStrategy([]), layer_budget=4,
        )
        assert plain.cache_key != first.cache_key


def test_progress_events_name_their_image_and_the_layer_count(tmp_path: Path) -> None:
    """Every event carries the image; the layers stage start says how many layers follow."""
    runner = fake_nix(tmp_path / "root")
    events: list[ProgressEvent] = []
    with Builder(
        runner=runner, uploader=MemoryStore(), store_root=runner.store_root,
        progress=events.append,
    ) as builder:
        result = builder.build(IMAGE, FixedSource())
    assert {event.image for event in events} == {IMAGE}
    totals = [event.total for event in events if event.total is not None]
    assert totals == [len(result.layers)]
    assert len([e for e in events if e.layer is not None]) == len(result.layers)


# --- lifecycle ----------------------------------------------------------------------


def test_context_manager_closes_the_executor_it_opened(tmp_path: Path) -> None:
    """Leaving the block stops the builder's packing threads; later builds are refused."""
    runner = fake_nix(tmp_path / "root")
    before = _thread_names()
    with Builder(
        runner=runner, uploader=MemoryStore(), store_root=runner.store_root, max_workers=3
    ) as builder:
        builder.build(IMAGE, FixedSource())
        started = _thread_names() - before
        assert started
        assert all(name.startswith("nixery-pack") for name in started)
    assert not any(name.startswith("nixery-pack") for name in _thread_names() - before)
    assert builder.closed
    with pytest.raises(InvalidInput, match="closed"):
        builder.build(IMAGE, FixedSource())


def test_an_executor_passed_in_is_used_and_left_open(tmp_path: Path) -> None:
    """A shared executor packs the layers and is still usable after the builder closes."""
    runner = fake_nix(tmp_path / "root")
    with ThreadPoolExecutor(2, thread_name_prefix="mine") as pool:
        before = _thread_names()
        with Builder(
            runner=runner, uploader=MemoryStore(), store_root=runner.store_root, executor=pool
        ) as builder:
            builder.build(IMAGE, FixedSource())
        started = _thread_names() - before
        assert not any(name.startswith("nixery-pack") for name in started)
        assert pool.submit(lambda: 42).result() == 42


def test_one_worker_builds_on_the_calling_thread(tmp_path: Path) -> None:
    """max_workers=1 starts no packing thread at all."""
    runner = fake_nix(tmp_path / "root")
    before = _thread_names()
    with Builder(
        runner=runner, uploader=MemoryStore(), store_root=runner.store_root, max_workers=1
    ) as builder:
        builder.build(IMAGE, FixedSource())
        assert _thread_names() - before == set()


# --- async facade -------------------------------------------------------------------


@attrs.define
class SlowNix:
    """FakeNix that blocks every call until released, counting calls."""

    inner: FakeNix
    release: threading.Event = attrs.field(factory=threading.Event)
    calls: int = 0

    @property
    def store_root(self) -> Path:
        return self.inner.store_root

    def run(
        self,
        argv: Sequence[str],
        *,
        timeout: float | None = None,
        env: Mapping[str, str] | None = None,
        on_log_line: LogCallback | None = None,
    ) -> RunResult:
        self.calls += 1
        assert self.release.wait(10), "never released"
        return self.inner.run(argv, timeout=timeout, env=env, on_log_line=on_log_line)


def test_abuild_runs_off_the_loop_and_shares_identical_builds(tmp_path: Path) -> None:
    """Ten identical awaits make one build, while the event loop keeps running."""
    runner = SlowNix(fake_nix(tmp_path / "root"))

    async def scenario() -> None:
        async with _builder(runner) as b:
            tasks = [asyncio.create_task(b.abuild(IMAGE, FixedSource())) for _ in range(10)]
            ticks = 0
            while runner.calls == 0 or ticks < 5:  # the loop runs while Nix is "busy"
                await asyncio.sleep(0.01)
                ticks += 1
            runner.release.set()
            results = await asyncio.gather(*tasks)
        assert len({r.manifest_digest for r in results}) == 1
        assert all(r is results[0] for r in results)  # one build, one result object

    asyncio.run(scenario())
    assert runner.inner.count("resolve") == 1


def test_a_cancelled_waiter_does_not_cancel_the_shared_build(tmp_path: Path) -> None:
    """A client that hangs up leaves the build running for the others."""
    runner = SlowNix(fake_nix(tmp_path / "root"))

    async def scenario() -> None:
        async with _builder(runner) as b:
            quitter = asyncio.create_task(b.abuild(IMAGE, FixedSource()))
            stayer = asyncio.create_task(b.abuild(IMAGE, FixedSource()))
            while runner.calls == 0:
                await asyncio.sleep(0.01)
            quitter.cancel()
            runner.release.set()
            result = await stayer
            assert not result.from_cache
            with pytest.raises(asyncio.CancelledError):
                await quitter

    asyncio.run(scenario())


def test_abuild_errors_reach_every_waiter_and_are_not_remembered(tmp_path: Path) -> None:
    """A failed build raises its typed error in each waiter; the next call builds again."""
    runner = fake_nix(tmp_path / "root")

    async def scenario() -> None:
        async with _builder(runner) as b:
            bad = Image.from_name("no-such-package")
            outcomes = await asyncio.gather(
                b.abuild(bad, FixedSource()), b.abuild(bad, FixedSource()), return_exceptions=True
            )
            assert all(isinstance(o, UnknownPackages) for o in outcomes)
            with pytest.raises(UnknownPackages):
                await b.abuild(bad, FixedSource())

    asyncio.run(scenario())
    assert runner.count("resolve") == 2


def test_abuild_multiarch_shares_identical_index_builds(tmp_path: Path) -> None:
    """Identical index requests awaiting together make one multi-architecture build."""
    runner = fake_nix(tmp_path / "root")

    async def scenario() -> None:
        async with _builder(runner) as b:
            first, second = await asyncio.gather(
                b.abuild_multiarch(IMAGE, FixedSource(), archs=(AMD64, ARM64)),
                b.abuild_multiarch(IMAGE, FixedSource(), archs=(AMD64, ARM64)),
            )
            assert first is second

    asyncio.run(scenario())
    assert runner.count("resolve") == 2  # one per architecture


@attrs.frozen
class _ToldOnlyStrategy:
    """The default grouping, with a setting its parameters name only once it is told."""

    setting: int
    is_told: bool = False

    @property
    def name(self) -> str:
        return "told-only"

    def parameters(self) -> Mapping[str, JSONValue]:
        return {"setting": self.setting} if self.is_told else {}

    def with_prior_layers(self, layers: Sequence[Sequence[str]]) -> _ToldOnlyStrategy:
        return attrs.evolve(self, is_told=True)

    def group(self, graph: RuntimeGraph, budget: int) -> Sequence[LayerGroup]:
        return DEFAULT_STRATEGY.group(graph, budget)


def test_a_told_build_is_keyed_as_its_strategy_groups_told(tmp_path: Path) -> None:
    """With ``prior_layers_from_cache`` the manifest key holds the strategy's parameters as
    told (the default names ``root_scale`` only then), so two strategies alike untold but not
    told never share a cached manifest."""
    runner = fake_nix(tmp_path / "root")
    keys = []
    for setting in (1, 2):
        with BuildCache(tmp_path / f"cache-{setting}", shared=False) as cache:
            result = build_image(
                IMAGE, FixedSource(), runner=runner, uploader=MemoryStore(), cache=cache,
                store_root=runner.store_root, strategy=_ToldOnlyStrategy(setting),
                prior_layers_from_cache=True, layer_budget=4,
            )
            keys.append(result.cache_key)
    assert keys[0] != keys[1]
