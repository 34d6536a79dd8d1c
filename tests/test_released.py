"""Buffers are reused only when nothing but their keeper refers to them."""

from __future__ import annotations

import hashlib
from collections import deque
from pathlib import Path

import pytest

from nixery_core import released as released_module
from nixery_core.archive import ArchiveOptions, pack_store_paths
from nixery_core.compression import Compression
from nixery_core.released import EXACT_COUNTS, released


def _oldest_released(kept: deque[bytearray]) -> bool:
    oldest = kept[0]  # the pattern of archive._next_block and chunked._window_buffer
    return released(oldest)


@pytest.mark.skipif(not EXACT_COUNTS, reason="buffers are never reused on this interpreter")
def test_a_buffer_held_only_by_its_keeper_is_released() -> None:
    """A kept buffer with no other holder is reported released, so it is reused."""
    kept = deque([bytearray(16)])
    assert _oldest_released(kept)


def test_a_buffer_behind_a_live_view_or_another_holder_is_not_released() -> None:
    """A live view of a kept buffer, or another holder, keeps it from being written over."""
    kept = deque([bytearray(16)])
    view = memoryview(kept[0])[4:8]
    assert not _oldest_released(kept)
    view.release()
    del view
    other = [kept[0]]
    assert not _oldest_released(kept)
    other.clear()


def test_without_exact_counts_nothing_is_reused(monkeypatch: pytest.MonkeyPatch) -> None:
    """Where reference counts are not exact, no buffer is ever reported released."""
    monkeypatch.setattr(released_module, "EXACT_COUNTS", False)
    kept = deque([bytearray(16)])
    assert not _oldest_released(kept)


@pytest.mark.parametrize("compression", ["gzip", "estargz", "zstd-chunked"])
def test_layers_are_the_same_bytes_with_and_without_reuse(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, compression: Compression
) -> None:
    """Reusing buffers changes only allocation: a layer's bytes are those of fresh buffers."""
    store = tmp_path / "nix" / "store"
    paths = []
    for n in range(3):
        top = store / f"{'abcdefghijklmnopqrstuvwxyz012345'[n:] + 'x' * n}-p{n}"
        top.mkdir(parents=True)
        for i in range(6):
            # Many 1 MiB tar blocks, and a big file (f5) cut in several
            # windows, so both kinds of buffer come round again.
            repeat = (70_000 + 9_000 * i) * (5 if i == 5 else 1)
            data = hashlib.sha256(b"%d-%d" % (n, i)).digest() * repeat
            (top / f"f{i}").write_bytes(data)
        paths.append(f"/nix/store/{top.name}")

    def pack() -> str:
        out = hashlib.sha256()
        pack_store_paths(
            paths,
            out.update,
            ArchiveOptions(compression=compression),
            store_root=tmp_path,
            threads=2,
        )
        return out.hexdigest()

    reused = pack()
    monkeypatch.setattr(released_module, "EXACT_COUNTS", False)
    assert pack() == reused
