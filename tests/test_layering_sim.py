"""The churn and sharing simulator: its universe, its measures, and ours against the others."""

from __future__ import annotations

import importlib.util
import json
import re
import subprocess
import sys
from pathlib import Path

import attrs
import pytest

from nixery_core.errors import InvalidInput, NixOutputError
from nixery_core.graph import RuntimeGraph
from nixery_core.layering import DEFAULT_MAX_LAYERS, DEFAULT_STRATEGY
from nixery_core.layering.common import IndexedGraph
from nixery_core.protocols import LayerGroup
from nixery_core_sim.evaluation import (
    NIXERY_TRANSITIVE,
    PUBLISHED,
    PerPath,
    Report,
    SingleLayer,
    Tally,
    WithRegistry,
    closure_from_json,
    format_storage_verdicts,
    measure,
    simulate,
    verdict,
)
from nixery_core_sim.universe import Universe, UniverseConfig, random_closure

REPO = Path(__file__).resolve().parent.parent


def _offline_images() -> tuple[str, ...]:
    spec = importlib.util.spec_from_file_location(
        "layering_sim", REPO / "benchmarks" / "layering_sim.py"
    )
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return tuple(module.OFFLINE_IMAGES)


OFFLINE_IMAGES = _offline_images()


#: Seeds 1 and 3 were used to tune the default strategy (docs/layering.md):
#: claims are checked on a seed held out from tuning.
HELD_OUT_SEED = 2

#: Ours told the registry's record (``told_registry``, costed by containment) was
#: studied on seeds 11-20 and checked on 101-110; a stored layer holding a root
#: was then found on seed 104 and checked on 201-210; ``reference_scale`` was tuned on
#: seeds 11-20, so seeds 301-310 (this one for the quick universe) were declared held
#: out in docs/layering.md before any result on them was seen.
REFERENCES_HELD_OUT_SEED = 301

#: The told default (``root_scale`` on, stored layers at full weight) was tuned on seeds 1,
#: 3 and 11-40 (docs/layering.md, sixth round), after seeds 501-510 (this one for the quick
#: universe, with one and with three large images) were declared held out there, in a commit
#: of their own, before any result on them was seen.
REGISTRY_HELD_OUT_SEED = 501


@pytest.fixture(scope="module")
def quick_report() -> Report:
    """The quick universe on a held-out seed, measured once for the tests below."""
    return simulate(UniverseConfig.quick(seed=HELD_OUT_SEED), DEFAULT_MAX_LAYERS - 1)


#: Ours told, at every build, which layers the registry stores so far.
REGISTRY = "ours+registry"

#: The same with the chance of being elsewhere also from references (``reference_scale``).
REFERENCES = "ours+registry+refs"

#: The ``reference_scale`` chosen on tuning seeds 11-20 (docs/layering.md, fourth round).
REFERENCE_SCALE = 40

#: Ours told the record as in the rounds before the sixth: ``root_scale`` off.
TOLD_OFF = "ours+registry, root_scale=0"

#: "Not materially more" pulled bytes, written down before the sixth round's held-out run:
#: the told default pulls at most this much more than with ``root_scale`` off.
PULLED_TOLERANCE = 1.03


@pytest.fixture(scope="module")
def registry_report() -> Report:
    """The quick universe on the registry round's held-out seed (one large image), ours told
    (the default, and with ``root_scale`` off) and not told."""
    off = attrs.evolve(DEFAULT_STRATEGY, root_scale=0)
    return simulate(
        UniverseConfig.quick(seed=REGISTRY_HELD_OUT_SEED),
        DEFAULT_MAX_LAYERS - 1,
        [
            DEFAULT_STRATEGY,
            WithRegistry(REGISTRY, DEFAULT_STRATEGY),
            WithRegistry(TOLD_OFF, off),
        ],
    )


@pytest.fixture(scope="module")
def three_large_report() -> Report:
    """The quick universe on the registry round's held-out seed with three large images, ours
    told (the default), only the rows the storage claim compares."""
    return simulate(
        attrs.evolve(UniverseConfig.quick(seed=REGISTRY_HELD_OUT_SEED), large_images=3),
        DEFAULT_MAX_LAYERS - 1,
        [WithRegistry(REGISTRY, DEFAULT_STRATEGY)],
        storage_rows=True,
    )


@pytest.fixture(scope="module")
def references_report() -> Report:
    """The quick universe on the fourth round's held-out seed, ours told with and without
    ``reference_scale``."""
    refs = attrs.evolve(DEFAULT_STRATEGY, reference_scale=REFERENCE_SCALE)
    return simulate(
        UniverseConfig.quick(seed=REFERENCES_HELD_OUT_SEED),
        DEFAULT_MAX_LAYERS - 1,
        [WithRegistry(REGISTRY, DEFAULT_STRATEGY), WithRegistry(REFERENCES, refs)],
        storage_rows=True,
    )


def test_ours_beats_every_published_strategy_on_the_quick_universe(quick_report: Report) -> None:
    """On a held-out seed, ours pulls less than the best published strategy (a client per
    image and one node, Nixery's with either popularity table among them), within 1.3x of
    the floor, and stores no more than each published strategy but Nixery's with a
    transitive table (docs/layering.md measures that gap)."""
    result = verdict(quick_report, DEFAULT_STRATEGY.name)
    assert result.per_image_vs_best < 1.0
    assert result.churn_vs_best < 1.0
    assert result.per_image_vs_floor <= 1.3
    assert result.churn_vs_floor <= 1.3
    ours = quick_report.tally(DEFAULT_STRATEGY.name)
    for name in PUBLISHED:
        if name != NIXERY_TRANSITIVE:
            assert ours.shared <= quick_report.tally(name).shared, name
    assert max(ours.layers) <= DEFAULT_MAX_LAYERS - 1


def test_ours_told_the_stored_layers_stores_no_more_than_nixery_transitive(
    registry_report: Report,
) -> None:
    """On a held-out seed, ours told the registry's record (images built in a fixed order,
    each told every layer stored before it, earlier revisions included) stores no more
    across images than Nixery's strategy with a transitive popularity table, less than ours
    not told, and still pulls less than every published strategy, within 1.3x of the floor;
    over every revision it stores no more either."""
    result = verdict(registry_report, REGISTRY)
    assert result.sharing_vs_transitive <= 1.0
    told = registry_report.tally(REGISTRY)
    assert told.shared < registry_report.tally(DEFAULT_STRATEGY.name).shared
    transitive = registry_report.tally(NIXERY_TRANSITIVE)
    assert told.stored_all_revisions <= transitive.stored_all_revisions
    assert result.per_image_vs_best < 1.0
    assert result.churn_vs_best < 1.0
    assert result.per_image_vs_floor <= 1.3
    assert result.churn_vs_floor <= 1.3
    assert max(told.layers) <= DEFAULT_MAX_LAYERS - 1


def test_reference_scale_stores_no_more_than_nixery_transitive_but_pulls_more(
    references_report: Report,
) -> None:
    """On a held-out seed, ours told the record with ``reference_scale`` (not the default)
    still stores no more across images than Nixery's strategy with a transitive popularity
    table and stays within 1.3x of the floor, but pulls more than told without it, per image
    and on one node, which is why the default leaves it off (docs/layering.md)."""
    refs, told = verdict(references_report, REFERENCES), verdict(references_report, REGISTRY)
    assert refs.sharing_vs_transitive <= 1.0
    assert refs.per_image_vs_floor <= 1.3
    assert refs.churn_vs_floor <= 1.3
    assert refs.per_image_vs_floor > told.per_image_vs_floor
    assert refs.churn_vs_floor > told.churn_vs_floor
    assert max(references_report.tally(REFERENCES).layers) <= DEFAULT_MAX_LAYERS - 1


def test_ours_told_with_three_large_images_stores_no_more_than_nixery_transitive(
    three_large_report: Report,
) -> None:
    """On a held-out seed with three large images (which share most of their libraries), ours
    told the registry's record stores no more across images than Nixery's strategy with a
    transitive popularity table, and a client per image pulls within 1.3x of the floor."""
    result = verdict(three_large_report, REGISTRY)
    assert result.sharing_vs_transitive <= 1.0
    assert result.per_image_vs_floor <= 1.3
    assert max(three_large_report.tally(REGISTRY).layers) <= DEFAULT_MAX_LAYERS - 1


def test_ours_told_pulls_not_materially_more_than_with_root_scale_off(
    registry_report: Report,
) -> None:
    """On a held-out seed, the told default (``root_scale`` on) pulls at most 3% more than
    told with it off, per image and on one node."""
    told, off = registry_report.tally(REGISTRY), registry_report.tally(TOLD_OFF)
    assert told.churn_per_image <= PULLED_TOLERANCE * off.churn_per_image
    assert told.churn <= PULLED_TOLERANCE * off.churn


def test_storage_verdicts_label_each_row_at_or_below_or_over_nixery_transitive() -> None:
    """``--storage-rows`` output labels each of ours ``at or below`` when it stores no more
    than Nixery's strategy with a transitive table (equal included) and ``OVER`` otherwise,
    and leaves the baselines and that strategy itself unlabelled."""
    report = Report(
        tallies=(
            Tally(SingleLayer().name, shared=300),
            Tally(PerPath().name, shared=90),
            Tally(NIXERY_TRANSITIVE, shared=100),
            Tally("equal", shared=100),
            Tally("less", shared=99),
            Tally("more", shared=101),
        ),
        total_image_bytes=300,
        budget=93,
        images=1,
        revisions=0,
    )
    lines = format_storage_verdicts(report).splitlines()
    assert [line.split(":")[0] for line in lines] == ["equal", "less", "more"]
    assert [line.rsplit(": ", 1)[1] for line in lines] == ["at or below", "at or below", "OVER"]
    assert "1.0100x" in lines[2]


def test_images_with_few_roots_use_their_whole_budget(quick_report: Report) -> None:
    """On a held-out seed, every shell-tool image (a handful of roots) whose closure exceeds
    the budget uses every layer of it with ours, instead of leaving unused root slots."""
    budget = DEFAULT_MAX_LAYERS - 1
    closures = quick_report.tally(PerPath().name).layers_by_kind["tool"]
    ours = quick_report.tally(DEFAULT_STRATEGY.name).layers_by_kind["tool"]
    beyond = [layers for layers, paths in zip(ours, closures, strict=True) if paths > budget]
    assert beyond
    assert beyond == [budget] * len(beyond)


def test_transitive_popularity_counts_every_package_that_depends_on_one() -> None:
    """The transitive table counts, per package, the packages whose closure holds it; the
    direct table only those that reference it."""
    universe = Universe(UniverseConfig(seed=HELD_OUT_SEED, packages=200, revisions=0))
    direct, transitive = universe.popularity(), universe.popularity(transitive=True)
    glibc = universe.index_of("glibc")
    holders = sum(glibc in universe.closure([i]) for i in range(len(universe.packages)))
    assert transitive["glibc"] == holders - 1
    assert set(direct) <= set(transitive)
    assert all(transitive[name] >= count for name, count in direct.items())
    assert transitive["glibc"] > direct["glibc"]


def test_measures_sit_between_the_floor_and_a_single_layer(quick_report: Report) -> None:
    """No strategy beats one layer per path, and none does worse than one layer per image
    (storage over every revision: none beats one layer per path)."""
    floor = quick_report.tally(PerPath().name)
    single = quick_report.tally(SingleLayer().name)
    for tally in quick_report.tallies:
        assert floor.churn <= tally.churn <= single.churn
        assert floor.churn_per_image <= tally.churn_per_image <= single.churn_per_image
        assert floor.shared <= tally.shared <= single.shared
        assert floor.stored_all_revisions <= tally.stored_all_revisions


def test_quick_universe_is_shaped_and_calibrated_like_the_field(quick_report: Report) -> None:
    """Realistic path counts and sizes; size-first pulls about half of popularity layering
    and well under references-by-popularity, whose catch-all holds most of a large image."""
    calibration = quick_report.calibration
    assert calibration is not None
    assert 0.35 <= calibration.size_first_vs_single <= 0.6
    assert calibration.size_first_vs_single < 0.8 * calibration.references_vs_single
    assert 0.5 <= calibration.catch_all_share <= 0.85
    assert calibration.paths["tool"][0] >= 30
    assert calibration.paths["tool"][2] <= 200
    assert calibration.paths["runtime"][2] >= 250
    assert calibration.paths["large"][0] >= 500
    assert calibration.tiny_share >= 0.2
    assert calibration.huge_paths >= 3
    churn = {name: quick_report.tally(name).churn_per_image for name in PUBLISHED}
    assert churn["size-first"] < churn["nixery-popularity"] < churn["references-by-popularity"]


def test_updates_change_exactly_the_updated_packages_and_their_dependents() -> None:
    """Input addressing: a package gets a new store path iff it or anything below it was updated."""
    universe = Universe(UniverseConfig.quick(seed=3))
    before = universe.store_paths()
    updated = universe.advance()
    after = universe.store_paths()
    assert updated
    for index in range(len(universe.packages)):
        below = {index}
        stack = [index]
        while stack:
            for dep in universe.packages[stack.pop()].deps:
                if dep not in below:
                    below.add(dep)
                    stack.append(dep)
        changed = any(before[key].path != after[key].path for key in before if key[0] == index)
        assert changed == bool(below & updated)


def test_universe_is_the_same_for_the_same_seed() -> None:
    """A seed fixes the whole universe and its revisions."""
    one, two = Universe(UniverseConfig.quick(seed=5)), Universe(UniverseConfig.quick(seed=5))
    assert one.advance() == two.advance()
    assert one.store_paths() == two.store_paths()


def test_mass_rebuilds_replace_every_store_path_and_only_they_touch_the_bottom() -> None:
    """The bottom (glibc) is updated only in mass rebuilds, which change every path above it."""
    config = attrs.evolve(UniverseConfig.quick(seed=2), mass_rebuild_every=3)
    universe = Universe(config)
    glibc = universe.index_of("glibc")
    before = universe.store_paths()
    for week in (1, 2):
        assert glibc not in universe.advance(), week
    after_two = universe.store_paths()
    assert any(before[k].path == after_two[k].path for k in before)
    assert glibc in universe.advance()
    after_mass = universe.store_paths()
    above = {k for k in after_two if glibc in universe.closure([k[0]])}
    assert len(above) > 0.9 * len(after_two)
    assert all(after_two[k].path != after_mass[k].path for k in above)


def test_security_fixes_patch_widely_used_libraries() -> None:
    """With no other updates, weekly patches hit staging libraries (never the bottom)."""
    config = attrs.evolve(
        UniverseConfig.quick(seed=4), update_rate=0.0, mass_rebuild_every=0, security_fixes=3.0
    )
    universe = Universe(config)
    patched = set().union(*(universe.advance() for _ in range(4)))
    assert patched
    assert patched <= universe.staging - universe.bottom


def test_random_closure_has_the_asked_size_and_few_roots() -> None:
    """Synthetic closures for the speed benchmark have exactly n acyclic paths under few roots."""
    graph = random_closure(2_000, seed=2, roots=15)
    assert len(graph) == 2_000
    assert len(graph.requested) <= 15
    assert len(IndexedGraph.of(graph).topo) == 2_000
    assert graph.closure_of(graph.roots) == frozenset(graph.paths)


def _path_info() -> list[dict[str, object]]:
    a = "/nix/store/0123456789abcdfghijklmnpqrsvwxyz-hello-2.12"
    b = "/nix/store/1123456789abcdfghijklmnpqrsvwxyz-glibc-2.38"
    return [
        {"path": a, "narSize": 200_000, "references": [a, b], "valid": True},
        {"path": b, "narSize": 30_000_000, "references": [b]},
    ]


def test_closures_load_from_nix_path_info_lists_and_mappings() -> None:
    """Both shapes of ``nix path-info --json -r`` load; unreferenced paths become requested."""
    listed = json.dumps(_path_info())
    keyed = json.dumps({i["path"]: i for i in _path_info()})
    for text in (listed, keyed):
        graph = closure_from_json(text)
        assert len(graph) == 2
        assert graph.requested == {"hello": (str(_path_info()[0]["path"]),)}
        assert graph.total_size == 30_200_000


def test_closures_load_from_the_runtime_graph_shape() -> None:
    """``{"paths": [...], "requested": {...}}`` keeps the requested mapping given."""
    data = {"paths": _path_info(), "requested": {"greeter": [_path_info()[0]["path"]]}}
    assert list(closure_from_json(json.dumps(data)).requested) == ["greeter"]


@pytest.mark.parametrize(
    ("text", "error"),
    [
        ("not json", InvalidInput),
        ('[{"path": "/nix/store/x-a", "narSize": -1, "references": []}]', NixOutputError),
        ('{"paths": [], "requested": {"a": "not a list"}}', InvalidInput),
        (
            '[{"path": "/nix/store/x-a", "narSize": 1, "references": ["/nix/store/y-b"]}]',
            InvalidInput,
        ),
    ],
)
def test_bad_closure_files_raise_typed_errors(text: str, error: type[Exception]) -> None:
    """Malformed JSON, entries or graphs are reported as the library's typed errors."""
    with pytest.raises(error):
        closure_from_json(text, "bad.json")


def test_command_line_measures_real_closures(tmp_path: Path) -> None:
    """The script measures ``--closure`` files as a corpus, and as revisions with ``--series``."""
    first = tmp_path / "one.json"
    first.write_text(json.dumps(_path_info()))
    second = tmp_path / "two.json"
    changed = _path_info()
    new = "/nix/store/2223456789abcdfghijklmnpqrsvwxyz-hello-2.13"
    changed[0] = {**changed[0], "path": new, "references": [new, changed[1]["path"]]}
    second.write_text(json.dumps(changed))
    script = REPO / "benchmarks" / "layering_sim.py"
    args = [sys.executable, str(script), "--closure", str(first), "--closure", str(second)]
    out = subprocess.run([*args, "--series"], capture_output=True, text=True, check=True).stdout
    assert "30.20 MB of images per revision" in out
    assert "| churn-aware-dominators |" in out
    assert "| per-path (floor) | 0.20 |" in out  # hello changed: 200 kB pulled again
    assert "| single-layer | 30.20 |" in out


@pytest.mark.parametrize("scale", ["-1", "nan", "inf"])
def test_command_line_rejects_a_bad_reference_scale_with_a_usage_error(scale: str) -> None:
    """``--reference-scale`` below 0 or not finite is a usage error naming the flag, not a
    traceback."""
    script = REPO / "benchmarks" / "layering_sim.py"
    run = subprocess.run(
        [sys.executable, str(script), "--quick", "--registry", "--reference-scale", scale],
        capture_output=True,
        text=True,
        check=False,
    )
    assert run.returncode == 2
    assert "error: --reference-scale: reference_scale must be a finite number >= 0" in run.stderr
    assert "Traceback" not in run.stderr


def test_quick_run_of_the_script_prints_calibration_every_strategy_and_the_verdict() -> None:
    """``layering_sim.py --quick`` prints the calibration, the table for all strategies and
    ours' verdict on both churn measures; ``--registry`` adds ours told the stored layers."""
    script = REPO / "benchmarks" / "layering_sim.py"
    run = subprocess.run(
        [sys.executable, str(script), "--quick", "--by-kind", "--registry"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert "| calibration | published |" in run.stdout
    for name in (*PUBLISHED, "single-layer", "per-path (floor)", DEFAULT_STRATEGY.name):
        assert f"| {name} |" in run.stdout
    assert "churn per image vs the per-path floor" in run.stdout
    assert "churn on one node vs the per-path floor" in run.stdout
    assert "| churn GB, client per image |" in run.stdout
    registry = f"{DEFAULT_STRATEGY.name}+registry"
    assert f"| {registry} |" in run.stdout
    assert f"{registry}: sharing vs {NIXERY_TRANSITIVE}" in run.stdout
    assert f"{registry}: stored over all revisions" in run.stdout


@pytest.mark.usefixtures("nix")
def test_script_measures_images_of_the_offline_set_realised_by_nix() -> None:
    """``--offline-set`` realises real images with Nix and measures every strategy on them."""
    script = REPO / "benchmarks" / "layering_sim.py"
    run = subprocess.run(
        [sys.executable, str(script), "--offline-set", "--max-layers", "4"],
        capture_output=True,
        text=True,
        check=True,
        timeout=300,
    )
    for image in OFFLINE_IMAGES:
        assert re.search(rf"^{re.escape(image)}: [1-9][0-9]* store paths", run.stdout, re.M)
    rows = {
        line.split("|")[1].strip(): line.split("|")[1:-1]
        for line in run.stdout.splitlines()
        if line.startswith("| ") and "---" not in line and "strategy" not in line
    }
    published = set(PUBLISHED) - {NIXERY_TRANSITIVE}  # no table for real closures
    assert set(rows) == {*published, "single-layer", "per-path (floor)", DEFAULT_STRATEGY.name}
    sharing = {name: float(cells[7]) for name, cells in rows.items()}
    assert sharing["per-path (floor)"] < sharing["single-layer"]
    assert all(sharing["per-path (floor)"] <= value for value in sharing.values())
    assert float(rows[DEFAULT_STRATEGY.name][11]) == 3  # most layers: the budget


def test_speed_benchmark_prints_a_row_per_strategy_and_size() -> None:
    """``bench_layering_speed.py`` times every strategy at every size asked for."""
    script = REPO / "benchmarks" / "bench_layering_speed.py"
    run = subprocess.run(
        [sys.executable, str(script), "--sizes", "200", "400", "--repeat", "1"],
        capture_output=True,
        text=True,
        check=True,
    )
    rows = [line for line in run.stdout.splitlines() if line.startswith("| ") and "---" not in line]
    assert len(rows) == 1 + 4 * 2


def test_measure_refuses_a_strategy_that_breaks_its_promise() -> None:
    """A strategy that drops a path or exceeds the budget is refused, not scored."""
    graph = random_closure(50, seed=4)

    def drops_one(g: RuntimeGraph, budget: int) -> list[LayerGroup]:
        return [LayerGroup(tuple(sorted(g.paths)[1:]))]

    def too_many(g: RuntimeGraph, budget: int) -> list[LayerGroup]:
        return [LayerGroup((p,)) for p in sorted(g.paths)]

    for faulty in (drops_one, too_many):
        with pytest.raises(InvalidInput):
            measure([[("tool", graph)]], [("faulty", faulty)], 10)
    report = measure([[("tool", graph)]], [(PerPath().name, PerPath().group)], 10)
    assert report.tally(PerPath().name).layers == [50]


@pytest.mark.parametrize(
    "knobs",
    [
        {"packages": 10},
        {"revisions": -1},
        {"update_rate": 1.5},
        {"security_fixes": -1.0},
        {"large_images": -2},
        {"large_apps": 0},
    ],
)
def test_universe_config_refuses_out_of_range_knobs(knobs: dict[str, float]) -> None:
    """Out-of-range simulator knobs are an InvalidInput naming the knob."""
    with pytest.raises(InvalidInput, match=next(iter(knobs))):
        UniverseConfig(**knobs)  # type: ignore[arg-type]
