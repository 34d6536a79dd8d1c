"""Has anything under a directory changed? Answered in O(1), by the kernel (inotify).

:class:`TreeWatch` puts an inotify watch on every directory of a tree
(``.git`` excluded) and answers :meth:`TreeWatch.changed` with one
non-blocking ``read`` of the event queue.  The kernel queues an event
synchronously, inside the system call that made the change, so a change
that finished before ``changed()`` is always seen: there is no watcher
thread and no window where an event is in flight.  Any event at all (a
file written, created, removed, renamed, its mode changed; a directory
added or removed; the queue overflowing) counts as a change; the caller
then hashes again and arms a new watch.

One inotify instance serves every watch of the process (the per-user
instance limit is small, 128 by default, and shared by every process of
the user); a directory watched by several trees is watched once.  After a
``fork`` the child starts a fresh instance and reports every inherited
watch as changed.

Where inotify is not available (not Linux, or the per-user watch limit is
reached) :meth:`TreeWatch.open` returns ``None``; callers fall back to
comparing a stat walk (:func:`stat_signature`), which costs O(files).
"""

from __future__ import annotations

import ctypes
import errno
import os
import struct
import threading
import weakref
from pathlib import Path

__all__ = ["TreeWatch", "stat_signature"]

_IN_MODIFY = 0x002
_IN_ATTRIB = 0x004
_IN_CLOSE_WRITE = 0x008
_IN_MOVED_FROM = 0x040
_IN_MOVED_TO = 0x080
_IN_CREATE = 0x100
_IN_DELETE = 0x200
_IN_DELETE_SELF = 0x400
_IN_MOVE_SELF = 0x800
_IN_Q_OVERFLOW = 0x4000
_IN_ONLYDIR = 0x01000000
_IN_DONT_FOLLOW = 0x02000000
_IN_NONBLOCK = os.O_NONBLOCK
_IN_CLOEXEC = os.O_CLOEXEC
_MASK = (
    _IN_MODIFY | _IN_ATTRIB | _IN_CLOSE_WRITE | _IN_MOVED_FROM | _IN_MOVED_TO | _IN_CREATE
    | _IN_DELETE | _IN_DELETE_SELF | _IN_MOVE_SELF | _IN_ONLYDIR | _IN_DONT_FOLLOW
)
_EVENT = struct.Struct("iIII")


def stat_signature(root: Path) -> tuple[tuple[object, ...], ...]:
    """What changes when any file under ``root`` (or ``root`` itself) changes: O(files)."""
    entries: list[tuple[object, ...]] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d != ".git")
        for name in sorted(filenames):
            info = os.lstat(os.path.join(dirpath, name))  # noqa: PTH118 - per-file hot path
            entries.append((dirpath, name, info.st_mode, info.st_size, info.st_mtime_ns,
                            info.st_ino, info.st_dev))
    if not entries:
        info = root.stat()
        entries.append((str(root), info.st_mode, info.st_size, info.st_mtime_ns, info.st_ino))
    return tuple(entries)


class _Inotify:
    """The process's one inotify instance: watch descriptors shared between trees."""

    def __init__(self) -> None:
        # Reentrant: a tree collected while this thread holds it releases under it.
        self.lock = threading.RLock()
        self._libc = ctypes.CDLL(None, use_errno=True)
        fd = self._libc.inotify_init1(_IN_NONBLOCK | _IN_CLOEXEC)
        if fd < 0:
            raise OSError(ctypes.get_errno(), "inotify_init1 failed")
        self.fd: int = fd
        self.pid = os.getpid()
        # watch descriptor -> the trees watching through it (weakly: a tree
        # nobody holds any more is forgotten, and its watches removed)
        self.trees: dict[int, weakref.WeakSet[TreeWatch]] = {}

    def add(self, path: bytes, tree: TreeWatch) -> int:
        wd = int(self._libc.inotify_add_watch(self.fd, path, _MASK))
        if wd < 0:
            raise OSError(ctypes.get_errno(), "inotify_add_watch failed", os.fsdecode(path))
        self.trees.setdefault(wd, weakref.WeakSet()).add(tree)
        return wd

    def release(self, wds: list[int]) -> None:
        """Remove the watch descriptors no tree uses any more."""
        for wd in wds:
            users = self.trees.get(wd)
            if users is not None and next(iter(users), None) is None:  # only dead trees left
                del self.trees[wd]
                self._libc.inotify_rm_watch(self.fd, wd)  # EINVAL when already gone: fine

    def drain(self) -> None:
        """Read every queued event and mark the trees they concern as changed."""
        while True:
            try:
                data = os.read(self.fd, 65536)
            except BlockingIOError:
                return
            offset = 0
            while offset < len(data):
                wd, mask, _cookie, length = _EVENT.unpack_from(data, offset)
                offset += _EVENT.size + length
                if mask & _IN_Q_OVERFLOW:
                    for users in self.trees.values():
                        for tree in users:
                            tree.dirty = True
                    continue
                for tree in self.trees.get(wd, ()):
                    tree.dirty = True

    def close(self) -> None:
        os.close(self.fd)


_shared: _Inotify | None = None
_shared_lock = threading.Lock()


def _instance() -> _Inotify:
    global _shared  # noqa: PLW0603 - one kernel instance per process, by design
    with _shared_lock:
        if _shared is None or _shared.pid != os.getpid():
            _shared = _Inotify()
        return _shared


def _after_fork_in_child() -> None:
    global _shared
    old, _shared = _shared, None
    if old is not None:
        for users in old.trees.values():
            for tree in users:
                tree.dirty = True
        old.close()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


class TreeWatch:
    """Every directory under ``root`` watched; :meth:`changed` after any change since.

    Make one with :meth:`open`; :meth:`close` (or garbage collection) removes
    its watches.
    """

    def __init__(self, root: Path, inotify: _Inotify) -> None:
        self.root = root
        self.dirty = False
        self._inotify = inotify
        self._wds: list[int] = []
        self._finalizer = weakref.finalize(self, _release, inotify, self._wds)

    @classmethod
    def open(cls, root: Path) -> TreeWatch | None:
        """Watch ``root`` (a directory); ``None`` when inotify cannot (then stat-walk instead)."""
        try:
            inotify = _instance()
        except (OSError, AttributeError):  # no inotify here (not Linux, no libc symbol)
            return None
        tree = cls(root, inotify)
        try:
            with inotify.lock:
                for dirpath, dirnames, _files in os.walk(root):
                    dirnames[:] = [d for d in dirnames if d != ".git"]
                    tree._wds.append(inotify.add(os.fsencode(dirpath), tree))
        except OSError as exc:
            tree.close()
            if exc.errno in (errno.ENOSPC, errno.ENOMEM, errno.EMFILE, errno.ENOSYS):
                return None  # out of watches: the caller stat-walks instead
            raise
        return tree

    def changed(self) -> bool:
        """Whether anything under the tree changed since :meth:`open` (sticky once true)."""
        if self.dirty:
            return True
        inotify = self._inotify
        if inotify.pid != os.getpid():
            return True
        with inotify.lock:
            inotify.drain()
        return self.dirty

    def close(self) -> None:
        """Remove this tree's watches (those no other tree shares)."""
        inotify = self._inotify
        with inotify.lock:
            for wd in self._wds:
                users = inotify.trees.get(wd)
                if users is not None:
                    users.discard(self)
        self._finalizer()


def _release(inotify: _Inotify, wds: list[int]) -> None:
    """At close or collection: drop the descriptors left without a tree."""
    if inotify.pid != os.getpid():
        return
    with inotify.lock:
        inotify.release(wds)
        wds.clear()
