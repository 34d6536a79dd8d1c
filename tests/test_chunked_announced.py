"""Headers the archive writer announces to a chunked layer (nixery_core.chunked).

The writer tells the chunked compressor what each header it made says
(:meth:`~nixery_core.chunked.ChunkedCompressor.announce`), so the header is
taken whole instead of parsed back.  These tests pin that the layers are
byte-identical to the ones the parser alone makes, on trees chosen to make
headers hard: names that need a ustar prefix or a pax record, names that are
not UTF-8, long and non-ASCII link targets, owners past the octal fields,
hard links, empty files, and files whose sizes put headers on block and
chunk boundaries.
"""

from __future__ import annotations

import io
import os
import tarfile
from collections.abc import Callable
from pathlib import Path

import pytest
from test_chunked_formats import _pack_paths

from nixery_core.archive import (
    ArchiveOptions,
    PackedLayer,
    _frame_format,
    pack_entries,
)
from nixery_core.chunked import CHUNK_MAX, CHUNK_MIN, ChunkedCompressor, HeaderFields
from nixery_core.compression import BLOCK_SIZE
from nixery_core.entries import TarEntry

FORMATS = ("estargz", "zstd-chunked")

_Packer = Callable[[int], tuple[bytes, PackedLayer]]


def _bytes(size: int, seed: int) -> bytes:
    """Bytes that are the same for the same size and seed, and differ between seeds."""
    return (b"%d:" % seed + bytes(range(256)) * (size // 256 + 1))[:size]


def make_hostile_store(root: Path) -> list[str]:
    """A store whose headers are hard to write and to parse, and whose sizes hit boundaries."""
    store = root / "nix" / "store"
    names = store / "cccccccccccccccccccccccccccccccc-names"
    split = names / ("s" * 80) / ("t" * 60)  # over 100 bytes: a ustar prefix holds the start
    split.mkdir(parents=True)
    (split / "file").write_bytes(b"under a prefix\n")
    unsplit = names / ("u" * 120) / ("v" * 120)  # no split fits: a pax path record
    unsplit.mkdir(parents=True)
    (unsplit / ("w" * 120)).write_bytes(b"under a pax path\n")
    (names / "caf\u00e9-\u00fcml\u00e4ut").write_bytes(b"not ASCII\n")
    raw = names / os.fsdecode(b"raw-\xff\xfe-dir")  # not UTF-8
    raw.mkdir()
    (raw / os.fsdecode(b"raw-\xfa.txt")).write_bytes(b"raw name\n")
    (names / "long-link").symlink_to("x" * 300)  # a pax linkpath record
    (names / "accented-link").symlink_to("caf\u00e9-\u00fcml\u00e4ut")
    (names / "raw-link").symlink_to(os.fsdecode(b"raw-\xff\xfe-dir"))
    (names / "empty").write_bytes(b"")
    (names / "empty-too").write_bytes(b"")
    (names / "same-a").write_bytes(b"duplicate content\n" * 100)
    (names / "same-b").write_bytes(b"duplicate content\n" * 100)  # a hard link to same-a
    sizes = store / "dddddddddddddddddddddddddddddddd-sizes"
    sizes.mkdir(parents=True)
    # Each file's size puts the next header on a block boundary, a chunk boundary,
    # one byte either side of them, or makes the file exactly one or two chunks.
    boundary = [
        CHUNK_MIN - 1, CHUNK_MIN, CHUNK_MIN + 1, CHUNK_MAX, CHUNK_MAX + 1,
        BLOCK_SIZE - 512, BLOCK_SIZE - 1024, BLOCK_SIZE, BLOCK_SIZE + 1,
        3 * BLOCK_SIZE - 512 * 3, 511, 512, 513, 1,
    ]  # fmt: skip
    for i, size in enumerate(boundary):
        (sizes / f"f{i:02d}-{size}").write_bytes(_bytes(size, i))
    for i in range(40):  # many small members: headers land on every offset of a block
        (sizes / "many" / f"{i % 7}").mkdir(parents=True, exist_ok=True)
        (sizes / "many" / f"{i % 7}" / f"n{i}").write_bytes(_bytes(100 + 997 * i, 100 + i))
    # Past the chunker's window: cut while it streams in, headers after it in a later block.
    (sizes / "zz-huge").write_bytes(_bytes(5 * BLOCK_SIZE + 12_345, 999))
    return sorted("/nix/store/" + p.name for p in store.iterdir())


@pytest.fixture(scope="module")
def hostile_store(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[str]]:
    root = tmp_path_factory.mktemp("announced-store")
    return root, make_hostile_store(root)


@pytest.fixture
def parsed_only(monkeypatch: pytest.MonkeyPatch) -> Callable[[], None]:
    """Makes the chunked compressor ignore announcements: every header parsed back."""

    def ignore(_self: ChunkedCompressor, _pending: int, _header: bytes, _f: HeaderFields) -> None:
        return None

    return lambda: monkeypatch.setattr(ChunkedCompressor, "announce", ignore)


def _store_packer(store: tuple[Path, list[str]], compression: str) -> _Packer:
    root, paths = store
    return lambda threads: _pack_paths(root, paths, compression, threads=threads)


def _count_taken(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Counts headers taken whole from announcements (appended to the list returned)."""
    taken: list[int] = []
    original = ChunkedCompressor._take_known

    def counting(self: ChunkedCompressor, view: memoryview, out: list[bytes]) -> int:
        size = original(self, view, out)
        if size:
            taken.append(size)
        return size

    monkeypatch.setattr(ChunkedCompressor, "_take_known", counting)
    return taken


@pytest.mark.parametrize("compression", FORMATS)
def test_announced_headers_give_the_parsed_layer(
    hostile_store: tuple[Path, list[str]],
    compression: str,
    parsed_only: Callable[[], None],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A layer whose headers were announced is byte-identical to one whose headers were parsed."""
    pack = _store_packer(hostile_store, compression)
    taken = _count_taken(monkeypatch)
    announced = {threads: pack(threads) for threads in (1, 2)}
    assert len(taken) > 100  # the announcements were used, not parsed around
    parsed_only()
    for threads, layer in announced.items():
        assert pack(threads) == layer


@pytest.mark.parametrize("compression", FORMATS)
def test_headers_are_taken_as_announced_in_shared_blocks_too(
    hostile_store: tuple[Path, list[str]], compression: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With worker processes (tar blocks in shared memory, filled on after each store path's
    partial flush) every header announced on one thread is taken as announced."""
    pack = _store_packer(hostile_store, compression)
    taken = _count_taken(monkeypatch)
    pack(1)
    alone = len(taken)
    taken.clear()
    pack(2)
    assert len(taken) == alone


@pytest.mark.parametrize("compression", FORMATS)
def test_announced_synthesised_entries_give_the_parsed_layer(
    compression: str, parsed_only: Callable[[], None]
) -> None:
    """Synthesised entries (owners past the octal fields, pax records) give the parsed layer."""
    entries = [
        TarEntry("etc", "dir", 0o755, uid=2**21, gid=5),
        TarEntry("etc/passwd", "file", 0o644, data=b"root:x:0:0::/root:/bin/sh\n", uid=2**22),
        TarEntry("etc/big", "file", 0o600, data=_bytes(3 * CHUNK_MAX, 7), uid=1, gid=2**23),
        TarEntry("etc/link", "hardlink", 0o644, target="etc/passwd"),
        TarEntry("etc/" + "n" * 150, "symlink", 0o777, target="passwd" * 30),
        TarEntry("home/\u00e9t\u00e9", "file", 0o644, data=b""),
    ]

    def pack_bytes() -> tuple[bytes, PackedLayer]:
        out = io.BytesIO()
        options = ArchiveOptions(compression=compression)  # type: ignore[arg-type]
        packed = pack_entries(entries, out.write, options, threads=2)
        return out.getvalue(), packed

    announced = pack_bytes()
    parsed_only()
    assert pack_bytes() == announced


def test_a_header_not_written_where_announced_is_parsed() -> None:
    """An announcement whose bytes are not at its offset is ignored: the header is parsed."""
    spec = ArchiveOptions(compression="zstd-chunked").compressor()

    def layer(announce: bool) -> tuple[bytes, bytes, object]:
        compressor = ChunkedCompressor(_frame_format(spec, 1), mtime=1, executor=None, threads=1)
        header = _ustar(b"nix/store/x-a/file", 5)
        if announce:
            # Other bytes than those written there, and the header where it is not.
            other = _ustar(b"nix/store/x-a/other", 5)
            compressor.announce(0, other, (b"wrong", 0o444, 99, b"0", 0, 0, b""))
            compressor.announce(512, header, (b"wrong", 0o444, 99, b"0", 0, 0, b""))
        out: list[bytes | bytearray] = [*compressor.compress(header + b"hello" + bytes(507))]
        tail: list[bytes | bytearray] = []
        annotations = compressor.finish(out.append, tail.append)
        return b"".join(out), b"".join(tail), annotations

    assert layer(True) == layer(False)


def test_a_header_after_a_pax_header_not_announced_is_parsed() -> None:
    """An announced header after a pax header of its own is parsed: the pax records speak for it."""
    spec = ArchiveOptions(compression="zstd-chunked").compressor()
    info = tarfile.TarInfo("nix/store/x-a/file")
    info.size = 5
    info.mode = 0o444
    info.mtime = 1
    info.uid = 2**22  # past the octal field: a pax uid record, the header says 0
    member = info.tobuf(tarfile.PAX_FORMAT, "utf-8", "strict")
    header = member[-512:]

    def layer(announce: bool) -> tuple[bytes, bytes, object]:
        compressor = ChunkedCompressor(_frame_format(spec, 1), mtime=1, executor=None, threads=1)
        if announce:  # the ustar header alone, with what it says without the pax record
            at = len(member) - len(header)
            compressor.announce(at, header, (b"nix/store/x-a/file", 0o444, 5, b"0", 0, 0, b""))
        out: list[bytes | bytearray] = [*compressor.compress(member + b"hello" + bytes(507))]
        tail: list[bytes | bytearray] = []
        annotations = compressor.finish(out.append, tail.append)
        return b"".join(out), b"".join(tail), annotations

    assert layer(True) == layer(False)


def _ustar(name: bytes, size: int) -> bytes:
    """A ustar header as the archive writer makes it (through tarfile: an independent writer)."""
    info = tarfile.TarInfo(name.decode())
    info.size = size
    info.mode = 0o444
    info.mtime = 1
    return info.tobuf(tarfile.USTAR_FORMAT, "utf-8", "strict")
