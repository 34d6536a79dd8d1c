"""``Accept`` negotiation: an OCI or Docker schema 2 manifest, or an index of either.

Every image this registry builds exists in both forms; they share the
config and every layer blob, only the manifest document differs.  Clients
say what they can read, and the answer must not depend on the order they
say it in: Docker 20.10 sends its ``Accept`` list in random order, and a
registry that picked "whichever is named first" gave the same tag a
different digest from pull to pull.  The rule, in order:

1. each form gets the quality (``q``) of the most specific media range that
   matches it (``application/vnd.oci.image.manifest.v1+json`` beats
   ``application/*`` beats ``*/*``); no match means "not acceptable";
2. the higher quality wins;
3. on a tie, the server's fixed preference wins
   (:attr:`RegistryConfig.default_format
   <examples.registry.config.RegistryConfig.default_format>`, OCI unless
   configured otherwise), never the position in the list;
4. leniency, as the reference registry (distribution) has it: a client that
   names no manifest type at all but asks for ``application/json`` or
   names an index type gets a manifest anyway (the form of the index type
   it named, else the server's preference).  No ``Accept`` header at all
   counts as ``*/*``.

A client that accepts neither (``Accept: application/vnd.docker.distribution.manifest.v1+json``
alone, or both forms with ``q=0``) gets an empty preference, which the app
answers with ``MANIFEST_UNKNOWN``.

Indexes (:func:`index_preferences`, used only when the registry is
configured for several architectures).  A client gets an index only when it
names the index type exactly, with a quality above zero:
``application/vnd.oci.image.index.v1+json`` for an OCI image index,
``application/vnd.docker.distribution.manifest.list.v2+json`` for a Docker
manifest list.  A wildcard never selects an index: a client that sends
``*/*`` may well not know what to do with one, while every client that can
follow an index (Docker, containerd, skopeo, podman) names it.  The index's
children are manifests of the same form, so the client must accept those
too (or name no manifest type at all, as a client asking only for an index
does).  Index forms are ranked by the index type's quality, then by the
server's preference.
"""

from __future__ import annotations

from collections.abc import Iterable

import attrs

from examples.registry.config import ManifestFormat
from nixery_core.media_types import DOCKER_MANIFEST, DOCKER_MANIFEST_LIST, OCI_INDEX, OCI_MANIFEST

__all__ = [
    "MediaRange",
    "choose_format",
    "index_preferences",
    "parse_accept",
    "preferences",
    "server_order",
]

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


def _quality(ranges: list[MediaRange], media_type: str) -> float | None:
    """The quality of the most specific ranges matching ``media_type``; ``None`` if none does.

    Several equally specific ranges (a type named twice) give their highest
    quality, so the answer does not depend on their order.
    """
    matches = [(entry.specificity(media_type), entry.quality) for entry in ranges]
    matches = [match for match in matches if match[0] >= 0]
    return max(matches)[1] if matches else None


def _named(ranges: list[MediaRange], media_type: str) -> float | None:
    """The highest quality ``media_type`` is named with exactly, ``None`` if it is not named."""
    qualities = [entry.quality for entry in ranges if entry.media_type == media_type]
    return max(qualities) if qualities else None


def server_order(preference: ManifestFormat) -> tuple[ManifestFormat, ManifestFormat]:
    """Both forms, the server's preferred one first."""
    return (preference, "docker" if preference == "oci" else "oci")


def preferences(headers: Iterable[str], default: ManifestFormat) -> tuple[ManifestFormat, ...]:
    """The manifest forms the client accepts, best first (see the module docs).

    ``default`` is the server's preference for ties.  Empty when the client
    accepts neither form.  The result depends on the set of media ranges
    and their qualities, never on their order.
    """
    order = server_order(default)
    ranges = parse_accept(headers)
    if not ranges:
        return order
    quality = {fmt: _quality(ranges, _TYPES[fmt]) for fmt in order}
    if any(q is not None for q in quality.values()):
        accepted = [fmt for fmt in order if (quality[fmt] or 0.0) > 0]
        return tuple(sorted(accepted, key=lambda fmt: (-(quality[fmt] or 0.0), order.index(fmt))))
    # Leniency: no manifest type matched at all (not even through a wildcard).
    index_named = [fmt for fmt in order if (_named(ranges, _INDEX_TYPES[fmt]) or 0.0) > 0]
    json_named = (_named(ranges, "application/json") or 0.0) > 0
    if not index_named and not json_named:
        return ()
    return (*index_named, *(fmt for fmt in order if fmt not in index_named))


def choose_format(headers: Iterable[str], default: ManifestFormat) -> ManifestFormat | None:
    """The best form for these ``Accept`` values, ``None`` when neither is acceptable."""
    best = preferences(headers, default)
    return best[0] if best else None


def index_preferences(
    headers: Iterable[str], default: ManifestFormat
) -> tuple[ManifestFormat, ...]:
    """The index forms the client accepts, best first; empty when it names no index type.

    A form counts when its index type is named exactly with ``q > 0`` and
    its manifests are acceptable to the client (see the module docs); forms
    are ranked by the index type's quality, then the server's preference.
    """
    order = server_order(default)
    ranges = parse_accept(headers)
    manifest_quality = {fmt: _quality(ranges, _TYPES[fmt]) for fmt in order}
    names_manifests = any(q is not None for q in manifest_quality.values())
    graded: list[tuple[float, int, ManifestFormat]] = []
    for position, fmt in enumerate(order):
        index_quality = _named(ranges, _INDEX_TYPES[fmt]) or 0.0
        children = manifest_quality[fmt]
        children_ok = (children or 0.0) > 0 if names_manifests else True
        if index_quality > 0 and children_ok:
            graded.append((-index_quality, position, fmt))
    return tuple(fmt for _, _, fmt in sorted(graded))
