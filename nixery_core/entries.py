"""Synthesised tar entries: what the customisation layer is made of.

Store paths are packed from disk; the customisation layer (symlink forest,
``/tmp``, ``/etc/passwd``) is described by these values and packed by
:func:`nixery_core.archive.pack_entries`.
"""

from __future__ import annotations

from typing import Literal

import attrs

__all__ = ["EntryKind", "TarEntry"]

EntryKind = Literal["dir", "file", "symlink", "hardlink"]


@attrs.frozen
class TarEntry:
    """One archive member.

    ``path`` is relative to the image root, without a leading ``/``
    (``usr/bin/env``).  ``data`` is a file's content; ``target`` a symlink's
    or hard link's target.  Ownership is numeric; names are never written.
    """

    path: str
    kind: EntryKind
    mode: int = 0o755
    data: bytes = b""
    target: str = ""
    uid: int = 0
    gid: int = 0

    def __attrs_post_init__(self) -> None:
        if self.path.startswith("/") or not self.path or "\x00" in self.path:
            raise ValueError(f"tar entry path must be relative and non-empty: {self.path!r}")
        if any(part in {"", ".", ".."} for part in self.path.split("/")):
            raise ValueError(f"tar entry path must be normalised: {self.path!r}")
