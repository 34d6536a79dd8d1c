"""The injectable seams: how Nix is run, where blobs go, how layers are grouped.

Each protocol has a real default (:class:`~nixery_core.runner.SubprocessRunner`,
:class:`~nixery_core.storage.filesystem.FilesystemStore`, the default layering
strategy) and fakes in :mod:`nixery_core.testing`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from types import TracebackType
from typing import BinaryIO, Protocol, runtime_checkable

import attrs

from nixery_core.graph import RuntimeGraph

__all__ = [
    "BlobInfo",
    "BlobWriter",
    "JSONValue",
    "LayerGroup",
    "LayeringStrategy",
    "LogCallback",
    "RunResult",
    "Runner",
    "Uploader",
]

JSONValue = str | int | float | bool | None | list["JSONValue"] | dict[str, "JSONValue"]
#: Called with each line a command prints on stderr, as it is printed.
LogCallback = Callable[[str], None]


# --- runner ------------------------------------------------------------------


@attrs.frozen
class RunResult:
    """What a finished command returned."""

    argv: tuple[str, ...]
    returncode: int
    stdout: bytes
    stderr: bytes


@runtime_checkable
class Runner(Protocol):
    """Runs one command from an argv list (never a shell) and returns its output.

    It promises: the whole process group is killed when ``timeout`` passes,
    raising :class:`~nixery_core.errors.NixTimeout`; a missing program raises
    :class:`~nixery_core.errors.CommandNotFound`; a non-zero exit is *not* an
    error here (the caller decides), it is reported in ``returncode``.
    """

    def run(
        self,
        argv: Sequence[str],
        *,
        timeout: float | None = None,
        env: Mapping[str, str] | None = None,
        on_log_line: LogCallback | None = None,
    ) -> RunResult: ...


# --- uploader ----------------------------------------------------------------


@attrs.frozen
class BlobInfo:
    """A stored blob: its digest (``sha256:<hex>``), size and media type."""

    digest: str
    size: int
    media_type: str


@runtime_checkable
class BlobWriter(Protocol):
    """A blob being streamed before its digest is known.

    It promises: nothing is visible under any digest until :meth:`commit`;
    :meth:`commit` checks the bytes written hash to ``digest`` (raising
    :class:`~nixery_core.errors.DigestMismatch` otherwise) and is atomic;
    :meth:`abort` (or leaving the ``with`` block by an exception) removes
    every staged byte.
    """

    def write(self, data: bytes | memoryview) -> int: ...

    def commit(self, digest: str) -> BlobInfo: ...

    def abort(self) -> None: ...

    def __enter__(self) -> BlobWriter: ...

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None: ...


@runtime_checkable
class Uploader(Protocol):
    """Content-addressed blob storage plus small keyed objects for the cache.

    It promises: a blob is only ever visible complete and under the digest of
    its bytes; objects are replaced atomically; every backend failure is a
    :class:`~nixery_core.errors.StorageError`.  Blob keys are digests
    (``sha256:<hex>``); object keys are ``/``-separated names such as
    ``manifests/<key>`` or ``builds/<key>``.
    """

    def has_blob(self, digest: str) -> bool: ...

    def blob_info(self, digest: str) -> BlobInfo | None: ...

    def open_blob_writer(self, media_type: str) -> BlobWriter: ...

    def put_blob(self, data: bytes, media_type: str) -> BlobInfo: ...

    def open_blob(self, digest: str) -> BinaryIO: ...

    def read_blob(self, digest: str) -> bytes: ...

    def delete_blob(self, digest: str) -> None: ...

    def list_blobs(self) -> Iterator[BlobInfo]: ...

    def put_object(self, key: str, data: bytes) -> None: ...

    def get_object(self, key: str) -> bytes | None: ...

    def delete_object(self, key: str) -> None: ...

    def list_objects(self, prefix: str) -> Iterator[str]: ...


# --- layering ----------------------------------------------------------------


@attrs.frozen
class LayerGroup:
    """Store paths that go into one layer, sorted; ``rating`` orders layers (highest first)."""

    paths: tuple[str, ...]
    rating: float = 0.0


@runtime_checkable
class LayeringStrategy(Protocol):
    """Groups a closure's store paths into at most ``budget`` layers.

    It promises: every store path of the graph lands in exactly one group;
    no more than ``budget`` groups; the same graph (and parameters) gives
    the same groups in the same order.  Groups are returned in manifest
    order (the first is the bottom layer).
    """

    @property
    def name(self) -> str: ...

    def parameters(self) -> Mapping[str, JSONValue]:
        """Everything besides the graph that changes the grouping (for cache keys)."""
        ...

    def group(self, graph: RuntimeGraph, budget: int) -> Sequence[LayerGroup]: ...
