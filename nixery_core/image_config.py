"""What an image runs as and with: environment, command, user, ports, labels.

Passed to ``build_image``; every field is part of the manifest cache key
(:meth:`ImageConfig.parameters`).  ``created`` defaults to the epoch so builds
stay reproducible; pass a real moment through :func:`format_created`.

Every field is checked and normalised on construction; bad values raise
:class:`~nixery_core.errors.InvalidImageConfig` naming the field:

* ``env`` / ``labels``: a mapping or ``(key, value)`` pairs, stored as pairs
  sorted by key.  Keys are non-empty; env keys hold no ``=``; nothing holds
  NUL.  Duplicate keys in pair input are rejected (a mapping cannot have them).
* ``entrypoint`` / ``cmd``: a string (one argument) or a sequence of strings;
  ``None`` means "not set".
* ``working_dir``: empty (not set) or an absolute path.
* ``exposed_ports``: ``80``, ``"80"``, ``"80/tcp"``, ``"53/UDP"`` become
  ``"80/tcp"``, ``"53/udp"``; port 1..65535, protocol tcp, udp or sctp;
  de-duplicated and sorted by (port, protocol).
* ``created``: RFC 3339 in UTC (``Z`` or ``+00:00``), stored with ``Z``.
* ``user``: a :class:`User`, or ``None`` for root.

Environment precedence (:meth:`ImageConfig.effective_env`): the defaults
:data:`DEFAULT_ENV` (``PATH`` and ``SSL_CERT_FILE``) come first and the
configured ``env`` replaces them key by key, so a caller can always override a
default and never loses one by setting an unrelated variable.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from datetime import UTC, datetime

import attrs

from nixery_core.errors import InvalidImageConfig
from nixery_core.protocols import JSONValue

__all__ = [
    "DEFAULT_ENV",
    "DEFAULT_PATH",
    "EPOCH",
    "SSL_CERT_FILE",
    "ImageConfig",
    "User",
    "format_created",
]

EPOCH = "1970-01-01T00:00:00Z"
#: Where the customisation layer's forest puts ``cacert``'s bundle.
SSL_CERT_FILE = "/etc/ssl/certs/ca-bundle.crt"
#: The forest links packages' ``bin``/``sbin`` at the root; ``usr/bin`` holds ``env``.
DEFAULT_PATH = "/bin:/sbin:/usr/bin:/usr/sbin"
#: Environment every image gets unless ``ImageConfig.env`` sets the same key.
DEFAULT_ENV: tuple[tuple[str, str], ...] = (
    ("PATH", DEFAULT_PATH),
    ("SSL_CERT_FILE", SSL_CERT_FILE),
)

_USER_NAME = re.compile(r"[a-z_][a-z0-9_-]{0,31}")
_MAX_ID = 2**31 - 1
_PORT = re.compile(r"([0-9]{1,5})(?:/([A-Za-z]+))?")
_PROTOCOLS = ("tcp", "udp", "sctp")
_RFC3339_UTC = re.compile(
    r"([0-9]{4}-[0-9]{2}-[0-9]{2})[Tt]([0-9]{2}:[0-9]{2}:[0-9]{2})(\.[0-9]+)?(?:[Zz]|\+00:00)"
)

PairsInput = Mapping[str, str] | Iterable[tuple[str, str]] | None
ArgsInput = str | Iterable[str] | None
PortsInput = str | int | Iterable[str | int]


# --- helpers -----------------------------------------------------------------


def format_created(moment: datetime) -> str:
    """An aware ``datetime`` as the RFC 3339 UTC string ``created`` expects.

    Whole seconds print without a fraction (``2024-05-01T12:00:00Z``);
    microseconds print with six digits.  Naive datetimes are refused: the
    library never guesses a time zone.
    """
    if moment.tzinfo is None or moment.utcoffset() is None:
        raise InvalidImageConfig("created", moment, "needs a time zone (an aware datetime)")
    utc = moment.astimezone(UTC)
    fraction = f".{utc.microsecond:06d}" if utc.microsecond else ""
    return utc.strftime("%Y-%m-%dT%H:%M:%S") + fraction + "Z"


def _check_text(field: str, value: object, *, what: str = "value") -> str:
    if not isinstance(value, str):
        raise InvalidImageConfig(field, value, f"{what} must be a string")
    if "\x00" in value:
        raise InvalidImageConfig(field, value, f"{what} must not contain NUL")
    return value


def _pairs(field: str, value: PairsInput, *, env: bool) -> tuple[tuple[str, str], ...]:
    if value is None:
        return ()
    items: Iterable[object] = value.items() if isinstance(value, Mapping) else value
    if isinstance(items, str | bytes):
        raise InvalidImageConfig(field, value, "must be a mapping or (key, value) pairs")
    seen: dict[str, str] = {}
    for item in items:
        if not (isinstance(item, tuple | list) and len(item) == 2):
            raise InvalidImageConfig(field, item, "must be a mapping or (key, value) pairs")
        key = _check_text(field, item[0], what="key")
        val = _check_text(field, item[1])
        if not key:
            raise InvalidImageConfig(field, key, "key must not be empty")
        if env and "=" in key:
            raise InvalidImageConfig(field, key, "environment key must not contain '='")
        if key in seen:
            raise InvalidImageConfig(field, key, "key given twice")
        seen[key] = val
    return tuple(sorted(seen.items()))


def _env(value: PairsInput) -> tuple[tuple[str, str], ...]:
    return _pairs("env", value, env=True)


def _labels(value: PairsInput) -> tuple[tuple[str, str], ...]:
    return _pairs("labels", value, env=False)


def _args(field: str, value: ArgsInput) -> tuple[str, ...] | None:
    raw: object = value
    if raw is None:
        return None
    if isinstance(raw, str):
        return (_check_text(field, raw, what="argument"),)
    if isinstance(raw, bytes) or not isinstance(raw, Iterable):
        raise InvalidImageConfig(field, raw, "must be a string or a sequence of strings")
    return tuple(_check_text(field, arg, what="argument") for arg in raw)


def _entrypoint(value: ArgsInput) -> tuple[str, ...] | None:
    return _args("entrypoint", value)


def _cmd(value: ArgsInput) -> tuple[str, ...] | None:
    return _args("cmd", value)


def _working_dir(value: str) -> str:
    _check_text("working_dir", value)
    if value and not value.startswith("/"):
        raise InvalidImageConfig("working_dir", value, "must be empty or an absolute path")
    return value


def _port(value: object) -> tuple[int, str]:
    text = str(value) if isinstance(value, int) and not isinstance(value, bool) else value
    if not isinstance(text, str):
        raise InvalidImageConfig("exposed_ports", value, "must be a port number or 'port/proto'")
    match = _PORT.fullmatch(text)
    if match is None:
        raise InvalidImageConfig("exposed_ports", value, "expected '80', '80/tcp' or '53/udp'")
    number = int(match.group(1))
    protocol = (match.group(2) or "tcp").lower()
    if not 1 <= number <= 65535:
        raise InvalidImageConfig("exposed_ports", value, "port must be in 1..65535")
    if protocol not in _PROTOCOLS:
        raise InvalidImageConfig("exposed_ports", value, "protocol must be tcp, udp or sctp")
    return number, protocol


def _ports(value: PortsInput) -> tuple[str, ...]:
    items: Iterable[object] = (value,) if isinstance(value, str | int) else value
    parsed = sorted({_port(item) for item in items})
    return tuple(f"{number}/{protocol}" for number, protocol in parsed)


def _created(value: str) -> str:
    _check_text("created", value)
    match = _RFC3339_UTC.fullmatch(value)
    if match is None:
        raise InvalidImageConfig(
            "created", value, "must be an RFC 3339 UTC timestamp like 1970-01-01T00:00:00Z"
        )
    date, time, fraction = match.group(1), match.group(2), match.group(3) or ""
    try:
        datetime.fromisoformat(f"{date}T{time}+00:00")
    except ValueError as exc:
        raise InvalidImageConfig("created", value, f"not a real moment: {exc}") from exc
    return f"{date}T{time}{fraction}Z"


def _id(field: str, value: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidImageConfig(field, value, "must be an integer")
    if not 0 <= value <= _MAX_ID:
        raise InvalidImageConfig(field, value, f"must be in 0..{_MAX_ID}")
    return value


def _user_name(value: str) -> str:
    _check_text("user.name", value)
    if not _USER_NAME.fullmatch(value):
        raise InvalidImageConfig("user.name", value, "must match [a-z_][a-z0-9_-]{0,31}")
    if value == "root":
        raise InvalidImageConfig("user.name", value, "root is built in; leave user unset")
    return value


def _uid(value: int) -> int:
    _id("user.uid", value)
    if value == 0:
        raise InvalidImageConfig("user.uid", value, "uid 0 is root; leave user unset")
    return value


def _gid(value: int) -> int:
    return _id("user.gid", value)


def _home(value: str | None) -> str | None:
    if value is None:
        return None
    _check_text("user.home", value)
    if not value.startswith("/"):
        raise InvalidImageConfig("user.home", value, "must be an absolute path")
    if any(ch in value for ch in ":\n\r"):
        raise InvalidImageConfig("user.home", value, "must not contain ':' or line breaks")
    parts = [part for part in value.split("/") if part]
    if any(part in {".", ".."} for part in parts):
        raise InvalidImageConfig("user.home", value, "must not contain '.' or '..' components")
    if not parts:
        raise InvalidImageConfig("user.home", value, "must not be the image root")
    if parts[0] == "nix":
        raise InvalidImageConfig("user.home", value, "must not be under /nix (the store)")
    return "/" + "/".join(parts)


# --- values ------------------------------------------------------------------


@attrs.frozen
class User:
    """A non-root user the image runs as (root is always present and implicit).

    ``name`` follows ``[a-z_][a-z0-9_-]{0,31}`` and is not ``root``; ``uid`` is
    1..2**31-1 (0 is root: leave ``ImageConfig.user`` unset instead); ``gid``
    is 0..2**31-1, where 0 makes ``root`` the user's primary group and any
    other gid gets a group named like the user.  ``home`` is absolute, not
    ``/``, not under ``/nix``, free of ``:``/line breaks/``.``/``..``, and
    stored normalised (``/home//app/`` -> ``/home/app``); ``None`` means
    ``/home/<name>``.
    """

    name: str = attrs.field(converter=_user_name)
    uid: int = attrs.field(converter=_uid)
    gid: int = attrs.field(converter=_gid)
    home: str | None = attrs.field(default=None, converter=_home)

    @classmethod
    def from_spec(cls, spec: str) -> User:
        """Parse a command-line spec: ``name:uid[:gid[:home]]``.

        ``gid`` defaults to ``uid``, ``home`` to ``/home/<name>``
        (``app:1000`` == ``app:1000:1000:/home/app``).
        """
        fields = spec.split(":")
        if not 2 <= len(fields) <= 4:
            raise InvalidImageConfig("user", spec, "expected name:uid[:gid[:home]]")
        name, uid_text = fields[0], fields[1]
        gid_text = fields[2] if len(fields) > 2 and fields[2] else uid_text
        home = fields[3] if len(fields) > 3 and fields[3] else None
        ids: list[int] = []
        for field, text in (("user.uid", uid_text), ("user.gid", gid_text)):
            if not text.isascii() or not text.isdigit():
                raise InvalidImageConfig(field, text, "must be a decimal number")
            ids.append(int(text))
        return cls(name, ids[0], ids[1], home)

    @property
    def home_dir(self) -> str:
        """The home directory: ``home`` or ``/home/<name>``."""
        return self.home or f"/home/{self.name}"


@attrs.frozen
class ImageConfig:
    """Runtime configuration beyond the package list.

    ``env`` and ``labels`` are stored as sorted pairs so the value is
    hashable and its rendering deterministic.  ``cmd=None`` means the default
    (see :meth:`effective_cmd`).  Validation rules are in the module docstring.
    """

    env: tuple[tuple[str, str], ...] = attrs.field(default=(), converter=_env)
    entrypoint: tuple[str, ...] | None = attrs.field(default=None, converter=_entrypoint)
    cmd: tuple[str, ...] | None = attrs.field(default=None, converter=_cmd)
    working_dir: str = attrs.field(default="", converter=_working_dir)
    exposed_ports: tuple[str, ...] = attrs.field(default=(), converter=_ports)
    labels: tuple[tuple[str, str], ...] = attrs.field(default=(), converter=_labels)
    created: str = attrs.field(default=EPOCH, converter=_created)
    user: User | None = attrs.field(default=None)

    @user.validator
    def _check_user(self, _: attrs.Attribute[User | None], value: object) -> None:
        if value is not None and not isinstance(value, User):
            raise InvalidImageConfig("user", value, "must be a User or None")

    def parameters(self) -> dict[str, JSONValue]:
        """Everything that changes the built image, as JSON for cache keys.

        ``user.home`` is the effective home, so ``home=None`` and the
        equivalent explicit ``/home/<name>`` give the same key.
        """
        user: JSONValue = None
        if self.user is not None:
            user = {
                "name": self.user.name,
                "uid": self.user.uid,
                "gid": self.user.gid,
                "home": self.user.home_dir,
            }
        return {
            "env": [list(pair) for pair in self.env],
            "entrypoint": list(self.entrypoint) if self.entrypoint is not None else None,
            "cmd": list(self.cmd) if self.cmd is not None else None,
            "working_dir": self.working_dir,
            "exposed_ports": list(self.exposed_ports),
            "labels": [list(pair) for pair in self.labels],
            "created": self.created,
            "user": user,
        }

    def effective_env(self) -> tuple[str, ...]:
        """``KEY=value`` strings, sorted by key: :data:`DEFAULT_ENV` under ``env``.

        A key set in ``env`` replaces the default of the same name (even with
        an empty value); defaults for other keys stay.
        """
        merged = dict(DEFAULT_ENV)
        merged.update(self.env)
        return tuple(f"{key}={value}" for key, value in sorted(merged.items()))

    def effective_cmd(self, has_shell: bool) -> tuple[str, ...] | None:
        """The command the image config carries.

        An explicit ``cmd`` always wins.  With an ``entrypoint`` and no
        ``cmd`` there is no default (``bash`` would become the entrypoint's
        argument).  Otherwise ``("bash",)`` when ``has_shell`` (the image
        has ``bin/bash``, as Nixery does for ``bashInteractive``), else None.
        """
        if self.cmd is not None:
            return self.cmd
        if self.entrypoint is not None or not has_shell:
            return None
        return ("bash",)

    @property
    def oci_user(self) -> str:
        """The config's ``User`` field: numeric ``uid:gid`` (no passwd lookup); "" for root."""
        return f"{self.user.uid}:{self.user.gid}" if self.user is not None else ""

    def runtime_config(self, *, has_shell: bool) -> dict[str, JSONValue]:
        """The ``config`` object of an OCI/Docker image config.

        ``Env`` is always present (:meth:`effective_env`); ``Cmd``,
        ``Entrypoint``, ``WorkingDir``, ``ExposedPorts``, ``Labels`` and
        ``User`` only when set.
        """
        out: dict[str, JSONValue] = {"Env": list(self.effective_env())}
        cmd = self.effective_cmd(has_shell)
        if self.entrypoint is not None:
            out["Entrypoint"] = list(self.entrypoint)
        if cmd is not None:
            out["Cmd"] = list(cmd)
        if self.working_dir:
            out["WorkingDir"] = self.working_dir
        if self.exposed_ports:
            out["ExposedPorts"] = {port: {} for port in self.exposed_ports}
        if self.labels:
            out["Labels"] = dict(self.labels)
        if self.user is not None:
            out["User"] = self.oci_user
        return out
