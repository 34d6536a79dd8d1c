"""A package source for tests with a fake Nix: it resolves to a fixed spec."""

from __future__ import annotations

import attrs

from nixery_core.sources import SourceSpec

__all__ = ["FixedSource"]


@attrs.frozen
class FixedSource:
    """A :class:`~nixery_core.sources.PackageSource` that always resolves to one spec.

    :class:`~nixery_core.testing.runners.FakeNix` ignores the source, so a
    test only needs an identity (which goes into cache keys) and whether it
    is pinned (pinned entries never expire; moving ones live ``moving_ttl``).
    Change ``identity`` to model a new revision of the package set.
    """

    identity: str = "fixed"
    pinned: bool = True

    def resolve(self, tag: str) -> SourceSpec:
        del tag  # one revision whatever the tag
        return SourceSpec({"type": "path", "path": "/fixed"}, self.identity, self.pinned)
