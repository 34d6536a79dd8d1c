"""Software bills of materials for built images, from Nix's own graph.

Every image :func:`~nixery_core.build.build_image` builds gets two SBOMs,
SPDX 2.3 JSON and CycloneDX 1.5 JSON, listing every store path of its
runtime closure (name, version, ``pkg:nix`` purl with the store hash, NAR
size, reference edges; requested packages marked; licences and homepages
where the package set's ``meta`` gives them).  They are stored with the
image's blobs and attached the OCI 1.1 way (artifact manifests whose
``subject`` is the image manifest); see :mod:`nixery_core.sbom.referrers`.

Modules: :mod:`~nixery_core.sbom.inventory` (the format-neutral model),
:mod:`~nixery_core.sbom.spdx`, :mod:`~nixery_core.sbom.cyclonedx`,
:mod:`~nixery_core.sbom.referrers` (artifact manifests, referrers index,
fallback tag), :mod:`~nixery_core.sbom.provenance` (the
``org.opencontainers.image.*`` labels) and :mod:`~nixery_core.sbom.query`
(questions across images: which contain a package below a version).
"""

from __future__ import annotations

from nixery_core.sbom.cyclonedx import CYCLONEDX_MEDIA_TYPE, render_cyclonedx
from nixery_core.sbom.inventory import Component, Inventory, parse_store_path_name
from nixery_core.sbom.referrers import (
    FORMATS,
    SbomArtifact,
    SbomFormat,
    attach_sboms,
    fallback_tag,
    referrers_index,
)
from nixery_core.sbom.spdx import SPDX_MEDIA_TYPE, render_spdx

__all__ = [
    "CYCLONEDX_MEDIA_TYPE",
    "FORMATS",
    "SPDX_MEDIA_TYPE",
    "Component",
    "Inventory",
    "SbomArtifact",
    "SbomFormat",
    "attach_sboms",
    "fallback_tag",
    "parse_store_path_name",
    "referrers_index",
    "render_cyclonedx",
    "render_spdx",
]
