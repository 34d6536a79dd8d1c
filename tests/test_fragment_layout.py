"""A chunked fragment's layout of announced headers (nixery_core.fragment_layout, NXL3).

A chunked layer's fragment is recorded from the headers the packer announces
(no call per file); these pin its encoding, its decoding, the checks that
leave a fragment without a layout, and rebuilding through it.  The layouts of
real packs are rebuilt in tests/test_fragment_toc.py; the NXL2 layouts of the
other layers in tests/test_fragments.py.
"""

from __future__ import annotations

import gc
import io
import os
import struct
import tarfile
import types
import zlib
from pathlib import Path

import pytest
from isal import isal_zlib
from test_chunked_formats import FORMATS, make_store

from nixery_core import fragment_layout
from nixery_core.archive import ArchiveOptions, PackedLayer, _Headers, pack_store_paths
from nixery_core.compression import BLOCK_SIZE
from nixery_core.fragment_layout import FragmentLayout, LayoutRecorder, rebuild
from nixery_core.fragments import FragmentCache

TOP = b"nix/store/x-a"
#: After four headers, content ends 50 bytes before the first 1 MiB boundary: its padding
#: reaches it exactly.
BIG = BLOCK_SIZE - 4 * 512 - 50


def _members(root: Path) -> list[tuple[bytes, bytes, int]]:
    """The fragment's members as the packer writes them: (header, content, padding)."""
    source = root / TOP.decode()
    (source / "bin").mkdir(parents=True)
    contents = {b"/bin/tool": os.urandom(BIG), b"/bin/short": b"x" * 700,
                b"/even": b"y" * 1024, b"/empty": b""}
    for path, content in contents.items():
        (source / path.decode().lstrip("/")).write_bytes(content)
    headers = _Headers(0)
    members = [
        (headers(TOP + b"/", 0o555, 0, b"5"), b"", 0),
        (headers(TOP + b"/bin/", 0o555, 0, b"5"), b"", 0),
        (headers(TOP + b"/bin/link", 0o777, 0, b"2", linkname=b"tool"), b"", 0),
    ]
    for path, content in contents.items():
        size = len(content)
        members.append((headers(TOP + path, 0o444, size, b"0"), content, -size % 512))
    return members


def _recorded(members: list[tuple[bytes, bytes, int]], tar: bytes) -> LayoutRecorder:
    """A recorder given the members' announcements and the fragment's bytes as blocks."""
    recorder = LayoutRecorder(TOP)
    captured = recorder.captured()
    names = [TOP + b"/", TOP + b"/bin/", TOP + b"/bin/link", TOP + b"/bin/tool",
             TOP + b"/bin/short", TOP + b"/even", TOP + b"/empty"]
    for (header, content, _pad), name in zip(members, names, strict=True):
        captured.add(header, (name, 0o444, len(content), b"0" if content else b"5", 0, 0, b""))
    for at in range(0, len(tar), BLOCK_SIZE):
        recorder.block(tar[at : at + BLOCK_SIZE])
    return recorder


def test_an_announced_layout_is_its_golden_body_and_rebuilds_the_fragment(
    tmp_path: Path,
) -> None:
    """A layout of announced headers encodes to NXL3 as documented (lengths, sizes, running
    CRC-32s, the names of files with content, the headers, no padding), decodes to segments
    whose padding is implied, and rebuilds the fragment's exact tar bytes (which tarfile reads
    back as the members written), padding across a block's end included."""
    members = _members(tmp_path)
    tar = b"".join(header + content + bytes(pad) for header, content, pad in members)
    raw = _recorded(members, tar).encode()
    assert raw is not None
    headers = [header for header, _, _ in members]
    sizes = [len(content) for _, content, _ in members]
    crcs = [zlib.crc32(tar[:BLOCK_SIZE]), zlib.crc32(tar)]
    paths = b"\0".join(TOP + path for path in (b"/bin/tool", b"/bin/short", b"/even"))
    golden = b"".join((
        struct.pack("<4sIIQII", b"NXL3", 7, 2, sum(map(len, headers)), len(paths), len(TOP)),
        struct.pack("<7I", *map(len, headers)),
        struct.pack("<7Q", *sizes),
        struct.pack("<2I", *crcs),
        paths,
        *headers,
    ))
    assert isal_zlib.decompress(raw) == golden
    layout = FragmentLayout.decode(raw)
    assert layout is not None
    assert layout.padding == 50 + 324  # after the 1 MiB file and the 700-byte one
    assert layout.size == len(tar)
    assert layout.crcs == tuple(crcs)
    first = sum(map(len, headers[:4]))
    assert layout.segments == (
        (first, b"/bin/tool", BIG), (512, b"/bin/short", 700), (512, b"/even", 1024),
        (512, b"", 0),
    )
    rebuilt = bytearray()
    assert rebuild(os.fsencode(tmp_path / TOP.decode()), layout, rebuilt.extend) == len(tar)
    assert rebuilt == tar
    with tarfile.open(fileobj=io.BytesIO(bytes(rebuilt) + bytes(1024))) as archive:
        read = {member.name: member for member in archive.getmembers()}
        tool = archive.extractfile(read[TOP.decode() + "/bin/tool"])
        assert tool is not None
        assert tool.read() == members[3][1]
    assert read[TOP.decode() + "/bin/link"].linkname == "tool"
    assert read[TOP.decode() + "/empty"].size == 0


def test_a_damaged_announced_layout_decodes_to_none(tmp_path: Path) -> None:
    """An NXL3 layout cut short, with a path count, literal size or block count that does not
    add up, or naming a path outside its store path, is not a layout (the fragment is
    inflated instead)."""
    members = _members(tmp_path)
    tar = b"".join(header + content + bytes(pad) for header, content, pad in members)
    raw = _recorded(members, tar).encode()
    assert raw is not None
    body = isal_zlib.decompress(raw)
    head = struct.Struct("<4sIIQII")
    magic, count, blocks, literal_size, path_size, cut = head.unpack_from(body)
    paths_at = head.size + 4 * count + 8 * count + 4 * blocks
    damaged = [
        body[: len(body) - 1],  # the last header cut short
        body[: head.size + 10],  # inside the arrays
        head.pack(magic, count, blocks + 1, literal_size, path_size, cut) + body[head.size :],
        head.pack(magic, count, blocks, literal_size + 1, path_size, cut) + body[head.size :],
        # names shorter than the store path's
        head.pack(magic, count, blocks, literal_size, path_size, 1000) + body[head.size :],
        # two paths where three files have content
        body[:paths_at] + body[paths_at:].replace(b"\0" + TOP, TOP, 1),
        # a path climbing out of the store path, the same length
        body[:paths_at] + body[paths_at:].replace(b"/bin/tool", b"/../tool", 1),
    ]
    for data in damaged:
        assert FragmentLayout.decode(isal_zlib.compress(data)) is None
    assert FragmentLayout.decode(raw) is not None


def test_bytes_no_announcement_accounts_for_give_a_layout_of_another_size(
    tmp_path: Path,
) -> None:
    """A fragment whose bytes are more or fewer than its announced headers, their files and
    padding (a header written without an announcement) decodes to a layout whose size is not
    the fragment's (never used: put_cached inflates such a fragment), or to none."""
    members = _members(tmp_path)
    tar = b"".join(header + content + bytes(pad) for header, content, pad in members)
    for given in (tar + bytes(512), tar[:-512]):
        raw = _recorded(members, given).encode()
        assert raw is not None
        layout = FragmentLayout.decode(raw)
        assert layout is None or layout.size != len(given)


def test_announced_headers_past_the_limit_leave_no_layout(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Once a fragment's announced headers pass MAX_LITERALS bytes, checked a block at a time
    only once its bytes could hold that many, they are let go (and those appended since, at
    every later check) and it gets no layout."""
    members = _members(tmp_path)
    tar = b"".join(header + content + bytes(pad) for header, content, pad in members)
    monkeypatch.setattr(fragment_layout, "MAX_LITERALS", 3 * 512)
    recorder = _recorded(members, tar)
    held = recorder._captured  # what the packer appends to
    recorder.bound(3 * 512)  # its bytes so far cannot hold more: nothing counted
    assert held is not None
    assert len(held.sizes) == len(members)
    recorder.bound(len(tar))
    assert (held.headers, list(held.sizes), held.names) == ([], [], [])
    # The packer goes on appending until the fragment ends.
    held.add(members[3][0], (TOP + b"/bin/tool", 0o444, BIG, b"0", 0, 0, b""))
    recorder.bound(0)
    assert (held.headers, list(held.sizes), held.names) == ([], [], [])
    assert recorder.encode() is None


def test_a_layout_given_up_takes_no_more_crcs(monkeypatch: pytest.MonkeyPatch) -> None:
    """Once a fragment's layout is given up (its headers past the limit, or its recording
    failed: sealed as incomplete), its later blocks cost no CRC-32 (nothing of it is kept);
    before, each does."""
    taken: list[int] = []
    crc32 = fragment_layout._crc32

    def counting(data: memoryview, crc: int = 0) -> int:
        taken.append(len(data))
        return crc32(data, crc)

    monkeypatch.setattr(fragment_layout, "_crc32", counting)
    recorder = LayoutRecorder(TOP)
    recorder.captured()
    recorder.block(bytes(BLOCK_SIZE))
    assert taken == [BLOCK_SIZE]
    recorder.seal(whole=False)
    recorder.block(bytes(BLOCK_SIZE))
    recorder.block(b"tail")
    assert taken == [BLOCK_SIZE]
    assert recorder.encode() is None


def _packed(root: Path, paths: list[str], compression: str,
            cache: FragmentCache | None = None) -> tuple[bytes, PackedLayer]:
    out = io.BytesIO()
    options = ArchiveOptions(compression=compression)  # type: ignore[arg-type]  # from FORMATS
    packed = pack_store_paths(paths, out.write, options, store_root=root, threads=2,
                              fragments=cache)
    return out.getvalue(), packed


@pytest.mark.parametrize("compression", FORMATS)
def test_a_chunked_file_changed_since_its_fragment_is_inflated_from_the_block_that_differs(
    tmp_path: Path, compression: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A file changed after its chunked fragment was kept (same size, a byte of its second
    block) never reaches the diff_id: the layout's CRC-32 of that block differs, the fragment
    is inflated from there, and the layer is the one shipped before, byte for byte."""
    root = tmp_path / "root"
    paths = make_store(root)
    expected = _packed(root, paths, compression)
    with FragmentCache(tmp_path / "fragments") as cache:
        assert _packed(root, paths, compression, cache) == expected
        misses = cache.misses
        big = root / paths[0].lstrip("/") / "lib" / "libhuge.so"
        data = bytearray(big.read_bytes())
        data[BLOCK_SIZE + 1000] ^= 0xFF
        big.write_bytes(bytes(data))
        assert _packed(root, paths, compression, cache) == expected
        assert cache.misses == misses  # every store path copied from its fragment
    messages = [record.getMessage() for record in caplog.records]
    differs = [message for message in messages if "differs from its cached" in message]
    assert len(differs) == 1
    assert paths[0] in differs[0]
    assert "from byte 0 on" not in differs[0]


def _tracked_reachable(start: object) -> int:
    """How many objects the cyclic garbage collector tracks are reachable from ``start``
    (classes, modules and functions aside: shared, not the recording's)."""
    seen = {id(start)}
    todo = [start]
    tracked = 0
    while todo:
        item = todo.pop()
        tracked += gc.is_tracked(item)
        for referent in gc.get_referents(item):
            if id(referent) in seen or isinstance(
                referent, (type, types.ModuleType, types.FunctionType, types.BuiltinFunctionType)
            ):
                continue
            seen.add(id(referent))
            todo.append(referent)
    return tracked


@pytest.mark.parametrize(
    "options",
    [ArchiveOptions(), ArchiveOptions(compression="zstd"), ArchiveOptions(compression="estargz")],
    ids=["gzip", "zstd", "estargz"],
)
def test_a_recorded_layout_holds_no_tracked_object_per_member(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, options: ArchiveOptions
) -> None:
    """While a fragment is recorded (a cold pack), its layout keeps what each member's header
    says as plain bytes and arrays, no tuple or other object the cyclic garbage collector
    tracks per member (so a cold pack of many files runs no more collections than one
    without a cache), and the layer is the one packed without a cache."""
    path = "/nix/store/" + "m" * 32 + "-many"
    base = tmp_path / "root" / path.lstrip("/")
    base.mkdir(parents=True)
    for index in range(300):
        (base / f"f{index:03}").write_bytes(b"%d\n" % index * (index % 7))
    plain = io.BytesIO()
    expected = pack_store_paths([path], plain.write, options, store_root=tmp_path / "root")
    counts: list[int] = []
    encode = LayoutRecorder.encode

    def counting(self: LayoutRecorder) -> bytes | None:
        counts.append(_tracked_reachable(self))
        return encode(self)

    monkeypatch.setattr(LayoutRecorder, "encode", counting)
    out = io.BytesIO()
    # No collection meanwhile: one would untrack tuples of bytes and ints it had looked at.
    enabled = gc.isenabled()
    gc.disable()
    try:
        with FragmentCache(tmp_path / "fragments") as cache:
            packed = pack_store_paths(
                [path], out.write, options, store_root=tmp_path / "root", fragments=cache
            )
            cache.flush()
    finally:
        if enabled:
            gc.enable()
    assert (packed, out.getvalue()) == (expected, plain.getvalue())
    assert counts  # the store path's layout, encoded
    assert max(counts) < 60  # 301 members: before, a tuple each
