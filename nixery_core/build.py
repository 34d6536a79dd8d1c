"""One image: from an :class:`~nixery_core.names.Image` to stored blobs and a manifest.

:class:`BuildSettings` holds what stays the same for every build of a
service (runner, uploader, cache, strategy, archive options, Nix options
and timeout, workers, callbacks), each default defined here once.
:class:`~nixery_core.builder.Builder` keeps one for its whole life;
:func:`build_image` makes one for a single call.

The pipeline (:func:`run_build`), each stage timed on the result:

1. ``resolve``: the package source and the manifest cache key;
   a cache hit ends the build here (a pinned source runs no Nix at all);
2. ``nix``: evaluate, realise and query the runtime closure;
3. ``layering``: group store paths into layers;
4. ``layers``: pack and upload every layer not already stored, on the
   build's bounded executor (the compressors release the GIL), each under
   its layer-key lock;
5. ``metadata``: config, manifest, and the manifest cache entry, written
   last so that an entry always names blobs that exist.

Unknown packages raise :class:`~nixery_core.errors.UnknownPackages`, whose
``packages`` attribute names every unknown name: one typed error instead of
Nixery's error-shaped result, so no caller can mistake it for an image.
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import FIRST_EXCEPTION, wait
from pathlib import Path
from typing import Literal

import attrs

from nixery_core import nix, outside_reads
from nixery_core.archive import ArchiveOptions, PackedLayer, pack_entries, pack_store_paths
from nixery_core.cache import LAYOUT_VERSION, BuildCache, CacheStats, LayerRecord
from nixery_core.customisation import customisation_entries
from nixery_core.entries import TarEntry
from nixery_core.errors import BadCachedFragment, InvalidInput, StorePathMissing
from nixery_core.expressions import NixExpression
from nixery_core.gc_roots import BuildRoots
from nixery_core.graph import RuntimeGraph, store_path_name
from nixery_core.image_config import ImageConfig
from nixery_core.layering import DEFAULT_STRATEGY
from nixery_core.manifest import Descriptor, LayerDescriptor, render_config, render_manifest
from nixery_core.names import Image
from nixery_core.protocols import (
    BlobInfo,
    LayeringStrategy,
    LogCallback,
    Runner,
    SupportsPriorLayers,
    SupportsRefresh,
    SupportsWrittenDigest,
    Uploader,
)
from nixery_core.results import (
    BuildResult,
    BuiltLayer,
    ProgressCallback,
    ProgressEvent,
    Stage,
)
from nixery_core.runner import SubprocessRunner
from nixery_core.sbom import attach
from nixery_core.sources import PackageSource, SourceSpec, canonical_json, image_cache_key
from nixery_core.storage.filesystem import FilesystemStore
from nixery_core.workers import WorkerPool

__all__ = [
    "DEFAULT_LAYER_BUDGET",
    "DEFAULT_TIMEOUT",
    "BuildResult",
    "BuildSettings",
    "BuiltLayer",
    "ManifestFormat",
    "ProgressCallback",
    "ProgressEvent",
    "build_image",
    "default_store",
    "default_workers",
    "run_build",
    "user_cache_dir",
]

log = logging.getLogger(__name__)
#: Packs a layer into ``write``; the second argument, when not None, is the
#: sink's own running sha256 of what it was given (the blob is then hashed once).
_PackFn = Callable[[Callable[[bytes], object], Callable[[], str] | None], PackedLayer]

#: Layers an image may have, customisation layer included (Nixery's figure;
#: Docker's limit is about 125, the rest is room for extension).
DEFAULT_LAYER_BUDGET = 94
#: Seconds each Nix call may take.
DEFAULT_TIMEOUT = 60.0
#: Most packing threads a build uses unless told otherwise.
MAX_DEFAULT_WORKERS = 8

ManifestFormat = Literal["oci", "docker"]


def default_store() -> FilesystemStore:
    """The default uploader: a filesystem store under the user's cache directory.

    ``$NIXERY_CORE_STORE`` overrides the location, else
    ``$XDG_CACHE_HOME/nixery-core/store`` (``~/.cache/nixery-core/store``).
    """
    root = os.environ.get("NIXERY_CORE_STORE")
    return FilesystemStore(Path(root) if root else user_cache_dir() / "store")


def user_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/nixery-core`` (``~/.cache/nixery-core``): the defaults' home."""
    cache_home = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(cache_home) / "nixery-core"


def default_workers(max_workers: int | None = None) -> int:
    """The packing threads of a build: ``max_workers``, else ``min(8, CPUs)``.

    Raises :class:`~nixery_core.errors.InvalidInput` for anything but a
    positive int or ``None``.
    """
    if max_workers is None:
        return min(MAX_DEFAULT_WORKERS, os.cpu_count() or 1)
    if isinstance(max_workers, bool) or not isinstance(max_workers, int) or max_workers < 1:
        raise InvalidInput(f"max_workers must be a positive int or None, not {max_workers!r}")
    return max_workers


# --- settings ----------------------------------------------------------------
# Each converter turns None into the one default, so Builder, build_image and
# build_multiarch all accept None and agree on what it means.


def _runner(value: Runner | None) -> Runner:
    return SubprocessRunner() if value is None else value


def _uploader(value: Uploader | None) -> Uploader:
    return default_store() if value is None else value


def _strategy(value: LayeringStrategy | None) -> LayeringStrategy:
    return DEFAULT_STRATEGY if value is None else value


def _archive(value: ArchiveOptions | None) -> ArchiveOptions:
    if value is None:
        return ArchiveOptions()
    if not isinstance(value, ArchiveOptions):
        raise InvalidInput(f"archive must be ArchiveOptions, not {value!r}")
    return value


def _nix_options(value: Mapping[str, str] | None) -> Mapping[str, str]:
    options = dict(value or {})
    for key, item in options.items():
        if not isinstance(key, str) or not isinstance(item, str):
            raise InvalidInput(f"nix_options must map strings to strings, not {key!r}: {item!r}")
    return options


def _check_budget(_inst: object, _attr: object, value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 2:
        raise InvalidInput(
            f"layer_budget must be at least 2 (one store layer, one customisation), not {value!r}"
        )


def _check_timeout(_inst: object, _attr: object, value: float) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
        raise InvalidInput(f"timeout must be a positive number of seconds, not {value!r}")


def _check_workers(_inst: object, _attr: object, value: int | None) -> None:
    default_workers(value)


@attrs.frozen(kw_only=True)
class BuildSettings:
    """What every build of a service shares, each default defined here once.

    ``runner`` ``None``: a :class:`~nixery_core.runner.SubprocessRunner`;
    ``uploader`` ``None``: :func:`default_store`; ``cache`` ``None``: no
    caching; ``strategy`` ``None``: the default layering strategy;
    ``archive`` ``None``: gzip layers.  ``store_root`` is where
    ``/nix/store`` is read from (fakes put a store in a temporary
    directory).  ``max_workers`` bounds the threads packing and hashing
    layers (:func:`default_workers`).  ``progress`` gets every
    :class:`~nixery_core.results.ProgressEvent`, ``on_log_line`` every line
    Nix prints on stderr.  ``prior_layers_from_cache`` (off by default; needs
    a ``cache`` and a strategy with
    :class:`~nixery_core.protocols.SupportsPriorLayers`, as the default
    is) tells the strategy, at each build, the store layers of every image
    in the cache's local tier (:meth:`~nixery_core.cache.BuildCache.stored_layers`),
    so that it keeps layers the registry already stores (``docs/layering.md``).
    The record is then an input the manifest cache key does not cover (the
    key says only that the option is on): a cached image is served as it
    was built.  Bad values raise :class:`~nixery_core.errors.InvalidInput`.
    """

    runner: Runner = attrs.field(default=None, converter=_runner)
    uploader: Uploader = attrs.field(default=None, converter=_uploader)
    cache: BuildCache | None = None
    strategy: LayeringStrategy = attrs.field(default=None, converter=_strategy)
    archive: ArchiveOptions = attrs.field(default=None, converter=_archive)
    layer_budget: int = attrs.field(default=DEFAULT_LAYER_BUDGET, validator=_check_budget)
    timeout: float = attrs.field(default=DEFAULT_TIMEOUT, validator=_check_timeout)
    nix_options: Mapping[str, str] = attrs.field(default=None, converter=_nix_options)
    store_root: Path = attrs.field(default=Path("/"), converter=Path)
    max_workers: int | None = attrs.field(default=None, validator=_check_workers)
    progress: ProgressCallback | None = None
    on_log_line: LogCallback | None = None
    clock: Callable[[], float] = time.perf_counter
    prior_layers_from_cache: bool = False

    def __attrs_post_init__(self) -> None:
        self._prior_layers_source()

    def _prior_layers_source(self) -> tuple[SupportsPriorLayers, BuildCache] | None:
        """The strategy and cache prior layers come from; ``None`` when the option is off.

        A combination that cannot work raises InvalidInput (at construction:
        the settings are frozen, so a later call finds them as checked).
        """
        flag = self.prior_layers_from_cache
        if not isinstance(flag, bool):
            raise InvalidInput(f"prior_layers_from_cache must be True or False, got {flag!r}")
        if not flag:
            return None
        if self.cache is None:
            raise InvalidInput("prior_layers_from_cache needs a cache to read stored layers from")
        if not isinstance(self.strategy, SupportsPriorLayers):
            raise InvalidInput(
                f"prior_layers_from_cache needs a strategy that takes prior layers; "
                f"{self.strategy.name} does not"
            )
        return self.strategy, self.cache

    def strategy_for_build(self) -> LayeringStrategy:
        """The strategy one build groups with: told the cache's stored layers if asked."""
        source = self._prior_layers_source()
        if source is None:
            return self.strategy
        strategy, cache = source
        return strategy.with_prior_layers(cache.stored_layers())

    @property
    def workers(self) -> int:
        """The packing threads these settings allow (:func:`default_workers`)."""
        return default_workers(self.max_workers)


# --- cache keys --------------------------------------------------------------


def manifest_cache_key(
    image: Image,
    spec: SourceSpec,
    *,
    strategy: LayeringStrategy,
    archive: ArchiveOptions,
    config: ImageConfig,
    manifest_format: str,
    layer_budget: int,
    expression: str | NixExpression | None = None,
    prior_layers_from_cache: bool = False,
) -> str:
    """A key over everything that changes the built manifest.

    With ``prior_layers_from_cache`` the key says so, but not what the cache
    held (see :class:`BuildSettings`); a strategy that can be told the
    record is keyed as it groups when told (its parameters after
    ``with_prior_layers`` of no layers), since a told strategy may group
    differently from the same strategy untold.
    """
    expr = _expression(expression)
    keyed = (
        strategy.with_prior_layers(())
        if prior_layers_from_cache and isinstance(strategy, SupportsPriorLayers)
        else strategy
    )
    payload: dict[str, object] = {
        "layout": LAYOUT_VERSION,
        "image": image_cache_key(image, spec),
        "strategy": {"name": strategy.name, "parameters": dict(keyed.parameters())},
        "archive": archive.parameters(),
        "config": config.parameters(),
        "format": manifest_format,
        "budget": layer_budget,
        "expression": None if expr is None else expr.key,
        "sbom": attach.SBOM_VERSION,
    }
    if prior_layers_from_cache:
        payload["prior_layers"] = "from-cache"
    return hashlib.sha256(canonical_json(payload)).hexdigest()


def _expression(expression: str | NixExpression | None) -> NixExpression | None:
    if isinstance(expression, str):
        return NixExpression.from_text(expression)
    return expression


def layer_cache_key(paths: Iterable[str], archive: ArchiveOptions) -> str:
    """The layer build cache key: the layer's sorted store paths and archive options."""
    return hashlib.sha256(
        canonical_json(
            {"layout": LAYOUT_VERSION, "paths": sorted(paths), "archive": archive.parameters()}
        )
    ).hexdigest()


def entries_cache_key(entries: Sequence[TarEntry], archive: ArchiveOptions) -> str:
    """The layer key of a synthesised layer: a hash of its entries."""
    digest = hashlib.sha256()
    for entry in entries:
        digest.update(
            canonical_json(
                [entry.path, entry.kind, entry.mode, entry.target, entry.uid, entry.gid,
                 hashlib.sha256(entry.data).hexdigest()]
            )
        )
    return hashlib.sha256(
        canonical_json(
            {"layout": LAYOUT_VERSION, "entries": digest.hexdigest(),
             "archive": archive.parameters()}
        )
    ).hexdigest()


@attrs.define
class _Build:
    """The state of one build; not public."""

    image: Image
    settings: BuildSettings
    executor: WorkerPool | None
    stats: CacheStats = attrs.field(factory=CacheStats)
    _stats_lock: threading.Lock = attrs.field(factory=threading.Lock)
    timings: dict[str, float] = attrs.field(factory=dict)

    @property
    def store(self) -> Uploader:
        return self.settings.uploader

    @property
    def cache(self) -> BuildCache | None:
        return self.settings.cache

    @property
    def archive(self) -> ArchiveOptions:
        return self.settings.archive

    @property
    def store_root(self) -> Path:
        return self.settings.store_root

    def emit(
        self, stage: Stage, message: str, layer: BuiltLayer | None = None,
        total: int | None = None,
    ) -> None:
        progress = self.settings.progress
        if progress is not None:
            progress(ProgressEvent(stage, message, layer, self.image, total))

    def count(self, field: str) -> None:
        """Tally one cache counter for this build (the cache's ``on_count``)."""
        with self._stats_lock:
            self.stats = self.stats + CacheStats(**{field: 1})

    def timed(self, stage: str, start: float) -> float:
        now = self.settings.clock()
        self.timings[stage] = self.timings.get(stage, 0.0) + (now - start)
        return now

    def layer(
        self,
        key: str,
        paths: tuple[str, ...],
        kind: Literal["store", "customisation"],
        pack: _PackFn,
        *,
        stored: Callable[[str], object] | None = None,
    ) -> BuiltLayer:
        """Reuse the layer stored under ``key``, or pack and upload it once.

        ``stored`` is told the digest of a blob packed here once it is committed.
        """
        packages = tuple(sorted({store_path_name(p) for p in paths}))
        cached = self._cached_layer(key)
        if cached is not None:
            return self._reused(cached, paths, packages, kind)
        if self.cache is None:
            return self._pack(key, paths, packages, kind, pack, stored=stored)

        def ready() -> BuiltLayer | None:
            found = self._cached_layer(key, recheck=True)
            return None if found is None else self._reused(found, paths, packages, kind)

        with self.cache.single_flight(f"layer:{key}"):
            return self.cache.fleet_flight(
                self.store, f"layer-{key}", ready,
                lambda: self._pack(key, paths, packages, kind, pack, stored=stored),
            )

    def _reused(
        self,
        cached: LayerRecord,
        paths: tuple[str, ...],
        packages: tuple[str, ...],
        kind: Literal["store", "customisation"],
    ) -> BuiltLayer:
        return self._built(cached, paths, packages, kind, reused=True)

    def _built(
        self,
        record: LayerRecord,
        paths: tuple[str, ...],
        packages: tuple[str, ...],
        kind: Literal["store", "customisation"],
        *,
        reused: bool,
    ) -> BuiltLayer:
        """The image's layer for ``record``, announced as reused or packed."""
        built = BuiltLayer(
            record.digest, record.diff_id, record.size, record.media_type, paths, packages,
            reused=reused, kind=kind, annotations=record.annotations,
        )
        verb = "reused" if reused else "packed"
        self.emit("layers", f"{verb} {built.digest[:19]} ({', '.join(packages[:3])})", built)
        return built

    def _cached_layer(self, key: str, *, recheck: bool = False) -> LayerRecord | None:
        """The cached layer; a recheck after waiting for the key is not counted twice."""
        if self.cache is None:
            return None
        found = self.cache.get_layer(self.store, key, on_count=None if recheck else self.count)
        if found is not None and found[0].media_type != self.archive.media_type:
            # The key fixes the archive options, so another media type is a bad entry.
            log.warning("layer cache entry %s has media type %.80r; repacking", key,
                        found[0].media_type)
            if not recheck:
                self.count("corrupt_entries")
            return None
        if found is not None and not refresh_blob(self.store, found[0].digest):
            return None  # collected since the lookup: pack it again
        return None if found is None else found[0]

    def _pack(
        self,
        key: str,
        paths: tuple[str, ...],
        packages: tuple[str, ...],
        kind: Literal["store", "customisation"],
        pack: _PackFn,
        *,
        stored: Callable[[str], object] | None = None,
    ) -> BuiltLayer:
        with self.store.open_blob_writer(self.archive.media_type) as writer:
            # A writer that hashes what it is given saves the packer hashing the blob again.
            hashed = writer.written_digest if isinstance(writer, SupportsWrittenDigest) else None
            packed = pack(writer.write, hashed)
            # Always commit: a store keeps an intact copy it has and replaces
            # one that does not hash to its name (a corrupt blob is repaired).
            writer.commit(packed.digest)
        if stored is not None:  # committed: only now may anything refer to the blob
            stored(packed.digest)
        record = LayerRecord(
            packed.digest, packed.diff_id, packed.size, packed.media_type, packed.annotations
        )
        if self.cache is not None:
            self.cache.put_layer(self.store, key, record)
        return self._built(record, paths, packages, kind, reused=False)


def build_image(
    image: Image,
    source: PackageSource,
    *,
    runner: Runner | None = None,
    uploader: Uploader | None = None,
    cache: BuildCache | None = None,
    strategy: LayeringStrategy | None = None,
    archive: ArchiveOptions | None = None,
    config: ImageConfig | None = None,
    manifest_format: ManifestFormat = "oci",
    layer_budget: int = DEFAULT_LAYER_BUDGET,
    timeout: float = DEFAULT_TIMEOUT,
    nix_options: Mapping[str, str] | None = None,
    store_root: Path = Path("/"),
    max_workers: int | None = None,
    progress: ProgressCallback | None = None,
    on_log_line: LogCallback | None = None,
    clock: Callable[[], float] = time.perf_counter,
    expression: str | NixExpression | None = None,
    prior_layers_from_cache: bool = False,
) -> BuildResult:
    """Build ``image`` from ``source`` once: blobs into ``uploader``, a manifest out.

    The one-shot form of :meth:`Builder.build <nixery_core.builder.Builder.build>`:
    it makes the :class:`BuildSettings` from these keywords (each ``None``
    means the default documented there), opens a packing executor of
    ``max_workers`` threads, builds, and closes the executor.  A program
    that builds more than once keeps a :class:`~nixery_core.builder.Builder`.
    ``cache=None`` builds without caching.  Raises
    :class:`~nixery_core.errors.UnknownPackages` for unknown names and the
    other :class:`~nixery_core.errors.NixeryError` types for failures; a
    failed build leaves no partial blob and no cache entry behind.

    ``expression`` is for trusted callers only: Nix source (a function from
    the package set to derivations, e.g. ``"pkgs: [ pkgs.hello ]"``), or a
    :class:`~nixery_core.expressions.NixExpression` (``from_file(path,
    attribute)``), whose outputs join the image's packages.  Nothing derived
    from an image name ever reaches it; what it evaluates (the text, or the
    file's directory content) is part of the cache key.
    """
    settings = BuildSettings(
        runner=runner, uploader=uploader, cache=cache, strategy=strategy, archive=archive,
        layer_budget=layer_budget, timeout=timeout, nix_options=nix_options,
        store_root=store_root, max_workers=max_workers, progress=progress,
        on_log_line=on_log_line, clock=clock, prior_layers_from_cache=prior_layers_from_cache,
    )
    with open_executor(settings.workers) as executor:
        return run_build(
            settings, executor, image, source, config=config, manifest_format=manifest_format,
            expression=expression,
        )


class open_executor:  # noqa: N801 - used as a context manager, like open()
    """A :class:`~nixery_core.workers.WorkerPool` of ``workers`` threads; ``None`` for one."""

    def __init__(self, workers: int) -> None:
        self._pool = WorkerPool(workers) if workers > 1 else None

    def __enter__(self) -> WorkerPool | None:
        return self._pool

    def __exit__(self, *exc: object) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)


def run_build(
    settings: BuildSettings,
    executor: WorkerPool | None,
    image: Image,
    source: PackageSource,
    *,
    config: ImageConfig | None = None,
    manifest_format: ManifestFormat = "oci",
    expression: str | NixExpression | None = None,
) -> BuildResult:
    """The pipeline itself: ``image`` from ``source`` with ``settings``.

    Layers are packed on ``executor`` (``None``: one after the other on the
    calling thread).  :class:`~nixery_core.builder.Builder` and
    :func:`build_image` call this; see the latter for the errors.
    """
    config = config if config is not None else ImageConfig()
    if manifest_format not in ("oci", "docker"):
        raise InvalidInput(f"unknown manifest format {manifest_format!r}: use 'oci' or 'docker'")
    build = _Build(image, settings, executor)
    clock, cache, store = settings.clock, settings.cache, settings.uploader

    start = clock()
    build.emit("resolve", f"resolving {image.reference} for {image.arch.oci_arch}")
    spec = source.resolve(image.tag)
    key = manifest_cache_key(
        image, spec, strategy=settings.strategy, archive=settings.archive, config=config,
        manifest_format=manifest_format, layer_budget=settings.layer_budget,
        expression=expression, prior_layers_from_cache=settings.prior_layers_from_cache,
    )
    plan = _Plan(spec, key, config, manifest_format, _expression(expression))

    def lookup(cache: BuildCache) -> BuildResult | None:
        """One manifest lookup; a miss is counted once by the caller, when it builds."""
        counted: list[str] = []
        record = cache.get_manifest(store, key, on_count=counted.append)
        for field in counted:
            if field != "manifest_misses":  # stale and corrupt entries still count
                build.count(field)
        if record is None:
            return None
        build.timed("resolve", start)
        build.emit("done", f"cache hit for {image.reference}")
        return BuildResult.from_record(image, key, record.body, build.stats, build.timings)

    if cache is None:
        return _build_uncached(build, plan, start)
    # Each build reports one manifest outcome: the hit, or one miss when it builds
    # (a thread that waited for another's build and then hits reports the hit).
    hit = lookup(cache)
    if hit is not None:
        return hit
    def build_it() -> BuildResult:
        build.count("manifest_misses")
        return _build_uncached(build, plan, start)

    with cache.single_flight(f"manifest:{key}"):
        return cache.fleet_flight(store, f"manifest-{key}", lambda: lookup(cache), build_it)


@attrs.frozen
class _Plan:
    """What one uncached build needs besides its state and settings; not public."""

    spec: SourceSpec
    key: str
    config: ImageConfig
    manifest_format: ManifestFormat
    expression: NixExpression | None


def _build_uncached(build: _Build, plan: _Plan, start: float) -> BuildResult:
    # The closure stays rooted against Nix's GC from before realising until packed.
    with BuildRoots() as roots:
        return _build_rooted(build, plan, start, roots.prefix)


def _build_rooted(build: _Build, plan: _Plan, start: float, gc_root: Path) -> BuildResult:
    image, store, config, key = build.image, build.store, plan.config, plan.key
    settings = build.settings
    now = build.timed("resolve", start)

    build.emit("nix", f"realising {len(image.packages)} packages with Nix")
    if plan.expression is None:
        graph = nix.realise(
            image, plan.spec, runner=settings.runner, timeout=settings.timeout,
            nix_options=settings.nix_options, on_log_line=settings.on_log_line, gc_root=gc_root,
        )
    else:
        graph = nix.realise_expression(
            plan.expression.text, plan.spec, runner=settings.runner, arch=image.arch,
            packages=image.packages, timeout=settings.timeout,
            nix_options=settings.nix_options, on_log_line=settings.on_log_line, gc_root=gc_root,
        )
    now = build.timed("nix", now)

    _check_on_disk(graph, build.store_root)
    strategy = settings.strategy_for_build()
    build.emit("layering", f"grouping {len(graph)} store paths with {strategy.name}")
    groups = strategy.group(graph, settings.layer_budget - 1)
    now = build.timed("layering", now)

    entries = customisation_entries(graph, config=config, store_root=build.store_root)
    build.emit("layers", f"packing up to {len(groups) + 1} layers", total=len(groups) + 1)
    layers = _pack_layers(build, [g.paths for g in groups], entries)
    now = build.timed("layers", now)

    build.emit("metadata", "writing config and manifest")
    has_shell = "bashInteractive" in image.packages
    config = attach.with_labels(config, plan.spec)
    config_bytes = render_config(
        arch=image.arch,
        diff_ids=[layer.diff_id for layer in layers],
        config=config,
        default_cmd=("bash",) if has_shell else None,
        history=[_history(layer) for layer in layers],
    )
    config_info = store.put_blob(config_bytes, "application/vnd.oci.image.config.v1+json")
    manifest_bytes, media_type = render_manifest(
        config=config_info,
        layers=[
            LayerDescriptor(
                layer.digest, layer.size, layer.media_type, layer.diff_id, layer.annotations
            )
            for layer in layers
        ],
        format=plan.manifest_format,
        annotations=attach.manifest_annotations(config, plan.spec, plan.manifest_format),
    )
    manifest_info: BlobInfo = store.put_blob(manifest_bytes, media_type)
    sboms = attach.attach_sboms(
        store, attach.Inventory.from_graph(graph, image, created=config.created,
                                           source=attach.source_labels(plan.spec)),
        Descriptor(media_type, manifest_info.digest, manifest_info.size),
    )
    result = BuildResult(
        image=image,
        manifest=manifest_bytes,
        manifest_digest=manifest_info.digest,
        manifest_media_type=media_type,
        config=config_bytes,
        config_digest=config_info.digest,
        layers=tuple(layers),
        cache_key=key,
        from_cache=False,
        timings=build.timings,
        cache_stats=build.stats,
        sboms=sboms,
    )
    if build.cache is not None:
        build.cache.put_manifest(
            store, key, result.to_record(), result.blobs,
            pinned=outside_reads.entry_pinned(plan.spec),
        )
    build.timed("metadata", now)
    build.emit("done", f"built {image.reference}: {manifest_info.digest}")
    return attrs.evolve(result, timings=dict(build.timings), cache_stats=build.stats)


def refresh_blob(store: Uploader, digest: str) -> bool:
    """Whether the blob is stored; a store with :class:`SupportsRefresh` also restarts its
    age, so gc's grace period protects a blob this build is about to name again."""
    if isinstance(store, SupportsRefresh):
        return store.touch_blob(digest)
    return store.blob_info(digest) is not None


def _check_on_disk(graph: RuntimeGraph, store_root: Path) -> None:
    """Every store path exists, so a missing one fails the build before any upload."""
    for path in graph.paths:
        try:
            (store_root / path.lstrip("/")).lstat()
        except FileNotFoundError as exc:
            raise StorePathMissing(path) from exc


def _history(layer: BuiltLayer) -> str:
    if layer.kind == "customisation":
        return "nixery-core: customisation layer (symlinks, /tmp, /etc)"
    names = ", ".join(layer.packages[:8])
    more = f" and {len(layer.packages) - 8} more" if len(layer.packages) > 8 else ""
    return f"nixery-core: {names}{more}"


def _pack_layers(
    build: _Build, groups: Sequence[tuple[str, ...]], entries: Sequence[TarEntry]
) -> list[BuiltLayer]:
    archive, root, pool = build.archive, build.store_root, build.executor
    # Everything runs on the build's one pool; without one, on this thread alone.
    threads = None if pool is not None else 1
    fragments = build.cache.fragments_for(build.store) if build.cache is not None else None
    # Fragments kept as byte ranges of the layer blobs (no second copy), where chosen.
    ranges = (
        build.cache.fragment_ranges_for(build.store, archive) if build.cache is not None else None
    )

    def store_layer(paths: tuple[str, ...]) -> BuiltLayer:
        refused: set[str] = set()
        while True:
            try:
                return pack_layer(paths)
            except BadCachedFragment as exc:
                # Dropped from the cache: packed again, the store path is compressed here.
                # A key refused twice is no cached fragment's fault: raised.
                if exc.key in refused:
                    raise
                refused.add(exc.key)
                log.warning("%s; packing the layer again", exc)

    def pack_layer(paths: tuple[str, ...]) -> BuiltLayer:
        layer_ranges = ranges.layer() if ranges is not None else None
        try:
            return build.layer(
                layer_cache_key(paths, archive),
                paths,
                "store",
                lambda write, hashed: pack_store_paths(
                    paths, write, archive, store_root=root, threads=threads, executor=pool,
                    fragments=layer_ranges if layer_ranges is not None else fragments,
                    blob_digest=hashed,
                ),
                stored=None if layer_ranges is None else layer_ranges.stored,
            )
        finally:
            if layer_ranges is not None:  # a failed pack too: its read-ahead stops now
                layer_ranges.close()

    def custom_layer() -> BuiltLayer:
        return build.layer(
            entries_cache_key(entries, archive),
            (),
            "customisation",
            lambda write, hashed: pack_entries(
                entries, write, archive, threads=threads, executor=pool, blob_digest=hashed
            ),
        )

    if pool is None:
        return [*(store_layer(g) for g in groups), custom_layer()]
    futures = [pool.submit(store_layer, g) for g in groups]
    custom = pool.submit(custom_layer)
    try:
        # Wait without helping: this thread is the caller's, the pool's workers
        # pack (so no more than max_workers threads ever work on layers).
        wait([*futures, custom], return_when=FIRST_EXCEPTION)
        return [*(f.result() for f in futures), custom.result()]
    finally:
        # A failed layer ends the build: drop the layers not started yet, wait for the rest.
        for future in (*futures, custom):
            future.cancel()
        for future in (*futures, custom):
            if not future.cancelled():
                future.exception()
