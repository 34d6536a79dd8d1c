"""``Accept`` negotiation: an OCI or Docker schema 2 manifest, or an index of either.

Every image this registry builds exists in both forms; they share the
config and every layer blob, only the manifest document differs.  Clients
say what they can read: Docker and containerd list Docker schema 2 first,
skopeo and podman list OCI first, all of them with the same quality.  The
rule, in order:

1. each form gets the quality (``q``) of the most specific media range that
   matches it (``application/vnd.oci.image.manifest.v1+json`` beats
   ``application/*`` beats ``*/*``); no match means ``q=0``;
2. the higher quality wins;
3. on a tie, the form the client named explicitly first wins (a client that
   lists Docker first gets Docker);
4. when both are reached only through wildcards, or there is no ``Accept``
   header at all, the registry's default wins (Docker schema 2 unless
   configured otherwise, as old clients that send nothing expect).

A client that accepts neither (``Accept: application/vnd.docker.distribution.manifest.v1+json``
alone) gets ``None``, which the app answers with ``MANIFEST_UNKNOWN``.

Indexes (:func:`index_preferences`, used only when the registry is
configured for several architectures).  A client gets an index only when it
names the index type exactly, with a quality above zero:
``application/vnd.oci.image.index.v1+json`` for an OCI image index,
``application/vnd.docker.distribution.manifest.list.v2+json`` for a Docker
manifest list.  A wildcard never selects an index: a client that sends
``*/*`` may well not know what to do with one, while every client that can
follow an index (Docker, containerd, skopeo, podman) names it.  The index's
children are manifests of the same form, so the client must accept those
too, and the forms are ranked like the manifests above: Docker (manifest
list named, schema 2 first) gets a manifest list, skopeo (OCI first, both
index types named) gets an OCI index.
"""

from __future__ import annotations

from collections.abc import Iterable

import attrs

from examples.registry.config import ManifestFormat
from nixery_core.media_types import DOCKER_MANIFEST, DOCKER_MANIFEST_LIST, OCI_INDEX, OCI_MANIFEST

__all__ = ["MediaRange", "choose_format", "index_preferences", "parse_accept", "preferences"]

_TYPES: dict[ManifestFormat, str] = {"oci": OCI_MANIFEST, "docker": DOCKER_MANIFEST}
_INDEX_TYPES: dict[ManifestFormat, str] = {"oci": OCI_INDEX, "docker": DOCKER_MANIFEST_LIST}


@attrs.frozen
class MediaRange:
    """One entry of an ``Accept`` header: ``type/subtype``, its quality, its position."""

    media_type: str
    quality: float
    position: int

    def specificity(self, media_type: str) -> int:
        """2 for an exact match, 1 for ``type/*``, 0 for ``*/*``, -1 for no match."""
        if self.media_type == media_type:
            return 2
        major = media_type.split("/", 1)[0]
        if self.media_type == f"{major}/*":
            return 1
        if self.media_type == "*/*":
            return 0
        return -1


def parse_accept(headers: Iterable[str]) -> list[MediaRange]:
    """Every media range of one or more ``Accept`` header values, in order.

    Parameters other than ``q`` are ignored; an entry with a malformed
    ``q`` is dropped (RFC 9110 allows ``0`` to ``1`` with three decimals).
    """
    ranges: list[MediaRange] = []
    for header in headers:
        for item in header.split(","):
            media_type, *params = (part.strip() for part in item.split(";"))
            if "/" not in media_type:
                continue
            quality = 1.0
            valid = True
            for param in params:
                key, _, value = param.partition("=")
                if key.strip().lower() == "q":
                    try:
                        quality = float(value.strip())
                    except ValueError:
                        valid = False
                    if not 0.0 <= quality <= 1.0:
                        valid = False
            if valid:
                ranges.append(MediaRange(media_type.lower(), quality, len(ranges)))
    return ranges


def _grade(ranges: list[MediaRange], media_type: str) -> tuple[float, int | None]:
    """The quality for ``media_type`` and the position where it is named exactly."""
    best: MediaRange | None = None
    best_specificity = -1
    for entry in ranges:
        specificity = entry.specificity(media_type)
        if specificity > best_specificity:
            best, best_specificity = entry, specificity
    if best is None:
        return 0.0, None
    return best.quality, best.position if best_specificity == 2 else None


def preferences(headers: Iterable[str], default: ManifestFormat) -> tuple[ManifestFormat, ...]:
    """The manifest forms the client accepts, best first (see the module docs).

    Empty when the client accepts neither form.
    """
    other: ManifestFormat = "oci" if default == "docker" else "docker"
    ranges = parse_accept(headers)
    if not ranges:
        return (default, other)
    grades = {fmt: _grade(ranges, _TYPES[fmt]) for fmt in (default, other)}

    def rank(fmt: ManifestFormat) -> tuple[float, int, int]:
        quality, position = grades[fmt]
        explicit = position if position is not None else len(ranges)
        return (-quality, explicit, 0 if fmt == default else 1)

    return tuple(sorted((fmt for fmt in grades if grades[fmt][0] > 0), key=rank))


def choose_format(headers: Iterable[str], default: ManifestFormat) -> ManifestFormat | None:
    """The best form for these ``Accept`` values, ``None`` when neither is acceptable."""
    best = preferences(headers, default)
    return best[0] if best else None


def index_preferences(
    headers: Iterable[str], default: ManifestFormat
) -> tuple[ManifestFormat, ...]:
    """The index forms the client accepts, best first; empty when it names no index type.

    A form counts when its index type is named exactly with ``q > 0`` and its
    manifest type is acceptable (see the module docs); forms are ranked as
    :func:`preferences` ranks the manifests.
    """
    headers = list(headers)
    ranges = parse_accept(headers)

    def named(fmt: ManifestFormat) -> bool:
        quality, position = _grade(ranges, _INDEX_TYPES[fmt])
        return position is not None and quality > 0

    return tuple(fmt for fmt in preferences(headers, default) if named(fmt))
