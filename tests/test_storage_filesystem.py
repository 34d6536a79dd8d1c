"""FilesystemStore: the Uploader promises on a real filesystem, across threads and processes."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import subprocess
import sys
import textwrap
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from nixery_core.digests import digest_hex, sha256_digest
from nixery_core.errors import BlobNotFound, InvalidInput, StorageUnavailable
from nixery_core.media_types import OCTET_STREAM
from nixery_core.storage.conformance import CHECKS, HOSTILE_KEYS, Check
from nixery_core.storage.filesystem import FilesystemStore

REPO = Path(__file__).resolve().parent.parent
GZ = "application/vnd.oci.image.layer.v1.tar+gzip"


def _outside(top: Path, root: Path) -> set[Path]:
    """Every path under ``top`` that is not ``root`` or inside it."""
    return {p for p in top.rglob("*") if p != root and root not in p.parents}


@pytest.mark.parametrize("check", CHECKS, ids=lambda c: c.name)
def test_conformance(check: Check, tmp_path: Path) -> None:
    """FilesystemStore keeps every promise of the Uploader conformance suite, leaving no staging."""
    store = FilesystemStore(tmp_path / "store")
    check.run(store)
    assert store.staging_leftovers() == []


def test_layout_matches_nixery_bucket(tmp_path: Path) -> None:
    """Blobs live at layers/<hex> with a JSON sidecar; objects at their key."""
    store = FilesystemStore(tmp_path)
    info = store.put_blob(b"layer", GZ)
    store.put_object("manifests/abc", b"{}")
    blob = tmp_path / "layers" / digest_hex(info.digest)
    assert blob.read_bytes() == b"layer"
    assert json.loads((tmp_path / "layers" / (blob.name + ".meta")).read_bytes()) == {
        "mediaType": GZ,
        "size": 5,
    }
    assert (tmp_path / "manifests" / "abc").read_bytes() == b"{}"
    assert store.blob_path(info.digest) == blob
    assert oct(blob.stat().st_mode & 0o777) == oct(0o644)


def test_content_survives_a_new_store_instance(tmp_path: Path) -> None:
    """A second store on the same root sees the first one's blobs, media types and objects."""
    first = FilesystemStore(tmp_path)
    info = first.put_blob(b"config", "application/vnd.oci.image.config.v1+json")
    first.put_object("builds/k", b"record")
    second = FilesystemStore(tmp_path)
    assert second.blob_info(info.digest) == info
    assert second.get_object("builds/k") == b"record"


def test_hostile_keys_never_write_outside_root(tmp_path: Path) -> None:
    """No refused key, and no valid one, creates anything outside the store root."""
    root = tmp_path / "deep" / "store"
    store = FilesystemStore(root)
    (tmp_path / "sentinel").write_text("x")
    before = _outside(tmp_path, root)
    for key in HOSTILE_KEYS:
        with pytest.raises(InvalidInput):
            store.put_object(key, b"evil")
    store.put_object("manifests/..a", b"ok")  # dots inside a segment are fine
    store.put_object("a/b/c/d", b"ok")
    assert _outside(tmp_path, root) == before
    assert (root / "manifests" / "..a").read_bytes() == b"ok"
    assert store.staging_leftovers() == []


def test_conflicting_object_keys_are_refused(tmp_path: Path) -> None:
    """An object cannot also be a key prefix (manifests/a then manifests/a/b), nor vice versa."""
    store = FilesystemStore(tmp_path)
    store.put_object("manifests/a", b"1")
    with pytest.raises(InvalidInput, match="conflicts"):
        store.put_object("manifests/a/b", b"2")
    store.put_object("builds/x/y", b"3")
    with pytest.raises(InvalidInput, match="conflicts"):
        store.put_object("builds/x", b"4")
    assert store.get_object("builds/x") is None
    assert store.staging_leftovers() == []


def test_foreign_files_are_tolerated(tmp_path: Path) -> None:
    """Blobs without sidecars read as octet-stream; junk names are not listed."""
    store = FilesystemStore(tmp_path)
    data = b"placed by another tool"
    digest = sha256_digest(data)
    (tmp_path / "layers" / digest_hex(digest)).write_bytes(data)
    (tmp_path / "layers" / "README").write_text("junk")
    (tmp_path / "layers" / ("f" * 64 + ".meta")).write_text("{}")
    (tmp_path / "manifests").mkdir()
    (tmp_path / "manifests" / "bad name").write_text("junk")
    info = store.blob_info(digest)
    assert info is not None
    assert (info.size, info.media_type) == (len(data), OCTET_STREAM)
    assert [i.digest for i in store.list_blobs()] == [digest]
    assert list(store.list_objects("")) == []


def test_open_stream_outlives_delete(tmp_path: Path) -> None:
    """A reader holding a blob stream reads it whole even if the blob is deleted meanwhile."""
    store = FilesystemStore(tmp_path)
    data = os.urandom(200_000)
    info = store.put_blob(data, GZ)
    with store.open_blob(info.digest) as stream:
        head = stream.read(1000)
        store.delete_blob(info.digest)
        assert head + stream.read() == data
    with pytest.raises(BlobNotFound):
        store.blob_path(info.digest)


def test_failed_rename_leaves_nothing_visible(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A failed blob rename is StorageUnavailable; nothing is visible or left staged."""
    store = FilesystemStore(tmp_path)
    real_replace = Path.replace

    def failing_replace(self: Path, target: str | os.PathLike[str]) -> Path:
        if Path(target).parent.name == "layers" and not str(target).endswith(".meta"):
            raise OSError(errno.EIO, "injected I/O error")
        return real_replace(self, target)

    monkeypatch.setattr(Path, "replace", failing_replace)
    with pytest.raises(StorageUnavailable) as info:
        store.put_blob(b"doomed", GZ)
    assert isinstance(info.value.__cause__, OSError)
    assert not store.has_blob(sha256_digest(b"doomed"))
    assert store.staging_leftovers() == []


def test_cleanup_staging_removes_only_old_leftovers(tmp_path: Path) -> None:
    """cleanup_staging removes old staging files and orphan sidecars, keeping fresh ones."""
    now = [1_000_000.0]
    store = FilesystemStore(tmp_path, clock=lambda: now[0])
    kept_blob = store.put_blob(b"kept", GZ)
    old = tmp_path / "staging" / "blob-crashed"
    fresh = tmp_path / "staging" / "blob-live"
    orphan = tmp_path / "layers" / ("a" * 64 + ".meta")
    for path in (old, fresh, orphan):
        path.write_bytes(b"x")
    for path in (old, orphan, tmp_path / "layers" / (digest_hex(kept_blob.digest) + ".meta")):
        os.utime(path, (now[0] - 7200, now[0] - 7200))
    os.utime(fresh, (now[0] - 60, now[0] - 60))
    assert store.staging_leftovers() == [old, fresh]
    assert store.cleanup_staging(older_than=3600) == 2
    assert store.staging_leftovers() == [fresh]
    assert not orphan.exists()
    assert store.blob_info(kept_blob.digest) == kept_blob


def test_kernel_write_error_is_translated(tmp_path: Path) -> None:
    """A real write error from the kernel (EFBIG under RLIMIT_FSIZE) becomes StorageUnavailable."""
    script = textwrap.dedent(
        f"""
        import resource, signal, sys
        from pathlib import Path
        from nixery_core.errors import StorageUnavailable
        from nixery_core.storage.filesystem import FilesystemStore
        store = FilesystemStore(Path({str(tmp_path)!r}))
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, 100_000))
        try:
            with store.open_blob_writer({GZ!r}) as writer:
                for _ in range(64):
                    writer.write(b"x" * 65536)
        except StorageUnavailable as exc:
            print(type(exc.__cause__).__name__, exc.__cause__.errno)
        print(store.staging_leftovers())
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=True, cwd=REPO
    ).stdout.split("\n")
    assert out[0] == f"OSError {errno.EFBIG}"
    assert out[1] == "[]"


def test_a_write_that_failed_is_never_committed(tmp_path: Path) -> None:
    """After a kernel write error the file holds part of a chunk the writer never counted:
    committing the digest it did count is refused, and nothing is stored or left staged."""
    script = textwrap.dedent(
        f"""
        import resource, signal
        from pathlib import Path
        from nixery_core.errors import InvalidInput, StorageUnavailable
        from nixery_core.storage.filesystem import FilesystemStore
        store = FilesystemStore(Path({str(tmp_path)!r}))
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, 100_000))
        with store.open_blob_writer({GZ!r}) as writer:
            try:
                for _ in range(4):
                    writer.write(b"x" * 65536)
            except StorageUnavailable:
                print("write failed after", writer.size)
            try:
                writer.commit(writer.written_digest())
            except InvalidInput as exc:
                print("commit refused:", exc)
        print(list(store.list_blobs()), store.staging_leftovers())
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=True, cwd=REPO
    ).stdout.split("\n")
    assert out[0] == "write failed after 65536"
    assert out[1].startswith("commit refused: blob writer is failed")
    assert out[2] == "[] []"


@pytest.fixture
def tiny_tmpfs(tmp_path: Path) -> Iterator[Path]:
    """A 256 KiB tmpfs (needs mount privileges; skipped without them)."""
    mountpoint = tmp_path / "tiny"
    mountpoint.mkdir()
    result = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mountpoint)],
        capture_output=True,
        check=False,
    )
    if result.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {result.stderr.decode().strip()}")
    try:
        yield mountpoint
    finally:
        subprocess.run(["umount", str(mountpoint)], check=True)


def test_disk_full_is_storage_unavailable(tiny_tmpfs: Path) -> None:
    """ENOSPC while streaming a blob is StorageUnavailable, and the staged bytes are removed."""
    store = FilesystemStore(tiny_tmpfs / "store")

    def fill() -> None:
        with store.open_blob_writer(GZ) as writer:
            for _ in range(64):
                writer.write(os.urandom(65536))

    with pytest.raises(StorageUnavailable, match="out of space") as info:
        fill()
    assert isinstance(info.value.__cause__, OSError)
    assert info.value.__cause__.errno == errno.ENOSPC
    assert store.staging_leftovers() == []
    store.put_object("manifests/after", b"space is back")
    assert store.get_object("manifests/after") == b"space is back"


# --- two processes ----------------------------------------------------------------

_WRITER = textwrap.dedent(
    """
    import hashlib, sys
    from pathlib import Path
    from nixery_core.storage.filesystem import FilesystemStore

    root, rounds = Path(sys.argv[1]), int(sys.argv[2])
    store = FilesystemStore(root)

    def value(i):
        return hashlib.sha256(str(i).encode()).digest() * (8192 + i)

    for i in range(rounds):
        store.put_object("manifests/contended", value(i % 5))
        data = value(1000 + i)
        with store.open_blob_writer("application/vnd.oci.image.layer.v1.tar+gzip") as w:
            for start in range(0, len(data), 32768):
                w.write(data[start:start + 32768])
            w.commit("sha256:" + hashlib.sha256(data).hexdigest())
    print("done")
    """
)


def _value(i: int) -> bytes:
    return hashlib.sha256(str(i).encode()).digest() * (8192 + i)


@pytest.mark.slow
def test_two_processes_never_expose_torn_content(tmp_path: Path) -> None:
    """Two processes writing the same object and the same blobs: readers only see whole values."""
    rounds = 40
    store = FilesystemStore(tmp_path)
    objects = {_value(i) for i in range(5)}
    blobs = {sha256_digest(_value(1000 + i)): _value(1000 + i) for i in range(rounds)}
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _WRITER, str(tmp_path), str(rounds)],
            cwd=REPO,
            stdout=subprocess.PIPE,
        )
        for _ in range(2)
    ]
    reads = {"objects": 0, "blobs": 0}
    bad: list[str] = []
    stop = threading.Event()

    def reader() -> None:
        while not stop.is_set():
            value = store.get_object("manifests/contended")
            if value is not None:
                reads["objects"] += 1
                if value not in objects:
                    bad.append(f"torn object of {len(value)} bytes")
            for digest, data in blobs.items():
                info = store.blob_info(digest)
                if info is None:
                    continue
                reads["blobs"] += 1
                if info.media_type != GZ or store.read_blob(digest) != data:
                    bad.append(f"bad blob {digest}: {info}")

    thread = threading.Thread(target=reader)
    thread.start()
    try:
        outputs = [proc.communicate(timeout=120)[0] for proc in procs]
    finally:
        stop.set()
        thread.join()
    assert [p.returncode for p in procs] == [0, 0]
    assert outputs == [b"done\n", b"done\n"]
    assert bad == []
    assert reads["objects"] > 0
    assert reads["blobs"] > 0
    assert {i.digest for i in store.list_blobs()} == set(blobs)
    assert store.staging_leftovers() == []


def test_a_range_read_short_by_pread_is_read_to_its_end(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """read_range keeps reading when pread returns fewer bytes than asked (Linux caps one call
    at about 2 GiB): the whole range, and short only where the blob ends."""
    store = FilesystemStore(tmp_path / "store")
    data = os.urandom(10_000)
    digest = store.put_blob(data, OCTET_STREAM).digest
    pread = os.pread
    calls = 0

    def short(fd: int, length: int, offset: int) -> bytes:
        nonlocal calls
        calls += 1
        return pread(fd, min(length, 1000), offset)

    monkeypatch.setattr(os, "pread", short)
    assert store.read_range(digest, 123, 4567) == data[123:4690]
    assert calls == 5
    assert store.read_range(digest, 9_500, 4567) == data[9_500:]
    assert store.read_range(digest, 10_000, 10) == b""
    assert store.read_range(digest, 5, 0) == b""
