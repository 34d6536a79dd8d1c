"""Hypothesis strategies for closure graphs: random DAGs shaped like Nix closures."""

from __future__ import annotations

import hashlib

from hypothesis import strategies as st

from nixery_core.graph import RuntimeGraph, StorePath

_NIX32 = "0123456789abcdfghijklmnpqrsvwxyz"
#: Few names, so that ties on the name (without hash) happen and must be broken.
_NAMES = ("glibc", "zlib", "bash", "openssl", "python3", "hello", "curl", "git")


def store_path(index: int, name: str, version: str = "1.0") -> str:
    """A well-formed store path whose hash is fixed by ``index``."""
    digest = hashlib.sha256(str(index).encode()).digest()
    number = int.from_bytes(digest[:20], "big")
    hash32 = "".join(_NIX32[(number >> (5 * i)) & 31] for i in range(32))
    return f"/nix/store/{hash32}-{name}-{version}"


@st.composite
def closures(draw: st.DrawFn, max_paths: int = 40) -> RuntimeGraph:
    """An acyclic closure: path ``i`` may only reference paths before it.

    Every path nobody references is requested (as Nix reports a closure),
    and a few referenced paths are requested too.  Sizes span bytes to
    hundreds of megabytes so size thresholds are crossed.
    """
    count = draw(st.integers(min_value=1, max_value=max_paths))
    paths = [store_path(i, draw(st.sampled_from(_NAMES)), f"{i % 3}.{i}") for i in range(count)]
    refs: list[set[int]] = []
    for i in range(count):
        own = draw(st.sets(st.integers(0, i - 1), max_size=4)) if i else set()
        refs.append(own)
    sizes = draw(
        st.lists(
            st.one_of(st.integers(1, 200_000), st.integers(200_000, 300_000_000)),
            min_size=count,
            max_size=count,
        )
    )
    referenced = {r for own in refs for r in own}
    extra = draw(st.sets(st.integers(0, count - 1), max_size=3))
    requested = {f"pkg{i}": (paths[i],) for i in range(count) if i not in referenced or i in extra}
    store = [
        StorePath(paths[i], sizes[i], tuple(paths[r] for r in sorted(refs[i])))
        for i in range(count)
    ]
    return RuntimeGraph.build(store, requested)


@st.composite
def new_leaf_packages(draw: st.DrawFn, graph: RuntimeGraph) -> tuple[StorePath, str]:
    """A small package not in ``graph`` that references some of its paths, and its name."""
    existing = sorted(graph.paths)
    refs = draw(st.lists(st.sampled_from(existing), max_size=4, unique=True)) if existing else []
    size = draw(st.integers(1, 50_000))
    path = store_path(10_000 + len(existing), "newleaf", "0.1")
    return StorePath(path, size, tuple(sorted(refs))), "newleaf"


def with_package(graph: RuntimeGraph, leaf: StorePath, name: str) -> RuntimeGraph:
    """``graph`` with ``leaf`` added and requested as package ``name``."""
    requested = {**graph.requested, name: (leaf.path,)}
    return RuntimeGraph.build([*graph.paths.values(), leaf], requested)
