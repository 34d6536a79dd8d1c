"""Deterministic layer tarballs, packed in one streaming pass.

:func:`pack_store_paths` packs store paths from disk, :func:`pack_entries`
packs synthesised :class:`~nixery_core.entries.TarEntry` values.  Both
stream the archive through a compressor into ``write`` and return a
:class:`PackedLayer` with the compressed digest, the uncompressed
``diff_id`` and the size, all computed in the same pass.  Memory does not
grow with file sizes: files are read in pieces straight into a 1 MiB block
buffer, and at most a few blocks are in flight (peak RSS for a 2 GB layer
is in docs/performance.md); finding duplicate files keeps about 200 bytes
per distinct file.

**What the bytes depend on**: the content, names and executable bits of the
files, symlink targets, and :meth:`ArchiveOptions.parameters`.  Nothing
else: not inode numbers or which files are hard links of each other on disk
(so not whether the store was optimised), not timestamps, not owners, not
the umask, not the order ``readdir`` returns, not the number of threads.

The format, written by hand (``tarfile`` takes ~18 µs per member, this ~1.3 µs):

* POSIX.1-2001 (pax) archives: a ustar header per member.  An ASCII name
  longer than 100 bytes is split into ustar's 155-byte prefix and 100-byte
  name at the first ``/`` where both fit (ustar's own mechanism, which GNU
  tar uses too; Python's ``tarfile`` in ``PAX_FORMAT`` would add a pax
  header instead, and store paths make most names long).  A
  ``././@PaxHeader`` extended header (mode 0644, the archive's mtime)
  precedes a member only when a field still does not fit: ``path`` (no
  split fits, or not ASCII), ``linkpath`` (over 100 bytes or not ASCII),
  ``uid``/``gid`` of 2**21 or more, ``size`` of 8 GiB or more; with
  ``hdrcharset=BINARY`` first when a value is not UTF-8.  No atime, ctime
  or fractional mtime record ever.  Header fields are otherwise laid out as
  ``tarfile`` lays them out (octal with NUL, empty device fields, checksum
  as ``%06o``, NUL, space).
* Owner 0:0, user and group names empty, every mtime ``options.mtime``
  (1, as in the Nix store, by default).
* The archive ends with two zero blocks (no padding to a 10 KiB record).
* Member names are relative (``nix/store/…``); directories end in ``/``.

Store layers (:func:`pack_store_paths`):

* ``nix/`` and ``nix/store/`` come first, mode 0755 (as nixpkgs'
  ``stream_layered_image.py`` does), then each store path in byte order of
  its name, each walked depth first with the children of a directory in
  byte order of their names (GNU tar ``--sort=name`` order).
* Directories are members (Nixery leaves them out, so runtimes invent
  modes).  Modes are normalised the way Nix normalises the store: 0555 for
  directories, 0555 for files with the owner's execute bit, else 0444;
  symlinks 0777.  A fake store in a temp dir (0644/0755, any umask) and
  the real store therefore give the same bytes; setuid/setgid/sticky bits,
  which Nix forbids, never appear.
* Symlinks are never followed (``lstat``/``O_NOFOLLOW`` everywhere); each
  is stored with its target as read, absolute, relative or dangling.
* Each store path is compressed on its own (format ``nixery-tar/3``): a
  layer blob is a member for ``nix/`` and ``nix/store/``, one member per
  store path (gzip members, zstd frames), and one for the end of the
  archive, so a store path compressed once is reused in any layer
  (:mod:`nixery_core.fragments`; the bytes are the same whether its member
  was compressed now or copied from the fragment cache).  Every reader of
  gzip and zstd reads concatenated members as one stream.  eStargz and
  zstd:chunked layers do the same with a store path's frames, plus a
  second fragment for its TOC entries (:mod:`nixery_core.chunked`).
* Duplicate files are stored once per store path, decided by content, never
  by inode: a non-empty regular file whose bytes and normalised mode equal
  those of a file earlier in the same store path is a tar hard link to that
  earliest member, whatever the link counts on disk (a duplicate in another
  store path is stored again, so that each store path's member stands
  alone).  Hard links in
  a Nix store only come from ``nix-store --optimise`` (NARs cannot express
  them), so deciding by inode would make the bytes depend on whether the
  builder's store was optimised; by content, optimised and unoptimised
  stores give the same layer (``nixery-tar/2`` linked across store paths,
  ``nixery-tar/1`` went by inode).  Empty files are always stored: a link member is no
  smaller.  Duplicates are found with SHA-256 at little cost: files of at
  most 16 KiB are read whole and hashed (one read, as before); a larger file
  is hashed only when an earlier file of the layer has its size and mode,
  and that earlier file is then opened again to be hashed once.  Memory
  grows with the number of distinct files (a digest and a name each, about
  200 bytes), as it grew with linked files before.
* Refused with :class:`~nixery_core.errors.UnsafeStoreContent`: fifos,
  sockets, device files, and paths that are not ``/nix/store/<name>``.
  Extended attributes are never read.
* A missing store path raises :class:`~nixery_core.errors.StorePathMissing`
  before anything is written.  A file whose size or mtime changes while it
  is read, that yields fewer or more bytes than its size, or that vanishes
  or changes type mid-walk, and a directory whose entries change while it is
  listed (its mtime, ctime, link count or inode differ after the listing:
  Nix's GC deleting it), raise
  :class:`~nixery_core.errors.FileChangedDuringPacking`; so does a file read
  twice (hashed, then packed) whose two reads differ, and an earlier file
  opened again for its hash that is no longer the file packed (other
  device, inode, size or mtime: as elsewhere, a rewrite that keeps size and
  mtime goes unseen; ctime is not compared because a concurrent
  ``nix-store --optimise`` changes it without changing the bytes); other
  read errors
  raise :class:`~nixery_core.errors.LayerError`.  In every error case bytes
  may already have been passed to ``write``: abort the blob writer.
* Exceptions raised by ``write`` propagate unchanged.

Entry layers (:func:`pack_entries`): entries are sorted by path components
(parents before children, siblings in byte order); missing parent
directories are added with mode 0755 and owner 0:0; modes and owners are
taken from the entries as given.  A ``hardlink`` entry must name a
``file`` entry; the group's first member in archive order carries the data
and the others link to it.  Duplicate paths, parents that are not
directories and contradictory entries raise
:class:`~nixery_core.errors.InvalidInput`.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import mmap
import os
import stat
import sys
import threading
import traceback
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future
from operator import attrgetter
from pathlib import Path
from types import TracebackType
from typing import Any, Literal, ParamSpec, Protocol, cast
from zlib import adler32

import attrs

from nixery_core import frame_processes
from nixery_core.chunked import (
    ChunkedCompressor,
    FrameFormat,
    HeaderFields,
    Updated,
    chunker_parameters,
)
from nixery_core.compression import (
    BLOCK_SIZE,
    CHUNKED,
    Checksummed,
    Compression,
    CompressorSpec,
    GzipBackend,
    OrderedOutput,
    ReportsCrc32,
    StreamCompressor,
    frame_compressor,
    frame_stream,
    frames_compressor,
    open_compressor,
    resolve_compressor,
    zstd_window,
)
from nixery_core.entries import TarEntry
from nixery_core.errors import (
    FileChangedDuringPacking,
    InvalidInput,
    LayerError,
    StorePathMissing,
    UnsafeStoreContent,
)
from nixery_core.estargz import EStargzFormat
from nixery_core.fragment_layout import FragmentLayout, HeaderCapture, LayoutRecorder, rebuild
from nixery_core.fragment_toc import toc_part_lines, toc_part_parameters
from nixery_core.fragments import (
    CachedFragment,
    FragmentSource,
    FragmentWriter,
    SupportsFrameWindow,
    fragment_keys,
)
from nixery_core.inflating import INFLATE_ERRORS, MembersInflater, zstd_frames_problem
from nixery_core.protocols import JSONValue
from nixery_core.released import released
from nixery_core.shared_buffers import SharedBuffers
from nixery_core.workers import WorkerPool
from nixery_core.zstd_chunked import ZstdChunkedFormat

__all__ = [
    "FORMAT_VERSION",
    "MEDIA_TYPES",
    "ArchiveOptions",
    "PackedLayer",
    "pack_entries",
    "pack_store_paths",
]

log = logging.getLogger(__name__)

#: Bumped whenever the tar layout changes, so cached layers are rebuilt.
FORMAT_VERSION = "nixery-tar/3"
MEDIA_TYPES: dict[str, str] = {
    "gzip": "application/vnd.oci.image.layer.v1.tar+gzip",
    "zstd": "application/vnd.oci.image.layer.v1.tar+zstd",
    "none": "application/vnd.oci.image.layer.v1.tar",
    "estargz": "application/vnd.oci.image.layer.v1.tar+gzip",
    "zstd-chunked": "application/vnd.oci.image.layer.v1.tar+zstd",
}
#: Compressed output is handed to ``write`` in pieces of at least this size.
WRITE_SIZE = 1 << 20
#: Blocks kept waiting to be filled again once released (see _TarStream._next_block).
_RETIRED_BLOCKS = 8
#: A member's last, partial block of at least this many bytes is handed to its
#: compressor as a view of the block (then retired until released), not copied.
_PARTIAL_AS_VIEW = 256 << 10
_MAX_MTIME = 8**11 - 1
_STORE_PREFIX = "/nix/store/"
_WriteFn = Callable[[bytes], object]
#: The sha256 (``sha256:<hex>``) of everything given to ``write`` so far.
_DigestFn = Callable[[], str]


def _check_compression(_inst: object, _attr: object, value: Any) -> None:
    if value not in MEDIA_TYPES:
        raise InvalidInput(
            f"unknown compression {value!r}: use gzip, zstd, none, estargz or zstd-chunked"
        )


def _check_level(_inst: object, _attr: object, value: Any) -> None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
        raise InvalidInput(f"compression level must be an int or None, not {value!r}")


def _check_mtime(_inst: object, _attr: object, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= _MAX_MTIME:
        raise InvalidInput(f"archive mtime must be an int in 0..{_MAX_MTIME}, not {value!r}")


def _check_backend(_inst: object, _attr: object, value: Any) -> None:
    if value not in ("auto", "isal", "zlib"):
        raise InvalidInput(f"unknown gzip backend {value!r}: use auto, isal or zlib")


@attrs.frozen
class ArchiveOptions:
    """How layers are archived and compressed.

    ``compression`` ``"estargz"`` and ``"zstd-chunked"`` make file-granular
    layers that podman fetches file by file (:mod:`nixery_core.chunked`);
    their :class:`PackedLayer` carries the annotations the OCI manifest's
    layer descriptor needs.

    ``level`` ``None`` means the backend's default
    (:data:`~nixery_core.compression.DEFAULT_LEVELS`: ISA-L 3, zlib 1, zstd 3).
    eStargz refuses ISA-L levels 1 and 2 (:class:`~nixery_core.errors.InvalidInput`):
    its one-shot frames are not reproducible there under threads (see
    :data:`~nixery_core.compression.FORMAT_DEFAULT_LEVELS`).
    ``gzip_backend`` ``"auto"`` uses ISA-L (required); ``"zlib"`` picks zlib; the two
    give the same ``diff_id`` but different compressed bytes, so the
    resolved backend is part of :meth:`parameters` (see
    :mod:`nixery_core.compression`).
    """

    compression: Compression = attrs.field(default="gzip", validator=_check_compression)
    level: int | None = attrs.field(default=None, validator=_check_level)
    mtime: int = attrs.field(default=1, validator=_check_mtime)
    gzip_backend: GzipBackend = attrs.field(default="auto", validator=_check_backend)

    @property
    def media_type(self) -> str:
        """The OCI layer media type of blobs made with these options."""
        return MEDIA_TYPES[self.compression]

    def compressor(self) -> CompressorSpec:
        """The compressor these options resolve to on this machine."""
        backend = self.gzip_backend if self.compression in ("gzip", "estargz") else "auto"
        return resolve_compressor(self.compression, self.level, backend)

    def parameters(self) -> dict[str, JSONValue]:
        """Everything that changes the blob bytes, as JSON, for cache keys.

        Resolves the compressor: raises :class:`ImportError` when the
        backend asked for is not installed, and
        :class:`~nixery_core.errors.InvalidInput` for a level it does not have.
        """
        params: dict[str, JSONValue] = {
            "format": FORMAT_VERSION,
            "mtime": self.mtime,
            "media_type": self.media_type,
            **self.compressor().parameters(),
        }
        if self.compression in CHUNKED:
            params.update(chunker_parameters())
        return params


@attrs.frozen
class PackedLayer:
    """A packed layer: ``digest``/``size`` of the blob, ``diff_id`` of the tar.

    ``annotations`` are for the layer's descriptor in an OCI manifest (the
    TOC position and digest of eStargz and zstd:chunked layers; empty
    otherwise).
    """

    digest: str
    diff_id: str
    size: int
    media_type: str
    annotations: tuple[tuple[str, str], ...] = ()


# --- tar headers -------------------------------------------------------------

_REGTYPE, _LNKTYPE, _SYMTYPE, _DIRTYPE, _XHDTYPE = b"0", b"1", b"2", b"5", b"x"
_NUL512 = bytes(512)
#: magic "ustar\0" and version "00", then empty uname, gname, devmajor, devminor.
_MAGIC_TO_PREFIX = b"ustar\x0000" + bytes(32 + 32 + 8 + 8)
_MAX_OCTAL_8 = 8**7  # uid, gid: 7 octal digits
_MAX_OCTAL_12 = 8**11  # size, mtime: 11 octal digits
_CHECKSUM_BLANK = 8 * ord(" ")


class _Headers:
    """Makes header blocks for one archive (fixed mtime), at a few µs per member.

    A name that does not fit the 100-byte ustar name field is split into
    ustar's 155-byte prefix and the name at the first ``/`` that makes both
    fit; only when no split fits, or the name is not ASCII, does a pax
    ``path`` record carry it.  The sums of the constant fields are computed
    once per (mode, owner, type).
    """

    def __init__(self, mtime: int) -> None:
        self._mtime = b"%011o\0" % mtime
        self._fixed: dict[tuple[int, int, int, bytes], tuple[bytes, int]] = {}
        #: The last header made and what it says (name, mode, size, type, uid,
        #: gid, link target): a chunked layer is told them with the header
        #: instead of parsing it back (:meth:`_TarStream.put`).
        self.made: bytes = b""
        self.made_fields: HeaderFields = (b"", 0, 0, b"", 0, 0, b"")

    def __call__(
        self,
        name: bytes,
        mode: int,
        size: int,
        typeflag: bytes,
        *,
        uid: int = 0,
        gid: int = 0,
        linkname: bytes = b"",
    ) -> bytes:
        fields = (name, mode, size, typeflag, uid, gid, linkname)
        records: list[tuple[bytes, bytes]] = []
        prefix = b""
        if len(name) > 100 or not name.isascii():
            split = _split_name(name)
            if split is None:
                records.append((b"path", name))
                name = _ascii_replace(name)
            else:
                prefix, name = split
        if len(linkname) > 100 or not linkname.isascii():
            records.append((b"linkpath", linkname))
            linkname = _ascii_replace(linkname)
        if not (0 <= uid < _MAX_OCTAL_8 and 0 <= gid < _MAX_OCTAL_8 and 0 <= size < _MAX_OCTAL_12):
            records.extend(_numeric_records(uid, gid, size))
            uid = uid if 0 <= uid < _MAX_OCTAL_8 else 0
            gid = gid if 0 <= gid < _MAX_OCTAL_8 else 0
            size = size if 0 <= size < _MAX_OCTAL_12 else 0
        key = (mode, uid, gid, typeflag)
        fixed = self._fixed.get(key)
        if fixed is None:
            fixed = self._fixed[key] = self._constant_part(key)
        owner_mode, constant_sum = fixed
        size_field = b"%011o\0" % size
        # The sums of the variable fields: Adler-32's low half is 1 plus the sum
        # of the bytes modulo 65521, exact here (name and prefix are at most 255
        # ASCII bytes, link name and size 112), and several times faster than sum().
        checksum = (
            constant_sum
            + (adler32(prefix, adler32(name)) & 0xFFFF)
            + (adler32(size_field, adler32(linkname)) & 0xFFFF)
            - 2
        )
        block = b"".join(
            (
                name.ljust(100, b"\0"),
                owner_mode,
                size_field,
                self._mtime,
                b"%06o\0 " % checksum,
                typeflag,
                linkname.ljust(100, b"\0"),
                _MAGIC_TO_PREFIX,
                prefix.ljust(155 + 12, b"\0"),
            )
        )
        if records:
            block = self._pax(records) + block
        self.made = block
        self.made_fields = fields
        return block

    def _constant_part(self, key: tuple[int, int, int, bytes]) -> tuple[bytes, int]:
        mode, uid, gid, typeflag = key
        owner_mode = b"%07o\0%07o\0%07o\0" % (mode, uid, gid)
        constant = (
            sum(owner_mode) + sum(self._mtime) + _CHECKSUM_BLANK + sum(typeflag)
            + sum(_MAGIC_TO_PREFIX)
        )
        return owner_mode, constant

    def _pax(self, records: list[tuple[bytes, bytes]]) -> bytes:
        """A ``././@PaxHeader`` extended header holding ``records``."""
        body = []
        if any(not _is_utf8(value) for _key, value in records):
            body.append(b"21 hdrcharset=BINARY\n")
        for key, value in records:
            # "<length> <key>=<value>\n", where <length> counts its own digits.
            length = len(key) + len(value) + 3
            total = previous = 0
            while True:
                total = length + len(str(previous))
                if total == previous:
                    break
                previous = total
            body.append(b"%d %s=%s\n" % (total, key, value))
        payload = b"".join(body)
        header = self(b"././@PaxHeader", 0o644, len(payload), _XHDTYPE)
        return header + payload + bytes(-len(payload) % 512)


def _split_name(name: bytes) -> tuple[bytes, bytes] | None:
    """(ustar prefix, name) split at the first ``/`` where both fit, for ASCII names."""
    if not name.isascii() or len(name) > 100 + 1 + 155:
        return None
    # The name part must fit 100 bytes: only slashes from here on can split.
    slash = name.find(b"/", max(0, len(name) - 101))
    if slash < 1 or slash > 155 or slash == len(name) - 1:
        return None
    return name[:slash], name[slash + 1 :]


def _numeric_records(uid: int, gid: int, size: int) -> list[tuple[bytes, bytes]]:
    records = []
    for key, value, limit in ((b"uid", uid, _MAX_OCTAL_8), (b"gid", gid, _MAX_OCTAL_8),
                              (b"size", size, _MAX_OCTAL_12)):
        if not 0 <= value < limit:
            records.append((key, b"%d" % value))
    return records


def _is_utf8(value: bytes) -> bool:
    try:
        value.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def _ascii_replace(value: bytes) -> bytes:
    """What a ustar field holds when the real value is in a pax record."""
    return os.fsdecode(value).encode("ascii", "replace")[:100]


# --- the streaming sink ------------------------------------------------------


class _Done:
    """Tags the end of a recorded fragment in the ordered output."""

    def __init__(self, recording: _Recording) -> None:
        self.recording = recording


@attrs.define
class _Recording:
    """A fragment being compressed and recorded for the fragment cache."""

    writer: FragmentWriter
    #: How its uncompressed bytes are rebuilt from the store (:mod:`nixery_core.fragment_layout`).
    layout: LayoutRecorder
    uncompressed: int = 0
    #: A chunked layer's fragment also records its TOC entries here.
    toc: FragmentWriter | None = None
    #: Its last, partial block, while its compressor still buffers it: the layout takes
    #: its CRC-32 from the compressor once the member is finished (:meth:`_TarStream.end`).
    tail: bytes | bytearray | memoryview | None = None
    #: Its writer's :meth:`~nixery_core.fragments.RangeWriter.add_checksummed` when it only
    #: checksums what it is given: the pool's threads then take the CRC-32 of the blocks
    #: they deflate (:class:`~nixery_core.compression.Checksummed`), not this thread.
    checksummed: Callable[[int, int], None] | None = None


class _TarStream:
    """Tar bytes in, compressed bytes out to ``write``; sha256 of both on the way.

    The compressed stream is a sequence of members (gzip members, zstd
    frames), each opened by :meth:`begin` and closed by :meth:`end`; a
    cached fragment is copied in between members by :meth:`put_cached`.
    """

    def __init__(
        self,
        write: _WriteFn,
        spec: CompressorSpec,
        threads: int | None,
        mtime: int,
        executor: WorkerPool | None = None,
        *,
        blob_digest: _DigestFn | None = None,
    ) -> None:
        self.headers = _Headers(mtime)
        #: The sink's own hash of the blob, when it keeps one: then the blob is not hashed here.
        self._blob_digest = blob_digest
        # One pool for the whole build when given (never one inside it); else
        # one for this layer, closed with it.
        self._own: WorkerPool | None = None
        self._executor: WorkerPool | None = executor
        if executor is not None:
            count = executor.max_workers if threads is None else _thread_count(threads)
        else:
            count = _thread_count(threads)
            if count > 1:
                self._own = self._executor = WorkerPool(count, thread_name_prefix="nixery-deflate")
        parallel = self._executor if spec.compression in ("gzip", *CHUNKED) else None
        self._spec = spec
        self._parallel = parallel
        # zstd runs its own (native) workers: one per layer when a build
        # shares a pool, since its multi-threaded frames are the same bytes
        # for any number of workers.
        self._member_threads = (1 if executor is not None else count) if (
            spec.compression == "zstd"
        ) else count
        self._output = OrderedOutput(2 * count)
        #: Uncompressed bytes waiting for fragments inflated on the pool, in order.
        self._diff_pending: deque[bytes | bytearray | memoryview | Future[bytes]] = deque()
        self._inflating = 0
        self._max_inflating = count
        #: Bytes in ``_diff_pending`` waiting for a fragment inflating on the pool, at most
        #: :data:`_MAX_DIFF_WAITING` (then the oldest inflation is waited for).
        self._diff_waiting = 0
        self._recording: _Recording | None = None
        #: A chunked layer's open recording: its blocks' one queued update (_flush_block).
        self._diff_and_layout: _DiffAndLayout | None = None
        #: The open recording's layout: each header put, its size, and the name of a file
        #: with content are appended here, in order (LayoutRecorder.captured): no call per
        #: member or file, and no object kept per member but the header and the name.
        self._captured: HeaderCapture | None = None
        #: The open member's compressor when it keeps the CRC-32 the layout records.
        self._member_crc: ReportsCrc32 | None = None
        #: The open member is hashed on this thread (see :meth:`begin`).
        self._small = False
        self._recordings: list[_Recording] = []
        # A chunked layer (eStargz, zstd:chunked) is one stream cut by its own
        # format; every other layer is a sequence of members (begin/end).
        self._chunked: ChunkedCompressor | None = None
        self._compressor: StreamCompressor | None = None
        #: Shared memory the frame workers read blocks from in place (chunked layers).
        self._shared: SharedBuffers | None = None
        self._hashing = _OrderedHashing(self._executor if count > 1 else None)
        if spec.chunked:
            # Frames are compressed in worker processes (frame_processes.py);
            # on the pool's threads only where none can be started.
            processes = (
                frame_processes.shared(count) if count > 1 and frame_processes.usable() else None
            )
            self._shared = None if processes is None else processes.buffers
            self._chunked = ChunkedCompressor(
                _frame_format(spec, mtime),
                mtime=mtime,
                executor=parallel,
                threads=count,
                processes=processes,
                settings=(spec.compression, spec.level, spec.backend),
                shared=self._shared,
                # Recorded fragments' ranges are checksummed in the hashing queue, by the
                # drains its blocks wake (ride_along: no pool thread woken for them).
                defer=self._hashing.ride_along,
            )
        self._write = write
        self._passthrough = spec.compression == "none"
        #: Blocks handed on, oldest first, until released and filled again (_next_block).
        self._retired: deque[bytearray] = deque()
        self._block: bytearray | mmap.mmap = self._next_block(None)
        self._view = memoryview(self._block)
        self._pos = 0
        #: Where the bytes not handed on yet start in the block: 0, but for a
        #: shared block a partial flush hands on its bytes so far and filling
        #: goes on after them (one slot serves many small store paths).
        self._start = 0
        self._diff = hashlib.sha256()
        self._digest = hashlib.sha256()
        self._size = 0
        self._out: list[bytes] = []
        self._out_len = 0

    def __enter__(self) -> _TarStream:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._compressor is not None:
            self._compressor.close()
        if self._chunked is not None:
            self._chunked.close()
        self._output.cancel()
        for pending in self._diff_pending:
            if isinstance(pending, Future):
                pending.cancel()
        for recording in self._recordings:
            recording.writer.discard()
        self._hashing.close()
        if self._own is not None:
            self._own.shutdown(wait=True, cancel_futures=True)

    def begin(self, recording: _Recording | None = None, *, small: bool = False) -> None:
        """Open a new member (a fragment), recorded for the cache when ``recording`` is given.

        A ``small`` member (the ``nix/`` directories, the end of the archive:
        a few headers) is compressed and hashed on this thread, so that a
        layer assembled wholly from cached fragments never starts the pool's
        threads; the bytes are the same either way.
        """
        if self._chunked is not None:
            self._chunked_boundary(recording, begin=True)
            return
        if self._compressor is not None:
            raise RuntimeError("a member is already open")  # a bug in this module, not input
        self._recording = recording
        if recording is not None:
            self._recordings.append(recording)
            self._captured = recording.layout.captured()
            if getattr(recording.writer, "checksums_only", False):
                recording.checksummed = getattr(recording.writer, "add_checksummed", None)
        compressor = open_compressor(
            self._spec, executor=None if small else self._parallel,
            threads=1 if small else self._member_threads, output=self._output, tag=recording,
            checksummed=recording is not None and recording.checksummed is not None,
        )
        self._compressor = compressor
        self._small = small
        if recording is not None and _reports_crc32(compressor):
            self._member_crc = cast("ReportsCrc32", compressor)

    def end(self) -> None:
        """Close the open member: its last partial block, its trailer."""
        if self._chunked is not None:
            self._chunked_boundary(None, begin=False)
            return
        compressor = self._compressor
        if compressor is None:
            raise RuntimeError("no member is open")  # a bug in this module, not input
        if self._pos > self._start:
            self._flush_block(partial=True)
        compressor.finish()
        compressor.close()
        if self._recording is not None and self._recording.tail is not None:
            self._record_tail(self._recording)
        self._compressor = None
        self._member_crc = None
        self._small = False
        if self._recording is not None:
            # Encoded by the cache's writing thread, off this one.
            self._recording.writer.layout = self._recording.layout
            self._output.add(_Done(self._recording), b"")
            self._recording = None
            self._captured = None
        self._emit(self._output.take_ready())

    def _chunked_boundary(self, recording: _Recording | None, *, begin: bool) -> None:
        """A fragment starts or ends in a chunked layer: no frame spans it (chunked.py)."""
        chunked = self._chunked
        if chunked is None:  # pragma: no cover - only called for chunked layers
            raise RuntimeError("not a chunked layer")
        if self._pos > self._start:
            self._flush_block(partial=True)
        if begin:
            self._recording = recording
            if recording is not None:
                # Its blocks' CRC-32s are taken on the hashing thread (_flush_block), and
                # its members are the headers announced to the chunked compressor (put).
                recording.layout.deferred(self._hashing.wait)
                self._diff_and_layout = _DiffAndLayout(self._diff, recording.layout)
                self._captured = recording.layout.captured()
            if recording is None or recording.toc is None:
                chunks = chunked.begin_fragment()
            else:
                chunks = chunked.begin_fragment(recording.writer, recording.toc)
        else:
            if self._recording is not None:
                self._recording.writer.layout = self._recording.layout
                self._hashing.ride_along(_Seal(self._recording.layout), b"")
            self._recording = None
            self._diff_and_layout = None
            self._captured = None
            chunks = chunked.end_fragment()
        self._emit([(None, chunk) for chunk in chunks])

    def _copy_compressed(self, piece: bytes) -> None:
        """Compressed bytes of a cached fragment, in order with the rest."""
        if self._chunked is not None:
            self._emit([(None, chunk) for chunk in self._chunked.put_compressed(piece)])
            return
        self._output.add(None, piece)
        self._emit(self._output.take_ready())

    def put_cached(
        self, fragment: CachedFragment, source: bytes, toc: CachedFragment | None = None
    ) -> bool:
        """Copy a cached fragment between members; its uncompressed bytes join the diff_id.

        The uncompressed bytes are rebuilt from ``source`` (the store path it
        was packed from) by the fragment's layout, each block checked against
        the one compressed (:mod:`nixery_core.fragment_layout`); from the
        first block that differs on, or for a fragment without a layout, they
        are decompressed instead.  With a pool, fragments up to
        :data:`_PARALLEL_INFLATE` bytes are inflated there, several at once
        (members are independent); their bytes join the ``diff_id`` in order
        all the same.

        A chunked layer's fragment comes with its TOC part (``toc``), read a
        line at a time before any of its bytes are copied: ``False`` when
        that part is damaged, nothing copied (the caller packs the store
        path instead); ``True`` once copied.  So is a fragment of zstd frames
        to be decompressed, held in memory, whose headers say the decoder
        would refuse it (too large a window) or give another size than
        recorded (:func:`~nixery_core.inflating.zstd_frames_problem`): dropped
        from its cache first, a miss.  What only inflating finds raises
        :class:`~nixery_core.errors.BadCachedFragment` (the fragment dropped).
        """
        layout = None if fragment.layout is None else FragmentLayout.decode(fragment.layout)
        rebuilt = layout is not None and layout.size == fragment.uncompressed_size
        held = None
        if not rebuilt and fragment.held is not None and self._spec.backend == "zstd":
            # Headers only, before a byte is copied: a frame the decoder would refuse is a miss.
            held = fragment.held[0] if len(fragment.held) == 1 else b"".join(fragment.held)
            problem = zstd_frames_problem(
                held, max_window=zstd_window(self._spec.level), size=fragment.uncompressed_size
            )
            if problem is not None:
                fragment.refused(problem, os.fsdecode(source))  # dropped: packed instead
                return False
        if self._chunked is not None:
            if toc is None:  # pragma: no cover - the caller looks both up
                raise RuntimeError("a chunked layer's fragment needs its TOC")
            lines = toc_part_lines(toc.pieces(), toc.uncompressed_size)
            chunks = self._chunked.put_fragment(
                lines, fragment.uncompressed_size, fragment.size
            )
            if chunks is None:
                return False
            self._emit([(None, chunk) for chunk in chunks])
        elif self._compressor is not None or self._pos > self._start:
            raise RuntimeError("a member is open")  # a bug in this module, not input
        if layout is not None and rebuilt:
            for piece in fragment.pieces():
                self._copy_compressed(piece)
            done = rebuild(source, layout, self._add_rebuilt)
            if done < fragment.uncompressed_size:
                log.warning(
                    "%s differs from its cached fragment from byte %d on; decompressing it",
                    os.fsdecode(source), done,
                )
                self._inflate_rest(fragment, source, done)
            return True
        self._copy_inflating(fragment, source, held)
        return True

    def _copy_inflating(
        self, fragment: CachedFragment, source: bytes, held: bytes | None
    ) -> None:
        """Copy a cached fragment whose uncompressed bytes are decompressed (``held``: its
        bytes joined, if they were for its check): on the pool when it is small."""
        pool = self._executor
        if pool is not None and fragment.uncompressed_size <= _PARALLEL_INFLATE:
            pieces = list(fragment.pieces())
            for piece in pieces:
                self._copy_compressed(piece)
            data = held if held is not None else (
                pieces[0] if len(pieces) == 1 else b"".join(pieces)
            )
            self._diff_pending.append(
                pool.submit(_inflate_whole, self._spec, data, fragment, source)
            )
            self._inflating += 1
            self._drain_diff()
            return
        inflate = _FragmentInflater(self._spec, fragment, source)
        for piece in fragment.pieces():
            self._copy_compressed(piece)
            for out in inflate.inflate(piece):
                self._add_diff(out)
                self._drain_diff()
        inflate.finish()

    def _add_rebuilt(self, block: bytearray) -> None:
        """A block rebuilt from the store, hashed on this thread.

        Rebuilding outruns SHA-256, so handing each block to the pool only
        adds thread hand-offs (measured: 15-20% more CPU for regrouped
        layers); the layers of an image are assembled in parallel instead.
        """
        if self._diff_pending:  # fragments still inflating on the pool come first
            self._add_diff(block)
            self._drain_diff()
            return
        self._hashing.wait()  # and whatever was queued before
        self._diff.update(block)

    def _inflate_rest(self, fragment: CachedFragment, source: bytes, skip: int) -> None:
        """Inflate a fragment here; its bytes after the first ``skip`` join the diff_id."""
        inflate = _FragmentInflater(self._spec, fragment, source)
        for piece in fragment.pieces():
            for out in inflate.inflate(piece):
                start = inflate.produced - len(out)
                if inflate.produced > skip:
                    self._add_diff(out[skip - start :] if start < skip else out)
                    self._drain_diff()
        inflate.finish()

    def _add_diff(self, data: bytes | bytearray | memoryview) -> None:
        """Uncompressed bytes for the ``diff_id``, after any still being inflated."""
        if self._diff_pending:
            self._diff_pending.append(data)
            self._diff_waiting += len(data)
        else:
            self._hashing.update(self._diff, data)

    def _drain_diff(self, *, everything: bool = False) -> None:
        """Hash, in order, the uncompressed bytes ready at the front of the queue."""
        queue = self._diff_pending
        while queue:
            head = queue[0]
            if isinstance(head, Future):
                if not (
                    everything or head.done() or self._inflating > self._max_inflating
                    or self._diff_waiting > _MAX_DIFF_WAITING
                ):
                    return
                queue.popleft()
                self._inflating -= 1
                self._hashing.update(self._diff, head.result())
            else:
                queue.popleft()
                self._diff_waiting -= len(head)
                self._hashing.update(self._diff, head)

    def put(self, data: bytes | bytearray | memoryview) -> None:
        """Tar bytes that are not file content (headers, padding), or content noted already.

        A header :attr:`headers` just made is announced: to a chunked layer's
        compressor, and to the open recording's layout (whose every other
        byte is a file's content or its padding, implied by the sizes).
        """
        if data is self.headers.made:
            fields = self.headers.made_fields
            if self._chunked is not None:
                self._chunked.announce(self._pos - self._start, data, fields)
            captured = self._captured
            if captured is not None:  # HeaderCapture.add, inlined (the busiest thread)
                captured.headers.append(data)
                size = fields[2]
                captured.sizes.append(size)
                if size:
                    captured.names.append(fields[0])
        self._put(data)

    def put_file(self, data: bytes | bytearray | memoryview) -> None:
        """The whole content of a file."""
        self._put(data)

    def _put(self, data: bytes | bytearray | memoryview) -> None:
        pos = self._pos
        end = pos + len(data)
        if end < BLOCK_SIZE:
            self._block[pos:end] = data
            self._pos = end
            return
        view = memoryview(data)
        while view:
            take = min(BLOCK_SIZE - self._pos, len(view))
            self._block[self._pos : self._pos + take] = view[:take]
            self._pos += take
            view = view[take:]
            if self._pos == BLOCK_SIZE:
                self._flush_block()

    def read_file(
        self, fd: int, size: int, member: bytes, digest: hashlib._Hash | None = None
    ) -> int:
        """Copy up to ``size`` bytes of ``fd`` into the stream; how many there were.

        The bytes copied are also fed to ``digest`` when one is given.
        """
        remaining = size
        while remaining:
            pos = self._pos
            want = min(BLOCK_SIZE - pos, remaining)
            try:
                got = os.readv(fd, (self._view[pos : pos + want],))
            except OSError as exc:
                raise _read_error(_display(member), exc) from exc
            if not got:
                break
            if digest is not None:
                digest.update(self._view[pos : pos + got])
            self._pos = pos + got
            remaining -= got
            if self._pos == BLOCK_SIZE:
                self._flush_block()
        return size - remaining

    def staging(self, offset: int, size: int) -> memoryview | None:
        """Room for ``size`` bytes ``offset`` bytes past the end of the stream, if the block has it.

        Bytes read into it join the stream only through :meth:`commit`, which
        must come next; anything put before overwrites them.
        """
        start = self._pos + offset
        if start + size >= BLOCK_SIZE:
            return None
        return self._view[start : start + size]

    def commit(self, header: bytes, size: int) -> None:
        """Put ``header`` in front of the ``size`` bytes staged after it, and pad."""
        pad = -size % 512
        pos = self._pos
        if header is self.headers.made:
            fields = self.headers.made_fields
            if self._chunked is not None:
                self._chunked.announce(pos - self._start, header, fields)
            captured = self._captured
            if captured is not None:  # HeaderCapture.add, inlined (the busiest thread)
                captured.headers.append(header)
                captured.sizes.append(size)
                if size:
                    captured.names.append(fields[0])
        self._block[pos : pos + len(header)] = header
        self._pos = pos + len(header) + size
        if pad:
            self._put(_NUL512[:pad])

    def pad(self, size: int) -> None:
        if size % 512:
            self.put(_NUL512[: 512 - size % 512])

    def finish(self, media_type: str) -> PackedLayer:
        annotations: tuple[tuple[str, str], ...] = ()
        if self._chunked is not None:
            # A chunked format writes its own end (eStargz puts its TOC before it).
            if self._pos > self._start:
                self._flush_block(partial=True)
            # Its end streams (the TOC read back and compressed in pieces).
            annotations = self._chunked.finish(
                lambda chunk: self._emit([(None, bytes(chunk))]), self._add_diff
            )
        else:
            if self._compressor is None:
                self.begin(small=True)
            self.put(_NUL512 * 2)
            self.end()
            self._emit(self._output.take_all())
        if self._out:
            self._flush_output()
        self._drain_diff(everything=True)
        self._hashing.wait()
        diff_id = "sha256:" + self._diff.hexdigest()
        if self._passthrough:
            digest = diff_id
        elif self._blob_digest is not None:
            digest = self._blob_digest()
        else:
            digest = "sha256:" + self._digest.hexdigest()
        return PackedLayer(digest, diff_id, self._size, media_type, annotations)

    def _flush_block(self, *, partial: bool = False) -> None:
        compressor = self._chunked or self._compressor
        if compressor is None:
            raise RuntimeError("tar bytes outside a member")  # a bug in this module
        shared = isinstance(self._block, mmap.mmap)
        block = self._handed_on(partial=partial, shared=shared)
        recording = self._recording
        if self._small and not self._diff_pending:
            self._hashing.wait()  # in order with whatever was queued before
            self._diff.update(block)
        elif self._diff_and_layout is not None and recording is not None and not self._diff_pending:
            # A chunked layer's recorded block: one queued update hashes it for the
            # diff_id, then takes the layout's CRC-32 while it is in the CPU's cache.
            recording.uncompressed += len(block)
            self._hashing.update(self._diff_and_layout, block)
            recording.layout.bound(recording.uncompressed)  # the headers announced, in check
            recording = None
        else:
            self._add_diff(block)
        if self._diff_pending:
            self._drain_diff()
        # Empty unless chunked: members use the output.
        chunks = compressor.compress(block)
        if recording is not None:
            self._record_block(recording, block, last=partial)
            recording.layout.bound(recording.uncompressed)  # the headers announced, in check
        if shared and self._pos < BLOCK_SIZE:
            self._start = self._pos  # only the part after it is written from now on
        else:
            if block is self._block or isinstance(block, memoryview):
                # The block itself or a view of it went on (a copy did not: it is
                # written over). The compressor, the hashing or a worker's socket may
                # still hold it: write into one nobody holds any more, or a new one.
                self._block = self._next_block(self._block)
                self._view = memoryview(self._block)
            self._pos = self._start = 0
        self._emit([(None, chunk) for chunk in chunks] or self._output.take_ready())

    def _handed_on(self, *, partial: bool, shared: bool) -> bytearray | memoryview:
        """The bytes of the block to hand on: the block, a view of it, or a copy."""
        if shared:
            # A block in shared memory goes on as a view, even a partial one (a
            # worker reads it in place); filling goes on after it, or in a new
            # block once this one is full.
            return memoryview(self._block)[self._start : self._pos]
        if not partial:
            return cast("bytearray", self._block)
        if self._pos >= _PARTIAL_AS_VIEW and self._chunked is None:
            # A member's big last block goes on as a view of the block, not a copy
            # (the block is then retired like a full one); a small one is copied,
            # cheaper than a block taken out of use.
            return self._view[: self._pos]
        return cast("bytearray", self._block[: self._pos])

    def _next_block(self, done: bytearray | mmap.mmap | None) -> bytearray | mmap.mmap:
        """The block to fill after ``done``: the oldest handed on and released since, or a new one.

        A block is released when nothing refers to it but the list of handed-on
        blocks: every holder (a task's arguments, the hashing queue, a view of
        it, a buffer a C call reads with Python's lock released) counts in its
        reference count.  Reusing blocks saves zeroing a new 1 MiB buffer, and
        faulting its pages in, for every block of the layer.  A chunked layer
        with worker processes fills blocks in their shared memory while it
        has one free (the same count decides), then blocks of its own.
        """
        if self._shared is not None:
            slot = self._shared.take(BLOCK_SIZE)
            if slot is not None:
                return slot
        if not isinstance(done, bytearray):
            return bytearray(BLOCK_SIZE)  # the first block, or after a shared one
        retired = self._retired
        retired.append(done)
        if len(retired) > 1:
            oldest = retired[0]
            if released(oldest):
                retired.popleft()
                return oldest
            if len(retired) > _RETIRED_BLOCKS:
                retired.popleft()  # still held: the holder keeps it alive, not us
        return bytearray(BLOCK_SIZE)

    def _record_block(
        self, recording: _Recording, block: bytes | bytearray | memoryview, *, last: bool = False
    ) -> None:
        """The layout's running CRC-32 after ``block``: the compressor's, when it has it.

        A member's ``last`` block, partial, is buffered by its compressor
        until the member is finished: its CRC-32 is taken from the
        compressor then (:meth:`_record_tail`), not computed a second time
        here (about 75 MB of tails, 3-4 ms, for the 300 MB benchmark closure).
        A chunked layer's blocks go to the thread hashing the ``diff_id``,
        right after their sha256 update: the CRC-32 reads them there while
        they are still in the CPU's cache, off the packing thread (the
        layout waits for them before it is encoded: ``_Seal``).
        """
        recording.uncompressed += len(block)
        if self._chunked is not None:
            self._hashing.update(_LayoutBlocks(recording.layout), block)
            return
        reports = self._member_crc
        if reports is not None:
            crc, length = reports.running_crc32
            if length == recording.uncompressed:  # it took the whole block (not buffered)
                recording.layout.block_crc(crc, len(block))
                return
            if last:
                recording.tail = block
                return
        recording.layout.block(block)

    def _record_tail(self, recording: _Recording) -> None:
        """The last block's CRC-32, from the finished member's compressor (which counted it)."""
        tail, recording.tail = recording.tail, None
        reports = self._member_crc
        if tail is None:
            return
        if reports is not None:
            crc, length = reports.running_crc32
            if length == recording.uncompressed:
                recording.layout.block_crc(crc, len(tail))
                return
        recording.layout.block(tail)  # pragma: no cover - a compressor that did not count it

    def _emit(self, chunks: list[tuple[object, bytes]]) -> None:
        for given, chunk in chunks:
            tag, crc = given, None
            if type(given) is Checksummed:  # its CRC-32 taken on the pool (begin)
                tag, crc = given.tag, given.crc
            if isinstance(tag, _Done):
                recording = tag.recording
                self._recordings.remove(recording)
                recording.writer.keep(recording.uncompressed)  # a failure logged: a miss
                continue
            if isinstance(tag, _Recording):
                writer = tag.writer
                if writer.offset is None:  # its first byte: where it starts in the blob
                    writer.offset = self._size
                if crc is not None and tag.checksummed is not None:
                    tag.checksummed(len(chunk), crc)
                else:
                    writer.add(chunk)
            if not self._passthrough and self._blob_digest is None:
                self._hashing.update(self._digest, chunk)
            self._size += len(chunk)
            self._out.append(chunk)
            self._out_len += len(chunk)
        if self._out_len >= WRITE_SIZE:
            self._flush_output()

    def _flush_output(self) -> None:
        data = self._out[0] if len(self._out) == 1 else b"".join(self._out)
        self._out = []
        self._out_len = 0
        self._write(data)


#: Whether compressors of a type keep their input's CRC-32, by type: checking a
#: Protocol with isinstance takes about 14 microseconds, once per fragment.
_REPORTS_CRC32: dict[type, bool] = {}


def _reports_crc32(compressor: StreamCompressor) -> bool:
    kind = type(compressor)
    known = _REPORTS_CRC32.get(kind)
    if known is None:
        known = _REPORTS_CRC32[kind] = isinstance(compressor, ReportsCrc32)
    return known


def _layout_failed(layout: LayoutRecorder, exc: Exception) -> None:
    """Recording a fragment's layout failed: it keeps none (logged), the pack goes on."""
    log.warning("a fragment's layout not kept: recording it failed (%s)", exc)
    layout.seal(whole=False)


class _LayoutBlocks:
    """A recorded chunked fragment's blocks, queued: the layout's CRC-32s (a failure costs
    the fragment its layout, never the pack)."""

    __slots__ = ("failed", "layout")

    def __init__(self, layout: LayoutRecorder) -> None:
        self.layout = layout
        self.failed = False

    def update(self, data: bytes | bytearray | memoryview, /) -> None:
        if self.failed:
            return
        try:
            self.layout.block(data)
        except Exception as exc:  # noqa: BLE001 - a recording's failure is a miss, never the pack's
            self.failed = True
            _layout_failed(self.layout, exc)


class _DiffAndLayout(_LayoutBlocks):
    """A recorded chunked fragment's block, queued once: the ``diff_id``'s sha256 (its
    failure fails the pack), then the layout's CRC-32 (the block still in the CPU's cache)."""

    __slots__ = ("diff",)

    def __init__(self, diff: hashlib._Hash, layout: LayoutRecorder) -> None:
        super().__init__(layout)
        self.diff = diff

    def update(self, data: bytes | bytearray | memoryview, /) -> None:
        self.diff.update(data)
        super().update(data)


class _Seal:
    """Queued after a recorded fragment's last block: its layout has every block's CRC-32."""

    __slots__ = ("layout",)

    def __init__(self, layout: LayoutRecorder) -> None:
        self.layout = layout

    def update(self, _data: bytes | bytearray | memoryview, /) -> None:
        try:
            self.layout.seal()
        except Exception as exc:  # noqa: BLE001 - a recording's failure is a miss, never the pack's
            _layout_failed(self.layout, exc)

    def drop(self) -> None:
        """Dropped unapplied (the stream failed): sealed as incomplete, so nothing waits."""
        self.layout.seal(whole=False)


class _OrderedHashing:
    """sha256 updates, in the order given, on the build's pool (or inline without one).

    hashlib releases the GIL, so hashing the tar and the blob overlaps with
    reading files and compressing.  Updates queue up and one drain task at a
    time applies them in order (a drain holds ``_busy``); when more than a
    few blocks' bytes are queued, or at :meth:`wait`, the producing thread
    drains itself, so memory stays bounded and a pool busy with other layers
    never stalls the stream.  The caller never changes a buffer it handed
    over.  Counted in bytes, not updates: a chunked layer also queues small
    ones (a recorded range's checksums and commit, its layout's seal), which
    must not make the producing thread drain sooner.

    An update that raises (the ``diff_id``'s or the blob's hash; a recording's
    items catch their own failures, dropping what they recorded: the cache
    only saves work) does not stop the queue: the updates
    after it are applied all the same (the ``diff_id`` misses none), and the
    first failure is raised on the producing thread at its next
    :meth:`update` or :meth:`wait`, as it would be if it had been applied
    there (the pack fails, with that exception, whichever thread met it).
    """

    _MAX_QUEUED = 8 * BLOCK_SIZE

    def __init__(self, executor: WorkerPool | None) -> None:
        self._executor = executor
        #: Updates queued, each with the bytes it counts in the backlog (``_bytes``).
        self._queue: deque[tuple[Updated, bytes | bytearray | memoryview, int]] = deque()
        #: Bytes of the updates queued (those that ride along count none).
        self._bytes = 0
        self._lock = threading.Lock()
        self._busy = threading.Lock()
        self._scheduled = False
        #: The first exception an update raised, for the producing thread.
        self._failure: Exception | None = None

    def update(self, digest: Updated, data: bytes | bytearray | memoryview) -> None:
        if self._executor is None:
            digest.update(data)
            return
        if self._failure is not None:
            _drop(digest)  # refused, as close() drops what is queued: nothing waits for it
            raise self._failure
        with self._lock:
            self._queue.append((digest, data, len(data)))
            self._bytes += len(data)
            backlog = self._bytes
            schedule = not self._scheduled
            self._scheduled = True
        if schedule:
            self._executor.submit(self._drain)
        if backlog > self._MAX_QUEUED:
            self._drain()

    def ride_along(self, digest: Updated, data: bytes | bytearray | memoryview) -> None:
        """As :meth:`update`, but wakes no pool thread: applied in order by the next drain
        (the one the next :meth:`update` schedules, or :meth:`wait`'s).

        For a recording's small items that follow the blocks anyway (a recorded
        range's checksums and commit): given as :meth:`update`, each that found
        the queue idle woke a pool thread for itself (about 120 more drains, 350
        against 240, in a cold eStargz pack of the 300 MB benchmark closure).
        Their bytes do not count toward the backlog that makes the producing
        thread drain itself: they wait only for the next block (each one a
        CRC-32 of bytes already in memory, about a twentieth of a sha256's cost);
        counted, they made it drain several times a pack instead of about once.
        """
        if self._executor is None:
            digest.update(data)
            return
        if self._failure is not None:
            _drop(digest)
            raise self._failure
        with self._lock:
            self._queue.append((digest, data, 0))

    def _drain(self) -> None:
        with self._busy:
            while True:
                with self._lock:
                    if not self._queue:
                        self._scheduled = False
                        return
                    digest, data, counted = self._queue.popleft()
                    self._bytes -= counted
                try:
                    digest.update(data)
                except Exception as exc:  # noqa: BLE001 - raised by wait() / update(), not here
                    if self._failure is None:
                        self._failure = exc

    def wait(self) -> None:
        """Every update given so far is applied when this returns (or one raised: raised)."""
        self._drain()
        if self._failure is not None:
            raise self._failure

    def close(self) -> None:
        """Drop what is queued (the stream failed); a running drain finishes first.

        A dropped update with a ``drop`` method (a recording's) is told so: a
        layout sealed after dropped blocks is sealed as incomplete (none is
        kept), so nothing waits for it; a fragment's commit drops what it
        recorded (its TOC part's file, if written).
        """
        with self._busy, self._lock:
            dropped = list(self._queue)
            self._queue.clear()
            self._bytes = 0
        for digest, _data, _counted in dropped:
            _drop(digest)


def _drop(digest: Updated) -> None:
    """An update never applied: one with a ``drop`` method (a recording's) is told, and drops
    what it kept (a layout sealed as incomplete, a fragment's recorded parts)."""
    drop = getattr(digest, "drop", None)
    if drop is not None:
        drop()


def _frame_format(spec: CompressorSpec, mtime: int) -> FrameFormat:
    if spec.compression == "estargz":
        return EStargzFormat(
            frame_compressor(spec),
            mtime=mtime,
            stream_member=frame_stream(spec),
            compress_members=frames_compressor(spec),
        )
    return ZstdChunkedFormat(
        frame_compressor(spec), frames_compressor(spec), stream_frame=frame_stream(spec)
    )


#: The most threads a layer packed on its own uses by default, whatever the CPU count.
MAX_THREADS = 8


class _Inflate(Protocol):
    @property
    def eof(self) -> bool: ...

    def inflate(self, data: bytes) -> Iterator[bytes]: ...


def _decompressor(spec: CompressorSpec) -> _Inflate:
    """A decompressor for members of ``spec``'s format, a bounded step of output at a time
    (:class:`~nixery_core.inflating.MembersInflater`; any gzip backend reads gzip).

    A zstd frame may declare no larger window than ``spec``'s level gives
    (:func:`~nixery_core.compression.zstd_window`): one declaring more is
    refused, never allocated.
    """
    if spec.compression in ("zstd", "zstd-chunked"):
        return MembersInflater(zstd=True, max_window=zstd_window(spec.level))
    if spec.compression in ("gzip", "estargz"):
        return MembersInflater(zstd=False)
    return _Identity()


class _Identity:
    eof = True

    def inflate(self, data: bytes) -> Iterator[bytes]:
        if data:
            yield data


class _FragmentInflater:
    """A cached fragment's uncompressed bytes: a bounded step at a time, never more than its
    recorded size.  Bytes that do not inflate (damaged, or a zstd frame declaring a larger
    window than its level gives), or to another size, drop the fragment from its cache and
    raise :class:`~nixery_core.errors.BadCachedFragment` naming it (a fragment kept without
    inflating it: a bucket reference, a range of a blob)."""

    def __init__(self, spec: CompressorSpec, fragment: CachedFragment, source: bytes) -> None:
        self._members = _decompressor(spec)
        self._fragment = fragment
        self._source = source
        self._expected = fragment.uncompressed_size
        self.produced = 0

    def inflate(self, data: bytes) -> Iterator[bytes]:
        """What the fragment's next compressed bytes inflate to, in steps."""
        try:
            for out in self._members.inflate(data):
                self.produced += len(out)
                if self.produced > self._expected:
                    self._check(eof=False)
                yield out
        except INFLATE_ERRORS as exc:
            raise self._fragment.refused(
                f"does not decompress ({exc})", os.fsdecode(self._source)
            ) from exc

    def finish(self) -> None:
        """Every byte was given: raise unless the fragment inflated whole to its size."""
        self._check(eof=self._members.eof)

    def _check(self, *, eof: bool) -> None:
        if self.produced != self._expected or not eof:
            raise self._fragment.refused(
                f"decompresses to {self.produced}{'' if eof else ' or more'} bytes, not the "
                f"{self._expected} recorded",
                os.fsdecode(self._source),
            )


#: Cached fragments up to this many uncompressed bytes are inflated whole on the pool.
_PARALLEL_INFLATE = 8 << 20
#: Uncompressed bytes (rebuilt or inflated here) that may wait for a fragment still
#: inflating on the pool before the packing thread waits for it: memory stays bounded
#: however fast the bytes after it come.
_MAX_DIFF_WAITING = 8 << 20


def _inflate_whole(
    spec: CompressorSpec, data: bytes, fragment: CachedFragment, source: bytes
) -> bytes:
    """One cached fragment inflated at once (on a pool thread)."""
    inflate = _FragmentInflater(spec, fragment, source)
    out = b"".join(inflate.inflate(data))
    inflate.finish()
    return out


def _thread_count(threads: int | None) -> int:
    if threads is None:
        return min(MAX_THREADS, frame_processes.usable_cpus())
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
        raise InvalidInput(f"threads must be a positive int or None, not {threads!r}")
    return threads


def directory_identity(st: os.stat_result) -> tuple[int, int, int, int, int]:
    """What changes when a directory gains, loses or renames an entry (or is replaced)."""
    return (st.st_dev, st.st_ino, st.st_nlink, st.st_mtime_ns, st.st_ctime_ns)


def _display(member: bytes) -> str:
    """The absolute path of a member, for error messages."""
    return "/" + os.fsdecode(member)


def _read_error(path: str, exc: OSError) -> LayerError:
    import errno  # noqa: PLC0415 - only needed on the error path

    if exc.errno in (errno.ENOENT, errno.ENOTDIR, errno.ELOOP, errno.ENXIO):
        return FileChangedDuringPacking(path)
    return LayerError(f"cannot read {path}: {exc.strerror or exc}")


# --- store paths -------------------------------------------------------------


_P = ParamSpec("_P")


def _drops_frames_on_failure(pack: Callable[_P, PackedLayer]) -> Callable[_P, PackedLayer]:
    """``pack``, whose exceptions hold none of its buffers: the locals of the frames they
    passed through are dropped (:func:`traceback.clear_frames`; the traceback still prints).

    A caller keeping the exception (a registry's last error, a test) would otherwise keep
    the pack's tar blocks and windows alive through its traceback, and with them a slot of
    the frame workers' shared memory each (:mod:`nixery_core.shared_buffers`): a dozen
    kept exceptions and shared memory was used up for the process.  Only the exceptions
    raised within the pack: the chain stops at the one the caller was handling when it
    called (a pack inside an ``except`` block), whose frames are the caller's.
    """

    @functools.wraps(pack)
    def dropping(*args: _P.args, **kwargs: _P.kwargs) -> PackedLayer:
        handling = sys.exc_info()[1]
        try:
            return pack(*args, **kwargs)
        except BaseException as exc:
            seen: set[int] = set()
            failure: BaseException | None = exc
            # And what it was raised from, back to what the caller was handling.
            while failure is not None and failure is not handling and id(failure) not in seen:
                seen.add(id(failure))
                traceback.clear_frames(failure.__traceback__)
                failure = failure.__cause__ or failure.__context__
            raise

    return dropping


@_drops_frames_on_failure
def pack_store_paths(
    paths: Sequence[str],
    write: _WriteFn,
    options: ArchiveOptions,
    *,
    store_root: Path = Path("/"),
    threads: int | None = None,
    executor: WorkerPool | None = None,
    fragments: FragmentSource | None = None,
    blob_digest: _DigestFn | None = None,
) -> PackedLayer:
    """Pack store paths into one layer, streaming the blob into ``write``.

    ``paths`` are absolute (``/nix/store/<hash>-name``), in any order,
    duplicates ignored; each is read from ``store_root / path.lstrip("/")``.
    Blocks are compressed and hashed in parallel on ``executor`` (a build's
    one :class:`~nixery_core.workers.WorkerPool`, shared by every layer it
    packs); without one, on a pool of ``threads`` opened for this layer
    (default: the CPUs this process may run on, at most
    :data:`MAX_THREADS`).  Neither ever changes the bytes.  ``fragments``
    reuses store paths compressed before, in any layer, and keeps the ones
    compressed now (:mod:`nixery_core.fragments`); the bytes are the same
    with or without it.  ``blob_digest``, when ``write`` is a sink that
    hashes what it is given (a blob writer offering
    :class:`~nixery_core.protocols.SupportsWrittenDigest`), returns that
    hash: the layer's digest is then taken from it and the blob is hashed
    once, not twice.  See the module docstring for the format and the
    errors.
    """
    spec = options.compressor()
    tops = [_top_level(path, store_root) for path in _store_names(paths)]
    cache = fragments if spec.compression != "none" else None
    parameters = options.parameters() if cache is not None else {}
    keys = fragment_keys((full for _, full, _ in tops), parameters) if cache is not None else []
    # A chunked layer's fragment has a second part: its TOC entries (fragment_toc.py).
    toc_keys = (
        fragment_keys((full for _, full, _ in tops), toc_part_parameters(parameters))
        if cache is not None and spec.chunked
        else []
    )
    if cache is not None:
        # A remote tier fetches what it has, in the order the pack needs it.
        pairs = zip(keys, toc_keys, strict=True) if toc_keys else ((key,) for key in keys)
        wanted = [key for pair in pairs for key in pair]
        if spec.backend == "zstd" and isinstance(cache, SupportsFrameWindow):
            # Fetched frames are held to this level's window, as the pack holds them.
            cache.prefetch_window(wanted, sides=toc_keys, window=zstd_window(spec.level))
        else:
            cache.prefetch(wanted, sides=toc_keys)
    with _TarStream(write, spec, threads, options.mtime, executor, blob_digest=blob_digest) as tar:
        scratch = memoryview(bytearray(max(_SMALL_FILE, _HASH_CHUNK)))
        tar.begin(small=True)
        tar.put(tar.headers(b"nix/", 0o755, 0, _DIRTYPE))
        tar.put(tar.headers(b"nix/store/", 0o755, 0, _DIRTYPE))
        tar.end()
        for index, (member, full, kind) in enumerate(tops):
            recording = None
            if cache is not None:
                key = keys[index]
                with cache.get(key) as found:
                    if found is not None and not toc_keys:
                        if tar.put_cached(found, full):
                            continue
                    elif found is not None:
                        # The TOC part: a small copy beside the frames, read as a stream.
                        with cache.get(toc_keys[index], side=True) as toc:
                            if toc is not None and tar.put_cached(found, full, toc):
                                continue
                recording = _Recording(cache.writer(key), LayoutRecorder(member))
                if toc_keys:
                    recording.toc = cache.writer(toc_keys[index], side=True)
            tar.begin(recording)
            _pack_tree(tar, member, full, kind, _SameContent(_SMALL_FILE, scratch))
            tar.end()
        tar.begin(small=True)  # the end of the archive is a fragment of its own
        return tar.finish(options.media_type)


def _store_names(paths: Sequence[str]) -> list[str]:
    if isinstance(paths, str):
        raise InvalidInput("paths must be a sequence of store paths, not one string")
    names = set()
    for path in paths:
        name = path[len(_STORE_PREFIX) :] if isinstance(path, str) else ""
        if (
            not isinstance(path, str)
            or not path.startswith(_STORE_PREFIX)
            or not name
            or "/" in name
            or "\0" in name
            or name in (".", "..")
        ):
            raise UnsafeStoreContent(str(path), "not a store path of the form /nix/store/<name>")
        names.add(path)
    return sorted(names, key=os.fsencode)


_Kind = Literal["dir", "file", "symlink"]


def _top_level(path: str, store_root: Path) -> tuple[bytes, bytes, _Kind]:
    full = os.fsencode(store_root / path.lstrip("/"))
    try:
        st = os.lstat(full)
    except FileNotFoundError:
        raise StorePathMissing(path) from None
    except OSError as exc:
        raise LayerError(f"cannot read {path}: {exc.strerror or exc}") from exc
    return os.fsencode(path.lstrip("/")), full, _kind(st.st_mode, path)


def _kind(mode: int, path: str) -> _Kind:
    if stat.S_ISDIR(mode):
        return "dir"
    if stat.S_ISREG(mode):
        return "file"
    if stat.S_ISLNK(mode):
        return "symlink"
    what = {
        stat.S_IFIFO: "a fifo",
        stat.S_IFSOCK: "a socket",
        stat.S_IFCHR: "a character device",
        stat.S_IFBLK: "a block device",
    }.get(stat.S_IFMT(mode), f"a file of type {stat.S_IFMT(mode):o}")
    raise UnsafeStoreContent(path, f"it is {what}; layers hold only files, directories, symlinks")


def _entry_kind(entry: os.DirEntry[bytes], member: bytes) -> _Kind:
    try:
        if entry.is_symlink():
            return "symlink"
        if entry.is_dir(follow_symlinks=False):
            return "dir"
        if entry.is_file(follow_symlinks=False):
            return "file"
        mode = entry.stat(follow_symlinks=False).st_mode
    except OSError as exc:
        raise _read_error(_display(member), exc) from exc
    return _kind(mode, _display(member))


_by_name = attrgetter("name")


def _pack_tree(
    tar: _TarStream,
    member: bytes,
    full: bytes,
    kind: _Kind,
    same: _SameContent,
) -> None:
    """Depth first, children in byte order of their names."""
    stack: list[tuple[bytes, bytes, _Kind | os.DirEntry[bytes]]] = [(member, full, kind)]
    while stack:
        member, full, item = stack.pop()
        kind = item if isinstance(item, str) else _entry_kind(item, member)
        if kind == "file":
            _pack_file(tar, member, full, same)
        elif kind == "symlink":
            try:
                target = os.readlink(full)  # noqa: PTH115 - bytes in, bytes out: the target is not decoded
            except OSError as exc:
                raise _read_error(_display(member), exc) from exc
            tar.put(tar.headers(member, 0o777, 0, _SYMTYPE, linkname=target))
        else:
            tar.put(tar.headers(member + b"/", 0o555, 0, _DIRTYPE))
            try:
                before = os.lstat(full)
                with os.scandir(full) as listing:
                    children = sorted(listing, key=_by_name)
                after = os.lstat(full)
            except OSError as exc:
                raise _read_error(_display(member), exc) from exc
            if directory_identity(before) != directory_identity(after):
                # An entry came or went while listing (Nix's GC deleting it):
                # never a smaller layer.
                raise FileChangedDuringPacking(_display(member))
            prefix = member + b"/"
            stack.extend(
                (prefix + child.name, child.path, child) for child in reversed(children)
            )


_OPEN_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
#: Files up to this size are read whole into memory and hashed as they are packed.
_SMALL_FILE = 16 << 10
#: Larger files are hashed only when an earlier file has their size: read whole
#: into a buffer of this size when they fit it, else hashed through it first.
_HASH_CHUNK = 1 << 20


@attrs.frozen
class _Unhashed:
    """A large file written without hashing it: how to hash it later, and see it changed."""

    member: bytes
    full: bytes
    #: (st_dev, st_ino, st_size, st_mtime_ns) when it was written.
    identity: tuple[int, int, int, int]


def _identity(st: os.stat_result) -> tuple[int, int, int, int]:
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


class _SameContent:
    """For each file of one layer, the earlier member with the same content and mode.

    The first member (in archive order) with a given content and normalised
    mode carries the bytes; later ones become tar hard links to it.  Inodes
    play no part, so an optimised store (``nix-store --optimise``) and an
    unoptimised one give the same layer.  Empty files are always stored:
    a link header is no smaller than an empty file's, and linking them would
    only tie unrelated files together.

    Hashing costs little: a file of at most :data:`_SMALL_FILE` bytes is read
    once, whole, into the tar block (or :attr:`scratch` where the block has
    no room) and hashed from there, so the bytes packed are the bytes hashed.
    A larger file is hashed only when an earlier file of the same size and
    mode exists; that earlier file is then hashed too, if it was not yet, by
    opening it again (:class:`_Unhashed`).  Such a file is read whole the
    same way when it fits :attr:`scratch` (1 MiB); a bigger one is hashed
    first and packed after, the hash of the packed bytes compared with it.
    Zero-length files never reach this class.
    """

    def __init__(self, small: int, scratch: memoryview | None = None) -> None:
        self.small = small
        # One buffer for every store path of a layer (they are packed one after
        # another): a new zeroed 1 MiB per store path cost more than its files.
        if scratch is None:
            scratch = memoryview(bytearray(max(small, _HASH_CHUNK)))
        self.scratch = scratch
        #: sha256 -> the first member with that content, for 0444 and 0555 files.
        self._first: tuple[dict[bytes, bytes], dict[bytes, bytes]] = ({}, {})
        #: size * 2 + executable -> the unhashed first large file of that size
        #: and mode, or None once every large file of that size is in ``_first``.
        self._large: dict[int, _Unhashed | None] = {}

    def claim(self, digest: bytes, mode: int, member: bytes) -> bytes | None:
        """The earlier member with this content and mode; None (and ``member`` noted) if new."""
        first = self._first[mode == 0o555].setdefault(digest, member)
        return None if first is member else first

    def seen_size(self, st: os.stat_result, mode: int, member: bytes, full: bytes) -> bool:
        """Whether an earlier large file had this size and mode; if so, it is now hashed.

        When none had, ``member`` is noted as the unhashed first of its size.
        """
        key = st.st_size * 2 + (mode == 0o555)
        if key not in self._large:
            self._large[key] = _Unhashed(member, full, _identity(st))
            return False
        earlier = self._large[key]
        if earlier is not None:
            self.claim(_rehash(earlier, self.scratch), mode, earlier.member)
            self._large[key] = None
        return True


def _pack_file(tar: _TarStream, member: bytes, full: bytes, same: _SameContent) -> None:
    fd = _open(full, member)
    try:
        before = os.fstat(fd)
        if not stat.S_ISREG(before.st_mode):
            raise FileChangedDuringPacking(_display(member))
        mode = 0o555 if before.st_mode & stat.S_IXUSR else 0o444
        size = before.st_size
        if size == 0:
            tar.put(tar.headers(member, mode, 0, _REGTYPE))
            _check_unchanged(fd, before, member)
        elif size <= same.small:
            _pack_whole(tar, fd, before, mode=mode, member=member, same=same)
        elif not same.seen_size(before, mode, member, full):
            _write_content(tar, fd, before, mode=mode, member=member, digest=None)
        elif size <= len(same.scratch):
            _pack_whole(tar, fd, before, mode=mode, member=member, same=same)
        else:
            # Hashed before anything is written: a duplicate becomes a link.
            digest = _hash_fd(fd, size, same.scratch, member)
            _check_unchanged(fd, before, member)
            first = same.claim(digest, mode, member)
            if first is not None:
                tar.put(tar.headers(member, mode, 0, _LNKTYPE, linkname=first))
            else:
                written = _write_content(
                    tar, fd, before, mode=mode, member=member, digest=hashlib.sha256()
                )
                if written != digest:
                    raise FileChangedDuringPacking(_display(member))
    finally:
        os.close(fd)


def _pack_whole(
    tar: _TarStream,
    fd: int,
    before: os.stat_result,
    *,
    mode: int,
    member: bytes,
    same: _SameContent,
) -> None:
    """Read whole, hash, then write either the bytes read or a link.

    The bytes are read straight into the tar block, behind room for the
    header, when they fit there (else into the scratch buffer).
    """
    size = before.st_size
    header = tar.headers(member, mode, size, _REGTYPE)
    staged = tar.staging(len(header), size)
    data = same.scratch[:size] if staged is None else staged
    done = 0
    while done < size:
        try:
            got = os.readv(fd, (data[done:],))
        except OSError as exc:
            raise _read_error(_display(member), exc) from exc
        if not got:
            raise FileChangedDuringPacking(_display(member))
        done += got
    _check_unchanged(fd, before, member)
    first = same.claim(hashlib.sha256(data).digest(), mode, member)
    if first is not None:
        tar.put(tar.headers(member, mode, 0, _LNKTYPE, linkname=first))
    elif staged is not None:
        tar.commit(header, size)
    else:
        tar.put(header)
        tar.put_file(data)
        tar.pad(size)


def _write_content(
    tar: _TarStream,
    fd: int,
    before: os.stat_result,
    *,
    mode: int,
    member: bytes,
    digest: hashlib._Hash | None,
) -> bytes | None:
    """Stream a file into the layer as a regular member; its sha256 if ``digest`` is given."""
    size = before.st_size
    tar.put(tar.headers(member, mode, size, _REGTYPE))
    if tar.read_file(fd, size, member, digest) != size:
        raise FileChangedDuringPacking(_display(member))
    _check_unchanged(fd, before, member)
    tar.pad(size)
    return None if digest is None else digest.digest()


def _rehash(earlier: _Unhashed, scratch: memoryview) -> bytes:
    """The sha256 of a file packed earlier, which must be the file it was then."""
    fd = _open(earlier.full, earlier.member)
    try:
        before = os.fstat(fd)
        if _identity(before) != earlier.identity:
            raise FileChangedDuringPacking(_display(earlier.member))
        digest = _hash_fd(fd, before.st_size, scratch, earlier.member)
        _check_unchanged(fd, before, earlier.member)
    finally:
        os.close(fd)
    return digest


def _hash_fd(fd: int, size: int, scratch: memoryview, member: bytes) -> bytes:
    """sha256 of the first ``size`` bytes of ``fd`` (read with ``preadv``: the offset stays)."""
    digest = hashlib.sha256()
    offset = 0
    while offset < size:
        want = min(len(scratch), size - offset)
        try:
            got = os.preadv(fd, (scratch[:want],), offset)
        except OSError as exc:
            raise _read_error(_display(member), exc) from exc
        if not got:
            raise FileChangedDuringPacking(_display(member))
        digest.update(scratch[:got])
        offset += got
    return digest.digest()


def _open(full: bytes, member: bytes) -> int:
    try:
        return os.open(full, _OPEN_FLAGS)
    except OSError as exc:
        raise _read_error(_display(member), exc) from exc


def _check_unchanged(fd: int, before: os.stat_result, member: bytes) -> None:
    after = os.fstat(fd)
    if after.st_size != before.st_size or after.st_mtime_ns != before.st_mtime_ns:
        raise FileChangedDuringPacking(_display(member))


# --- synthesised entries -----------------------------------------------------


def _entry_key(entry: TarEntry) -> tuple[bytes, ...]:
    return tuple(os.fsencode(part) for part in entry.path.split("/"))


@_drops_frames_on_failure
def pack_entries(
    entries: Iterable[TarEntry],
    write: _WriteFn,
    options: ArchiveOptions,
    *,
    threads: int | None = None,
    executor: WorkerPool | None = None,
    blob_digest: _DigestFn | None = None,
) -> PackedLayer:
    """Pack synthesised entries into one layer, streaming the blob into ``write``.

    ``threads``, ``executor`` and ``blob_digest`` as for :func:`pack_store_paths`.  See the
    module docstring for ordering, added parents and hard links.
    """
    spec = options.compressor()
    ordered = _complete_entries(entries)
    carrier = _hard_link_carriers(ordered)
    with _TarStream(write, spec, threads, options.mtime, executor, blob_digest=blob_digest) as tar:
        tar.begin()
        for entry in ordered:
            name = os.fsencode(entry.path)
            if entry.kind in ("dir", "symlink"):
                tar.put(
                    tar.headers(
                        name + b"/" if entry.kind == "dir" else name,
                        entry.mode & 0o7777,
                        0,
                        _DIRTYPE if entry.kind == "dir" else _SYMTYPE,
                        uid=entry.uid,
                        gid=entry.gid,
                        linkname=os.fsencode(entry.target),
                    )
                )
                continue
            source = entry if entry.kind == "file" else carrier[entry.target][1]
            first_path = carrier[source.path][0]
            mode, uid, gid = source.mode & 0o7777, source.uid, source.gid
            if first_path != entry.path:
                link = os.fsencode(first_path)
                tar.put(tar.headers(name, mode, 0, _LNKTYPE, uid=uid, gid=gid, linkname=link))
            else:
                size = len(source.data)
                tar.put(tar.headers(name, mode, size, _REGTYPE, uid=uid, gid=gid))
                tar.put(source.data)
                tar.pad(len(source.data))
        return tar.finish(options.media_type)


def _complete_entries(entries: Iterable[TarEntry]) -> list[TarEntry]:
    by_path: dict[str, TarEntry] = {}
    for entry in entries:
        if not isinstance(entry, TarEntry):
            raise InvalidInput(f"expected a TarEntry, got {entry!r}")
        if entry.path in by_path:
            raise InvalidInput(f"duplicate tar entry {entry.path!r}")
        if entry.kind != "file" and entry.data:
            raise InvalidInput(f"tar entry {entry.path!r} is a {entry.kind} but has data")
        if (entry.kind in ("symlink", "hardlink")) != bool(entry.target):
            raise InvalidInput(
                f"tar entry {entry.path!r}: a target is needed by links and only by links"
            )
        if entry.uid < 0 or entry.gid < 0 or not 0 <= entry.mode <= 0o7777:
            raise InvalidInput(f"tar entry {entry.path!r} has a negative owner or bad mode")
        by_path[entry.path] = entry
    for path in list(by_path):
        parts = path.split("/")
        for depth in range(1, len(parts)):
            parent = "/".join(parts[:depth])
            existing = by_path.get(parent)
            if existing is None:
                by_path[parent] = TarEntry(parent, "dir", 0o755)
            elif existing.kind != "dir":
                raise InvalidInput(
                    f"tar entry {path!r} is inside {parent!r}, which is a {existing.kind}"
                )
    return sorted(by_path.values(), key=_entry_key)


def _hard_link_carriers(ordered: list[TarEntry]) -> dict[str, tuple[str, TarEntry]]:
    """For each file in a hard-link group: (the group's first path, the file entry)."""
    files = {entry.path: entry for entry in ordered if entry.kind == "file"}
    carrier: dict[str, tuple[str, TarEntry]] = {}
    for entry in ordered:  # archive order, so the first member of a group comes first
        if entry.kind == "file":
            carrier.setdefault(entry.path, (entry.path, entry))
        elif entry.kind == "hardlink":
            source = files.get(entry.target)
            if source is None:
                raise InvalidInput(
                    f"hard link {entry.path!r} must name a file entry, not {entry.target!r}"
                )
            carrier.setdefault(source.path, (entry.path, source))
    return carrier
