"""A thread-safe tally behind a frozen stats class (:class:`~nixery_core.cache.CacheStats`, ...)."""

from __future__ import annotations

import threading
from typing import Generic, TypeVar

import attrs
from attrs import AttrsInstance

__all__ = ["Tally"]

S = TypeVar("S", bound=AttrsInstance)


class Tally(Generic[S]):
    """Counts per field of ``stats`` (an attrs class of int fields); :meth:`snapshot` is one."""

    def __init__(self, stats: type[S]) -> None:
        self._stats = stats
        self._lock = threading.Lock()
        self._counts: dict[str, int] = dict.fromkeys(attrs.fields_dict(stats), 0)

    def add(self, field: str, n: int = 1) -> None:
        with self._lock:
            self._counts[field] += n

    def snapshot(self) -> S:
        with self._lock:
            return self._stats(**self._counts)
