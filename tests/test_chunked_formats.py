"""eStargz and zstd:chunked layers (nixery_core.chunked, .estargz, .zstd_chunked).

Checked by independent readers: the gzip and zstd CLIs, GNU tar, Python's
tarfile, and a TOC walk that decompresses every recorded range on its own
(what a partial-pull client does).  The real client, podman, is in
tests/test_partial_pull.py.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import struct
import subprocess
import tarfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import require_tools
from hypothesis import given, settings
from hypothesis import strategies as st

from nixery_core.archive import ArchiveOptions, PackedLayer, pack_store_paths
from nixery_core.chunked import (
    CHUNK_MAX,
    ChunkedCompressor,
    compact_json,
    cut_points,
    plan_chunks,
)
from nixery_core.compression import frame_compressor, frame_stream, frames_compressor
from nixery_core.errors import InvalidInput
from nixery_core.estargz import FOOTER_SIZE, TOC_DIGEST_ANNOTATION, TOC_NAME, footer
from nixery_core.fragment_bucket import BucketFragments, FragmentBucketPolicy
from nixery_core.fragment_layout import FragmentLayout
from nixery_core.fragments import FragmentCache, FragmentSource
from nixery_core.manifest import LayerDescriptor, render_manifest
from nixery_core.media_types import OCI_CONFIG
from nixery_core.protocols import BlobInfo
from nixery_core.testing.storage import MemoryStore
from nixery_core.zstd_chunked import (
    MANIFEST_CHECKSUM_ANNOTATION,
    MANIFEST_POSITION_ANNOTATION,
    ZstdChunkedFormat,
)

zstandard = pytest.importorskip("zstandard")

FORMATS = ("estargz", "zstd-chunked")


def _noise(size: int, seed: int) -> bytes:
    """Incompressible-ish bytes mixed with text, so chunks are cut by content."""
    out = bytearray()
    i = 0
    while len(out) < size:
        out += hashlib.sha256(b"%d/%d" % (seed, i)).digest()
        out += b"text line %d of the sample\n" % i
        i += 1
    return bytes(out[:size])


def make_store(root: Path) -> list[str]:
    """A fake store: big, small, empty, duplicate, long-named files, symlinks, dirs."""
    store = root / "nix" / "store"
    a = store / "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa-big"
    (a / "lib").mkdir(parents=True)
    # Past CHUNK_MAX + BATCH_BYTES: cut while it streams in, references held back.
    (a / "lib" / "libbig.so").write_bytes(_with_references(2_500_000, 1, "kq"))
    (a / "lib" / "copy.so").write_bytes(_with_references(2_500_000, 1, "kq"))  # a hard link
    # Past the chunker's window: cut while it streams in, on the reading thread.
    (a / "lib" / "libhuge.so").write_bytes(_with_references(6_000_000, 2, "kq"))
    (a / "empty").write_bytes(b"")
    (a / "lib" / "link.so").symlink_to("libbig.so")
    b = store / "bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb-small"
    deep = b / ("d" * 90) / ("e" * 90)
    deep.mkdir(parents=True)
    (deep / ("f" * 99)).write_bytes(b"a file under a name no ustar split can hold\n")
    (b / "bin").mkdir()
    script = b / "bin" / "run"
    script.write_bytes(b"#!" + str(a).encode() + b"/bin/sh\necho hi\n")
    script.chmod(0o755)
    for i in range(20):
        (b / f"note-{i}.txt").write_bytes(b"note %d\n" % i * (i + 1))
    return sorted("/nix/store/" + p.name for p in store.iterdir())


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[str]]:
    root = tmp_path_factory.mktemp("chunked-store")
    return root, make_store(root)


def _pack(
    store: tuple[Path, list[str]], compression: str, threads: int
) -> tuple[bytes, PackedLayer]:
    root, paths = store
    return _pack_paths(root, paths, compression, threads=threads)


def _pack_paths(
    root: Path,
    paths: list[str],
    compression: str,
    cache: FragmentSource | None = None,
    *,
    threads: int = 2,
) -> tuple[bytes, PackedLayer]:
    out = io.BytesIO()
    packed = pack_store_paths(
        paths,
        out.write,
        ArchiveOptions(compression=compression),  # type: ignore[arg-type]
        store_root=root,
        threads=threads,
        fragments=cache,
    )
    return out.getvalue(), packed


@pytest.fixture(scope="module")
def four_paths(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[str]]:
    """Four store paths: the two of make_store and two more with several-chunk files."""
    root = tmp_path_factory.mktemp("chunked-fragments")
    paths = make_store(root)
    store = root / "nix" / "store"
    for name, seed in (
        ("cccccccccccccccccccccccccccccccc-lib", 3),
        ("dddddddddddd" * 2 + "dddddddd-app", 4),
    ):
        (store / name / "share").mkdir(parents=True)
        (store / name / "share" / "data").write_bytes(_with_references(400_000, seed, "kq"))
        (store / name / "share" / "small").write_bytes(b"small %d\n" % seed)
        paths.append("/nix/store/" + name)
    return root, sorted(paths)


@pytest.mark.parametrize("inflate", [False, True], ids=["rebuilt", "inflated"])
@pytest.mark.parametrize("compression", FORMATS)
def test_layers_are_byte_identical_with_cold_warm_or_no_fragment_cache(
    four_paths: tuple[Path, list[str]],
    tmp_path: Path,
    compression: str,
    inflate: bool,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A chunked layer's blob and annotations are the same without a cache, cold and warm.

    Warm, the ``diff_id`` comes from the store by the fragments' layouts, or
    (``inflated``: as for fragments without one) from decompressing their
    many members or frames.
    """
    root, paths = four_paths
    plain = _pack_paths(root, paths, compression)
    with FragmentCache(tmp_path / "fragments") as cache:
        cold = _pack_paths(root, paths, compression, cache)
        misses = cache.misses
        if inflate:
            monkeypatch.setattr(FragmentLayout, "decode", staticmethod(lambda _data: None))
        warm = _pack_paths(root, paths, compression, cache)
        assert cache.misses == misses  # every store path came from the cache
    assert cold == plain
    assert warm == plain


@pytest.mark.parametrize("compression", FORMATS)
def test_fragments_packed_in_one_grouping_assemble_any_other(
    four_paths: tuple[Path, list[str]], tmp_path: Path, compression: str
) -> None:
    """Paths packed as layers {a,b} and {c,d} make layers {a,c} and {b,d}, TOC offsets moved."""
    root, paths = four_paths
    with FragmentCache(tmp_path / "fragments") as cache:
        _pack_paths(root, paths[:2], compression, cache)
        _pack_paths(root, paths[2:], compression, cache)
        misses = cache.misses
        regrouped = [
            _pack_paths(root, [paths[0], paths[2]], compression, cache),
            _pack_paths(root, [paths[1], paths[3]], compression, cache),
        ]
        assert cache.misses == misses
    assert regrouped == [
        _pack_paths(root, [paths[0], paths[2]], compression),
        _pack_paths(root, [paths[1], paths[3]], compression),
    ]
    blob, _packed = regrouped[1]
    toc, _region = _toc(compression, blob)
    moved = [
        e for e in toc["entries"] if e["name"].startswith(paths[3].lstrip("/")) and "offset" in e
    ]
    assert moved
    assert all(e["offset"] > 0 for e in moved)


@pytest.mark.parametrize("compression", FORMATS)
def test_chunked_fragments_are_shared_through_a_bucket(
    four_paths: tuple[Path, list[str]], tmp_path: Path, compression: str
) -> None:
    """Another instance, its local cache empty, regroups a chunked layer's fragments from the
    bucket (many members each, and their TOCs): nothing compressed, the same bytes."""
    root, paths = four_paths
    bucket = MemoryStore()
    every = FragmentBucketPolicy(min_size=0)
    local_a = FragmentCache(tmp_path / "a")
    with local_a, BucketFragments(local_a, bucket, every) as tier_a:
        _pack_paths(root, paths, compression, tier_a)
    assert tier_a.stats.uploaded == 2 * len(paths)  # frames and TOC of each, once closed
    groups = [paths[:1], paths[1:3], paths[3:]]
    local_b = FragmentCache(tmp_path / "b")
    with local_b, BucketFragments(local_b, bucket, every) as tier_b:
        layers = [_pack_paths(root, g, compression, tier_b) for g in groups]
        assert local_b.misses == 0  # nothing compressed
        assert (tier_b.stats.hits, tier_b.stats.rejected) == (2 * len(paths), 0)
    assert layers == [_pack_paths(root, g, compression) for g in groups]


@pytest.mark.parametrize("level", [1, 2])
def test_estargz_refuses_isal_levels_that_are_not_reproducible(level: int) -> None:
    """eStargz with ISA-L level 1 or 2 is refused with a typed error naming the level."""
    with pytest.raises(InvalidInput, match=f"level {level} is not reproducible"):
        ArchiveOptions(compression="estargz", gzip_backend="isal", level=level).compressor()
    assert ArchiveOptions(compression="estargz").compressor().level == 3
    assert ArchiveOptions(compression="gzip", level=level).compressor().level == level


@pytest.mark.parametrize(
    "options",
    [
        ArchiveOptions(compression="estargz"),
        ArchiveOptions(compression="estargz", level=0),
        ArchiveOptions(compression="estargz", gzip_backend="zlib"),
        ArchiveOptions(compression="zstd-chunked"),
    ],
    ids=["isal-3", "isal-0", "zlib", "zstd"],
)
def test_a_batch_of_frames_is_the_frames_one_by_one(options: ArchiveOptions) -> None:
    """frames_compressor gives exactly frame_compressor's bytes, frame by frame, joined."""
    spec = options.compressor()
    frames = [b"", b"x", _noise(40_000, 1), bytes(70_000), _noise(300_000, 2) * 2]
    one = frame_compressor(spec)
    expected = [one(frame) for frame in frames]
    blob, lengths = frames_compressor(spec)([memoryview(frame) for frame in frames])
    assert lengths == [len(frame) for frame in expected]
    assert blob == b"".join(expected)


def _bare_compressor() -> ChunkedCompressor:
    spec = ArchiveOptions(compression="zstd-chunked").compressor()
    return ChunkedCompressor(
        ZstdChunkedFormat(frame_compressor(spec), stream_frame=frame_stream(spec)),
        mtime=1,
        executor=None,
        threads=1,
    )


def _finished(compressor: ChunkedCompressor) -> bytes:
    out: list[bytes | bytearray] = []
    compressor.finish(out.append, lambda _tar: None)
    return b"".join(out)


_START = b'{"start":7}'
_GOOD_LINE = (
    b'{"name":"nix/store/x-a/f","type":"reg","size":3,"digest":"sha256:00","offset":7,'
    b'"endOffset":20}'
)


def _damaged_read(lines: list[bytes]) -> Iterator[bytes]:
    yield from lines
    raise ValueError("the TOC part does not decompress (test)")


@pytest.mark.parametrize(
    "lines",
    [
        [],
        [b"not json"],
        [b'{"entries": []}', _GOOD_LINE],
        [b'{"start": -1}', _GOOD_LINE],
        [_START, b'{"name": "a", "type": "fifo"}'],
        [_START, _GOOD_LINE, b'{"name":"a","type":"reg","size":0,"offset":50,"endOffset":108}'],
        [_START, _GOOD_LINE, b'{"name":"a","type":"reg","size":0,"offset":6,"endOffset":9}'],
        [_START, _GOOD_LINE, b'{"name":"a","type":"reg","size":0,"offset":9,"endOffset":8}'],
        [_START, _GOOD_LINE, b'{"name":"a","type":"reg","size":0,"endOffset":9}'],
        [_START, _GOOD_LINE, b'{"name":"a","type":"reg","size":1,"offset":9,"endOffset":9}'],
        _damaged_read([_START, _GOOD_LINE, _GOOD_LINE]),
    ],
    ids=["empty", "json", "no-start", "negative-start", "type", "past-end", "before-start",
         "backwards", "no-offset", "no-digest", "unreadable"],
)
def test_a_damaged_toc_part_takes_nothing(lines: Iterable[bytes]) -> None:
    """A cached fragment's TOC part without its start, with a line that is not an entry within
    the fragment, or that stops reading midway, is refused (None) and the entries read before it
    taken back."""
    compressor = _bare_compressor()
    assert compressor.put_fragment(lines, 3, 100) is None
    blob = _finished(compressor)
    assert blob == _finished(_bare_compressor())
    assert _toc("zstd-chunked", blob)[0]["entries"] == []


def _decompress(compression: str, blob: bytes) -> bytes:
    tool = ["gzip", "-dc"] if compression == "estargz" else ["zstd", "-dcq"]
    return subprocess.run(tool, input=blob, capture_output=True, check=True).stdout


def _toc(compression: str, blob: bytes) -> tuple[dict[str, Any], int]:
    """The TOC as a reader finds it from the footer, and where the TOC region starts."""
    if compression == "estargz":
        toc_offset = int(blob[-FOOTER_SIZE:][16:32], 16)
        assert blob[-FOOTER_SIZE:][32:38] == b"STARGZ"
        with tarfile.open(
            fileobj=io.BytesIO(gzip.decompress(blob[toc_offset:-FOOTER_SIZE]))
        ) as tar:
            member = tar.extractfile(TOC_NAME)
            assert member is not None
            return json.loads(member.read()), toc_offset
    magic, size = struct.unpack("<II", blob[-48:-40])
    assert (magic, size, blob[-8:]) == (0x184D2A50, 40, b"GnUlInUx")
    offset, length, raw, kind = struct.unpack("<QQQQ", blob[-40:-8])
    assert kind == 1
    toc = zstandard.ZstdDecompressor().decompress(
        blob[offset : offset + length], max_output_size=raw
    )
    return json.loads(toc), offset - 8


@pytest.mark.parametrize("compression", FORMATS)
def test_same_bytes_for_any_thread_count(store: tuple[Path, list[str]], compression: str) -> None:
    """A chunked layer's bytes and annotations do not depend on the number of threads."""
    first = _pack(store, compression, 1)
    assert all(_pack(store, compression, n) == first for n in (2, 5))


@pytest.mark.parametrize("compression", FORMATS)
def test_cli_tools_read_the_same_tree_as_gzip(
    store: tuple[Path, list[str]], compression: str
) -> None:
    """gzip/zstd CLIs and GNU tar read the plain gzip layer's tree (eStargz adds its TOC)."""
    require_tools("gzip", "zstd", "tar")
    blob, packed = _pack(store, compression, 2)
    tar_bytes = _decompress(compression, blob)
    assert "sha256:" + hashlib.sha256(tar_bytes).hexdigest() == packed.diff_id
    plain = _decompress("estargz", _pack(store, "gzip", 2)[0])

    def listing(data: bytes) -> list[str]:
        return (
            subprocess.run(["tar", "-tvf", "-"], input=data, capture_output=True, check=True)
            .stdout.decode()
            .splitlines()
        )

    expected = listing(plain)
    got = listing(tar_bytes)
    if compression == "estargz":
        assert got[-1].endswith(" " + TOC_NAME)
        got = got[:-1]
    assert got == expected


@pytest.mark.parametrize("compression", FORMATS)
def test_every_toc_range_decompresses_alone_to_its_bytes(
    store: tuple[Path, list[str]], compression: str
) -> None:
    """Each TOC entry's compressed range, fetched alone, holds exactly its file or chunk."""
    blob, packed = _pack(store, compression, 2)
    toc, toc_region = _toc(compression, blob)
    with tarfile.open(fileobj=io.BytesIO(_decompress(compression, blob))) as tar:
        files = {m.name: tar.extractfile(m).read() for m in tar if m.isreg()}  # type: ignore[union-attr]
    entries = toc["entries"]
    starts = sorted({e["offset"] for e in entries if "offset" in e} | {toc_region})
    seen_chunks = 0
    for entry in entries:
        if entry["type"] == "reg":
            assert entry["digest"] == "sha256:" + hashlib.sha256(files[entry["name"]]).hexdigest()
        if "offset" not in entry:
            continue
        start = entry["offset"]
        end = entry.get("endOffset") or starts[starts.index(start) + 1]
        part = blob[start:end]
        if compression == "estargz":
            raw = gzip.GzipFile(fileobj=io.BytesIO(part)).read()
        else:
            raw = zstandard.ZstdDecompressor().decompressobj().decompress(part)
        content = files[entry["name"]]
        at, size = entry.get("chunkOffset", 0), entry.get("chunkSize", len(content))
        assert raw[:size] == content[at : at + size]
        if "chunkDigest" in entry:
            seen_chunks += 1
            assert entry["chunkDigest"] == "sha256:" + hashlib.sha256(raw[:size]).hexdigest()
    assert seen_chunks >= 4  # the big files were cut into several chunks
    annotations = dict(packed.annotations)
    if compression == "estargz":
        toc_bytes = gzip.decompress(blob[toc_region:-FOOTER_SIZE])[512:]
        toc_json = toc_bytes[: toc_bytes.index(b"\0")]
        assert (
            annotations[TOC_DIGEST_ANNOTATION] == "sha256:" + hashlib.sha256(toc_json).hexdigest()
        )
    else:
        offset, length, raw_length, _ = struct.unpack("<QQQQ", blob[-40:-8])
        compressed_toc = blob[offset : offset + length]
        assert annotations[MANIFEST_CHECKSUM_ANNOTATION] == (
            "sha256:" + hashlib.sha256(compressed_toc).hexdigest()
        )
        assert annotations[MANIFEST_POSITION_ANNOTATION] == f"{offset}:{length}:{raw_length}:1"


@pytest.mark.parametrize("compression", FORMATS)
def test_hard_links_symlinks_and_long_names_are_in_the_toc(
    store: tuple[Path, list[str]], compression: str
) -> None:
    """Duplicates are TOC hard links, symlinks keep targets, pax long names arrive whole."""
    blob, _ = _pack(store, compression, 1)
    entries = {e["name"]: e for e in _toc(compression, blob)[0]["entries"] if e["type"] != "chunk"}
    big = "nix/store/aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa-big/lib/"
    assert entries[big + "libbig.so"]["type"] == "hardlink"
    assert entries[big + "libbig.so"]["linkName"] == big + "copy.so"
    assert entries[big + "link.so"] == {
        "name": big + "link.so",
        "type": "symlink",
        "linkName": "libbig.so",
        "mode": 0o777,
        "modtime": "1970-01-01T00:00:01Z",
        "uid": 0,
        "gid": 0,
    }
    long = [name for name in entries if name.endswith("f" * 99)]
    assert len(long) == 1
    assert len(long[0]) > 256
    empty = entries["nix/store/aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa-big/empty"]
    assert empty["size"] == 0
    assert "offset" not in empty


def test_an_edit_near_the_start_changes_one_chunk() -> None:
    """Content-defined cut points resynchronise: an inserted path changes the chunks near it."""
    data = _noise(20 * CHUNK_MAX // 4, 7)
    edited = data[:3000] + b"/nix/store/00000000000000000000000000000000-new/lib" + data[3000:]

    def chunks(blob: bytes) -> set[bytes]:
        out, at = set(), 0
        for length in cut_points(blob):
            out.add(hashlib.sha256(blob[at : at + length]).digest())
            at += length
        return out

    before, after = chunks(data), chunks(edited)
    assert len(after - before) <= 2 < len(before)


def test_footers_match_the_reference_layouts() -> None:
    """The eStargz footer is byte-for-byte the stargz writer's (gzip-readable, empty)."""
    out = footer(0x1234)
    assert len(out) == 51
    assert out.hex() == (
        "1f8b0804000000000"
        "0ff1a00534716003030303030303030303030303132333453544152475a"
        "010000ffff0000000000000000"
    )
    with gzip.GzipFile(fileobj=io.BytesIO(out)) as reader:
        assert reader.read() == b""


def test_oci_manifest_carries_annotations_docker_drops_them() -> None:
    """OCI layer descriptors carry the TOC annotations; Docker schema 2 serves eStargz as gzip."""
    config = BlobInfo("sha256:" + "1" * 64, 10, OCI_CONFIG)
    layer = LayerDescriptor(
        "sha256:" + "2" * 64,
        100,
        "application/vnd.oci.image.layer.v1.tar+gzip",
        "sha256:" + "3" * 64,
        ((TOC_DIGEST_ANNOTATION, "sha256:" + "4" * 64),),
    )
    oci, _ = render_manifest(config=config, layers=[layer], format="oci")
    docker, _ = render_manifest(config=config, layers=[layer], format="docker")
    assert json.loads(oci)["layers"][0]["annotations"] == {
        TOC_DIGEST_ANNOTATION: "sha256:" + "4" * 64
    }
    assert json.loads(docker)["layers"][0] == {
        "mediaType": "application/vnd.docker.image.rootfs.diff.tar.gzip",
        "digest": "sha256:" + "2" * 64,
        "size": 100,
    }
    zstd_layer = LayerDescriptor(
        "sha256:" + "2" * 64,
        100,
        "application/vnd.oci.image.layer.v1.tar+zstd",
        "sha256:" + "3" * 64,
    )
    with pytest.raises(InvalidInput, match="OCI"):
        render_manifest(config=config, layers=[zstd_layer], format="docker")


def test_cache_keys_name_the_format_and_chunker() -> None:
    """Options parameters differ per format and name the chunker and the chunked formats' version.

    ``nixery-chunked/2`` (the TOC compressed as it streams) wrote other
    bytes than the unnamed version 1 (the TOC compressed in one shot).
    """
    params = {
        "gzip": ArchiveOptions(compression="gzip").parameters(),
        "estargz": ArchiveOptions(compression="estargz").parameters(),
        "zstd-chunked": ArchiveOptions(compression="zstd-chunked").parameters(),
    }
    assert params["gzip"] != params["estargz"]
    assert params["estargz"]["chunker"] == "fastcdc2020"
    assert params["estargz"]["chunked_format"] == "nixery-chunked/2"
    assert params["zstd-chunked"]["chunked_format"] == "nixery-chunked/2"
    assert "chunker" not in params["gzip"]
    assert "chunked_format" not in params["gzip"]
    with pytest.raises(InvalidInput, match="zstd-chunked"):
        ArchiveOptions(compression="stargz")  # type: ignore[arg-type]


def test_unsupported_tar_members_are_refused(tmp_path: Path) -> None:
    """A fifo never reaches the chunked writer: packing refuses it with a typed error."""
    store = tmp_path / "nix" / "store" / ("c" * 32 + "-fifo")
    store.mkdir(parents=True)
    os.mkfifo(store / "pipe")
    from nixery_core.errors import UnsafeStoreContent

    with pytest.raises(UnsafeStoreContent):
        pack_store_paths(
            ["/nix/store/" + store.name],
            io.BytesIO().write,
            ArchiveOptions(compression="zstd-chunked"),
            store_root=tmp_path,
        )


def _with_references(size: int, seed: int, hashes: str) -> bytes:
    """Noise with store references every ~50 KiB, RUNPATH-like clusters among them."""
    data = bytearray(_noise(size, seed))
    for n, at in enumerate(range(700, size - 200, 50_000)):
        ref = b"/nix/store/" + (hashes[n % len(hashes)] * 32).encode() + b"-dep/lib"
        cluster = ref + b":" + ref if n % 3 == 0 else ref
        data[at : at + len(cluster)] = cluster
    return bytes(data)


def _streamed(data: bytes, step: int) -> list[int]:
    """plan_chunks fed as ChunkedCompressor feeds it: growing windows, held-back tails."""
    chunker = _chunker()
    lengths: list[int] = []
    window = b""
    for start in range(0, len(data), step):
        window += data[start : start + step]
        last = start + step >= len(data)
        planned = plan_chunks(chunker, window, last=last, split_references=True)
        lengths += planned
        window = window[sum(planned) :]
    assert window == b""
    return lengths


def _chunker() -> object:
    from nixery_core.chunked import _new_chunker

    return _new_chunker()


@pytest.mark.parametrize("step", [9_999, 123_457])
def test_reference_chunks_do_not_depend_on_windows(step: int) -> None:
    """Reference-aware cut points are the same however the file arrives."""
    data = _with_references(700_000, 3, "abc")
    whole = plan_chunks(_chunker(), data, last=True, split_references=True)
    assert sum(whole) == len(data)
    assert _streamed(data, step) == whole


def test_reference_search_finds_what_bytes_find_finds() -> None:
    """The libc memmem reference search answers exactly as ``bytes.find`` over any range."""
    import random

    from nixery_core.chunked import _REFERENCE, _finder

    rng = random.Random(7)  # noqa: S311 - fixed test data, not a secret
    for _ in range(500):
        data = bytearray(rng.randbytes(rng.randrange(0, 2_000)))
        for _ in range(rng.randrange(0, 5)):
            at = rng.randrange(0, len(data) + 1)
            data[at:at] = _REFERENCE[: rng.choice((5, 10, len(_REFERENCE)))]
        window = bytes(data)
        find = _finder(window)
        for _ in range(20):
            start, end = rng.randrange(0, len(window) + 3), rng.randrange(0, len(window) + 300)
            assert find(start, end) == window.find(_REFERENCE, start, end)
    assert _finder(b"x" + _REFERENCE)(0, 100) == 1


def test_a_renamed_dependency_changes_only_reference_chunks() -> None:
    """Rewriting every store hash in a file changes only the chunks holding them (tiny)."""
    old = _with_references(600_000, 4, "abc")
    new = _with_references(600_000, 4, "xyz")

    def chunks(data: bytes) -> dict[bytes, int]:
        out, at = {}, 0
        for length in plan_chunks(_chunker(), data, last=True, split_references=True):
            out[hashlib.sha256(data[at : at + length]).digest()] = length
            at += length
        return out

    before, after = chunks(old), chunks(new)
    changed = [length for digest, length in after.items() if digest not in before]
    assert changed
    assert sum(changed) < 2 * 12 * 100  # a dozen clusters of at most two references


#: Names with what the two encoders could disagree on: escapes, non-ASCII, DEL,
#: and a lone surrogate (a non-UTF-8 byte kept by surrogateescape).
_NAMES = st.text(
    st.characters(codec="utf-8") | st.sampled_from("\x00\x1f\x7f\"\\/é\udcff"), max_size=12
)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.fixed_dictionaries({"name": _NAMES, "size": st.integers(0, 2**40)}), max_size=4))
def test_toc_json_is_what_json_writes(entries: list[dict[str, Any]]) -> None:
    """The fast TOC encoder writes json.dumps' compact bytes for any names (escapes, surrogates)."""
    document = {"version": 1, "entries": entries}
    assert compact_json(document) == json.dumps(document, separators=(",", ":")).encode()
