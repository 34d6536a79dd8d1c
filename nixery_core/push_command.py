"""``nixery-core push``: one built image to one or more registry targets.

The command line's push, apart from building (:mod:`nixery_core.cli` builds,
then calls :func:`push_targets`):

- targets are ``[docker://]HOST[:PORT]/REPO[:TAG]``; without a tag, ``latest``;
- every target shares one :class:`~nixery_core.push_ledger.PushLedger`, so
  a second repository on the same registry mounts the blobs the first one
  received instead of uploading them again; ``--mount-from REPO`` names a
  repository to mount from that this process did not push to;
- ``--jobs N`` blobs go up at once (default
  :data:`~nixery_core.registry_push.DEFAULT_WORKERS`);
- each target gets a human summary (:func:`~nixery_core.push_report.describe`)
  on stdout; errors carry a hint when HTTPS met a plain-HTTP registry or
  the other way round (:mod:`nixery_core.push_report`).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import TextIO

from nixery_core.protocols import ReadableStore
from nixery_core.push_ledger import PushLedger
from nixery_core.push_report import describe
from nixery_core.registry_push import DEFAULT_WORKERS, push_image

__all__ = ["push_targets"]


def push_targets(
    store: ReadableStore,
    manifest: bytes,
    media_type: str,
    targets: Sequence[str],
    *,
    out: TextIO,
    insecure: bool = False,
    mount_from: str | None = None,
    jobs: int = DEFAULT_WORKERS,
    clock: Callable[[], float] = time.monotonic,
    ledger: PushLedger | None = None,
) -> PushLedger:
    """Push ``manifest`` to every target in order, printing a summary for each.

    Returns the ledger (a new one unless given), which knows every
    repository the blobs reached.
    """
    ledger = ledger if ledger is not None else PushLedger()
    for raw in targets:
        target = raw.removeprefix("docker://")
        started = clock()
        pushed = push_image(
            store=store, manifest=manifest, manifest_media_type=media_type, target=target,
            insecure=insecure, mount_from=mount_from, workers=jobs, ledger=ledger,
        )
        print(describe(pushed, clock() - started, mount_from=mount_from), file=out, flush=True)
    return ledger
