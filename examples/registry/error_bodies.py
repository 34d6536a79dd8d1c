"""The registry's JSON error body, ``{"errors": [{"code", "message", "detail"}]}``, bounded.

Error answers echo what the client sent (a name, a tag, package names) and
what went wrong; neither may grow the answer without bound.  A 100 KB name
must not come back as a 200 KB body, and a Nix build log never goes to the
client at all (the registry keeps it and names a failure id instead, see
:mod:`examples.registry.failures`).  :func:`error_body` therefore cuts:

- every string to :data:`MAX_TEXT` characters (``...[N more]`` marks the cut),
- every list to :data:`MAX_ITEMS` entries (then ``"...[N more]"``),
- and drops ``detail`` entirely if the body would still exceed
  :data:`MAX_BODY` bytes (``message`` alone always fits).
"""

from __future__ import annotations

import json
from typing import Final

__all__ = ["MAX_BODY", "MAX_ITEMS", "MAX_TEXT", "bounded", "error_body"]

#: Longest string kept in an error body (characters).
MAX_TEXT: Final = 512
#: Most list entries kept in an error body's detail.
MAX_ITEMS: Final = 32
#: Largest error body (bytes of JSON) before ``detail`` is dropped.
MAX_BODY: Final = 8192


def bounded(value: object) -> object:
    """``value`` (JSON-like) with long strings and lists cut as the module docs say."""
    if isinstance(value, str):
        if len(value) <= MAX_TEXT:
            return value
        return value[:MAX_TEXT] + f"...[{len(value) - MAX_TEXT} more]"
    if isinstance(value, list | tuple):
        kept: list[object] = [bounded(item) for item in value[:MAX_ITEMS]]
        if len(value) > MAX_ITEMS:
            kept.append(f"...[{len(value) - MAX_ITEMS} more]")
        return kept
    if isinstance(value, dict):
        return {bounded(str(key)): bounded(item) for key, item in list(value.items())[:MAX_ITEMS]}
    return value


def error_body(code: str, message: str, detail: object = None) -> bytes:
    """The JSON bytes of one error, at most :data:`MAX_BODY` bytes."""
    error: dict[str, object] = {"code": code, "message": bounded(message)}
    if detail is not None:
        error["detail"] = bounded(detail)
    body = json.dumps({"errors": [error]}, separators=(",", ":")).encode()
    if len(body) > MAX_BODY:
        error.pop("detail", None)
        body = json.dumps({"errors": [error]}, separators=(",", ":")).encode()
    return body
