"""Fragments kept as byte ranges of stored layer blobs: no second copy, never wrong bytes."""

from __future__ import annotations

import io
import os
import sqlite3
import subprocess
import sys
import threading
import time
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO, cast

import pytest
from test_fragments import PATHS, make_store

from nixery_core import archive, fragments
from nixery_core.archive import ArchiveOptions, PackedLayer, pack_store_paths
from nixery_core.build import build_image
from nixery_core.cache import BuildCache
from nixery_core.cli import main
from nixery_core.digests import sha256_digest
from nixery_core.errors import LayerError, StorageError, StorageUnavailable
from nixery_core.fragment_bucket import BucketFragments, FragmentBucketPolicy
from nixery_core.fragment_reads import MAX_REQUEST
from nixery_core.fragments import FragmentCache, FragmentSource, LayerRanges, StoreFragments
from nixery_core.names import Image
from nixery_core.storage.filesystem import FilesystemBlobWriter, FilesystemStore
from nixery_core.testing.runners import FakeNix, default_fake_packages
from nixery_core.testing.sources import FixedSource
from nixery_core.testing.storage import MemoryStore

OPTIONS = ArchiveOptions()


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_store(tmp_path_factory.mktemp("store"))


def _plain(store: Path, paths: list[str]) -> tuple[PackedLayer, bytes]:
    out = io.BytesIO()
    packed = pack_store_paths(paths, out.write, OPTIONS, store_root=store)
    return packed, out.getvalue()


def _pack_into(
    blobs: FilesystemStore, store: Path, paths: list[str], fragments: FragmentSource
) -> PackedLayer:
    """Pack ``paths`` into ``blobs`` as a build does; ranges recorded once committed."""
    with blobs.open_blob_writer(OPTIONS.media_type) as writer:
        packed = pack_store_paths(paths, writer.write, OPTIONS, store_root=store,
                                  fragments=fragments)
        writer.commit(packed.digest)
    stored = getattr(fragments, "stored", None)
    if stored is not None:
        stored(packed.digest)
    return packed


def _rows(directory: Path) -> list[tuple[str, str | None, str | None]]:
    """(key, file, blob) of every row of a fragment index, read with sqlite3 directly."""
    with sqlite3.connect(directory / "index.sqlite") as con:
        return con.execute("SELECT key, file, blob FROM fragments").fetchall()


def _data_files(directory: Path) -> list[Path]:
    return [path for path in (directory / "data").rglob("*") if path.is_file()]


def _cold(tmp_path: Path, store: Path) -> tuple[FilesystemStore, FragmentCache, StoreFragments]:
    blobs = FilesystemStore(tmp_path / "blobs", durable=False)
    cache = FragmentCache(tmp_path / "fragments")
    view = cache.on_store(blobs)
    _pack_into(blobs, store, PATHS[:2], view.layer())
    _pack_into(blobs, store, PATHS[2:], view.layer())
    cache.flush()
    return blobs, cache, view


def test_a_cold_pack_keeps_ranges_of_its_blob_and_writes_no_fragment_bytes(
    store: Path, tmp_path: Path
) -> None:
    """A layer packed through a store's view records each path as a range of its blob, no file."""
    blobs, cache, _ = _cold(tmp_path, store)
    with cache:
        rows = _rows(cache.directory)
        assert len(rows) == len(PATHS)
        assert all(file is None and blob is not None and blobs.has_blob(blob)
                   for _, file, blob in rows)
        assert _data_files(cache.directory) == []


def test_a_regroup_from_ranges_is_byte_identical_and_compresses_nothing(
    store: Path, tmp_path: Path
) -> None:
    """Layers {a,c} and {b,d} assembled from ranges of {a,b} and {c,d} equal fresh packs."""
    blobs, cache, view = _cold(tmp_path, store)
    with cache:
        misses = cache.misses
        for paths in ([PATHS[0], PATHS[2]], [PATHS[1], PATHS[3]]):
            packed = _pack_into(blobs, store, paths, view.layer())
            plain, data = _plain(store, paths)
            assert packed == plain
            assert blobs.read_blob(packed.digest) == data
        assert cache.misses == misses
        assert cache.hits == len(PATHS)
        # A lookup without a store does not resolve a range, and leaves it.
        with cache.get(_rows(cache.directory)[0][0]) as found:
            assert found is None
        cache.flush()
        rows = _rows(cache.directory)
        # On a store with local blob files a reuse copies nothing: still four ranges.
        assert len(rows) == len(PATHS)
        assert all(file is None and blob is not None for _, file, blob in rows)


def test_a_range_whose_blob_was_deleted_is_a_miss_and_packed_again(
    store: Path, tmp_path: Path
) -> None:
    """Deleting the blob a range points at makes that path a miss, dropped and repacked alike."""
    blobs, cache, view = _cold(tmp_path, store)
    with cache:
        first = _plain(store, PATHS[:2])[0]
        blobs.delete_blob(first.digest)
        paths = [PATHS[0], PATHS[2]]
        packed = _pack_into(blobs, store, paths, view.layer())
        assert packed == _plain(store, paths)[0]
        assert blobs.read_blob(packed.digest) == _plain(store, paths)[1]
        assert cache.misses == len(PATHS) + 1  # the cold packs' and PATHS[0]'s
        cache.flush()
        # PATHS[0] is kept again, as a range of the new blob; PATHS[1] (not asked for since)
        # still names the deleted one until it is looked up.
        named = [blob for _, _, blob in _rows(cache.directory)]
        assert (named.count(packed.digest), named.count(first.digest)) == (1, 1)


class _Unavailable:
    """A store that reads nothing back: every blob open fails as a transient outage."""

    def __init__(self, blobs: FilesystemStore) -> None:
        self.blobs = blobs

    def open_blob(self, digest: str) -> BinaryIO:
        raise StorageUnavailable(f"store down while opening {digest}")

    def read_blob(self, digest: str) -> bytes:
        raise StorageUnavailable(f"store down while reading {digest}")


def test_a_range_whose_store_is_unavailable_is_a_miss_and_kept(
    store: Path, tmp_path: Path
) -> None:
    """A store that does not answer makes a range a miss but keeps it for when the store is back."""
    blobs, cache, view = _cold(tmp_path, store)
    with cache:
        key = _rows(cache.directory)[0][0]
        down = cache.on_store(_Unavailable(blobs))
        with down.get(key) as found:
            assert found is None
        cache.flush()
        assert key in [row[0] for row in _rows(cache.directory)]
        with view.get(key) as found:
            assert found is not None


@pytest.mark.parametrize(
    "damage",
    [
        "UPDATE fragments SET offset = NULL WHERE key = ?",
        "UPDATE fragments SET offset = -1 WHERE key = ?",
        "UPDATE fragments SET offset = 'x' WHERE key = ?",
        "UPDATE fragments SET size = -5 WHERE key = ?",
        "UPDATE fragments SET crc = 'x' WHERE key = ?",
    ],
)
def test_a_damaged_range_row_is_a_miss_and_dropped(
    store: Path, tmp_path: Path, damage: str
) -> None:
    """A range row damaged outside this library is dropped as a miss; the pack still succeeds."""
    blobs, cache, view = _cold(tmp_path, store)
    with cache:
        key = _rows(cache.directory)[0][0]
        with sqlite3.connect(cache.directory / "index.sqlite") as con:
            con.execute(damage, (key,))
        with view.get(key) as found:
            assert found is None
        cache.flush()
        assert key not in [row[0] for row in _rows(cache.directory)]
        packed = _pack_into(blobs, store, PATHS, view.layer())
        assert packed == _plain(store, PATHS)[0]


def test_a_range_whose_blob_bytes_changed_is_a_miss_never_wrong_bytes(
    store: Path, tmp_path: Path
) -> None:
    """A damaged byte inside a range fails its CRC-32: the path is compressed again."""
    blobs, cache, view = _cold(tmp_path, store)
    with cache:
        first = _plain(store, PATHS[:2])[0]
        path = blobs.blob_path(first.digest)
        path.chmod(0o644)
        damaged = bytearray(path.read_bytes())
        damaged[len(damaged) // 2] ^= 0xFF
        path.write_bytes(bytes(damaged))
        paths = [PATHS[0], PATHS[1]]
        misses = cache.misses
        out = io.BytesIO()
        packed = pack_store_paths(paths, out.write, OPTIONS, store_root=store,
                                  fragments=view.layer())
        assert (packed, out.getvalue()) == _plain(store, paths)
        assert cache.misses > misses


def test_a_layer_whose_commit_failed_records_no_range(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A build whose blob commits fail leaves no fragment entry pointing at a blob not stored."""
    def fail(self: FilesystemBlobWriter, digest: str) -> None:
        raise StorageError("commit refused (test)")

    monkeypatch.setattr(FilesystemBlobWriter, "commit", fail)
    runner = FakeNix(tmp_path / "root", default_fake_packages())
    blobs = FilesystemStore(tmp_path / "blobs", durable=False)
    with BuildCache(tmp_path / "cache") as cache, pytest.raises(StorageError):
        build_image(Image.from_name("shell/hello"), FixedSource(), runner=runner,
                    uploader=blobs, cache=cache, store_root=runner.store_root)
    assert _rows(tmp_path / "cache" / "fragments") == []


def test_a_failed_pack_stops_reading_its_ranges_ahead(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A regroup failing mid-layer (a store path it packs cannot be read) ends its read-ahead
    threads while the caller still holds the build's exception."""
    blobs = MemoryStore()
    runner = FakeNix(tmp_path / "root", default_fake_packages())
    image = Image.from_name("shell/hello")
    with BuildCache(tmp_path / "cache", fragment_mode="ranges") as cache:
        cold = build_image(image, FixedSource(), runner=runner, uploader=blobs, cache=cache,
                           store_root=runner.store_root)
        plain = build_image(image, FixedSource(), runner=runner, uploader=MemoryStore(),
                            store_root=runner.store_root, layer_budget=3)
        largest = max(plain.layers, key=lambda layer: len(layer.paths))
        paths = sorted(largest.paths, key=os.fsencode)
        assert len(paths) >= 3  # one regrouped layer reusing ranges before and after the fifo
        broken = paths[1]  # a miss (its range dropped), packed from disk: reading it fails
        fragments = cache.fragments
        assert fragments is not None
        fragments.flush()
        assert fragments.drop_ranges_of([layer.digest for layer in cold.layers
                                         if layer.paths == (broken,)]) == 1
        pack_tree = archive._pack_tree

        def unreadable(tar: object, member: bytes, *args: object) -> None:
            if member == os.fsencode(broken.lstrip("/")):
                raise LayerError(f"cannot read {broken} (test)")
            pack_tree(tar, member, *args)  # type: ignore[arg-type]  # passed through

        monkeypatch.setattr(archive, "_pack_tree", unreadable)
        before = set(threading.enumerate())
        reads = blobs.range_reads
        with pytest.raises(LayerError, match="cannot read") as raised:
            build_image(image, FixedSource(), runner=runner, uploader=blobs, cache=cache,
                        store_root=runner.store_root, layer_budget=3)
        assert blobs.range_reads > reads  # the layer's ranges were read ahead
        ahead = [thread for thread in threading.enumerate()
                 if thread not in before and thread.name.startswith("nixery-range-read")]
        for thread in ahead:
            thread.join(timeout=10)
        assert [thread.name for thread in ahead if thread.is_alive()] == []
        assert broken in str(raised.value)


def _eventually(done: Callable[[], bool]) -> bool:
    """Whether ``done()`` holds within ten seconds (polled)."""
    deadline = time.monotonic() + 10
    while not done():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def test_a_stored_layers_rows_are_written_without_waiting_for_the_batching_delay(
    store: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Once a layer's blob is committed, another connection to the index finds its ranges
    before the cache is closed, however long the writing thread batches other writes."""
    monkeypatch.setattr(fragments, "_BATCH_DELAY", 3600.0)
    blobs = FilesystemStore(tmp_path / "blobs", durable=False)
    with FragmentCache(tmp_path / "fragments") as cache:
        packed = _pack_into(blobs, store, PATHS, cache.on_store(blobs).layer())
        assert _eventually(lambda: len(_rows(cache.directory)) == len(PATHS))
        assert {blob for _, _, blob in _rows(cache.directory)} == {packed.digest}


class _Layout:
    """A layout still to encode, counting on which threads it is encoded."""

    def __init__(self) -> None:
        self.threads: list[str] = []

    def encode(self) -> bytes:
        self.threads.append(threading.current_thread().name)
        return b"layout"


def _commit_range(layer: LayerRanges, key: str, layout: _Layout) -> None:
    """A range ``key`` of ``layer`` committed at offset 0 with ``layout`` to encode."""
    writer = layer.writer(key)
    writer.offset = 0
    writer.add(b"frames")
    writer.layout = layout
    writer.commit(100)


def test_a_range_discarded_then_committed_records_nothing(tmp_path: Path) -> None:
    """A range whose recording was dropped (its fragment failed in the packer's queue)
    and committed after that by its packer keeps no row once its layer is stored."""
    blobs = FilesystemStore(tmp_path / "blobs", durable=False)
    digest = blobs.put_blob(b"frames of a layer", "application/octet-stream").digest
    with FragmentCache(tmp_path / "fragments") as cache:
        layer = cache.on_store(blobs).layer()
        writer = layer.writer("k")
        writer.offset = 0
        writer.add(b"frames")
        writer.discard()
        writer.add(b"more")
        writer.commit(100)
        layer.stored(digest)
        cache.flush()
        assert "k" not in cache


def test_a_ranges_layout_is_encoded_while_its_layer_is_still_being_packed(
    tmp_path: Path,
) -> None:
    """A range's layout is encoded by the writing thread before its layer's blob is
    committed (not in a serial tail after it), once, and its row keeps those bytes."""
    blobs = FilesystemStore(tmp_path / "blobs", durable=False)
    digest = blobs.put_blob(b"frames of a layer", "application/octet-stream").digest
    with FragmentCache(tmp_path / "fragments") as cache:
        layer = cache.on_store(blobs).layer()
        layout = _Layout()
        _commit_range(layer, "k", layout)
        assert _eventually(lambda: bool(layout.threads))
        assert layout.threads == ["nixery-fragment-writer"]
        layer.stored(digest)
    assert layout.threads == ["nixery-fragment-writer"]
    with sqlite3.connect(tmp_path / "fragments" / "index.sqlite") as con:
        assert con.execute("SELECT layout, blob FROM fragments").fetchall() == [
            (b"layout", digest)
        ]


class _Failing(_Layout):
    """A layout whose encoding fails (a bug, or memory exhausted)."""

    def encode(self) -> bytes:
        super().encode()
        raise RuntimeError("cannot encode (test)")


def test_a_layout_failing_to_encode_ahead_leaves_the_writing_thread_writing(
    tmp_path: Path,
) -> None:
    """A range's layout whose encoding ahead fails costs that range its row only: the
    writing thread goes on, and the layer's other ranges are written and flushed."""
    blobs = FilesystemStore(tmp_path / "blobs", durable=False)
    digest = blobs.put_blob(b"frames of a layer", "application/octet-stream").digest
    with FragmentCache(tmp_path / "fragments") as cache:
        layer = cache.on_store(blobs).layer()
        layouts = {"bad": _Failing(), "good": _Layout()}
        for key, layout in layouts.items():
            _commit_range(layer, key, layout)
        assert _eventually(lambda: bool(layouts["bad"].threads))
        layer.stored(digest)
        flushing = threading.Thread(target=cache.flush, daemon=True)
        flushing.start()
        flushing.join(10)
        assert not flushing.is_alive()
        assert _rows(tmp_path / "fragments") == [("good", None, digest)]


def test_a_layer_never_stored_records_no_range_though_its_layouts_were_encoded(
    tmp_path: Path,
) -> None:
    """A layer whose blob was never committed leaves no row, even once the writing thread
    has encoded its layouts ahead."""
    blobs = FilesystemStore(tmp_path / "blobs", durable=False)
    with FragmentCache(tmp_path / "fragments") as cache:
        layout = _Layout()
        _commit_range(cache.on_store(blobs).layer(), "k", layout)
        assert _eventually(lambda: bool(layout.threads))
    assert _rows(tmp_path / "fragments") == []


def _build(
    tmp_path: Path, name: str, mode: str, uploader: object, budget: int | None = None
) -> tuple[str, BuildCache]:
    runner = FakeNix(tmp_path / "root", default_fake_packages())
    cache = BuildCache(tmp_path / name, fragment_mode=mode)  # type: ignore[arg-type]  # a str from the parameters
    extra = {} if budget is None else {"layer_budget": budget}
    result = build_image(Image.from_name("shell/hello"), FixedSource(), runner=runner,
                         uploader=uploader, cache=cache,  # type: ignore[arg-type]  # a store
                         store_root=runner.store_root, **extra)  # type: ignore[arg-type]  # layer_budget
    return result.manifest_digest, cache


@pytest.mark.parametrize("mode", ["auto", "ranges", "copy"])
def test_a_build_regrouped_from_ranges_or_copies_gives_the_same_image(
    tmp_path: Path, mode: str
) -> None:
    """Cold, then another grouping of the same paths: the same manifest in every mode, none
    compressed again; auto and ranges keep ranges on a filesystem store, copy keeps files."""
    blobs = FilesystemStore(tmp_path / "blobs", durable=False)
    _, cache = _build(tmp_path, "cache", mode, blobs)
    with cache:
        fragments = cache.fragments
        assert fragments is not None
        fragments.flush()
        rows = _rows(fragments.directory)
        assert rows
        ranges = mode != "copy"
        assert all((blob is not None) == ranges for _, _, blob in rows)
        assert all((file is None) or not ranges for _, file, _ in rows)
        misses = fragments.misses
        runner = FakeNix(tmp_path / "root", default_fake_packages())
        regrouped = build_image(Image.from_name("shell/hello"), FixedSource(), runner=runner,
                                uploader=blobs, cache=cache, store_root=runner.store_root,
                                layer_budget=3)
        assert fragments.misses == misses
        assert fragments.hits > 0
    plain, _ = _build(tmp_path, "plain", "copy", MemoryStore(), budget=3)
    assert regrouped.manifest_digest == plain


def test_a_builds_ranges_are_found_by_another_process_after_it_returns_and_after_close(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Once a cold build into a filesystem store returns, its layers' ranges are in the index
    for another connection (without waiting for the writing thread's batching delay), and
    once its cache is closed another process opening the fragment cache finds them all."""
    monkeypatch.setattr(fragments, "_BATCH_DELAY", 3600.0)
    blobs = FilesystemStore(tmp_path / "blobs", durable=False)
    _, cache = _build(tmp_path, "cache", "auto", blobs)
    directory = tmp_path / "cache" / "fragments"
    with cache:
        assert _eventually(lambda: len(_rows(directory)) > 0 and all(
            blob is not None and blobs.has_blob(blob) for _, _, blob in _rows(directory)
        ))
        rows = _rows(directory)
    script = (
        "import sys\n"
        "from nixery_core.fragments import FragmentCache\n"
        "with FragmentCache(sys.argv[1]) as cache:\n"
        "    print('\\n'.join(cache.keys()))\n"
    )
    found = subprocess.run(
        [sys.executable, "-c", script, str(directory)], check=True, capture_output=True,
        text=True, env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
    ).stdout.split()
    assert sorted(found) == sorted(key for key, _, _ in rows)


class _NoRangeReads:
    """A store in memory that reads only whole blobs back (no ranged reads, no blob files)."""

    def __init__(self, store: MemoryStore) -> None:
        self._store = store

    def __getattr__(self, name: str) -> object:
        if name == "read_range":
            raise AttributeError(name)
        return getattr(self._store, name)


@pytest.mark.parametrize(("store", "ranges"), [("ranged", True), ("whole", False)])
def test_auto_takes_ranges_where_the_store_reads_ranges_and_copies_elsewhere(
    tmp_path: Path, store: str, ranges: bool
) -> None:
    """On a store without local blob files, auto keeps ranges where it reads a byte range in
    one request (in memory here, like a bucket) and writes copies where it reads only whole
    blobs."""
    memory = MemoryStore()
    uploader = memory if store == "ranged" else _NoRangeReads(memory)
    _, cache = _build(tmp_path, "cache", "auto", uploader)
    with cache:
        fragments = cache.fragments
        assert fragments is not None
        fragments.flush()
        rows = _rows(fragments.directory)
        assert rows
        assert all((blob is not None) == ranges for _, _, blob in rows)
        assert not ranges or all(file is None for _, file, _ in rows)


def test_an_unknown_fragment_mode_is_refused(tmp_path: Path) -> None:
    """A fragment mode other than auto, copy or ranges is a clear error at construction."""
    with pytest.raises(ValueError, match="fragment_mode"):
        BuildCache(tmp_path / "cache", fragment_mode="both")  # type: ignore[arg-type]  # wrong on purpose


def test_an_index_made_before_ranges_gains_their_columns(tmp_path: Path) -> None:
    """A fragment index without the range columns is extended when opened, its rows kept."""
    directory = tmp_path / "fragments"
    with FragmentCache(directory) as cache:
        cache.put("k", [os.urandom(100)], 100)
    with sqlite3.connect(directory / "index.sqlite") as con:
        con.execute("ALTER TABLE fragments DROP COLUMN offset")
        con.execute("ALTER TABLE fragments DROP COLUMN blob")
    with FragmentCache(directory) as cache:
        assert cache.keys() == ["k"]
        with cache.get("k") as found:
            assert found is not None


def test_ranges_count_against_the_size_limit_and_are_evicted_by_use(
    store: Path, tmp_path: Path
) -> None:
    """A range charges its row and layout (not the store's bytes); past the limit, the least
    recently used ranges go."""
    blobs = FilesystemStore(tmp_path / "blobs", durable=False)
    with FragmentCache(tmp_path / "fragments", size_limit=1200) as cache:
        view = cache.on_store(blobs)
        for path in PATHS:
            _pack_into(blobs, store, [path], view.layer())
            cache.flush()
        assert 0 < cache.volume() <= 1200
        kept = cache.keys()
        assert 0 < len(kept) < len(PATHS)


def test_ranges_are_offered_for_compressed_layers_and_not_on_stores_reading_whole_blobs(
    tmp_path: Path,
) -> None:
    """Ranges are offered for gzip, zstd, eStargz and zstd:chunked layers on stores with blob
    files or ranged reads (through the bucket tier when it is on); uncompressed layers, "copy"
    mode and a store reading only whole blobs keep copies (the tier then uploads copies)."""
    blobs = FilesystemStore(tmp_path / "blobs", durable=False)
    whole = _NoRangeReads(MemoryStore())
    with BuildCache(tmp_path / "auto") as auto:
        for compression in ("gzip", "zstd", "estargz", "zstd-chunked"):
            options = ArchiveOptions(compression=compression)
            assert auto.fragment_ranges_for(blobs, options) is not None
        assert auto.fragment_ranges_for(blobs, ArchiveOptions(compression="none")) is None
        assert isinstance(auto.fragment_ranges_for(MemoryStore(), ArchiveOptions()),
                          StoreFragments)
        assert auto.fragment_ranges_for(whole, ArchiveOptions()) is None  # type: ignore[arg-type]  # a store by delegation
    with BuildCache(tmp_path / "ranges", fragment_mode="ranges") as ranges:
        assert ranges.fragment_ranges_for(whole, ArchiveOptions()) is not None  # type: ignore[arg-type]  # as above
    with BuildCache(tmp_path / "copy", fragment_mode="copy") as copy:
        assert copy.fragment_ranges_for(blobs, ArchiveOptions()) is None
    with BuildCache(tmp_path / "bucket", fragment_bucket=FragmentBucketPolicy()) as bucket:
        tier = bucket.fragment_ranges_for(blobs, ArchiveOptions())
        assert isinstance(tier, BucketFragments)
        assert tier.ranges is not None
        assert bucket.fragment_ranges_for(whole, ArchiveOptions()) is None  # type: ignore[arg-type]  # as above
        chunked = bucket.fragment_ranges_for(blobs, ArchiveOptions(compression="estargz"))
        assert isinstance(chunked, BucketFragments)


def test_on_a_store_without_blob_files_a_range_is_copied_at_its_first_reuse(
    store: Path, tmp_path: Path
) -> None:
    """Ranges on a store without local blob files (in memory here, like a bucket) are copied
    into the cache when first reused: later reuses read the copy, even once the blob is gone."""
    blobs = MemoryStore()
    with FragmentCache(tmp_path / "fragments") as cache:
        view = cache.on_store(blobs)
        assert view.copy_on_reuse
        layer = view.layer()
        out = io.BytesIO()
        packed = pack_store_paths(PATHS[:2], out.write, OPTIONS, store_root=store,
                                  fragments=layer)
        blobs.put_blob(out.getvalue(), OPTIONS.media_type)
        layer.stored(packed.digest)
        cache.flush()
        assert all(blob == packed.digest for _, _, blob in _rows(cache.directory))
        regrouped = _plain(store, [PATHS[0]])
        again = io.BytesIO()
        assert pack_store_paths([PATHS[0]], again.write, OPTIONS, store_root=store,
                                fragments=view) == regrouped[0]
        assert again.getvalue() == regrouped[1]
        cache.flush()
        blobs.delete_blob(packed.digest)
        hits = cache.hits
        third = io.BytesIO()
        assert pack_store_paths([PATHS[0]], third.write, OPTIONS, store_root=store,
                                fragments=view) == regrouped[0]
        assert third.getvalue() == regrouped[1]
        assert cache.hits == hits + 1  # the copy, though the blob is gone
        named = {blob for _, _, blob in _rows(cache.directory)}
        assert named == {None, packed.digest}  # PATHS[0] a copy, PATHS[1] still a range


class _FlakyReads:
    """A store without blob files that stops answering (a transient outage) once ``budget``
    bytes of its blobs were read, counting the bytes read."""

    def __init__(self, blobs: MemoryStore, budget: int) -> None:
        self.blobs, self.budget, self.read = blobs, budget, 0

    def open_blob(self, digest: str) -> BinaryIO:
        return cast("BinaryIO", _FlakyStream(self, self.blobs.read_blob(digest)))

    def read_blob(self, digest: str) -> bytes:
        return self.blobs.read_blob(digest)


class _FlakyStream(io.BytesIO):
    """A blob's stream of a :class:`_FlakyReads` store."""

    def __init__(self, store: _FlakyReads, data: bytes) -> None:
        super().__init__(data)
        self.store = store

    def read(self, size: int | None = -1) -> bytes:
        data = super().read(size)
        self.store.read += len(data)
        if self.store.read > self.store.budget:
            raise StorageUnavailable("store down while reading")
        return data


#: A range larger than a lookup keeps in memory (8 MiB): its bytes must be had again.
_BIG = 9 << 20


def _big_range(cache: FragmentCache, blobs: MemoryStore, size: int = _BIG) -> tuple[str, bytes]:
    """A range of ``size`` arbitrary bytes recorded in ``cache`` as a whole blob of ``blobs``."""
    data = os.urandom(size)
    layer = cache.on_store(blobs).layer()
    writer = layer.writer("big")
    writer.offset = 0
    writer.add(data)
    writer.commit(len(data))
    layer.stored(blobs.put_blob(data, OPTIONS.media_type).digest)
    cache.flush()
    return "big", data


@pytest.mark.parametrize("size", [_BIG, 17 << 20], ids=["held-copy", "spilled-copy"])
def test_a_range_copied_at_its_first_reuse_is_read_from_its_store_once(
    tmp_path: Path, size: int
) -> None:
    """A range over 8 MiB copied at its first reuse is read from its store once (checked, then
    served and copied from that read): a store that stops answering after it changes nothing."""
    blobs = MemoryStore()
    with FragmentCache(tmp_path / "fragments") as cache:
        key, data = _big_range(cache, blobs, size)
        flaky = _FlakyReads(blobs, budget=size)
        with cache.on_store(flaky).get(key) as found:
            assert found is not None
            assert b"".join(found.pieces()) == data
        assert flaky.read == size
        assert (cache.hits, cache.misses) == (1, 0)
        cache.flush()
        [(_, file, blob)] = _rows(cache.directory)
        assert (file is not None, blob) == (True, None)  # the copy replaced the range
        with cache.on_store(flaky).get(key) as found:
            assert found is not None
            assert b"".join(found.pieces()) == data
        assert flaky.read == size


class _LargestRead(MemoryStore):
    """A store of ranged reads (a bucket) that remembers its largest read."""

    largest: int = 0

    def read_range(self, digest: str, offset: int, length: int) -> bytes:
        self.largest = max(self.largest, length)
        return super().read_range(digest, offset, length)


@pytest.mark.parametrize("copy_on_reuse", [True, False], ids=["copied", "read-each-time"])
def test_a_range_larger_than_one_request_is_never_read_whole_from_a_bucket(
    tmp_path: Path, copy_on_reuse: bool
) -> None:
    """A range over MAX_REQUEST (16 MiB) on a store of ranged reads streams in requests of at
    most that size, read ahead or not (memory stays bounded), and gives the same bytes."""
    blobs = _LargestRead()
    with FragmentCache(tmp_path / "fragments") as cache:
        key, data = _big_range(cache, blobs, 2 * MAX_REQUEST + 5)
        view = StoreFragments(cache, blobs, copy_on_reuse=copy_on_reuse)
        reads = view.plan([key])
        assert reads is None or key not in reads  # not read ahead whole
        with view.get(key) as found:
            assert found is not None
            assert b"".join(found.pieces()) == data
        assert 0 < blobs.largest <= MAX_REQUEST
        assert blobs.range_reads >= 3


def test_a_range_whose_store_is_down_when_reused_is_a_miss_kept_and_not_copied(
    tmp_path: Path,
) -> None:
    """A range whose store stops answering while it is read for its first reuse is a miss (no
    error reaches the pack), is not copied and stays, found once the store answers again."""
    blobs = MemoryStore()
    with FragmentCache(tmp_path / "fragments") as cache:
        key, data = _big_range(cache, blobs)
        with cache.on_store(_FlakyReads(blobs, budget=_BIG // 2)).get(key) as found:
            assert found is None
        cache.flush()
        assert _rows(cache.directory) == [(key, None, sha256_digest(data))]
        assert _data_files(cache.directory) == []
        with cache.on_store(blobs).get(key) as found:
            assert found is not None
            assert b"".join(found.pieces()) == data


def test_a_range_that_cannot_be_read_again_while_packed_raises_a_layer_error(
    tmp_path: Path,
) -> None:
    """Re-reading a range whose store stopped answering raises LayerError chained to the
    store's StorageUnavailable (the pack fails with the documented error)."""
    blobs = MemoryStore()
    with FragmentCache(tmp_path / "fragments") as cache:
        key, _ = _big_range(cache, blobs)
        view = StoreFragments(cache, _FlakyReads(blobs, budget=_BIG), copy_on_reuse=False)
        with view.get(key) as found:
            assert found is not None
            with pytest.raises(LayerError) as raised:
                b"".join(found.pieces())
        assert isinstance(raised.value.__cause__, StorageUnavailable)


def test_check_reports_and_repairs_ranges_of_blobs_not_stored(
    store: Path, tmp_path: Path
) -> None:
    """check(store) names each layer blob gone from under ranges; repair drops those rows
    (and only those), after which the check is clean."""
    blobs, cache, _ = _cold(tmp_path, store)
    with cache:
        first = _plain(store, PATHS[:2])[0]
        assert cache.check(blobs) == []
        blobs.delete_blob(first.digest)
        assert cache.check() == []  # without a store, ranges are not judged
        problem = f"ranges of a blob not stored: {first.digest}"
        assert cache.check(blobs) == [problem]
        assert cache.check(blobs, repair=True) == [problem.replace(":", " (dropped):", 1)]
        assert cache.check(blobs) == []
        assert len(_rows(cache.directory)) == len(PATHS) - 2


def test_gc_drops_the_local_ranges_of_the_blobs_it_deleted(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`nixery-core gc --cache DIR` deleting unnamed layer blobs drops the local fragment
    ranges of exactly those blobs, so they do not linger as misses; a dry run drops none."""
    blobs = FilesystemStore(tmp_path / "blobs", durable=False)
    _, cache = _build(tmp_path, "cache", "auto", blobs)
    cache.close()
    directory = tmp_path / "cache" / "fragments"
    ranged = {blob for _, _, blob in _rows(directory)}
    assert ranged
    for prefix in ("builds/", "manifests/"):  # the image's entries gone: its layers unnamed
        for key in list(blobs.list_objects(prefix)):
            blobs.delete_object(key)
    gc = ["gc", "--store", str(blobs.root), "--grace", "0", "--cache", str(tmp_path / "cache")]
    capsys.readouterr()
    assert main([*gc, "--dry-run"]) == 0
    assert len(_rows(directory)) > 0
    rows = len(_rows(directory))
    assert main(gc) == 0
    assert f"dropped {rows} local fragment ranges whose blob is gone" in capsys.readouterr().out
    assert _rows(directory) == []
    with FragmentCache(directory) as fragments:
        assert fragments.volume() == 0


@pytest.mark.parametrize("mode", ["range", "copy"])
def test_a_pack_whose_fragment_commit_fails_is_a_miss_for_that_path_only(
    store: Path, tmp_path: Path, mode: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A gzip pack whose commit of one store path's fragment raises (a range's layout
    encoded ahead, a copy queued for the writing thread: neither can start it) gives the
    bytes of a pack without a cache, and keeps no row or file for that path, the others'
    rows all the same."""
    expected = _plain(store, PATHS)
    monkeypatch.setattr(fragments, "_SPILL_SIZE", 1 << 10)  # copies written as they come
    ahead = fragments.FragmentCache._encode_ahead
    submit = fragments.FragmentCache._submit
    calls: list[None] = []

    def first_fails() -> None:
        calls.append(None)
        if len(calls) == 1:  # the first store path's commit
            raise RuntimeError("can't start new thread")

    def encode_ahead(
        self: FragmentCache, layout: bytes | fragments.EncodesLayout | None
    ) -> bytes | fragments.EncodesLayout | None:
        first_fails()
        return ahead(self, layout)

    def submitting(self: FragmentCache, key: str, item: fragments._Pending) -> None:
        first_fails()
        submit(self, key, item)

    if mode == "range":
        monkeypatch.setattr(fragments.FragmentCache, "_encode_ahead", encode_ahead)
    else:
        monkeypatch.setattr(fragments.FragmentCache, "_submit", submitting)
    blobs = FilesystemStore(tmp_path / "blobs", durable=False)
    with FragmentCache(tmp_path / "fragments") as cache:
        source = cache.on_store(blobs).layer() if mode == "range" else cache
        packed = _pack_into(blobs, store, PATHS, source)
        cache.flush()
        rows = _rows(cache.directory)
        files = {path.relative_to(cache.directory / "data").as_posix()
                 for path in _data_files(cache.directory)}
    assert (packed, blobs.read_blob(packed.digest)) == expected
    parameters = OPTIONS.parameters()
    keys = [fragments.fragment_key(os.fsencode(store / path.lstrip("/")), parameters)
            for path in PATHS]
    assert sorted(key for key, _, _ in rows) == sorted(keys[1:])
    assert files == {file for _, file, _ in rows if file is not None}


def test_a_layout_encoded_ahead_asked_by_two_threads_at_once_is_encoded_once() -> None:
    """A range's layout asked for by the writing thread and a bucket tier's sharing thread
    at the same time is encoded once, and both get its bytes."""
    entered, release = threading.Event(), threading.Event()

    class Slow(_Layout):
        def encode(self) -> bytes:
            entered.set()
            release.wait(10)
            return super().encode()

    layout = Slow()
    ahead = fragments._EncodedAhead(layout)
    results: list[bytes | None] = []
    first = threading.Thread(target=lambda: results.append(ahead.encode()))
    first.start()
    assert entered.wait(10)
    second = threading.Thread(target=lambda: results.append(ahead.encode()))
    second.start()
    time.sleep(0.2)  # the second asks while the first encodes
    release.set()
    first.join(10)
    second.join(10)
    assert results == [b"layout", b"layout"]
    assert len(layout.threads) == 1


@pytest.mark.parametrize("size", [_BIG, 17 << 20], ids=["held-copy", "spilled-copy"])
def test_a_range_whose_copy_at_first_reuse_cannot_be_kept_is_read_from_its_store(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, size: int
) -> None:
    """A range reused on a store without blob files whose copy cannot be kept (the cache's
    writing thread cannot be started) is still a hit, read from its store: the same bytes,
    no copy's row and no copy's file left."""
    blobs = MemoryStore()
    with FragmentCache(tmp_path / "fragments") as cache:
        key, data = _big_range(cache, blobs, size)

        def failing(self: FragmentCache, key: str, item: fragments._Pending) -> None:
            raise RuntimeError("can't start new thread")

        monkeypatch.setattr(fragments.FragmentCache, "_submit", failing)
        view = cache.on_store(blobs)
        with view.get(key) as found:
            assert found is not None
            assert b"".join(found.pieces()) == data
            assert found.blob is not None  # read from the store, not from a copy
        monkeypatch.undo()
        cache.flush()
        assert [(file, blob) for _, file, blob in _rows(cache.directory)] == [
            (None, found.blob)
        ]
        assert _data_files(cache.directory) == []


def test_a_gzip_ranges_crc_is_taken_where_its_blocks_are_deflated_and_is_its_bytes(
    store: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A cold gzip pack on a pool records each range's CRC-32 from the pool's threads (the
    packing thread checksums only the members' few header and trailer bytes), and every
    recorded CRC-32 is that of the range's bytes in the stored blob."""
    given = []
    add = fragments.RangeWriter.add

    def counted(self: fragments.RangeWriter, piece: bytes) -> None:
        given.append(len(piece))
        add(self, piece)

    monkeypatch.setattr(fragments.RangeWriter, "add", counted)
    blobs = FilesystemStore(tmp_path / "blobs", durable=False)
    with FragmentCache(tmp_path / "fragments") as cache:
        layer = cache.on_store(blobs).layer()
        with blobs.open_blob_writer(OPTIONS.media_type) as writer:
            packed = pack_store_paths(PATHS, writer.write, OPTIONS, store_root=store,
                                      fragments=layer, threads=2)
            writer.commit(packed.digest)
        layer.stored(packed.digest)
        cache.flush()
        with sqlite3.connect(cache.directory / "index.sqlite") as con:
            rows = con.execute("SELECT offset, size, crc, blob FROM fragments").fetchall()
    assert len(rows) == len(PATHS)
    assert all(blob == packed.digest for *_, blob in rows)
    for offset, size, crc, blob in rows:
        assert zlib.crc32(blobs.read_range(blob, offset, size)) == crc
    # Each member's 10-byte header and 10-byte end; its deflated blocks come checksummed.
    assert sum(given) <= 20 * len(rows) < sum(size for _, size, _, _ in rows)
