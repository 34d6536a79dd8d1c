"""Per-store-path fragments: one member per store path, reused from the cache in any grouping."""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import shutil
import sqlite3
import subprocess
import tarfile
import zlib
from pathlib import Path
from typing import Any

import pytest
from conftest import require_tools, threads_started

from nixery_core import archive
from nixery_core import fragments as fragments_module
from nixery_core.archive import ArchiveOptions, PackedLayer, pack_store_paths
from nixery_core.build import build_image
from nixery_core.cache import BuildCache
from nixery_core.errors import (
    BadCachedFragment,
    StorageUnavailable,
    UnsafeStoreContent,
)
from nixery_core.fragments import FragmentCache, fragment_key, fragment_keys
from nixery_core.names import Image
from nixery_core.testing.runners import FakeNix, default_fake_packages
from nixery_core.testing.sources import FixedSource
from nixery_core.testing.storage import MemoryStore

PATHS = [f"/nix/store/{c * 32}-pkg{i}" for i, c in enumerate("abcd")]


def make_store(root: Path) -> Path:
    """Four store paths: text, binary-ish data, a link inside one path, a file over 1 MiB."""
    for i, path in enumerate(PATHS):
        base = root / path.lstrip("/")
        (base / "bin").mkdir(parents=True)
        (base / "bin" / "tool").write_bytes(b"\x7fELF" + bytes(range(256)) * (50 + i))
        (base / "bin" / "tool").chmod(0o755)
        (base / "share").mkdir()
        (base / "share" / "README").write_text(f"package {i}\n" * 400)
        (base / "share" / "copy").write_text(f"package {i}\n" * 400)  # linked to README
        (base / "lib").symlink_to("bin")
    big = root / PATHS[3].lstrip("/") / "data.bin"
    big.write_bytes(b"".join(hashlib.sha256(b"%d" % n).digest() for n in range(50_000)))
    return root


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_store(tmp_path_factory.mktemp("store"))


def pack(
    store: Path, paths: list[str], options: ArchiveOptions, cache: FragmentCache | None = None
) -> tuple[PackedLayer, bytes]:
    out = io.BytesIO()
    packed = pack_store_paths(paths, out.write, options, store_root=store, fragments=cache)
    return packed, out.getvalue()


OPTIONS = [
    pytest.param(ArchiveOptions(), id="gzip"),
    pytest.param(ArchiveOptions(compression="zstd"), id="zstd"),
    pytest.param(ArchiveOptions(gzip_backend="zlib"), id="gzip-zlib"),
]


@pytest.mark.parametrize("options", OPTIONS)
def test_layers_are_byte_identical_with_cold_warm_or_no_fragment_cache(
    store: Path, tmp_path: Path, options: ArchiveOptions
) -> None:
    """Packing without a cache, with an empty one and from cached fragments gives the same blob."""
    plain = pack(store, PATHS, options)
    with FragmentCache(tmp_path / "fragments") as cache:
        cold = pack(store, PATHS, options, cache)
        assert (cache.hits, cache.misses) == (0, len(PATHS))
        warm = pack(store, PATHS, options, cache)
        assert (cache.hits, cache.misses) == (len(PATHS), len(PATHS))
    assert cold == plain
    assert warm == plain


@pytest.mark.parametrize("options", OPTIONS)
def test_fragments_packed_in_one_grouping_assemble_any_other(
    store: Path, tmp_path: Path, options: ArchiveOptions
) -> None:
    """Paths packed as layers {a,b} and {c,d} make layers {a,c} and {b,d} with no compression."""
    with FragmentCache(tmp_path / "fragments") as cache:
        pack(store, PATHS[:2], options, cache)
        pack(store, PATHS[2:], options, cache)
        before = cache.misses
        regrouped = [pack(store, [PATHS[0], PATHS[2]], options, cache),
                     pack(store, [PATHS[1], PATHS[3]], options, cache)]
        assert cache.misses == before  # every path came from the cache
    assert regrouped == [pack(store, [PATHS[0], PATHS[2]], options),
                         pack(store, [PATHS[1], PATHS[3]], options)]


def _gzip_members(blob: bytes) -> list[bytes]:
    """Each gzip member's decompressed bytes, split by zlib (not the code under test)."""
    members = []
    rest = blob
    while rest:
        inflate = zlib.decompressobj(31)
        members.append(inflate.decompress(rest))
        assert inflate.eof
        rest = inflate.unused_data
    return members


def test_each_store_path_is_one_gzip_member(store: Path) -> None:
    """Golden structure: a member for nix/ and nix/store/, one per store path, one for the end."""
    packed, blob = pack(store, PATHS, ArchiveOptions())
    members = _gzip_members(blob)
    assert len(members) == len(PATHS) + 2
    assert len(members[0]) == 1024  # two directory headers
    assert members[-1] == bytes(1024)  # the end of the archive
    tar = b"".join(members)
    assert packed.diff_id == "sha256:" + hashlib.sha256(tar).hexdigest()
    for member, path in zip(members[1:-1], PATHS, strict=True):
        with tarfile.open(fileobj=io.BytesIO(member + bytes(1024)), mode="r:") as archive:
            names = archive.getnames()
        assert names[0] == path.lstrip("/")
        assert all(n == names[0] or n.startswith(names[0] + "/") for n in names)


def test_uncompressed_layer_golden_vector(tmp_path: Path) -> None:
    """A fixed tree packs to a pinned diff_id (the tar bytes themselves, format nixery-tar/3)."""
    root = tmp_path / "golden"
    base = root / "nix" / "store" / ("g" * 32 + "-golden")
    (base / "bin").mkdir(parents=True)
    (base / "bin" / "hi").write_bytes(b"#!/bin/sh\necho hi\n")
    (base / "bin" / "hi").chmod(0o755)
    (base / "bin" / "hi-again").write_bytes(b"#!/bin/sh\necho hi\n")
    (base / "bin" / "hi-again").chmod(0o755)
    (base / "doc").symlink_to("bin")
    packed, blob = pack(root, ["/nix/store/" + base.name], ArchiveOptions(compression="none"))
    with tarfile.open(fileobj=io.BytesIO(blob), mode="r:") as archive:
        listing = [(m.name, m.type, m.mode, m.linkname) for m in archive.getmembers()]
    name = base.relative_to(root).as_posix()
    assert listing == [
        ("nix", tarfile.DIRTYPE, 0o755, ""),
        ("nix/store", tarfile.DIRTYPE, 0o755, ""),
        (name, tarfile.DIRTYPE, 0o555, ""),
        (f"{name}/bin", tarfile.DIRTYPE, 0o555, ""),
        (f"{name}/bin/hi", tarfile.REGTYPE, 0o555, ""),
        (f"{name}/bin/hi-again", tarfile.LNKTYPE, 0o555, f"{name}/bin/hi"),
        (f"{name}/doc", tarfile.SYMTYPE, 0o777, "bin"),
    ]
    assert packed.diff_id == (
        "sha256:1ab9f0070111f1647ede155cfe9faec3bafa73f180ff8c72b6b768cdee16e978"
    )


def test_gzip_cli_and_tarfile_read_the_multi_member_layer(store: Path, tmp_path: Path) -> None:
    """gzip -d and tarfile's r:gz read the concatenated members as one tar."""
    require_tools("gzip")
    packed, blob = pack(store, PATHS, ArchiveOptions())
    layer = tmp_path / "layer.tar.gz"
    layer.write_bytes(blob)
    tar = subprocess.run(["gzip", "-dc", str(layer)], check=True, capture_output=True).stdout
    assert packed.diff_id == "sha256:" + hashlib.sha256(tar).hexdigest()
    assert tar == gzip.decompress(blob)
    with tarfile.open(layer, mode="r:gz") as archive:
        assert archive.getmember(PATHS[3].lstrip("/") + "/data.bin").size == 50_000 * 32


def test_zstd_cli_reads_the_multi_frame_layer(store: Path, tmp_path: Path) -> None:
    """zstd -d reads the concatenated frames as one tar."""
    require_tools("zstd")
    packed, blob = pack(store, PATHS, ArchiveOptions(compression="zstd"))
    layer = tmp_path / "layer.tar.zst"
    layer.write_bytes(blob)
    tar = subprocess.run(["zstd", "-dc", str(layer)], check=True, capture_output=True).stdout
    assert packed.diff_id == "sha256:" + hashlib.sha256(tar).hexdigest()


def test_damaged_cached_fragment_is_a_miss_and_repacked(store: Path, tmp_path: Path) -> None:
    """A cache file whose bytes changed is dropped and the path packed again: same layer."""
    options = ArchiveOptions()
    expected = pack(store, PATHS, options)
    with FragmentCache(tmp_path / "fragments") as cache:
        pack(store, PATHS, options, cache)
        cache.flush()  # fragments are written by a background thread
        damaged = 0
        for file in (tmp_path / "fragments" / "data").rglob("*"):
            if not file.is_file():
                continue
            data = bytearray(file.read_bytes())
            data[len(data) // 2] ^= 0xFF
            file.write_bytes(bytes(data))
            damaged += 1
        assert damaged  # fragments over 32 KiB live in files
        misses = cache.misses
        assert pack(store, PATHS, options, cache) == expected
        assert cache.misses == misses + damaged
        assert pack(store, PATHS, options, cache) == expected  # repaired


def test_a_large_fragment_changed_between_its_check_and_its_copy_raises(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A fragment too large to hold is checked again as it is copied: a file changed after
    the lookup's check raises BadCachedFragment instead of giving wrong bytes, and is
    dropped (row and file), so the next pack compresses the store path."""
    monkeypatch.setattr(fragments_module, "_HOLD_SIZE", 1000)  # not held: read twice
    data = os.urandom(300_000)
    with FragmentCache(tmp_path / "fragments") as cache:
        cache.put("big", [data], 1 << 20)
        with cache.get("big") as found:
            assert found is not None
            assert found.held is None
            assert b"".join(found.pieces()) == data  # unchanged: copied whole
            (file,) = (p for p in (tmp_path / "fragments" / "data").rglob("*") if p.is_file())
            with file.open("r+b") as damaged:  # in place: the open stream sees it
                damaged.seek(len(data) // 2)
                damaged.write(bytes([data[len(data) // 2] ^ 0xFF]))
            with pytest.raises(BadCachedFragment, match="changed between its check and its copy"):
                b"".join(found.pieces())
        assert "big" not in cache
        assert cache.refused == 1
        assert not [p for p in (tmp_path / "fragments" / "data").rglob("*") if p.is_file()]


@pytest.mark.parametrize("compression", ["gzip", "zstd", "estargz", "zstd-chunked"])
def test_a_local_fragment_whose_row_records_another_size_is_dropped_and_compressed(
    store: Path, tmp_path: Path, compression: str
) -> None:
    """A local copy whose bytes pass their CRC-32 but whose row records another uncompressed
    size (rewritten behind the cache's back) is dropped with its file and its path
    compressed, byte-identical to a pack without a cache: a miss where its zstd frames
    declare their sizes (zstd:chunked's), else after failing the one pack copying it
    with BadCachedFragment naming it."""
    options = ArchiveOptions(compression=compression)  # type: ignore[arg-type]  # a str from the parameters
    expected = pack(store, PATHS, options)
    key = fragment_key(os.fsencode(store / PATHS[3].lstrip("/")), options.parameters())
    with FragmentCache(tmp_path / "fragments") as cache:
        pack(store, PATHS, options, cache)
    con = sqlite3.connect(tmp_path / "fragments" / "index.sqlite")
    with con:
        (file,) = con.execute("SELECT file FROM fragments WHERE key = ?", (key,)).fetchone()
        con.execute("UPDATE fragments SET uncompressed = uncompressed + 1 WHERE key = ?", (key,))
    con.close()
    assert file is not None  # 1.6 MB of data.bin: a file of its own
    with FragmentCache(tmp_path / "fragments") as cache:
        if compression == "zstd-chunked":  # its frames declare their sizes: a miss
            assert pack(store, PATHS, options, cache) == expected
            assert cache.refused == 1
        else:
            with pytest.raises(BadCachedFragment, match="a copy in the cache") as raised:
                pack(store, PATHS, options, cache)
            assert (raised.value.key, raised.value.blob) == (key, None)
            assert (key not in cache, cache.refused) == (True, 1)
        assert not (tmp_path / "fragments" / "data" / file).exists()
        assert pack(store, PATHS, options, cache) == expected
        assert cache.check() == []


def test_fragment_cache_stays_within_its_size_limit(store: Path, tmp_path: Path) -> None:
    """A small limit evicts fragments (least recently used first); layers stay right."""
    options = ArchiveOptions()
    expected = pack(store, PATHS, options)
    limit = 64 * 1024
    with FragmentCache(tmp_path / "fragments", size_limit=limit) as cache:
        for _ in range(3):
            assert pack(store, PATHS, options, cache) == expected
        cache.flush()
        assert cache.volume() <= limit


def test_eviction_is_by_use_though_hits_do_not_write(tmp_path: Path) -> None:
    """Storing past the limit evicts a fragment never read before one read since it was stored."""
    pieces = {name: os.urandom(1 << 20) for name in "abcd"}
    with FragmentCache(tmp_path / "fragments", size_limit=3584 * 1024) as cache:
        for name in "abc":
            cache.put(name, [pieces[name]], 1 << 20)
        with cache.get("a") as found:
            assert found is not None
        cache.put("d", [pieces["d"]], 1 << 20)  # over the limit: the least recently used goes
        assert cache.keys() == ["a", "c", "d"]
        with cache.get("a") as found:
            assert found is not None
            assert b"".join(found.pieces()) == pieces["a"]


def test_large_fragments_spill_to_disk_and_read_back(
    store: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Fragments past the in-memory threshold are recorded through a temporary file."""
    monkeypatch.setattr(fragments_module, "_SPILL_SIZE", 1000)
    options = ArchiveOptions()
    expected = pack(store, PATHS, options)
    with FragmentCache(tmp_path / "fragments") as cache:
        pack(store, PATHS, options, cache)
        hits = cache.hits
        assert pack(store, PATHS, options, cache) == expected
        assert cache.hits == hits + len(PATHS)
        cache.flush()
        assert cache.check() == []  # every file written while recorded is named by its row


@pytest.mark.parametrize("written", [False, True], ids=["queued", "written"])
@pytest.mark.parametrize("size", [100, 40_000, 200_000], ids=["inline", "held", "spilled"])
def test_a_writer_discarded_after_its_commit_withdraws_its_copy(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, *, size: int, written: bool
) -> None:
    """A fragment writer discarded after its commit (its pair's other part failed) keeps
    neither row nor data file, whether its copy still waited for the writing thread or was
    written already, small (in the index), held or spilled; another fragment stays kept."""
    monkeypatch.setattr(fragments_module, "_SPILL_SIZE", 100_000)
    with FragmentCache(tmp_path / "fragments") as cache:
        before = sorted(os.walk(cache.directory))
        kept = cache.writer("kept")
        kept.add(b"k" * size)
        kept.commit(size)
        writer = cache.writer("withdrawn")
        writer.add(b"x" * size)
        writer.commit(size)
        if written:
            cache.flush()
            assert "withdrawn" in cache
        writer.discard()
        writer.discard()  # twice: nothing more
        cache.flush()
        assert "withdrawn" not in cache
        assert cache.keys() == ["kept"]
        with cache.get("kept") as found:
            assert found is not None
            assert b"".join(found.pieces()) == b"k" * size
        kept.discard()  # withdrawn too: the cache is as it was
        cache.flush()
        assert cache.keys() == []
        assert sorted(os.walk(cache.directory)) == before


@pytest.mark.parametrize("spilled", [False, True], ids=["held", "spilled"])
def test_a_discarded_writer_given_more_than_its_limit_keeps_no_file_and_no_row(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, *, spilled: bool
) -> None:
    """A fragment writer discarded (held in memory or already in its data file) keeps
    nothing of the bytes still given to it past its in-memory limit, opens no data file
    for them, and its commit after the discard keeps no row."""
    monkeypatch.setattr(fragments_module, "_SPILL_SIZE", 1000)
    opened: list[int] = []
    real_open = os.open

    def counting_open(*args: Any, **kwargs: Any) -> int:
        fd = real_open(*args, **kwargs)
        opened.append(fd)
        return fd

    with FragmentCache(tmp_path / "fragments") as cache:
        before = sorted(os.walk(cache.directory))
        writer = cache.writer("dropped")
        writer.add(b"x" * (1500 if spilled else 500))
        writer.discard()
        monkeypatch.setattr(os, "open", counting_open)
        for _ in range(10):
            writer.add(b"y" * 800)
        writer.commit(9000)
        monkeypatch.setattr(os, "open", real_open)
        assert opened == []
        assert writer._pieces == []
        cache.flush()
        assert "dropped" not in cache
        assert cache.keys() == []
        assert sorted(os.walk(cache.directory)) == before


def test_failed_pack_keeps_no_fragment_of_the_failing_path(store: Path, tmp_path: Path) -> None:
    """A store path refused mid-walk (a fifo) leaves no fragment for it in the cache."""
    root = tmp_path / "root"
    shutil.copytree(store, root, symlinks=True)
    bad = root / PATHS[2].lstrip("/")
    os.mkfifo(bad / "share" / "zz-fifo")
    options = ArchiveOptions()
    with FragmentCache(tmp_path / "fragments") as cache:
        with pytest.raises(UnsafeStoreContent):
            pack(root, PATHS, options, cache)
        cache.flush()
        key = fragment_key(os.fsencode(bad), options.parameters())
        assert key not in cache
        assert len(cache.keys()) <= 2  # at most the paths before it


def test_build_reuses_fragments_for_a_new_grouping(tmp_path: Path) -> None:
    """A second image whose store paths were all packed before compresses nothing again."""
    runner = FakeNix(tmp_path / "root", default_fake_packages())
    store = MemoryStore()
    with BuildCache(tmp_path / "cache") as cache:
        first = build_image(Image.from_name("shell/hello"), FixedSource(), runner=runner,
                            uploader=store, cache=cache, store_root=runner.store_root)
        fragments = cache.fragments
        assert fragments is not None
        misses = fragments.misses
        second = build_image(Image.from_name("shell/hello"), FixedSource(), runner=runner,
                             uploader=store, cache=cache, store_root=runner.store_root,
                             layer_budget=3)  # other groups of the same paths
        assert fragments.misses == misses
        assert fragments.hits > 0
    assert {layer.digest for layer in second.layers} - {layer.digest for layer in first.layers}
    shutil.rmtree(tmp_path / "cache")
    with BuildCache(tmp_path / "cache") as cold:
        again = build_image(Image.from_name("shell/hello"), FixedSource(), runner=runner,
                            uploader=MemoryStore(), cache=cold, store_root=runner.store_root,
                            layer_budget=3)
    assert again.manifest_digest == second.manifest_digest


@pytest.mark.parametrize("way", ["streamed", "one-thread"])
def test_fragments_inflated_inline_give_the_same_layer(
    store: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, way: str
) -> None:
    """Cached fragments inflated on the packing thread (large ones, or without a pool) give
    the same layer as those inflated on the pool."""
    options = ArchiveOptions()
    expected = pack(store, PATHS, options)
    with FragmentCache(tmp_path / "fragments") as cache:
        pack(store, PATHS, options, cache)
        if way == "streamed":
            monkeypatch.setattr(archive, "_PARALLEL_INFLATE", 0)
            again = pack(store, PATHS, options, cache)
        else:
            out = io.BytesIO()
            packed = pack_store_paths(PATHS, out.write, options, store_root=store,
                                      fragments=cache, threads=1)
            again = (packed, out.getvalue())
        assert cache.hits == len(PATHS)
    assert again == expected


def _no_inflating(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make any decompression of a cached fragment fail the test."""

    def refuse(_spec: object) -> None:
        raise AssertionError("a cached fragment was decompressed")

    monkeypatch.setattr(archive, "_decompressor", refuse)
    monkeypatch.setattr(archive, "_inflate_whole", refuse)


@pytest.mark.parametrize("options", OPTIONS)
def test_regrouped_layers_rebuild_the_tar_from_the_store_not_by_decompressing(
    store: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, options: ArchiveOptions
) -> None:
    """With every fragment cached, the diff_id comes from the store re-read by each fragment's
    layout (nothing is decompressed), and the layer is the one packed without a cache."""
    expected = [pack(store, [PATHS[0], PATHS[3]], options), pack(store, PATHS[1:3], options)]
    with FragmentCache(tmp_path / "fragments") as cache:
        pack(store, PATHS, options, cache)
        _no_inflating(monkeypatch)
        regrouped = [pack(store, [PATHS[0], PATHS[3]], options, cache),
                     pack(store, PATHS[1:3], options, cache)]
        assert cache.hits == len(PATHS)
    assert regrouped == expected


@pytest.mark.parametrize("options", OPTIONS)
def test_a_members_layout_is_the_headers_the_packer_puts_with_no_call_per_member(
    store: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, options: ArchiveOptions
) -> None:
    """A gzip or zstd layer's fragment keeps the layout of the headers announced as they are put
    (NXL3, as a chunked layer's), no layout call per member or file, and a regroup rebuilds
    from it the layer packed without a cache."""
    from nixery_core.fragment_layout import LayoutRecorder

    def refuse(*_args: object) -> None:
        raise AssertionError("a layout call per member on the packing thread")

    for name in ("member", "literal", "file"):
        monkeypatch.setattr(LayoutRecorder, name, refuse)
    expected = pack(store, PATHS[1:3], options)
    with FragmentCache(tmp_path / "fragments") as cache:
        pack(store, PATHS, options, cache)
        cache.flush()
        with sqlite3.connect(tmp_path / "fragments" / "index.sqlite") as index:
            layouts = [layout for (layout,) in index.execute("SELECT layout FROM fragments")]
        assert len(layouts) == len(PATHS)
        assert {zlib.decompress(layout)[:4] for layout in layouts} == {b"NXL3"}
        _no_inflating(monkeypatch)
        assert pack(store, PATHS[1:3], options, cache) == expected


@pytest.mark.parametrize("options", OPTIONS[:2])
def test_headers_of_every_kind_rebuild_from_an_announced_layout(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, options: ArchiveOptions
) -> None:
    """A store path whose members need a pax header (a long or non-ASCII name, a long link
    target), a ustar prefix, or none (empty, small, larger than a tar block, a hard link)
    is rebuilt from its announced layout, byte for byte the layer packed without a cache."""
    path = "/nix/store/" + "e" * 32 + "-names"
    base = tmp_path / "root" / path.lstrip("/")
    deep = base / ("d" * 60) / ("e" * 60)
    deep.mkdir(parents=True)
    (deep / "prefixed").write_bytes(b"p" * 700)  # a name split into ustar's prefix
    (base / ("n" * 180)).write_bytes(b"x" * 3000)  # no split fits: a pax path record
    (base / "caf\u00e9").write_bytes(b"non-ascii")
    (base / "empty").write_bytes(b"")
    (base / "big").write_bytes(bytes(range(256)) * 5000)  # past the staging room: read in pieces
    (base / "same").write_bytes(bytes(range(256)) * 5000)  # a hard link to big
    (base / "link").symlink_to("t" * 150)  # a long link target: a pax linkpath record
    root = tmp_path / "root"
    other = PATHS[0]
    make_store(tmp_path / "others")
    shutil.copytree(tmp_path / "others" / "nix" / "store", root / "nix" / "store",
                    dirs_exist_ok=True, symlinks=True)
    expected = pack(root, [path], options)
    with FragmentCache(tmp_path / "fragments") as cache:
        pack(root, [other, path], options, cache)
        _no_inflating(monkeypatch)
        assert pack(root, [path], options, cache) == expected
        assert cache.hits == 1


@pytest.mark.parametrize("change", ["first-block", "last-block", "shorter", "removed"])
def test_store_changed_since_its_fragment_was_cached_still_gives_the_shipped_diff_id(
    store: Path, tmp_path: Path, change: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A file that differs from the one compressed into a cached fragment never reaches the
    diff_id: from the first block that differs the fragment is decompressed instead, so the
    diff_id is that of the tar inside the blob shipped (the cached one)."""
    root = tmp_path / "root"
    shutil.copytree(store, root, symlinks=True)
    options = ArchiveOptions()
    expected = pack(root, PATHS, options)
    big = root / PATHS[3].lstrip("/") / "data.bin"  # 1.6 MB: the fragment spans two blocks
    data = bytearray(big.read_bytes())
    with FragmentCache(tmp_path / "fragments") as cache:
        pack(root, PATHS, options, cache)
        big.chmod(0o644)
        if change == "removed":
            big.unlink()
        elif change == "shorter":
            big.write_bytes(bytes(data[:-1]))
        else:
            data[10 if change == "first-block" else len(data) - 10] ^= 0xFF
            big.write_bytes(bytes(data))  # same size
        again = pack(root, PATHS, options, cache)
        assert cache.hits == len(PATHS)
    assert again == expected
    messages = [record.getMessage() for record in caplog.records]
    differs = [message for message in messages if "differs from its cached" in message]
    assert len(differs) == 1  # only the changed store path, from the block that changed
    if change != "removed":
        assert f"from byte {0 if change == 'first-block' else 1 << 20} on" in differs[0]
    assert again[0].diff_id == "sha256:" + hashlib.sha256(gzip.decompress(again[1])).hexdigest()


def test_damaged_layout_falls_back_to_decompressing(
    store: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A fragment whose recorded layout is unreadable is decompressed: the same layer."""
    options = ArchiveOptions()
    expected = pack(store, PATHS, options)
    with FragmentCache(tmp_path / "fragments") as cache:
        pack(store, PATHS, options, cache)
        cache.flush()
        assert len(cache.keys()) == len(PATHS)
        with sqlite3.connect(tmp_path / "fragments" / "index.sqlite") as index:
            layouts = index.execute("SELECT key, layout FROM fragments").fetchall()
            assert all(layout for _key, layout in layouts)  # every one packed here has a layout
            index.executemany(
                "UPDATE fragments SET layout = ? WHERE key = ?",
                [(layout[:-4] + bytes(4), key) for key, layout in layouts],
            )
        assert pack(store, PATHS, options, cache) == expected
        assert cache.hits == len(PATHS)


def test_layout_round_trips_and_refuses_paths_outside_the_store_path() -> None:
    """A recorded layout decodes to the same segments, sizes and block CRCs; one naming a path
    that climbs out of its store path is refused (None: decompress instead)."""
    from nixery_core.fragment_layout import FragmentLayout, LayoutRecorder

    recorder = LayoutRecorder(b"nix/store/x-a")
    recorder.literal(b"H" * 512)
    recorder.file(b"nix/store/x-a/bin/tool", 700)
    recorder.literal(b"\0" * 324)
    recorder.file(b"nix/store/x-a/empty", 0)  # an empty file: header only, no segment
    recorder.block(b"anything")
    raw = recorder.encode()
    assert raw is not None
    layout = FragmentLayout.decode(raw)
    assert layout is not None
    assert layout.segments == ((512, b"/bin/tool", 700), (324, b"", 0))
    assert layout.size == 512 + 700 + 324
    assert layout.crcs == (zlib.crc32(b"anything"),)
    climbing = LayoutRecorder(b"nix/store/x-a")
    climbing.file(b"nix/store/x-a/../y-b/secret", 10)
    climbing.block(b"x")
    escaped = climbing.encode()
    assert escaped is not None
    assert FragmentLayout.decode(escaped) is None
    assert FragmentLayout.decode(b"not a layout") is None


def test_fragment_keys_are_the_keys_of_every_earlier_version() -> None:
    """A fragment's key, one at a time or many with the same options, is the sha256 of the
    sorted compact JSON of its source path and options it always was: a cache filled
    before finds its fragments (non-ASCII, quotes, backslashes, bytes that are not UTF-8)."""
    import json
    from collections.abc import Mapping

    from nixery_core.protocols import JSONValue

    def reference(source: bytes, parameters: Mapping[str, JSONValue]) -> str:
        payload = json.dumps(
            {"source": source.decode("utf-8", "surrogateescape"), "archive": parameters},
            sort_keys=True, separators=(",", ":"),
        )
        return hashlib.sha256(payload.encode("utf-8", "surrogateescape")).hexdigest()

    tricky = b'/nix/store/abc-caf\xc3\xa9 "q"\\\xff'
    nested: dict[str, JSONValue] = {"b": [1, "x\u00e9"], "a": {"z": 1, "y": None}}
    assert fragment_key(tricky, nested) == (  # golden: computed before fragment_keys existed
        "8e82fb6f530e5b637733b70b2bb630962f7c5db430045730e27d7598da0da84b"
    )
    sources = [tricky, b"/nix/store/x-a", b"/nix/store/\x00\x1f\x7f-\xe2\x82\xac\xed\xa0\x80"]
    for options in (ArchiveOptions(), ArchiveOptions(compression="estargz")):
        parameters = options.parameters()
        expected = [reference(source, parameters) for source in sources]
        assert fragment_keys(sources, parameters) == expected
        assert [fragment_key(source, parameters) for source in sources] == expected
    assert fragment_keys(sources, nested) == [reference(source, nested) for source in sources]
    assert fragment_keys([], nested) == []


@pytest.mark.parametrize("kind", ["announced", "calls"])
def test_a_layout_is_deflated_at_the_fastest_level_and_decodes(kind: str) -> None:
    """A layout, of announced headers (NXL3) or of calls (NXL2), is deflated at ISA-L's
    fastest level (level 0: its zlib header says so; the writing thread's encode, in a cold
    pack) and decodes to its members, so older readers inflate it as before."""
    from nixery_core.fragment_layout import FragmentLayout, LayoutRecorder

    top = b"nix/store/x-a"
    recorder = LayoutRecorder(top)
    header = bytes(range(256)) * 2
    if kind == "announced":
        recorder.captured().add(header, (top + b"/f", 0o644, 5, b"0", 0, 0, b""))
    else:
        recorder.member(header, top + b"/f", 5, 507)
    recorder.block(bytes(1024))
    raw = recorder.encode()
    assert raw is not None
    assert raw[:2] == b"\x78\x01"  # zlib's header: the fastest compression level
    layout = FragmentLayout.decode(raw)
    assert layout is not None
    assert layout.segments == ((512, b"/f", 5), (0 if kind == "announced" else 507, b"", 0))
    assert layout.literals.startswith(header)


def test_a_layout_of_any_calls_decodes_to_their_segments_and_literal_bytes() -> None:
    """Literal bytes (bytes or a buffer reused after the call), files and whole members given
    in any order are kept as given: the layout decodes to the literal bytes before each file,
    its path and size, and the literal bytes in order."""
    import random

    from nixery_core.fragment_layout import FragmentLayout, LayoutRecorder

    rng = random.Random(18)  # noqa: S311 - seeded test calls, not secrets
    top = b"nix/store/x-a"
    recorder = LayoutRecorder(top)
    literals, segments, run = bytearray(), [], 0
    buffer = bytearray(600)
    for n in range(2000):
        kind = rng.choice(("literal", "buffer", "file", "member", "member"))
        if kind in ("literal", "buffer"):
            data = rng.randbytes(rng.choice((0, 1, 100, 512, 1024)))
            if kind == "buffer":  # given as a view of a buffer written over afterwards
                buffer[: len(data)] = data
                recorder.literal(memoryview(buffer)[: len(data)])
                buffer[: len(data)] = bytes(len(data))
            else:
                recorder.literal(data)
            literals += data
            run += len(data)
            continue
        size = rng.choice((0, 1, 511, 512, 5000))
        path = b"/f%d" % n
        if kind == "file":
            recorder.file(top + path, size)
            header, pad = b"", 0
        else:
            header, pad = rng.randbytes(512), -size % 512
            recorder.member(header, top + path, size, pad)
        literals += header
        run += len(header)
        if size:
            segments.append((run, path, size))
            run = 0
        literals += bytes(pad)
        run += pad
    segments.append((run, b"", 0))
    total = len(literals) + sum(size for _, _, size in segments)
    recorder.block(bytes(total))  # the block CRCs are not what this pins
    raw = recorder.encode()
    assert raw is not None
    layout = FragmentLayout.decode(raw)
    assert layout is not None
    assert layout.segments == tuple(segments)
    assert layout.literals == bytes(literals)
    assert recorder.encode() == raw  # encoding again gives the same bytes
    empty = LayoutRecorder(top).encode()
    assert empty is not None
    decoded = FragmentLayout.decode(empty)
    assert decoded is not None
    assert decoded.segments == ((0, b"", 0),)


def test_a_layout_records_its_block_crcs_wherever_the_pieces_are_cut() -> None:
    """Uncompressed bytes given in pieces of any length (a chunked layer's shared tar block
    goes on after a store path) record the running CRC-32 at every 1 MiB from the fragment's
    start and at its end: the layout of the same bytes given in 1 MiB blocks."""
    from nixery_core.compression import BLOCK_SIZE
    from nixery_core.fragment_layout import FragmentLayout, LayoutRecorder

    data = os.urandom(3 * BLOCK_SIZE + 12_345)
    layouts = []
    for cuts in ([BLOCK_SIZE] * 4, [700_000, 1_000_000, 2_000_000, 10**7], [1, 2**21, 10**7]):
        recorder = LayoutRecorder(b"nix/store/x-a")
        recorder.literal(b"H" * 512)
        recorder.file(b"nix/store/x-a/data", len(data) - 512)
        at = 0
        for cut in cuts:
            recorder.block(data[at : at + cut])
            at += cut
        raw = recorder.encode()
        assert raw is not None
        layouts.append(FragmentLayout.decode(raw))
    expected = [zlib.crc32(data[: min(len(data), end)])
                for end in range(BLOCK_SIZE, len(data) + BLOCK_SIZE, BLOCK_SIZE)]
    assert layouts[0] is not None
    assert list(layouts[0].crcs) == expected
    assert layouts[1] == layouts[0]
    assert layouts[2] == layouts[0]


@pytest.mark.parametrize("options", [ArchiveOptions(), ArchiveOptions(gzip_backend="zlib")],
                         ids=["gzip", "gzip-zlib"])
def test_a_gzip_layouts_block_crcs_all_come_from_its_compressor(
    store: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, options: ArchiveOptions
) -> None:
    """A gzip layer's fragment layouts take every block's CRC-32 from the member's compressor,
    its last partial block's too once the member is finished, and equal the layouts of the
    same bytes whose CRC-32s were computed from the blocks."""
    from nixery_core.fragment_layout import LayoutRecorder

    computed = []
    block = LayoutRecorder.block

    def counted(self: LayoutRecorder, data: bytes | bytearray | memoryview) -> None:
        computed.append(len(data))
        block(self, data)

    monkeypatch.setattr(LayoutRecorder, "block", counted)
    layouts = {}
    for name in ("reported", "computed"):
        if name == "computed":  # every compressor taken for one that keeps no CRC-32
            monkeypatch.setattr(archive, "_reports_crc32", lambda compressor: False)
        with FragmentCache(tmp_path / name) as cache:
            pack(store, PATHS, options, cache)
            cache.flush()
        with sqlite3.connect(tmp_path / name / "index.sqlite") as con:
            layouts[name] = dict(con.execute("SELECT key, layout FROM fragments"))
        if name == "reported":
            assert computed == []
    assert computed  # the CRC-32s computed from the blocks, for the reference
    assert len(layouts["reported"]) == len(PATHS)
    assert layouts["reported"] == layouts["computed"]


def test_the_writing_thread_lets_go_of_what_it_wrote(tmp_path: Path) -> None:
    """Once flush() returns, the writing thread holds none of the fragments it wrote (their
    bytes, their layouts) while it waits for more, cyclic garbage collection off."""
    import gc

    with FragmentCache(tmp_path / "fragments") as cache:
        gc.collect()
        gc.disable()
        try:
            for n in range(3):
                writer = cache.writer(f"k{n}")
                writer.add(os.urandom(40_000))
                writer.commit(40_000)
            cache.flush()
            held = [obj for obj in gc.get_objects() if isinstance(obj, fragments_module._Pending)]
        finally:
            gc.enable()
        assert held == []
        with cache.get("k2") as found:  # written, all the same
            assert found is not None


def test_fragments_committed_are_written_by_close_and_found_before_it(tmp_path: Path) -> None:
    """Fragments are written on a background thread: a lookup right after a commit finds the
    fragment, and closing the cache writes every one still queued (a new cache sees them)."""
    pieces = {f"k{n}": [os.urandom(40_000), os.urandom(30_000)] for n in range(20)}
    with FragmentCache(tmp_path / "fragments") as cache:
        for key, parts in pieces.items():
            writer = cache.writer(key)
            for part in parts:
                writer.add(part)
            writer.commit(123)
        with cache.get("k0") as found:
            assert found is not None
            assert b"".join(found.pieces()) == b"".join(pieces["k0"])
            assert found.uncompressed_size == 123
    with FragmentCache(tmp_path / "fragments") as again:
        for key, parts in pieces.items():
            with again.get(key) as found:
                assert found is not None
                assert b"".join(found.pieces()) == b"".join(parts)


def test_paths_kept_again_replace_their_rows_and_files_found_in_one_query(
    tmp_path: Path,
) -> None:
    """A batch keeping paths kept before (by another process, a repair) replaces their rows and
    removes their old files, finding them with one index query for the whole batch."""
    old = {"big": os.urandom(64 << 10), "small": b"s" * 100}
    new = {"big": os.urandom(64 << 10), "small": b"t" * 100, "fresh": b"f" * 100}
    with FragmentCache(tmp_path / "fragments") as cache:
        for key, data in old.items():
            cache.put(key, [data], len(data))
        data_files = [p for p in (tmp_path / "fragments" / "data").rglob("*") if p.is_file()]
        assert len(data_files) == 1  # "big"; "small" is kept in its row
        statements: list[str] = []
        con = cache._con
        assert con is not None
        con.set_trace_callback(statements.append)
        with cache._written:  # every one queued before the writing thread takes a batch
            for key, data in new.items():
                writer = cache.writer(key)
                writer.add(data)
                writer.commit(len(data))
        cache.flush()
        con.set_trace_callback(None)
        lookups = [s for s in statements if s.startswith("SELECT") and "FROM fragments" in s]
        assert len(lookups) == 1
        assert cache.keys() == sorted(new)
        for key, data in new.items():
            with cache.get(key) as found:
                assert found is not None
                assert b"".join(found.pieces()) == data
        files = [p for p in (tmp_path / "fragments" / "data").rglob("*") if p.is_file()]
        assert len(files) == 1
        assert files[0] not in data_files  # the old file of "big" is gone
        charges = sum(len(d) + fragments_module._ROW_CHARGE for d in new.values())
        assert cache.volume() == charges  # the old rows' charges went with them


def test_the_index_wal_stays_small_while_the_cache_is_open(tmp_path: Path) -> None:
    """Fragments written one transaction after another keep the index's WAL within a few
    hundred KiB (commits checkpoint it), so closing the cache has little left to copy."""
    directory = tmp_path / "fragments"
    with FragmentCache(directory) as cache:
        for n in range(100):  # 2 MB kept in index rows, each put its own transaction
            cache.put(f"k{n}", [os.urandom(20_000)], 20_000)
        wal = (directory / "index.sqlite-wal").stat().st_size
        assert wal < 1 << 20
        assert len(cache.keys()) == 100


def test_store_path_with_too_many_headers_gets_no_layout_and_is_inflated(
    store: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A store path whose header bytes pass the layout limit is kept without a layout (memory
    stays bounded while packing) and its fragment is decompressed when reused: the same layer."""
    from nixery_core import fragment_layout

    monkeypatch.setattr(fragment_layout, "MAX_LITERALS", 2048)
    options = ArchiveOptions()
    expected = pack(store, PATHS, options)
    with FragmentCache(tmp_path / "fragments") as cache:
        pack(store, PATHS, options, cache)
        cache.flush()
        with sqlite3.connect(tmp_path / "fragments" / "index.sqlite") as index:
            layouts = index.execute("SELECT layout FROM fragments").fetchall()
        assert layouts
        assert all(layout is None for (layout,) in layouts)  # no layout kept
        assert pack(store, PATHS, options, cache) == expected
        assert cache.hits == len(PATHS)


def test_a_fragment_cache_of_the_earlier_diskcache_format_is_cleared_when_opened(
    tmp_path: Path,
) -> None:
    """A fragment directory left by the diskcache-based version is emptied of its database and
    value files when opened (its fragments are packed again), and the new cache works there."""
    import diskcache

    directory = tmp_path / "fragments"
    with diskcache.Cache(str(directory)) as old:
        old.set("k", os.urandom(100_000), read=False)  # large enough for a value file
    assert list(directory.rglob("*.val"))
    with FragmentCache(directory) as cache:
        assert "k" not in cache
        cache.put("k", [b"new"], 3)
        with cache.get("k") as found:
            assert found is not None
            assert b"".join(found.pieces()) == b"new"
    assert not list(directory.rglob("*.val"))
    assert not (directory / "cache.db").exists()


def test_a_damaged_index_is_started_afresh(tmp_path: Path) -> None:
    """An index file that is not a database (an OS crash can leave one: it is never synced)
    is replaced by an empty one when the cache is opened; its files go with it."""
    directory = tmp_path / "fragments"
    with FragmentCache(directory) as cache:
        cache.put("k", [os.urandom(100_000)], 100_000)
    # Written before the damage (a file of a closed cache no older than the reopening one's
    # owner file, within one clock tick, could be another process's new one: it would stay).
    for file in (directory / "data").glob("*/*"):
        os.utime(file, (file.stat().st_mtime - 5,) * 2)
    (directory / "index.sqlite").write_bytes(b"not a database" * 1000)
    with FragmentCache(directory) as cache:
        assert cache.keys() == []
        assert cache.check() == []  # the old fragment's file is gone too
        cache.put("k", [b"again"], 5)
        assert cache.keys() == ["k"]


def test_listing_or_checking_a_cache_whose_backend_fails_raises_storage_unavailable(
    tmp_path: Path,
) -> None:
    """keys, volume, check and sweep raise StorageUnavailable naming the directory, chained
    to the sqlite3 or OS error (a closed index, a removed owners directory)."""
    directory = tmp_path / "fragments"
    cache = FragmentCache(directory)
    shutil.rmtree(directory / "owners")
    for call in (cache.check, cache.sweep):
        with pytest.raises(StorageUnavailable, match="fragment cache in") as caught:
            call()
        assert isinstance(caught.value.__cause__, OSError)
    cache.close()
    for listing in (cache.keys, cache.volume):
        with pytest.raises(StorageUnavailable, match=str(directory)) as caught:
            listing()
        assert isinstance(caught.value.__cause__, sqlite3.Error)


def test_a_failed_commit_leaves_the_index_connection_outside_a_transaction(
    tmp_path: Path,
) -> None:
    """A COMMIT that fails is rolled back, so the cache's one shared connection can start
    the next transaction (and nothing of the failed one is kept)."""
    con = sqlite3.connect(tmp_path / "index.sqlite", isolation_level=None)
    con.execute("CREATE TABLE t (x)")

    def deny_commit(action: int, operation: str | None, *_: str | None) -> int:
        commit = action == sqlite3.SQLITE_TRANSACTION and operation == "COMMIT"
        return sqlite3.SQLITE_DENY if commit else sqlite3.SQLITE_OK

    con.set_authorizer(deny_commit)
    with pytest.raises(sqlite3.DatabaseError), fragments_module._transaction(con):
        con.execute("INSERT INTO t VALUES (1)")
    assert not con.in_transaction
    con.set_authorizer(None)
    with fragments_module._transaction(con):
        con.execute("INSERT INTO t VALUES (2)")
    assert con.execute("SELECT x FROM t").fetchall() == [(2,)]
    con.close()


def test_a_member_recorded_in_one_call_gives_the_layout_of_its_three_calls() -> None:
    """LayoutRecorder.member (the packer's common path) records exactly what literal, file
    and literal do, for a file with padding, without, and an empty one."""
    from nixery_core.fragment_layout import LayoutRecorder

    def record(one_call: bool) -> bytes | None:
        recorder = LayoutRecorder(b"nix/store/x-a")
        for name, size, pad in ((b"/a", 700, 324), (b"/b", 1024, 0), (b"/c", 0, 0)):
            header = name * 256
            if one_call:
                recorder.member(header, b"nix/store/x-a" + name, size, pad)
            else:
                recorder.literal(header)
                recorder.file(b"nix/store/x-a" + name, size)
                recorder.literal(bytes(pad))
        recorder.block(b"x")
        return recorder.encode()

    assert record(True) == record(False)


def test_a_layer_wholly_from_cached_fragments_starts_no_compression_threads(
    store: Path, tmp_path: Path
) -> None:
    """Regrouped layers whose every store path is cached compress nothing: their two small
    members (the nix/ directories, the end of the archive) are done on the packing thread,
    so with a sink that hashes the blob (as a build's blob writer does) no pool thread is
    started, and the layers are those packed without a cache."""

    def pack_hashed(paths: list[str], cache: FragmentCache) -> tuple[PackedLayer, bytes]:
        out, digest = io.BytesIO(), hashlib.sha256()

        def write(data: bytes) -> int:
            digest.update(data)
            return out.write(data)

        packed = pack_store_paths(paths, write, options, store_root=store, fragments=cache,
                                  blob_digest=lambda: "sha256:" + digest.hexdigest())
        return packed, out.getvalue()

    options = ArchiveOptions()
    expected = [pack(store, [PATHS[0], PATHS[3]], options), pack(store, PATHS[1:3], options)]
    with FragmentCache(tmp_path / "fragments") as cache:
        pack(store, PATHS, options, cache)
        cache.flush()
        with threads_started() as started:
            regrouped = [pack_hashed([PATHS[0], PATHS[3]], cache), pack_hashed(PATHS[1:3], cache)]
    assert regrouped == expected
    assert started == []


def test_a_fragment_nobody_waits_for_reaches_the_index_soon(tmp_path: Path) -> None:
    """The writing thread batches fragments, but one committed with no lookup, flush or close
    behind it is still written within moments: another cache on the same directory (another
    process on the host) finds it."""
    import time

    directory = tmp_path / "fragments"
    with FragmentCache(directory) as cache, FragmentCache(directory) as other:
        writer = cache.writer("k")
        writer.add(b"x" * 100)
        writer.commit(100)
        deadline = time.monotonic() + 10
        while "k" not in other:
            assert time.monotonic() < deadline, "never written"
            time.sleep(0.01)
        with other.get("k") as found:
            assert found is not None
            assert b"".join(found.pieces()) == b"x" * 100


def test_a_prefetch_looks_a_layers_keys_up_in_one_query_and_misses_need_none(
    tmp_path: Path,
) -> None:
    """A cold pack asks for every store path of its layer: the prefetch finds the absent ones
    in one index query and their lookups are misses without another (counted as misses)."""
    with FragmentCache(tmp_path / "fragments") as cache:
        cache.put("present", [b"p" * 100], 100)
        keys = [f"k{n}" for n in range(1200)] + ["present"]  # more than one query's worth
        statements: list[str] = []
        con = cache._con
        assert con is not None
        con.set_trace_callback(statements.append)
        cache.prefetch(keys)
        assert len(statements) == 3  # 500 keys a query
        statements.clear()
        for key in keys[:-1]:
            with cache.get(key) as found:
                assert found is None
        assert statements == []
        with cache.get("present") as found:
            assert found is not None
        assert (cache.hits, cache.misses) == (1, 1200)


def test_a_key_prefetched_as_absent_is_found_once_stored_or_committed_here(
    tmp_path: Path,
) -> None:
    """What this cache keeps after a prefetch, or had committed but not yet written before it,
    is found by the lookup (never taken for absent from the prefetch)."""
    with FragmentCache(tmp_path / "fragments") as cache:
        cache.prefetch(["later"])
        cache.put("later", [b"l" * 100], 100)
        writer = cache.writer("queued")
        writer.add(b"q" * 100)
        writer.commit(100)
        cache.prefetch(["queued"])  # committed, perhaps not yet written
        for key, byte in (("later", b"l"), ("queued", b"q")):
            with cache.get(key) as found:
                assert found is not None
                assert b"".join(found.pieces()) == byte * 100


def test_a_layout_given_its_blocks_by_another_thread_is_encoded_once_settled() -> None:
    """A layout whose blocks are CRC'd on another thread (a chunked layer's hashing queue)
    has that queue settled by encode itself, then holds every block's CRC-32 (the layout of
    the same bytes recorded on one thread); one never sealed gets no layout, not a short one."""
    from nixery_core.compression import BLOCK_SIZE
    from nixery_core.fragment_layout import LayoutRecorder

    data = os.urandom(2 * BLOCK_SIZE + 777)

    def recorded() -> LayoutRecorder:
        recorder = LayoutRecorder(b"nix/store/x-a")
        recorder.literal(b"H" * 512)
        recorder.file(b"nix/store/x-a/data", len(data) - 512)
        return recorder

    expected = recorded()
    expected.block(data)
    recorder = recorded()
    queued = [data[:BLOCK_SIZE], data[BLOCK_SIZE:]]

    def settle() -> None:  # what the hashing queue's wait does: apply what is queued
        while queued:
            recorder.update(queued.pop(0))
        recorder.seal()

    recorder.deferred(settle)
    assert recorder.encode() == expected.encode()
    unsealed = recorded()
    unsealed.deferred(lambda: unsealed.update(data))
    assert unsealed.encode() is None


def test_a_sealed_deferred_layout_is_encoded_without_settling_its_queue() -> None:
    """A deferred layout already sealed (a range's: its commit is queued after its seal) is
    encoded without applying its hashing queue on the encoding thread, to the same bytes as
    the layout of the same blocks recorded on one thread."""
    from nixery_core.compression import BLOCK_SIZE
    from nixery_core.fragment_layout import LayoutRecorder

    data = os.urandom(BLOCK_SIZE + 333)
    expected = LayoutRecorder(b"nix/store/x-a")
    expected.file(b"nix/store/x-a/data", len(data))
    expected.block(data)
    settled: list[None] = []
    recorder = LayoutRecorder(b"nix/store/x-a")
    recorder.deferred(lambda: settled.append(None))
    recorder.file(b"nix/store/x-a/data", len(data))
    recorder.update(data)
    recorder.seal()
    assert recorder.encode() == expected.encode()
    assert settled == []


def test_a_failed_stream_seals_its_queued_layouts_as_incomplete() -> None:
    """When a layer's stream fails with blocks and a layout's seal still queued for hashing,
    closing the queue seals that layout as incomplete: encoding it gives no layout (the
    fragment is inflated when reused) instead of waiting for ever."""
    import threading
    from concurrent.futures import Future

    from nixery_core.fragment_layout import LayoutRecorder

    class Stalled:
        """A pool that never runs what it is given (a drain that never comes)."""

        max_workers = 2

        def submit(self, fn: object, *args: object) -> Future[None]:
            return Future()

    recorder = LayoutRecorder(b"nix/store/x-a")
    hashing = archive._OrderedHashing(Stalled())  # type: ignore[arg-type]  # a stub pool
    recorder.deferred(hashing.wait)
    recorder.literal(b"H" * 512)
    hashing.update(recorder, b"x" * 100)
    hashing.update(archive._Seal(recorder), b"")
    hashing.close()
    encoded: list[bytes | None] = []
    encoding = threading.Thread(target=lambda: encoded.append(recorder.encode()), daemon=True)
    encoding.start()
    encoding.join(10)
    assert encoded == [None]


def test_a_deferred_layout_settles_its_queue_on_the_encoding_thread() -> None:
    """A layout whose blocks wait in a hashing queue no pool thread will drain (the pool busy
    with packing threads that wait for the cache's writing thread) is encoded all the same:
    encoding applies the queue itself, and the layout holds the blocks' CRC-32s."""
    from concurrent.futures import Future

    from nixery_core.fragment_layout import FragmentLayout, LayoutRecorder

    class Stalled:
        """A pool that never runs what it is given."""

        max_workers = 2

        def submit(self, fn: object, *args: object) -> Future[None]:
            return Future()

    hashing = archive._OrderedHashing(Stalled())  # type: ignore[arg-type]  # a stub pool
    recorder = LayoutRecorder(b"nix/store/x-a")
    recorder.deferred(hashing.wait)
    recorder.literal(b"H" * 100)
    hashing.update(recorder, b"H" * 100)
    hashing.update(archive._Seal(recorder), b"")
    encoded = recorder.encode()
    assert encoded is not None
    layout = FragmentLayout.decode(encoded)
    assert layout is not None
    assert layout.crcs == (zlib.crc32(b"H" * 100),)


def test_the_hashing_queue_drains_on_the_producing_thread_by_bytes_not_by_updates() -> None:
    """Many small updates queued for hashing (a chunked layer's TOC part lines and layout
    seals) are left to the pool, while a few blocks' bytes make the producing thread drain
    the queue itself (memory stays bounded)."""
    from concurrent.futures import Future

    from nixery_core.compression import BLOCK_SIZE

    class Stalled:
        """A pool that never runs what it is given."""

        max_workers = 2

        def submit(self, fn: object, *args: object) -> Future[None]:
            return Future()

    hashing = archive._OrderedHashing(Stalled())  # type: ignore[arg-type]  # a stub pool
    small = hashlib.sha256()
    for _ in range(100):
        hashing.update(small, b"x" * 100)
    assert small.digest() == hashlib.sha256().digest()  # nothing applied here
    big = hashlib.sha256()
    block = bytes(BLOCK_SIZE)
    blocks = 0
    while small.digest() == hashlib.sha256().digest() and blocks < 100:
        hashing.update(big, block)
        blocks += 1
    assert 1 < blocks <= 9  # drained by the producing thread within a few blocks' bytes
    assert small.digest() == hashlib.sha256(b"x" * 10_000).digest()
    assert big.digest() == hashlib.sha256(block * blocks).digest()


def _pack_traced(
    store: Path, paths: list[str], options: ArchiveOptions, cache: FragmentCache
) -> tuple[tuple[PackedLayer, bytes], int]:
    """The layer packed, and the peak of the Python heap while it was (tracemalloc)."""
    import tracemalloc

    tracemalloc.start()
    try:
        return pack(store, paths, options, cache), tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


@pytest.mark.parametrize("options", OPTIONS[:2])
@pytest.mark.parametrize("way", ["no-layout", "store-changed"])
def test_inflating_a_cached_zero_run_holds_a_step_not_the_whole_piece(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, options: ArchiveOptions, way: str
) -> None:
    """A cached fragment of 64 MiB of zeros (a piece of it read from the cache inflates about
    1000:1) is inflated for the diff_id a bounded step at a time, whether it has no layout
    or its store path changed since: the pack holds a few MiB, not the 64 MiB the piece
    inflates to, and gives the layer packed without a cache."""

    from nixery_core import fragment_layout

    path = f"/nix/store/{'z' * 32}-zeros"
    zeros = tmp_path / "store" / path.lstrip("/") / "zeros"
    zeros.parent.mkdir(parents=True)
    with zeros.open("wb") as file:
        file.truncate(64 << 20)  # sparse: nothing held to write it
    store = tmp_path / "store"
    expected = pack(store, [path], options)
    with FragmentCache(tmp_path / "fragments") as cache:
        pack(store, [path], options, cache)
        if way == "no-layout":
            monkeypatch.setattr(fragment_layout.FragmentLayout, "decode", lambda _raw: None)
        else:  # a different first block: rebuilt from nothing, inflated from its start
            with zeros.open("r+b") as file:
                file.write(b"\1")
        again, peak = _pack_traced(store, [path], options, cache)
        assert cache.hits == 1
    assert again == expected
    assert peak < 16 << 20, f"{peak / 2**20:.1f} MiB held"


def test_bytes_waiting_behind_a_fragment_inflating_on_the_pool_are_bounded(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """While a small cached fragment is still inflating on the pool, the bytes of the big one
    after it (64 MiB of zeros, inflated on the packing thread) wait for it a few MiB at a
    time, not all of them: the pack holds a few MiB, and gives the layer packed without a
    cache."""
    import time

    from nixery_core import fragment_layout

    options = ArchiveOptions()
    small, big = f"/nix/store/{'a' * 32}-small", f"/nix/store/{'b' * 32}-zeros"
    store = tmp_path / "store"
    (store / small.lstrip("/")).mkdir(parents=True)
    (store / small.lstrip("/") / "data").write_bytes(b"small " * 1000)
    (store / big.lstrip("/")).mkdir(parents=True)
    with (store / big.lstrip("/") / "zeros").open("wb") as file:
        file.truncate(64 << 20)  # sparse: nothing held to write it
    expected = pack(store, [small, big], options)
    inflate_whole = archive._inflate_whole

    def slow(*args: Any) -> bytes:
        time.sleep(1)  # a busy pool: the big fragment is inflated meanwhile
        return inflate_whole(*args)

    with FragmentCache(tmp_path / "fragments") as cache:
        pack(store, [small, big], options, cache)
        monkeypatch.setattr(fragment_layout.FragmentLayout, "decode", lambda _raw: None)
        monkeypatch.setattr(archive, "_inflate_whole", slow)
        again, peak = _pack_traced(store, [small, big], options, cache)
        assert cache.hits == 2
    assert again == expected
    assert peak < 24 << 20, f"{peak / 2**20:.1f} MiB held"
