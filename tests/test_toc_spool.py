"""The TOC spool: chunked layers keep their table of contents on disk, not in memory."""

from __future__ import annotations

import hashlib
import json
import tarfile
import tracemalloc
import zlib
from pathlib import Path
from typing import Any, Literal

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nixery_core.archive import ArchiveOptions
from nixery_core.chunked import ChunkedCompressor, compact_json
from nixery_core.compression import frame_compressor
from nixery_core.estargz import EStargzFormat
from nixery_core.toc_spool import TocSpool
from nixery_core.zstd_chunked import ZstdChunkedFormat

zstandard = pytest.importorskip("zstandard")

_NAMES = st.text(
    st.characters(codec="utf-8") | st.sampled_from("\x00\x7f\"\\é\udcff"), max_size=12
)
_ENTRIES = st.lists(
    st.fixed_dictionaries({"name": _NAMES, "type": st.just("reg"), "size": st.integers(0, 2**40)}),
    max_size=20,
)


@settings(max_examples=100, deadline=None)
@given(_ENTRIES, st.integers(1, 64))
def test_the_document_is_the_whole_toc_json(entries: list[dict[str, Any]], limit: int) -> None:
    """Entries spooled one by one (spilling to a file) read back as compact_json of the TOC."""
    spool = TocSpool(limit=limit)
    try:
        for entry in entries:
            spool.add(compact_json(entry))
        whole = compact_json({"version": 1, "entries": entries})
        assert spool.size == len(whole)
        assert spool.entries == len(entries)
        assert spool.document(b"<", b">") == b"<" + whole + b">"
    finally:
        spool.close()


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="needs /proc/self/fd")
def test_close_frees_the_spilled_file() -> None:
    """A spool that spilled holds one unnamed file until closed, and none after."""
    before = _open_fds()
    spool = TocSpool(limit=8)
    for n in range(10):
        spool.add(compact_json({"name": f"file{n}"}))
    opened = _open_fds() - before
    assert len(opened) == 1
    target = str(Path(f"/proc/self/fd/{opened.pop()}").readlink())
    assert target.endswith("(deleted)") or "/#" in target  # no name left behind
    spool.close()
    spool.close()
    assert not _open_fds() - before


def _open_fds() -> set[str]:
    """This process's open file descriptors (not the one listing them)."""
    return {fd.name for fd in Path("/proc/self/fd").iterdir() if fd.exists()}


def _member(name: str, data: bytes) -> bytes:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mode = 0o644
    return info.tobuf(tarfile.USTAR_FORMAT, "utf-8", "strict") + data + bytes(-len(data) % 512)


def _compressor(compression: Literal["estargz", "zstd-chunked"]) -> ChunkedCompressor:
    """A chunked compressor on the calling thread, frames compressed one by one."""
    spec = ArchiveOptions(compression=compression).compressor()
    fmt: EStargzFormat | ZstdChunkedFormat
    if compression == "estargz":
        fmt = EStargzFormat(frame_compressor(spec), mtime=1)
    else:
        fmt = ZstdChunkedFormat(frame_compressor(spec))
    return ChunkedCompressor(fmt, mtime=1, executor=None, threads=1)


def _held_after(compressor: ChunkedCompressor, files: int, start: int) -> int:
    """Python heap in use after feeding ``files`` small files to ``compressor``."""
    for n in range(start, start + files):
        content = hashlib.sha256(b"%d" % n).digest() * (1 + n % 40)
        compressor.compress(_member(f"nix/store/x/file-{n:06d}", content))
    current, _peak = tracemalloc.get_traced_memory()
    return current


def _heap_growth(compressor: ChunkedCompressor) -> int:
    """How much more heap is in use after 10,000 more small files than after the first 1,000."""
    tracemalloc.start()
    try:
        first = _held_after(compressor, 1_000, 0)
        later = _held_after(compressor, 10_000, 1_000)
    finally:
        tracemalloc.stop()
    return later - first


@pytest.mark.parametrize("compression", ["estargz", "zstd-chunked"])
def test_the_toc_of_many_files_is_not_held_in_memory(
    compression: Literal["estargz", "zstd-chunked"],
) -> None:
    """Packing 10x more files leaves the heap about where it was: TOC entries are spooled."""
    compressor = _compressor(compression)
    # As dicts, the 10,000 entries took about 7 MB; spooled, the heap holds
    # at most the spool's 1 MiB buffer and the batch being framed.
    assert _heap_growth(compressor) < 3 * 1024 * 1024
    compressor.finish()
    assert compressor.trailer is not None


class _CountingRecorder:
    """A fragment recorder keeping only the size of what it is given (and the last piece)."""

    def __init__(self) -> None:
        self.size = 0
        self.last = b""
        self.committed: int | None = None

    def add(self, piece: bytes) -> None:
        self.size += len(piece)
        self.last = piece

    def commit(self, uncompressed_size: int) -> None:
        self.committed = uncompressed_size

    def discard(self) -> None:
        self.committed = None


@pytest.mark.parametrize("compression", ["estargz", "zstd-chunked"])
def test_a_recorded_fragment_of_many_files_is_not_held_in_memory(
    compression: Literal["estargz", "zstd-chunked"],
) -> None:
    """A store path of 11,000 files recorded as a fragment spools its TOC list too."""
    compressor = _compressor(compression)
    frames, toc = _CountingRecorder(), _CountingRecorder()
    compressor.begin_fragment(frames, toc)
    assert _heap_growth(compressor) < 3 * 1024 * 1024
    compressor.end_fragment()
    compressor.finish()
    assert toc.committed is not None
    assert frames.committed is not None
    raw = (
        zlib.decompress(toc.last, 31)
        if compression == "estargz"
        else zstandard.ZstdDecompressor().decompress(toc.last)
    )
    assert len(raw) == toc.committed
    assert len(json.loads(raw)) >= 11_000


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="needs /proc/self/fd")
def test_a_layer_stopped_midway_leaves_no_spool_open() -> None:
    """A chunked layer whose TOC spilled to a file frees it when the pack stops (close)."""
    compressor = _compressor("zstd-chunked")
    before = _open_fds()
    _held_after(compressor, 8_000, 0)  # about 2 MB of TOC JSON: past the 1 MiB in memory
    assert len(_open_fds() - before) == 1
    compressor.close()
    assert not _open_fds() - before
