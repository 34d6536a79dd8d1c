"""Reading a layer's reused ranges ahead: coalesced, concurrent, bounded, failures per fragment."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import attrs
import pytest

from nixery_core.errors import BlobNotFound, StorageUnavailable
from nixery_core.fragment_reads import KeptRange, RangeReads
from nixery_core.fragments import FragmentCache, StoreFragments
from nixery_core.testing.storage import MemoryStore

MEDIA = "application/octet-stream"


def _blob(store: MemoryStore, size: int) -> tuple[str, bytes]:
    data = os.urandom(size)
    return store.put_blob(data, MEDIA).digest, data


def _split(key: str, digest: str, sizes: list[int], start: int = 0) -> list[KeptRange]:
    """Ranges of ``digest`` of ``sizes`` bytes one after the other from ``start``."""
    ranges, offset = [], start
    for index, size in enumerate(sizes):
        ranges.append(KeptRange(f"{key}{index}", digest, offset, size))
        offset += size
    return ranges


def test_adjacent_ranges_of_one_blob_are_read_in_one_request() -> None:
    """Ranges of one blob that touch or lie a small gap apart cost one ranged read, and each
    fragment taken is exactly its bytes."""
    store = MemoryStore()
    digest, data = _blob(store, 10_000)
    ranges = [*_split("k", digest, [1000, 2000, 500]), KeptRange("gap", digest, 4000, 100)]
    reads = RangeReads(store, ranges)
    for kept in ranges:
        assert reads.take(kept.key, kept.blob, kept.offset, kept.size) == \
            data[kept.offset : kept.offset + kept.size]
    assert (reads.requests, store.range_reads) == (1, 1)


def test_far_apart_or_large_ranges_are_read_in_several_requests() -> None:
    """Ranges further apart than the gap, or past the request size together, are read apart."""
    store = MemoryStore()
    digest, data = _blob(store, 100_000)
    ranges = [KeptRange("a", digest, 0, 100), KeptRange("b", digest, 50_000, 100)]
    reads = RangeReads(store, ranges, max_gap=1000)
    for kept in ranges:
        assert reads.take(kept.key, kept.blob, kept.offset, kept.size) == \
            data[kept.offset : kept.offset + kept.size]
    assert reads.requests == 2
    small = RangeReads(store, _split("k", digest, [600, 600, 600]), max_request=1000)
    for kept in small.ranges:
        small.take(kept.key, kept.blob, kept.offset, kept.size)
    assert small.requests == 3


class _Meeting(MemoryStore):
    """A store whose ranged reads wait until two are in flight at once (or fail after 10 s)."""

    def __init__(self) -> None:
        super().__init__()
        self.meeting = threading.Barrier(2, timeout=10)

    def read_range(self, digest: str, offset: int, length: int) -> bytes:
        self.meeting.wait()
        return super().read_range(digest, offset, length)


def test_ranges_of_different_blobs_are_read_concurrently() -> None:
    """The first fragment's request and the next blob's are in flight together (the store
    answers neither until both are asked)."""
    store = _Meeting()
    first, first_data = _blob(store, 1000)
    second, second_data = _blob(store, 1000)
    reads = RangeReads(store, [KeptRange("a", first, 0, 1000), KeptRange("b", second, 0, 1000)])
    assert reads.take("a", first, 0, 1000) == first_data
    assert reads.take("b", second, 0, 1000) == second_data


class _Counting(MemoryStore):
    """A store recording the most bytes its ranged reads had asked for and not yet returned
    to a taker (approximated by reads started minus fragments taken)."""

    def __init__(self) -> None:
        super().__init__()
        self.asked = 0
        self.lock = threading.Lock()

    def read_range(self, digest: str, offset: int, length: int) -> bytes:
        with self.lock:
            self.asked += length
        return super().read_range(digest, offset, length)


def test_reading_ahead_stays_within_its_window() -> None:
    """However many ranges a layer reuses, at most ``window`` bytes are asked for beyond what
    the pack has taken (plus the request it waits for)."""
    store = _Counting()
    digests = [_blob(store, 1000)[0] for _ in range(20)]
    ranges = [KeptRange(f"k{i}", digest, 0, 1000) for i, digest in enumerate(digests)]
    reads = RangeReads(store, ranges, window=3000, threads=2)
    taken = 0
    for kept in ranges:
        reads.take(kept.key, kept.blob, kept.offset, kept.size)
        taken += kept.size
        assert store.asked - taken <= 3000
    assert reads.requests == 20


def test_a_failed_request_fails_each_fragment_it_held_with_the_store_error() -> None:
    """An absent blob fails its fragments with BlobNotFound, other blobs' fragments are read."""
    store = MemoryStore()
    digest, data = _blob(store, 2000)
    gone = "sha256:" + "0" * 64
    ranges = [*_split("gone", gone, [100, 100]), KeptRange("here", digest, 0, 2000)]
    reads = RangeReads(store, ranges)
    for kept in ranges[:2]:
        with pytest.raises(BlobNotFound):
            reads.take(kept.key, kept.blob, kept.offset, kept.size)
    assert reads.take("here", digest, 0, 2000) == data


class _Held(MemoryStore):
    """A store whose ranged reads of ``held`` wait until ``go`` is set (or 10 s pass)."""

    def __init__(self) -> None:
        super().__init__()
        self.held = ""
        self.go = threading.Event()

    def read_range(self, digest: str, offset: int, length: int) -> bytes:
        if digest == self.held:
            self.go.wait(10)
        return super().read_range(digest, offset, length)


def test_a_range_taken_after_close_is_read_on_its_own() -> None:
    """After close, a range whose request was cancelled unsent (or never sent) is read on its
    own with its exact bytes, never an untyped CancelledError."""
    store = _Held()
    blobs = [_blob(store, 1000) for _ in range(3)]
    store.held = blobs[1][0]
    ranges = [KeptRange(f"k{i}", digest, 0, 1000) for i, (digest, _) in enumerate(blobs)]
    reads = RangeReads(store, ranges, threads=1)
    try:
        assert reads.take("k0", blobs[0][0], 0, 1000) == blobs[0][1]
        reads.close()  # k2 waits behind k1 (held, or cancelled too): cancelled unsent
        assert reads.take("k2", blobs[2][0], 0, 1000) == blobs[2][1]
    finally:
        store.go.set()
    assert reads.take("k1", blobs[1][0], 0, 1000) == blobs[1][1]
    assert reads.requests == 5  # three sent ahead, then k2 and k1 on their own


def test_a_range_whose_reads_close_while_it_is_taken_is_read_on_its_own() -> None:
    """A close() landing just after take() planned its range (another thread ending the
    pack) lets the take read the range on its own with its exact bytes, not fail."""
    store = MemoryStore()
    digest, data = _blob(store, 1000)
    reads = RangeReads(store, [KeptRange("k", digest, 0, 1000)], threads=1)
    lock = threading.Lock()

    class ClosingAfterRelease:
        """The reads' lock; the first time take() lets it go, close() runs."""

        armed = True

        def __enter__(self) -> None:
            lock.acquire()

        def __exit__(self, *_: object) -> None:
            lock.release()
            if self.armed:
                self.armed = False
                reads.close()

    reads._lock = ClosingAfterRelease()  # type: ignore[assignment]  # a lock that closes
    assert reads.take("k", digest, 0, 1000) == data


class _Down(MemoryStore):
    def read_range(self, digest: str, offset: int, length: int) -> bytes:
        raise StorageUnavailable("store down (test)", digest)


def test_an_unplanned_or_changed_range_is_read_on_its_own() -> None:
    """A key not planned, or planned with another range (the cache's row changed), is read
    alone, with the store's error as it came."""
    store = MemoryStore()
    digest, data = _blob(store, 3000)
    reads = RangeReads(store, [KeptRange("a", digest, 0, 1000)])
    assert reads.take("a", digest, 1000, 500) == data[1000:1500]
    assert reads.take("other", digest, 2000, 10) == data[2000:2010]
    with pytest.raises(StorageUnavailable):
        RangeReads(_Down(), []).take("x", digest, 0, 10)


def test_a_range_learnt_late_joins_the_plan() -> None:
    """A range added after planning (a reference found in a bucket) next to the last planned
    range of its blob, not yet sent, is read in the same request."""
    store = MemoryStore()
    digest, data = _blob(store, 3000)
    reads = RangeReads(store, [KeptRange("a", digest, 0, 1000)])
    reads.add(KeptRange("b", digest, 1000, 1000), 1)
    reads.add(KeptRange("c", digest, 2000, 1000), 2)
    assert b"".join(reads.take(k, digest, o, 1000) for k, o in (("a", 0), ("b", 1000),
                                                                ("c", 2000))) == data
    assert reads.requests == 1


class _Ordered(MemoryStore):
    """A store recording the blobs its ranged reads ask for, in the order they come."""

    def __init__(self) -> None:
        super().__init__()
        self.asked: list[str] = []
        self.lock = threading.Lock()

    def read_range(self, digest: str, offset: int, length: int) -> bytes:
        with self.lock:
            self.asked.append(digest)
        return super().read_range(digest, offset, length)


def test_a_request_a_late_range_makes_needed_earlier_is_sent_earlier() -> None:
    """A range learnt late that joins a queued request and is needed before the requests
    queued ahead of it moves that request up: reads go in the order the pack needs them."""
    store = _Ordered()
    (x, _), (y, y_data), (z, _) = (_blob(store, 2000) for _ in range(3))
    planned = [KeptRange("x", x, 0, 100), KeptRange("x1", x, 1500, 100),
               KeptRange("z", z, 0, 100), KeptRange("y", y, 1000, 100)]
    reads = RangeReads(store, planned, threads=1)  # at positions 0 to 3, x and x1 in one
    reads.add(KeptRange("y0", y, 900, 100), 1)  # before z (position 2) in the pack
    reads.take("x", x, 0, 100)
    reads.take("x1", x, 1500, 100)
    assert reads.take("y0", y, 900, 100) == y_data[900:1000]
    reads.take("z", z, 0, 100)
    reads.take("y", y, 1000, 100)
    assert (store.asked, reads.requests) == ([x, y, z], 3)


def test_a_layers_ranges_are_planned_at_their_keys_positions_as_late_ones_are(
    tmp_path: Path,
) -> None:
    """A layer's kept ranges are planned at their keys' positions in the pack, the scale a
    reference found late is placed on: one needed between two planned ones is read between
    them (planned at their index among the ranges, it came after both)."""
    store = _Ordered()
    (x, _), (y, _), (z, _), (w, _) = (_blob(store, 2000) for _ in range(4))
    with FragmentCache(tmp_path / "fragments") as cache:
        for key, blob in (("a", x), ("c", y), ("d", z)):
            cache.keep_range(key, blob, offset=0, size=100, uncompressed_size=100, crc=0)
        cache.flush()
        planned = StoreFragments(cache, store).plan(["a", "b", "c", "d"])
        assert planned is not None
        reads = attrs.evolve(planned, threads=1)  # reads in the order they are sent
        reads.add(KeptRange("b", w, 0, 100), 1)  # a reference found in a bucket
        for key, blob in (("a", x), ("b", w), ("c", y), ("d", z)):
            reads.take(key, blob, 0, 100)
    assert (store.asked, reads.requests) == ([x, w, y, z], 4)
