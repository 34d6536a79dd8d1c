"""SPDX 2.3 JSON from an :class:`~nixery_core.sbom.inventory.Inventory`.

One package for the image (``SPDXRef-Image``, purpose ``CONTAINER``) and one
per store path (``SPDXRef-StorePath-<hash>``) with its name, version,
``pkg:nix`` purl, homepage, description, declared licence (the package
set's; ``NOASSERTION`` when it gives none) and, as its SHA256 checksum, the
hash of the store path's NAR serialisation (Nix's ``narHash``).  The NAR size and the store path
are in the package comment (SPDX 2.3 has no size field).  Relationships:
the document ``DESCRIBES`` the image; the image ``CONTAINS`` every store path
and ``DEPENDS_ON`` each requested one (commented ``requested as <name>``);
each store path ``DEPENDS_ON`` the paths it references.

Deterministic: keys sorted, packages in store path order, ``created`` is the
image's creation time, and ``documentNamespace`` ends with a hash of the
rest of the document.
"""

from __future__ import annotations

import re

from nixery_core.image_json import canonical_json
from nixery_core.protocols import JSONValue
from nixery_core.sbom.common import TOOL, content_hash, image_purl, is_spdx_id
from nixery_core.sbom.inventory import Component, Inventory

__all__ = ["SPDX_MEDIA_TYPE", "render_spdx"]

#: The media type (and OCI ``artifactType``) of SPDX JSON documents.
SPDX_MEDIA_TYPE = "application/spdx+json"
NOASSERTION = "NOASSERTION"
_NOT_ID_CHARS = re.compile(r"[^A-Za-z0-9.-]+")


def _spdx_id(component: Component) -> str:
    key = component.store_hash or _NOT_ID_CHARS.sub("-", component.path.rsplit("/", 1)[-1])
    return f"SPDXRef-StorePath-{key}"


def _license_ref(name: str) -> str:
    return "LicenseRef-" + (_NOT_ID_CHARS.sub("-", name).strip("-") or "unnamed")


def _declared(component: Component, extracted: dict[str, str]) -> str:
    """The licence expression (all licences ``AND``-ed); names without ids become LicenseRefs."""
    terms: list[str] = []
    for lic in component.licenses:
        if is_spdx_id(lic.spdx_id):
            terms.append(str(lic.spdx_id))
        elif lic.name:
            ref = _license_ref(lic.name)
            extracted[ref] = lic.name
            terms.append(ref)
    unique = sorted(set(terms))
    return " AND ".join(unique) if unique else NOASSERTION


def _comment(component: Component) -> str:
    text = f"Nix store path {component.path}; NAR size {component.size} bytes"
    if component.nar_sha256:
        text += "; the checksum is the NAR's"
    if component.requested_as:
        text += "; requested as " + ", ".join(component.requested_as)
    return text


def _package(component: Component, extracted: dict[str, str]) -> dict[str, JSONValue]:
    package: dict[str, JSONValue] = {
        "SPDXID": _spdx_id(component),
        "name": component.name,
        "downloadLocation": NOASSERTION,
        "filesAnalyzed": False,
        "licenseConcluded": NOASSERTION,
        "licenseDeclared": _declared(component, extracted),
        "copyrightText": NOASSERTION,
        "comment": _comment(component),
        "externalRefs": [
            {
                "referenceCategory": "PACKAGE-MANAGER",
                "referenceType": "purl",
                "referenceLocator": component.purl,
            }
        ],
    }
    if component.version:
        package["versionInfo"] = component.version
    if component.homepages:
        package["homepage"] = component.homepages[0]
    if component.description:
        package["summary"] = component.description
    if component.nar_sha256:
        package["checksums"] = [{"algorithm": "SHA256", "checksumValue": component.nar_sha256}]
    return package


def render_spdx(inventory: Inventory, manifest_digest: str) -> bytes:
    """The SPDX 2.3 JSON document of the image whose manifest is ``manifest_digest``."""
    extracted: dict[str, str] = {}
    ids = {c.path: _spdx_id(c) for c in inventory.components}
    image: dict[str, JSONValue] = {
        "SPDXID": "SPDXRef-Image",
        "name": inventory.name,
        "versionInfo": inventory.tag,
        "downloadLocation": NOASSERTION,
        "filesAnalyzed": False,
        "licenseConcluded": NOASSERTION,
        "licenseDeclared": NOASSERTION,
        "copyrightText": NOASSERTION,
        "primaryPackagePurpose": "CONTAINER",
        "comment": f"OCI image manifest {manifest_digest} ({inventory.architecture})",
        "externalRefs": [
            {
                "referenceCategory": "PACKAGE-MANAGER",
                "referenceType": "purl",
                "referenceLocator": image_purl(inventory, manifest_digest),
            }
        ],
    }
    packages: list[JSONValue] = [image]
    packages += [_package(c, extracted) for c in inventory.components]
    relationships: list[JSONValue] = [
        {
            "spdxElementId": "SPDXRef-DOCUMENT",
            "relationshipType": "DESCRIBES",
            "relatedSpdxElement": "SPDXRef-Image",
        }
    ]
    relationships += [
        {"spdxElementId": "SPDXRef-Image", "relationshipType": "CONTAINS",
         "relatedSpdxElement": ids[c.path]}
        for c in inventory.components
    ]
    relationships += [
        {"spdxElementId": "SPDXRef-Image", "relationshipType": "DEPENDS_ON",
         "relatedSpdxElement": ids[c.path], "comment": "requested as " + ", ".join(c.requested_as)}
        for c in inventory.roots
    ]
    for c in inventory.components:
        relationships += [
            {"spdxElementId": ids[c.path], "relationshipType": "DEPENDS_ON",
             "relatedSpdxElement": ids[ref]}
            for ref in c.references
        ]
    source = ", ".join(f"{k}={v}" for k, v in inventory.source.items())
    document: dict[str, JSONValue] = {
        "spdxVersion": "SPDX-2.3",
        "dataLicense": "CC0-1.0",
        "SPDXID": "SPDXRef-DOCUMENT",
        "name": f"{inventory.name}:{inventory.tag}",
        "creationInfo": {
            "created": inventory.created,
            "creators": [f"Tool: {TOOL}"],
            "comment": "From the Nix runtime closure" + (f"; {source}" if source else ""),
        },
        "packages": packages,
        "relationships": relationships,
    }
    if extracted:
        document["hasExtractedLicensingInfos"] = [
            {"licenseId": ref, "name": name, "extractedText": name}
            for ref, name in sorted(extracted.items())
        ]
    document["documentNamespace"] = (
        f"https://nixery-core.invalid/spdx/{content_hash(document)}"
    )
    return canonical_json(document)
