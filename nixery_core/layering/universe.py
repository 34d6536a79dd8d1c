"""A synthetic, nixpkgs-like package set that evolves week by week.

Used to measure layering strategies (see :mod:`nixery_core.layering.evaluation`
and ``benchmarks/layering_sim.py``); nothing else in the library needs it.

The universe is seeded and configurable: a libc-like core that nearly every
package references, libraries with heavy-tailed popularity, Python and Perl
ecosystems, a few very large packages, heavy-tailed NAR sizes, and some
packages split into ``out`` and ``lib`` outputs.  Each weekly revision
updates packages; store paths are input-addressed, so an updated package
gets a new store path hash and so does every package that depends on it,
however deep.  As in nixpkgs, a change that rebuilds many packages waits
for the next "staging" merge: packages that more than ``staging_share`` of
the set depends on are only updated in the mass rebuild every
``mass_rebuild_every`` weeks, everything else can be updated any week.

:func:`choose_images` picks fixed images of three kinds (small tools,
language runtimes, large images) whose closures :func:`image_graph` returns
at the current revision.  :func:`random_closure` makes one large closure of
an exact size, for speed measurements.
"""

from __future__ import annotations

import bisect
import hashlib
import itertools
import json
import math
import random
from collections.abc import Callable, Iterable, Mapping

import attrs

from nixery_core.errors import InvalidInput
from nixery_core.graph import RuntimeGraph, StorePath
from nixery_core.layering.common import package_name

__all__ = [
    "ImageSpec",
    "Universe",
    "UniverseConfig",
    "choose_images",
    "image_graph",
    "random_closure",
]

_NIX32 = "0123456789abcdfghijklmnpqrsvwxyz"
_SYLLABLES = [
    "ba",
    "ce",
    "di",
    "fo",
    "gu",
    "ka",
    "le",
    "mi",
    "no",
    "pu",
    "ra",
    "se",
    "ti",
    "vo",
    "xu",
    "za",
    "bre",
    "cla",
    "dro",
    "fli",
    "gna",
    "kri",
    "plo",
    "sna",
    "tre",
    "vla",
    "zen",
    "mor",
    "tix",
    "lun",
    "gar",
    "pex",
    "sol",
    "wir",
]

#: The libc-like core, bottom first: (name, NAR size, dependencies by name).
_CORE: tuple[tuple[str, int, tuple[str, ...]], ...] = (
    ("glibc", 30_000_000, ()),
    ("gcc-libs", 8_000_000, ("glibc",)),
    ("zlib", 150_000, ("glibc",)),
    ("xz", 700_000, ("glibc",)),
    ("bzip2", 200_000, ("glibc",)),
    ("libffi", 80_000, ("glibc",)),
    ("attr", 100_000, ("glibc",)),
    ("acl", 300_000, ("glibc", "attr")),
    ("gmp", 900_000, ("glibc", "gcc-libs")),
    ("ncurses", 3_000_000, ("glibc",)),
    ("readline", 600_000, ("glibc", "ncurses")),
    ("openssl", 6_000_000, ("glibc",)),
    ("pcre2", 1_500_000, ("glibc",)),
    ("expat", 300_000, ("glibc",)),
    ("libunistring", 2_000_000, ("glibc",)),
    ("libidn2", 400_000, ("glibc", "libunistring")),
    ("bash", 1_600_000, ("glibc", "readline", "ncurses")),
    ("coreutils", 8_000_000, ("glibc", "acl", "attr", "gmp", "openssl")),
    ("sqlite", 2_500_000, ("glibc", "zlib", "readline")),
    ("libxml2", 2_000_000, ("glibc", "zlib", "xz")),
    ("icu", 35_000_000, ("glibc", "gcc-libs")),
    ("util-linux", 9_000_000, ("glibc", "ncurses", "zlib")),
    ("keyutils", 100_000, ("glibc",)),
    ("krb5", 4_000_000, ("glibc", "keyutils", "openssl")),
    ("nghttp2", 500_000, ("glibc",)),
    ("curl", 1_200_000, ("glibc", "openssl", "zlib", "nghttp2", "libidn2", "krb5")),
    ("perl", 55_000_000, ("glibc", "bash")),
    (
        "python3",
        110_000_000,
        (
            "glibc",
            "bzip2",
            "expat",
            "libffi",
            "ncurses",
            "openssl",
            "readline",
            "sqlite",
            "xz",
            "zlib",
            "bash",
        ),
    ),
    ("nodejs", 70_000_000, ("glibc", "gcc-libs", "openssl", "zlib", "icu", "python3")),
    ("llvm", 450_000_000, ("glibc", "gcc-libs", "libxml2", "ncurses", "zlib", "python3")),
)
_RUNTIMES = ("python3", "perl")
_NAMED_BIG = {"texlive-core": 900_000_000, "ghc": 1_500_000_000, "qt": 280_000_000}


def _at_least(minimum: int) -> Callable[[object, attrs.Attribute[int], int], None]:
    def check(_instance: object, attribute: attrs.Attribute[int], value: int) -> None:
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise InvalidInput(f"{attribute.name} must be an integer >= {minimum}, got {value!r}")

    return check


def _share(_instance: object, attribute: attrs.Attribute[float], value: float) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value <= 1:
        raise InvalidInput(f"{attribute.name} must be a number in [0, 1], got {value!r}")


@attrs.frozen
class UniverseConfig:
    """The knobs of the synthetic package set and its weekly revisions.

    Out-of-range values raise :class:`~nixery_core.errors.InvalidInput`.
    """

    seed: int = 1
    #: Packages in the set (at least 200: the core and enough to pick images from).
    packages: int = attrs.field(default=3000, validator=_at_least(200))
    #: Weekly revisions after the first.
    revisions: int = attrs.field(default=26, validator=_at_least(0))
    #: Chance that a package outside staging gets a new version in a given week.
    update_rate: float = attrs.field(default=0.04, validator=_share)
    #: A mass rebuild (staging merge) every this many weeks; 0 for never.
    mass_rebuild_every: int = attrs.field(default=6, validator=_at_least(0))
    #: Share of the staging packages updated in a mass rebuild.
    staging_update_rate: float = attrs.field(default=0.35, validator=_share)
    #: A package that more than this share of the set depends on goes through staging.
    staging_share: float = attrs.field(default=0.03, validator=_share)
    #: Median NAR size of a generated package, in bytes.
    median_size: int = attrs.field(default=250_000, validator=_at_least(1))
    #: Spread of the log-normal NAR sizes (sigma of the natural log).
    size_sigma: float = 1.9
    #: Chance that an update also adds or drops a dependency.
    dependency_change_rate: float = attrs.field(default=0.1, validator=_share)
    #: Images of small tools (one to three packages).
    small_images: int = attrs.field(default=8, validator=_at_least(0))
    #: Large images (60 large applications and a very large package each).
    large_images: int = attrs.field(default=1, validator=_at_least(0))

    @classmethod
    def quick(cls, seed: int = 1) -> UniverseConfig:
        """A small universe for tests and smoke runs."""
        return cls(seed=seed, packages=900, revisions=12, small_images=5)


@attrs.define
class _Package:
    name: str
    version: tuple[int, int, int]
    outputs: tuple[str, ...]
    sizes: dict[str, int]
    deps: list[int]
    build: int = 0


def _nix32(data: bytes) -> str:
    digest = int.from_bytes(hashlib.sha256(data).digest()[:20], "big")
    return "".join(_NIX32[(digest >> (5 * i)) & 31] for i in range(32))


class Universe:
    """A package set that evolves week by week; every store path input-addressed."""

    def __init__(self, config: UniverseConfig) -> None:
        self.config = config
        self._rng = random.Random(config.seed)  # noqa: S311 -- seeded simulation data, not secrets
        self.packages: list[_Package] = []
        self._by_name: dict[str, int] = {}
        self._generate()
        self.staging = self._staging()
        self.week = 0

    # -- generation --

    def _name(self, prefix: str = "") -> str:
        rng = self._rng
        while True:
            parts = [rng.choice(_SYLLABLES) for _ in range(rng.choice((2, 2, 3)))]
            name = prefix + "".join(parts)
            if rng.random() < 0.15:
                name += rng.choice(("-utils", "-tools", "-bin", "-common"))
            if name not in self._by_name:
                return name

    def _size(self) -> int:
        cfg = self.config
        return max(1_000, int(cfg.median_size * math.exp(self._rng.gauss(0.0, cfg.size_sigma))))

    def _add(self, name: str, size: int, deps: Iterable[int]) -> int:
        rng = self._rng
        version = (rng.randint(0, 9), rng.randint(0, 30), rng.randint(0, 20))
        if rng.random() < 0.25 and size > 50_000:
            lib = int(size * rng.uniform(0.3, 0.8))
            outputs: tuple[str, ...] = ("lib", "out")
            sizes = {"lib": lib, "out": size - lib}
        else:
            outputs, sizes = ("out",), {"out": size}
        index = len(self.packages)
        self.packages.append(_Package(name, version, outputs, sizes, sorted(set(deps))))
        self._by_name[name] = index
        return index

    def _generate(self) -> None:
        rng, cfg = self._rng, self.config
        for core_name, core_size, core_deps in _CORE:
            self._add(core_name, core_size, [self._by_name[d] for d in core_deps])
        self._add("nss-cacert", 500_000, [])
        self._add("iana-etc", 120_000, [])
        core = len(self.packages)
        glibc, gcc = self._by_name["glibc"], self._by_name["gcc-libs"]
        python, perl = self._by_name["python3"], self._by_name["perl"]
        # Libraries others may depend on, with a heavy-tailed attractiveness:
        # a few are depended on by very many, most by a handful.
        libs: list[int] = []
        weights: list[float] = []
        for i in range(2, core):
            name = self.packages[i].name
            libs.append(i)
            weights.append(1.0 if name in {"perl", "python3", "nodejs", "llvm", "icu"} else 12.0)
        for _ in range(core, cfg.packages):
            kind = rng.random()
            deps = {glibc} if rng.random() < 0.95 else set()
            if rng.random() < 0.3:
                deps.add(gcc)
            prefix = ""
            if kind < 0.15:
                deps.add(python)
                prefix = "python3.11-"
            elif kind < 0.2:
                deps.add(perl)
                prefix = "perl5.38-"
            if prefix:
                # Ecosystem packages depend on their own kind more than on others.
                same = [j for j in libs if self.packages[j].name.startswith(prefix)]
                deps.update(rng.sample(same, min(len(same), int(rng.expovariate(1 / 1.5)))))
            for _ in range(int(rng.expovariate(1 / 3.0))):
                deps.add(rng.choices(libs, weights=weights)[0])
            index = self._add(self._name(prefix), self._size(), deps)
            if rng.random() < 0.5:
                libs.append(index)
                weights.append(rng.paretovariate(1.2))
        self.libraries = frozenset(libs)
        for name, size in _NAMED_BIG.items():
            deps = {glibc, gcc, *rng.sample(libs, 6)}
            self._add(name, size, deps)

    def _staging(self) -> frozenset[int]:
        """Packages with more dependents than ``staging_share`` of the universe."""
        dependents = [0] * len(self.packages)
        users: list[list[int]] = [[] for _ in self.packages]
        for i, pkg in enumerate(self.packages):
            for d in pkg.deps:
                users[d].append(i)
        for i in range(len(self.packages)):
            seen = {i}
            stack = [i]
            while stack:
                for u in users[stack.pop()]:
                    if u not in seen:
                        seen.add(u)
                        stack.append(u)
            dependents[i] = len(seen) - 1
        limit = self.config.staging_share * len(self.packages)
        return frozenset(i for i, n in enumerate(dependents) if n > limit)

    # -- evolution --

    def advance(self) -> frozenset[int]:
        """Move to the next weekly revision; return the packages updated."""
        cfg, rng = self.config, self._rng
        self.week += 1
        mass = cfg.mass_rebuild_every > 0 and self.week % cfg.mass_rebuild_every == 0
        updated = set()
        for i in range(len(self.packages)):
            if i in self.staging:
                if mass and rng.random() < cfg.staging_update_rate:
                    updated.add(i)
            elif rng.random() < cfg.update_rate:
                updated.add(i)
        for i in sorted(updated):
            pkg = self.packages[i]
            major, minor, patch = pkg.version
            pkg.version = (major, minor + 1, 0) if rng.random() < 0.2 else (major, minor, patch + 1)
            for out in pkg.outputs:
                pkg.sizes[out] = max(1_000, int(pkg.sizes[out] * math.exp(rng.gauss(0.0, 0.08))))
            if i >= len(_CORE) and rng.random() < cfg.dependency_change_rate:
                if rng.random() < 0.5 and len(pkg.deps) > 1:
                    pkg.deps.remove(rng.choice(pkg.deps[1:]))
                elif i > 0:
                    pkg.deps = sorted({*pkg.deps, rng.randrange(0, i)})
        return frozenset(updated)

    def store_paths(self) -> dict[tuple[int, str], StorePath]:
        """Every output of every package at this revision, keyed by (package, output)."""
        hashes: list[bytes] = []
        out: dict[tuple[int, str], StorePath] = {}
        for i, pkg in enumerate(self.packages):
            seed = json.dumps([pkg.name, pkg.version, pkg.build]).encode()
            h = hashlib.sha256(seed + b"".join(hashes[d] for d in pkg.deps)).digest()
            hashes.append(h)
            version = ".".join(map(str, pkg.version))
            dep_paths = [self._main_path(out, d) for d in pkg.deps]
            for output in pkg.outputs:
                suffix = "" if output == "out" else f"-{output}"
                path = f"/nix/store/{_nix32(h + output.encode())}-{pkg.name}-{version}{suffix}"
                refs = list(dep_paths)
                if output == "out" and "lib" in pkg.outputs:
                    refs.append(out[(i, "lib")].path)
                out[(i, output)] = StorePath(path, pkg.sizes[output], tuple(refs))
        return out

    def _main_path(self, paths: Mapping[tuple[int, str], StorePath], dep: int) -> str:
        outputs = self.packages[dep].outputs
        return paths[(dep, "lib" if "lib" in outputs else "out")].path

    def index_of(self, name: str) -> int:
        return self._by_name[name]

    def closure_size(self, package: int) -> int:
        seen = {package}
        stack = [package]
        while stack:
            for d in self.packages[stack.pop()].deps:
                if d not in seen:
                    seen.add(d)
                    stack.append(d)
        return len(seen)

    def popularity(self) -> dict[str, int]:
        """Direct dependents per package name over the whole set (Nixery's table)."""
        counts: dict[str, int] = {package_name(p.name): 0 for p in self.packages}
        for pkg in self.packages:
            for d in pkg.deps:
                counts[package_name(self.packages[d].name)] += 1
        return counts


@attrs.frozen
class ImageSpec:
    """An image: a kind (for the report) and the package names it requests."""

    kind: str
    packages: tuple[str, ...]


def choose_images(universe: Universe) -> list[ImageSpec]:
    """Small tools, language runtimes and large images, fixed for every revision."""
    cfg = universe.config
    rng = random.Random(cfg.seed * 7919 + 1)  # noqa: S311 -- seeded simulation data
    always = ("nss-cacert", "iana-etc")
    core = len(_CORE) + 2
    apps = [
        i
        for i in range(core, len(universe.packages))
        if not universe.packages[i].name.startswith(("python3.11-", "perl5.38-"))
    ]
    sizes = {i: universe.closure_size(i) for i in apps}
    small = [i for i in apps if 5 <= sizes[i] <= 80]
    images = []
    for _ in range(cfg.small_images):
        picks = rng.sample(small, min(len(small), rng.choice((1, 1, 2, 3))))
        images.append(ImageSpec("tool", tuple(universe.packages[i].name for i in picks)))
    for runtime in _RUNTIMES:
        prefix = {"python3": "python3.11-", "perl": "perl5.38-"}[runtime]
        libs = [p.name for p in universe.packages if p.name.startswith(prefix)]
        images.append(ImageSpec("runtime", (runtime, *rng.sample(libs, min(5, len(libs))))))
    tool = (universe.packages[rng.choice(small)].name,) if small else ()
    images.append(ImageSpec("runtime", ("nodejs", *tool)))
    large = sorted(apps, key=lambda i: (-sizes[i], i))[:300]
    for n in range(cfg.large_images):
        big = universe.index_of(("ghc", "qt", "texlive-core")[n % 3])
        picks = [*rng.sample(large, min(60, len(large))), big]
        images.append(ImageSpec("large", tuple(universe.packages[i].name for i in picks)))
    return [ImageSpec(img.kind, tuple(sorted({*img.packages, *always}))) for img in images]


def image_graph(
    universe: Universe, paths: Mapping[tuple[int, str], StorePath], image: ImageSpec
) -> RuntimeGraph:
    """The runtime closure of one image at the universe's current revision."""
    by_path = {sp.path: sp for sp in paths.values()}
    requested = {
        name: tuple(
            paths[(universe.index_of(name), o)].path
            for o in universe.packages[universe.index_of(name)].outputs
        )
        for name in image.packages
    }
    seen: set[str] = set()
    stack = [p for outs in requested.values() for p in outs]
    while stack:
        path = stack.pop()
        if path not in seen:
            seen.add(path)
            stack.extend(by_path[path].references)
    return RuntimeGraph.build((by_path[p] for p in sorted(seen)), requested)


def random_closure(paths: int, seed: int = 1, roots: int = 20) -> RuntimeGraph:
    """One closure of exactly ``paths`` store paths, shaped like a large image.

    A libc-like bottom that nearly every path references, heavy-tailed NAR
    sizes, references preferring a few popular libraries, and ``roots``
    requested packages on top that together reach every path.
    """
    rng = random.Random(seed)  # noqa: S311 -- seeded simulation data
    names = [
        f"/nix/store/{_nix32(f'{seed}-{i}'.encode())}-pkg{_letters(i)}-1.{i % 7}"
        for i in range(paths)
    ]
    cumulative = list(itertools.accumulate(rng.paretovariate(1.2) for _ in range(paths)))
    refs: list[set[int]] = [set() for _ in range(paths)]
    for i in range(1, paths):
        if rng.random() < 0.95:
            refs[i].add(0)
        for _ in range(int(rng.expovariate(1 / 3.0))):
            pick = bisect.bisect_right(cumulative, rng.random() * cumulative[i - 1], 0, i - 1)
            refs[i].add(pick)
    heads = range(max(0, paths - roots), paths)
    referenced = {r for own in refs for r in own}
    for i in range(paths - len(heads)):
        if i not in referenced:
            refs[rng.choice(heads)].add(i)
    sizes = [max(1_000, int(250_000 * math.exp(rng.gauss(0.0, 1.9)))) for _ in range(paths)]
    store = [
        StorePath(names[i], sizes[i], tuple(names[r] for r in sorted(refs[i])))
        for i in range(paths)
    ]
    referenced = {r for own in refs for r in own}
    requested = {f"root{i}": (names[i],) for i in range(paths) if i not in referenced}
    return RuntimeGraph.build(store, requested)


def _letters(i: int) -> str:
    out = ""
    while True:
        out += "abcdefghijklmnopqrstuvwxyz"[i % 26]
        i //= 26
        if not i:
            return out
