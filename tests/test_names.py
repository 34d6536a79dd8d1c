"""Image names: the registry grammar, canonical names, meta-packages, order and duplicates."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import attrs
import pytest
from hypothesis import given
from hypothesis import strategies as st

import nixery_core
from nixery_core.errors import InvalidImageName, InvalidInput
from nixery_core.names import (
    AMD64,
    ARM64,
    DEFAULT_ALWAYS_ADDED,
    SHELL_PACKAGES,
    Architecture,
    Image,
    is_name_component,
    is_tag,
)
from nixery_core.sources import SourceSpec, image_cache_key

COMPONENT = r"[a-z0-9]+(?:(?:\.|_|__|-+)[a-z0-9]+)*"
META = ("shell", "arm64")
SPEC = SourceSpec({"type": "path", "path": "/pkgs"}, "identity", pinned=True)

ALNUM = "abcdefghijklmnopqrstuvwxyz0123456789"


@st.composite
def components(draw: st.DrawFn) -> str:
    """A path component: [a-z0-9] runs joined by '.', '_', '__' or runs of '-'."""
    runs = draw(st.lists(st.text(ALNUM, min_size=1, max_size=5), min_size=1, max_size=3))
    seps = draw(st.lists(st.sampled_from([".", "_", "__", "-", "--", "---"]),
                         min_size=len(runs) - 1, max_size=len(runs) - 1))
    component = runs[0] + "".join(sep + run for sep, run in zip(seps, runs[1:], strict=True))
    assert re.fullmatch(COMPONENT, component)
    return component if component not in META else component + "0"


package_lists = st.lists(components(), min_size=1, max_size=6)
metas = st.lists(st.sampled_from(META), max_size=3)
TAG_FIRST = ALNUM + "ABCDEFGHIJKLMNOPQRSTUVWXYZ_"
tags = st.builds(
    lambda first, rest: first + rest,
    st.sampled_from(TAG_FIRST),
    st.text(TAG_FIRST + ".-", max_size=30),
)
# Characters a component can never hold: upper case, and anything but [a-z0-9._-].
# (':' and '/' are separators, tested by name below.)
bad_chars = st.sampled_from([*"ABZ@ $\\'\"{}!~+", "\x00", "\n", "é"])


def _same_image(a: Image, b: Image) -> None:
    assert (a.packages, a.arch, a.requested, a.meta) == (b.packages, b.arch, b.requested, b.meta)


@given(metas, package_lists, tags)
def test_valid_names_round_trip_through_the_canonical_name(
    meta: list[str], packages: list[str], tag: str
) -> None:
    """Parsing a name's canonical form gives the same image, and canonical names are fixpoints."""
    image = Image.from_name("/".join([*meta, *packages]), tag)
    again = Image.from_name(image.canonical_name, tag)
    _same_image(image, again)
    assert again.canonical_name == image.canonical_name
    assert Image.from_name(image.reference).tag == tag


@given(st.data())
def test_order_does_not_matter(data: st.DataObject) -> None:
    """`a/b` and `b/a` are the same packages, canonical name and cache key."""
    packages = data.draw(package_lists)
    shuffled = data.draw(st.permutations(packages))
    a, b = Image.from_name("/".join(packages)), Image.from_name("/".join(shuffled))
    _same_image(a, b)
    assert a.canonical_name == b.canonical_name
    assert image_cache_key(a, SPEC) == image_cache_key(b, SPEC)


@given(package_lists)
def test_duplicates_collapse(packages: list[str]) -> None:
    """Repeating a package changes nothing: packages and requested are sorted and unique."""
    doubled = Image.from_name("/".join(packages + packages[::-1]))
    assert doubled.requested == tuple(sorted(set(packages)))
    assert len(doubled.packages) == len(set(doubled.packages))
    assert list(doubled.packages) == sorted(doubled.packages)
    _same_image(doubled, Image.from_name("/".join(packages)))


@given(package_lists)
def test_always_added_packages_are_there(packages: list[str]) -> None:
    """cacert and iana-etc are in every image from a name, but not in its canonical name."""
    image = Image.from_name("/".join(packages))
    assert set(DEFAULT_ALWAYS_ADDED) <= set(image.packages)
    assert image.packages == tuple(sorted({*packages, *DEFAULT_ALWAYS_ADDED}))
    assert image.canonical_name.split("/") == sorted(set(packages))


@given(package_lists)
def test_meta_packages_count_only_at_the_front(packages: list[str]) -> None:
    """`shell`/`arm64` first expand and switch arch; after a package they are plain names."""
    front = Image.from_name("/".join(["arm64", "shell", *packages]))
    assert front.arch == ARM64
    assert set(SHELL_PACKAGES) <= set(front.packages)
    assert "shell" not in front.packages
    assert "arm64" not in front.packages
    assert front.meta == ("arm64", "shell")

    behind = Image.from_name("/".join([packages[0], "shell", "arm64", *packages[1:]]))
    assert behind.arch == AMD64
    assert {"shell", "arm64"} <= set(behind.packages)
    assert behind.meta == ()
    if not set(SHELL_PACKAGES) & set(packages):
        assert not set(SHELL_PACKAGES) & set(behind.packages)


def test_meta_order_and_repeats_do_not_matter() -> None:
    """`shell/arm64/x`, `arm64/shell/x` and `arm64/arm64/shell/x` are one image."""
    images = [Image.from_name(n) for n in ("shell/arm64/x", "arm64/shell/x", "arm64/arm64/shell/x")]
    for image in images[1:]:
        _same_image(images[0], image)
        assert image.canonical_name == "arm64/shell/x"


@given(metas, package_lists, st.integers(min_value=0, max_value=6), bad_chars)
def test_invalid_components_are_named(
    meta: list[str], packages: list[str], where: int, bad: str
) -> None:
    """A component with a forbidden character raises InvalidImageName naming that component."""
    parts = [*meta, *packages]
    index = where % len(parts)
    broken = parts[index][: len(parts[index]) // 2] + bad + parts[index][len(parts[index]) // 2:]
    parts[index] = broken
    with pytest.raises(InvalidImageName) as caught:
        Image.from_name("/".join(parts), "latest")
    assert caught.value.part == broken


@pytest.mark.parametrize(
    ("name", "part"),
    [
        ("", ""),
        ("hello//git", ""),
        ("/hello", ""),
        ("hello/", ""),
        ("Hello", "Hello"),
        ("-hello", "-hello"),
        ("hello-", "hello-"),
        ("a...b", "a...b"),
        ("a___b", "a___b"),
        ("../etc", ".."),
        ("hello/${x}", "${x}"),
    ],
)
def test_specific_bad_names(name: str, part: str) -> None:
    """Empty components, upper case, bad separators and Nix syntax are rejected by part."""
    with pytest.raises(InvalidImageName) as caught:
        Image.from_name(name)
    assert caught.value.part == part
    assert caught.value.name == name


@pytest.mark.parametrize("tag", ["", ".hidden", "-x", "a" * 129, "has space", "ü"])
def test_bad_tags_are_named(tag: str) -> None:
    """A tag outside the registry grammar raises InvalidImageName naming the tag."""
    with pytest.raises(InvalidImageName) as caught:
        Image.from_name("hello", tag)
    assert caught.value.part == tag


def test_overlong_names_are_rejected() -> None:
    """Names longer than 255 bytes are rejected before any component is looked at."""
    with pytest.raises(InvalidImageName, match="longer than 255"):
        Image.from_name("/".join(["abcdefghij"] * 30))


def test_name_with_tag_suffix() -> None:
    """`hello:v1` splits into name and tag; an explicit tag wins over the suffix parse."""
    assert Image.from_name("hello:v1").tag == "v1"
    assert Image.from_name("shell/hello:v1").canonical_name == "shell/hello"
    with pytest.raises(InvalidImageName):
        Image.from_name("hello:v1", "v2")


@given(st.lists(st.text(min_size=1, max_size=60).filter(lambda t: "/" not in t and "\x00" not in t
                                                    and len(t.encode("utf-8", "replace")) <= 255),
                min_size=1, max_size=5))
def test_from_packages_keeps_any_name_as_data(packages: list[str]) -> None:
    """from_packages accepts any case and punctuation (the names stay data), sorted and unique."""
    image = Image.from_packages(packages, always_added=())
    assert image.packages == tuple(sorted(set(packages)))
    assert image.requested == image.packages


@pytest.mark.parametrize("bad", ["", "a/b", "nul\x00"])
def test_from_packages_rejects_unusable_names(bad: str) -> None:
    """Empty names, slashes and NUL bytes are refused even from trusted code."""
    with pytest.raises(InvalidImageName) as caught:
        Image.from_packages(["ok", bad])
    assert caught.value.part == bad


@given(package_lists)
def test_with_arch_changes_arch_and_key_only(packages: list[str]) -> None:
    """with_arch keeps the packages, switches the meta marker and changes the cache key."""
    image = Image.from_name("/".join(packages))
    arm = image.with_arch(ARM64)
    assert arm.packages == image.packages
    assert arm.meta[:1] == ("arm64",)
    assert image_cache_key(arm, SPEC) != image_cache_key(image, SPEC)
    _same_image(arm.with_arch(AMD64), image)


# --- values check themselves --------------------------------------------------------


@pytest.mark.parametrize(
    ("changes", "error"),
    [
        ({"tag": "--upload-pack=/bin/sh"}, InvalidImageName),
        ({"tag": ""}, InvalidImageName),
        ({"tag": "a b"}, InvalidImageName),
        ({"packages": ("hello", "bash")}, InvalidImageName),  # not sorted
        ({"packages": ("bash", "bash")}, InvalidImageName),  # not unique
        ({"packages": ("a/b",)}, InvalidImageName),
        ({"packages": ["hello"]}, InvalidImageName),  # not a tuple
        ({"requested": ("z", "a")}, InvalidImageName),
        ({"meta": ("shell", "arm64")}, InvalidImageName),  # not in canonical order
        ({"meta": ("root",)}, InvalidImageName),
        ({"arch": "amd64"}, InvalidInput),
        ({"name": None}, InvalidImageName),
    ],
)
def test_an_image_with_a_bad_field_cannot_be_constructed(
    changes: dict[str, Any], error: type[Exception]
) -> None:
    """Constructing or evolving an Image checks every field: no bad tag ever exists."""
    image = Image.from_name("shell/hello")
    with pytest.raises(error):
        attrs.evolve(image, **changes)
    fields = {**attrs.asdict(image, recurse=False), **changes}
    with pytest.raises(error):
        Image(**fields)


def test_a_valid_image_built_by_hand_equals_the_parsed_one() -> None:
    """The validators accept exactly what the named constructors make."""
    parsed = Image.from_name("arm64/shell/git:v1")
    assert Image(**attrs.asdict(parsed, recurse=False)) == parsed


@pytest.mark.parametrize("bad", ["", "../amd64", "amd64/x", "a b", 64])
def test_an_architecture_checks_its_names(bad: object) -> None:
    """Architecture parts are short platform names; anything else is InvalidInput."""
    with pytest.raises(InvalidInput):
        Architecture("x86_64-linux", bad)  # type: ignore[arg-type]


def test_name_rules_are_written_once() -> None:
    """The tag and component grammars are compiled only in names.py; others import them."""
    package = Path(nixery_core.__file__).parent
    tag_rule = "[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}"
    component_rule = "[a-z0-9]+(?:(?:\\\\.|_|__|-+)[a-z0-9]+)*"
    holders = {
        path.relative_to(package).as_posix()
        for path in package.rglob("*.py")
        if tag_rule in (text := path.read_text(encoding="utf-8")) or component_rule in text
    }
    assert holders == {"names.py"}
    assert is_tag("latest")
    assert not is_tag("--upload-pack")
    assert is_name_component("git")
    assert not is_name_component("Git")
