"""eStargz and zstd:chunked fragments as byte ranges, and their TOC parts (fragment_toc.py).

A chunked layer's store path is kept as a range of the stored blob (its
frames) plus a small TOC part beside it, JSON Lines written and read a
record at a time.  Byte identity is checked against packs without any
cache; the real client reading such layers is tests/test_partial_pull.py.
"""

from __future__ import annotations

import io
import os
import random
import sqlite3
import subprocess
import sys
import tracemalloc
from collections.abc import Iterator
from pathlib import Path

import orjson
import pytest
import zstandard
from test_chunked_formats import FORMATS, make_store
from test_chunked_formats import _with_references as with_references

from nixery_core.archive import ArchiveOptions, PackedLayer, pack_store_paths
from nixery_core.cache import BuildCache
from nixery_core.chunked import ChunkedCompressor, compact_json
from nixery_core.compression import frame_compressor, frame_stream
from nixery_core.fragment_bucket import DEFAULT_MIN_SIZE, BucketFragments, FragmentBucketPolicy
from nixery_core.fragment_layout import FragmentLayout, rebuild
from nixery_core.fragment_toc import (
    MAX_LINE,
    MAX_LINE_ENTRIES,
    TOC_PART_LAYOUT,
    TocPartWriter,
    toc_part_lines,
    toc_part_parameters,
)
from nixery_core.fragments import FragmentCache, FragmentSource, fragment_key
from nixery_core.storage.filesystem import FilesystemStore
from nixery_core.testing.storage import MemoryStore
from nixery_core.zstd_chunked import ZstdChunkedFormat

_Layer = tuple[bytes, PackedLayer]


@pytest.fixture(scope="module")
def four_paths(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[str]]:
    """Four store paths: big and small files, several-chunk files, links, long names."""
    root = tmp_path_factory.mktemp("chunked-ranges")
    paths = make_store(root)
    store = root / "nix" / "store"
    for name, seed in (("c" * 32 + "-lib", 3), ("d" * 32 + "-app", 4)):
        (store / name / "share").mkdir(parents=True)
        (store / name / "share" / "data").write_bytes(with_references(400_000, seed, "kq"))
        (store / name / "share" / "small").write_bytes(b"small %d\n" % seed)
        paths.append("/nix/store/" + name)
    return root, sorted(paths)


def _options(compression: str) -> ArchiveOptions:
    return ArchiveOptions(compression=compression)  # type: ignore[arg-type]  # a str from the parameters


def _plain(root: Path, paths: list[str], compression: str, threads: int = 2) -> _Layer:
    """The layer packed without any fragment cache."""
    out = io.BytesIO()
    packed = pack_store_paths(paths, out.write, _options(compression), store_root=root,
                              threads=threads)
    return out.getvalue(), packed


def _copied(
    root: Path, paths: list[str], compression: str, cache: FragmentSource, threads: int = 2
) -> _Layer:
    """The layer packed through ``cache`` into memory (fragments kept as copies)."""
    out = io.BytesIO()
    packed = pack_store_paths(paths, out.write, _options(compression), store_root=root,
                              threads=threads, fragments=cache)
    return out.getvalue(), packed


def _stored(
    blobs: FilesystemStore, root: Path, paths: list[str], compression: str,
    cache: FragmentCache, *, threads: int = 2,
) -> _Layer:
    """The layer packed into ``blobs`` as a build does: its new fragments kept as ranges."""
    layer = cache.on_store(blobs).layer()
    options = _options(compression)
    with blobs.open_blob_writer(options.media_type) as writer:
        packed = pack_store_paths(paths, writer.write, options, store_root=root,
                                  threads=threads, fragments=layer)
        writer.commit(packed.digest)
    layer.stored(packed.digest)
    return blobs.read_blob(packed.digest), packed


def _rows(directory: Path) -> list[tuple[str, str | None, str | None]]:
    """(key, file, blob) of every row of a fragment index, read with sqlite3 directly."""
    with sqlite3.connect(directory / "index.sqlite") as con:
        return con.execute("SELECT key, file, blob FROM fragments").fetchall()


def _keys(root: Path, path: str, compression: str) -> tuple[str, str]:
    """The fragment keys of a store path's frames and of its TOC part."""
    parameters = _options(compression).parameters()
    full = os.fsencode(root / path.lstrip("/"))
    return (fragment_key(full, parameters),
            fragment_key(full, toc_part_parameters(parameters)))


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("compression", FORMATS)
def test_chunked_layers_are_the_same_bytes_cold_from_ranges_or_from_copies(
    four_paths: tuple[Path, list[str]], tmp_path: Path, compression: str, threads: int,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Layers {a,b} and {c,d} packed cold into a store keep their frames as ranges of their
    blobs and their TOC parts as copies; {a,c} and {b,d} assembled from those ranges, or from
    copies, are the bytes and annotations of packs without a cache, every store path's tar
    rebuilt from the store by its layout (none decompressed)."""
    root, paths = four_paths
    groups = [paths[:2], paths[2:]]
    regroups = [[paths[0], paths[2]], [paths[1], paths[3]]]
    expected = [_plain(root, g, compression, threads) for g in (*groups, *regroups)]
    blobs = FilesystemStore(tmp_path / "blobs", durable=False)
    with FragmentCache(tmp_path / "ranges") as cache:
        cold = [_stored(blobs, root, g, compression, cache, threads=threads) for g in groups]
        cache.flush()
        rows = _rows(cache.directory)
        frames = [_keys(root, path, compression)[0] for path in paths]
        assert sorted(key for key, _, blob in rows if blob is not None) == sorted(frames)
        # No frames copied: only TOC parts (plain, layout 4) past 32 KiB have files.
        assert all(file is None for _, file, blob in rows if blob is not None)
        assert len(rows) == 2 * len(paths)
        misses = cache.misses
        warm = [_stored(blobs, root, g, compression, cache, threads=threads) for g in regroups]
        assert cache.misses == misses
    with FragmentCache(tmp_path / "copies") as copies:
        copied = [_copied(root, g, compression, copies, threads) for g in (*groups, *regroups)]
        assert copies.misses == len(paths)
    assert [*cold, *warm] == expected
    assert copied == expected
    assert "differs from its cached fragment" not in caplog.text  # rebuilt, not inflated


@pytest.mark.parametrize("damage", ["deleted", "changed"])
@pytest.mark.parametrize("compression", FORMATS)
def test_a_chunked_range_whose_blob_was_deleted_or_changed_is_packed_again(
    four_paths: tuple[Path, list[str]], tmp_path: Path, compression: str, damage: str
) -> None:
    """A range of a blob deleted, or with a byte changed inside it, is a miss: the store path
    is compressed again and the layer is the same bytes."""
    root, paths = four_paths
    blobs = FilesystemStore(tmp_path / "blobs", durable=False)
    with FragmentCache(tmp_path / "fragments") as cache:
        first = _stored(blobs, root, paths[:2], compression, cache)[1]
        _stored(blobs, root, paths[2:], compression, cache)
        cache.flush()
        if damage == "deleted":
            blobs.delete_blob(first.digest)
        else:
            key = _keys(root, paths[0], compression)[0]
            with sqlite3.connect(cache.directory / "index.sqlite") as con:
                offset, size = con.execute(
                    "SELECT offset, size FROM fragments WHERE key = ?", (key,)
                ).fetchone()
            blob = blobs.blob_path(first.digest)
            blob.chmod(0o644)
            data = bytearray(blob.read_bytes())
            data[offset + size // 2] ^= 0xFF
            blob.write_bytes(bytes(data))
        misses = cache.misses
        regrouped = [paths[0], paths[2]]
        assert _stored(blobs, root, regrouped, compression, cache) == _plain(
            root, regrouped, compression
        )
        assert cache.misses == misses + 1


def _replace_toc_part(cache: FragmentCache, key: str, lines: list[bytes]) -> None:
    """Keep ``lines`` as the TOC part under ``key`` (its CRC-32 theirs: only its content is bad)."""
    writer = TocPartWriter(cache.writer(key, side=True))
    for line in lines:
        writer.add(line)
    writer.commit()
    cache.flush()


def _toc_part(cache: FragmentCache, key: str) -> list[bytes]:
    """The lines of the TOC part under ``key``."""
    with cache.get(key, side=True) as found:
        assert found is not None
        return list(toc_part_lines(found.pieces(), found.uncompressed_size))


def _toc_part_content(lines: list[bytes]) -> tuple[bytes, bytes]:
    """A TOC part's start line and its entries (comma-joined: lines group them by timing)."""
    return lines[0], b",".join(lines[1:])


@pytest.mark.parametrize(
    "damage",
    [b"garbage", b'{"name":"x","type":"reg","size":1,"offset":0,"endOffset":99999999}'],
    ids=["not-json", "outside"],
)
@pytest.mark.parametrize("compression", FORMATS)
def test_a_damaged_toc_part_record_is_a_miss_never_wrong_bytes(
    four_paths: tuple[Path, list[str]], tmp_path: Path, compression: str, damage: bytes
) -> None:
    """A TOC part whose last record is damaged (its CRC-32 intact) makes the store path a miss:
    it is packed again, the layer is the same bytes, and the part is replaced by a good one."""
    root, paths = four_paths
    path = paths[2]
    toc_key = _keys(root, path, compression)[1]
    with FragmentCache(tmp_path / "fragments") as cache:
        _copied(root, paths, compression, cache)
        cache.flush()
        good = _toc_part(cache, toc_key)
        _replace_toc_part(cache, toc_key, [*good, damage])
        assert _copied(root, paths, compression, cache) == _plain(root, paths, compression)
        cache.flush()
        assert _toc_part_content(_toc_part(cache, toc_key)) == _toc_part_content(good)
        again = cache.misses
        assert _copied(root, [path], compression, cache) == _plain(root, [path], compression)
        assert cache.misses == again  # the good part is found


@pytest.mark.parametrize("compression", FORMATS)
def test_toc_parts_of_the_earlier_layout_are_misses(
    four_paths: tuple[Path, list[str]], tmp_path: Path, compression: str
) -> None:
    """A cache holding only TOC parts of earlier layouts (one JSON list under the key without
    ``toc_layout``; layout 2; layout 3, the lines as one zstd frame) misses every store path:
    they are packed again, to the same bytes."""
    assert toc_part_parameters({})["toc_layout"] == TOC_PART_LAYOUT == 4
    root, paths = four_paths
    options = _options(compression)
    compress = frame_compressor(options.compressor())
    with FragmentCache(tmp_path / "fragments") as cache:
        _copied(root, paths, compression, cache)
        cache.flush()
        for path in paths:
            _, toc_key = _keys(root, path, compression)
            lines = _toc_part(cache, toc_key)
            with sqlite3.connect(cache.directory / "index.sqlite") as con:
                con.execute("DELETE FROM fragments WHERE key = ?", (toc_key,))
            document = b"[" + b",".join(lines) + b"]"
            full = os.fsencode(root / path.lstrip("/"))
            old = fragment_key(full, {**options.parameters(), "part": "toc"})
            cache.put(old, [compress(document)], len(document))
            two = fragment_key(full, {**options.parameters(), "part": "toc", "toc_layout": 2})
            _replace_toc_part(cache, two, lines)
            three = fragment_key(full, {**options.parameters(), "part": "toc", "toc_layout": 3})
            frame = _zstd_part(lines)
            cache.put(three, [frame], sum(len(line) + 1 for line in lines))
        misses = cache.misses
        assert _copied(root, paths, compression, cache) == _plain(root, paths, compression)
        assert cache.misses == misses + len(paths)


def _entries(count: int) -> Iterator[bytes]:
    """A TOC part's ``count`` entries about as long and as varied as real ones (~270 bytes)."""
    yield b'{"start":0}'
    for n in range(count):
        digest = b"%064x" % (n * 0x9E3779B97F4A7C15 % (1 << 256))
        yield compact_json({
            "name": f"nix/store/{'x' * 32}-pkg/share/doc/dir-{n // 100}/file-{n}.html",
            "type": "reg", "mode": 420, "size": n * 37 % 10**5,
            "modtime": "1970-01-01T00:00:01Z",
            "digest": "sha256:" + digest.decode(),
            "offset": n * 901, "endOffset": n * 901 + 900,
        })


def _record_and_reuse(directory: Path, count: int, *, trace: bool = True) -> int:
    """Record a store path's TOC part of ``count`` entries, then copy it into a layer's TOC;
    the peak Python heap of doing so above where it started (0 without ``trace``)."""
    with FragmentCache(directory) as cache:
        if trace:
            tracemalloc.start()
        try:
            base, _ = tracemalloc.get_traced_memory()
            writer = TocPartWriter(cache.writer("toc", side=True))
            for line in _entries(count):
                writer.add(line)
            writer.commit()
            cache.flush()
            spec = ArchiveOptions(compression="zstd-chunked").compressor()
            compressor = ChunkedCompressor(
                ZstdChunkedFormat(frame_compressor(spec), stream_frame=frame_stream(spec)),
                mtime=1, executor=None, threads=1,
            )
            with cache.get("toc", side=True) as found:
                assert found is not None
                lines = toc_part_lines(found.pieces(), found.uncompressed_size)
                assert compressor.put_fragment(lines, 0, count * 901) == []
            compressor.close()
            _, peak = tracemalloc.get_traced_memory()
        finally:
            if trace:
                tracemalloc.stop()
    return peak - base


def test_a_toc_part_of_100k_entries_is_recorded_and_reused_in_the_heap_of_10k(
    tmp_path: Path,
) -> None:
    """Recording a store path's TOC part and copying it into a layer peaks within 1 MiB of the
    heap for 10,000 entries with 100,000 (layout 1 parsed them into one list: about 76 MB of
    dicts beside 29 MB of JSON)."""
    small = _record_and_reuse(tmp_path / "small", 10_000)
    large = _record_and_reuse(tmp_path / "large", 100_000)
    assert large < small + 1024 * 1024
    assert large < 6 * 1024 * 1024


#: A child recording and reusing a TOC part of argv[2] entries, then printing its peak RSS.
_CHILD = """
import sys, tempfile
from pathlib import Path
sys.path.insert(0, sys.argv[1])
import test_fragment_toc as t
with tempfile.TemporaryDirectory() as directory:
    t._record_and_reuse(Path(directory), int(sys.argv[2]), trace=False)
status = Path("/proc/self/status").read_text().splitlines()
print(next(int(line.split()[1]) for line in status if line.startswith("VmHWM:")))
"""


def _peak_rss_kb(entries: int) -> int:
    child = [sys.executable, "-c", _CHILD, str(Path(__file__).parent), str(entries)]
    return int(subprocess.run(child, capture_output=True, text=True, check=True).stdout)


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs /proc/self/status")
def test_a_toc_part_of_200k_entries_peaks_at_the_rss_of_20k() -> None:
    """A process recording and reusing a 200,000-entry TOC part peaks within 8 MB of one doing
    it for 20,000 (zstd's and SQLite's memory included)."""
    assert _peak_rss_kb(200_000) < _peak_rss_kb(20_000) + 8 * 1024


def _into_bucket(
    cache: BuildCache, bucket: MemoryStore, root: Path, paths: list[str], compression: str
) -> _Layer:
    """Pack a layer into ``bucket`` through the cache's bucket tier, as a build does."""
    options = _options(compression)
    tier = cache.fragment_ranges_for(bucket, options)
    assert isinstance(tier, BucketFragments)
    layer = tier.layer()
    with bucket.open_blob_writer(options.media_type) as writer:
        packed = pack_store_paths(paths, writer.write, options, store_root=root,
                                  fragments=layer)
        writer.commit(packed.digest)
    layer.stored(packed.digest)
    tier.flush()
    return bucket.read_blob(packed.digest), packed


@pytest.mark.parametrize("min_size", [0, DEFAULT_MIN_SIZE])
@pytest.mark.parametrize("compression", FORMATS)
def test_chunked_fragments_are_shared_through_a_bucket_as_references(
    four_paths: tuple[Path, list[str]], tmp_path: Path, compression: str, min_size: int
) -> None:
    """A second instance (its own local cache) regroups chunked layers from the first's
    references to ranges of its layer blobs and the TOC parts uploaded with them (whatever
    their size): only the store paths whose frames are under ``min_size`` (not shared) are
    compressed again, and the layers are the bytes of packs without a cache."""
    root, paths = four_paths
    bucket = MemoryStore()
    policy = FragmentBucketPolicy(min_size=min_size, background=False)
    with BuildCache(tmp_path / "a", fragment_bucket=policy) as first:
        for group in (paths[:2], paths[2:]):
            _into_bucket(first, bucket, root, group, compression)
        local = first.fragments
        assert local is not None
        local.flush()
        with sqlite3.connect(local.directory / "index.sqlite") as con:
            sizes = dict(con.execute("SELECT key, size FROM fragments WHERE blob IS NOT NULL"))
    unshared = sum(sizes[_keys(root, path, compression)[0]] < min_size for path in paths)
    assert unshared == (1 if min_size else 0)  # the small store path
    shared = len(paths) - unshared
    regroups = [[paths[0], paths[2]], [paths[1], paths[3]]]
    with BuildCache(tmp_path / "b", fragment_bucket=policy) as second:
        layers = [_into_bucket(second, bucket, root, g, compression) for g in regroups]
        local = second.fragments
        assert local is not None
        assert local.misses == unshared
        tier = second.fragment_ranges_for(bucket, _options(compression))
        assert isinstance(tier, BucketFragments)
        # Frames as references to ranges of the first's blobs, TOC parts as uploaded copies.
        assert (tier.stats.referenced, tier.stats.hits) == (shared, 2 * shared)
    assert layers == [_plain(root, g, compression) for g in regroups]


class _Pieces:
    """A recorder keeping a TOC part's pieces in memory."""

    def __init__(self) -> None:
        self.pieces: list[bytes] = []
        self.size = -1

    def add(self, piece: bytes) -> None:
        self.pieces.append(piece)

    def commit(self, uncompressed_size: int) -> None:
        self.size = uncompressed_size

    def discard(self) -> None:
        self.pieces = []


def _zstd_part(lines: list[bytes]) -> bytes:
    """The lines as layout 3 kept them: one zstd frame (level 1, with its checksum)."""
    stream = zstandard.ZstdCompressor(level=1, write_checksum=True).compressobj()
    data = b"".join(line + b"\n" for line in lines)
    return stream.compress(data) + stream.flush()


def test_toc_parts_recorded_at_once_or_after_one_dropped_are_each_their_lines() -> None:
    """TOC parts recorded two at once and after one dropped midway are each exactly their lines
    (newline-terminated, committed with their size, handed on in pieces of about 64 KiB, not
    held whole), read back line for line; the dropped one's recorder keeps nothing."""
    big = list(_entries(2_000))  # several 64 KiB pieces
    small = list(_entries(3))
    lost = _Pieces()
    dropped = TocPartWriter(lost)
    for line in big[:1_000]:
        dropped.add(line)
    assert lost.pieces  # handed on as it came
    dropped.discard()
    first, second, third = _Pieces(), _Pieces(), _Pieces()
    one, two = TocPartWriter(first), TocPartWriter(second)
    for line in big:
        one.add(line)
        two.add(line)
    for line in small:
        two.add(line)
    one.commit()
    two.commit()
    three = TocPartWriter(third)
    for line in small:
        three.add(line)
    three.commit()
    assert (lost.pieces, lost.size) == ([], -1)
    for recorder, lines in ((first, big), (second, big + small), (third, small)):
        data = b"".join(line + b"\n" for line in lines)
        assert b"".join(recorder.pieces) == data
        assert recorder.size == len(data)
        assert max(map(len, recorder.pieces)) < (64 << 10) + 1024
        assert list(toc_part_lines(recorder.pieces, recorder.size)) == lines
    assert len(first.pieces) > 5


def test_a_toc_part_discarded_after_its_commit_is_withdrawn(tmp_path: Path) -> None:
    """A TOC part discarded after its commit (its frames failed after it was kept) leaves
    neither its row nor a data file in the cache."""
    with FragmentCache(tmp_path / "cache") as cache:
        before = sorted(os.walk(cache.directory))
        part = TocPartWriter(cache.writer("part", side=True))
        part.start(0)
        part.add(b'{"name":"f","type":"reg","size":0}' * 40_000)  # past 1 MiB: spilled
        part.commit()
        part.discard()
        cache.flush()
        assert cache.keys() == []
        assert sorted(os.walk(cache.directory)) == before


def test_a_toc_part_discarded_while_its_entries_still_come_keeps_none_of_them(
    tmp_path: Path,
) -> None:
    """A TOC part dropped while the packer still adds its fragment's entries (the fragment
    failed in the packer's hashing queue) hands its recorder nothing more: no data file is
    left in the cache, however many entries come after."""
    with FragmentCache(tmp_path / "fragments") as cache:
        before = sorted(os.walk(cache.directory))
        recorder = cache.writer("toc", side=True)
        part = TocPartWriter(recorder)
        lines = _entries(10_000)  # about 2.7 MB: past a side part's 1 MiB held in memory
        part.add(next(lines))
        part.discard()
        for line in lines:
            part.add(line)
        assert sorted(os.walk(cache.directory)) == before
        assert recorder._pieces == []


@pytest.mark.parametrize(
    ("pieces", "size"),
    [
        ([b'{"start":0}\n{"name":"a"'], 23),  # no line's end
        ([b'{"start":0}\n'], 13),  # shorter than recorded
        ([b'{"start":0}\n', b"{}\n"], 12),  # longer than recorded
        ([], 1),
    ],
    ids=["unended", "short", "long", "empty"],
)
def test_a_toc_part_of_another_size_or_not_whole_lines_is_refused(
    pieces: list[bytes], size: int
) -> None:
    """A kept TOC part that does not hold exactly its recorded size in whole lines raises
    ValueError (the packer's damaged-part miss) by the time it is read to its end."""
    with pytest.raises(ValueError, match="TOC part"):
        list(toc_part_lines(pieces, size))


def test_a_toc_part_without_line_ends_is_refused_holding_at_most_a_line() -> None:
    """A damaged TOC part of 1 GiB recorded and no newline is refused once its first line
    outgrows any line of entries (MAX_LINE): about that much is read and held, never 1 GiB."""
    taken = []

    def pieces() -> Iterator[bytes]:
        for _ in range(1024):
            taken.append(1)
            yield b"x" * (1 << 20)

    tracemalloc.start()
    try:
        with pytest.raises(ValueError, match="longer than any line"):
            for _ in toc_part_lines(pieces(), 1 << 30):
                pass  # pragma: no cover - no line ends
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert len(taken) <= MAX_LINE // (1 << 20) + 1
    assert peak < MAX_LINE + (4 << 20)


def test_a_line_of_a_toc_part_holds_no_more_than_its_bound_of_entries(
    tmp_path: Path,
) -> None:
    """A store path holding a file of more than 256 chunks keeps its TOC part in lines of at
    most MAX_LINE_ENTRIES entries (a file's chunks were one line, however many), and the
    layer reusing it is the bytes of a pack without a cache."""
    root = tmp_path / "root"
    store = root / "nix" / "store"
    (store / ("e" * 32 + "-big")).mkdir(parents=True)
    data = random.Random(7).randbytes(14_000_000)  # noqa: S311 - noise: ~350 chunks
    (store / ("e" * 32 + "-big") / "blob").write_bytes(data)
    paths = ["/nix/store/" + "e" * 32 + "-big"]
    compression = "zstd-chunked"
    with FragmentCache(tmp_path / "fragments") as cache:
        _copied(root, paths, compression, cache)
        cache.flush()
        lines = _toc_part(cache, _keys(root, paths[0], compression)[1])
        counts = [len(orjson.loads(b"[" + line + b"]")) for line in lines[1:]]
        assert sum(counts) > MAX_LINE_ENTRIES + 50
        assert max(counts) <= MAX_LINE_ENTRIES
        misses = cache.misses
        assert _copied(root, paths, compression, cache) == _plain(root, paths, compression)
        assert cache.misses == misses


@pytest.mark.parametrize("compression", FORMATS)
def test_a_toc_part_whose_kept_bytes_changed_is_a_miss_never_wrong_bytes(
    four_paths: tuple[Path, list[str]], tmp_path: Path, compression: str
) -> None:
    """A TOC part kept plain whose bytes changed in the cache (a digit of a mode, in its row
    or its file: still JSON, every entry still one a TOC may hold) fails its CRC-32: the
    store path is packed again, to the bytes of a pack without a cache."""
    root, paths = four_paths
    with FragmentCache(tmp_path / "fragments") as cache:
        _copied(root, paths, compression, cache)
        cache.flush()
        changed = 0
        with sqlite3.connect(cache.directory / "index.sqlite") as con:
            for path in paths:
                key = _keys(root, path, compression)[1]
                file, data = con.execute(
                    "SELECT file, data FROM fragments WHERE key = ?", (key,)
                ).fetchone()
                raw = (cache.directory / "data" / file).read_bytes() if file else data
                at = raw.index(b'"mode":') + len(b'"mode":')
                digit = b"1" if raw[at : at + 1] == b"4" else b"4"
                damaged = raw[:at] + digit + raw[at + 1 :]  # another mode, still an entry
                assert damaged != raw
                if file:
                    (cache.directory / "data" / file).write_bytes(damaged)
                else:
                    con.execute("UPDATE fragments SET data = ? WHERE key = ?", (damaged, key))
                changed += 1
        misses = cache.misses
        assert _copied(root, paths, compression, cache) == _plain(root, paths, compression)
        assert cache.misses == misses + changed


@pytest.mark.parametrize("compression", FORMATS)
def test_a_cold_chunked_pack_keeps_layouts_that_rebuild_every_fragment_whole(
    four_paths: tuple[Path, list[str]], tmp_path: Path, compression: str
) -> None:
    """A chunked layer packed cold with a pool (its blocks' CRC-32s taken on the hashing
    thread) keeps, for every store path, as a range and as a copy, a layout that decodes and
    rebuilds the whole fragment from the store."""
    root, paths = four_paths
    blobs = FilesystemStore(tmp_path / "blobs", durable=False)
    kept: dict[str, bytes] = {}
    for name in ("ranges", "copies"):
        with FragmentCache(tmp_path / name) as cache:
            if name == "ranges":
                _stored(blobs, root, paths, compression, cache)
            else:
                _copied(root, paths, compression, cache)
            cache.flush()
            with sqlite3.connect(cache.directory / "index.sqlite") as con:
                layouts = dict(con.execute("SELECT key, layout FROM fragments").fetchall())
        for path in paths:
            layout = FragmentLayout.decode(layouts[_keys(root, path, compression)[0]])
            assert layout is not None
            rebuilt = bytearray()
            source = os.fsencode(root / path.lstrip("/"))
            assert rebuild(source, layout, rebuilt.extend) == layout.size
            kept[f"{name} {path}"] = bytes(rebuilt)
    assert [kept[f"ranges {p}"] for p in paths] == [kept[f"copies {p}"] for p in paths]


@pytest.mark.parametrize("compression", FORMATS)
def test_a_chunked_pack_keeps_the_same_toc_parts_with_a_pool_or_without(
    four_paths: tuple[Path, list[str]], tmp_path: Path, compression: str
) -> None:
    """A chunked layer packed cold, with a pool or without, keeps every TOC part, holding the
    same entries either way."""
    root, paths = four_paths
    entries: dict[int, list[bytes]] = {}
    for threads in (2, 1):
        with FragmentCache(tmp_path / f"t{threads}") as cache:
            _copied(root, paths, compression, cache, threads)
            entries[threads] = []
            for path in paths:
                with cache.get(_keys(root, path, compression)[1], side=True) as part:
                    assert part is not None
                    # Entries are grouped into lines as they were spooled: compare the entries.
                    lines = toc_part_lines(part.pieces(), part.uncompressed_size)
                    entries[threads].append(b",".join(lines))
    assert entries[2] == entries[1]


@pytest.mark.parametrize("compression", FORMATS)
def test_chunked_ranges_are_checksummed_in_the_hashing_queue_and_copies_are_not(
    four_paths: tuple[Path, list[str]], tmp_path: Path, compression: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A chunked layer packed cold into ranges hands its frames' bytes and commits to its
    hashing queue (a range only checksums them), keeping the rows (offset, size, CRC-32) a
    pack with one thread keeps; copies (bytes written to the cache) are never deferred."""
    from nixery_core import chunked

    deferred: list[int] = []
    update = chunked._Adding.update

    def counted(self: chunked._Adding, data: bytes) -> None:
        deferred.append(len(data))
        update(self, data)

    monkeypatch.setattr(chunked._Adding, "update", counted)
    root, paths = four_paths
    rows = {}
    for threads in (2, 1):
        blobs = FilesystemStore(tmp_path / f"blobs{threads}", durable=False)
        with FragmentCache(tmp_path / f"ranges{threads}") as cache:
            _stored(blobs, root, paths, compression, cache, threads=threads)
            cache.flush()
            with sqlite3.connect(cache.directory / "index.sqlite") as con:
                rows[threads] = sorted(con.execute(
                    "SELECT key, blob, offset, size, crc FROM fragments WHERE blob IS NOT NULL"
                ).fetchall())
        assert len(rows[threads]) == len(paths)
        assert deferred
        deferred.clear()
    assert rows[2] == rows[1]
    with FragmentCache(tmp_path / "copies") as copies:
        _copied(root, paths, compression, copies)
    assert deferred == []


@pytest.mark.parametrize("compression", FORMATS)
def test_a_chunked_pack_failing_midway_leaves_a_cache_that_packs_the_same_bytes(
    four_paths: tuple[Path, list[str]], tmp_path: Path, compression: str
) -> None:
    """A chunked cold pack whose sink fails part way (TOC parts and layouts still in its
    hashing queue) raises without hanging, and the cache it leaves gives the next pack the
    bytes of a pack without a cache."""
    root, paths = four_paths
    expected = _plain(root, paths, compression)
    written: list[int] = []

    def failing(data: bytes) -> None:
        written.append(len(data))
        if sum(written) > len(expected[0]) // 2:
            raise OSError("the sink broke")

    with FragmentCache(tmp_path / "cache") as cache:
        with pytest.raises(OSError, match="the sink broke"):
            pack_store_paths(paths, failing, _options(compression), store_root=root,
                             threads=2, fragments=cache)
        cache.flush()
        assert _copied(root, paths, compression, cache) == expected


def test_a_toc_part_declaring_a_larger_window_than_its_level_is_damaged() -> None:
    """A kept TOC part holding a zstd frame (a hostile one declaring a 128 MiB window, which
    libzstd would allocate outside Python) reads as a damaged part (ValueError, a miss):
    layout 4 parts are plain lines, never decompressed, so nothing is allocated for it."""
    from hostile_frames import zstd_frame_declaring_window

    hostile = zstd_frame_declaring_window(27, 1024)
    with pytest.raises(ValueError, match="not whole lines"):
        list(toc_part_lines([hostile], len(hostile)))


def _fail_recording(
    monkeypatch: pytest.MonkeyPatch, failing: str, frames_key: str, part_key: str
) -> None:
    """Make recording one store path fail where ``failing`` says (its frames' range commit,
    its layout's encoding ahead: the writing thread failing to start, its TOC part's commit)."""
    from nixery_core import fragment_toc, fragments

    if failing == "range-commit":
        commit = fragments.RangeWriter.commit

        def range_commit(self: fragments.RangeWriter, uncompressed_size: int) -> None:
            if self.key == frames_key:
                raise RuntimeError("range commit failed (test)")
            commit(self, uncompressed_size)

        monkeypatch.setattr(fragments.RangeWriter, "commit", range_commit)
    elif failing == "encode-ahead":
        ahead = FragmentCache._encode_ahead
        calls: list[None] = []

        def encode_ahead(
            self: FragmentCache, layout: bytes | fragments.EncodesLayout | None
        ) -> bytes | fragments.EncodesLayout | None:
            calls.append(None)
            if len(calls) == 1:  # the first path's range: commits are queued in order
                raise RuntimeError("can't start new thread")
            return ahead(self, layout)

        monkeypatch.setattr(FragmentCache, "_encode_ahead", encode_ahead)
    else:
        part_commit = fragment_toc.TocPartWriter.commit

        def toc_commit(self: TocPartWriter) -> None:
            if getattr(self._recorder, "key", None) == part_key:
                raise RuntimeError("TOC part commit failed (test)")
            part_commit(self)

        monkeypatch.setattr(fragment_toc.TocPartWriter, "commit", toc_commit)


@pytest.mark.parametrize("failing", ["range-commit", "encode-ahead", "toc-part-commit"])
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("compression", FORMATS)
def test_a_chunked_pack_whose_recording_fails_is_a_miss_for_that_path_only(
    four_paths: tuple[Path, list[str]], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, *,
    compression: str, threads: int, failing: str,
) -> None:
    """A chunked cold pack into ranges whose recording of one store path raises (in the
    hashing queue with a pool) gives the bytes and digests of a pack without a cache, and
    keeps no row (frames or TOC part) and no file for that path, every other path's both."""
    root, paths = four_paths
    expected = _plain(root, paths, compression)
    keys = [_keys(root, path, compression) for path in paths]
    _fail_recording(monkeypatch, failing, *keys[0])
    blobs = FilesystemStore(tmp_path / "blobs", durable=False)
    with FragmentCache(tmp_path / "cache") as cache:
        blob, packed = _stored(blobs, root, paths, compression, cache, threads=threads)
        cache.flush()
        rows = _rows(cache.directory)
        files = {path.relative_to(cache.directory / "data").as_posix()
                 for path in (cache.directory / "data").rglob("*") if path.is_file()}
    assert (blob, packed) == expected
    assert sorted(key for key, _, _ in rows) == sorted(key for pair in keys[1:] for key in pair)
    assert files == {file for _, file, _ in rows if file is not None}


@pytest.mark.parametrize("frames", ["queued", "written"])
@pytest.mark.parametrize("compression", FORMATS)
def test_a_chunked_pack_into_copies_whose_toc_part_fails_keeps_neither_part(
    four_paths: tuple[Path, list[str]], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, *,
    compression: str, frames: str,
) -> None:
    """A chunked cold pack into copies whose TOC part of one store path fails to be kept
    after that path's frames were committed (still queued for the cache's writing thread,
    or already written) gives the bytes of a pack without a cache and keeps no row and no
    file of that path's frames, every other path's both parts."""
    from nixery_core import fragment_toc

    root, paths = four_paths
    expected = _plain(root, paths, compression)
    keys = [_keys(root, path, compression) for path in paths]
    part_commit = fragment_toc.TocPartWriter.commit
    cache = FragmentCache(tmp_path / "cache")

    def toc_commit(self: TocPartWriter) -> None:
        if getattr(self._recorder, "key", None) == keys[0][1]:
            if frames == "written":
                cache.flush()  # the frames' row is in the index before the part fails
                assert keys[0][0] in cache
            raise RuntimeError("TOC part commit failed (test)")
        part_commit(self)

    monkeypatch.setattr(fragment_toc.TocPartWriter, "commit", toc_commit)
    with cache:
        assert _copied(root, paths, compression, cache) == expected
        cache.flush()
        rows = _rows(cache.directory)
        files = {path.relative_to(cache.directory / "data").as_posix()
                 for path in (cache.directory / "data").rglob("*") if path.is_file()}
    assert sorted(key for key, _, _ in rows) == sorted(key for pair in keys[1:] for key in pair)
    assert files == {file for _, file, _ in rows if file is not None}


@pytest.mark.parametrize("compression", FORMATS)
def test_a_chunked_range_checksums_its_frames_in_place_never_a_copy_of_them(
    four_paths: tuple[Path, list[str]], tmp_path: Path, compression: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A chunked store path kept as a range only has its frames' CRC-32 taken: it gets its
    batches' compressed bytes, or views of them where it starts or ends inside one, never a
    copy (about 40 MB of the 120 MB of the 300 MB benchmark closure were), and its row's
    CRC-32 and size are those of its frames in the blob, so a regroup copies them."""
    from nixery_core.fragments import RangeWriter

    given: list[type] = []
    add = RangeWriter.add

    def recorded(self: RangeWriter, piece: bytes) -> None:
        given.append(type(piece))
        add(self, piece)

    monkeypatch.setattr(RangeWriter, "add", recorded)
    root, paths = four_paths
    blobs = FilesystemStore(tmp_path / "blobs", durable=False)
    with FragmentCache(tmp_path / "ranges") as cache:
        _stored(blobs, root, paths[:2], compression, cache)
        _stored(blobs, root, paths[2:], compression, cache)
        assert memoryview in given  # a path starting or ending inside a batch
        assert set(given) <= {bytes, memoryview}
        misses = cache.misses
        regrouped = [paths[0], paths[2]]
        assert _stored(blobs, root, regrouped, compression, cache) == _plain(
            root, regrouped, compression
        )
        assert cache.misses == misses


@pytest.mark.parametrize("compression", FORMATS)
def test_a_chunked_range_takes_whole_batches_crc32_from_where_they_were_compressed(
    tmp_path: Path, compression: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A store path spanning several batches, kept as a range, is not read again for the
    batches it holds whole: their CRC-32 comes with them from the worker that compressed
    them (combined, not recomputed), and its row's CRC-32 is still that of its bytes in the
    blob, so a regroup copies it."""
    from nixery_core.compression import crc32
    from nixery_core.fragments import RangeWriter

    store = tmp_path / "nix" / "store"
    name = "e" * 32 + "-big"
    (store / name).mkdir(parents=True)
    (store / name / "data").write_bytes(with_references(4_000_000, 5, "kq"))
    (store / name / "small").write_bytes(b"small\n")
    paths = ["/nix/store/" + name]
    read_again: list[int] = []
    combined: list[int] = []
    add, add_checksummed = RangeWriter.add, RangeWriter.add_checksummed

    def reading(self: RangeWriter, piece: bytes) -> None:
        read_again.append(len(piece))
        add(self, piece)

    def combining(self: RangeWriter, size: int, crc: int) -> None:
        combined.append(size)
        add_checksummed(self, size, crc)

    monkeypatch.setattr(RangeWriter, "add", reading)
    monkeypatch.setattr(RangeWriter, "add_checksummed", combining)
    blobs = FilesystemStore(tmp_path / "blobs", durable=False)
    with FragmentCache(tmp_path / "ranges") as cache:
        blob, _ = _stored(blobs, tmp_path, paths, compression, cache, threads=2)
        cache.flush()
        with sqlite3.connect(cache.directory / "index.sqlite") as con:
            ((offset, size, crc),) = con.execute(
                "SELECT offset, size, crc FROM fragments WHERE blob IS NOT NULL"
            ).fetchall()
        assert combined  # whole batches given by their CRC-32
        assert sum(combined) + sum(read_again) == size
        assert crc == crc32(blob[offset : offset + size])
        misses = cache.misses
        assert _stored(blobs, tmp_path, paths, compression, cache) == _plain(
            tmp_path, paths, compression
        )
        assert cache.misses == misses
