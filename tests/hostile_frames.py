"""Hostile compressed frames, built byte by byte from the format's specification (RFC 8878)."""

from __future__ import annotations

import struct

__all__ = ["zstd_frame_declaring_window"]

_ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
#: A block's largest size (RFC 8878 3.1.1.2.3).
_BLOCK_MAX = 128 << 10


def zstd_frame_declaring_window(window_log: int, zeros: int) -> bytes:
    """A valid zstd frame of ``zeros`` zero bytes (run-length blocks) declaring a window of
    ``1 << window_log`` bytes and no content size, as a hostile writer would: a decoder
    without a bound allocates that window before the first block."""
    if not 10 <= window_log <= 41:
        raise ValueError(f"a window log of {window_log} cannot be declared")
    # Frame header descriptor 0: no content size, not single-segment, no checksum, no
    # dictionary; then the window descriptor (exponent window_log - 10, mantissa 0).
    out = bytearray(_ZSTD_MAGIC + bytes([0, (window_log - 10) << 3]))
    left = zeros
    while True:
        size = min(left, _BLOCK_MAX)
        left -= size
        last = 1 if not left else 0
        out += struct.pack("<I", last | 1 << 1 | size << 3)[:3]  # an RLE block of ``size``
        out += b"\0"
        if last:
            return bytes(out)
