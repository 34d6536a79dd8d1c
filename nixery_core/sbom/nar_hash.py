"""Nix's NAR hashes as the hexadecimal SHA-256 that SBOM formats want.

``nix path-info --json`` prints a store path's ``narHash`` as an SRI hash
(``sha256-<base64>``, Nix >= 2.4 and what Nix 2.8 prints here) or in Nix's
own form (``sha256:<52 characters of Nix base-32>``, older Nix); either, or
``sha256:<64 hex>``, becomes 64 lower-case hex characters.
"""

from __future__ import annotations

import base64
import binascii
import re

__all__ = ["nar_sha256_hex", "nix_base32_decode"]

#: Nix's base-32 alphabet (no e, o, t, u).
NIX_BASE32 = "0123456789abcdfghijklmnpqrsvwxyz"
_HEX = re.compile(r"[0-9a-f]{64}")


def nix_base32_decode(text: str) -> bytes:
    """Decode Nix base-32 (least significant digit last, bits packed little-endian)."""
    size = len(text) * 5 // 8
    out = bytearray(size)
    for k, char in enumerate(text):
        digit = NIX_BASE32.find(char)
        if digit < 0:
            raise ValueError(f"{char!r} is not a Nix base-32 digit")
        n = len(text) - k - 1
        i, j = divmod(n * 5, 8)
        if i >= size:
            if digit:
                raise ValueError("Nix base-32 text has bits beyond its size")
            continue
        out[i] |= (digit << j) & 0xFF
        carry = digit >> (8 - j)
        if i + 1 < size:
            out[i + 1] |= carry
        elif carry:
            raise ValueError("Nix base-32 text has bits beyond its size")
    return bytes(out)


def nar_sha256_hex(nar_hash: str | None) -> str | None:
    """The SHA-256 of a ``narHash`` in hex; ``None`` when absent or not SHA-256."""
    if not nar_hash:
        return None
    try:
        if nar_hash.startswith("sha256-"):
            raw = base64.b64decode(nar_hash[7:], validate=True)
        elif nar_hash.startswith("sha256:"):
            body = nar_hash[7:]
            if _HEX.fullmatch(body):
                return body
            raw = nix_base32_decode(body)
        else:
            return None
    except (ValueError, binascii.Error):
        return None
    return raw.hex() if len(raw) == 32 else None
