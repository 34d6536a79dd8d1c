"""Warm resolves of a LocalPathSource cost O(1): hash once, then let inotify say what changed."""

from __future__ import annotations

import gc
import os
import pickle
from collections.abc import Callable
from pathlib import Path

import pytest

from nixery_core import watch
from nixery_core.sources import LocalPathSource
from nixery_core.watch import TreeWatch


def package_set(root: Path) -> Path:
    """A small package set: files in nested directories, a symlink, a .git directory."""
    (root / "pkgs" / "tools").mkdir(parents=True)
    (root / "default.nix").write_text("{ ... }: { }\n")
    (root / "pkgs" / "tools" / "hello.nix").write_text("hello\n")
    (root / "pkgs" / "link.nix").symlink_to("tools/hello.nix")
    (root / ".git").mkdir()
    (root / ".git" / "HEAD").write_text("ref: refs/heads/main\n")
    return root


def _same_size_edit(root: Path) -> None:
    (root / "pkgs" / "tools" / "hello.nix").write_text("HELLO\n")


def _new_file_in_new_directory(root: Path) -> None:
    (root / "pkgs" / "new").mkdir()
    (root / "pkgs" / "new" / "x.nix").write_text("x\n")


def _retarget(root: Path) -> None:
    (root / "pkgs" / "link.nix").unlink()
    (root / "pkgs" / "link.nix").symlink_to("../default.nix")


CHANGES: dict[str, Callable[[Path], object]] = {
    "edit in place, same size": _same_size_edit,
    "new file": lambda root: (root / "pkgs" / "extra.nix").write_text("extra\n"),
    "removed file": lambda root: (root / "pkgs" / "tools" / "hello.nix").unlink(),
    "rename": lambda root: (root / "default.nix").rename(root / "other.nix"),
    "mode": lambda root: (root / "default.nix").chmod(0o755),
    "retargeted symlink": _retarget,
    "file in a new directory": _new_file_in_new_directory,
}


@pytest.mark.parametrize("change", CHANGES, ids=list(CHANGES))
def test_every_kind_of_change_gives_a_new_identity(tmp_path: Path, change: str) -> None:
    """After any change to the content, the same source object resolves to a new identity."""
    source = LocalPathSource(package_set(tmp_path / "set"))
    before = source.resolve("latest").identity
    assert source.resolve("latest").identity == before
    CHANGES[change](tmp_path / "set")
    after = source.resolve("latest").identity
    assert after != before
    assert after == LocalPathSource(tmp_path / "set").resolve("latest").identity


def test_git_metadata_changes_nothing(tmp_path: Path) -> None:
    """.git is neither hashed nor watched: a commit elsewhere keeps the identity."""
    source = LocalPathSource(package_set(tmp_path / "set"))
    before = source.resolve("latest").identity
    (tmp_path / "set" / ".git" / "HEAD").write_text("ref: refs/heads/other\n")
    assert source.resolve("latest").identity == before


def test_a_warm_resolve_walks_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """With nothing changed, resolving lists no directory and stats no file: O(1) in size."""
    root = package_set(tmp_path / "set")
    for index in range(200):
        (root / "pkgs" / f"p{index}.nix").write_text(f"{index}\n")
    source = LocalPathSource(root)
    first = source.resolve("latest")
    calls: list[str] = []
    real_walk, real_lstat, real_scandir = os.walk, os.lstat, os.scandir

    def counting(name: str, function: Callable[..., object]) -> Callable[..., object]:
        def wrapper(*args: object, **kwargs: object) -> object:
            calls.append(name)
            return function(*args, **kwargs)
        return wrapper

    monkeypatch.setattr(os, "walk", counting("walk", real_walk))
    monkeypatch.setattr(os, "lstat", counting("lstat", real_lstat))
    monkeypatch.setattr(os, "scandir", counting("scandir", real_scandir))
    for _ in range(50):
        assert source.resolve("latest") == first
    assert calls == []


def test_without_inotify_the_stat_walk_still_sees_changes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Where no watch can be armed, a same-size edit is still found (by mtime)."""
    monkeypatch.setattr(TreeWatch, "open", classmethod(lambda cls, root: None))
    root = package_set(tmp_path / "set")
    source = LocalPathSource(root)
    before = source.resolve("latest").identity
    os.utime(root / "default.nix", ns=(0, 1))
    _same_size_edit(root)
    assert source.resolve("latest").identity != before


def test_a_single_file_source_is_compared_by_one_stat(tmp_path: Path) -> None:
    """A package set that is one file changes identity when the file does."""
    file = tmp_path / "set.nix"
    file.write_text("{ }: { }\n")
    source = LocalPathSource(file)
    before = source.resolve("latest").identity
    file.write_text("{ }: { a = 1; }\n")
    assert source.resolve("latest").identity != before


def test_sources_pickle_without_their_watch(tmp_path: Path) -> None:
    """A source crosses to another process as a value; the copy hashes afresh and agrees."""
    source = LocalPathSource(package_set(tmp_path / "set"))
    spec = source.resolve("latest")
    copy = pickle.loads(pickle.dumps(source))  # noqa: S301 - our own bytes
    assert copy == source
    assert copy.resolve("latest") == spec


def test_watches_go_when_the_source_goes(tmp_path: Path) -> None:
    """Dropping a source removes its inotify watches; one instance serves the process."""
    root = package_set(tmp_path / "set")
    inotify = watch._instance()
    # Sources of earlier tests may still be alive: count only this test's watches.
    before = set(inotify.trees)
    source = LocalPathSource(root)
    source.resolve("latest")
    inotify = watch._instance()
    watched = set(inotify.trees) - before
    assert watched
    other = LocalPathSource(root)
    other.resolve("latest")
    assert watch._instance() is inotify
    del source, other
    gc.collect()
    assert not watched & set(inotify.trees)


def test_a_tree_watch_reports_a_change_made_just_before(tmp_path: Path) -> None:
    """The kernel queues events inside the writing call: changed() never misses a finished write."""
    root = package_set(tmp_path / "set")
    tree = TreeWatch.open(root)
    assert tree is not None
    for index in range(100):
        assert not tree.changed()
        (root / "pkgs" / "tools" / f"n{index}.nix").write_text("x")
        assert tree.changed()
        tree.close()
        tree = TreeWatch.open(root)
        assert tree is not None
    tree.close()
