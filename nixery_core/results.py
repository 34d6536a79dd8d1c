"""What a build returns: :class:`BuildResult` (one image), :class:`MultiArchResult` (an index).

Plain values: a registry serves their bytes, a notebook shows them
(``_repr_html_``), and the manifest cache keeps them as JSON
(:meth:`BuildResult.to_record`, :meth:`MultiArchResult.to_record`).
:class:`ProgressEvent` is what a build reports while it runs.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, Literal

import attrs

from nixery_core.cache import CacheStats, LayerRecord, annotated_json
from nixery_core.comparison import BuildComparison, compare_layers
from nixery_core.digests import sha256_digest
from nixery_core.display import build_result_html
from nixery_core.errors import InvalidCacheRecord
from nixery_core.names import Image
from nixery_core.protocols import ReadableStore
from nixery_core.record_fields import json_object, malformed, str_field
from nixery_core.sbom import attach

__all__ = [
    "BuildResult",
    "BuiltLayer",
    "MultiArchResult",
    "ProgressCallback",
    "ProgressEvent",
    "Stage",
]

Stage = Literal["resolve", "nix", "layering", "layers", "metadata", "done"]


@attrs.frozen
class ProgressEvent:
    """One step of a build, for progress displays: a stage start or a layer done.

    ``image`` is the image being built (``None`` only for events made by
    hand), so one callback can follow several builds at once; ``total`` is
    the number of layers the build will have, set on the ``layers`` stage
    start.
    """

    stage: Stage
    message: str
    layer: BuiltLayer | None = None
    image: Image | None = None
    total: int | None = None


#: Receives every :class:`ProgressEvent` of a build, on the thread that made it.
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
        data = annotated_json(self, self.annotations)
        data["paths"] = list(self.paths)
        data["packages"] = list(self.packages)
        return data

    @classmethod
    def from_json(cls, data: Mapping[str, Any], *, reused: bool) -> BuiltLayer:
        """Parse a layer as :meth:`to_json` wrote it; a missing or malformed field raises
        :class:`~nixery_core.errors.InvalidCacheRecord` naming it."""
        record = LayerRecord.from_json(data)  # digest, diff_id, size, media type, annotations
        kind = data.get("kind")
        if kind not in ("store", "customisation"):
            raise InvalidCacheRecord(f"layer kind {str(kind)[:40]!r} is unknown")
        return cls(
            digest=record.digest,
            diff_id=record.diff_id,
            size=record.size,
            media_type=record.media_type,
            paths=_strings(data, "paths"),
            packages=_strings(data, "packages"),
            reused=reused,
            kind=kind,
            annotations=record.annotations,
        )


def _strings(data: Mapping[str, Any], name: str) -> tuple[str, ...]:
    """A layer's field ``name``, a list of strings."""
    value = data.get(name)
    if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
        raise InvalidCacheRecord(f"layer {name} is not a list of strings")
    return tuple(value)


def _list(body: Mapping[str, Any], name: str, *, optional: bool = False) -> list[Any]:
    """A build record's field ``name``, a list (empty when ``optional`` and absent)."""
    value = body.get(name, [] if optional else None)
    if not isinstance(value, list):
        raise InvalidCacheRecord(f"build record {name} is not a list")
    return value


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

    def sbom(self, store: ReadableStore, format: attach.SbomFormat = "spdx") -> bytes:  # noqa: A002
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
        """Rebuild a result from the body :meth:`to_record` wrote; a missing or malformed
        field raises :class:`~nixery_core.errors.InvalidCacheRecord` naming it."""
        json_object(body, "build record")
        with malformed():
            manifest = str_field(body, "manifest").encode()
            config = str_field(body, "config").encode()
            media_type = str_field(body, "manifest_media_type")
        layers = _list(body, "layers")
        sboms = _list(body, "sboms", optional=True)  # none in entries written before SBOMs
        return cls(
            image=image,
            manifest=manifest,
            manifest_digest=sha256_digest(manifest),
            manifest_media_type=media_type,
            config=config,
            config_digest=sha256_digest(config),
            layers=tuple(BuiltLayer.from_json(layer, reused=True) for layer in layers),
            cache_key=key,
            from_cache=True,
            timings=timings,
            cache_stats=stats,
            sboms=tuple(attach.SbomArtifact.from_json(a) for a in sboms),
        )

    def compare(self, other: BuildResult) -> BuildComparison:
        """What this build changed against ``other`` (an earlier build): layers and bytes.

        Layers are matched by digest: ``added`` are what a client holding
        ``other`` downloads, ``reused`` what it already has, ``removed``
        what ``other`` had and this build has not.
        """
        return compare_layers(self.layers, other.layers)

    def _repr_html_(self) -> str:
        """A table of layers for Jupyter."""
        return build_result_html(self)


@attrs.frozen
class MultiArchResult:
    """A built multi-architecture image.

    ``index`` is the OCI image index or Docker manifest list (stored as a blob
    under ``index_digest`` with ``media_type``); ``manifests`` maps each OCI
    architecture name (``amd64``, ``arm64``) to that architecture's build, in
    index order.  ``from_cache`` says whether the index came from the index
    cache (then no architecture was built and every ``BuildResult`` is
    rebuilt from the entry, ``from_cache=True`` too).
    """

    image: Image
    index: bytes
    index_digest: str
    media_type: str
    manifests: Mapping[str, BuildResult]
    cache_key: str
    from_cache: bool = False
    timings: Mapping[str, float] = attrs.field(factory=dict)
    cache_stats: CacheStats = attrs.field(factory=CacheStats)

    @property
    def blobs(self) -> tuple[str, ...]:
        """Every blob the index needs: the index, then each architecture's blobs."""
        out = [self.index_digest]
        for result in self.manifests.values():
            out.extend(d for d in result.blobs if d not in out)
        return tuple(out)

    @property
    def architectures(self) -> tuple[str, ...]:
        """The OCI architecture names, in index order."""
        return tuple(self.manifests)

    def to_record(self) -> dict[str, Any]:
        """The JSON body the index cache keeps."""
        return {
            "kind": "index",
            "index": self.index.decode(),
            "media_type": self.media_type,
            "manifests": [
                {"arch": arch, "cache_key": result.cache_key, "record": result.to_record()}
                for arch, result in self.manifests.items()
            ],
        }
