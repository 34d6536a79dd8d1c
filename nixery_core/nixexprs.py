"""Where the Nix expressions are, and how to point Nix at them.

A wheel ships the repository's ``nix/`` directory as ``nixery_core/_nix``
(``pyproject.toml`` force-includes it); an editable checkout has it at
``<repo>/nix``.  :func:`nix_dir` finds either.

:func:`write_synthetic_set` makes a directory usable as a
:class:`~nixery_core.sources.LocalPathSource` from the synthetic package
generator in ``nix/synthetic`` (see ``nix/README.md`` for its arguments).
Parameters travel as a JSON file read by ``builtins.fromJSON``; no Python
value is ever spliced into Nix source.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

import attrs

from nixery_core.errors import InvalidInput, NixError

__all__ = [
    "SyntheticParams",
    "nix_dir",
    "offline_package_set",
    "resolve_expression",
    "synthetic_generator",
    "write_synthetic_set",
]

_MARKER = "resolve.nix"


def nix_dir() -> Path:
    """The directory holding ``resolve.nix`` and the package sets.

    Raises :class:`~nixery_core.errors.NixError` when the installation lacks it
    (a wheel built without the force-include).
    """
    here = Path(__file__).resolve().parent
    for candidate in (here / "_nix", here.parent / "nix"):
        if (candidate / _MARKER).is_file():
            return candidate
    raise NixError(
        f"nixery_core's Nix expressions are missing: neither {here / '_nix'} nor "
        f"{here.parent / 'nix'} holds {_MARKER}"
    )


def resolve_expression() -> Path:
    """``resolve.nix``: package names (JSON) to derivations, or every unknown name."""
    return nix_dir() / "resolve.nix"


def offline_package_set() -> Path:
    """``nix/offline``: the network-free package set built from the host's busybox."""
    return nix_dir() / "offline"


def synthetic_generator() -> Path:
    """``nix/synthetic``: the parameterised package-set generator for benchmarks."""
    return nix_dir() / "synthetic"


Shape = Literal["none", "chain", "star", "dag"]
Mode = Literal["random", "host"]


def _positive(_: object, attribute: attrs.Attribute[int], value: int) -> None:
    if value < 1:
        raise InvalidInput(f"synthetic {attribute.name} must be >= 1, got {value}")


def _non_negative(_: object, attribute: attrs.Attribute[int], value: int) -> None:
    if value < 0:
        raise InvalidInput(f"synthetic {attribute.name} must be >= 0, got {value}")


@attrs.frozen
class SyntheticParams:
    """Arguments of ``nix/synthetic/default.nix`` (documented there and in nix/README.md).

    ``host_paths`` and ``host_store_paths`` are absolute paths; ``None`` keeps
    the generator's defaults.
    """

    count: int = attrs.field(default=20, validator=_non_negative)
    shape: Shape = "dag"
    fanout: int = attrs.field(default=3, validator=_positive)
    seed: int = 1
    min_size: int = attrs.field(default=4096, validator=_non_negative)
    max_size: int = attrs.field(default=65536, validator=_non_negative)
    mode: Mode = "random"
    files: int = attrs.field(default=4, validator=_positive)
    host_paths: tuple[str, ...] | None = None
    host_store_paths: tuple[str, ...] | None = None
    prefix: str = "p"
    #: "host" mode: executables and shared libraries embed their dependencies'
    #: store paths (after their first 512 bytes), as RUNPATHs and shebangs do.
    embed_references: bool = False
    #: "host" mode: package index -> revision; a revision above 0 gives that
    #: package other content (a new version), so it and its dependents get
    #: new store paths.
    revisions: tuple[tuple[int, int], ...] = ()

    def __attrs_post_init__(self) -> None:
        if self.shape not in ("none", "chain", "star", "dag"):
            raise InvalidInput(f"synthetic shape must be none, chain, star or dag: {self.shape!r}")
        if self.mode not in ("random", "host"):
            raise InvalidInput(f"synthetic mode must be random or host: {self.mode!r}")
        if self.max_size < self.min_size:
            raise InvalidInput(f"synthetic max_size {self.max_size} < min_size {self.min_size}")
        for path in (*(self.host_paths or ()), *(self.host_store_paths or ())):
            if not path.startswith("/"):
                raise InvalidInput(f"synthetic host path {path!r} is not absolute")

    @property
    def names(self) -> tuple[str, ...]:
        """The package names the set will have (``p0000``, ``p0001``, ...)."""
        width = max(4, len(str(self.count)))
        return tuple(f"{self.prefix}{i:0{width}d}" for i in range(self.count))

    def to_json(self) -> dict[str, object]:
        """The generator's arguments, by their Nix names."""
        args: dict[str, object] = {
            "count": self.count,
            "shape": self.shape,
            "fanout": self.fanout,
            "seed": self.seed,
            "minSize": self.min_size,
            "maxSize": self.max_size,
            "mode": self.mode,
            "files": self.files,
            "prefix": self.prefix,
        }
        if self.embed_references:
            args["embedReferences"] = True
        if self.revisions:
            args["revisions"] = {str(index): revision for index, revision in self.revisions}
        if self.host_paths is not None:
            args["hostPaths"] = list(self.host_paths)
        if self.host_store_paths is not None:
            args["hostStorePaths"] = list(self.host_store_paths)
        return args


_SYNTHETIC_DEFAULT_NIX = """\
# Written by nixery_core.nixexprs.write_synthetic_set: a synthetic package set
# whose parameters are in params.json (read as data, never spliced as source).
{ system ? builtins.currentSystem, ... }:
let
  p = builtins.fromJSON (builtins.readFile ./params.json);
  args = removeAttrs p.args [ "hostPaths" ]
    // (if p.args ? hostPaths then { hostPaths = map (s: /. + s) p.args.hostPaths; } else { });
in
import (/. + p.generator) (args // { inherit system; })
"""


def write_synthetic_set(directory: Path, params: SyntheticParams) -> Path:
    """Write ``default.nix`` and ``params.json`` into ``directory``; return it.

    The directory is a package set for
    :class:`~nixery_core.sources.LocalPathSource`; changing ``params``
    changes its content hash and therefore every cache key built from it.
    """
    directory.mkdir(parents=True, exist_ok=True)
    payload = {"generator": str(synthetic_generator()), "args": params.to_json()}
    (directory / "params.json").write_text(
        json.dumps(payload, sort_keys=True, indent=2) + "\n", encoding="utf-8"
    )
    (directory / "default.nix").write_text(_SYNTHETIC_DEFAULT_NIX, encoding="utf-8")
    return directory
