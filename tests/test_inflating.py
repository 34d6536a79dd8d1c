"""nixery_core.inflating: zstd frame headers read without inflating, against libzstd."""

from __future__ import annotations

import os

import pytest
import zstandard
from hostile_frames import zstd_frame_declaring_window

from nixery_core.compression import zstd_window
from nixery_core.inflating import INFLATE_ERRORS, MembersInflater, zstd_frames_problem

WINDOW = zstd_window(3)


def _inflated(data: bytes) -> int | None:
    """What libzstd, held to the level-3 window, inflates ``data`` to (``None``: it refuses)."""
    inflate = MembersInflater(zstd=True, max_window=WINDOW)
    try:
        size = sum(len(out) for out in inflate.inflate(data))
    except INFLATE_ERRORS:
        return None
    return size if inflate.eof else None


def _frames() -> dict[str, tuple[bytes, int]]:
    noise = os.urandom(3 << 20)
    level3 = zstandard.ZstdCompressor(level=3)
    stream = level3.compressobj()
    streamed = stream.compress(noise) + stream.flush()
    return {
        "level 3, 8 MiB": (level3.compress(noise + bytes(5 << 20)), 8 << 20),
        "checksum": (zstandard.ZstdCompressor(write_checksum=True).compress(b"abc" * 999), 2997),
        "no content size": (
            zstandard.ZstdCompressor(write_content_size=False).compress(b"ab" * 999), 1998
        ),
        "streamed": (streamed, len(noise)),
        "empty": (level3.compress(b""), 0),
        "two frames": (level3.compress(b"x" * 300) * 2, 600),
        "level 19, 2 MiB": (zstandard.ZstdCompressor(level=19).compress(bytes(2 << 20)), 2 << 20),
        "level 19, 2 MiB + 1": (
            zstandard.ZstdCompressor(level=19).compress(bytes((2 << 20) + 1)), (2 << 20) + 1
        ),
        "128 MiB window": (zstd_frame_declaring_window(27, 1024), 1024),
    }


FRAMES = _frames()


@pytest.mark.parametrize("name", list(FRAMES))
def test_frame_headers_refuse_only_what_libzstd_refuses_or_sizes_otherwise(name: str) -> None:
    """zstd_frames_problem finds nothing in frames libzstd inflates to their size within the
    level's window, and finds a window libzstd refuses, another declared size and a
    truncated frame, without inflating."""
    data, size = FRAMES[name]
    problem = zstd_frames_problem(data, max_window=WINDOW, size=size)
    assert (problem is None) == (_inflated(data) == size), problem
    if problem is None:
        assert zstd_frames_problem(data[:-1], max_window=WINDOW, size=size) is not None
        declared = zstd_frames_problem(data, max_window=WINDOW, size=size + 1)
        assert (declared is None) == (name in ("no content size", "streamed"))
