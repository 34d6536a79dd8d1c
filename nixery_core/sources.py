"""Package sources: where Nix finds the package set.

A source plus the image's tag resolves to a :class:`SourceSpec`: the JSON
description the Nix expressions read, an identity, and a cache key that is
``None`` for moving targets (a channel name, a branch, a path whose content
is not hashed).
"""

from __future__ import annotations

import hashlib
import os
import re
import stat
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Protocol, runtime_checkable

import attrs

from nixery_core.canonical import canonical_json
from nixery_core.errors import InvalidSource
from nixery_core.names import Image
from nixery_core.watch import TreeWatch, stat_signature

__all__ = [
    "GitSource",
    "LocalPathSource",
    "NixpkgsSource",
    "PackageSource",
    "SourceSpec",
    "canonical_json",
    "image_cache_key",
    "is_commit",
    "source_from_env",
]

_COMMIT = re.compile(r"[0-9a-f]{40}")
_CHANNEL = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


def is_commit(value: str) -> bool:
    """Whether ``value`` is a full git commit id (40 lower-case hex digits): a pinned revision."""
    return _COMMIT.fullmatch(value) is not None


@attrs.frozen
class SourceSpec:
    """One resolved package source.

    ``nix_args`` is passed to the Nix expressions as one JSON string argument.
    ``identity`` names the source unambiguously; ``pinned`` says whether the
    same identity always yields the same package set.  ``revision`` is what
    pins a source that has no commit (a local directory's content hash), for
    the image's ``org.opencontainers.image.revision`` label.
    """

    nix_args: Mapping[str, str]
    identity: str
    pinned: bool
    revision: str | None = None

    @property
    def cache_key(self) -> str | None:
        """The identity when pinned; ``None`` for a moving target."""
        return self.identity if self.pinned else None

    def to_json(self) -> str:
        return canonical_json(dict(self.nix_args)).decode()


@runtime_checkable
class PackageSource(Protocol):
    """Promises a :class:`SourceSpec` for an image tag."""

    def resolve(self, tag: str) -> SourceSpec:
        """The source as it applies to ``tag`` (which may select a revision)."""
        ...


def _identity(args: Mapping[str, str], extra: Mapping[str, str] | None = None) -> str:
    return hashlib.sha256(canonical_json({"source": dict(args), **(extra or {})})).hexdigest()


@attrs.frozen
class NixpkgsSource:
    """nixpkgs from GitHub by channel name or full commit; the tag is ignored.

    Only a 40-hex commit is pinned; a channel (``nixos-unstable``) moves.
    """

    channel: str = "nixos-unstable"

    def __attrs_post_init__(self) -> None:
        if not _CHANNEL.fullmatch(self.channel):
            raise InvalidSource(f"nixpkgs channel {self.channel!r} is not a channel or commit")

    def resolve(self, tag: str) -> SourceSpec:
        del tag  # the channel alone selects the revision
        args = {
            "type": "nixpkgs",
            "url": f"https://github.com/NixOS/nixpkgs/archive/{self.channel}.tar.gz",
        }
        return SourceSpec(args, _identity(args), pinned=is_commit(self.channel))


@attrs.frozen
class GitSource:
    """A git repository holding a nixpkgs-style package set.

    The image tag is the git ref: a 40-hex tag is a commit (``rev``, pinned);
    anything else is a branch or tag name (``ref``, moving); ``latest`` means
    ``default_ref``.
    """

    url: str
    default_ref: str = "master"

    def __attrs_post_init__(self) -> None:
        if not self.url or any(c in self.url for c in "\x00\n\r"):
            raise InvalidSource(f"git URL {self.url!r} is not usable")

    def resolve(self, tag: str) -> SourceSpec:
        if is_commit(tag):
            args = {"type": "git", "url": self.url, "rev": tag}
            return SourceSpec(args, _identity(args), pinned=True)
        ref = self.default_ref if tag == "latest" else tag
        args = {"type": "git", "url": self.url, "ref": ref}
        return SourceSpec(args, _identity(args), pinned=False)


def hash_directory(root: Path) -> str:
    """sha256 over every file Nix could import from ``root``: names, modes, contents.

    Symlinks are hashed by target; ``.git`` directories are skipped (Nix's
    path import of a working tree would carry them, but they do not change
    what evaluates).
    """
    digest = hashlib.sha256()
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d != ".git")
        rel_dir = Path(dirpath).relative_to(root)
        for name in sorted(filenames + [d for d in dirnames if (Path(dirpath) / d).is_symlink()]):
            path = Path(dirpath) / name
            info = path.lstat()
            rel = (rel_dir / name).as_posix().encode()
            digest.update(len(rel).to_bytes(4, "big") + rel)
            if stat.S_ISLNK(info.st_mode):
                target = str(path.readlink()).encode()
                digest.update(b"L" + len(target).to_bytes(4, "big") + target)
            elif stat.S_ISREG(info.st_mode):
                executable = b"x" if info.st_mode & 0o111 else b"-"
                digest.update(b"F" + executable + info.st_size.to_bytes(8, "big"))
                with path.open("rb") as handle:
                    for chunk in iter(lambda: handle.read(1 << 20), b""):
                        digest.update(chunk)
    return digest.hexdigest()


def _absolute_path(value: str | os.PathLike[str]) -> Path:
    return Path(value).resolve()


class _ContentMemo:
    """A directory's content hash, kept until the kernel says something changed.

    Hash once and watch: a :class:`~nixery_core.watch.TreeWatch` is armed on
    the tree *before* it is hashed, so any change during or after hashing
    marks the memo stale; a resolve while nothing changed costs one
    non-blocking read of the inotify queue, whatever the tree's size.
    Without inotify (or out of watches) it compares a stat walk of every
    file instead (size, mtime, mode, inode: as git's index does), O(files).
    A single file is compared by one stat.  Pickling gives a fresh, empty
    memo (watches do not cross processes).
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._watch: TreeWatch | None = None
        self._signature: object = None
        self._content: str | None = None

    def __reduce__(self) -> tuple[type[_ContentMemo], tuple[()]]:
        return (_ContentMemo, ())

    def content_hash(self, path: Path) -> str:
        with self._lock:
            if self._content is not None and not self._stale(path):
                return self._content
            if self._watch is not None:
                self._watch.close()
            self._watch, self._signature = None, None
            if path.is_dir():
                self._watch = TreeWatch.open(path)
                if self._watch is None:
                    self._signature = stat_signature(path)
                self._content = hash_directory(path)
            else:
                self._signature = _file_signature(path)
                self._content = _hash_file(path)
            return self._content

    def _stale(self, path: Path) -> bool:
        if self._watch is not None:
            return self._watch.changed()
        if not path.is_dir():
            return _file_signature(path) != self._signature
        return stat_signature(path) != self._signature


def _file_signature(path: Path) -> tuple[int, ...]:
    info = path.stat()
    return (info.st_mode, info.st_size, info.st_mtime_ns, info.st_ino, info.st_dev)


@attrs.frozen
class LocalPathSource:
    """A package set in a local directory (``import path { system = ...; }``).

    Unlike Nixery, the directory's content is hashed, so builds from a path
    are cacheable and change key when a file changes.  Pass
    ``hash_content=False`` to treat the path as a moving target instead.
    A set whose evaluation reads files outside the directory is found out at
    its first uncached build and its entries then expire like a moving
    target's (:mod:`nixery_core.outside_reads`).
    """

    path: Path = attrs.field(converter=_absolute_path)
    hash_content: bool = True
    # The last content hash and what tells it is stale (see _ContentMemo).
    # Not part of the value.
    _memo: _ContentMemo = attrs.field(
        factory=_ContentMemo, init=False, eq=False, repr=False
    )

    def __attrs_post_init__(self) -> None:
        if not self.path.exists():
            raise InvalidSource(f"local package set {self.path} does not exist")

    def resolve(self, tag: str) -> SourceSpec:
        del tag  # a directory has one revision: its content
        args = {"type": "path", "path": str(self.path)}
        if not self.hash_content:
            return SourceSpec(args, _identity(args), pinned=False)
        content = self._content_hash()
        return SourceSpec(
            args, _identity(args, {"content": content}), pinned=True, revision=content
        )

    def _content_hash(self) -> str:
        return self._memo.content_hash(self.path)


def _hash_file(path: Path) -> str:
    with path.open("rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def image_cache_key(image: Image, spec: SourceSpec) -> str:
    """An unambiguous key for ``image`` built from ``spec``: packages, system, source.

    The packages are hashed as a JSON list, never concatenated, so
    ``["ab", "c"]`` and ``["a", "bc"]`` differ.
    """
    return hashlib.sha256(
        canonical_json(
            {
                "packages": list(image.packages),
                "system": image.arch.nix_system,
                "source": spec.identity,
            }
        )
    ).hexdigest()


def source_from_env(env: Mapping[str, str] | None = None) -> PackageSource:
    """The source Nixery's environment variables describe.

    ``NIXERY_PKGS_PATH`` (a directory), ``NIXERY_PKGS_REPO`` (a git URL) or
    ``NIXERY_CHANNEL`` (a nixpkgs channel or commit), checked in that order.
    """
    env = os.environ if env is None else env
    if path := env.get("NIXERY_PKGS_PATH"):
        return LocalPathSource(Path(path))
    if repo := env.get("NIXERY_PKGS_REPO"):
        return GitSource(repo)
    if channel := env.get("NIXERY_CHANNEL"):
        return NixpkgsSource(channel)
    raise InvalidSource(
        "no package source: set NIXERY_PKGS_PATH, NIXERY_PKGS_REPO or NIXERY_CHANNEL"
    )
