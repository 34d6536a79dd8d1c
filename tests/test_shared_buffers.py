"""Buffers shared with the frame worker processes (nixery_core.shared_buffers)."""

from __future__ import annotations

import mmap
import os
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

from nixery_core import shared_buffers
from nixery_core.shared_buffers import SharedBuffers

pytestmark = pytest.mark.skipif(
    not shared_buffers.shared_memory_usable(), reason="no memfd_create here"
)

_SLOT = 1 << 16


@pytest.fixture
def buffers() -> Iterator[SharedBuffers]:
    made = SharedBuffers(4 * _SLOT)
    yield made
    made.close()


def test_a_slot_is_not_handed_out_again_while_a_view_of_it_lives(buffers: SharedBuffers) -> None:
    """A slot comes back from take only once every view of it is gone, then it is reused."""
    first = buffers.take(_SLOT)
    assert first is not None
    view = memoryview(first)[10:20]
    at = buffers.place(view)
    del first
    second = buffers.take(_SLOT)
    assert second is not None
    assert buffers.place(memoryview(second)[10:20]) != at  # not the held one
    del second
    view.release()
    del view
    again = buffers.take(_SLOT)
    assert again is not None
    assert buffers.place(memoryview(again)[10:20]) == at  # the first slot, reused


def test_a_full_file_gives_none_until_a_slot_is_free(buffers: SharedBuffers) -> None:
    """With every slot held and no room for another, take says None; a freed slot is reused."""
    held = [buffers.take(_SLOT) for _ in range(4)]
    assert all(isinstance(slot, mmap.mmap) for slot in held)
    assert buffers.take(_SLOT) is None
    assert buffers.take(1) is None  # no smaller room either
    held.pop()
    assert buffers.take(_SLOT) is not None


def test_a_small_request_leaves_a_much_larger_free_slot_while_there_is_room(
    buffers: SharedBuffers,
) -> None:
    """A small slot asked for while a slot twice its size or more is free is a new one while
    the file has room (the large one stays for a large need), that large one once it has none;
    a free slot of about its size is reused."""
    large = buffers.take(2 * _SLOT)
    assert large is not None
    at = buffers.place(memoryview(large)[:1])
    del large
    small = buffers.take(_SLOT)
    assert small is not None
    assert buffers.place(memoryview(small)[:1]) != at  # new, the large one kept
    del small
    again = buffers.take(_SLOT)
    assert again is not None
    assert len(again) == _SLOT  # the small free one, reused (no new slot)
    full = buffers.take(_SLOT)  # the file is full now (2 + 1 + 1 slots)
    assert full is not None
    last = buffers.take(_SLOT // 2)  # no room: the large free one after all
    assert last is not None
    assert len(last) == 2 * _SLOT
    assert buffers.take(1) is None


def test_place_is_where_a_worker_finds_the_same_bytes(buffers: SharedBuffers) -> None:
    """place gives the offset in the shared file at which a mapping of it holds the view's bytes."""
    first = buffers.take(_SLOT)  # held: the second slot starts past it
    assert first is not None
    slot = buffers.take(_SLOT)
    assert slot is not None
    slot[100:110] = b"0123456789"
    whole = mmap.mmap(buffers.fd, buffers.capacity)  # as a worker maps it
    try:
        at = buffers.place(memoryview(slot)[100:105], b"56789")
        assert at >= _SLOT
        assert whole[at : at + 10] == b"0123456789"
    finally:
        whole.close()


def test_place_refuses_what_is_not_whole_in_one_slot(buffers: SharedBuffers) -> None:
    """Bytes after the view that differ, run past its slot, or a buffer not shared: -1."""
    slot = buffers.take(_SLOT)
    assert slot is not None
    slot[0:4] = b"abcd"
    assert buffers.place(memoryview(slot)[0:2], b"cd") >= 0
    assert buffers.place(memoryview(slot)[0:2], b"cX") == -1
    assert buffers.place(memoryview(slot)[_SLOT - 2 :], b"more") == -1
    assert buffers.place(memoryview(slot)[0:0]) == -1
    assert buffers.place(memoryview(bytearray(b"abcd"))[0:2]) == -1
    other = SharedBuffers(_SLOT)
    try:
        foreign = other.take(_SLOT)
        assert foreign is not None
        assert buffers.place(memoryview(foreign)[0:2]) == -1  # another pool's memory
    finally:
        other.close()


def test_without_exact_reference_counts_no_slot_is_reused(
    buffers: SharedBuffers, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Where reference counts may be inexact, no slot is handed out twice: new ones, then None."""
    monkeypatch.setattr(shared_buffers, "EXACT_COUNTS", False)
    places = set()
    for _ in range(4):
        slot = buffers.take(_SLOT)
        assert slot is not None
        places.add(buffers.place(memoryview(slot)[0:1]))
        del slot
    assert len(places) == 4
    assert buffers.take(_SLOT) is None


def test_a_forked_child_never_hands_out_its_parents_slots(tmp_path: Path) -> None:
    """In a child forked while another thread held the buffers' lock, take gives None and place
    -1 at once (no deadlock): the parent's workers may be reading those slots."""
    script = tmp_path / "fork.py"
    script.write_text(
        textwrap.dedent(
            """
            import os, signal, threading, time
            from nixery_core import frame_processes
            pool = frame_processes.shared(1)
            buffers = pool.buffers
            slot = buffers.take(4096)
            view = memoryview(slot)[0:10]
            assert buffers.place(view) >= 0
            held, release = threading.Event(), threading.Event()
            def hold():
                with buffers._lock:
                    held.set()
                    release.wait()
            threading.Thread(target=hold, daemon=True).start()
            held.wait()
            child = os.fork()
            if child == 0:
                ok = buffers.take(4096) is None and buffers.place(view) == -1
                os._exit(0 if ok else 1)
            release.set()
            for _ in range(400):  # a child stuck on the lock is killed, not left behind
                pid, status = os.waitpid(child, os.WNOHANG)
                if pid:
                    print(os.waitstatus_to_exitcode(status))
                    break
                time.sleep(0.05)
            else:
                os.kill(child, signal.SIGKILL)
                os.waitpid(child, 0)
                print("stuck")
            frame_processes.shutdown()
            """
        )
    )
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    done = subprocess.run(
        [sys.executable, str(script)], check=True, env=env, timeout=60, capture_output=True
    )
    assert done.stdout.strip() == b"0"


def test_a_slot_the_kernel_will_not_map_is_none(buffers: SharedBuffers) -> None:
    """When a new slot cannot be mapped (the kernel refuses: an address-space limit, too many
    mappings), take gives None, so callers use buffers of their own; slots made before are still
    handed out."""
    first = buffers.take(_SLOT)
    assert first is not None
    del first
    memfd = buffers.fd
    read, write = os.pipe()
    buffers.fd = read  # a file mmap refuses (ENODEV), as it refuses past a limit
    try:
        again = buffers.take(_SLOT)
        assert again is not None  # the first slot, free
        assert buffers.take(_SLOT) is None
    finally:
        buffers.fd = memfd
        os.close(read)
        os.close(write)
