"""Reading a layer's reused fragments from a remote store ahead of its pack.

A fragment kept as a byte range of a layer blob
(:class:`~nixery_core.fragments.StoreFragments`) is read back from the
store that holds the blob.  On a store with local blob files that is a
read of a file; on a remote one (a bucket:
:class:`~nixery_core.protocols.SupportsRangeReads`) it is a ranged request,
and a layer assembled from a few hundred such fragments, read one after the
other as the pack needs them, would wait a round trip for each.
:class:`RangeReads` is told, before the pack starts, every range the pack
will reuse (in the order it needs them) and reads them ahead:

* ranges of one blob that touch, or lie at most :data:`MAX_GAP` bytes
  apart, are read in one request of at most :data:`MAX_REQUEST` bytes (a
  regroup often takes neighbouring store paths of one earlier layer; the
  bytes of a gap are read and dropped); a fragment larger than that is not
  read ahead but streamed as the pack reads it, so no fragment is ever
  held whole;
* requests run ``threads`` at a time, different blobs concurrently, in the
  order the pack needs their first fragment;
* at most ``window`` bytes are read ahead of the pack (a request is let go
  once every fragment it holds has been taken), so memory stays bounded
  however large the layer.

It only reads: every range taken is checked by the fragment cache against
its recorded length and CRC-32 before any byte is used, and a failed
request fails the lookups of the fragments it held (each then a miss, as
for a single read: :class:`~nixery_core.errors.StorageUnavailable` keeps
the cache's row, anything else drops it).
"""

from __future__ import annotations

import bisect
import threading
from collections.abc import Iterable, Mapping
from concurrent.futures import CancelledError, Future, ThreadPoolExecutor
from typing import TypeGuard

import attrs

from nixery_core.protocols import SupportsBlobFiles, SupportsRangeReads

__all__ = [
    "DEFAULT_THREADS",
    "DEFAULT_WINDOW",
    "MAX_GAP",
    "MAX_REQUEST",
    "KeptRange",
    "RangeReads",
    "reads_ranges_remotely",
]

#: Range requests of one layer in flight at once.
DEFAULT_THREADS = 4
#: Bytes read ahead of the pack, at most (one request more when it is larger).
DEFAULT_WINDOW = 64 << 20
#: Bytes one request reads, at most.  A larger fragment is not read ahead: it streams,
#: this many bytes a request, as the pack reads it (:func:`~nixery_core.fragments.open_range`).
MAX_REQUEST = 16 << 20
#: Ranges of one blob this close are read in one request (the gap's bytes are dropped).
MAX_GAP = 256 << 10


def reads_ranges_remotely(store: object) -> TypeGuard[SupportsRangeReads]:
    """Whether ``store`` reads a blob's range by a request (a bucket), not from a local
    file (:class:`~nixery_core.protocols.SupportsBlobFiles`): there ranges are read ahead
    and a large one streams a request at a time."""
    return isinstance(store, SupportsRangeReads) and not isinstance(store, SupportsBlobFiles)


@attrs.frozen
class KeptRange:
    """A fragment kept as ``size`` bytes of the blob ``blob`` from ``offset``."""

    key: str
    blob: str
    offset: int
    size: int


@attrs.define(eq=False)
class _Request:
    """One ranged read: bytes ``start`` to ``end`` of ``blob``, holding ``ranges``."""

    blob: str
    start: int
    end: int
    ranges: list[KeptRange]
    #: Fragments of it not taken yet; its bytes are let go at zero.
    left: int = 0
    future: Future[bytes] | None = None
    done: bool = False


def _ranges(ranges: Iterable[KeptRange]) -> tuple[KeptRange, ...]:
    return tuple(ranges)


@attrs.define
class RangeReads:
    """The ranges one pack reuses, read ahead from ``store`` (see the module docstring)."""

    store: SupportsRangeReads
    ranges: tuple[KeptRange, ...] = attrs.field(converter=_ranges)
    threads: int = DEFAULT_THREADS
    window: int = DEFAULT_WINDOW
    max_request: int = MAX_REQUEST
    max_gap: int = MAX_GAP
    #: Each range's position in the pack, by key (the scale :meth:`add` is told positions
    #: in; a range missing from it, or all without it: its index in ``ranges``).
    positions: Mapping[str, int] | None = attrs.field(default=None, kw_only=True)
    #: Requests sent to the store (for tests and benchmarks).
    requests: int = attrs.field(init=False, default=0)
    _plan: list[_Request] = attrs.field(init=False, factory=list)
    _of: dict[str, tuple[_Request, KeptRange]] = attrs.field(init=False, factory=dict)
    _next: int = attrs.field(init=False, default=0)
    _held: int = attrs.field(init=False, default=0)
    #: Requests sent whose fragments are not all taken yet.
    _live: int = attrs.field(init=False, default=0)
    _pool: ThreadPoolExecutor | None = attrs.field(init=False, default=None)
    _lock: threading.Lock = attrs.field(init=False, factory=threading.Lock)
    #: Position in the pack of each request's first fragment (by id), in ``_plan``'s order.
    _first: dict[int, int] = attrs.field(init=False, factory=dict)
    #: The last request planned for each blob (a range learnt late may extend it).
    _tail: dict[str, _Request] = attrs.field(init=False, factory=dict)
    #: Closed (:meth:`close`): nothing more is read ahead; a range is read when taken.
    _closed: bool = attrs.field(init=False, default=False)

    def __attrs_post_init__(self) -> None:
        first = self._first
        by_blob: dict[str, list[tuple[int, int, KeptRange]]] = {}
        seen: set[str] = set()
        positions = self.positions or {}
        for index, kept in enumerate(self.ranges):
            if kept.key in seen or not 0 < kept.size <= self.max_request or kept.offset < 0:
                continue  # a larger range streams as the pack reads it (fragments.open_range)
            seen.add(kept.key)
            position = positions.get(kept.key, index)
            by_blob.setdefault(kept.blob, []).append((kept.offset, position, kept))
        for blob, items in by_blob.items():
            items.sort(key=lambda item: (item[0], item[1]))
            current: _Request | None = None
            for offset, position, kept in items:
                end = offset + kept.size
                if (
                    current is not None
                    and current.end <= offset <= current.end + self.max_gap
                    and end - current.start <= self.max_request
                ):
                    current.end = end
                else:
                    current = _Request(blob, offset, end, [])
                    self._plan.append(current)
                    first[id(current)] = position
                current.ranges.append(kept)
                current.left += 1
                first[id(current)] = min(first[id(current)], position)
                self._of[kept.key] = (current, kept)
            if current is not None:
                self._tail[blob] = current
        self._plan.sort(key=lambda request: first[id(request)])

    def add(self, kept: KeptRange, position: int) -> None:
        """A range learnt after planning (a reference found in a bucket), needed at
        ``position`` in the pack's order (the scale of :attr:`positions`).  It joins the
        last request planned for its blob when that is not sent yet and they touch (on
        either side; the request moves up if it is needed earlier now); it is sent with the
        others when the pack next takes a fragment (read ahead from there), so ranges
        learnt meanwhile can still join it."""
        if not 0 < kept.size <= self.max_request or kept.offset < 0:
            return
        with self._lock:
            if kept.key in self._of or self._closed:
                return
            tail = self._tail.get(kept.blob)
            end = kept.offset + kept.size
            if tail is not None and tail.future is None and not tail.done:
                after = tail.end <= kept.offset <= tail.end + self.max_gap
                before = kept.offset < tail.start and tail.start - self.max_gap <= end \
                    <= tail.start
                if (after and end - tail.start <= self.max_request) or (
                    before and tail.end - kept.offset <= self.max_request
                ):
                    tail.start, tail.end = min(tail.start, kept.offset), max(tail.end, end)
                    tail.ranges.append(kept)
                    tail.left += 1
                    self._of[kept.key] = (tail, kept)
                    if position < self._first[id(tail)]:  # needed earlier: moved up
                        self._plan.remove(tail)
                        self._first[id(tail)] = position
                        self._queue(tail)
                    return
            request = _Request(kept.blob, kept.offset, end, [kept], left=1)
            self._of[kept.key] = (request, kept)
            self._tail[kept.blob] = request
            self._first[id(request)] = position
            self._queue(request)

    def _queue(self, request: _Request) -> None:
        """Put ``request`` among the requests not sent yet, by the position of their first
        fragment (lock held)."""
        at = bisect.bisect_right(
            self._plan, self._first[id(request)], lo=self._next,
            key=lambda r: self._first[id(r)],
        )
        self._plan.insert(at, request)

    def __contains__(self, key: object) -> bool:
        return key in self._of

    def take(self, key: str, blob: str, offset: int, size: int) -> bytes:
        """The bytes of the range kept under ``key`` (waiting for its request).

        A range other than the one planned (the cache's row changed since),
        one taken before, or one taken after :meth:`close` is read on its
        own.  Raises what the store raised
        (:class:`~nixery_core.errors.NixeryError`).
        """
        with self._lock:
            planned = self._of.get(key)
            if planned is None or planned[1] != KeptRange(key, blob, offset, size) \
                    or planned[0].done or self._closed:
                request = None
            else:
                request, kept = planned
                self._send(request)
                self._ahead()
                future = request.future  # here: a close() after the lock lets go of it
        if request is None:
            return self._read(blob, offset, size)
        if future is None:  # pragma: no cover - sent above, let go only when done
            raise RuntimeError("a range request was let go before its fragments were taken")
        try:
            data = future.result()
        except CancelledError:  # closed meanwhile, before its request ran: read on its own
            return self._read(blob, offset, size)
        finally:
            with self._lock:
                request.left -= 1
                if request.left == 0 and not request.done:
                    self._let_go(request)
        start = kept.offset - request.start
        if start == 0 and len(data) == kept.size:
            return data
        return data[start : start + kept.size]

    def _read(self, blob: str, offset: int, size: int) -> bytes:
        """A range read on its own, now."""
        with self._lock:
            self.requests += 1
        return self.store.read_range(blob, offset, size)

    def close(self) -> None:
        """Stop reading ahead and let go of the bytes read ahead: requests not started are
        cancelled, those running finish (their bytes dropped), and a range taken after is
        read on its own.  Call it when the pack ends, however it ends."""
        with self._lock:
            self._closed = True
            self._next = len(self._plan)
            pool, self._pool = self._pool, None
            for request in self._plan:
                if not request.done:
                    request.done, request.future = True, None
            self._held = self._live = 0
        if pool is not None:
            pool.shutdown(wait=False, cancel_futures=True)

    def _send(self, request: _Request) -> None:
        """Send ``request`` unless sent (called with the lock held)."""
        if request.future is not None or request.done:
            return
        if self._pool is None:
            self._pool = ThreadPoolExecutor(self.threads, thread_name_prefix="nixery-range-read")
        self.requests += 1
        request.future = self._pool.submit(
            self.store.read_range, request.blob, request.start, request.end - request.start
        )
        self._held += request.end - request.start
        self._live += 1

    def _ahead(self) -> None:
        """Send the next requests in pack order while under the window (lock held)."""
        while self._next < len(self._plan):
            request = self._plan[self._next]
            if request.future is None and not request.done:
                if self._held and self._held + request.end - request.start > self.window:
                    return
                self._send(request)
            self._next += 1

    def _let_go(self, request: _Request) -> None:
        """Every fragment of ``request`` taken: drop its bytes, read further (lock held)."""
        request.done = True
        request.future = None
        self._held -= request.end - request.start
        self._live -= 1
        self._ahead()
        if self._live == 0 and self._next >= len(self._plan) and self._pool is not None:
            # Nothing more to read: the pool's threads end now, not when it is collected.
            self._pool.shutdown(wait=False)
            self._pool = None
