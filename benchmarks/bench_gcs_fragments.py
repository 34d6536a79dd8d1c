"""Fragments on a bucket store: a cold pack's cost, and a regroup from bucket ranges.

Issue 18, "a cold pack no slower than today", on a store without local blob
files.  Builds the corpus of :mod:`benchmarks.bench_pack`, starts
fake-gcs-server (the real GCS JSON API on loopback, reached by the real
google-cloud-storage client) and measures, interleaved, best and median of
``--repeats``:

**Cold pack** of the whole corpus as one layer into the bucket
(:class:`~nixery_core.storage.gcs.GcsStore`'s blob writer), with an empty
fragment cache each run:

* ``none``: no fragment cache (the baseline);
* ``copies``: each fragment copied into the local cache (``fragment_mode
  ="copy"``; what ``auto`` did on GCS before);
* ``ranges``: each fragment recorded as a range of the layer blob in the
  bucket (``"ranges"``, what ``auto`` does now): no fragment bytes written;
* ``copies, shared`` and ``ranges, shared``: the same with the bucket tier
  on (``fragment_bucket``, default ``min_size``), closed within the run:
  copies uploaded as fragment blobs (before), or references to the ranges
  shared as pointer objects (now).

**Regroup**: the corpus packed once (untimed) as four round-robin layers,
then assembled as four contiguous layers (another grouping of the same
paths, four threads, into a hashing sink), every fragment reused:

* ``copies``: from local copies (the baseline);
* ``bucket ranges``: each range read from the bucket every time (read
  ahead: neighbouring ranges of one blob in one request, blobs concurrently;
  :mod:`nixery_core.fragment_reads`);
* ``copy at 1st reuse``: the same ranges, copied into the local cache as
  they are first reused (``StoreFragments.copy_on_reuse``), timed at that
  first reuse; ``... later`` is the next regroup, from those copies;
* ``no fragments``: every path compressed (what a miss costs).

**Shared** (``--shared-only``): instance A packs four round-robin layers
with the bucket tier on (every fragment shared), copies into one bucket,
references into another; instance B, with an empty local cache each run,
assembles four contiguous layers: from the shared copies (fragment blobs
downloaded and checked), from the references (ranges of A's layer blobs
read ahead, copied at first reuse), against compressing every path.

Printed: wall seconds, CPU seconds of this process (every thread) and of
fake-gcs-server (``/proc/<pid>/stat``), and each ratio against the row's
baseline run in the same script.  Every regroup's layer digests must equal
the copies' (checked).

Run from the repository root::

    .venv/bin/python -m benchmarks.bench_gcs_fragments --quick     # 60 MB
    .venv/bin/python -m benchmarks.bench_gcs_fragments             # 300 MB
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import attrs

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))

from servers import FakeGcsServer  # noqa: E402 - tests/ is put on the path just above

from benchmarks.bench_fragment_bucket import _cpu_of as _server_cpu  # noqa: E402 - as above
from benchmarks.bench_fragment_bucket import _server_pid  # noqa: E402 - as above
from benchmarks.bench_pack import (  # noqa: E402 - as above
    _HashingSink,
    build_corpus,
    closure_main,
    warm,
)
from nixery_core.archive import ArchiveOptions, pack_store_paths  # noqa: E402 - as above
from nixery_core.fragment_bucket import (  # noqa: E402 - as above
    BucketFragments,
    FragmentBucketPolicy,
    SharedLayer,
)
from nixery_core.fragments import (  # noqa: E402 - as above
    FragmentCache,
    FragmentSource,
    LayerRanges,
    StoreFragments,
)
from nixery_core.storage.gcs import GcsStore  # noqa: E402 - as above

OPTIONS = ArchiveOptions()


@attrs.frozen
class Run:
    wall: float
    cpu: float
    server_cpu: float
    digests: tuple[str, ...] = ()


def _cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _timed(server_pid: int, work: Callable[[], tuple[str, ...]]) -> Run:
    cpu, server, start = _cpu(), _server_cpu(server_pid), time.perf_counter()
    digests = work()
    wall = time.perf_counter() - start
    return Run(wall, _cpu() - cpu, _server_cpu(server_pid) - server, digests)


def _pack_into(store: GcsStore, root: Path, paths: Sequence[str],
               cache: FragmentCache | None, mode: str, *,
               tier: BucketFragments | None = None) -> str:
    """One layer into the bucket, fragments kept as ``mode`` says (shared through ``tier``
    when given); its digest."""
    layer: LayerRanges | SharedLayer | None = None
    if tier is not None and mode == "ranges":
        layer = tier.layer()
    elif cache is not None and mode == "ranges":
        layer = cache.on_store(store).layer()
    source: FragmentSource | None = layer if layer is not None else (tier or cache)
    with store.open_blob_writer(OPTIONS.media_type) as writer:
        packed = pack_store_paths(paths, writer.write, OPTIONS, store_root=root,
                                  fragments=source, blob_digest=writer.written_digest)
        writer.commit(packed.digest)
    if layer is not None:
        layer.stored(packed.digest)
    return packed.digest


def _groupings(paths: list[str]) -> tuple[list[list[str]], list[list[str]]]:
    """The corpus as four round-robin layers (packed first) and as four contiguous ones
    (the regroup)."""
    size = -(-len(paths) // 4)
    round_robin = [paths[i::4] for i in range(4)]
    return round_robin, [paths[i : i + size] for i in range(0, len(paths), size)]


def _regroup(root: Path, groups: Sequence[Sequence[str]],
             source: Callable[[], FragmentSource | None]) -> tuple[str, ...]:
    """Each group as one layer into a hashing sink, in threads; the digests."""
    def one(paths: Sequence[str]) -> str:
        sink = _HashingSink()
        return pack_store_paths(paths, sink.write, OPTIONS, store_root=root,
                                fragments=source(), blob_digest=sink.written_digest).digest

    with ThreadPoolExecutor(len(groups)) as pool:
        return tuple(pool.map(one, groups))


def cold(server: FakeGcsServer, pid: int, root: Path, paths: list[str], *, repeats: int,
         work: Path) -> dict[str, list[Run]]:
    runs: dict[str, list[Run]] = {
        "none": [], "copies": [], "ranges": [], "copies, shared": [], "ranges, shared": []
    }
    for index in range(repeats):
        for name, done in runs.items():
            bucket = f"cold-{name.replace(', ', '-')}-{index}-{os.getpid()}"
            store = GcsStore(server.make_bucket(bucket))
            cache = None if name == "none" else FragmentCache(work / bucket)
            mode = name.split(",")[0]
            tier = None
            if cache is not None and name.endswith("shared"):  # the bucket tier on
                view = cache.on_store(store) if mode == "ranges" else None
                tier = BucketFragments(cache, store, FragmentBucketPolicy(), ranges=view)
            warm(root, paths)

            def work_once(store: GcsStore = store, cache: FragmentCache | None = cache,
                          mode: str = mode, tier: BucketFragments | None = tier,
                          ) -> tuple[str, ...]:
                digest = _pack_into(store, root, paths, cache, mode, tier=tier)
                if tier is not None:
                    tier.close()  # its uploads (copies or references) within the run
                if cache is not None:
                    cache.close()  # what is still queued is written within the run
                return (digest,)

            run = _timed(pid, work_once)
            done.append(run)
            print(f"  cold {name:14} wall {run.wall:.3f} s  cpu {run.cpu:.3f} s"
                  f"  server cpu {run.server_cpu:.3f} s", flush=True)
    return runs


def regroup(server: FakeGcsServer, pid: int, root: Path, paths: list[str], *, repeats: int,
            work: Path) -> dict[str, list[Run]]:
    groups, regroups = _groupings(paths)
    store = GcsStore(server.make_bucket(f"warm-{os.getpid()}"))
    ranges_dir, copies_dir = work / "warm-ranges", work / "warm-copies"
    with FragmentCache(ranges_dir) as cache:
        for group in groups:
            _pack_into(store, root, group, cache, "ranges")
    with FragmentCache(copies_dir) as cache:
        for group in groups:
            _pack_into(store, root, group, cache, "copy")
    runs: dict[str, list[Run]] = {
        "copies": [], "bucket ranges": [], "copy at 1st reuse": [], "... later": [],
        "no fragments": [],
    }
    for index in range(repeats):
        warm(root, paths)
        run = _timed(pid, lambda: _regroup(root, regroups, lambda: None))  # no fragments
        runs["no fragments"].append(run)
        print(f"  regroup {'no fragments':17} wall {run.wall:.3f} s  cpu {run.cpu:.3f} s",
              flush=True)
        for name in ("copies", "bucket ranges", "copy at 1st reuse"):
            directory = work / f"regroup-{index}-{name.replace(' ', '-')}"
            shutil.copytree(copies_dir if name == "copies" else ranges_dir, directory)
            cache = FragmentCache(directory)
            view = cache.on_store(store)
            if name == "bucket ranges":
                view = attrs.evolve(view, copy_on_reuse=False)
            elif name == "copy at 1st reuse":
                view = attrs.evolve(view, copy_on_reuse=True)

            def source(view: StoreFragments = view, name: str = name) -> FragmentSource:
                return view.cache if name == "copies" else view.layer()

            warm(root, paths)
            rounds = ["... later"] if name == "copy at 1st reuse" else []
            for label in [name, *rounds]:
                def work_once(source: Any = source, cache: FragmentCache = cache,
                              label: str = label) -> tuple[str, ...]:
                    digests = _regroup(root, regroups, source)
                    if label == "copy at 1st reuse":
                        cache.flush()  # the copies are written within the run
                    return digests

                misses = cache.misses
                run = _timed(pid, work_once)
                if cache.misses != misses:
                    raise SystemExit(f"{label}: {cache.misses - misses} paths compressed again")
                runs[label].append(run)
                print(f"  regroup {label:17} wall {run.wall:.3f} s  cpu {run.cpu:.3f} s"
                      f"  server cpu {run.server_cpu:.3f} s", flush=True)
            cache.close()
    reference = runs["copies"][0].digests
    if any(run.digests != reference for done in runs.values() for run in done):
        raise SystemExit("a regroup's layers differ from the copies'")
    return runs


def _report(title: str, runs: dict[str, list[Run]], baseline: str) -> None:
    base = runs[baseline]
    best_wall = min(r.wall for r in base)
    med_wall = statistics.median(r.wall for r in base)
    med_cpu = statistics.median(r.cpu for r in base)
    print(f"{title} (against {baseline}; load average {os.getloadavg()[0]:.1f}):")
    print(f"  {'':19} {'best wall':>9} {'median':>8} {'cpu':>7} {'server':>7}"
          f"   {'best/base':>9} {'med/base':>8} {'cpu/base':>8}")
    for name, done in runs.items():
        wall = min(r.wall for r in done)
        med = statistics.median(r.wall for r in done)
        cpu = statistics.median(r.cpu for r in done)
        server = statistics.median(r.server_cpu for r in done)
        print(f"  {name:19} {wall:9.3f} {med:8.3f} {cpu:7.3f} {server:7.3f}"
              f"   {wall / best_wall:9.3f} {med / med_wall:8.3f} {cpu / med_cpu:8.3f}")


def shared(server: FakeGcsServer, pid: int, root: Path, paths: list[str], *, repeats: int,
           work: Path) -> dict[str, list[Run]]:
    """Instance A packs four round-robin layers with the bucket tier on (every fragment
    shared: ``min_size=0``), sharing copies into one bucket and references into another;
    instance B, with an empty local cache each run, assembles four contiguous layers."""
    groups, regroups = _groupings(paths)
    every = FragmentBucketPolicy(min_size=0)
    buckets = {}
    for kind in ("copies", "references"):
        store = buckets[kind] = GcsStore(server.make_bucket(f"shared-{kind}-{os.getpid()}"))
        with FragmentCache(work / f"shared-{kind}") as cache:
            view = cache.on_store(store) if kind == "references" else None
            with BucketFragments(cache, store, every, ranges=view) as tier:
                for group in groups:
                    _pack_into(store, root, group, cache,
                               "ranges" if kind == "references" else "copy", tier=tier)
    runs: dict[str, list[Run]] = {"shared copies": [], "shared references": [],
                                  "no fragments": []}
    for index in range(repeats):
        for name, done in runs.items():
            warm(root, paths)
            if name == "no fragments":
                run = _timed(pid, lambda: _regroup(root, regroups, lambda: None))
            else:
                kind = name.split()[1]
                store = buckets[kind]
                cache = FragmentCache(work / f"b-{kind}-{index}")
                view = cache.on_store(store) if kind == "references" else None
                tier = BucketFragments(cache, store, every, ranges=view)

                def work_once(tier: BucketFragments = tier, cache: FragmentCache = cache,
                              kind: str = kind) -> tuple[str, ...]:
                    digests = _regroup(root, regroups,
                                       tier.layer if kind == "references" else lambda: tier)
                    tier.close()
                    cache.close()  # copies fetched or made at first reuse: written within
                    return digests

                run = _timed(pid, work_once)
                if cache.misses:
                    raise SystemExit(f"{name}: {cache.misses} paths compressed")
            done.append(run)
            print(f"  instance B {name:17} wall {run.wall:.3f} s  cpu {run.cpu:.3f} s"
                  f"  server cpu {run.server_cpu:.3f} s", flush=True)
    reference = runs["no fragments"][0].digests
    if any(run.digests != reference for done in runs.values() for run in done):
        raise SystemExit("instance B's layers differ from fresh packing")
    return runs


def _run(root: Path, args: argparse.Namespace) -> int:
    # The same paths as bench_pack on the same root: a kept root may also hold its 2 GB RSS set.
    paths = build_corpus(root, args.size_mb)
    print(f"{len(paths)} store paths under {root}; load average {os.getloadavg()[0]:.1f}",
          flush=True)
    # Caches of the runs in a directory of their own (a kept corpus is only read).
    work = Path(tempfile.mkdtemp(prefix="bench-gcs-fragments-"))
    try:
        with FakeGcsServer() as server:
            pid = _server_pid(server)
            if not (args.regroup_only or args.shared_only):
                _report("cold pack into the bucket, one layer",
                        cold(server, pid, root, paths, repeats=args.repeats, work=work), "none")
            if not (args.cold_only or args.shared_only):
                _report("regroup 4 round-robin layers as 4 contiguous ones",
                        regroup(server, pid, root, paths, repeats=args.repeats, work=work),
                        "copies")
            if args.shared_only or not (args.cold_only or args.regroup_only):
                _report("instance B regroups what instance A shared in the bucket",
                        shared(server, pid, root, paths, repeats=args.repeats, work=work),
                        "no fragments")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


def _options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--cold-only", action="store_true", help="only the cold packs")
    parser.add_argument("--regroup-only", action="store_true", help="only the regroups")
    parser.add_argument("--shared-only", action="store_true",
                        help="only instance B regrouping what instance A shared")


def main(argv: Sequence[str] | None = None) -> int:
    return closure_main(argv, __doc__, "bench-gcs-fragments-", _run, _options)


if __name__ == "__main__":
    sys.exit(main())
