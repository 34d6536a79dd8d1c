"""The bucket tier of fragments: a second instance's pack with a warm bucket, against a cold one.

Issue 18, "fragments are cached ... optionally in the bucket".  Builds the
corpus of :mod:`benchmarks.bench_pack` (installed Debian packages as fake
store paths, ``--size-mb``), starts fake-gcs-server (the real GCS JSON API
on loopback) and plays two instances that share only the bucket:

1. instance A packs the corpus as ``--layers`` round-robin layers with the
   bucket tier on, and its uploads finish (untimed; once per bucket): one
   bucket where fragments under 128 KiB stay local (the default), one where
   every fragment is uploaded (``min_size=0``);
2. instance B, with an *empty* local fragment cache each run, packs the
   same store paths as ``--layers`` contiguous layers (another grouping),
   timed: *cold* (no bucket tier: every path compressed, what B does
   without it), *warm bucket* (default threshold) and *warm bucket, every
   fragment*.

Reported per row: best wall time of ``--repeats`` runs (interleaved), the
CPU seconds of this process in that run (packing, inflating, checking,
HTTP), the CPU seconds fake-gcs-server spent in it (from
``/proc/<pid>/stat``), store paths compressed (local misses) and fetched.
Every row's layer digests must equal the cold row's (checked, printed).

A second table prices one fragment, on one thread: 60 store paths of about
200 KiB of word-like text each (about 110 KiB compressed), CPU milliseconds
per path to pack it without any cache, to fetch it from the bucket into the
local cache (three requests and the checks), to assemble it from the local
cache afterwards (process CPU: every thread), and to look up a key the
bucket does not have; for ISA-L
at its default level and zlib at level 6.  This is what ``min_size`` is
chosen from.

For each bucket instance A filled, also printed: the bytes its fragments
take in the bucket (the blobs its pointers name), those of chunked layers'
TOC parts apart, and the CPU seconds its upload thread spent (thread time,
every upload job: reading the local copy, compressing a TOC part, hashing,
HTTP).  ``--fill-only`` prints only these (no instance B, no per-fragment
table): for a chunked format, what sharing TOC parts costs.

Run from the repository root::

    .venv/bin/python -m benchmarks.bench_fragment_bucket              # 100 MB corpus
    .venv/bin/python -m benchmarks.bench_fragment_bucket --size-mb 40 --repeats 2
    .venv/bin/python -m benchmarks.bench_fragment_bucket --compression estargz --fill-only
"""

from __future__ import annotations

import argparse
import hashlib
import os
import random
import resource
import shutil
import sys
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import attrs

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))

from servers import FakeGcsServer  # noqa: E402 - tests/ is put on the path just above

from benchmarks.bench_pack import MB, build_corpus, in_work_dir, tar_size, warm  # noqa: E402 - as above
from nixery_core.archive import ArchiveOptions, pack_store_paths  # noqa: E402 - as above
from nixery_core.fragment_bucket import (  # noqa: E402 - as above
    BucketFragments,
    FragmentBucketPolicy,
    FragmentPointer,
    fragment_object_key,
)
from nixery_core.fragment_toc import toc_part_parameters  # noqa: E402 - as above
from nixery_core.fragments import FragmentCache, FragmentSource, fragment_key  # noqa: E402
from nixery_core.storage.gcs import GcsStore  # noqa: E402 - as above


@attrs.frozen
class Row:
    name: str
    seconds: float
    cpu: float
    server_cpu: float
    compressed: int
    fetched: int
    digests: tuple[str, ...]


def _cpu_self() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _cpu_of(pid: int) -> float:
    """User + system seconds of a running process (fields 14 and 15 of /proc/<pid>/stat)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _server_pid(server: FakeGcsServer) -> int:
    process: Any = server._process._proc  # the emulator's Popen (setpriv execs it in place)
    return int(process.pid)


#: The archive options every pack uses (set from the command line).
OPTIONS = [ArchiveOptions()]


def pack_layers(
    root: Path, groups: Sequence[Sequence[str]], source: FragmentSource
) -> tuple[str, ...]:
    """Pack each group as one layer, in parallel threads as a build does; their digests."""
    options = OPTIONS[0]

    def one(paths: Sequence[str]) -> str:
        digest = hashlib.sha256()
        return pack_store_paths(
            paths, digest.update, options, store_root=root, fragments=source, threads=1
        ).digest

    with ThreadPoolExecutor(len(groups)) as pool:
        return tuple(pool.map(one, groups))


@attrs.frozen
class Filled:
    """What instance A put in a bucket: fragments uploaded, their blobs' bytes (chunked
    layers' TOC parts apart) and the upload thread's CPU seconds."""

    uploaded: int
    blob_bytes: int
    toc_parts: int
    toc_bytes: int
    upload_cpu: float


class _TimedUploads(BucketFragments):
    """A bucket tier adding up the thread time of its upload jobs."""

    cpu = 0.0

    def _run(self, *job: Any) -> None:
        start = time.thread_time()
        try:
            super()._run(*job)
        finally:
            _TimedUploads.cpu += time.thread_time() - start


def fill_bucket(root: Path, work: Path, groups: Sequence[Sequence[str]], bucket: GcsStore,
                policy: FragmentBucketPolicy) -> Filled:
    """Instance A: pack ``groups`` with the bucket tier and wait for its uploads."""
    directory = work / f"instance-a-{policy.min_size}"
    _TimedUploads.cpu = 0.0
    with FragmentCache(directory) as local, _TimedUploads(local, bucket, policy) as tier:
        pack_layers(root, groups, tier)
        tier.flush()
        uploaded = tier.stats.uploaded
    shutil.rmtree(directory)
    parameters = toc_part_parameters(OPTIONS[0].parameters())
    parts = {
        fragment_object_key(fragment_key(os.fsencode(root / path.lstrip("/")), parameters))
        for group in groups for path in group
    }
    blob_bytes = toc_parts = toc_bytes = 0
    for name in bucket.list_objects("fragments/"):
        raw = bucket.get_object(name)
        if raw is None:
            continue
        size = FragmentPointer.from_json(raw).size
        blob_bytes += size
        if name in parts:
            toc_parts += 1
            toc_bytes += size
    return Filled(uploaded, blob_bytes, toc_parts, toc_bytes, _TimedUploads.cpu)


def instance_b(
    name: str, root: Path, work: Path, groups: Sequence[Sequence[str]], *,
    bucket: GcsStore | None, policy: FragmentBucketPolicy | None, server_pid: int,
) -> Row:
    """One timed pack by a fresh instance B (empty local cache)."""
    directory = work / "instance-b"
    shutil.rmtree(directory, ignore_errors=True)
    local = FragmentCache(directory)
    tier = BucketFragments(local, bucket, policy) if bucket is not None and policy else None
    source: FragmentSource = tier if tier is not None else local
    cpu, server = _cpu_self(), _cpu_of(server_pid)
    start = time.perf_counter()
    try:
        digests = pack_layers(root, groups, source)
        seconds = time.perf_counter() - start
        cpu, server = _cpu_self() - cpu, _cpu_of(server_pid) - server
        fetched = tier.stats.hits if tier is not None else 0
        compressed = local.misses
    finally:
        if tier is not None:
            tier.close()
        local.close()
    return Row(name, seconds, cpu, server, compressed, fetched, digests)


def _word_paths(root: Path, count: int) -> list[str]:
    rnd = random.Random(18)
    words = [
        bytes(rnd.choice(b"abcdefghijklmnopqrstuvwxyz") for _ in range(rnd.randint(2, 9)))
        for _ in range(5000)
    ]
    paths = []
    for i in range(count):
        path = f"/nix/store/{i:032d}-words-{i}"
        directory = root / path.lstrip("/")
        directory.mkdir(parents=True, exist_ok=True)
        (directory / "text").write_bytes(b" ".join(rnd.choice(words) for _ in range(36000)))
        paths.append(path)
    return paths


def per_fragment(work: Path, server: FakeGcsServer) -> None:
    """CPU milliseconds per store path: pack, fetch, assemble from local, look up a miss."""
    root = work / "words"
    paths = _word_paths(root, 60)
    one = FragmentBucketPolicy(min_size=0, threads=1)
    print(f"\nper fragment, one thread, {len(paths)} paths of ~200 KiB text (CPU ms per path):")
    print(f"{'compressor':24} {'compressed':>10} {'pack':>7} {'fetch':>7} {'assemble':>9} "
          f"{'miss lookup':>12}")
    for label, options in (
        ("ISA-L, default level", ArchiveOptions()),
        ("zlib, level 6", ArchiveOptions(gzip_backend="zlib", level=6)),
    ):
        bucket = GcsStore(server.make_bucket(f"per-fragment-{options.compressor().level}"))
        keys = [
            fragment_key(os.fsencode(root / path.lstrip("/")), options.parameters())
            for path in paths
        ]
        misses = [fragment_key(f"/absent/{i}".encode(), {}) for i in range(len(paths))]
        with FragmentCache(work / "pf-a") as local, BucketFragments(local, bucket, one) as tier:
            pack_store_paths(paths, _discard, options, store_root=root, fragments=tier, threads=1)
        start = time.process_time()
        packed = pack_store_paths(paths, _discard, options, store_root=root, threads=1)
        pack = time.process_time() - start
        with FragmentCache(work / "pf-b") as local, BucketFragments(local, bucket, one) as tier:
            start = time.process_time()
            tier.prefetch(keys)
            tier.flush()  # the fetches, and the touch of each blob fetched
            fetch = time.process_time() - start
            start = time.process_time()
            pack_store_paths(paths, _discard, options, store_root=root, fragments=tier, threads=1)
            assemble = time.process_time() - start
            start = time.process_time()
            tier.prefetch(misses)
            tier.flush()
            lookup = time.process_time() - start
            assert (tier.stats.hits, local.misses) == (len(paths), 0)
        for name in ("pf-a", "pf-b"):
            shutil.rmtree(work / name)
        ms = 1000 / len(paths)
        print(f"{label:24} {packed.size / len(paths) / 1024:7.0f} KiB {pack * ms:7.2f} "
              f"{fetch * ms:7.2f} {assemble * ms:9.2f} {lookup * ms:12.2f}")


def _discard(data: bytes) -> None:
    del data


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size-mb", type=int, default=100, help="corpus size (default 100)")
    parser.add_argument("--layers", type=int, default=4, help="layers per grouping (default 4)")
    parser.add_argument("--repeats", type=int, default=3, help="runs per row; best kept")
    parser.add_argument("--compression", choices=["gzip", "zstd", "estargz", "zstd-chunked"],
                        default="gzip")
    parser.add_argument("--fill-only", action="store_true",
                        help="only instance A's uploads: bucket bytes, upload thread CPU")
    parser.add_argument("--level", type=int, help="compression level (default: the backend's)")
    parser.add_argument("--gzip-backend", choices=["auto", "zlib"], default="auto",
                        help="auto: ISA-L (default); zlib: Python's zlib")
    parser.add_argument("--workdir", help="keep the corpus here (default: a temp dir, removed)")
    args = parser.parse_args(argv)
    OPTIONS[0] = ArchiveOptions(
        compression=args.compression, level=args.level, gzip_backend=args.gzip_backend
    )
    keep = Path(args.workdir) if args.workdir else None
    return in_work_dir(keep, "bench-fb-", lambda work: _run(work, args))


def _run(work: Path, args: argparse.Namespace) -> int:
    root = work / "corpus"
    paths = build_corpus(root, args.size_mb)
    n = args.layers
    round_robin = [paths[i::n] for i in range(n)]
    size = -(-len(paths) // n)
    contiguous = [paths[i : i + size] for i in range(0, len(paths), size)]
    tar_bytes = tar_size(root, paths)
    default, every = FragmentBucketPolicy(), FragmentBucketPolicy(min_size=0)
    with FakeGcsServer() as server:
        pid = _server_pid(server)
        buckets = {
            policy.min_size: GcsStore(server.make_bucket(f"fragments-{policy.min_size}"))
            for policy in (default, every)
        }
        warm(root, paths)
        filled = {
            policy.min_size: fill_bucket(root, work, round_robin, buckets[policy.min_size], policy)
            for policy in (default, every)
        }
        load = os.getloadavg()[0]
        print(f"{len(paths)} store paths, {tar_bytes / MB:.0f} MB of tar, {n} layers, "
              f"{OPTIONS[0].compressor().parameters()}; load average {load:.1f}")
        print(f"{'instance A fills a bucket':36} {'uploaded':>9} {'blob MB':>8} "
              f"{'TOC parts':>10} {'TOC MB':>7} {'upload CPU':>11}")
        for shared in (default, every):
            fill = filled[shared.min_size]
            label = f"fragments >= {shared.min_size >> 10} KiB"
            print(f"{label:36} {fill.uploaded:9d} "
                  f"{fill.blob_bytes / MB:8.2f} {fill.toc_parts:10d} {fill.toc_bytes / MB:7.2f} "
                  f"{fill.upload_cpu:10.2f}s")
        if args.fill_only:
            return 0
        uploaded = {size: fill.uploaded for size, fill in filled.items()}
        rows: dict[str, Row] = {}
        contenders: list[tuple[str, GcsStore | None, FragmentBucketPolicy | None]] = [
            ("cold (no bucket tier)", None, None),
            ("warm bucket, fragments >= 128 KiB", buckets[default.min_size], default),
            ("warm bucket, every fragment", buckets[every.min_size], every),
        ]
        for _ in range(args.repeats):
            for name, bucket, policy in contenders:
                warm(root, paths)
                row = instance_b(name, root, work, contiguous, bucket=bucket, policy=policy,
                                 server_pid=pid)
                if name not in rows or row.seconds < rows[name].seconds:
                    rows[name] = row
    load = os.getloadavg()[0]
    print(
        f"{len(paths)} store paths, {tar_bytes / MB:.0f} MB of tar, {n} layers, "
        f"{OPTIONS[0].compressor().parameters()}; instance A "
        f"uploaded {uploaded[default.min_size]} fragments >= 128 KiB "
        f"({uploaded[every.min_size]} with min_size 0); best of {args.repeats}; "
        f"load average {load:.1f}"
    )
    cold = rows[contenders[0][0]]
    print(f"{'instance B packs another grouping':36} {'wall':>8} {'CPU':>8} {'server':>8} "
          f"{'vs cold':>8} {'compressed':>11} {'fetched':>8}")
    for name, _bucket, _policy in contenders:
        row = rows[name]
        print(f"{name:36} {row.seconds:7.2f}s {row.cpu:7.2f}s {row.server_cpu:7.2f}s "
              f"{cold.seconds / row.seconds:7.2f}x {row.compressed:11d} {row.fetched:8d}")
    same = all(row.digests == cold.digests for row in rows.values())
    print(f"layers byte-identical to the cold pack: {same}")
    with FakeGcsServer() as server:
        per_fragment(work, server)
    return 0 if same else 1


if __name__ == "__main__":
    raise SystemExit(main())
