"""Canonical JSON: the one byte form every key is hashed in and every document rendered in.

Sorted keys, compact separators, UTF-8 (characters are not escaped), no NaN
or infinities.  Cache keys, manifests, configs, indexes and SBOMs all go
through :func:`canonical_json`, so equal values always give equal bytes.
"""

from __future__ import annotations

import json

__all__ = ["canonical_json"]


def canonical_json(value: object) -> bytes:
    """``value`` as deterministic JSON bytes; ValueError for NaN or infinity."""
    return json.dumps(
        value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
    ).encode("utf-8")
