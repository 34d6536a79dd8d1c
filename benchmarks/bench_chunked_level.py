"""zstd:chunked at two zstd levels, on packages held out of the benchmark corpus.

``compression.FORMAT_DEFAULT_LEVELS`` gives zstd:chunked frames zstd level 2
(plain zstd layers keep 3): fewer CPU-seconds for slightly larger output,
inside issue "Pull only what changed"'s 1.15x ``pigz -6``.  The choice must
hold on data that did not make it, so this packs only the store paths of a
``--size-mb`` corpus (default 700 MB) that are *not* in ``bench_pack``'s
300 MB corpus (the same package order, so its first 300 MB are left out),
at each level in turn, interleaved, ``threads=2``, and prints CPU-seconds
(this process, its children and the frame workers), wall and the size over
``pigz -6``'s.

Run from the repository root::

    .venv/bin/python -m benchmarks.bench_chunked_level --keep /tmp/corpus700
    .venv/bin/python -m benchmarks.bench_chunked_level --levels 3,2,1 --repeats 3
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Sequence
from pathlib import Path

from benchmarks.bench_pack import (
    MB,
    _cpu_all,
    _HashingSink,
    build_corpus,
    closure_main,
    tool,
    warm,
)
from nixery_core.archive import ArchiveOptions, pack_store_paths

#: The corpus bench_pack reports on (and the level was first tuned on).
TUNED_MB = 300


def held_out(root: Path, size_mb: int) -> list[str]:
    """The store paths of a ``size_mb`` corpus beyond bench_pack's first 300 MB."""
    paths = build_corpus(root, size_mb)
    tuned = build_corpus(root / "tuned", TUNED_MB)  # the names only; a kept root keeps it
    tuned_names = {p.rsplit("/", 1)[1] for p in tuned}
    return [p for p in paths if p.rsplit("/", 1)[1] not in tuned_names]


def pack(root: Path, paths: Sequence[str], level: int) -> tuple[float, float, int]:
    """Wall seconds, CPU-seconds and blob bytes of one zstd:chunked layer."""
    warm(root, paths)
    sink = _HashingSink()
    options = ArchiveOptions(compression="zstd-chunked", level=level)
    cpu = _cpu_all()
    start = time.perf_counter()
    pack_store_paths(
        paths,
        sink.write,
        options,
        store_root=root,
        threads=2,
        blob_digest=sink.written_digest,
    )
    return time.perf_counter() - start, _cpu_all() - cpu, sink.size


def _run(root: Path, args: argparse.Namespace) -> int:
    levels = [int(level) for level in args.levels.split(",")]
    paths = held_out(root, args.size_mb)
    list_file = root / "held-out.lst"
    list_file.write_bytes(b"".join(p.lstrip("/").encode() + b"\0" for p in paths))
    pigz = tool(root, list_file, "pigz -6")()
    print(f"{len(paths)} held-out store paths; pigz -6 writes {pigz / MB:.1f} MB")
    runs: dict[int, list[tuple[float, float, int]]] = {level: [] for level in levels}
    for _ in range(args.repeats):
        for level in levels:
            runs[level].append(pack(root, paths, level))
    for level, done in runs.items():
        cpu = statistics.median(c for _w, c, _s in done)
        wall = statistics.median(w for w, _c, _s in done)
        size = done[0][2]
        print(
            f"zstd level {level}: median CPU {cpu:.2f} s, wall {wall:.2f} s, "
            f"size / pigz -6 {size / pigz:.3f}"
        )
    return 0


def _more(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--levels", default="3,2", help="zstd levels, comma-separated (3,2)")
    parser.set_defaults(size_mb=700)


def main(argv: Sequence[str] | None = None) -> int:
    return closure_main(argv, __doc__, "bench-chunked-level-", _run, _more)


if __name__ == "__main__":
    raise SystemExit(main())
