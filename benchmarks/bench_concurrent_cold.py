"""Concurrent cold builds on real Nix: trials, hangs and failures.

Each trial salts the offline package set afresh (store paths Nix has never
built), then eight processes, started together by a process pool, each
realise one of eight overlapping package lists (every closure shares
busybox, most share more) with ``timeout`` seconds per Nix call.  A trial
*hangs* when any realisation ends in ``NixTimeout``; other errors count as
failures.  Run against the code to compare (``PYTHONPATH``), e.g.

    .venv/bin/python benchmarks/bench_concurrent_cold.py --trials 20 --timeout 60

Salted store paths stay in the store until Nix's garbage collector removes
them (nothing roots them once the trial is over).
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import tempfile
import time
import uuid
from pathlib import Path

from nixery_core import nix
from nixery_core.errors import NixeryError, NixTimeout
from nixery_core.names import Image
from nixery_core.nixexprs import nix_dir
from nixery_core.runner import SubprocessRunner
from nixery_core.sources import LocalPathSource

IMAGES = [
    ["hello", "coreutils"], ["bashInteractive", "coreutils"], ["moreutils", "hello"],
    ["nano", "cacert"], ["iana-etc", "hello", "bashInteractive"],
    ["coreutils", "moreutils", "nano"], ["cacert", "iana-etc"], ["busybox", "hello", "nano"],
]


def _one(args: tuple[str, list[str], float]) -> tuple[str, float]:
    directory, packages, timeout = args
    spec = LocalPathSource(Path(directory)).resolve("latest")
    start = time.monotonic()
    try:
        nix.realise(Image.from_packages(packages), spec, runner=SubprocessRunner(),
                    timeout=timeout)
    except NixTimeout:
        return "hang", time.monotonic() - start
    except NixeryError as exc:
        return type(exc).__name__, time.monotonic() - start
    return "ok", time.monotonic() - start


def _trial(work: Path, timeout: float) -> list[tuple[str, float]]:
    salt = uuid.uuid4().hex[:12]
    directory = work / f"salted-{salt}"
    directory.mkdir()
    (directory / "default.nix").write_text(
        "{ system ? builtins.currentSystem, ... }:\n"
        f'import {nix_dir() / "offline"} {{ inherit system; salt = "{salt}"; }}\n'
    )
    with multiprocessing.get_context("fork").Pool(len(IMAGES)) as pool:
        return pool.map(_one, [(str(directory), image, timeout) for image in IMAGES])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=10)
    parser.add_argument("--timeout", type=float, default=60.0)
    args = parser.parse_args()
    os.environ.setdefault("NIX_CONFIG", "substituters =\nsandbox = false\n")
    hung = failed = builds_hung = 0
    longest: list[float] = []
    with tempfile.TemporaryDirectory() as work:
        for index in range(args.trials):
            results = _trial(Path(work), args.timeout)
            outcomes = [outcome for outcome, _ in results]
            hung += "hang" in outcomes
            builds_hung += outcomes.count("hang")
            failed += sum(o not in ("ok", "hang") for o in outcomes)
            longest.append(max(seconds for _, seconds in results))
            print(f"trial {index}: {' '.join(outcomes)}  ({longest[-1]:.1f} s)", flush=True)
    print(f"{args.trials} trials of {len(IMAGES)} builds: {hung} hung ({builds_hung} builds "
          f"timed out at {args.timeout:g} s), {failed} other failures; longest trial "
          f"{max(longest):.1f} s")


if __name__ == "__main__":
    main()
