"""How grouping time scales with closure size, for every layering strategy.

Each strategy groups synthetic closures of 1k, 5k, 10k and 20k store paths
(:func:`~nixery_core_sim.universe.random_closure`: a libc-like bottom,
heavy-tailed sizes, popular libraries, 20 requested packages) into 93
layers.  Times are CPU seconds, best of ``--repeat`` runs, so other load on
the machine does not count.  Ratios are against nixpkgs'
referencesByPopularity on the same closure (a sort and one counting pass,
the cheapest reasonable strategy) and against the same strategy at 1k paths.

    .venv/bin/python benchmarks/bench_layering_speed.py [--sizes 1000 5000] [--repeat 3]
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence

from nixery_core.graph import RuntimeGraph
from nixery_core.layering import (
    DEFAULT_MAX_LAYERS,
    DEFAULT_STRATEGY,
    NixeryPopularity,
    ReferencesByPopularity,
    SizeFirst,
)
from nixery_core.protocols import LayeringStrategy
from nixery_core_sim.universe import random_closure

BASELINE = ReferencesByPopularity()


def best_time(strategy: LayeringStrategy, graph: RuntimeGraph, budget: int, repeat: int) -> float:
    """The least CPU time of ``repeat`` groupings."""
    times = []
    for _ in range(repeat):
        start = time.process_time()
        strategy.group(graph, budget)
        times.append(time.process_time() - start)
    return min(times)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1_000, 5_000, 10_000, 20_000])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args(argv)
    budget = DEFAULT_MAX_LAYERS - 1
    strategies: list[LayeringStrategy] = [
        DEFAULT_STRATEGY,
        SizeFirst(),
        NixeryPopularity(),
        BASELINE,
    ]
    graphs = {n: random_closure(n, seed=args.seed) for n in args.sizes}
    baseline = {n: best_time(BASELINE, g, budget, args.repeat) for n, g in graphs.items()}
    print(f"CPU seconds to group into {budget} layers, best of {args.repeat} runs.")
    print(f"x{BASELINE.name}: the ratio to {BASELINE.name} on the same closure.")
    print(f"/path vs {args.sizes[0]}: time per path against the same strategy at {args.sizes[0]}.")
    print()
    header = "| strategy | paths | seconds | x" + BASELINE.name + f" | /path vs {args.sizes[0]} |"
    print(header)
    print("| --- | ---: | ---: | ---: | ---: |")
    for strategy in strategies:
        first: float | None = None
        for n, graph in graphs.items():
            seconds = (
                baseline[n]
                if strategy is BASELINE
                else best_time(strategy, graph, budget, args.repeat)
            )
            per_path = seconds / n
            first = per_path if first is None else first
            print(
                f"| {strategy.name} | {n} | {seconds:.3f} | {seconds / max(baseline[n], 1e-9):.2f} "
                f"| {per_path / max(first, 1e-12):.2f} |"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
