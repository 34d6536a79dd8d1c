"""The shape of a manifest cache entry's body, checked before anything is served from it.

Internal to :class:`~nixery_core.cache.BuildCache`: nothing here reaches its
callers.

A cache entry can come from another host's bucket, an older release, a
half-written file or a hand edit, so :class:`~nixery_core.cache.BuildCache`
checks every body it is about to serve with :func:`record_blob_sizes`:

* an image record (what :meth:`nixery_core.build.BuildResult.to_record`
  writes): ``manifest``, ``manifest_media_type`` and ``config`` strings and
  a list of ``layers`` objects, each with digest, diff_id, size,
  media_type, paths, packages and kind of the right types (and
  annotations, when present, an object of strings); the manifest
  must parse, name the config by its sha256 and size, and list exactly the
  entry's layers (digest, size, media type); ``sboms`` (optional: entries
  written before SBOMs have none) is a list of SBOM artifacts
  (:class:`~nixery_core.sbom.referrers.SbomArtifact`, every field checked
  as that class reads it), each adding its artifact manifest, the empty
  config and its document;
* an index record (``kind: "index"``, what
  :meth:`nixery_core.multiarch.MultiArchResult.to_record` writes): an
  ``index`` naming, in order, the manifest of each image record in
  ``manifests``.

The answer is every blob the record describes with its size, so a hit can
compare them with the stored sizes.  Anything else raises a ``ValueError``
naming what is wrong, which the cache catches where it parses an entry: it
counts the entry as corrupt (``CacheStats.corrupt_entries``), logs a warning
with that text and rebuilds, which overwrites the entry.  A caller of the
cache never sees the error.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from nixery_core.digests import is_digest, sha256_digest
from nixery_core.errors import InvalidCacheRecord, InvalidManifest
from nixery_core.manifest import parse_index, parse_manifest
from nixery_core.sbom.referrers import EMPTY_DESCRIPTOR, SbomArtifact

__all__ = ["record_blob_sizes"]

_LAYER_KINDS = ("store", "customisation")


class _MalformedRecord(ValueError):
    """A cache entry body lacks a field, has one of the wrong type, or contradicts itself.

    Private: the cache catches it as the ``ValueError`` it is and treats the
    entry as a corrupt miss, so it never escapes the library.
    """


def _field(body: Mapping[str, Any], name: str, kind: type | tuple[type, ...]) -> Any:
    if not isinstance(body, dict):  # JSON objects are dicts, and the check is fast
        raise _MalformedRecord(f"expected an object holding {name!r}, got {type(body).__name__}")
    if name not in body:
        raise _MalformedRecord(f"{name!r} is missing")
    value = body[name]
    if isinstance(value, bool) or not isinstance(value, kind):
        raise _MalformedRecord(f"{name!r} is {type(value).__name__}, not {_names(kind)}")
    return value


def _names(kind: type | tuple[type, ...]) -> str:
    kinds = kind if isinstance(kind, tuple) else (kind,)
    return " or ".join(k.__name__ for k in kinds)


def _digest(body: Mapping[str, Any], name: str) -> str:
    value: str = _field(body, name, str)
    if not is_digest(value):
        raise _MalformedRecord(f"{name!r} is not a sha256 digest")
    return value


def _strings(body: Mapping[str, Any], name: str) -> None:
    values = _field(body, name, list)
    if not all(isinstance(v, str) for v in values):
        raise _MalformedRecord(f"{name!r} holds something other than strings")


def _image_sizes(body: Mapping[str, Any]) -> dict[str, int]:
    manifest = _field(body, "manifest", str).encode()
    media_type: str = _field(body, "manifest_media_type", str)
    config = _field(body, "config", str).encode()
    layers = _field(body, "layers", list)
    sizes = {sha256_digest(manifest): len(manifest), sha256_digest(config): len(config)}
    described: list[tuple[str, int, str]] = []
    for layer in layers:
        digest = _digest(layer, "digest")
        _digest(layer, "diff_id")
        size: int = _field(layer, "size", int)
        if size < 0:
            raise _MalformedRecord("a layer size is negative")
        layer_type: str = _field(layer, "media_type", str)
        _strings(layer, "paths")
        _strings(layer, "packages")
        if _field(layer, "kind", str) not in _LAYER_KINDS:
            raise _MalformedRecord(f"layer kind {str(layer['kind'])[:40]!r} is unknown")
        if "annotations" in layer:
            annotations = _field(layer, "annotations", dict)
            if not all(isinstance(v, str) for v in annotations.values()):
                raise _MalformedRecord("a layer's 'annotations' are not all strings")
        if sizes.setdefault(digest, size) != size:
            raise _MalformedRecord(f"{digest} is given two sizes")
        described.append((digest, size, layer_type))
    try:
        parsed = parse_manifest(manifest, media_type)
    except InvalidManifest as exc:
        raise _MalformedRecord(f"the manifest does not parse: {exc}") from exc
    if (parsed.config.digest, parsed.config.size) != (sha256_digest(config), len(config)):
        raise _MalformedRecord("the manifest names another config")
    if [(d.digest, d.size, d.media_type) for d in parsed.layers] != described:
        raise _MalformedRecord("the manifest's layers differ from the entry's")
    for artifact in _field(body, "sboms", list) if "sboms" in body else []:
        for digest, size in _sbom_sizes(artifact):
            if sizes.setdefault(digest, size) != size:
                raise _MalformedRecord(f"{digest} is given two sizes")
    return sizes


def _sbom_sizes(data: object) -> list[tuple[str, int]]:
    if not isinstance(data, dict):
        raise _MalformedRecord(f"an SBOM entry is {type(data).__name__}, not an object")
    try:
        artifact = SbomArtifact.from_json(data)  # every field: types, digests, sizes >= 0
    except InvalidCacheRecord as exc:
        raise _MalformedRecord(f"an SBOM entry is malformed: {exc.detail[:80]}") from exc
    return [
        (artifact.manifest_digest, artifact.manifest_size),
        (EMPTY_DESCRIPTOR.digest, EMPTY_DESCRIPTOR.size),
        (artifact.document_digest, artifact.document_size),
    ]


def _index_sizes(body: Mapping[str, Any]) -> dict[str, int]:
    index = _field(body, "index", str).encode()
    media_type: str = _field(body, "media_type", str)
    entries = _field(body, "manifests", list)
    try:
        parsed = parse_index(index, media_type)
    except InvalidManifest as exc:
        raise _MalformedRecord(f"the index does not parse: {exc}") from exc
    sizes = {sha256_digest(index): len(index)}
    named: list[str] = []
    for entry in entries:
        _field(entry, "arch", str)
        _field(entry, "cache_key", str)
        record = _field(entry, "record", dict)
        sizes.update(_image_sizes(record))
        named.append(sha256_digest(record["manifest"].encode()))
    if [d.digest for d in parsed.manifests] != named:
        raise _MalformedRecord("the index names other manifests than the entry's records")
    return sizes


def record_blob_sizes(body: object) -> dict[str, int]:
    """Every blob a well-formed record describes, with its size (ValueError otherwise)."""
    if not isinstance(body, Mapping):
        raise _MalformedRecord(f"the body is {type(body).__name__}, not an object")
    if body.get("kind") == "index":
        return _index_sizes(body)
    return _image_sizes(body)
