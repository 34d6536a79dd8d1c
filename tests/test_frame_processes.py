"""Worker processes compressing chunked layers' frames (nixery_core.frame_processes)."""

from __future__ import annotations

import array
import concurrent.futures
import contextlib
import functools
import io
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from test_chunked_formats import FORMATS, make_store

from nixery_core import archive, frame_processes, shared_buffers
from nixery_core.archive import ArchiveOptions, pack_store_paths
from nixery_core.chunked import compress_packed, new_chunker
from nixery_core.compression import frames_compressor, resolve_compressor
from nixery_core.errors import FileChangedDuringPacking, LayerError
from nixery_core.fragments import FragmentCache
from nixery_core.frame_processes import FrameProcesses

_SETTINGS = ("zstd-chunked", 3, "zstd")


def _table(*frames: tuple[int, int, int, int]) -> bytes:
    return array.array("q", [field for frame in frames for field in frame]).tobytes()


def _layer(
    paths: list[str], root: Path, compression: str, threads: int,
    fragments: FragmentCache | None = None,
) -> bytes:
    """``paths`` packed as one layer in ``compression`` with ``threads``: its bytes."""
    out = io.BytesIO()
    pack_store_paths(
        paths,
        out.write,
        ArchiveOptions(compression=compression),  # type: ignore[arg-type]
        store_root=root,
        threads=threads,
        fragments=fragments,
    )
    return out.getvalue()


@pytest.fixture
def pool() -> Iterator[FrameProcesses]:
    processes = FrameProcesses(1)
    yield processes
    processes.close()


def test_a_batch_is_compressed_as_in_this_process(pool: FrameProcesses) -> None:
    """A worker's answer is what compress_packed gives here, for pieces sent unjoined."""
    chunk = bytes(range(256)) * 100
    table = _table((len(chunk), 3, len(chunk), -1), (0, 512, 0, -1), (len(chunk), 0, 0, 1))
    pieces = [chunk, b"pad", bytes(512), chunk[:1000], chunk[1000:]]
    here = compress_packed(
        b"".join(pieces),
        table,
        compress_frames=frames_compressor(resolve_compressor("zstd-chunked", 3)),
        chunker=new_chunker(),
        merge=False,
    )
    assert pool.submit(_SETTINGS, table, pieces).result(timeout=60) == here


def test_a_failure_in_a_worker_is_a_layer_error_with_its_traceback(pool: FrameProcesses) -> None:
    """A batch a worker cannot compress fails as LayerError chained to the worker's traceback."""
    future = pool.submit(_SETTINGS, _table((0, 100, 0, -1)), [b"only ten b"])
    with pytest.raises(LayerError, match="failed in a worker process") as caught:
        future.result(timeout=60)
    cause = str(caught.value.__cause__)
    assert cause.startswith("Traceback (most recent call last):")
    assert "compress_packed" in cause  # where in the worker it failed
    # The worker goes on serving.
    assert pool.submit(_SETTINGS, _table((0, 3, 0, -1)), [b"abc"]).result(timeout=60)[1]


def test_a_dead_worker_fails_its_batches_and_is_replaced(pool: FrameProcesses) -> None:
    """A worker killed mid-stream fails what it held with LayerError; the next batch works."""
    assert pool.submit(_SETTINGS, _table((0, 3, 0, -1)), [b"abc"]).result(timeout=60)
    (worker,) = pool._workers
    worker.process.send_signal(signal.SIGSTOP)  # so the next batch is surely in its hands
    held = pool.submit(_SETTINGS, _table((0, 3, 0, -1)), [b"abc"])
    worker.process.send_signal(signal.SIGKILL)
    worker.process.wait()
    with pytest.raises(LayerError, match="exited"):
        held.result(timeout=60)
    assert pool.submit(_SETTINGS, _table((0, 3, 0, -1)), [b"abc"]).result(timeout=60)[1]
    assert pool._workers[0] is not worker


def test_a_closed_pool_refuses_work() -> None:
    """After close, submit raises LayerError and the worker processes are gone."""
    pool = FrameProcesses(2)
    pool.submit(_SETTINGS, _table((0, 3, 0, -1)), [b"abc"]).result(timeout=60)
    processes = [worker.process for worker in pool._workers]
    pool.close()
    assert all(process.poll() is not None for process in processes)
    with pytest.raises(LayerError, match="shut down"):
        pool.submit(_SETTINGS, _table((0, 3, 0, -1)), [b"abc"])


@pytest.mark.parametrize("compression", FORMATS)
def test_threads_and_processes_write_the_same_bytes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, compression: str
) -> None:
    """Where no worker process can start, the pool's threads write the same layer."""
    paths = make_store(tmp_path)
    with_processes = _layer(paths, tmp_path, compression, 2)
    monkeypatch.setattr(frame_processes, "usable", lambda: False)
    assert _layer(paths, tmp_path, compression, 2) == with_processes


def test_a_script_without_a_main_guard_runs_once(tmp_path: Path) -> None:
    """Workers never import the caller's __main__: an unguarded script packing a layer runs once."""
    root = tmp_path / "root"
    make_store(root)
    log = tmp_path / "log"
    script = tmp_path / "unguarded.py"
    script.write_text(
        textwrap.dedent(
            f"""
            import io, os
            from pathlib import Path
            from nixery_core.archive import ArchiveOptions, pack_store_paths
            with open({str(log)!r}, "a") as f:
                f.write("ran\\n")
            paths = sorted("/nix/store/" + p for p in os.listdir({str(root / "nix" / "store")!r}))
            pack_store_paths(paths, io.BytesIO().write, ArchiveOptions(compression="estargz"),
                             store_root=Path({str(root)!r}), threads=2)
            """
        )
    )
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    subprocess.run([sys.executable, str(script)], check=True, env=env, timeout=120)
    assert log.read_text() == "ran\n"


def test_closing_with_batches_in_flight_fails_them_promptly() -> None:
    """close() with big batches still being compressed returns at once and fails them."""
    pool = FrameProcesses(1)
    big = os.urandom(1 << 20) * 8  # 8 MiB: the answer does not fit a default socket buffer
    futures = [
        pool.submit(("estargz", 3, "isal"), _table((0, len(big), 0, -1)), [big]) for _ in range(3)
    ]
    started = time.monotonic()
    pool.close()
    assert time.monotonic() - started < 4  # never the 5 s wait for a stuck worker
    for future in futures:
        if future.exception(timeout=10) is not None:
            assert isinstance(future.exception(), LayerError)


def test_a_worker_ends_without_resource_warnings(
    monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str]
) -> None:
    """A worker closed by its pool exits leaving nothing unclosed (dev mode warns of any)."""
    monkeypatch.setenv("PYTHONDEVMODE", "1")  # the workers inherit it: ResourceWarnings shown
    pool = FrameProcesses(1)
    try:
        assert pool.submit(_SETTINGS, _table((0, 3, 0, -1)), [b"abc"]).result(timeout=60)[1]
    finally:
        pool.close()
    assert "ResourceWarning" not in capfd.readouterr().err


def test_a_forked_child_does_not_keep_the_workers_alive(tmp_path: Path) -> None:
    """Closing the pool ends its workers even while a child forked after they started lives on."""
    script = tmp_path / "fork.py"
    script.write_text(
        textwrap.dedent(
            """
            import array, os, signal, time
            from nixery_core import frame_processes
            table = array.array("q", [0, 3, 0, -1]).tobytes()
            pool = frame_processes.shared(1)
            pool.submit(("zstd-chunked", 3, "zstd"), table, [b"abc"]).result(timeout=60)
            (worker,) = pool._workers
            child = os.fork()
            if child == 0:
                time.sleep(60)
                os._exit(0)
            frame_processes.shutdown()
            os.kill(child, signal.SIGKILL)
            os.waitpid(child, 0)
            print(worker.process.returncode)
            """
        )
    )
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    done = subprocess.run(
        [sys.executable, str(script)], check=True, env=env, timeout=120, capture_output=True
    )
    assert done.stdout.strip() == b"0"  # it exited on its own, not killed after a wait


def test_the_shared_pool_has_at_most_one_worker_per_cpu(tmp_path: Path) -> None:
    """Asking the shared pool for more workers than the process may use CPUs (``threads=64``)
    gives one per CPU, on first use and when a later layer asks for more."""
    script = tmp_path / "cap.py"
    script.write_text(
        textwrap.dedent(
            """
            import os
            from nixery_core import frame_processes
            for cpus in (os.sched_getaffinity(0), {min(os.sched_getaffinity(0))}):
                os.sched_setaffinity(0, cpus)
                first = frame_processes.shared(64).count
                frame_processes.shutdown()
                frame_processes.shared(1)
                grown = frame_processes.shared(64).count
                frame_processes.shutdown()
                print(len(cpus), first, grown)
            """
        )
    )
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    done = subprocess.run(
        [sys.executable, str(script)], check=True, env=env, timeout=60, capture_output=True
    )
    rows = [tuple(map(int, line.split())) for line in done.stdout.splitlines()]
    assert [cpus for cpus, _first, _grown in rows] == [len(os.sched_getaffinity(0)), 1]
    assert all(first == grown == cpus for cpus, first, grown in rows)


def test_a_full_wake_pipe_does_not_block_submit_or_close() -> None:
    """Waking the I/O thread never waits: with its wake pipe full, submit and close return."""
    pool = FrameProcesses(1)
    # A second open of the pipe's write end, non-blocking on its own, fills it.
    filler = os.open(f"/proc/self/fd/{pool._wake_w}", os.O_WRONLY | os.O_NONBLOCK)
    try:
        with contextlib.suppress(BlockingIOError):
            while True:
                os.write(filler, b"x" * 4096)
    finally:
        os.close(filler)
    done: list[bytes] = []

    def use() -> None:
        done.append(pool.submit(_SETTINGS, _table((0, 3, 0, -1)), [b"abc"]).result(60)[0])
        pool.close()

    thread = threading.Thread(target=use, daemon=True)
    thread.start()
    thread.join(timeout=30)
    blocked = thread.is_alive()
    if blocked:  # let it go, so the pool can close
        with contextlib.suppress(BlockingIOError):
            while os.read(pool._wake_r, 1 << 16):
                pass
        thread.join(timeout=60)
        pool.close()
    assert not blocked
    assert done
    assert pool.closed


def _placed(pool: FrameProcesses, pieces: list[bytes]) -> tuple[bytes, list[memoryview]]:
    """``pieces`` written back to back into one slot of the pool's shared memory: places, views."""
    buffers = pool.buffers
    assert buffers is not None
    slot = buffers.take(sum(len(piece) for piece in pieces))
    assert slot is not None
    views = []
    at = 0
    for piece in pieces:
        slot[at : at + len(piece)] = piece
        views.append(memoryview(slot)[at : at + len(piece)])
        at += len(piece)
    places = array.array("q", [buffers.place(view) for view in views]).tobytes()
    return places, views


@pytest.mark.skipif(not shared_buffers.shared_memory_usable(), reason="no memfd_create here")
def test_frames_in_shared_memory_are_compressed_as_frames_sent(pool: FrameProcesses) -> None:
    """Frames a worker reads in shared memory, beside frames in the socket, give what
    compress_packed gives for all of them in one buffer."""
    chunk = bytes(range(256)) * 100
    job = b"/nix/store/" + b"a" * 32 + bytes(5000)
    table = _table((len(chunk), 0, len(chunk), -1), (0, 512, 0, -1), (len(job), 7, 0, 1))
    places, views = _placed(pool, [chunk, job + b"padding"])
    here = compress_packed(
        chunk + bytes(512) + job + b"padding",
        table,
        compress_frames=frames_compressor(resolve_compressor("zstd-chunked", 3)),
        chunker=new_chunker(),
        merge=False,
    )
    where = array.array("q", places)
    where.insert(1, -1)  # the metadata frame goes in the socket
    future = pool.submit(_SETTINGS, table, [bytes(512)], where.tobytes(), views)
    assert future.result(timeout=60) == here


#: Prepended to the workers' start-up: the kernel refuses every mapping (as at an
#: address-space limit), so a worker cannot map the pool's shared memory.
_NO_MAPPING = """
import mmap
def _refused(*args, **kwargs):
    raise OSError(12, "Cannot allocate memory (test)")
mmap.mmap = _refused
"""


@pytest.mark.skipif(not shared_buffers.shared_memory_usable(), reason="no memfd_create here")
def test_a_worker_that_cannot_map_the_shared_memory_reads_its_frames_from_the_file(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A worker the kernel will not let map the shared memory still answers, reading frames
    placed there (whole or in pieces) from the shared file: what compress_packed gives here."""
    monkeypatch.setattr(frame_processes, "_BOOTSTRAP", _NO_MAPPING + frame_processes._BOOTSTRAP)
    chunk = bytes(range(256)) * 100
    job = b"/nix/store/" + b"a" * 32 + bytes(5000)
    table = _table((len(chunk), 0, len(chunk), -1), (0, 512, 0, -1), (len(job), 7, 0, 1))
    here = compress_packed(
        chunk + bytes(512) + job + b"padding",
        table,
        compress_frames=frames_compressor(resolve_compressor("zstd-chunked", 3)),
        chunker=new_chunker(),
        merge=False,
    )
    pool = FrameProcesses(1)
    try:
        places, views = _placed(pool, [chunk, job[:100], job[100:] + b"padding"])
        whole, first, second = array.array("q", places)
        where = array.array("q", [whole, -1, -2, 2, first, 100, second, len(job) - 93])
        future = pool.submit(_SETTINGS, table, [bytes(512)], where.tobytes(), views)
        assert future.result(timeout=60) == here
        outside = array.array("q", [10 * pool.buffers.capacity if pool.buffers else 0])
        with pytest.raises(LayerError, match="outside the shared memory"):
            pool.submit(_SETTINGS, _table((10, 0, 10, -1)), [], outside.tobytes()).result(60)
    finally:
        pool.close()


@pytest.mark.skipif(not shared_buffers.shared_memory_usable(), reason="no memfd_create here")
def test_a_slot_in_a_workers_hands_is_not_reused_until_its_worker_is_gone(
    pool: FrameProcesses,
) -> None:
    """A slot a held task reads is not handed out again; once its worker is killed (the task
    failing with LayerError) it is, and the next batch in shared memory is right."""
    assert pool.submit(_SETTINGS, _table((0, 3, 0, -1)), [b"abc"]).result(timeout=60)
    buffers = pool.buffers
    assert buffers is not None
    (worker,) = pool._workers
    worker.process.send_signal(signal.SIGSTOP)  # so the batch is surely in its hands
    places, views = _placed(pool, [b"held bytes"])
    held = pool.submit(_SETTINGS, _table((10, 0, 10, -1)), [], places, views)
    del views
    other = buffers.take(10)
    assert other is not None
    assert buffers.place(memoryview(other)[0:1]) != array.array("q", places)[0]
    del other
    worker.process.send_signal(signal.SIGKILL)
    worker.process.wait()
    with pytest.raises(LayerError, match="exited"):
        held.result(timeout=60)
    del held
    places_again, views = _placed(pool, [b"fresh data"])
    assert places_again == places  # the first slot, free again
    answer = pool.submit(_SETTINGS, _table((10, 0, 10, -1)), [], places_again, views)
    expected = compress_packed(
        b"fresh data",
        _table((10, 0, 10, -1)),
        compress_frames=frames_compressor(resolve_compressor("zstd-chunked", 3)),
        chunker=new_chunker(),
        merge=False,
    )
    assert answer.result(timeout=60) == expected


def test_a_frame_placed_outside_the_shared_memory_is_a_layer_error() -> None:
    """A place past the end of the shared memory, or more or fewer places than frames,
    raise LayerError."""
    compress = frames_compressor(resolve_compressor("zstd-chunked", 3))
    shared = memoryview(bytearray(100))
    table = _table((10, 0, 10, -1))
    with pytest.raises(LayerError, match="outside the shared memory"):
        compress_packed(
            b"", table, compress_frames=compress, chunker=new_chunker(), merge=False,
            places=array.array("q", [95]).tobytes(), shared=shared,
        )
    for places, two in (([0, 0], False), ([0], True)):
        with pytest.raises(LayerError, match="places than frames"):
            compress_packed(
                b"", _table((10, 0, 10, -1), (10, 0, 10, -1)) if two else table,
                compress_frames=compress, chunker=new_chunker(), merge=False,
                places=array.array("q", places).tobytes(), shared=shared,
            )


def _counting_pack(
    monkeypatch: pytest.MonkeyPatch, root: Path, paths: list[str], compression: str
) -> tuple[Callable[[int], bytes], list[int]]:
    """A packer of ``paths`` as one layer (given a thread count) and the list it fills with
    the bytes each submitted batch has in shared memory."""
    placed: list[int] = []
    submit = FrameProcesses.submit

    def counting(
        self: FrameProcesses, settings: Any, table: bytes, *rest: Any, **named: Any
    ) -> Any:
        placed.append(sum(len(view) for view in (rest[2] if len(rest) > 2 else ())))
        return submit(self, settings, table, *rest, **named)

    monkeypatch.setattr(FrameProcesses, "submit", counting)
    return functools.partial(_layer, paths, root, compression), placed


@pytest.mark.parametrize("compression", FORMATS)
def test_layers_through_shared_memory_are_the_bytes_of_one_thread(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, compression: str
) -> None:
    """A layer whose frames reach the workers in shared memory (most of its bytes) is
    byte-identical to the same layer packed on one thread and to one sent in sockets only."""
    pack, placed = _counting_pack(monkeypatch, tmp_path, make_store(tmp_path), compression)
    frame_processes.shutdown()  # a pool of this test's own, made with shared memory
    shared = pack(2)
    if shared_buffers.shared_memory_usable():
        assert sum(placed) > 8_000_000  # its files (8.5 MB) went by place
    assert shared == pack(1)
    frame_processes.shutdown()
    monkeypatch.setattr(frame_processes, "shared_memory_usable", lambda: False)
    placed.clear()
    assert pack(2) == shared
    assert sum(placed) == 0
    frame_processes.shutdown()


@pytest.mark.skipif(not shared_buffers.shared_memory_usable(), reason="no memfd_create here")
@pytest.mark.parametrize("compression", FORMATS)
def test_a_layer_packed_while_the_shared_memory_runs_out_is_the_bytes_of_one_thread(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, compression: str
) -> None:
    """With shared memory for three tar blocks and no chunking window, frames go by place
    while a slot is free and through the socket otherwise, in one layer: the same bytes as
    one thread."""
    pack, placed = _counting_pack(monkeypatch, tmp_path, make_store(tmp_path), compression)
    monkeypatch.setattr(frame_processes, "_SHARED_PER_WORKER", 3 << 19)  # 1.5 MiB each
    frame_processes.shutdown()  # a pool of this test's own, with that little shared memory
    try:
        shared = pack(2)
        buffers = frame_processes.shared(2).buffers
        assert buffers is not None
        held = [buffers.take(1) for _ in range(3)]  # the three 1 MiB blocks it was carved in
        assert None not in held
        assert buffers.take(1) is None  # and no room for another
        del held
    finally:
        frame_processes.shutdown()
    assert 0 < sum(placed) < 8_000_000  # some of its files (8.5 MB) by place, not all
    assert shared == pack(1)


@pytest.mark.skipif(not shared_buffers.shared_memory_usable(), reason="no memfd_create here")
@pytest.mark.parametrize("compression", FORMATS)
def test_a_layer_packed_by_workers_that_cannot_map_the_shared_memory_is_the_bytes_of_one_thread(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, compression: str
) -> None:
    """Workers the kernel will not let map the shared memory pack a chunked layer whose files
    were placed there (no LayerError): the same bytes as one thread."""
    pack, placed = _counting_pack(monkeypatch, tmp_path, make_store(tmp_path), compression)
    monkeypatch.setattr(frame_processes, "_BOOTSTRAP", _NO_MAPPING + frame_processes._BOOTSTRAP)
    frame_processes.shutdown()  # a pool of this test's own, its workers unable to map
    try:
        unmapped = pack(2)
    finally:
        frame_processes.shutdown()
    assert sum(placed) > 8_000_000  # its files (8.5 MB) were placed in shared memory
    assert unmapped == pack(1)


class _OldestHeld:
    """Worker processes, faked in this process, that answer every batch at once but the
    first, which they answer only once ``release_after`` more batches came (or after
    ``timeout`` seconds, so that a packer waiting for it still ends)."""

    buffers = None

    def __init__(self, release_after: int, timeout: float) -> None:
        self.release_after = release_after
        self.submitted = 0
        self.released_by_count = False
        self._held: tuple[Any, Any] | None = None
        self._timer = threading.Timer(timeout, self._release)
        self._lock = threading.Lock()

    def submit(
        self,
        settings: Any,
        table: bytes,
        payload: Any,
        places: bytes = b"",
        hold: Any = (),
        *,
        checksum: bool = False,
    ) -> Any:
        compression, level, backend = settings
        result = compress_packed(
            b"".join(payload),
            table,
            compress_frames=frames_compressor(resolve_compressor(compression, level, backend)),
            chunker=new_chunker(),
            merge=compression == "estargz",
            places=places,
            checksum=checksum,
        )
        future: Any = concurrent.futures.Future()
        with self._lock:
            self.submitted += 1
            if self.submitted == 1:
                self._held = (future, result)
                self._timer.start()
                return future
        future.set_result(result)
        if self.submitted == 1 + self.release_after:
            self.released_by_count = self._release()
        return future

    def _release(self) -> bool:
        """Answer the first batch; whether it was still waiting."""
        with self._lock:
            held, self._held = self._held, None
        if held is not None:
            held[0].set_result(held[1])
        return held is not None

    def close(self) -> None:
        self._timer.cancel()


@pytest.mark.parametrize("compression", FORMATS)
def test_batches_go_on_to_the_workers_while_the_oldest_is_still_compressed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, compression: str
) -> None:
    """While the oldest batch is still in a worker, batches behind it that the workers
    answered leave room for more (the packer waited for the oldest, leaving the other
    workers idle), and the layer is the bytes of one thread."""
    store = tmp_path / "nix" / "store" / ("p" * 32 + "-files")
    store.mkdir(parents=True)
    for number in range(20):  # 20 batches' worth (1 MiB each), past 2 threads' 8 MiB in flight
        (store / f"f{number:02}").write_bytes(os.urandom(1 << 20))
    paths = ["/nix/store/" + store.name]
    fake = _OldestHeld(release_after=12, timeout=10)
    monkeypatch.setattr(frame_processes, "shared", lambda count: fake)

    try:
        two = _layer(paths, tmp_path, compression, 2)
    finally:
        fake.close()
    assert fake.released_by_count  # 12 batches went on behind the oldest
    assert two == _layer(paths, tmp_path, compression, 1)


@pytest.mark.skipif(not shared_buffers.shared_memory_usable(), reason="no memfd_create here")
@pytest.mark.parametrize("compression", FORMATS)
def test_kept_exceptions_of_failed_packs_hold_no_shared_memory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, compression: str
) -> None:
    """Exceptions of failed chunked packs, kept by the caller, hold none of the shared memory:
    with room for three tar blocks, after three kept failures every block is free and the
    next pack sends frames by place (each kept exception pinned a slot, so none was left)."""
    pack, placed = _counting_pack(monkeypatch, tmp_path, make_store(tmp_path), compression)
    monkeypatch.setattr(frame_processes, "_SHARED_PER_WORKER", 3 << 19)  # 1.5 MiB each
    checked = archive._check_unchanged

    def changed(fd: int, before: os.stat_result, member: bytes) -> None:
        raise FileChangedDuringPacking(member.decode())

    frame_processes.shutdown()  # a pool of this test's own, with that little shared memory
    try:
        monkeypatch.setattr(archive, "_check_unchanged", changed)
        kept = []
        for _ in range(3):
            with pytest.raises(FileChangedDuringPacking) as raised:
                pack(2)
            kept.append(raised.value)
        buffers = frame_processes.shared(2).buffers
        assert buffers is not None
        held = [buffers.take(1) for _ in range(3)]  # the file's three 1 MiB blocks
        assert None not in held
        del held
        monkeypatch.setattr(archive, "_check_unchanged", checked)
        placed.clear()
        pack(2)
    finally:
        frame_processes.shutdown()
    assert sum(placed) > 0
    assert len(kept) == 3


@pytest.mark.parametrize("compression", ["gzip", *FORMATS])
def test_a_pack_leaves_no_thread_behind_for_the_next(tmp_path: Path, compression: str) -> None:
    """Once a pack returns (one layer, two in threads, one cold into a fragment cache that is
    then closed), no thread it started is still running, so a long-lived process's next pack
    shares the cores with nothing of it (the frame workers' I/O thread lives with the pool)."""
    paths = make_store(tmp_path)

    def pack(group: list[str], fragments: FragmentCache | None = None) -> int:
        return len(_layer(group, tmp_path, compression, 2, fragments))

    pack(paths)  # the frame workers and their I/O thread start once per process
    before = set(threading.enumerate())
    pack(paths)
    assert set(threading.enumerate()) <= before
    with concurrent.futures.ThreadPoolExecutor(2) as layers:
        assert all(layers.map(pack, [paths[::2], paths[1::2]]))
    assert set(threading.enumerate()) <= before
    cache = FragmentCache(tmp_path / "fragments")
    pack(paths, cache)
    cache.close()
    assert set(threading.enumerate()) <= before
    assert FragmentCache(tmp_path / "fragments").keys()  # the cache did record the paths
