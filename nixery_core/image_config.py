"""What an image runs as and with: environment, command, user, ports, labels.

Passed to ``build_image``; every field is part of the manifest cache key.
``created`` defaults to the epoch so builds stay reproducible.
"""

from __future__ import annotations

from collections.abc import Mapping

import attrs

from nixery_core.protocols import JSONValue

__all__ = ["ImageConfig", "User"]

EPOCH = "1970-01-01T00:00:00Z"


def _frozen_mapping(value: Mapping[str, str] | None) -> tuple[tuple[str, str], ...]:
    return tuple(sorted((value or {}).items()))


def _opt_tuple(value: str | tuple[str, ...] | list[str] | None) -> tuple[str, ...] | None:
    if value is None:
        return None
    if isinstance(value, str):
        return (value,)
    return tuple(value)


def _sorted_tuple(value: tuple[str, ...] | list[str]) -> tuple[str, ...]:
    return tuple(sorted(value))


@attrs.frozen
class User:
    """A non-root user the image runs as."""

    name: str
    uid: int
    gid: int
    home: str | None = None

    @property
    def home_dir(self) -> str:
        return self.home or f"/home/{self.name}"


@attrs.frozen
class ImageConfig:
    """Runtime configuration beyond the package list.

    ``env`` and ``labels`` are stored as sorted pairs so the value is
    hashable and its rendering deterministic.  ``cmd=None`` means the default
    (``["bash"]`` when the image has a shell).
    """

    env: tuple[tuple[str, str], ...] = attrs.field(default=(), converter=_frozen_mapping)
    entrypoint: tuple[str, ...] | None = attrs.field(default=None, converter=_opt_tuple)
    cmd: tuple[str, ...] | None = attrs.field(default=None, converter=_opt_tuple)
    working_dir: str = ""
    exposed_ports: tuple[str, ...] = attrs.field(default=(), converter=_sorted_tuple)
    labels: tuple[tuple[str, str], ...] = attrs.field(default=(), converter=_frozen_mapping)
    created: str = EPOCH
    user: User | None = None

    def parameters(self) -> dict[str, JSONValue]:
        """Everything that changes the built image, as JSON for cache keys."""
        return {
            "env": [list(pair) for pair in self.env],
            "entrypoint": list(self.entrypoint) if self.entrypoint is not None else None,
            "cmd": list(self.cmd) if self.cmd is not None else None,
            "working_dir": self.working_dir,
            "exposed_ports": list(self.exposed_ports),
            "labels": [list(pair) for pair in self.labels],
            "created": self.created,
            "user": attrs.asdict(self.user) if self.user is not None else None,
        }
