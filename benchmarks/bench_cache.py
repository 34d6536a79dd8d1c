"""BuildCache benchmarks on real Nix, ratios measured in one run.

(a) a warm manifest hit against a cold build of ``shell/hello``
    (target: at least 1000x faster, under 1 ms median in-process);
(b) build A, then A plus one new package: bytes packed over the bytes of the
    new store paths (target: at most 1.2);
(c) 16 threads asking for the same image: Nix calls counted by the runner
    (target: exactly one build);
(d) a warm hit from a local package set of 40,000 files (target: under 1 ms),
    against the stat walk of every file the hit used to cost (measured in the
    same run with the inotify watch turned off);
(e) a warm hit of a 94-layer image whose blobs are on fake-gcs-server
    (target: within 3x one metadata round trip): blobs checked one after the
    other (the baseline), concurrently (the default), and at most once a
    minute (``BuildCache(recheck_after=60)``).

Run: ``.venv/bin/python benchmarks/bench_cache.py`` (add ``--quick`` for fewer rounds).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from nixery_core.build import BuildResult, build_image
from nixery_core.builder import Builder
from nixery_core.cache import BuildCache
from nixery_core.names import Image
from nixery_core.nixexprs import nix_dir
from nixery_core.runner import SubprocessRunner
from nixery_core.sources import LocalPathSource
from nixery_core.storage.filesystem import FilesystemStore
from nixery_core.testing.runners import (
    FakeFile,
    FakeNix,
    FakePackage,
    RecordingRunner,
    default_fake_packages,
)
from nixery_core.testing.sources import FixedSource
from nixery_core.watch import TreeWatch

OFFLINE = {"substituters": ""}


def median_ms(samples: list[float]) -> float:
    return statistics.median(samples) * 1000


def _salted_offline_set(work: Path, salt: str) -> LocalPathSource:
    """The offline set with every derivation salted: store paths Nix has never built."""
    directory = work / f"salted-{salt}"
    directory.mkdir()
    (directory / "default.nix").write_text(
        "{ system ? builtins.currentSystem, ... }:\n"
        f"import {nix_dir() / 'offline'} {{ inherit system; salt = \"{salt}\"; }}\n"
    )
    return LocalPathSource(directory)


def bench_hit(work: Path, rounds: int) -> None:
    source = LocalPathSource(nix_dir() / "offline")
    image = Image.from_name("shell/hello")
    cold: list[float] = []
    fresh: list[float] = []
    stamp = f"{time.time_ns()}"
    for i in range(max(3, rounds // 200)):
        store = FilesystemStore(work / f"cold{i}")
        start = time.perf_counter()
        build_image(image, source, uploader=store, cache=None, nix_options=OFFLINE)
        cold.append(time.perf_counter() - start)
        salted = _salted_offline_set(work, f"{stamp}-{i}")
        store = FilesystemStore(work / f"fresh{i}")
        start = time.perf_counter()
        build_image(image, salted, uploader=store, cache=None, nix_options=OFFLINE)
        fresh.append(time.perf_counter() - start)
    store = FilesystemStore(work / "warm")
    with BuildCache(work / "warm-cache") as cache:
        build_image(image, source, uploader=store, cache=cache, nix_options=OFFLINE)
        warm: list[float] = []
        for _ in range(rounds):
            start = time.perf_counter()
            result = build_image(image, source, uploader=store, cache=cache, nix_options=OFFLINE)
            warm.append(time.perf_counter() - start)
            assert result.from_cache
    hit = statistics.median(warm)
    print("(a) manifest cache hit vs cold build of shell/hello (offline set)")
    print(f"    cold, nothing built   {median_ms(fresh):9.2f} ms  ({len(fresh)} builds: fresh"
          " store paths, Nix builds 8 derivations)")
    print(f"    cold, Nix store warm  {median_ms(cold):9.2f} ms  ({len(cold)} builds: our cache"
          " empty, Nix has the paths)")
    print(f"    warm hit median       {median_ms(warm):9.3f} ms  ({len(warm)} hits)")
    print(f"    ratio nothing-built/hit {statistics.median(fresh) / hit:7.0f}x"
          "   (target >= 1000x, hit < 1 ms)")
    print(f"    ratio store-warm/hit    {statistics.median(cold) / hit:7.0f}x")


def _nar_sizes(paths: set[str]) -> dict[str, int]:
    if not paths:
        return {}
    out = subprocess.run(
        ["nix", "path-info", "--extra-experimental-features", "nix-command", "--json",
         *sorted(paths)],
        capture_output=True, check=True, text=True,
    ).stdout
    data = json.loads(out)
    items = data if isinstance(data, list) else [{"path": k, **v} for k, v in data.items()]
    return {item["path"]: int(item["narSize"]) for item in items}


def bench_increment(work: Path) -> None:
    synthetic = work / "synthetic"
    synthetic.mkdir()
    # A package set of 41 packages: A is the first 40, then one more joins.
    (synthetic / "default.nix").write_text(
        "{ system ? builtins.currentSystem, ... }:\n"
        f"import {nix_dir() / 'synthetic'} {{ inherit system; count = 41; shape = \"dag\";"
        " seed = 7; minSize = 65536; maxSize = 1048576; }\n"
    )
    source = LocalPathSource(synthetic)
    base = [f"p{i:04d}" for i in range(0, 40, 3)]
    image_a = Image.from_packages(base, always_added=())
    image_b = Image.from_packages([*base, "p0040"], always_added=())
    store = FilesystemStore(work / "inc-store")
    with BuildCache(work / "inc-cache") as cache:
        first = build_image(image_a, source, uploader=store, cache=cache, nix_options=OFFLINE,
                            timeout=600)
        second = build_image(image_b, source, uploader=store, cache=cache, nix_options=OFFLINE,
                             timeout=600)
    before = {p for layer in first.layers for p in layer.paths}
    after = {p for layer in second.layers for p in layer.paths}
    new_paths = after - before
    packed_paths = {p for layer in second.layers if not layer.reused for p in layer.paths}
    sizes = _nar_sizes(after)
    new_bytes = sum(sizes[p] for p in new_paths)
    custom = sum(len(store.read_blob(x.digest)) for x in second.layers
                 if x.kind == "customisation" and not x.reused)
    packed_bytes = sum(sizes[p] for p in packed_paths)
    print("(b) build A, then A plus one package (synthetic set, 41 packages)")
    print(f"    new store paths     {len(new_paths):9d}  ({new_bytes} NAR bytes)")
    print(f"    store layers packed {sum(1 for x in second.layers if not x.reused):9d}"
          f"  ({packed_bytes} NAR bytes, plus the {custom}-byte customisation layer)")
    print(f"    bytes packed / new  {(packed_bytes + custom) / max(new_bytes, 1):9.3f}"
          "   (target <= 1.2)")


def bench_threads(work: Path) -> None:
    source = LocalPathSource(nix_dir() / "offline")
    runner = RecordingRunner(SubprocessRunner())
    store = FilesystemStore(work / "threads")
    results: list[BuildResult] = []
    with BuildCache(work / "threads-cache") as cache:
        barrier = threading.Barrier(16)

        def worker() -> None:
            barrier.wait()
            results.append(build_image(Image.from_name("shell/hello/nano"), source,
                                       runner=runner, uploader=store, cache=cache,
                                       nix_options=OFFLINE))

        threads = [threading.Thread(target=worker) for _ in range(16)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    evaluations = sum(1 for call in runner.calls if call.argv[0] == "nix-instantiate")
    print("(c) 16 threads asking for the same image")
    print(f"    answers             {len(results):9d}  "
          f"({len({r.manifest_digest for r in results})} distinct digest)")
    print(f"    Nix evaluations     {evaluations:9d}   (target: exactly 1)")
    print(f"    Nix calls in all    {len(runner.calls):9d}")


def _big_package_set(root: Path, files: int) -> Path:
    """The offline set's default.nix beside ``files`` small files in 100-file directories."""
    root.mkdir()
    (root / "default.nix").write_text(
        "{ system ? builtins.currentSystem, ... }:\n"
        f"import {nix_dir() / 'offline'} {{ inherit system; }}\n"
    )
    for index in range(files):
        directory = root / "pkgs" / f"d{index // 100:04d}"
        if index % 100 == 0:
            directory.mkdir(parents=True)
        (directory / f"p{index:05d}.nix").write_text(f"{{ }}: {index}\n")
    return root


def _hits(builder: Builder, image: Image, source: object, rounds: int) -> list[float]:
    samples = []
    for _ in range(rounds):
        start = time.perf_counter()
        result = builder.build(image, source)  # type: ignore[arg-type]
        samples.append(time.perf_counter() - start)
        assert result.from_cache
    return samples


def bench_big_local_set(work: Path, rounds: int) -> None:
    root = _big_package_set(work / "big-set", 40_000)
    image = Image.from_name("shell/hello")
    store = FilesystemStore(work / "big-store")
    with BuildCache(work / "big-cache") as cache, Builder(
        uploader=store, cache=cache, nix_options=OFFLINE
    ) as builder:
        watched = LocalPathSource(root)
        start = time.perf_counter()
        builder.build(image, watched)
        first = time.perf_counter() - start
        warm = _hits(builder, image, watched, rounds)
        real_open = TreeWatch.open
        TreeWatch.open = classmethod(lambda cls, root: None)  # type: ignore[method-assign,assignment]
        try:
            walked = LocalPathSource(root)
            builder.build(image, walked)
            walk = _hits(builder, image, walked, max(5, rounds // 50))
        finally:
            TreeWatch.open = real_open  # type: ignore[method-assign]
    print("(d) warm hit from a local package set of 40,000 files")
    print(f"    first build (hashes every file, Nix store warm) {first * 1000:9.1f} ms")
    print(f"    warm hit, stat walk of every file   {median_ms(walk):9.3f} ms  ({len(walk)} hits)")
    print(f"    warm hit, inotify watch             {median_ms(warm):9.3f} ms  ({len(warm)} hits)"
          "   (target < 1 ms)")
    ratio = statistics.median(walk) / statistics.median(warm)
    print(f"    ratio walk/watch                    {ratio:9.0f}x")


def bench_remote_blobs(work: Path, rounds: int) -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
    from servers import FakeGcsServer  # noqa: PLC0415 - the tests' server helper

    from nixery_core.storage.gcs import GcsStore  # noqa: PLC0415 - needs the GCS libraries

    packages = default_fake_packages()
    names = [f"pkg{index:03d}" for index in range(120)]
    for name in names:
        packages[name] = FakePackage({f"share/{name}": FakeFile(name.encode() * 50)})
    fake = FakeNix(work / "fake-root", packages)
    image = Image.from_packages(names, always_added=())
    with FakeGcsServer() as server:
        client = server.client()
        bucket = client.create_bucket("bench-cache-bucket")
        results = {}
        for label, checks, recheck in (
            ("one after the other", 1, 0.0),
            ("concurrently", 10, 0.0),
            ("at most once a minute", 10, 60.0),
        ):
            store = GcsStore(bucket, concurrent_checks=checks)
            with BuildCache(
                work / f"gcs-cache-{checks}-{recheck}", recheck_after=recheck
            ) as cache, Builder(
                runner=fake, uploader=store, cache=cache, store_root=fake.store_root
            ) as builder:
                built = builder.build(image, FixedSource())
                results[label] = _hits(builder, image, FixedSource(), rounds)
            store.close()
        layers = len(built.layers)
        one = []
        for _ in range(rounds):
            start = time.perf_counter()
            store.blob_info(built.manifest_digest)
            one.append(time.perf_counter() - start)
    print(f"(e) warm hit of a {layers}-layer image, blobs on fake-gcs-server"
          f" ({len(set(built.blobs))} blobs checked per hit)")
    print(f"    one metadata round trip             {median_ms(one):9.3f} ms")
    for label, samples in results.items():
        print(f"    hit, blobs checked {label:<20}{median_ms(samples):9.3f} ms"
              f"  = {statistics.median(samples) / statistics.median(one):6.1f}x one round trip")
    print("    (target: within 3x one round trip)")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer rounds")
    parser.add_argument("--only", choices=["a", "b", "c", "d", "e"], action="append",
                        help="run only these parts (repeatable)")
    args = parser.parse_args()
    only = set(args.only or "abcde")
    with tempfile.TemporaryDirectory(prefix="bench-cache-") as tmp:
        work = Path(tmp)
        if "a" in only:
            bench_hit(work, 200 if args.quick else 2000)
        if "b" in only:
            bench_increment(work)
        if "c" in only:
            bench_threads(work)
        if "d" in only:
            bench_big_local_set(work, 200 if args.quick else 1000)
        if "e" in only:
            bench_remote_blobs(work, 20 if args.quick else 50)
    return 0


if __name__ == "__main__":
    sys.exit(main())
