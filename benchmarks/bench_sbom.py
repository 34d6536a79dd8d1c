"""What an SBOM costs a build: render time and size against grouping the same closure.

For synthetic closures of 1k, 5k and 20k store paths
(:func:`~nixery_core_sim.universe.random_closure`, 20 requested packages),
the inventory plus both documents (SPDX 2.3 and CycloneDX 1.5 JSON) are
rendered, and the time is compared with the default layering strategy
grouping the same closure into 93 layers (work every uncached build does
anyway).  Times are CPU seconds, best of ``--repeat`` runs.  A cache hit
renders nothing: the documents are blobs the entry names.

    .venv/bin/python benchmarks/bench_sbom.py [--sizes 1000 5000] [--repeat 3]
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable, Sequence

from nixery_core.graph import RuntimeGraph
from nixery_core.layering import DEFAULT_MAX_LAYERS, DEFAULT_STRATEGY
from nixery_core.names import Image
from nixery_core.sbom.cyclonedx import render_cyclonedx
from nixery_core.sbom.inventory import Inventory
from nixery_core.sbom.spdx import render_spdx
from nixery_core_sim.universe import random_closure

DIGEST = "sha256:" + "0" * 64


def best_time(work: Callable[[], object], repeat: int) -> float:
    """The least CPU time of ``repeat`` runs of ``work``."""
    times = []
    for _ in range(repeat):
        start = time.process_time()
        work()
        times.append(time.process_time() - start)
    return min(times)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1_000, 5_000, 20_000])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args(argv)
    image = Image.from_name("bench")
    print(f"CPU seconds, best of {args.repeat}; ratio = SBOMs / grouping the same closure.")
    print(f"{'paths':>7} {'grouping':>9} {'sboms':>8} {'ratio':>6} {'spdx':>9} {'cyclonedx':>10}")
    for size in args.sizes:
        graph = random_closure(size, seed=args.seed)

        def render(graph: RuntimeGraph = graph) -> tuple[bytes, bytes]:
            inventory = Inventory.from_graph(
                graph, image, created="1970-01-01T00:00:00Z", source={}
            )
            return render_spdx(inventory, DIGEST), render_cyclonedx(inventory, DIGEST)

        def group(graph: RuntimeGraph = graph) -> object:
            return DEFAULT_STRATEGY.group(graph, DEFAULT_MAX_LAYERS - 1)

        grouping = best_time(group, args.repeat)
        sboms = best_time(render, args.repeat)
        spdx, cdx = render()
        print(f"{size:>7} {grouping:>9.3f} {sboms:>8.3f} {sboms / grouping:>6.2f} "
              f"{len(spdx) / 1e6:>7.2f}MB {len(cdx) / 1e6:>8.2f}MB")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
