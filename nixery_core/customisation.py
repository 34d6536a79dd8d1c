"""The customisation layer: symlink forest, ``/tmp``, ``/usr/bin/env``, users.

Made in Python from the realised store (no Nix evaluation), as tar entries
for :func:`nixery_core.archive.pack_entries`.  Rules, all deterministic:

**Forest** (what nixpkgs' ``buildEnv``/``symlinkJoin`` make):

* Packages are taken in code-point order of their requested names; a
  package's outputs in order of (name without hash, full path).  An output
  named by several packages is walked once, at its first place.
* Each output directory ``store_root / output`` is read with ``lstat`` and
  ``listdir`` only; no symlink is ever followed, so nothing outside the store
  tree is read.  A symlink inside a package is a leaf: the forest links to its
  store location (``bin/x -> /nix/store/…-pkg/bin/x``), which resolves at run
  time inside the image.  Outputs that are not directories (a single file, a
  symlink) are skipped and reported in :attr:`Customisation.skipped_outputs`.
* A directory provided by one package only is linked whole
  (``share -> /nix/store/…-pkg/share``).  When a second package provides the
  same directory, the link is unfolded into a real directory whose children
  link into the first package, and the second is merged into it, recursively.
* Conflict rule: the first package in the order above wins.  A file or
  symlink never merges with anything; a later package's entry at a path that
  is already taken (by a file, or a directory when it brings a file) is
  dropped and reported in :attr:`Customisation.collisions`.

**Generated entries** (they win over the forest; replaced forest entries are
reported as collisions with ``kept=GENERATED``):

* ``etc``, ``usr``, ``usr/bin`` and the ancestors of the user's home are real
  directories (a whole-directory link there is unfolded, so ``cacert``'s
  ``etc/ssl/certs/ca-bundle.crt`` still resolves next to ``etc/passwd``).
* ``tmp`` mode 0o1777; ``root`` (root's home) mode 0o700.
* ``usr/bin/env`` links to the store location of the forest's ``bin/env``
  whenever the forest has one (``coreutils``, but also e.g. ``busybox``), and
  is absent otherwise.
* ``etc/passwd``: ``root:x:0:0:root:/root:SHELL`` and, with a configured
  user, ``NAME:x:UID:GID:NAME:HOME:SHELL``.  SHELL is ``/bin/sh`` if the
  forest has ``bin/sh``, else ``/bin/bash`` if it has ``bin/bash``, else
  ``/sbin/nologin`` (which need not exist: a missing shell refuses logins).
* ``etc/group``: ``root:x:0:`` and ``NAME:x:GID:`` unless GID is 0 (then the
  user's primary group is ``root``).
* ``etc/nsswitch.conf``: ``passwd: files``, ``group: files``, ``hosts: files dns``.
* The user's home: mode 0o755 (readable by the arbitrary uids some runtimes
  use), owned by ``uid:gid``.  A home that the image already has (a
  generated path, a forest entry) or whose ancestor is a file is refused with
  :class:`~nixery_core.errors.InvalidImageConfig`.

Every other directory is mode 0o755, every entry is owned by 0:0 except the
home; symlinks have mode 0o777; files 0o644.  Each needed parent directory
is emitted explicitly; entries are sorted by path components (a recursive
sorted walk: parents before children) and unique.
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Iterable
from pathlib import Path

import attrs

from nixery_core.archive import directory_identity
from nixery_core.entries import TarEntry
from nixery_core.errors import (
    FileChangedDuringPacking,
    InvalidImageConfig,
    StorePathMissing,
    UnsafeStoreContent,
)
from nixery_core.graph import RuntimeGraph, store_path_name
from nixery_core.image_config import ImageConfig, User

__all__ = [
    "GENERATED",
    "NOLOGIN",
    "Collision",
    "Customisation",
    "build_customisation",
    "customisation_entries",
    "entry_sort_key",
]

#: ``Collision.kept`` when a generated entry replaced a forest entry.
GENERATED = "<generated>"
#: The login shell when the image has neither ``bin/sh`` nor ``bin/bash``.
NOLOGIN = "/sbin/nologin"

_DIR_MODE = 0o755
_LINK_MODE = 0o777
_FILE_MODE = 0o644
_NSSWITCH = b"passwd: files\ngroup: files\nhosts: files dns\n"
#: Paths the layer generates; a user's home may be none of these.
_SYSTEM_DIRS = ("etc", "usr", "usr/bin")
_GENERATED_LEAVES = ("tmp", "root", "etc/passwd", "etc/group", "etc/nsswitch.conf", "usr/bin/env")


@attrs.frozen
class Collision:
    """Two providers for one image path; ``kept`` won, ``dropped`` is not in the image.

    ``kept`` and ``dropped`` are store locations (``/nix/store/…-a/bin/same``)
    or :data:`GENERATED`.
    """

    path: str
    kept: str
    dropped: str


@attrs.frozen
class Customisation:
    """The customisation layer's entries and what building them noticed.

    ``commands`` are the names in the image's ``bin/`` (so a builder can ask
    ``"bash" in commands`` for :meth:`ImageConfig.effective_cmd`);
    ``login_shell`` is the shell written to ``etc/passwd``.
    """

    entries: tuple[TarEntry, ...]
    collisions: tuple[Collision, ...]
    skipped_outputs: tuple[str, ...]
    commands: tuple[str, ...]
    login_shell: str


def entry_sort_key(entry: TarEntry) -> tuple[str, ...]:
    """Order of entries in the layer: by path components (parents first)."""
    return tuple(entry.path.split("/"))


def customisation_entries(
    graph: RuntimeGraph, *, config: ImageConfig, store_root: Path = Path("/")
) -> list[TarEntry]:
    """The customisation layer's tar entries (see the module docstring for the rules)."""
    return list(build_customisation(graph, config=config, store_root=store_root).entries)


def build_customisation(
    graph: RuntimeGraph, *, config: ImageConfig, store_root: Path = Path("/")
) -> Customisation:
    """Build the forest and generated entries, reporting collisions and skipped outputs.

    Raises :class:`StorePathMissing` when a requested output is not on disk,
    :class:`UnsafeStoreContent` for an output path that is not a normalised
    absolute path or a directory that cannot be read, and
    :class:`InvalidImageConfig` for a home the image cannot hold.
    """
    forest = _Forest()
    for output in _outputs_in_priority(graph):
        forest.add_output(output, store_root / output.lstrip("/"))

    for path in _SYSTEM_DIRS:
        forest.force_dir(path.split("/"))
    if config.user is not None:
        _place_home(forest, config.user)

    shell = _login_shell(forest)
    env = forest.lookup(("bin", "env"))
    generated = [
        TarEntry("tmp", "dir", 0o1777),
        TarEntry("root", "dir", 0o700),
        TarEntry("etc/passwd", "file", _FILE_MODE, data=_passwd(config.user, shell)),
        TarEntry("etc/group", "file", _FILE_MODE, data=_group(config.user)),
        TarEntry("etc/nsswitch.conf", "file", _FILE_MODE, data=_NSSWITCH),
    ]
    if isinstance(env, _Link) and not env.is_dir:
        generated.append(TarEntry("usr/bin/env", "symlink", _LINK_MODE, target=env.target))
    if config.user is not None:
        user = config.user
        home = user.home_dir.lstrip("/")
        generated.append(TarEntry(home, "dir", _DIR_MODE, uid=user.uid, gid=user.gid))
    for entry in generated:
        forest.place(entry)

    entries = sorted(forest.entries(), key=entry_sort_key)
    return Customisation(
        entries=tuple(entries),
        collisions=tuple(forest.collisions),
        skipped_outputs=tuple(forest.skipped),
        commands=forest.names_in(("bin",)),
        login_shell=shell,
    )


# --- ordering and checks -------------------------------------------------------


def _outputs_in_priority(graph: RuntimeGraph) -> list[str]:
    ordered: list[str] = []
    seen: set[str] = set()
    for name in sorted(graph.requested):
        for output in sorted(graph.requested[name], key=lambda p: (store_path_name(p), p)):
            _check_output_path(output)
            if output not in seen:
                seen.add(output)
                ordered.append(output)
    return ordered


def _check_output_path(output: str) -> None:
    parts = output.split("/")
    if parts[0] != "" or len(parts) < 2 or any(p in {"", ".", ".."} for p in parts[1:]):
        raise UnsafeStoreContent(output, "output is not a normalised absolute store path")
    if "\x00" in output:
        raise UnsafeStoreContent(output, "output path contains NUL")


def _place_home(forest: _Forest, user: User) -> None:
    home = user.home_dir
    path = home.lstrip("/")
    parts = path.split("/")
    reserved = (*_SYSTEM_DIRS, *_GENERATED_LEAVES)
    if path in reserved or any(path.startswith(f"{leaf}/") for leaf in _GENERATED_LEAVES):
        raise InvalidImageConfig("user.home", home, f"/{path} is made by the image itself")
    parent = forest.force_dir(parts[:-1], strict_home=home)
    existing = parent.children.get(parts[-1])
    if existing is not None:
        raise InvalidImageConfig(
            "user.home", home, f"the image already has {home} (from {_origin(existing)})"
        )


def _login_shell(forest: _Forest) -> str:
    for name in ("sh", "bash"):
        node = forest.lookup(("bin", name))
        if node is not None and _dir_like(node) is None:
            return f"/bin/{name}"
    return NOLOGIN


def _passwd(user: User | None, shell: str) -> bytes:
    lines = [f"root:x:0:0:root:/root:{shell}"]
    if user is not None:
        lines.append(f"{user.name}:x:{user.uid}:{user.gid}:{user.name}:{user.home_dir}:{shell}")
    return ("\n".join(lines) + "\n").encode()


def _group(user: User | None) -> bytes:
    lines = ["root:x:0:"]
    if user is not None and user.gid != 0:
        lines.append(f"{user.name}:x:{user.gid}:")
    return ("\n".join(lines) + "\n").encode()


# --- the forest tree -------------------------------------------------------------


@attrs.frozen
class _Link:
    """A symlink to a store location; ``disk`` is where that location is read."""

    target: str
    disk: Path
    is_dir: bool


@attrs.define
class _Dir:
    """A real directory in the layer; ``origin`` is the link it was unfolded from."""

    origin: str = GENERATED
    children: dict[str, _Node] = attrs.Factory(dict)


@attrs.frozen
class _Generated:
    entry: TarEntry


_Node = _Link | _Dir | _Generated


def _dir_like(node: _Node | None) -> _Dir | _Link | None:
    """``node`` when it is a directory (real, or a link to a store directory), else None."""
    if isinstance(node, _Dir) or (isinstance(node, _Link) and node.is_dir):
        return node
    return None


def _origin(node: _Node) -> str:
    if isinstance(node, _Link):
        return node.target
    if isinstance(node, _Dir):
        return node.origin
    return GENERATED


def _scan(disk: Path, target: str) -> list[tuple[str, bool]]:
    """``(name, is_dir)`` of a store directory's children, sorted, via lstat only."""
    try:
        before = os.lstat(disk)
        with os.scandir(disk) as children:
            listing = sorted(
                (child.name, child.is_dir(follow_symlinks=False)) for child in children
            )
        after = os.lstat(disk)
    except OSError as exc:
        raise _read_error(target, exc) from exc
    if directory_identity(before) != directory_identity(after):
        # An entry came or went while listing (Nix's GC deleting the output):
        # an error, never a forest with fewer links.
        raise FileChangedDuringPacking(target)
    return listing


def _read_error(target: str, exc: OSError) -> StorePathMissing | UnsafeStoreContent:
    if exc.errno in {errno.ENOENT, errno.ENOTDIR}:
        return StorePathMissing(target)
    return UnsafeStoreContent(target, f"cannot read it: {exc.strerror or exc}")


@attrs.define
class _Forest:
    root: _Dir = attrs.Factory(_Dir)
    collisions: list[Collision] = attrs.Factory(list)
    skipped: list[str] = attrs.Factory(list)

    def add_output(self, output: str, disk: Path) -> None:
        """Merge one output; one that is not a directory is only noted as skipped."""
        try:
            mode = disk.lstat().st_mode
        except OSError as exc:
            raise _read_error(output, exc) from exc
        if stat.S_ISDIR(mode):
            self._merge(self.root, "", disk, output)
        else:
            self.skipped.append(output)

    def _merge(self, node: _Dir, prefix: str, disk: Path, target: str) -> None:
        for name, is_dir in _scan(disk, target):
            path = f"{prefix}/{name}" if prefix else name
            incoming = _Link(f"{target}/{name}", disk / name, is_dir)
            existing = node.children.get(name)
            directory = _dir_like(existing)
            if existing is None:
                node.children[name] = incoming
            elif is_dir and directory is not None:
                merged = self._as_dir(node, name, directory)
                self._merge(merged, path, incoming.disk, incoming.target)
            else:
                self.collisions.append(Collision(path, _origin(existing), incoming.target))

    def _as_dir(self, parent: _Dir, name: str, node: _Dir | _Link) -> _Dir:
        """The real directory at ``parent/name``, unfolding a directory link into one."""
        if isinstance(node, _Dir):
            return node
        unfolded = _Dir(origin=node.target)
        for child, is_dir in _scan(node.disk, node.target):
            unfolded.children[child] = _Link(f"{node.target}/{child}", node.disk / child, is_dir)
        parent.children[name] = unfolded
        return unfolded

    def force_dir(self, parts: Iterable[str], *, strict_home: str | None = None) -> _Dir:
        """Make every component of ``parts`` a real directory; return the last.

        A non-directory in the way is replaced (and reported), or, for a home
        (``strict_home``), refused.
        """
        node = self.root
        done: list[str] = []
        for part in parts:
            done.append(part)
            child = node.children.get(part)
            directory = _dir_like(child)
            if directory is not None:
                node = self._as_dir(node, part, directory)
                continue
            if child is not None:
                path = "/".join(done)
                if strict_home is not None:
                    raise InvalidImageConfig(
                        "user.home", strict_home, f"/{path} is a file in the image"
                    )
                self.collisions.append(Collision(path, GENERATED, _origin(child)))
            fresh = _Dir()
            node.children[part] = fresh
            node = fresh
        return node

    def place(self, entry: TarEntry) -> None:
        """Put a generated entry at its path, replacing whatever the forest had there."""
        *parents, name = entry.path.split("/")
        parent = self.force_dir(parents)
        existing = parent.children.get(name)
        if existing is not None:
            self.collisions.append(Collision(entry.path, GENERATED, _origin(existing)))
        parent.children[name] = _Generated(entry)

    def lookup(self, parts: tuple[str, ...]) -> _Node | None:
        """The node at ``parts``, descending into linked store directories via lstat."""
        node: _Node = self.root
        for part in parts:
            if isinstance(node, _Dir):
                found = node.children.get(part)
                if found is None:
                    return None
                node = found
            elif isinstance(node, _Link) and node.is_dir:
                disk = node.disk / part
                try:
                    mode = disk.lstat().st_mode
                except FileNotFoundError:
                    return None
                except OSError as exc:
                    raise _read_error(f"{node.target}/{part}", exc) from exc
                node = _Link(f"{node.target}/{part}", disk, stat.S_ISDIR(mode))
            else:
                return None
        return node

    def names_in(self, parts: tuple[str, ...]) -> tuple[str, ...]:
        """The sorted names in the directory at ``parts`` (empty if it is none)."""
        node = self.lookup(parts)
        if isinstance(node, _Dir):
            return tuple(sorted(node.children))
        if isinstance(node, _Link) and node.is_dir:
            return tuple(name for name, _ in _scan(node.disk, node.target))
        return ()

    def entries(self) -> list[TarEntry]:
        out: list[TarEntry] = []
        stack: list[tuple[str, _Dir]] = [("", self.root)]
        while stack:
            prefix, directory = stack.pop()
            for name, node in directory.children.items():
                path = f"{prefix}/{name}" if prefix else name
                if isinstance(node, _Dir):
                    out.append(TarEntry(path, "dir", _DIR_MODE))
                    stack.append((path, node))
                elif isinstance(node, _Link):
                    out.append(TarEntry(path, "symlink", _LINK_MODE, target=node.target))
                else:
                    out.append(node.entry)
        return out
