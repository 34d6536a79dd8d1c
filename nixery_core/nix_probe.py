"""Which package names make resolve.nix fail in a way Nix cannot catch.

``nix/lookup.nix`` forces each attribute under ``builtins.tryEval``, so a
removed alias (``throw``) is just not found.  ``abort``, infinite recursion
and stack overflows escape ``tryEval``: one such attribute fails the whole
resolve call, and Nix's message quotes the package set's source lines.
After such a failure :func:`unevaluable_names` asks ``nix/probe.nix`` about
each name alone (only on this failure path, so the usual build makes one
call): a name whose lookup fails, or is not found, is unknown.  A probe of
no name first checks that the package set itself loads; if it does not,
or every name looks up fine, the original failure stands.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from typing import Final

from nixery_core.nixexprs import nix_dir
from nixery_core.protocols import Runner
from nixery_core.sources import SourceSpec

__all__ = ["is_uncatchable_eval_error", "unevaluable_names"]

#: Nix errors that builtins.tryEval does not catch.
_UNCATCHABLE: Final = re.compile(
    r"evaluation aborted|infinite recursion encountered|stack overflow|max-call-depth"
)


def is_uncatchable_eval_error(stderr: str) -> bool:
    """Whether Nix's stderr reports an error that ``builtins.tryEval`` cannot catch."""
    return _UNCATCHABLE.search(stderr) is not None


def _probe_argv(
    name: str, spec: SourceSpec, system: str, options: Sequence[str]
) -> tuple[str, ...]:
    return (
        "nix-instantiate", "--eval", "--strict", "--json", *options,
        str(nix_dir() / "probe.nix"),
        "--argstr", "name", name,
        "--argstr", "source", spec.to_json(),
        "--argstr", "system", system,
    )


def _found(runner: Runner, argv: tuple[str, ...], timeout: float) -> bool | None:
    """The probe's answer; ``None`` when Nix failed."""
    result = runner.run(argv, timeout=timeout)
    if result.returncode != 0:
        return None
    try:
        answer = json.loads(result.stdout)
    except ValueError:
        return None
    return answer if isinstance(answer, bool) else None


def unevaluable_names(
    packages: Sequence[str],
    spec: SourceSpec,
    system: str,
    *,
    runner: Runner,
    timeout: float,
    option_args: Sequence[str] = (),
) -> tuple[str, ...]:
    """The names that fail to look up or are not found, if some name fails to evaluate.

    Empty when the package set itself does not load or no name fails to
    evaluate: then the resolve failure was not about a name.
    """
    if _found(runner, _probe_argv("", spec, system, option_args), timeout) is not True:
        return ()
    answers = {
        name: _found(runner, _probe_argv(name, spec, system, option_args), timeout)
        for name in dict.fromkeys(packages)
    }
    if all(answer is not None for answer in answers.values()):
        return ()
    return tuple(sorted(name for name, answer in answers.items() if answer is not True))
