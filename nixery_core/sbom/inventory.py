"""What an image contains, as an SBOM sees it: one component per store path.

:class:`Inventory` is the format-neutral source of both documents
(:mod:`~nixery_core.sbom.spdx`, :mod:`~nixery_core.sbom.cyclonedx`).  It is
made from the realised :class:`~nixery_core.graph.RuntimeGraph` (every store
path, its NAR size and its references) and what the package set said of the
requested packages (:class:`~nixery_core.package_meta.PackageMeta`, read at
resolve time).  Paths that were not requested have no package-set metadata:
their name and version come from the store path name, split as Nix's
``builtins.parseDrvName`` splits it (the version starts at the first ``-``
not followed by a letter), with a trailing output name (``-bin``, ``-dev``,
``-man``...) taken off the version.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from urllib.parse import quote

import attrs

from nixery_core.graph import RuntimeGraph
from nixery_core.names import Image
from nixery_core.package_meta import License, PackageMeta
from nixery_core.sbom.nar_hash import nar_sha256_hex

__all__ = ["Component", "Inventory", "parse_store_path_name"]

#: Output names nixpkgs commonly gives non-default outputs; a store path name
#: ending ``-<one of these>`` names that output.
KNOWN_OUTPUTS = frozenset(
    {"bin", "dev", "devdoc", "doc", "debug", "info", "lib", "man", "out", "static"}
)
_STORE_BASENAME = re.compile(r"([0-9a-z]{32})-(.+)")


def parse_store_path_name(name: str) -> tuple[str, str | None, str | None]:
    """``openssl-3.0.13-bin`` -> ``("openssl", "3.0.13", "bin")`` (name, version, output).

    The split is ``builtins.parseDrvName``'s: the version starts after the
    first ``-`` that is followed by anything but a letter.
    """
    pname, version = name, None
    for i, char in enumerate(name[:-1]):
        if char == "-" and not name[i + 1].isalpha():
            pname, version = name[:i], name[i + 1 :]
            break
    output = None
    tail = (version or pname).rsplit("-", 1)
    if len(tail) == 2 and tail[1] in KNOWN_OUTPUTS:
        output = tail[1]
        if version is not None:
            version = tail[0]
        else:
            pname = tail[0]
    return pname, version, output


@attrs.frozen
class Component:
    """One store path of the image.

    ``requested_as`` lists the image's package names this path is the output
    of (empty for dependencies); ``meta`` is the package set's metadata for
    requested outputs.
    """

    path: str
    name: str
    version: str | None
    output: str | None
    size: int
    references: tuple[str, ...]
    requested_as: tuple[str, ...] = ()
    meta: PackageMeta | None = None
    nar_hash: str | None = None

    @property
    def nar_sha256(self) -> str | None:
        """The NAR's SHA-256 in hex, when Nix gave it."""
        return nar_sha256_hex(self.nar_hash)

    @property
    def store_hash(self) -> str:
        """The store path's hash part (32 characters of Nix base-32)."""
        match = _STORE_BASENAME.fullmatch(self.path.rsplit("/", 1)[-1])
        return match.group(1) if match else ""

    @property
    def purl(self) -> str:
        """``pkg:nix/<name>@<version>?output=<out>&store_hash=<hash>`` (parts that exist)."""
        purl = "pkg:nix/" + quote(self.name, safe="")
        if self.version:
            purl += "@" + quote(self.version, safe="")
        qualifiers = []
        if self.output:
            qualifiers.append("output=" + quote(self.output, safe=""))
        if self.store_hash:
            qualifiers.append("store_hash=" + self.store_hash)
        return purl + ("?" + "&".join(qualifiers) if qualifiers else "")

    @property
    def licenses(self) -> tuple[License, ...]:
        return self.meta.licenses if self.meta is not None else ()

    @property
    def homepages(self) -> tuple[str, ...]:
        return self.meta.homepage if self.meta is not None else ()

    @property
    def description(self) -> str | None:
        return self.meta.description if self.meta is not None else None


@attrs.frozen
class Inventory:
    """An image's components, and where they came from.

    ``name`` is the image's name (``shell/hello``), ``tag`` its tag,
    ``architecture`` the OCI architecture, ``created`` the image's creation
    time (RFC 3339; the epoch unless the image config says otherwise), and
    ``source`` the ``org.opencontainers.image.*`` labels naming the package
    set (see :func:`~nixery_core.sbom.provenance.source_labels`).
    Components are sorted by store path.
    """

    name: str
    tag: str
    architecture: str
    created: str
    source: Mapping[str, str]
    components: tuple[Component, ...]

    @classmethod
    def from_graph(
        cls, graph: RuntimeGraph, image: Image, *, created: str, source: Mapping[str, str]
    ) -> Inventory:
        """The inventory of ``image`` built from ``graph``."""
        requested: dict[str, list[str]] = {}
        for package, outputs in graph.requested.items():
            for out_path in outputs:
                requested.setdefault(out_path, []).append(package)
        components = []
        for sp in graph:
            parsed_name, version, output = parse_store_path_name(sp.name)
            meta = graph.meta.get(sp.path)
            name = (meta.pname if meta is not None else None) or parsed_name
            if meta is not None and meta.version:
                version = meta.version
            components.append(
                Component(
                    path=sp.path,
                    name=name,
                    version=version,
                    output=output,
                    size=sp.nar_size,
                    references=sp.references,
                    requested_as=tuple(sorted(requested.get(sp.path, ()))),
                    meta=meta,
                    nar_hash=sp.nar_hash,
                )
            )
        return cls(
            name=image.name,
            tag=image.tag,
            architecture=image.arch.oci_arch,
            created=created,
            source=dict(sorted(source.items())),
            components=tuple(sorted(components, key=lambda c: c.path)),
        )

    @property
    def roots(self) -> tuple[Component, ...]:
        """The requested components."""
        return tuple(c for c in self.components if c.requested_as)
