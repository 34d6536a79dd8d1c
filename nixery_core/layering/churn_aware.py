"""Ours: merge the store paths that change together, where the fewest bytes get pulled again.

What makes a client pull again: a layer is a new blob as soon as any of its
store paths changes, and a store path changes whenever anything in its
closure changes (input addressing).  So a layer changes exactly when
something in the union of its members' closures is updated, and every byte
of it is pulled again then, changed or not.  Two paths whose closures are
(nearly) the same change in the same revisions and cost (nearly) nothing to
put together; two paths that change for different reasons make each other
be pulled again.

The strategy is an agglomerative clustering on that cost:

1. The requested outputs (the roots) get a layer each when there are at
   most ``root_slots`` of them, and the rest of the closure is grouped as if
   they were absent, in every layer the roots leave (with
   ``reserve_root_slots``, in ``budget - root_slots`` layers whatever the
   number of roots: exact leaf stability, see
   :meth:`ChurnAwareDominators.leaf_stable`).  Otherwise every path takes part.
2. Every other path starts as a group of its own.  A group's *exposure* is
   the chance that it changed since the last revision, estimated from the
   number of store paths in the union of its members' closures::

       exposure(g) = 1 - exp(-change_rate * |closure(g)|)

   and its expected re-pulled bytes are ``bytes(g) * exposure(g)``.
3. Groups are merged cheapest first until the budget holds.  Merging ``a``
   and ``b`` costs the expected bytes it adds::

       bytes(a+b) * exposure(a+b) - bytes(a) * exposure(a) - bytes(b) * exposure(b)

   which is nothing when the closures are the same, little when a small
   path joins a path whose closure holds its own, and much when two big
   paths that change for different reasons meet.  Candidates are a path
   and each path it references (and what they grew into), and the roots
   taking part with their neighbours in exposure order; when none is left,
   all groups' neighbours in exposure order.
4. A layer that other images share only stays shared if every image groups
   it the same way; merging it with anything makes it image-specific.  So
   the first merge that takes a group out of its original form also costs,
   for each member, ``other_images * bytes * (exposure + stored_copy) *
   max(0.05, share)``: its expected re-pulled bytes plus a copy a registry
   stores again (``stored_copy``, 1: as much as one re-pull), weighted by
   the share of the closure that depends on it (a path most of the closure
   uses is likely in other images too).  Widely used, big, volatile paths
   such as ``python3`` stay alone unless nothing else fits; top-level
   packages that must merge may gather in one larger layer, since each new
   layer form is one more stored copy.
5. Before any of that, groups under ``min_layer_bytes`` (off by default)
   are merged with their cheapest candidate, even when the closure fits the
   budget, for images with fewer pull round-trips.
6. ``prior_layers`` (empty by default) names layers a registry already
   stores (earlier images, earlier revisions), as store path sets.  Each one
   made only of this closure's unpinned paths (disjoint ones, most bytes
   first) starts as a group: storing it again costs nothing, and a client
   that pulled it may hold it.  Its first merge costs ``other_images *
   bytes * (exposure + stored_copy)`` (certainly elsewhere: no ``share``).
   With no prior layers the strategy is exactly as without this step.
7. ``told_registry`` (set by :meth:`ChurnAwareDominators.with_prior_layers`,
   as a builder with ``prior_layers_from_cache`` calls it) says every build
   is told the record, so a later image keeps any stored layer it holds
   whole (step 6).  Step 4's first-form cost is then replaced by a
   containment cost: an image holds a group whole exactly when it holds the
   group's *tops* (members no other member depends on), so a member costs
   ``other_images * bytes * (exposure + stored_copy)`` times
   ``elsewhere(member) - held(group)``, where ``elsewhere`` is step 4's
   ``max(0.05, share)`` and ``held`` the product of the tops' ``elsewhere``.
   A merge costs what it adds to that sum, every time: nothing for a path
   joining the group of its only user, much for a widely used path joining
   a rarely used one, and again whenever a group takes in one more top.  A
   prior layer still pays step 6's cost on its first merge.  And a prior
   layer that holds roots set apart in step 1 together with other paths
   is kept too: the roots it holds give it their slots.
8. ``reference_scale`` (``k``; 0, off, by default): told the registry,
   a path's chance of being elsewhere is also estimated from the number
   ``u`` of paths of this closure that reference it directly (a local
   stand-in for Nixery's popularity count): ``max(0.05, share, 1 -
   exp(-u / k))``.  Not told, it changes nothing.
9. ``root_scale`` (``k``; 10 by default since the sixth issue-17 round,
   0 turns it off): told the registry, an image grouped as a whole (no root
   set apart in step 1: a large image with many requested packages) also
   estimates a path's chance of being elsewhere from the number ``j`` of
   its requested roots, other than the path itself, whose closures hold
   it, less one (a path one root alone uses says nothing of other images):
   at least ``1 - exp(-j / k)`` (another image built from the same
   package set requests other packages that use the same libraries), and
   weighs that estimated sharing by half (``other_images / 2``), since the
   estimate raises nearly every path's chance.  A stored layer's first
   merge (step 6) keeps its full weight: that blob is certainly stored,
   whatever the estimate says.  Not told, or with roots set apart, it
   changes nothing.
10. ``big_dependency_ratio`` (``r``; 20 by default since the eighth
   issue-17 round, 0 turns it off): told the registry, a group of at least
   10 MB joining a group that uses it (its tops are in the other's
   closure) whose tops hold ``r`` times fewer bytes is costed as if it were
   elsewhere with a chance of at least 0.9: a big library or runtime that
   few paths here use looks unlikely elsewhere, so merging it under a small
   package only this image holds looked free, and every later image holding
   the big path but not the package stored it again.  A tool with a
   dependency about as big as itself (under ``r`` times) still goes with
   it.  Not told, it changes nothing.

Costs depend only on the closures below the groups and their sizes, and
ties are broken by store path names without hashes, so the same package
set gives the same layers in every image and revision that holds it, as
far as the budget allows.  The name is historical: the first version of
this strategy merged along the dominator tree, which grouped the shared
libraries of a large image into one catch-all layer; the clustering above
replaced it (``docs/layering.md`` has both measured).
"""

from __future__ import annotations

import hashlib
import heapq
import itertools
import math
import operator
from collections.abc import Iterable, Mapping, Sequence

import attrs

from nixery_core.errors import InvalidInput
from nixery_core.graph import RuntimeGraph, store_path_name
from nixery_core.layering.common import IndexedGraph, check_budget
from nixery_core.protocols import JSONValue, LayerGroup

__all__ = ["ChurnAwareDominators"]

#: The least chance that a store path is in some other image too.
_ELSEWHERE = 0.05

#: With ``root_scale``, the weight of estimated sharing in an image grouped as a whole (step 9).
_WHOLE_IMAGE_WEIGHT = 0.5

#: ``root_scale``'s default, chosen on tuning seeds (``docs/layering.md``, sixth round).
_ROOT_SCALE = 10.0

#: ``big_dependency_ratio``'s default, the least bytes it applies to and the chance of being
#: elsewhere it gives, chosen on tuning seeds (``docs/layering.md``, eighth round).
_BIG_DEPENDENCY_RATIO = 20.0
_BIG_DEPENDENCY_BYTES = 10_000_000
_BIG_DEPENDENCY_ELSEWHERE = 0.9


def _non_negative_int(_instance: object, attribute: attrs.Attribute[int], value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise InvalidInput(f"{attribute.name} must be a non-negative integer, got {value!r}")


def _rate(_instance: object, attribute: attrs.Attribute[float], value: float) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value < 1:
        raise InvalidInput(f"{attribute.name} must be a number in (0, 1), got {value!r}")


def _flag(_instance: object, attribute: attrs.Attribute[bool], value: bool) -> None:
    if not isinstance(value, bool):
        raise InvalidInput(f"{attribute.name} must be True or False, got {value!r}")


class _Record(frozenset[tuple[str, ...]]):
    """Prior layers already checked and in normal form (only :func:`_prior` makes one)."""

    __slots__ = ()


def _prior(value: object) -> frozenset[tuple[str, ...]]:
    """Prior layers as a frozenset of sorted path tuples; anything else is refused.

    A registry's record grows with every layer it stores and is passed in
    again at every build, so it is not built again when it need not be: a
    record this function made is taken as it is, and a frozenset already in
    that form (non-empty tuples of store paths, each strictly increasing) is
    only checked.
    """
    if type(value) is _Record:
        return value
    if isinstance(value, frozenset) and all(map(_normal_layer, value)):
        return _Record(value)
    if isinstance(value, str | bytes) or not isinstance(value, Iterable):
        raise InvalidInput(f"prior_layers must be a collection of store path sets, got {value!r}")
    layers = set()
    for layer in value:
        if isinstance(layer, str | bytes) or not isinstance(layer, Iterable):
            raise InvalidInput(f"a prior layer must be a collection of store paths, got {layer!r}")
        members = set(layer)
        if not members or not all(isinstance(p, str) for p in members):
            raise InvalidInput(f"a prior layer must name one or more store paths, got {layer!r}")
        layers.add(tuple(sorted(members)))
    return _Record(layers)


def _normal_layer(layer: object) -> bool:
    """Whether ``layer`` is a non-empty tuple of strings, strictly increasing (sorted, unique)."""
    return (
        type(layer) is tuple
        and bool(layer)
        and all(map(isinstance, layer, itertools.repeat(str)))
        and all(map(operator.lt, layer, itertools.islice(layer, 1, None)))
    )


def _weight(_instance: object, attribute: attrs.Attribute[float], value: float) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value < math.inf:
        raise InvalidInput(f"{attribute.name} must be a finite number >= 0, got {value!r}")


@attrs.frozen
class ChurnAwareDominators:
    """Store paths that change together share a layer; cheapest merges first.

    ``change_rate``: the chance, per store path in a group's closure, that a
    revision of the package set replaces it; it sets how fast a closure's
    exposure saturates (only its order of magnitude matters).
    ``root_slots``: up to this many roots get a layer of their own and the
    rest of the closure is grouped without them, in every layer the roots
    leave; with ``reserve_root_slots``, in ``budget - root_slots`` layers
    whatever the number of roots, which keeps slots free so that adding a
    package moves no layer (see :meth:`leaf_stable`).  ``other_images``: how
    many other images a client or registry is assumed to hold, which is what
    a shared path that is grouped differently here costs.  ``stored_copy``:
    what a copy of a shared path stored again by a registry costs, against
    pulling it again once (raise it to trade churn for registry storage).
    ``min_layer_bytes``: smaller groups are merged even when the closure fits
    the budget.  ``prior_layers``: store path sets of layers the registry
    already stores (any iterable of iterables of store paths; kept as a
    frozenset of sorted tuples, in :meth:`parameters` as a digest); those
    made only of this closure's paths start as groups of their own (module
    docstring, step 6).  An explicit input, so the same graph and prior
    layers give the same layers.  ``told_registry``: every build is told
    the registry's record this way (:meth:`with_prior_layers` sets it), so a
    later image reuses any stored layer it holds whole; sharing is then
    costed by containment (module docstring, step 7).
    ``reference_scale``: told the registry, a path referenced directly by
    ``u`` paths here is elsewhere with a chance of at least ``1 - exp(-u /
    reference_scale)`` (step 8); 0 (the default) leaves it out.
    ``root_scale``: told the registry, in an image grouped as a whole, a path
    that ``j + 1`` of the requested roots hold is elsewhere with a chance of
    at least ``1 - exp(-j / root_scale)``, that estimate at half the sharing
    weight, a stored layer at full weight (step 9); 10 by default, 0 leaves
    it out.  Untold it changes nothing, and :meth:`parameters` names it only
    when told or when it is not the default.  ``big_dependency_ratio``: told
    the registry, a group of 10 MB or more joining a group that uses it and
    whose tops hold this many times fewer bytes is costed as likely elsewhere
    (step 10); 20 by default, 0 leaves it out, named in :meth:`parameters` as
    ``root_scale`` is.
    """

    change_rate: float = attrs.field(default=0.003, validator=_rate)
    root_slots: int = attrs.field(default=12, validator=_non_negative_int)
    other_images: float = attrs.field(default=1.0, validator=_weight)
    min_layer_bytes: int = attrs.field(default=0, validator=_non_negative_int)
    reserve_root_slots: bool = attrs.field(default=False, validator=_flag)
    stored_copy: float = attrs.field(default=1.0, validator=_weight)
    prior_layers: frozenset[tuple[str, ...]] = attrs.field(
        default=frozenset(), converter=_prior, repr=False
    )
    told_registry: bool = attrs.field(default=False, validator=_flag)
    reference_scale: float = attrs.field(default=0.0, validator=_weight)
    root_scale: float = attrs.field(default=_ROOT_SCALE, validator=_weight)
    big_dependency_ratio: float = attrs.field(default=_BIG_DEPENDENCY_RATIO, validator=_weight)

    @property
    def name(self) -> str:
        return "churn-aware-dominators"

    def parameters(self) -> Mapping[str, JSONValue]:
        return {
            "change_rate": self.change_rate,
            "root_slots": self.root_slots,
            "other_images": self.other_images,
            "min_layer_bytes": self.min_layer_bytes,
            "reserve_root_slots": self.reserve_root_slots,
            "stored_copy": self.stored_copy,
            **({"prior_layers_sha256": self.prior_digest()} if self.prior_layers else {}),
            # The told grouping's form: 2 since the sixth session (a stored
            # layer's first merge at full weight, roots counted less one), 3
            # since the eighth issue-17 round (big_dependency_ratio).
            **({"told_registry": True, "told_form": 3} if self.told_registry else {}),
            **({"reference_scale": self.reference_scale} if self.reference_scale else {}),
            # Only told does root_scale group differently: the default's
            # parameters (so cache keys) untold are as before it was on.
            **(
                {"root_scale": self.root_scale}
                if self.told_registry or self.root_scale != _ROOT_SCALE
                else {}
            ),
            **(
                {"big_dependency_ratio": self.big_dependency_ratio}
                if self.told_registry or self.big_dependency_ratio != _BIG_DEPENDENCY_RATIO
                else {}
            ),
        }

    def prior_digest(self) -> str:
        """sha256 of ``prior_layers`` (sorted path sets, sorted), for cache keys."""
        h = hashlib.sha256()
        for layer in sorted(self.prior_layers):
            h.update("\n".join(layer).encode())
            h.update(b"\0")
        return h.hexdigest()

    def with_prior_layers(self, layers: Iterable[Sequence[str]]) -> ChurnAwareDominators:
        """This strategy told which layers the registry already stores (``prior_layers``).

        It also sets ``told_registry``: a strategy told the record (even an
        empty one, as the first build of a new registry is) groups for later
        builds that are told it too.
        """
        return attrs.evolve(self, prior_layers=layers, told_registry=True)

    def adding_prior_layers(self, layers: Iterable[Sequence[str]]) -> ChurnAwareDominators:
        """This strategy with ``layers`` added to ``prior_layers`` (``told_registry`` as it is).

        The same as passing the union of both to :meth:`with_prior_layers`
        (or to ``prior_layers``), but only the new layers are checked: a
        registry that records every layer it stores grows its record this
        way, build after build, without building it again each time.
        """
        grown = _Record(self.prior_layers.union(_prior(layers)))
        return attrs.evolve(self, prior_layers=grown)

    def leaf_stable(self, graph: RuntimeGraph, budget: int) -> bool:
        """Whether adding one new root package to ``graph`` leaves every layer as it is.

        True when the closure plus one path still fits the budget with a
        layer per path, or, with ``reserve_root_slots``, when the roots are
        set apart (at most ``root_slots - 1`` of them, so one more still
        fits) and the rest already needed grouping.  The new package must
        bring one store path of its own; its references may be any paths of
        the closure.

        Without ``reserve_root_slots`` (the default) the rest of a closure
        beyond the budget takes every layer the roots leave, so a new root
        takes one from it: while ``roots + 1 <= root_slots < budget``, adding
        the package merges exactly the two layers that the next cheapest
        merge joins, and leaves every other layer as it was (merges happen in
        one order, whatever the number of layers to reach).
        """
        check_budget(budget)
        if len(graph) + 1 <= budget:
            return True
        if not self.reserve_root_slots:
            return False
        roots = len(IndexedGraph.of(graph).roots)
        return len(graph) > budget and roots + 1 <= self.root_slots < budget

    def group(self, graph: RuntimeGraph, budget: int) -> Sequence[LayerGroup]:
        check_budget(budget)
        ig = IndexedGraph.of(graph)
        n = len(ig)
        if not n:
            return []
        roots = ig.roots
        if n <= budget:
            pinned, cap = roots, n
        elif len(roots) <= self.root_slots < budget:
            reserved = self.root_slots if self.reserve_root_slots else len(roots)
            pinned, cap = roots, budget - reserved
        else:
            pinned, cap = (), budget
        kept: list[list[int]] = []
        if self.prior_layers:
            # Told the registry, a stored layer that holds a root with other
            # paths takes that root's slot (step 7): the root comes out in it.
            with_roots = self.told_registry and bool(pinned)
            kept = _contained(ig, frozenset(() if with_roots else pinned), self.prior_layers)
            if with_roots:
                freed = {v for layer in kept if len(layer) > 1 for v in layer} & set(pinned)
                pinned = tuple(v for v in pinned if v not in freed)
                cap += len(freed)
                kept = [layer for layer in kept if freed.issuperset(set(layer) & set(roots))]
        clustering = _Clustering(ig, frozenset(pinned), self)
        clustering.seed(kept)
        clustering.merge_small(self.min_layer_bytes)
        clustering.merge_down_to(cap)
        # Least exposed first: the bottom of the image changes least.
        layers = sorted(clustering.layers())
        return [ig.group(members, 1.0 - exposure) for exposure, _, members in layers]


class _Clustering:
    """The groups of the closure minus the pinned roots, and their merges.

    Groups are kept in a union-find forest; each group holds its members,
    bytes, closure (a bitset of path indices) and exposure.  Candidate
    merges sit in a heap keyed by cost; a popped candidate is merged only
    if its cost is still what it was pushed with, and pushed back with its
    new cost otherwise, so the heap needs no updates when a neighbour
    merges.  A candidate whose cost fell meanwhile (a group that already
    lost its original form has no sharing cost left to pay) waits until it
    is popped at its old cost: re-offering every such pair at once was
    measured slower and worse, as it lets groups that lost their form
    snowball.  What a merge costs in sharing is :class:`_FirstForm`'s or,
    told the registry's record, :class:`_Containment`'s.
    """

    def __init__(self, ig: IndexedGraph, pinned: frozenset[int], strategy: ChurnAwareDominators):
        self.ig = ig
        self.rate = strategy.change_rate
        n = len(ig)
        order = sorted(range(n), key=lambda i: (store_path_name(ig.paths[i]), ig.paths[i]))
        self.rank = [0] * n
        for position, i in enumerate(order):
            self.rank[i] = position
        self.rest = [v for v in range(n) if v not in pinned]
        self.pinned = pinned
        self.up = list(range(n))
        self.size = list(ig.sizes)
        self.closure = ig.closure_bits()
        # exposure by closure size, for every size a union can have
        self.table = [1.0 - math.exp(-self.rate * k) for k in range(n + 1)]
        self.exposure = [self.table[c.bit_count()] for c in self.closure]
        self.members: dict[int, list[int]] = {v: [v] for v in self.rest}
        # Step 9: told the registry, an image grouped as a whole (no root set
        # apart) estimates from its roots, at half the sharing weight.
        whole = strategy.told_registry and bool(strategy.root_scale) and not pinned
        # How likely each path is to be in another image: the share of the
        # unpinned closure that depends on it, but at least _ELSEWHERE.
        dependents = self._dependents()
        total = max(1, len(self.rest))
        elsewhere = [max(_ELSEWHERE, (d.bit_count() - 1) / total if d else 0.0) for d in dependents]
        if whole:
            k = strategy.root_scale
            roots = frozenset(ig.roots)
            mask = sum(1 << r for r in roots)
            # Roots other than v itself, less one: what a single root uses
            # alone says nothing about other images.
            elsewhere = [
                max(e, 1.0 - math.exp(-max(0, (d & mask).bit_count() - (v in roots) - 1) / k))
                for v, (e, d) in enumerate(zip(elsewhere, dependents, strict=True))
            ]
        if strategy.told_registry and strategy.reference_scale:
            # Step 8: referenced by many paths here, likely in other images too.
            k = strategy.reference_scale
            elsewhere = [
                max(e, 1.0 - math.exp(-len(users) / k))
                for e, users in zip(elsewhere, ig.users, strict=True)
            ]
        self.other_images = strategy.other_images
        self.stored_copy = strategy.stored_copy
        # Estimated sharing at half weight in an image grouped as a whole; a
        # stored layer's first merge (weight_of, in stored()) at full weight:
        # that blob is certainly stored, whatever the estimate.
        scale = _WHOLE_IMAGE_WEIGHT if whole else 1.0
        weight = [scale * self.weight_of(v) for v in range(n)]
        if strategy.told_registry:
            self.sharing: _FirstForm | _Containment = _Containment(
                self, elsewhere, weight, strategy.big_dependency_ratio
            )
        else:
            self.sharing = _FirstForm(self, elsewhere, weight)

    def weight_of(self, g: int) -> float:
        """What regrouping group ``g`` costs other images, per image (its full weight).

        Its expected re-pulled bytes plus a stored copy; for a prior layer,
        what losing its form costs (always at full weight).
        """
        return self.other_images * self.size[g] * (self.exposure[g] + self.stored_copy)

    def _dependents(self) -> list[int]:
        """For each unpinned path, the unpinned paths that depend on it, itself included (bits)."""
        ig, pinned = self.ig, self.pinned
        dependents = [0] * len(ig)
        for v in reversed(ig.topo):  # users before what they use
            if v in pinned:
                continue
            acc = 1 << v
            for u in ig.users[v]:
                if u not in pinned:
                    acc |= dependents[u]
            dependents[v] = acc
        return dependents

    def seed(self, layers: Sequence[Sequence[int]]) -> None:
        """Start from these groups (prior layers): merged, intact, certainly stored elsewhere."""
        for layer in layers:
            head = layer[0]
            for v in layer[1:]:
                self.merge(self.find(head), v)
            self.sharing.stored(self.find(head))

    def find(self, v: int) -> int:
        up = self.up
        while up[v] != v:
            up[v] = up[up[v]]
            v = up[v]
        return v

    def cost(self, a: int, b: int) -> float:
        union = self.table[(self.closure[a] | self.closure[b]).bit_count()]
        size, exposure = self.size, self.exposure
        churn = (size[a] + size[b]) * union - size[a] * exposure[a] - size[b] * exposure[b]
        return churn + self.sharing.cost(a, b)

    def merge(self, a: int, b: int) -> None:
        if len(self.members[a]) < len(self.members[b]):
            a, b = b, a
        self.sharing.merge(a, b)
        self.up[b] = a
        self.size[a] += self.size[b]
        self.closure[a] |= self.closure[b]
        self.exposure[a] = self.table[self.closure[a].bit_count()]
        self.members[a].extend(self.members.pop(b))

    def _candidates(self, small: int) -> list[tuple[float, int, int, int, int]]:
        """A heap of candidate pairs; with ``small``, only pairs with a group under it.

        Candidates are a path and each path it references, and the roots
        taking part (nothing references them) with their neighbours in
        exposure order.
        """
        rank, pinned, size = self.rank, self.pinned, self.ig.sizes
        roots = sorted(
            (v for v in self.ig.roots if v not in pinned),
            key=lambda v: (self.exposure[v], rank[v]),
        )
        pairs = itertools.chain(
            ((v, r) for v in self.rest for r in self.ig.refs[v] if r not in pinned),
            itertools.pairwise(roots),
        )
        heap = [
            (self.cost(a, b), rank[a], rank[b], a, b)
            for a, b in pairs
            if not small or min(size[a], size[b]) < small
        ]
        heapq.heapify(heap)
        return heap

    def _run(self, heap: list[tuple[float, int, int, int, int]], cap: int, small: int) -> None:
        """Merge the cheapest candidate whose cost is current, until ``cap`` groups or none left."""
        while len(self.members) > cap and heap:
            cost, _, _, a, b = heapq.heappop(heap)
            ga, gb = self.find(a), self.find(b)
            if ga == gb or (small and min(self.size[ga], self.size[gb]) >= small):
                continue
            fresh = self.cost(ga, gb)
            if _stale(fresh, cost):
                heapq.heappush(heap, (fresh, self.rank[a], self.rank[b], a, b))
                continue
            self.merge(ga, gb)

    def merge_small(self, small: int) -> None:
        """Merge every group under ``small`` bytes with its cheapest candidate partner."""
        if small:
            self._run(self._candidates(small), 0, small)

    def merge_down_to(self, cap: int) -> None:
        """Merge cheapest first until at most ``cap`` groups remain."""
        heap = self._candidates(0)
        while True:
            self._run(heap, cap, 0)
            if len(self.members) <= cap:
                return
            # No candidate joins two groups any more: neighbours in exposure order.
            heads = sorted(self.members, key=lambda g: (self.exposure[g], self.rank[g]))
            heap = [
                (self.cost(a, b), self.rank[a], self.rank[b], a, b)
                for a, b in itertools.pairwise(heads)
            ]
            heapq.heapify(heap)

    def layers(self) -> list[tuple[float, int, list[int]]]:
        """Every pinned root and every group: (exposure, rank of its head, sorted members)."""
        out = [(self.exposure[v], self.rank[v], [v]) for v in self.pinned]
        out.extend((self.exposure[g], self.rank[g], sorted(m)) for g, m in self.members.items())
        return out


class _FirstForm:
    """Sharing without a registry record: a group is shared only in its first form.

    Another image shares a layer only if it groups the same paths the same
    way, which it does by computing the same costs, so only a group that
    was never merged (or a prior layer, as stored) is likely to match.  Its
    first merge costs, per member, its weight times its chance of being
    elsewhere (1 for a prior layer); later merges cost nothing more.
    """

    def __init__(self, c: _Clustering, elsewhere: Sequence[float], weight: Sequence[float]):
        self.c = c
        self.shared = [w * e for w, e in zip(weight, elsewhere, strict=True)]
        self.intact = [True] * len(weight)

    def stored(self, g: int) -> None:
        """``g`` is a prior layer: intact, and certainly elsewhere."""
        self.intact[g] = True
        self.shared[g] = self.c.weight_of(g)

    def cost(self, a: int, b: int) -> float:
        return (self.shared[a] if self.intact[a] else 0.0) + (
            self.shared[b] if self.intact[b] else 0.0
        )

    def merge(self, a: int, b: int) -> None:
        """``b`` joins ``a``."""
        self.shared[a] += self.shared[b]
        self.intact[a] = False


class _Containment:
    """Sharing told the registry's record: a stored layer is reused by every image holding it.

    A later build told the record keeps a stored layer whole wherever the
    image holds all its paths, which it does exactly when it holds the
    group's *tops* (members no other member depends on: holding a path
    means holding its closure).  So a path costs other images its weight
    times the chance that an image holds it but not all its group's tops:
    ``elsewhere(path) - held(group)``, where ``held`` is the product of the
    tops' chances of being elsewhere.  A merge costs what it adds to that
    sum, on every merge: nothing when a path joins the group of its only
    user, its weight when a widely used path joins a rarely used one, and
    again when a group that already lost its first form takes in another
    top.  A prior layer also pays its whole weight once, on its first merge
    (that exact blob is stored already), as in :class:`_FirstForm`.  With
    ``ratio`` (step 10), a big group joining a group that uses it, whose
    tops hold ``ratio`` times fewer bytes, also pays its weight times what
    its chance falls short of ``_BIG_DEPENDENCY_ELSEWHERE``.
    """

    def __init__(
        self,
        c: _Clustering,
        elsewhere: Sequence[float],
        weight: Sequence[float],
        ratio: float = 0.0,
    ):
        self.c = c
        self.ratio = ratio
        self.elsewhere = elsewhere
        self.weight = list(weight)
        #: Each group's tops, sorted (the product below multiplies in that order).
        self.tops: dict[int, tuple[int, ...]] = {v: (v,) for v in c.rest}
        self.held = list(elsewhere)
        self.prior: dict[int, float] = {}

    def stored(self, g: int) -> None:
        """``g`` is a prior layer: its first merge also costs its whole weight."""
        self.prior[g] = self.c.weight_of(g)

    def _union(self, a: int, b: int) -> tuple[tuple[int, ...], float]:
        """The tops of ``a`` and ``b`` merged, and the chance an image holds them all."""
        in_a, in_b = self.c.closure[a], self.c.closure[b]
        tops = [t for t in self.tops[a] if not in_b >> t & 1]
        tops.extend(t for t in self.tops[b] if not in_a >> t & 1)
        tops.sort()
        elsewhere = self.elsewhere
        # One top (the common case) is its own chance: the product of one
        # factor, as math.prod computes it (1 * x is x).
        held = elsewhere[tops[0]] if len(tops) == 1 else math.prod([elsewhere[t] for t in tops])
        return tuple(tops), held

    def cost(self, a: int, b: int) -> float:
        # The first heap holds paths, not groups: a prior layer's members were
        # merged before it was built (the pop recomputes the cost anyway).
        a, b = self.c.find(a), self.c.find(b)
        if a == b:
            return 0.0
        _, held = self._union(a, b)
        weight, prior = self.weight, self.prior
        return (
            weight[a] * (self.held[a] - held)
            + weight[b] * (self.held[b] - held)
            + prior.get(a, 0.0)
            + prior.get(b, 0.0)
            + self._big_dependency(a, b)
        )

    def _big_dependency(self, a: int, b: int) -> float:
        """Step 10: a big group joining a much smaller user costs as if likely elsewhere."""
        if not self.ratio:
            return 0.0
        size = self.c.size
        big, small = (a, b) if size[a] >= size[b] else (b, a)
        if size[big] < _BIG_DEPENDENCY_BYTES:
            return 0.0
        sizes = self.c.ig.sizes
        if size[big] < self.ratio * sum(sizes[t] for t in self.tops[small]):
            return 0.0
        closure = self.c.closure[small]
        if not all(closure >> t & 1 for t in self.tops[big]):
            return 0.0
        return self.weight[big] * max(0.0, _BIG_DEPENDENCY_ELSEWHERE - self.held[big])

    def merge(self, a: int, b: int) -> None:
        """``b`` joins ``a``."""
        self.tops[a], self.held[a] = self._union(a, b)
        del self.tops[b]
        self.weight[a] += self.weight[b]
        self.prior.pop(a, None)
        self.prior.pop(b, None)


def _contained(
    ig: IndexedGraph, pinned: frozenset[int], prior: frozenset[tuple[str, ...]]
) -> list[list[int]]:
    """Prior layers made only of unpinned paths of ``ig``, disjoint: most bytes first."""
    index = {p: i for i, p in enumerate(ig.paths)}
    # Most of a registry's record lies outside any one closure: a layer whose
    # first or last path the closure lacks is dropped before the rest is looked up.
    found = []
    for layer in prior:
        if layer[0] not in index or layer[-1] not in index:
            continue
        members = [index.get(p, -1) for p in layer]
        if -1 not in members and pinned.isdisjoint(members):
            found.append((-sum(ig.sizes[v] for v in members), layer, members))
    found.sort()
    taken: set[int] = set()
    out = []
    for _, _, members in found:
        if taken.isdisjoint(members):
            taken.update(members)
            out.append(members)
    return out


def _stale(fresh: float, cost: float) -> bool:
    """Whether a candidate's cost changed since it was pushed (then it goes back in)."""
    return abs(fresh - cost) > 1e-9 * max(1.0, abs(cost))
