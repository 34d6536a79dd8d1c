"""Buffers this process shares with its frame worker processes.

One job: hand out reusable buffers in memory that the workers of a
:class:`~nixery_core.frame_processes.FrameProcesses` pool map too, so that
a batch's bytes reach a worker as an offset and a length instead of
through its socket (one copy into the socket and one out of it saved for
every byte of a chunked layer, and the packing thread never waits on the
socket).

**Where they are used.**  A chunked layer packed with worker processes
reads the store's files into these buffers (:mod:`nixery_core.archive`'s
tar blocks) and copies big files' windows into them
(:mod:`nixery_core.chunked`); a frame whose bytes lie in one of them goes
to a worker as its place (:meth:`SharedBuffers.place`); any other frame
(headers of directories, a file across two blocks, and everything once the
buffers are all in use) still goes through the socket.  The bytes of a
layer do not depend on which way a frame travelled.

**Memory.**  One anonymous file (``memfd_create``) of :attr:`capacity`
bytes, carved into *slots* as they are first asked for (each its own
:class:`mmap.mmap` here; a worker maps the whole file once).  Slots live as
long as the pool and are reused, so their pages are faulted in once; the
pages stay in memory until the pool closes.

**Lifetime.**  A slot is handed out again only when nothing refers to it
but this object: every view of it (a chunk waiting in a batch, a task's
held frames until its worker answered, a block queued for hashing) counts
in its reference count, judged as :mod:`nixery_core.released` judges the
tar writer's blocks.  Where those counts are not exact
(:data:`~nixery_core.released.EXACT_COUNTS` false) a slot is never reused:
new ones are made until the file is full, then callers fall back to
buffers of their own.  A worker reads a slot only for a task the pool
still holds the frame views of, so no slot changes under a worker.
"""

from __future__ import annotations

import ctypes
import mmap
import os
import sys
import threading

from nixery_core.released import EXACT_COUNTS

__all__ = ["SharedBuffers", "shared_memory_usable"]

#: Slot sizes are rounded up to this (mmap offsets must be page multiples).
_GRAIN = mmap.ALLOCATIONGRANULARITY
#: References to a free slot seen from :meth:`SharedBuffers.take`'s loop:
#: the slot list, the loop's name and getrefcount's own argument.
_FREE_REFERENCES = 3


def shared_memory_usable() -> bool:
    """Whether anonymous shared files can be made here (Linux's ``memfd_create``)."""
    return hasattr(os, "memfd_create")


class SharedBuffers:
    """Reusable buffers in one file shared with the worker processes (see the module docstring).

    :meth:`take` hands out a writable :class:`mmap.mmap` slot (or ``None``
    when the file is full and every slot in use); :meth:`place` says where
    a view of a slot lies in the file, for a worker.
    """

    def __init__(self, capacity: int) -> None:
        self.capacity = -(-capacity // _GRAIN) * _GRAIN
        self.fd = os.memfd_create("nixery-frames", os.MFD_CLOEXEC)
        try:
            os.ftruncate(self.fd, self.capacity)
        except OSError:
            os.close(self.fd)
            raise
        self._lock = threading.Lock()
        self._slots: list[mmap.mmap] = []
        #: Each slot's offset in the file and the address of its first byte, by
        #: id (stable: the slots live as long as this object).
        self._where: dict[int, tuple[int, int]] = {}
        self._end = 0

    def take(self, size: int) -> mmap.mmap | None:
        """A slot of at least ``size`` bytes nothing else refers to; ``None`` if none is left
        (or the kernel will not map another).

        The smallest free slot that fits, unless it is twice the size or more
        (a chunking window's, asked for a tar block) and the file has room for
        a new one: then a new one, so the large slot stays for a large need.
        """
        length = -(-size // _GRAIN) * _GRAIN
        with self._lock:
            found: mmap.mmap | None = None
            if EXACT_COUNTS:
                for slot in self._slots:
                    fits = len(slot) >= size and (found is None or len(slot) < len(found))
                    if fits and sys.getrefcount(slot) == _FREE_REFERENCES:
                        found = slot
            room = self.fd >= 0 and self._end + length <= self.capacity
            if found is not None and (len(found) < 2 * length or not room):
                return found
            if not room:
                return None
            try:
                slot = mmap.mmap(self.fd, length, offset=self._end)
            except OSError:  # refused (address-space limit, too many mappings): none new
                return found
            marker = ctypes.c_char.from_buffer(slot)
            address = ctypes.addressof(marker)
            del marker  # a live export would pin the slot's count
            self._where[id(slot)] = (self._end, address)
            self._end += length
            self._slots.append(slot)
            return slot

    def place(self, view: memoryview, after: bytes | bytearray = b"") -> int:
        """The offset in the file of ``view``'s bytes then ``after``'s; -1 if they are not there.

        ``view`` must be a view of a slot (anything else is -1); ``after``,
        when given, must be the very bytes that follow it in the same slot
        (as a chunk's tar padding and the headers after it are, in a tar
        block).  Nothing is copied when they are: the whole range is sent by
        its place.
        """
        slot = view.obj
        where = self._where.get(id(slot))
        if where is None or not view or not isinstance(slot, mmap.mmap):
            return -1
        offset, base = where
        marker = ctypes.c_char.from_buffer(view)
        start = ctypes.addressof(marker) - base
        del marker
        if after:
            end = start + len(view)
            if end + len(after) > len(slot) or slot[end : end + len(after)] != after:
                return -1
        return offset + start

    def close(self) -> None:
        """Close the file (slots handed out stay usable here; workers keep their own mapping)."""
        with self._lock:
            if self.fd >= 0:
                os.close(self.fd)
                self.fd = -1

    def forget_after_fork(self) -> None:
        """In a forked child: never hand out a slot (the parent's workers read them).

        The lock is made anew first: another thread of the parent may have
        held it when the process forked, and no thread is left to let it go.
        """
        self._lock = threading.Lock()
        self._slots = []
        self._where = {}
        self._end = self.capacity
        self.close()
