"""Partial pulls with podman: bytes fetched for an update, eStargz and zstd:chunked against gzip.

Issue "Pull only what changed: file-granular layers (eStargz, zstd:chunked)
that beat the per-path floor".

Images are built with real Nix from a synthetic package set made of the
host's own binaries, libraries and documents (``nix/synthetic``, ``host``
mode, every executable and library carrying its dependencies' store paths
after its first 512 bytes, as a RUNPATH or shebang does), at three
revisions (:func:`benchmarks.partial_harness.package_sets`):

* ``v1``;
* ``leaf``: a new version of the one package nothing depends on;
* ``low``: a new version of ``p0000``, which every other package depends on
  (directly or not): every store path of the image gets a new hash, while a
  file's content changes only where a store path is embedded.

For each format (gzip, eStargz, zstd:chunked) and case, ``v1`` and the
case's revision are pushed to Debian's ``docker-registry`` (Go's
``http.ServeContent``, so ``Range`` and multi-range requests work) and, with
``--example-registry``, served by the example registry building on demand;
podman with partial pulls enabled (private storage, overlay driver) pulls
``v1`` then the update through a byte-counting proxy on loopback.  The
update's root filesystem is checked file by file against the store.

Printed per case and format: bytes fetched for the update; the same update
as gzip layers (whole-layer pull, measured the same way); the per-store-path
floor (gzip bytes of the store paths that changed, each packed alone: what
one layer per store path would fetch); the compressed bytes of the files
whose content is new (each compressed alone as the format compresses a
frame).  Targets: a low-level change fetches at most 0.25x the per-path
floor; a leaf change at most 1.2x the changed files' compressed bytes; the
first pull at most 1.15x the gzip image's bytes.

Run as root from the repository root (podman mounts overlays)::

    .venv/bin/python -m benchmarks.bench_partial                 # 30 packages, ~60 MB
    .venv/bin/python -m benchmarks.bench_partial --quick         # 8 packages from /usr/sbin
    .venv/bin/python -m benchmarks.bench_partial --example-registry
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import attrs

from benchmarks.partial_harness import (
    CountingProxy,
    DockerRegistry,
    PartialPodman,
    Revision,
    changed_file_bytes,
    changed_store_path_bytes,
    closure_of,
    compare_rootfs,
    package_sets,
)
from nixery_core.archive import ArchiveOptions
from nixery_core.build import build_image
from nixery_core.names import Image
from nixery_core.registry_push import push_image
from nixery_core.results import BuildResult
from nixery_core.sources import LocalPathSource
from nixery_core.storage.filesystem import FilesystemStore

MB = 1_000_000
FORMATS = ("estargz", "zstd-chunked")
CASES = ("leaf", "low")


@attrs.frozen
class Pulls:
    """Bytes the registry sent podman for the first pull and for the update."""

    first: int
    update: int
    partial_layers: int
    whole_layers: int
    rootfs_problems: tuple[str, ...]


@attrs.frozen
class CaseResult:
    """One case and format: what podman fetched, and the yardsticks."""

    case: str
    compression: str
    source: str
    pulls: Pulls
    gzip: Pulls
    floor: int
    changed_files: int

    @property
    def first_over_gzip(self) -> float:
        return self.pulls.first / self.gzip.first

    @property
    def update_over_floor(self) -> float:
        return self.pulls.update / self.floor

    @property
    def update_over_changed_files(self) -> float:
        return self.pulls.update / self.changed_files


class Images:
    """Builds (and remembers) each revision's image in each compression into one store."""

    def __init__(self, work: Path, revisions: dict[str, Revision]) -> None:
        self.store = FilesystemStore(work / "store")
        self.revisions = revisions
        self._built: dict[tuple[str, str], BuildResult] = {}

    def image(self, revision: str) -> Image:
        return Image.from_name("/".join(self.revisions[revision].packages), tag=revision)

    def get(self, revision: str, compression: str) -> BuildResult:
        key = (revision, compression)
        if key not in self._built:
            self._built[key] = build_image(
                self.image(revision),
                LocalPathSource(self.revisions[revision].path),
                uploader=self.store,
                archive=ArchiveOptions(compression=compression),  # type: ignore[arg-type]
                nix_options={"substituters": ""},
                timeout=3600,
            )
        return self._built[key]


def pull_pair(
    proxy: CountingProxy,
    references: Sequence[str],
    v2: BuildResult,
    upstreams: Sequence[tuple[str, int]] | None = None,
) -> Pulls:
    """A fresh podman pulls ``references[0]`` then ``[1]``; the update's rootfs is checked."""
    podman = PartialPodman()
    try:
        counts = []
        partial = whole = 0
        for index, reference in enumerate(references):
            if upstreams is not None:
                proxy.upstream = upstreams[index]
            proxy.take()
            fetched, failed = podman.pull(f"{proxy.host}/{reference}")
            counts.append(proxy.take()[0])
            if index == 1:
                partial, whole = fetched, failed
        with podman.mounted(f"{proxy.host}/{references[1]}") as root:
            problems = tuple(compare_rootfs(root, closure_of(v2.layers)))
    finally:
        podman.close()
    return Pulls(counts[0], counts[1], partial, whole, problems)


def run_docker_registry(
    images: Images, compressions: Sequence[str], cases: Sequence[str]
) -> list[CaseResult]:
    """Every case and format through docker-registry (pushed with nixery-core)."""
    results = []
    with DockerRegistry() as registry, CountingProxy(("127.0.0.1", registry.port)) as proxy:
        for case in cases:
            pushed: dict[str, tuple[str, str]] = {}
            for compression in ("gzip", *compressions):
                repo = f"{case}-{compression}"
                for revision, tag in (("v1", "v1"), (case, "v2")):
                    built = images.get(revision, compression)
                    push_image(
                        store=images.store,
                        manifest=built.manifest,
                        manifest_media_type=built.manifest_media_type,
                        target=f"{registry.host}/{repo}:{tag}",
                        insecure=True,
                        referrers=False,
                    )
                pushed[compression] = (f"{repo}:v1", f"{repo}:v2")
            v1, v2 = images.get("v1", "gzip"), images.get(case, "gzip")
            gzip = pull_pair(proxy, pushed["gzip"], v2)
            floor = changed_store_path_bytes(closure_of(v1.layers), closure_of(v2.layers))
            for compression in compressions:
                pulls = pull_pair(proxy, pushed[compression], images.get(case, compression))
                changed = changed_file_bytes(
                    closure_of(v1.layers),
                    closure_of(v2.layers),
                    ArchiveOptions(compression=compression),  # type: ignore[arg-type]
                )
                results.append(
                    CaseResult(case, compression, "docker-registry", pulls, gzip, floor, changed)
                )
    return results


@contextlib.contextmanager
def _example_registry(work: Path, revision: Revision, compression: str) -> Iterator[int]:
    from examples.registry import RegistryConfig, create_app, serving  # noqa: PLC0415

    config = RegistryConfig(
        source=LocalPathSource(revision.path),
        store=FilesystemStore(work / f"registry-{revision.name}-{compression}"),
        nix_options={"substituters": ""},
        archive=ArchiveOptions(compression=compression),  # type: ignore[arg-type]
        timeout=3600,
    )
    with serving(create_app(config)) as base:
        yield int(base.rsplit(":", 1)[1])


def run_example_registry(
    work: Path,
    images: Images,
    compressions: Sequence[str],
    cases: Sequence[str],
    docker_results: Sequence[CaseResult],
) -> list[CaseResult]:
    """The same pulls from the example registry (one server per revision, same image name)."""
    results = []
    yardsticks = {(r.case, r.compression): r for r in docker_results}
    name = "/".join(images.revisions["v1"].packages)
    for case in cases:
        for compression in compressions:
            with (
                _example_registry(work, images.revisions["v1"], compression) as port1,
                _example_registry(work, images.revisions[case], compression) as port2,
                CountingProxy(("127.0.0.1", port1)) as proxy,
            ):
                pulls = pull_pair(
                    proxy,
                    (f"{name}:latest", f"{name}:latest"),
                    images.get(case, compression),
                    upstreams=(("127.0.0.1", port1), ("127.0.0.1", port2)),
                )
            base = yardsticks[(case, compression)]
            results.append(attrs.evolve(base, source="example registry", pulls=pulls))
    return results


def report(results: Sequence[CaseResult]) -> list[str]:
    """The table and the targets, as printed lines."""
    lines = [
        f"{'source':<17} {'case':<5} {'format':<13} {'1st pull':>9} {'update':>9} "
        f"{'gzip upd':>9} {'floor':>9} {'chg files':>9}  upd/floor upd/files 1st/gzip "
        "ranges/whole rootfs",
    ]
    lines.extend(
        f"{r.source:<17} {r.case:<5} {r.compression:<13} {r.pulls.first / MB:8.2f}M "
        f"{r.pulls.update / MB:8.2f}M {r.gzip.update / MB:8.2f}M {r.floor / MB:8.2f}M "
        f"{r.changed_files / MB:8.2f}M  {r.update_over_floor:9.3f} "
        f"{r.update_over_changed_files:9.3f} {r.first_over_gzip:8.3f} "
        f"{r.pulls.partial_layers:>6}/{r.pulls.whole_layers:<5} "
        f"{'ok' if not r.pulls.rootfs_problems else 'DIFFERS'}"
        for r in results
    )
    lines.append("")
    lines.append("targets:")
    for r in results:
        label = f"{r.source} {r.case} {r.compression}"
        if r.case == "low":
            lines.append(_check(f"{label}: update / per-path floor", r.update_over_floor, 0.25))
        else:
            lines.append(
                _check(f"{label}: update / changed files", r.update_over_changed_files, 1.2)
            )
        lines.append(_check(f"{label}: first pull / gzip image", r.first_over_gzip, 1.15))
    return lines


def _check(label: str, value: float, target: float) -> str:
    verdict = "PASS" if value <= target else "MISS"
    return f"  {verdict}  {label}: {value:.3f} (target <= {target})"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n", 1)[0])
    parser.add_argument("--count", type=int, default=30, help="packages (default 30)")
    parser.add_argument("--min-size", type=int, default=500_000)
    parser.add_argument("--max-size", type=int, default=3_000_000)
    parser.add_argument("--seed", type=int, default=11, help="the package set's seed")
    parser.add_argument("--host-path", action="append", help="host directories to copy from")
    parser.add_argument("--quick", action="store_true", help="8 packages from /usr/sbin")
    parser.add_argument(
        "--example-registry", action="store_true", help="also pull from the example registry"
    )
    parser.add_argument("--work", type=Path, help="keep stores and sets here")
    args = parser.parse_args(argv)
    if args.quick:
        args.count, args.min_size, args.max_size = 8, 200_000, 800_000
        args.host_path = args.host_path or ["/usr/sbin"]
    if os.geteuid() != 0:
        print("bench_partial needs root (podman mounts overlay file systems)", file=sys.stderr)
        return 2
    os.environ["NIX_CONFIG"] = "substituters =\nsandbox = false\n" + os.environ.get(
        "NIX_CONFIG", ""
    )
    with contextlib.ExitStack() as stack:
        work = args.work or Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="bp-")))
        work.mkdir(parents=True, exist_ok=True)
        return _run(work, args)


def _run(work: Path, args: argparse.Namespace) -> int:
    start = time.perf_counter()
    host_paths = tuple(args.host_path) if args.host_path else None
    revisions = package_sets(
        work / "sets",
        count=args.count,
        min_size=args.min_size,
        max_size=args.max_size,
        seed=args.seed,
        host_paths=host_paths,
    )
    images = Images(work, revisions)
    print(
        f"building {args.count} packages x 3 revisions with Nix (seed {args.seed}) ...", flush=True
    )
    v1 = images.get("v1", "gzip")
    closure = closure_of(v1.layers)
    print(
        f"  v1: {len(closure)} store paths, {len(v1.layers)} layers, "
        f"{sum(layer.size for layer in v1.layers) / MB:.1f} MB as gzip; "
        f"{time.perf_counter() - start:.0f} s"
    )
    for case in CASES:
        changed = closure_of(images.get(case, "gzip").layers) - closure
        print(f"  {case}: {len(changed)} of {len(closure)} store paths changed")
    results = run_docker_registry(images, FORMATS, CASES)
    if args.example_registry:
        results += run_example_registry(work, images, FORMATS, CASES, results)
    print()
    for line in report(results):
        print(line)
    print(f"\n{time.perf_counter() - start:.0f} s in all")
    for r in results:
        for problem in r.pulls.rootfs_problems:
            print(f"rootfs {r.source} {r.case} {r.compression}: {problem}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
