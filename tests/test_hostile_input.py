"""Hostile input: every name, tag, digest, package name and key gets a typed error or a safe result.

The corpus lives in ``tests/hostile_corpus.py``.  Each rule here is stated
independently of the code under test: the OCI distribution grammar for names
and tags, "every corpus digest is refused", "an accepted object key stays a
path inside the store root", "an accepted package name reaches Nix as data".
"""

from __future__ import annotations

import posixpath
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from conftest import OFFLINE_SET, REPO
from hostile_corpus import (
    DIGESTS,
    IMAGE_NAMES,
    OBJECT_KEYS,
    PACKAGE_NAMES,
    PAYLOADS,
    TAGS,
    Sample,
    ids,
)
from hypothesis import given, settings
from hypothesis import strategies as st

from nixery_core.digests import digest_hex, is_digest, validate_digest
from nixery_core.errors import (
    InvalidDigest,
    InvalidImageName,
    InvalidInput,
    NixeryError,
    UnknownPackages,
)
from nixery_core.names import DEFAULT_ALWAYS_ADDED, SHELL_PACKAGES, Image
from nixery_core.protocols import CollectableStore
from nixery_core.storage.filesystem import FilesystemStore
from nixery_core.storage.keys import validate_object_key, validate_prefix
from nixery_core.testing.storage import MemoryStore

# The OCI distribution spec's grammar, written out again as the oracle.
OCI_COMPONENT = re.compile(r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*")
OCI_TAG = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}")
MAX_NAME = 255
META = {"shell", "arm64"}
#: Characters an error message must never carry raw (log and terminal injection).
UNSAFE_IN_MESSAGES = re.compile("[\x00-\x1f\x7f\u200b\u202a-\u202e\u2066-\u2069\ufeff]")
LAYER = "application/vnd.oci.image.layer.v1.tar+gzip"


def oracle_accepts(name: str, tag: str = "latest") -> bool:
    """Whether the grammar allows this name and tag (``name:tag`` when tag is the default)."""
    if tag == "latest" and ":" in name:
        name, _, tag = name.rpartition(":")
    return (
        bool(OCI_TAG.fullmatch(tag))
        and 0 < len(name) <= MAX_NAME
        and all(OCI_COMPONENT.fullmatch(c) for c in name.split("/"))
    )


def parse(name: str, tag: str = "latest") -> Image | InvalidImageName:
    """Image.from_name, with InvalidImageName returned; any other exception escapes."""
    try:
        return Image.from_name(name, tag)
    except InvalidImageName as exc:
        return exc


def check_image(image: Image) -> None:
    """An accepted image holds only grammar-valid requested names plus known expansions."""
    assert image.requested or image.meta, image
    for package in image.requested:
        assert OCI_COMPONENT.fullmatch(package), package
    assert set(image.meta) <= META
    assert set(image.packages) <= {*image.requested, *SHELL_PACKAGES, *DEFAULT_ALWAYS_ADDED}
    assert OCI_TAG.fullmatch(image.tag)


def check_error(exc: InvalidInput) -> None:
    """A refusal is an InvalidInput whose message is printable (no raw control characters)."""
    assert isinstance(exc, InvalidInput)
    assert not UNSAFE_IN_MESSAGES.search(str(exc)), repr(str(exc))


# --- image names and tags ----------------------------------------------------------


@pytest.mark.parametrize("sample", IMAGE_NAMES, ids=ids(IMAGE_NAMES))
def test_image_names(sample: Sample) -> None:
    """Each hostile name is refused with InvalidImageName exactly when the grammar refuses it."""
    result = parse(sample.value)
    if isinstance(result, Image):
        assert oracle_accepts(sample.value), sample
        check_image(result)
    else:
        assert not oracle_accepts(sample.value), sample
        check_error(result)


@pytest.mark.parametrize("sample", TAGS, ids=ids(TAGS))
def test_tags(sample: Sample) -> None:
    """Each hostile tag is refused with InvalidImageName exactly when the tag grammar refuses it."""
    result = parse("git", sample.value)
    assert isinstance(result, Image) == bool(OCI_TAG.fullmatch(sample.value)), sample
    if isinstance(result, Image):
        assert result.tag == sample.value
    else:
        check_error(result)


@pytest.mark.parametrize("sample", PAYLOADS, ids=ids(PAYLOADS))
def test_payload_as_one_component_of_a_valid_name(sample: Sample) -> None:
    """A hostile payload between valid components is refused like it is on its own."""
    name = f"shell/{sample.value}/git"
    result = parse(name)
    assert isinstance(result, Image) == oracle_accepts(name), sample
    if isinstance(result, InvalidImageName):
        check_error(result)


@pytest.mark.parametrize("tag", [None, 1, b"latest", ["latest"]])
def test_non_string_tag_is_invalid_image_name(tag: object) -> None:
    """A tag that is not a string (as JSON input may give) is refused with InvalidImageName."""
    with pytest.raises(InvalidImageName):
        Image.from_name("git", tag)  # type: ignore[arg-type]


@pytest.mark.parametrize("name", [None, 1, b"git", ["git"]])
def test_non_string_name_is_invalid_image_name(name: object) -> None:
    """A name that is not a string is refused with InvalidImageName."""
    with pytest.raises(InvalidImageName):
        Image.from_name(name)  # type: ignore[arg-type]


# --- digests -----------------------------------------------------------------------


@pytest.mark.parametrize("sample", DIGESTS, ids=ids(DIGESTS))
def test_digests_are_refused(sample: Sample) -> None:
    """Every hostile digest is refused with InvalidDigest by the one gate, validate_digest."""
    assert not is_digest(sample.value)
    with pytest.raises(InvalidDigest) as caught:
        validate_digest(sample.value)
    check_error(caught.value)
    with pytest.raises(InvalidDigest):
        digest_hex(sample.value)


def tree(top: Path) -> dict[str, tuple[bool, int]]:
    """Every path under ``top`` (relative), whether it is a directory, and its size."""
    out: dict[str, tuple[bool, int]] = {}
    for path in sorted(top.rglob("*")):
        stat = path.lstat()
        out[path.relative_to(top).as_posix()] = (path.is_dir(), stat.st_size)
    return out


def make_store(kind: str, root: Path) -> CollectableStore:
    return FilesystemStore(root, durable=False) if kind == "filesystem" else MemoryStore()


def blob_operations(store: Any, digest: str) -> list[Callable[[], object]]:
    operations: list[Callable[[], object]] = [
        lambda: store.has_blob(digest),
        lambda: store.blob_info(digest),
        lambda: store.read_blob(digest),
        lambda: store.open_blob(digest),
        lambda: store.delete_blob(digest),
    ]
    if isinstance(store, FilesystemStore):
        operations.append(lambda: store.blob_path(digest))
    return operations


@pytest.mark.parametrize("kind", ["filesystem", "memory"])
def test_stores_refuse_hostile_digests(kind: str, tmp_path: Path) -> None:
    """Every blob operation or commit with a hostile digest raises InvalidDigest; no writes."""
    root = tmp_path / "a" / "b" / "store"
    store = make_store(kind, root)
    store.put_blob(b"a real blob", LAYER)
    before = tree(tmp_path)
    for sample in DIGESTS:
        for operation in blob_operations(store, sample.value):
            with pytest.raises(InvalidDigest):
                operation()
        writer = store.open_blob_writer(LAYER)
        writer.write(b"data")
        with pytest.raises(InvalidDigest):
            writer.commit(sample.value)
    assert tree(tmp_path) == before
    assert len(list(store.list_blobs())) == 1


# --- object keys -------------------------------------------------------------------


def must_refuse_key(key: str) -> bool:
    """Keys that would leave the object namespace: traversal, absolute, empty, NUL, reserved."""
    segments = key.split("/")
    return (
        not key
        or "\x00" in key
        or any(s in {"", ".", ".."} for s in segments)
        or segments[0] in {"layers", "staging"}
    )


def segment_too_long(key: str) -> bool:
    """A segment longer than a file name may be (NAME_MAX, 255 bytes on Linux)."""
    return any(len(s.encode("utf-8", "surrogatepass")) > 255 for s in key.split("/"))


def key_stays_inside(key: str) -> bool:
    """Whether ``key``, joined to a root, names a path strictly inside it."""
    joined = posixpath.normpath(posixpath.join("/root", key))
    return joined.startswith("/root/") and joined == "/root/" + key


def test_filesystem_store_hostile_keys_stay_inside_root(tmp_path: Path) -> None:
    """Hostile keys are refused (InvalidInput) or stored inside the root; nothing else changes."""
    root = tmp_path / "a" / "b" / "store"
    store = FilesystemStore(root, durable=False)
    (tmp_path / "sentinel").write_bytes(b"x")
    samples = [
        # Over-long segments are pinned by test_long_key_segment_is_invalid_input.
        *(s for s in OBJECT_KEYS if not segment_too_long(s.value)),
        Sample(str(tmp_path / "absolute"), "absolute path into the test directory"),
        Sample("../../../escaped", "traversal to the test directory"),
    ]
    outside_before = {k: v for k, v in tree(tmp_path).items() if not k.startswith("a/b/store")}
    accepted: set[str] = set()
    for sample in samples:
        key = sample.value
        try:
            store.put_object(key, b"evil")
        except InvalidInput as exc:
            check_error(exc)
            for operation in (store.get_object, store.delete_object):
                with pytest.raises(InvalidInput):
                    operation(key)
            continue
        assert not must_refuse_key(key), sample
        assert key_stays_inside(key), sample
        assert (root / key).read_bytes() == b"evil"
        assert store.get_object(key) == b"evil"
        accepted.add(key)
    outside_after = {k: v for k, v in tree(tmp_path).items() if not k.startswith("a/b/store")}
    assert outside_after == outside_before
    files = {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()}
    assert files == accepted
    assert set(store.list_objects("")) == accepted
    assert store.staging_leftovers() == []


def test_long_key_segment_is_invalid_input(tmp_path: Path) -> None:
    """A key segment longer than a file name may be is bad input, not a storage failure."""
    store = FilesystemStore(tmp_path, durable=False)
    with pytest.raises(InvalidInput):
        store.put_object("manifests/" + "a" * 256, b"x")


@pytest.mark.parametrize("sample", OBJECT_KEYS, ids=ids(OBJECT_KEYS))
def test_key_validation(sample: Sample) -> None:
    """validate_object_key refuses every escaping key and accepts only keys that stay inside."""
    try:
        validate_object_key(sample.value)
    except InvalidInput as exc:
        check_error(exc)
    else:
        assert not must_refuse_key(sample.value)
        assert key_stays_inside(sample.value)


class Tripwire:
    """A stand-in GCS bucket that fails the test when it is touched at all."""

    def __getattr__(self, name: str) -> Any:
        pytest.fail(f"the bucket was used ({name}) for a key that should have been refused")


def test_gcs_store_refuses_hostile_keys_before_any_request() -> None:
    """GcsStore refuses escaping keys and hostile digests without sending a single request."""
    from nixery_core.storage.gcs import GcsStore  # optional dependency: imported here only

    store = GcsStore(Tripwire())
    for sample in OBJECT_KEYS:
        if must_refuse_key(sample.value):
            for key_operation in (store.get_object, store.delete_object):
                with pytest.raises(InvalidInput):
                    key_operation(sample.value)
            with pytest.raises(InvalidInput):
                store.put_object(sample.value, b"evil")
    for sample in DIGESTS:
        for operation in blob_operations(store, sample.value):
            with pytest.raises(InvalidDigest):
                operation()


@pytest.mark.parametrize("kind", ["filesystem", "memory"])
def test_hostile_listing_prefixes(kind: str, tmp_path: Path) -> None:
    """list_objects with a hostile prefix is refused or lists only keys under the root."""
    store = make_store(kind, tmp_path)
    store.put_object("manifests/real", b"{}")
    for sample in OBJECT_KEYS:
        try:
            keys = list(store.list_objects(sample.value))
        except InvalidInput as exc:
            check_error(exc)
            continue
        assert all(k == "manifests/real" for k in keys), sample


# --- package names ------------------------------------------------------------------


@pytest.mark.parametrize("sample", PACKAGE_NAMES, ids=ids(PACKAGE_NAMES))
def test_package_names_from_code(sample: Sample) -> None:
    """from_packages refuses a name with InvalidImageName or keeps it verbatim, as data."""
    try:
        image = Image.from_packages([sample.value])
    except InvalidImageName as exc:
        check_error(exc)
        assert package_refused(sample.value), sample
        return
    assert not package_refused(sample.value), sample
    assert image.requested == (sample.value,)
    assert sample.value in image.packages


def package_refused(text: str) -> bool:
    """The documented rule: empty, NUL, '/', not UTF-8, or over 255 bytes is refused."""
    if not text or "\x00" in text or "/" in text or not encodable(text):
        return True
    return len(text.encode("utf-8")) > 255


def encodable(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def accepted_package_names() -> list[str]:
    """Corpus package names from_packages accepts (lone surrogates: see their own test)."""
    accepted = []
    for sample in PACKAGE_NAMES:
        try:
            Image.from_packages([sample.value])
        except InvalidImageName:
            continue
        if encodable(sample.value):
            accepted.append(sample.value)
    return accepted


# --- fuzzing --------------------------------------------------------------------------

NAMEISH = st.text(alphabet="ab09._-/:@ A\x00%\u212a", max_size=40)
ANY_TEXT = st.one_of(st.text(max_size=300), NAMEISH)


@settings(max_examples=400, deadline=None)
@given(name=ANY_TEXT, tag=st.one_of(st.just("latest"), ANY_TEXT))
def test_fuzz_from_name_raises_only_invalid_image_name(name: str, tag: str) -> None:
    """from_name over arbitrary text returns a grammar-valid image or raises InvalidImageName."""
    result = parse(name, tag)
    assert isinstance(result, Image) == oracle_accepts(name, tag)
    if isinstance(result, Image):
        check_image(result)
    else:
        check_error(result)


RUNS = st.text(alphabet="abjz0189", min_size=1, max_size=6)
SEPARATORS = st.sampled_from([".", "_", "__", "-", "---"])


@st.composite
def components(draw: st.DrawFn) -> str:
    """A grammar-valid path component: alphanumeric runs joined by separators."""
    runs = draw(st.lists(RUNS, min_size=1, max_size=3))
    return runs[0] + "".join(draw(SEPARATORS) + run for run in runs[1:])


COMPONENTS = components()
VALID_NAMES = st.lists(
    st.one_of(COMPONENTS, st.sampled_from(sorted(META))), min_size=1, max_size=6
).map("/".join).filter(lambda n: len(n) <= MAX_NAME)
VALID_TAGS = st.from_regex(OCI_TAG, fullmatch=True)


@settings(max_examples=200, deadline=None)
@given(name=VALID_NAMES, tag=VALID_TAGS)
def test_fuzz_valid_names_round_trip(name: str, tag: str) -> None:
    """A valid name parses, and its canonical name parses to the same image."""
    assert oracle_accepts(name, tag)  # the strategies make only valid names
    image = Image.from_name(name, tag)
    check_image(image)
    again = Image.from_name(image.canonical_name, tag)
    assert (again.packages, again.arch, again.requested, again.meta) == (
        image.packages, image.arch, image.requested, image.meta,
    )
    assert again.canonical_name == image.canonical_name


@pytest.mark.parametrize("name", ["zz/arm64", "zsh/shell", "git/arm64/shell"])
def test_meta_names_after_packages_round_trip(name: str) -> None:
    """A meta-package name in a later position is refused, or its canonical name round-trips."""
    try:
        image = Image.from_name(name)
    except InvalidImageName:
        return
    again = Image.from_name(image.canonical_name)
    assert (again.packages, again.arch) == (image.packages, image.arch)


@settings(max_examples=300, deadline=None)
@given(value=st.one_of(st.text(max_size=80), st.text(max_size=72).map("sha256:".__add__)))
def test_fuzz_validate_digest(value: str) -> None:
    """validate_digest returns exactly the sha256:<64 lower hex> strings, refuses the rest typed."""
    try:
        assert validate_digest(value) == value
    except InvalidDigest:
        assert not re.fullmatch(r"sha256:[0-9a-f]{64}", value)
    else:
        assert re.fullmatch(r"sha256:[0-9a-f]{64}", value)


@settings(max_examples=400, deadline=None)
@given(key=st.one_of(st.text(max_size=80), NAMEISH))
def test_fuzz_object_keys_stay_inside(key: str) -> None:
    """Any key validate_object_key accepts is a relative path strictly inside the root."""
    try:
        validate_object_key(key)
    except InvalidInput:
        pass
    else:
        assert not must_refuse_key(key)
        assert key_stays_inside(key)
    try:
        validate_prefix(key)
    except InvalidInput:
        pass
    else:
        assert not key.startswith("/")
        assert ".." not in key.split("/")[:-1]


@settings(max_examples=200, deadline=None)
@given(packages=st.lists(ANY_TEXT, max_size=5))
def test_fuzz_from_packages(packages: list[str]) -> None:
    """from_packages over arbitrary text raises only InvalidImageName, else keeps names verbatim."""
    try:
        image = Image.from_packages(packages)
    except InvalidImageName:
        return
    assert image.requested == tuple(sorted(set(packages)))


# --- real Nix: accepted package names are data ------------------------------------------

NIX_MODULE = REPO / "nixery_core" / "nix.py"


@pytest.fixture
def realise(nix: None) -> Callable[..., Any]:
    """nixery_core.nix.realise with the offline package set (skips until nix.py lands)."""
    if not NIX_MODULE.exists():
        pytest.skip("nixery_core/nix.py has not landed yet")
    from nixery_core import nix as nix_module  # imported only once it exists
    from nixery_core.runner import SubprocessRunner
    from nixery_core.sources import LocalPathSource

    source = LocalPathSource(OFFLINE_SET)

    def run(image: Image, logs: list[str]) -> Any:
        return nix_module.realise(
            image,
            source.resolve(image.tag),
            runner=SubprocessRunner(),
            timeout=120.0,
            nix_options={"substituters": ""},
            on_log_line=logs.append,
        )

    return run


@pytest.mark.nix
def test_hostile_package_names_reach_nix_as_data(realise: Callable[..., Any]) -> None:
    """Every accepted hostile name comes back unknown, none is evaluated, hello still resolves."""
    hostile = accepted_package_names()
    assert len(hostile) > 50
    logs: list[str] = []
    with pytest.raises(UnknownPackages) as caught:
        realise(Image.from_packages(["hello", *hostile]), logs)
    assert set(caught.value.packages) == set(hostile)
    log_text = "\n".join(logs)
    assert "CANARY" not in log_text, log_text[-2000:]
    assert "aborted" not in log_text
    assert "aborted" not in str(caught.value)


def refused_or_unknown(realise: Callable[..., Any], name: str) -> NixeryError:
    """Build an image of one package: it must be refused up front or reported unknown."""
    with pytest.raises(NixeryError) as caught:
        realise(Image.from_packages([name]), [])
    assert isinstance(caught.value, InvalidInput | UnknownPackages), caught.value
    return caught.value


@pytest.mark.nix
def test_huge_package_name_is_a_typed_error(realise: Callable[..., Any]) -> None:
    """A package name larger than one argv string may be is refused or unknown, never an OSError."""
    refused_or_unknown(realise, "x" * (256 * 1024))


@pytest.mark.nix
def test_lone_surrogate_package_name_is_refused_or_unknown(realise: Callable[..., Any]) -> None:
    """A package name that is not valid Unicode text never becomes a Nix failure."""
    refused_or_unknown(realise, "\ud800")


def test_corpus_is_large_and_not_accidentally_valid() -> None:
    """The corpus holds over 500 samples, and every digest sample is malformed."""
    total = len(IMAGE_NAMES) + len(TAGS) + len(DIGESTS) + len(PACKAGE_NAMES) + len(OBJECT_KEYS)
    assert total > 500
    assert not any(is_digest(s.value) for s in DIGESTS)
