"""nixery_core.archive: deterministic layer tarballs from a store on disk or from entries."""

from __future__ import annotations

import errno
import gzip
import hashlib
import io
import os
import shutil
import stat
import subprocess
import tarfile
import tempfile
from collections.abc import Callable, Iterator
from concurrent.futures import Executor, Future
from contextlib import contextmanager
from pathlib import Path
from types import FrameType
from unittest import mock

import pytest
from conftest import require_tools
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nixery_core import archive
from nixery_core.archive import (
    FORMAT_VERSION,
    ArchiveOptions,
    PackedLayer,
    pack_entries,
    pack_store_paths,
)
from nixery_core.compression import BLOCK_SIZE
from nixery_core.entries import TarEntry
from nixery_core.errors import (
    BadCachedFragment,
    FileChangedDuringPacking,
    InvalidInput,
    LayerError,
    StorePathMissing,
    UnsafeStoreContent,
)
from nixery_core.fragments import CachedFragment
from nixery_core.workers import WorkerPool

pytest.importorskip("isal", reason="the isal backend is tested where isal is installed")

HELLO = "/nix/store/0c3jvnm1i8ir0n1ixcj9i4ypqhq3bg2l-hello-2.12"
LIBS = "/nix/store/1vxdwb5zsf6hiw5y38rbaqzkybl1z5vl-libs"
SCRIPT = "/nix/store/2bw1l2c3p2xg0n5d8q6k5wxh1v0vkmqv-script.sh"
ALIAS = "/nix/store/3ad8s1q8nrx7jlw9xzwg7nbh7qx6pr5y-alias"
PATHS = [HELLO, LIBS, SCRIPT, ALIAS]
LONG_NAME = "a-file-name-that-goes-on-" + "and-on-" * 12 + "end.txt"  # > 100 bytes
DEEP = "/".join(["d" * 60] * 3)  # no ustar split fits: needs a pax path
MID = "p" * 50 + "/" + "q" * 50  # fits ustar's prefix + name split


class Sink:
    """Stands in for a blob writer: keeps every chunk it is given."""

    def __init__(self) -> None:
        self.chunks: list[bytes] = []

    def write(self, data: bytes) -> int:
        self.chunks.append(bytes(data))
        return len(data)

    @property
    def data(self) -> bytes:
        return b"".join(self.chunks)


def make_store(root: Path) -> Path:
    """A fake store with every kind of thing a layer holds; returns ``root``."""
    store = root / "nix" / "store"
    hello = store / HELLO.rsplit("/", 1)[1]
    (hello / "bin").mkdir(parents=True)
    (hello / "bin" / "hello").write_bytes(b"\x7fELF" + bytes(range(256)) * 40)
    (hello / "bin" / "hello").chmod(0o755)
    (hello / "share" / "doc").mkdir(parents=True)
    (hello / "share" / "doc" / "README").write_text("hello, world\n" * 50)
    (hello / "share" / "empty").mkdir()
    (hello / "share" / LONG_NAME).write_text("long name\n")
    (hello / "share" / "ünïcödé.txt").write_text("unicode\n")
    (hello / "share" / DEEP).mkdir(parents=True)
    (hello / "share" / DEEP / "leaf").write_text("deep\n")
    (hello / "share" / MID).mkdir(parents=True)
    (hello / "share" / MID / "file.txt").write_text("split\n")
    (hello / "lib").mkdir()
    (hello / "lib" / "libhello.so.1").write_bytes(os.urandom(3000))
    (hello / "lib" / "libhello.so").symlink_to("libhello.so.1")
    (hello / "etc-passwd").symlink_to("/etc/passwd")
    (hello / "dangling").symlink_to("../missing/nothing")
    (hello / "escape").symlink_to("../../../../etc/shadow")
    (hello / "long-link").symlink_to("/nix/store/" + "x" * 40 + "/" + LONG_NAME)
    libs = store / LIBS.rsplit("/", 1)[1]
    libs.mkdir(parents=True)
    os.link(hello / "bin" / "hello", libs / "hello-again")  # across store paths
    (libs / "a").write_text("twin\n")
    os.link(libs / "a", libs / "b")  # inside one store path
    script = store / SCRIPT.rsplit("/", 1)[1]
    script.write_text("#!/bin/sh\necho hi\n")
    script.chmod(0o755)
    (store / ALIAS.rsplit("/", 1)[1]).symlink_to(hello.name)
    return root


def copy_store(
    src: Path, dst: Path, *, file_mode: int, dir_mode: int, mtime: int, keep_links: bool = True
) -> Path:
    """A copy with new inodes, other modes and other timestamps; hard links kept or not."""
    seen: dict[int, Path] = {}
    for dirpath, dirnames, filenames in os.walk(src):
        rel = Path(dirpath).relative_to(src)
        (dst / rel).mkdir(parents=True, exist_ok=True)
        for name in dirnames + filenames:
            source, target = Path(dirpath) / name, dst / rel / name
            st_ = source.lstat()
            if stat.S_ISLNK(st_.st_mode):
                target.symlink_to(source.readlink())
            elif stat.S_ISREG(st_.st_mode):
                if keep_links and st_.st_ino in seen:
                    os.link(seen[st_.st_ino], target)
                    continue
                seen[st_.st_ino] = target
                shutil.copyfile(source, target)
                executable = st_.st_mode & 0o100
                target.chmod(file_mode | (0o100 if executable else 0))
                os.utime(target, (mtime, mtime))
    for dirpath, _dirs, _files in os.walk(dst):
        Path(dirpath).chmod(dir_mode)
        os.utime(dirpath, (mtime, mtime))
    return dst


def pack(root: Path, options: ArchiveOptions | None = None, paths: list[str] | None = None,
         *, threads: int | None = None) -> tuple[PackedLayer, bytes]:
    sink = Sink()
    packed = pack_store_paths(
        PATHS if paths is None else paths, sink.write, options or ArchiveOptions(),
        store_root=root, threads=threads,
    )
    return packed, sink.data


def members(blob: bytes, compression: str = "gzip") -> list[tarfile.TarInfo]:
    raw = gzip.decompress(blob) if compression == "gzip" else blob
    with tarfile.open(fileobj=io.BytesIO(raw), mode="r:") as archive:
        return archive.getmembers()


@pytest.fixture
def store(tmp_path: Path) -> Path:
    return make_store(tmp_path / "one")


# --- determinism ---------------------------------------------------------------------------


def test_packing_twice_gives_identical_bytes(store: Path) -> None:
    """The same store packed twice gives the same blob and the same PackedLayer."""
    assert pack(store) == pack(store)


def test_copies_with_other_inodes_modes_and_times_give_identical_bytes(
    store: Path, tmp_path: Path
) -> None:
    """Inode numbers, timestamps, umask-style modes and readdir order do not reach the bytes."""
    first = copy_store(store, tmp_path / "two", file_mode=0o600, dir_mode=0o700, mtime=10**9)
    second = copy_store(store, tmp_path / "three", file_mode=0o644, dir_mode=0o755, mtime=7)
    assert pack(first) == pack(second) == pack(store)


def test_threads_and_path_order_do_not_change_the_bytes(store: Path) -> None:
    """One or three compression threads, paths in any order and repeated: same blob."""
    reference = pack(store, threads=1)
    assert pack(store, threads=3) == reference
    assert pack(store, paths=[*reversed(PATHS), HELLO]) == reference


def test_backends_share_the_diff_id_but_not_the_digest(store: Path) -> None:
    """isal and zlib (and zstd, none) compress the same tar: one diff_id, different blobs."""
    by_isal, _ = pack(store, ArchiveOptions(gzip_backend="isal"))
    by_zlib, _ = pack(store, ArchiveOptions(gzip_backend="zlib"))
    by_zstd, _ = pack(store, ArchiveOptions(compression="zstd"))
    plain, _ = pack(store, ArchiveOptions(compression="none"))
    assert by_isal.diff_id == by_zlib.diff_id == by_zstd.diff_id == plain.diff_id
    assert len({by_isal.digest, by_zlib.digest, by_zstd.digest}) == 3
    assert plain.digest == plain.diff_id


# --- the numbers ---------------------------------------------------------------------------


@pytest.mark.parametrize("compression", ["gzip", "zstd", "none"])
def test_digest_diff_id_and_size_match_the_written_bytes(store: Path, compression: str) -> None:
    """digest and size are those of the bytes written; diff_id that of the tar inside."""
    options = ArchiveOptions(compression=compression)  # type: ignore[arg-type]
    packed, blob = pack(store, options)
    if compression == "gzip":
        tar = gzip.decompress(blob)
    elif compression == "zstd":
        import zstandard

        tar = zstandard.ZstdDecompressor().decompressobj(read_across_frames=True).decompress(blob)
    else:
        tar = blob
    assert packed.digest == "sha256:" + hashlib.sha256(blob).hexdigest()
    assert packed.size == len(blob)
    assert packed.diff_id == "sha256:" + hashlib.sha256(tar).hexdigest()
    assert packed.media_type == options.media_type
    assert len(tar) % 512 == 0
    assert tar.endswith(bytes(1024))


class _ReportingSink:
    """A sink that hashes what it is given and reports ``reported`` as that hash."""

    def __init__(self, reported: str | None = None) -> None:
        self.hash = hashlib.sha256()
        self.reported = reported

    def write(self, data: bytes) -> int:
        self.hash.update(data)
        return len(data)

    def written_digest(self) -> str:
        return self.reported or "sha256:" + self.hash.hexdigest()


@pytest.mark.parametrize("maker", [pack_store_paths, pack_entries])
def test_a_sink_that_hashes_gives_the_layer_digest_and_the_blob_is_hashed_once(
    store: Path, maker: Callable[..., PackedLayer]
) -> None:
    """With ``blob_digest`` the layer's digest is the sink's own hash (the packer does not hash
    the blob again): the same PackedLayer as without, and whatever the sink reports is used."""
    if maker is pack_store_paths:
        args: tuple[object, ...] = (PATHS,)
        extra: dict[str, object] = {"store_root": store}
    else:
        args, extra = ([TarEntry("etc/motd", "file", 0o644, data=b"hi\n" * 5000)],), {}
    plain = maker(*args, Sink().write, ArchiveOptions(), **extra)
    sink = _ReportingSink()
    assert maker(*args, sink.write, ArchiveOptions(), blob_digest=sink.written_digest,
                 **extra) == plain
    made_up = "sha256:" + "0" * 64
    liar = _ReportingSink(made_up)
    reported = maker(*args, liar.write, ArchiveOptions(), blob_digest=liar.written_digest, **extra)
    assert reported.digest == made_up  # taken from the sink, never computed a second time
    assert reported.diff_id == plain.diff_id


@pytest.mark.parametrize(("threads", "mib", "pieces"), [(1, 5, 4), (2, 12, 2)])
def test_write_gets_large_pieces(tmp_path: Path, threads: int, mib: int, pieces: int) -> None:
    """Output is streamed to ``write`` in pieces of at least 1 MiB (except the last)."""
    root = tmp_path / "big"
    path = root / "nix" / "store" / "abc-big"
    path.mkdir(parents=True)
    (path / "noise").write_bytes(os.urandom(mib << 20))
    sink = Sink()
    pack_store_paths(
        ["/nix/store/abc-big"], sink.write, ArchiveOptions(), store_root=root, threads=threads
    )
    assert len(sink.chunks) >= pieces
    assert all(len(chunk) >= 1 << 20 for chunk in sink.chunks[:-1])


# --- what is in the archive ----------------------------------------------------------------


def _expected_order(root: Path) -> list[str]:
    """Depth first, children sorted by the bytes of their names: computed independently."""
    order = ["nix/", "nix/store/"]

    def walk(path: Path, name: str) -> None:
        if path.is_dir() and not path.is_symlink():
            order.append(name + "/")
            for child in sorted(os.listdir(os.fsencode(path))):  # noqa: PTH208 - byte order
                walk(path / os.fsdecode(child), name + "/" + os.fsdecode(child))
        else:
            order.append(name)

    for store_path in sorted(PATHS):
        walk(root / store_path.lstrip("/"), store_path.lstrip("/"))
    return order


def test_members_are_ordered_parents_first(store: Path) -> None:
    """nix/ and nix/store/ come first (0755), then each store path depth first in byte order."""
    found = members(pack(store)[1])
    names = [m.name + ("/" if m.isdir() else "") for m in found]
    assert names == _expected_order(store)
    assert [(m.name, m.mode) for m in found[:2]] == [("nix", 0o755), ("nix/store", 0o755)]


def test_metadata_is_normalised(store: Path) -> None:
    """Owner 0:0 without names, the options' mtime, Nix's modes for files, dirs and links."""
    found = members(pack(store, ArchiveOptions(mtime=12345))[1])
    for member in found:
        assert (member.uid, member.gid, member.uname, member.gname) == (0, 0, "", "")
        assert member.mtime == 12345
        if member.name.count("/") < 2:
            continue
        if member.isdir():
            assert member.mode == 0o555
        elif member.issym():
            assert member.mode == 0o777
        else:
            assert member.mode in (0o444, 0o555)
    by_name = {m.name: m for m in found}
    assert by_name[HELLO[1:] + "/bin/hello"].mode == 0o555
    assert by_name[HELLO[1:] + "/share/doc/README"].mode == 0o444
    assert by_name[SCRIPT[1:]].mode == 0o555
    assert by_name[HELLO[1:] + "/share/empty"].isdir()


def test_contents_and_links_are_stored_as_on_disk(store: Path) -> None:
    """File bytes, symlink targets (relative, absolute, dangling, escaping) as read, unfollowed."""
    raw = gzip.decompress(pack(store)[1])
    with tarfile.open(fileobj=io.BytesIO(raw), mode="r:") as archive:
        by_name = {m.name: m for m in archive.getmembers()}
        for member in archive.getmembers():
            on_disk = store / member.name
            if member.isfile():
                extracted = archive.extractfile(member)
                assert extracted is not None
                assert extracted.read() == on_disk.read_bytes()
            elif member.issym():
                assert member.linkname == str(on_disk.readlink())
    hello = HELLO[1:]
    assert by_name[hello + "/etc-passwd"].issym()
    assert by_name[hello + "/etc-passwd"].linkname == "/etc/passwd"
    assert by_name[hello + "/escape"].linkname == "../../../../etc/shadow"
    assert by_name[ALIAS[1:]].issym()
    assert b"root:" not in raw  # /etc/passwd was never read


def test_hard_links_are_stored_once(store: Path) -> None:
    """A file linked on disk inside a store path has its bytes once; across paths, once per path."""
    found = members(pack(store)[1])
    by_name = {m.name: m for m in found}
    hello, libs = HELLO[1:], LIBS[1:]
    assert by_name[hello + "/bin/hello"].isfile()
    assert by_name[libs + "/hello-again"].isfile()  # fragments are self-contained
    assert by_name[libs + "/hello-again"].mode == 0o555
    assert by_name[libs + "/a"].isfile()
    assert by_name[libs + "/b"].islnk()
    assert by_name[libs + "/b"].linkname == libs + "/a"
    assert len(found) == len(by_name)  # every name exactly once


def test_long_and_unicode_names_survive(store: Path) -> None:
    """Names over 100 bytes (ustar prefix or pax path) and UTF-8 names read back exactly."""
    by_name = {m.name: m for m in members(pack(store)[1])}
    hello = HELLO[1:]
    long_name = f"{hello}/share/{LONG_NAME}"
    assert by_name[long_name].pax_headers == {"path": long_name}
    assert "path" in by_name[f"{hello}/share/ünïcödé.txt"].pax_headers
    assert "path" in by_name[f"{hello}/share/{DEEP}/leaf"].pax_headers
    split = by_name[f"{hello}/share/{MID}/file.txt"]
    assert len(split.name) > 100
    assert split.pax_headers == {}  # carried by the ustar prefix field


def test_only_path_records_in_pax_headers(store: Path) -> None:
    """No pax record varies between runs: only path/linkpath (never atime, ctime, mtime)."""
    for member in members(pack(store)[1]):
        assert set(member.pax_headers) <= {"path", "linkpath"}
    found = members(pack(store)[1])
    assert any("path" in m.pax_headers for m in found)
    assert any("linkpath" in m.pax_headers for m in found)


def test_non_utf8_names_round_trip(tmp_path: Path) -> None:
    """A file name that is not UTF-8 is kept byte for byte (pax hdrcharset=BINARY)."""
    root = tmp_path / "r"
    base = root / "nix" / "store" / "abc-odd"
    base.mkdir(parents=True)
    odd = os.fsencode(base) + b"/caf\xe9"
    with open(odd, "wb") as handle:  # noqa: PTH123 - a bytes path that is not UTF-8
        handle.write(b"x")
    raw = pack(root, ArchiveOptions(compression="none"), paths=["/nix/store/abc-odd"])[1]
    with tarfile.open(fileobj=io.BytesIO(raw), mode="r:", encoding="utf-8",
                      errors="surrogateescape") as archive:
        names = [os.fsencode(m.name) for m in archive.getmembers()]
    assert b"nix/store/abc-odd/caf\xe9" in names
    assert b"hdrcharset=BINARY" in raw


def test_gnu_tar_lists_and_extracts_the_layer(store: Path, tmp_path: Path) -> None:
    """GNU tar reads the gzip blob: same listing, and extraction recreates the tree."""
    require_tools("tar")
    blob = tmp_path / "layer.tar.gz"
    blob.write_bytes(pack(store)[1])
    listing = subprocess.run(
        ["tar", "--numeric-owner", "-tvzf", str(blob)], capture_output=True, text=True, check=True
    ).stdout.splitlines()
    assert listing[0].startswith("drwxr-xr-x 0/0")
    assert listing[0].endswith(" nix/")
    assert listing[1].endswith(" nix/store/")
    assert len(listing) == len(_expected_order(store))
    assert all(" 0/0 " in line for line in listing)
    out = tmp_path / "extracted"
    out.mkdir()
    subprocess.run(["tar", "-xzf", str(blob), "-C", str(out)], check=True)
    hello, libs = out / HELLO[1:], out / LIBS[1:]
    assert (hello / "bin" / "hello").read_bytes() == (store / HELLO[1:] / "bin/hello").read_bytes()
    assert (libs / "hello-again").read_bytes() == (hello / "bin" / "hello").read_bytes()
    assert (libs / "b").stat().st_ino == (libs / "a").stat().st_ino
    assert str((hello / "etc-passwd").readlink()) == "/etc/passwd"
    assert (hello / "share" / DEEP / "leaf").read_text() == "deep\n"
    assert stat.S_IMODE((hello / "share").stat().st_mode) == 0o555
    for dirpath, _dirs, _files in os.walk(out):
        Path(dirpath).chmod(0o755)


# --- duplicate content: decided by bytes, never by inode ----------------------------------

#: One size per way a file is read: whole and hashed (small), whole when its size was seen
#: (medium, over 16 KiB), hashed before it is streamed (large, over the 1 MiB hash buffer).
SIZES = [pytest.param(3000, id="small"), pytest.param(200_000, id="medium"),
         pytest.param(3 << 20, id="large")]


def test_format_version_names_per_path_fragments() -> None:
    """The cache key's format changed with per-store-path fragments, so older layers are rebuilt."""
    assert FORMAT_VERSION == "nixery-tar/3"
    assert ArchiveOptions().parameters()["format"] == FORMAT_VERSION


def test_linked_and_unlinked_copies_give_identical_layers(store: Path, tmp_path: Path) -> None:
    """The same store with its hard links broken into separate copies packs to the same bytes."""
    unlinked = copy_store(store, tmp_path / "unlinked", file_mode=0o644, dir_mode=0o755,
                          mtime=5, keep_links=False)
    libs = unlinked / LIBS[1:]
    assert (libs / "a").stat().st_ino != (libs / "b").stat().st_ino
    assert pack(unlinked) == pack(store)
    assert pack(unlinked, ArchiveOptions(compression="zstd")) == pack(
        store, ArchiveOptions(compression="zstd")
    )


def _duplicates_store(root: Path, size: int, *, link: bool) -> list[str]:
    """Files sharing content of ``size`` bytes, hard-linked on disk or not: three directories
    of one store path (``first``, ``second``, ``third``), and a second store path with one
    more copy (``copy``), which is stored again: a store path's fragment stands alone."""
    payload = hashlib.sha256(str(size).encode()).digest() * (size // 32) + b"!" * (size % 32)
    other = bytes(reversed(payload))  # the same size, other bytes
    names = ["1aaa-dups", "2bbb-elsewhere"]
    store = root / "nix" / "store"
    bases = [store / names[0] / part for part in ("first", "second", "third")]
    for base in bases:
        (base / "sub").mkdir(parents=True)
    (store / names[1]).mkdir(parents=True)
    (bases[0] / "data").write_bytes(payload)
    (bases[0] / "tool").write_bytes(payload)
    (bases[0] / "tool").chmod(0o755)  # same bytes, executable: stored again
    (bases[1] / "a-other").write_bytes(other)  # same size, other bytes: stored
    (bases[2] / "sub" / "other-again").write_bytes(other)  # links to a-other
    for copy in (bases[1] / "sub" / "copy", bases[2] / "sub" / "copy", store / names[1] / "copy"):
        if link:
            os.link(bases[0] / "data", copy)
        else:
            copy.write_bytes(payload)
    return ["/nix/store/" + name for name in names]


@pytest.mark.parametrize("size", SIZES)
def test_identical_content_is_stored_once_and_linked(tmp_path: Path, size: int) -> None:
    """Separate files with equal bytes and mode: the first carries the data, later ones link."""
    paths = _duplicates_store(tmp_path / "r", size, link=False)
    _packed, blob = pack(tmp_path / "r", ArchiveOptions(compression="none"), paths=paths)
    with tarfile.open(fileobj=io.BytesIO(blob), mode="r:") as tar:
        by_name = {m.name: m for m in tar.getmembers()}
        contents = {
            m.name: tar.extractfile(m).read()  # type: ignore[union-attr]
            for m in tar.getmembers() if m.isfile()
        }
    first, second, third = (f"{paths[0][1:]}/{part}" for part in ("first", "second", "third"))
    elsewhere = paths[1][1:]
    data = (tmp_path / "r" / first / "data").read_bytes()
    other = (tmp_path / "r" / second / "a-other").read_bytes()
    assert len(data) == len(other) == size
    assert contents == {f"{first}/data": data, f"{first}/tool": data, f"{second}/a-other": other,
                        f"{elsewhere}/copy": data}
    assert (by_name[f"{first}/data"].mode, by_name[f"{first}/tool"].mode) == (0o444, 0o555)
    for name in (f"{second}/sub/copy", f"{third}/sub/copy"):
        assert by_name[name].islnk()
        assert (by_name[name].linkname, by_name[name].mode) == (f"{first}/data", 0o444)
    assert by_name[f"{third}/sub/other-again"].linkname == f"{second}/a-other"
    assert len(blob) < 4 * size + 20 * 1024  # four bodies, not seven


@pytest.mark.parametrize("size", SIZES)
def test_hard_links_on_disk_do_not_change_the_layer(tmp_path: Path, size: int) -> None:
    """Duplicates as hard links (an optimised store) or as copies: same digest and diff_id."""
    linked = _duplicates_store(tmp_path / "linked", size, link=True)
    copies = _duplicates_store(tmp_path / "copies", size, link=False)
    assert linked == copies
    assert (tmp_path / "linked" / linked[0][1:] / "second" / "sub" / "copy").stat().st_nlink == 4
    assert pack(tmp_path / "linked", paths=linked) == pack(tmp_path / "copies", paths=copies)


def test_many_files_across_block_boundaries_keep_their_bytes(tmp_path: Path) -> None:
    """Files read whole land intact wherever they fall in the 1 MiB blocks, duplicates linked."""
    base = tmp_path / "r" / "nix" / "store" / "abc-many"
    base.mkdir(parents=True)
    bodies = [os.urandom(size) for size in (9_000, 15_000, 16_383, 40_000, 300_000)]
    for number in range(150):  # f120 to f149 repeat f000 to f029
        (base / f"f{number:03d}").write_bytes(bodies[number % 5] + bytes([number % 120]))
    raw = pack(tmp_path / "r", ArchiveOptions(compression="none"), paths=["/nix/store/abc-many"])[1]
    assert len(raw) > 8 << 20
    with tarfile.open(fileobj=io.BytesIO(raw), mode="r:") as tar:
        found = [m for m in tar.getmembers() if not m.isdir()]
        for member in found:
            source = tar.extractfile(member)
            assert source is not None
            assert source.read() == (tmp_path / "r" / member.name).read_bytes()
    assert sum(m.isfile() for m in found) == 120
    assert [m.linkname for m in found if m.islnk()] == [
        f"nix/store/abc-many/f{number:03d}" for number in range(30)
    ]


class _Lazy(Executor):
    """Runs nothing by itself: each task runs when its result is asked for (the pool's
    futures help), long after the packer handed its block over and went on."""

    def submit(self, fn, /, *args, **kwargs):  # type: ignore[no-untyped-def]  # Executor's own
        return Future()


def test_big_last_blocks_handed_over_in_place_are_never_written_over(tmp_path: Path) -> None:
    """A member's big last block goes to its deflate task as a view of the packer's block;
    the packer fills other blocks while that task waits, so a layer packed on a pool that
    runs its tasks late is the same as one packed on a single thread."""
    root = tmp_path / "r"
    paths = []
    for index, tail in enumerate((300_000, 700_000, 1_000_000, 262_144, 5_000)):
        base = root / "nix" / "store" / f"{index:032d}-tail{index}"
        base.mkdir(parents=True)
        (base / "whole").write_bytes(os.urandom(BLOCK_SIZE - 2048))  # fills the first block
        (base / "tail").write_bytes(os.urandom(tail))  # the member's last, partial block
        paths.append(f"/nix/store/{base.name}")
    expected, blob = pack(root, paths=paths, threads=1)
    pool = WorkerPool.wrapping(_Lazy(), 2)
    sink = Sink()
    late = pack_store_paths(paths, sink.write, ArchiveOptions(), store_root=root, executor=pool)
    assert (late, sink.data) == (expected, blob)
    with tarfile.open(fileobj=io.BytesIO(gzip.decompress(sink.data)), mode="r:") as tar:
        for path in paths:
            for name in ("whole", "tail"):
                member = tar.extractfile(f"{path[1:]}/{name}")
                assert member is not None
                assert member.read() == (root / path[1:] / name).read_bytes()


def test_empty_files_are_always_stored(tmp_path: Path) -> None:
    """Zero-length files are never hard links, linked on disk or not (a link is no smaller)."""
    base = tmp_path / "r" / "nix" / "store" / "abc-empty"
    base.mkdir(parents=True)
    (base / "a").touch()
    os.link(base / "a", base / "b")
    (base / "c").touch()
    found = members(pack(tmp_path / "r", paths=["/nix/store/abc-empty"])[1])
    assert [(m.name, m.isfile(), m.size) for m in found[3:]] == [
        (f"nix/store/abc-empty/{name}", True, 0) for name in "abc"
    ]


def test_real_nix_store_packs_the_same_before_and_after_optimise(nix: None, tmp_path: Path) -> None:
    """`nix-store --optimise` hard-links a real store's duplicates; the layer stays the same."""
    source = tmp_path / "src"
    payload = os.urandom(200_000)
    for name in ("one", "two"):
        (source / name).mkdir(parents=True)
        (source / name / f"{name}.bin").write_bytes(payload)
        (source / name / "note").write_text("identical\n")
    root = tmp_path / "root"
    store = ["nix-store", "--store", str(root)]
    paths = subprocess.run(
        [*store, "--add", str(source / "one"), str(source / "two")],
        check=True, capture_output=True, text=True,
    ).stdout.split()
    before = pack(root, paths=paths)
    subprocess.run([*store, "--optimise"], check=True, capture_output=True)
    assert (root / paths[1][1:] / "two.bin").stat().st_nlink > 1  # really optimised
    assert pack(root, paths=paths) == before
    by_name = {m.name: m for m in members(before[1])}
    for name in (f"{p[1:]}/{p.rsplit('-', 1)[1]}.bin" for p in paths):
        assert by_name[name].isfile()  # each store path's fragment carries its own bytes
    for dirpath, _dirs, _files in os.walk(root):
        Path(dirpath).chmod(0o755)


def _rewrite_in_place(path: Path) -> None:
    """Other bytes, same size, same mtime: only a content check can notice."""
    st_ = path.stat()
    path.chmod(0o644)
    with path.open("r+b") as handle:
        handle.seek(st_.st_size // 2)
        handle.write(b"CHANGED")
    os.utime(path, ns=(st_.st_atime_ns, st_.st_mtime_ns))


def _replace(path: Path) -> None:
    """The same bytes in a new file renamed over the old one (another inode)."""
    fresh = path.with_name(path.name + ".new")
    shutil.copy2(path, fresh)
    fresh.replace(path)


@contextmanager
def _after_hashing(member: str, change: Callable[[], object]) -> Iterator[None]:
    """Run ``change`` right after the packer hashes ``member`` (and before anything else)."""
    original = archive._hash_fd

    def hooked(fd: int, size: int, scratch: memoryview, name: bytes) -> bytes:
        digest = original(fd, size, scratch, name)
        if name == member.encode():
            change()
        return digest

    with mock.patch.object(archive, "_hash_fd", hooked):
        yield


def test_file_changing_between_its_hash_and_its_packing_is_detected(tmp_path: Path) -> None:
    """A large file rewritten (same size and mtime) after its pre-hash fails the written hash."""
    paths = _duplicates_store(tmp_path / "r", 3 << 20, link=False)
    victim = tmp_path / "r" / paths[0][1:] / "second" / "a-other"  # size seen: hashed first
    with (
        _after_hashing(f"{paths[0][1:]}/second/a-other", lambda: _rewrite_in_place(victim)),
        pytest.raises(FileChangedDuringPacking) as excinfo,
    ):
        pack(tmp_path / "r", paths=paths)
    assert excinfo.value.path == f"{paths[0]}/second/a-other"


@pytest.mark.parametrize(
    "change", [_replace, lambda p: os.utime(p, (9, 9)), lambda p: os.truncate(p, 10)],
    ids=["replaced", "touched", "truncated"],
)
def test_earlier_file_changed_before_its_late_hash_is_detected(
    tmp_path: Path, change: Callable[[Path], object]
) -> None:
    """A large file packed unhashed, then replaced or touched before a same-size file needs its
    hash, raises FileChangedDuringPacking naming it (its packed bytes can no longer be known)."""
    paths = _duplicates_store(tmp_path / "r", 3 << 20, link=False)
    first = tmp_path / "r" / paths[0][1:] / "first" / "data"
    original = archive._rehash
    changed: list[bool] = []

    def hooked(earlier: archive._Unhashed, scratch: memoryview) -> bytes:
        if earlier.member == f"{paths[0][1:]}/first/data".encode() and not changed:
            changed.append(True)
            change(first)
        return original(earlier, scratch)

    with (
        mock.patch.object(archive, "_rehash", hooked),
        pytest.raises(FileChangedDuringPacking) as excinfo,
    ):
        pack(tmp_path / "r", paths=paths)
    assert changed
    assert excinfo.value.path == f"{paths[0]}/first/data"


@contextmanager
def _thresholds(small: int, chunk: int) -> Iterator[None]:
    """Tiny size thresholds, so that tiny files take every path of duplicate detection."""
    with mock.patch.object(archive, "_SMALL_FILE", small), \
            mock.patch.object(archive, "_HASH_CHUNK", chunk):
        yield


#: Few sizes, so that equal sizes with other bytes are common; with the tiny thresholds,
#: 3 is small, 6 is read whole when its size was seen, 20 is hashed in chunks first.
_contents = st.lists(
    st.sampled_from([0, 3, 6, 20]).flatmap(lambda n: st.binary(min_size=n, max_size=n)),
    min_size=1, max_size=5, unique=True,
)
_files = st.lists(st.tuples(st.integers(0, 2), st.integers(0, 4), st.booleans()),
                  min_size=1, max_size=14)


@pytest.mark.parametrize("small_and_chunk", [(4, 8), (16 << 10, 1 << 20)], ids=["tiny", "real"])
@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(contents=_contents, files=_files, link_choices=st.lists(st.integers(0, 50), max_size=14))
def test_random_hard_linking_never_changes_the_layer(
    small_and_chunk: tuple[int, int],
    contents: list[bytes],
    files: list[tuple[int, int, bool]],
    link_choices: list[int],
) -> None:
    """Random files with repeated contents pack identically as copies and as random hard links,
    and every distinct (content, executable) pair is stored exactly once per store path."""
    paths = [f"/nix/store/{n}{n}{n}-path{n}" for n in range(3)]
    specs = [
        (f"{paths[where]}/d{index % 2}/f{index}", contents[which % len(contents)], executable)
        for index, (where, which, executable) in enumerate(files)
    ]
    layers = []
    with tempfile.TemporaryDirectory() as tmp, _thresholds(*small_and_chunk):
        for variant in ("copies", "links"):
            root = Path(tmp) / variant
            made: dict[tuple[bytes, bool], list[Path]] = {}
            for number, (name, data, executable) in enumerate(specs):
                target = root / name.lstrip("/")
                target.parent.mkdir(parents=True, exist_ok=True)
                group = made.setdefault((data, executable), [])
                choice = link_choices[number] if number < len(link_choices) else 0
                if variant == "links" and group and choice % 3:  # link to some earlier twin
                    os.link(group[choice % len(group)], target)
                else:
                    target.write_bytes(data)
                    target.chmod(0o755 if executable else 0o644)
                group.append(target)
            for path in paths:
                (root / path.lstrip("/")).mkdir(parents=True, exist_ok=True)
            layers.append(pack(root, ArchiveOptions(compression="none"), paths=paths))
    assert layers[0] == layers[1]
    with tarfile.open(fileobj=io.BytesIO(layers[0][1]), mode="r:") as tar:
        found = {m.name: m for m in tar.getmembers()}
        bodies = {
            m.name: tar.extractfile(m).read()  # type: ignore[union-attr]
            for m in found.values() if m.isfile()
        }
    def store_path(name: str) -> str:
        return "/".join(name.lstrip("/").split("/")[:3])

    stored = [
        (store_path(m.name), bodies[m.name], m.mode == 0o555)
        for m in found.values() if m.isfile() and m.size
    ]
    assert sorted(stored) == sorted({(store_path(n), d, x) for n, d, x in specs if d})
    for name, data, executable in specs:
        member = found[name.lstrip("/")]
        carrier = found[member.linkname] if member.islnk() else member
        assert store_path(carrier.name) == store_path(member.name)
        assert bodies[carrier.name] == data
        assert carrier.mode == member.mode == (0o555 if executable else 0o444)


# --- refusals and errors -------------------------------------------------------------------


def test_missing_store_path_is_reported_before_writing(store: Path) -> None:
    """A missing path raises StorePathMissing naming it, and nothing is written."""
    missing = "/nix/store/9zzzzzzzzzzzzzzzzzzzzzzzzzzzzzzz-gone"
    sink = Sink()
    with pytest.raises(StorePathMissing) as excinfo:
        pack_store_paths([HELLO, missing], sink.write, ArchiveOptions(), store_root=store)
    assert excinfo.value.path == missing
    assert sink.chunks == []


@pytest.mark.parametrize(
    "path", ["/nix/store/a/b", "nix/store/a", "/etc/passwd", "/nix/store/..", "/nix/store/"]
)
def test_paths_outside_the_store_are_refused(store: Path, path: str) -> None:
    """Only /nix/store/<name> is accepted; anything else is UnsafeStoreContent."""
    with pytest.raises(UnsafeStoreContent):
        pack_store_paths([path], Sink().write, ArchiveOptions(), store_root=store)


def test_fifo_is_refused(store: Path) -> None:
    """A fifo inside a store path is UnsafeStoreContent naming it (and is never opened)."""
    fifo = store / HELLO[1:] / "share" / "pipe"
    os.mkfifo(fifo)
    with pytest.raises(UnsafeStoreContent, match="fifo") as excinfo:
        pack(store)
    assert excinfo.value.path == HELLO + "/share/pipe"


def test_device_file_is_refused(store: Path) -> None:
    """A character device inside a store path is UnsafeStoreContent."""
    try:
        os.mknod(store / HELLO[1:] / "null", 0o600 | stat.S_IFCHR, os.makedev(1, 3))
    except PermissionError:
        pytest.skip("creating device files needs root")
    with pytest.raises(UnsafeStoreContent, match="character device"):
        pack(store)


def test_fifo_as_store_path_is_refused_before_writing(tmp_path: Path) -> None:
    """A store path that is itself a fifo is refused up front."""
    root = tmp_path / "r"
    (root / "nix" / "store").mkdir(parents=True)
    os.mkfifo(root / "nix" / "store" / "abc-fifo")
    sink = Sink()
    with pytest.raises(UnsafeStoreContent):
        pack_store_paths(["/nix/store/abc-fifo"], sink.write, ArchiveOptions(), store_root=root)
    assert sink.chunks == []


def _append(path: Path, data: bytes) -> None:
    with path.open("ab") as handle:
        handle.write(data)


def _growing_store(tmp_path: Path) -> tuple[Path, Path]:
    root = tmp_path / "r"
    base = root / "nix" / "store" / "abc-growing"
    base.mkdir(parents=True)
    victim = base / "data"
    victim.write_bytes(os.urandom(3 << 20))
    return root, victim


@pytest.mark.parametrize(
    "change",
    [
        pytest.param(lambda p: _append(p, b"more"), id="appended"),
        pytest.param(lambda p: os.truncate(p, 10), id="truncated"),
        pytest.param(lambda p: os.utime(p, (1, 1)), id="touched"),
    ],
)
def test_file_changing_while_packed_is_detected(
    tmp_path: Path, change: Callable[[Path], object]
) -> None:
    """A file whose size, length read or mtime changes mid-read raises FileChangedDuringPacking."""
    root, victim = _growing_store(tmp_path)
    changed: list[object] = []

    def write(data: bytes) -> None:
        if not changed:  # the first MiB is out: the file is being read
            changed.append(change(victim))

    with pytest.raises(FileChangedDuringPacking) as excinfo:
        pack_store_paths(
            ["/nix/store/abc-growing"], write, ArchiveOptions(compression="none"),
            store_root=root, threads=1,
        )
    assert excinfo.value.path == "/nix/store/abc-growing/data"


def test_exceptions_from_write_propagate_unchanged(store: Path) -> None:
    """Whatever ``write`` raises (even an OSError) reaches the caller as it was raised."""
    for error in (RuntimeError("uploader broke"), OSError(errno.ENOSPC, "disk full")):

        def write(data: bytes, error: Exception = error) -> None:
            raise error

        with pytest.raises(type(error)) as excinfo:
            pack_store_paths(PATHS, write, ArchiveOptions(compression="none"), store_root=store)
        assert excinfo.value is error


def test_unreadable_file_is_a_layer_error(store: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An I/O error while reading is translated into a typed error naming the file."""

    def failing_readv(fd: int, buffers: object) -> int:
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(os, "readv", failing_readv)
    with pytest.raises(LayerError, match=r"cannot read /nix/store/.*Input/output error"):
        pack(store)


# --- options -------------------------------------------------------------------------------


def test_options_media_types_and_parameters() -> None:
    """Media types follow the compression; parameters change with everything that changes bytes."""
    assert ArchiveOptions().media_type == "application/vnd.oci.image.layer.v1.tar+gzip"
    assert ArchiveOptions(compression="zstd").media_type.endswith("tar+zstd")
    assert ArchiveOptions(compression="none").media_type == "application/vnd.oci.image.layer.v1.tar"
    keys = [
        ArchiveOptions().parameters(),
        ArchiveOptions(mtime=2).parameters(),
        ArchiveOptions(level=1).parameters(),
        ArchiveOptions(gzip_backend="zlib").parameters(),
        ArchiveOptions(compression="zstd").parameters(),
        ArchiveOptions(compression="none").parameters(),
    ]
    assert len({repr(sorted(k.items())) for k in keys}) == len(keys)
    assert ArchiveOptions().parameters() == ArchiveOptions(level=None).parameters()


@pytest.mark.parametrize(
    "kwargs",
    [
        {"compression": "lz4"},
        {"level": "9"},
        {"mtime": -1},
        {"mtime": 8**11},
        {"gzip_backend": "libdeflate"},
    ],
)
def test_bad_options_are_invalid_input(kwargs: dict[str, object]) -> None:
    """Malformed options are refused at construction with InvalidInput."""
    with pytest.raises(InvalidInput):
        ArchiveOptions(**kwargs)  # type: ignore[arg-type]


def test_level_out_of_the_backends_range_is_invalid_input(store: Path) -> None:
    """Level 6 exists for zlib but not for ISA-L: refused when packing, before writing."""
    sink = Sink()
    with pytest.raises(InvalidInput):
        pack_store_paths(PATHS, sink.write, ArchiveOptions(level=6, gzip_backend="isal"),
                         store_root=store)
    assert sink.chunks == []
    assert pack(store, ArchiveOptions(level=6, gzip_backend="zlib"))[0].size > 0


# --- synthesised entries -------------------------------------------------------------------

ENTRIES = [
    TarEntry("usr/bin/env", "symlink", 0o777, target="/nix/store/abc-coreutils/bin/env"),
    TarEntry("tmp", "dir", 0o1777),
    TarEntry("etc/passwd", "file", 0o644, data=b"root:x:0:0::/root:/bin/sh\n"),
    TarEntry("etc/passwd-", "hardlink", target="etc/passwd"),
    TarEntry("home/user", "dir", 0o755, uid=1000, gid=100),
    TarEntry("home/big", "dir", 0o700, uid=1000680000, gid=1000680000),
]


def _pack_entries(entries: list[TarEntry], **options: object) -> tuple[PackedLayer, bytes]:
    sink = Sink()
    packed = pack_entries(entries, sink.write, ArchiveOptions(**options))  # type: ignore[arg-type]
    return packed, sink.data


def test_entries_are_sorted_with_parents_added() -> None:
    """Entries come out parents first in byte order; missing parents are 0755 dirs owned by 0."""
    found = members(_pack_entries(ENTRIES)[1])
    assert [m.name for m in found] == [
        "etc", "etc/passwd", "etc/passwd-", "home", "home/big", "home/user", "tmp", "usr",
        "usr/bin", "usr/bin/env",
    ]
    by_name = {m.name: m for m in found}
    assert (by_name["usr"].mode, by_name["usr"].uid, by_name["usr"].isdir()) == (0o755, 0, True)
    assert by_name["tmp"].mode == 0o1777
    assert (by_name["home/user"].uid, by_name["home/user"].gid) == (1000, 100)
    assert by_name["home/big"].uid == 1000680000  # beyond ustar: a pax uid record
    assert by_name["etc/passwd-"].islnk()
    assert by_name["etc/passwd-"].linkname == "etc/passwd"
    assert by_name["usr/bin/env"].linkname == "/nix/store/abc-coreutils/bin/env"


@settings(max_examples=20, deadline=None)
@given(st.permutations(ENTRIES))
def test_entry_order_does_not_matter(entries: list[TarEntry]) -> None:
    """Any order of the same entries gives the same layer."""
    assert _pack_entries(entries) == _pack_entries(ENTRIES)


def test_hard_link_group_carries_data_on_its_first_member() -> None:
    """When the link sorts before its target, the link's name carries the bytes instead."""
    entries = [
        TarEntry("z/file", "file", 0o600, data=b"payload"),
        TarEntry("a/link", "hardlink", target="z/file"),
    ]
    found = members(_pack_entries(entries)[1])
    by_name = {m.name: m for m in found}
    assert by_name["a/link"].isfile()
    assert by_name["a/link"].size == 7
    assert by_name["a/link"].mode == 0o600
    assert by_name["z/file"].islnk()
    assert by_name["z/file"].linkname == "a/link"


@pytest.mark.parametrize(
    "entries",
    [
        [TarEntry("a", "file"), TarEntry("a", "dir")],
        [TarEntry("a", "file"), TarEntry("a/b", "file")],
        [TarEntry("a", "hardlink", target="missing")],
        [TarEntry("a", "dir"), TarEntry("b", "hardlink", target="a")],
        [TarEntry("a", "symlink")],
        [TarEntry("a", "dir", data=b"x")],
        [TarEntry("a", "file", uid=-1)],
    ],
)
def test_contradictory_entries_are_invalid_input(entries: list[TarEntry]) -> None:
    """Duplicates, files used as parents, dangling hard links and the like are refused."""
    with pytest.raises(InvalidInput):
        _pack_entries(entries)


def test_entry_layer_numbers_match_the_bytes() -> None:
    """pack_entries reports the digest, diff_id and size of what it wrote."""
    packed, blob = _pack_entries(ENTRIES)
    assert packed.digest == "sha256:" + hashlib.sha256(blob).hexdigest()
    assert packed.diff_id == "sha256:" + hashlib.sha256(gzip.decompress(blob)).hexdigest()
    assert packed.size == len(blob)


# --- properties ----------------------------------------------------------------------------

_names = st.text(
    alphabet=st.sampled_from("abcXYZ019-._é€"), min_size=1, max_size=12
).filter(lambda n: n not in (".", ".."))
_trees = st.recursive(
    st.one_of(st.binary(max_size=600), st.builds(lambda t: ("link", t), _names)),
    lambda children: st.dictionaries(_names, children, max_size=4),
    max_leaves=12,
)


def _build(base: Path, tree: object) -> None:
    if isinstance(tree, dict):
        base.mkdir()
        for name, child in tree.items():
            _build(base / name, child)
    elif isinstance(tree, tuple):
        base.symlink_to(tree[1])
    else:
        assert isinstance(tree, bytes)
        base.write_bytes(tree)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.dictionaries(_names, _trees, min_size=1, max_size=3))
def test_random_trees_pack_deterministically_with_every_file_once(
    tree: dict[str, object],
) -> None:
    """Random trees in two separate copies pack identically; every file appears exactly once."""
    paths = [f"/nix/store/{hashlib.sha256(n.encode()).hexdigest()[:32]}-{n}" for n in tree]
    layers = []
    with tempfile.TemporaryDirectory() as tmp:
        for copy in ("one", "two"):
            store = Path(tmp) / copy / "nix" / "store"
            store.mkdir(parents=True)
            for path, subtree in zip(paths, tree.values(), strict=True):
                _build(store / path.rsplit("/", 1)[1], subtree)
            layers.append(pack(Path(tmp) / copy, ArchiveOptions(compression="none"), paths=paths))
        on_disk = sorted(
            str(Path(dirpath, name).relative_to(Path(tmp) / "one"))
            for dirpath, dirs, files in os.walk(Path(tmp) / "one" / "nix" / "store")
            for name in dirs + files
        )
    assert layers[0] == layers[1]
    names = [m.name for m in members(layers[0][1], "none")]
    assert len(names) == len(set(names))
    assert sorted(names[2:]) == sorted(n for n in on_disk if n.count("/") >= 2)


def _checksum_holds(block: bytes) -> bool:
    """POSIX: the checksum field is the sum of the header's bytes, itself read as spaces."""
    return int(block[148:155].rstrip(b"\0 "), 8) == sum(block[:148]) + 8 * 32 + sum(block[156:512])


_NAME_BYTES = st.binary(min_size=1, max_size=300).map(
    lambda raw: bytes(b % 95 + 32 if b % 7 else 47 for b in raw)  # printable ASCII and "/"
)


@settings(max_examples=300, deadline=None)
@given(
    name=_NAME_BYTES | st.binary(min_size=1, max_size=120),
    linkname=st.sampled_from([b"", b"~" * 100, b"a/b" * 40]) | st.binary(max_size=150),
    size=st.integers(0, 8**12),
)
def test_every_header_block_carries_the_sum_of_its_bytes(
    name: bytes, linkname: bytes, size: int
) -> None:
    """Names split into ustar's prefix, names and link names in pax records, the largest
    sizes: each header block's checksum is what GNU tar and Python's tarfile check."""
    made = archive._Headers(1_700_000_000)(name, 0o555, size, b"0", linkname=linkname)
    blocks = [made[start : start + 512] for start in range(0, len(made), 512)]
    assert _checksum_holds(blocks[-1])
    if len(blocks) > 1:  # a pax header first
        assert _checksum_holds(blocks[0])


def test_the_longest_ustar_fields_keep_their_checksum() -> None:
    """Prefix 155 and name 100 bytes of "~" (the largest ASCII sum ustar keeps in place)."""
    name = b"~" * 155 + b"/" + b"~" * 100
    made = archive._Headers(0)(name, 0o444, 8**11 - 1, b"0", linkname=b"~" * 100)
    assert len(made) == 512  # no pax record: it all fits
    assert _checksum_holds(made)
    member = tarfile.TarInfo.frombuf(made, "utf-8", "surrogateescape")  # checks the sum too
    assert (member.name, member.linkname, member.size) == (name.decode(), "~" * 100, 8**11 - 1)


def test_sizes_beyond_ustar_get_a_pax_size_record() -> None:
    """A file of 8 GiB or more keeps its exact size in a pax record (ustar has 11 octal digits)."""
    from nixery_core.archive import _Headers

    size = 8**11 + 12345
    header = _Headers(1)(b"nix/store/abc-big/blob", 0o444, size, b"0")
    with tarfile.TarFile(fileobj=io.BytesIO(header + bytes(1024))) as archive:
        member = archive.next()
    assert member is not None
    assert (member.name, member.size, member.pax_headers) == (
        "nix/store/abc-big/blob", size, {"size": str(size)},
    )


class _ManualPool:
    """A pool that runs what it is given only when the test says."""

    max_workers = 2

    def __init__(self) -> None:
        self.tasks: list[Callable[[], None]] = []

    def submit(self, fn: Callable[[], None]) -> Future[None]:
        self.tasks.append(fn)
        return Future()

    def run(self) -> None:
        tasks, self.tasks = self.tasks, []
        for task in tasks:
            task()


def test_an_update_raising_in_a_pool_drain_neither_wedges_the_hashing_queue_nor_goes_unseen() -> (
    None
):
    """An update that raises on the pool (a recording's commit failing to start the cache's
    writing thread) leaves the queue draining on the pool with every later diff_id update
    applied, and its exception is raised on the producing thread at the next wait."""

    class Failing:
        def update(self, _data: bytes | bytearray | memoryview, /) -> None:
            raise RuntimeError("can't start new thread")

    pool = _ManualPool()
    hashing = archive._OrderedHashing(pool)  # type: ignore[arg-type]  # a stub pool
    diff = hashlib.sha256()
    hashing.update(diff, b"a")
    hashing.update(Failing(), b"")
    hashing.update(diff, b"b")
    pool.run()
    assert diff.digest() == hashlib.sha256(b"ab").digest()  # the update after it applied
    assert pool.tasks == []  # and the drain ended with the queue empty
    with pytest.raises(RuntimeError, match="can't start new thread"):
        hashing.update(diff, b"c")
    with pytest.raises(RuntimeError, match="can't start new thread"):
        hashing.wait()


class _InlinePool:
    """A pool that runs each task at once, on the thread submitting it."""

    max_workers = 2

    def submit(self, fn: Callable[[], None]) -> Future[None]:
        fn()
        return Future()


def test_an_update_refused_after_a_pool_drain_failed_is_dropped() -> None:
    """An update handed to the hashing queue after an earlier one raised on the pool is
    refused with that exception and, as one dropped by close(), told so with its drop()
    (a chunked fragment's commit then drops its parts, never left half-recorded)."""
    class Failing:
        def update(self, _data: bytes | bytearray | memoryview, /) -> None:
            raise RuntimeError("the diff_id's update failed")

    class Commit:
        """A recording's queued commit: applied, or dropped."""

        def __init__(self) -> None:
            self.applied = self.dropped = False

        def update(self, _data: bytes | bytearray | memoryview, /) -> None:
            self.applied = True

        def drop(self) -> None:
            self.dropped = True

    hashing = archive._OrderedHashing(_InlinePool())  # type: ignore[arg-type]  # a stub pool
    hashing.update(Failing(), b"")
    commit = Commit()
    with pytest.raises(RuntimeError, match="the diff_id's update failed"):
        hashing.update(commit, b"")
    assert (commit.applied, commit.dropped) == (False, True)


def test_updates_riding_along_wake_no_pool_thread_and_are_applied_in_order() -> None:
    """A recording's small item given with ride_along submits no drain of its own and does
    not count toward the producer's backlog: the next update's drain (or wait) applies it,
    in order with the blocks around it."""

    class Seen:
        def __init__(self, name: str, log: list[str]) -> None:
            self.name, self.log = name, log

        def update(self, data: bytes | bytearray | memoryview, /) -> None:
            self.log.append(f"{self.name}:{len(data)}")

    pool = _ManualPool()
    hashing = archive._OrderedHashing(pool)  # type: ignore[arg-type]  # a stub pool
    log: list[str] = []
    hashing.ride_along(Seen("range", log), bytes(archive._OrderedHashing._MAX_QUEUED + 1))
    hashing.ride_along(Seen("commit", log), b"")
    assert pool.tasks == []  # no pool thread woken, and no drain here past the backlog
    assert log == []
    hashing.update(Seen("block", log), b"abc")
    assert len(pool.tasks) == 1
    pool.run()
    assert log == [f"range:{archive._OrderedHashing._MAX_QUEUED + 1}", "commit:0", "block:3"]
    hashing.ride_along(Seen("seal", log), b"")
    hashing.wait()  # the end of a stream applies what rode along last
    assert log[-1] == "seal:0"
    assert pool.tasks == []


def test_a_queued_blocks_layout_failing_costs_its_layout_and_its_diff_id_failing_the_pack() -> (
    None
):
    """A chunked recorded block queued once for the diff_id and the layout: the layout's
    CRC-32 raising on the pool leaves the diff_id updated, the layout unkept and the pack
    going on; the diff_id's update raising is raised on the producing thread."""
    from nixery_core.fragment_layout import LayoutRecorder

    class Broken(LayoutRecorder):
        def block(self, data: bytes | bytearray | memoryview) -> None:
            raise MemoryError("no room for its CRC-32s (test)")

    class FailingDiff:
        def update(self, _data: bytes | bytearray | memoryview, /) -> None:
            raise OSError("the diff_id's hash failed (test)")

    hashing = archive._OrderedHashing(_InlinePool())  # type: ignore[arg-type]  # a stub pool
    diff = hashlib.sha256()
    layout = Broken(b"nix/store/x")
    layout.deferred(hashing.wait)
    hashing.update(archive._DiffAndLayout(diff, layout), b"block")
    hashing.update(archive._Seal(layout), b"")
    hashing.wait()
    assert diff.digest() == hashlib.sha256(b"block").digest()
    assert layout.encode() is None
    hashing.update(
        archive._DiffAndLayout(FailingDiff(), LayoutRecorder(b"nix/store/y")),  # type: ignore[arg-type]  # a stub hash
        b"block",
    )
    with pytest.raises(OSError, match="the diff_id's hash failed"):
        hashing.wait()


@pytest.mark.parametrize("compression", ["zstd", "zstd-chunked"])
def test_a_cached_zstd_fragment_declaring_a_larger_window_than_its_level_is_refused(
    compression: str,
) -> None:
    """A cached fragment's zstd frame declaring a window beyond what its level gives (a
    hostile one: 128 MiB, which libzstd would allocate outside Python) is a BadCachedFragment
    naming the store path and the fragment's key, refused before any allocation; one
    declaring the level's own window inflates."""
    from hostile_frames import zstd_frame_declaring_window

    from nixery_core.compression import zstd_window

    spec = ArchiveOptions(compression=compression).compressor()  # type: ignore[arg-type]
    hostile = zstd_frame_declaring_window(27, 1024)
    fragment = CachedFragment(io.BytesIO(), len(hostile), 1024, 0, key="k")
    with pytest.raises(BadCachedFragment, match=r"/nix/store/x \(key k, a copy in the cache\) "
                       r"does not decompress.*dropped") as raised:
        archive._inflate_whole(spec, hostile, fragment, b"/nix/store/x")
    assert (raised.value.path, raised.value.key, raised.value.blob) == ("/nix/store/x", "k", None)
    own = zstd_frame_declaring_window(zstd_window(spec.level).bit_length() - 1, 1024)
    assert archive._inflate_whole(spec, own, fragment, b"/nix/store/x") == bytes(1024)


def _frames(exc: BaseException) -> list[FrameType]:
    """The frames ``exc``'s traceback passed through, outermost first."""
    frames = []
    tb = exc.__traceback__
    while tb is not None:
        frames.append(tb.tb_frame)
        tb = tb.tb_next
    return frames


def test_a_pack_failing_inside_a_callers_except_block_keeps_the_callers_frames(
    tmp_path: Path,
) -> None:
    """A pack called while its caller handles an exception of its own drops the locals of
    its own failure's frames but not those of the caller's exception (a debugger still sees
    them), which its failure's context names."""

    def callers_step() -> None:
        kept = "the caller's local"
        raise ValueError(kept)

    handled: list[BaseException] = []
    try:
        callers_step()
    except ValueError as own:
        handled.append(own)
        with pytest.raises(StorePathMissing) as failed:
            pack_store_paths([HELLO], Sink().write, ArchiveOptions(), store_root=tmp_path)
    chain: list[BaseException] = []
    link: BaseException | None = failed.value
    while link is not None:
        chain.append(link)
        link = link.__cause__ or link.__context__
    assert chain[-1] is handled[0]
    assert _frames(handled[0])[-1].f_locals.get("kept") == "the caller's local"
    assert _frames(failed.value)[-1].f_locals == {}  # the pack's own frames are dropped still
