"""Write images from a store into an OCI image layout directory.

An OCI image layout (image-spec ``image-layout.md``) is what ``skopeo``
(``oci:DIR:TAG``), ``umoci``, ``podman load`` and ``crane`` read::

    DIR/oci-layout          {"imageLayoutVersion": "1.0.0"}
    DIR/index.json          an image index; entries carry the tag in the
                            org.opencontainers.image.ref.name annotation
    DIR/blobs/sha256/<hex>  manifests, configs, layers

:func:`write_oci_layout` copies one image manifest (or an image index with
its per-platform manifests) and every blob it names out of an
:class:`~nixery_core.protocols.Uploader`, streaming big blobs and checking
every digest on the way.  Each file appears atomically (temporary file,
then rename); blobs are written before ``index.json`` names them, and
``index.json`` is updated under an exclusive lock on the directory, so
concurrent writers to one layout do not lose each other's tags.  An entry
with the same ref name is replaced in place; other entries (and fields this
library does not know) are kept.

A layout never shares an inode with the store: a hard link would let a
store blob corrupted later (a flipped bit, a truncated file) corrupt every
layout exported from it.  Blobs are copied, or with ``link=True`` (the
default) cloned copy-on-write where the filesystem can (``FICLONE``:
btrfs, XFS, bcachefs), and every blob written, or already in the layout,
is hashed and checked against its digest: a store blob that does not
match raises :class:`~nixery_core.errors.DigestMismatch` and nothing names
it in ``index.json``; a layout blob that does not match is replaced.

The image's referrers that the store records (its SBOMs, see
:mod:`nixery_core.sbom.referrers`) are written too, as untagged
``index.json`` entries whose manifests name the image as ``subject``, where
OCI 1.1 layout readers (``oras discover --oci-layout``) find them.
"""

from __future__ import annotations

import contextlib
import fcntl
import io
import json
import os
import re
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import cast

from nixery_core.digests import Sha256Counter, digest_hex, sha256_digest, validate_digest
from nixery_core.durable import fsync_dir
from nixery_core.errors import (
    BlobNotFound,
    DigestMismatch,
    InvalidInput,
    InvalidManifest,
    StorageUnavailable,
)
from nixery_core.manifest import (
    OCI_INDEX,
    REF_NAME_ANNOTATION,
    Descriptor,
    Format,
    ManifestRef,
    ParsedIndex,
    canonical_json,
    parse_index,
    parse_manifest,
    render_index,
    sniff_media_type,
)
from nixery_core.media_types import IMAGE_MANIFEST_TYPES, INDEX_TYPES, OCI_MANIFEST
from nixery_core.names import Architecture
from nixery_core.protocols import JSONValue, ReadableStore
from nixery_core.sbom.referrers import referrer_digests

__all__ = [
    "LAYOUT_VERSION",
    "layout_blob_path",
    "read_layout_blob",
    "read_oci_layout",
    "write_oci_index",
    "write_oci_layout",
]

LAYOUT_VERSION = "1.0.0"
_CHUNK = 1 << 20
#: ioctl(dest_fd, FICLONE, src_fd): share the source's extents copy-on-write (linux/fs.h).
_FICLONE = 0x40049409
# image-spec annotations.md: the grammar of org.opencontainers.image.ref.name.
_REF_NAME = re.compile(
    r"[A-Za-z0-9]+(?:(?:[-._:@+]|--)[A-Za-z0-9]+)*(?:/[A-Za-z0-9]+(?:(?:[-._:@+]|--)[A-Za-z0-9]+)*)*"
)


@contextlib.contextmanager
def _translated(what: str) -> Iterator[None]:
    try:
        yield
    except OSError as exc:
        raise StorageUnavailable(f"writing the OCI layout failed at {what}: {exc}", what) from exc


class _Layout:
    """One layout directory being written."""

    def __init__(self, directory: Path, *, durable: bool) -> None:
        self.root = Path(directory)
        self.blobs = self.root / "blobs" / "sha256"
        self.durable = durable

    def blob(self, digest: str) -> Path:
        return self.blobs / digest_hex(digest)

    @contextlib.contextmanager
    def temp(self) -> Iterator[tuple[int, Path]]:
        """A temporary file in the layout root (same filesystem as every target)."""
        fd, name = tempfile.mkstemp(prefix=".tmp-", dir=self.root)
        path = Path(name)
        try:
            yield fd, path
        finally:
            with contextlib.suppress(OSError):
                os.close(fd)
            with contextlib.suppress(FileNotFoundError):
                path.unlink()

    def publish(self, fd: int, temp: Path, target: Path) -> None:
        os.fchmod(fd, 0o644)
        if self.durable:
            os.fsync(fd)
        temp.replace(target)
        if self.durable:
            fsync_dir(target.parent)

    def write_file(self, target: Path, data: bytes) -> None:
        with self.temp() as (fd, temp):
            with os.fdopen(os.dup(fd), "wb") as handle:
                handle.write(data)
            self.publish(fd, temp, target)

    def prepare(self) -> None:
        self.blobs.mkdir(parents=True, exist_ok=True)
        marker = self.root / "oci-layout"
        try:
            existing = json.loads(marker.read_bytes())
        except FileNotFoundError:
            self.write_file(marker, canonical_json({"imageLayoutVersion": LAYOUT_VERSION}))
            return
        except ValueError as exc:
            raise InvalidManifest(f"{marker} is not JSON: {exc}") from exc
        if not isinstance(existing, dict) or existing.get("imageLayoutVersion") != LAYOUT_VERSION:
            raise InvalidManifest(f"{marker} is not an OCI layout {LAYOUT_VERSION} marker")

    def put_bytes(self, descriptor: Descriptor, data: bytes) -> None:
        actual = sha256_digest(data)
        if actual != descriptor.digest or len(data) != descriptor.size:
            raise DigestMismatch(descriptor.digest, actual)
        if not _file_matches(self.blob(descriptor.digest), descriptor):
            self.write_file(self.blob(descriptor.digest), data)

    def copy_blob(self, store: ReadableStore, descriptor: Descriptor, *, link: bool) -> None:
        target = self.blob(descriptor.digest)
        if _file_matches(target, descriptor):
            return
        with self.temp() as (fd, temp), store.open_blob(descriptor.digest) as source:
            counter = Sha256Counter()
            if link and _clone(source, fd):
                # Shared extents, not a shared inode: hash what the clone holds.
                offset = 0
                while chunk := os.pread(fd, _CHUNK, offset):
                    counter.update(chunk)
                    offset += len(chunk)
            else:
                with os.fdopen(os.dup(fd), "wb") as handle:
                    while chunk := source.read(_CHUNK):
                        counter.update(chunk)
                        handle.write(chunk)
            if counter.digest() != descriptor.digest or counter.size != descriptor.size:
                raise DigestMismatch(descriptor.digest, counter.digest())
            self.publish(fd, temp, target)

    def add_to_index(self, descriptor: Descriptor) -> None:
        """Add ``descriptor`` to index.json under a lock, replacing its ref name."""
        fd = os.open(self.root, os.O_RDONLY | os.O_DIRECTORY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            index_file = self.root / "index.json"
            try:
                raw = index_file.read_bytes()
            except FileNotFoundError:
                document: dict[str, object] = {"schemaVersion": 2, "manifests": []}
            else:
                parse_index(raw)  # validates every entry
                document = json.loads(raw)
            entries = document["manifests"]
            if not isinstance(entries, list):  # parse_index checked; keeps mypy informed
                raise InvalidManifest("index.json manifests is not a list")
            document["manifests"] = _replace_entry(entries, descriptor)
            document["mediaType"] = OCI_INDEX
            self.write_file(index_file, canonical_json(cast(JSONValue, document)))
        finally:
            os.close(fd)  # releases the lock


def _file_matches(path: Path, descriptor: Descriptor) -> bool:
    """Whether ``path`` exists with the descriptor's size and digest."""
    counter = Sha256Counter()
    try:
        with path.open("rb") as stream:
            if os.fstat(stream.fileno()).st_size != descriptor.size:
                return False
            while chunk := stream.read(_CHUNK):
                counter.update(chunk)
    except FileNotFoundError:
        return False
    return counter.digest() == descriptor.digest


def _clone(source: object, fd: int) -> bool:
    """Clone ``source``'s extents into ``fd`` (copy-on-write); False where unsupported."""
    fileno = getattr(source, "fileno", None)
    if not callable(fileno):
        return False
    try:
        fcntl.ioctl(fd, _FICLONE, fileno())
    except (OSError, ValueError, io.UnsupportedOperation):
        return False  # another filesystem, no reflinks here, or not a real file
    return True


def _ref_of(entry: object) -> str | None:
    if isinstance(entry, dict) and isinstance(entry.get("annotations"), dict):
        value = entry["annotations"].get(REF_NAME_ANNOTATION)
        return value if isinstance(value, str) else None
    return None


def _replace_entry(entries: list[object], descriptor: Descriptor) -> list[object]:
    new: JSONValue = descriptor.to_json()
    ref = descriptor.annotation(REF_NAME_ANNOTATION)
    if ref is None:
        if new in entries:
            return entries
        return [*entries, new]
    out: list[object] = []
    placed = False
    for entry in entries:
        if _ref_of(entry) == ref:
            if not placed:
                out.append(new)
                placed = True
        else:
            out.append(entry)
    if not placed:
        out.append(new)
    return out


def _child_bytes(
    store: ReadableStore, extra_blobs: Mapping[str, bytes], descriptor: Descriptor
) -> bytes:
    if descriptor.digest in extra_blobs:
        return extra_blobs[descriptor.digest]
    return store.read_blob(descriptor.digest)


def _write_tree(
    layout: _Layout,
    store: ReadableStore,
    descriptor: Descriptor,
    data: bytes,
    extra_blobs: Mapping[str, bytes],
    *,
    link: bool,
) -> None:
    """Write a manifest or index, and everything below it, blobs first."""
    if descriptor.media_type in INDEX_TYPES:
        for child in parse_index(data, descriptor.media_type).manifests:
            if child.media_type not in IMAGE_MANIFEST_TYPES | INDEX_TYPES:
                raise InvalidManifest(f"index entry {child.digest} is a {child.media_type}")
            child_data = _child_bytes(store, extra_blobs, child)
            _write_tree(layout, store, child, child_data, extra_blobs, link=link)
    else:
        for blob in parse_manifest(data, descriptor.media_type).blobs:
            layout.copy_blob(store, blob, link=link)
    layout.put_bytes(descriptor, data)


def write_oci_layout(
    directory: Path,
    *,
    store: ReadableStore,
    manifest: bytes,
    ref_name: str | None,
    media_type: str | None = None,
    extra_blobs: Mapping[str, bytes] | None = None,
    link: bool = True,
    durable: bool = True,
    referrers: bool = True,
) -> Descriptor:
    """Write an image (manifest or index) and its blobs into an OCI layout at ``directory``.

    ``manifest`` is an image manifest (OCI or Docker schema 2) or an image
    index; ``media_type`` defaults to its ``mediaType`` field.  The config
    and layers come from ``store``; an index's per-platform manifests come
    from ``extra_blobs`` (digest -> bytes) or else from ``store`` blobs.
    ``ref_name`` is the tag (``latest``, ``shell-git``); ``None`` adds an
    untagged entry.  The directory is created if needed; an existing layout
    keeps its other images.  Returns the descriptor added to ``index.json``.
    ``link=True`` clones blobs copy-on-write where the filesystem can, else
    copies them (``link=False`` always copies); a layout never shares an
    inode with the store, and every blob is hashed on the way.
    ``referrers`` also writes each image manifest's referrers (SBOMs) the
    store records, as untagged entries.

    Raises :class:`~nixery_core.errors.BlobNotFound` for a blob the store
    lacks, :class:`~nixery_core.errors.DigestMismatch` when a stored blob
    does not match its descriptor, :class:`~nixery_core.errors.InvalidManifest`
    for malformed JSON and :class:`~nixery_core.errors.StorageUnavailable`
    for IO errors.  Nothing is added to ``index.json`` unless every blob was
    written.
    """
    if ref_name is not None and not _REF_NAME.fullmatch(ref_name):
        raise InvalidInput(f"invalid OCI ref name {ref_name!r}")
    kind = media_type or sniff_media_type(manifest)
    if kind not in IMAGE_MANIFEST_TYPES | INDEX_TYPES:
        raise InvalidManifest(f"{kind!r} is neither an image manifest nor an index")
    annotations = {REF_NAME_ANNOTATION: ref_name} if ref_name is not None else {}
    descriptor = Descriptor(kind, sha256_digest(manifest), len(manifest), annotations)
    layout = _Layout(directory, durable=durable)
    with _translated(str(directory)):
        layout.root.mkdir(parents=True, exist_ok=True)
        layout.prepare()
        _write_tree(layout, store, descriptor, bytes(manifest), extra_blobs or {}, link=link)
        layout.add_to_index(descriptor)
    if referrers:
        subjects = [descriptor.digest]
        if kind in INDEX_TYPES:
            subjects = [m.digest for m in parse_index(manifest, kind).manifests]
        for subject in subjects:
            for digest in referrer_digests(store, subject):
                write_oci_layout(
                    directory, store=store, manifest=store.read_blob(digest), ref_name=None,
                    media_type=OCI_MANIFEST, link=link, durable=durable, referrers=False,
                )
    return descriptor


def write_oci_index(
    directory: Path,
    *,
    store: ReadableStore,
    manifests: Sequence[tuple[bytes, Architecture]],
    ref_name: str | None,
    format: Format = "oci",  # noqa: A002 - the same keyword as render_index
    link: bool = True,
    durable: bool = True,
) -> Descriptor:
    """Write a multi-architecture image: per-platform manifests under one index and tag.

    Each manifest's config and layers come from ``store``; the index is
    rendered with :func:`~nixery_core.manifest.render_index` in ``format``.
    """
    refs: list[ManifestRef] = []
    children: dict[str, bytes] = {}
    for data, arch in manifests:
        digest = sha256_digest(data)
        refs.append(ManifestRef(digest, len(data), sniff_media_type(data), arch))
        children[digest] = data
    index, index_type = render_index(refs, format)
    return write_oci_layout(
        directory,
        store=store,
        manifest=index,
        ref_name=ref_name,
        media_type=index_type,
        extra_blobs=children,
        link=link,
        durable=durable,
    )


# --- reading -------------------------------------------------------------------


def read_oci_layout(directory: Path) -> ParsedIndex:
    """The layout's ``index.json`` (checks the ``oci-layout`` marker first)."""
    root = Path(directory)
    try:
        marker = json.loads((root / "oci-layout").read_bytes())
        raw = (root / "index.json").read_bytes()
    except FileNotFoundError as exc:
        raise InvalidManifest(f"{root} is not an OCI layout: {exc.filename} missing") from exc
    except ValueError as exc:
        raise InvalidManifest(f"{root}/oci-layout is not JSON: {exc}") from exc
    if not isinstance(marker, dict) or marker.get("imageLayoutVersion") != LAYOUT_VERSION:
        raise InvalidManifest(f"{root}/oci-layout is not an OCI layout {LAYOUT_VERSION} marker")
    return parse_index(raw)


def layout_blob_path(directory: Path, digest: str) -> Path:
    """Where a blob lives in a layout (the digest is validated first)."""
    return Path(directory) / "blobs" / "sha256" / digest_hex(validate_digest(digest))


def read_layout_blob(directory: Path, digest: str) -> bytes:
    """A blob from a layout, checked against its digest."""
    path = layout_blob_path(directory, digest)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise BlobNotFound(digest) from None
    if sha256_digest(data) != digest:
        raise DigestMismatch(digest, sha256_digest(data))
    return data
