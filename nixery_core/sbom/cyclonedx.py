"""CycloneDX 1.5 JSON from an :class:`~nixery_core.sbom.inventory.Inventory`.

``metadata.component`` is the image (type ``container``, its ``pkg:oci``
purl); ``components`` has one entry per store path (``bom-ref`` is the store
path; type ``application`` when requested, else ``library``) with name,
version, ``pkg:nix`` purl, description, licences (by SPDX id, else by name),
the NAR's SHA-256 as its hash,
homepages as ``website`` references, and properties ``nix:store_path``,
``nix:nar_size`` and ``nixery-core:requested_as``.  ``dependencies`` holds
the image's dependency on the requested paths and every reference edge.

Deterministic: keys sorted, components in store path order, ``timestamp`` is
the image's creation time, and ``serialNumber`` is a UUID made from a hash
of the rest of the document.
"""

from __future__ import annotations

import uuid

from nixery_core.image_json import canonical_json
from nixery_core.protocols import JSONValue
from nixery_core.sbom.common import TOOL, content_hash, image_purl, is_spdx_id
from nixery_core.sbom.inventory import Component, Inventory

__all__ = ["CYCLONEDX_MEDIA_TYPE", "render_cyclonedx"]

#: The media type (and OCI ``artifactType``) of CycloneDX JSON documents.
CYCLONEDX_MEDIA_TYPE = "application/vnd.cyclonedx+json"
IMAGE_REF = "image"


def _licenses(component: Component) -> list[JSONValue]:
    out: list[JSONValue] = []
    for lic in component.licenses:
        entry: dict[str, JSONValue]
        if is_spdx_id(lic.spdx_id):
            entry = {"id": str(lic.spdx_id)}
        elif lic.name:
            entry = {"name": lic.name}
        else:
            continue
        if lic.url:
            entry["url"] = lic.url
        out.append({"license": entry})
    return out


def _component(component: Component) -> dict[str, JSONValue]:
    properties: list[JSONValue] = [
        {"name": "nix:nar_size", "value": str(component.size)},
        {"name": "nix:store_path", "value": component.path},
    ]
    properties += [
        {"name": "nixery-core:requested_as", "value": name} for name in component.requested_as
    ]
    entry: dict[str, JSONValue] = {
        "type": "application" if component.requested_as else "library",
        "bom-ref": component.path,
        "name": component.name,
        "purl": component.purl,
        "properties": properties,
    }
    if component.version:
        entry["version"] = component.version
    if component.nar_sha256:
        entry["hashes"] = [{"alg": "SHA-256", "content": component.nar_sha256}]
    if component.description:
        entry["description"] = component.description
    licenses = _licenses(component)
    if licenses:
        entry["licenses"] = licenses
    if component.homepages:
        entry["externalReferences"] = [
            {"type": "website", "url": url} for url in sorted(set(component.homepages))
        ]
    return entry


def render_cyclonedx(inventory: Inventory, manifest_digest: str) -> bytes:
    """The CycloneDX 1.5 JSON document of the image whose manifest is ``manifest_digest``."""
    properties: list[JSONValue] = [
        {"name": "oci:architecture", "value": inventory.architecture},
        {"name": "oci:manifest_digest", "value": manifest_digest},
    ]
    properties += [{"name": k, "value": v} for k, v in inventory.source.items()]
    image: dict[str, JSONValue] = {
        "type": "container",
        "bom-ref": IMAGE_REF,
        "name": inventory.name,
        "version": inventory.tag,
        "purl": image_purl(inventory, manifest_digest),
        "properties": properties,
    }
    dependencies: list[JSONValue] = [
        {"ref": IMAGE_REF, "dependsOn": [c.path for c in inventory.roots]}
    ]
    dependencies += [
        {"ref": c.path, "dependsOn": list(c.references)} for c in inventory.components
    ]
    document: dict[str, JSONValue] = {
        "$schema": "http://cyclonedx.org/schema/bom-1.5.schema.json",
        "bomFormat": "CycloneDX",
        "specVersion": "1.5",
        "version": 1,
        "metadata": {
            "timestamp": inventory.created,
            "tools": {"components": [{"type": "application", "name": TOOL}]},
            "component": image,
        },
        "components": [_component(c) for c in inventory.components],
        "dependencies": dependencies,
    }
    digest = bytes.fromhex(content_hash(document))
    document["serialNumber"] = uuid.UUID(bytes=digest[:16], version=5).urn
    return canonical_json(document)
