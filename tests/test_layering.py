"""Layering strategies: the protocol's promises for all, each strategy's documented behaviour."""

from __future__ import annotations

import random
from collections.abc import Callable, Mapping, Sequence

import attrs
import pytest
from graph_strategies import closures, new_leaf_packages, store_path, with_package
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nixery_core import layering
from nixery_core.errors import InvalidInput
from nixery_core.graph import RuntimeGraph, StorePath
from nixery_core.layering import (
    DEFAULT_STRATEGY,
    ChurnAwareDominators,
    NixeryPopularity,
    PopularityTable,
    PullingClient,
    ReferencesByPopularity,
    SizeFirst,
    package_name,
    route_counts,
    unique_layer_bytes,
    validate_grouping,
)
from nixery_core.layering.common import IndexedGraph
from nixery_core.protocols import LayerGroup, LayeringStrategy

STRATEGIES: list[LayeringStrategy] = [
    ChurnAwareDominators(),
    NixeryPopularity(),
    NixeryPopularity({"glibc": 500, "zlib": 120, "bash": 3}),
    ReferencesByPopularity(),
    SizeFirst(),
]
IDS = [f"{s.name}-{i}" for i, s in enumerate(STRATEGIES)]
MB = 1_000_000


def make(
    spec: Mapping[str, tuple[int, Sequence[str]]], requested: Sequence[str] = ()
) -> tuple[RuntimeGraph, dict[str, str]]:
    """A graph from ``name -> (size, references)``; unreferenced names are requested."""
    paths = {name: store_path(i, name) for i, name in enumerate(spec)}
    referenced = {r for _, refs in spec.values() for r in refs}
    wanted = [n for n in spec if n not in referenced] + list(requested)
    graph = RuntimeGraph.build(
        [
            StorePath(paths[n], size, tuple(paths[r] for r in refs))
            for n, (size, refs) in spec.items()
        ],
        {n: (paths[n],) for n in wanted},
    )
    return graph, paths


def names(groups: Sequence[LayerGroup]) -> list[list[str]]:
    """Each layer as sorted package names, in manifest order."""
    return [sorted(package_name(p) for p in g.paths) for g in groups]


def shuffled(graph: RuntimeGraph, seed: int) -> RuntimeGraph:
    """The same graph with every mapping and reference list in another order."""
    rng = random.Random(seed)  # noqa: S311 -- a seeded shuffle, not cryptography
    items = list(graph.paths.values())
    rng.shuffle(items)
    paths = {}
    for sp in items:
        refs = list(sp.references)
        rng.shuffle(refs)
        paths[sp.path] = StorePath(sp.path, sp.nar_size, tuple(refs))
    requested = list(graph.requested.items())
    rng.shuffle(requested)
    return RuntimeGraph(paths, dict(requested))


# --- every strategy ------------------------------------------------------------


@pytest.mark.parametrize("strategy", STRATEGIES, ids=IDS)
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(graph=closures(), budget=st.integers(1, 45))
def test_every_path_in_exactly_one_layer_within_budget(
    strategy: LayeringStrategy, graph: RuntimeGraph, budget: int
) -> None:
    """Every store path lands in exactly one sorted, non-empty layer; never more than the budget."""
    validate_grouping(graph, strategy.group(graph, budget), budget)


@pytest.mark.parametrize("strategy", STRATEGIES, ids=IDS)
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(graph=closures(), budget=st.integers(1, 45), seed=st.integers(0, 2**16))
def test_deterministic_whatever_the_input_order(
    strategy: LayeringStrategy, graph: RuntimeGraph, budget: int, seed: int
) -> None:
    """The same graph gives the same layers in the same order, however its mappings are ordered."""
    first = list(strategy.group(graph, budget))
    assert list(strategy.group(graph, budget)) == first
    assert list(strategy.group(shuffled(graph, seed), budget)) == first


@pytest.mark.parametrize("strategy", STRATEGIES, ids=IDS)
@pytest.mark.parametrize("budget", [0, -3])
def test_budget_below_one_is_refused(strategy: LayeringStrategy, budget: int) -> None:
    """A budget below one layer is an InvalidInput, not an empty or oversized answer."""
    graph, _ = make({"a": (10, ())})
    with pytest.raises(InvalidInput, match="budget"):
        strategy.group(graph, budget)


@pytest.mark.parametrize("strategy", STRATEGIES, ids=IDS)
def test_reference_cycle_is_refused(strategy: LayeringStrategy) -> None:
    """A closure whose references form a cycle is an InvalidInput."""
    a, b, c = store_path(1, "a"), store_path(2, "b"), store_path(3, "c")
    graph = RuntimeGraph.build(
        [StorePath(a, 1, (b,)), StorePath(b, 1, (c,)), StorePath(c, 1, (b,))], {"a": (a,)}
    )
    with pytest.raises(InvalidInput, match="cycle"):
        strategy.group(graph, 5)


@pytest.mark.parametrize("strategy", STRATEGIES, ids=IDS)
def test_empty_closure_gives_no_layers(strategy: LayeringStrategy) -> None:
    """An empty closure groups into no layers."""
    assert list(strategy.group(RuntimeGraph.build([], {}), 3)) == []


@pytest.mark.parametrize("strategy", STRATEGIES, ids=IDS)
def test_parameters_are_json_and_strategies_are_hashable_values(
    strategy: LayeringStrategy,
) -> None:
    """Parameters are plain JSON values; equal strategies are equal and hash alike."""
    import json

    json.dumps(dict(strategy.parameters()), sort_keys=True)
    assert isinstance(strategy, LayeringStrategy)
    assert hash(strategy) == hash(type(strategy)(**_fields(strategy)))


def _fields(strategy: LayeringStrategy) -> dict[str, object]:
    import attrs

    return attrs.asdict(strategy, recurse=False)  # type: ignore[arg-type]


# --- ours ----------------------------------------------------------------------


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data(), graph=closures())
def test_ours_adding_a_small_package_moves_no_existing_layer(
    data: st.DataObject, graph: RuntimeGraph
) -> None:
    """With root slots reserved, when leaf_stable() says so, adding a new root package leaves
    every existing layer whole."""
    roots = len(IndexedGraph.of(graph).roots)
    slots = data.draw(st.integers(roots + 1, roots + 3), label="root_slots")
    budget = data.draw(
        st.integers(slots + 1, slots + len(graph) + 1).filter(lambda b: b != len(graph)),
        label="budget",
    )
    strategy = ChurnAwareDominators(root_slots=slots, reserve_root_slots=True)
    assert strategy.leaf_stable(graph, budget)
    leaf, name = data.draw(new_leaf_packages(graph))
    before = {g.paths for g in strategy.group(graph, budget)}
    after = {g.paths for g in strategy.group(with_package(graph, leaf, name), budget)}
    assert before <= after
    assert after - before == {(leaf.path,)}


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data(), graph=closures())
def test_ours_adding_a_small_package_merges_at_most_two_existing_layers(
    data: st.DataObject, graph: RuntimeGraph
) -> None:
    """By default (root slots spent), adding a new root package leaves every existing layer
    whole but the two that the next cheapest merge joins, and only when the closure and
    the new path no longer fit the budget."""
    roots = len(IndexedGraph.of(graph).roots)
    slots = data.draw(st.integers(roots + 1, roots + 3), label="root_slots")
    budget = data.draw(st.integers(slots + 1, slots + len(graph) + 1), label="budget")
    strategy = ChurnAwareDominators(root_slots=slots)
    leaf, name = data.draw(new_leaf_packages(graph))
    before = {g.paths for g in strategy.group(graph, budget)}
    after = {g.paths for g in strategy.group(with_package(graph, leaf, name), budget)}
    assert (leaf.path,) in after
    lost = sorted(before - after)
    gained = after - before - {(leaf.path,)}
    if strategy.leaf_stable(graph, budget):
        assert not lost
    assert len(lost) in (0, 2)
    assert gained == ({tuple(sorted(lost[0] + lost[1]))} if lost else set())


@settings(max_examples=100, deadline=None)
@given(
    graph=closures(), budget=st.integers(1, 45), slots=st.integers(0, 8), reserve=st.booleans()
)
def test_ours_leaf_stable_is_false_only_near_a_mode_change(
    graph: RuntimeGraph, budget: int, slots: int, reserve: bool
) -> None:
    """leaf_stable() refuses only where one more path crosses the budget or, with root slots
    reserved, one more root crosses the slots."""
    strategy = ChurnAwareDominators(root_slots=slots, reserve_root_slots=reserve)
    roots = len(IndexedGraph.of(graph).roots)
    if reserve:
        crossing = len(graph) == budget or roots + 1 > slots or slots >= budget
    else:
        crossing = len(graph) + 1 > budget
    assert strategy.leaf_stable(graph, budget) or crossing


def test_ours_leaf_stability_covers_images_beyond_the_budget() -> None:
    """With few roots, a closure larger than the budget is still leaf-stable (roots set apart)."""
    spec: dict[str, tuple[int, Sequence[str]]] = {"libc": (30 * MB, ())}
    for i in range(30):
        spec[f"lib{i}"] = (200_000 + i, ("libc", f"lib{i - 1}") if i % 3 == 1 else ("libc",))
    spec["app"] = (5 * MB, tuple(f"lib{i}" for i in range(30)))
    graph, paths = make(spec)
    strategy = ChurnAwareDominators(root_slots=4, reserve_root_slots=True)
    assert len(graph) > 10
    assert strategy.leaf_stable(graph, 10)
    leaf = StorePath(store_path(99, "newleaf"), 10, (paths["lib3"], paths["libc"]))
    before = {g.paths for g in strategy.group(graph, 10)}
    after = {g.paths for g in strategy.group(with_package(graph, leaf, "newleaf"), 10)}
    assert before | {(leaf.path,)} == after


def test_ours_spends_the_slots_its_roots_leave() -> None:
    """An image with fewer roots than root slots uses its whole budget; reserving the slots
    leaves the unused ones empty."""
    spec: dict[str, tuple[int, Sequence[str]]] = {"libc": (30 * MB, ())}
    for i in range(30):
        spec[f"lib{i}"] = (200_000 + i, ("libc", f"lib{i - 1}") if i % 3 == 1 else ("libc",))
    spec["app"] = (5 * MB, tuple(f"lib{i}" for i in range(30)))
    spec["tool"] = (1 * MB, ("lib4", "libc"))
    graph, _ = make(spec)
    assert len(IndexedGraph.of(graph).roots) == 2
    assert len(ChurnAwareDominators(root_slots=6).group(graph, 10)) == 10
    reserved = ChurnAwareDominators(root_slots=6, reserve_root_slots=True)
    assert len(reserved.group(graph, 10)) == 10 - 6 + 2


def test_ours_keeps_one_layer_per_path_when_the_closure_fits() -> None:
    """A closure within the budget gets a layer per store path (no small merges asked for)."""
    graph, _ = make({"a": (MB, ("b", "c")), "b": (MB, ("c",)), "c": (MB, ())})
    groups = ChurnAwareDominators(min_layer_bytes=0).group(graph, 3)
    assert sorted(len(g.paths) for g in groups) == [1, 1, 1]


def test_ours_merges_a_small_path_where_it_costs_least_even_when_it_fits() -> None:
    """Under min_layer_bytes, a path joins the package using it, not the shared base below it."""
    spec: dict[str, tuple[int, Sequence[str]]] = {
        "app": (MB, ("mid",)),
        "mid": (MB, ("tiny", "libc")),
        "tiny": (1_000, ("libc",)),
        "libc": (MB, ()),
    }
    graph, _ = make(spec)
    merged = ChurnAwareDominators(min_layer_bytes=64 * 1024).group(graph, 10)
    assert sorted(names(merged)) == [["app"], ["libc"], ["mid", "tiny"]]
    separate = ChurnAwareDominators(min_layer_bytes=0).group(graph, 10)
    assert sorted(names(separate)) == [["app"], ["libc"], ["mid"], ["tiny"]]


def test_ours_keeps_a_big_widely_used_library_apart() -> None:
    """Under pressure, private dependencies ride with their package; the shared base stays apart."""
    spec: dict[str, tuple[int, Sequence[str]]] = {"libc": (30 * MB, ())}
    for app in ("vim", "git", "jq"):
        for i in range(3):
            spec[f"{app}dep{i}"] = (300_000, ("libc",))
        spec[app] = (4 * MB, ("libc", *(f"{app}dep{i}" for i in range(3))))
    graph, _ = make(spec)
    groups = names(ChurnAwareDominators(root_slots=0).group(graph, 4))
    assert ["libc"] in groups
    for app in ("vim", "git", "jq"):
        assert sorted([app, *(f"{app}dep{i}" for i in range(3))]) in groups


def test_ours_has_no_catch_all_layer_when_only_churn_counts() -> None:
    """Counting churn only (``other_images=0``), top-level packages beyond the budget merge in
    small sets with their own dependencies; no layer collects the surplus."""
    groups = names(ChurnAwareDominators(root_slots=0, other_images=0).group(_tools(), 5))
    assert len(groups) == 5
    assert ["libc"] in groups
    tools_per_layer = [sum(n.startswith("tool") for n in g) for g in groups]
    assert sum(tools_per_layer) == 8
    assert max(tools_per_layer) <= 3
    _assert_dependencies_ride_with_their_tools(groups)


def test_ours_keeps_private_dependencies_with_their_package_when_storage_counts() -> None:
    """By default (a copy stored again costs as much as a re-pull), top-level packages beyond
    the budget still merge with their own dependencies and the shared base stays apart, but
    they may gather in one larger layer: each new layer form is one more stored copy."""
    groups = names(ChurnAwareDominators(root_slots=0).group(_tools(), 5))
    assert len(groups) == 5
    assert ["libc"] in groups
    _assert_dependencies_ride_with_their_tools(groups)


def _tools() -> RuntimeGraph:
    spec: dict[str, tuple[int, Sequence[str]]] = {"libc": (30 * MB, ())}
    for i in range(8):
        spec[f"dep{i}"] = (500_000, ("libc",))
        spec[f"tool{i}"] = (2 * MB, ("libc", f"dep{i}"))
    return make(spec)[0]


def _assert_dependencies_ride_with_their_tools(groups: list[list[str]]) -> None:
    for group in groups:
        assert {n.removeprefix("dep") for n in group if n.startswith("dep")} == {
            n.removeprefix("tool") for n in group if n.startswith("tool")
        }


def test_ours_keeps_a_layer_the_registry_already_stores() -> None:
    """A prior layer made of this closure's paths comes out as one layer, as stored, where
    without it the grouping differs; a prior layer naming a path outside the closure is
    ignored."""
    graph = _tools()
    by_name = {package_name(p): p for p in graph.paths}
    stored = [by_name[n] for n in ("dep0", "tool0", "dep5", "tool5")]
    without = ChurnAwareDominators(root_slots=0).group(graph, 5)
    assert tuple(sorted(stored)) not in [g.paths for g in without]
    outside = [by_name["libc"], store_path(99, "elsewhere")]
    strategy = ChurnAwareDominators(root_slots=0, prior_layers=[stored, outside])
    groups = strategy.group(graph, 5)
    validate_grouping(graph, groups, 5)
    assert tuple(sorted(stored)) in [g.paths for g in groups]
    assert ["libc"] in names(groups)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data(), graph=closures(), budget=st.integers(1, 45), told=st.booleans())
def test_ours_with_prior_layers_keeps_its_promises(
    data: st.DataObject, graph: RuntimeGraph, budget: int, told: bool
) -> None:
    """With any prior layers (subsets of the closure and beyond it), told the registry or
    not, every path lands in exactly one layer within the budget, and the same graph and
    prior layers, in any order, give the same layers."""
    paths = sorted(graph.paths)
    prior = data.draw(
        st.lists(st.lists(st.sampled_from([*paths, store_path(999, "gone")]), min_size=1))
    )
    strategy = ChurnAwareDominators(prior_layers=prior, told_registry=told)
    groups = list(strategy.group(graph, budget))
    validate_grouping(graph, groups, budget)
    again = ChurnAwareDominators(
        prior_layers=[list(reversed(layer)) for layer in reversed(prior)], told_registry=told
    )
    assert again == strategy
    assert again.parameters() == strategy.parameters()
    assert list(again.group(shuffled(graph, budget), budget)) == groups


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data(), graph=closures(), budget=st.integers(1, 45))
def test_ours_record_grown_build_by_build_is_the_record_passed_whole(
    data: st.DataObject, graph: RuntimeGraph, budget: int
) -> None:
    """A record grown with ``adding_prior_layers`` (only new layers checked) is the same
    strategy, with the same layers, as every layer passed at once, in any form: lists,
    a set, or a frozenset of sorted tuples taken as it is."""
    paths = sorted(graph.paths)
    layer = st.lists(st.sampled_from([*paths, store_path(999, "gone")]), min_size=1)
    batches = data.draw(st.lists(st.lists(layer), max_size=4))
    grown = DEFAULT_STRATEGY.with_prior_layers([])
    for batch in batches:
        grown = grown.adding_prior_layers(batch)
    every = [list(reversed(x)) for batch in batches for x in batch]
    whole = DEFAULT_STRATEGY.with_prior_layers(every)
    normal = frozenset(tuple(sorted(set(x))) for x in every)
    assert grown == whole == DEFAULT_STRATEGY.with_prior_layers(normal)
    assert grown.parameters() == whole.parameters()
    assert grown.group(graph, budget) == whole.group(graph, budget)
    assert not DEFAULT_STRATEGY.adding_prior_layers([paths[:1]]).told_registry


@pytest.mark.parametrize(
    "record",
    [frozenset({("/nix/store/b-x", "/nix/store/a-x"), ("/nix/store/c-x",)}),
     frozenset({("/nix/store/a-x", "/nix/store/a-x")}), frozenset({("/nix/store/a-x",), ()})],
)
def test_ours_normalises_a_frozenset_record_not_in_normal_form(
    record: frozenset[tuple[str, ...]],
) -> None:
    """A frozenset of unsorted or repeated paths is normalised like any collection (an
    empty layer refused), not taken as it is."""
    if () in record:
        with pytest.raises(InvalidInput, match="prior"):
            ChurnAwareDominators(prior_layers=record)
        return
    told = ChurnAwareDominators(prior_layers=record)
    assert told.prior_layers == frozenset(tuple(sorted(set(x))) for x in record)
    with pytest.raises(InvalidInput, match="prior"):
        told.adding_prior_layers([["/nix/store/a-x", 3]])  # type: ignore[list-item]


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(graph=closures(), budget=st.integers(1, 45))
def test_ours_without_prior_layers_in_the_closure_is_unchanged(
    graph: RuntimeGraph, budget: int
) -> None:
    """No prior layers is the default strategy, parameters and all; prior layers none of
    whose sets lies inside the closure change no layer (only the cache-key digest)."""
    assert ChurnAwareDominators(prior_layers=()) == DEFAULT_STRATEGY
    assert ChurnAwareDominators(prior_layers=()).parameters() == DEFAULT_STRATEGY.parameters()
    outside = store_path(999, "gone")
    prior = [[p, outside] for p in sorted(graph.paths)[:5]]
    strategy = ChurnAwareDominators(prior_layers=prior)
    assert strategy.group(graph, budget) == DEFAULT_STRATEGY.group(graph, budget)
    assert strategy.parameters()["prior_layers_sha256"] == strategy.prior_digest()


def test_with_prior_layers_tells_ours_the_registry_keeps_a_record() -> None:
    """``with_prior_layers`` (what a builder with ``prior_layers_from_cache`` calls) sets
    ``told_registry``, even with an empty record, and the parameters (so cache keys) say so;
    the default and prior layers passed to the constructor leave it off."""
    told = DEFAULT_STRATEGY.with_prior_layers([])
    assert told.told_registry
    assert told.parameters() == {
        **DEFAULT_STRATEGY.parameters(),
        "told_registry": True,
        "told_form": 3,
        "root_scale": DEFAULT_STRATEGY.root_scale,
        "big_dependency_ratio": DEFAULT_STRATEGY.big_dependency_ratio,
    }
    assert "told_registry" not in DEFAULT_STRATEGY.parameters()
    assert not ChurnAwareDominators(prior_layers=[["/nix/store/a-x"]]).told_registry
    with pytest.raises(InvalidInput, match="told_registry"):
        ChurnAwareDominators(told_registry=1)  # type: ignore[arg-type]


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(graph=closures(), budget=st.integers(1, 45))
def test_ours_reference_scale_changes_only_a_strategy_told_the_registry(
    graph: RuntimeGraph, budget: int
) -> None:
    """``reference_scale`` leaves a strategy not told the registry exactly as it is (layers,
    not its parameters: cache keys say it is set); told, the grouping keeps its promises."""
    refs = ChurnAwareDominators(reference_scale=40)
    assert refs.group(graph, budget) == DEFAULT_STRATEGY.group(graph, budget)
    assert refs.parameters() == {**DEFAULT_STRATEGY.parameters(), "reference_scale": 40}
    assert "reference_scale" not in DEFAULT_STRATEGY.parameters()
    told = refs.with_prior_layers([])
    assert told.reference_scale == 40
    validate_grouping(graph, told.group(graph, budget), budget)


def test_ours_told_with_reference_scale_keeps_a_widely_referenced_library_apart() -> None:
    """Told the registry, a small library that many paths of a large closure reference
    directly (so likely in other images) but that is a small share of it stays in a layer of
    its own with ``reference_scale``, where without it the library joins a user."""
    without, with_scale = _told_layers_of_a_small_shared_library(
        lambda k: ChurnAwareDominators(root_slots=0, reference_scale=k, root_scale=0), 3.0
    )
    assert ["libz"] not in without
    assert ["libz"] in with_scale


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(graph=closures(), budget=st.integers(1, 45))
def test_ours_root_scale_changes_only_an_image_grouped_whole_told_the_registry(
    graph: RuntimeGraph, budget: int
) -> None:
    """``root_scale`` (on by default) leaves a strategy not told the registry, and an image
    whose roots are set apart, exactly as they are (layers; the default's untold cache key
    does not name it, told or another value does); told, an image grouped as a whole keeps
    the promises."""
    off = ChurnAwareDominators(root_scale=0)
    assert DEFAULT_STRATEGY.root_scale > 0
    assert off.group(graph, budget) == DEFAULT_STRATEGY.group(graph, budget)
    assert off.parameters() == {**DEFAULT_STRATEGY.parameters(), "root_scale": 0}
    assert "root_scale" not in DEFAULT_STRATEGY.parameters()
    told = DEFAULT_STRATEGY.with_prior_layers([])
    assert told.parameters()["root_scale"] == DEFAULT_STRATEGY.root_scale
    plain = off.with_prior_layers([])
    assert plain.root_scale == 0
    if len(IndexedGraph.of(graph).roots) <= plain.root_slots < budget:  # roots set apart
        assert told.group(graph, budget) == plain.group(graph, budget)
    whole = attrs.evolve(told, root_slots=0)
    validate_grouping(graph, whole.group(graph, budget), budget)


def test_ours_told_with_root_scale_keeps_a_library_several_roots_use_apart() -> None:
    """Told the registry, in an image grouped as a whole, a small library that several of
    its requested roots use (so likely in other images built from the same package set) but
    that is a small share of the closure stays in a layer of its own with ``root_scale``,
    where without it the library joins a user."""
    without, with_scale = _told_layers_of_a_small_shared_library(
        lambda k: ChurnAwareDominators(root_slots=0, root_scale=k), DEFAULT_STRATEGY.root_scale
    )
    assert ["libz"] not in without
    assert ["libz"] in with_scale


def test_ours_told_keeps_a_stored_layer_whole_in_an_image_grouped_as_a_whole() -> None:
    """Told the registry, an image grouped as a whole (``root_scale`` on, its estimated sharing
    at half weight) still pays a stored layer's full weight to break it, so a stored layer of
    two apps it holds comes out whole under a tight budget (at half weight, as in the fifth
    round's ``root_scale``, the two apps were merged into a larger layer and stored again)."""
    libs = {"lib0": 5, "lib1": 1, "lib2": 5, "lib3": 5}
    spec: dict[str, tuple[int, Sequence[str]]] = {"libc": (30 * MB, ())}
    spec.update({name: (size * MB, ("libc",)) for name, size in libs.items()})
    apps = {
        "app0": (1, ("lib3", "lib1", "lib0")),
        "app1": (1, ("lib0", "lib1", "lib3", "lib2")),
        "app2": (8, ("lib3", "lib0", "lib1")),
        "app3": (3, ("lib0", "lib1", "lib3", "lib2")),
        "app4": (1, ("lib3", "lib0")),
        "app5": (1, ("lib0", "lib3", "lib2", "lib1")),
    }
    spec.update({name: (size * MB, ("libc", *deps)) for name, (size, deps) in apps.items()})
    graph, paths = make(spec)
    told = ChurnAwareDominators(root_slots=0).with_prior_layers([[paths["app0"], paths["app1"]]])
    assert told.root_scale > 0
    groups = told.group(graph, 3)
    validate_grouping(graph, groups, 3)
    assert ["app0", "app1"] in names(groups)


def _told_layers_of_a_small_shared_library(
    strategy: Callable[[float], ChurnAwareDominators], scale: float
) -> tuple[list[list[str]], list[list[str]]]:
    """Layers, told the registry, of a closure where 60 apps use libc only and 6 tools also
    use libz (1 MB, a small share): with ``strategy(0.0)`` and with ``strategy(scale)``."""
    spec: dict[str, tuple[int, Sequence[str]]] = {"libc": (30 * MB, ())}
    spec["libz"] = (1 * MB, ("libc",))
    for i in range(60):
        spec[f"app{i}"] = (3 * MB, ("libc",))
    for i in range(6):
        spec[f"tool{i}"] = (2 * MB, ("libc", "libz"))
    graph = make(spec)[0]
    budget = 40
    layers = []
    for k in (0.0, scale):
        groups = strategy(k).with_prior_layers([]).group(graph, budget)
        validate_grouping(graph, groups, budget)
        layers.append(names(groups))
    return layers[0], layers[1]


def _tools_with_own_dependencies() -> tuple[RuntimeGraph, RuntimeGraph]:
    """Twelve 1 MB tools over libc, each with a 10 MB dependency only it uses; and the
    closure of the first two tools alone."""
    spec: dict[str, tuple[int, Sequence[str]]] = {"libc": (30 * MB, ())}
    for i in range(12):
        spec[f"dep{i}"] = (10 * MB, ("libc",))
        spec[f"tool{i}"] = (1 * MB, ("libc", f"dep{i}"))
    graph, paths = make(spec)
    two = RuntimeGraph.build(
        [graph.paths[paths[n]] for n in ("libc", "dep0", "tool0", "dep1", "tool1")],
        {n: (paths[n],) for n in ("tool0", "tool1")},
    )
    return graph, two


def test_ours_told_the_registry_keeps_a_tool_with_its_own_dependency() -> None:
    """Told the registry's record, ours puts a tool and the dependency only it uses in one
    layer (which every image holding the tool holds whole), so an image of two of the tools,
    told the first image's layers, stores no byte again; with the first-form cost the tools
    go together and the second image stores 12 MB again."""
    graph, two = _tools_with_own_dependencies()
    stored_again = {}
    for told in (False, True):
        strategy = ChurnAwareDominators(root_slots=0, told_registry=told)
        first = strategy.group(graph, 14)
        validate_grouping(graph, first, 14)
        record = {g.paths for g in first}
        second = attrs.evolve(strategy, prior_layers=record).group(two, 3)
        validate_grouping(two, second, 3)
        stored_again[told] = sum(
            two.paths[p].nar_size for g in second if g.paths not in record for p in g.paths
        )
        if told:
            assert ["dep0", "tool0"] in names(first)
            assert ["dep1", "tool1"] in names(second)
    assert stored_again == {False: 12 * MB, True: 0}


def test_ours_told_keeps_a_big_runtime_out_of_the_layer_of_a_small_module_only_it_uses() -> None:
    """Told the registry's record, a tight image does not merge a 50 MB runtime under a tiny
    module that alone uses it here (``big_dependency_ratio``, step 10), so a later image of
    the runtime without the module reuses its stored layer; with the rule off it stores the
    runtime again."""
    spec: dict[str, tuple[int, Sequence[str]]] = {"libc": (30 * MB, ())}
    spec["perl"] = (50 * MB, ("libc",))
    spec["permod"] = (100_000, ("perl",))
    spec["tool"] = (1 * MB, ("libc", "permod"))
    for i in range(10):
        spec[f"lib{i}"] = (2 * MB, ("libc",))
        spec[f"app{i}"] = (1 * MB, ("libc", f"lib{i}"))
    spec["perlapp"] = (1 * MB, ("perl",))
    graph, paths = make(spec)
    requested = ["tool", *(f"app{i}" for i in range(10))]
    shell = RuntimeGraph.build(
        [graph.paths[paths[n]] for n in spec if n != "perlapp"],
        {n: (paths[n],) for n in requested},
    )
    runtime = RuntimeGraph.build(
        [graph.paths[paths[n]] for n in ("libc", "perl", "perlapp")],
        {"perlapp": (paths["perlapp"],)},
    )
    stored_again = {}
    for ratio in (0.0, DEFAULT_STRATEGY.big_dependency_ratio):
        strategy = ChurnAwareDominators(big_dependency_ratio=ratio).with_prior_layers([])
        first = strategy.group(shell, 23)  # 11 roots apart, 13 paths in 12 layers
        validate_grouping(shell, first, 23)
        record = {g.paths for g in first}
        second = strategy.with_prior_layers(record).group(runtime, 3)
        validate_grouping(runtime, second, 3)
        stored_again[ratio] = sum(
            runtime.paths[p].nar_size for g in second if g.paths not in record for p in g.paths
        )
        if ratio:
            assert ["permod"] in names(first)
    assert stored_again == {0.0: 51 * MB, DEFAULT_STRATEGY.big_dependency_ratio: 1 * MB}


def test_ours_told_the_registry_keeps_a_stored_layer_that_holds_a_requested_root() -> None:
    """Told the registry's record, a stored layer that holds a package this image requests,
    with what that package uses, comes out whole in the root's slot instead of the root
    alone and its dependency stored again; not told, the root stays alone."""
    graph, paths = make(
        {
            "libc": (30 * MB, ()),
            "tzdata": (2 * MB, ()),
            "python3": (100 * MB, ("libc", "tzdata")),
            "tool": (1 * MB, ("libc",)),
        },
    )
    stored = [paths["python3"], paths["tzdata"]]  # as an image using python3 stored it
    told = ChurnAwareDominators(root_slots=2, prior_layers=[stored], told_registry=True)
    groups = told.group(graph, 3)
    validate_grouping(graph, groups, 3)
    assert sorted(names(groups)) == [["libc"], ["python3", "tzdata"], ["tool"]]
    not_told = ChurnAwareDominators(root_slots=2, prior_layers=[stored]).group(graph, 3)
    assert sorted(names(not_told)) == [["libc", "tzdata"], ["python3"], ["tool"]]


@pytest.mark.parametrize("prior", ["/nix/store/abc-x", [3], [[]], [["/nix/store/a-x", 3]]])
def test_ours_refuses_malformed_prior_layers(prior: object) -> None:
    """Prior layers must be a collection of non-empty collections of store paths."""
    with pytest.raises(InvalidInput, match="prior"):
        ChurnAwareDominators(prior_layers=prior)


def test_ours_merges_the_paths_that_change_together() -> None:
    """With one merge to make, a package's two outputs (same change causes) go together."""
    spec: dict[str, tuple[int, Sequence[str]]] = {
        "app": (MB, ("curl", "onig")),
        "libc": (30 * MB, ()),
        "ssl": (6 * MB, ("libc",)),
        "curl-lib": (2 * MB, ("libc", "ssl")),
        "curl": (2 * MB, ("curl-lib", "libc", "ssl")),
        "onig": (2 * MB, ("libc",)),
    }
    graph, _ = make(spec)
    groups = names(ChurnAwareDominators(root_slots=1).group(graph, 5))
    assert sorted(groups) == [["app"], ["curl", "curl-lib"], ["libc"], ["onig"], ["ssl"]]


def test_ours_orders_layers_least_exposed_first() -> None:
    """The bottom layer holds what changes least (the smallest closure); ratings fall upwards."""
    graph, _ = make({"app": (MB, ("lib",)), "lib": (MB, ("libc",)), "libc": (MB, ())})
    groups = ChurnAwareDominators().group(graph, 3)
    assert names(groups) == [["libc"], ["lib"], ["app"]]
    ratings = [g.rating for g in groups]
    assert ratings == sorted(ratings, reverse=True)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("change_rate", 0),
        ("change_rate", 1.5),
        ("root_slots", -1),
        ("other_images", -0.5),
        ("other_images", float("inf")),
        ("min_layer_bytes", -5),
        ("reserve_root_slots", 1),
        ("stored_copy", -1.0),
        ("reference_scale", -40.0),
        ("reference_scale", float("inf")),
    ],
)
def test_ours_refuses_bad_parameters(field: str, value: float) -> None:
    """Out-of-range parameters are an InvalidInput naming the parameter."""
    with pytest.raises(InvalidInput, match=field):
        ChurnAwareDominators(**{field: value})  # type: ignore[arg-type]


def test_default_strategy_is_ours() -> None:
    """The builder's default is the churn-aware strategy with default parameters."""
    assert ChurnAwareDominators() == DEFAULT_STRATEGY


# --- references by popularity ---------------------------------------------------


def _nixpkgs_example() -> tuple[RuntimeGraph, dict[str, str]]:
    # The graph from nixpkgs' closure-graph.py: A-B-C-D-F, C-E-F, B-E, A-G.
    return make(
        {
            "a": (1, ("b", "g")),
            "b": (1, ("c", "e")),
            "c": (1, ("d", "e")),
            "d": (1, ("f",)),
            "e": (1, ("f",)),
            "f": (1, ()),
            "g": (1, ()),
        }
    )


def test_route_counts_count_every_route_from_the_roots() -> None:
    """A path's popularity is the number of routes from the roots that reach it."""
    graph, paths = _nixpkgs_example()
    ig = IndexedGraph.of(graph)
    counts = dict(zip(ig.paths, route_counts(ig), strict=True))
    expected = {"a": 1, "b": 1, "c": 1, "d": 1, "e": 2, "f": 3, "g": 1}
    assert {n: counts[p] for n, p in paths.items()} == expected


def test_references_by_popularity_puts_the_least_popular_in_the_catch_all() -> None:
    """The budget-1 most reached paths get own layers; the rest share the last layer."""
    graph, _ = _nixpkgs_example()
    groups = names(ReferencesByPopularity().group(graph, 3))
    assert groups == [["f"], ["e"], ["a", "b", "c", "d", "g"]]


def test_references_by_popularity_breaks_ties_by_name_without_hash() -> None:
    """Equally popular paths are ordered by their name, not by their hash."""
    graph, _ = make({"zeta": (1, ()), "alpha": (1, ()), "mid": (1, ())})
    assert names(ReferencesByPopularity().group(graph, 3)) == [["alpha"], ["mid"], ["zeta"]]


def test_references_by_popularity_gives_each_path_a_layer_when_it_fits() -> None:
    """No catch-all is made when every path fits in the budget."""
    graph, _ = _nixpkgs_example()
    assert all(len(g.paths) == 1 for g in ReferencesByPopularity().group(graph, 7))


# --- nixery popularity ----------------------------------------------------------


def test_nixery_layers_are_dominator_subtrees() -> None:
    """Each requested package with what only it uses is one layer; shared paths stand apart."""
    graph, _ = make(
        {
            "git": (MB, ("curl", "libc")),
            "curl": (MB, ("libc",)),
            "htop": (MB, ("ncurses", "libc")),
            "ncurses": (MB, ("libc",)),
            "libc": (MB, ()),
        }
    )
    groups = names(NixeryPopularity().group(graph, 10))
    assert sorted(groups) == [["curl", "git"], ["htop", "ncurses"], ["libc"]]


def test_nixery_merges_the_lowest_ratings_first() -> None:
    """Over budget, the two layers with the lowest popularity x size merge first."""
    graph, _ = make({"a": (10, ()), "b": (20, ()), "c": (30, ()), "d": (40, ())})
    table = {"a": 6, "b": 1, "c": 1, "d": 2}  # ratings 60, 20, 30, 80
    groups = names(NixeryPopularity(table).group(graph, 3))
    assert groups == [["d"], ["a"], ["b", "c"]]


def test_nixery_folds_all_the_lowest_rated_layers_into_one() -> None:
    """As Nixery sorts once and folds the first layer into the next, the surplus becomes one
    layer even where merging the two lowest each time would make two."""
    graph, _ = make({"a": (10, ()), "b": (10, ()), "c": (10, ()), "d": (10, ())})
    table = {"a": 3, "b": 3, "c": 4, "d": 5}  # ratings 30, 30, 40, 50
    groups = names(NixeryPopularity(table).group(graph, 2))
    assert groups == [["a", "b", "c"], ["d"]]


def test_nixery_counts_packages_missing_from_the_table_as_one() -> None:
    """A package the popularity table does not list rates as popularity 1, not 0."""
    graph, _ = make({"a": (10, ()), "b": (25, ()), "c": (30, ())})
    groups = names(NixeryPopularity({"a": 2}).group(graph, 2))  # ratings 20, 25, 30
    assert groups == [["a", "b"], ["c"]]


def test_nixery_keeps_cacert_in_a_layer_of_its_own() -> None:
    """cacert counts as most popular, so it is not swallowed by the package that uses it."""
    graph, _ = make({"app": (MB, ("nss-cacert", "zlib")), "nss-cacert": (1, ()), "zlib": (1, ())})
    groups = names(NixeryPopularity({"app": 1}).group(graph, 5))
    assert sorted(groups) == [["app", "zlib"], ["nss-cacert"]]


def test_nixery_gives_big_closures_their_own_layer() -> None:
    """A path whose closure exceeds the big threshold is not swallowed by its dominator."""
    spec = {"app": (MB, ("llvm",)), "llvm": (150 * MB, ())}
    graph, _ = make(spec)
    assert sorted(names(NixeryPopularity().group(graph, 5))) == [["app"], ["llvm"]]
    small = NixeryPopularity(big_closure_bytes=200 * MB)
    assert names(small.group(graph, 5)) == [["app", "llvm"]]


def test_nixery_gives_popular_paths_their_own_layer() -> None:
    """A path at or above the popularity threshold gets an edge from the root."""
    graph, _ = make({"app": (MB, ("zlib",)), "zlib": (MB, ())})
    groups = NixeryPopularity({"zlib": 150, "app": 1}).group(graph, 5)
    assert sorted(names(groups)) == [["app"], ["zlib"]]


def test_popularity_table_is_a_hashable_value_with_a_digest() -> None:
    """Equal tables are equal, hash alike and share a digest used in cache keys."""
    one, two = PopularityTable({"a": 1, "b": 2}), PopularityTable({"b": 2, "a": 1})
    assert one == two
    assert hash(one) == hash(two)
    assert one.digest == two.digest
    assert (
        NixeryPopularity({"a": 1}).parameters()["popularity_sha256"]
        == PopularityTable({"a": 1}).digest
    )
    assert dict(one) == {"a": 1, "b": 2}


@pytest.mark.parametrize("table", [{"a": -1}, {"a": 1.5}, {"a": True}, {3: 1}])
def test_popularity_table_refuses_bad_values(table: dict[object, object]) -> None:
    """Popularity must map package names to non-negative integers."""
    with pytest.raises(InvalidInput, match="popularity"):
        PopularityTable(table)  # type: ignore[arg-type]


# --- size first -----------------------------------------------------------------


def test_size_first_gives_the_largest_paths_their_own_layers() -> None:
    """Primaries are the largest paths; a dependency only one primary uses joins it."""
    graph, _ = make(
        {
            "app": (5 * MB, ("big", "small")),
            "big": (90 * MB, ("libc",)),
            "small": (10_000, ("libc",)),
            "libc": (30 * MB, ()),
        }
    )
    groups = names(SizeFirst().group(graph, 3))
    assert groups == [["libc"], ["big"], ["app", "small"]]


def test_size_first_groups_shared_dependencies_by_the_primaries_using_them() -> None:
    """A path used by two primaries gets a layer of its own, labelled by both."""
    graph, _ = make(
        {
            "x": (50 * MB, ("shared", "onlyx")),
            "y": (40 * MB, ("shared",)),
            "shared": (10, ()),
            "onlyx": (10, ()),
        }
    )
    groups = names(SizeFirst().group(graph, 3))
    assert sorted(groups) == [["onlyx", "x"], ["shared"], ["y"]]


def test_size_first_stops_before_exceeding_the_budget() -> None:
    """No more primaries are added once one more would need a layer beyond the budget."""
    graph, _ = make({"a": (5, ()), "b": (4, ()), "c": (3, ()), "d": (2, ())})
    assert names(SizeFirst().group(graph, 2)) == [["a"], ["b", "c", "d"]]


# --- helpers --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        ("/nix/store/0123456789abcdfghijklmnpqrsvwxyz-openssl-3.0.8-bin", "openssl"),
        ("python3.11-numpy-1.26.0", "python3.11-numpy"),
        ("/nix/store/0123456789abcdfghijklmnpqrsvwxyz-iana-etc-20231227", "iana-etc"),
        ("/nix/store/0123456789abcdfghijklmnpqrsvwxyz-hello", "hello"),
        ("bash-5.2-p15", "bash"),
    ],
)
def test_package_name_drops_hash_version_and_output(path: str, expected: str) -> None:
    """Package names drop the store hash, the version and any output suffix."""
    assert package_name(path) == expected


def test_validate_grouping_names_what_is_wrong() -> None:
    """A grouping that misses, repeats or invents paths, or exceeds the budget, is refused."""
    graph, p = make({"a": (1, ("b",)), "b": (1, ())})
    validate_grouping(graph, [LayerGroup((p["a"],)), LayerGroup((p["b"],))], 2)
    bad = {
        "exceed": ([LayerGroup((p["a"],)), LayerGroup((p["b"],))], 1),
        "no layer": ([LayerGroup((p["a"],))], 2),
        "more than one": ([LayerGroup((p["a"],)), LayerGroup(tuple(sorted(p.values())))], 2),
        "not in the closure": ([LayerGroup(tuple(sorted([*p.values(), "/nix/store/x"])))], 2),
        "empty": ([LayerGroup(())], 2),
    }
    for message, (groups, budget) in bad.items():
        with pytest.raises(InvalidInput, match=message):
            validate_grouping(graph, groups, budget)


def test_pulling_client_fetches_each_layer_once() -> None:
    """A caching client pulls a layer's bytes only the first time it sees that path set."""
    graph, p = make({"a": (3, ("b",)), "b": (5, ())})
    client = PullingClient()
    groups = [LayerGroup((p["b"],)), LayerGroup((p["a"],))]
    assert client.pull(graph, groups) == 8
    assert client.pull(graph, groups) == 0
    assert client.pull(graph, [LayerGroup(tuple(sorted(p.values())))]) == 8
    assert client.pulled == 16


def test_unique_layer_bytes_counts_shared_layers_once() -> None:
    """A registry stores a layer shared by two images once."""
    graph, p = make({"a": (3, ("b",)), "b": (5, ())})
    shared = LayerGroup((p["b"],))
    images = [(graph, [shared, LayerGroup((p["a"],))]), (graph, [shared])]
    assert unique_layer_bytes(images) == 8


def test_public_names_are_sorted_and_importable() -> None:
    """__all__ is sorted (constants, classes, functions) and every name in it exists."""

    def isort_style(name: str) -> tuple[bool, bool, str]:
        return (not name.isupper(), name[0].islower(), name)

    assert list(layering.__all__) == sorted(layering.__all__, key=isort_style)
    for name in layering.__all__:
        assert hasattr(layering, name)
