"""What a build calls to give an image its SBOMs and standard labels (one import for build.py).

Re-exports the pieces :func:`~nixery_core.build.build_image` uses, so the
build pipeline depends on this one module, plus :func:`sbom_document`, which
reads a built image's SBOM back from the store.
"""

from __future__ import annotations

from collections.abc import Sequence

from nixery_core.errors import InvalidInput
from nixery_core.image_config import ImageConfig
from nixery_core.protocols import ReadableStore
from nixery_core.sbom.inventory import Inventory
from nixery_core.sbom.provenance import source_labels, standard_labels, with_labels
from nixery_core.sbom.referrers import FORMATS, SbomArtifact, SbomFormat, attach_sboms
from nixery_core.sources import SourceSpec

__all__ = [
    "SBOM_VERSION",
    "Inventory",
    "SbomArtifact",
    "SbomFormat",
    "attach_sboms",
    "manifest_annotations",
    "sbom_document",
    "source_labels",
    "with_labels",
]

#: Part of the manifest cache key: bump when the SBOMs or labels of an image change.
SBOM_VERSION = 1


def manifest_annotations(
    config: ImageConfig, spec: SourceSpec, manifest_format: str
) -> dict[str, str]:
    """The manifest's standard annotations (OCI manifests only; Docker schema 2 has none)."""
    return standard_labels(config, spec) if manifest_format == "oci" else {}


def sbom_document(
    artifacts: Sequence[SbomArtifact], store: ReadableStore, format: SbomFormat  # noqa: A002
) -> bytes:
    """The document of the ``format`` SBOM among ``artifacts``, read from ``store``."""
    for artifact in artifacts:
        if artifact.format == format:
            return store.read_blob(artifact.document_digest)
    known = sorted(a.format for a in artifacts)
    raise InvalidInput(
        f"no {format!r} SBOM for this image (it has {known or 'none'}; formats: {sorted(FORMATS)})"
    )
