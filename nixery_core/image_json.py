"""The image config blob: an :class:`~nixery_core.image_config.ImageConfig` as JSON.

One config serves both the OCI and the Docker schema 2 manifest; the keys
follow the OCI image spec (``architecture``, ``os``, ``rootfs.diff_ids``,
``config.Env``/``Cmd``/``Entrypoint``/``WorkingDir``/``ExposedPorts``/
``Labels``/``User``, ``history``).  :func:`canonical_json` makes every
document this library renders byte-stable.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from types import MappingProxyType

from nixery_core.canonical import canonical_json
from nixery_core.digests import validate_digest
from nixery_core.errors import InvalidInput
from nixery_core.image_config import DEFAULT_ENV as _DEFAULT_ENV_PAIRS
from nixery_core.image_config import ImageConfig
from nixery_core.names import Architecture
from nixery_core.protocols import JSONValue

__all__ = ["DEFAULT_ENV", "canonical_json", "render_config"]

#: Environment every image gets under the caller's own ``env``
#: (:data:`nixery_core.image_config.DEFAULT_ENV` as a mapping).
DEFAULT_ENV: Mapping[str, str] = MappingProxyType(dict(_DEFAULT_ENV_PAIRS))


def _env(default_env: Mapping[str, str], config: ImageConfig) -> list[JSONValue]:
    env = dict(default_env)
    for name, value in env.items():
        if not name or "=" in name or "\x00" in name + value:
            raise InvalidInput(f"invalid default environment variable {name!r}")
    env.update(config.env)
    return [f"{name}={value}" for name, value in sorted(env.items())]


def render_config(
    *,
    arch: Architecture,
    diff_ids: Sequence[str],
    config: ImageConfig,
    default_env: Mapping[str, str] = DEFAULT_ENV,
    default_cmd: Sequence[str] | None = None,
    history: Sequence[str] | None = None,
) -> bytes:
    """The image config JSON (one blob for both manifest formats).

    ``diff_ids`` are the uncompressed layer digests in layer order.
    ``history`` has one ``created_by`` text per layer (``None``: a generic
    text).  The ``config`` object is ``config.runtime_config()`` with two
    knobs: ``Env`` is ``default_env`` overridden key by key by
    ``config.env``, sorted by name; ``Cmd`` is ``config.cmd``, else
    ``default_cmd`` unless an entrypoint is set (pass ``("bash",)`` for
    images with a shell, as :meth:`ImageConfig.effective_cmd` does).  Empty
    optional fields (an empty ``Cmd`` included) are left out, never ``null``.
    """
    diff_ids = [validate_digest(d) for d in diff_ids]
    if history is None:
        history = [f"nixery-core layer {i + 1} of {len(diff_ids)}" for i in range(len(diff_ids))]
    if len(history) != len(diff_ids):
        raise InvalidInput(f"{len(history)} history entries for {len(diff_ids)} layers")
    run = config.runtime_config(has_shell=False)
    run["Env"] = _env(default_env, config)
    cmd = config.cmd if config.cmd is not None else None if config.entrypoint else default_cmd
    run.pop("Cmd", None)
    if cmd:
        run["Cmd"] = list(cmd)
    if not config.entrypoint:
        run.pop("Entrypoint", None)
    document: dict[str, JSONValue] = {
        "architecture": arch.oci_arch,
        "os": arch.os,
        "created": config.created,
        "config": run,
        "rootfs": {"type": "layers", "diff_ids": list(diff_ids)},
        "history": [{"created": config.created, "created_by": text} for text in history],
    }
    return canonical_json(document)
