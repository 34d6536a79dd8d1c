"""The customisation layer: symlink forest, /tmp, /usr/bin/env, certificates, users."""

from __future__ import annotations

import json
import os
import subprocess
import tempfile
from pathlib import Path

import pytest
from conftest import OFFLINE_SET, require_root, require_tools
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nixery_core.customisation import (
    GENERATED,
    NOLOGIN,
    Collision,
    build_customisation,
    customisation_entries,
    entry_sort_key,
)
from nixery_core.entries import TarEntry
from nixery_core.errors import InvalidImageConfig, StorePathMissing, UnsafeStoreContent
from nixery_core.graph import RuntimeGraph, StorePath
from nixery_core.image_config import ImageConfig, User

STORE = "/nix/store"


def _out(letter: str, name: str) -> str:
    return f"{STORE}/{letter * 32}-{name}"


# name -> (store path, files); a file's content is b"<name>:<path>".  The hash letters
# deliberately sort against the names (alpha has "z", beta has "a").
PACKAGES: dict[str, tuple[str, tuple[str, ...]]] = {
    "hello": (_out("h", "hello-2.12"), ("bin/hello",)),
    "coreutils": (_out("c", "coreutils-9.3"), ("bin/env", "bin/ls")),
    "cacert": (_out("k", "nss-cacert-3.92"), ("etc/ssl/certs/ca-bundle.crt",)),
    "iana-etc": (_out("i", "iana-etc-20230316"), ("etc/protocols", "etc/services")),
    "alpha": (_out("z", "alpha-1"), ("bin/same", "bin/alpha-only")),
    "beta": (_out("a", "beta-1"), ("bin/same", "bin/beta-only")),
    "docs": (_out("d", "docs-1"), ("share/doc/docs/README",)),
    "bash": (_out("b", "bash-5.2"), ("bin/bash",)),
    "escape": (_out("e", "escape-1"), ()),
    "libpkg": (_out("l", "libpkg-1"), ("lib/libfoo.so",)),
    "empty": (_out("m", "empty-1"), ()),
    "single": (_out("s", "single-file"), ()),
}


@pytest.fixture
def store(tmp_path: Path) -> Path:
    """A fake store under tmp_path: see PACKAGES, plus symlinks, an empty and a file output."""
    root = tmp_path / "root"
    for name, (out, files) in PACKAGES.items():
        base = root / out.lstrip("/")
        if name == "single":
            base.parent.mkdir(parents=True, exist_ok=True)
            base.write_bytes(b"just a file")
            continue
        base.mkdir(parents=True)
        for rel in files:
            (base / rel).parent.mkdir(parents=True, exist_ok=True)
            (base / rel).write_bytes(f"{name}:{rel}".encode())
    bash = root / PACKAGES["bash"][0].lstrip("/")
    (bash / "bin" / "sh").symlink_to("bash")
    outside = tmp_path / "outside"
    (outside / "secret").mkdir(parents=True)
    (outside / "secret" / "key").write_bytes(b"do not list me")
    escape = root / PACKAGES["escape"][0].lstrip("/")
    (escape / "bin").mkdir()
    (escape / "bin" / "escape").symlink_to("/etc/shadow")
    (escape / "lib").symlink_to(outside / "secret")
    return root


def graph_of(*names: str, extra: dict[str, tuple[str, ...]] | None = None) -> RuntimeGraph:
    """A graph requesting ``names`` from PACKAGES (plus ``extra`` name -> outputs)."""
    requested: dict[str, tuple[str, ...]] = {name: (PACKAGES[name][0],) for name in names}
    requested.update(extra or {})
    paths = {out for outs in requested.values() for out in outs}
    return RuntimeGraph.build([StorePath(p, 100) for p in sorted(paths)], requested)


def by_path(entries: list[TarEntry] | tuple[TarEntry, ...]) -> dict[str, TarEntry]:
    return {entry.path: entry for entry in entries}


def resolve(
    entries: list[TarEntry] | tuple[TarEntry, ...], path: str, store_root: Path
) -> Path | TarEntry | None:
    """Follow an image path as a container would: a store file on disk, a layer entry, or None."""
    index = by_path(entries)
    parts = path.split("/")
    for depth in range(1, len(parts) + 1):
        entry = index.get("/".join(parts[:depth]))
        if entry is None:
            return None
        if entry.kind == "symlink":
            assert entry.target.startswith(f"{STORE}/"), entry
            disk = (store_root / entry.target.lstrip("/")).joinpath(*parts[depth:])
            return disk if os.path.lexists(disk) else None
        if entry.kind != "dir":
            return entry if depth == len(parts) else None
    return index[path]


def content(entries: list[TarEntry], path: str, store_root: Path) -> bytes:
    found = resolve(entries, path, store_root)
    assert isinstance(found, Path), (path, found)
    return found.read_bytes()


# --- the forest --------------------------------------------------------------


def test_forest_links_binaries_to_their_store_location(store: Path) -> None:
    """bin/hello resolves to hello's file, through a link naming its /nix/store location."""
    entries = customisation_entries(graph_of("hello"), config=ImageConfig(), store_root=store)
    hello_out = PACKAGES["hello"][0]
    assert by_path(entries)["bin"] == TarEntry("bin", "symlink", 0o777, target=f"{hello_out}/bin")
    assert content(entries, "bin/hello", store) == b"hello:bin/hello"


def test_a_directory_with_one_provider_is_linked_whole(store: Path) -> None:
    """share, provided only by docs, is one link; nothing below it is listed."""
    entries = customisation_entries(
        graph_of("docs", "hello"), config=ImageConfig(), store_root=store
    )
    index = by_path(entries)
    assert index["share"].kind == "symlink"
    assert index["share"].target == f"{PACKAGES['docs'][0]}/share"
    assert not [path for path in index if path.startswith("share/")]
    assert content(entries, "share/doc/docs/README", store) == b"docs:share/doc/docs/README"


def test_a_shared_directory_becomes_a_real_directory(store: Path) -> None:
    """Two packages with bin/ give a real bin directory with one link per file."""
    entries = customisation_entries(
        graph_of("hello", "coreutils"), config=ImageConfig(), store_root=store
    )
    index = by_path(entries)
    assert index["bin"] == TarEntry("bin", "dir", 0o755)
    assert {p for p in index if p.startswith("bin/")} == {"bin/hello", "bin/env", "bin/ls"}
    assert content(entries, "bin/ls", store) == b"coreutils:bin/ls"
    assert content(entries, "bin/hello", store) == b"hello:bin/hello"


@pytest.mark.parametrize("hash_order", ["alpha-hash-last", "alpha-hash-first"])
def test_conflicts_go_to_the_name_that_sorts_first(
    store: Path, tmp_path: Path, hash_order: str
) -> None:
    """bin/same comes from alpha whatever the store hashes are; beta's is reported dropped."""
    alpha_out, beta_out = PACKAGES["alpha"][0], PACKAGES["beta"][0]
    if hash_order == "alpha-hash-first":
        # Swap the hashes so that alpha's store path sorts first too.
        swapped_alpha, swapped_beta = _out("a", "alpha-1"), _out("z", "beta-1")
        (store / alpha_out.lstrip("/")).rename(tmp_path / "tmp-alpha")
        (store / beta_out.lstrip("/")).rename(store / swapped_beta.lstrip("/"))
        (tmp_path / "tmp-alpha").rename(store / swapped_alpha.lstrip("/"))
        alpha_out, beta_out = swapped_alpha, swapped_beta
    assert (alpha_out < beta_out) == (hash_order == "alpha-hash-first")
    graph = RuntimeGraph.build(
        [StorePath(alpha_out, 1), StorePath(beta_out, 1)],
        {"beta": [beta_out], "alpha": [alpha_out]},
    )
    result = build_customisation(graph, config=ImageConfig(), store_root=store)
    entries = list(result.entries)
    assert content(entries, "bin/same", store) == b"alpha:bin/same"
    assert content(entries, "bin/beta-only", store) == b"beta:bin/beta-only"
    assert result.collisions == (
        Collision("bin/same", f"{alpha_out}/bin/same", f"{beta_out}/bin/same"),
    )


def test_a_file_beats_a_later_directory_at_the_same_path(tmp_path: Path) -> None:
    """A file never merges: the first package's file wins over a later package's directory."""
    a_out, b_out = _out("q", "a-1"), _out("p", "b-1")
    (tmp_path / a_out.lstrip("/")).mkdir(parents=True)
    (tmp_path / a_out.lstrip("/") / "lib").write_bytes(b"a file")
    (tmp_path / b_out.lstrip("/") / "lib").mkdir(parents=True)
    (tmp_path / b_out.lstrip("/") / "lib" / "x.so").write_bytes(b"x")
    graph = RuntimeGraph.build(
        [StorePath(a_out, 1), StorePath(b_out, 1)], {"a": [a_out], "b": [b_out]}
    )
    result = build_customisation(graph, config=ImageConfig(), store_root=tmp_path)
    assert by_path(result.entries)["lib"].target == f"{a_out}/lib"
    assert resolve(result.entries, "lib/x.so", tmp_path) is None
    assert result.collisions == (Collision("lib", f"{a_out}/lib", f"{b_out}/lib"),)


def test_symlinks_in_packages_are_linked_not_followed(store: Path, tmp_path: Path) -> None:
    """A package's symlink (even one leaving the store) is a leaf pointing at its store location."""
    result = build_customisation(
        graph_of("escape", "libpkg", "hello"), config=ImageConfig(), store_root=store
    )
    index = by_path(result.entries)
    escape_out = PACKAGES["escape"][0]
    assert index["bin/escape"].target == f"{escape_out}/bin/escape"
    # escape's lib is a symlink, libpkg's a directory: no merge, escape sorts first and wins.
    assert index["lib"].target == f"{escape_out}/lib"
    libpkg_lib = f"{PACKAGES['libpkg'][0]}/lib"
    assert Collision("lib", f"{escape_out}/lib", libpkg_lib) in result.collisions
    assert not [p for p in index if p.startswith("lib/") or "key" in p.split("/")]
    assert all(e.target.startswith(f"{STORE}/") for e in result.entries if e.kind == "symlink")


def test_empty_and_file_outputs_add_nothing(store: Path) -> None:
    """An empty output contributes no entry; a single-file output is skipped and reported."""
    plain = build_customisation(graph_of("hello"), config=ImageConfig(), store_root=store)
    more = build_customisation(
        graph_of("hello", "empty", "single"), config=ImageConfig(), store_root=store
    )
    assert more.entries == plain.entries
    assert more.skipped_outputs == (PACKAGES["single"][0],)
    assert plain.skipped_outputs == ()


def test_a_missing_output_raises(store: Path) -> None:
    """A requested output that is not on disk raises StorePathMissing naming it."""
    ghost = _out("g", "ghost-1")
    graph = RuntimeGraph.build([StorePath(ghost, 1)], {"ghost": [ghost]})
    with pytest.raises(StorePathMissing) as excinfo:
        customisation_entries(graph, config=ImageConfig(), store_root=store)
    assert excinfo.value.path == ghost


@pytest.mark.parametrize("bad", ["nix/store/x-a", "/nix/store/../x-a", "/nix//store/x-a"])
def test_unnormalised_output_paths_are_refused(store: Path, bad: str) -> None:
    """An output path that could name something outside the store tree is refused."""
    graph = RuntimeGraph({bad: StorePath(bad, 1)}, {"a": (bad,)})
    with pytest.raises(UnsafeStoreContent):
        customisation_entries(graph, config=ImageConfig(), store_root=store)


def test_an_output_named_twice_is_walked_once(store: Path) -> None:
    """Two names for one output (an alias) produce no self-collisions."""
    hello_out = PACKAGES["hello"][0]
    graph = graph_of("hello", extra={"hello-alias": (hello_out,)})
    result = build_customisation(graph, config=ImageConfig(), store_root=store)
    assert result.collisions == ()


# --- generated entries ------------------------------------------------------------


def test_tmp_is_world_writable_and_sticky(store: Path) -> None:
    """tmp is a real directory with mode 1777 owned by root."""
    entries = customisation_entries(graph_of("hello"), config=ImageConfig(), store_root=store)
    assert by_path(entries)["tmp"] == TarEntry("tmp", "dir", 0o1777)
    assert by_path(entries)["root"] == TarEntry("root", "dir", 0o700)


@pytest.mark.parametrize("with_coreutils", [True, False])
def test_usr_bin_env_exists_exactly_with_coreutils(store: Path, with_coreutils: bool) -> None:
    """usr/bin/env links straight to coreutils' bin/env, and only when coreutils is there."""
    names = ("hello", "bash", "coreutils") if with_coreutils else ("hello", "bash")
    entries = customisation_entries(graph_of(*names), config=ImageConfig(), store_root=store)
    env = by_path(entries).get("usr/bin/env")
    if with_coreutils:
        assert env == TarEntry(
            "usr/bin/env", "symlink", 0o777, target=f"{PACKAGES['coreutils'][0]}/bin/env"
        )
        assert content(entries, "usr/bin/env", store) == b"coreutils:bin/env"
    else:
        assert env is None
    assert by_path(entries)["usr/bin"].kind == "dir"


@pytest.mark.parametrize("names", [("cacert",), ("cacert", "iana-etc"), ("iana-etc",)])
def test_ssl_cert_bundle_resolves_next_to_passwd(store: Path, names: tuple[str, ...]) -> None:
    """etc is a real directory; cacert's bundle resolves whenever cacert is requested."""
    entries = customisation_entries(graph_of(*names), config=ImageConfig(), store_root=store)
    index = by_path(entries)
    assert index["etc"] == TarEntry("etc", "dir", 0o755)
    assert index["etc/passwd"].kind == "file"
    bundle = resolve(entries, "etc/ssl/certs/ca-bundle.crt", store)
    if "cacert" in names:
        assert isinstance(bundle, Path)
        assert bundle.read_bytes() == b"cacert:etc/ssl/certs/ca-bundle.crt"
    else:
        assert bundle is None
    if "iana-etc" in names:
        assert content(entries, "etc/services", store) == b"iana-etc:etc/services"


def test_root_only_passwd_and_group(store: Path) -> None:
    """Without a user: root alone, with /bin/sh as shell when bash provides it."""
    entries = customisation_entries(
        graph_of("bash", "hello"), config=ImageConfig(), store_root=store
    )
    index = by_path(entries)
    assert index["etc/passwd"] == TarEntry(
        "etc/passwd", "file", 0o644, data=b"root:x:0:0:root:/root:/bin/sh\n"
    )
    assert index["etc/group"] == TarEntry("etc/group", "file", 0o644, data=b"root:x:0:\n")
    assert index["etc/nsswitch.conf"].data == b"passwd: files\ngroup: files\nhosts: files dns\n"
    assert not [p for p in index if p == "home" or p.startswith("home/")]


def test_login_shell_falls_back_to_nologin(store: Path) -> None:
    """An image without bin/sh or bin/bash gets /sbin/nologin as the login shell."""
    result = build_customisation(graph_of("hello"), config=ImageConfig(), store_root=store)
    assert result.login_shell == NOLOGIN
    assert by_path(result.entries)["etc/passwd"].data == b"root:x:0:0:root:/root:/sbin/nologin\n"


def test_user_gets_passwd_group_and_an_owned_home(store: Path) -> None:
    """A configured user (uid 1000) has exact passwd/group lines and a home it owns."""
    config = ImageConfig(user=User("app", 1000, 1000))
    entries = customisation_entries(graph_of("bash", "hello"), config=config, store_root=store)
    index = by_path(entries)
    assert index["etc/passwd"].data == (
        b"root:x:0:0:root:/root:/bin/sh\napp:x:1000:1000:app:/home/app:/bin/sh\n"
    )
    assert index["etc/group"].data == b"root:x:0:\napp:x:1000:\n"
    assert index["home"] == TarEntry("home", "dir", 0o755)
    assert index["home/app"] == TarEntry("home/app", "dir", 0o755, uid=1000, gid=1000)
    owned = [e.path for e in entries if (e.uid, e.gid) != (0, 0)]
    assert owned == ["home/app"]


def test_user_in_group_root_adds_no_group(store: Path) -> None:
    """gid 0 makes root the user's primary group; group lists only root."""
    config = ImageConfig(user=User("app", 1001, 0, "/srv/app"))
    entries = customisation_entries(graph_of("hello"), config=config, store_root=store)
    index = by_path(entries)
    assert index["etc/group"].data == b"root:x:0:\n"
    assert index["etc/passwd"].data.splitlines()[1] == b"app:x:1001:0:app:/srv/app:/sbin/nologin"
    assert index["srv"] == TarEntry("srv", "dir", 0o755)
    assert index["srv/app"] == TarEntry("srv/app", "dir", 0o755, uid=1001, gid=0)


def test_home_under_a_linked_directory_unfolds_it(store: Path) -> None:
    """A home inside a directory linked whole (share) turns that link into a real directory."""
    config = ImageConfig(user=User("app", 1000, 1000, "/share/app"))
    entries = customisation_entries(graph_of("docs"), config=config, store_root=store)
    index = by_path(entries)
    assert index["share"].kind == "dir"
    assert index["share/app"].uid == 1000
    assert content(entries, "share/doc/docs/README", store) == b"docs:share/doc/docs/README"


@pytest.mark.parametrize(
    "home", ["/etc", "/usr/bin", "/tmp/app", "/root", "/etc/passwd/x", "/bin/hello/x", "/share"]
)
def test_homes_the_image_cannot_hold_are_refused(store: Path, home: str) -> None:
    """A home on a generated path, under a file, or on a forest entry names user.home."""
    config = ImageConfig(user=User("app", 1000, 1000, home))
    with pytest.raises(InvalidImageConfig) as excinfo:
        customisation_entries(graph_of("hello", "docs"), config=config, store_root=store)
    assert excinfo.value.field == "user.home"


def test_generated_files_override_a_package_that_ships_them(tmp_path: Path) -> None:
    """A package's etc/passwd and tmp lose to the generated ones, reported as collisions."""
    out = _out("f", "fakepasswd-1")
    base = tmp_path / out.lstrip("/")
    (base / "etc").mkdir(parents=True)
    (base / "etc" / "passwd").write_bytes(b"evil::0:0::/:/bin/sh\n")
    (base / "tmp").mkdir()
    (base / "tmp" / "junk").write_bytes(b"")
    graph = RuntimeGraph.build([StorePath(out, 1)], {"fakepasswd": [out]})
    result = build_customisation(graph, config=ImageConfig(), store_root=tmp_path)
    index = by_path(result.entries)
    assert index["etc/passwd"].data.startswith(b"root:")
    assert index["tmp"].mode == 0o1777
    assert "tmp/junk" not in index
    assert Collision("etc/passwd", GENERATED, f"{out}/etc/passwd") in result.collisions
    assert Collision("tmp", GENERATED, f"{out}/tmp") in result.collisions


def test_commands_list_the_image_bin(store: Path) -> None:
    """commands names what bin/ holds, so a builder can tell whether bash is there."""
    result = build_customisation(graph_of("bash", "hello"), config=ImageConfig(), store_root=store)
    assert result.commands == ("bash", "hello", "sh")
    only_hello = build_customisation(graph_of("hello"), config=ImageConfig(), store_root=store)
    assert only_hello.commands == ("hello",)


# --- shape and determinism --------------------------------------------------------


def _check_shape(entries: list[TarEntry] | tuple[TarEntry, ...]) -> None:
    paths = [entry.path for entry in entries]
    assert len(paths) == len(set(paths)), "duplicate entries"
    assert list(entries) == sorted(entries, key=entry_sort_key)
    index = by_path(entries)
    for position, path in enumerate(paths):
        if "/" in path:
            parent = path.rsplit("/", 1)[0]
            assert index[parent].kind == "dir", path
            assert paths.index(parent) < position, path


def test_entries_are_sorted_unique_with_parents_first(store: Path) -> None:
    """Every parent is an explicit directory entry before its children; no path twice."""
    names = tuple(PACKAGES)
    config = ImageConfig(user=User("app", 1000, 1000, "/home/users/app"))
    entries = customisation_entries(graph_of(*names), config=config, store_root=store)
    _check_shape(entries)
    assert by_path(entries)["home/users"] == TarEntry("home/users", "dir", 0o755)


def test_same_input_gives_the_same_entries_in_any_request_order(store: Path) -> None:
    """Building twice, and from a shuffled requested mapping, gives equal results."""
    names = [n for n in PACKAGES if n != "single"]
    config = ImageConfig(user=User("app", 1000, 1000))
    first = build_customisation(graph_of(*names), config=config, store_root=store)
    assert build_customisation(graph_of(*names), config=config, store_root=store) == first
    shuffled = names[5:][::-1] + names[:5]
    assert shuffled != names
    requested = {name: (PACKAGES[name][0],) for name in shuffled}
    unsorted = RuntimeGraph(
        {PACKAGES[n][0]: StorePath(PACKAGES[n][0], 1) for n in shuffled}, requested
    )
    assert build_customisation(unsorted, config=config, store_root=store) == first


# --- property: random package trees -------------------------------------------------

_TOP = ("bin", "etc", "share", "lib")
_BELOW = ("a", "b", "c")

file_paths = st.lists(
    st.tuples(st.sampled_from(_TOP), st.lists(st.sampled_from(_BELOW), min_size=1, max_size=3)),
    min_size=1,
    max_size=12,
).map(lambda items: sorted({"/".join((top, *rest)) for top, rest in items}))


def _prefix_free(paths: list[str]) -> list[str]:
    """Drop paths that are a directory of another path (no file/directory conflicts)."""
    return [p for p in paths if not any(q.startswith(p + "/") for q in paths)]


@st.composite
def package_sets(draw: st.DrawFn) -> list[tuple[str, str, list[str]]]:
    """2-5 packages (name, hash letter, files) drawing files from one prefix-free universe."""
    universe = _prefix_free(draw(file_paths))
    count = draw(st.integers(2, 5))
    names = draw(st.lists(st.sampled_from("pqrstuvw"), min_size=count, max_size=count, unique=True))
    letters = draw(st.permutations("abcdefgh"))
    return [
        (f"pkg-{name}", letters[i], draw(st.lists(st.sampled_from(universe), unique=True)))
        for i, name in enumerate(names)
    ]


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(package_sets())
def test_every_file_is_reachable_once_from_the_first_provider(
    packages: list[tuple[str, str, list[str]]],
) -> None:
    """Each file resolves to the first provider's copy; later copies are reported; no escape."""
    with tempfile.TemporaryDirectory() as tmp:
        store_root = Path(tmp)
        requested: dict[str, list[str]] = {}
        for name, letter, files in packages:
            out = _out(letter, name)
            requested[name] = [out]
            (store_root / out.lstrip("/")).mkdir(parents=True)
            for rel in files:
                disk = store_root / out.lstrip("/") / rel
                disk.parent.mkdir(parents=True, exist_ok=True)
                disk.write_bytes(f"{name}:{rel}".encode())
        graph = RuntimeGraph.build(
            [StorePath(outs[0], 1) for outs in requested.values()], requested
        )
        result = build_customisation(graph, config=ImageConfig(), store_root=store_root)
        _check_shape(result.entries)

        providers: dict[str, list[str]] = {}
        for name, _, files in sorted(packages):
            for rel in files:
                providers.setdefault(rel, []).append(name)
        for rel, names in providers.items():
            found = resolve(result.entries, rel, store_root)
            assert isinstance(found, Path), rel
            assert found.read_bytes() == f"{names[0]}:{rel}".encode()
        dropped = {
            (rel, f"{requested[name][0]}/{rel}")
            for rel, names in providers.items()
            for name in names[1:]
        }
        assert {(c.path, c.dropped) for c in result.collisions} == dropped
        roots = tuple(f"{outs[0]}/" for outs in requested.values())
        for entry in result.entries:
            assert not entry.path.startswith("/")
            assert ".." not in entry.path.split("/")
            if entry.kind == "symlink":
                assert entry.target.startswith(roots)


# --- real: the offline Nix set in a runc container ------------------------------------


def _materialise(entries: list[TarEntry], root: Path) -> None:
    """Write entries to a directory as an image unpacker would (modes and owners included)."""
    for entry in entries:
        path = root / entry.path
        if entry.kind == "dir":
            path.mkdir()
            path.chmod(entry.mode)
        elif entry.kind == "file":
            path.write_bytes(entry.data)
            path.chmod(entry.mode)
        else:
            assert entry.kind == "symlink", entry
            path.symlink_to(entry.target)
        os.lchown(path, entry.uid, entry.gid)


@pytest.mark.nix
@pytest.mark.tools
@pytest.mark.usefixtures("nix")
def test_forest_runs_in_a_real_container(tmp_path: Path) -> None:
    """In runc, as uid 1000: /usr/bin/env, bin/hello, the CA bundle, /tmp and the home work."""
    require_tools("runc")
    require_root("runc with a uid-1000 process and a chowned rootfs")
    names = ["bashInteractive", "cacert", "coreutils", "hello", "iana-etc"]
    argv = ["nix-build", str(OFFLINE_SET), "--no-out-link"]
    built = subprocess.run(
        [*argv, *(arg for name in names for arg in ("-A", name))],
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    )
    outs = dict(zip(names, built.stdout.split(), strict=True))
    graph = RuntimeGraph.build(
        [StorePath(out, 1) for out in outs.values()], {n: [o] for n, o in outs.items()}
    )
    entries = customisation_entries(graph, config=ImageConfig(user=User("app", 1000, 1000)))
    bundle = tmp_path / "bundle"
    (bundle / "rootfs").mkdir(parents=True)
    _materialise(entries, bundle / "rootfs")
    subprocess.run(["runc", "spec"], cwd=bundle, check=True, timeout=30)
    spec = json.loads((bundle / "config.json").read_text())
    script = (
        "hello; id; stat -c '%U %a' /home/app /tmp /root; "
        "head -c 200 /etc/ssl/certs/ca-bundle.crt > /home/app/cert && echo home-writable; "
        "touch /tmp/x && echo tmp-writable; grep -c . /etc/services"
    )
    spec["process"].update(
        terminal=False,
        user={"uid": 1000, "gid": 1000},
        cwd="/home/app",
        env=list(ImageConfig().effective_env()),
        args=["/usr/bin/env", "sh", "-c", script],
    )
    spec["root"]["readonly"] = False
    spec["mounts"].append(
        {
            "destination": "/nix/store",
            "type": "bind",
            "source": "/nix/store",
            "options": ["rbind", "ro"],
        }
    )
    (bundle / "config.json").write_text(json.dumps(spec))
    ran = subprocess.run(
        ["runc", "--root", str(tmp_path / "state"), "run", f"nixery-custom-{os.getpid()}"],
        check=False,
        cwd=bundle,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert ran.returncode == 0, ran.stderr
    services = Path(outs["iana-etc"], "etc", "services").read_text()
    assert ran.stdout.splitlines() == [
        "Hello, world!",
        "uid=1000(app) gid=1000(app)",
        "app 755",
        "root 1777",
        "root 700",
        "home-writable",
        "tmp-writable",
        str(sum(1 for line in services.splitlines() if line)),
    ]
    bundle_head = Path(outs["cacert"], "etc", "ssl", "certs", "ca-bundle.crt").read_bytes()[:200]
    assert (bundle / "rootfs" / "home" / "app" / "cert").read_bytes() == bundle_head
