"""Package sources: the JSON the Nix side reads, pinning, and unambiguous cache keys."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from nixery_core.errors import InvalidSource
from nixery_core.names import AMD64, ARM64, Image
from nixery_core.sources import (
    GitSource,
    LocalPathSource,
    NixpkgsSource,
    SourceSpec,
    canonical_json,
    image_cache_key,
    source_from_env,
)

HEX40 = st.text("0123456789abcdef", min_size=40, max_size=40)
SPEC = SourceSpec({"type": "path", "path": "/p"}, "id", pinned=True)
names = st.text(min_size=1, max_size=8).filter(lambda t: "/" not in t and "\x00" not in t)


@given(st.lists(names, min_size=1, max_size=4), st.lists(names, min_size=1, max_size=4))
def test_cache_keys_never_collide_by_concatenation(a: list[str], b: list[str]) -> None:
    """Two package lists share a key exactly when they are the same set of names."""
    image_a = Image.from_packages(a, always_added=())
    image_b = Image.from_packages(b, always_added=())
    same = set(a) == set(b)
    assert (image_cache_key(image_a, SPEC) == image_cache_key(image_b, SPEC)) == same


def test_split_names_do_not_collide() -> None:
    """["ab", "c"] and ["a", "bc"] (same concatenation) have different keys."""
    one = Image.from_packages(["ab", "c"], always_added=())
    two = Image.from_packages(["a", "bc"], always_added=())
    assert image_cache_key(one, SPEC) != image_cache_key(two, SPEC)


@given(st.lists(names, min_size=1, max_size=4))
def test_cache_key_includes_the_architecture(packages: list[str]) -> None:
    """The same packages for amd64 and arm64 have different keys."""
    image = Image.from_packages(packages, arch=AMD64)
    assert image_cache_key(image, SPEC) != image_cache_key(image.with_arch(ARM64), SPEC)


def test_cache_key_includes_the_source_identity() -> None:
    """The same image from two sources has two keys."""
    image = Image.from_name("hello")
    other = SourceSpec({"type": "path", "path": "/p"}, "other-id", pinned=True)
    assert image_cache_key(image, SPEC) != image_cache_key(image, other)


@given(HEX40)
def test_nixpkgs_commit_is_pinned(commit: str) -> None:
    """A 40-hex nixpkgs revision is pinned, its URL names the commit, the tag is ignored."""
    spec = NixpkgsSource(commit).resolve("whatever")
    assert spec.pinned
    assert spec.cache_key == spec.identity
    assert spec.nix_args == {
        "type": "nixpkgs",
        "url": f"https://github.com/NixOS/nixpkgs/archive/{commit}.tar.gz",
    }
    assert spec == NixpkgsSource(commit).resolve("latest")


@pytest.mark.parametrize("channel", ["nixos-unstable", "nixos-24.05", "abc123", "a" * 39])
def test_nixpkgs_channels_move(channel: str) -> None:
    """Channel names and short revisions are moving targets: no cache key."""
    spec = NixpkgsSource(channel).resolve("latest")
    assert not spec.pinned
    assert spec.cache_key is None


@pytest.mark.parametrize("channel", ["", "../x", "a b", "x" * 200, "nixos;rm"])
def test_bad_channels_are_rejected(channel: str) -> None:
    """A channel that is not a channel name or commit raises InvalidSource."""
    with pytest.raises(InvalidSource):
        NixpkgsSource(channel)


@given(HEX40)
def test_git_commit_tags_are_pinned_revisions(commit: str) -> None:
    """A 40-hex tag selects `rev` (pinned); the key differs per commit."""
    spec = GitSource("https://example.org/pkgs.git").resolve(commit)
    assert spec.nix_args == {"type": "git", "url": "https://example.org/pkgs.git", "rev": commit}
    assert spec.cache_key is not None


@pytest.mark.parametrize("tag", ["main", "v1.0", "ABCDEF0123456789abcdef0123456789abcdef01"])
def test_git_branches_and_tags_move(tag: str) -> None:
    """Any other tag is a `ref` (branch or tag name): a moving target without a key."""
    spec = GitSource("https://example.org/pkgs.git").resolve(tag)
    assert spec.nix_args["ref"] == tag
    assert spec.cache_key is None


def test_git_latest_means_the_default_ref() -> None:
    """The tag `latest` selects the source's default ref."""
    spec = GitSource("https://example.org/pkgs.git", default_ref="trunk").resolve("latest")
    assert spec.nix_args["ref"] == "trunk"


def test_git_rev_and_ref_of_the_same_text_have_distinct_identities() -> None:
    """A commit and a branch spelled alike never share an identity."""
    commit = "a" * 40
    source = GitSource("https://example.org/pkgs.git", default_ref=commit)
    as_ref, as_rev = source.resolve("latest"), source.resolve(commit)
    assert as_ref.nix_args["ref"] == as_rev.nix_args["rev"] == commit
    assert as_ref.identity != as_rev.identity


@pytest.mark.parametrize("url", ["", "https://x\n", "a\x00b"])
def test_bad_git_urls_are_rejected(url: str) -> None:
    """Empty URLs and URLs with control characters raise InvalidSource."""
    with pytest.raises(InvalidSource):
        GitSource(url)


@pytest.fixture
def pkgs(tmp_path: Path) -> Path:
    root = tmp_path / "pkgs"
    (root / "sub").mkdir(parents=True)
    (root / "default.nix").write_text("{ system ? null, ... }: { }\n")
    (root / "sub" / "a.nix").write_text("1\n")
    return root


def test_local_path_key_is_stable(pkgs: Path) -> None:
    """Hashing the same directory twice (and via another spelling) gives one key."""
    first = LocalPathSource(pkgs).resolve("latest")
    second = LocalPathSource(pkgs / "sub" / "..").resolve("other-tag")
    assert first.pinned
    assert first.cache_key == second.cache_key
    assert first.nix_args == {"type": "path", "path": str(pkgs)}


@pytest.mark.parametrize(
    "change",
    ["edit", "add", "remove", "rename", "chmod", "symlink", "retarget"],
)
def test_local_path_key_changes_with_content(pkgs: Path, change: str) -> None:
    """Editing, adding, removing, renaming a file, its mode or a symlink target changes the key."""
    link = pkgs / "link"
    link.symlink_to("sub/a.nix")
    before = LocalPathSource(pkgs).resolve("latest").cache_key
    target = pkgs / "sub" / "a.nix"
    if change == "edit":
        target.write_text("2\n")
    elif change == "add":
        (pkgs / "sub" / "b.nix").write_text("")
    elif change == "remove":
        target.unlink()
    elif change == "rename":
        target.rename(pkgs / "sub" / "c.nix")
    elif change == "chmod":
        target.chmod(0o755)
    elif change == "symlink":
        (pkgs / "link2").symlink_to("default.nix")
    else:
        link.unlink()
        link.symlink_to("default.nix")
    assert LocalPathSource(pkgs).resolve("latest").cache_key != before


def test_local_path_key_ignores_git_metadata_and_mtimes(pkgs: Path) -> None:
    """.git contents and modification times do not change the key."""
    before = LocalPathSource(pkgs).resolve("latest").cache_key
    (pkgs / ".git").mkdir()
    (pkgs / ".git" / "HEAD").write_text("ref: refs/heads/main\n")
    os.utime(pkgs / "default.nix", (12345, 12345))
    assert LocalPathSource(pkgs).resolve("latest").cache_key == before


def test_local_path_without_hashing_moves(pkgs: Path) -> None:
    """hash_content=False makes the path a moving target."""
    assert LocalPathSource(pkgs, hash_content=False).resolve("latest").cache_key is None


def test_missing_local_path_is_rejected(tmp_path: Path) -> None:
    """A package set that does not exist raises InvalidSource."""
    with pytest.raises(InvalidSource):
        LocalPathSource(tmp_path / "absent")


def test_spec_json_is_canonical() -> None:
    """to_json is sorted, compact JSON the Nix side can parse back to the same mapping."""
    spec = SourceSpec({"url": "u", "type": "git", "rev": "r"}, "id", pinned=True)
    assert spec.to_json() == '{"rev":"r","type":"git","url":"u"}'
    assert json.loads(spec.to_json()) == spec.nix_args
    assert canonical_json({"b": [1, "é"], "a": None}) == '{"a":null,"b":[1,"é"]}'.encode()


def test_source_from_env_precedence(pkgs: Path) -> None:
    """NIXERY_PKGS_PATH beats NIXERY_PKGS_REPO beats NIXERY_CHANNEL; none is an error."""
    env = {"NIXERY_PKGS_PATH": str(pkgs), "NIXERY_PKGS_REPO": "https://r", "NIXERY_CHANNEL": "c"}
    assert source_from_env(env) == LocalPathSource(pkgs)
    del env["NIXERY_PKGS_PATH"]
    assert source_from_env(env) == GitSource("https://r")
    del env["NIXERY_PKGS_REPO"]
    assert source_from_env(env) == NixpkgsSource("c")
    with pytest.raises(InvalidSource):
        source_from_env({})
