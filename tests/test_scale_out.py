"""Many instances on one bucket, for real: fake-gcs-server, real Nix, separate processes."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import OFFLINE_SET, Children
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
from nixery_core.storage.gcs import GcsStore, disable_bucket_metadata_cache
from nixery_core.testing.runners import RecordingRunner

url, bucket, cache_dir, offline = sys.argv[1:5]
client = storage.Client(project="test", credentials=AnonymousCredentials(),
                        client_options=ClientOptions(api_endpoint=url))
disable_bucket_metadata_cache(client)
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
    # Resolve in restricted mode (the bundled set reads /usr/bin, so Nix refuses:
    # a moving target, see outside_reads), resolve again, realise, path-info.
    assert first["nix_calls"] == 4
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
    # The lease the failed build could not release: this process's orphan, taken at once.
    assert cache.fleet is not None
    assert cache.fleet.stats.taken_over == cache.fleet.stats.dead_holders >= 1
    assert all(store.has_blob(d) for d in result.blobs)
    assert any(layer.reused for layer in result.layers)  # layers committed before the fault


# --- fleet-wide single flight: leases in the bucket ----------------------------------

_FLEET_INSTANCE = r"""
import json, logging, sys, threading, time
from pathlib import Path
from google.api_core.client_options import ClientOptions
from google.auth.credentials import AnonymousCredentials
from google.cloud import storage
from nixery_core.build import build_image
from nixery_core.cache import BuildCache
from nixery_core.lease import FleetFlight, LeasePolicy
from nixery_core.liveness import ProcfsProbe
from nixery_core.names import Image
from nixery_core.runner import SubprocessRunner
from nixery_core.sources import LocalPathSource
from nixery_core.storage.gcs import GcsStore, disable_bucket_metadata_cache
from nixery_core.testing.runners import RecordingRunner

url, bucket, cache_dir, offline, ttl, stall, host = sys.argv[1:8]
client = storage.Client(project="test", credentials=AnonymousCredentials(),
                        client_options=ClientOptions(api_endpoint=url))
disable_bucket_metadata_cache(client)
store = GcsStore(client.bucket(bucket))


class Stalling:
    # A store whose second layer upload never ends: the holder is killed there.
    def __init__(self, inner):
        self._inner, self._writers = inner, 0

    def __getattr__(self, name):
        return getattr(self._inner, name)

    def open_blob_writer(self, media_type):
        writer = self._inner.open_blob_writer(media_type)
        self._writers += 1
        if self._writers == 2:
            def write(data):
                print("stalled", flush=True)
                threading.Event().wait()
            writer.write = write
        return writer


class Reading:
    # Remembers the last lease read: its name and the generation it found.
    def __init__(self, inner):
        self._inner, self.last = inner, (None, None)

    def __getattr__(self, name):
        return getattr(self._inner, name)

    def read_lease(self, name):
        found = self._inner.read_lease(name)
        self.last = (name, None if found is None else found[1])
        return found


class Polls:
    # The lease module's clock (monotonic), which it reads once a poll, just after reading
    # the lease: records each poll's time as it saw it, with that read; offset: to wall time.
    def __init__(self, reading):
        self.reading, self.offset, self.polls = reading, time.time() - time.monotonic(), []

    def __call__(self):
        now = time.monotonic()
        self.polls.append((now, *self.reading.last))
        return now


class Timed:
    # Records when the first Nix call starts (the build really began).
    def __init__(self, inner):
        self.inner, self.first = inner, None

    def run(self, *args, **kwargs):
        self.first = self.first or time.time()
        return self.inner.run(*args, **kwargs)


class TakeoverTime(logging.Handler):
    # Records when this process first took over an expired lease (the lease module logs it).
    at = None

    def emit(self, record):
        if "taking it over" in record.getMessage() and TakeoverTime.at is None:
            TakeoverTime.at = time.time()


logging.getLogger("nixery_core.lease").addHandler(TakeoverTime())
reading = Reading(store)
polls = Polls(reading)
recording = RecordingRunner(SubprocessRunner())
runner = Timed(recording)
# Each instance names its host: instances given different names act as separate machines
# (none looks another's process up, so a dead holder costs the others its ttl).
fleet = FleetFlight(LeasePolicy(ttl=float(ttl), poll_min=0.05, poll_max=0.5),
                    probe=ProcfsProbe(hostname=lambda: host), clock=polls)
with BuildCache(Path(cache_dir), fleet=fleet) as cache:
    result = build_image(Image.from_name("shell/hello"), LocalPathSource(offline),
                         runner=runner, uploader=Stalling(store) if stall == "yes" else reading,
                         cache=cache, nix_options={"substituters": ""}, max_workers=1)
stats = fleet.stats
print(json.dumps({
    "digest": result.manifest_digest, "from_cache": result.from_cache,
    "realisations": sum(1 for c in recording.calls if "--realise" in c.argv),
    "nix_calls": len(recording.calls), "first_nix_call": runner.first,
    "took_over_at": TakeoverTime.at,
    "packed": [l.digest for l in result.layers if not l.reused and not result.from_cache],
    "layers": len(result.layers), "taken_over": stats.taken_over, "waited": stats.waited,
    "dead_holders": stats.dead_holders, "polls": polls.polls, "offset": polls.offset,
    "acquired": stats.acquired}))
"""


Spawn = Callable[..., "subprocess.Popen[str]"]


@pytest.fixture
def spawn(gcs: FakeGcsServer, children: Children) -> Spawn:
    """Starts instance processes on the emulator; kills any still running at teardown."""

    def start(
        bucket: str, cache: Path, *, ttl: float, stall: bool = False, host: str = "host"
    ) -> subprocess.Popen[str]:
        return children.start(
            [sys.executable, "-c", _FLEET_INSTANCE, gcs.url, bucket, str(cache),
             str(OFFLINE_SET), str(ttl), "yes" if stall else "no", host],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        )

    return start


def _answer(proc: subprocess.Popen[str]) -> dict[str, Any]:
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    answer: dict[str, Any] = json.loads(out.splitlines()[-1])
    return answer


def _check_bucket_is_whole(bucket: Any) -> None:
    """No staging object or lease is left, and every manifest entry's blobs are there, intact."""
    names = set(objects(bucket))
    assert not any(n.startswith(("staging/", "leases/")) for n in names), sorted(names)
    entries = [n for n in names if n.startswith("manifests/")]
    assert entries
    for entry in entries:
        record = json.loads(bucket.blob(entry).download_as_bytes())
        for digest in record["blobs"]:
            hex_part = digest.removeprefix("sha256:")
            data = bucket.blob(f"layers/{hex_part}").download_as_bytes()
            assert hashlib.sha256(data).hexdigest() == hex_part


def test_three_instances_asked_at_once_build_the_image_once(
    gcs: FakeGcsServer, spawn: Spawn, tmp_path: Path
) -> None:
    """Three processes, own local caches, one bucket, same new image at once: one realisation."""
    bucket = gcs.make_bucket("images")
    procs = [spawn("images", tmp_path / f"host-{i}", ttl=30, host=f"host-{i}") for i in range(3)]
    answers = [_answer(p) for p in procs]
    assert sum(a["realisations"] for a in answers) == 1
    assert len({a["digest"] for a in answers}) == 1
    builders = [a for a in answers if not a["from_cache"]]
    assert len(builders) == 1
    packed = [d for a in answers for d in a["packed"]]
    assert len(packed) == len(set(packed)) == builders[0]["layers"]  # each layer packed once
    assert sum(a["waited"] for a in answers) >= 1  # the others waited rather than built
    _check_bucket_is_whole(bucket)


def test_killed_holder_delays_the_others_by_at_most_the_lease_time(
    gcs: FakeGcsServer, spawn: Spawn, tmp_path: Path
) -> None:
    """SIGKILL the lease holder mid-pack: a waiter on another host takes over at its first poll
    a ttl after it first saw the holder's last write, which it saw by its first poll after the
    kill."""
    bucket = gcs.make_bucket("images")
    ttl = 3.0
    holder = spawn("images", tmp_path / "host-a", ttl=ttl, stall=True, host="host-a")
    assert holder.stdout is not None
    assert holder.stdout.readline().strip() == "stalled"  # it holds the image and a layer lease
    leases = [n for n in objects(bucket) if n.startswith("leases/")]
    assert len(leases) == 2
    waiter = spawn("images", tmp_path / "host-b", ttl=ttl, host="host-b")
    threading.Event().wait(ttl)  # the waiter is polling; the holder keeps renewing meanwhile
    holder.kill()
    killed_at = time.time()
    holder.wait(timeout=10)
    answer = _answer(waiter)
    assert not answer["from_cache"]
    assert answer["taken_over"] == 2  # the image lease, then the layer lease at once
    assert answer["dead_holders"] == 0  # another host's holder: the ttl rule
    # The bound the lease promises, judged by the waiter's own polls as its clock saw them
    # (not by wall time between here and there, which a loaded machine stretches): it saw
    # the killed holder's last write by its first poll after the kill (its second, if a
    # renewal was in flight at the kill) and took over at its first poll ttl after that.
    took_over_at = answer["took_over_at"] - answer["offset"]  # on the waiter's clock
    killed_at -= answer["offset"]
    before = [(at, name, gen) for at, name, gen in answer["polls"] if at <= took_over_at]
    _, image_lease, last = before[-1]  # the poll that took the image lease over
    polls = [(at, gen) for at, name, gen in before if name == image_lease]
    seen = min(at for at, gen in polls if gen == last)
    after_kill = [at for at, _ in polls if at >= killed_at]
    assert seen <= after_kill[min(1, len(after_kill) - 1)], (seen, killed_at, polls)
    assert polls[-1][0] - seen >= ttl, (seen, polls)  # not before ttl
    assert polls[-2][0] - seen < ttl, (seen, polls)  # at the first poll past it
    assert answer["first_nix_call"] > answer["took_over_at"]
    assert answer["realisations"] == 1
    _check_bucket_is_whole(bucket)
