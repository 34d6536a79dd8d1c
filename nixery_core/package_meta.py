"""Package metadata as the package set states it: version, description, homepages, licences.

``nix/resolve.nix`` reads these fields of each requested derivation as data
(strings only, each forced under ``tryEval``), and :mod:`nixery_core.nix`
parses them into :class:`PackageMeta`.  SBOMs (:mod:`nixery_core.sbom`)
report them; nothing else depends on them.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import attrs

__all__ = ["License", "PackageMeta"]


def _opt_str(data: Mapping[str, Any], key: str) -> str | None:
    value = data.get(key)
    if value is not None and not isinstance(value, str):
        raise TypeError(f"{key} is not a string or null")
    return value


def _str_list(data: Mapping[str, Any], key: str) -> list[Any]:
    value = data.get(key, [])
    if not isinstance(value, list):
        raise TypeError(f"{key} is not a list")
    return value


@attrs.frozen
class License:
    """One licence: its SPDX identifier when the package set gives one, its name, a URL."""

    spdx_id: str | None = None
    name: str | None = None
    url: str | None = None

    def to_json(self) -> dict[str, str | None]:
        return {"spdxId": self.spdx_id, "name": self.name, "url": self.url}

    @classmethod
    def from_json(cls, data: object) -> License:
        """Read ``{"spdxId", "name", "url"}`` (each a string or null); TypeError otherwise."""
        if not isinstance(data, dict):
            raise TypeError("a licence is not an object")
        return cls(_opt_str(data, "spdxId"), _opt_str(data, "name"), _opt_str(data, "url"))


@attrs.frozen
class PackageMeta:
    """What a package set says of one package (every field optional).

    ``pname`` and ``version`` are the derivation's attributes (nixpkgs'
    ``mkDerivation`` sets both); the rest come from its ``meta``.
    """

    pname: str | None = None
    version: str | None = None
    description: str | None = None
    homepage: tuple[str, ...] = ()
    licenses: tuple[License, ...] = ()

    def to_json(self) -> dict[str, Any]:
        return {
            "pname": self.pname,
            "version": self.version,
            "description": self.description,
            "homepage": list(self.homepage),
            "licenses": [lic.to_json() for lic in self.licenses],
        }

    @classmethod
    def from_json(cls, data: object) -> PackageMeta:
        """Read resolve.nix's ``meta`` record; TypeError names the first bad field."""
        if not isinstance(data, dict):
            raise TypeError("meta is not an object")
        homepage = _str_list(data, "homepage")
        if not all(isinstance(h, str) for h in homepage):
            raise TypeError("homepage holds a value that is not a string")
        return cls(
            pname=_opt_str(data, "pname"),
            version=_opt_str(data, "version"),
            description=_opt_str(data, "description"),
            homepage=tuple(homepage),
            licenses=tuple(License.from_json(lic) for lic in _str_list(data, "licenses")),
        )
