"""GcsStore against a real fake-gcs-server through the real google-cloud-storage client."""

from __future__ import annotations

import hashlib
import logging
import random
import threading
import tracemalloc
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from conftest import threads_started
from google.api_core import exceptions as gexc
from google.cloud.storage import Blob
from google.cloud.storage.retry import DEFAULT_RETRY
from servers import FakeGcsServer, fake_gcs

from nixery_core.digests import sha256_digest
from nixery_core.errors import (
    BlobNotFound,
    DigestMismatch,
    InvalidDigest,
    InvalidInput,
    StorageError,
    StorageUnavailable,
)
from nixery_core.protocols import BlobInfo, BlobWriter, Uploader
from nixery_core.storage.conformance import CHECKS, Check
from nixery_core.storage.gcs import RANGE_RETRY_SECONDS, GcsStore

__all__ = ["fake_gcs"]

pytestmark = pytest.mark.tools

CHUNK = 256 * 1024
LAYER = "application/vnd.oci.image.layer.v1.tar+gzip"
#: Retries that give up quickly: the fault tests stop the server on purpose.
#: google.api_core's exception constructors are untyped.
PRECONDITION_FAILED: Any = gexc.PreconditionFailed
SERVICE_UNAVAILABLE: Any = gexc.ServiceUnavailable
FAST_RETRY = DEFAULT_RETRY.with_timeout(1.0).with_delay(initial=0.05, maximum=0.2)


def _payload(size: int, seed: int = 0) -> bytes:
    """Deterministic bytes that do not compress to nothing."""
    out = bytearray()
    block = hashlib.sha256(seed.to_bytes(8, "big")).digest()
    while len(out) < size:
        block = hashlib.sha256(block).digest()
        out += block
    return bytes(out[:size])


def _names(bucket: Any, prefix: str = "") -> list[str]:
    return sorted(blob.name for blob in bucket.client.list_blobs(bucket, prefix=prefix))


@pytest.fixture
def bucket(fake_gcs: FakeGcsServer) -> Any:
    """A fresh, empty bucket on the module's emulator."""
    return fake_gcs.make_bucket(f"t-{uuid.uuid4().hex[:16]}")


@pytest.fixture
def store(bucket: Any) -> GcsStore:
    """A store with a small chunk size, so resumable uploads happen with small data."""
    return GcsStore(bucket, chunk_size=CHUNK, retry=FAST_RETRY, timeout=5.0)


@pytest.mark.parametrize("check", CHECKS, ids=lambda check: check.name)
def test_conformance(check: Check, fake_gcs: FakeGcsServer) -> None:
    """GcsStore keeps every promise of the Uploader conformance suite."""
    bucket = fake_gcs.make_bucket(f"c-{uuid.uuid4().hex[:16]}")
    store = GcsStore(bucket, chunk_size=CHUNK, retry=FAST_RETRY, timeout=5.0)
    check.run(store)
    assert store.staging_leftovers() == []


def test_is_an_uploader(store: GcsStore) -> None:
    """GcsStore and its writer satisfy the Uploader and BlobWriter protocols."""
    assert isinstance(store, Uploader)
    with store.open_blob_writer(LAYER) as writer:
        assert isinstance(writer, BlobWriter)


def test_put_blob_round_trip(store: GcsStore, bucket: Any) -> None:
    """put_blob stores at layers/<hex> with its media type; reads return the same bytes."""
    data = _payload(1000)
    digest = sha256_digest(data)
    info = store.put_blob(data, LAYER)
    assert info == BlobInfo(digest, 1000, LAYER)
    assert _names(bucket) == [f"layers/{digest[7:]}"]
    assert store.has_blob(digest)
    assert store.blob_info(digest) == info
    assert store.read_blob(digest) == data
    with store.open_blob(digest) as stream:
        assert stream.read() == data
    assert list(store.list_blobs()) == [info]
    assert store.put_blob(data, LAYER) == info
    store.delete_blob(digest)
    assert not store.has_blob(digest)
    assert store.blob_info(digest) is None
    assert list(store.list_blobs()) == []


@pytest.mark.parametrize("size", [0, 1000, CHUNK, 3 * CHUNK + 17])
def test_writer_round_trip(store: GcsStore, bucket: Any, size: int) -> None:
    """A streamed blob (one request or resumable) commits complete and leaves no staging object."""
    data = _payload(size, seed=size)
    digest = sha256_digest(data)
    with store.open_blob_writer(LAYER) as writer:
        for start in range(0, size, 100_000):
            writer.write(memoryview(data)[start : start + 100_000])
        info = writer.commit(digest)
    assert info == BlobInfo(digest, size, LAYER)
    assert _names(bucket) == [f"layers/{digest[7:]}"]
    assert store.blob_info(digest) == info
    assert store.read_blob(digest) == data


def test_open_blob_reads_ranges_and_seeks(store: GcsStore) -> None:
    """open_blob streams a multi-chunk blob in pieces and supports seeking."""
    data = _payload(2 * CHUNK + 5, seed=7)
    digest = store.put_blob(data, LAYER).digest
    with store.open_blob(digest) as stream:
        assert stream.read(10) == data[:10]
        assert stream.read(CHUNK) == data[10 : CHUNK + 10]
        stream.seek(-5, 2)
        assert stream.read() == data[-5:]
        stream.seek(3)
        assert stream.read(4) == data[3:7]


def test_missing_blob_is_blob_not_found(store: GcsStore) -> None:
    """Reading an absent blob raises BlobNotFound naming the digest; deleting it is a no-op."""
    digest = sha256_digest(b"absent")
    with pytest.raises(BlobNotFound) as caught:
        store.read_blob(digest)
    assert caught.value.key == digest
    with pytest.raises(BlobNotFound):
        store.open_blob(digest)
    store.delete_blob(digest)


def _threads_a_miss_starts(fake_gcs: FakeGcsServer, *, cache: bool) -> list[threading.Thread]:
    """The threads started while a store on a fresh client reads an absent blob."""
    client = fake_gcs.client(bucket_metadata_cache=cache)
    # create_bucket puts the bucket in the client's metadata cache: the case a
    # 404 sends a thread after.
    bucket = client.create_bucket(f"m-{uuid.uuid4().hex[:16]}")
    store = GcsStore(bucket, retry=FAST_RETRY, timeout=5.0)
    with threads_started() as started, pytest.raises(BlobNotFound):
        store.read_blob(sha256_digest(b"absent"))
    return started


def test_a_miss_starts_no_thread_once_the_metadata_cache_is_off(fake_gcs: FakeGcsServer) -> None:
    """After disable_bucket_metadata_cache a 404 read starts no thread (as made, a client does)."""
    before = set(threading.enumerate())
    as_made = _threads_a_miss_starts(fake_gcs, cache=True)
    for thread in as_made:
        thread.join(10.0)  # the emulator answers, so its bucket check ends
    assert as_made, "google-cloud-storage no longer starts a thread on a 404: is the helper needed?"
    assert _threads_a_miss_starts(fake_gcs, cache=False) == []
    assert set(threading.enumerate()) <= before


def test_invalid_digests_are_rejected(store: GcsStore) -> None:
    """Digests that are not sha256:<64 hex> never become object names."""
    for bad in ["sha256:../../etc/passwd", "md5:abc", "sha256:" + "A" * 64]:
        with pytest.raises(InvalidDigest):
            store.has_blob(bad)
        with pytest.raises(InvalidDigest):
            store.read_blob(bad)


@pytest.mark.parametrize("size", [10, 2 * CHUNK])
def test_digest_mismatch_leaves_nothing(store: GcsStore, bucket: Any, size: int) -> None:
    """Committing under the wrong digest raises DigestMismatch and removes every staged byte."""
    data = _payload(size)
    wrong = sha256_digest(b"something else")
    writer = store.open_blob_writer(LAYER)
    writer.write(data)
    with pytest.raises(DigestMismatch) as caught:
        writer.commit(wrong)
    assert caught.value.expected == wrong
    assert caught.value.actual == sha256_digest(data)
    assert _names(bucket) == []
    with pytest.raises(InvalidInput):
        writer.commit(sha256_digest(data))


def test_invalid_commit_digest_aborts(store: GcsStore, bucket: Any) -> None:
    """A malformed commit digest raises InvalidDigest and stages nothing."""
    with store.open_blob_writer(LAYER) as writer:
        writer.write(_payload(2 * CHUNK))
        with pytest.raises(InvalidDigest):
            writer.commit("sha256:nope")
    assert _names(bucket) == []


def test_abort_and_exceptions_remove_staging(store: GcsStore, bucket: Any) -> None:
    """abort() and an exception in the with block cancel the upload; nothing is visible."""
    writer = store.open_blob_writer(LAYER)
    writer.write(_payload(3 * CHUNK))
    writer.abort()

    def fail_midway() -> None:
        with store.open_blob_writer(LAYER) as second:
            second.write(_payload(3 * CHUNK))
            raise RuntimeError("builder failed")

    with pytest.raises(RuntimeError):
        fail_midway()
    with store.open_blob_writer(LAYER) as third:
        third.write(b"left without commit")
    assert _names(bucket) == []


def test_concurrent_commits_of_one_digest(store: GcsStore, bucket: Any) -> None:
    """Two writers racing to commit the same bytes give one blob, no error, no staging left."""
    data = _payload(2 * CHUNK + 1, seed=3)
    digest = sha256_digest(data)
    barrier = threading.Barrier(2)
    results: list[BlobInfo | BaseException] = []

    def upload() -> None:
        try:
            with store.open_blob_writer(LAYER) as writer:
                writer.write(data)
                barrier.wait(timeout=10)
                results.append(writer.commit(digest))
        except BaseException as exc:  # noqa: BLE001 - reported by the assertion below
            results.append(exc)

    threads = [threading.Thread(target=upload) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert results == [BlobInfo(digest, len(data), LAYER)] * 2
    assert _names(bucket) == [f"layers/{digest[7:]}"]
    assert store.read_blob(digest) == data


def test_precondition_failure_means_already_stored(
    store: GcsStore, bucket: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A create-only copy refused by its precondition (GCS's answer to a lost race) is a success.

    fake-gcs-server ignores ifGenerationMatch on copies, so the refusal is
    played here the way GCS gives it.
    """
    data = _payload(100, seed=9)
    digest = sha256_digest(data)
    store.put_blob(data, LAYER)
    calls: list[dict[str, Any]] = []

    def refuse(self: Any, source: Any, **kwargs: Any) -> Any:
        calls.append(kwargs)
        raise PRECONDITION_FAILED("At least one of the pre-conditions did not hold.")

    monkeypatch.setattr(Blob, "rewrite", refuse)
    with store.open_blob_writer("application/other") as writer:
        writer.write(data)
        info = writer.commit(digest)
    assert calls[0]["if_generation_match"] == 0
    assert info == BlobInfo(digest, len(data), LAYER)
    assert _names(bucket) == [f"layers/{digest[7:]}"]


def test_existing_blob_with_other_bytes_is_replaced(
    store: GcsStore, bucket: Any, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A blob name holding other bytes is replaced by the verified bytes written again, logged."""
    data = _payload(100, seed=10)
    digest = sha256_digest(data)
    bucket.blob(f"layers/{digest[7:]}").upload_from_string(b"corrupt", content_type=LAYER)
    rewrite = Blob.rewrite

    def create_only(self: Any, source: Any, **kwargs: Any) -> Any:
        # fake-gcs-server does not enforce preconditions on copies; GCS does.
        if kwargs.get("if_generation_match") == 0:
            raise PRECONDITION_FAILED("exists")
        return rewrite(self, source, **kwargs)

    monkeypatch.setattr(Blob, "rewrite", create_only)
    with pytest.raises(DigestMismatch):
        store.read_blob(digest)
    with (
        caplog.at_level(logging.WARNING, logger="nixery_core.storage.gcs"),
        store.open_blob_writer(LAYER) as writer,
    ):
        writer.write(data)
        writer.commit(digest)
    assert "replacing it" in caplog.text
    assert not any(name.startswith("staging/") for name in _names(bucket))
    assert store.read_blob(digest) == data


def _fails_first(monkeypatch: pytest.MonkeyPatch, name: str, times: int = 1) -> list[str]:
    """Make ``Blob.<name>`` raise ServiceUnavailable ``times`` times, then work; the calls."""
    real = getattr(Blob, name)
    calls: list[str] = []

    def flaky(self: Any, *args: Any, **kwargs: Any) -> Any:
        calls.append(self.name)
        if len(calls) <= times:
            raise SERVICE_UNAVAILABLE(f"injected {name} failure")
        return real(self, *args, **kwargs)

    monkeypatch.setattr(Blob, name, flaky)
    return calls


def test_failed_copy_keeps_its_error_and_notes_the_staging_it_could_not_delete(
    store: GcsStore, bucket: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A failed copy is the error raised, noting the staging object a failed delete left;
    the writer is failed, and leaving the with block deletes the staging object."""
    data = _payload(1000, seed=12)
    digest = sha256_digest(data)
    _fails_first(monkeypatch, "rewrite", times=99)
    deletes = _fails_first(monkeypatch, "delete")
    with store.open_blob_writer(LAYER) as writer:
        writer.write(data)
        with pytest.raises(StorageUnavailable, match="copy of staging object") as caught:
            writer.commit(digest)
        assert isinstance(caught.value.__cause__, gexc.ServiceUnavailable)
        [note] = caught.value.__notes__
        assert note.startswith(f"staging object {writer.staging_name!r} may remain: GCS delete")
        assert _names(bucket) == [writer.staging_name]
        with pytest.raises(InvalidInput, match="failed"):
            writer.commit(digest)
    assert deletes == [writer.staging_name] * 2
    assert _names(bucket) == []


def test_staging_delete_failing_once_after_the_copy_is_retried_and_the_commit_succeeds(
    store: GcsStore, bucket: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A staging delete failing once after the copy is tried again at once; once it works the
    commit succeeds (the blob is stored) and no staging object is left."""
    data = _payload(1000, seed=13)
    digest = sha256_digest(data)
    deletes = _fails_first(monkeypatch, "delete")
    with store.open_blob_writer(LAYER) as writer:
        writer.write(data)
        assert writer.commit(digest).digest == digest
    assert deletes == [writer.staging_name] * 2
    assert _names(bucket) == [f"layers/{digest[7:]}"]
    assert store.read_blob(digest) == data


def test_staging_delete_failing_again_after_the_copy_raises_saying_the_blob_is_stored(
    store: GcsStore, bucket: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A staging delete that fails on its retry too makes commit raise StorageUnavailable saying
    the blob is stored (a staging object left is never silent); the writer is failed, leaving
    the with block tries the delete again, and the error notes the staging object may remain."""
    data = _payload(1000, seed=14)
    digest = sha256_digest(data)
    deletes = _fails_first(monkeypatch, "delete", times=99)
    with (  # noqa: PT012 - the writer's exit, after the failed commit, is what adds the note
        pytest.raises(StorageUnavailable, match="is stored, but staging object") as caught,
        store.open_blob_writer(LAYER) as writer,
    ):
        writer.write(data)
        writer.commit(digest)
    assert isinstance(caught.value.__cause__, StorageUnavailable)
    assert all(note.startswith(f"staging object {writer.staging_name!r} may remain")
               for note in caught.value.__notes__)
    assert len(deletes) >= 3  # twice in the commit, again when the writer is left
    with pytest.raises(InvalidInput, match="failed"):
        writer.commit(digest)
    assert _names(bucket) == [f"layers/{digest[7:]}", writer.staging_name]
    assert store.read_blob(digest) == data


def test_put_blob_replaces_other_bytes_under_its_name(store: GcsStore, bucket: Any) -> None:
    """put_blob is create-only, but bytes under the name that are not its own are replaced."""
    for data in (b"small config", _payload(3 << 20, seed=11)):
        digest = sha256_digest(data)
        bucket.blob(f"layers/{digest[7:]}").upload_from_string(b"other", content_type=LAYER)
        assert store.put_blob(data, LAYER).size == len(data)
        assert bucket.blob(f"layers/{digest[7:]}").download_as_bytes() == data
        assert store.read_blob(digest) == data
    good = b"kept as is"
    store.put_blob(good, LAYER)
    generation = bucket.get_blob(f"layers/{sha256_digest(good)[7:]}").generation
    store.put_blob(good, LAYER)
    assert bucket.get_blob(f"layers/{sha256_digest(good)[7:]}").generation == generation


def test_objects(store: GcsStore, bucket: Any) -> None:
    """Objects are created, replaced, listed by prefix, read and deleted; absent reads are None."""
    assert store.get_object("manifests/a") is None
    store.put_object("manifests/a", b"1")
    store.put_object("manifests/a", b"2")
    store.put_object("manifests/b", b"3")
    store.put_object("builds/x", b"4")
    store.put_blob(b"blob", LAYER)
    assert store.get_object("manifests/a") == b"2"
    assert list(store.list_objects("manifests/")) == ["manifests/a", "manifests/b"]
    assert list(store.list_objects("")) == ["builds/x", "manifests/a", "manifests/b"]
    store.delete_object("manifests/a")
    store.delete_object("manifests/a")
    assert store.get_object("manifests/a") is None
    assert "manifests/b" in _names(bucket)


@pytest.mark.parametrize(
    "key", ["", "/abs", "a//b", "a/../b", "layers/x", "staging/x", "a\nb", "./a"]
)
def test_bad_object_keys(store: GcsStore, key: str) -> None:
    """Object keys that are empty, not normalised or in the blob namespace are InvalidInput."""
    with pytest.raises(InvalidInput):
        store.put_object(key, b"x")


def test_prefix_isolates_stores(bucket: Any) -> None:
    """Two prefixes in one bucket do not see each other's blobs or objects."""
    one = GcsStore(bucket, prefix="one", retry=FAST_RETRY)
    two = GcsStore(bucket.name, client=bucket.client, prefix="two/", retry=FAST_RETRY)
    info = one.put_blob(b"data", LAYER)
    one.put_object("manifests/m", b"{}")
    assert not two.has_blob(info.digest)
    assert list(two.list_objects("")) == []
    assert list(two.list_blobs()) == []
    assert _names(bucket) == [f"one/layers/{info.digest[7:]}", "one/manifests/m"]


def test_constructor_validation(bucket: Any) -> None:
    """A bucket name without a client and chunk sizes GCS cannot use are InvalidInput."""
    with pytest.raises(InvalidInput):
        GcsStore("name-only")
    with pytest.raises(InvalidInput):
        GcsStore(bucket, chunk_size=1000)
    with pytest.raises(InvalidInput):
        GcsStore(bucket, prefix="../up")


def test_missing_bucket_is_storage_unavailable(fake_gcs: FakeGcsServer) -> None:
    """Backend errors (here a missing bucket) come out as StorageUnavailable, chained."""
    store = GcsStore(fake_gcs.client().bucket("no-such-bucket"), retry=FAST_RETRY)
    with pytest.raises(StorageUnavailable) as caught:
        store.put_object("manifests/a", b"x")
    assert isinstance(caught.value.__cause__, gexc.GoogleAPIError)
    with pytest.raises(StorageUnavailable):
        store.put_blob(b"x", LAYER)


@pytest.fixture
def own_server() -> Iterator[FakeGcsServer]:
    """An emulator of this test's own, persistent so a restart shows what was left."""
    with FakeGcsServer(persistent=True) as server:
        yield server


def test_server_stopped_mid_upload(own_server: FakeGcsServer) -> None:
    """A server dying mid-upload gives a typed StorageError, no half state, a clean retry."""
    bucket = own_server.make_bucket("faults")
    store = GcsStore(bucket, chunk_size=CHUNK, retry=FAST_RETRY, timeout=2.0)
    data = _payload(4 * CHUNK, seed=5)
    digest = sha256_digest(data)

    def upload_while_server_dies() -> None:
        with store.open_blob_writer(LAYER) as writer:
            writer.write(data[: 2 * CHUNK])
            own_server.stop()
            writer.write(data[2 * CHUNK :])
            writer.commit(digest)

    with pytest.raises(StorageError) as caught:
        upload_while_server_dies()
    assert isinstance(caught.value, StorageUnavailable)
    assert caught.value.__cause__ is not None
    # The upload could not be cancelled either: a note says so, the write's error stays.
    assert "upload of staging object" in str(caught.value)
    [note] = caught.value.__notes__
    assert note.startswith("staging object 'staging/")
    assert "may remain: GCS cancel of resumable upload" in note
    with pytest.raises(StorageUnavailable):
        store.has_blob(digest)

    own_server.start()
    assert _names(bucket) == []
    with store.open_blob_writer(LAYER) as retry_writer:
        retry_writer.write(data)
        assert retry_writer.commit(digest).size == len(data)
    assert _names(bucket) == [f"layers/{digest[7:]}"]
    assert store.read_blob(digest) == data


def test_read_checks_the_digest(store: GcsStore, bucket: Any) -> None:
    """Bytes under a digest they do not hash to are reported, not returned."""
    digest = sha256_digest(b"expected")
    bucket.blob(f"layers/{digest[7:]}").upload_from_string(b"tampered", content_type=LAYER)
    with pytest.raises(DigestMismatch):
        store.read_blob(digest)


# --- concurrent blob checks ---------------------------------------------------------


def test_blob_sizes_answer_for_every_digest(store: GcsStore) -> None:
    """blob_sizes gives each stored blob's size and None for an absent one."""
    infos = [store.put_blob(_payload(100 + i, i), "application/octet-stream") for i in range(12)]
    absent = sha256_digest(b"never stored")
    sizes = store.blob_sizes([info.digest for info in infos] + [absent])
    assert sizes == {**{info.digest: info.size for info in infos}, absent: None}
    store.close()


def test_blob_sizes_run_concurrently_within_the_bound(
    store: GcsStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The metadata requests overlap, never more than concurrent_checks at once."""
    infos = [store.put_blob(_payload(50, i), "application/octet-stream") for i in range(30)]
    lock = threading.Lock()
    in_flight = [0, 0]  # now, most
    real = store._stat

    def slow_stat(name: str, key: str) -> Any:
        with lock:
            in_flight[0] += 1
            in_flight[1] = max(in_flight)
        try:
            threading.Event().wait(0.02)
            return real(name, key)
        finally:
            with lock:
                in_flight[0] -= 1

    monkeypatch.setattr(store, "_stat", slow_stat)
    sizes = store.blob_sizes([info.digest for info in infos])
    assert set(sizes.values()) == {50}
    assert 1 < in_flight[1] <= 10
    store.close()
    assert not [t for t in threading.enumerate() if t.name.startswith("nixery-gcs-check")]


def test_a_ranged_read_is_retried_for_a_short_while_only(
    bucket: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A ranged read (a fragment's) returns its range in one GET whose retry policy gives up
    after RANGE_RETRY_SECONDS, not after the store's (120 s by default): during an outage
    the store path is compressed again instead of waited for."""
    store = GcsStore(bucket)  # the client's default retry policy
    data = _payload(300_000, seed=9)
    digest = store.put_blob(data, LAYER).digest
    real = Blob.download_as_bytes
    policies: list[Any] = []

    def recording(self: Any, *args: Any, **kwargs: Any) -> Any:
        policies.append(kwargs.get("retry"))
        return real(self, *args, **kwargs)

    monkeypatch.setattr(Blob, "download_as_bytes", recording)
    assert store.read_range(digest, 1000, 5000) == data[1000:6000]
    [policy] = policies
    assert policy is not None
    assert policy.timeout == RANGE_RETRY_SECONDS < DEFAULT_RETRY.timeout


def test_streaming_a_large_blob_holds_little_and_makes_few_requests(bucket: Any) -> None:
    """Reading a 40 MB blob 64 KiB at a time through open_blob (default chunk size) holds one
    16 MiB range at once, not two, in one ranged request per range."""
    store = GcsStore(bucket)
    data = random.Random(0).randbytes(40_000_000)  # noqa: S311 - test bytes, not secrets
    digest = store.put_blob(data, LAYER).digest
    session = bucket.client._http
    requests: list[str] = []
    real = session.request

    def counting(method: str, url: str, *args: Any, **kwargs: Any) -> Any:
        requests.append(method)
        return real(method, url, *args, **kwargs)

    session.request = counting
    read = hashlib.sha256()
    tracemalloc.start()
    try:
        with store.open_blob(digest) as stream:
            while piece := stream.read(64 << 10):
                read.update(piece)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
        del session.request
    assert f"sha256:{read.hexdigest()}" == digest
    # One 16 MiB range held (was held twice: the fetched range and a buffer of its size).
    assert peak < 20 << 20, peak
    assert len(requests) <= 5, requests  # the metadata, then three 16 MiB ranges
