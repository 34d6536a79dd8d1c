"""Nix's garbage collector against running builds: the closure is rooted while a
build reads it, root directories of dead builds are removed, and a directory
that changes while it is read is an error, never a smaller layer."""

from __future__ import annotations

import fcntl
import json
import os
import subprocess
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import attrs
import pytest
from salted import delete_created, salted_set, store_entries

from nixery_core import build_image
from nixery_core.archive import ArchiveOptions, pack_store_paths
from nixery_core.customisation import customisation_entries
from nixery_core.errors import FileChangedDuringPacking
from nixery_core.gc_roots import ROOTS_ENV, BuildRoots
from nixery_core.graph import RuntimeGraph, StorePath
from nixery_core.image_config import ImageConfig
from nixery_core.names import Image
from nixery_core.nix import PathInfoCall, parse_argv
from nixery_core.protocols import LogCallback, RunResult
from nixery_core.runner import SubprocessRunner
from nixery_core.sources import LocalPathSource
from nixery_core.testing import MemoryStore


@pytest.fixture
def roots_base(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A private base directory for per-build root directories."""
    base = tmp_path / "roots"
    monkeypatch.setenv(ROOTS_ENV, str(base))
    return base


@attrs.define
class _DeletingRunner:
    """The real runner; right after the closure query it asks Nix to delete
    every path of the closure (``nix-store --delete``, which refuses live ones)."""

    inner: SubprocessRunner = attrs.Factory(SubprocessRunner)
    deleted: list[str] = attrs.Factory(list)
    refused: list[str] = attrs.Factory(list)

    def run(
        self,
        argv: Sequence[str],
        *,
        timeout: float | None = None,
        env: Mapping[str, str] | None = None,
        on_log_line: LogCallback | None = None,
    ) -> RunResult:
        result = self.inner.run(argv, timeout=timeout, env=env, on_log_line=on_log_line)
        if isinstance(parse_argv(argv), PathInfoCall) and result.returncode == 0:
            for entry in json.loads(result.stdout):
                path = entry["path"]
                done = subprocess.run(
                    ["nix-store", "--delete", path], capture_output=True, check=False
                )
                (self.deleted if done.returncode == 0 else self.refused).append(path)
        return result


@pytest.fixture
def created_paths() -> Iterator[list[str]]:
    """Store paths a test built from its salted set; deleted afterwards (only those)."""
    before = store_entries()
    paths: list[str] = []
    yield paths
    delete_created(before, paths)


def _closure(result: Any) -> list[str]:
    return sorted({path for layer in result.layers for path in layer.paths})


@pytest.mark.usefixtures("nix")
def test_nix_cannot_delete_the_closure_while_a_build_reads_it(
    tmp_path: Path, roots_base: Path, created_paths: list[str]
) -> None:
    """nix-store --delete of every closure path between realising and packing is
    refused (the paths are rooted), and the build gives the image a quiet build gives."""
    source = LocalPathSource(salted_set(tmp_path))
    image = Image.from_packages(["hello", "coreutils", "bashInteractive"])
    quiet = build_image(image, source, uploader=MemoryStore(), max_workers=1)
    created_paths += _closure(quiet)
    runner = _DeletingRunner()
    attacked = build_image(image, source, runner=runner, uploader=MemoryStore(), max_workers=1)
    assert runner.deleted == []
    assert len(runner.refused) >= 5
    assert attacked.manifest_digest == quiet.manifest_digest
    assert list(roots_base.iterdir()) == []  # released once packed


@pytest.mark.usefixtures("nix")
def test_roots_are_released_after_the_build(
    tmp_path: Path, roots_base: Path, created_paths: list[str]
) -> None:
    """Once a build is done its roots are gone: Nix may then collect the closure."""
    source = LocalPathSource(salted_set(tmp_path))
    result = build_image(Image.from_packages(["hello"]), source, uploader=MemoryStore())
    created_paths += _closure(result)
    assert not result.from_cache
    hello = next(p for p in _closure(result) if p.endswith("-hello"))  # salted: ours alone
    done = subprocess.run(["nix-store", "--delete", hello], capture_output=True, check=False)
    assert done.returncode == 0, done.stderr


def _hold(lock: Path) -> int:
    fd = os.open(lock, os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX)
    return fd


def test_root_directories_of_dead_builds_are_removed(tmp_path: Path) -> None:
    """A new build removes root directories whose lock nobody holds (a killed build)
    and keeps those a live build holds."""
    base = tmp_path / "roots"
    dead = base / "1-dead"
    dead.mkdir(parents=True)
    (base / "1-dead.lock").touch()
    (dead / "out").symlink_to("/nix/store/x-gone")
    (base / "2-nolock").mkdir()
    (base / ".tmp-4-half").touch()  # killed between creating and naming its lock
    (base / "3-live").mkdir()
    live_fd = _hold(base / "3-live.lock")
    try:
        with BuildRoots(base) as roots:
            assert roots.directory.is_dir()
            assert sorted(p.name for p in base.iterdir()) == sorted(
                ["3-live", "3-live.lock", roots.name, f"{roots.name}.lock"]
            )
        assert sorted(p.name for p in base.iterdir()) == ["3-live", "3-live.lock"]
    finally:
        os.close(live_fd)


def test_concurrent_builds_never_remove_each_others_roots(tmp_path: Path) -> None:
    """Builds entering at once (each removing stale directories) keep every live one."""
    base = tmp_path / "roots"
    errors: list[BaseException] = []

    def one() -> None:
        try:
            for _ in range(50):
                with BuildRoots(base) as roots:
                    (roots.prefix).symlink_to("/nix/store/x")
                    assert roots.prefix.is_symlink()
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=one) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert list(base.iterdir()) == []


def _deleting_scandir(victim: str) -> Callable[..., Any]:
    """os.scandir that first deletes ``victim`` (once): a GC racing the listing."""
    real = os.scandir
    done: list[bool] = []

    def scandir(path: Any) -> Any:
        if not done and Path(os.fsdecode(path)) == Path(victim).parent:
            done.append(True)
            Path(victim).unlink()
        return real(path)

    return scandir


def _fake_output(root: Path) -> tuple[str, RuntimeGraph]:
    path = "/nix/store/" + "a" * 32 + "-tool"
    bin_dir = root / path.lstrip("/") / "bin"
    bin_dir.mkdir(parents=True)
    for name in ("a", "b", "c"):
        (bin_dir / name).write_text(name)
    os.utime(bin_dir, (1, 1))  # as Nix leaves every store directory
    graph = RuntimeGraph.build([StorePath(path, 100, ())], {"tool": [path]})
    return path, graph


def test_a_directory_losing_entries_while_listed_fails_the_customisation_layer(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """bin/ losing a file while the forest lists it raises FileChangedDuringPacking."""
    path, graph = _fake_output(tmp_path)
    bin_dir = tmp_path / path.lstrip("/") / "bin"
    # Two outputs share bin/, so the forest lists it (one output alone is one link).
    other = "/nix/store/" + "b" * 32 + "-other"
    (tmp_path / other.lstrip("/") / "bin").mkdir(parents=True)
    (tmp_path / other.lstrip("/") / "bin" / "z").write_text("z")
    os.utime(tmp_path / other.lstrip("/") / "bin", (1, 1))
    graph = RuntimeGraph.build(
        [StorePath(path, 100, ()), StorePath(other, 100, ())],
        {"tool": [path], "other": [other]},
    )
    monkeypatch.setattr(os, "scandir", _deleting_scandir(str(bin_dir / "b")))
    with pytest.raises(FileChangedDuringPacking):
        customisation_entries(graph, config=ImageConfig(), store_root=tmp_path)


def test_a_directory_losing_entries_while_listed_fails_the_store_layer(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A store directory losing a file while it is packed raises FileChangedDuringPacking."""
    path, _ = _fake_output(tmp_path)
    victim = tmp_path / path.lstrip("/") / "bin" / "b"
    monkeypatch.setattr(os, "scandir", _deleting_scandir(str(victim)))
    with pytest.raises(FileChangedDuringPacking):
        pack_store_paths([path], lambda data: None, ArchiveOptions(), store_root=tmp_path)
