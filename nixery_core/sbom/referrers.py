"""SBOMs attached to images the OCI 1.1 way: artifact manifests with a ``subject``.

Each SBOM document is stored as a blob and described by an OCI image
manifest whose ``artifactType`` is the document's media type
(``application/spdx+json``, ``application/vnd.cyclonedx+json``), whose
config is the empty descriptor (``application/vnd.oci.empty.v1+json``, the
two bytes ``{}``), whose one layer is the document, and whose ``subject`` is
the image manifest.  Registries with the referrers API list such manifests
under ``GET /v2/<name>/referrers/<image digest>``; for registries without it
(Debian's docker-registry 2.8) the same list, an OCI image index, is kept
under the fallback tag ``sha256-<hex of the image digest>``.

:func:`attach_sboms` stores the documents, the empty config and the artifact
manifests next to the image's blobs, and records the referrers index of the
image in the store object ``referrers/sha256-<hex>``, which
:func:`referrers_index` reads back (what the example registry serves).
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterable, Mapping
from typing import Any, Literal

import attrs

from nixery_core.digests import is_digest
from nixery_core.errors import InvalidCacheRecord
from nixery_core.image_json import canonical_json
from nixery_core.manifest import Descriptor
from nixery_core.media_types import OCI_INDEX, OCI_MANIFEST
from nixery_core.protocols import JSONValue, Uploader
from nixery_core.sbom.cyclonedx import CYCLONEDX_MEDIA_TYPE, render_cyclonedx
from nixery_core.sbom.inventory import Inventory
from nixery_core.sbom.provenance import CREATED
from nixery_core.sbom.spdx import SPDX_MEDIA_TYPE, render_spdx

__all__ = [
    "EMPTY_CONFIG",
    "EMPTY_DESCRIPTOR",
    "EMPTY_MEDIA_TYPE",
    "FORMATS",
    "REFERRERS_PREFIX",
    "SbomArtifact",
    "SbomFormat",
    "attach_sboms",
    "fallback_tag",
    "referrer_digests",
    "referrers_index",
    "render_artifact_manifest",
    "render_referrers_index",
]

SbomFormat = Literal["spdx", "cyclonedx"]
#: Each format and its media type (also the artifact manifest's ``artifactType``).
FORMATS: Mapping[SbomFormat, str] = {"spdx": SPDX_MEDIA_TYPE, "cyclonedx": CYCLONEDX_MEDIA_TYPE}
_FILE_NAMES: Mapping[SbomFormat, str] = {"spdx": "sbom.spdx.json", "cyclonedx": "sbom.cdx.json"}

EMPTY_MEDIA_TYPE = "application/vnd.oci.empty.v1+json"
EMPTY_CONFIG = b"{}"
EMPTY_DESCRIPTOR = Descriptor(
    EMPTY_MEDIA_TYPE,
    "sha256:44136fa355b3678a1146ad16f7e8649e94fb4fc21fe77e8310c060f61caaff8a",
    len(EMPTY_CONFIG),
)
#: Store objects ``referrers/sha256-<hex>`` hold each image's referrers index.
REFERRERS_PREFIX = "referrers/"
_TITLE = "org.opencontainers.image.title"
_EMPTY_LOCK = threading.Lock()


@attrs.frozen
class SbomArtifact:
    """One SBOM attached to an image: its artifact manifest and document blobs."""

    format: SbomFormat
    artifact_type: str
    manifest_digest: str
    manifest_size: int
    document_digest: str
    document_size: int
    created: str

    @property
    def blobs(self) -> tuple[str, ...]:
        """The artifact manifest, the empty config and the document."""
        return (self.manifest_digest, EMPTY_DESCRIPTOR.digest, self.document_digest)

    @property
    def descriptor(self) -> Descriptor:
        """The artifact manifest's descriptor (without ``artifactType``, which it carries)."""
        return Descriptor(OCI_MANIFEST, self.manifest_digest, self.manifest_size)

    def index_entry(self) -> dict[str, JSONValue]:
        """Its entry in a referrers index: descriptor, ``artifactType``, annotations."""
        return {
            "mediaType": OCI_MANIFEST,
            "digest": self.manifest_digest,
            "size": self.manifest_size,
            "artifactType": self.artifact_type,
            "annotations": {CREATED: self.created},
        }

    def to_json(self) -> dict[str, Any]:
        return attrs.asdict(self)

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> SbomArtifact:
        """Read :meth:`to_json`'s form; a missing or malformed field raises
        :class:`~nixery_core.errors.InvalidCacheRecord` naming it."""
        if not isinstance(data, Mapping):
            raise InvalidCacheRecord(f"an SBOM entry is an object, not {type(data).__name__}")
        missing = [k for k in attrs.fields_dict(cls) if k not in data]
        if missing:
            raise InvalidCacheRecord(f"an SBOM entry lacks {', '.join(missing)}")
        values = {k: data[k] for k in attrs.fields_dict(cls)}
        if not isinstance(values["format"], str) or values["format"] not in FORMATS:
            raise InvalidCacheRecord(f"SBOM format {str(values['format'])[:40]!r} is unknown")
        for key in ("manifest_size", "document_size"):
            if not isinstance(values[key], int) or isinstance(values[key], bool):
                raise InvalidCacheRecord(f"SBOM {key} is not an integer")
            if values[key] < 0:
                raise InvalidCacheRecord(f"SBOM {key} is negative")
        for key in ("artifact_type", "manifest_digest", "document_digest", "created"):
            if not isinstance(values[key], str):
                raise InvalidCacheRecord(f"SBOM {key} is not a string")
        for key in ("manifest_digest", "document_digest"):
            if not is_digest(values[key]):
                raise InvalidCacheRecord(f"SBOM {key} is not a sha256 digest")
        return cls(**values)


def fallback_tag(digest: str) -> str:
    """The OCI 1.1 referrers fallback tag of ``sha256:<hex>``: ``sha256-<hex>``."""
    return digest.replace(":", "-", 1)


def render_artifact_manifest(
    *, artifact_type: str, document: Descriptor, subject: Descriptor, created: str,
    title: str | None = None,
) -> bytes:
    """An OCI 1.1 artifact manifest for ``document`` whose subject is ``subject``."""
    layer = document.to_json()
    if title:
        layer["annotations"] = {_TITLE: title}
    return canonical_json(
        {
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "artifactType": artifact_type,
            "config": EMPTY_DESCRIPTOR.to_json(),
            "layers": [layer],
            "subject": Descriptor(subject.media_type, subject.digest, subject.size).to_json(),
            "annotations": {CREATED: created},
        }
    )


def render_referrers_index(entries: Iterable[Mapping[str, JSONValue]]) -> bytes:
    """An OCI image index listing referrer descriptors (sorted by digest, de-duplicated)."""
    by_digest = {str(e["digest"]): dict(e) for e in entries}
    manifests: list[JSONValue] = [by_digest[d] for d in sorted(by_digest)]
    return canonical_json({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": manifests})


def _index_entries(raw: bytes | None) -> list[dict[str, JSONValue]]:
    """The well-formed entries of a stored referrers index (anything else is dropped)."""
    if raw is None:
        return []
    try:
        document = json.loads(raw)
    except ValueError:
        return []
    entries = document.get("manifests") if isinstance(document, dict) else None
    if not isinstance(entries, list):
        return []
    return [
        e for e in entries
        if isinstance(e, dict) and isinstance(e.get("digest"), str)
        and isinstance(e.get("size"), int) and isinstance(e.get("mediaType"), str)
    ]


def attach_sboms(
    store: Uploader,
    inventory: Inventory,
    subject: Descriptor,
    formats: Iterable[SbomFormat] = ("cyclonedx", "spdx"),
) -> tuple[SbomArtifact, ...]:
    """Store each SBOM, its artifact manifest and the image's referrers index.

    Call once the image manifest (``subject``) is stored.  Returns the
    artifacts in ``formats`` order.
    """
    renderers = {"spdx": render_spdx, "cyclonedx": render_cyclonedx}
    with _EMPTY_LOCK:  # every image shares it: write it once, not once per build
        if store.blob_info(EMPTY_DESCRIPTOR.digest) is None:
            store.put_blob(EMPTY_CONFIG, EMPTY_MEDIA_TYPE)
    artifacts: list[SbomArtifact] = []
    for fmt in formats:
        media_type = FORMATS[fmt]
        document = renderers[fmt](inventory, subject.digest)
        doc_info = store.put_blob(document, media_type)
        manifest = render_artifact_manifest(
            artifact_type=media_type,
            document=Descriptor(media_type, doc_info.digest, doc_info.size),
            subject=subject,
            created=inventory.created,
            title=_FILE_NAMES[fmt],
        )
        manifest_info = store.put_blob(manifest, OCI_MANIFEST)
        artifacts.append(
            SbomArtifact(fmt, media_type, manifest_info.digest, manifest_info.size,
                         doc_info.digest, doc_info.size, inventory.created)
        )
    key = REFERRERS_PREFIX + fallback_tag(subject.digest)
    entries = _index_entries(store.get_object(key)) + [a.index_entry() for a in artifacts]
    store.put_object(key, render_referrers_index(entries))
    return tuple(artifacts)


def referrers_index(
    store: Uploader, subject_digest: str, artifact_type: str | None = None
) -> bytes:
    """The referrers index of ``subject_digest`` (empty when none), as a registry serves it.

    ``artifact_type`` filters the entries (the API's ``artifactType`` query);
    entries whose manifest is no longer stored are left out.
    """
    stored = store.get_object(REFERRERS_PREFIX + fallback_tag(subject_digest))
    entries = [
        e for e in _index_entries(stored)
        if (artifact_type is None or e.get("artifactType") == artifact_type)
        and store.blob_info(str(e["digest"])) is not None
    ]
    return render_referrers_index(entries)


def referrer_digests(store: Uploader, subject_digest: str) -> list[str]:
    """The digests of the stored artifact manifests whose subject is ``subject_digest``."""
    index = json.loads(referrers_index(store, subject_digest))
    return [str(entry["digest"]) for entry in index["manifests"]]
