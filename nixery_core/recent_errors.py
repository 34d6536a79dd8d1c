"""A bounded record of recent build failures, for a registry's start page.

Nixery shows the last build errors on its start page, so that whoever asked
for ``shell/gitt`` can see that ``gitt`` is unknown.  :class:`RecentErrors`
keeps the newest ``capacity`` failures in memory (older ones fall off), is
safe to share between threads, and reads the time from an injected clock::

    errors = RecentErrors(capacity=50)
    with errors.recording(image):      # records the failure, then re-raises it
        build_image(image, source)
    for failure in errors.snapshot():  # newest first
        print(failure.image_reference, failure.error_type, failure.message)

Messages are cut to :data:`MAX_MESSAGE` characters so that a flood of huge
Nix logs cannot grow the record without bound.
"""

from __future__ import annotations

import collections
import contextlib
import threading
import time
from collections.abc import Callable, Iterator

import attrs

from nixery_core.errors import InvalidInput, UnknownPackages
from nixery_core.names import Image

__all__ = ["MAX_MESSAGE", "BuildFailure", "RecentErrors"]

#: Longest message kept per failure (characters); longer ones end in "...".
MAX_MESSAGE = 2000


def _shorten(text: str) -> str:
    return text if len(text) <= MAX_MESSAGE else text[: MAX_MESSAGE - 3] + "..."


@attrs.frozen
class BuildFailure:
    """One failed build: which image, when (seconds since the epoch), what went wrong.

    ``packages`` lists the unknown names when the error was
    :class:`~nixery_core.errors.UnknownPackages`, and is empty otherwise.
    """

    image_reference: str
    at: float
    error_type: str
    message: str
    packages: tuple[str, ...] = ()

    @classmethod
    def from_exception(cls, image: Image | str, exc: BaseException, at: float) -> BuildFailure:
        """Describe ``exc`` raised while building ``image`` (an Image or its reference)."""
        reference = image.reference if isinstance(image, Image) else str(image)
        packages = exc.packages if isinstance(exc, UnknownPackages) else ()
        return cls(
            image_reference=reference,
            at=at,
            error_type=type(exc).__name__,
            message=_shorten(str(exc) or type(exc).__name__),
            packages=packages,
        )


def _capacity(_: object, attribute: attrs.Attribute[int], value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise InvalidInput(f"{attribute.name} must be a positive integer, not {value!r}")


@attrs.define
class RecentErrors:
    """The newest ``capacity`` build failures, thread-safe; ``clock`` stamps them."""

    capacity: int = attrs.field(default=100, validator=_capacity)
    clock: Callable[[], float] = time.time
    _failures: collections.deque[BuildFailure] = attrs.field(init=False)
    _lock: threading.Lock = attrs.field(init=False, factory=threading.Lock)

    def __attrs_post_init__(self) -> None:
        self._failures = collections.deque(maxlen=self.capacity)

    def record(self, image: Image | str, exc: BaseException) -> BuildFailure:
        """Remember that building ``image`` failed with ``exc``; returns the record."""
        with self._lock:  # the clock is read under the lock: newest first means latest time
            failure = BuildFailure.from_exception(image, exc, self.clock())
            self._failures.append(failure)
        return failure

    def snapshot(self) -> tuple[BuildFailure, ...]:
        """Every remembered failure, newest first."""
        with self._lock:
            return tuple(reversed(self._failures))

    def clear(self) -> None:
        """Forget every failure."""
        with self._lock:
            self._failures.clear()

    def __len__(self) -> int:
        with self._lock:
            return len(self._failures)

    @contextlib.contextmanager
    def recording(
        self,
        image: Image | str,
        kinds: tuple[type[BaseException], ...] = (Exception,),
    ) -> Iterator[None]:
        """Record an exception of ``kinds`` raised inside the block, then re-raise it.

        ``kinds`` defaults to every :class:`Exception` (not ``KeyboardInterrupt``
        or ``SystemExit``, which are not build failures).
        """
        try:
            yield
        except kinds as exc:
            self.record(image, exc)
            raise
