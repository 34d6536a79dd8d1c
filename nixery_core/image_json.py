"""The image config blob: an :class:`~nixery_core.image_config.ImageConfig` as JSON.

One config serves both the OCI and the Docker schema 2 manifest; the keys
follow the OCI image spec (``architecture``, ``os``, ``rootfs.diff_ids``,
``config.Env``/``Cmd``/``Entrypoint``/``WorkingDir``/``ExposedPorts``/
``Labels``/``User``, ``history``).  :func:`canonical_json` makes every
document this library renders byte-stable.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence

from nixery_core.digests import validate_digest
from nixery_core.errors import InvalidInput
from nixery_core.image_config import ImageConfig
from nixery_core.names import Architecture
from nixery_core.protocols import JSONValue

__all__ = ["DEFAULT_ENV", "canonical_json", "render_config"]

#: Environment every image gets, under the caller's own ``env``.
DEFAULT_ENV: Mapping[str, str] = {
    "PATH": "/bin:/usr/bin",
    "SSL_CERT_FILE": "/etc/ssl/certs/ca-bundle.crt",
}

_PORT = re.compile(r"([0-9]{1,5})(?:/(tcp|udp|sctp))?")
_ENV_NAME = re.compile(r"[^=\x00]+")


def canonical_json(value: JSONValue) -> bytes:
    """Deterministic JSON: sorted keys, compact separators, UTF-8 (not ASCII-escaped)."""
    return json.dumps(
        value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
    ).encode("utf-8")


def _exposed_ports(ports: Sequence[str]) -> dict[str, JSONValue]:
    out: dict[str, JSONValue] = {}
    for port in ports:
        match = _PORT.fullmatch(port)
        if match is None or not 0 < int(match.group(1)) < 65536:
            raise InvalidInput(
                f"invalid exposed port {port!r}: expected '<1-65535>[/tcp|udp|sctp]'"
            )
        out[f"{int(match.group(1))}/{match.group(2) or 'tcp'}"] = {}
    return out


def _env(default_env: Mapping[str, str], config: ImageConfig) -> list[JSONValue]:
    env = dict(default_env)
    if config.user is not None:
        env["HOME"] = config.user.home_dir
    env.update(config.env)
    for name in env:
        if not _ENV_NAME.fullmatch(name):
            raise InvalidInput(f"invalid environment variable name {name!r}")
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
    text).  ``Env`` is ``default_env`` (plus ``HOME`` when ``config.user`` is
    set) overridden by ``config.env``, sorted by name.  ``Cmd`` is
    ``config.cmd``, or ``default_cmd`` when that is ``None``.  ``User`` is
    numeric (``uid:gid``) so it works without ``/etc/passwd``.  Empty
    optional fields are left out, never rendered as ``null``.
    """
    diff_ids = [validate_digest(d) for d in diff_ids]
    if history is None:
        history = [f"nixery-core layer {i + 1} of {len(diff_ids)}" for i in range(len(diff_ids))]
    if len(history) != len(diff_ids):
        raise InvalidInput(f"{len(history)} history entries for {len(diff_ids)} layers")
    run: dict[str, JSONValue] = {"Env": _env(default_env, config)}
    cmd = config.cmd if config.cmd is not None else default_cmd
    if cmd:
        run["Cmd"] = list(cmd)
    if config.entrypoint:
        run["Entrypoint"] = list(config.entrypoint)
    if config.working_dir:
        run["WorkingDir"] = config.working_dir
    if config.exposed_ports:
        run["ExposedPorts"] = _exposed_ports(config.exposed_ports)
    if config.labels:
        run["Labels"] = dict(config.labels)
    if config.user is not None:
        run["User"] = f"{config.user.uid}:{config.user.gid}"
    document: dict[str, JSONValue] = {
        "architecture": arch.oci_arch,
        "os": arch.os,
        "created": config.created,
        "config": run,
        "rootfs": {"type": "layers", "diff_ids": list(diff_ids)},
        "history": [{"created": config.created, "created_by": text} for text in history],
    }
    return canonical_json(document)
