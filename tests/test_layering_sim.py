"""The churn and sharing simulator: its universe, its measures, and ours against the others."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from nixery_core.errors import InvalidInput, NixOutputError
from nixery_core.graph import RuntimeGraph
from nixery_core.layering import DEFAULT_MAX_LAYERS, DEFAULT_STRATEGY
from nixery_core.layering.common import IndexedGraph
from nixery_core.layering.evaluation import (
    PUBLISHED,
    PerPath,
    Report,
    SingleLayer,
    closure_from_json,
    measure,
    simulate,
    verdict,
)
from nixery_core.layering.universe import Universe, UniverseConfig, random_closure
from nixery_core.protocols import LayerGroup

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def quick_report() -> Report:
    """The quick universe (seed 1), measured once for the tests below."""
    return simulate(UniverseConfig.quick(seed=1), DEFAULT_MAX_LAYERS - 1, [DEFAULT_STRATEGY])


def test_ours_beats_every_published_strategy_on_the_quick_universe(quick_report: Report) -> None:
    """Ours pulls fewer bytes than the best published strategy, within 1.3x of the floor,
    and stores no more bytes than the best of them."""
    result = verdict(quick_report, DEFAULT_STRATEGY.name)
    assert result.churn_vs_best < 1.0
    assert result.churn_vs_floor <= 1.3
    assert result.sharing_vs_best <= 1.0
    assert max(quick_report.tally(DEFAULT_STRATEGY.name).layers) <= DEFAULT_MAX_LAYERS - 1


def test_measures_sit_between_the_floor_and_a_single_layer(quick_report: Report) -> None:
    """No strategy beats one layer per path, and none does worse than one layer per image."""
    floor = quick_report.tally(PerPath().name)
    single = quick_report.tally(SingleLayer().name)
    for tally in quick_report.tallies:
        assert floor.churn <= tally.churn <= single.churn
        assert floor.shared <= tally.shared <= single.shared


def test_universe_reproduces_the_published_ordering(quick_report: Report) -> None:
    """As measured in the field, size-first pulls well under what popularity layering pulls."""
    churn = {name: quick_report.tally(name).churn for name in PUBLISHED}
    assert churn["size-first"] < 0.75 * churn["references-by-popularity"]


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
    assert "| churn-aware-dominators |" in out
    assert "| per-path (floor) | 0.00 |" in out


def test_quick_run_of_the_script_prints_every_strategy_and_the_verdict() -> None:
    """``layering_sim.py --quick`` prints the table for all strategies and ours' verdict."""
    script = REPO / "benchmarks" / "layering_sim.py"
    run = subprocess.run(
        [sys.executable, str(script), "--quick", "--by-kind"],
        capture_output=True,
        text=True,
        check=True,
    )
    for name in (*PUBLISHED, "single-layer", "per-path (floor)", DEFAULT_STRATEGY.name):
        assert f"| {name} |" in run.stdout
    assert "churn vs the per-path floor" in run.stdout
    assert "| churn GB, client per image |" in run.stdout


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
    "knobs", [{"packages": 10}, {"revisions": -1}, {"update_rate": 1.5}, {"large_images": -2}]
)
def test_universe_config_refuses_out_of_range_knobs(knobs: dict[str, float]) -> None:
    """Out-of-range simulator knobs are an InvalidInput naming the knob."""
    with pytest.raises(InvalidInput, match=next(iter(knobs))):
        UniverseConfig(**knobs)  # type: ignore[arg-type]
