"""Whether a buffer kept for reuse is referred to by nothing else.

The tar writer (:mod:`nixery_core.archive`) and the chunked packer
(:mod:`nixery_core.chunked`) reuse their big buffers once every holder (a
view of it waiting in a batch, a task's arguments, a C call reading it
without Python's lock) has let go, judged by :func:`sys.getrefcount`.  That
count is exact on CPython with the GIL before 3.14.  CPython 3.14 may count
fewer references (borrowed ones on the evaluation stack) and free-threaded
builds count differently: there a buffer still behind a live view could look
released and be written over, so :data:`EXACT_COUNTS` is false and no buffer
is ever reused (a new one each time: the same bytes, more allocation).
"""

from __future__ import annotations

import sys
import sysconfig

__all__ = ["EXACT_COUNTS", "released"]

#: True where sys.getrefcount counts every reference (see the module docstring).
EXACT_COUNTS: bool = (
    sys.implementation.name == "cpython"
    and sys.version_info < (3, 14)
    and not sysconfig.get_config_var("Py_GIL_DISABLED")
)
#: References to a buffer nothing else holds, seen from here: the caller's
#: container, the caller's local name, this function's parameter and
#: getrefcount's own argument.
_OWN_REFERENCES = 4


def released(buffer: bytearray) -> bool:
    """True if only the caller's container and one of its local names refer to ``buffer``."""
    return EXACT_COUNTS and sys.getrefcount(buffer) == _OWN_REFERENCES
