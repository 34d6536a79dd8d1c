"""Trusted Nix expressions as image content: inline text, or a file and an attribute.

Only trusted code builds these values and passes them to
``build_image(expression=...)``; nothing derived from an image name ever
becomes one.  Each carries a ``key`` that covers what it evaluates, so the
manifest cache never serves an image built from an older version:

* inline text: the text itself;
* a file: the content of every file in the file's directory (an expression
  may import its neighbours), the file's name and the attribute path.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import attrs

from nixery_core.errors import InvalidInput
from nixery_core.sources import canonical_json, hash_directory

__all__ = ["NixExpression"]

_ATTRIBUTE = re.compile(r"[A-Za-z_][A-Za-z0-9_'-]*(?:\.[A-Za-z_][A-Za-z0-9_'-]*)*")


def _nix_string(text: str) -> str:
    """A Nix string literal for ``text`` (JSON escapes, and ``${`` kept literal)."""
    return json.dumps(text).replace("${", "\\${")


@attrs.frozen
class NixExpression:
    """A trusted expression: Nix source taking the package set, and its cache key.

    ``text`` is a function from the package set to a derivation, a list or an
    attribute set of derivations (``"pkgs: [ pkgs.hello ]"``).
    """

    text: str
    key: str

    @classmethod
    def from_text(cls, text: str) -> NixExpression:
        """An inline expression; its key is a hash of the text."""
        if not isinstance(text, str) or not text.strip() or "\x00" in text:
            raise InvalidInput("a Nix expression must be non-empty text without NUL bytes")
        return cls(text, hashlib.sha256(canonical_json({"text": text})).hexdigest())

    @classmethod
    def from_file(cls, path: str | Path, attribute: str | None = None) -> NixExpression:
        """The value of ``attribute`` (a dotted path) in the Nix file at ``path``.

        The file may be a function of the package set (``pkgs: { ... }``) or a
        plain value; without ``attribute`` the whole value is the content.
        """
        file = Path(path).resolve()
        if not file.is_file():
            raise InvalidInput(f"Nix expression file {file} does not exist or is not a file")
        if attribute is not None and not _ATTRIBUTE.fullmatch(attribute):
            raise InvalidInput(f"invalid attribute path {attribute!r} for {file}")
        select = "" if attribute is None else "." + attribute
        text = (
            f"pkgs: let f = import (/. + {_nix_string(str(file))}); "
            f"v = if builtins.isFunction f then f pkgs else f; in v{select}"
        )
        key = hashlib.sha256(
            canonical_json(
                {
                    "file": file.name,
                    "directory": hash_directory(file.parent),
                    "attribute": attribute,
                }
            )
        ).hexdigest()
        return cls(text, key)
