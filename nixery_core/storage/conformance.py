"""A conformance suite for any :class:`~nixery_core.protocols.Uploader`.

Each :class:`Check` takes a fresh, empty store and raises
:class:`ConformanceFailure` (an ``AssertionError``) when the store breaks a
promise of the protocol.  No test framework is needed; with pytest::

    from nixery_core.storage.conformance import CHECKS

    @pytest.mark.parametrize("check", CHECKS, ids=lambda c: c.name)
    def test_conformance(check, tmp_path):
        check.run(MyStore(tmp_path))

or run everything at once with :func:`run_conformance`.

What the checks pin, beyond the protocol docstrings (decisions every store
in this library follows):

- deleting an absent blob or object is a no-op;
- ``list_blobs`` and ``list_objects`` return every entry once, sorted;
  ``list_objects`` takes a plain string prefix;
- a bad digest raises :class:`~nixery_core.errors.InvalidDigest`, a bad key
  or prefix :class:`~nixery_core.errors.InvalidInput`, before any IO;
- a writer is single-use: writing or committing after commit or abort
  raises :class:`~nixery_core.errors.InvalidInput`.

If the store has a ``staging_leftovers()`` or ``staged_blobs()`` method,
the checks also require it to be empty after aborts and failed commits.
"""

from __future__ import annotations

import hashlib
import threading
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
from nixery_core.protocols import BlobInfo, Uploader

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
    """A store broke a promise of the Uploader protocol."""


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
    for name in ("staging_leftovers", "staged_blobs"):
        probe = getattr(store, name, None)
        if callable(probe):
            return list(probe())
    return []


def _expect_clean(store: Uploader, what: str) -> None:
    left = _leftovers(store)
    _expect(not left, f"{what}: staged uploads left behind: {left!r}")


def _expect_absent(store: Uploader, digest: str, what: str) -> None:
    _expect(not store.has_blob(digest), f"{what}: has_blob({digest}) is true")
    _expect(store.blob_info(digest) is None, f"{what}: blob_info({digest}) is not None")
    _expect(
        all(info.digest != digest for info in store.list_blobs()),
        f"{what}: {digest} is listed",
    )


def _list_objects(store: Uploader, prefix: str) -> list[str]:
    return list(store.list_objects(prefix))


def _payload(seed: str, size: int) -> bytes:
    block = hashlib.sha256(seed.encode()).digest()
    return (block * (size // len(block) + 1))[:size]


# --- checks: blobs -------------------------------------------------------------


def check_streamed_round_trip(store: Uploader) -> None:
    """A blob written in chunks reads back whole, with size and media type."""
    data = _payload("round-trip", 300_000)
    digest = sha256_digest(data)
    with store.open_blob_writer(_TYPE) as writer:
        for start in range(0, len(data), 65_536):
            writer.write(memoryview(data)[start : start + 65_536])
        info = writer.commit(digest)
    _expect(info == BlobInfo(digest, len(data), _TYPE), f"commit returned {info!r}")
    _expect(store.has_blob(digest), "has_blob is false after commit")
    _expect(store.blob_info(digest) == info, f"blob_info is {store.blob_info(digest)!r}")
    _expect(store.read_blob(digest) == data, "read_blob returned other bytes")
    with store.open_blob(digest) as stream:
        _expect(stream.read() == data, "open_blob returned other bytes")
    _expect_clean(store, "after commit")


def check_put_blob(store: Uploader) -> None:
    """put_blob stores bytes under their sha256, and storing them again is harmless."""
    data = b'{"architecture":"amd64"}'
    first = store.put_blob(data, _CONFIG)
    second = store.put_blob(data, _CONFIG)
    expected = BlobInfo(sha256_digest(data), len(data), _CONFIG)
    _expect(first == expected, f"put_blob returned {first!r}")
    _expect(second == expected, f"second put_blob returned {second!r}")
    _expect(store.read_blob(expected.digest) == data, "read_blob returned other bytes")
    _expect([i.digest for i in store.list_blobs()] == [expected.digest], "listed more than once")


def check_empty_blob(store: Uploader) -> None:
    """A zero-byte blob is a blob like any other."""
    info = store.put_blob(b"", _TYPE)
    _expect(info.size == 0 and info.digest == sha256_digest(b""), f"put_blob returned {info!r}")
    _expect(store.read_blob(info.digest) == b"", "empty blob read back non-empty")


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
    _expect(list(store.list_blobs()) == [], "blobs listed after malformed digests")
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
    """An exception inside ``with`` discards the upload and propagates."""
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
    """Committing a blob that is already stored succeeds and changes nothing."""
    data = _payload("existing", 10_000)
    first = store.put_blob(data, _TYPE)
    with store.open_blob_writer(_TYPE) as writer:
        writer.write(data)
        again = writer.commit(first.digest)
    _expect(again == first, f"re-commit returned {again!r}, expected {first!r}")
    _expect(store.read_blob(first.digest) == data, "content changed by a re-commit")
    _expect(len(list(store.list_blobs())) == 1, "re-commit listed twice")
    _expect_clean(store, "after a re-commit")


def check_writer_single_use(store: Uploader) -> None:
    """A writer refuses writes and commits after commit or abort."""
    with store.open_blob_writer(_TYPE) as writer:
        writer.write(b"x")
        info = writer.commit(sha256_digest(b"x"))
        _expect_raises(InvalidInput, lambda: writer.write(b"y"), "write after commit")
        _expect_raises(InvalidInput, lambda: writer.commit(info.digest), "commit after commit")
    aborted = store.open_blob_writer(_TYPE)
    aborted.abort()
    _expect_raises(InvalidInput, lambda: aborted.write(b"y"), "write after abort")
    _expect(store.read_blob(info.digest) == b"x", "committed blob damaged by later calls")


def check_missing_blob(store: Uploader) -> None:
    """An absent blob: has_blob false, blob_info None, open/read raise BlobNotFound."""
    digest = sha256_digest(b"absent")
    _expect_absent(store, digest, "absent blob")
    _expect_raises(BlobNotFound, lambda: store.open_blob(digest), "open_blob of an absent blob")
    _expect_raises(BlobNotFound, lambda: store.read_blob(digest), "read_blob of an absent blob")


def check_hostile_digests(store: Uploader) -> None:
    """Every blob method refuses malformed digests with InvalidDigest."""
    for bad in HOSTILE_DIGESTS:
        for name in ("has_blob", "blob_info", "open_blob", "read_blob", "delete_blob"):
            method = getattr(store, name)
            _expect_raises(InvalidDigest, partial(method, bad), f"{name}({bad!r})")


def check_bad_media_type(store: Uploader) -> None:
    """A blob writer refuses a media type that is not ``type/subtype``."""
    for bad in ("", "gzip", "a/b/c", "application/x\n", "/x"):
        _expect_raises(
            InvalidInput, partial(store.open_blob_writer, bad), f"open_blob_writer({bad!r})"
        )
    _expect_clean(store, "after refused media types")


def check_delete_blob(store: Uploader) -> None:
    """delete_blob removes a blob (others stay); deleting it again is a no-op."""
    keep = store.put_blob(b"keep", _TYPE)
    gone = store.put_blob(b"gone", _TYPE)
    store.delete_blob(gone.digest)
    store.delete_blob(gone.digest)
    _expect_absent(store, gone.digest, "after delete_blob")
    _expect(store.read_blob(keep.digest) == b"keep", "delete_blob removed another blob")


def check_list_blobs(store: Uploader) -> None:
    """list_blobs lists each committed blob once, sorted, with size and media type."""
    infos = [store.put_blob(_payload(str(i), 100 + i), _TYPE) for i in range(5)]
    infos.append(store.put_blob(b"{}", _CONFIG))
    with store.open_blob_writer(_TYPE) as pending:
        pending.write(b"staged, not committed")
        listed = list(store.list_blobs())
    _expect(listed == sorted(infos, key=lambda i: i.digest), f"list_blobs gave {listed!r}")


# --- checks: objects -----------------------------------------------------------


def check_object_round_trip(store: Uploader) -> None:
    """put_object stores bytes at a key; a second put replaces them."""
    store.put_object("manifests/abc", b"one")
    _expect(store.get_object("manifests/abc") == b"one", "get_object after put")
    store.put_object("manifests/abc", b"two, longer than one")
    _expect(store.get_object("manifests/abc") == b"two, longer than one", "get after replace")
    binary = bytes(range(256)) * 64
    store.put_object("builds/x.y_z-1", binary)
    _expect(store.get_object("builds/x.y_z-1") == binary, "binary object round trip")


def check_object_missing_and_delete(store: Uploader) -> None:
    """get_object of an absent key is None; delete_object removes and is idempotent."""
    _expect(store.get_object("manifests/none") is None, "absent object is not None")
    store.put_object("manifests/a", b"a")
    store.put_object("manifests/b", b"b")
    store.delete_object("manifests/a")
    store.delete_object("manifests/a")
    store.delete_object("manifests/never")
    _expect(store.get_object("manifests/a") is None, "deleted object still readable")
    _expect(store.get_object("manifests/b") == b"b", "delete_object removed another object")


def check_list_objects(store: Uploader) -> None:
    """list_objects returns the keys with a string prefix, sorted; blobs are not objects."""
    keys = ["builds/k1", "builds/k2", "manifests/a", "manifests/b", "manifests/sub/c", "top"]
    for key in reversed(keys):
        store.put_object(key, key.encode())
    store.put_blob(b"a blob", _TYPE)
    got = list(store.list_objects(""))
    _expect(got == keys, f"list_objects('') gave {got!r}")
    got = list(store.list_objects("manifests/"))
    _expect(got == keys[2:5], f"list_objects('manifests/') gave {got!r}")
    got = list(store.list_objects("builds/k"))
    _expect(got == keys[:2], f"list_objects('builds/k') gave {got!r}")
    got = list(store.list_objects("manif"))
    _expect(got == keys[2:5], f"list_objects('manif') gave {got!r}")
    got = list(store.list_objects("nothing/"))
    _expect(got == [], f"list_objects('nothing/') gave {got!r}")


def check_hostile_keys(store: Uploader) -> None:
    """Object methods refuse unsafe keys with InvalidInput and write nothing."""
    for bad in HOSTILE_KEYS:
        _expect_raises(InvalidInput, partial(store.put_object, bad, b"x"), f"put({bad!r})")
        _expect_raises(InvalidInput, partial(store.get_object, bad), f"get({bad!r})")
        _expect_raises(InvalidInput, partial(store.delete_object, bad), f"delete({bad!r})")
    for prefix in ("/", "../", "manifests/../", "a//", "layers/x"):
        _expect_raises(InvalidInput, partial(_list_objects, store, prefix), f"list({prefix!r})")
    _expect(list(store.list_objects("")) == [], "a refused key left an object behind")
    _expect(list(store.list_blobs()) == [], "a refused key left a blob behind")


# --- checks: concurrency -------------------------------------------------------


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
    _expect(store.read_blob(digest) == data, "concurrent commits left other bytes")
    _expect([i.digest for i in store.list_blobs()] == [digest], "concurrent commits listed")
    _expect_clean(store, "after concurrent commits")


def check_concurrent_object_puts(store: Uploader) -> None:
    """Readers racing writers of one key only ever see a complete value."""
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


@attrs.frozen
class Check:
    """One named promise of the Uploader protocol."""

    name: str
    run: Callable[[Uploader], None]

    @property
    def description(self) -> str:
        """What the check pins (its function's docstring)."""
        return (self.run.__doc__ or "").strip()


CHECKS: tuple[Check, ...] = tuple(
    Check(function.__name__.removeprefix("check_"), function)
    for function in (
        check_streamed_round_trip,
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
        check_delete_blob,
        check_list_blobs,
        check_object_round_trip,
        check_object_missing_and_delete,
        check_list_objects,
        check_hostile_keys,
        check_concurrent_blob_commits,
        check_concurrent_object_puts,
    )
)


def run_conformance(factory: Callable[[], Uploader]) -> None:
    """Run every check, each on a fresh store from ``factory``.

    Raises one :class:`ConformanceFailure` listing every failed check (a
    check that raised another library error counts as failed too).
    """
    failures: list[str] = []
    for check in CHECKS:
        try:
            check.run(factory())
        except (ConformanceFailure, NixeryError) as exc:
            failures.append(f"{check.name}: {exc}")
    if failures:
        raise ConformanceFailure(
            f"{len(failures)} of {len(CHECKS)} checks failed:\n" + "\n".join(failures)
        )
