"""One canonical JSON for keys and documents."""

from __future__ import annotations

import math

import pytest

from nixery_core import canonical, image_json, sources


def test_there_is_one_canonical_json() -> None:
    """Keys (sources) and documents (image_json) use the very same function."""
    assert sources.canonical_json is canonical.canonical_json
    assert image_json.canonical_json is canonical.canonical_json


def test_bytes_are_sorted_compact_utf8() -> None:
    """Sorted keys, no spaces, characters as UTF-8 rather than escapes."""
    value = {"b": [1, "é"], "a": {"z": None, "y": True}}
    assert canonical.canonical_json(value) == '{"a":{"y":true,"z":null},"b":[1,"é"]}'.encode()


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_nan_and_infinity_are_refused(bad: float) -> None:
    """Neither JSON nor a key may carry NaN or infinities: ValueError, never bytes."""
    with pytest.raises(ValueError, match="JSON compliant"):
        canonical.canonical_json({"x": bad})
