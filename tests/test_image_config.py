"""ImageConfig and User: validation, normalisation, defaults and cache parameters."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta, timezone

import attrs
import pytest
from hypothesis import given
from hypothesis import strategies as st

from nixery_core.errors import InvalidImageConfig, InvalidInput
from nixery_core.image_config import (
    DEFAULT_ENV,
    EPOCH,
    ImageConfig,
    User,
    format_created,
)

user_names = st.from_regex(r"[a-z_][a-z0-9_-]{0,31}", fullmatch=True).filter(lambda n: n != "root")
ids = st.integers(min_value=1, max_value=2**31 - 1)
homes = st.lists(st.from_regex(r"[a-z][a-z0-9._-]{0,8}", fullmatch=True), min_size=1, max_size=3)


def _field_of(excinfo: pytest.ExceptionInfo[InvalidImageConfig]) -> str:
    return excinfo.value.field


# --- env and labels ----------------------------------------------------------


def test_env_mapping_and_pairs_give_the_same_sorted_value() -> None:
    """A mapping and (key, value) pairs in any order normalise to the same sorted pairs."""
    from_mapping = ImageConfig(env={"B": "2", "A": "1"})
    from_pairs = ImageConfig(env=[("A", "1"), ("B", "2")])
    assert from_mapping == from_pairs
    assert from_mapping.env == (("A", "1"), ("B", "2"))
    assert hash(from_mapping) == hash(from_pairs)


def test_evolve_keeps_a_valid_config() -> None:
    """Re-running the converters on already-normal values (attrs.evolve) is a no-op."""
    config = ImageConfig(
        env={"A": "x=y"},
        exposed_ports=["80", "53/udp"],
        labels={"k": "v"},
        created="2024-02-03T04:05:06+00:00",
        user=User("app", 1000, 1000, "/srv//app/"),
    )
    assert attrs.evolve(config) == config


@pytest.mark.parametrize("key", ["", "A=B", "A\x00"])
def test_bad_env_keys_are_refused(key: str) -> None:
    """Environment keys must be non-empty, without '=' and without NUL."""
    with pytest.raises(InvalidImageConfig) as excinfo:
        ImageConfig(env={key: "v"})
    assert _field_of(excinfo) == "env"


def test_env_values_may_hold_equals_but_not_nul() -> None:
    """Values may contain '=' (PATH-like values do) but never NUL."""
    assert ImageConfig(env={"A": "b=c"}).env == (("A", "b=c"),)
    with pytest.raises(InvalidImageConfig, match="NUL"):
        ImageConfig(env={"A": "b\x00"})


def test_duplicate_pair_keys_are_refused() -> None:
    """Two pairs with one key are ambiguous and refused rather than silently merged."""
    with pytest.raises(InvalidImageConfig) as excinfo:
        ImageConfig(env=[("A", "1"), ("A", "2")])
    assert _field_of(excinfo) == "env"


def test_label_keys_must_not_be_empty() -> None:
    """An empty label key is refused, naming the labels field."""
    with pytest.raises(InvalidImageConfig) as excinfo:
        ImageConfig(labels={"": "v"})
    assert _field_of(excinfo) == "labels"


def test_errors_are_invalid_input() -> None:
    """InvalidImageConfig belongs to the InvalidInput branch (and is a ValueError)."""
    with pytest.raises(InvalidInput):
        ImageConfig(env={"": "v"})
    with pytest.raises(ValueError, match="env"):
        ImageConfig(env={"": "v"})


# --- ports, paths, commands -------------------------------------------------


def test_ports_are_normalised_deduplicated_and_sorted_numerically() -> None:
    """80, '80' and '80/TCP' are one port; order is by number, then protocol."""
    config = ImageConfig(exposed_ports=["443", 80, "80/TCP", "53/udp", "53/tcp", "8080/sctp"])
    assert config.exposed_ports == ("53/tcp", "53/udp", "80/tcp", "443/tcp", "8080/sctp")


def test_a_single_port_string_is_one_port() -> None:
    """A bare string is one port, not a sequence of characters."""
    assert ImageConfig(exposed_ports="8080").exposed_ports == ("8080/tcp",)


@pytest.mark.parametrize("port", ["0", "65536", "80/icmp", "http", "80/", "-1", "", True])
def test_bad_ports_are_refused(port: object) -> None:
    """Ports outside 1..65535, unknown protocols and non-numbers are refused."""
    with pytest.raises(InvalidImageConfig) as excinfo:
        ImageConfig(exposed_ports=[port])  # type: ignore[list-item]
    assert _field_of(excinfo) == "exposed_ports"


@given(st.lists(st.tuples(st.integers(1, 65535), st.sampled_from(["", "/tcp", "/udp", "/SCTP"]))))
def test_normalised_ports_are_a_fixed_point(ports: list[tuple[int, str]]) -> None:
    """Normalising already-normal ports changes nothing, and every port has a protocol."""
    config = ImageConfig(exposed_ports=[f"{number}{proto}" for number, proto in ports])
    assert ImageConfig(exposed_ports=config.exposed_ports) == config
    assert all(port.split("/")[1] in {"tcp", "udp", "sctp"} for port in config.exposed_ports)


def test_working_dir_must_be_absolute() -> None:
    """A relative working directory is refused; empty means unset."""
    assert ImageConfig(working_dir="").working_dir == ""
    assert ImageConfig(working_dir="/srv").working_dir == "/srv"
    with pytest.raises(InvalidImageConfig) as excinfo:
        ImageConfig(working_dir="srv")
    assert _field_of(excinfo) == "working_dir"


def test_cmd_string_is_one_argument_and_none_means_unset() -> None:
    """A string command is a single argument; a sequence is kept in order."""
    assert ImageConfig(cmd="hello world").cmd == ("hello world",)
    assert ImageConfig(cmd=["b", "a"]).cmd == ("b", "a")
    assert ImageConfig().cmd is None
    with pytest.raises(InvalidImageConfig) as excinfo:
        ImageConfig(entrypoint=["sh", 3])  # type: ignore[list-item]
    assert _field_of(excinfo) == "entrypoint"


# --- created -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("given_value", "stored"),
    [
        (EPOCH, EPOCH),
        ("2024-02-29T23:59:59+00:00", "2024-02-29T23:59:59Z"),
        ("2024-01-01t00:00:00.25z", "2024-01-01T00:00:00.25Z"),
    ],
)
def test_created_is_normalised_to_z(given_value: str, stored: str) -> None:
    """UTC timestamps in either RFC 3339 spelling are stored with an upper-case Z."""
    assert ImageConfig(created=given_value).created == stored


@pytest.mark.parametrize(
    "bad",
    [
        "2024-13-01T00:00:00Z",
        "2023-02-29T00:00:00Z",
        "2024-01-01 00:00:00Z",
        "2024-01-01T00:00:00",
        "2024-01-01T00:00:00+01:00",
        "yesterday",
    ],
)
def test_bad_created_is_refused(bad: str) -> None:
    """Non-UTC, zone-less, impossible or non-RFC 3339 timestamps are refused."""
    with pytest.raises(InvalidImageConfig) as excinfo:
        ImageConfig(created=bad)
    assert _field_of(excinfo) == "created"


def test_format_created_converts_to_utc() -> None:
    """An aware datetime is rendered in UTC; microseconds only when present."""
    plus_two = timezone(timedelta(hours=2))
    assert format_created(datetime(2024, 5, 1, 14, 0, tzinfo=plus_two)) == "2024-05-01T12:00:00Z"
    moment = datetime(2024, 5, 1, 12, 0, 0, 5, tzinfo=UTC)
    assert format_created(moment) == "2024-05-01T12:00:00.000005Z"
    assert ImageConfig(created=format_created(moment)).created == "2024-05-01T12:00:00.000005Z"


def test_format_created_refuses_naive_datetimes() -> None:
    """A naive datetime is refused: the library never guesses a zone."""
    with pytest.raises(InvalidImageConfig):
        format_created(datetime(2024, 5, 1))


# --- users ---------------------------------------------------------------------


@pytest.mark.parametrize("name", ["", "App", "1app", "a" * 33, "root", "a:b", "a\nb", "a b", "é"])
def test_bad_user_names_are_refused(name: str) -> None:
    """User names follow [a-z_][a-z0-9_-]{0,31} and are not root."""
    with pytest.raises(InvalidImageConfig) as excinfo:
        User(name, 1000, 1000)
    assert _field_of(excinfo) == "user.name"


@pytest.mark.parametrize(
    ("uid", "gid", "field"),
    [
        (0, 0, "user.uid"),
        (-1, 1, "user.uid"),
        (2**31, 1, "user.uid"),
        (True, 1, "user.uid"),
        (1000, -1, "user.gid"),
        (1000, 2**31, "user.gid"),
    ],
)
def test_bad_ids_are_refused(uid: int, gid: int, field: str) -> None:
    """uid is 1..2**31-1 (0 is root), gid 0..2**31-1; booleans are not ids."""
    with pytest.raises(InvalidImageConfig) as excinfo:
        User("app", uid, gid)
    assert _field_of(excinfo) == field


def test_extreme_ids_are_accepted() -> None:
    """The edges of the id ranges are valid, and gid 0 (group root) is allowed."""
    assert User("app", 2**31 - 1, 0).gid == 0


@pytest.mark.parametrize(
    "home", ["home/app", "/", "//", "/home/../etc", "/home/./app", "/a:b", "/a\nb", "/nix/store/x"]
)
def test_bad_homes_are_refused(home: str) -> None:
    """Homes are absolute, not the root, not under /nix, without . / .. / ':' / newlines."""
    with pytest.raises(InvalidImageConfig) as excinfo:
        User("app", 1000, 1000, home)
    assert _field_of(excinfo) == "user.home"


def test_home_is_normalised_and_defaults_under_home() -> None:
    """Repeated and trailing slashes are collapsed; no home means /home/<name>."""
    assert User("app", 1000, 1000, "//srv//app/").home_dir == "/srv/app"
    assert User("app", 1000, 1000).home_dir == "/home/app"


def test_user_must_be_a_user() -> None:
    """Passing something other than a User (or None) is refused."""
    with pytest.raises(InvalidImageConfig) as excinfo:
        ImageConfig(user="app")  # type: ignore[arg-type]
    assert _field_of(excinfo) == "user"


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("app:1000", User("app", 1000, 1000)),
        ("app:1000:100", User("app", 1000, 100)),
        ("app:1000::/srv/app", User("app", 1000, 1000, "/srv/app")),
        ("app:1000:0:/srv/app", User("app", 1000, 0, "/srv/app")),
    ],
)
def test_user_spec_parses(spec: str, expected: User) -> None:
    """name:uid[:gid[:home]] parses; gid defaults to uid, home to /home/<name>."""
    assert User.from_spec(spec) == expected


@pytest.mark.parametrize(
    ("spec", "field"),
    [
        ("app", "user"),
        ("app:1:2:/h:x", "user"),
        ("app:x", "user.uid"),
        ("app:1:-2", "user.gid"),
        ("app:١٢", "user.uid"),
        ("App:1000", "user.name"),
    ],
)
def test_bad_user_specs_are_refused(spec: str, field: str) -> None:
    """Malformed specs name the part that is wrong."""
    with pytest.raises(InvalidImageConfig) as excinfo:
        User.from_spec(spec)
    assert _field_of(excinfo) == field


@given(user_names, ids, st.integers(0, 2**31 - 1), homes)
def test_user_spec_round_trips(name: str, uid: int, gid: int, home: list[str]) -> None:
    """A spec printed from a valid user parses back to the same user."""
    user = User(name, uid, gid, "/" + "/".join(home))
    assert User.from_spec(f"{user.name}:{user.uid}:{user.gid}:{user.home_dir}") == user


# --- parameters and defaults -------------------------------------------------


def test_parameters_are_json_and_independent_of_input_order() -> None:
    """Equal configs built from differently ordered input give identical JSON."""
    one = ImageConfig(env={"A": "1", "B": "2"}, exposed_ports=["80", "22"], labels={"x": "1"})
    two = ImageConfig(env={"B": "2", "A": "1"}, exposed_ports=["22/tcp", "80"], labels={"x": "1"})
    assert json.dumps(one.parameters(), sort_keys=True) == json.dumps(
        two.parameters(), sort_keys=True
    )
    assert set(one.parameters()) == {
        "env",
        "entrypoint",
        "cmd",
        "working_dir",
        "exposed_ports",
        "labels",
        "created",
        "user",
    }


def test_parameters_use_the_effective_home() -> None:
    """home=None and the explicit /home/<name> build the same image, so the same key."""
    implicit = ImageConfig(user=User("app", 1000, 1000))
    explicit = ImageConfig(user=User("app", 1000, 1000, "/home/app"))
    assert implicit.parameters() == explicit.parameters()
    assert implicit.parameters()["user"] == {
        "name": "app",
        "uid": 1000,
        "gid": 1000,
        "home": "/home/app",
    }


def test_parameters_change_with_each_field() -> None:
    """Every field that changes the image changes the parameters."""
    base = ImageConfig()
    variants = [
        ImageConfig(env={"A": "1"}),
        ImageConfig(entrypoint=["x"]),
        ImageConfig(cmd=["x"]),
        ImageConfig(cmd=[]),
        ImageConfig(working_dir="/srv"),
        ImageConfig(exposed_ports=["80"]),
        ImageConfig(labels={"a": "b"}),
        ImageConfig(created="2000-01-01T00:00:00Z"),
        ImageConfig(user=User("app", 1000, 1000)),
    ]
    rendered = {json.dumps(c.parameters(), sort_keys=True) for c in [base, *variants]}
    assert len(rendered) == len(variants) + 1


def test_effective_env_defaults_sit_under_the_configured_env() -> None:
    """Defaults appear unless the configured env sets the same key, which then wins."""
    assert ImageConfig().effective_env() == tuple(f"{k}={v}" for k, v in DEFAULT_ENV)
    env = ImageConfig(env={"PATH": "/opt/bin", "LANG": "C.UTF-8"}).effective_env()
    assert env == (
        "LANG=C.UTF-8",
        "PATH=/opt/bin",
        "SSL_CERT_FILE=/etc/ssl/certs/ca-bundle.crt",
    )
    assert "SSL_CERT_FILE=" in ImageConfig(env={"SSL_CERT_FILE": ""}).effective_env()


@pytest.mark.parametrize(
    ("config", "has_shell", "expected"),
    [
        (ImageConfig(), True, ("bash",)),
        (ImageConfig(), False, None),
        (ImageConfig(cmd=["hello"]), True, ("hello",)),
        (ImageConfig(cmd=[]), True, ()),
        (ImageConfig(entrypoint=["hello"]), True, None),
        (ImageConfig(entrypoint=["hello"], cmd=["--x"]), False, ("--x",)),
    ],
)
def test_effective_cmd(config: ImageConfig, has_shell: bool, expected: tuple[str, ...]) -> None:
    """An explicit cmd wins; an entrypoint suppresses the bash default; bash needs a shell."""
    assert config.effective_cmd(has_shell) == expected


def test_runtime_config_lists_only_what_is_set() -> None:
    """The OCI config object carries Env always and the other keys only when set."""
    assert ImageConfig().runtime_config(has_shell=False) == {
        "Env": list(ImageConfig().effective_env())
    }
    full = ImageConfig(
        entrypoint=["tini", "--"],
        cmd=["app"],
        working_dir="/srv",
        exposed_ports=["80"],
        labels={"a": "b"},
        user=User("app", 1000, 100),
    ).runtime_config(has_shell=True)
    assert full["Entrypoint"] == ["tini", "--"]
    assert full["Cmd"] == ["app"]
    assert full["WorkingDir"] == "/srv"
    assert full["ExposedPorts"] == {"80/tcp": {}}
    assert full["Labels"] == {"a": "b"}
    assert full["User"] == "1000:100"
    assert ImageConfig().oci_user == ""
