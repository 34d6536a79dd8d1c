"""Image names: from ``shell/git/htop:latest`` to a frozen :class:`Image`.

The grammar is the OCI distribution spec's: a name is ``/``-separated path
components of ``[a-z0-9]`` runs joined by ``.``, ``_``, ``__`` or runs of
``-``; a tag is ``[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}``.  Each component is a
package name, except the meta-packages ``shell`` and ``arm64``, which only
count in the leading run of the name (as in Nixery).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any

import attrs

from nixery_core.errors import InvalidImageName, InvalidInput

__all__ = [
    "AMD64",
    "ARM64",
    "COMPONENT_PATTERN",
    "DEFAULT_ALWAYS_ADDED",
    "SHELL_PACKAGES",
    "TAG_PATTERN",
    "Architecture",
    "Image",
    "is_name_component",
    "is_tag",
]

#: One ``/``-separated part of a repository name (the OCI distribution grammar).
COMPONENT_PATTERN = re.compile(r"[a-z0-9]+(?:(?:\.|_|__|-+)[a-z0-9]+)*")
#: A tag (the OCI distribution grammar).
TAG_PATTERN = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}")
_MAX_NAME = 255
_PLATFORM_PART = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")


def is_name_component(value: object) -> bool:
    """Whether ``value`` is one valid repository path component (``shell``, ``git``)."""
    return isinstance(value, str) and COMPONENT_PATTERN.fullmatch(value) is not None


def is_tag(value: object) -> bool:
    """Whether ``value`` is a valid tag (``latest``, a 40-hex commit, ``v1.2``)."""
    return isinstance(value, str) and TAG_PATTERN.fullmatch(value) is not None


def _platform_part(_inst: object, attribute: attrs.Attribute[Any], value: Any) -> None:
    if not isinstance(value, str) or not _PLATFORM_PART.fullmatch(value):
        raise InvalidInput(f"Architecture.{attribute.name} {value!r} is not a platform name")


@attrs.frozen
class Architecture:
    """A target platform: the Nix system string and the image architecture.

    Each part is a short name of ``[A-Za-z0-9_.-]`` (checked on construction).
    """

    nix_system: str = attrs.field(validator=_platform_part)
    oci_arch: str = attrs.field(validator=_platform_part)
    os: str = attrs.field(default="linux", validator=_platform_part)


AMD64 = Architecture("x86_64-linux", "amd64")
ARM64 = Architecture("aarch64-linux", "arm64")

#: What the ``shell`` meta-package expands to.
SHELL_PACKAGES: tuple[str, ...] = ("bashInteractive", "coreutils", "moreutils", "nano")
#: Packages every image gets unless the caller says otherwise.
DEFAULT_ALWAYS_ADDED: tuple[str, ...] = ("cacert", "iana-etc")

_META = ("arm64", "shell")


def _check_tag(name: str, tag: object) -> None:
    if not is_tag(tag):
        raise InvalidImageName(
            name, str(tag), "is not a valid tag ([A-Za-z0-9_][A-Za-z0-9_.-]{0,127})"
        )


#: Longest package name from trusted code; Nix attribute names are far shorter.
_MAX_PACKAGE = 255


def _check_package(package: object) -> None:
    """A package name from trusted code: text Nix can take as data, of a sane size.

    Anything else is allowed (it reaches Nix only as a JSON string, never as
    Nix source): control characters and quotes come back as unknown packages.
    """
    if not isinstance(package, str):
        raise InvalidImageName(repr(package), repr(package), "is not a string")
    try:
        encoded = package.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise InvalidImageName(package, package, "is not valid Unicode text") from exc
    if not package or len(encoded) > _MAX_PACKAGE:
        raise InvalidImageName(
            package[:40], package[:40], f"is not a package name (1 to {_MAX_PACKAGE} bytes)"
        )
    if "/" in package or "\x00" in package:
        raise InvalidImageName(package, package, "is not a package name")


def _image_name(_inst: object, _attr: object, value: Any) -> None:
    if not isinstance(value, str) or len(value) > _MAX_NAME * 8 or "\x00" in value:
        raise InvalidImageName(repr(value)[:40], repr(value)[:40], "is not an image name")


def _image_tag(inst: Image, _attr: object, value: Any) -> None:
    _check_tag(inst.name, value)


def _sorted_packages(_inst: object, attribute: attrs.Attribute[Any], value: Any) -> None:
    if not isinstance(value, tuple):
        raise InvalidImageName(
            repr(value)[:40], repr(value)[:40], f"{attribute.name} is not a tuple"
        )
    for package in value:
        _check_package(package)
    if list(value) != sorted(set(value)):
        raise InvalidImageName(
            repr(value)[:40], repr(value)[:40], f"{attribute.name} are not sorted and unique"
        )


def _architecture(_inst: object, _attr: object, value: Any) -> None:
    if not isinstance(value, Architecture):
        raise InvalidInput(
            f"arch must be an Architecture (names.AMD64, names.ARM64), not {value!r}"
        )


def _meta(_inst: object, _attr: object, value: Any) -> None:
    if not isinstance(value, tuple) or list(value) != [m for m in _META if m in value]:
        raise InvalidImageName(
            repr(value)[:40], repr(value)[:40], f"meta must be a tuple of {_META}"
        )


@attrs.frozen
class Image:
    """What to build: a sorted, de-duplicated package list for one architecture.

    Build values with :meth:`from_name` (registry names) or
    :meth:`from_packages` (a package list from trusted code).  Constructing
    one directly checks every field the same way (the tag's grammar,
    package names, sorted and unique package lists, the architecture), so
    an ``Image`` with a bad tag cannot exist: the checks raise
    :class:`~nixery_core.errors.InvalidImageName` (or
    :class:`~nixery_core.errors.InvalidInput` for the architecture).
    """

    name: str = attrs.field(validator=_image_name)
    tag: str = attrs.field(validator=_image_tag)
    packages: tuple[str, ...] = attrs.field(validator=_sorted_packages)
    arch: Architecture = attrs.field(default=AMD64, validator=_architecture)
    requested: tuple[str, ...] = attrs.field(default=(), validator=_sorted_packages)
    meta: tuple[str, ...] = attrs.field(default=(), validator=_meta)

    @property
    def canonical_name(self) -> str:
        """The name with meta-packages first and the rest sorted and de-duplicated.

        ``htop/git`` and ``git/htop/git`` share the canonical name ``git/htop``.
        Packages that happen to be called ``arm64`` or ``shell`` (only possible
        after another package) go last, so the canonical name parses back to
        the same image instead of turning them into meta-packages.
        """
        packages = sorted(self.requested, key=lambda p: (p in _META, p))
        return "/".join([*self.meta, *packages])

    @property
    def reference(self) -> str:
        """``canonical_name:tag``."""
        return f"{self.canonical_name}:{self.tag}"

    @classmethod
    def from_name(
        cls,
        name: str,
        tag: str = "latest",
        *,
        always_added: Iterable[str] = DEFAULT_ALWAYS_ADDED,
    ) -> Image:
        """Parse a registry image name (``shell/git``) and tag into an image.

        A ``name:tag`` string is accepted when ``tag`` is left at its default.
        Raises :class:`~nixery_core.errors.InvalidImageName` naming the bad part.
        """
        if not isinstance(name, str):
            raise InvalidImageName(repr(name), repr(name), "is not a string")
        if isinstance(tag, str) and tag == "latest" and ":" in name:
            name, _, tag = name.rpartition(":")
        _check_tag(name, tag)
        if not name:
            raise InvalidImageName(name, name, "is empty")
        if len(name) > _MAX_NAME:
            raise InvalidImageName(name, name[:40] + "...", f"is longer than {_MAX_NAME} bytes")
        components = name.split("/")
        for component in components:
            if not is_name_component(component):
                raise InvalidImageName(
                    name,
                    component,
                    "is not a valid path component (lower-case [a-z0-9] runs joined by "
                    "'.', '_', '__' or '-')",
                )
        arch = AMD64
        meta_count = 0
        meta: set[str] = set()
        packages: set[str] = set()
        for component in components:
            if component not in _META:
                break
            meta_count += 1
            meta.add(component)
            if component == "arm64":
                arch = ARM64
            else:
                packages.update(SHELL_PACKAGES)
        requested = tuple(sorted(set(components[meta_count:])))
        packages.update(requested)
        packages.update(always_added)
        return cls(
            name=name,
            tag=tag,
            packages=tuple(sorted(packages)),
            arch=arch,
            requested=requested,
            meta=tuple(m for m in _META if m in meta),
        )

    @classmethod
    def from_packages(
        cls,
        packages: Iterable[str],
        *,
        tag: str = "latest",
        arch: Architecture = AMD64,
        always_added: Iterable[str] = DEFAULT_ALWAYS_ADDED,
    ) -> Image:
        """An image from a package list given by trusted code (no name grammar).

        Package names may use any case (``bashInteractive``); they are still
        only ever passed to Nix as data, never as Nix source.
        """
        requested = tuple(sorted(set(packages)))
        for package in requested:
            _check_package(package)
        _check_tag("/".join(requested), tag)
        return cls(
            name="/".join(requested),
            tag=tag,
            packages=tuple(sorted({*requested, *always_added})),
            arch=arch,
            requested=requested,
        )

    def with_arch(self, arch: Architecture) -> Image:
        """The same packages for another architecture (for multi-arch indexes)."""
        meta = tuple(m for m in self.meta if m != "arm64")
        if arch == ARM64:
            meta = ("arm64", *meta)
        return attrs.evolve(self, arch=arch, meta=meta)
