"""What keeping fragments costs a cold pack, in CPU-seconds, and where it goes.

Issue "Never compress a store path twice": a cold pack into an empty
fragment cache (:mod:`nixery_core.fragments`) must be no slower than a pack
without one.  Every pack here writes its blob into a new
``FilesystemStore`` (``durable=False``), as a registry's build does:
``without`` keeps no fragments, ``cold`` keeps them as byte ranges of the
committed blob (what ``BuildCache`` does on such a store), ``copies``
writes a copy of each into the cache (what it does on a remote store).
``bench_pack`` times both as wall ratios, which other work on
a shared 2-core machine moves by more than the difference; this measures
what noise moves far less: the CPU-seconds of each run (this process, all
threads), and of the cache's writing thread alone.  Both packs are the
``ours, 1 layer`` contender of ``bench_pack`` (the same sink, one layer,
the cache opened before the timed run and closed within it), interleaved,
each right after reading the store once; best of ``--repeats``.

Printed per run: wall, CPU, cores used (CPU / wall), the packing (calling)
thread's CPU, and for the cold one the writing thread's CPU and how long
closing the cache took (writing what was still queued).  Then the extra CPU
of the cold pack, and medians of every thread's CPU by name (the hashing
and compressing pool ``nixery-deflate``, the cache's writing thread, the
frame workers' I/O thread, the frame worker processes read exactly, not in
clock ticks) and of the packing thread's *wait*: its wall time less its
CPU time (reads, writes, a full pipe, Python's lock, the other
processes on the machine).  A cold pack whose extra wall time exceeds
its extra CPU over the cores it had shows there as more waiting.
``--split`` adds a third pack, ``recorded``: every
fragment recorded (layout, pieces kept until committed) but dropped at its
commit, never written: what recording costs the packing threads, apart
from writing.

``--compression estargz`` (or ``zstd-chunked``, ``zstd``) measures those
layers instead of gzip: a chunked layer's cold pack keeps its frames as
ranges and its TOC parts as small copies (:mod:`nixery_core.fragment_toc`),
its ``copies`` pack both as copies.  CPU counts the frame worker processes
too (:func:`~benchmarks.bench_pack.workers_cpu`).

Run from the repository root::

    .venv/bin/python -m benchmarks.bench_cold_fragments            # 300 MB closure
    .venv/bin/python -m benchmarks.bench_cold_fragments --quick    # 60 MB
    .venv/bin/python -m benchmarks.bench_cold_fragments --keep DIR # reuse a corpus
    .venv/bin/python -m benchmarks.bench_cold_fragments --split    # recording apart from writing
    .venv/bin/python -m benchmarks.bench_cold_fragments --regroup  # reuse: ranges against copies
    .venv/bin/python -m benchmarks.bench_cold_fragments --compression estargz  # (or zstd-chunked)

On a machine other work keeps busy, ``chrt -r 1`` in front (the whole run
at real-time priority, so that other processes do not take its cores) and
``--repeats 7`` give medians that move by a few hundredths of a CPU-second
between runs instead of tenths.
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import attrs

from benchmarks.bench_pack import (
    build_corpus,
    closure_main,
    ours,
    warm,
    warm_fragments,
    workers_cpu,
)
from nixery_core.archive import ArchiveOptions
from nixery_core.fragments import FragmentCache
from nixery_core.storage.filesystem import FilesystemStore


@attrs.frozen
class Run:
    """One timed pack."""

    wall: float
    cpu: float
    packing_cpu: float
    writer_cpu: float = 0.0
    close: float = 0.0
    #: CPU seconds of each kind of thread (by name) and of the frame worker processes.
    threads: dict[str, float] = attrs.field(factory=dict)

    @property
    def packing_wait(self) -> float:
        """The packing thread's wall time less its CPU time: what it waited for."""
        return self.wall - self.packing_cpu


class _Counted(FragmentCache):
    """A fragment cache that counts its writing thread's CPU time and its close."""

    writer_cpu: float = 0.0
    closing: float = 0.0
    _lock = threading.Lock()

    def _write_queued(self) -> None:
        start = time.thread_time()
        try:
            super()._write_queued()
        finally:
            with self._lock:
                type(self).writer_cpu += time.thread_time() - start

    def close(self) -> None:
        start = time.perf_counter()
        super().close()
        type(self).closing += time.perf_counter() - start


class _Unwritten(_Counted):
    """A fragment cache that records every fragment but drops it at its commit."""

    def _submit(self, key: str, item: object) -> None:
        return


class _ThreadClocks:
    """CPU seconds of every thread of this process over a run, summed by thread name.

    Threads alive at both ends are read through their CPU clocks; one that
    ends within the run (a layer's pool, the cache's writing thread, maybe
    started before it) reports its own at its end (``threading.Thread.run``
    wrapped while this is entered: enter it before any thread of the runs
    starts, :meth:`mark` each run's start).  Threads are told apart as
    objects: a thread's id is reused by the next.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._ended: dict[threading.Thread, float] = {}
        self._start: dict[threading.Thread, float] = {}
        self._workers = 0.0
        self._run = threading.Thread.run

    def __enter__(self) -> _ThreadClocks:
        run, ended, lock = self._run, self._ended, self._lock

        def counted(thread: threading.Thread) -> None:
            try:
                run(thread)
            finally:
                with lock:
                    ended[thread] = time.thread_time()

        threading.Thread.run = counted  # type: ignore[method-assign,assignment]  # undone on exit
        return self

    def mark(self) -> None:
        """A run starts: CPU is counted from here."""
        with self._lock:
            self._ended.clear()
        self._start = _thread_clocks()
        self._workers = workers_cpu()

    def __exit__(self, *_exc: object) -> None:
        threading.Thread.run = self._run  # type: ignore[method-assign]

    def read(self) -> dict[str, float]:
        """CPU seconds since :meth:`mark`, by thread name (numbers cut off), and ``workers``."""
        by_name: dict[str, float] = {"workers": workers_cpu() - self._workers}
        with self._lock:
            now = {**_thread_clocks(), **self._ended}
        for thread, cpu in now.items():
            kind = thread.name.split("_")[0].split(" ")[0].rstrip("0123456789-")
            by_name[kind] = by_name.get(kind, 0.0) + cpu - self._start.get(thread, 0.0)
        return by_name


def _thread_clocks() -> dict[threading.Thread, float]:
    """Every other live thread's CPU seconds."""
    clocks = {}
    for thread in threading.enumerate():
        if thread.ident is None or thread is threading.current_thread():
            continue
        try:
            clocks[thread] = time.clock_gettime(time.pthread_getcpuclockid(thread.ident))
        except (OSError, AttributeError):  # it just ended (counted at its end), or no such clock
            continue
    return clocks


def _store_at(directory: Path) -> Callable[[], FilesystemStore]:
    """A new blob store in ``directory`` (no fsync: every contender alike)."""
    return lambda: FilesystemStore(directory, durable=False)


def _cpu() -> float:
    """CPU seconds of this process and its live frame worker processes (chunked layers)."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime + workers_cpu()


def measure(
    root: Path, paths: Sequence[str], repeats: int, caches: Path, *, split: bool = False,
    options: ArchiveOptions | None = None,
) -> dict[str, list[Run]]:
    """Each pack ``repeats`` times, interleaved; cold caches made under ``caches``."""
    options = options or ArchiveOptions()
    runs: dict[str, list[Run]] = {"without": [], "cold": [], "copies": []}
    if split:
        runs["recorded"] = []
    with _ThreadClocks() as clocks:
        for index in range(repeats):
            _measure_round(
                root, paths, index, caches, options=options, runs=runs, clocks=clocks
            )
    return runs


def _measure_round(
    root: Path, paths: Sequence[str], index: int, caches: Path, *, options: ArchiveOptions,
    runs: dict[str, list[Run]], clocks: _ThreadClocks,
) -> None:
    """One run of each contender, in order."""
    kinds: dict[str, type[_Counted]] = {
        "cold": _Counted, "copies": _Counted, "recorded": _Unwritten
    }
    for name, done in runs.items():
        # A new directory each run; all removed at the end.
        directory = caches / f"{name}-{index}"
        kind = kinds.get(name)
        fragments = (
            (lambda directory=directory, kind=kind: kind(directory))
            if kind is not None
            else (lambda: None)
        )
        blobs = caches / f"blobs-{name}-{index}"
        contender = ours(
            root, [paths], options, fragments,
            blobs=_store_at(blobs),
            mode="ranges" if name == "cold" else "copy",
        )
        warm(root, paths)
        contender.prepare()
        _Counted.writer_cpu = _Counted.closing = 0.0
        clocks.mark()
        cpu, packing, start = _cpu(), time.thread_time(), time.perf_counter()
        contender()
        wall, cpu = time.perf_counter() - start, _cpu() - cpu
        packing = time.thread_time() - packing
        threads = clocks.read()
        done.append(Run(wall, cpu, packing, _Counted.writer_cpu, _Counted.closing, threads))
        print(f"  {name:8} wall {wall:.3f} s  cpu {cpu:.3f} s  cores {cpu / wall:.2f}"
              f"  packing thread {packing:.3f} cpu-s"
              + (f"  writing thread {_Counted.writer_cpu:.3f} cpu-s,"
                 f" close {1000 * _Counted.closing:.1f} ms"
                 if name in ("cold", "copies") else ""),
              flush=True)


def main(argv: Sequence[str] | None = None) -> int:
    return closure_main(
        argv, __doc__, "bench-cold-fragments-", _run,
        _options,
    )


def _options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--split", action="store_true",
        help="also pack recording every fragment but writing none",
    )
    parser.add_argument(
        "--regroup", action="store_true",
        help="time regroups from ranges and from copies instead of cold packs",
    )
    parser.add_argument(
        "--compression", default="gzip", choices=("gzip", "zstd", "estargz", "zstd-chunked"),
        help="the layers' compression (default gzip)",
    )


def regroup(
    root: Path, paths: Sequence[str], repeats: int, work: Path,
    options: ArchiveOptions | None = None,
) -> None:
    """Four contiguous layers assembled from fragments kept by four round-robin packs, as
    ranges of their blobs and as copies, interleaved; each run's output to a hashing sink."""
    options = options or ArchiveOptions()
    groups = [list(paths[i::4]) for i in range(4)]
    size = -(-len(paths) // 4)
    regroups = [list(paths[i : i + size]) for i in range(0, len(paths), size)]
    blobs = FilesystemStore(work / "warm-blobs", durable=False)
    contenders = {
        "ranges": ours(root, regroups, options, warm_fragments(root, groups, options, "-r",
                                                                blobs=blobs),
                       read_from=blobs),
        "copies": ours(root, regroups, options, warm_fragments(root, groups, options, "-c")),
    }
    runs: dict[str, list[Run]] = {name: [] for name in contenders}
    for _ in range(repeats):
        for name, contender in contenders.items():
            warm(root, paths)
            contender.prepare()
            cpu, packing, start = _cpu(), time.thread_time(), time.perf_counter()
            contender()
            wall, cpu = time.perf_counter() - start, _cpu() - cpu
            runs[name].append(Run(wall, cpu, time.thread_time() - packing))
            print(f"  {name:8} wall {wall:.3f} s  cpu {cpu:.3f} s", flush=True)
    print(f"medians of {repeats} (wall s, cpu s); load average {os.getloadavg()[0]:.1f}:")
    for name, done in runs.items():
        wall_m, cpu_m, _ = _medians(done)
        print(f"  {name:8} {wall_m:.3f}  {cpu_m:.3f}")
    (ranges_wall, ranges_cpu, _), (copies_wall, copies_cpu, _) = (
        _medians(runs["ranges"]), _medians(runs["copies"])
    )
    print(f"  ranges / copies: wall {ranges_wall / copies_wall:.3f}, "
          f"CPU {ranges_cpu / copies_cpu:.3f}")


def _run(root: Path, args: argparse.Namespace) -> int:
    # The same paths as bench_pack on the same root: a kept root may also hold its 2 GB RSS set.
    paths = build_corpus(root, args.size_mb)
    options = ArchiveOptions(compression=args.compression)
    print(f"{len(paths)} store paths under {root}, {args.compression}; "
          f"load average {os.getloadavg()[0]:.1f}")
    if args.regroup:
        with tempfile.TemporaryDirectory(prefix="bench-regroup-") as work:
            regroup(root, paths, args.repeats, Path(work), options)
        return 0
    with tempfile.TemporaryDirectory(prefix="bench-cold-fragments-") as caches:
        runs = measure(root, paths, args.repeats, Path(caches), split=args.split,
                       options=options)
    best = {name: (min(r.wall for r in rs), min(r.cpu for r in rs)) for name, rs in runs.items()}
    writer = min(r.writer_cpu for r in runs["cold"])
    (wall, cpu), (cold_wall, cold_cpu) = best["without"], best["cold"]
    print(f"best of {args.repeats}: without {wall:.3f} s / {cpu:.3f} cpu-s; "
          f"cold {cold_wall:.3f} s / {cold_cpu:.3f} cpu-s")
    copies_wall, copies_cpu = best["copies"]
    print(f"  copies / without: wall {copies_wall / wall:.3f}, CPU {copies_cpu / cpu:.3f}")
    print(f"  cold / without: wall {cold_wall / wall:.3f}, CPU {cold_cpu / cpu:.3f} "
          f"(+{cold_cpu - cpu:.3f} cpu-s, of which the writing thread {writer:.3f}); "
          f"load average {os.getloadavg()[0]:.1f}")
    print(f"medians of {args.repeats} (wall s, cpu s, packing thread cpu s):")
    base = _medians(runs["without"])
    for name, done in runs.items():
        values = _medians(done)
        pairs = zip(values, base, strict=True)
        print(f"  {name:8} " + "  ".join(f"{v:.3f} ({v - before:+.3f})" for v, before in pairs))
    print("medians, CPU seconds by thread, and the packing thread's wait (wall less CPU):")
    kinds = sorted({kind for done in runs.values() for r in done for kind in r.threads})
    for name, done in runs.items():
        parts = [f"packing wait {statistics.median(r.packing_wait for r in done):.3f}"]
        parts += [
            f"{kind} {statistics.median(r.threads.get(kind, 0.0) for r in done):.3f}"
            for kind in kinds
        ]
        print(f"  {name:8} " + "  ".join(parts))
    return 0


def _medians(runs: Sequence[Run]) -> tuple[float, float, float]:
    return (
        statistics.median(r.wall for r in runs),
        statistics.median(r.cpu for r in runs),
        statistics.median(r.packing_cpu for r in runs),
    )


if __name__ == "__main__":
    sys.exit(main())
