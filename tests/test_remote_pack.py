"""``bench_pack --today``'s machinery: packs served by this code or an earlier revision's."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from benchmarks import no_slower
from benchmarks.remote_pack import (
    HERE,
    ISSUE_18_BASE,
    RemotePack,
    RemotePackError,
    export_revision,
)
from nixery_core.archive import ArchiveOptions, pack_store_paths
from nixery_core.compression import Compression

pytestmark = pytest.mark.slow


@pytest.fixture
def history() -> None:
    """The tests exporting :data:`ISSUE_18_BASE` need it in the clone's history: a shallow
    clone (a CI's ``--depth 1``) lacks it, and says so here rather than failing."""
    shallow = subprocess.run(["git", "-C", str(HERE), "rev-parse", "--is-shallow-repository"],
                             capture_output=True, text=True, check=True).stdout.strip()
    if shallow == "true":
        pytest.skip(f"a shallow clone lacks {ISSUE_18_BASE}: git fetch --unshallow")


def _corpus(root: Path) -> list[str]:
    """Two small store paths under ``root``: a few files, a symlink, some compressible text."""
    paths = []
    for index, name in enumerate(("hello-2.12", "greeting-1.0")):
        path = f"/nix/store/{str(index) * 32}-{name}"
        top = root / path.lstrip("/")
        (top / "bin").mkdir(parents=True)
        (top / "bin" / name).write_bytes(os.urandom(3000) + b"hello " * 5000)
        (top / "bin" / name).chmod(0o755)
        (top / "share").mkdir()
        (top / "share" / "README").write_text(f"{name}\n" * 200)
        (top / "share" / "link").symlink_to("README")
        paths.append(path)
    return paths


def _in_process(root: Path, paths: list[str], compression: Compression) -> tuple[int, str]:
    chunks: list[bytes] = []
    packed = pack_store_paths(paths, chunks.append, ArchiveOptions(compression=compression),
                              store_root=root)
    return packed.size, packed.digest


@pytest.mark.parametrize("compression", ["gzip", "zstd-chunked"])
def test_a_pack_server_packs_with_this_code_into_a_store_and_a_fragment_cache(
    tmp_path: Path, compression: Compression
) -> None:
    root = tmp_path / "corpus"
    paths = _corpus(root)
    server = RemotePack(HERE, root, paths, compression=compression, work=tmp_path / "runs",
                        name="cold", fragments=True)
    try:
        for run in (1, 2):
            server.prepare()
            cpu_before = server.cpu
            size = server()
            assert server.cpu > cpu_before  # the pack's CPU, worker processes included
            assert (size, server.last["digest"]) == _in_process(root, paths, compression)
            assert server.store is not None
            blob = server.store.root / "layers" / server.last["digest"].removeprefix("sha256:")
            assert blob.stat().st_size == size
            cache = tmp_path / "runs" / f"fragments-cold-{run}"
            assert server.writes == [server.store.root, cache]
            assert (cache / "index.sqlite").exists()  # the cold pack kept its fragments
    finally:
        server.close()


@pytest.mark.usefixtures("history")
def test_an_earlier_revision_packs_with_its_own_code(tmp_path: Path) -> None:
    code = export_revision(ISSUE_18_BASE, tmp_path / "code")
    assert code.name.startswith("code-ef8c5b9")
    assert not (code / "nixery_core" / "fragments.py").exists()  # before issue 18's fragments
    assert export_revision(ISSUE_18_BASE, tmp_path / "code") == code  # exported once
    root = tmp_path / "corpus"
    paths = _corpus(root)
    server = RemotePack(code, root, paths, compression="gzip", work=tmp_path / "runs",
                        name="today")
    try:
        server.prepare()
        size = server()
        # The layer as that code wrote it: one gzip stream, not one member per store path.
        assert (size, server.last["digest"]) != _in_process(root, paths, "gzip")
        assert server.store is not None
        assert (server.store.root / "layers" / server.last["digest"][7:]).stat().st_size == size
        server.fragments = True  # the next run asks that code for a fragment cache
        with pytest.raises(RemotePackError, match="no fragment cache"):
            server.prepare()
    finally:
        server.close()


@pytest.mark.usefixtures("history")
def test_an_export_interrupted_before_its_end_is_done_again(tmp_path: Path) -> None:
    code = export_revision(ISSUE_18_BASE, tmp_path)
    (code / ".complete").unlink()
    (code / "nixery_core" / "archive.py").write_text("torn")
    assert export_revision(ISSUE_18_BASE, tmp_path) == code
    assert "def pack_store_paths" in (code / "nixery_core" / "archive.py").read_text()


def test_an_unknown_revision_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(RemotePackError, match="no-such-revision"):
        export_revision("no-such-revision", tmp_path)
    assert not list(tmp_path.iterdir())


def test_a_server_that_cannot_load_its_code_is_an_error_naming_it(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    server = RemotePack(empty, tmp_path, [], compression="gzip", work=tmp_path / "runs",
                        name="broken")
    try:
        with pytest.raises(RemotePackError, match="pack server broken went away"):
            server.prepare()
    finally:
        server.close()


def test_the_verdict_names_the_baseline_it_was_judged_against() -> None:
    run = no_slower.Run(1.0, 1.0)
    roles = (no_slower.COLD, no_slower.WITHOUT, no_slower.COPY)
    rounds = no_slower.Rounds(dict.fromkeys(roles, (run,) * 5))
    lines = no_slower.verdict_lines("gzip", rounds, baseline="the pack at ef8c5b9")
    assert "gzip cold pack into fragments / the pack at ef8c5b9, 5 rounds: 1.000" in lines[0]
    assert "CPU cold / the pack at ef8c5b9 1.000x" in lines[1]
    assert lines[2].lstrip().startswith("A/A the pack at ef8c5b9 / the pack at ef8c5b9")
