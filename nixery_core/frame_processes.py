"""Worker processes that compress and hash batches of frames for chunked layers.

One job: run :func:`nixery_core.chunked.compress_packed` (cut whole files
into chunks, hash the chunks, compress every frame) in other processes, so
that compressing and hashing eStargz and zstd:chunked frames never waits
for Python's lock held by the thread cutting the tar.  With threads, the
frames' many short C calls each give the lock back and take it again; on a
2-core machine about a quarter of the workers' time went to waiting for
it, and two cores did the work of 1.5.

**Protocol.**  Each worker is a ``python`` started with
:func:`subprocess.Popen` (not :mod:`multiprocessing`: a script without an
``if __name__ == "__main__"`` guard, a notebook or an embedding program is
never imported again in the workers).  It talks over one Unix socket pair:
a task is a small pickled header (task number, compression settings, the
frame table, where frames lie in shared memory, whether to checksum) and
the bytes of the frames that do not; the answer is a pickled header (task
number, frame lengths, chunk digests, how whole files were cut, the
compressed bytes' CRC-32 or -1) and the compressed bytes, or an error
text.  A worker imports only the modules it needs (:mod:`nixery_core.chunked`
and what it imports), not the whole package.

**Shared memory.**  Where the platform has ``memfd_create``, the pool
owns :class:`~nixery_core.shared_buffers.SharedBuffers` (:attr:`FrameProcesses.buffers`)
that every worker maps at start: the tar writer reads files into them
and a frame found whole in one of them is sent as its offset, a file read
across blocks as its pieces' offsets (``places``: -1 for a frame sent in
the socket; see :func:`~nixery_core.chunked.compress_packed`).  The pool
keeps the views given as ``hold`` until the task is answered or failed
(its worker gone), so a slot is never reused while a worker may read it.

**Threads in the caller.**  :meth:`FrameProcesses.submit` never blocks:
the batch goes to the least busy worker's queue, and the calling thread
sends what the (non-blocking) socket takes at once, when no other thread
is sending to that worker; the socket buffer (4 MiB asked for, capped by
``net.core.wmem_max``) usually takes a whole batch.  One thread per pool,
``nixery-frames-io``, sends the rest when there is room and reads every
answer, completing each task's future.  The pieces of a batch are sent as
they are (``sendmsg``), never joined.  Any number of layers, in any number
of threads, can share one pool.

**Where it is used.**  :mod:`nixery_core.archive` packs a chunked layer
with ``threads`` (or a build's ``max_workers``) above 1 through
:func:`shared` with that many workers (at most one per CPU it may run
on); with 1 everything runs on the calling thread, and where no worker can
be started (:func:`usable` is false: not POSIX, or no Python executable)
on threads.  All three give the same bytes.

**Lifetime.**  :func:`shared` hands out one pool per process, started on
first use (workers start in about a tenth of a second) and reused by every
later layer, so a registry pays that once; it is closed at interpreter
exit, by :func:`shutdown`, and forgotten in a child made by ``os.fork``
(the child starts its own).  Output bytes do not depend on any of this: a
batch compressed here is byte-identical to one compressed on a thread.

**Errors.**  A failure in a worker comes back as
:class:`~nixery_core.errors.LayerError` naming the worker's exception,
chained to the worker's traceback (the cause's text, as
:mod:`concurrent.futures` does for its processes); a worker that
dies fails the batches it held the same way, and the pool starts a new
worker for the next batch.
"""

from __future__ import annotations

import atexit
import contextlib
import itertools
import mmap
import os
import pickle
import selectors
import socket
import struct
import subprocess
import sys
import threading
import traceback
from collections import deque
from collections.abc import Sequence
from concurrent.futures import Future
from pathlib import Path
from typing import Any

from nixery_core.errors import LayerError
from nixery_core.shared_buffers import SharedBuffers, shared_memory_usable

__all__ = ["FrameProcesses", "shared", "shared_pids", "shutdown", "usable", "usable_cpus"]

#: The settings a worker compresses with: compression, level, gzip backend.
Settings = tuple[str, int, str]
_Buffer = bytes | bytearray | memoryview
#: What a task returns: as :data:`nixery_core.chunked._Batch`.
_Result = tuple[bytes, list[int], list[str], list[Any], int]

_PACKAGE_PARENT = str(Path(__file__).resolve().parent.parent)
#: Imports nixery_core.chunked without the package's __init__ (which pulls in
#: everything, three times the start-up), then serves on the inherited socket.
#: A worker never reads its caller's __main__ (unlike multiprocessing's spawn).
_BOOTSTRAP = """
import signal, sys, types
# Ctrl-C is the caller's to handle; a worker ends when its socket closes.
signal.signal(signal.SIGINT, signal.SIG_IGN)
package = types.ModuleType("nixery_core")
package.__path__ = [sys.argv[1] + "/nixery_core"]
sys.modules["nixery_core"] = package
from nixery_core.frame_processes import serve
serve(int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]))
"""
#: Bytes of shared memory a pool maps for each of its workers (see SharedBuffers):
#: room for the batches in flight, the blocks queued for hashing and big files' windows.
_SHARED_PER_WORKER = 20 << 20


class _WorkerTraceback(Exception):
    """The cause of a worker's failure: its text is the worker's traceback.

    Only ever a ``__cause__`` (of the :class:`~nixery_core.errors.LayerError`
    raised), so that the traceback shows with the error; not for catching.
    """


def _failed(trace: str) -> LayerError:
    """The error for a batch a worker failed on, chained to its traceback."""
    last = trace.strip().splitlines()[-1] if trace.strip() else "unknown error"
    error = LayerError(f"compressing frames failed in a worker process: {last}")
    error.__cause__ = _WorkerTraceback(trace)
    return error


#: Every message: header length and body length, then the header (pickled) and the body.
_PREFIX = struct.Struct("<QQ")
#: Send buffer asked for on each end of a worker's socket.
_SOCKET_BUFFER = 4 << 20
#: Buffers per ``sendmsg`` call (Linux's IOV_MAX is 1024).
_IOV_MAX = 512


def _message(header: bytes, body: Sequence[_Buffer]) -> list[memoryview]:
    """One message's buffers, to send in order (the body's pieces are not joined)."""
    size = sum(len(part) for part in body)
    buffers = [_PREFIX.pack(len(header), size), header, *body]
    return [memoryview(buffer).cast("B") for buffer in buffers if len(buffer)]


def _sent(views: deque[memoryview], count: int) -> None:
    """Drop ``count`` bytes from the front of ``views``."""
    while count:
        if count >= len(views[0]):
            count -= len(views.popleft())
        else:
            views[0] = views[0][count:]
            count = 0


def send_message(sock: socket.socket, header: bytes, body: Sequence[_Buffer]) -> None:
    """Send one message on a blocking socket (the worker's side)."""
    views = deque(_message(header, body))
    while views:
        _sent(views, sock.sendmsg(list(itertools.islice(views, _IOV_MAX))))


def _recv_exact(sock: socket.socket, view: memoryview) -> None:
    while view:
        got = sock.recv_into(view)
        if not got:
            raise EOFError("the other end closed the socket")
        view = view[got:]


def recv_message(sock: socket.socket, buffer: bytearray) -> tuple[Any, memoryview]:
    """One message on a blocking socket: its header unpickled, its body (in ``buffer`` if it fits).

    Only ever between this process and its own workers (pickle trusts its input).
    """
    prefix = bytearray(_PREFIX.size)
    _recv_exact(sock, memoryview(prefix))
    header_size, body_size = _PREFIX.unpack(prefix)
    header = bytearray(header_size)
    _recv_exact(sock, memoryview(header))
    if len(buffer) < body_size:
        buffer = bytearray(body_size)
    body = memoryview(buffer)[:body_size]
    _recv_exact(sock, body)
    return pickle.loads(header), body  # noqa: S301 - from our own worker or parent


class _Worker:
    """One worker process, its socket, what waits to be sent and what is being read."""

    def __init__(self, buffers: SharedBuffers | None) -> None:
        ours, theirs = socket.socketpair()
        for end in (ours, theirs):
            # Room for whole batches and answers, so neither side waits on the
            # other to be scheduled (the kernel caps it at net.core.wmem_max).
            with contextlib.suppress(OSError):
                end.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, _SOCKET_BUFFER)
        shared = (-1, 0) if buffers is None else (buffers.fd, buffers.capacity)
        argv = [sys.executable, "-c", _BOOTSTRAP, _PACKAGE_PARENT, str(theirs.fileno())]
        try:
            self.process = subprocess.Popen(
                [*argv, *map(str, shared)],
                pass_fds=(theirs.fileno(),) if shared[0] < 0 else (theirs.fileno(), shared[0]),
                stdin=subprocess.DEVNULL,
                # Never hold the caller's stdout open (a pipe's reader waits for
                # it); stderr stays, for a worker that cannot start.
                stdout=subprocess.DEVNULL,
            )
        except OSError:
            ours.close()
            raise
        finally:
            theirs.close()
        ours.setblocking(False)
        self.socket = ours
        #: Bytes of tasks sent and not yet answered (picks the least busy worker).
        self.outstanding = 0
        #: Task numbers in the order sent; answers come back in this order.
        self.tasks: list[int] = []
        self.alive = True
        #: Buffers still to send, messages back to back.
        self.sending: deque[memoryview] = deque()
        #: Whether the I/O thread waits for room to send (then a new batch needs no wake-up).
        self.write_armed = False
        #: Held by whichever thread is sending, so messages never interleave.
        self.send_lock = threading.Lock()
        # The answer being read: prefix, then header, then body.
        self._prefix = bytearray(_PREFIX.size)
        self._header = bytearray()
        #: The body as received: ``recv`` makes bytes objects, so a body that
        #: arrives in one piece (most do: the worker sends it in one call)
        #: is never copied again.
        self._body: list[bytes] = []
        self._body_left = 0
        self._part = 0
        self._view = memoryview(self._prefix)

    def send_some(self, lock: threading.Lock) -> None:
        """Send what the socket takes now (it does not block).

        The caller holds :attr:`send_lock`.  ``lock`` guards :attr:`sending`,
        held only to look and to drop what went out, not while the kernel
        copies: only the sender drops from the front, others append.
        """
        while True:
            with lock:
                views = list(itertools.islice(self.sending, _IOV_MAX))
            if not views:
                return
            try:
                count = self.socket.sendmsg(views)
            except BlockingIOError:
                return
            with lock:
                _sent(self.sending, count)

    def read_some(self) -> tuple[Any, bytes] | None:
        """Read what arrived; a whole answer (header, body) once it is complete."""
        while True:
            if self._part == 2 and self._body_left:
                try:
                    piece = self.socket.recv(self._body_left)
                except BlockingIOError:
                    return None
                if not piece:
                    raise EOFError("the worker closed its socket")
                self._body.append(piece)
                self._body_left -= len(piece)
                continue
            if self._view:
                try:
                    got = self.socket.recv_into(self._view)
                except BlockingIOError:
                    return None
                if not got:
                    raise EOFError("the worker closed its socket")
                self._view = self._view[got:]
                if self._view:
                    continue
            if self._part == 0:
                header_size, self._body_left = _PREFIX.unpack(self._prefix)
                self._header = bytearray(header_size)
                self._part = 1
                self._view = memoryview(self._header)
            elif self._part == 1:
                self._part = 2
            else:
                body = self._body[0] if len(self._body) == 1 else b"".join(self._body)
                self._body = []
                self._part = 0
                self._view = memoryview(self._prefix)
                return pickle.loads(self._header), body  # noqa: S301 - our worker's answer

    def stop(self) -> None:
        """Close the worker's socket (it exits, even in the middle of an answer), then reap it."""
        self.socket.close()
        try:
            self.process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


class FrameProcesses:
    """A pool of ``count`` worker processes compressing batches of frames.

    Workers start on the first :meth:`submit`; :meth:`close` stops them.
    Results come back as futures, in any order the caller collects them.
    One thread (``nixery-frames-io``) sends every task and reads every
    answer, over non-blocking sockets.
    """

    def __init__(self, count: int) -> None:
        self.count = max(1, count)
        self._lock = threading.Lock()
        self._workers: list[_Worker] = []
        #: Each task's future, worker, size and the views it reads in shared memory.
        self._futures: dict[int, tuple[Future[_Result], _Worker, int, Sequence[object]]] = {}
        #: Shared memory the workers map (None where there is no memfd_create).
        self.buffers: SharedBuffers | None = None
        if shared_memory_usable():
            with contextlib.suppress(OSError):
                self.buffers = SharedBuffers(_SHARED_PER_WORKER * self.count)
        self._next_task = 0
        self._thread: threading.Thread | None = None
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        self.closed = False

    def _wake(self, why: bytes) -> None:
        """Wake the I/O thread: a byte down the pipe, never waiting.

        Writes happen with the pool's lock held, which the I/O thread takes
        before it reads the pipe again: a blocking write to a full pipe would
        wait for ever.  A full pipe wakes the thread anyway.
        """
        with contextlib.suppress(BlockingIOError):
            os.write(self._wake_w, why)

    def submit(
        self,
        settings: Settings,
        table: bytes,
        payload: Sequence[_Buffer],
        places: bytes = b"",
        hold: Sequence[memoryview] = (),
        *,
        checksum: bool = False,
    ) -> Future[_Result]:
        """Compress the frames ``table`` describes in ``payload`` (see :func:`compress_packed`).

        ``payload`` is the batch's bytes in pieces, sent as they are (never
        joined here): none of them may change until the future is done.
        ``places`` (an int64 per frame, or empty: all in ``payload``) says
        which frames lie in :attr:`buffers` instead, and where; ``hold``
        holds views of those slots, kept until the worker is done with them.
        ``checksum``: the result's CRC-32 of the compressed bytes is taken
        (right after compressing them, in the worker), else -1.
        """
        size = sum(len(piece) for piece in payload) + sum(len(view) for view in hold)
        future: Future[_Result] = Future()
        future.set_running_or_notify_cancel()
        with self._lock:
            if self.closed:
                raise LayerError("the frame worker processes are shut down")
            worker = self._pick()
            task = self._next_task
            self._next_task += 1
            header = pickle.dumps((task, settings, table, places, checksum), protocol=5)
            self._futures[task] = (future, worker, size, hold)
            worker.outstanding += size
            worker.tasks.append(task)
            worker.sending.extend(_message(header, payload))
        # Sent right here when no one else is sending to this worker: a socket
        # buffer takes a whole batch, and waking the I/O thread for it cost
        # the caller a thread switch and a wait for Python's lock per batch.
        if worker.send_lock.acquire(blocking=False):
            try:
                worker.send_some(self._lock)
            except OSError:
                pass  # the I/O thread sees the worker gone and fails its tasks
            finally:
                worker.send_lock.release()
        with self._lock:
            # What is left goes when the socket has room: the I/O thread waits
            # for that already, or is woken to (under the lock, as in _pick:
            # close() may meanwhile have failed the task and closes the pipe).
            if worker.sending and not worker.write_armed and not self.closed:
                self._wake(b"s")
        return future

    def _pick(self) -> _Worker:
        """The least busy live worker, starting workers up to ``count`` (holding the lock)."""
        self._workers = [worker for worker in self._workers if worker.alive]
        if len(self._workers) < self.count:
            try:
                worker = _Worker(self.buffers)
            except OSError as exc:
                raise LayerError(f"could not start a frame worker process: {exc}") from exc
            self._workers.append(worker)
            self._wake(b"w")  # the I/O thread starts listening to it
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._run, name="nixery-frames-io", daemon=True
                )
                self._thread.start()
            return worker
        return min(self._workers, key=lambda worker: worker.outstanding)

    def pids(self) -> list[int]:
        """The process ids of the live workers (for measuring their CPU time and memory)."""
        with self._lock:
            return [worker.process.pid for worker in self._workers if worker.alive]

    def _run(self) -> None:
        """Send tasks and complete each task's future as its answer arrives."""
        with selectors.DefaultSelector() as selector:
            selector.register(self._wake_r, selectors.EVENT_READ)
            while True:
                with self._lock:
                    if self.closed:
                        return
                    workers = [worker for worker in self._workers if worker.alive]
                    for worker in workers:
                        events = selectors.EVENT_READ
                        worker.write_armed = bool(worker.sending)
                        if worker.write_armed:
                            events |= selectors.EVENT_WRITE
                        try:
                            selector.modify(worker.socket, events, worker)
                        except KeyError:
                            selector.register(worker.socket, events, worker)
                for key, events in selector.select():
                    if key.fileobj == self._wake_r:
                        with contextlib.suppress(BlockingIOError):
                            os.read(self._wake_r, 4096)
                        continue
                    self._serve(key.data, events, selector)

    def _serve(self, worker: _Worker, events: int, selector: selectors.BaseSelector) -> None:
        """Send and read what ``worker``'s socket allows now."""
        try:
            if events & selectors.EVENT_WRITE:
                with worker.send_lock:
                    worker.send_some(self._lock)
            while events & selectors.EVENT_READ:
                answer = worker.read_some()
                if answer is None:
                    break
                (task, error, rest), body = answer
                self._answer(worker, task, error, body, rest)
        except (EOFError, OSError, pickle.UnpicklingError) as exc:
            selector.unregister(worker.socket)
            self._lost(worker, exc)

    def _answer(
        self, worker: _Worker, task: int, error: str | None, blob: bytes, rest: Any
    ) -> None:
        with self._lock:
            entry = self._futures.pop(task, None)
            if entry is None:
                return  # closed meanwhile: close() failed its future
            future, _worker, size, _hold = entry
            worker.outstanding -= size
            worker.tasks.remove(task)
        if error is not None:
            future.set_exception(_failed(error))
            return
        lengths, digests, plans, crc = rest
        future.set_result((blob, lengths, digests, plans, crc))

    def _lost(self, worker: _Worker, exc: BaseException) -> None:
        """A worker died (or its socket broke): fail every task it held."""
        with self._lock:
            worker.alive = False
            worker.sending.clear()
            # A task close() already failed is no longer in _futures.
            lost = [self._futures.pop(task) for task in worker.tasks if task in self._futures]
            worker.tasks.clear()
            worker.outstanding = 0
        worker.stop()  # its views are dropped after it stopped reading them
        code = worker.process.poll()
        for future, _worker, _size, _hold in lost:
            error = LayerError(f"a frame worker process exited (status {code}) before answering")
            error.__cause__ = exc
            future.set_exception(error)

    def close(self) -> None:
        """Stop the workers (tasks not answered yet fail)."""
        with self._lock:
            if self.closed:
                return
            self.closed = True
            workers, self._workers = self._workers, []
            pending = list(self._futures.values())
            self._futures.clear()
        self._wake(b"c")
        if self._thread is not None:
            self._thread.join(timeout=5)
        for worker in workers:
            worker.stop()
        for future, _worker, _size, _hold in pending:
            if not future.done():
                future.set_exception(LayerError("the frame worker processes were shut down"))
        if self.buffers is not None:
            self.buffers.close()
        os.close(self._wake_r)
        os.close(self._wake_w)


def shared_pids() -> list[int]:
    """The live workers of this process's pool (none before a chunked layer started it)."""
    pool = _SHARED.pool
    return [] if pool is None else pool.pids()


def usable() -> bool:
    """Whether worker processes can be started here (POSIX, a Python executable known)."""
    return os.name == "posix" and bool(sys.executable) and Path(sys.executable).exists()


class _Shared:
    """This process's one pool (see :func:`shared`)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.pool: FrameProcesses | None = None


_SHARED = _Shared()


def usable_cpus() -> int:
    """The CPUs this process may run on (its affinity mask where the OS keeps one)."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return os.cpu_count() or 1  # pragma: no cover - macOS: no affinity mask


def shared(count: int) -> FrameProcesses:
    """This process's pool, with at least ``count`` workers (started on first use).

    At most one worker per CPU this process may use, whatever ``count``
    (``threads=64`` starts no more workers than there are CPUs to run them;
    the bytes do not depend on how many there are).
    """
    count = min(count, usable_cpus())
    with _SHARED.lock:
        pool = _SHARED.pool
        if pool is None or pool.closed:
            pool = _SHARED.pool = FrameProcesses(count)
        elif pool.count < count:
            pool.count = count
        return pool


def shutdown() -> None:
    """Stop this process's pool (a later chunked layer starts a new one)."""
    with _SHARED.lock:
        pool, _SHARED.pool = _SHARED.pool, None
    if pool is not None:
        pool.close()


def _forget_after_fork() -> None:
    """A forked child must not use its parent's workers (their sockets are shared).

    It closes its copies of the pool's sockets and wake pipe: a copy left open
    would keep a worker from seeing its socket close when the parent closes
    the pool (the parent would wait 5 s and kill it).
    """
    pool = _SHARED.pool
    _SHARED.lock = threading.Lock()
    _SHARED.pool = None
    if pool is not None and not pool.closed:
        for worker in pool._workers:
            worker.socket.close()
        if pool.buffers is not None:
            pool.buffers.forget_after_fork()
        os.close(pool._wake_r)
        os.close(pool._wake_w)


atexit.register(shutdown)
os.register_at_fork(after_in_child=_forget_after_fork)


# --- the worker side -----------------------------------------------------------


def serve(fd: int, shared_fd: int = -1, shared_size: int = 0) -> None:
    """A worker's loop: answer tasks on the socket ``fd`` until it closes (then exit quietly).

    ``shared_fd`` (-1: none) is the pool's shared memory, ``shared_size`` bytes.
    """
    shared: mmap.mmap | None = None
    unmapped = -1
    if shared_fd >= 0:
        try:
            # Writable only so that the reference search reads it in place (_finder).
            shared = mmap.mmap(shared_fd, shared_size)
        except OSError:
            # Refused here (address-space limit, too many mappings): the frames placed
            # in it are read from the file instead (compress_packed's shared_fd).
            unmapped = shared_fd
        else:
            os.close(shared_fd)
    # Closed on the way out, so the worker ends without an unclosed-socket warning.
    with socket.socket(fileno=fd) as sock, contextlib.suppress(EOFError, OSError):
        _serve_tasks(sock, None if shared is None else memoryview(shared), unmapped)


def _serve_tasks(sock: socket.socket, shared: memoryview | None, unmapped: int = -1) -> None:
    """Answer tasks; ``unmapped`` (-1: none) is the shared file when it could not be mapped."""
    from nixery_core.chunked import compress_packed, new_chunker  # noqa: PLC0415 - worker side

    chunker = new_chunker()
    compressors: dict[Settings, Any] = {}
    buffer = bytearray()
    while True:
        (task, settings, table, places, checksum), payload = recv_message(sock, buffer)
        if payload.obj is not buffer:
            buffer = payload.obj  # type: ignore[assignment]  # a bigger one was made
        try:
            compress = compressors.get(settings)
            if compress is None:
                compress = compressors[settings] = _frames_compressor(settings)
            blob, lengths, digests, plans, crc = compress_packed(
                payload,
                table,
                compress_frames=compress,
                chunker=chunker,
                merge=settings[0] == "estargz",
                places=places,
                shared=shared,
                shared_fd=unmapped,
                checksum=checksum,
            )
        except Exception:  # noqa: BLE001 - every failure goes back to the caller
            send_message(sock, pickle.dumps((task, traceback.format_exc(), None)), ())
            continue
        finally:
            payload.release()
        answer = pickle.dumps((task, None, (lengths, digests, plans, crc)), protocol=5)
        send_message(sock, answer, (blob,))


def _frames_compressor(settings: Settings) -> Any:
    from nixery_core.compression import frames_compressor, resolve_compressor  # noqa: PLC0415

    compression, level, backend = settings
    gzip_backend = backend if backend in ("isal", "zlib") else "auto"
    return frames_compressor(resolve_compressor(compression, level, gzip_backend))  # type: ignore[arg-type]

