"""zstd:chunked layers, as containers-storage (podman, CRI-O) reads them.

* Media type ``application/vnd.oci.image.layer.v1.tar+zstd``: concatenated
  zstd frames that ``zstd -d`` (and every zstd reader) decompresses to one
  ordinary tar, so clients without partial pulls read it as a zstd layer.
* Tar headers (with the padding before them) and file contents are in
  separate frames; a file's content is cut into chunks by content
  (:mod:`nixery_core.chunked`), each its own frame.  The last frame holds
  the end-of-archive blocks.
* Then a skippable frame (magic ``0x184D2A50``) holding the zstd-compressed
  TOC JSON ``{"version": 1, "entries": [...]}``: ``reg`` entries with
  name, mode, size, modtime, uid, gid, ``digest`` (sha256 of the file),
  ``offset``/``endOffset`` (the compressed range of its first chunk, or of
  the whole file when it is one chunk) and, for files of several chunks,
  ``chunkSize``/``chunkDigest``, followed by one ``chunk`` entry per further
  chunk (``chunkOffset``, ``chunkSize``, ``chunkDigest``,
  ``offset``/``endOffset``); ``dir``, ``symlink`` and ``hardlink`` entries
  (``linkName``).
* Last, a 48-byte skippable frame whose payload is four little-endian u64
  (TOC offset, compressed length, uncompressed length, type 1) and the
  magic ``GnUlInUx`` (bytes ``47 6e 55 6c 49 6e 55 78``, as containers-storage
  and stargz-snapshotter define it).

The OCI layer descriptor carries ``io.containers.zstd-chunked.manifest-checksum``
(sha256 of the compressed TOC) and ``io.containers.zstd-chunked.manifest-position``
(``offset:compressed:uncompressed:1``), which containers-storage reads, and
``containerd.io/snapshot/stargz/toc.digest`` (sha256 of the TOC JSON) and
``io.containers.estargz.uncompressed-size``, which the stargz snapshotter
reads, as ``ctr-remote --zstdchunked`` writes them.  Docker schema 2 has no
zstd layer type: these layers need an OCI manifest.
"""

from __future__ import annotations

import hashlib
import struct
import tempfile
from collections.abc import Callable

from nixery_core.chunked import TOC_KEYS, Annotations, Sink, each_frame
from nixery_core.compression import FramesCompressor, FrameStream
from nixery_core.estargz import TOC_DIGEST_ANNOTATION, UNCOMPRESSED_SIZE_ANNOTATION
from nixery_core.toc_spool import SPOOL_MEMORY, SPOOL_READ, TocSpool

__all__ = [
    "FOOTER_MAGIC",
    "MANIFEST_CHECKSUM_ANNOTATION",
    "MANIFEST_POSITION_ANNOTATION",
    "SKIPPABLE_MAGIC",
    "ZstdChunkedFormat",
    "skippable_frame",
]

MANIFEST_CHECKSUM_ANNOTATION = "io.containers.zstd-chunked.manifest-checksum"
MANIFEST_POSITION_ANNOTATION = "io.containers.zstd-chunked.manifest-position"
SKIPPABLE_MAGIC = 0x184D2A50
FOOTER_MAGIC = b"GnUlInUx"
#: The TOC type containers-storage reads: 1, the CRFS-compatible JSON TOC.
_MANIFEST_TYPE_CRFS = 1


def skippable_frame(payload: bytes) -> bytes:
    """A zstd skippable frame (magic ``0x184D2A50``) holding ``payload``."""
    return _skippable_header(len(payload)) + payload


def _skippable_header(size: int) -> bytes:
    """The magic and length a skippable frame of ``size`` bytes of payload starts with."""
    return struct.pack("<II", SKIPPABLE_MAGIC, size)


class ZstdChunkedFormat:
    """The zstd:chunked :class:`~nixery_core.chunked.FrameFormat` over one zstd frame compressor.

    ``stream_frame`` makes the streaming twin of ``compress_frame`` for the
    TOC (:func:`~nixery_core.compression.frame_stream`).
    """

    merge_metadata = False
    toc_keys: tuple[str, ...] = TOC_KEYS

    def __init__(
        self,
        compress_frame: Callable[[bytes | bytearray | memoryview], bytes],
        compress_frames: FramesCompressor | None = None,
        *,
        stream_frame: Callable[[int], FrameStream],
    ) -> None:
        self.compress_frame = compress_frame
        self.compress_frames = compress_frames or each_frame(compress_frame)
        self._stream_frame = stream_frame

    def trailer(
        self, toc: TocSpool, offset: int, tar_size: int, write: Sink, tar: Sink
    ) -> Annotations:
        """End-of-archive frame, TOC and footer, for frames ending at ``offset``.

        The TOC is compressed as it streams from the spool, into an unnamed
        temporary file past :data:`~nixery_core.toc_spool.SPOOL_MEMORY`
        bytes: its skippable frame starts with its compressed length.
        """
        tail = bytes(1024)
        tar(tail)
        end = self.compress_frame(tail)
        write(end)
        size = toc.size
        frame = self._stream_frame(size)
        digest, compressed_digest = hashlib.sha256(), hashlib.sha256()
        with tempfile.SpooledTemporaryFile(SPOOL_MEMORY, prefix="nixery-toc-") as spool:

            def put(out: bytes) -> None:
                compressed_digest.update(out)
                spool.write(out)

            for piece in toc.pieces():
                digest.update(piece)
                put(frame.compress(piece))
            put(frame.finish())
            length = spool.tell()
            write(_skippable_header(length))
            spool.seek(0)
            while out := spool.read(SPOOL_READ):
                write(out)
        toc_offset = offset + len(end) + 8  # past the skippable frame's magic and length
        sizes = (toc_offset, length, size, _MANIFEST_TYPE_CRFS)
        write(skippable_frame(struct.pack("<QQQQ", *sizes) + FOOTER_MAGIC))
        return (
            # What the stargz snapshotter reads zstd:chunked layers by, as its
            # own writer (ctr-remote --zstdchunked) sets it; containers-storage
            # looks for the manifest checksum first.
            (TOC_DIGEST_ANNOTATION, "sha256:" + digest.hexdigest()),
            (UNCOMPRESSED_SIZE_ANNOTATION, str(tar_size + len(tail))),
            (MANIFEST_CHECKSUM_ANNOTATION, "sha256:" + compressed_digest.hexdigest()),
            (
                MANIFEST_POSITION_ANNOTATION,
                f"{toc_offset}:{length}:{size}:{_MANIFEST_TYPE_CRFS}",
            ),
        )
