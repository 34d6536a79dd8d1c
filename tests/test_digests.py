"""Digests: computed like sha256sum, and only well-formed sha256 digests get through."""

from __future__ import annotations

import hashlib
import re
import subprocess

import pytest
from hypothesis import given
from hypothesis import strategies as st

from nixery_core.digests import (
    SHA256_EMPTY,
    Sha256Counter,
    digest_hex,
    is_digest,
    sha256_digest,
    validate_digest,
)
from nixery_core.errors import InvalidDigest, InvalidInput
from nixery_core.storage.conformance import HOSTILE_DIGESTS

GOOD = "sha256:" + "ab" * 32


def test_sha256_digest_matches_coreutils() -> None:
    """sha256_digest agrees with the sha256sum tool on the same bytes."""
    data = b"nixery\x00core\n" * 1000
    out = subprocess.run(["sha256sum"], input=data, capture_output=True, check=True).stdout
    assert sha256_digest(data) == "sha256:" + out.split()[0].decode()


def test_empty_digest_constant() -> None:
    """SHA256_EMPTY is the digest of zero bytes."""
    assert sha256_digest(b"") == SHA256_EMPTY


@given(st.binary(max_size=4096))
def test_every_computed_digest_validates(data: bytes) -> None:
    """Whatever the bytes, their digest passes validation and exposes its hex."""
    digest = sha256_digest(data)
    assert validate_digest(digest) == digest
    assert digest_hex(digest) == hashlib.sha256(data).hexdigest()


@pytest.mark.parametrize("bad", HOSTILE_DIGESTS)
def test_hostile_digests_rejected(bad: str) -> None:
    """Path tricks, upper case, wrong length, other algorithms: InvalidDigest naming the input."""
    with pytest.raises(InvalidDigest) as info:
        validate_digest(bad)
    assert info.value.digest == bad
    assert not is_digest(bad)
    with pytest.raises(InvalidDigest):
        digest_hex(bad)


@pytest.mark.parametrize("bad", [None, 42, b"sha256:" + b"ab" * 32, ["sha256:" + "ab" * 32]])
def test_non_strings_rejected(bad: object) -> None:
    """Values that are not strings (as JSON may hold) are refused, not crashed on."""
    with pytest.raises(InvalidDigest):
        validate_digest(bad)


@given(st.text(max_size=80))
def test_validation_is_exactly_the_grammar(text: str) -> None:
    """A string validates if and only if it is sha256: plus 64 lower-case hex."""
    expected = re.fullmatch(r"sha256:[0-9a-f]{64}", text) is not None
    assert is_digest(text) is expected


def test_invalid_digest_is_invalid_input() -> None:
    """InvalidDigest is caught by handlers for any bad input."""
    with pytest.raises(InvalidInput):
        validate_digest("sha256:xyz")
    assert validate_digest(GOOD) == GOOD


@given(st.lists(st.binary(max_size=300), max_size=12))
def test_counter_equals_one_shot(chunks: list[bytes]) -> None:
    """Streaming chunks through Sha256Counter gives the one-shot digest and the total size."""
    counter = Sha256Counter()
    for chunk in chunks:
        counter.update(memoryview(chunk))
    joined = b"".join(chunks)
    assert counter.digest() == sha256_digest(joined)
    assert counter.size == len(joined)
