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

__all__ = ["INFLATE_ERRORS", "STEP", "MembersInflater"]

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
