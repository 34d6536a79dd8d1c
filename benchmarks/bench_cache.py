"""BuildCache benchmarks on real Nix, ratios measured in one run.

(a) a warm manifest hit against a cold build of ``shell/hello``
    (target: at least 1000x faster, under 1 ms median in-process);
(b) build A, then A plus one new package: bytes packed over the bytes of the
    new store paths (target: at most 1.2);
(c) 16 threads asking for the same image: Nix calls counted by the runner
    (target: exactly one build).

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
from nixery_core.cache import BuildCache
from nixery_core.names import Image
from nixery_core.nixexprs import nix_dir
from nixery_core.runner import SubprocessRunner
from nixery_core.sources import LocalPathSource
from nixery_core.storage.filesystem import FilesystemStore
from nixery_core.testing.runners import RecordingRunner

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


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer rounds")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-cache-") as tmp:
        work = Path(tmp)
        bench_hit(work, 200 if args.quick else 2000)
        bench_increment(work)
        bench_threads(work)
    return 0


if __name__ == "__main__":
    sys.exit(main())
