"""What concatenated gzip members or zstd frames inflate to, counted in bounded memory.

A fragment fetched from the bucket (:mod:`nixery_core.fragment_bucket`) is
checked by inflating it, and other instances wrote it: its bytes are not
trusted.  A decompressor asked for everything a piece of input inflates to
returns it at once, and 64 KiB of gzip inflate to about 64 MiB of zeros (a
zstd frame's run-length blocks to far more).  :class:`InflatedSize` asks
for at most ``step`` bytes at a time (zlib's ``max_length`` and
``unconsumed_tail``; the zstd decompressor of :mod:`compression.zstd`,
``backports.zstd`` before Python 3.14, as ``zstandard``'s ``decompressobj``
has no ``max_length``), counts them and drops them, so it holds about
``step`` inflated bytes however compressible its input is.

A zstd frame may declare a window up to libzstd's default limit (128 MiB,
allocated outside Python): the bucket tier checks fragments of every level
without knowing which, and level 22's window is that large
(:func:`~nixery_core.compression.zstd_window`).  The pack that copies a
fetched fragment holds its frames to its own level's window.
"""

from __future__ import annotations

import sys
import zlib
from typing import Any, cast

from isal import isal_zlib

if sys.version_info >= (3, 14):
    from compression.zstd import ZstdDecompressor, ZstdError
else:
    from backports.zstd import ZstdDecompressor, ZstdError

__all__ = ["INFLATE_ERRORS", "STEP", "InflatedSize"]

#: Inflated bytes asked for at a time by default.
STEP = 256 << 10
#: What a damaged member or frame raises.
INFLATE_ERRORS: tuple[type[Exception], ...] = (
    zlib.error,
    cast("type[Exception]", isal_zlib.error),  # a class; typed as an instance
    ZstdError,
)


class InflatedSize:
    """Counts what concatenated gzip members (or zstd frames) inflate to, piece by piece.

    :attr:`produced` is the count so far; :attr:`eof` is true between
    members (where a whole fragment ends).  Raises one of
    :data:`INFLATE_ERRORS` on bytes that do not inflate.
    """

    def __init__(self, *, zstd: bool, step: int = STEP) -> None:
        self._zstd = zstd
        self._step = step
        self._inflate: Any = None
        self.produced = 0
        self.eof = True

    def add(self, data: bytes) -> None:
        """Inflate ``data``, the next bytes of the members, at most ``step`` bytes at a time."""
        step = self._step
        while data:
            inflate = self._inflate
            if inflate is None:
                inflate = self._inflate = (
                    ZstdDecompressor() if self._zstd else isal_zlib.decompressobj(31)
                )
            produced = len(inflate.decompress(data, step))
            self.produced += produced
            if self._zstd:
                while not inflate.eof and not inflate.needs_input:  # more output buffered
                    self.produced += len(inflate.decompress(b"", step))
            else:
                # Input left over, or output stopped at ``step`` (more may be pending).
                while not inflate.eof and (inflate.unconsumed_tail or produced == step):
                    produced = len(inflate.decompress(inflate.unconsumed_tail, step))
                    self.produced += produced
            if inflate.eof:
                data = inflate.unused_data
                self._inflate = None
            else:
                data = b""
        self.eof = self._inflate is None
