"""End-to-end build cost beyond Nix, on a ~300 MB synthetic image of host files.

Measured in one run, on the same store paths:

1. a cold build (empty cache, empty blob store): total time and Nix's share;
2. packing alone: the same layer groups packed with the same parallelism
   into a discarding sink (what the build cannot avoid);
3. a different image that reuses every layer (another image config, so
   another manifest): its time against the cold build.

Targets: (total - Nix) / packing alone <= 1.5; the reusing image < 5% of the
cold build.

Run: ``.venv/bin/python benchmarks/bench_e2e.py`` (``--count`` and sizes to scale).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from nixery_core.archive import ArchiveOptions, pack_store_paths
from nixery_core.build import build_image
from nixery_core.cache import BuildCache
from nixery_core.image_config import ImageConfig
from nixery_core.names import Image
from nixery_core.nixexprs import SyntheticParams, write_synthetic_set
from nixery_core.sources import LocalPathSource
from nixery_core.storage.filesystem import FilesystemStore

OFFLINE = {"substituters": ""}


def host_store_path(directory: str) -> str:
    """Add a host directory to the Nix store once (hashing it again each evaluation is slow)."""
    return subprocess.run(
        ["nix-store", "--add", directory], capture_output=True, text=True, check=True
    ).stdout.strip()


def one_round(work: Path, args: argparse.Namespace, seed: int, hosts: tuple[str, ...],
              workers: int) -> dict[str, float]:
    params = SyntheticParams(
        count=args.count, shape="dag", seed=seed, mode="host",
        min_size=int(args.min_mb * 1e6), max_size=int(args.max_mb * 1e6),
        host_store_paths=hosts,
    )
    source = LocalPathSource(write_synthetic_set(work / f"set-{seed}", params))
    image = Image.from_packages([f"p{i:04d}" for i in range(args.count)], always_added=())
    store = FilesystemStore(work / f"store-{seed}", durable=False)
    with BuildCache(work / f"cache-{seed}") as cache:
        start = time.perf_counter()
        cold = build_image(image, source, uploader=store, cache=cache,
                           nix_options=OFFLINE, timeout=1800)
        cold_total = time.perf_counter() - start
        groups = [layer.paths for layer in cold.layers if layer.kind == "store"]
        start = time.perf_counter()
        with ThreadPoolExecutor(max_workers=workers) as pool:
            list(pool.map(
                lambda paths: pack_store_paths(paths, lambda _b: None, ArchiveOptions()),
                groups,
            ))
        pack_alone = time.perf_counter() - start
        start = time.perf_counter()
        reuse = build_image(image, source, uploader=store, cache=cache, nix_options=OFFLINE,
                            config=ImageConfig(env={"VARIANT": "b"}))
        reuse_total = time.perf_counter() - start
    assert all(layer.reused for layer in reuse.layers)
    compressed = sum(layer.size for layer in cold.layers)
    print(f"  seed {seed}: {len(groups)} store layers, {compressed / 1e6:.0f} MB compressed;"
          f" cold {cold_total:.2f} s (Nix {cold.timings['nix']:.2f} s, layers"
          f" {cold.timings['layers']:.2f} s); packing alone {pack_alone:.2f} s;"
          f" reusing image {reuse_total:.2f} s")
    return {
        "beyond": (cold_total - cold.timings["nix"]) / pack_alone,
        "reuse": reuse_total / cold_total,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=60, help="packages in the image")
    parser.add_argument("--min-mb", type=float, default=4.0)
    parser.add_argument("--max-mb", type=float, default=6.5)
    parser.add_argument("--rounds", type=int, default=3, help="cold builds, each a fresh seed")
    args = parser.parse_args()
    workers = min(8, os.cpu_count() or 1)
    base = int(time.time())  # fresh seeds: store paths Nix has not built
    print(f"{args.count} packages of {args.min_mb}-{args.max_mb} MB of host files each,"
          f" {workers} packing threads")
    with tempfile.TemporaryDirectory(prefix="bench-e2e-") as tmp:
        hosts = tuple(host_store_path(d) for d in ("/usr/bin", "/usr/lib/x86_64-linux-gnu"))
        rounds = [one_round(Path(tmp), args, base + r, hosts, workers)
                  for r in range(args.rounds)]
    beyond = statistics.median(r["beyond"] for r in rounds)
    reuse = statistics.median(r["reuse"] for r in rounds)
    print(f"beyond Nix / packing alone, median  {beyond:6.2f}   (target <= 1.5)")
    print(f"reusing image / cold build, median  {reuse:6.1%}   (target < 5%)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
