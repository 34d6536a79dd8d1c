"""Salted copies of the offline package set: store paths no other test (or
engineer sharing the store) uses, so a test may build them cold and delete them."""

from __future__ import annotations

import subprocess
import uuid
from collections.abc import Iterable
from pathlib import Path

from conftest import OFFLINE_SET

STORE = Path("/nix/store")


def salted_set(directory: Path, salt: str | None = None) -> Path:
    """A package-set directory whose every derivation carries a fresh salt."""
    salt = salt or uuid.uuid4().hex[:16]
    target = directory / f"salted-{salt}"
    target.mkdir(parents=True)
    (target / "default.nix").write_text(
        "{ system ? builtins.currentSystem, ... }:\n"
        f'import {OFFLINE_SET} {{ inherit system; salt = "{salt}"; }}\n'
    )
    return target


def store_entries() -> set[str]:
    """The names in /nix/store now (to tell afterwards what a test created)."""
    return {p.name for p in STORE.iterdir()}


def delete_created(before: set[str], paths: Iterable[str]) -> None:
    """Delete ``paths`` (store paths a test built from its own salted set) that did not
    exist ``before``; never anything else, since other work shares the store.  A path
    still alive is left to Nix's own garbage collector."""
    for path in sorted(set(paths)):  # one by one: a path still alive must not stop the rest
        if Path(path).name in before or not path.startswith(f"{STORE}/"):
            continue
        subprocess.run(
            ["nix-store", "--delete", path], capture_output=True, check=False, timeout=120
        )
