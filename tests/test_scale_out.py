"""Many instances on one bucket, for real: fake-gcs-server, real Nix, separate processes."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import OFFLINE_SET
from servers import FakeGcsServer

from nixery_core.build import build_image
from nixery_core.cache import BuildCache
from nixery_core.errors import StorageError
from nixery_core.names import Image
from nixery_core.protocols import BlobWriter
from nixery_core.sources import LocalPathSource
from nixery_core.storage.gcs import GcsStore

pytestmark = pytest.mark.usefixtures("nix")

_INSTANCE = r"""
import json, sys
from pathlib import Path
from google.api_core.client_options import ClientOptions
from google.auth.credentials import AnonymousCredentials
from google.cloud import storage
from nixery_core.build import build_image
from nixery_core.cache import BuildCache
from nixery_core.names import Image
from nixery_core.runner import SubprocessRunner
from nixery_core.sources import LocalPathSource
from nixery_core.storage.gcs import GcsStore
from nixery_core.testing.runners import RecordingRunner

url, bucket, cache_dir, offline = sys.argv[1:5]
client = storage.Client(project="test", credentials=AnonymousCredentials(),
                        client_options=ClientOptions(api_endpoint=url))
store = GcsStore(client.bucket(bucket))
runner = RecordingRunner(SubprocessRunner())
with BuildCache(Path(cache_dir)) as cache:
    result = build_image(Image.from_name("shell/hello"), LocalPathSource(offline),
                         runner=runner, uploader=store, cache=cache,
                         nix_options={"substituters": ""})
print(json.dumps({"digest": result.manifest_digest, "from_cache": result.from_cache,
                  "nix_calls": len(runner.calls),
                  "shared_hits": result.cache_stats.manifest_shared_hits}))
"""


@pytest.fixture
def gcs() -> Iterator[FakeGcsServer]:
    with FakeGcsServer(persistent=True) as server:
        yield server


def objects(bucket: Any) -> dict[str, int]:
    """Every object in the bucket with its generation (a rewrite changes it)."""
    return {blob.name: int(blob.generation) for blob in bucket.list_blobs()}


def instance(server: FakeGcsServer, bucket: str, cache: Path) -> dict[str, Any]:
    done = subprocess.run(
        [sys.executable, "-c", _INSTANCE, server.url, bucket, str(cache), str(OFFLINE_SET)],
        capture_output=True, text=True, timeout=300, check=False,
    )
    assert done.returncode == 0, done.stderr
    answer: dict[str, Any] = json.loads(done.stdout)
    return answer


def test_second_instance_on_the_bucket_runs_no_nix_and_uploads_nothing(
    gcs: FakeGcsServer, tmp_path: Path
) -> None:
    """Two processes with their own local caches share one bucket: the second builds nothing."""
    bucket = gcs.make_bucket("images")
    first = instance(gcs, "images", tmp_path / "host-a")
    assert not first["from_cache"]
    assert first["nix_calls"] == 3
    before = objects(bucket)
    assert any(name.startswith("manifests/") for name in before)
    assert any(name.startswith("layers/") for name in before)
    second = instance(gcs, "images", tmp_path / "host-b")
    assert second["from_cache"]
    assert second["shared_hits"] == 1
    assert second["nix_calls"] == 0
    assert second["digest"] == first["digest"]
    assert objects(bucket) == before  # nothing uploaded or rewritten
    assert not any(name.startswith("staging/") for name in before)


class _StopsServer:
    """A GcsStore whose third blob upload stops the server half-way through."""

    def __init__(self, store: GcsStore, server: FakeGcsServer) -> None:
        self._store = store
        self._server = server
        self._writers = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self._store, name)

    def open_blob_writer(self, media_type: str) -> BlobWriter:
        writer = self._store.open_blob_writer(media_type)
        self._writers += 1
        if self._writers == 3:
            server = self._server
            original = writer.write

            def write(data: bytes | memoryview) -> int:
                server.stop()
                return original(data)

            writer.write = write  # type: ignore[method-assign]
        return writer


def test_storage_server_gone_mid_build_then_back(gcs: FakeGcsServer, tmp_path: Path) -> None:
    """The server dying mid-build: a typed error, no manifest entry, no staging; a retry works."""
    bucket = gcs.make_bucket("images")
    store = GcsStore(bucket, timeout=5.0, retry=None)
    source = LocalPathSource(OFFLINE_SET)
    image = Image.from_name("shell/hello")
    with BuildCache(tmp_path / "cache") as cache, pytest.raises(StorageError):
        build_image(image, source, uploader=_StopsServer(store, gcs),
                    cache=cache, nix_options={"substituters": ""}, max_workers=1)
    gcs.start()
    bucket = gcs.make_bucket("images")
    left = objects(bucket)
    assert not any(name.startswith(("manifests/", "staging/")) for name in left)
    for name in left:
        if name.startswith("layers/"):  # every committed blob is complete
            data = bucket.blob(name).download_as_bytes()
            assert hashlib.sha256(data).hexdigest() == name.removeprefix("layers/")
    store = GcsStore(bucket)
    with BuildCache(tmp_path / "cache") as cache:
        result = build_image(image, source, uploader=store, cache=cache,
                             nix_options={"substituters": ""})
    assert all(store.has_blob(d) for d in result.blobs)
    assert any(layer.reused for layer in result.layers)  # layers committed before the fault
