"""Tests of the embedder's publisher, with nixery_core's fakes: no Nix, no disk store.

Copy the fixtures: ``fake_nix`` (a declared package set written into a
temporary store root), ``store`` (an in-memory blob store) and
``source`` (any package source; the fake runner ignores what it names),
and :func:`fake_builder`, the :class:`~nixery_core.builder.Builder` the
code under test receives, made of those fakes.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from examples.test_harness.publisher import PublishError, lock_file, publish
from nixery_core.builder import Builder
from nixery_core.cache import BuildCache
from nixery_core.errors import StorageError
from nixery_core.manifest import parse_manifest
from nixery_core.names import Image
from nixery_core.nix import resolve_argv
from nixery_core.outside_reads import restricted_args
from nixery_core.protocols import Runner
from nixery_core.sources import LocalPathSource
from nixery_core.testing.runners import (
    FakeFault,
    FakeFile,
    FakeNix,
    FakePackage,
    RecordedCall,
    RecordingRunner,
    ReplayRunner,
    default_fake_packages,
    replay_key,
)
from nixery_core.testing.storage import MemoryStore

SERVICES = {"greeter": ["hello"], "toolbox": ["bashInteractive", "coreutils", "hello"]}


def fake_builder(
    runner: Runner, store: MemoryStore, *, cache: BuildCache | None = None,
    store_root: Path = Path("/"),
) -> Builder:
    """A Builder of fakes: ``runner`` plays Nix, ``store`` holds the blobs, one worker thread."""
    return Builder(
        runner=runner, uploader=store, cache=cache, store_root=store_root, max_workers=1
    )


@pytest.fixture
def fake_nix(tmp_path: Path) -> FakeNix:
    """FakeNix with the ready-made set (busybox, hello, coreutils...) plus one package of ours."""
    packages = default_fake_packages()
    packages["greeting"] = FakePackage(
        {"share/greeting.txt": FakeFile(b"hello from a fake package\n")}, ("busybox",)
    )
    return FakeNix(tmp_path / "root", packages)


@pytest.fixture
def store() -> MemoryStore:
    return MemoryStore()


@pytest.fixture
def source(tmp_path: Path) -> LocalPathSource:
    path = tmp_path / "pkgs"
    path.mkdir()
    return LocalPathSource(path)


def test_publish_stores_every_blob(
    fake_nix: FakeNix, store: MemoryStore, source: LocalPathSource
) -> None:
    """Each service gets a manifest whose config and layers are all in the store."""
    builder = fake_builder(fake_nix, store, store_root=fake_nix.store_root)
    published = publish(SERVICES, source=source, builder=builder)
    assert [p.service for p in published] == ["greeter", "toolbox"]
    for entry in published:
        manifest = parse_manifest(store.read_blob(entry.digest))
        assert all(store.has_blob(blob.digest) for blob in manifest.blobs)
    assert json.loads(lock_file(published)) == {p.service: p.digest for p in published}


def test_shared_packages_share_layers(
    fake_nix: FakeNix, store: MemoryStore, source: LocalPathSource
) -> None:
    """With a cache, the second service reuses layers it shares with the first (busybox...)."""
    builder = fake_builder(
        fake_nix, store, cache=BuildCache(None), store_root=fake_nix.store_root
    )
    greeter, toolbox = publish(SERVICES, source=source, builder=builder)
    assert greeter.reused_layers == 0
    assert toolbox.reused_layers > 0


def test_republishing_runs_no_nix(
    fake_nix: FakeNix, store: MemoryStore, source: LocalPathSource
) -> None:
    """With a build cache, publishing again is all cache hits: no Nix call, no upload."""
    cache = BuildCache(None)  # only the shared tier, kept in the store itself
    builder = fake_builder(fake_nix, store, cache=cache, store_root=fake_nix.store_root)
    first = publish(SERVICES, source=source, builder=builder)
    calls, writes = len(fake_nix.calls), store.blob_writes
    again = publish(SERVICES, source=source, builder=builder)
    assert [p.digest for p in again] == [p.digest for p in first]
    assert (len(fake_nix.calls), store.blob_writes) == (calls, writes)


def test_recorded_session_replays_without_nix(
    fake_nix: FakeNix, source: LocalPathSource, tmp_path: Path
) -> None:
    """A recorded session replays from JSON: same questions asked, same images built."""
    recorder = RecordingRunner(fake_nix)
    root = fake_nix.store_root
    first = publish(
        SERVICES, source=source, builder=fake_builder(recorder, MemoryStore(), store_root=root)
    )
    recorder.save(tmp_path / "session.json")

    replay = ReplayRunner.load(tmp_path / "session.json")
    again = publish(
        SERVICES, source=source, builder=fake_builder(replay, MemoryStore(), store_root=root)
    )
    assert [p.digest for p in again] == [p.digest for p in first]
    # Each build roots its closure in a directory of its own (--add-root), so
    # the same question is asked with another root path: replay_key blanks it.
    assert [replay_key(argv) for argv in replay.calls] == [
        replay_key(call.argv) for call in recorder.calls
    ]


def test_unknown_packages_name_the_service(source: LocalPathSource) -> None:
    """Nix's not_found answer (replayed) becomes a PublishError naming service and packages."""
    image = Image.from_packages(["hello", "helo"])
    spec = source.resolve("latest")
    # A pinned local set is first evaluated in restricted mode (outside_reads).
    restrict = restricted_args(spec) or ()
    argv = resolve_argv(image.packages, spec, image.arch.nix_system, restrict=restrict)
    answer = {"error": "not_found", "pkgs": ["helo"]}
    replay = ReplayRunner([RecordedCall(argv, stdout=json.dumps(answer).encode())])
    with pytest.raises(PublishError, match="no such packages: helo") as caught:
        publish(
            {"typo": ["hello", "helo"]}, source=source, builder=fake_builder(replay, MemoryStore())
        )
    assert caught.value.service == "typo"


def test_nix_failure_carries_the_log(
    tmp_path: Path, store: MemoryStore, source: LocalPathSource
) -> None:
    """A failing Nix build is reported with the tail of its log, and stores no manifest."""
    broken = FakeNix(
        tmp_path / "root", default_fake_packages(),
        fail_with={"realise": FakeFault("fail", stderr="error: builder for 'hello.drv' failed")},
    )
    with pytest.raises(PublishError, match=re.escape("builder for 'hello.drv' failed")):
        publish(
            SERVICES, source=source,
            builder=fake_builder(broken, store, store_root=broken.store_root),
        )
    assert list(store.list_blobs()) == []


def test_storage_failure_leaves_nothing_half_written(
    fake_nix: FakeNix, store: MemoryStore, source: LocalPathSource
) -> None:
    """An upload failure surfaces as PublishError; no upload is left staged, no cache entry."""
    store.fail_on_write(1)
    with pytest.raises(PublishError) as caught:
        publish(
            SERVICES, source=source,
            builder=fake_builder(
                fake_nix, store, cache=BuildCache(None), store_root=fake_nix.store_root
            ),
        )
    assert isinstance(caught.value.__cause__, StorageError)
    assert store.staged_blobs() == ()
    assert list(store.list_objects("manifests/")) == []


@pytest.mark.parametrize("path_info_format", ["list", "object"])
def test_both_nix_output_formats_give_one_image(
    tmp_path: Path, source: LocalPathSource, path_info_format: str
) -> None:
    """Nix 2.8 and Nix >= 2.19 report closures differently; the published digest is the same."""
    fake = FakeNix(
        tmp_path / "root", default_fake_packages(),
        path_info_format="list" if path_info_format == "list" else "object",
    )
    reference = FakeNix(tmp_path / "other-root", default_fake_packages())
    (greeter, _) = publish(
        SERVICES, source=source,
        builder=fake_builder(fake, MemoryStore(), store_root=fake.store_root),
    )
    (expected, _) = publish(
        SERVICES, source=source,
        builder=fake_builder(reference, MemoryStore(), store_root=reference.store_root),
    )
    assert greeter.digest == expected.digest
