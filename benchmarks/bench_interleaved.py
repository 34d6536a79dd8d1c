"""Before and after, interleaved: chunked layers packed by several source trees in turn.

On a shared 2-core machine a change worth a few percent is lost between
two runs made minutes apart; alternating the versions inside one run puts
both under the same load.  Each round starts, for every tree given (in
turn, the order reversed every other round), a fresh Python with that tree
first on its path, which packs one untimed eStargz layer (starting its
frame workers) and then each format once with
:func:`benchmarks.bench_chunked_cpu.pack_once`, printing one line per
layer: wall seconds, CPU-seconds (packing thread, other threads, workers),
cores used and the blob digest.  At the end, the medians per tree and
format.  A tree is any checkout of this repository old enough to have
``bench_chunked_cpu.pack_once`` (``git worktree add --detach DIR COMMIT``).

Run from the repository root, on a corpus built before (read only here)::

    .venv/bin/python -m benchmarks.bench_interleaved --keep DIR --rounds 6 BEFORE AFTER
    chrt -r 1 .venv/bin/python -m benchmarks.bench_interleaved --keep DIR BEFORE AFTER
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import attrs

#: What each fresh process runs (argv: corpus, size in MB, formats).
_CHILD = """
import json, os, sys
from pathlib import Path
from benchmarks.bench_chunked_cpu import pack_once
from benchmarks.bench_pack import build_corpus, warm
root, size, formats = Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3].split(",")
paths = build_corpus(root, size)
pack_once(root, paths, "estargz", 2)
for name in formats:
    warm(root, paths)
    run = pack_once(root, paths, name, 2)
    print(json.dumps({"format": name, "wall": run.wall, "packing": run.packing,
                      "threads": run.threads, "workers": run.workers, "digest": run.digest,
                      "load": os.getloadavg()[0]}), flush=True)
"""


@attrs.frozen
class Layer:
    """One packed layer as a child process printed it."""

    format: str
    wall: float
    packing: float
    threads: float
    workers: float
    digest: str
    load: float

    @property
    def cpu(self) -> float:
        return self.packing + self.threads + self.workers

    def row(self, tree: str) -> str:
        return (
            f"  {tree:30} {self.format:13} {self.wall:5.2f} s {self.cpu:5.2f} cpu-s"
            f"  ({self.packing:.2f} {self.threads:.2f} {self.workers:.2f})"
            f"  cores {self.cpu / self.wall:4.2f}  load {self.load:4.1f}  {self.digest[:19]}"
        )


def _medians(name: str, tree: str, done: list[Layer]) -> str:
    median = statistics.median
    digests = ", ".join(sorted({layer.digest[:19] for layer in done}))
    return (
        f"  {name:13} {tree:30} {median([x.wall for x in done]):5.2f} s"
        f" {median([x.cpu for x in done]):5.2f} ({median([x.packing for x in done]):.2f}"
        f" {median([x.threads for x in done]):.2f} {median([x.workers for x in done]):.2f})"
        f"  {median([x.cpu / x.wall for x in done]):4.2f}  n={len(done)} {digests}"
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n", 1)[0])
    parser.add_argument("trees", nargs="+", help="checkouts of this repository to compare")
    parser.add_argument("--keep", type=Path, required=True, help="a corpus built before")
    parser.add_argument("--size-mb", type=int, default=300, help="closure size (default 300)")
    parser.add_argument("--rounds", type=int, default=6, help="processes per tree (6)")
    parser.add_argument("--formats", default="estargz,zstd-chunked", help="comma-separated")
    args = parser.parse_args(argv)
    trees = [str(Path(tree).resolve()) for tree in args.trees]
    layers: dict[str, list[Layer]] = {tree: [] for tree in trees}
    for number in range(args.rounds):
        for tree in trees if number % 2 == 0 else trees[::-1]:
            child = [sys.executable, "-c", _CHILD, str(args.keep), str(args.size_mb), args.formats]
            out = subprocess.run(
                child,
                cwd=tree,
                env={**os.environ, "PYTHONPATH": tree},
                check=True,
                capture_output=True,
                text=True,
            ).stdout
            for line in out.splitlines():
                layer = Layer(**json.loads(line))
                layers[tree].append(layer)
                print(layer.row(tree), flush=True)
    print("medians:  wall, cpu-s (packing thread, other threads, workers), cores")
    for name in args.formats.split(","):
        for tree in trees:
            print(_medians(name, tree, [x for x in layers[tree] if x.format == name]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
