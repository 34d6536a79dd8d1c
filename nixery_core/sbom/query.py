"""Questions across many images' SBOMs: which contain a package, which below a version.

Reads CycloneDX documents (what :meth:`~nixery_core.build.BuildResult.sbom`
returns for ``"cyclonedx"``), so it works on SBOMs fetched from a registry
as well as on fresh builds.  Versions compare as Nix's
``builtins.compareVersions`` compares them (:func:`compare_versions`).
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping

import attrs

from nixery_core.errors import InvalidInput

__all__ = ["Match", "compare_versions", "find_components"]


def _components(version: str) -> Iterator[str]:
    """Nix's version components: runs of digits, or of other characters, split at '.' and '-'."""
    i, end = 0, len(version)
    while i < end:
        while i < end and version[i] in ".-":
            i += 1
        if i == end:
            return
        start = i
        if _number(version[i]):
            while i < end and _number(version[i]):
                i += 1
        else:
            while i < end and not _number(version[i]) and version[i] not in ".-":
                i += 1
        yield version[start:i]


def _number(component: str) -> bool:
    return component != "" and all("0" <= ch <= "9" for ch in component)


def _less(c1: str, c2: str) -> bool:
    """Nix's ``componentsLT``: numbers numerically, "" and "pre" below everything."""
    n1, n2 = _number(c1), _number(c2)
    if n1 and n2:
        return int(c1) < int(c2)
    rules = (
        (c1 == "" and n2, True),
        (c1 == "pre" and c2 != "pre", True),
        (c2 == "pre", False),
        (n2, True),  # 2.3a < 2.3.1
        (n1, False),
    )
    for applies, answer in rules:
        if applies:
            return answer
    return c1 < c2


def compare_versions(v1: str, v2: str) -> int:
    """-1, 0 or 1 as ``builtins.compareVersions v1 v2`` answers (``1.2pre1 < 1.2 < 1.2.1``)."""
    left, right = list(_components(v1)), list(_components(v2))
    for i in range(max(len(left), len(right))):
        c1 = left[i] if i < len(left) else ""
        c2 = right[i] if i < len(right) else ""
        if _less(c1, c2):
            return -1
        if _less(c2, c1):
            return 1
    return 0


@attrs.frozen
class Match:
    """One component of one image that answered a query."""

    image: str
    name: str
    version: str | None
    store_path: str
    requested: bool


def find_components(
    documents: Mapping[str, bytes], name: str, *, below: str | None = None
) -> list[Match]:
    """Every component called ``name`` in the CycloneDX ``documents`` (image -> bytes).

    With ``below``, only versions that compare lower (a component without a
    version never matches then).  Sorted by image, then store path.
    """
    matches: list[Match] = []
    for image, raw in sorted(documents.items()):
        try:
            document = json.loads(raw)
            components = document["components"]
        except (ValueError, KeyError, TypeError) as exc:
            raise InvalidInput(f"the SBOM of {image} is not a CycloneDX document: {exc}") from exc
        for component in components:
            if component.get("name") != name:
                continue
            version = component.get("version")
            if below is not None and (version is None or compare_versions(version, below) >= 0):
                continue
            matches.append(
                Match(image, name, version, str(component.get("bom-ref")),
                      component.get("type") == "application")
            )
    return sorted(matches, key=lambda m: (m.image, m.store_path))
