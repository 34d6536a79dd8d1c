"""Pushing an image's referrers (its SBOMs) to a registry, the OCI 1.1 way.

For each image manifest pushed, every artifact manifest the store's
referrers index names (see :mod:`nixery_core.sbom.referrers`) is pushed by
digest, blobs first.  A registry with the referrers API acknowledges the
``subject`` with an ``OCI-Subject`` response header and needs nothing more.
Without it (Debian's docker-registry 2.8), the client keeps the list itself,
as the distribution spec's fallback says: it reads the index under the tag
``sha256-<hex of the image digest>`` (absent: a new one), adds the artifact
descriptors and puts it back under that tag.
"""

from __future__ import annotations

import json
from typing import Protocol

import attrs
import httpx

from nixery_core.manifest import Descriptor, parse_manifest
from nixery_core.media_types import OCI_INDEX, OCI_MANIFEST
from nixery_core.protocols import JSONValue, ReadableStore
from nixery_core.sbom.referrers import fallback_tag, referrers_index, render_referrers_index

__all__ = ["ReferrersPushed", "ReferrersPusher", "push_referrers"]

SUBJECT_HEADER = "OCI-Subject"


class ReferrersPusher(Protocol):
    """Promises the registry calls a referrers push needs, errors already typed."""

    def push_blob(self, blob: Descriptor) -> None:
        """Upload ``blob`` from the store unless the repository has it."""

    def put_manifest(self, data: bytes, media_type: str, reference: str) -> httpx.Response:
        """PUT a manifest under ``reference`` (a tag or its digest)."""

    def get_manifest(self, reference: str, accept: str) -> bytes | None:
        """GET a manifest; ``None`` when the registry has none under ``reference``."""


@attrs.frozen
class ReferrersPushed:
    """What a referrers push did: artifact manifests pushed, fallback tags written."""

    manifests: tuple[str, ...] = ()
    fallback_tags: tuple[str, ...] = ()

    def __add__(self, other: ReferrersPushed) -> ReferrersPushed:
        return ReferrersPushed(
            self.manifests + other.manifests, self.fallback_tags + other.fallback_tags
        )


def _existing_entries(data: bytes | None) -> list[dict[str, JSONValue]]:
    if data is None:
        return []
    try:
        document = json.loads(data)
    except ValueError:
        return []
    entries = document.get("manifests") if isinstance(document, dict) else None
    return [e for e in entries if isinstance(e, dict)] if isinstance(entries, list) else []


def push_referrers(pusher: ReferrersPusher, store: ReadableStore, subject: str) -> ReferrersPushed:
    """Push the referrers of image manifest ``subject`` that ``store`` records."""
    entries = json.loads(referrers_index(store, subject))["manifests"]
    if not entries:
        return ReferrersPushed()
    acknowledged = True
    pushed: list[str] = []
    for entry in entries:
        digest = str(entry["digest"])
        data = store.read_blob(digest)
        for blob in parse_manifest(data, OCI_MANIFEST).blobs:
            pusher.push_blob(blob)
        response = pusher.put_manifest(data, OCI_MANIFEST, digest)
        acknowledged = acknowledged and response.headers.get(SUBJECT_HEADER) == subject
        pushed.append(digest)
    if acknowledged:
        return ReferrersPushed(tuple(pushed))
    tag = fallback_tag(subject)
    current = _existing_entries(pusher.get_manifest(tag, OCI_INDEX))
    pusher.put_manifest(render_referrers_index([*current, *entries]), OCI_INDEX, tag)
    return ReferrersPushed(tuple(pushed), (tag,))
