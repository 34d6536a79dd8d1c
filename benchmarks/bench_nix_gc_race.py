"""Builds while Nix deletes dead store paths: failures and wrong images.

A freshly salted offline set (paths only this run uses) is built once
quietly; then a thread runs ``nix-store --delete`` on every store path of
that closure, one path per call, in a loop, while ``--builds`` builds of
the same image run one after the other (no cache, so each realises and
packs).  A build is *ok* when it gives the quiet build's manifest digest,
*wrong* when it succeeds with another digest, else it fails (by error type).
Run against the code to compare (``PYTHONPATH``):

    .venv/bin/python benchmarks/bench_nix_gc_race.py --builds 20

Only paths of the salted closure are ever deleted.
"""

from __future__ import annotations

import argparse
import collections
import os
import subprocess
import tempfile
import threading
import uuid
from pathlib import Path

from nixery_core.build import build_image
from nixery_core.names import Image
from nixery_core.nixexprs import nix_dir
from nixery_core.sources import LocalPathSource
from nixery_core.testing import MemoryStore

PACKAGES = ["hello", "coreutils", "bashInteractive", "cacert", "moreutils"]


def _deleter(paths: list[str], stop: threading.Event, deleted: list[int]) -> None:
    while not stop.is_set():
        for path in paths:
            done = subprocess.run(["nix-store", "--delete", path], capture_output=True,
                                  check=False)
            deleted[0] += done.returncode == 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--builds", type=int, default=20)
    args = parser.parse_args()
    os.environ.setdefault("NIX_CONFIG", "substituters =\nsandbox = false\n")
    with tempfile.TemporaryDirectory() as work:
        salt = uuid.uuid4().hex[:12]
        directory = Path(work) / f"salted-{salt}"
        directory.mkdir()
        (directory / "default.nix").write_text(
            "{ system ? builtins.currentSystem, ... }:\n"
            f'import {nix_dir() / "offline"} {{ inherit system; salt = "{salt}"; }}\n'
        )
        source = LocalPathSource(directory)
        image = Image.from_packages(PACKAGES)
        quiet = build_image(image, source, uploader=MemoryStore(), cache=None)
        paths = sorted({p for layer in quiet.layers for p in layer.paths})
        paths = [p for p in paths if "busybox-static" not in p]  # shared, unsalted input
        stop, deleted = threading.Event(), [0]
        thread = threading.Thread(target=_deleter, args=(paths, stop, deleted))
        thread.start()
        outcomes: collections.Counter[str] = collections.Counter()
        try:
            for _ in range(args.builds):
                try:
                    result = build_image(image, source, uploader=MemoryStore(), cache=None)
                except Exception as exc:  # noqa: BLE001 - counted by type
                    outcomes[type(exc).__name__] += 1
                else:
                    same = result.manifest_digest == quiet.manifest_digest
                    outcomes["ok" if same else "wrong"] += 1
        finally:
            stop.set()
            thread.join()
        for path in paths:  # leave nothing of ours behind
            subprocess.run(["nix-store", "--delete", path], capture_output=True, check=False)
    summary = ", ".join(f"{name} {count}" for name, count in sorted(outcomes.items()))
    print(f"{args.builds} builds of {len(paths)} store paths while deleting them "
          f"({deleted[0]} deletions succeeded): {summary}")


if __name__ == "__main__":
    main()
