"""The injectable seams: how Nix is run, where blobs go, how layers are grouped.

Each protocol has a real default (:class:`~nixery_core.runner.SubprocessRunner`,
:class:`~nixery_core.storage.filesystem.FilesystemStore`, the default layering
strategy) and fakes in :mod:`nixery_core.testing`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import BinaryIO, Protocol, runtime_checkable

import attrs

from nixery_core.graph import RuntimeGraph
from nixery_core.liveness import ProcessId

__all__ = [
    "BlobInfo",
    "BlobWriter",
    "CollectableStore",
    "JSONValue",
    "LayerGroup",
    "LayeringStrategy",
    "LogCallback",
    "ProcessProbe",
    "ReadableStore",
    "RunResult",
    "Runner",
    "SupportsBlobFiles",
    "SupportsBlobInfo",
    "SupportsBlobSizes",
    "SupportsDeletion",
    "SupportsLeases",
    "SupportsListing",
    "SupportsPriorLayers",
    "SupportsRangeReads",
    "SupportsReading",
    "SupportsRefresh",
    "SupportsStagingCleanup",
    "SupportsWriteTimes",
    "SupportsWrittenDigest",
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

    It promises:

    - nothing is visible under any digest until :meth:`commit`;
    - :meth:`commit` checks ``digest`` is well formed (raising
      :class:`~nixery_core.errors.InvalidDigest`) and that the bytes written
      hash to it (raising :class:`~nixery_core.errors.DigestMismatch`), then
      publishes atomically and returns the blob's :class:`BlobInfo`;
      committing bytes already stored succeeds and keeps one blob;
    - :meth:`abort`, a failed commit, or leaving the ``with`` block without
      a commit (by an exception or not) removes every staged byte; a second
      ``abort`` is harmless;
    - a writer is single-use: :meth:`write` or :meth:`commit` after a commit
      or an abort raises :class:`~nixery_core.errors.InvalidInput`;
    - a :meth:`write` or a publish that raised leaves the writer *failed*:
      it then accepts only :meth:`abort` (or the end of the ``with`` block),
      :meth:`write` and :meth:`commit` raise
      :class:`~nixery_core.errors.InvalidInput`, so bytes staged in part are
      never published (a :meth:`commit` refused for its digest aborts the
      writer instead);
    - removing the staged bytes that failed (a
      :class:`~nixery_core.errors.StorageError`) is tried again by the next
      :meth:`abort` or the end of the ``with`` block; while another error
      is on its way out, that error goes on unchanged with a note saying
      what may remain.

    :class:`~nixery_core.storage.base.BaseBlobWriter` keeps these rules for
    you.
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
    """What a build needs of storage: content-addressed blobs in, small keyed objects.

    It promises:

    - a blob is only ever visible complete and under the sha256 of its
      bytes (:class:`BlobWriter` streams one whose digest is not known yet;
      :meth:`put_blob` stores bytes in hand, and storing them again is
      harmless); :meth:`blob_info` is ``None`` for an absent blob;
    - a digest is ``sha256:`` and 64 lower-case hex digits, anything else
      raises :class:`~nixery_core.errors.InvalidDigest` before any IO; a
      media type is ``type/subtype`` (else
      :class:`~nixery_core.errors.InvalidInput`);
    - object keys are segments of 1 to 200 ``[A-Za-z0-9._-]`` characters
      joined by single ``/`` (``manifests/<key>``, ``builds/<key>``): no
      ``.`` or ``..`` segment, no leading or trailing ``/``, at most 512
      characters, first segment not ``layers`` or ``staging`` (reserved for
      blobs and uploads); anything else raises
      :class:`~nixery_core.errors.InvalidInput` before any IO
      (:func:`~nixery_core.storage.keys.validate_object_key`);
      :meth:`put_object` replaces atomically (a reader sees the old or the
      new bytes, never a mix); :meth:`get_object` is ``None`` when absent;
    - every backend failure is a :class:`~nixery_core.errors.StorageError`.

    Everything else is an optional capability, checked structurally where
    it is used: :class:`SupportsReading` (serving, layouts, pushing),
    :class:`SupportsListing` and :class:`SupportsDeletion` (garbage
    collection, ``verify``), :class:`SupportsWriteTimes` and
    :class:`SupportsStagingCleanup` (what garbage collection can judge and
    clean).  :class:`~nixery_core.storage.base.BaseStore` implements the
    rules; :mod:`nixery_core.storage.conformance` checks them.
    """

    def blob_info(self, digest: str) -> BlobInfo | None: ...

    def open_blob_writer(self, media_type: str) -> BlobWriter: ...

    def put_blob(self, data: bytes, media_type: str) -> BlobInfo: ...

    def get_object(self, key: str) -> bytes | None: ...

    def put_object(self, key: str, data: bytes) -> None: ...


@runtime_checkable
class SupportsReading(Protocol):
    """Reads stored blobs back: serving them, writing layouts, pushing, following manifests.

    It promises: :meth:`open_blob` and :meth:`read_blob` give exactly the
    committed bytes; an absent blob raises
    :class:`~nixery_core.errors.BlobNotFound`; a malformed digest raises
    :class:`~nixery_core.errors.InvalidDigest` before any IO.
    """

    def open_blob(self, digest: str) -> BinaryIO: ...

    def read_blob(self, digest: str) -> bytes: ...


@runtime_checkable
class SupportsBlobFiles(Protocol):
    """Keeps each committed blob as a file on this machine's disk.

    It promises: :meth:`blob_path` names the file holding exactly the
    committed bytes of ``digest`` (never modified in place; treat it as
    read-only), or raises :class:`~nixery_core.errors.BlobNotFound`.  A
    fragment cache may then keep store-path fragments as byte ranges of
    the layer blobs instead of copies (:mod:`nixery_core.fragments`).
    """

    def blob_path(self, digest: str) -> Path: ...


class SupportsBlobInfo(Protocol):
    """Tells whether a blob is stored, and its size (every :class:`Uploader` does)."""

    def blob_info(self, digest: str) -> BlobInfo | None: ...


@runtime_checkable
class SupportsRangeReads(Protocol):
    """Reads a byte range of a stored blob in one request (a remote store's ranged GET).

    It promises: :meth:`read_range` returns the blob's bytes from ``offset``,
    ``length`` of them, or fewer when the blob ends first (none past its
    end); an absent blob raises :class:`~nixery_core.errors.BlobNotFound`; a
    store that does not answer raises
    :class:`~nixery_core.errors.StorageUnavailable`; a malformed digest, or
    an ``offset`` or ``length`` that is not an int >= 0, raises before any
    IO.  It is safe to call from several threads at once.  A fragment cache
    reads the fragments it keeps as ranges of layer blobs with it
    (:mod:`nixery_core.fragment_reads`).
    """

    def read_range(self, digest: str, offset: int, length: int) -> bytes: ...


@runtime_checkable
class SupportsListing(Protocol):
    """Lists what is stored (garbage collection, ``verify``).

    It promises: :meth:`list_blobs` yields each committed blob once (never a
    staged upload), sorted by digest, with size and media type;
    :meth:`list_objects` yields the object keys starting with ``prefix`` (a
    plain string prefix: ``""``, ``manifests/`` or ``manif``; a prefix no
    key could start with, such as ``/``, ``../`` or ``layers/x``, raises
    :class:`~nixery_core.errors.InvalidInput`,
    :func:`~nixery_core.storage.keys.validate_prefix`), each once, sorted;
    blobs and uploads are never listed as objects.
    """

    def list_blobs(self) -> Iterator[BlobInfo]: ...

    def list_objects(self, prefix: str) -> Iterator[str]: ...


@runtime_checkable
class SupportsDeletion(Protocol):
    """Deletes blobs and objects (garbage collection, ``verify --repair``).

    It promises: deletion removes only what it names; deleting something
    absent is a no-op; digests and keys are checked as everywhere else.
    """

    def delete_blob(self, digest: str) -> None: ...

    def delete_object(self, key: str) -> None: ...


@runtime_checkable
class SupportsPriorLayers(Protocol):
    """A layering strategy that can be told which layers a registry already stores.

    It promises: :meth:`with_prior_layers` returns the same strategy given
    ``layers`` (store path sets) as an explicit input, which it may keep
    whole where they fit a closure.  Being told a record at all (even an
    empty one) says every later build is told it too, so the strategy may
    group for later builds to reuse what it stores; the same inputs still
    give the same layers.
    """

    def with_prior_layers(self, layers: Iterable[Sequence[str]]) -> LayeringStrategy: ...


@runtime_checkable
class SupportsBlobSizes(Protocol):
    """Sizes of many blobs at once, so a cache hit checks a whole image in about one round trip.

    It promises: :meth:`blob_sizes` maps every digest given to the stored
    blob's size, or ``None`` when it is absent; digests are checked as
    everywhere else.  A remote store asks for them concurrently (or in one
    request); a local one may simply stat each.
    """

    def blob_sizes(self, digests: Sequence[str]) -> Mapping[str, int | None]: ...


@runtime_checkable
class SupportsWrittenDigest(Protocol):
    """A blob writer that hashes what it is given, so that the blob is hashed once.

    It promises: :meth:`written_digest` is ``sha256:<hex>`` of every byte
    :meth:`BlobWriter.write` has accepted so far (the digest its ``commit``
    checks against).  A producer streaming into such a writer (the layer
    packer) takes the blob's digest from it instead of hashing every byte a
    second time; ``commit`` still checks the digest it is given, so nothing
    is trusted that was not hashed.
    """

    def written_digest(self) -> str: ...


@runtime_checkable
class SupportsWriteTimes(Protocol):
    """Knows when each blob was last written, so garbage collection can judge its age.

    It promises: :meth:`blob_written_at` is the wall-clock time
    (``time.time()`` seconds) the blob was last written, or ``None`` when
    the blob is absent or its time unknown (garbage collection keeps a blob
    of unknown age).
    """

    def blob_written_at(self, digest: str) -> float | None: ...


@runtime_checkable
class SupportsStagingCleanup(Protocol):
    """Removes uploads that crashed writers left staged.

    It promises: :meth:`clean_staging` removes (with ``dry_run`` only
    counts) staged uploads written before ``now - older_than`` (wall-clock
    seconds, as :class:`SupportsWriteTimes`) and returns how many; it never
    touches a committed blob, and an upload written since is left alone.
    """

    def clean_staging(self, *, older_than: float, now: float, dry_run: bool = False) -> int: ...


@runtime_checkable
class SupportsRefresh(Protocol):
    """Restarts a reused blob's age, and deletes a blob only while it is still old.

    It promises (on the clock of :class:`SupportsWriteTimes`, which a store
    offering this also offers): :meth:`touch_blob` sets the blob's write
    time to now and says whether it is stored; storing bytes already stored
    refreshes that time the same way; :meth:`delete_blob_if_older` deletes
    the blob only if its write time is still before ``cutoff`` at the moment
    it deletes, so a :meth:`touch_blob` that returned ``True`` is never
    undone by a concurrent garbage collection.
    """

    def touch_blob(self, digest: str) -> bool: ...

    def delete_blob_if_older(self, digest: str, cutoff: float) -> bool: ...


@runtime_checkable
class ReadableStore(Uploader, SupportsReading, Protocol):
    """A store a build writes and a server, layout writer or pusher reads back."""


@runtime_checkable
class CollectableStore(ReadableStore, SupportsListing, SupportsDeletion, Protocol):
    """A store garbage collection and ``verify`` can walk and prune.

    Write times and staging clean-up stay optional (:class:`SupportsWriteTimes`,
    :class:`SupportsStagingCleanup`).
    """


@runtime_checkable
class SupportsLeases(Protocol):
    """Optional store capability: small ``leases/<name>`` objects written on a precondition.

    It promises: :meth:`create_lease` succeeds for exactly one of several
    concurrent callers (``ifGenerationMatch=0`` on GCS, ``O_EXCL`` on a
    filesystem); :meth:`replace_lease` and :meth:`delete_lease` act only when
    the lease is still at ``generation``; every successful write gives a new
    generation (an opaque string).  A lost race is a ``None``/``False``
    answer, never an error; backend failures are
    :class:`~nixery_core.errors.StorageError`.  ``name`` is one key segment
    (``[A-Za-z0-9_-]``).  :mod:`nixery_core.lease` builds fleet-wide single
    flight on it.
    """

    def create_lease(self, name: str, data: bytes) -> str | None:
        """Create ``leases/<name>``; its generation, or ``None`` when it exists."""
        ...

    def read_lease(self, name: str) -> tuple[bytes, str] | None:
        """The lease's bytes and generation, ``None`` when absent."""
        ...

    def replace_lease(self, name: str, data: bytes, generation: str) -> str | None:
        """Replace the lease if still at ``generation``; the new generation, else ``None``."""
        ...

    def delete_lease(self, name: str, generation: str) -> bool:
        """Delete the lease if still at ``generation``; whether it was deleted."""
        ...


@runtime_checkable
class ProcessProbe(Protocol):
    """Names this process, and tells whether another one has ended where this host can.

    It promises: :meth:`this_process` names the calling process the same
    way on every call (``None`` where the platform cannot name it);
    :meth:`gone` is ``True`` only when the process has certainly ended (it
    ran on this host, in this pid namespace, and no live process has its
    pid and start time), and ``False`` for a process elsewhere or one it
    cannot look up.  :mod:`nixery_core.lease` takes a dead holder's lease
    over at once with it; :class:`~nixery_core.liveness.ProcfsProbe` is the
    real one.
    """

    def this_process(self) -> ProcessId | None:
        """This process, or ``None`` where it cannot be named."""
        ...

    def gone(self, process: ProcessId) -> bool:
        """Whether ``process`` has certainly ended."""
        ...


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
