"""Where the CPU of an eStargz or zstd:chunked layer goes: packing thread, other threads, workers.

Issue "Pull only what changed": the file-granular formats must pack at 3x
the throughput of ``pigz -p2 -6``.  On a 2-core machine that is a budget in
CPU-seconds (both cores busy), and wall ratios on a shared machine move by
more than one change saves; this measures what other work moves far less,
the CPU-seconds of one layer, split by where they are spent:

* ``packing``: the calling thread (walking and reading the store, tar
  headers, cutting the tar into frames, planning big files' chunks, the TOC);
* ``threads``: the packing process's other threads (the pool hashing the
  ``diff_id`` and files of several chunks, the frame workers' I/O thread):
  the process's user + system seconds (``getrusage``, which keeps the time
  of threads that have ended) less the packing thread's.  Until 2026-12-07
  they were sampled from ``/proc/self/task`` every 10 ms by a thread of the
  benchmark's own: that lost the last slice of each thread ending in the
  run (about 0.02 CPU-s of a 300 MB eStargz layer) and the sampler used
  about 0.04 CPU-s of the two cores beside the run, so its totals read
  a little below ``bench_pack``'s whole-process count of the same pack;
* ``workers``: the frame worker processes (cutting whole files, hashing
  chunks, compressing frames; :mod:`nixery_core.frame_processes`).

Each format is packed as one layer with ``threads=2`` (``--threads``) into
the same hashing sink as ``bench_pack``'s one-layer rows, right after
reading the store once, interleaved with the default gzip layer, the
baseline printed beside it; best of ``--repeats`` by total CPU.  Blob
digests are printed so that a change can be checked to keep the bytes.

Run from the repository root::

    .venv/bin/python -m benchmarks.bench_chunked_cpu             # 300 MB closure
    .venv/bin/python -m benchmarks.bench_chunked_cpu --quick     # 60 MB
    .venv/bin/python -m benchmarks.bench_chunked_cpu --keep DIR  # reuse a corpus
    .venv/bin/python -m benchmarks.bench_chunked_cpu --pigz      # and throughput / pigz -p2 -6

``chrt -r 1`` in front keeps other processes off the run's cores (its own
threads and workers still share them), which steadies the figures further.
"""

from __future__ import annotations

import argparse
import os
import resource
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import attrs

from benchmarks.bench_pack import (
    _cpu,
    _HashingSink,
    build_corpus,
    closure_main,
    tool,
    warm,
    workers_cpu,
)
from nixery_core.archive import ArchiveOptions, pack_store_paths


@attrs.frozen
class Run:
    """One packed layer: wall seconds, CPU-seconds by where they went, the blob digest."""

    wall: float
    packing: float
    threads: float
    workers: float
    digest: str

    @property
    def total(self) -> float:
        return self.packing + self.threads + self.workers


def pack_once(root: Path, paths: Sequence[str], compression: str, threads: int) -> Run:
    """Pack ``paths`` as one layer and measure it (see the module docstring)."""
    workers = workers_cpu()
    sink = _HashingSink()
    process = _cpu(resource.RUSAGE_SELF)  # every thread's, ended ones included
    start, cpu = time.perf_counter(), time.thread_time()
    packed = pack_store_paths(
        paths,
        sink.write,
        ArchiveOptions(compression=compression),  # type: ignore[arg-type]
        store_root=root,
        threads=threads,
        blob_digest=sink.written_digest,
    )
    wall, packing = time.perf_counter() - start, time.thread_time() - cpu
    others = _cpu(resource.RUSAGE_SELF) - process - packing
    return Run(wall, packing, others, workers_cpu() - workers, packed.digest)


def _row(name: str, run: Run, baseline: Run) -> str:
    return (
        f"  {name:14} {run.wall:6.2f} s  {run.total:6.2f} cpu-s  {run.total / baseline.total:5.2f}"
        f"  {run.packing:6.2f}  {run.threads:6.2f}  {run.workers:6.2f}"
        f"  {run.total / run.wall:5.2f}  {run.digest[:19]}"
    )


def _run(root: Path, args: argparse.Namespace) -> int:
    paths = build_corpus(root, args.size_mb)
    print(
        f"{len(paths)} store paths; threads={args.threads}; {os.cpu_count()} CPUs, "
        f"load average {os.getloadavg()[0]:.1f}",
        flush=True,
    )
    formats = ("gzip", "estargz", "zstd-chunked")
    # Workers start once per program: the first chunked layer pays it, untimed.
    pack_once(root, paths, "estargz", args.threads)
    runs: dict[str, list[Run]] = {name: [] for name in formats}
    pigz: list[float] = []
    # In a directory of its own: a kept corpus (--keep) is only read.
    with tempfile.TemporaryDirectory(prefix="bench-chunked-cpu-") as scratch:
        list_file = Path(scratch) / "pigz.lst"
        list_file.write_bytes(b"".join(path.lstrip("/").encode() + b"\0" for path in paths))
        for _ in range(args.repeats):
            if args.pigz:
                warm(root, paths)
                start = time.perf_counter()
                tool(root, list_file, "pigz -p2 -6")()
                pigz.append(time.perf_counter() - start)
            for name in formats:
                warm(root, paths)
                runs[name].append(pack_once(root, paths, name, args.threads))
    best = {name: min(done, key=lambda run: run.total) for name, done in runs.items()}
    print(
        "  format           wall      cpu   / gzip  packing threads workers  cores  blob"
    )
    for name in formats:
        print(_row(name, best[name], best["gzip"]))
    if pigz:
        # As bench_pack: best wall of each against the best of tar | pigz -p2 -6.
        print(f"  tar -c | pigz -p2 -6: best {min(pigz):.2f} s of {len(pigz)}")
        for name in formats:
            fastest = min(run.wall for run in runs[name])
            print(f"  {name} / pigz -p2 -6 throughput: {min(pigz) / fastest:.2f}")
    print(f"  load average at the end {os.getloadavg()[0]:.1f}")
    return 0


def _more(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--threads", type=int, default=2, help="threads=, as a layer gets (2)")
    parser.add_argument(
        "--pigz", action="store_true", help="time tar | pigz -p2 -6 too, interleaved: ratios"
    )


def main(argv: Sequence[str] | None = None) -> int:
    return closure_main(argv, __doc__, "bench-chunked-cpu-", _run, _more)


if __name__ == "__main__":
    raise SystemExit(main())
