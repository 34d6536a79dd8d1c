"""What the partial-pull proof needs: package-set revisions, a byte-counting proxy, podman.

Shared by ``benchmarks/bench_partial.py`` (figures) and
``tests/test_partial_pull.py`` (the same path, asserted).  Everything runs
on loopback with private state:

* :func:`package_sets` writes the synthetic package set (real host binaries
  and libraries copied into store paths by real Nix, each executable and
  library carrying its dependencies' store paths, see
  ``nix/synthetic/default.nix``) at three revisions: ``v1``, ``leaf`` (a new
  version of a package nothing depends on) and ``low`` (a new version of
  ``p0000``, which every other package depends on, directly or not, so every
  store path of the image changes while most file contents do not);
* :class:`CountingProxy` relays TCP connections to a registry and counts
  the bytes the registry sends back (headers included; with them, per pull,
  the ``400`` a plain-HTTP registry answers podman's TLS probe with: 118
  bytes from the example registry, which logs it as uvicorn's ``Invalid
  HTTP request received.``, see ``docs/operating.md``);
* :class:`PartialPodman` is podman with private storage configured for
  partial pulls (:mod:`benchmarks.private_podman`: overlay driver,
  ``enable_partial_images``, no hard links), which logs ``Retrieved
  partial blob`` per layer it fetched by ranges;
* :func:`compare_rootfs` checks a mounted image file by file against the
  store paths it should hold;
* :func:`changed_store_path_bytes` (the per-store-path floor) and
  :func:`changed_file_bytes` (the compressed bytes of the files whose content
  is new) are the yardsticks.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import shutil
import socket
import stat
import subprocess
import tempfile
import threading
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import attrs

from benchmarks.private_podman import PrivatePodman
from nixery_core.archive import ArchiveOptions, pack_store_paths
from nixery_core.compression import frame_compressor
from nixery_core.nixexprs import SyntheticParams, nix_dir, write_synthetic_set
from nixery_core.runner import tied_to_caller

__all__ = [
    "CountingProxy",
    "DockerRegistry",
    "PartialPodman",
    "Revision",
    "changed_file_bytes",
    "changed_store_path_bytes",
    "closure_of",
    "compare_rootfs",
    "manifest_layers",
    "package_sets",
]


@attrs.frozen
class Revision:
    """One revision of the package set: its directory and the image's package names."""

    name: str
    path: Path
    packages: tuple[str, ...]


def package_sets(
    root: Path,
    *,
    count: int,
    min_size: int,
    max_size: int,
    seed: int,
    host_paths: tuple[str, ...] | None = None,
) -> dict[str, Revision]:
    """The set at ``v1``, with a new leaf (``leaf``) and with a new ``p0000`` (``low``).

    ``host_paths`` are the host directories whose files fill the packages
    (default: the generator's, /usr/bin, /usr/lib/x86_64-linux-gnu and
    /usr/share/doc).
    """
    base = SyntheticParams(
        count=count,
        shape="dag",
        fanout=3,
        seed=seed,
        min_size=min_size,
        max_size=max_size,
        mode="host",
        embed_references=True,
        host_paths=host_paths,
    )
    revisions = {"v1": (), "leaf": ((count - 1, 1),), "low": ((0, 1),)}
    out = {}
    for name, bumped in revisions.items():
        params = attrs.evolve(base, revisions=bumped)
        write_synthetic_set(root / name / "synthetic", params)
        (root / name / "default.nix").write_text(_WITH_ALWAYS_ADDED % nix_dir(), encoding="utf-8")
        out[name] = Revision(name, root / name, params.names)
    return out


#: The synthetic set plus the two packages every image gets (cacert,
#: iana-etc) from the offline set, so images are named as any other.
_WITH_ALWAYS_ADDED = """\
{ system ? builtins.currentSystem, ... }:
import ./synthetic { inherit system; }
// { inherit (import %s/offline { inherit system; }) cacert iana-etc; }
"""


# --- the proxy -----------------------------------------------------------------


class CountingProxy:
    """A loopback TCP relay to ``upstream`` counting the bytes sent back to clients.

    ``upstream`` may be changed between pulls (the example registry serves
    each revision from its own server).  :meth:`take` returns the count so
    far and resets it.
    """

    def __init__(self, upstream: tuple[str, int]) -> None:
        self.upstream = upstream
        self._sock = socket.create_server(("127.0.0.1", 0))
        self.port: int = self._sock.getsockname()[1]
        self._lock = threading.Lock()
        self._down = 0
        self._requests = 0
        self._closed = False
        self._thread = threading.Thread(target=self._accept, name="counting-proxy", daemon=True)

    @property
    def host(self) -> str:
        """``127.0.0.1:PORT`` for image references."""
        return f"127.0.0.1:{self.port}"

    def __enter__(self) -> CountingProxy:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._closed = True
        self._sock.close()

    def take(self) -> tuple[int, int]:
        """(bytes from upstream to clients, connections) since the last call."""
        with self._lock:
            out = (self._down, self._requests)
            self._down = self._requests = 0
        return out

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self._sock.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(self.upstream)
            except OSError:
                client.close()
                continue
            with self._lock:
                self._requests += 1
            done = threading.Semaphore(0)
            for src, dst, count in ((client, upstream, False), (upstream, client, True)):
                threading.Thread(
                    target=self._pipe, args=(src, dst, count, done), daemon=True
                ).start()
            threading.Thread(
                target=self._close_after, args=(done, client, upstream), daemon=True
            ).start()

    @staticmethod
    def _close_after(done: threading.Semaphore, *sockets: socket.socket) -> None:
        """Close a connection's two sockets once both directions have ended."""
        done.acquire()
        done.acquire()
        for sock in sockets:
            sock.close()

    def _pipe(
        self, src: socket.socket, dst: socket.socket, count: bool, done: threading.Semaphore
    ) -> None:
        try:
            while data := src.recv(1 << 16):
                if count:
                    with self._lock:
                        self._down += len(data)
                dst.sendall(data)
        except OSError:
            pass
        finally:
            with contextlib.suppress(OSError):
                dst.shutdown(socket.SHUT_WR)
            done.release()


# --- podman ----------------------------------------------------------------------

_DIGEST = re.compile(r"sha256:[0-9a-f]{64}")


class PartialPodman(PrivatePodman):
    """podman with private storage and partial pulls enabled (no system state touched)."""

    def __init__(self, *, partial: bool = True) -> None:
        super().__init__(partial=partial, prefix="nx-partial-")

    def pull(self, reference: str) -> tuple[int, int]:
        """Pull with debug logs; (layers fetched by ranges, layers that fell back to whole)."""
        log = self.run("--log-level=debug", "pull", "--tls-verify=false", reference).stderr
        partial = len(re.findall(r"Retrieved partial blob", log))
        failed = len(re.findall(r"Failed to retrieve partial blob", log))
        return partial, failed

    @contextlib.contextmanager
    def mounted(self, reference: str) -> Iterator[Path]:
        """The image's root filesystem, mounted for the block."""
        path = Path(self.run("image", "mount", reference).stdout.strip())
        try:
            yield path
        finally:
            self.run("image", "unmount", reference)


# --- checks and yardsticks -----------------------------------------------------------


def _tree(root: Path) -> dict[str, tuple[str, Any]]:
    """relative path -> (kind, content digest / target / None), executable bit in the kind."""
    out: dict[str, tuple[str, Any]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = Path(dirpath) / name
            rel = str(path.relative_to(root))
            st = path.lstat()
            if stat.S_ISLNK(st.st_mode):
                out[rel] = ("symlink", str(path.readlink()))
            elif stat.S_ISDIR(st.st_mode):
                out[rel] = ("dir", None)
            else:
                kind = "exec" if st.st_mode & stat.S_IXUSR else "file"
                out[rel] = (kind, hashlib.sha256(path.read_bytes()).hexdigest())
    return out


def compare_rootfs(rootfs: Path, store_paths: Iterable[str]) -> list[str]:
    """Store paths whose tree in ``rootfs`` differs from the real store's (first difference)."""
    problems = []
    for path in sorted(store_paths):
        want = _tree(Path(path)) if Path(path).is_dir() else {}
        got_root = rootfs / path.lstrip("/")
        got = _tree(got_root) if got_root.is_dir() else {}
        if want != got:
            diff = sorted(set(want.items()) ^ set(got.items()))
            problems.append(f"{path}: {len(diff)} differences, first {diff[:1]}")
    return problems


def changed_store_path_bytes(old: Iterable[str], new: Iterable[str]) -> int:
    """The per-store-path floor: gzip layer bytes of each path ``new`` has and ``old`` lacks."""
    old_set = set(old)
    total = 0
    for path in sorted(set(new) - old_set):
        total += pack_store_paths([path], _null_write, ArchiveOptions()).size
    return total


def _null_write(_data: bytes) -> None:
    return None


def _files(paths: Iterable[str]) -> Iterator[Path]:
    for path in paths:
        for dirpath, _dirs, filenames in os.walk(path):
            for name in filenames:
                file = Path(dirpath) / name
                if file.is_file() and not file.is_symlink():
                    yield file


def changed_file_bytes(old: Iterable[str], new: Iterable[str], options: ArchiveOptions) -> int:
    """Compressed bytes (one frame each) of ``new``'s files whose content ``old`` lacks."""
    known = {hashlib.sha256(f.read_bytes()).digest() for f in _files(old)}
    compress = frame_compressor(options.compressor())
    total = 0
    seen: set[bytes] = set()
    for file in _files(new):
        data = file.read_bytes()
        digest = hashlib.sha256(data).digest()
        if digest in known or digest in seen:
            continue
        seen.add(digest)
        total += len(compress(data))
    return total


def closure_of(layers: Sequence[Any]) -> set[str]:
    """Every store path the built layers hold."""
    return {path for layer in layers for path in layer.paths}


def manifest_layers(manifest: Mapping[str, Any]) -> list[tuple[str, int]]:
    """(digest, size) of each layer a manifest names."""
    return [(layer["digest"], int(layer["size"])) for layer in manifest["layers"]]


# --- docker-registry -------------------------------------------------------------


class DockerRegistry:
    """Debian's ``docker-registry`` (distribution 2.8) on a free loopback port, temp storage.

    Its blob responses come from Go's ``http.ServeContent``: ``Range`` and
    multi-range requests (``multipart/byteranges``) are honoured.
    """

    def __init__(self) -> None:
        self.workdir = Path(tempfile.mkdtemp(prefix="nx-registry-"))
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.port: int = probe.getsockname()[1]
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    def __enter__(self) -> DockerRegistry:
        config = self.workdir / "config.yml"
        config.write_text(
            "version: 0.1\nlog:\n  level: error\nstorage:\n  filesystem:\n"
            f"    rootdirectory: {self.workdir / 'data'}\n  delete:\n    enabled: true\n"
            f"http:\n  addr: 127.0.0.1:{self.port}\n"
        )
        with (self.workdir / "log").open("ab") as log:
            self._proc = subprocess.Popen(
                tied_to_caller(["docker-registry", "serve", str(config)]),
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        import time  # noqa: PLC0415 - only the readiness wait needs it
        import urllib.request  # noqa: PLC0415 - only the readiness wait needs it

        deadline = time.monotonic() + 30
        while True:
            try:
                with urllib.request.urlopen(f"http://{self.host}/v2/", timeout=2):
                    return self
            except OSError:
                if time.monotonic() > deadline or self._proc.poll() is not None:
                    self.__exit__()
                    raise RuntimeError("docker-registry did not start") from None
                time.sleep(0.1)

    def __exit__(self, *exc: object) -> None:
        if self._proc is not None:
            self._proc.kill()
            self._proc.wait(timeout=10)
            self._proc = None
        shutil.rmtree(self.workdir, ignore_errors=True)
