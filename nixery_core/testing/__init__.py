"""Fakes for embedders' tests: fake Nix, recording/replaying runners, an in-memory store.

* :class:`FakeNix` plays Nix for a declared package set (no Nix needed);
  :class:`RecordingRunner` and :class:`ReplayRunner` record real runs and
  replay them.
* :class:`MemoryStore` is an :class:`~nixery_core.protocols.Uploader` in
  memory with counters and fault injection.
* :class:`FixedSource` is a package source for use with :class:`FakeNix`.
* :mod:`nixery_core.storage.conformance` checks any uploader against the
  protocol.
"""

from nixery_core.testing.runners import (
    FakeDirectory,
    FakeFault,
    FakeFile,
    FakeHardLink,
    FakeNix,
    FakePackage,
    FakeSymlink,
    RecordedCall,
    RecordingRunner,
    ReplayRunner,
    UnexpectedCall,
    default_fake_packages,
    replay_key,
)
from nixery_core.testing.sources import FixedSource
from nixery_core.testing.storage import MemoryStore, StagedBlob

__all__ = [
    "FakeDirectory",
    "FakeFault",
    "FakeFile",
    "FakeHardLink",
    "FakeNix",
    "FakePackage",
    "FakeSymlink",
    "FixedSource",
    "MemoryStore",
    "RecordedCall",
    "RecordingRunner",
    "ReplayRunner",
    "StagedBlob",
    "UnexpectedCall",
    "default_fake_packages",
    "replay_key",
]
