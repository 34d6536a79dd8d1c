"""Local package sets that read files outside their directory are moving targets.

A :class:`~nixery_core.sources.LocalPathSource` is keyed by the content of
its directory.  That key is only sound if evaluation reads nothing else: the
bundled offline set, for one, imports ``/usr/bin/busybox`` and copies the
host's CA bundle, and any set may import files from elsewhere.  Nix 2.8 does
not report what an evaluation read, so we ask it to refuse instead: the
resolve call of a pinned path source runs in Nix's restricted mode
(``--option restrict-eval true``) with only the set's directory and
nixery's own ``nix/`` directory on the search path.

* It succeeds: the set read nothing outside its directory; its content key
  holds and its manifest entries stay pinned (never expire).
* Nix refuses a path (``access to absolute path '/usr/bin' is forbidden in
  restricted mode``): the set reads outside its directory.  The resolve runs
  again unrestricted, and the build's manifest entry is written as a
  *moving target*: it expires after the cache's ``moving_ttl`` (6 hours by
  default), so a changed outside file reaches images within that time, as
  a new channel revision does.  A warning names the path.

The answer is remembered per source identity (which includes the content
hash) in this process, so only the first uncached build of such a set
evaluates twice; :func:`entry_pinned` is what cache writers ask.  A
path source never checked in this process (every image a cache hit) counts
as moving for entries written from it, which errs on the side of rebuilding.
"""

from __future__ import annotations

import logging
import re
import threading
from collections.abc import Sequence

from nixery_core.nixexprs import nix_dir
from nixery_core.sources import SourceSpec

__all__ = ["entry_pinned", "outside_path", "record", "restricted_args"]

log = logging.getLogger(__name__)

_FORBIDDEN = re.compile(r"access to (?:absolute )?path '([^']*)' is forbidden in restricted mode")
_lock = threading.Lock()
#: identity -> whether the set was seen reading outside its directory.
_reads_outside: dict[str, bool] = {}


def _is_path_source(spec: SourceSpec) -> bool:
    return spec.nix_args.get("type") == "path"


def restricted_args(spec: SourceSpec) -> Sequence[str] | None:
    """Extra resolve arguments confining a pinned path source to its directory;
    ``None`` when there is nothing to learn (not a pinned path source, or already
    seen reading outside in this process)."""
    if not (_is_path_source(spec) and spec.pinned):
        return None
    with _lock:
        if _reads_outside.get(spec.identity):
            return None
    return (
        "--option", "restrict-eval", "true",
        "-I", spec.nix_args["path"],
        "-I", str(nix_dir()),
    )


def outside_path(stderr: str) -> str | None:
    """The path restricted evaluation refused, if that is why it failed."""
    found = _FORBIDDEN.search(stderr)
    return None if found is None else found.group(1)


def record(spec: SourceSpec, outside: str | None) -> None:
    """Remember whether ``spec``'s set read ``outside`` its directory (None: it did not)."""
    if outside is not None:
        log.warning(
            "package set %s reads %s outside its directory: its images are cached as a "
            "moving target", spec.nix_args.get("path"), outside,
        )
    with _lock:
        _reads_outside[spec.identity] = outside is not None


def entry_pinned(spec: SourceSpec) -> bool:
    """Whether a manifest entry built from ``spec`` may be pinned (never expire)."""
    if not spec.pinned:
        return False
    if not _is_path_source(spec):
        return True
    with _lock:
        return _reads_outside.get(spec.identity) is False
