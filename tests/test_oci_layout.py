"""OCI image layouts: written atomically from a store, read by skopeo, unpacked by umoci, run."""

from __future__ import annotations

import gzip
import io
import json
import os
import shutil
import subprocess
import tarfile
import threading
from pathlib import Path

import pytest
from conftest import require_root, require_tools

from nixery_core.digests import digest_hex, sha256_digest
from nixery_core.errors import (
    BlobNotFound,
    DigestMismatch,
    InvalidInput,
    InvalidManifest,
    StorageUnavailable,
)
from nixery_core.image_config import ImageConfig
from nixery_core.manifest import (
    OCI_CONFIG,
    OCI_INDEX,
    OCI_LAYER_GZIP,
    OCI_MANIFEST,
    REF_NAME_ANNOTATION,
    Format,
    LayerDescriptor,
    parse_index,
    parse_manifest,
    render_config,
    render_manifest,
)
from nixery_core.names import AMD64, ARM64, Architecture
from nixery_core.oci_layout import (
    layout_blob_path,
    read_layout_blob,
    read_oci_layout,
    write_oci_index,
    write_oci_layout,
)
from nixery_core.protocols import ReadableStore, Uploader
from nixery_core.storage.filesystem import FilesystemStore
from nixery_core.testing.storage import MemoryStore

BUSYBOX = Path("/usr/bin/busybox")


def _layer_tar(files: dict[str, bytes]) -> bytes:
    """A deterministic tar: a bin/ directory, the files (0755), and bin/sh -> busybox."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as tar:
        directory = tarfile.TarInfo("bin")
        directory.type, directory.mode = tarfile.DIRTYPE, 0o755
        tar.addfile(directory)
        for name, data in sorted(files.items()):
            entry = tarfile.TarInfo(name)
            entry.size, entry.mode = len(data), 0o755
            tar.addfile(entry, io.BytesIO(data))
        link = tarfile.TarInfo("bin/sh")
        link.type, link.linkname = tarfile.SYMTYPE, "busybox"
        tar.addfile(link)
    return buffer.getvalue()


def _image(
    store: Uploader,
    fmt: Format = "oci",
    *,
    arch: Architecture = AMD64,
    files: dict[str, bytes] | None = None,
) -> bytes:
    """Store a one-layer image in ``store``; return its manifest."""
    tar = _layer_tar(files if files is not None else {"bin/busybox": BUSYBOX.read_bytes()})
    layer = store.put_blob(gzip.compress(tar, mtime=0), OCI_LAYER_GZIP)
    diff_id = sha256_digest(tar)
    config = render_config(
        arch=arch, diff_ids=[diff_id], config=ImageConfig(), default_cmd=["/bin/sh"]
    )
    config_info = store.put_blob(config, OCI_CONFIG)
    manifest, _ = render_manifest(
        config=config_info,
        layers=[LayerDescriptor(layer.digest, layer.size, OCI_LAYER_GZIP, diff_id)],
        format=fmt,
    )
    return manifest


def _small(store: Uploader, text: str = "hello") -> bytes:
    return _image(store, files={"bin/busybox": text.encode()})


def _refs(directory: Path) -> dict[str, str]:
    return {
        d.annotation(REF_NAME_ANNOTATION) or "": d.digest
        for d in read_oci_layout(directory).manifests
    }


# --- layout contents -----------------------------------------------------------------


def test_layout_holds_marker_index_and_every_blob(tmp_path: Path) -> None:
    """oci-layout, index.json with the tag annotation, and manifest/config/layer blobs."""
    store = MemoryStore()
    manifest = _small(store)
    descriptor = write_oci_layout(tmp_path / "img", store=store, manifest=manifest, ref_name="v1")
    assert json.loads((tmp_path / "img" / "oci-layout").read_bytes()) == {
        "imageLayoutVersion": "1.0.0"
    }
    index = json.loads((tmp_path / "img" / "index.json").read_bytes())
    assert index == {
        "schemaVersion": 2,
        "mediaType": OCI_INDEX,
        "manifests": [
            {
                "mediaType": OCI_MANIFEST,
                "digest": sha256_digest(manifest),
                "size": len(manifest),
                "annotations": {REF_NAME_ANNOTATION: "v1"},
            }
        ],
    }
    assert descriptor.digest == sha256_digest(manifest)
    assert read_layout_blob(tmp_path / "img", descriptor.digest) == manifest
    for blob in parse_manifest(manifest).blobs:
        assert read_layout_blob(tmp_path / "img", blob.digest) == store.read_blob(blob.digest)
    assert sorted(p.name for p in (tmp_path / "img").iterdir()) == [
        "blobs",
        "index.json",
        "oci-layout",
    ]


def test_layout_never_shares_an_inode_with_the_store(tmp_path: Path) -> None:
    """Layouts get their own files, so a store blob corrupted later leaves them intact."""
    store = FilesystemStore(tmp_path / "store")
    manifest = _small(store)
    layer = parse_manifest(manifest).layers[0]
    good = store.read_blob(layer.digest)
    write_oci_layout(tmp_path / "cloned", store=store, manifest=manifest, ref_name="x")
    write_oci_layout(tmp_path / "copied", store=store, manifest=manifest, ref_name="x", link=False)
    source = store.blob_path(layer.digest)
    for layout in ("cloned", "copied"):
        exported = layout_blob_path(tmp_path / layout, layer.digest)
        assert exported.stat().st_ino != source.stat().st_ino
        assert exported.stat().st_nlink == 1
    # Corrupt the store in place (what a disk or a stray write does).
    with source.open("r+b") as handle:
        handle.write(bytes([good[0] ^ 0xFF]))
    for layout in ("cloned", "copied"):
        assert read_layout_blob(tmp_path / layout, layer.digest) == good


def test_corrupt_layout_blob_is_replaced_on_export(tmp_path: Path) -> None:
    """A blob already in the layout that does not hash to its name is written again."""
    store = FilesystemStore(tmp_path / "store")
    manifest = _small(store)
    layer = parse_manifest(manifest).layers[0]
    write_oci_layout(tmp_path / "img", store=store, manifest=manifest, ref_name="x")
    exported = layout_blob_path(tmp_path / "img", layer.digest)
    exported.write_bytes(exported.read_bytes()[:-1])
    write_oci_layout(tmp_path / "img", store=store, manifest=manifest, ref_name="y")
    assert read_layout_blob(tmp_path / "img", layer.digest) == store.read_blob(layer.digest)


def test_existing_layout_gains_tags_and_replaces_same_tag(tmp_path: Path) -> None:
    """A second tag is added; writing an existing tag replaces that entry in place."""
    store = MemoryStore()
    first, second, third = _small(store, "1"), _small(store, "2"), _small(store, "3")
    layout = tmp_path / "img"
    write_oci_layout(layout, store=store, manifest=first, ref_name="a")
    write_oci_layout(layout, store=store, manifest=second, ref_name="b")
    write_oci_layout(layout, store=store, manifest=third, ref_name="a")
    write_oci_layout(layout, store=store, manifest=third, ref_name=None)
    write_oci_layout(layout, store=store, manifest=third, ref_name=None)
    entries = read_oci_layout(layout).manifests
    assert [(e.annotation(REF_NAME_ANNOTATION), e.digest) for e in entries] == [
        ("a", sha256_digest(third)),
        ("b", sha256_digest(second)),
        (None, sha256_digest(third)),
    ]


def test_foreign_index_fields_survive_an_update(tmp_path: Path) -> None:
    """Entries and fields written by other tools are kept when a tag is added."""
    store = MemoryStore()
    layout = tmp_path / "img"
    write_oci_layout(layout, store=store, manifest=_small(store, "1"), ref_name="a")
    index = json.loads((layout / "index.json").read_bytes())
    index["manifests"][0]["urls"] = ["https://example.invalid/x"]
    index["annotations"] = {"made.by": "someone else"}
    (layout / "index.json").write_text(json.dumps(index))
    write_oci_layout(layout, store=store, manifest=_small(store, "2"), ref_name="b")
    updated = json.loads((layout / "index.json").read_bytes())
    assert updated["manifests"][0]["urls"] == ["https://example.invalid/x"]
    assert updated["annotations"] == {"made.by": "someone else"}
    assert set(_refs(layout)) == {"a", "b"}


def test_missing_blob_adds_nothing_to_the_index(tmp_path: Path) -> None:
    """A layer the store lacks raises BlobNotFound and no tag points at the broken image."""
    store = MemoryStore()
    manifest = _small(store)
    store.delete_blob(parse_manifest(manifest).layers[0].digest)
    with pytest.raises(BlobNotFound):
        write_oci_layout(tmp_path / "img", store=store, manifest=manifest, ref_name="x")
    assert not (tmp_path / "img" / "index.json").exists()
    assert [p.name for p in (tmp_path / "img").iterdir() if p.name.startswith(".")] == []


def test_corrupt_store_blob_is_refused(tmp_path: Path) -> None:
    """A stored layer whose bytes no longer match its digest raises DigestMismatch on copy."""
    store = FilesystemStore(tmp_path / "store")
    manifest = _small(store)
    layer = parse_manifest(manifest).layers[0]
    path = store.blob_path(layer.digest)
    path.write_bytes(bytes(len(path.read_bytes())))  # same size, other bytes
    for link in (True, False):
        with pytest.raises(DigestMismatch):
            write_oci_layout(
                tmp_path / "img", store=store, manifest=manifest, ref_name="x", link=link
            )
        assert not layout_blob_path(tmp_path / "img", layer.digest).exists()
        assert not (tmp_path / "img" / "index.json").exists()


def test_bad_inputs_are_typed_errors(tmp_path: Path) -> None:
    """Bad ref names, non-manifests, foreign layout markers and IO failures are typed errors."""
    store = MemoryStore()
    manifest = _small(store)
    for bad in ("", "a b", "../x", "-lead", "tag/"):
        with pytest.raises(InvalidInput):
            write_oci_layout(tmp_path / "a", store=store, manifest=manifest, ref_name=bad)
    with pytest.raises(InvalidManifest):
        write_oci_layout(tmp_path / "a", store=store, manifest=b'{"a": 1}', ref_name="x")
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "oci-layout").write_text('{"imageLayoutVersion": "9.9"}')
    with pytest.raises(InvalidManifest):
        write_oci_layout(tmp_path / "b", store=store, manifest=manifest, ref_name="x")
    (tmp_path / "file").write_text("not a directory")
    with pytest.raises(StorageUnavailable):
        write_oci_layout(tmp_path / "file" / "c", store=store, manifest=manifest, ref_name="x")
    with pytest.raises(InvalidManifest):
        read_oci_layout(tmp_path / "nowhere")


def test_concurrent_writers_keep_every_tag(tmp_path: Path) -> None:
    """Threads adding different tags to one layout lose none of them."""
    store = MemoryStore()
    manifests = {f"t{i}": _small(store, str(i)) for i in range(8)}
    layout = tmp_path / "img"

    def write(tag: str) -> None:
        write_oci_layout(layout, store=store, manifest=manifests[tag], ref_name=tag, durable=False)

    threads = [threading.Thread(target=write, args=(tag,)) for tag in manifests]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert _refs(layout) == {tag: sha256_digest(m) for tag, m in manifests.items()}


def test_index_variant_nests_platform_manifests(tmp_path: Path) -> None:
    """write_oci_index tags an index; its per-platform manifests and their blobs are present."""
    store = MemoryStore()
    amd = _image(store, arch=AMD64, files={"bin/busybox": b"amd"})
    arm = _image(store, arch=ARM64, files={"bin/busybox": b"arm"})
    descriptor = write_oci_index(
        tmp_path / "img", store=store, manifests=[(amd, AMD64), (arm, ARM64)], ref_name="multi"
    )
    assert descriptor.media_type == OCI_INDEX
    index = parse_index(read_layout_blob(tmp_path / "img", descriptor.digest))
    assert [m.platform.architecture for m in index.manifests if m.platform] == ["amd64", "arm64"]
    for entry, data in zip(index.manifests, (amd, arm), strict=True):
        assert read_layout_blob(tmp_path / "img", entry.digest) == data
        for blob in parse_manifest(data).blobs:
            assert layout_blob_path(tmp_path / "img", blob.digest).exists()


# --- real tools ---------------------------------------------------------------------------


def _skopeo_inspect(*args: str) -> dict[str, object]:
    out = subprocess.run(["skopeo", *args], capture_output=True, check=True, timeout=60)
    result = json.loads(out.stdout)
    assert isinstance(result, dict)
    return result


def _unpack_and_run(tmp_path: Path, layout: Path, tag: str) -> str:
    """umoci-unpack ``layout:tag`` and run busybox echo in it with runc; return its stdout."""
    require_root("umoci unpack (not rootless) and runc")
    bundle = tmp_path / "bundle"
    subprocess.run(
        ["umoci", "unpack", "--image", f"{layout}:{tag}", str(bundle)],
        check=True,
        capture_output=True,
        timeout=60,
    )
    assert (bundle / "rootfs" / "bin" / "busybox").read_bytes() == BUSYBOX.read_bytes()
    assert (bundle / "rootfs" / "bin" / "sh").readlink() == Path("busybox")
    config = json.loads((bundle / "config.json").read_bytes())
    config["process"]["terminal"] = False
    config["process"]["args"] = ["/bin/busybox", "echo", "ok"]
    (bundle / "config.json").write_text(json.dumps(config))
    result = subprocess.run(
        [
            "runc",
            "--root",
            str(tmp_path / "runc-state"),
            "run",
            "--bundle",
            str(bundle),
            f"nixery-core-test-{os.getpid()}",
        ],
        capture_output=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr.decode()
    return result.stdout.decode()


@pytest.mark.tools
def test_oci_image_is_inspected_unpacked_and_run(tmp_path: Path) -> None:
    """skopeo inspects the written layout, umoci unpacks it, runc runs busybox from it."""
    require_tools("skopeo", "umoci", "runc")
    store = FilesystemStore(tmp_path / "store")
    manifest = _image(store)
    layout = tmp_path / "layout"
    write_oci_layout(layout, store=store, manifest=manifest, ref_name="latest")
    info = _skopeo_inspect("inspect", f"oci:{layout}:latest")
    assert info["Digest"] == sha256_digest(manifest)
    assert (info["Architecture"], info["Os"]) == ("amd64", "linux")
    assert info["Layers"] == [parse_manifest(manifest).layers[0].digest]
    assert _unpack_and_run(tmp_path, layout, "latest") == "ok\n"


def _write_dir_transport(directory: Path, store: ReadableStore, manifest: bytes) -> None:
    """containers/image's ``dir:`` layout: manifest.json, version and blobs named by hex."""
    directory.mkdir()
    (directory / "version").write_text("Directory Transport Version: 1.1\n")
    (directory / "manifest.json").write_bytes(manifest)
    for blob in parse_manifest(manifest).blobs:
        (directory / digest_hex(blob.digest)).write_bytes(store.read_blob(blob.digest))


@pytest.mark.tools
def test_docker_manifest_is_accepted_by_skopeo(tmp_path: Path) -> None:
    """A Docker schema 2 manifest and our config pass skopeo, convert to OCI, unpack and run.

    skopeo 1.9 and umoci 0.4 only look at OCI media types in an OCI layout's
    index.json, so the Docker manifest goes through skopeo's ``dir:`` transport.
    """
    require_tools("skopeo", "umoci", "runc")
    store = MemoryStore()
    manifest = _image(store, "docker")
    source = tmp_path / "docker-dir"
    _write_dir_transport(source, store, manifest)
    info = _skopeo_inspect("inspect", f"dir:{source}")
    assert info["Digest"] == sha256_digest(manifest)
    assert info["Architecture"] == "amd64"
    raw = _skopeo_inspect("inspect", "--raw", f"dir:{source}")
    assert raw["mediaType"] == "application/vnd.docker.distribution.manifest.v2+json"
    layout = tmp_path / "converted"
    subprocess.run(
        ["skopeo", "copy", "--quiet", f"dir:{source}", f"oci:{layout}:docker"],
        check=True,
        capture_output=True,
        timeout=60,
    )
    assert _unpack_and_run(tmp_path, layout, "docker") == "ok\n"


@pytest.mark.tools
def test_multi_arch_index_selects_by_platform(tmp_path: Path) -> None:
    """skopeo reads the nested index and picks the manifest for the requested architecture."""
    require_tools("skopeo")
    store = MemoryStore()
    amd = _image(store, arch=AMD64, files={"bin/busybox": b"amd"})
    arm = _image(store, arch=ARM64, files={"bin/busybox": b"arm"})
    layout = tmp_path / "layout"
    write_oci_index(layout, store=store, manifests=[(amd, AMD64), (arm, ARM64)], ref_name="multi")
    raw = _skopeo_inspect("inspect", "--raw", f"oci:{layout}:multi")
    assert raw["mediaType"] == OCI_INDEX
    for arch, manifest in (("amd64", amd), ("arm64", arm)):
        info = _skopeo_inspect("--override-arch", arch, "inspect", f"oci:{layout}:multi")
        assert info["Architecture"] == arch
        assert info["Layers"] == [parse_manifest(manifest).layers[0].digest]


@pytest.mark.tools
def test_skopeo_copy_round_trip_keeps_digests(tmp_path: Path) -> None:
    """Copying our layout with skopeo into a fresh layout keeps the manifest digest unchanged."""
    require_tools("skopeo")
    store = MemoryStore()
    manifest = _small(store)
    layout = tmp_path / "layout"
    write_oci_layout(layout, store=store, manifest=manifest, ref_name="v1")
    copy = tmp_path / "copy"
    subprocess.run(
        ["skopeo", "copy", "--quiet", f"oci:{layout}:v1", f"oci:{copy}:v1"],
        check=True,
        capture_output=True,
        timeout=60,
    )
    assert _refs(copy) == {"v1": sha256_digest(manifest)}
    shutil.rmtree(copy)
