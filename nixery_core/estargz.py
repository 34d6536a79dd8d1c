"""eStargz layers: a valid ``tar+gzip`` blob whose files can be fetched one by one.

The layout follows the stargz-snapshotter ``estargz`` package (its
``docs/estargz.md``), as containers-storage and the stargz snapshotter
read it:

* the blob is a sequence of gzip members that together decompress to one
  tar, so gunzip, Docker, containerd and every registry client read it as
  an ordinary gzip layer;
* each chunk of a regular file's content starts a new gzip member at the
  offset its TOC entry records; the member goes on with the tar padding and
  the headers that follow, up to the next file's content (the stargz
  writer's own layout).  Files are cut into chunks by content
  (:mod:`nixery_core.chunked`), not at fixed 4 MiB as ``ctr-remote``
  does: the TOC records each chunk's ``chunkOffset``/``chunkSize``, which
  readers take as given;
* then one gzip member holding the tar entry ``stargz.index.json`` (the TOC
  JSON: ``{"version": 1, "entries": [...]}``) and the end-of-archive
  blocks, so the TOC is part of the layer (it appears as
  ``/stargz.index.json`` in a container's root filesystem, as with every
  eStargz image);
* last, the 51-byte footer: an empty gzip member whose extra field ``SG``
  holds ``"%016xSTARGZ" % toc_offset``.

The layer descriptor in an OCI manifest carries
``containerd.io/snapshot/stargz/toc.digest`` (sha256 of the TOC JSON) and
``io.containers.estargz.uncompressed-size`` (the tar's size).  A Docker
schema 2 manifest has no annotations: there the layer is served as a plain
gzip layer and every client pulls it whole.
"""

from __future__ import annotations

import hashlib
import struct
import tarfile
from collections.abc import Callable

from nixery_core.chunked import TOC_KEYS, Annotations, Sink, each_frame
from nixery_core.compression import FramesCompressor, FrameStream
from nixery_core.toc_spool import TocSpool

__all__ = [
    "FOOTER_SIZE",
    "TOC_DIGEST_ANNOTATION",
    "TOC_NAME",
    "UNCOMPRESSED_SIZE_ANNOTATION",
    "EStargzFormat",
    "footer",
]

TOC_NAME = "stargz.index.json"
TOC_DIGEST_ANNOTATION = "containerd.io/snapshot/stargz/toc.digest"
UNCOMPRESSED_SIZE_ANNOTATION = "io.containers.estargz.uncompressed-size"
FOOTER_SIZE = 51
#: The keys of an eStargz TOC entry, in order (no ``endOffset``: readers
#: take a chunk's end from the next entry's offset).
TOC_ENTRY_KEYS = tuple(key for key in TOC_KEYS if key != "endOffset")


def footer(toc_offset: int) -> bytes:
    """The 51-byte eStargz footer pointing at the TOC member at ``toc_offset``."""
    subfield = b"%016xSTARGZ" % toc_offset
    extra = b"SG" + struct.pack("<H", len(subfield)) + subfield
    header = b"\x1f\x8b\x08\x04\x00\x00\x00\x00\x00\xff" + struct.pack("<H", len(extra)) + extra
    # A stored (uncompressed) final deflate block of length 0, CRC-32 0, size 0.
    out = header + b"\x01\x00\x00\xff\xff" + bytes(8)
    if len(out) != FOOTER_SIZE:  # pragma: no cover - fixed layout
        raise AssertionError(len(out))
    return out


class EStargzFormat:
    """The eStargz :class:`~nixery_core.chunked.FrameFormat` over one gzip member compressor.

    ``stream_member`` makes the streaming twin of ``compress_member`` for
    the TOC member (:func:`~nixery_core.compression.frame_stream`).
    """

    merge_metadata = True
    toc_keys: tuple[str, ...] = TOC_ENTRY_KEYS

    def __init__(
        self,
        compress_member: Callable[[bytes | bytearray | memoryview], bytes],
        *,
        mtime: int,
        stream_member: Callable[[int], FrameStream],
        compress_members: FramesCompressor | None = None,
    ) -> None:
        self.compress_frame = compress_member
        self.compress_frames = compress_members or each_frame(compress_member)
        self._stream_member = stream_member
        self._mtime = mtime

    def trailer(
        self, toc: TocSpool, offset: int, tar_size: int, write: Sink, tar: Sink
    ) -> Annotations:
        """The TOC member, end-of-archive and footer, for frames ending at ``offset``.

        The member (tar header, TOC JSON, padding, end-of-archive) is one
        gzip member compressed as the TOC streams from the spool.
        """
        size = toc.size
        info = tarfile.TarInfo(TOC_NAME)
        info.size = size
        info.mode = 0o444
        info.mtime = self._mtime
        header = info.tobuf(tarfile.USTAR_FORMAT, "utf-8", "strict")
        end = bytes(-size % 512) + bytes(1024)
        member = self._stream_member(len(header) + size + len(end))
        digest = hashlib.sha256()

        def put(piece: bytes | bytearray) -> None:
            tar(piece)
            out = member.compress(piece)
            if out:
                write(out)

        put(header)
        for piece in toc.pieces():
            digest.update(piece)
            put(piece)
        put(end)
        write(member.finish())
        write(footer(offset))
        return (
            (TOC_DIGEST_ANNOTATION, "sha256:" + digest.hexdigest()),
            (UNCOMPRESSED_SIZE_ANNOTATION, str(tar_size + len(header) + size + len(end))),
        )
