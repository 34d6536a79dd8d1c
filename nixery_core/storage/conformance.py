"""A conformance kit for any store: the core :class:`~nixery_core.protocols.Uploader`
and each optional capability it offers.

Each :class:`Check` takes a fresh, empty store and raises
:class:`ConformanceFailure` (an ``AssertionError``) when the store breaks a
rule.  A check that needs a capability the store does not offer
(:class:`~nixery_core.protocols.SupportsReading`, ``SupportsListing``,
``SupportsDeletion``, ``SupportsWriteTimes``, ``SupportsStagingCleanup``,
``SupportsRefresh``, ``SupportsRangeReads``, tested structurally) does not
apply to it.  No test framework is needed;
with pytest::

    from nixery_core.storage.conformance import CHECKS

    @pytest.mark.parametrize("check", CHECKS, ids=lambda c: c.name)
    def test_conformance(check, tmp_path):
        store = MyStore(tmp_path)
        if not check.applies(store):
            pytest.skip(f"needs {check.needs_names}")
        check.run(store)

or run everything at once with :func:`run_conformance`.

Every rule a check pins is written in the docstrings of the protocols in
:mod:`nixery_core.protocols` (the store's promises) and in each check's own
docstring (listed by :attr:`Check.description`); nothing is checked that
they do not say.  A store built on :class:`~nixery_core.storage.base.BaseStore`
gets the digest, key, media-type and writer rules for free.
"""

from __future__ import annotations

import contextlib
import hashlib
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from functools import partial

import attrs

from nixery_core.digests import sha256_digest
from nixery_core.errors import (
    BlobNotFound,
    DigestMismatch,
    InvalidDigest,
    InvalidInput,
    NixeryError,
)
from nixery_core.protocols import (
    BlobInfo,
    SupportsDeletion,
    SupportsListing,
    SupportsRangeReads,
    SupportsReading,
    SupportsRefresh,
    SupportsStagingCleanup,
    SupportsWriteTimes,
    SupportsWrittenDigest,
    Uploader,
)

__all__ = [
    "CHECKS",
    "HOSTILE_DIGESTS",
    "HOSTILE_KEYS",
    "Check",
    "ConformanceFailure",
    "run_conformance",
]

_TYPE = "application/vnd.oci.image.layer.v1.tar+gzip"
_CONFIG = "application/vnd.oci.image.config.v1+json"
_HEX = "0123456789abcdef" * 4

#: Strings that must never be accepted as digests.
HOSTILE_DIGESTS: tuple[str, ...] = (
    "",
    "sha256:",
    "sha256:../../etc/passwd",
    "sha256:" + _HEX.upper(),
    "sha256:" + _HEX[:-1],
    "sha256:" + _HEX + "0",
    "sha256:" + _HEX + "\n",
    "sha256:" + _HEX[:-2] + "/a",
    "sha512:" + _HEX * 2,
    "md5:d41d8cd98f00b204e9800998ecf8427e",
    _HEX,
    " sha256:" + _HEX,
    "SHA256:" + _HEX,
)

#: Strings that must never be accepted as object keys.
HOSTILE_KEYS: tuple[str, ...] = (
    "",
    "/",
    "/etc/passwd",
    "..",
    ".",
    "../escape",
    "manifests/../../escape",
    "manifests/..",
    "./manifests",
    "manifests//a",
    "manifests/",
    "manifests\\..\\a",
    "manifests/a\x00b",
    "manifests/a b",
    "manifests/\u00e4",
    "manifests/a\n",
    "layers/" + _HEX,
    "staging/x",
    "x" * 600,
)


class ConformanceFailure(AssertionError):
    """A store broke a promise of the Uploader protocol or of a capability it offers."""


def _expect(condition: bool, message: str) -> None:
    if not condition:
        raise ConformanceFailure(message)


def _expect_raises(error: type[BaseException], action: Callable[[], object], what: str) -> None:
    try:
        action()
    except error:
        return
    except BaseException as exc:
        raise ConformanceFailure(f"{what}: raised {exc!r}, expected {error.__name__}") from exc
    raise ConformanceFailure(f"{what}: did not raise {error.__name__}")


def _leftovers(store: Uploader) -> Sequence[object]:
    """Uploads still staged, where the store can say (cleaning up a far future counts them)."""
    if isinstance(store, SupportsStagingCleanup):
        return [None] * store.clean_staging(older_than=0.0, now=float("inf"), dry_run=True)
    for name in ("staging_leftovers", "staged_blobs"):
        probe = getattr(store, name, None)
        if callable(probe):
            return list(probe())
    return []


def _expect_clean(store: Uploader, what: str) -> None:
    left = _leftovers(store)
    _expect(not left, f"{what}: {len(left)} staged uploads left behind")


def _expect_absent(store: Uploader, digest: str, what: str) -> None:
    _expect(store.blob_info(digest) is None, f"{what}: blob_info({digest}) is not None")
    if isinstance(store, SupportsListing):
        _expect(
            all(info.digest != digest for info in store.list_blobs()),
            f"{what}: {digest} is listed",
        )


def _expect_bytes(store: Uploader, digest: str, data: bytes, what: str) -> None:
    """The blob holds ``data``: read back where the store reads, else by its size."""
    if isinstance(store, SupportsReading):
        _expect(store.read_blob(digest) == data, f"{what}: read_blob returned other bytes")
    else:
        info = store.blob_info(digest)
        _expect(info is not None and info.size == len(data), f"{what}: blob_info is {info!r}")


def _listed(store: Uploader) -> list[BlobInfo] | None:
    return list(store.list_blobs()) if isinstance(store, SupportsListing) else None


def _lacks(capability: type) -> ConformanceFailure:
    """Raised by a check run on a store without its capability (it does not apply)."""
    return ConformanceFailure(f"the store does not offer {capability.__name__}")


def _list_objects(store: SupportsListing, prefix: str) -> list[str]:
    return list(store.list_objects(prefix))


def _payload(seed: str, size: int) -> bytes:
    block = hashlib.sha256(seed.encode()).digest()
    return (block * (size // len(block) + 1))[:size]


# --- checks: the core (every store) ------------------------------------------------


def check_streamed_round_trip(store: Uploader) -> None:
    """A blob written in chunks commits to BlobInfo(digest, size, media type), as blob_info says."""
    data = _payload("round-trip", 300_000)
    digest = sha256_digest(data)
    with store.open_blob_writer(_TYPE) as writer:
        for start in range(0, len(data), 65_536):
            writer.write(memoryview(data)[start : start + 65_536])
        info = writer.commit(digest)
    _expect(info == BlobInfo(digest, len(data), _TYPE), f"commit returned {info!r}")
    _expect(store.blob_info(digest) == info, f"blob_info is {store.blob_info(digest)!r}")
    _expect_bytes(store, digest, data, "after commit")
    _expect_clean(store, "after commit")


def check_written_digest(store: Uploader) -> None:
    """A writer offering written_digest reports the sha256 of exactly the bytes written so far."""
    data = _payload("written-digest", 200_000)
    with store.open_blob_writer(_TYPE) as writer:
        if not isinstance(writer, SupportsWrittenDigest):
            return  # an optional ability of writers: nothing to check
        _expect(
            writer.written_digest() == sha256_digest(b""),
            f"written_digest before any write is {writer.written_digest()!r}",
        )
        writer.write(data[:70_000])
        _expect(
            writer.written_digest() == sha256_digest(data[:70_000]),
            "written_digest after a first write is not the digest of its bytes",
        )
        writer.write(memoryview(data)[70_000:])
        digest = writer.written_digest()
        _expect(digest == sha256_digest(data), f"written_digest is {digest!r}, not the bytes'")
        writer.commit(digest)
    _expect_bytes(store, sha256_digest(data), data, "after a commit under written_digest")


def check_put_blob(store: Uploader) -> None:
    """put_blob stores bytes under their sha256, and storing them again is harmless (one blob)."""
    data = b'{"architecture":"amd64"}'
    first = store.put_blob(data, _CONFIG)
    second = store.put_blob(data, _CONFIG)
    expected = BlobInfo(sha256_digest(data), len(data), _CONFIG)
    _expect(first == expected, f"put_blob returned {first!r}")
    _expect(second == expected, f"second put_blob returned {second!r}")
    _expect(store.blob_info(expected.digest) == expected, "blob_info after put_blob")
    _expect_bytes(store, expected.digest, data, "after put_blob")
    listed = _listed(store)
    _expect(listed is None or [i.digest for i in listed] == [expected.digest], "listed twice")


def check_empty_blob(store: Uploader) -> None:
    """A zero-byte blob is a blob like any other."""
    info = store.put_blob(b"", _TYPE)
    _expect(info.size == 0 and info.digest == sha256_digest(b""), f"put_blob returned {info!r}")
    _expect_bytes(store, info.digest, b"", "empty blob")


def check_digest_mismatch(store: Uploader) -> None:
    """Committing under the wrong digest raises DigestMismatch and stores nothing."""
    data = b"some bytes"
    wrong = sha256_digest(b"other bytes")
    writer = store.open_blob_writer(_TYPE)
    writer.write(data)
    _expect_raises(DigestMismatch, lambda: writer.commit(wrong), "commit under a wrong digest")
    _expect_absent(store, wrong, "after a digest mismatch")
    _expect_absent(store, sha256_digest(data), "after a digest mismatch")
    _expect_clean(store, "after a digest mismatch")


def check_invalid_digest_on_commit(store: Uploader) -> None:
    """Committing under a malformed digest raises InvalidDigest and stores nothing."""
    data = b"payload"
    for bad in HOSTILE_DIGESTS:
        writer = store.open_blob_writer(_TYPE)
        writer.write(data)
        _expect_raises(InvalidDigest, partial(writer.commit, bad), f"commit({bad!r})")
    _expect_absent(store, sha256_digest(data), "after malformed digests")
    _expect(not _listed(store), "blobs listed after malformed digests")
    _expect_clean(store, "after malformed digests")


def check_abort(store: Uploader) -> None:
    """abort() discards the staged bytes; abort twice is harmless."""
    data = b"aborted"
    writer = store.open_blob_writer(_TYPE)
    writer.write(data)
    writer.abort()
    writer.abort()
    _expect_absent(store, sha256_digest(data), "after abort")
    _expect_clean(store, "after abort")


def check_exception_in_with(store: Uploader) -> None:
    """An exception inside ``with`` discards the upload and propagates unchanged."""
    data = b"interrupted"

    class Boom(Exception):
        pass

    def interrupted() -> None:
        with store.open_blob_writer(_TYPE) as writer:
            writer.write(data)
            raise Boom

    _expect_raises(Boom, interrupted, "exception inside with")
    _expect_absent(store, sha256_digest(data), "after an exception inside with")
    _expect_clean(store, "after an exception inside with")


def check_uncommitted_exit(store: Uploader) -> None:
    """Leaving ``with`` without commit discards the upload."""
    data = b"never committed"
    with store.open_blob_writer(_TYPE) as writer:
        writer.write(data)
    _expect_absent(store, sha256_digest(data), "after leaving with uncommitted")
    _expect_clean(store, "after leaving with uncommitted")


def check_commit_existing(store: Uploader) -> None:
    """Committing a blob that is already stored succeeds, returns the same info, keeps one."""
    data = _payload("existing", 10_000)
    first = store.put_blob(data, _TYPE)
    with store.open_blob_writer(_TYPE) as writer:
        writer.write(data)
        again = writer.commit(first.digest)
    _expect(again == first, f"re-commit returned {again!r}, expected {first!r}")
    _expect_bytes(store, first.digest, data, "after a re-commit")
    listed = _listed(store)
    _expect(listed is None or len(listed) == 1, "re-commit listed twice")
    _expect_clean(store, "after a re-commit")


def check_writer_single_use(store: Uploader) -> None:
    """A writer raises InvalidInput for write or commit after a commit or an abort."""
    with store.open_blob_writer(_TYPE) as writer:
        writer.write(b"x")
        info = writer.commit(sha256_digest(b"x"))
        _expect_raises(InvalidInput, lambda: writer.write(b"y"), "write after commit")
        _expect_raises(InvalidInput, lambda: writer.commit(info.digest), "commit after commit")
    aborted = store.open_blob_writer(_TYPE)
    aborted.abort()
    _expect_raises(InvalidInput, lambda: aborted.write(b"y"), "write after abort")
    _expect_raises(InvalidInput, lambda: aborted.commit(info.digest), "commit after abort")
    _expect_bytes(store, info.digest, b"x", "committed blob after later calls")


def check_missing_blob(store: Uploader) -> None:
    """An absent blob's blob_info is None."""
    _expect_absent(store, sha256_digest(b"absent"), "absent blob")


def check_hostile_digests(store: Uploader) -> None:
    """Every method taking a digest refuses a malformed one with InvalidDigest.

    Capability methods (open_blob, read_blob, delete_blob, blob_written_at,
    has_blob) are included when the store has them.
    """
    names = ["blob_info"] + [
        name
        for name in ("has_blob", "open_blob", "read_blob", "delete_blob", "blob_written_at")
        if callable(getattr(store, name, None))
    ]
    for bad in HOSTILE_DIGESTS:
        for name in names:
            method = getattr(store, name)
            _expect_raises(InvalidDigest, partial(method, bad), f"{name}({bad!r})")


def check_bad_media_type(store: Uploader) -> None:
    """open_blob_writer and put_blob refuse a media type that is not ``type/subtype``."""
    for bad in ("", "gzip", "a/b/c", "application/x\n", "/x"):
        _expect_raises(
            InvalidInput, partial(store.open_blob_writer, bad), f"open_blob_writer({bad!r})"
        )
        _expect_raises(InvalidInput, partial(store.put_blob, b"x", bad), f"put_blob({bad!r})")
    _expect_absent(store, sha256_digest(b"x"), "after refused media types")
    _expect_clean(store, "after refused media types")


def check_object_round_trip(store: Uploader) -> None:
    """put_object stores bytes at a key; a second put replaces them; any bytes round-trip."""
    store.put_object("manifests/abc", b"one")
    _expect(store.get_object("manifests/abc") == b"one", "get_object after put")
    store.put_object("manifests/abc", b"two, longer than one")
    _expect(store.get_object("manifests/abc") == b"two, longer than one", "get after replace")
    binary = bytes(range(256)) * 64
    store.put_object("builds/x.y_z-1", binary)
    _expect(store.get_object("builds/x.y_z-1") == binary, "binary object round trip")


def check_object_missing(store: Uploader) -> None:
    """get_object of an absent key is None, also when a blob is stored."""
    store.put_blob(b"a blob", _TYPE)
    _expect(store.get_object("manifests/none") is None, "absent object is not None")


def check_hostile_keys(store: Uploader) -> None:
    """Every method taking a key refuses an unsafe one with InvalidInput and writes nothing."""
    for bad in HOSTILE_KEYS:
        _expect_raises(InvalidInput, partial(store.put_object, bad, b"x"), f"put({bad!r})")
        _expect_raises(InvalidInput, partial(store.get_object, bad), f"get({bad!r})")
        if isinstance(store, SupportsDeletion):
            _expect_raises(InvalidInput, partial(store.delete_object, bad), f"delete({bad!r})")
    if isinstance(store, SupportsListing):
        for prefix in ("/", "../", "manifests/../", "a//", "layers/x"):
            _expect_raises(
                InvalidInput, partial(_list_objects, store, prefix), f"list({prefix!r})"
            )
        _expect(list(store.list_objects("")) == [], "a refused key left an object behind")
        _expect(list(store.list_blobs()) == [], "a refused key left a blob behind")


def check_concurrent_blob_commits(store: Uploader) -> None:
    """Threads committing the same blob all succeed and leave one complete blob."""
    data = _payload("concurrent", 200_000)
    digest = sha256_digest(data)

    def upload(_: int) -> BlobInfo:
        with store.open_blob_writer(_TYPE) as writer:
            for start in range(0, len(data), 50_000):
                writer.write(data[start : start + 50_000])
            return writer.commit(digest)

    with ThreadPoolExecutor(max_workers=4) as pool:
        results = list(pool.map(upload, range(6)))
    _expect(all(r == BlobInfo(digest, len(data), _TYPE) for r in results), f"got {results!r}")
    _expect_bytes(store, digest, data, "after concurrent commits")
    listed = _listed(store)
    _expect(listed is None or [i.digest for i in listed] == [digest], "concurrent commits listed")
    _expect_clean(store, "after concurrent commits")


def check_concurrent_object_puts(store: Uploader) -> None:
    """Readers racing writers of one key only ever see a complete value (old or new)."""
    values = [_payload(f"value-{i}", 100_000 + i) for i in range(4)]
    key = "manifests/contended"
    store.put_object(key, values[0])
    stop = threading.Event()
    seen: list[bytes | None] = []

    def read() -> None:
        while not stop.is_set():
            seen.append(store.get_object(key))

    reader = threading.Thread(target=read)
    reader.start()
    try:
        with ThreadPoolExecutor(max_workers=3) as pool:
            list(pool.map(lambda i: store.put_object(key, values[i % 4]), range(12)))
    finally:
        stop.set()
        reader.join()
    torn = [v for v in seen if v not in values]
    _expect(not torn, f"{len(torn)} of {len(seen)} reads saw a torn or missing object")
    _expect(store.get_object(key) in values, "final value is not one that was written")


# --- checks: SupportsReading ---------------------------------------------------------


def check_read_back(store: Uploader) -> None:
    """open_blob and read_blob give exactly the committed bytes."""
    if not isinstance(store, SupportsReading):
        raise _lacks(SupportsReading)
    data = _payload("read-back", 150_000)
    info = store.put_blob(data, _TYPE)
    _expect(store.read_blob(info.digest) == data, "read_blob returned other bytes")
    with store.open_blob(info.digest) as stream:
        _expect(stream.read() == data, "open_blob returned other bytes")


def check_read_missing(store: Uploader) -> None:
    """open_blob and read_blob of an absent blob raise BlobNotFound."""
    if not isinstance(store, SupportsReading):
        raise _lacks(SupportsReading)
    digest = sha256_digest(b"absent")
    _expect_raises(BlobNotFound, lambda: store.open_blob(digest), "open_blob of an absent blob")
    _expect_raises(BlobNotFound, lambda: store.read_blob(digest), "read_blob of an absent blob")


# --- checks: SupportsRangeReads ------------------------------------------------------


def check_read_range(store: Uploader) -> None:
    """read_range gives exactly the bytes asked for, fewer at the blob's end, none past it;
    an absent blob raises BlobNotFound, a negative offset or length InvalidInput."""
    if not isinstance(store, SupportsRangeReads):
        raise _lacks(SupportsRangeReads)
    data = _payload("ranges", 150_000)
    digest = store.put_blob(data, _TYPE).digest
    for offset, length in ((0, 1), (0, len(data)), (1234, 56_789), (len(data) - 10, 10)):
        _expect(store.read_range(digest, offset, length) == data[offset : offset + length],
                f"read_range({offset}, {length}) returned other bytes")
    _expect(store.read_range(digest, len(data) - 10, 100) == data[-10:],
            "read_range across the end did not stop at it")
    _expect(store.read_range(digest, len(data) + 5, 10) == b"",
            "read_range past the end returned bytes")
    _expect(store.read_range(digest, 7, 0) == b"", "read_range of no bytes returned bytes")
    absent = sha256_digest(b"absent range")
    _expect_raises(BlobNotFound, lambda: store.read_range(absent, 0, 10),
                   "read_range of an absent blob")
    _expect_raises(InvalidInput, lambda: store.read_range(digest, -1, 10),
                   "read_range from a negative offset")
    _expect_raises(InvalidInput, lambda: store.read_range(digest, 0, -1),
                   "read_range of a negative length")


# --- checks: SupportsListing ---------------------------------------------------------


def check_list_blobs(store: Uploader) -> None:
    """list_blobs lists each committed blob once, sorted by digest, never a staged upload."""
    if not isinstance(store, SupportsListing):
        raise _lacks(SupportsListing)
    infos = [store.put_blob(_payload(str(i), 100 + i), _TYPE) for i in range(5)]
    infos.append(store.put_blob(b"{}", _CONFIG))
    with store.open_blob_writer(_TYPE) as pending:
        pending.write(b"staged, not committed")
        listed = list(store.list_blobs())
    _expect(listed == sorted(infos, key=lambda i: i.digest), f"list_blobs gave {listed!r}")


def check_list_objects(store: Uploader) -> None:
    """list_objects returns the keys with a plain string prefix, sorted; blobs are not objects."""
    if not isinstance(store, SupportsListing):
        raise _lacks(SupportsListing)
    keys = ["builds/k1", "builds/k2", "manifests/a", "manifests/b", "manifests/sub/c", "top"]
    for key in reversed(keys):
        store.put_object(key, key.encode())
    store.put_blob(b"a blob", _TYPE)
    for prefix, expected in (
        ("", keys), ("manifests/", keys[2:5]), ("builds/k", keys[:2]), ("manif", keys[2:5]),
        ("nothing/", []),
    ):
        got = list(store.list_objects(prefix))
        _expect(got == expected, f"list_objects({prefix!r}) gave {got!r}")


# --- checks: SupportsDeletion --------------------------------------------------------


def check_delete_blob(store: Uploader) -> None:
    """delete_blob removes one blob (others stay); deleting it again is a no-op."""
    if not isinstance(store, SupportsDeletion):
        raise _lacks(SupportsDeletion)
    keep = store.put_blob(b"keep", _TYPE)
    gone = store.put_blob(b"gone", _TYPE)
    store.delete_blob(gone.digest)
    store.delete_blob(gone.digest)
    _expect_absent(store, gone.digest, "after delete_blob")
    _expect_bytes(store, keep.digest, b"keep", "the other blob after delete_blob")


def check_delete_object(store: Uploader) -> None:
    """delete_object removes one object; deleting it again, or a key never written, is a no-op."""
    if not isinstance(store, SupportsDeletion):
        raise _lacks(SupportsDeletion)
    store.put_object("manifests/a", b"a")
    store.put_object("manifests/b", b"b")
    store.delete_object("manifests/a")
    store.delete_object("manifests/a")
    store.delete_object("manifests/never")
    _expect(store.get_object("manifests/a") is None, "deleted object still readable")
    _expect(store.get_object("manifests/b") == b"b", "delete_object removed another object")


# --- checks: SupportsWriteTimes ------------------------------------------------------


def check_write_times(store: Uploader) -> None:
    """blob_written_at is the wall-clock time of the write (within a minute), None when absent."""
    if not isinstance(store, SupportsWriteTimes):
        raise _lacks(SupportsWriteTimes)
    before = time.time()
    info = store.put_blob(b"timed", _TYPE)
    after = time.time()
    written = store.blob_written_at(info.digest)
    _expect(
        written is not None and before - 60 <= written <= after + 60,
        f"written at {written}, now is {after}",
    )
    absent = store.blob_written_at(sha256_digest(b"absent"))
    _expect(absent is None, "an absent blob has a write time")


# --- checks: SupportsStagingCleanup --------------------------------------------------


def check_staging_cleanup(store: Uploader) -> None:
    """clean_staging removes exactly the uploads it counts (dry_run), only when old enough.

    An upload left open by a crashed writer: a cut-off of an hour ago leaves
    it alone; with ``now`` two hours ahead, a dry run counts it (a store that
    has not staged anything yet, buffering small writes in memory, counts
    zero) and removes nothing, cleaning then removes what was counted, and a
    second dry run counts nothing.  Committed blobs are never touched.
    """
    if not isinstance(store, SupportsStagingCleanup):
        raise _lacks(SupportsStagingCleanup)
    kept = store.put_blob(b"committed", _TYPE)
    writer = store.open_blob_writer(_TYPE)
    writer.write(b"left by a crashed writer")
    now = time.time()
    young = store.clean_staging(older_than=3600.0, now=now)
    _expect(young == 0, f"a fresh upload was cleaned ({young})")
    later = now + 7200.0
    counted = store.clean_staging(older_than=3600.0, now=later, dry_run=True)
    recounted = store.clean_staging(older_than=3600.0, now=later, dry_run=True)
    _expect(counted in (0, 1), f"dry run counted {counted} stale uploads, expected at most 1")
    _expect(recounted == counted, f"a dry run removed uploads ({counted}, then {recounted})")
    removed = store.clean_staging(older_than=3600.0, now=later)
    _expect(removed == counted, f"removed {removed} stale uploads, counted {counted}")
    left = store.clean_staging(older_than=3600.0, now=later, dry_run=True)
    _expect(left == 0, f"{left} stale uploads left after cleaning")
    with contextlib.suppress(NixeryError):
        writer.abort()
    _expect_bytes(store, kept.digest, b"committed", "a committed blob after cleaning")


# --- checks: SupportsRefresh ---------------------------------------------------------


def check_refresh(store: Uploader) -> None:
    """touch_blob restarts a blob's age; delete_blob_if_older deletes only old blobs.

    A blob is judged against a cut-off an hour ahead (old: deleted) and one an
    hour back (young: kept); a touched blob is young; touching or deleting an
    absent blob answers ``False``; storing the same bytes again restarts the age.
    """
    if not isinstance(store, SupportsRefresh):
        raise _lacks(SupportsRefresh)
    absent = sha256_digest(b"never stored")
    _expect(store.touch_blob(absent) is False, "touch_blob of an absent blob is not False")
    _expect(
        store.delete_blob_if_older(absent, time.time() + 3600.0) is False,
        "delete_blob_if_older of an absent blob is not False",
    )
    info = store.put_blob(b"refreshed", _TYPE)
    _expect(store.touch_blob(info.digest) is True, "touch_blob of a stored blob is not True")
    _expect(
        store.delete_blob_if_older(info.digest, time.time() - 3600.0) is False,
        "a blob touched just now was deleted as older than an hour ago",
    )
    _expect(store.blob_info(info.digest) is not None, "a young blob vanished")
    _expect(
        store.delete_blob_if_older(info.digest, time.time() + 3600.0) is True,
        "a blob older than the cut-off was not deleted",
    )
    _expect_absent(store, info.digest, "after delete_blob_if_older")
    again = store.put_blob(b"refreshed", _TYPE)
    _expect(store.blob_info(again.digest) is not None, "a blob stored again is missing")


@attrs.frozen
class Check:
    """One rule of the store protocols; ``needs`` names the capabilities it tests."""

    name: str
    run: Callable[[Uploader], None]
    needs: tuple[type, ...] = ()

    @property
    def description(self) -> str:
        """What the check pins (its function's docstring)."""
        return (self.run.__doc__ or "").strip()

    @property
    def needs_names(self) -> str:
        """The capabilities needed, by name (``""`` for the core)."""
        return ", ".join(need.__name__ for need in self.needs)

    def applies(self, store: object) -> bool:
        """Whether ``store`` offers every capability the check needs (structurally)."""
        return all(isinstance(store, need) for need in self.needs)


def _checks(needs: tuple[type, ...], *functions: Callable[[Uploader], None]) -> list[Check]:
    return [Check(f.__name__.removeprefix("check_"), f, needs) for f in functions]


CHECKS: tuple[Check, ...] = (
    *_checks(
        (),
        check_streamed_round_trip,
        check_written_digest,
        check_put_blob,
        check_empty_blob,
        check_digest_mismatch,
        check_invalid_digest_on_commit,
        check_abort,
        check_exception_in_with,
        check_uncommitted_exit,
        check_commit_existing,
        check_writer_single_use,
        check_missing_blob,
        check_hostile_digests,
        check_bad_media_type,
        check_object_round_trip,
        check_object_missing,
        check_hostile_keys,
        check_concurrent_blob_commits,
        check_concurrent_object_puts,
    ),
    *_checks((SupportsReading,), check_read_back, check_read_missing),
    *_checks((SupportsRangeReads,), check_read_range),
    *_checks((SupportsListing,), check_list_blobs, check_list_objects),
    *_checks((SupportsDeletion,), check_delete_blob, check_delete_object),
    *_checks((SupportsWriteTimes,), check_write_times),
    *_checks((SupportsStagingCleanup,), check_staging_cleanup),
    *_checks((SupportsRefresh,), check_refresh),
)


def run_conformance(factory: Callable[[], Uploader]) -> tuple[str, ...]:
    """Run every check that applies, each on a fresh store from ``factory``.

    Returns the names of the checks that ran (the others need a capability
    the store does not offer).  Raises one :class:`ConformanceFailure`
    listing every failed check (a check that raised another library error
    counts as failed too).
    """
    failures: list[str] = []
    ran: list[str] = []
    for check in CHECKS:
        store = factory()
        if not check.applies(store):
            continue
        ran.append(check.name)
        try:
            check.run(store)
        except (ConformanceFailure, NixeryError) as exc:
            failures.append(f"{check.name}: {exc}")
    if failures:
        raise ConformanceFailure(
            f"{len(failures)} of {len(ran)} checks failed:\n" + "\n".join(failures)
        )
    return tuple(ran)
