"""A malformed cache entry, in either tier, is a logged corrupt miss that the build repairs.

Entries come from other hosts' buckets, older releases, torn writes and hand
edits.  Hypothesis takes the entries a real build wrote (manifest and layer
entries), drops fields, retypes them or swaps in other JSON, writes the
result into the local tier (diskcache) or the shared tier (the bucket's
``manifests/`` and ``builds/``), and builds again: the build must succeed
with the image's real digest, never raise ``KeyError``/``TypeError``, and
leave a well-formed entry behind.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import attrs
import diskcache
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nixery_core.build import BuildResult, build_image
from nixery_core.cache import BuildCache, CacheStats, LayerRecord, ManifestRecord
from nixery_core.errors import InvalidCacheRecord, InvalidInput
from nixery_core.multiarch import MultiArchResult, build_multiarch
from nixery_core.names import AMD64, ARM64, Image
from nixery_core.record_schema import record_blob_sizes
from nixery_core.results import BuiltLayer
from nixery_core.sbom.referrers import SbomArtifact
from nixery_core.testing.runners import FakeNix, default_fake_packages
from nixery_core.testing.sources import FixedSource
from nixery_core.testing.storage import MemoryStore

JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | st.text(max_size=8),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner, max_size=3)
    ),
    max_leaves=6,
)


@attrs.frozen
class Built:
    """One real build's store, Nix root, digest and the raw entries it wrote."""

    store: MemoryStore
    fake: FakeNix
    digest: str
    manifest_key: str
    entries: dict[str, bytes]


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Built:
    """shell/hello built once with a shared-tier cache; its entries are the fuzzing seeds."""
    root = tmp_path_factory.mktemp("entries")
    fake = FakeNix(root / "nix", default_fake_packages())
    store = MemoryStore()
    result = _build(store, fake, BuildCache(None))
    entries = {
        name: data
        for prefix in ("manifests/", "builds/")
        for name in store.list_objects(prefix)
        if (data := store.get_object(name)) is not None
    }
    return Built(store, fake, result.manifest_digest, f"manifests/{result.cache_key}", entries)


def _build(store: MemoryStore, fake: FakeNix, cache: BuildCache) -> BuildResult:
    return build_image(
        Image.from_name("shell/hello"), FixedSource(), runner=fake, uploader=store,
        cache=cache, store_root=fake.store_root, max_workers=1,
    )


# --- mutations ---------------------------------------------------------------------


def _paths(value: Any, prefix: tuple[Any, ...] = ()) -> Iterator[tuple[Any, ...]]:
    """Every path to a value inside nested dicts and lists."""
    yield prefix
    if isinstance(value, dict):
        for key, inner in value.items():
            yield from _paths(inner, (*prefix, key))
    elif isinstance(value, list):
        for index, inner in enumerate(value):
            yield from _paths(inner, (*prefix, index))


@st.composite
def mutated(draw: st.DrawFn, raw: bytes) -> bytes:
    """``raw`` with one field dropped or replaced by other JSON, or other bytes altogether."""
    kind = draw(st.sampled_from(["drop", "replace", "replace", "garbage"]))
    if kind == "garbage":
        return draw(st.binary(max_size=40) | JSON.map(lambda v: json.dumps(v).encode()))
    document = json.loads(raw)
    paths = [p for p in _paths(document) if p]
    path = draw(st.sampled_from(paths))
    parent = document
    for step in path[:-1]:
        parent = parent[step]
    if kind == "drop":
        del parent[path[-1]]
    else:
        parent[path[-1]] = draw(JSON)
    return json.dumps(document).encode()


def _write(tier: str, directory: Path, store: MemoryStore, name: str, raw: bytes) -> None:
    if tier == "shared":
        store.put_object(name, raw)
        return
    local = diskcache.Cache(str(directory))
    try:
        local.set(name, raw)
    finally:
        local.close()


# --- properties --------------------------------------------------------------------


@pytest.mark.parametrize("tier", ["local", "shared"])
@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(data=st.data())
def test_malformed_entry_is_a_repaired_miss(
    built: Built, tier: str, tmp_path: Path, data: st.DataObject
) -> None:
    """A mutated manifest or layer entry in either tier: the build succeeds and repairs it."""
    name = data.draw(st.sampled_from(sorted(built.entries)))
    raw = data.draw(mutated(built.entries[name]))
    store = built.store
    directory = tmp_path / f"cache-{tier}"
    shutil.rmtree(directory, ignore_errors=True)
    for entry in built.entries:
        store.delete_object(entry)
    # Seed the tier under test with the good entries, then break one.  Without
    # the manifest entry a broken layer entry is what the build reads.
    for entry, good in built.entries.items():
        if name.startswith("builds/") and entry == built.manifest_key:
            continue
        _write(tier, directory, store, entry, good)
    _write(tier, directory, store, name, raw)
    with BuildCache(directory, shared=tier == "shared") as cache:
        result = _build(store, built.fake, cache)
        assert result.manifest_digest == built.digest
    # The tier now holds well-formed entries: a fresh cache hits without rebuilding.
    check = directory if tier == "local" else tmp_path / "fresh"
    shutil.rmtree(tmp_path / "fresh", ignore_errors=True)
    with BuildCache(check, shared=tier == "shared") as cache:
        if name.startswith("builds/"):
            assert cache.get_layer(store, name.removeprefix("builds/")) is not None
        again = _build(store, built.fake, cache)
        assert again.from_cache
        assert again.manifest_digest == built.digest
        assert again.cache_stats.corrupt_entries == 0


def _build_after_damaging_the_manifest_entry(
    built: Built, tmp_path: Path, caplog: pytest.LogCaptureFixture,
    damage: Callable[[dict[str, Any]], None],
) -> BuildResult:
    """Every entry stored well-formed but the manifest entry, whose body ``damage`` changed,
    then one build with a new local cache, logging warnings into ``caplog``."""
    for entry, good in built.entries.items():
        built.store.put_object(entry, good)
    document = json.loads(built.entries[built.manifest_key])
    damage(document["body"])
    built.store.put_object(built.manifest_key, json.dumps(document).encode())
    with (
        BuildCache(tmp_path / "c") as cache,
        caplog.at_level(logging.WARNING, logger="nixery_core.cache"),
    ):
        return _build(built.store, built.fake, cache)


def test_missing_config_is_a_logged_corrupt_miss(
    built: Built, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The reported case: an entry without ``config`` is counted corrupt, logged and rebuilt."""
    store = built.store
    result = _build_after_damaging_the_manifest_entry(
        built, tmp_path, caplog, lambda body: body.pop("config")
    )
    assert result.manifest_digest == built.digest
    assert not result.from_cache
    assert result.cache_stats.corrupt_entries >= 1
    assert "'config' is missing" in caplog.text
    repaired = store.get_object(built.manifest_key)
    assert repaired is not None
    assert "config" in json.loads(repaired)["body"]


@pytest.mark.parametrize("annotations", [5, [["a", "b"]], {"a": 1}])
def test_a_layer_with_malformed_annotations_is_a_logged_corrupt_miss(
    built: Built, tmp_path: Path, caplog: pytest.LogCaptureFixture, annotations: object
) -> None:
    """A manifest entry whose layer annotations are not an object of strings is counted
    corrupt, logged and rebuilt, never raised from the build."""
    store = built.store
    result = _build_after_damaging_the_manifest_entry(
        built, tmp_path, caplog,
        lambda body: body["layers"][0].__setitem__("annotations", annotations),
    )
    assert result.manifest_digest == built.digest
    assert not result.from_cache
    assert result.cache_stats.corrupt_entries >= 1
    assert "'annotations'" in caplog.text
    for entry, good in built.entries.items():
        store.put_object(entry, good)


@pytest.mark.parametrize(
    ("change", "problem"),
    [
        ({"manifest": 7}, "'manifest' is int, not str"),
        ({"layers": [3]}, "expected an object holding 'digest', got int"),
        ({"layers": "x"}, "'layers' is str, not list"),
        ({"manifest_media_type": None}, "'manifest_media_type' is NoneType, not str"),
        ({"config": '{"other": 1}'}, "the manifest names another config"),
    ],
)
def test_record_schema_names_what_is_wrong(
    built: Built, change: dict[str, Any], problem: str
) -> None:
    """Wrong types and contradicting fields are a ValueError whose text names the problem."""
    body = json.loads(built.entries[built.manifest_key])["body"]
    record_blob_sizes(body)
    with pytest.raises(ValueError, match=re.escape(problem)):
        record_blob_sizes({**body, **change})


def _fewer_blobs(document: dict[str, Any]) -> None:
    document["blobs"] = document["blobs"][:-1]


def _retyped_media_type(document: dict[str, Any]) -> None:
    document["body"]["manifest_media_type"] = 7


@pytest.mark.parametrize(
    ("fault", "problem"),
    [
        (_fewer_blobs, "the entry's blobs differ from those its body describes"),
        (_retyped_media_type, "'manifest_media_type' is int, not str"),
    ],
)
def test_a_malformed_record_reaches_a_caller_only_as_a_logged_miss(
    built: Built,
    caplog: pytest.LogCaptureFixture,
    fault: Callable[[dict[str, Any]], None],
    problem: str,
) -> None:
    """A caller of the cache sees a malformed entry only as a miss, a warning naming it, a count."""
    store = MemoryStore()
    document = json.loads(built.entries[built.manifest_key])
    fault(document)
    store.put_object(built.manifest_key, json.dumps(document).encode())
    cache = BuildCache(None)
    with caplog.at_level(logging.WARNING, logger="nixery_core.cache"):
        found = cache.get_manifest(store, built.manifest_key.removeprefix("manifests/"))
    assert found is None
    assert (cache.stats.corrupt_entries, cache.stats.manifest_misses) == (1, 1)
    assert caplog.messages == [
        f"corrupt shared cache entry {built.manifest_key} ({problem}); treating as a miss"
    ]


@attrs.frozen
class BuiltIndex:
    """One multi-architecture build: store, Nix root, index digest, its entry name and bytes."""

    store: MemoryStore
    fake: FakeNix
    digest: str
    name: str
    raw: bytes


@pytest.fixture(scope="module")
def built_index(tmp_path_factory: pytest.TempPathFactory) -> BuiltIndex:
    """shell/hello for amd64 and arm64 built once; its index entry is the fuzzing seed."""
    root = tmp_path_factory.mktemp("index-entries")
    fake = FakeNix(root / "nix", default_fake_packages())
    store = MemoryStore()
    result = _build_index(store, fake, BuildCache(None))
    name = f"manifests/{result.cache_key}"
    raw = store.get_object(name)
    assert raw is not None
    return BuiltIndex(store, fake, result.index_digest, name, raw)


def _build_index(store: MemoryStore, fake: FakeNix, cache: BuildCache) -> MultiArchResult:
    return build_multiarch(
        Image.from_name("shell/hello"), FixedSource(), archs=(AMD64, ARM64), runner=fake,
        uploader=store, cache=cache, store_root=fake.store_root, max_workers=1,
    )


@pytest.mark.parametrize("tier", ["local", "shared"])
@settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(data=st.data())
def test_malformed_index_entry_is_a_repaired_miss(
    built_index: BuiltIndex, tier: str, tmp_path: Path, data: st.DataObject
) -> None:
    """A mutated multi-architecture index entry in either tier: the build succeeds, repairs it."""
    raw = data.draw(mutated(built_index.raw))
    store = built_index.store
    directory = tmp_path / f"index-cache-{tier}"
    shutil.rmtree(directory, ignore_errors=True)
    store.delete_object(built_index.name)
    _write(tier, directory, store, built_index.name, raw)
    with BuildCache(directory, shared=tier == "shared") as cache:
        result = _build_index(store, built_index.fake, cache)
        assert result.index_digest == built_index.digest
    check = directory if tier == "local" else tmp_path / "fresh-index"
    shutil.rmtree(tmp_path / "fresh-index", ignore_errors=True)
    with BuildCache(check, shared=tier == "shared") as cache:
        again = _build_index(store, built_index.fake, cache)
        assert again.from_cache
        assert again.index_digest == built_index.digest


def test_an_index_hit_reads_its_entry_once_with_the_lookups_stats(
    built_index: BuiltIndex, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An index hit in a fresh cache (its entry not memoised) reads each architecture's
    record once, though the cache's check read it first, and the result and each
    architecture's result carry the lookup's stats (a shared hit)."""
    read: list[str] = []
    from_record = BuildResult.from_record.__func__  # type: ignore[attr-defined]

    def counting(cls: type[BuildResult], image: Image, *args: Any) -> BuildResult:
        read.append(image.arch.oci_arch if image.arch is not None else "")
        return from_record(cls, image, *args)  # type: ignore[no-any-return]

    monkeypatch.setattr(BuildResult, "from_record", classmethod(counting))
    with BuildCache(tmp_path / "c", shared=True) as cache:
        result = _build_index(built_index.store, built_index.fake, cache)
    assert result.from_cache
    assert sorted(read) == ["amd64", "arm64"]  # was each twice
    assert result.cache_stats.manifest_shared_hits == 1
    assert all(built.cache_stats == result.cache_stats for built in result.manifests.values())


def test_an_index_entry_for_another_request_is_a_counted_corrupt_miss(
    built_index: BuiltIndex, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """An index entry that passes the record schema but names another manifest key than the
    request's is counted corrupt (in the cache and the result), logged, rebuilt and repaired."""
    store = built_index.store
    document = json.loads(built_index.raw)
    entries = document["body"]["manifests"]
    entries[0]["cache_key"] = entries[1]["cache_key"]
    record_blob_sizes(document["body"])  # the schema accepts it
    store.put_object(built_index.name, json.dumps(document).encode())
    try:
        with (
            BuildCache(tmp_path / "c") as cache,
            caplog.at_level(logging.WARNING, logger="nixery_core.cache"),
        ):
            result = _build_index(store, built_index.fake, cache)
            corrupt = cache.stats.corrupt_entries
        assert not result.from_cache
        assert result.index_digest == built_index.digest
        assert corrupt >= 1
        assert result.cache_stats.corrupt_entries >= 1
        assert "names another manifest key" in caplog.text
        with BuildCache(tmp_path / "fresh") as cache:
            assert _build_index(store, built_index.fake, cache).from_cache  # repaired
    finally:
        store.put_object(built_index.name, built_index.raw)


_LAYER = {
    "digest": "sha256:" + "a" * 64,
    "diff_id": "sha256:" + "b" * 64,
    "size": 10,
    "media_type": "application/vnd.oci.image.layer.v1.tar+gzip",
}


@pytest.mark.parametrize(
    ("record", "data", "named"),
    [
        (LayerRecord, {**_LAYER, "size": "10"}, "size"),
        (LayerRecord, {**_LAYER, "size": -1}, "size"),
        (LayerRecord, {k: v for k, v in _LAYER.items() if k != "media_type"}, "media_type"),
        (LayerRecord, {**_LAYER, "digest": "sha256:abc"}, "digest"),
        (LayerRecord, {**_LAYER, "annotations": {"a": 1}}, "annotations"),
        (LayerRecord, [], "object"),
        (ManifestRecord, {"blobs": []}, "body"),
        (ManifestRecord, {"body": {}, "blobs": [1]}, "blobs"),
        (ManifestRecord, {"body": {}, "blobs": [], "expires_at": "soon"}, "expires_at"),
        (ManifestRecord, {"body": {}, "blobs": [], "expires_at": True}, "expires_at"),
        (ManifestRecord, "body", "object"),
    ],
)
def test_parsing_a_malformed_record_raises_invalid_cache_record(
    record: type[LayerRecord | ManifestRecord], data: Any, named: str
) -> None:
    """A caller parsing a cache entry itself gets InvalidCacheRecord naming what is wrong (an
    InvalidInput, so a ValueError as the cache's own reads catch it), never a bare TypeError."""
    with pytest.raises(InvalidCacheRecord, match=named) as raised:
        record.from_json(data)
    assert isinstance(raised.value, InvalidInput)
    assert named in raised.value.detail


_BUILT = {**_LAYER, "paths": ["/nix/store/" + "c" * 32 + "-x"], "packages": ["x"], "kind": "store"}


@pytest.mark.parametrize(
    ("data", "named"),
    [
        ({k: v for k, v in _BUILT.items() if k != "kind"}, "kind"),
        ({**_BUILT, "kind": "other"}, "kind"),
        ({**_BUILT, "paths": "/nix/store/x"}, "paths"),
        ({k: v for k, v in _BUILT.items() if k != "packages"}, "packages"),
        ({**_BUILT, "size": "10"}, "size"),
        ({**_BUILT, "digest": 7}, "digest"),
        ({**_BUILT, "annotations": [["a", "b"]]}, "annotations"),
        ([], "object"),
    ],
)
def test_parsing_a_malformed_built_layer_raises_invalid_cache_record(
    data: Any, named: str
) -> None:
    """A build record's malformed layer raises InvalidCacheRecord naming the field, never a
    bare KeyError or TypeError; a well-formed one round-trips."""
    layer = BuiltLayer.from_json(_BUILT, reused=True)
    assert BuiltLayer.from_json(layer.to_json(), reused=True) == layer
    with pytest.raises(InvalidCacheRecord, match=named) as raised:
        BuiltLayer.from_json(data, reused=True)
    assert named in raised.value.detail


_SBOM = {
    "format": "spdx",
    "artifact_type": "application/spdx+json",
    "manifest_digest": "sha256:" + "e" * 64,
    "manifest_size": 300,
    "document_digest": "sha256:" + "f" * 64,
    "document_size": 900,
    "created": "1970-01-01T00:00:01Z",
}


@pytest.mark.parametrize(
    ("data", "named"),
    [
        ({k: v for k, v in _SBOM.items() if k != "created"}, "created"),
        ({**_SBOM, "format": "swid"}, "format"),
        ({**_SBOM, "format": []}, "format"),
        ({**_SBOM, "manifest_size": True}, "manifest_size"),
        ({**_SBOM, "document_size": -1}, "document_size"),
        ({**_SBOM, "document_digest": "sha256:abc"}, "document_digest"),
        ({**_SBOM, "artifact_type": None}, "artifact_type"),
        ([], "object"),
    ],
)
def test_parsing_a_malformed_sbom_artifact_raises_invalid_cache_record(
    data: Any, named: str
) -> None:
    """A build record's malformed SBOM entry raises InvalidCacheRecord naming the field, chained
    to nothing bare (no KeyError or TypeError); a well-formed one round-trips."""
    artifact = SbomArtifact.from_json(_SBOM)
    assert SbomArtifact.from_json(artifact.to_json()) == artifact
    with pytest.raises(InvalidCacheRecord, match=named) as raised:
        SbomArtifact.from_json(data)
    assert named in raised.value.detail


_RECORD = {
    "manifest": "{}",
    "manifest_media_type": "application/vnd.oci.image.manifest.v1+json",
    "config": "{}",
    "layers": [_BUILT],
    "sboms": [_SBOM],
}


@pytest.mark.parametrize(
    ("body", "named"),
    [
        ({k: v for k, v in _RECORD.items() if k != "manifest"}, "manifest"),
        ({**_RECORD, "config": 7}, "config"),
        ({**_RECORD, "manifest_media_type": None}, "manifest_media_type"),
        ({**_RECORD, "layers": {}}, "layers"),
        ({**_RECORD, "layers": [[]]}, "object"),
        ({**_RECORD, "sboms": "spdx"}, "sboms"),
        ({**_RECORD, "sboms": [{**_SBOM, "manifest_size": "1"}]}, "manifest_size"),
        ([], "object"),
    ],
)
def test_rebuilding_a_result_from_a_malformed_record_raises_invalid_cache_record(
    body: Any, named: str
) -> None:
    """BuildResult.from_record given a malformed body raises InvalidCacheRecord naming the field
    (never a bare KeyError or TypeError, nor a result built from a non-string manifest); a
    well-formed body, without ``sboms`` too, gives a cached result."""
    image = Image.from_name("shell/hello")
    for good in (_RECORD, {k: v for k, v in _RECORD.items() if k != "sboms"}):
        result = BuildResult.from_record(image, "key", good, CacheStats(), {})
        assert result.from_cache
        assert [layer.digest for layer in result.layers] == [_BUILT["digest"]]
    with pytest.raises(InvalidCacheRecord, match=named) as raised:
        BuildResult.from_record(image, "key", body, CacheStats(), {})
    assert named in raised.value.detail
