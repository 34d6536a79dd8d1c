"""Measure strategies against each other: pull churn, registry sharing, layer count, time.

:func:`measure` walks a series of revisions of a set of images (each a
:class:`~nixery_core.graph.RuntimeGraph`) and groups every image with every
strategy.  Per strategy it reports:

- churn per image (``Tally.churn_per_image``): the bytes a client pulls
  across the revisions after the first, one client per image that pulls it
  at every revision and keeps every blob it pulled (a layer is the same blob
  exactly when it holds the same store paths, since store paths are
  input-addressed).  This is how the field measures churn: a series of
  image revisions.  ``churn_by_kind`` is the same, summed by image kind;
- churn on one node (``Tally.churn``): the same with one client pulling
  every image, so a layer another image already brought is not pulled
  again (a node running all the images; layers shared between images count);
- sharing: the unique layer bytes a registry stores for the images of the
  first revision (registry storage across images); and over every revision
  (``Tally.stored_all_revisions``: what a registry that keeps every blob
  holds at the end, where churn adds blobs);
- with content keys per revision, the same two churn measures for a
  partial-pull client (``Tally.partial_churn``, ``partial_churn_by_kind``):
  one that fetches only the files and chunks it lacks
  (:class:`~nixery_core_sim.files.PartialPullingClient`);
- layers per image (``Tally.layers``, and by image kind at the first
  revision, ``Tally.layers_by_kind``) and grouping time (CPU seconds).

Two baselines frame the numbers: one layer per image (:class:`SingleLayer`)
and one layer per store path (:class:`PerPath`), the floor no grouping can
beat.  :func:`simulate` runs it all on a synthetic
:class:`~nixery_core_sim.universe.Universe` and measures how the
universe compares with the published measurements (:class:`Calibration`);
pass your own strategy in ``ours`` to compare it with the published ones.
:func:`realise_corpus` realises real images with Nix for the same measures.
"""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Callable, Hashable, Mapping, Sequence
from typing import Protocol, runtime_checkable

import attrs

from nixery_core.errors import InvalidInput
from nixery_core.graph import RuntimeGraph
from nixery_core.layering.churn_aware import ChurnAwareDominators
from nixery_core.layering.common import package_name, validate_grouping
from nixery_core.layering.metrics import PullingClient, layer_bytes, unique_layer_bytes
from nixery_core.layering.nixery import NixeryPopularity
from nixery_core.layering.references import ReferencesByPopularity
from nixery_core.layering.size_first import SizeFirst
from nixery_core.names import Image
from nixery_core.nix import parse_path_info_output, realise
from nixery_core.protocols import JSONValue, LayerGroup, LayeringStrategy, Runner
from nixery_core.sources import SourceSpec
from nixery_core_sim.files import FileModel, PartialPullingClient
from nixery_core_sim.universe import Universe, UniverseConfig, choose_images, image_graph

__all__ = [
    "CALIBRATION_TARGETS",
    "NIXERY_TRANSITIVE",
    "PUBLISHED",
    "TARGET_CHURN_VS_BEST",
    "TARGET_CHURN_VS_FLOOR",
    "TARGET_SHARING_VS_BEST",
    "Calibration",
    "KeepsRecord",
    "PerPath",
    "Renamed",
    "Report",
    "SingleLayer",
    "Tally",
    "Verdict",
    "WithRegistry",
    "calibrate",
    "closure_from_json",
    "format_by_kind",
    "format_calibration",
    "format_partial",
    "format_report",
    "format_storage_verdicts",
    "grouper_of",
    "measure",
    "published_strategies",
    "realise_corpus",
    "simulate",
    "verdict",
]


_Grouper = Callable[[RuntimeGraph, int], Sequence[LayerGroup]]


@attrs.frozen
class SingleLayer:
    """Baseline: the whole closure in one layer."""

    @property
    def name(self) -> str:
        return "single-layer"

    def parameters(self) -> Mapping[str, JSONValue]:
        return {}

    def group(self, graph: RuntimeGraph, budget: int) -> Sequence[LayerGroup]:
        return [LayerGroup(tuple(sorted(graph.paths)))] if graph.paths else []


@attrs.frozen
class PerPath:
    """Baseline and floor: every store path its own layer, budget ignored."""

    @property
    def name(self) -> str:
        return "per-path (floor)"

    def parameters(self) -> Mapping[str, JSONValue]:
        return {}

    def group(self, graph: RuntimeGraph, budget: int) -> Sequence[LayerGroup]:
        return [LayerGroup((p,)) for p in sorted(graph.paths)]


@attrs.frozen
class Renamed:
    """A strategy reported under another name: one strategy with other inputs, side by side."""

    name: str
    strategy: LayeringStrategy

    def parameters(self) -> Mapping[str, JSONValue]:
        return self.strategy.parameters()

    def group(self, graph: RuntimeGraph, budget: int) -> Sequence[LayerGroup]:
        return self.strategy.group(graph, budget)


@attrs.frozen
class WithRegistry:
    """Ours, told at every build which layers the registry already stores (``prior_layers``).

    In :func:`simulate` (through :func:`grouper_of`), each image is grouped
    with ``strategy.with_prior_layers(...)``, as a builder with
    ``prior_layers_from_cache`` does, naming every layer stored so far: the
    layers of the images built before it at this revision (in the fixed
    image order) and of every earlier revision (so ``told_registry`` is set,
    even for the first image, told an empty record).  The
    record lives in the simulation, as it would in a registry; the strategy
    itself stays a pure function of its inputs.
    """

    name: str
    strategy: ChurnAwareDominators = attrs.field(factory=ChurnAwareDominators)
    #: False: the record is passed as ``prior_layers`` only, without
    #: ``told_registry`` (first-form sharing cost: the first issue-17 round).
    told: bool = True

    def parameters(self) -> Mapping[str, JSONValue]:
        return self.strategy.parameters()

    def group(self, graph: RuntimeGraph, budget: int) -> Sequence[LayerGroup]:
        """Without a registry record: the strategy as it is."""
        return self.strategy.group(graph, budget)

    def grouper(self) -> _Grouper:
        """A fresh grouper that records every layer it returns and feeds them back."""
        # The record grows with each build (adding_prior_layers checks only
        # the new layers): the same as passing every layer stored so far.
        strategy = self.strategy.with_prior_layers(()) if self.told else self.strategy

        def group(graph: RuntimeGraph, budget: int) -> Sequence[LayerGroup]:
            nonlocal strategy
            groups = strategy.group(graph, budget)
            strategy = strategy.adding_prior_layers(g.paths for g in groups)
            return groups

        return group


@runtime_checkable
class KeepsRecord(Protocol):
    """A strategy that groups differently once it sees what was built before it."""

    def grouper(self) -> _Grouper:
        """A fresh grouper, with an empty record of its own."""
        ...


def grouper_of(strategy: LayeringStrategy) -> _Grouper:
    """What :func:`measure` calls for ``strategy`` (a fresh record for :class:`KeepsRecord`)."""
    return strategy.grouper() if isinstance(strategy, KeepsRecord) else strategy.group


@attrs.define
class Tally:
    """What one strategy scored.

    ``churn``: one client pulling every image; ``churn_by_kind``: a client
    per image, summed by image kind (``churn_per_image`` is their total).
    """

    name: str
    churn: int = 0
    shared: int = 0
    layers: list[int] = attrs.Factory(list)
    seconds: float = 0.0
    churn_by_kind: dict[str, int] = attrs.Factory(dict)
    #: The same churn measures for a partial-pull client (0 when not measured).
    partial_churn: int = 0
    partial_churn_by_kind: dict[str, int] = attrs.Factory(dict)
    #: Layers of each image at the first revision, by image kind.
    layers_by_kind: dict[str, list[int]] = attrs.Factory(dict)
    #: Unique layer bytes a registry stores for every image of every revision.
    stored_all_revisions: int = 0

    @property
    def churn_per_image(self) -> int:
        return sum(self.churn_by_kind.values())

    @property
    def partial_churn_per_image(self) -> int:
        return sum(self.partial_churn_by_kind.values())


_BASELINES = frozenset({SingleLayer().name, PerPath().name})


@attrs.frozen
class Calibration:
    """What the simulated universe looks like, next to the published measurements.

    Churn ratios are per image (a client per image) against one layer per
    image.  ``catch_all_share`` is the share of the largest image's bytes in
    ``referencesByPopularity``'s catch-all layer.  ``paths`` maps an image
    kind to the (fewest, median, most) store paths of its images;
    ``tiny_share`` is the share of store paths under 100 kB and
    ``huge_paths`` the number of distinct paths over 100 MB, over every
    image of the first revision.
    """

    nixery_vs_single: float
    references_vs_single: float
    size_first_vs_single: float
    catch_all_share: float
    largest_image_bytes: int
    paths: Mapping[str, tuple[int, int, int]]
    tiny_share: float
    huge_paths: int


#: The published figures the universe is calibrated against (see
#: ``docs/layering.md``): (what, published value, how it is read here).
CALIBRATION_TARGETS: tuple[tuple[str, str, str], ...] = (
    ("popularity layering, churn / single layer", "0.94", "nixery-popularity and "
     "references-by-popularity, per image"),
    ("size-first, churn / single layer", "about half of popularity (0.45-0.5)", "per image"),
    ("references-by-popularity catch-all, share of a 4 GB image", "0.71", "the largest image"),
    ("store paths per image", "shell tools 50-150, Python or GHC 300-2000, "
     "a large desktop-like image a few thousand", "fewest / median / most per kind"),
    ("NAR sizes", "many paths under 100 kB, some over 100 MB", "share under 100 kB, "
     "count over 100 MB"),
)


@attrs.frozen
class Report:
    """Every strategy's tally, plus the image bytes the ratios are taken against."""

    tallies: tuple[Tally, ...]
    total_image_bytes: int
    budget: int
    images: int
    revisions: int
    calibration: Calibration | None = None

    def tally(self, name: str) -> Tally:
        """The tally of the strategy called ``name`` (KeyError if none)."""
        for t in self.tallies:
            if t.name == name:
                return t
        raise KeyError(name)


def _timed(
    strategy: _Grouper, graph: RuntimeGraph, limit: int, budget: int, tally: Tally
) -> Sequence[LayerGroup]:
    start = time.process_time()
    groups = strategy(graph, budget)
    tally.seconds += time.process_time() - start
    validate_grouping(graph, groups, limit)
    tally.layers.append(len(groups))
    return groups


def measure(
    series: Sequence[Sequence[tuple[str, RuntimeGraph]]],
    strategies: Sequence[tuple[str, _Grouper]],
    budget: int,
    contents: Sequence[Mapping[str, Hashable]] | None = None,
    files: FileModel | None = None,
) -> Report:
    """Churn over ``series`` (revisions, each a list of (kind, image graph)); sharing at the first.

    ``churn`` is what one client pulling every image at every revision
    fetches after the first revision; ``churn_by_kind`` is what a client per
    image fetches, summed by image kind.  Every grouping is checked with
    :func:`~nixery_core.layering.common.validate_grouping` (the baselines
    may exceed the budget), so a faulty strategy raises
    :class:`~nixery_core.errors.InvalidInput` instead of scoring.
    ``contents`` (per revision, store path -> content key, see
    :mod:`nixery_core_sim.files`) adds the partial-pull client's churn,
    with ``files`` (default :class:`~nixery_core_sim.files.FileModel`).
    """
    if not series or not series[0]:
        raise InvalidInput("measure needs at least one revision of at least one image")
    if contents is not None and len(contents) != len(series):
        raise InvalidInput("measure needs one content map per revision")
    model = files or FileModel()
    tallies = [Tally(name) for name, _ in strategies]
    for (name, group), tally in zip(strategies, tallies, strict=True):
        baseline = name in _BASELINES
        shared_client = PullingClient()
        clients = [PullingClient() for _ in series[0]]
        partial_shared = PartialPullingClient(model)
        partial_clients = [PartialPullingClient(model) for _ in series[0]]
        stored: dict[tuple[str, ...], int] = {}
        for rev, images in enumerate(series):
            corpus = []
            per_image = zip(images, clients, partial_clients, strict=True)
            for (kind, graph), client, partial_client in per_image:
                limit = max(budget, len(graph)) if baseline else budget
                groups = _timed(group, graph, limit, budget, tally)
                fetched = client.pull(graph, groups)
                fetched_shared = shared_client.pull(graph, groups)
                if rev:
                    tally.churn += fetched_shared
                    tally.churn_by_kind[kind] = tally.churn_by_kind.get(kind, 0) + fetched
                if contents is not None:
                    keys = contents[rev]
                    partial = partial_client.pull(graph, groups, keys)
                    partial_one_node = partial_shared.pull(graph, groups, keys)
                    if rev:
                        tally.partial_churn += partial_one_node
                        by_kind = tally.partial_churn_by_kind
                        by_kind[kind] = by_kind.get(kind, 0) + partial
                corpus.append((graph, groups))
                if rev == 0:
                    tally.layers_by_kind.setdefault(kind, []).append(len(groups))
            if rev == 0:
                tally.shared = unique_layer_bytes(corpus)
            _record_stored(stored, corpus)
        tally.stored_all_revisions = sum(stored.values())
    total = sum(g.total_size for _, g in series[0])
    return Report(tuple(tallies), total, budget, len(series[0]), len(series) - 1)


def _record_stored(
    stored: dict[tuple[str, ...], int],
    corpus: Sequence[tuple[RuntimeGraph, Sequence[LayerGroup]]],
) -> None:
    """Add the layers of ``corpus`` a registry does not hold yet to ``stored`` (bytes each)."""
    for graph, groups in corpus:
        for group in groups:
            if group.paths not in stored:
                stored[group.paths] = layer_bytes(graph, group)


def simulate(
    config: UniverseConfig,
    budget: int,
    ours: Sequence[LayeringStrategy] = (ChurnAwareDominators(),),
    *,
    storage_rows: bool = False,
) -> Report:
    """Build the universe, walk its revisions, measure the baselines, the published and ``ours``.

    Nixery's strategy gets a popularity table computed over the whole
    universe at the first revision, as Nixery's was over all of nixpkgs:
    once counting direct dependents (``nixery-popularity``, Nixery's
    ``popcount``) and once counting transitive dependents
    (``nixery-popularity-transitive``).  The report carries the universe's
    :class:`Calibration`.  With ``storage_rows``, only what the registry
    storage claim compares is run (the baselines, Nixery's strategy with the
    transitive table and ``ours``), without the partial-pull client or the
    calibration: the same figures for those rows, in less time.
    """
    universe = Universe(config)
    published = published_strategies(universe.popularity(), universe.popularity(transitive=True))
    if storage_rows:
        published = [s for s in published if s.name == NIXERY_TRANSITIVE]
    strategies: list[LayeringStrategy] = [SingleLayer(), PerPath(), *published, *ours]
    images = choose_images(universe)
    series = []
    contents = []
    for rev in range(config.revisions + 1):
        if rev:
            universe.advance()
        paths = universe.store_paths()
        series.append([(img.kind, image_graph(universe, paths, img)) for img in images])
        if not storage_rows:
            contents.append(universe.content_keys(paths))
    groupers = [(s.name, grouper_of(s)) for s in strategies]
    report = measure(series, groupers, budget, None if storage_rows else contents)
    if storage_rows:
        return report
    return attrs.evolve(report, calibration=calibrate(report, series[0]))


def calibrate(report: Report, corpus: Sequence[tuple[str, RuntimeGraph]]) -> Calibration:
    """The :class:`Calibration` figures of ``report``, measured on ``corpus`` (kind, graph)."""
    single = report.tally(SingleLayer().name).churn_per_image

    def ratio(name: str) -> float:
        return report.tally(name).churn_per_image / max(1, single)

    largest = max((g for _, g in corpus), key=lambda g: (g.total_size, len(g)))
    groups = ReferencesByPopularity().group(largest, report.budget)
    catch_all = max(groups, key=lambda g: len(g.paths))
    catch_all_bytes = sum(largest.paths[p].nar_size for p in catch_all.paths)
    counts: dict[str, list[int]] = {}
    for kind, graph in corpus:
        counts.setdefault(kind, []).append(len(graph))
    sizes = {p: sp.nar_size for _, g in corpus for p, sp in g.paths.items()}
    return Calibration(
        nixery_vs_single=ratio(NixeryPopularity().name),
        references_vs_single=ratio(ReferencesByPopularity().name),
        size_first_vs_single=ratio(SizeFirst().name),
        catch_all_share=catch_all_bytes / max(1, largest.total_size),
        largest_image_bytes=largest.total_size,
        paths={
            k: (min(v), int(statistics.median(v)), max(v)) for k, v in sorted(counts.items())
        },
        tiny_share=sum(s < 100_000 for s in sizes.values()) / max(1, len(sizes)),
        huge_paths=sum(s > 100_000_000 for s in sizes.values()),
    )


#: Nixery's strategy with a popularity table counted over transitive dependents.
NIXERY_TRANSITIVE = "nixery-popularity-transitive"


def published_strategies(
    popularity: Mapping[str, int] | None, transitive: Mapping[str, int] | None = None
) -> list[LayeringStrategy]:
    """Nixery's, nixpkgs' referencesByPopularity and nixpkgs' auto-layer.

    With a ``transitive`` table, Nixery's strategy also runs with it, as
    :data:`NIXERY_TRANSITIVE`.
    """
    nixery: list[LayeringStrategy] = [NixeryPopularity(popularity)]
    if transitive is not None:
        nixery.append(Renamed(NIXERY_TRANSITIVE, NixeryPopularity(transitive)))
    return [*nixery, ReferencesByPopularity(), SizeFirst()]


PUBLISHED = ("nixery-popularity", NIXERY_TRANSITIVE, "references-by-popularity", "size-first")


#: The targets ours was set: churn at most 0.7x the best published strategy
#: and within 1.3x of the per-path floor; sharing no worse than the best.
TARGET_CHURN_VS_BEST = 0.7
TARGET_CHURN_VS_FLOOR = 1.3
TARGET_SHARING_VS_BEST = 1.0


@attrs.frozen
class Verdict:
    """Ours against the best published strategy and the floor (ratios; lower is better).

    ``churn_*`` are for one client pulling every image, ``per_image_*`` for
    a client per image.  ``floor_vs_best`` and ``per_image_floor_vs_best``
    are the per-path floor against the best published strategy: no grouping
    can get the matching ``*_vs_best`` below them.
    """

    churn_vs_best: float
    churn_vs_floor: float
    sharing_vs_best: float
    floor_vs_best: float
    per_image_vs_best: float = 0.0
    per_image_vs_floor: float = 0.0
    per_image_floor_vs_best: float = 0.0
    #: Sharing against Nixery's strategy with a transitive popularity table (0 if not run).
    sharing_vs_transitive: float = 0.0

    @property
    def met(self) -> bool:
        """Whether every target is met, on both churn measures."""
        return (
            max(self.churn_vs_best, self.per_image_vs_best) <= TARGET_CHURN_VS_BEST
            and max(self.churn_vs_floor, self.per_image_vs_floor) <= TARGET_CHURN_VS_FLOOR
            and self.sharing_vs_best <= TARGET_SHARING_VS_BEST
        )

    def lines(self, name: str) -> list[str]:
        def mark(value: float, target: float) -> str:
            return f"{value:.3f}x (target <= {target}: {'met' if value <= target else 'MISSED'})"

        best, floor = TARGET_CHURN_VS_BEST, TARGET_CHURN_VS_FLOOR
        return [
            f"{name}: churn per image vs the best published {mark(self.per_image_vs_best, best)}",
            f"{name}: churn per image vs the per-path floor "
            f"{mark(self.per_image_vs_floor, floor)}",
            f"{name}: churn on one node vs the best published {mark(self.churn_vs_best, best)}",
            f"{name}: churn on one node vs the per-path floor {mark(self.churn_vs_floor, floor)}",
            f"{name}: sharing vs the best published "
            f"{mark(self.sharing_vs_best, TARGET_SHARING_VS_BEST)}",
            *(
                [
                    f"{name}: sharing vs {NIXERY_TRANSITIVE} "
                    f"{mark(self.sharing_vs_transitive, TARGET_SHARING_VS_BEST)}"
                ]
                if self.sharing_vs_transitive
                else []
            ),
            f"the per-path floor itself is {self.per_image_floor_vs_best:.3f}x (per image) and "
            f"{self.floor_vs_best:.3f}x (one node) the best published churn",
        ]


def verdict(report: Report, ours: str) -> Verdict:
    """How ``ours`` compares with the best published strategy and the floor."""
    published = [report.tally(n) for n in PUBLISHED if any(t.name == n for t in report.tallies)]
    mine = report.tally(ours)
    floor = report.tally(PerPath().name)
    best_churn = min(t.churn for t in published)
    best_per_image = min(t.churn_per_image for t in published)
    best_shared = min(t.shared for t in published)
    transitive = [t.shared for t in published if t.name == NIXERY_TRANSITIVE]
    return Verdict(
        churn_vs_best=mine.churn / max(1, best_churn),
        churn_vs_floor=mine.churn / max(1, floor.churn),
        sharing_vs_best=mine.shared / max(1, best_shared),
        floor_vs_best=floor.churn / max(1, best_churn),
        per_image_vs_best=mine.churn_per_image / max(1, best_per_image),
        per_image_vs_floor=mine.churn_per_image / max(1, floor.churn_per_image),
        per_image_floor_vs_best=floor.churn_per_image / max(1, best_per_image),
        sharing_vs_transitive=mine.shared / max(1, transitive[0]) if transitive else 0.0,
    )


def _unit(report: Report) -> tuple[float, str]:
    """Bytes per printed unit and its name: GB, or MB for a small corpus."""
    return (1e9, "GB") if report.total_image_bytes >= 1e9 else (1e6, "MB")


def format_report(report: Report) -> str:
    """The table: churn per image, churn on one node, sharing, layers, time (GB, or MB if small)."""
    single = report.tally(SingleLayer().name)
    floor = report.tally(PerPath().name)
    gb, unit = _unit(report)
    lines = [
        f"{report.images} images, {report.revisions} revisions after the first, "
        f"budget {report.budget} layers per image, "
        f"{report.total_image_bytes / gb:.2f} {unit} of images per revision",
        "",
        f"| strategy | churn per image {unit} | /single | /floor | churn one node {unit} "
        f"| /single | /floor | sharing {unit} | /sum | /floor | layers mean | max | time s |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: "
        "| ---: |",
    ]
    for t in report.tallies:
        mean = sum(t.layers) / max(1, len(t.layers))
        per_image = t.churn_per_image
        lines.append(
            f"| {t.name} | {per_image / gb:.2f} "
            f"| {per_image / max(1, single.churn_per_image):.3f} "
            f"| {per_image / max(1, floor.churn_per_image):.3f} "
            f"| {t.churn / gb:.2f} | {t.churn / max(1, single.churn):.3f} "
            f"| {t.churn / max(1, floor.churn):.3f} | {t.shared / gb:.2f} "
            f"| {t.shared / max(1, report.total_image_bytes):.3f} "
            f"| {t.shared / max(1, floor.shared):.3f} | {mean:.1f} | {max(t.layers, default=0)} "
            f"| {t.seconds:.2f} |"
        )
    return "\n".join(lines)


def format_storage_verdicts(report: Report) -> str:
    """Each row's registry storage against Nixery's strategy with a transitive table, labelled.

    One line per row but the baselines and that strategy itself: unique
    layer bytes stored at the first revision, their ratio, and ``at or
    below`` or ``OVER`` (the claim each held-out run is read by); empty if
    the report has no :data:`NIXERY_TRANSITIVE` row.
    """
    if not any(t.name == NIXERY_TRANSITIVE for t in report.tallies):
        return ""
    transitive = report.tally(NIXERY_TRANSITIVE).shared
    gb, unit = _unit(report)
    lines = []
    for t in report.tallies:
        if t.name in _BASELINES or t.name == NIXERY_TRANSITIVE:
            continue
        ratio = t.shared / max(1, transitive)
        label = "at or below" if t.shared <= transitive else "OVER"
        lines.append(
            f"{t.name}: stored {t.shared / gb:.3f} {unit}, {ratio:.4f}x {NIXERY_TRANSITIVE} "
            f"({transitive / gb:.3f} {unit}): {label}"
        )
    return "\n".join(lines)


def format_partial(report: Report) -> str:
    """Churn for a whole-layer client next to a partial-pull client, per strategy."""
    floor = report.tally(PerPath().name)
    gb, unit = _unit(report)
    lines = [
        f"| strategy | whole-layer, per image {unit} | partial-pull, per image {unit} "
        f"| partial / whole | partial / per-path floor (whole) "
        f"| whole-layer, one node {unit} | partial-pull, one node {unit} | partial / whole |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for t in report.tallies:
        whole, partial = t.churn_per_image, t.partial_churn_per_image
        lines.append(
            f"| {t.name} | {whole / gb:.2f} | {partial / gb:.2f} "
            f"| {partial / max(1, whole):.3f} "
            f"| {partial / max(1, floor.churn_per_image):.3f} "
            f"| {t.churn / gb:.2f} | {t.partial_churn / gb:.2f} "
            f"| {t.partial_churn / max(1, t.churn):.3f} |"
        )
    return "\n".join(lines)


def format_calibration(calibration: Calibration) -> str:
    """The universe next to the published measurements it is calibrated against."""
    c = calibration
    paths = "; ".join(f"{k} {lo} / {mid} / {hi}" for k, (lo, mid, hi) in c.paths.items())
    measured = (
        f"nixery-popularity {c.nixery_vs_single:.2f}, "
        f"references-by-popularity {c.references_vs_single:.2f}",
        f"{c.size_first_vs_single:.2f} "
        f"({c.size_first_vs_single / max(1e-9, c.references_vs_single):.2f}x "
        f"references-by-popularity)",
        f"{c.catch_all_share:.2f} of {c.largest_image_bytes / 1e9:.1f} GB",
        paths,
        f"{c.tiny_share:.0%} under 100 kB, {c.huge_paths} over 100 MB",
    )
    lines = [
        "| calibration | published | read here as | this universe |",
        "| --- | --- | --- | --- |",
    ]
    for (what, published, how), value in zip(CALIBRATION_TARGETS, measured, strict=True):
        lines.append(f"| {what} | {published} | {how} | {value} |")
    return "\n".join(lines)


def format_by_kind(report: Report) -> str:
    """Churn per image summed by image kind; then each image's layers by kind (first revision)."""
    kinds = sorted({k for t in report.tallies for k in t.churn_by_kind})
    lines = [
        "| churn GB, client per image | " + " | ".join(kinds) + " |",
        "| --- |" + " ---: |" * len(kinds),
    ]
    for t in report.tallies:
        cells = " | ".join(f"{t.churn_by_kind.get(k, 0) / 1e9:.2f}" for k in kinds)
        lines.append(f"| {t.name} | {cells} |")
    kinds = sorted({k for t in report.tallies for k in t.layers_by_kind})
    lines += [
        "",
        "| layers per image, first revision | " + " | ".join(kinds) + " |",
        "| --- |" + " --- |" * len(kinds),
    ]
    for t in report.tallies:
        cells = " | ".join(
            " ".join(str(n) for n in t.layers_by_kind.get(k, [])) for k in kinds
        )
        lines.append(f"| {t.name} | {cells} |")
    return "\n".join(lines)


def closure_from_json(text: str | bytes, source: str = "closure") -> RuntimeGraph:
    """A graph from ``nix path-info --json -r`` output, or ``{"paths": ..., "requested": ...}``.

    ``paths`` takes either form Nix prints (a list, or a mapping keyed by
    store path).  Without ``requested``, every path nothing references is
    requested under its package name.  Malformed path entries raise
    :class:`~nixery_core.errors.NixOutputError`; an inconsistent graph
    raises :class:`~nixery_core.errors.InvalidInput`.
    """
    raw = text.encode() if isinstance(text, str) else text
    try:
        data = json.loads(raw)
    except ValueError as exc:
        raise InvalidInput(f"{source} is not JSON: {exc}") from exc
    requested_data: object = None
    if isinstance(data, dict) and "paths" in data:
        requested_data = data.get("requested")
        raw = json.dumps(data["paths"]).encode()
    store_paths = parse_path_info_output(("closure-from-json", source), raw)
    if requested_data is None:
        referenced = {r for sp in store_paths for r in sp.references if r != sp.path}
        requested = {
            package_name(sp.path): (sp.path,) for sp in store_paths if sp.path not in referenced
        }
    elif isinstance(requested_data, dict) and all(
        isinstance(k, str) and isinstance(v, list) and all(isinstance(p, str) for p in v)
        for k, v in requested_data.items()
    ):
        requested = {k: tuple(v) for k, v in requested_data.items()}
    else:
        raise InvalidInput(f"{source}: requested must map package names to lists of store paths")
    try:
        return RuntimeGraph.build(store_paths, requested)
    except ValueError as exc:
        raise InvalidInput(f"{source}: {exc}") from exc


def realise_corpus(
    images: Sequence[Image],
    spec: SourceSpec,
    *,
    runner: Runner,
    nix_options: Mapping[str, str] | None = None,
    timeout: float = 120.0,
) -> list[tuple[str, RuntimeGraph]]:
    """Realise ``images`` with Nix (:func:`~nixery_core.nix.realise`); (image name, graph) each.

    The result is a corpus for :func:`measure` (one revision: sharing and
    layer counts; churn needs a second revision).  Nix errors propagate as
    the library's typed errors.
    """
    return [
        (image.name, realise(image, spec, runner=runner, timeout=timeout,
                             nix_options=nix_options))
        for image in images
    ]
