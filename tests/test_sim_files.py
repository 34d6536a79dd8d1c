"""nixery_core_sim.files: what a partial-pull client fetches, next to a whole-layer client."""

from __future__ import annotations

import pytest

from nixery_core.graph import RuntimeGraph, StorePath
from nixery_core.layering import DEFAULT_MAX_LAYERS, DEFAULT_STRATEGY
from nixery_core.protocols import LayerGroup
from nixery_core_sim.evaluation import PerPath, Report, measure, simulate
from nixery_core_sim.files import FileModel, PartialPullingClient
from nixery_core_sim.universe import Universe, UniverseConfig

LIB_V1 = "/nix/store/" + "a" * 32 + "-lib-1.0"
LIB_V2 = "/nix/store/" + "b" * 32 + "-lib-1.1"
APP_V1 = "/nix/store/" + "c" * 32 + "-app-2.0"
APP_V2 = "/nix/store/" + "d" * 32 + "-app-2.0"  # same version, rebuilt against lib 1.1


def _graph(lib: str, app: str) -> RuntimeGraph:
    return RuntimeGraph.build(
        [StorePath(lib, 1_000_000, ()), StorePath(app, 4_000_000, (lib,))], {"app": (app,)}
    )


def _contents(lib: str, app: str) -> dict[str, tuple[str, ...]]:
    return {lib: ("lib", lib[-3:]), app: ("app", "2.0")}


def test_a_rebuilt_path_costs_its_reference_chunks_a_new_version_its_bytes() -> None:
    """After a low-level update the client fetches the new library whole and only the
    rebuilt app's reference chunks, plus the two new layers' tables of contents."""
    model = FileModel()
    client = PartialPullingClient(model)
    one = [LayerGroup((LIB_V1,)), LayerGroup((APP_V1,))]
    first = client.pull(_graph(LIB_V1, APP_V1), one, _contents(LIB_V1, APP_V1))
    assert first == 5_000_000 + model.toc_bytes(1_000_000) + model.toc_bytes(4_000_000)
    two = [LayerGroup((LIB_V2,)), LayerGroup((APP_V2,))]
    update = client.pull(_graph(LIB_V2, APP_V2), two, _contents(LIB_V2, APP_V2))
    expected = (
        1_000_000 + model.rename_cost(4_000_000)
        + model.toc_bytes(1_000_000) + model.toc_bytes(4_000_000)
    )
    assert update == expected
    assert model.rename_cost(4_000_000) == 50 * 500  # 100 files, half embed references
    again = client.pull(_graph(LIB_V2, APP_V2), two, _contents(LIB_V2, APP_V2))
    assert again == 0


def test_regrouped_layers_cost_a_partial_client_only_their_tables_of_contents() -> None:
    """A new grouping of paths the client holds is a new blob, but its files are on disk."""
    client = PartialPullingClient()
    graph = _graph(LIB_V1, APP_V1)
    contents = _contents(LIB_V1, APP_V1)
    client.pull(graph, [LayerGroup((LIB_V1,)), LayerGroup((APP_V1,))], contents)
    merged = client.pull(graph, [LayerGroup((LIB_V1, APP_V1))], contents)
    assert merged == FileModel().toc_bytes(1_000_000) + FileModel().toc_bytes(4_000_000)


def test_measure_needs_one_content_map_per_revision() -> None:
    """A content map per revision is required once any is given (a typed error otherwise)."""
    from nixery_core.errors import InvalidInput

    graph = _graph(LIB_V1, APP_V1)
    with pytest.raises(InvalidInput, match="content map"):
        measure([[("app", graph)], [("app", graph)]], [("per-path", PerPath().group)], 10,
                contents=[_contents(LIB_V1, APP_V1)])


def test_content_keys_survive_a_dependency_rebuild() -> None:
    """A package whose dependency was updated keeps its content key under a new store path."""
    universe = Universe(UniverseConfig.quick(seed=3))
    before = universe.store_paths()
    keys_before = universe.content_keys(before)
    updated = universe.advance()
    after = universe.store_paths()
    keys_after = universe.content_keys(after)
    renamed = [
        key for key, sp in after.items()
        if key[0] not in updated and sp.path != before[key].path
    ]
    assert renamed
    for key in renamed:
        assert keys_after[after[key].path] == keys_before[before[key].path]


@pytest.fixture(scope="module")
def report() -> Report:
    """The quick universe on a seed not used for tuning (seed 7)."""
    return simulate(UniverseConfig.quick(seed=7), DEFAULT_MAX_LAYERS - 1, [DEFAULT_STRATEGY])


def test_partial_pulls_fetch_far_less_than_whole_layers_for_every_strategy(report: Report) -> None:
    """For every strategy a partial-pull client fetches less than a whole-layer one, and
    well under the per-path floor that bounds every whole-layer client."""
    floor = report.tally(PerPath().name)
    for tally in report.tallies:
        assert 0 < tally.partial_churn_per_image < tally.churn_per_image
        assert tally.partial_churn_per_image < 0.5 * floor.churn_per_image
        assert 0 < tally.partial_churn < tally.churn
