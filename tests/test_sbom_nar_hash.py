"""NAR hashes in every form Nix prints, decoded as Nix's own `nix hash` converts them."""

from __future__ import annotations

import base64
import hashlib
import subprocess

from conftest import require_tools

from nixery_core.sbom.nar_hash import nar_sha256_hex, nix_base32_decode


def _nix_hash(command: str, hashes: list[str]) -> list[str]:
    require_tools("nix")
    out = subprocess.run(
        ["nix", "--extra-experimental-features", "nix-command", "hash", command,
         "--type", "sha256", *hashes],
        check=True, capture_output=True, text=True, timeout=60,
    )
    return out.stdout.split()


def test_sri_base32_and_hex_forms_give_nixs_base16() -> None:
    """For 40 digests, our hex of the SRI and base-32 forms equals `nix hash to-base16`."""
    digests = [hashlib.sha256(str(i).encode()).digest() for i in range(40)]
    hexes = [d.hex() for d in digests]
    base32 = _nix_hash("to-base32", hexes)
    sri = ["sha256-" + base64.b64encode(d).decode() for d in digests]
    assert _nix_hash("to-base16", sri) == hexes
    assert [nar_sha256_hex(h) for h in sri] == hexes
    assert [nar_sha256_hex("sha256:" + b) for b in base32] == hexes
    assert [nix_base32_decode(b) for b in base32] == digests
    assert [nar_sha256_hex("sha256:" + h) for h in hexes] == hexes


def test_other_or_broken_hashes_are_absent_not_errors() -> None:
    """SHA-512, bad base-32 digits, bad base64 or a wrong length give None."""
    for value in (None, "", "sha512-" + "A" * 88, "sha256:" + "e" * 52, "sha256-!!",
                  "sha256-" + base64.b64encode(b"short").decode(), "md5:abc"):
        assert nar_sha256_hex(value) is None
