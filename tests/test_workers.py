"""One bounded pool per build: helping futures, no pool inside a pool, a hard thread bound."""

from __future__ import annotations

import os
import threading
from concurrent.futures import CancelledError, ThreadPoolExecutor
from pathlib import Path

import attrs
import pytest
from partial_stores import UploaderOnly

from nixery_core.archive import ArchiveOptions, pack_store_paths
from nixery_core.builder import Builder
from nixery_core.names import Image
from nixery_core.protocols import BlobInfo, BlobWriter
from nixery_core.testing.runners import FakeFile, FakeNix, FakePackage, default_fake_packages
from nixery_core.testing.sources import FixedSource
from nixery_core.testing.storage import MemoryStore
from nixery_core.workers import WorkerPool

OURS = ("nixery-", "ThreadPoolExecutor")


def _ours() -> set[str]:
    """Live threads any nixery pool (or an unnamed pool) started."""
    return {t.name for t in threading.enumerate() if t.name.startswith(OURS)}


@pytest.fixture
def many_cpus(monkeypatch: pytest.MonkeyPatch) -> None:
    """The host claims 64 CPUs, whatever it has."""
    monkeypatch.setattr(os, "cpu_count", lambda: 64)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(64)))


# --- the pool ------------------------------------------------------------------------


def test_tasks_waiting_on_tasks_finish_on_one_thread() -> None:
    """A one-thread pool runs a task that submits and waits for ten more (it helps)."""
    with WorkerPool(1) as pool:

        def square(i: int) -> int:
            return i * i

        def parent() -> int:
            children = [pool.submit(square, i) for i in range(10)]
            return sum(child.result() for child in children)

        assert pool.submit(parent).result(timeout=10) == sum(i * i for i in range(10))


def test_a_helped_task_runs_once_and_keeps_its_exception() -> None:
    """A task run by its waiter is not run again by a worker; its error reaches the waiter."""
    calls: list[int] = []
    gate = threading.Event()
    with WorkerPool(1) as pool:
        blocker = pool.submit(gate.wait, 10)  # the only worker is busy

        def failing() -> None:
            calls.append(1)
            raise ValueError("boom")

        future = pool.submit(failing)
        with pytest.raises(ValueError, match="boom"):
            future.result(timeout=10)  # run here: the worker is still blocked
        gate.set()
        blocker.result(timeout=10)
    assert calls == [1]


def test_shutdown_cancels_what_has_not_started() -> None:
    """cancel_futures cancels every task no thread has started."""
    gate = threading.Event()
    pool = WorkerPool(1)
    running = pool.submit(gate.wait, 10)
    queued = pool.submit(lambda: 1)
    threading.Timer(0.2, gate.set).start()
    pool.shutdown(wait=True, cancel_futures=True)
    assert running.result() is True
    with pytest.raises(CancelledError):
        queued.result()


def test_wrapping_uses_the_callers_executor_and_leaves_it_open() -> None:
    """Tasks run on the wrapped executor's threads; shutting the pool down keeps it open."""
    with ThreadPoolExecutor(2, thread_name_prefix="callers") as theirs:
        pool = WorkerPool.wrapping(theirs, 2)
        name = pool.submit(lambda: threading.current_thread().name)
        # The waiter may run it itself if no worker has yet: either thread is fine.
        assert name.result(timeout=10).startswith(("callers", "MainThread"))
        pool.shutdown(wait=True)
        assert theirs.submit(lambda: 7).result(timeout=10) == 7


# --- builds --------------------------------------------------------------------------


@attrs.define
class ThreadWatch(UploaderOnly):
    """A store that notes the live pool threads every time a layer writes a chunk."""

    inner: MemoryStore = attrs.Factory(MemoryStore)
    peak: set[str] = attrs.Factory(set)
    most: int = 0

    def open_blob_writer(self, media_type: str) -> BlobWriter:
        return _WatchedWriter(self, self.inner.open_blob_writer(media_type))

    def note(self) -> None:
        live = _ours()
        self.peak |= live
        self.most = max(self.most, len(_packing(live)))


@attrs.define
class _WatchedWriter:
    watch: ThreadWatch
    inner: BlobWriter

    def write(self, data: bytes | memoryview) -> int:
        self.watch.note()
        return self.inner.write(data)

    def commit(self, digest: str) -> BlobInfo:
        return self.inner.commit(digest)

    def abort(self) -> None:
        self.inner.abort()

    def __enter__(self) -> _WatchedWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.inner.abort()


#: Fixed I/O threads, never per build or per CPU: the caches' own (a fragment
#: cache's writer; the bucket tier's fetchers and uploader) and the one that
#: talks to the chunked layers' worker processes (nixery_core.frame_processes).
CACHE_IO = (
    "nixery-fragment-writer",
    "nixery-fragment-fetch",
    "nixery-fragment-upload",
    "nixery-frames-io",
)


def _packing(names: set[str]) -> set[str]:
    """The threads doing a build's CPU work (everything but the caches' I/O threads)."""
    return {name for name in names if not name.startswith(CACHE_IO)}


def _big_packages() -> dict[str, FakePackage]:
    """The default set plus packages big enough for several compression blocks each."""
    packages = default_fake_packages()
    for index in range(6):
        data = os.urandom(1 << 16) * 40  # 2.5 MiB, compresses in many blocks
        packages[f"big{index}"] = FakePackage({"share/data": FakeFile(data)}, ("busybox",))
    return packages


@pytest.mark.parametrize(("max_workers", "bound"), [(None, 8), (3, 3), (2, 2)])
def test_a_build_never_runs_more_threads_than_configured(
    tmp_path: Path, many_cpus: None, max_workers: int | None, bound: int
) -> None:
    """With 64 CPUs reported, a build's packing threads stay within max_workers (default 8).

    The fragment cache's writer thread is the only other one it may start.
    """
    del many_cpus
    fake = FakeNix(tmp_path / "root", _big_packages())
    store = ThreadWatch()
    image = Image.from_packages([f"big{i}" for i in range(6)] + ["hello"])
    before = _ours()
    with Builder(
        runner=fake, uploader=store, store_root=fake.store_root, max_workers=max_workers,
        strategy=None,
    ) as builder:
        builder.build(image, FixedSource())
    started = store.peak - before
    assert started, "no pool thread ever packed a layer"
    assert all(name.startswith(("nixery-pack", *CACHE_IO)) for name in started), started
    assert len(started - _packing(started)) <= 1, started
    assert store.most <= bound


def test_one_worker_starts_no_thread_even_with_64_cpus(tmp_path: Path, many_cpus: None) -> None:
    """max_workers=1: layers, blocks and hashes all run on the calling thread."""
    del many_cpus
    fake = FakeNix(tmp_path / "root", _big_packages())
    store = ThreadWatch()
    before = _ours()
    with Builder(
        runner=fake, uploader=store, store_root=fake.store_root, max_workers=1
    ) as builder:
        builder.build(Image.from_packages(["big0", "big1"]), FixedSource())
    assert store.peak - before == set()


def test_a_layer_packed_alone_caps_its_threads(tmp_path: Path, many_cpus: None) -> None:
    """pack_store_paths without a pool opens at most 8 threads for itself, not 64."""
    del many_cpus
    fake = FakeNix(tmp_path / "root", _big_packages())
    with Builder(
        runner=fake, uploader=MemoryStore(), store_root=fake.store_root, max_workers=1
    ) as builder:
        builder.build(Image.from_packages(["big0"]), FixedSource())  # realises the paths
    paths = fake.closure("big0")
    seen: list[int] = []

    def write(data: bytes) -> None:
        seen.append(len(_ours()))

    pack_store_paths(paths, write, ArchiveOptions(), store_root=fake.store_root)
    assert seen
    assert max(seen) <= 8


def test_the_bytes_do_not_depend_on_the_pool(tmp_path: Path) -> None:
    """One worker, two, four, or a wrapped executor: the same manifest digest."""
    fake = FakeNix(tmp_path / "root", _big_packages())
    image = Image.from_packages(["big0", "big1", "hello"])
    digests = set()
    for workers in (1, 2, 4):
        with Builder(
            runner=fake, uploader=MemoryStore(), store_root=fake.store_root, max_workers=workers
        ) as builder:
            digests.add(builder.build(image, FixedSource()).manifest_digest)
    with ThreadPoolExecutor(3) as theirs, Builder(
        runner=fake, uploader=MemoryStore(), store_root=fake.store_root, executor=theirs,
        max_workers=3,
    ) as builder:
        digests.add(builder.build(image, FixedSource()).manifest_digest)
    assert len(digests) == 1
