"""Faults across the whole build pipeline: each leaves no partial state, and the retry works.

Every test injects one fault, then checks the same things
(:func:`assert_no_partial_state`): the typed error from
:mod:`nixery_core.errors` where one is due; every visible blob complete and
named by the sha256 of its bytes (MemoryStore: nothing staged;
FilesystemStore: nothing but complete blobs and their sidecars under
``layers/``, nothing left in ``staging/``; GCS: no staging object); every
cache entry, in both tiers, naming only stored blobs; no manifest entry for
the failed build; and the next attempt succeeding with the digest a clean
build gives.

Faults: Nix hanging, failing, printing garbage or missing, at each of its
three steps (FakeNix), and for real (a builder that never finishes; a
``nix-store`` SIGKILLed mid-build); the uploader failing on every blob and
every cache-entry write position (one and four packing threads); a full disk
(a small tmpfs); fake-gcs-server stopped during the metadata stage and during
each kind of cache-entry write, then restarted; a building process SIGKILLed
while Nix runs, while a layer is packed and before its manifest entry is
written, and a process killed while holding the cross-process lock.

Already covered elsewhere and not repeated here: tests/test_build.py (one
failing blob write), tests/test_scale_out.py (the server stopped while a
layer streams), the storage tests (ENOSPC and a stopped server at store
level), tests/test_runner.py and tests/test_nix.py (runner timeouts).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import signal
import sqlite3
import subprocess
import sys
import textwrap
import threading
import time
import warnings
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import attrs
import diskcache
import pytest
from conftest import IN_CI, OFFLINE_SET, Children, slow_builders_alive, wait_no_slow_builders
from servers import FakeGcsServer

from nixery_core.build import BuildResult, build_image
from nixery_core.cache import BuildCache
from nixery_core.digests import sha256_digest
from nixery_core.errors import (
    CommandNotFound,
    NixBuildFailed,
    NixError,
    NixOutputError,
    NixTimeout,
    StorageUnavailable,
)
from nixery_core.fragment_bucket import FRAGMENT_PREFIX, FragmentPointer
from nixery_core.fragments import FragmentCache
from nixery_core.media_types import OCI_CONFIG
from nixery_core.names import Image
from nixery_core.nix import NixStep, parse_argv
from nixery_core.protocols import (
    BlobInfo,
    BlobWriter,
    CollectableStore,
    LogCallback,
    Runner,
    RunResult,
)
from nixery_core.runner import SubprocessRunner
from nixery_core.sources import LocalPathSource
from nixery_core.storage.filesystem import FilesystemStore
from nixery_core.storage.gcs import GcsStore
from nixery_core.testing.runners import FakeFault, FakeNix, FakePackage, default_fake_packages
from nixery_core.testing.sources import FixedSource
from nixery_core.testing.storage import MemoryStore

TESTS = Path(__file__).resolve().parent
HEX = re.compile(r"[0-9a-f]{64}")
NIX_OPTIONS = {"substituters": ""}
FaultKind = Literal["fail", "hang", "garbage", "not-installed"]


def bulky(size: int) -> dict[str, FakePackage]:
    """The default fake packages plus ``bulky``: ``size`` incompressible bytes."""
    data = hashlib.shake_256(b"bulky").digest(size)
    return {
        **default_fake_packages(),
        "bulky": FakePackage({"share/bulky.bin": data}, ("busybox",)),
    }


def build(
    name: str,
    runner: Runner,
    store_root: Path,
    store: CollectableStore,
    cache: BuildCache | None,
    **kwargs: Any,
) -> BuildResult:
    return build_image(
        Image.from_name(name), FixedSource(), runner=runner, uploader=store, cache=cache,
        store_root=store_root, **kwargs,
    )


def clean_digest(root: Path, name: str, packages: Mapping[str, FakePackage]) -> str:
    """The manifest digest of a build with no fault, its own Nix store, no cache."""
    runner = FakeNix(root, packages)
    return build(name, runner, root, MemoryStore(), None).manifest_digest


# --- what every fault must leave behind ----------------------------------------------------


def local_entries(cache_dir: Path | None) -> dict[str, bytes]:
    """Every manifests/ and builds/ entry of the local (diskcache) tier."""
    if cache_dir is None:
        return {}
    found: dict[str, bytes] = {}
    with diskcache.Cache(str(cache_dir)) as local:
        for key in local.iterkeys():
            value = local.get(key)
            if isinstance(key, str) and isinstance(value, bytes):
                found[key] = value
    return found


def named_blobs(name: str, raw: bytes) -> list[str]:
    """The blobs a cache entry names (a builds/ entry one, a manifests/ entry all of them)."""
    entry = json.loads(raw)
    if name.startswith("builds/"):
        return [entry["digest"]]
    return list(entry["blobs"])


def assert_no_partial_state(
    store: CollectableStore, cache_dir: Path | None, *, after_crash: bool = False,
    built: bool = False,
) -> set[str]:
    """No partial blob, no entry naming a missing blob, no manifest entry; returns the blobs.

    ``after_crash`` allows what only a killed process can leave: staging
    files and a sidecar whose blob was never renamed into place (both are
    what :meth:`FilesystemStore.cleanup_staging` removes).  ``built`` allows
    manifest entries (of the successful retry).
    """
    stored: set[str] = set()
    for info in store.list_blobs():
        data = store.read_blob(info.digest)
        assert sha256_digest(data) == info.digest, f"blob {info.digest} holds other bytes"
        assert len(data) == info.size
        stored.add(info.digest)
    if isinstance(store, MemoryStore):
        assert store.staged_blobs() == ()
    if isinstance(store, GcsStore):
        assert store.staging_leftovers() == []
    if isinstance(store, FilesystemStore):
        if not after_crash:
            assert store.staging_leftovers() == []
        for path in (store.root / "layers").iterdir():
            digest = "sha256:" + path.name.removesuffix(".meta")
            assert HEX.fullmatch(path.name.removesuffix(".meta")), f"stray file {path}"
            if path.name.endswith(".meta"):
                assert isinstance(json.loads(path.read_bytes()), dict)
                assert after_crash or digest in stored, f"sidecar without blob: {path}"
            else:
                assert digest in stored
    shared = {
        key: store.get_object(key) or b""
        for prefix in ("builds/", "manifests/") for key in store.list_objects(prefix)
    }
    for tier, entries in (("shared", shared), ("local", local_entries(cache_dir))):
        for name, raw in entries.items():
            assert built or not name.startswith("manifests/"), f"{tier} {name}: failed build"
            missing = set(named_blobs(name, raw)) - stored
            assert not missing, f"{tier} entry {name} names missing blobs {missing}"
    index = None if cache_dir is None else cache_dir / "fragments" / "index.sqlite"
    if index is not None and index.exists():  # fragments kept as ranges name stored blobs only
        with contextlib.closing(sqlite3.connect(index)) as con:
            ranged = {blob for (blob,) in con.execute(
                "SELECT blob FROM fragments WHERE blob IS NOT NULL")}
        assert ranged <= stored, f"fragment ranges of blobs not stored: {ranged - stored}"
    for key in store.list_objects(FRAGMENT_PREFIX):  # shared copies and references alike
        digest = FragmentPointer.from_json(store.get_object(key) or b"").digest
        assert digest in stored, f"fragment pointer {key} names {digest}, not stored"
    return stored


# --- Nix misbehaving (FakeNix) ---------------------------------------------------------


@pytest.mark.parametrize("step", ["resolve", "realise", "path-info"])
@pytest.mark.parametrize(
    ("kind", "error"),
    [("hang", NixTimeout), ("fail", NixBuildFailed), ("garbage", NixOutputError),
     ("not-installed", CommandNotFound)],
)
def test_nix_fault_is_typed_and_the_retry_succeeds(
    tmp_path: Path, step: NixStep, kind: FaultKind, error: type[NixError]
) -> None:
    """A hanging, dying, babbling or missing Nix at any step: its typed error, nothing stored."""
    root = tmp_path / "root"
    runner = FakeNix(root, default_fake_packages(), fail_with={step: FakeFault(kind, times=1)})
    store = MemoryStore()
    with BuildCache(tmp_path / "cache") as cache:
        with pytest.raises(error) as info:
            build("shell/hello", runner, root, store, cache, timeout=7.5)
        # Nix's realise output is not parsed: garbage there shows as outputs the
        # path-info query that follows does not find.
        failed_at = "path-info" if (kind, step) == ("garbage", "realise") else step
        err = info.value
        assert isinstance(err, NixTimeout | NixBuildFailed | NixOutputError | CommandNotFound)
        call = parse_argv(err.argv)
        assert call is not None
        assert call.step == failed_at
        if isinstance(info.value, NixTimeout):
            assert info.value.timeout == 7.5
        assert list(store.list_blobs()) == []  # nothing is uploaded before Nix succeeds
        assert_no_partial_state(store, tmp_path / "cache")
        retry = build("shell/hello", runner, root, store, cache, timeout=7.5)
    assert not retry.from_cache
    assert retry.manifest_digest == clean_digest(tmp_path / "clean", "shell/hello",
                                                 default_fake_packages())
    assert_no_partial_state(store, tmp_path / "cache", built=True)


# --- Nix misbehaving for real ----------------------------------------------------------


def _real_build(
    name: str, store: CollectableStore, cache: BuildCache | None, **kwargs: Any
) -> BuildResult:
    return build_image(Image.from_name(name), LocalPathSource(OFFLINE_SET), uploader=store,
                       cache=cache, nix_options=NIX_OPTIONS, **kwargs)


@pytest.mark.usefixtures("nix")
def test_real_nix_hang_times_out_and_leaves_nothing(tmp_path: Path) -> None:
    """A real builder that never ends: NixTimeout, no builder left, and the next build works."""
    store = MemoryStore()
    with BuildCache(tmp_path / "cache") as cache:
        with pytest.raises(NixTimeout) as info:
            _real_build("slow", store, cache, runner=SubprocessRunner(term_grace=3.0), timeout=1.5)
        assert info.value.argv[0] == "nix-store"
        assert info.value.timeout == 1.5
        wait_no_slow_builders(10.0)
        assert list(store.list_blobs()) == []
        assert_no_partial_state(store, tmp_path / "cache")
        after = _real_build("hello", store, cache)
    assert after.manifest_digest == _real_build("hello", MemoryStore(), None).manifest_digest


@attrs.define
class _KillsNixMidBuild:
    """A real runner whose ``nix-store --realise`` is SIGKILLed once its builder runs."""

    inner: SubprocessRunner = attrs.Factory(SubprocessRunner)
    killed: list[int] = attrs.Factory(list)
    _done: threading.Event = attrs.Factory(threading.Event)

    def run(
        self,
        argv: Sequence[str],
        *,
        timeout: float | None = None,
        env: Mapping[str, str] | None = None,
        on_log_line: LogCallback | None = None,
    ) -> RunResult:
        watcher = None
        if "--realise" in argv and not self.killed:
            self._done.clear()
            watcher = threading.Thread(target=self._kill_builders_parent, daemon=True)
            watcher.start()
        try:
            return self.inner.run(argv, timeout=timeout, env=env, on_log_line=on_log_line)
        finally:
            if watcher is not None:
                self._done.set()
                watcher.join(timeout=10)

    def _kill_builders_parent(self) -> None:
        while not self._done.is_set():
            for pid in slow_builders_alive():
                parent = _parent(pid)
                if parent is not None and _parent(parent) == os.getpid():  # our nix-store
                    os.kill(parent, signal.SIGKILL)
                    self.killed.append(parent)
                    return
            time.sleep(0.02)


def _parent(pid: int) -> int | None:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    return int(re.findall(r"^PPid:\s+(\d+)", status, re.MULTILINE)[0])


@pytest.mark.usefixtures("nix")
def test_real_nix_killed_mid_build_is_typed_and_leaves_nothing(tmp_path: Path) -> None:
    """nix-store SIGKILLed mid-build: NixBuildFailed (-9), no builder left, next build works."""
    store = MemoryStore()
    runner = _KillsNixMidBuild()
    with BuildCache(tmp_path / "cache") as cache:
        with pytest.raises(NixBuildFailed) as info:
            _real_build("slow", store, cache, runner=runner, timeout=30.0)
        assert runner.killed, "the builder never started"
        assert info.value.argv[0] == "nix-store"
        assert info.value.returncode == -signal.SIGKILL
        wait_no_slow_builders(10.0)
        assert list(store.list_blobs()) == []
        assert_no_partial_state(store, tmp_path / "cache")
        after = _real_build("hello", store, cache, runner=runner)
    assert after.manifest_digest == _real_build("hello", MemoryStore(), None).manifest_digest


# --- the uploader failing on the N-th write ------------------------------------------------


@pytest.mark.parametrize("workers", [1, 4])
@pytest.mark.parametrize("what", ["blob", "cache entry"])
def test_uploader_failing_at_every_write_position(tmp_path: Path, workers: int, what: str) -> None:
    """For each write of a build in turn: failing it is StorageUnavailable, leaves nothing
    partial, and a retry on the same store and cache gives the clean digest."""
    packages = default_fake_packages()
    root = tmp_path / "root"
    runner = FakeNix(root, packages)
    counting = MemoryStore()
    with BuildCache(tmp_path / "count-cache") as cache:
        expected = build("shell/hello", runner, root, counting, cache, max_workers=workers)
    writes = counting.blob_commits if what == "blob" else counting.object_writes
    layers = len(expected.layers)
    # every layer, the config, the manifest and the SBOMs (the empty config, two
    # documents, two artifact manifests); or every layer entry, the referrers
    # index and the manifest entry
    assert writes == (layers + 2 + 5 if what == "blob" else layers + 2)
    for n in range(1, writes + 1):
        store = MemoryStore()
        if what == "blob":
            store.fail_on_write(n)
        else:
            store.fail_on_object_write(n)
        cache_dir = tmp_path / f"cache-{n}"
        with BuildCache(cache_dir) as cache:
            with pytest.raises(StorageUnavailable):
                build("shell/hello", runner, root, store, cache, max_workers=workers)
            assert_no_partial_state(store, cache_dir)
            retry = build("shell/hello", runner, root, store, cache, max_workers=workers)
        assert retry.manifest_digest == expected.manifest_digest, f"write {n}"
        if workers == 1:  # in order: the layers committed and recorded before the fault
            assert sum(x.reused for x in retry.layers) == min(n - 1, layers), f"write {n}"
        assert store.staged_blobs() == ()
    assert expected.manifest_digest == clean_digest(tmp_path / "clean", "shell/hello", packages)


# --- a full disk -------------------------------------------------------------------------


@pytest.fixture
def small_tmpfs(tmp_path: Path) -> Iterator[Path]:
    """A 1 MiB tmpfs (we are root; a refused mount skips, or fails under CI)."""
    mountpoint = tmp_path / "small"
    mountpoint.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=1m,mode=0755", "tmpfs", str(mountpoint)],
        capture_output=True, text=True, check=False,
    )
    if done.returncode != 0:
        message = f"cannot mount a tmpfs (needs root or CAP_SYS_ADMIN): {done.stderr.strip()}"
        if IN_CI:
            pytest.fail(message)
        pytest.skip(message)
    try:
        yield mountpoint
    finally:
        busy = subprocess.run(["umount", str(mountpoint)], capture_output=True, text=True,
                              check=False)
        if busy.returncode != 0:  # a file left open on it: detach it anyway, then fail
            subprocess.run(["umount", "--lazy", str(mountpoint)], check=True)
            pytest.fail(f"the tmpfs was still in use (a leaked file?): {busy.stderr.strip()}")


def test_full_disk_is_storage_unavailable_and_space_back_builds(
    tmp_path: Path, small_tmpfs: Path
) -> None:
    """2 MiB layer, 1 MiB store: StorageUnavailable (ENOSPC), nothing partial; grown, it builds."""
    packages = bulky(2 << 20)
    root = tmp_path / "root"
    runner = FakeNix(root, packages)
    store = FilesystemStore(small_tmpfs / "store")
    with BuildCache(tmp_path / "cache") as cache:
        with pytest.raises(StorageUnavailable, match="out of space") as info:
            build("bulky", runner, root, store, cache)
        assert isinstance(info.value.__cause__, OSError)
        assert info.value.__cause__.errno == 28  # ENOSPC
        assert_no_partial_state(store, tmp_path / "cache")
        subprocess.run(["mount", "-o", "remount,size=16m", str(small_tmpfs)], check=True)
        retry = build("bulky", runner, root, store, cache)
        assert not retry.from_cache
    assert retry.manifest_digest == clean_digest(tmp_path / "clean", "bulky", packages)
    assert store.staging_leftovers() == []


# --- the storage server going away and coming back ------------------------------------------


class _StopsServerAt:
    """A GcsStore that stops its server just before one chosen write of a build.

    ``point``: ``config`` or ``manifest`` (the metadata stage's two blobs),
    ``layer entry`` (the first ``builds/`` object), ``manifest entry`` (the
    ``manifests/`` object, the build's very last write).
    """

    def __init__(self, store: GcsStore, server: FakeGcsServer, point: str) -> None:
        self._store = store
        self._server = server
        self._point = point

    def __getattr__(self, name: str) -> Any:
        return getattr(self._store, name)

    def _stop_if(self, here: str) -> None:
        if here == self._point and self._server.running:
            self._server.stop()

    def put_blob(self, data: bytes, media_type: str) -> BlobInfo:
        self._stop_if("config" if media_type == OCI_CONFIG else "manifest")
        return self._store.put_blob(data, media_type)

    def put_object(self, key: str, data: bytes) -> None:
        self._stop_if("layer entry" if key.startswith("builds/") else "manifest entry")
        self._store.put_object(key, data)


@pytest.fixture
def gcs() -> Iterator[FakeGcsServer]:
    with FakeGcsServer(persistent=True) as server:
        yield server


@pytest.mark.parametrize("point", ["config", "manifest", "layer entry", "manifest entry"])
def test_storage_server_gone_in_metadata_or_entry_write_then_back(
    gcs: FakeGcsServer, tmp_path: Path, point: str
) -> None:
    """fake-gcs-server killed before a metadata blob or a cache entry: typed error, nothing
    partial in the bucket or the local tier; restarted, the retry gives the clean digest."""
    packages = default_fake_packages()
    root = tmp_path / "root"
    runner = FakeNix(root, packages)
    bucket = gcs.make_bucket("images")
    faulty = _StopsServerAt(GcsStore(bucket, timeout=5.0, retry=None), gcs, point)
    cache_dir = tmp_path / "cache"
    with BuildCache(cache_dir) as cache, pytest.raises(StorageUnavailable):
        build("shell/hello", runner, root, faulty, cache, max_workers=1)
    assert not gcs.running
    gcs.start()
    store = GcsStore(gcs.make_bucket("images"), timeout=5.0, retry=None)
    stored = assert_no_partial_state(store, cache_dir)
    assert stored  # some layers made it before the fault
    with BuildCache(cache_dir) as cache:
        retry = build("shell/hello", runner, root, store, cache, max_workers=1)
    # The lease the failed build could not release: this process's orphan, taken at once.
    assert cache.fleet is not None
    assert cache.fleet.stats.taken_over == cache.fleet.stats.dead_holders >= 1
    assert not retry.from_cache
    assert retry.manifest_digest == clean_digest(tmp_path / "clean", "shell/hello", packages)
    if point in ("manifest", "manifest entry"):  # every layer was stored and recorded
        assert all(layer.reused for layer in retry.layers)
    assert set(retry.blobs) <= {info.digest for info in store.list_blobs()}


# --- a build process SIGKILLed mid-way ---------------------------------------------------


@attrs.define
class _PausingRunner:
    """FakeNix that, at realise, touches ``marker`` and waits to be killed."""

    inner: FakeNix
    marker: Path

    def run(
        self,
        argv: Sequence[str],
        *,
        timeout: float | None = None,
        env: Mapping[str, str] | None = None,
        on_log_line: LogCallback | None = None,
    ) -> RunResult:
        call = parse_argv(argv)
        if call is not None and call.step == "realise":
            _pause(self.marker)
        return self.inner.run(argv, timeout=timeout, env=env, on_log_line=on_log_line)


def _pause(marker: Path) -> None:
    marker.touch()
    time.sleep(3600)


class _PausingStore:
    """A FilesystemStore that waits to be killed at one point of a build.

    ``packing``: after the first bytes of the second layer reach its
    staging file; ``metadata``: just before the manifest entry is written
    (every blob and layer entry is stored by then).
    """

    def __init__(self, store: FilesystemStore, point: str, marker: Path) -> None:
        self._store = store
        self._point = point
        self._marker = marker
        self._writers = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self._store, name)

    def open_blob_writer(self, media_type: str) -> BlobWriter:
        writer = self._store.open_blob_writer(media_type)
        self._writers += 1
        if self._point == "packing" and self._writers == 2:
            return _PausingWriter(writer, self._marker)
        return writer

    def put_object(self, key: str, data: bytes) -> None:
        if self._point == "metadata" and key.startswith("manifests/"):
            _pause(self._marker)
        self._store.put_object(key, data)


@attrs.define
class _PausingWriter:
    """A blob writer that pauses for good after its first write."""

    inner: BlobWriter
    marker: Path

    def write(self, data: bytes | memoryview) -> int:
        written = self.inner.write(data)
        _pause(self.marker)
        return written

    def commit(self, digest: str) -> BlobInfo:
        return self.inner.commit(digest)

    def abort(self) -> None:
        self.inner.abort()

    def __enter__(self) -> _PausingWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.inner.abort()


def worker_main(args: Sequence[str]) -> None:
    """A build in its own process: ``root store cache marker point`` (point ``none``: no pause)."""
    root, store_dir, cache_dir, marker = map(Path, args[:4])
    point = args[4]
    fake = FakeNix(root, bulky(256 << 10))
    runner: Runner = _PausingRunner(fake, marker) if point == "nix" else fake
    store = FilesystemStore(store_dir)
    uploader: Any = _PausingStore(store, point, marker) if point != "nix" else store
    with BuildCache(cache_dir) as cache:
        result = build("bulky", runner, root, uploader, cache, max_workers=1)
    assert cache.fleet is not None
    print(json.dumps({
        "digest": result.manifest_digest,
        "resolves": fake.count("resolve"),
        "reused": [layer.reused for layer in result.layers],
        "taken_over": cache.fleet.stats.taken_over,
        "dead_holders": cache.fleet.stats.dead_holders,
    }))


_WORKER = "import sys; sys.path.insert(0, sys.argv[1]); import test_faults; " \
          "test_faults.worker_main(sys.argv[2:])"


def _worker(children: Children, tmp_path: Path, n: int, point: str) -> subprocess.Popen[str]:
    return children.start(
        [sys.executable, "-c", _WORKER, str(TESTS), str(tmp_path / f"root{n}"),
         str(tmp_path / "store"), str(tmp_path / "cache"), str(tmp_path / f"marker{n}"), point],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )


def cache_problems(cache_dir: Path) -> list[str]:
    """What the caches' own consistency checks report (SQLite integrity, stray files): diskcache's
    for the build cache, FragmentCache.check for the fragment cache in its ``fragments/``."""
    BuildCache(cache_dir).close()  # a new BuildCache opens the directory
    with diskcache.Cache(str(cache_dir)) as local, warnings.catch_warnings():
        warnings.simplefilter("always")  # check() records its findings as warnings
        found = [str(w.message) for w in local.check()]
    problems = [message for message in found if f"{cache_dir}/fragments/" not in message]
    with FragmentCache(cache_dir / "fragments") as fragments:
        problems += fragments.check()
    return problems


def _wait_for(path: Path, proc: subprocess.Popen[str], timeout: float = 30.0) -> None:
    """Wait until ``path`` exists; fail early with the child's stderr if it exits first."""
    deadline = time.monotonic() + timeout
    while not path.exists():
        if proc.poll() is not None:
            _, err = proc.communicate()
            raise AssertionError(f"worker exited with {proc.returncode} before {path}:\n{err}")
        if time.monotonic() > deadline:
            raise AssertionError(f"worker did not reach {path} in {timeout}s")
        time.sleep(0.02)


def _kill(proc: subprocess.Popen[str]) -> None:
    if proc.poll() is None:
        os.kill(proc.pid, signal.SIGKILL)
    proc.communicate(timeout=10)
    assert proc.returncode == -signal.SIGKILL


@pytest.mark.parametrize("point", ["nix", "packing", "metadata"])
def test_build_process_killed_mid_way(tmp_path: Path, point: str, children: Children) -> None:
    """SIGKILL while Nix runs, while a layer streams, or before the manifest entry: no partial
    blob, leftovers only in staging/, a sound cache directory, and the next process builds."""
    victim = _worker(children, tmp_path, 1, point)
    try:
        _wait_for(tmp_path / "marker1", victim)
    finally:
        _kill(victim)

    # No background clock games: the store's clock runs a minute ahead for cleanup.
    store = FilesystemStore(tmp_path / "store", clock=lambda: time.time() + 60)
    leftovers = store.staging_leftovers()
    stored = assert_no_partial_state(store, tmp_path / "cache", after_crash=True)
    assert all(p.parent == tmp_path / "store" / "staging" for p in leftovers)
    if point == "packing":
        assert leftovers, "the half-written layer should be left in staging/"
    else:
        assert leftovers == []
    assert bool(stored) == (point != "nix")  # layers committed before the kill stay, complete
    # diskcache opens and checks clean; the only strangers are the dead holder's lock files.
    problems = cache_problems(tmp_path / "cache")
    assert problems
    # A fragment file written before the kill but not its row is gone: opening the fragment
    # cache swept it (its writer's owner file was unlocked).
    assert all(re.search(r"unknown file: .*/lock-[0-9a-f]{64}$", p) for p in problems), problems
    metas = [m for m in (tmp_path / "store" / "layers").glob("*.meta")
             if not m.with_suffix("").exists()]
    assert store.cleanup_staging(older_than=30) == len(leftovers) + len(metas)
    assert store.staging_leftovers() == []

    survivor = _worker(children, tmp_path, 2, "none")
    out, err = survivor.communicate(timeout=60)
    assert survivor.returncode == 0, err
    answer = json.loads(out)
    assert answer["digest"] == clean_digest(tmp_path / "clean", "bulky", bulky(256 << 10))
    assert answer["resolves"] == 1
    # The victim's leases in the store: taken over at once, its process being gone.
    assert answer["taken_over"] == answer["dead_holders"] >= 1
    if point == "metadata":
        assert all(answer["reused"])
    assert_no_partial_state(FilesystemStore(tmp_path / "store"), tmp_path / "cache", built=True)
    assert cache_problems(tmp_path / "cache") == []  # the next holders removed the lock files


# --- the cross-process lock ---------------------------------------------------------------

_HOLD = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from nixery_core.cache import BuildCache

    cache_dir, marker, key = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]
    cache = BuildCache(cache_dir)
    with cache.single_flight(key):
        marker.touch()
        print("acquired", flush=True)
        time.sleep(3600)
    """
)


def test_lock_held_by_a_killed_process_is_released(tmp_path: Path, children: Children) -> None:
    """A process SIGKILLed inside single_flight blocks the next one only while it lives."""
    key = "manifest:" + "ab" * 32
    holder = children.start(
        [sys.executable, "-c", _HOLD, str(tmp_path / "cache"), str(tmp_path / "held"), key],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )
    _wait_for(tmp_path / "held", holder)
    waiter = children.start(
        [sys.executable, "-c", _HOLD, str(tmp_path / "cache"), str(tmp_path / "next"), key],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )
    time.sleep(1.0)  # long enough for an unexcluded waiter to start and acquire
    assert not (tmp_path / "next").exists(), "the lock did not exclude the second process"
    _kill(holder)
    _wait_for(tmp_path / "next", waiter, timeout=20.0)
