"""The TOC spool: chunked layers keep their table of contents on disk, not in memory."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import struct
import subprocess
import sys
import tarfile
import tempfile
import tracemalloc
from pathlib import Path
from typing import Any, Literal

import pytest
from conftest import require_tools
from hypothesis import given, settings
from hypothesis import strategies as st

from nixery_core.archive import ArchiveOptions
from nixery_core.chunked import ChunkedCompressor, compact_json
from nixery_core.compression import frame_compressor, frame_stream
from nixery_core.estargz import FOOTER_SIZE, TOC_NAME, EStargzFormat
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
def test_the_pieces_are_the_whole_toc_json(entries: list[dict[str, Any]], limit: int) -> None:
    """Entries spooled one by one (spilling to a file) read back as compact_json of the TOC."""
    spool = TocSpool(limit=limit)
    try:
        for entry in entries:
            spool.add(compact_json(entry))
        whole = compact_json({"version": 1, "entries": entries})
        assert spool.size == len(whole)
        assert spool.entries == len(entries)
        assert b"".join(spool.pieces()) == whole
    finally:
        spool.close()


@settings(max_examples=100, deadline=None)
@given(st.lists(_ENTRIES, max_size=5), st.integers(1, 64))
def test_entries_spooled_many_at_once_are_the_toc_json_of_each_in_turn(
    groups: list[list[dict[str, Any]]], limit: int
) -> None:
    """Groups of entries encoded at once (compact_json of the list, brackets dropped) read back
    as the TOC of them all, escapes and surrogates included, with their count."""
    spool = TocSpool(limit=limit)
    try:
        for group in groups:
            spool.add_many(compact_json(group)[1:-1], len(group))
        entries = [entry for group in groups for entry in group]
        whole = compact_json({"version": 1, "entries": entries})
        assert (spool.size, spool.entries) == (len(whole), len(entries))
        assert b"".join(spool.pieces()) == whole
    finally:
        spool.close()


@settings(max_examples=100, deadline=None)
@given(_ENTRIES, _ENTRIES, st.integers(1, 64))
def test_a_rewound_spool_is_as_if_the_later_entries_never_came(
    kept: list[dict[str, Any]], dropped: list[dict[str, Any]], limit: int
) -> None:
    """Entries added after a mark and rewound (spilled to the file or not) leave the TOC of the
    entries before it, and entries added after the rewind follow them."""
    spool = TocSpool(limit=limit)
    try:
        for entry in kept:
            spool.add(compact_json(entry))
        mark = spool.mark()
        for entry in dropped:
            spool.add(compact_json(entry))
        spool.rewind(mark)
        spool.add(compact_json({"name": "after"}))
        whole = compact_json({"version": 1, "entries": [*kept, {"name": "after"}]})
        assert (spool.size, spool.entries) == (len(whole), len(kept) + 1)
        assert b"".join(spool.pieces()) == whole
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
        fmt = EStargzFormat(frame_compressor(spec), mtime=1, stream_member=frame_stream(spec))
    else:
        fmt = ZstdChunkedFormat(frame_compressor(spec), stream_frame=frame_stream(spec))
    return ChunkedCompressor(fmt, mtime=1, executor=None, threads=1)


def _held_after(compressor: ChunkedCompressor, files: int, start: int) -> int:
    """Python heap in use after feeding ``files`` small files to ``compressor``."""
    for n in range(start, start + files):
        content = hashlib.sha256(b"%d" % n).digest() * (1 + n % 40)
        compressor.compress(_member(f"nix/store/x/file-{n:06d}", content))
    current, _peak = tracemalloc.get_traced_memory()
    return current


def _ignore(_piece: bytes | bytearray) -> None:
    """A sink that drops what it is given."""


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
    assert compressor.finish(_ignore, _ignore)


class _FileRecorder:
    """A fragment recorder writing what it is given to an unnamed file (not to memory)."""

    def __init__(self) -> None:
        self.file = tempfile.TemporaryFile()  # noqa: SIM115 - closed by the test
        self.key = "recorded"
        self.offset: int | None = None
        self.committed: int | None = None

    def add(self, piece: bytes) -> None:
        self.file.write(piece)

    def commit(self, uncompressed_size: int) -> None:
        self.committed = uncompressed_size

    def discard(self) -> None:
        self.committed = None


@pytest.mark.parametrize("compression", ["estargz", "zstd-chunked"])
def test_a_recorded_fragment_of_many_files_is_not_held_in_memory(
    compression: Literal["estargz", "zstd-chunked"],
) -> None:
    """A store path of 11,000 files recorded as a fragment streams its TOC part too."""
    compressor = _compressor(compression)
    frames, toc = _FileRecorder(), _FileRecorder()
    with frames.file, toc.file:
        compressor.begin_fragment(frames, toc)
        assert _heap_growth(compressor) < 3 * 1024 * 1024
        compressor.end_fragment()
        compressor.finish(_ignore, _ignore)
        assert frames.offset == 0  # the fragment starts the blob
        assert frames.committed
        assert toc.committed is not None
        toc.file.seek(0)
        raw = toc.file.read()  # JSON Lines, kept plain (fragment_toc.py, layout 4)
        assert len(raw) == toc.committed
        first, *lines = raw.splitlines()
        assert json.loads(first) == {"start": 0}  # where the fragment starts in the layer
        entries = [entry for line in lines for entry in json.loads(b"[" + line + b"]")]
        assert len(entries) >= 11_000
        assert entries[-1]["name"] == "nix/store/x/file-010999"


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="needs /proc/self/fd")
def test_a_layer_stopped_midway_leaves_no_spool_open() -> None:
    """A chunked layer whose TOC spilled to a file frees it when the pack stops (close)."""
    compressor = _compressor("zstd-chunked")
    before = _open_fds()
    _held_after(compressor, 8_000, 0)  # about 2 MB of TOC JSON: past the 1 MiB in memory
    assert len(_open_fds() - before) == 1
    compressor.close()
    assert not _open_fds() - before


def _format(compression: Literal["estargz", "zstd-chunked"]) -> EStargzFormat | ZstdChunkedFormat:
    spec = ArchiveOptions(compression=compression).compressor()
    if compression == "estargz":
        return EStargzFormat(frame_compressor(spec), mtime=1, stream_member=frame_stream(spec))
    return ZstdChunkedFormat(frame_compressor(spec), stream_frame=frame_stream(spec))


def _spooled(entries: int, limit: int = 1 << 20) -> TocSpool:
    """A spool of ``entries`` TOC entries about as long and as varied as real ones (~250 bytes)."""
    spool = TocSpool(limit)
    for n in range(entries):
        digest = hashlib.sha256(b"%d" % n).hexdigest().encode()
        spool.add(
            b'{"name":"nix/store/%s-pkg-%d/share/file-%d","type":"reg","size":%d,'
            b'"modtime":"1970-01-01T00:00:01Z","mode":420,"digest":"sha256:%s",'
            b'"offset":%d,"endOffset":%d}'
            % (digest[:32], n // 50, n, n * 37 % 10**5, digest, n * 901, n * 901 + 7)
        )
    return spool


def _end_of_layer(
    compression: Literal["estargz", "zstd-chunked"], spool: TocSpool
) -> tuple[bytes, bytes, tuple[tuple[str, str], ...]]:
    """The trailer's compressed bytes, tar bytes and annotations, each joined."""
    written: list[bytes | bytearray] = []
    tar: list[bytes | bytearray] = []
    annotations = _format(compression).trailer(spool, 1000, 5000, written.append, tar.append)
    return b"".join(written), b"".join(tar), annotations


def _peak_of_end(compression: Literal["estargz", "zstd-chunked"], entries: int) -> int:
    """Peak Python heap while the trailer of ``entries`` entries is written, the spool aside."""
    spool = _spooled(entries)
    try:
        tracemalloc.start()
        try:
            base, _peak = tracemalloc.get_traced_memory()
            _format(compression).trailer(spool, 1000, 5000, _ignore, _ignore)
            _current, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
    finally:
        spool.close()
    return peak - base


@pytest.mark.parametrize("compression", ["estargz", "zstd-chunked"])
def test_the_end_of_a_layer_does_not_grow_with_its_entries(
    compression: Literal["estargz", "zstd-chunked"],
) -> None:
    """Writing the TOC of 200,000 entries (57 MB of JSON) peaks where 20,000 entries do."""
    small, large = _peak_of_end(compression, 20_000), _peak_of_end(compression, 200_000)
    # Read back whole, as before, the larger TOC alone took 57 MB and its
    # compressed copy 5-10 MB more; streamed, a piece or two of 1 MiB.
    assert large < small + 1024 * 1024
    assert large < 6 * 1024 * 1024


#: A child writing the end of a layer of argv[2] entries in both formats, then its peak RSS.
_END_CHILD = """
import sys
from pathlib import Path
sys.path.insert(0, sys.argv[1])
import test_toc_spool as t
spool = t._spooled(int(sys.argv[2]))
for compression in ("estargz", "zstd-chunked"):
    t._format(compression).trailer(spool, 1000, 5000, t._ignore, t._ignore)
spool.close()
status = Path("/proc/self/status").read_text().splitlines()
print(next(int(line.split()[1]) for line in status if line.startswith("VmHWM:")))
"""


def _peak_rss_kb(entries: int) -> int:
    child = [sys.executable, "-c", _END_CHILD, str(Path(__file__).parent), str(entries)]
    return int(subprocess.run(child, capture_output=True, text=True, check=True).stdout)


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs /proc/self/status")
def test_the_end_of_a_layer_peaks_at_the_same_rss_for_10x_the_entries() -> None:
    """A process writing 200,000 entries' TOC peaks within 8 MB of one writing 20,000 (C too)."""
    # Read back whole, as before, the larger TOC alone added 55 MB.
    assert _peak_rss_kb(200_000) < _peak_rss_kb(20_000) + 8 * 1024


@settings(max_examples=8, deadline=None)
@given(limit=st.integers(1, 3 << 20))
def test_the_end_of_a_layer_does_not_depend_on_where_the_spool_spilled(limit: int) -> None:
    """The same 2.7 MB TOC spooled with any memory limit gives the same trailer and annotations."""
    for compression in ("estargz", "zstd-chunked"):
        spool, reference = _spooled(10_000, limit), _spooled(10_000)
        try:
            assert _end_of_layer(compression, spool) == _end_of_layer(compression, reference)
        finally:
            spool.close()
            reference.close()


def test_a_toc_of_many_pieces_is_read_by_gzip_tar_and_zstd() -> None:
    """A 5.7 MB TOC (six pieces, past zstd's window) is read back by the CLIs and tarfile."""
    require_tools("gzip", "zstd", "tar")
    spool = _spooled(20_000)
    try:
        document = b"".join(spool.pieces())
        blob, tar, annotations = _end_of_layer("estargz", spool)
        member = subprocess.run(
            ["gzip", "-dc"], input=blob, capture_output=True, check=True
        ).stdout
        assert member == tar
        listing = subprocess.run(
            ["tar", "-tvf", "-"], input=member, capture_output=True, check=True
        ).stdout
        assert TOC_NAME.encode() in listing
        with tarfile.open(fileobj=io.BytesIO(gzip.decompress(blob[:-FOOTER_SIZE]))) as archive:
            extracted = archive.extractfile(TOC_NAME)
            assert extracted is not None
            assert extracted.read() == document
        assert dict(annotations)["containerd.io/snapshot/stargz/toc.digest"] == (
            "sha256:" + hashlib.sha256(document).hexdigest()
        )

        blob, tar, annotations = _end_of_layer("zstd-chunked", spool)
        assert tar == bytes(1024)
        offset, length, size, _kind = struct.unpack("<QQQQ", blob[-40:-8])
        frame = blob[offset - 1000 : offset - 1000 + length]  # offsets count from 1000
        assert size == len(document)
        assert zstandard.frame_content_size(frame) == size
        assert subprocess.run(
            ["zstd", "-dcq"], input=frame, capture_output=True, check=True
        ).stdout == document
        whole = subprocess.run(["zstd", "-dcq"], input=blob, capture_output=True, check=True)
        assert whole.stdout == bytes(1024)  # the TOC is in a skippable frame
        assert dict(annotations)["io.containers.zstd-chunked.manifest-checksum"] == (
            "sha256:" + hashlib.sha256(frame).hexdigest()
        )
    finally:
        spool.close()
