"""Small pieces both SBOM formats share: the tool name, the image's purl, licence ids."""

from __future__ import annotations

import hashlib
import re
from urllib.parse import quote

from nixery_core.image_json import canonical_json
from nixery_core.protocols import JSONValue
from nixery_core.sbom.inventory import Inventory

__all__ = ["TOOL", "content_hash", "image_purl", "is_spdx_id"]

#: How the documents name their author tool.
TOOL = "nixery-core"

_SPDX_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9.+-]*")


def is_spdx_id(value: str | None) -> bool:
    """Whether ``value`` has the shape of an SPDX licence identifier."""
    return value is not None and _SPDX_ID.fullmatch(value) is not None


def image_purl(inventory: Inventory, manifest_digest: str) -> str:
    """``pkg:oci/<last name part>@<digest>?arch=..&tag=..`` (the purl-spec ``oci`` type)."""
    name = inventory.name.rsplit("/", 1)[-1].lower()
    return (
        f"pkg:oci/{quote(name, safe='')}@{quote(manifest_digest, safe='')}"
        f"?arch={quote(inventory.architecture, safe='')}&tag={quote(inventory.tag, safe='')}"
    )


def content_hash(document: JSONValue) -> str:
    """sha256 (hex) of a document's canonical JSON: a deterministic unique id."""
    return hashlib.sha256(canonical_json(document)).hexdigest()
