"""``build_image``: from an :class:`~nixery_core.names.Image` to stored blobs and a manifest.

The pipeline, each stage timed on the result:

1. ``resolve``: the package source and the manifest cache key;
   a cache hit ends the build here (a pinned source runs no Nix at all);
2. ``nix``: evaluate, realise and query the runtime closure;
3. ``layering``: group store paths into layers;
4. ``layers``: pack and upload every layer not already stored, in parallel
   threads (the compressors release the GIL), each under its layer-key lock;
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
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Literal

import attrs

from nixery_core import nix
from nixery_core.archive import ArchiveOptions, PackedLayer, pack_entries, pack_store_paths
from nixery_core.cache import LAYOUT_VERSION, BuildCache, CacheStats, LayerRecord
from nixery_core.customisation import customisation_entries
from nixery_core.entries import TarEntry
from nixery_core.errors import StorePathMissing
from nixery_core.expressions import NixExpression
from nixery_core.graph import RuntimeGraph, store_path_name
from nixery_core.image_config import ImageConfig
from nixery_core.manifest import Descriptor, LayerDescriptor, render_config, render_manifest
from nixery_core.names import Image
from nixery_core.protocols import BlobInfo, LayeringStrategy, LogCallback, Runner, Uploader
from nixery_core.sbom import attach
from nixery_core.sources import PackageSource, SourceSpec, canonical_json, image_cache_key

__all__ = [
    "DEFAULT_LAYER_BUDGET",
    "BuildResult",
    "BuiltLayer",
    "ProgressEvent",
    "build_image",
    "default_store",
]

log = logging.getLogger(__name__)

#: Layers an image may have, customisation layer included (Nixery's figure;
#: Docker's limit is about 125, the rest is room for extension).
DEFAULT_LAYER_BUDGET = 94

Stage = Literal["resolve", "nix", "layering", "layers", "metadata", "done"]


@attrs.frozen
class ProgressEvent:
    """One step of a build, for progress displays: a stage start or a layer done."""

    stage: Stage
    message: str
    layer: BuiltLayer | None = None


ProgressCallback = Callable[[ProgressEvent], None]


@attrs.frozen
class BuiltLayer:
    """A layer of a built image.

    ``packages`` are the store path names (without hashes) the layer holds;
    ``reused`` says whether it came from the layer cache instead of being
    packed by this build.
    """

    digest: str
    diff_id: str
    size: int
    media_type: str
    paths: tuple[str, ...]
    packages: tuple[str, ...]
    reused: bool = False
    kind: Literal["store", "customisation"] = "store"
    #: For the layer's OCI descriptor (eStargz and zstd:chunked TOC position).
    annotations: tuple[tuple[str, str], ...] = ()

    def to_json(self) -> dict[str, Any]:
        data = attrs.asdict(self)
        data["paths"] = list(self.paths)
        data["packages"] = list(self.packages)
        if self.annotations:
            data["annotations"] = dict(self.annotations)
        else:
            del data["annotations"]
        return data

    @classmethod
    def from_json(cls, data: Mapping[str, Any], *, reused: bool) -> BuiltLayer:
        kind = data["kind"]
        if kind not in ("store", "customisation"):
            raise TypeError(f"unknown layer kind {kind!r}")
        return cls(
            digest=str(data["digest"]),
            diff_id=str(data["diff_id"]),
            size=int(data["size"]),
            media_type=str(data["media_type"]),
            paths=tuple(str(p) for p in data["paths"]),
            packages=tuple(str(p) for p in data["packages"]),
            reused=reused,
            kind=kind,
            annotations=tuple(sorted(dict(data.get("annotations", {})).items())),
        )


@attrs.frozen
class BuildResult:
    """Everything a registry or a notebook needs about one built image."""

    image: Image
    manifest: bytes
    manifest_digest: str
    manifest_media_type: str
    config: bytes
    config_digest: str
    layers: tuple[BuiltLayer, ...]
    cache_key: str
    from_cache: bool = False
    timings: Mapping[str, float] = attrs.field(factory=dict)
    cache_stats: CacheStats = attrs.field(factory=CacheStats)
    sboms: tuple[attach.SbomArtifact, ...] = ()

    @property
    def blobs(self) -> tuple[str, ...]:
        """Every blob the image needs: manifest, config, layers, then its SBOMs' blobs."""
        sbom_blobs = [d for a in self.sboms for d in a.blobs]
        return (
            self.manifest_digest, self.config_digest, *(layer.digest for layer in self.layers),
            *dict.fromkeys(sbom_blobs),
        )

    def sbom(self, store: Uploader, format: attach.SbomFormat = "spdx") -> bytes:  # noqa: A002
        """The image's SBOM document (``"spdx"`` or ``"cyclonedx"`` JSON), read from ``store``.

        See :mod:`nixery_core.sbom`; raises
        :class:`~nixery_core.errors.InvalidInput` for a format this build has not.
        """
        return attach.sbom_document(self.sboms, store, format)

    @property
    def total_size(self) -> int:
        return sum(layer.size for layer in self.layers) + len(self.config)

    def to_record(self) -> dict[str, Any]:
        """The JSON body the manifest cache keeps."""
        return {
            "manifest": self.manifest.decode(),
            "manifest_media_type": self.manifest_media_type,
            "config": self.config.decode(),
            "layers": [layer.to_json() for layer in self.layers],
            "sboms": [artifact.to_json() for artifact in self.sboms],
        }

    @classmethod
    def from_record(
        cls, image: Image, key: str, body: Mapping[str, Any], stats: CacheStats,
        timings: Mapping[str, float],
    ) -> BuildResult:
        manifest = str(body["manifest"]).encode()
        config = str(body["config"]).encode()
        return cls(
            image=image,
            manifest=manifest,
            manifest_digest=_sha256(manifest),
            manifest_media_type=str(body["manifest_media_type"]),
            config=config,
            config_digest=_sha256(config),
            layers=tuple(BuiltLayer.from_json(layer, reused=True) for layer in body["layers"]),
            cache_key=key,
            from_cache=True,
            timings=timings,
            cache_stats=stats,
            sboms=tuple(attach.SbomArtifact.from_json(a) for a in body.get("sboms", [])),
        )

    def _repr_html_(self) -> str:
        """A table of layers for Jupyter."""
        from nixery_core.display import build_result_html  # noqa: PLC0415 - display only

        return build_result_html(self)


def _sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def default_store() -> Uploader:
    """The default uploader: a filesystem store under the user's cache directory.

    ``$NIXERY_CORE_STORE`` overrides the location, else
    ``$XDG_CACHE_HOME/nixery-core/store`` (``~/.cache/nixery-core/store``).
    """
    from nixery_core.storage.filesystem import FilesystemStore  # noqa: PLC0415 - default only

    root = os.environ.get("NIXERY_CORE_STORE")
    return FilesystemStore(Path(root) if root else user_cache_dir() / "store")


def user_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/nixery-core`` (``~/.cache/nixery-core``): the defaults' home."""
    cache_home = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(cache_home) / "nixery-core"


def _default_strategy() -> LayeringStrategy:
    from nixery_core.layering import DEFAULT_STRATEGY  # noqa: PLC0415 - avoids an import cycle

    return DEFAULT_STRATEGY


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
) -> str:
    """A key over everything that changes the built manifest."""
    expr = _expression(expression)
    payload: dict[str, object] = {
        "layout": LAYOUT_VERSION,
        "image": image_cache_key(image, spec),
        "strategy": {"name": strategy.name, "parameters": dict(strategy.parameters())},
        "archive": archive.parameters(),
        "config": config.parameters(),
        "format": manifest_format,
        "budget": layer_budget,
        "expression": None if expr is None else expr.key,
        "sbom": attach.SBOM_VERSION,
    }
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
    store: Uploader
    cache: BuildCache | None
    archive: ArchiveOptions
    store_root: Path
    progress: ProgressCallback | None
    clock: Callable[[], float]
    stats: CacheStats = attrs.field(factory=CacheStats)
    _stats_lock: threading.Lock = attrs.field(factory=threading.Lock)
    timings: dict[str, float] = attrs.field(factory=dict)

    def emit(self, stage: Stage, message: str, layer: BuiltLayer | None = None) -> None:
        if self.progress is not None:
            self.progress(ProgressEvent(stage, message, layer))

    def count(self, field: str) -> None:
        """Tally one cache counter for this build (the cache's ``on_count``)."""
        with self._stats_lock:
            self.stats = self.stats + CacheStats(**{field: 1})

    def timed(self, stage: str, start: float) -> float:
        now = self.clock()
        self.timings[stage] = self.timings.get(stage, 0.0) + (now - start)
        return now

    def layer(
        self,
        key: str,
        paths: tuple[str, ...],
        kind: Literal["store", "customisation"],
        pack: Callable[[Callable[[bytes], object]], PackedLayer],
    ) -> BuiltLayer:
        """Reuse the layer stored under ``key``, or pack and upload it once."""
        packages = tuple(sorted({store_path_name(p) for p in paths}))
        cached = self._cached_layer(key)
        if cached is None and self.cache is not None:
            with self.cache.single_flight(f"layer:{key}"):
                cached = self._cached_layer(key, recheck=True)
                if cached is None:
                    return self._pack(key, paths, packages, kind, pack)
        elif cached is None:
            return self._pack(key, paths, packages, kind, pack)
        built = BuiltLayer(
            cached.digest, cached.diff_id, cached.size, cached.media_type, paths, packages,
            reused=True, kind=kind, annotations=cached.annotations,
        )
        self.emit("layers", f"reused {built.digest[:19]} ({', '.join(packages[:3])})", built)
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
        return None if found is None else found[0]

    def _pack(
        self,
        key: str,
        paths: tuple[str, ...],
        packages: tuple[str, ...],
        kind: Literal["store", "customisation"],
        pack: Callable[[Callable[[bytes], object]], PackedLayer],
    ) -> BuiltLayer:
        with self.store.open_blob_writer(self.archive.media_type) as writer:
            packed = pack(writer.write)
            # Always commit: a store keeps an intact copy it has and replaces
            # one that does not hash to its name (a corrupt blob is repaired).
            writer.commit(packed.digest)
        record = LayerRecord(
            packed.digest, packed.diff_id, packed.size, packed.media_type, packed.annotations
        )
        if self.cache is not None:
            self.cache.put_layer(self.store, key, record)
        built = BuiltLayer(
            packed.digest, packed.diff_id, packed.size, packed.media_type, paths, packages,
            reused=False, kind=kind, annotations=packed.annotations,
        )
        self.emit("layers", f"packed {built.digest[:19]} ({', '.join(packages[:3])})", built)
        return built


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
    manifest_format: Literal["oci", "docker"] = "oci",
    layer_budget: int = DEFAULT_LAYER_BUDGET,
    timeout: float = 60.0,
    nix_options: Mapping[str, str] | None = None,
    store_root: Path = Path("/"),
    max_workers: int | None = None,
    progress: ProgressCallback | None = None,
    on_log_line: LogCallback | None = None,
    clock: Callable[[], float] = time.perf_counter,
    expression: str | NixExpression | None = None,
) -> BuildResult:
    """Build ``image`` from ``source``: blobs into ``uploader``, a manifest out.

    Every injectable has a real default: a :class:`~nixery_core.runner.SubprocessRunner`,
    the :func:`default_store`, the default layering strategy, gzip archives.
    ``cache=None`` builds without caching.  ``store_root`` is where
    ``/nix/store`` is read from (fakes put a store in a temporary directory).
    Raises :class:`~nixery_core.errors.UnknownPackages` for unknown names and
    the other :class:`~nixery_core.errors.NixeryError` types for failures;
    a failed build leaves no partial blob and no cache entry behind.

    ``expression`` is for trusted callers only: Nix source (a function from
    the package set to derivations, e.g. ``"pkgs: [ pkgs.hello ]"``), or a
    :class:`~nixery_core.expressions.NixExpression` (``from_file(path,
    attribute)``), whose outputs join the image's packages.  Nothing derived
    from an image name ever reaches it; what it evaluates (the text, or the
    file's directory content) is part of the cache key.
    """
    if runner is None:
        from nixery_core.runner import SubprocessRunner  # noqa: PLC0415 - default only

        runner = SubprocessRunner()
    store = uploader if uploader is not None else default_store()
    strategy = strategy if strategy is not None else _default_strategy()
    archive = archive if archive is not None else ArchiveOptions()
    config = config if config is not None else ImageConfig()
    if layer_budget < 2:
        raise ValueError("layer_budget must be at least 2 (one store layer, one customisation)")
    build = _Build(image, store, cache, archive, store_root, progress, clock)

    start = clock()
    build.emit("resolve", f"resolving {image.reference} for {image.arch.oci_arch}")
    spec = source.resolve(image.tag)
    key = manifest_cache_key(
        image, spec, strategy=strategy, archive=archive, config=config,
        manifest_format=manifest_format, layer_budget=layer_budget, expression=expression,
    )

    plan = _Plan(
        spec, key, runner, strategy, config, manifest_format, layer_budget, timeout,
        nix_options, max_workers, on_log_line, _expression(expression),
    )

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
    with cache.single_flight(f"manifest:{key}"):
        hit = lookup(cache)
        if hit is not None:
            return hit
        build.count("manifest_misses")
        return _build_uncached(build, plan, start)


@attrs.frozen
class _Plan:
    """What one uncached build needs besides its state; not public."""

    spec: SourceSpec
    key: str
    runner: Runner
    strategy: LayeringStrategy
    config: ImageConfig
    manifest_format: Literal["oci", "docker"]
    layer_budget: int
    timeout: float
    nix_options: Mapping[str, str] | None
    max_workers: int | None
    on_log_line: LogCallback | None
    expression: NixExpression | None


def _build_uncached(build: _Build, plan: _Plan, start: float) -> BuildResult:
    image, store, config, key = build.image, build.store, plan.config, plan.key
    now = build.timed("resolve", start)

    build.emit("nix", f"realising {len(image.packages)} packages with Nix")
    if plan.expression is None:
        graph = nix.realise(
            image, plan.spec, runner=plan.runner, timeout=plan.timeout,
            nix_options=plan.nix_options, on_log_line=plan.on_log_line,
        )
    else:
        graph = nix.realise_expression(
            plan.expression.text, plan.spec, runner=plan.runner, arch=image.arch,
            packages=image.packages, timeout=plan.timeout, nix_options=plan.nix_options,
            on_log_line=plan.on_log_line,
        )
    now = build.timed("nix", now)

    _check_on_disk(graph, build.store_root)
    build.emit("layering", f"grouping {len(graph)} store paths with {plan.strategy.name}")
    groups = plan.strategy.group(graph, plan.layer_budget - 1)
    now = build.timed("layering", now)

    entries = customisation_entries(graph, config=config, store_root=build.store_root)
    build.emit("layers", f"packing up to {len(groups) + 1} layers")
    layers = _pack_layers(build, [g.paths for g in groups], entries, plan.max_workers)
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
            store, key, result.to_record(), result.blobs, pinned=plan.spec.pinned
        )
    build.timed("metadata", now)
    build.emit("done", f"built {image.reference}: {manifest_info.digest}")
    return attrs.evolve(result, timings=dict(build.timings), cache_stats=build.stats)


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
    build: _Build,
    groups: Sequence[tuple[str, ...]],
    entries: Sequence[TarEntry],
    max_workers: int | None,
) -> list[BuiltLayer]:
    archive, root = build.archive, build.store_root

    def store_layer(paths: tuple[str, ...]) -> BuiltLayer:
        return build.layer(
            layer_cache_key(paths, archive),
            paths,
            "store",
            lambda write: pack_store_paths(paths, write, archive, store_root=root),
        )

    def custom_layer() -> BuiltLayer:
        return build.layer(
            entries_cache_key(entries, archive),
            (),
            "customisation",
            lambda write: pack_entries(entries, write, archive),
        )

    workers = max_workers if max_workers is not None else min(8, os.cpu_count() or 1)
    if workers <= 1:
        return [*(store_layer(g) for g in groups), custom_layer()]
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="nixery-pack") as pool:
        futures = [pool.submit(store_layer, g) for g in groups]
        custom = pool.submit(custom_layer)
        return [*(f.result() for f in futures), custom.result()]
