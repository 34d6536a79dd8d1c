"""One bounded pool for everything a build runs in parallel, and no pool inside a pool.

A build packs several layers at once, and each layer compresses blocks and
hashes in parallel too.  With a pool per layer that multiplies: 8 packing
workers each starting a pool of one thread per CPU plus a hash thread is 65
threads for one build on a 32-CPU host.  Instead every task of a build
(a layer, a block to deflate, a run of hash updates) goes to one
:class:`WorkerPool` of ``max_workers`` threads.

Tasks submitted from inside tasks could deadlock a bounded pool: every
worker packing a layer, each waiting for a block queued behind them.  So a
:class:`WorkerPool` future *helps*: asking for the result of a task no
worker has started yet (``result()``, ``exception()``) runs it right there,
on the thread that asked.  A waiting thread therefore always makes
progress, the pool never needs more threads than configured, and work
spreads over idle workers when there are any.  Cancelling a task that has
not started works as for any future.

The threads a pool starts never exceed ``max_workers``, whatever
``os.cpu_count()`` says (see :func:`nixery_core.build.default_workers` for
the default).  A pool can wrap an executor the caller owns instead
(:meth:`WorkerPool.wrapping`): tasks then run on its threads, with the same
helping futures, and closing the pool leaves that executor alone.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Callable
from concurrent.futures import Executor, Future, ThreadPoolExecutor
from typing import Any, ParamSpec, TypeVar

from nixery_core.errors import InvalidInput

__all__ = ["WorkerPool"]

T = TypeVar("T")
P = ParamSpec("P")


class _HelpingFuture(Future[T]):
    """A future whose waiter runs the task itself when no worker has started it."""

    def __init__(self, fn: Callable[[], T]) -> None:
        super().__init__()
        self._fn: Callable[[], T] | None = fn
        self._claim = threading.Lock()

    def run(self) -> None:
        """Run the task here unless another thread claimed it (or it was cancelled)."""
        if not self._claim.acquire(blocking=False):
            return
        if not self.set_running_or_notify_cancel():
            self._fn = None
            return
        fn, self._fn = self._fn, None
        if fn is None:  # pragma: no cover - claimed exactly once above
            return
        try:
            result = fn()
        except BaseException as exc:  # noqa: BLE001 - the future carries it to the waiter
            self.set_exception(exc)
        else:
            self.set_result(result)

    def result(self, timeout: float | None = None) -> T:
        self.run()
        return super().result(timeout)

    def exception(self, timeout: float | None = None) -> BaseException | None:
        self.run()
        return super().exception(timeout)


def _checked_max_workers(max_workers: int) -> int:
    if isinstance(max_workers, bool) or not isinstance(max_workers, int) or max_workers < 1:
        raise InvalidInput(f"max_workers must be a positive int, not {max_workers!r}")
    return max_workers


class WorkerPool(Executor):
    """A bounded executor whose futures help (see the module docstring).

    ``max_workers`` threads named ``thread_name_prefix-N`` are started as
    tasks arrive.  :meth:`shutdown` stops them (and with ``cancel_futures``
    cancels every task not started); a pool made by :meth:`wrapping` never
    shuts down the executor it wraps.
    """

    def __init__(self, max_workers: int, *, thread_name_prefix: str = "nixery-pack") -> None:
        max_workers = _checked_max_workers(max_workers)
        self._hold(ThreadPoolExecutor(max_workers, thread_name_prefix), max_workers, owned=True)

    @classmethod
    def wrapping(cls, executor: Executor, max_workers: int) -> WorkerPool:
        """Tasks on ``executor`` (the caller's, never shut down here), with helping futures.

        ``max_workers`` is how many tasks the caller expects it to run at
        once; streams size their in-flight work by it.
        """
        pool = cls.__new__(cls)
        pool._hold(executor, _checked_max_workers(max_workers), owned=False)
        return pool

    def _hold(self, inner: Executor, max_workers: int, *, owned: bool) -> None:
        """Run tasks on ``inner`` (shut down by :meth:`shutdown` only when ``owned``)."""
        self._inner = inner
        self._owned = owned
        self.max_workers = max_workers
        self._pending: weakref.WeakSet[_HelpingFuture[Any]] = weakref.WeakSet()
        self._lock = threading.Lock()

    def submit(self, fn: Callable[P, T], /, *args: P.args, **kwargs: P.kwargs) -> Future[T]:
        future: _HelpingFuture[T] = _HelpingFuture(lambda: fn(*args, **kwargs))
        with self._lock:
            self._pending.add(future)
        self._inner.submit(future.run)
        return future

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        if cancel_futures:
            with self._lock:
                pending = list(self._pending)
            for future in pending:
                future.cancel()
        if self._owned:
            self._inner.shutdown(wait=wait, cancel_futures=cancel_futures)
