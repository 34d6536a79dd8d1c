"""Image metadata as bytes: configs, manifests and indexes, rendered and parsed.

Everything rendered here is deterministic: :func:`canonical_json` sorts keys,
uses compact separators and UTF-8, so the same inputs give byte-identical
output and therefore the same digest.  One config blob serves both manifest
formats; only the descriptor media types differ (OCI / Docker schema 2):

- manifest: ``application/vnd.oci.image.manifest.v1+json`` /
  ``application/vnd.docker.distribution.manifest.v2+json``;
- index: ``application/vnd.oci.image.index.v1+json`` /
  ``application/vnd.docker.distribution.manifest.list.v2+json``;
- config: ``application/vnd.oci.image.config.v1+json`` /
  ``application/vnd.docker.container.image.v1+json``;
- gzip layer: ``application/vnd.oci.image.layer.v1.tar+gzip`` /
  ``application/vnd.docker.image.rootfs.diff.tar.gzip``.

Layers are described by their stored (OCI) media type; Docker rendering maps
it.  zstd layers exist only in OCI manifests.

The image config itself is rendered by :mod:`nixery_core.image_json`
(re-exported here as :func:`render_config`).

Parsing (:func:`parse_manifest`, :func:`parse_index`) is for what a registry
or cache reads back: every field this library relies on is checked and
anything malformed raises :class:`~nixery_core.errors.InvalidManifest`.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Literal, Protocol, TypeAlias

import attrs

from nixery_core.digests import is_digest, validate_digest
from nixery_core.errors import InvalidDigest, InvalidInput, InvalidManifest
from nixery_core.image_json import DEFAULT_ENV, canonical_json, render_config
from nixery_core.media_types import (
    DOCKER_CONFIG,
    DOCKER_LAYER_GZIP,
    DOCKER_LAYER_TAR,
    DOCKER_MANIFEST,
    DOCKER_MANIFEST_LIST,
    IMAGE_MANIFEST_TYPES,
    INDEX_TYPES,
    OCI_CONFIG,
    OCI_INDEX,
    OCI_LAYER_GZIP,
    OCI_LAYER_TAR,
    OCI_LAYER_ZSTD,
    OCI_MANIFEST,
    docker_layer_media_type,
    validate_media_type,
)
from nixery_core.names import Architecture
from nixery_core.protocols import JSONValue

__all__ = [
    "DEFAULT_ENV",
    "DOCKER_CONFIG",
    "DOCKER_LAYER_GZIP",
    "DOCKER_LAYER_TAR",
    "DOCKER_MANIFEST",
    "DOCKER_MANIFEST_LIST",
    "MAX_MANIFEST_SIZE",
    "OCI_CONFIG",
    "OCI_INDEX",
    "OCI_LAYER_GZIP",
    "OCI_LAYER_TAR",
    "OCI_LAYER_ZSTD",
    "OCI_MANIFEST",
    "REF_NAME_ANNOTATION",
    "Descriptor",
    "Format",
    "LayerDescriptor",
    "ManifestRef",
    "ParsedIndex",
    "ParsedManifest",
    "Platform",
    "SizedDigest",
    "canonical_json",
    "parse_index",
    "parse_manifest",
    "render_config",
    "render_index",
    "render_manifest",
    "sniff_media_type",
]

Format: TypeAlias = Literal["oci", "docker"]

#: Registries commonly refuse manifests larger than this; so do we when parsing.
MAX_MANIFEST_SIZE = 4 * 1024 * 1024
#: The annotation an OCI layout's ``index.json`` uses to name a tag.
REF_NAME_ANNOTATION = "org.opencontainers.image.ref.name"

# --- values ------------------------------------------------------------------


def _check_digest(_: object, attribute: attrs.Attribute[str], value: str) -> None:
    validate_digest(value)


def _check_size(_: object, attribute: attrs.Attribute[int], value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise InvalidInput(f"{attribute.name} must be a non-negative integer, not {value!r}")


def _check_media_type(_: object, attribute: attrs.Attribute[str], value: str) -> None:
    validate_media_type(value)


def _pairs(
    value: Mapping[str, str] | Sequence[tuple[str, str]] | None,
) -> tuple[tuple[str, str], ...]:
    items = value.items() if isinstance(value, Mapping) else (value or ())
    return tuple(sorted((str(k), str(v)) for k, v in items))


class SizedDigest(Protocol):
    """Anything naming a blob by digest and size (:class:`~nixery_core.protocols.BlobInfo`)."""

    @property
    def digest(self) -> str: ...

    @property
    def size(self) -> int: ...


@attrs.frozen
class Platform:
    """Where an image in an index runs: ``architecture`` and ``os`` as the OCI spec names them."""

    architecture: str
    os: str = "linux"
    variant: str = ""

    @classmethod
    def from_arch(cls, arch: Architecture) -> Platform:
        """The platform of a build :class:`~nixery_core.names.Architecture`."""
        return cls(arch.oci_arch, arch.os)

    def to_json(self) -> dict[str, JSONValue]:
        out: dict[str, JSONValue] = {"architecture": self.architecture, "os": self.os}
        if self.variant:
            out["variant"] = self.variant
        return out


@attrs.frozen
class Descriptor:
    """An OCI content descriptor: what a manifest, index or ``index.json`` points at."""

    media_type: str = attrs.field(validator=_check_media_type)
    digest: str = attrs.field(validator=_check_digest)
    size: int = attrs.field(validator=_check_size)
    annotations: tuple[tuple[str, str], ...] = attrs.field(default=(), converter=_pairs)
    platform: Platform | None = None

    def to_json(self) -> dict[str, JSONValue]:
        out: dict[str, JSONValue] = {
            "mediaType": self.media_type,
            "digest": self.digest,
            "size": self.size,
        }
        if self.annotations:
            out["annotations"] = dict(self.annotations)
        if self.platform is not None:
            out["platform"] = self.platform.to_json()
        return out

    def annotation(self, key: str) -> str | None:
        """One annotation's value, ``None`` when absent."""
        return dict(self.annotations).get(key)


@attrs.frozen
class LayerDescriptor:
    """A stored layer: compressed ``digest`` and ``size``, OCI ``media_type``, tar ``diff_id``."""

    digest: str = attrs.field(validator=_check_digest)
    size: int = attrs.field(validator=_check_size)
    media_type: str = attrs.field(validator=_check_media_type)
    diff_id: str = attrs.field(validator=_check_digest)
    #: Written on the OCI descriptor only: Docker schema 2 has no annotations,
    #: so there an eStargz layer is an ordinary gzip layer.
    annotations: tuple[tuple[str, str], ...] = attrs.field(default=(), converter=_pairs)


@attrs.frozen
class ManifestRef:
    """One platform's manifest in an index."""

    digest: str = attrs.field(validator=_check_digest)
    size: int = attrs.field(validator=_check_size)
    media_type: str = attrs.field(validator=_check_media_type)
    arch: Architecture


# --- rendering ---------------------------------------------------------------


def _check_format(format: str) -> None:  # noqa: A002 - the brief's public keyword name
    if format not in ("oci", "docker"):
        raise InvalidInput(f"unknown manifest format {format!r}: expected 'oci' or 'docker'")


def render_manifest(
    *,
    config: SizedDigest,
    layers: Sequence[LayerDescriptor],
    format: Format,  # noqa: A002 - mirrors the OCI/Docker wording callers use
    annotations: Mapping[str, str] | None = None,
) -> tuple[bytes, str]:
    """An image manifest and its media type.

    ``format="docker"`` gives Docker Image Manifest V2 schema 2 (Docker
    config and layer types; annotations are refused, that schema has none);
    ``"oci"`` the OCI image manifest.
    """
    _check_format(format)
    config_descriptor = Descriptor(
        OCI_CONFIG if format == "oci" else DOCKER_CONFIG, config.digest, config.size
    )
    rendered_layers: list[JSONValue] = []
    for layer in layers:
        media_type = (
            layer.media_type if format == "oci" else docker_layer_media_type(layer.media_type)
        )
        annotations_of_layer = layer.annotations if format == "oci" else ()
        rendered_layers.append(
            Descriptor(media_type, layer.digest, layer.size, annotations_of_layer).to_json()
        )
    media_type = OCI_MANIFEST if format == "oci" else DOCKER_MANIFEST
    document: dict[str, JSONValue] = {
        "schemaVersion": 2,
        "mediaType": media_type,
        "config": config_descriptor.to_json(),
        "layers": rendered_layers,
    }
    return _finish(document, media_type, format, annotations, "Docker schema 2 manifests")


def _finish(
    document: dict[str, JSONValue],
    media_type: str,
    format: Format,  # noqa: A002 - as in the public functions
    annotations: Mapping[str, str] | None,
    docker_kind: str,
) -> tuple[bytes, str]:
    """Add annotations (OCI only) and render canonical JSON with its media type."""
    if annotations:
        if format == "docker":
            raise InvalidInput(f"{docker_kind} carry no annotations; use format='oci'")
        document["annotations"] = dict(_pairs(annotations))
    return canonical_json(document), media_type


def render_index(
    manifests: Sequence[ManifestRef | tuple[str, int, str, Architecture]],
    format: Format,  # noqa: A002 - mirrors the OCI/Docker wording callers use
    annotations: Mapping[str, str] | None = None,
) -> tuple[bytes, str]:
    """An OCI image index or Docker manifest list (one entry per platform) and its media type.

    Entries keep the given order.  Two entries for the same platform, or an
    entry that is not an image manifest, raise InvalidInput.
    """
    _check_format(format)
    refs = [m if isinstance(m, ManifestRef) else ManifestRef(*m) for m in manifests]
    seen: set[Platform] = set()
    entries: list[JSONValue] = []
    for ref in refs:
        if ref.media_type not in IMAGE_MANIFEST_TYPES:
            raise InvalidInput(
                f"index entry {ref.digest} is not an image manifest: {ref.media_type}"
            )
        platform = Platform.from_arch(ref.arch)
        if platform in seen:
            raise InvalidInput(f"two index entries for {platform.os}/{platform.architecture}")
        seen.add(platform)
        entries.append(
            Descriptor(ref.media_type, ref.digest, ref.size, platform=platform).to_json()
        )
    media_type = OCI_INDEX if format == "oci" else DOCKER_MANIFEST_LIST
    document: dict[str, JSONValue] = {
        "schemaVersion": 2,
        "mediaType": media_type,
        "manifests": entries,
    }
    return _finish(document, media_type, format, annotations, "Docker manifest lists")


# --- parsing -----------------------------------------------------------------


@attrs.frozen
class ParsedManifest:
    """An image manifest read back: its media type, config and layer descriptors."""

    media_type: str
    config: Descriptor
    layers: tuple[Descriptor, ...]
    annotations: tuple[tuple[str, str], ...] = ()

    @property
    def blobs(self) -> tuple[Descriptor, ...]:
        """Every blob the manifest needs: the config, then the layers."""
        return (self.config, *self.layers)


@attrs.frozen
class ParsedIndex:
    """An image index or manifest list read back: its media type and entries."""

    media_type: str
    manifests: tuple[Descriptor, ...]
    annotations: tuple[tuple[str, str], ...] = ()


def _load(data: bytes) -> dict[str, object]:
    if not isinstance(data, bytes | bytearray | memoryview):
        raise InvalidManifest(f"expected bytes, got {type(data).__name__}")
    if len(data) > MAX_MANIFEST_SIZE:
        raise InvalidManifest(f"{len(data)} bytes is larger than {MAX_MANIFEST_SIZE}")
    try:
        document = json.loads(bytes(data).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InvalidManifest(f"not UTF-8 JSON: {exc}") from exc
    if not isinstance(document, dict):
        raise InvalidManifest("the top level is not a JSON object")
    return document


def _string_map(value: object, where: str) -> tuple[tuple[str, str], ...]:
    if value is None:
        return ()
    if not isinstance(value, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in value.items()
    ):
        raise InvalidManifest(f"{where} must be an object of strings")
    return _pairs(value)


def _descriptor(value: object, where: str, *, with_platform: bool = False) -> Descriptor:
    if not isinstance(value, dict):
        raise InvalidManifest(f"{where} is not an object")
    media_type, digest, size = value.get("mediaType"), value.get("digest"), value.get("size")
    if not isinstance(media_type, str):
        raise InvalidManifest(f"{where}.mediaType is missing or not a string")
    if not is_digest(digest):
        raise InvalidManifest(f"{where}.digest {digest!r} is not sha256:<64 lower-case hex>")
    if isinstance(size, bool) or not isinstance(size, int) or size < 0:
        raise InvalidManifest(f"{where}.size {size!r} is not a non-negative integer")
    platform = None
    if with_platform and value.get("platform") is not None:
        raw = value["platform"]
        if not isinstance(raw, dict):
            raise InvalidManifest(f"{where}.platform is not an object")
        arch, os_name, variant = raw.get("architecture"), raw.get("os"), raw.get("variant", "")
        if not (isinstance(arch, str) and isinstance(os_name, str) and isinstance(variant, str)):
            raise InvalidManifest(f"{where}.platform needs string architecture and os")
        platform = Platform(arch, os_name, variant)
    try:
        return Descriptor(
            media_type,
            digest,
            size,
            annotations=_string_map(value.get("annotations"), f"{where}.annotations"),
            platform=platform,
        )
    except (InvalidDigest, InvalidInput) as exc:
        raise InvalidManifest(f"{where}: {exc}") from exc


def _media_type(document: dict[str, object], hint: str | None, default: str) -> str:
    if document.get("schemaVersion") != 2 or isinstance(document.get("schemaVersion"), bool):
        raise InvalidManifest(f"schemaVersion is {document.get('schemaVersion')!r}, not 2")
    field = document.get("mediaType")
    if field is not None and not isinstance(field, str):
        raise InvalidManifest("mediaType is not a string")
    if field is not None and hint is not None and field != hint:
        raise InvalidManifest(f"mediaType {field!r} does not match the declared {hint!r}")
    return field or hint or default


def sniff_media_type(data: bytes) -> str:
    """The media type of manifest or index bytes (its ``mediaType``, else by shape)."""
    document = _load(data)
    field = document.get("mediaType")
    if isinstance(field, str) and field:
        return field
    if "manifests" in document:
        return OCI_INDEX
    if "config" in document:
        return OCI_MANIFEST
    raise InvalidManifest("neither an image manifest nor an index (no mediaType)")


def parse_manifest(data: bytes, media_type: str | None = None) -> ParsedManifest:
    """Read an image manifest (OCI or Docker schema 2).

    ``media_type`` is what the bytes were declared as (a Content-Type); it
    must agree with the ``mediaType`` field when both are present.  An image
    index raises :class:`~nixery_core.errors.InvalidManifest` (use
    :func:`parse_index`).
    """
    document = _load(data)
    kind = _media_type(document, media_type, OCI_MANIFEST)
    if kind not in IMAGE_MANIFEST_TYPES:
        raise InvalidManifest(f"{kind!r} is not an image manifest media type")
    layers = document.get("layers")
    if not isinstance(layers, list):
        raise InvalidManifest("layers is missing or not a list")
    return ParsedManifest(
        media_type=kind,
        config=_descriptor(document.get("config"), "config"),
        layers=tuple(_descriptor(layer, f"layers[{i}]") for i, layer in enumerate(layers)),
        annotations=_string_map(document.get("annotations"), "annotations"),
    )


def parse_index(data: bytes, media_type: str | None = None) -> ParsedIndex:
    """Read an OCI image index or Docker manifest list (also an OCI layout's ``index.json``).

    Docker manifest lists must give every entry a platform.
    """
    document = _load(data)
    kind = _media_type(document, media_type, OCI_INDEX)
    if kind not in INDEX_TYPES:
        raise InvalidManifest(f"{kind!r} is not an image index media type")
    entries = document.get("manifests")
    if not isinstance(entries, list):
        raise InvalidManifest("manifests is missing or not a list")
    manifests = tuple(
        _descriptor(entry, f"manifests[{i}]", with_platform=True) for i, entry in enumerate(entries)
    )
    if kind == DOCKER_MANIFEST_LIST:
        for i, entry in enumerate(manifests):
            if entry.platform is None:
                raise InvalidManifest(f"manifests[{i}] of a Docker manifest list has no platform")
    return ParsedIndex(
        media_type=kind,
        manifests=manifests,
        annotations=_string_map(document.get("annotations"), "annotations"),
    )
