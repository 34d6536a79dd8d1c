"""What the integrity checks cost, as ratios against a baseline run in the same process.

(a) a warm manifest hit on a FilesystemStore: the size check (one stat per
    blob, ``blob_size``) against the existence check it replaced
    (``has_blob``, also one stat per blob), and the one-off schema check of
    an entry read from disk (``record_blob_sizes``) against the JSON parse
    alone;
(b) ``verify_store`` re-hashing a store of ``--mb`` MB of random blobs
    against reading the same files and hashing them in a plain loop.

Run: ``.venv/bin/python benchmarks/bench_integrity.py [--mb 256] [--rounds 5]``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from nixery_core.build import build_image
from nixery_core.cache import BuildCache
from nixery_core.names import Image
from nixery_core.record_schema import record_blob_sizes
from nixery_core.storage.filesystem import FilesystemStore
from nixery_core.testing.runners import FakeNix, default_fake_packages
from nixery_core.testing.sources import FixedSource
from nixery_core.verify import verify_store


def per_call(fn: Callable[[], object], calls: int, rounds: int) -> float:
    """Median seconds per call over ``rounds`` rounds of ``calls`` calls."""
    samples = []
    for _ in range(rounds):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        samples.append((time.perf_counter() - start) / calls)
    return statistics.median(samples)


def bench_hits(work: Path, rounds: int) -> None:
    fake = FakeNix(work / "nix", default_fake_packages())
    store = FilesystemStore(work / "store", durable=False)
    with BuildCache(work / "cache") as cache:
        result = build_image(
            Image.from_name("shell/hello"), FixedSource(), runner=fake, uploader=store,
            cache=cache, store_root=fake.store_root,
        )
        blobs = result.blobs
        raw = store.get_object(f"manifests/{result.cache_key}")
        assert raw is not None
        exists = per_call(lambda: all(store.has_blob(d) for d in blobs), 2000, rounds)
        sizes = per_call(lambda: all(store.blob_size(d) is not None for d in blobs), 2000, rounds)
        hit = per_call(lambda: cache.get_manifest(store, result.cache_key), 2000, rounds)
        parse = per_call(lambda: json.loads(raw), 2000, rounds)
        schema = per_call(lambda: record_blob_sizes(json.loads(raw)["body"]), 2000, rounds)
    print(f"(a) warm manifest hit, {len(blobs)} blobs, FilesystemStore")
    print(f"    has_blob, every blob (old)    {exists * 1e6:8.1f} us")
    print(f"    blob_size, every blob (new)   {sizes * 1e6:8.1f} us   ratio {sizes / exists:5.2f}x")
    print(f"    whole memoised local hit      {hit * 1e6:8.1f} us")
    print(f"    entry JSON parse (baseline)   {parse * 1e6:8.1f} us")
    print(f"    parse + record_blob_sizes     {schema * 1e6:8.1f} us   ratio {schema / parse:5.2f}x"
          "  (per entry read from disk or bucket)")


def bench_verify(work: Path, megabytes: int, rounds: int) -> None:
    store = FilesystemStore(work / "vstore", durable=False)
    blob_size = 8 << 20
    for i in range(max(1, megabytes * (1 << 20) // blob_size)):
        data = os.urandom(blob_size // 2) + hashlib.sha256(b"%d" % i).digest() * (blob_size // 64)
        store.put_blob(data, "application/octet-stream")
    files = [store.blob_path(info.digest) for info in store.list_blobs()]

    def plain() -> None:
        for path in files:
            digest = hashlib.sha256()
            with path.open("rb") as stream:
                while chunk := stream.read(1 << 20):
                    digest.update(chunk)

    plain()  # warm the page cache for both
    baseline = per_call(plain, 1, rounds)
    verified = per_call(lambda: verify_store(store), 1, rounds)
    total = sum(path.stat().st_size for path in files)
    print(f"(b) verify_store over {len(files)} blobs, {total / 1e6:.0f} MB (page cache warm)")
    print(f"    read + sha256 loop (baseline)   {total / baseline / 1e6:8.0f} MB/s")
    print(f"    verify_store                    {total / verified / 1e6:8.0f} MB/s"
          f"   ratio {verified / baseline:5.2f}x the time")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=int, default=256, help="store size for (b)")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-integrity-") as tmp:
        bench_hits(Path(tmp), args.rounds)
        bench_verify(Path(tmp), args.mb, args.rounds)


if __name__ == "__main__":
    main()
