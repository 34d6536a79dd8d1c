"""Pull churn and registry sharing of every layering strategy, on one simulated package set.

Prints one table: per strategy, the bytes a caching client pulls across
weekly revisions (against one layer per image and against one layer per
store path, the floor), the unique bytes a registry stores for all images
at one revision (against the sum of image sizes and the floor), layers per
image and grouping time; then how ours does against its targets.  See
:mod:`nixery_core.layering.universe` for the simulated package set and
:mod:`nixery_core.layering.evaluation` for the measures.

    .venv/bin/python benchmarks/layering_sim.py            # the default universe
    .venv/bin/python benchmarks/layering_sim.py --quick    # a small one
    .venv/bin/python benchmarks/layering_sim.py --closure a.json --closure b.json [--series]

``--closure`` measures real closures instead: files in the shape of
``nix path-info --json -r`` or ``{"paths": [...], "requested": {...}}``,
as a corpus (sharing), and with ``--series`` also as consecutive revisions
of one image (churn).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

import attrs

from nixery_core.layering import DEFAULT_MAX_LAYERS, DEFAULT_STRATEGY
from nixery_core.layering.evaluation import (
    PerPath,
    SingleLayer,
    closure_from_json,
    format_by_kind,
    format_report,
    measure,
    published_strategies,
    simulate,
    verdict,
)
from nixery_core.layering.universe import UniverseConfig
from nixery_core.protocols import LayeringStrategy


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--packages", type=int, help="packages in the universe")
    parser.add_argument("--revisions", type=int, help="weekly revisions after the first")
    parser.add_argument("--update-rate", type=float, help="weekly update chance per package")
    parser.add_argument("--mass-rebuild-every", type=int, help="weeks between staging merges")
    parser.add_argument("--small-images", type=int)
    parser.add_argument("--large-images", type=int)
    parser.add_argument(
        "--max-layers",
        type=int,
        default=DEFAULT_MAX_LAYERS,
        help="layers per image; strategies get one less (the customisation layer)",
    )
    parser.add_argument("--quick", action="store_true", help="a small universe")
    parser.add_argument(
        "--closure",
        type=Path,
        action="append",
        default=[],
        help="measure real closures (JSON) instead of a synthetic universe",
    )
    parser.add_argument(
        "--series",
        action="store_true",
        help="the --closure files are consecutive revisions of one image",
    )
    parser.add_argument("--by-kind", action="store_true", help="also print churn per image kind")
    args = parser.parse_args(argv)
    budget = args.max_layers - 1
    if args.closure:
        graphs = [closure_from_json(p.read_bytes(), str(p)) for p in args.closure]
        series = [[("real", g)] for g in graphs] if args.series else [[("real", g) for g in graphs]]
        strategies: list[LayeringStrategy] = [
            SingleLayer(),
            PerPath(),
            *published_strategies(None),
            DEFAULT_STRATEGY,
        ]
        report = measure(series, [(s.name, s.group) for s in strategies], budget)
        print(format_report(report))
        return 0
    config = UniverseConfig.quick(args.seed) if args.quick else UniverseConfig(seed=args.seed)
    overrides = {
        "packages": args.packages,
        "revisions": args.revisions,
        "update_rate": args.update_rate,
        "mass_rebuild_every": args.mass_rebuild_every,
        "small_images": args.small_images,
        "large_images": args.large_images,
    }
    config = attrs.evolve(config, **{k: v for k, v in overrides.items() if v is not None})
    report = simulate(config, budget, [DEFAULT_STRATEGY])
    print(format_report(report))
    if args.by_kind:
        print()
        print(format_by_kind(report))
    print()
    print("\n".join(verdict(report, DEFAULT_STRATEGY.name).lines(DEFAULT_STRATEGY.name)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
