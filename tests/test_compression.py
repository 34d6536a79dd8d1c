"""nixery_core.compression: deterministic block gzip (ISA-L and zlib), zstd, none."""

from __future__ import annotations

import gzip
import hashlib
import itertools
import json
import os
import struct
import subprocess
import sys
import threading
import zlib
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nixery_core import compression
from nixery_core.compression import (
    BLOCK_SIZE,
    GZIP_HEADER,
    STREAM_PIECE,
    CompressorSpec,
    frame_compressor,
    frame_stream,
    open_compressor,
    resolve_compressor,
)
from nixery_core.errors import InvalidInput, LayerError, MissingEncoder

isal = pytest.importorskip("isal", reason="the isal backend is tested where isal is installed")
zstandard = pytest.importorskip("zstandard")


def _sample(size: int, seed: int = 0) -> bytes:
    """Compressible but varied bytes: text lines mixed with hash noise."""
    parts = []
    total = 0
    i = 0
    while total < size:
        part = (
            b"%d: lorem ipsum dolor sit amet %x\n" % (i, i * 7919)
            if i % 3
            else hashlib.sha256(b"%d-%d" % (seed, i)).digest()
        )
        parts.append(part)
        total += len(part)
        i += 1
    return b"".join(parts)[:size]


def _compress(spec: CompressorSpec, data: bytes, cuts: list[int] | None = None,
              threads: int = 1) -> bytes:
    """Feed ``data`` split at ``cuts`` and return the whole output."""
    bounds = [0, *sorted(cuts or []), len(data)]
    executor = ThreadPoolExecutor(threads) if threads > 1 else None
    try:
        compressor = open_compressor(spec, executor=executor, threads=threads)
        out = []
        for start, end in itertools.pairwise(bounds):
            out.extend(compressor.compress(data[start:end]))
        out.extend(compressor.finish())
        compressor.close()
    finally:
        if executor is not None:
            executor.shutdown()
    return b"".join(out)


@pytest.fixture
def fresh_resolution() -> Iterator[None]:
    """Resolution is cached per process; tests that fake a missing package clear it."""
    compression._resolve.cache_clear()
    yield
    compression._resolve.cache_clear()


@pytest.mark.parametrize("backend", ["isal", "zlib"])
def test_gzip_header_is_pinned(backend: str) -> None:
    """Both backends write the same gzip header: deflate, no flags, mtime 0, XFL 0, OS 255."""
    out = _compress(resolve_compressor("gzip", None, backend), b"hello")  # type: ignore[arg-type]
    magic, method, flags, mtime, xfl, os_byte = struct.unpack("<HBBIBB", out[:10])
    assert (magic, method, flags, mtime, xfl, os_byte) == (0x8B1F, 8, 0, 0, 0, 255)
    assert out[:10] == GZIP_HEADER


@pytest.mark.parametrize("backend", ["isal", "zlib"])
@pytest.mark.parametrize(
    "size", [0, 1, BLOCK_SIZE - 1, BLOCK_SIZE, BLOCK_SIZE + 1, 2 * BLOCK_SIZE + 12345]
)
def test_gzip_round_trips_with_valid_trailer(backend: str, size: int) -> None:
    """The output is one gzip member whose CRC-32 and ISIZE match the input."""
    data = _sample(size)
    out = _compress(resolve_compressor("gzip", None, backend), data)  # type: ignore[arg-type]
    assert gzip.decompress(out) == data
    assert zlib.decompress(out, wbits=31) == data
    crc, isize = struct.unpack("<II", out[-8:])
    assert (crc, isize) == (zlib.crc32(data), size)


def test_gzip_stream_is_readable_by_gunzip() -> None:
    """The system gzip accepts the stream (pigz-style blocks, sync flushes, empty final block)."""
    data = _sample(3 * BLOCK_SIZE // 2)
    out = _compress(resolve_compressor("gzip"), data)
    result = subprocess.run(["gzip", "-dc"], input=out, capture_output=True, check=True)
    assert result.stdout == data


@settings(max_examples=15, deadline=None)
@given(
    backend=st.sampled_from(["isal", "zlib"]),
    cuts=st.lists(st.integers(0, 2 * BLOCK_SIZE + 5000), max_size=6),
)
def test_gzip_output_does_not_depend_on_chunking(backend: str, cuts: list[int]) -> None:
    """However the input is split into calls, the bytes are the same (ISA-L alone would differ)."""
    data = _sample(2 * BLOCK_SIZE + 5000, seed=1)
    spec = resolve_compressor("gzip", 1, backend)  # type: ignore[arg-type]
    assert _compress(spec, data, cuts) == _compress(spec, data)


@pytest.mark.parametrize("backend", ["isal", "zlib"])
def test_gzip_output_does_not_depend_on_threads(backend: str) -> None:
    """Compressing blocks on 1, 2 or 3 threads gives the same bytes."""
    data = _sample(5 * BLOCK_SIZE + 77, seed=2)
    spec = resolve_compressor("gzip", 1, backend)  # type: ignore[arg-type]
    outputs = {_compress(spec, data, threads=n) for n in (1, 2, 3)}
    assert len(outputs) == 1


def test_isal_and_zlib_differ_only_inside_deflate_blocks() -> None:
    """Same framing and same content, different deflate bytes: why the backend is in the key."""
    data = _sample(BLOCK_SIZE + 999, seed=3)
    by_isal = _compress(resolve_compressor("gzip", 1, "isal"), data)
    by_zlib = _compress(resolve_compressor("gzip", 1, "zlib"), data)
    assert by_isal != by_zlib
    assert by_isal[:10] == by_zlib[:10]
    assert by_isal[-8:] == by_zlib[-8:]
    assert gzip.decompress(by_isal) == gzip.decompress(by_zlib) == data


_CHILD = """
import hashlib, sys
from nixery_core.compression import open_compressor, resolve_compressor
data = open(sys.argv[1], "rb").read()
for level in range(4):
    c = open_compressor(resolve_compressor("gzip", level, "isal"))
    out = b"".join([*c.compress(data), *c.finish()])
    print(level, hashlib.sha256(out).hexdigest())
"""


def test_isal_output_is_identical_in_a_separate_process(tmp_path: Path) -> None:
    """ISA-L gives the same bytes at every level in another process (no hidden state or seed)."""
    data = _sample(3 * BLOCK_SIZE, seed=4)
    (tmp_path / "data").write_bytes(data)
    here = []
    for level in range(4):
        out = _compress(resolve_compressor("gzip", level, "isal"), data)
        here.append(f"{level} {hashlib.sha256(out).hexdigest()}")
    there = subprocess.run(
        [sys.executable, "-c", _CHILD, str(tmp_path / "data")],
        capture_output=True, text=True, check=True,
    ).stdout.split("\n")
    assert here == there[:4]
    assert len({line.split()[1] for line in here}) == 4  # and the levels really differ


def test_levels_out_of_range_are_refused() -> None:
    """ISA-L has levels 0-3, zlib 0-9; anything else is InvalidInput naming the range."""
    with pytest.raises(InvalidInput, match=r"0\.\.3"):
        resolve_compressor("gzip", 6, "isal")
    with pytest.raises(InvalidInput, match=r"0\.\.9"):
        resolve_compressor("gzip", 10, "zlib")
    assert resolve_compressor("gzip", 9, "zlib").level == 9
    with pytest.raises(InvalidInput):
        resolve_compressor("lz4")  # type: ignore[arg-type]


@pytest.mark.usefixtures("fresh_resolution")
def test_missing_isal_is_a_typed_error_never_a_switch_to_zlib(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Without isal, auto and isal raise MissingEncoder naming it; only zlib by name is zlib."""
    assert resolve_compressor("gzip").backend == "isal"
    monkeypatch.setattr(compression, "_import_isal", lambda: None)
    compression._resolve.cache_clear()
    for backend in ("auto", "isal"):
        with pytest.raises(MissingEncoder, match="isal") as caught:
            resolve_compressor("gzip", None, backend)
        assert caught.value.package == "isal"
        assert isinstance(caught.value, ImportError)
    assert resolve_compressor("gzip", None, "zlib").backend == "zlib"


@pytest.mark.usefixtures("fresh_resolution")
def test_zstd_without_zstandard_says_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    """A missing zstandard package is a MissingEncoder naming it."""
    monkeypatch.setattr(compression, "_import_zstd", lambda: None)
    with pytest.raises(MissingEncoder, match="zstandard"):
        resolve_compressor("zstd")


def test_parameters_name_what_changes_the_bytes() -> None:
    """Backend, library, level and fingerprint are in the key; none has nothing else."""
    by_isal = resolve_compressor("gzip", 1, "isal").parameters()
    by_zlib = resolve_compressor("gzip", 1, "zlib").parameters()
    assert by_isal != by_zlib
    assert str(by_isal["library"]).startswith("isa-l ")
    assert by_zlib["library"] == f"zlib {zlib.ZLIB_RUNTIME_VERSION}"
    assert by_isal["fingerprint"] != resolve_compressor("gzip", 2, "isal").fingerprint
    assert resolve_compressor("none").parameters() == {"compression": "none"}
    json.dumps([by_isal, by_zlib, resolve_compressor("zstd").parameters()])


def test_fingerprint_is_the_digest_of_the_canary() -> None:
    """The fingerprint really is what this machine's compressor makes of the fixed sample."""
    spec = resolve_compressor("gzip", 2, "isal")
    canary = compression._canary()
    small_blocks = CompressorSpec(
        spec.compression, spec.backend, spec.level, spec.library, compression.WINDOW, "",
        spec.mem_level,
    )
    out = _compress(small_blocks, canary)
    assert gzip.decompress(out) == canary
    assert spec.fingerprint == hashlib.sha256(out).hexdigest()[:16]


@settings(max_examples=10, deadline=None)
@given(
    threads=st.sampled_from([1, 2, 4]),
    cuts=st.lists(st.integers(0, 3 * BLOCK_SIZE), max_size=4),
)
def test_zstd_output_does_not_depend_on_threads_or_chunking(threads: int, cuts: list[int]) -> None:
    """zstd runs in multi-threaded mode; any worker count and any chunking give the same bytes."""
    data = _sample(3 * BLOCK_SIZE, seed=5)
    spec = resolve_compressor("zstd")
    out = _compress(spec, data, cuts, threads=threads)
    assert out == _compress(spec, data, threads=1)
    assert zstandard.ZstdDecompressor().decompressobj().decompress(out) == data


def test_none_passes_bytes_through() -> None:
    """compression="none" returns the input unchanged."""
    data = os.urandom(1000)
    assert _compress(resolve_compressor("none"), data, [10, 500]) == data


#: The frames a chunked layer streams (its TOC): ISA-L at both levels eStargz
#: allows, zlib, and zstd.
_STREAMED = [
    pytest.param(("estargz", 3, "isal"), id="isal-3"),
    pytest.param(("estargz", 0, "isal"), id="isal-0"),
    pytest.param(("estargz", 1, "zlib"), id="zlib-1"),
    pytest.param(("zstd-chunked", 3, "auto"), id="zstd-3"),
]
#: Sizes around the pieces a streamed frame is fed in, deflate's window, zstd's
#: 128 KiB blocks and its 2 MiB window at level 3.
_EDGES = [
    1, 32 * 1024, 64 * 1024 + 1, 128 * 1024 - 1, 128 * 1024, 128 * 1024 + 1,
    STREAM_PIECE - 1, STREAM_PIECE, STREAM_PIECE + 1, 2 * STREAM_PIECE + 1, 3 * STREAM_PIECE + 7,
]


def _stream(settings: tuple[str, int, str], data: bytes, cuts: list[int]) -> bytes:
    """One frame of ``data`` from frame_stream, fed split at ``cuts``."""
    compression_, level, backend = settings
    spec = resolve_compressor(compression_, level, backend)  # type: ignore[arg-type]
    frame = frame_stream(spec)(len(data))
    bounds = [0, *sorted(cut % (len(data) + 1) for cut in cuts), len(data)]
    out = [frame.compress(data[start:end]) for start, end in itertools.pairwise(bounds)]
    return b"".join([*out, frame.finish()])


def _inflate(settings: tuple[str, int, str], frame: bytes) -> bytes:
    if settings[0] == "zstd-chunked":
        assert zstandard.frame_content_size(frame) > 0 or not frame  # its size is in the header
        whole: bytes = zstandard.ZstdDecompressor().decompressobj().decompress(frame)
        return whole
    assert frame[:10] == GZIP_HEADER
    crc, isize = struct.unpack("<II", frame[-8:])
    out = zlib.decompress(frame, wbits=31)
    assert (crc, isize) == (zlib.crc32(out), len(out))
    return out


@settings(max_examples=40, deadline=None)
@given(
    settings_=st.sampled_from([p.values[0] for p in _STREAMED]),
    size=st.sampled_from(_EDGES),
    cuts=st.lists(st.integers(0, 4 * STREAM_PIECE), max_size=5),
)
def test_a_streamed_frame_does_not_depend_on_how_it_is_fed(
    settings_: tuple[str, int, str], size: int, cuts: list[int]
) -> None:
    """frame_stream writes the same frame whatever the calls' sizes (ISA-L alone would not)."""
    data = _sample(size, seed=size)
    out = _stream(settings_, data, cuts)
    assert out == _stream(settings_, data, [])
    assert _inflate(settings_, out) == data


@pytest.mark.parametrize("settings_", _STREAMED)
def test_a_streamed_frame_is_read_by_the_gzip_and_zstd_cli(settings_: tuple[str, int, str]) -> None:
    """A frame of several pieces, past zstd's window, is one frame the system gzip and zstd read."""
    data = _sample(3 * STREAM_PIECE + 7, seed=9)
    out = _stream(settings_, data, [5, STREAM_PIECE + 3])
    tool = ["zstd", "-dcq"] if settings_[0] == "zstd-chunked" else ["gzip", "-dc"]
    assert subprocess.run(tool, input=out, capture_output=True, check=True).stdout == data


@pytest.mark.parametrize("level", [1, 6, 9])
def test_zlib_streams_the_bytes_it_writes_in_one_shot(level: int) -> None:
    """With zlib, a streamed frame is frame_compressor's (eStargz on zlib kept its TOC bytes)."""
    spec = resolve_compressor("estargz", level, "zlib")
    data = _sample(2 * STREAM_PIECE + 99, seed=level)
    assert _stream(("estargz", level, "zlib"), data, [77]) == frame_compressor(spec)(data)


@pytest.mark.parametrize("settings_", _STREAMED)
def test_a_streamed_frame_refuses_another_size(settings_: tuple[str, int, str]) -> None:
    """Bytes given that are not the size promised are a LayerError, not a wrong frame."""
    compression_, level, backend = settings_
    spec = resolve_compressor(compression_, level, backend)  # type: ignore[arg-type]
    for given_ in (b"abc", b"abcdef"):
        frame = frame_stream(spec)(4)
        frame.compress(given_)
        with pytest.raises(LayerError, match="given"):
            frame.finish()


@pytest.mark.parametrize("level", [-7, 1, 2, 3, 12])
def test_our_zstd_frames_declare_no_larger_window_than_their_level_gives(level: int) -> None:
    """Every zstd frame we write (a streamed member, with and without threads; a chunked
    layer's one-shot and streamed frames) declares at most compression.zstd_window(level),
    the bound our decoders of cached frames hold them to: none of ours is refused."""
    data = _sample(1 << 20, seed=level)
    frames = [
        _compress(resolve_compressor("zstd", level), data, threads=threads)
        for threads in (1, 2)
    ]
    spec = resolve_compressor("zstd-chunked", level)
    frames.append(frame_compressor(spec)(data[: 256 << 10]))
    frames.append(_stream(("zstd-chunked", level, "auto"), data, [STREAM_PIECE]))
    bound = compression.zstd_window(level)
    declared = [zstandard.get_frame_parameters(frame).window_size for frame in frames]
    assert max(declared) <= bound
    assert declared[0] == bound  # a streamed member's: the bound is no looser than needed


def _unfinished(count: int) -> list[Future[bytes]]:
    return [Future() for _ in range(count)]


def test_ordered_output_keeps_small_pieces_in_flight_up_to_its_bytes_not_its_count() -> None:
    # A layer of many small store paths hands over one small partial block per member: the
    # packing thread must not wait for the oldest while their bytes are under the limit.
    output = compression.OrderedOutput(2)
    small = _unfinished(12)
    for index, future in enumerate(small):
        output.add(index, future, 40_000)

    def finish() -> None:
        for future in small:
            future.set_result(b"x")

    finisher = threading.Timer(0.3, finish)
    finisher.start()
    try:
        assert output.take_ready() == []  # nothing done, 480 kB in flight: no wait
    finally:
        finisher.join()
    assert [tag for tag, _piece in output.take_ready()] == list(range(12))


def test_ordered_output_waits_for_the_oldest_once_its_bytes_exceed_the_limit() -> None:
    output = compression.OrderedOutput(2)
    blocks = _unfinished(3)
    for index, future in enumerate(blocks):
        output.add(index, future, compression.BLOCK_SIZE)  # 3 MiB against a 2 MiB limit
    threading.Timer(0.05, lambda: blocks[0].set_result(b"first")).start()
    assert output.take_ready() == [(0, b"first")]  # waited for it; 2 MiB left: no more
    blocks[2].set_result(b"third")
    assert output.take_ready() == []  # in order: the second is not done
    blocks[1].set_result(b"second")
    assert output.take_ready() == [(1, b"second"), (2, b"third")]


def test_ordered_output_bounds_the_number_of_pieces_in_flight_too() -> None:
    output = compression.OrderedOutput(1)
    tiny = _unfinished(compression._MAX_PIECES + 1)
    for index, future in enumerate(tiny):
        output.add(index, future, 1)
    threading.Timer(0.05, lambda: tiny[0].set_result(b"a")).start()
    assert [tag for tag, _piece in output.take_ready()] == [0]
    for future in tiny[1:]:
        future.cancel()


class _Recorder(ThreadPoolExecutor):
    """Runs tasks at once and notes the block each deflate was handed."""

    def __init__(self) -> None:
        super().__init__(1)
        self.blocks: list[object] = []

    def submit(self, fn, /, *args, **kwargs):  # type: ignore[no-untyped-def]  # Executor's own
        self.blocks.append(args[3])  # _deflate_block(module, level, mem_level, block, zdict)
        return super().submit(fn, *args, **kwargs)


@pytest.mark.parametrize("kind", [bytearray, memoryview])
def test_a_members_last_partial_block_is_deflated_as_handed_over_not_copied(kind: type) -> None:
    """The packer hands a member's last block over once; the member deflates that very
    buffer (no copy into its own pending bytes and out again), with the same bytes."""
    spec = resolve_compressor("gzip", None, "isal")
    data = _sample(BLOCK_SIZE + 300_000, seed=3)
    whole, tail = data[:BLOCK_SIZE], kind(bytearray(data[BLOCK_SIZE:]))
    with _Recorder() as executor:
        compressor = open_compressor(spec, executor=executor, threads=2)
        out = [*compressor.compress(whole), *compressor.compress(tail), *compressor.finish()]
        compressor.close()
    assert executor.blocks[0] is whole
    assert executor.blocks[1] is tail
    assert b"".join(out) == _compress(spec, data)
    assert gzip.decompress(b"".join(out)) == data


def test_a_partial_piece_followed_by_more_input_is_joined_into_full_blocks() -> None:
    """Input kept as handed over still joins what comes next: blocks are cut where they
    would be had it all come at once (the bytes depend on the input only)."""
    spec = resolve_compressor("gzip", None, "isal")
    data = _sample(3 * BLOCK_SIZE + 5_000, seed=4)
    pieces = [0, 200_000, 200_001, BLOCK_SIZE + 10, 2 * BLOCK_SIZE, 3 * BLOCK_SIZE]
    assert _compress(spec, data, pieces) == _compress(spec, data)
    assert _compress(spec, data, pieces, threads=2) == _compress(spec, data)
    assert gzip.decompress(_compress(spec, data, pieces)) == data
