"""Pull churn and registry sharing of every layering strategy, on one simulated package set.

Prints, in this order:

1. how the simulated universe compares with the published measurements it
   is calibrated against (the published strategies' churn against one layer
   per image, ``referencesByPopularity``'s catch-all share, store paths per
   image, NAR sizes), so that a reader can check it was not tuned for ours;
2. one table: per strategy, the bytes pulled across weekly revisions by a
   client per image and by one client pulling every image (against one
   layer per image and against one layer per store path, the floor), the
   unique bytes a registry stores for all images at one revision (against
   the sum of image sizes and the floor), layers per image and grouping time;
3. with ``--by-kind``, churn per image summed by image kind;
4. the same churn for a partial-pull client (podman with eStargz or
   zstd:chunked layers: it fetches only the files and chunks it lacks,
   :mod:`nixery_core_sim.files`) next to the whole-layer client;
5. how ours does against its targets.

With ``--registry``, ours also runs told which layers the registry already
stores (``ChurnAwareDominators(prior_layers=...)``, row
``churn-aware-dominators+registry``): images are built in a fixed order at
every revision, each seeing the layers of the images before it and of
every earlier revision (:class:`~nixery_core_sim.evaluation.WithRegistry`).
With ``--reference-scale K`` as well, ours also runs told the record with
``reference_scale=K`` (row ``churn-aware-dominators+registry+refs``: a
path's chance of being elsewhere also from how many paths here reference it);
with ``--root-scale K``, with ``root_scale=K`` (row
``churn-aware-dominators+registry, root_scale=K``: in an image grouped as a
whole, also from how many of its requested roots hold the path; the told
default has ``root_scale=10`` since the sixth issue-17 round, so
``--root-scale 0`` runs the told mode of the rounds before, as row
``churn-aware-dominators+registry, root_scale=0``).
``--storage-rows`` runs only the rows the registry storage claim compares
(the baselines, ``nixery-popularity-transitive`` and ours), faster, and
labels each of ours ``at or below`` or ``OVER`` Nixery-transitive's storage
(:func:`~nixery_core_sim.evaluation.format_storage_verdicts`).

See :mod:`nixery_core_sim.universe` for the simulated package set and
:mod:`nixery_core_sim.evaluation` for the measures.

    .venv/bin/python benchmarks/layering_sim.py --by-kind     # the calibrated universe
    .venv/bin/python benchmarks/layering_sim.py --quick       # a small one
    .venv/bin/python benchmarks/layering_sim.py --registry    # ours with prior layers too
    .venv/bin/python benchmarks/layering_sim.py --registry --reference-scale 40
    .venv/bin/python benchmarks/layering_sim.py --closure a.json --closure b.json [--series]
    .venv/bin/python benchmarks/layering_sim.py --offline-set [--max-layers 4]

``--closure`` measures real closures instead: files in the shape of
``nix path-info --json -r`` or ``{"paths": [...], "requested": {...}}``,
as a corpus (sharing), and with ``--series`` also as consecutive revisions
of one image (churn).  ``--offline-set`` realises images of the repository's
offline package set (``nix/offline``) with Nix, no binary cache, and
measures them as a corpus; their closures hold a handful of paths, so give
a small ``--max-layers`` to see grouping at work.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

import attrs

from nixery_core.errors import InvalidInput
from nixery_core.graph import RuntimeGraph
from nixery_core.layering import DEFAULT_MAX_LAYERS, DEFAULT_STRATEGY, ChurnAwareDominators
from nixery_core.names import Image
from nixery_core.nixexprs import offline_package_set
from nixery_core.protocols import LayeringStrategy
from nixery_core.runner import SubprocessRunner
from nixery_core.sources import LocalPathSource
from nixery_core_sim.evaluation import (
    NIXERY_TRANSITIVE,
    PerPath,
    Report,
    SingleLayer,
    WithRegistry,
    closure_from_json,
    format_by_kind,
    format_calibration,
    format_partial,
    format_report,
    format_storage_verdicts,
    measure,
    published_strategies,
    realise_corpus,
    simulate,
    verdict,
)
from nixery_core_sim.universe import UniverseConfig

#: The row of ours told which layers the registry already stores (``--registry``).
REGISTRY_ROW = f"{DEFAULT_STRATEGY.name}+registry"

#: The same, with the chance of being elsewhere also from references (``--reference-scale``).
REFERENCES_ROW = f"{REGISTRY_ROW}+refs"


def roots_row(scale: float) -> str:
    """The row of ours told the record with ``root_scale=scale`` (``--root-scale``).

    Named for its scale: 0 is the told mode before the sixth issue-17 round, when
    ``root_scale`` was off by default; the told default (``REGISTRY_ROW``) has 10.
    """
    return f"{REGISTRY_ROW}, root_scale={scale:g}"


#: Images of the offline package set measured by ``--offline-set``.
OFFLINE_IMAGES = ("shell", "hello", "shell/hello", "edge-cases", "xorg.xev/multiout")


def measure_real(
    series: Sequence[Sequence[tuple[str, RuntimeGraph]]], budget: int, *, by_kind: bool
) -> str:
    """The table for real closures (no popularity table: Nixery counts references)."""
    strategies: list[LayeringStrategy] = [
        SingleLayer(),
        PerPath(),
        *published_strategies(None),
        DEFAULT_STRATEGY,
    ]
    report = measure(series, [(s.name, s.group) for s in strategies], budget)
    text = format_report(report)
    return text + ("\n\n" + format_by_kind(report) if by_kind else "")


def _with_references(
    parser: argparse.ArgumentParser,
    scale: float | None,
    *,
    registry: bool,
    option: str = "--reference-scale",
    field: str = "reference_scale",
) -> ChurnAwareDominators | None:
    """Ours with ``field`` (``reference_scale``) from ``option``; a bad scale is a usage error."""
    if scale is None:
        return None
    if not registry:
        parser.error(f"{option} needs --registry")
    try:  # the strategy's own validator says what a scale may be
        if field == "root_scale":
            return attrs.evolve(DEFAULT_STRATEGY, root_scale=scale)
        return attrs.evolve(DEFAULT_STRATEGY, reference_scale=scale)
    except InvalidInput as exc:
        parser.error(f"{option}: {exc}")


def print_report(
    report: Report,
    ours: Sequence[LayeringStrategy],
    *,
    storage_rows: bool,
    by_kind: bool,
    registry: bool,
) -> None:
    """Print a simulation's tables and verdicts (``main``'s output for a synthetic universe)."""
    if report.calibration is not None:
        print(format_calibration(report.calibration))
        print()
    print(format_report(report))
    if storage_rows:
        print()
        print(format_storage_verdicts(report))
    else:
        print()
        print("Whole-layer clients against partial-pull clients (files and chunks, see")
        print("nixery_core_sim.files; eStargz or zstd:chunked layers pulled by podman):")
        print()
        print(format_partial(report))
    if by_kind:
        print()
        print(format_by_kind(report))
    print()
    for strategy in ours:
        print("\n".join(verdict(report, strategy.name).lines(strategy.name)))
    if registry:
        print()
        floor = report.tally(PerPath().name).stored_all_revisions
        transitive = report.tally(NIXERY_TRANSITIVE).stored_all_revisions
        for t in report.tallies:
            print(
                f"{t.name}: stored over all revisions {t.stored_all_revisions / 1e9:.2f} GB, "
                f"{t.stored_all_revisions / max(1, floor):.3f}x the floor, "
                f"{t.stored_all_revisions / max(1, transitive):.3f}x {NIXERY_TRANSITIVE}"
            )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--packages", type=int, help="generated packages in the universe")
    parser.add_argument("--revisions", type=int, help="weekly revisions after the first")
    parser.add_argument("--update-rate", type=float, help="weekly update chance per package")
    parser.add_argument("--security-fixes", type=float, help="patched libraries per week")
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
    parser.add_argument(
        "--offline-set",
        action="store_true",
        help="realise images of nix/offline with Nix and measure them as a corpus",
    )
    parser.add_argument("--by-kind", action="store_true", help="also print churn per image kind")
    parser.add_argument(
        "--registry",
        action="store_true",
        help=f"also run ours told which layers the registry stores ({REGISTRY_ROW})",
    )
    parser.add_argument(
        "--root-scale",
        type=float,
        help=f"with --registry, also run ours told with root_scale=K (row {REGISTRY_ROW}, "
        "root_scale=K)",
    )
    parser.add_argument(
        "--storage-rows",
        action="store_true",
        help="only the baselines, nixery-popularity-transitive and ours (no partial-pull "
        "client, no calibration): the registry storage claim's figures, faster",
    )
    parser.add_argument(
        "--reference-scale",
        type=float,
        help=f"with --registry, also run {REFERENCES_ROW} (reference_scale=K)",
    )
    args = parser.parse_args(argv)
    refs = _with_references(parser, args.reference_scale, registry=args.registry)
    roots = _with_references(
        parser, args.root_scale, registry=args.registry, option="--root-scale", field="root_scale"
    )
    budget = args.max_layers - 1
    if args.closure:
        graphs = [closure_from_json(p.read_bytes(), str(p)) for p in args.closure]
        series = [[("real", g)] for g in graphs] if args.series else [[("real", g) for g in graphs]]
        print(measure_real(series, budget, by_kind=args.by_kind))
        return 0
    if args.offline_set:
        spec = LocalPathSource(offline_package_set()).resolve("latest")
        images = [Image.from_name(name) for name in OFFLINE_IMAGES]
        corpus = realise_corpus(
            images, spec, runner=SubprocessRunner(), nix_options={"substituters": ""}
        )
        for name, graph in corpus:
            print(f"{name}: {len(graph)} store paths, {graph.total_size / 1e6:.2f} MB")
        print()
        print(measure_real([corpus], budget, by_kind=False))
        return 0
    config = UniverseConfig.quick(args.seed) if args.quick else UniverseConfig(seed=args.seed)
    overrides = {
        "packages": args.packages,
        "revisions": args.revisions,
        "update_rate": args.update_rate,
        "security_fixes": args.security_fixes,
        "mass_rebuild_every": args.mass_rebuild_every,
        "small_images": args.small_images,
        "large_images": args.large_images,
    }
    config = attrs.evolve(config, **{k: v for k, v in overrides.items() if v is not None})
    ours: list[LayeringStrategy] = [DEFAULT_STRATEGY]
    if args.registry:
        ours.append(WithRegistry(REGISTRY_ROW, DEFAULT_STRATEGY))
    if refs is not None:
        ours.append(WithRegistry(REFERENCES_ROW, refs))
    if roots is not None:
        ours.append(WithRegistry(roots_row(roots.root_scale), roots))
    report = simulate(config, budget, ours, storage_rows=args.storage_rows)
    print_report(
        report, ours, storage_rows=args.storage_rows, by_kind=args.by_kind, registry=args.registry
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
