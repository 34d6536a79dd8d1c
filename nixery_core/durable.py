"""Making a file renamed into a directory survive a crash: sync the directory.

A rename is durable only once the directory holding the new name is synced
(``fsync`` on the file makes its bytes durable, not its name).  Used by the
writers that publish files by renaming a synced temporary file:
:class:`~nixery_core.storage.filesystem.FilesystemStore` and
:func:`~nixery_core.oci_layout.write_oci_layout`.
"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["fsync_dir"]


def fsync_dir(path: Path) -> None:
    """Flush the directory ``path`` (its entries: names renamed into it) to disk."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
