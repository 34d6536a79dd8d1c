"""Fleet leases: the store capability on every backend, and FleetFlight's protocol."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import attrs
import pytest
from conftest import Children, require_tools
from servers import FakeGcsServer, fake_gcs

from nixery_core.build import BuildResult, build_image
from nixery_core.cache import BuildCache
from nixery_core.errors import InvalidInput, StorageUnavailable
from nixery_core.lease import FleetFlight, LeasePolicy
from nixery_core.liveness import ProcessId
from nixery_core.names import Image
from nixery_core.protocols import SupportsLeases
from nixery_core.runner import tied_to_caller
from nixery_core.storage.filesystem import FilesystemStore
from nixery_core.storage.gcs import GcsStore
from nixery_core.testing.runners import FakeNix, default_fake_packages
from nixery_core.testing.sources import FixedSource
from nixery_core.testing.storage import MemoryStore

__all__ = ["fake_gcs"]

StoreFactory = Callable[[], Any]


@pytest.fixture(params=["memory", "filesystem", "gcs"])
def make_store(request: pytest.FixtureRequest, tmp_path: Path) -> StoreFactory:
    """A fresh lease-capable store of each kind (gcs: a new bucket on fake-gcs-server)."""
    if request.param == "memory":
        return MemoryStore
    if request.param == "filesystem":
        return lambda: FilesystemStore(tmp_path / f"store-{uuid.uuid4().hex[:8]}", durable=False)
    server: FakeGcsServer = request.getfixturevalue("fake_gcs")
    return lambda: GcsStore(server.make_bucket(f"t-{uuid.uuid4().hex[:16]}"))


# --- the store capability ------------------------------------------------------


def test_lease_is_created_once_and_changes_only_at_its_generation(
    make_store: StoreFactory,
) -> None:
    """create is create-only; replace and delete act only at the current generation."""
    store = make_store()
    assert isinstance(store, SupportsLeases)
    assert store.read_lease("k") is None
    first = store.create_lease("k", b"one")
    assert first is not None
    assert store.create_lease("k", b"two") is None
    assert store.read_lease("k") == (b"one", first)
    second = store.replace_lease("k", b"three", first)
    assert second is not None
    assert second != first
    assert store.replace_lease("k", b"four", first) is None  # stale generation
    assert store.read_lease("k") == (b"three", second)
    assert store.delete_lease("k", second)
    assert store.read_lease("k") is None
    assert store.replace_lease("k", b"five", second) is None  # gone
    assert store.create_lease("k", b"six") is not None


# Not on GCS here: fake-gcs-server does not enforce ifGenerationMatch on
# deletes (real GCS does), so the emulator cannot show this rule.
@pytest.mark.parametrize("make_store", ["memory", "filesystem"], indirect=True)
def test_stale_delete_leaves_the_new_holder_alone(make_store: StoreFactory) -> None:
    """A delete at an old generation keeps the lease (the new holder's stays)."""
    store = make_store()
    first = store.create_lease("k", b"one")
    assert first is not None
    second = store.replace_lease("k", b"two", first)
    assert second is not None
    assert not store.delete_lease("k", first)
    assert store.read_lease("k") == (b"two", second)


def test_exactly_one_of_many_concurrent_creators_wins(make_store: StoreFactory) -> None:
    """Eight threads create one lease at once: exactly one gets a generation."""
    store = make_store()
    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda i: store.create_lease("race", f"{i}".encode()), range(8)))
    winners = [a for a in answers if a is not None]
    assert len(winners) == 1
    current = store.read_lease("race")
    assert current is not None
    assert current[1] == winners[0]


def test_leases_are_not_objects(make_store: StoreFactory) -> None:
    """Leases live under the reserved leases/ prefix: never listed or written as objects."""
    store = make_store()
    assert store.create_lease("k", b"x") is not None
    assert list(store.list_objects("")) == []
    with pytest.raises(InvalidInput):
        store.put_object("leases/k", b"y")
    for bad in ("", "a/b", ".lock", "../x", "a.b"):
        with pytest.raises(InvalidInput):
            store.create_lease(bad, b"z")


# --- FleetFlight -----------------------------------------------------------------


class FakeClock:
    """A monotonic clock that moves only when the code under test sleeps."""

    def __init__(self) -> None:
        self.now = 0.0
        self.sleeps: list[float] = []

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


def test_waiter_takes_over_a_dead_holders_lease_after_ttl() -> None:
    """A lease nobody renews is taken over once the waiter saw it unchanged for ttl."""
    store = MemoryStore()
    assert store.create_lease("img", b'{"ttl": 10}') is not None  # a holder that died
    clock = FakeClock()
    flight = FleetFlight(LeasePolicy(ttl=10, poll_min=0.5, poll_max=2), clock=clock,
                         sleep=clock.sleep)
    built: list[float] = []

    def build() -> str:
        built.append(clock.now)
        return "built"

    result = flight.run(store, "img", lambda: None, build)
    assert result == "built"
    assert len(built) == 1
    assert 10 <= built[0] <= 10 + 2  # at most one poll beyond the ttl
    assert flight.stats.taken_over == 1
    assert flight.stats.acquired == 0
    assert store.lease_names() == ()  # released


def test_waiter_is_answered_by_the_holders_entry() -> None:
    """While another host holds the lease, the waiter returns its entry and never builds."""
    store = MemoryStore()
    assert store.create_lease("img", b"{}") is not None
    clock = FakeClock()
    flight = FleetFlight(LeasePolicy(ttl=60, poll_min=1, poll_max=4), clock=clock,
                         sleep=clock.sleep)

    def ready() -> str | None:
        return "theirs" if clock.now >= 20 else None

    def build() -> str:
        raise AssertionError("the waiter must not build")

    assert flight.run(store, "img", ready, build) == "theirs"
    assert flight.stats.waited == 1
    assert flight.stats.served_by_others == 1
    assert clock.sleeps[:4] == [1, 1.5, 2.25, 3.375]
    assert max(clock.sleeps) == 4


def test_a_renewing_holder_is_never_taken_over() -> None:
    """A live holder renews every ttl/3, so a waiter polling past the ttl does not build."""
    store = MemoryStore()
    policy = LeasePolicy(ttl=0.6, poll_min=0.01, poll_max=0.05)
    holder, waiter = FleetFlight(policy), FleetFlight(policy)
    entry: list[str] = []
    started = threading.Event()

    def slow_build() -> str:
        started.set()
        threading.Event().wait(2.0)  # more than three ttls
        entry.append("built")
        return "built"

    with ThreadPoolExecutor(2) as pool:
        first = pool.submit(holder.run, store, "img", lambda: None, slow_build)
        assert started.wait(10)
        second = pool.submit(
            waiter.run, store, "img", lambda: entry[0] if entry else None,
            lambda: "built twice",
        )
        assert first.result() == "built"
        assert second.result() == "built"
    assert waiter.stats.taken_over == 0
    assert waiter.stats.served_by_others == 1
    assert holder.stats.lost == 0
    assert store.lease_names() == ()


def test_failed_build_releases_the_lease_for_the_next_host() -> None:
    """A build that raises releases its lease at once; the next host builds without waiting."""
    store = MemoryStore()
    flight = FleetFlight(LeasePolicy(ttl=60))

    def fails() -> str:
        raise RuntimeError("nix failed")

    with pytest.raises(RuntimeError, match="nix failed"):
        flight.run(store, "img", lambda: None, fails)
    assert store.lease_names() == ()
    assert flight.run(store, "img", lambda: None, lambda: "second try") == "second try"


class _BrokenLeases(MemoryStore):
    def create_lease(self, name: str, data: bytes) -> str | None:
        raise StorageUnavailable("lease backend down", name)


def test_lease_storage_failure_builds_anyway() -> None:
    """The lease only saves work: when it cannot be taken the build still runs."""
    flight = FleetFlight()
    assert flight.run(_BrokenLeases(), "img", lambda: None, lambda: "built") == "built"
    assert flight.stats.errors == 1


def test_holder_that_lost_its_lease_does_not_release_the_new_one() -> None:
    """A stalled holder whose lease was taken over leaves the new holder's lease in place."""
    store = MemoryStore()
    flight = FleetFlight(LeasePolicy(ttl=0.15))

    def stalled_build() -> str:
        current = store.read_lease("img")
        assert current is not None
        assert store.replace_lease("img", b"taken", current[1]) is not None  # another host
        threading.Event().wait(0.5)  # renewal notices the loss
        return "built"

    assert flight.run(store, "img", lambda: None, stalled_build) == "built"
    assert flight.stats.lost == 1
    assert store.lease_names() == ("img",)


# --- build_image across "hosts" (separate caches) on one store ----------------------


def test_two_hosts_build_one_image_once(tmp_path: Path) -> None:
    """Two caches (hosts) sharing only a store: one Nix realisation, each layer packed once."""
    runner = FakeNix(tmp_path / "root", default_fake_packages())
    store = MemoryStore()
    policy = LeasePolicy(ttl=30, poll_min=0.01, poll_max=0.05)
    caches = [
        BuildCache(tmp_path / f"host-{i}", fleet=FleetFlight(policy)) for i in range(3)
    ]

    def host(cache: BuildCache) -> BuildResult:
        return build_image(Image.from_name("shell/hello"), FixedSource(), runner=runner,
                           uploader=store, cache=cache, store_root=runner.store_root)

    try:
        with ThreadPoolExecutor(3) as pool:
            results = list(pool.map(host, caches))
    finally:
        for cache in caches:
            cache.close()
    assert runner.count("realise") == 1
    assert len({r.manifest_digest for r in results}) == 1
    packed = [layer for r in results if not r.from_cache for layer in r.layers if not layer.reused]
    assert len(packed) == len(results[0].layers)
    assert store.lease_names() == ()


@pytest.fixture
def shared_fs(tmp_path: Path) -> FilesystemStore:
    return FilesystemStore(tmp_path / "bucket", durable=False)


def test_layer_lease_shares_layers_between_different_images(
    tmp_path: Path, shared_fs: FilesystemStore
) -> None:
    """Two hosts building different images at once pack their common layers once."""
    runner = FakeNix(tmp_path / "root", default_fake_packages())
    policy = LeasePolicy(ttl=30, poll_min=0.01, poll_max=0.05)
    names = ["shell/hello", "shell/hello/coreutils"]
    caches = [BuildCache(tmp_path / f"host-{i}", fleet=FleetFlight(policy)) for i in range(2)]
    packed: list[str] = []
    lock = threading.Lock()

    def host(i: int) -> BuildResult:
        result = build_image(Image.from_name(names[i]), FixedSource(), runner=runner,
                             uploader=shared_fs, cache=caches[i], store_root=runner.store_root)
        with lock:
            packed.extend(layer.digest for layer in result.layers if not layer.reused)
        return result

    try:
        with ThreadPoolExecutor(2) as pool:
            results = list(pool.map(host, range(2)))
    finally:
        for cache in caches:
            cache.close()
    common = {layer.digest for layer in results[0].layers} & {
        layer.digest for layer in results[1].layers
    }
    assert common  # the images share layers
    assert len(packed) == len(set(packed))  # no layer packed by both hosts
    assert list((shared_fs.root / "leases").iterdir()) == [shared_fs.root / "leases" / ".lock"]


def test_a_gone_holders_other_leases_are_taken_over_at_once() -> None:
    """After one expired lease, the same dead holder's other leases cost no second ttl."""
    store = MemoryStore()
    dead = b'{"holder": "dead-host", "ttl": 10}'
    assert store.create_lease("image", dead) is not None
    assert store.create_lease("layer", dead) is not None
    clock = FakeClock()
    flight = FleetFlight(LeasePolicy(ttl=10, poll_min=0.5, poll_max=1), clock=clock,
                         sleep=clock.sleep)

    def build_image_then_layer() -> str:
        took_image_at = clock.now
        flight.run(store, "layer", lambda: None, lambda: "layer")
        assert clock.now == took_image_at  # no wait for the layer
        return "image"

    assert flight.run(store, "image", lambda: None, build_image_then_layer) == "image"
    assert flight.stats.taken_over == 2
    assert store.lease_names() == ()


# --- a holder that has ended, seen from the same host ------------------------------


@attrs.define
class FakeProbe:
    """A ProcessProbe with a fixed name for this process and a set of ended processes."""

    me: ProcessId = attrs.Factory(lambda: ProcessId("node-a boot:1 pid:[1] time:[1]", 100, 5000))
    ended: set[ProcessId] = attrs.Factory(set)

    def this_process(self) -> ProcessId | None:
        return self.me

    def gone(self, process: ProcessId) -> bool:
        return process in self.ended


def _lease_body(process: ProcessId | None, ttl: float = 10, holder: str = "h-1") -> bytes:
    fields: dict[str, object] = {"holder": holder, "ttl": ttl}
    if process is not None:
        fields["process"] = process.to_json()
    return json.dumps(fields).encode()


def _build_time(flight: FleetFlight, clock: FakeClock, store: MemoryStore | FilesystemStore,
                name: str = "img") -> float:
    """Run a flight whose entry never appears; the fake time at which it built."""
    built: list[float] = []
    flight.run(store, name, lambda: None, lambda: built.append(clock.now))
    assert len(built) == 1
    return built[0]


@pytest.mark.parametrize("ended", [True, False])
def test_a_holder_on_this_host_is_taken_over_at_once_only_when_it_ended(ended: bool) -> None:
    """A same-host holder whose process ended costs no ttl; a running one keeps the ttl rule."""
    probe = FakeProbe()
    holder = ProcessId(probe.me.host, 200, 6000)
    if ended:
        probe.ended.add(holder)
    store = MemoryStore()
    assert store.create_lease("img", _lease_body(holder)) is not None
    clock = FakeClock()
    flight = FleetFlight(LeasePolicy(ttl=10, poll_min=0.5, poll_max=2), clock=clock,
                         sleep=clock.sleep, probe=probe)
    took = _build_time(flight, clock, store)
    if ended:
        assert took == 0
        assert clock.sleeps == []
    else:
        assert 10 <= took <= 12
    assert flight.stats.taken_over == 1
    assert flight.stats.dead_holders == (1 if ended else 0)
    assert store.lease_names() == ()


def test_many_waiters_take_a_dead_holders_lease_once() -> None:
    """Eight same-host waiters see a dead holder at once: one takes the lease and builds."""
    probe = FakeProbe()
    dead = ProcessId(probe.me.host, 200, 6000)
    probe.ended.add(dead)
    store = MemoryStore()
    assert store.create_lease("img", _lease_body(dead, ttl=60)) is not None
    entry: list[str] = []
    lock = threading.Lock()

    def build() -> str:
        with lock:
            entry.append("built")
        threading.Event().wait(0.2)  # the others keep trying meanwhile
        return "built"

    policy = LeasePolicy(ttl=60, poll_min=0.01, poll_max=0.05)
    flights = [FleetFlight(policy, probe=probe) for _ in range(8)]
    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(
            lambda f: f.run(store, "img", lambda: entry[0] if entry else None, build), flights
        ))
    assert answers == ["built"] * 8
    assert entry == ["built"]
    assert sum(f.stats.dead_holders for f in flights) == 1
    assert store.lease_names() == ()


def test_lease_bodies_name_the_holders_process() -> None:
    """The lease a flight writes names its process, which is how others judge it."""
    probe = FakeProbe()
    store = MemoryStore()
    seen: list[bytes] = []

    def build() -> str:
        current = store.read_lease("img")
        assert current is not None
        seen.append(current[0])
        return "built"

    FleetFlight(probe=probe).run(store, "img", lambda: None, build)
    assert ProcessId.from_json(json.loads(seen[0])["process"]) == probe.me


class _ReleaseFails(MemoryStore):
    def delete_lease(self, name: str, generation: str) -> bool:
        raise StorageUnavailable("storage gone while releasing", name)


def test_a_lease_this_process_failed_to_release_is_taken_over_at_once() -> None:
    """An orphan of this process (its release failed) costs no flight here a ttl, and its
    flight, still alive, keeps the leases it holds later."""
    store = _ReleaseFails()
    clock = FakeClock()
    policy = LeasePolicy(ttl=10, poll_min=0.5, poll_max=2)
    first = FleetFlight(policy, clock=clock, sleep=clock.sleep, probe=FakeProbe())
    assert _build_time(first, clock, store) == 0  # created; its release fails
    assert store.lease_names() == ("img",)
    assert _build_time(first, clock, store) == 0  # the same flight again
    other = FleetFlight(policy, clock=clock, sleep=clock.sleep, probe=FakeProbe())
    assert _build_time(other, clock, store) == 0  # a new flight (a new BuildCache) here
    assert (first.stats.dead_holders, other.stats.dead_holders) == (1, 1)
    assert clock.sleeps == []
    # The first flight is alive: a lease it holds now is not taken from it early.
    holding, done = threading.Event(), threading.Event()

    def hold() -> str:
        holding.set()
        done.wait(30)
        return "built"

    with ThreadPoolExecutor(1) as pool:
        held = pool.submit(first.run, store, "next", lambda: None, hold)
        assert holding.wait(10)
        since = clock.now
        try:
            answer = other.run(store, "next", lambda: "theirs" if clock.now >= since + 5 else None,
                               lambda: "built twice")
        finally:
            done.set()
        assert held.result() == "built"
    assert answer == "theirs"
    assert other.stats.taken_over == 1


def test_a_lease_another_flight_here_holds_is_not_taken_over_early() -> None:
    """A lease held by a live flight of this same process keeps the ttl rule for the others."""
    store = MemoryStore()
    holding, done = threading.Event(), threading.Event()

    def hold() -> str:
        holding.set()
        done.wait(30)
        return "built"

    holder = FleetFlight(LeasePolicy(ttl=60), probe=FakeProbe())
    clock = FakeClock()
    waiter = FleetFlight(LeasePolicy(ttl=60, poll_min=1, poll_max=4), clock=clock,
                         sleep=clock.sleep, probe=FakeProbe())
    with ThreadPoolExecutor(1) as pool:
        held = pool.submit(holder.run, store, "img", lambda: None, hold)
        assert holding.wait(10)
        try:
            answer = waiter.run(store, "img", lambda: "theirs" if clock.now >= 20 else None,
                                lambda: "built twice")
        finally:
            done.set()
        assert held.result() == "built"
    assert answer == "theirs"
    assert waiter.stats.taken_over == 0


# --- the same, with real processes ---------------------------------------------------

_HOLDER = r"""
import json, sys, time
from pathlib import Path
from nixery_core.lease import FleetFlight, LeasePolicy
from nixery_core.liveness import ProcfsProbe
from nixery_core.storage.filesystem import FilesystemStore

store, mode = FilesystemStore(Path(sys.argv[1]), durable=False), sys.argv[2]
if mode == "flight":  # a real holder: renews its lease while it "builds"
    def build():
        print("holding", flush=True)
        time.sleep(3600)
    FleetFlight(LeasePolicy(ttl=60)).run(store, "img", lambda: None, build)
else:  # a lease naming this process, never renewed (mode "still") or left at once ("exit")
    me = ProcfsProbe().this_process()
    body = {"holder": "holder-process", "ttl": 5, "process": me and me.to_json()}
    assert store.create_lease("img", json.dumps(body).encode())
    print(json.dumps(body["process"]), flush=True)
    if mode == "still":
        time.sleep(3600)
"""


@pytest.fixture
def holders(children: Children) -> Callable[..., subprocess.Popen[str]]:
    """Starts lease-holder processes; kills any still running at teardown."""

    def start(bucket: Path, mode: str, *, prefix: Sequence[str] = ()) -> subprocess.Popen[str]:
        argv = [*prefix, sys.executable, "-c", _HOLDER, str(bucket), mode]
        return children.start(tied_to_caller(argv), stdout=subprocess.PIPE,
                              env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})

    return start


linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")


@linux_only
@pytest.mark.parametrize("reaped", [True, False], ids=["reaped", "zombie"])
def test_a_holder_killed_with_sigkill_is_taken_over_well_before_the_ttl(
    tmp_path: Path, holders: Callable[..., subprocess.Popen[str]], reaped: bool
) -> None:
    """A real holder SIGKILLed mid-build (reaped or still a zombie): taken over, no 60 s wait."""
    store = FilesystemStore(tmp_path / "bucket", durable=False)
    holder = holders(store.root, "flight")
    assert holder.stdout is not None
    assert holder.stdout.readline().strip() == "holding"
    holder.send_signal(signal.SIGKILL)
    if reaped:
        holder.wait(timeout=10)
    flight = FleetFlight(LeasePolicy(ttl=60, poll_min=0.05, poll_max=0.5))
    started = time.monotonic()
    assert flight.run(store, "img", lambda: None, lambda: "built") == "built"
    # Not a speed target: the ttl rule alone could not take over before 60 s.
    assert time.monotonic() - started < 60
    assert (flight.stats.taken_over, flight.stats.dead_holders) == (1, 1)
    assert store.read_lease("img") is None


@linux_only
def test_a_live_holder_on_this_host_is_not_taken_over_before_the_ttl(
    tmp_path: Path, holders: Callable[..., subprocess.Popen[str]]
) -> None:
    """A running holder that stopped renewing is judged by the ttl alone, never early."""
    store = FilesystemStore(tmp_path / "bucket", durable=False)
    holder = holders(store.root, "still")
    assert holder.stdout is not None
    named = ProcessId.from_json(json.loads(holder.stdout.readline()))
    assert named is not None
    assert named.pid == holder.pid
    clock = FakeClock()
    flight = FleetFlight(LeasePolicy(ttl=60, poll_min=0.5, poll_max=1), clock=clock,
                         sleep=clock.sleep)
    assert 5 <= _build_time(flight, clock, store) <= 6  # the lease's own ttl, 5 s
    assert (flight.stats.taken_over, flight.stats.dead_holders) == (1, 0)
    assert holder.poll() is None


@linux_only
def test_a_dead_holder_on_another_host_waits_the_ttl(
    tmp_path: Path, holders: Callable[..., subprocess.Popen[str]]
) -> None:
    """The same ended holder is taken at once when its host is ours, after the ttl otherwise."""
    store = FilesystemStore(tmp_path / "bucket", durable=False)
    holder = holders(store.root, "exit")
    out, _ = holder.communicate(timeout=30)
    named = ProcessId.from_json(json.loads(out))
    assert named is not None
    boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    assert f"boot:{boot}" in named.host
    elsewhere = attrs.evolve(named, host=named.host.replace(boot, str(uuid.uuid4())))
    policy = LeasePolicy(ttl=60, poll_min=0.5, poll_max=1)
    clock = FakeClock()
    here = FleetFlight(policy, clock=clock, sleep=clock.sleep)
    assert _build_time(here, clock, store) == 0  # the holder's own lease: taken at once
    assert here.stats.dead_holders == 1
    assert store.create_lease("img", _lease_body(elsewhere, ttl=5)) is not None
    clock = FakeClock()
    there = FleetFlight(policy, clock=clock, sleep=clock.sleep)
    assert 5 <= _build_time(there, clock, store) <= 6  # the lease's own ttl, 5 s
    assert (there.stats.taken_over, there.stats.dead_holders) == (1, 0)


@linux_only
def test_a_live_holder_in_another_pid_namespace_waits_the_ttl(
    tmp_path: Path, holders: Callable[..., subprocess.Popen[str]]
) -> None:
    """A holder in another container (pid namespace) is never judged by our pids."""
    require_tools("unshare")
    probe = subprocess.run(["unshare", "-Urpf", "--mount-proc", "true"], check=False,
                           capture_output=True)
    if probe.returncode != 0:
        pytest.skip(f"cannot make a pid namespace here: {probe.stderr.decode().strip()}")
    store = FilesystemStore(tmp_path / "bucket", durable=False)
    # --kill-child: the holder dies with unshare (which the fixture kills at teardown).
    holder = holders(store.root, "still",
                     prefix=["unshare", "-Urpf", "--mount-proc", "--kill-child"])
    assert holder.stdout is not None
    named = ProcessId.from_json(json.loads(holder.stdout.readline()))
    assert named is not None
    assert named.pid == 1  # its own namespace's first process: pid 1 here is another process
    clock = FakeClock()
    flight = FleetFlight(LeasePolicy(ttl=60, poll_min=0.5, poll_max=1), clock=clock,
                         sleep=clock.sleep)
    assert 5 <= _build_time(flight, clock, store) <= 6
    assert flight.stats.dead_holders == 0
