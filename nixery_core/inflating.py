"""Concatenated gzip members or zstd frames inflated in bounded steps.

What a cached fragment holds (one member per store path, or, in a chunked
layer, one per frame: :mod:`nixery_core.chunked`) is inflated by a pack
that copies it (:mod:`nixery_core.archive`, for the ``diff_id``), and a
fragment fetched from the bucket is checked by inflating it
(:mod:`nixery_core.fragment_bucket`); other instances wrote the bucket's
objects, and anyone who can write the cache directory its files, so their
bytes are not trusted.  A decompressor asked for everything a piece of
input inflates to returns it at once, and 64 KiB of gzip inflate to about
64 MiB of zeros (a zstd frame's run-length blocks to far more).
:class:`MembersInflater` asks for at most ``step`` bytes at a time (zlib's
``max_length`` and ``unconsumed_tail``; the zstd decompressor of
:mod:`compression.zstd`, ``backports.zstd`` before Python 3.14, as
``zstandard``'s ``decompressobj`` has no ``max_length``) and hands each
step on, so a caller that stops at the size it expects holds about
``step`` inflated bytes however compressible its input is.

A zstd frame may declare no larger window than ``max_window`` (the
decoder refuses it before allocating it, outside Python); without one,
libzstd's default limit, 128 MiB.

:func:`zstd_frames_problem` reads only the frame and block headers of
concatenated zstd frames (no inflation: about a microsecond per 128 KiB
block): what the decoder would refuse for the window, or a content size
other than expected, is known before any of the bytes are used.
"""

from __future__ import annotations

import sys
import zlib
from collections.abc import Iterator
from typing import Any, cast

from isal import isal_zlib

if sys.version_info >= (3, 14):
    from compression.zstd import DecompressionParameter, ZstdDecompressor, ZstdError
else:
    from backports.zstd import DecompressionParameter, ZstdDecompressor, ZstdError

__all__ = ["INFLATE_ERRORS", "STEP", "MembersInflater", "zstd_frames_problem"]

#: Inflated bytes asked for at a time by default.
STEP = 256 << 10
#: What a damaged member or frame raises (or a frame declaring too large a window).
INFLATE_ERRORS: tuple[type[Exception], ...] = (
    zlib.error,
    cast("type[Exception]", isal_zlib.error),  # a class; typed as an instance
    ZstdError,
)


class MembersInflater:
    """Inflates concatenated gzip members (or zstd frames), piece by piece, a step at a time.

    :attr:`eof` is true between members (where a whole fragment ends), once
    :meth:`inflate`'s pieces were all taken.  Raises one of
    :data:`INFLATE_ERRORS` on bytes that do not inflate.
    """

    def __init__(self, *, zstd: bool, step: int = STEP, max_window: int = 0) -> None:
        self._zstd = zstd
        self._step = step
        #: The decoder's options: the largest window log a frame may declare, if bounded.
        self._options: dict[int, int] | None = (
            {int(DecompressionParameter.window_log_max): max_window.bit_length() - 1}
            if zstd and max_window else None
        )
        self._inflate: Any = None
        self.eof = True

    def inflate(self, data: bytes) -> Iterator[bytes]:
        """What ``data``, the next bytes of the members, inflates to: pieces of at most
        ``step`` bytes, each inflated only once the one before it was taken."""
        step = self._step
        while data:
            inflate = self._inflate
            if inflate is None:
                inflate = self._inflate = (
                    ZstdDecompressor(options=self._options) if self._zstd
                    else isal_zlib.decompressobj(31)
                )
            out = inflate.decompress(data, step)
            if out:
                yield out
            if self._zstd:
                while not inflate.eof and not inflate.needs_input:  # more output buffered
                    out = inflate.decompress(b"", step)
                    if out:
                        yield out
            else:
                # Input left over, or output stopped at ``step`` (more may be pending).
                while not inflate.eof and (inflate.unconsumed_tail or len(out) == step):
                    out = inflate.decompress(inflate.unconsumed_tail, step)
                    if out:
                        yield out
            if inflate.eof:
                data = inflate.unused_data
                self._inflate = None
            else:
                data = b""
        self.eof = self._inflate is None


_ZSTD_MAGIC = 0xFD2FB528
_SKIPPABLE_MASK, _SKIPPABLE = 0xFFFFFFF0, 0x184D2A50


def zstd_frames_problem(data: bytes, *, max_window: int, size: int) -> str | None:
    """What makes ``data``, concatenated zstd frames, fail to inflate to ``size`` bytes
    within ``max_window``, as far as their headers tell (``None``: nothing found).

    Reads the frame and block headers only (RFC 8878): a frame declaring a
    larger window than ``max_window`` (as the decoder holds it:
    ``max_window``'s power of two), frames whose declared content sizes do
    not add up to ``size`` (frames without a declared size are not
    counted, and then the sum is not checked), and headers that do not
    end exactly where ``data`` does.  Damage inside a block is found only
    by inflating it.
    """
    limit = 1 << (max_window.bit_length() - 1) if max_window else 1 << 27
    try:
        _check_frames(data, limit, size)
    except _NotFrames as exc:
        return str(exc)
    except IndexError:
        return "ends inside a zstd frame header"
    return None


def _check_frames(data: bytes, limit: int, size: int) -> None:
    """:func:`zstd_frames_problem`, raising what it finds (:class:`_NotFrames`, or an
    IndexError for headers past the end)."""
    pos, total, sized = 0, 0, True
    while pos < len(data):
        magic = int.from_bytes(data[pos : pos + 4], "little")
        if magic & _SKIPPABLE_MASK == _SKIPPABLE:
            pos += 8 + int.from_bytes(data[pos + 4 : pos + 8], "little")
            continue
        if magic != _ZSTD_MAGIC:
            raise _NotFrames(f"has no zstd frame at byte {pos}")
        window, content, pos, checksum = _frame_header(data, pos + 4)
        if window > limit:
            raise _NotFrames(f"declares a {window}-byte zstd window, over {limit}")
        total += content or 0
        sized = sized and content is not None
        pos = _past_blocks(data, pos) + checksum
    if pos != len(data):
        raise _NotFrames("ends inside a zstd frame")
    if sized and total != size:
        raise _NotFrames(f"declares {total} bytes of content, not the {size} recorded")


class _NotFrames(Exception):
    """What :func:`zstd_frames_problem` found."""


def _frame_header(data: bytes, at: int) -> tuple[int, int | None, int, int]:
    """A frame header from its descriptor at ``at``: the window it declares, its content
    size (``None``: not declared), where its first block starts, its checksum's length."""
    descriptor = data[at]
    single = descriptor >> 5 & 1
    at += 1
    window = 0
    if not single:
        base = 1 << (10 + (data[at] >> 3))
        window = base + (base >> 3) * (data[at] & 7)
        at += 1
    at += (0, 1, 2, 4)[descriptor & 3]  # a dictionary id
    width = (single, 2, 4, 8)[descriptor >> 6]
    content = None
    if width:
        content = int.from_bytes(data[at : at + width], "little") + (256 if width == 2 else 0)
        at += width
        if single:  # the window is the content
            window = content
    return window, content, at, 4 if descriptor & 4 else 0


def _past_blocks(data: bytes, at: int) -> int:
    """Where a frame's blocks, the first at ``at``, end."""
    while True:
        header = int.from_bytes(data[at : at + 3], "little")
        kind = header >> 1 & 3
        if kind == 3 or at + 3 > len(data):
            raise _NotFrames(f"has no zstd block header at byte {at}")
        at += 3 + (1 if kind == 1 else header >> 3)
        if header & 1:
            return at
