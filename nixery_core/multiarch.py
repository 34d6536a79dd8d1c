"""Multi-architecture images: one name, one image per architecture, one index.

:func:`build_multiarch` builds an :class:`~nixery_core.names.Image` once per
architecture with :func:`~nixery_core.build.run_build` (``amd64`` and
``arm64`` by default, in that order), renders an OCI image index
(``format="oci"``) or a Docker manifest list (``format="docker"``) naming
each manifest with its platform, stores the index as a blob and caches it.
Each per-architecture manifest is rendered in the same format as the index,
so a Docker manifest list only names Docker schema 2 manifests.

Caching.  The index cache key is a hash over the format and the ordered
``(architecture, manifest cache key)`` pairs, where each manifest key is the
one :func:`~nixery_core.build.build_image` uses for that architecture (so
every build input, the source revision and the expression included, is
covered).  The entry is kept by :class:`~nixery_core.cache.BuildCache` under
``manifests/index-<key>`` like any manifest entry: it is written only once
the index and every blob of every architecture are stored, names all of
them (so garbage collection keeps them), and is served only while they all
exist.  A hit from a pinned source runs no Nix and builds nothing; a miss
builds each architecture through ``build_image``, which uses the manifest
and layer caches as usual.

Architectures are built one after the other: Nix parallelises inside each
build, and layers shared between architectures (none for real nixpkgs,
whose store paths differ per system) are packed once.  Building a foreign
architecture needs a Nix that can: ``extra-platforms`` with binfmt
emulation, or remote builders (the offline package set only needs
``nix_options={"extra-platforms": "aarch64-linux"}``, its arm64 packages
are made by the host's busybox).

Ordering matters: the index lists its manifests in ``archs`` order, so two
orders are two indexes (and two cache keys); clients pick by platform and
do not care.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import attrs

from nixery_core import outside_reads
from nixery_core.archive import ArchiveOptions
from nixery_core.build import (
    DEFAULT_LAYER_BUDGET,
    DEFAULT_TIMEOUT,
    BuildSettings,
    manifest_cache_key,
    open_executor,
    run_build,
)
from nixery_core.cache import LAYOUT_VERSION, BuildCache, CacheStats
from nixery_core.digests import sha256_digest
from nixery_core.errors import InvalidInput
from nixery_core.expressions import NixExpression
from nixery_core.image_config import ImageConfig
from nixery_core.manifest import Descriptor, Format, ManifestRef, render_index
from nixery_core.names import AMD64, ARM64, Architecture, Image
from nixery_core.oci_layout import write_oci_layout
from nixery_core.protocols import LayeringStrategy, LogCallback, ReadableStore, Runner, Uploader
from nixery_core.results import BuildResult, MultiArchResult, ProgressCallback
from nixery_core.sources import PackageSource, SourceSpec, canonical_json
from nixery_core.workers import WorkerPool

__all__ = [
    "DEFAULT_ARCHS",
    "INDEX_KEY_PREFIX",
    "MultiArchResult",
    "build_multiarch",
    "run_multiarch",
    "write_multiarch_layout",
]

log = logging.getLogger(__name__)

#: The architectures :func:`build_multiarch` builds unless told otherwise.
DEFAULT_ARCHS: tuple[Architecture, ...] = (AMD64, ARM64)
#: Index cache keys start with this, so they never collide with a manifest key
#: (a bare hex digest) in the shared ``manifests/`` namespace.
INDEX_KEY_PREFIX = "index-"


def _check_archs(archs: Sequence[Architecture]) -> tuple[Architecture, ...]:
    if isinstance(archs, Architecture):
        archs = (archs,)
    out = tuple(archs)
    if not out:
        raise InvalidInput("build_multiarch needs at least one architecture")
    seen: set[str] = set()
    for arch in out:
        if not isinstance(arch, Architecture):
            raise InvalidInput(f"{arch!r} is not an Architecture (use names.AMD64, names.ARM64)")
        if arch.oci_arch in seen:
            raise InvalidInput(f"architecture {arch.oci_arch} is listed twice")
        seen.add(arch.oci_arch)
    return out


def _check_format(format: str) -> None:  # noqa: A002 - the public keyword's name
    if format not in ("oci", "docker"):
        raise InvalidInput(f"unknown index format {format!r}: expected 'oci' or 'docker'")


def _index_key(format: str, arch_keys: Sequence[tuple[str, str]]) -> str:  # noqa: A002 - as above
    payload = {
        "kind": "index",
        "layout": LAYOUT_VERSION,
        "format": format,
        "manifests": [list(pair) for pair in arch_keys],
    }
    return INDEX_KEY_PREFIX + hashlib.sha256(canonical_json(payload)).hexdigest()


@attrs.define
class _IndexBuild:
    """One multi-architecture build with its defaults resolved; not public."""

    image: Image
    source: PackageSource
    archs: tuple[Architecture, ...]
    format: Format
    settings: BuildSettings
    executor: WorkerPool | None
    config: ImageConfig
    expression: str | NixExpression | None
    spec: SourceSpec
    expected: dict[str, str]
    key: str
    start: float
    timings: dict[str, float] = attrs.field(factory=dict)
    #: Stale and corrupt entries earlier lookups met (they count in the result's stats).
    met: CacheStats = attrs.field(factory=CacheStats)

    @property
    def store(self) -> Uploader:
        return self.settings.uploader

    @property
    def cache(self) -> BuildCache | None:
        return self.settings.cache

    def lookup(self) -> MultiArchResult | None:
        """The cached index, or None.

        An entry :meth:`_from_record` cannot read is corrupt to the cache
        (its check, so counted and logged there, a miss); as for an image,
        the stale and corrupt entries a lookup met count in the result's
        stats (:attr:`met`), its misses only in the per-architecture builds.
        """
        if self.cache is None:
            return None
        counted: list[str] = []
        #: The result the check read from the entry returned (none when it was memoised).
        read: list[MultiArchResult] = []
        record = self.cache.get_manifest(
            self.store, self.key, on_count=counted.append,
            check=lambda body: read.append(self._from_record(body, CacheStats())),
        )
        if record is None:
            self.met = self.met + CacheStats(
                **{f: counted.count(f) for f in set(counted) if f != "manifest_misses"}
            )
            return None
        delta = self.met + CacheStats(**{field: counted.count(field) for field in set(counted)})
        self.timings["resolve"] = self.settings.clock() - self.start
        if not read:
            return self._from_record(record.body, delta)
        result = read[-1]  # read once: its stats are the lookup's, known only now
        return attrs.evolve(result, cache_stats=delta, manifests={
            arch: attrs.evolve(built, cache_stats=delta)
            for arch, built in result.manifests.items()
        })

    def _from_record(self, body: Mapping[str, Any], stats: CacheStats) -> MultiArchResult:
        """Rebuild a result from an index cache entry (TypeError/KeyError if malformed)."""
        index = str(body["index"]).encode()
        entries = body["manifests"]
        if not isinstance(entries, list) or [e["arch"] for e in entries] != list(self.expected):
            raise TypeError("index entry architectures do not match the request")
        manifests: dict[str, BuildResult] = {}
        for arch, entry in zip(self.archs, entries, strict=True):
            key = self.expected[arch.oci_arch]
            if entry["cache_key"] != key:
                raise TypeError(f"index entry for {arch.oci_arch} names another manifest key")
            manifests[arch.oci_arch] = BuildResult.from_record(
                self.image.with_arch(arch), key, entry["record"], stats, self.timings
            )
        return MultiArchResult(
            image=self.image, index=index, index_digest=sha256_digest(index),
            media_type=str(body["media_type"]), manifests=manifests, cache_key=self.key,
            from_cache=True, timings=self.timings, cache_stats=stats,
        )

    def build(self) -> MultiArchResult:
        """Build every architecture, store the index, then write the index entry."""
        results: dict[str, BuildResult] = {}
        stats = self.met
        for arch in self.archs:
            built = run_build(
                self.settings, self.executor, self.image.with_arch(arch), self.source,
                config=self.config, manifest_format=self.format, expression=self.expression,
            )
            results[arch.oci_arch] = built
            stats = stats + built.cache_stats
            for stage, seconds in built.timings.items():
                self.timings[stage] = self.timings.get(stage, 0.0) + seconds
        refs = [
            ManifestRef(r.manifest_digest, len(r.manifest), r.manifest_media_type, arch)
            for arch, r in zip(self.archs, results.values(), strict=True)
        ]
        index, media_type = render_index(refs, self.format)
        info = self.store.put_blob(index, media_type)
        result = MultiArchResult(
            image=self.image, index=index, index_digest=info.digest, media_type=media_type,
            manifests=results, cache_key=self.key, from_cache=False, timings=self.timings,
            cache_stats=stats,
        )
        drift = [a for a, r in results.items() if r.cache_key != self.expected[a]]
        if drift:
            # Only when build_image's key inputs outgrow the arguments given to
            # manifest_cache_key here; a test pins that this does not happen.
            log.warning("manifest keys for %s differ from the index's; not caching %s",
                        drift, self.key)
        elif self.cache is not None:
            self.cache.put_manifest(
                self.store, self.key, result.to_record(), result.blobs,
                pinned=outside_reads.entry_pinned(self.spec),
            )
        return result


def build_multiarch(
    image: Image,
    source: PackageSource,
    *,
    archs: Sequence[Architecture] = DEFAULT_ARCHS,
    format: Format = "oci",  # noqa: A002 - the same keyword as render_index
    config: ImageConfig | None = None,
    expression: str | NixExpression | None = None,
    runner: Runner | None = None,
    uploader: Uploader | None = None,
    cache: BuildCache | None = None,
    strategy: LayeringStrategy | None = None,
    archive: ArchiveOptions | None = None,
    layer_budget: int = DEFAULT_LAYER_BUDGET,
    timeout: float = DEFAULT_TIMEOUT,
    nix_options: Mapping[str, str] | None = None,
    store_root: Path = Path("/"),
    max_workers: int | None = None,
    progress: ProgressCallback | None = None,
    on_log_line: LogCallback | None = None,
    clock: Callable[[], float] = time.perf_counter,
    prior_layers_from_cache: bool = False,
) -> MultiArchResult:
    """Build ``image`` for every architecture in ``archs`` and combine them in one index.

    The one-shot form of :meth:`Builder.build_multiarch
    <nixery_core.builder.Builder.build_multiarch>`: the keywords after
    ``expression`` are the :class:`~nixery_core.build.BuildSettings` (the
    same as :func:`~nixery_core.build.build_image`'s, with its defaults).
    ``image``'s own architecture is ignored: each build uses
    ``image.with_arch(arch)``.  ``format`` is the index's (and every
    manifest's) format.

    Raises :class:`~nixery_core.errors.InvalidInput` for an empty or
    duplicated ``archs`` list or an unknown ``format``, and whatever
    ``build_image`` raises for a failing architecture (the first failure
    ends the build; nothing is cached for the index).
    """
    settings = BuildSettings(
        runner=runner, uploader=uploader, cache=cache, strategy=strategy, archive=archive,
        layer_budget=layer_budget, timeout=timeout, nix_options=nix_options,
        store_root=store_root, max_workers=max_workers, progress=progress,
        on_log_line=on_log_line, clock=clock, prior_layers_from_cache=prior_layers_from_cache,
    )
    with open_executor(settings.workers) as executor:
        return run_multiarch(
            settings, executor, image, source, archs=archs, format=format, config=config,
            expression=expression,
        )


def run_multiarch(
    settings: BuildSettings,
    executor: WorkerPool | None,
    image: Image,
    source: PackageSource,
    *,
    archs: Sequence[Architecture] = DEFAULT_ARCHS,
    format: Format = "oci",  # noqa: A002 - the same keyword as render_index
    config: ImageConfig | None = None,
    expression: str | NixExpression | None = None,
) -> MultiArchResult:
    """The multi-architecture pipeline with ``settings``; see :func:`build_multiarch`."""
    arch_list = _check_archs(archs)
    _check_format(format)
    config = config if config is not None else ImageConfig()
    start = settings.clock()
    spec = source.resolve(image.tag)
    expected = {
        arch.oci_arch: manifest_cache_key(
            image.with_arch(arch), spec, strategy=settings.strategy, archive=settings.archive,
            config=config, manifest_format=format, layer_budget=settings.layer_budget,
            expression=expression, prior_layers_from_cache=settings.prior_layers_from_cache,
        )
        for arch in arch_list
    }
    key = _index_key(format, list(expected.items()))
    run = _IndexBuild(
        image, source, arch_list, format, settings, executor, config, expression, spec, expected,
        key, start,
    )
    hit = run.lookup()
    if hit is not None:
        return hit
    if settings.cache is None:
        return run.build()
    with settings.cache.single_flight(f"manifest:{key}"):
        hit = run.lookup()
        return hit if hit is not None else run.build()


def write_multiarch_layout(
    directory: Path,
    result: MultiArchResult,
    *,
    store: ReadableStore,
    ref_name: str | None = "latest",
    link: bool = True,
    durable: bool = True,
) -> Descriptor:
    """Write a multi-architecture image into an OCI layout at ``directory``.

    The layout's ``index.json`` gets one entry (tagged ``ref_name``) for the
    very index bytes in ``result`` (same digest), the per-architecture
    manifests come from ``result`` and their configs and layers from
    ``store``.  See :func:`~nixery_core.oci_layout.write_oci_layout` for the
    errors and for ``link``/``durable``.
    """
    children = {r.manifest_digest: r.manifest for r in result.manifests.values()}
    return write_oci_layout(
        Path(directory), store=store, manifest=result.index, ref_name=ref_name,
        media_type=result.media_type, extra_blobs=children, link=link, durable=durable,
    )
