"""A synthetic, nixpkgs-like package set that evolves week by week.

Used to measure layering strategies (see :mod:`nixery_core_sim.evaluation`
and ``benchmarks/layering_sim.py``); nothing else in the library needs it.

What it models, and why (each part is what makes real closures hard to
layer; ``docs/layering.md`` lists the calibration figures):

- **Size and shape.** A hand-written core (``glibc``, ``gcc-libs``,
  ``openssl``, ``python3``, ``perl``, ``nodejs``, ``llvm``, a GUI stack from
  ``libpng`` to ``gtk3`` and ``mesa``...) and 10,000 generated packages
  in ecosystems: C libraries, Python, Perl and Haskell packages, GUI
  libraries and applications.  A new package references a few earlier ones,
  picked with a heavy-tailed attractiveness, so a few libraries are used by
  very many packages and most by a handful.  Closures come out as in
  nixpkgs: a shell tool image has 50-150 store paths, a Python or Haskell
  image several hundred, a large desktop-like image a few thousand.
- **Sizes.** Log-normal NAR sizes per ecosystem (Perl modules of tens of
  kilobytes, applications of megabytes), more than a quarter of all paths
  under 100 kB, and a few paths over 100 MB (``python3``, ``llvm``, ``mesa``,
  ``ghc``, ``texlive``, ``qtbase``, ``openjdk``...).  A quarter of the
  packages are split into ``out`` and ``lib`` outputs.
- **Revisions.** One revision a week, as a channel moves: each
  package outside staging gets a new version with probability
  ``update_rate``; about ``security_fixes`` widely used libraries are
  patched (weighted by how many packages use them); every
  ``mass_rebuild_every`` weeks a mass rebuild (a staging merge) updates the
  bottom of the set (``glibc``, ``gcc-libs``) and ``staging_update_rate`` of
  the other staging packages (those more than ``staging_share`` of the set
  depends on).
- **Input addressing.** A store path's hash covers its package's name,
  version and build and the hashes of everything it references, so an
  update gives the package *and every package that depends on it, however
  deep,* new store paths.

:func:`choose_images` picks fixed images of three kinds (shell tools,
language runtimes, a large desktop-like image) whose closures
:func:`image_graph` returns at the current revision.  :func:`random_closure`
makes one large closure of an exact size, for speed measurements.
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
MB = 1_000_000

#: The hand-written core, bottom first: (name, NAR size, dependencies by name).
_CORE: tuple[tuple[str, int, tuple[str, ...]], ...] = (
    ("glibc", 30 * MB, ()),
    ("gcc-libs", 8 * MB, ("glibc",)),
    ("zlib", 150_000, ("glibc",)),
    ("xz", 700_000, ("glibc",)),
    ("bzip2", 200_000, ("glibc",)),
    ("libffi", 80_000, ("glibc",)),
    ("attr", 100_000, ("glibc",)),
    ("acl", 300_000, ("glibc", "attr")),
    ("gmp", 900_000, ("glibc", "gcc-libs")),
    ("ncurses", 3 * MB, ("glibc",)),
    ("readline", 600_000, ("glibc", "ncurses")),
    ("openssl", 6 * MB, ("glibc",)),
    ("pcre2", 1_500_000, ("glibc",)),
    ("expat", 300_000, ("glibc",)),
    ("libunistring", 2 * MB, ("glibc",)),
    ("libidn2", 400_000, ("glibc", "libunistring")),
    ("bash", 1_600_000, ("glibc", "readline", "ncurses")),
    ("coreutils", 8 * MB, ("glibc", "acl", "attr", "gmp", "openssl")),
    ("sqlite", 2_500_000, ("glibc", "zlib", "readline")),
    ("libxml2", 2 * MB, ("glibc", "zlib", "xz")),
    ("icu", 35 * MB, ("glibc", "gcc-libs")),
    ("util-linux", 9 * MB, ("glibc", "ncurses", "zlib")),
    ("keyutils", 100_000, ("glibc",)),
    ("krb5", 4 * MB, ("glibc", "keyutils", "openssl")),
    ("nghttp2", 500_000, ("glibc",)),
    ("curl", 1_200_000, ("glibc", "openssl", "zlib", "nghttp2", "libidn2", "krb5")),
    ("tzdata", 2 * MB, ()),
    ("perl", 55 * MB, ("glibc", "bash")),
    (
        "python3",
        110 * MB,
        ("glibc", "bzip2", "expat", "libffi", "ncurses", "openssl", "readline", "sqlite", "xz",
         "zlib", "bash", "tzdata"),
    ),
    ("nodejs", 70 * MB, ("glibc", "gcc-libs", "openssl", "zlib", "icu", "python3")),
    ("llvm", 450 * MB, ("glibc", "gcc-libs", "libxml2", "ncurses", "zlib", "libffi")),
    ("ghc", 1_500 * MB, ("glibc", "gcc-libs", "gmp", "libffi", "ncurses")),
    ("libpng", 300_000, ("glibc", "zlib")),
    ("libjpeg", 600_000, ("glibc",)),
    ("freetype", 1_500_000, ("glibc", "zlib", "bzip2", "libpng")),
    ("fontconfig", 1 * MB, ("glibc", "freetype", "expat")),
    ("dejavu-fonts", 11 * MB, ()),
    ("glib", 8 * MB, ("glibc", "pcre2", "libffi", "zlib", "util-linux")),
    ("dbus", 1_500_000, ("glibc", "expat")),
    ("libxau", 40_000, ("glibc",)),
    ("libxdmcp", 60_000, ("glibc",)),
    ("libxcb", 2 * MB, ("glibc", "libxau", "libxdmcp")),
    ("libx11", 3 * MB, ("glibc", "libxcb")),
    ("libxext", 200_000, ("glibc", "libx11")),
    ("libxrender", 100_000, ("glibc", "libx11")),
    ("pixman", 900_000, ("glibc",)),
    ("cairo", 2 * MB, ("glibc", "fontconfig", "freetype", "libpng", "libx11", "libxext",
                       "libxrender", "pixman", "glib")),
    ("harfbuzz", 2 * MB, ("glibc", "gcc-libs", "freetype", "glib")),
    ("pango", 1_500_000, ("glibc", "cairo", "harfbuzz", "glib", "fontconfig")),
    ("mesa", 480 * MB, ("glibc", "gcc-libs", "llvm", "libx11", "libxext", "expat", "zlib")),
    ("gtk3", 40 * MB, ("glibc", "pango", "cairo", "glib", "libx11", "dbus", "mesa", "libjpeg")),
    ("qtbase", 280 * MB, ("glibc", "gcc-libs", "openssl", "icu", "glib", "mesa", "fontconfig",
                          "harfbuzz", "dbus", "libx11")),
    ("openjdk", 320 * MB, ("glibc", "zlib", "freetype", "fontconfig", "libx11", "libxext",
                           "libxrender", "alsa-lib")),
    ("texlive", 900 * MB, ("glibc", "perl", "python3", "freetype", "libpng", "zlib")),
    ("nss-cacert", 500_000, ()),
    ("iana-etc", 120_000, ()),
)
#: Core packages nearly every store path depends on: updated only in mass rebuilds.
_BOTTOM = ("glibc", "gcc-libs")
_ALWAYS = ("nss-cacert", "iana-etc")


@attrs.frozen
class _Ecosystem:
    """A family of generated packages: share of the set, name prefix, sizes, references."""

    name: str
    share: float
    prefix: str
    median_size: int
    #: Core packages every member references.
    runtime: tuple[str, ...]
    #: Mean references to earlier members of the same family, and to C libraries.
    own_refs: float
    lib_refs: float
    #: Whether other packages may reference members (libraries) or not (applications).
    library: bool


_ECOSYSTEMS = (
    _Ecosystem("lib", 0.32, "", 250_000, (), 2.5, 0.0, library=True),
    _Ecosystem("python", 0.2, "python3.11-", 300_000, ("python3",), 3.5, 0.5, library=True),
    _Ecosystem("perl", 0.06, "perl5.38-", 60_000, ("perl",), 2.5, 0.1, library=True),
    _Ecosystem("haskell", 0.08, "haskell-", 1_500_000, ("ghc",), 3.5, 0.2, library=True),
    _Ecosystem("gui", 0.12, "", 400_000, ("gtk3",), 4.0, 1.5, library=True),
    _Ecosystem("app", 0.22, "", 1_500_000, (), 0.0, 5.0, library=False),
)
#: Pareto shape of a generated library's attractiveness (smaller: a few
#: libraries get nearly all references).
_ALPHA = 1.6
#: Core packages in the C library and GUI library families (others may reference them).
_CORE_LIBS = (
    "zlib", "xz", "bzip2", "libffi", "attr", "acl", "gmp", "ncurses", "readline", "openssl",
    "pcre2", "expat", "libunistring", "libidn2", "sqlite", "libxml2", "icu", "util-linux",
    "keyutils", "krb5", "nghttp2", "curl", "libpng", "libjpeg", "freetype", "dbus", "alsa-lib",
)
_GUI_LIBS = (
    "fontconfig", "dejavu-fonts", "glib", "libxau", "libxdmcp", "libxcb", "libx11", "libxext",
    "libxrender", "pixman", "cairo", "harfbuzz", "pango", "mesa",
)
_ALSA = ("alsa-lib", 1_200_000, ("glibc",))


def _at_least(minimum: int) -> Callable[[object, attrs.Attribute[int], int], None]:
    def check(_instance: object, attribute: attrs.Attribute[int], value: int) -> None:
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise InvalidInput(f"{attribute.name} must be an integer >= {minimum}, got {value!r}")

    return check


def _share(_instance: object, attribute: attrs.Attribute[float], value: float) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value <= 1:
        raise InvalidInput(f"{attribute.name} must be a number in [0, 1], got {value!r}")


def _non_negative(_instance: object, attribute: attrs.Attribute[float], value: float) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float) or not value >= 0:
        raise InvalidInput(f"{attribute.name} must be a non-negative number, got {value!r}")


@attrs.frozen
class UniverseConfig:
    """The knobs of the synthetic package set and its weekly revisions.

    Out-of-range values raise :class:`~nixery_core.errors.InvalidInput`.
    The defaults are the calibrated universe of ``docs/layering.md``.
    """

    seed: int = 1
    #: Generated packages in the set, besides the hand-written core.
    packages: int = attrs.field(default=10000, validator=_at_least(200))
    #: Weekly revisions after the first.
    revisions: int = attrs.field(default=26, validator=_at_least(0))
    #: Chance that a package outside staging gets a new version in a given week.
    update_rate: float = attrs.field(default=0.01, validator=_share)
    #: Mean number of widely used libraries patched in a given week.
    security_fixes: float = attrs.field(default=1.0, validator=_non_negative)
    #: A mass rebuild (staging merge) every this many weeks; 0 for never.
    mass_rebuild_every: int = attrs.field(default=4, validator=_at_least(0))
    #: Share of the staging packages updated in a mass rebuild.
    staging_update_rate: float = attrs.field(default=0.3, validator=_share)
    #: A package that more than this share of the set depends on goes through staging.
    staging_share: float = attrs.field(default=0.03, validator=_share)
    #: Spread of the log-normal NAR sizes (sigma of the natural log).
    size_sigma: float = attrs.field(default=1.8, validator=_non_negative)
    #: Chance that an update also adds or drops a dependency.
    dependency_change_rate: float = attrs.field(default=0.1, validator=_share)
    #: Images of shell tools (``bash``, ``coreutils`` and one to three tools).
    small_images: int = attrs.field(default=8, validator=_at_least(0))
    #: Large desktop-like images (60 applications and a very large package each).
    large_images: int = attrs.field(default=1, validator=_at_least(0))
    #: Applications per large image.
    large_apps: int = attrs.field(default=60, validator=_at_least(1))

    @classmethod
    def quick(cls, seed: int = 1) -> UniverseConfig:
        """A small universe for tests and smoke runs (same rates, fewer packages and weeks)."""
        return cls(seed=seed, packages=5000, revisions=8, small_images=4, large_apps=40)


@attrs.define
class _Package:
    name: str
    version: tuple[int, int, int]
    outputs: tuple[str, ...]
    sizes: dict[str, int]
    deps: list[int]
    ecosystem: str
    build: int = 0


def _nix32(data: bytes) -> str:
    digest = int.from_bytes(hashlib.sha256(data).digest()[:20], "big")
    return "".join(_NIX32[(digest >> (5 * i)) & 31] for i in range(32))


def _poisson(rng: random.Random, mean: float) -> int:
    """A Poisson draw (Knuth's method; the means here are small)."""
    limit, count, product = math.exp(-mean), 0, rng.random()
    while product > limit:
        count += 1
        product *= rng.random()
    return count


class Universe:
    """A package set that evolves week by week; every store path input-addressed.

    Packages are numbered so that every package's dependencies come before
    it.  ``staging`` holds the packages only a mass rebuild updates;
    ``libraries`` the packages others may reference.
    """

    def __init__(self, config: UniverseConfig) -> None:
        self.config = config
        self._rng = random.Random(config.seed)  # noqa: S311 -- seeded simulation data, not secrets
        self.packages: list[_Package] = []
        self._by_name: dict[str, int] = {}
        self._generate()
        self._dependents = self._count_dependents()
        limit = config.staging_share * len(self.packages)
        self.staging = frozenset(i for i, n in enumerate(self._dependents) if n > limit)
        self.bottom = frozenset(self._by_name[n] for n in _BOTTOM)
        # Security fixes hit staging libraries, weighted by their direct users.
        users = [0] * len(self.packages)
        for pkg in self.packages:
            for d in pkg.deps:
                users[d] += 1
        self._patchable = sorted(self.staging - self.bottom)
        self._patch_weights = list(
            itertools.accumulate(float(users[i]) for i in self._patchable)
        )
        self.week = 0

    # -- generation --

    def _name(self, prefix: str) -> str:
        rng = self._rng
        while True:
            parts = [rng.choice(_SYLLABLES) for _ in range(rng.choice((2, 2, 3)))]
            name = prefix + "".join(parts)
            if rng.random() < 0.15:
                name += rng.choice(("-utils", "-tools", "-bin", "-common"))
            if name not in self._by_name:
                return name

    def _size(self, median: int) -> int:
        return max(1_000, int(median * math.exp(self._rng.gauss(0.0, self.config.size_sigma))))

    def _add(self, name: str, size: int, deps: Iterable[int], ecosystem: str) -> int:
        rng = self._rng
        version = (rng.randint(0, 9), rng.randint(0, 30), rng.randint(0, 20))
        if rng.random() < 0.25 and size > 50_000:
            lib = int(size * rng.uniform(0.3, 0.8))
            outputs: tuple[str, ...] = ("lib", "out")
            sizes = {"lib": lib, "out": size - lib}
        else:
            outputs, sizes = ("out",), {"out": size}
        index = len(self.packages)
        self.packages.append(_Package(name, version, outputs, sizes, sorted(set(deps)), ecosystem))
        self._by_name[name] = index
        return index

    def _generate(self) -> None:
        rng, cfg = self._rng, self.config
        pending = list(_CORE)
        pending.insert(next(i for i, c in enumerate(_CORE) if c[0] == "openjdk"), _ALSA)
        for core_name, core_size, core_deps in pending:
            self._add(core_name, core_size, [self._by_name[d] for d in core_deps], "core")
        glibc, gcc = self._by_name["glibc"], self._by_name["gcc-libs"]
        # Each family's members, with a heavy-tailed attractiveness: a new
        # package references a member with probability proportional to it.
        pools: dict[str, tuple[list[int], list[float]]] = {e.name: ([], []) for e in _ECOSYSTEMS}
        c_libs = pools["lib"]
        for name in _CORE_LIBS:
            c_libs[0].append(self._by_name[name])
            c_libs[1].append(8.0)
        for name in _GUI_LIBS:
            pools["gui"][0].append(self._by_name[name])
            pools["gui"][1].append(8.0)
        shares = list(itertools.accumulate(e.share for e in _ECOSYSTEMS))
        for _ in range(cfg.packages):
            eco = _ECOSYSTEMS[bisect.bisect_left(shares, rng.random() * shares[-1])]
            deps = {glibc} if rng.random() < 0.95 else set()
            if rng.random() < 0.3:
                deps.add(gcc)
            deps.update(self._by_name[r] for r in eco.runtime)
            if eco.name == "app":
                deps.update(self._app_extras(pools))
            deps.update(self._pick(pools[eco.name], eco.own_refs))
            deps.update(self._pick(c_libs, eco.lib_refs))
            index = self._add(self._name(eco.prefix), self._size(eco.median_size), deps, eco.name)
            if eco.library:
                pools[eco.name][0].append(index)
                pools[eco.name][1].append(rng.paretovariate(_ALPHA))

    def _app_extras(self, pools: Mapping[str, tuple[list[int], list[float]]]) -> set[int]:
        """An application's ecosystem: GUI, Python, Perl or none."""
        rng = self._rng
        kind = rng.random()
        if kind < 0.35:
            return {self._by_name["gtk3" if rng.random() < 0.7 else "qtbase"],
                    *self._pick(pools["gui"], 3.0)}
        if kind < 0.5:
            return {self._by_name["python3"], *self._pick(pools["python"], 3.0)}
        if kind < 0.6:
            return {self._by_name["perl"], *self._pick(pools["perl"], 2.5)}
        return set()

    def _pick(self, pool: tuple[list[int], list[float]], mean: float) -> set[int]:
        members, weights = pool
        if not members or mean <= 0:
            return set()
        count = min(len(members), int(self._rng.expovariate(1 / mean) + 0.5))
        return set(self._rng.choices(members, weights=weights, k=count)) if count else set()

    def _count_dependents(self) -> list[int]:
        """For each package, how many packages depend on it, directly or not."""
        users: list[list[int]] = [[] for _ in self.packages]
        for i, pkg in enumerate(self.packages):
            for d in pkg.deps:
                users[d].append(i)
        bits = [0] * len(self.packages)
        for i in reversed(range(len(self.packages))):  # users come after what they use
            acc = 1 << i
            for u in users[i]:
                acc |= bits[u]
            bits[i] = acc
        return [b.bit_count() - 1 for b in bits]

    # -- evolution --

    def advance(self) -> frozenset[int]:
        """Move to the next weekly revision; return the packages updated."""
        cfg, rng = self.config, self._rng
        self.week += 1
        mass = cfg.mass_rebuild_every > 0 and self.week % cfg.mass_rebuild_every == 0
        updated: set[int] = set()
        for i in range(len(self.packages)):
            if i in self.staging:
                if mass and (i in self.bottom or rng.random() < cfg.staging_update_rate):
                    updated.add(i)
            elif rng.random() < cfg.update_rate:
                updated.add(i)
        if self._patchable:
            total = self._patch_weights[-1]
            for _ in range(_poisson(rng, cfg.security_fixes)):
                pick = bisect.bisect_left(self._patch_weights, rng.random() * total)
                updated.add(self._patchable[min(pick, len(self._patchable) - 1)])
        for i in sorted(updated):
            self._update(i)
        return frozenset(updated)

    def _update(self, i: int) -> None:
        rng, pkg = self._rng, self.packages[i]
        major, minor, patch = pkg.version
        pkg.version = (major, minor + 1, 0) if rng.random() < 0.2 else (major, minor, patch + 1)
        for out in pkg.outputs:
            pkg.sizes[out] = max(1_000, int(pkg.sizes[out] * math.exp(rng.gauss(0.0, 0.05))))
        if pkg.ecosystem != "core" and rng.random() < self.config.dependency_change_rate:
            if rng.random() < 0.5 and len(pkg.deps) > 1:
                pkg.deps.remove(rng.choice(pkg.deps[1:]))
            else:
                pick = rng.randrange(0, i)
                if self.packages[pick].ecosystem in {"core", "lib"}:
                    pkg.deps = sorted({*pkg.deps, pick})

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

    def content_keys(
        self, paths: Mapping[tuple[int, str], StorePath]
    ) -> dict[str, tuple[str, str, tuple[int, int, int], int]]:
        """For each store path, what names its files' content: package, output, version, build.

        Two store paths with the same key differ only in the store paths
        their files embed (a dependency was rebuilt); see
        :mod:`nixery_core_sim.files`.
        """
        out = {}
        for (i, output), store_path in paths.items():
            pkg = self.packages[i]
            out[store_path.path] = (pkg.name, output, pkg.version, pkg.build)
        return out

    def _main_path(self, paths: Mapping[tuple[int, str], StorePath], dep: int) -> str:
        outputs = self.packages[dep].outputs
        return paths[(dep, "lib" if "lib" in outputs else "out")].path

    def index_of(self, name: str) -> int:
        return self._by_name[name]

    def closure(self, packages: Iterable[int]) -> set[int]:
        """The packages ``packages`` depend on, directly or not, themselves included."""
        seen = set(packages)
        stack = list(seen)
        while stack:
            for d in self.packages[stack.pop()].deps:
                if d not in seen:
                    seen.add(d)
                    stack.append(d)
        return seen

    def closure_size(self, package: int) -> int:
        return len(self.closure([package]))

    def popularity(self, *, transitive: bool = False) -> dict[str, int]:
        """Dependents per package name over the whole set at this revision (Nixery's table).

        By default the direct dependents (what references the package), as
        Nixery's ``popcount`` counts references; with ``transitive``, every
        package that depends on it directly or not (``glibc`` then counts
        nearly the whole set).  As in Nixery, only packages something
        depends on are listed; Nixery counts any other package as 1.
        """
        counts: dict[str, int] = {}
        if transitive:
            for i, dependents in enumerate(self._count_dependents()):
                if dependents:
                    name = package_name(self.packages[i].name)
                    counts[name] = counts.get(name, 0) + dependents
            return dict(sorted(counts.items()))
        for pkg in self.packages:
            for d in pkg.deps:
                name = package_name(self.packages[d].name)
                counts[name] = counts.get(name, 0) + 1
        return dict(sorted(counts.items()))


@attrs.frozen
class ImageSpec:
    """An image: a kind (for the report) and the package names it requests."""

    kind: str
    packages: tuple[str, ...]


def choose_images(universe: Universe) -> list[ImageSpec]:
    """Shell tools, language runtimes and large images, fixed for every revision.

    - ``tool``: ``bash`` and ``coreutils`` with one to three applications
      whose closures hold 20 to 120 packages;
    - ``runtime``: ``python3`` with 8 packages, ``perl`` with 6 modules,
      ``nodejs`` with a tool, ``ghc`` with 8 Haskell libraries;
    - ``large``: ``large_apps`` applications (GUI ones among them) and one of
      ``texlive``, ``qtbase`` or ``openjdk``.

    Every image also carries ``nss-cacert`` and ``iana-etc``, as Nixery's do.
    """
    cfg = universe.config
    rng = random.Random(cfg.seed * 7919 + 1)  # noqa: S311 -- seeded simulation data
    pkgs = universe.packages
    apps = [i for i, p in enumerate(pkgs) if p.ecosystem == "app"]
    sizes = {i: universe.closure_size(i) for i in apps}
    gtk, qt = universe.index_of("gtk3"), universe.index_of("qtbase")
    cli = [i for i in apps if not {gtk, qt} & set(pkgs[i].deps)]
    small = [i for i in cli if 20 <= sizes[i] <= 120] or apps
    images = []
    for _ in range(cfg.small_images):
        picks = rng.sample(small, min(len(small), rng.choice((1, 1, 2, 3))))
        names = ("bash", "coreutils", *(pkgs[i].name for i in picks))
        images.append(ImageSpec("tool", names))
    for runtime, ecosystem, count in (("python3", "python", 8), ("perl", "perl", 6),
                                      ("ghc", "haskell", 8)):
        members = [i for i, p in enumerate(pkgs) if p.ecosystem == ecosystem]
        picks = rng.sample(members, min(count, len(members)))
        images.append(ImageSpec("runtime", (runtime, *(pkgs[i].name for i in picks))))
    tool = (pkgs[rng.choice(small)].name,) if small else ()
    images.append(ImageSpec("runtime", ("nodejs", *tool)))
    for n in range(cfg.large_images):
        big = ("texlive", "qtbase", "openjdk")[n % 3]
        picks = rng.sample(apps, min(cfg.large_apps, len(apps)))
        images.append(ImageSpec("large", (big, *(pkgs[i].name for i in picks))))
    return [ImageSpec(img.kind, tuple(sorted({*img.packages, *_ALWAYS}))) for img in images]


def image_graph(
    universe: Universe, paths: Mapping[tuple[int, str], StorePath], image: ImageSpec
) -> RuntimeGraph:
    """The runtime closure of one image at the universe's current revision."""
    wanted = [universe.index_of(name) for name in image.packages]
    requested = {
        universe.packages[i].name: tuple(paths[(i, o)].path for o in universe.packages[i].outputs)
        for i in wanted
    }
    store = [
        paths[(i, o)]
        for i in sorted(universe.closure(wanted))
        for o in universe.packages[i].outputs
    ]
    # A dependency is referenced through its main output only; an unrequested
    # ``out`` nobody references is not in the runtime closure.
    reached = RuntimeGraph.build(store, requested)
    keep = reached.closure_of(reached.roots)
    return RuntimeGraph.build((sp for sp in store if sp.path in keep), requested)


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

