"""Fleet-wide single flight: hosts that share only a bucket build each key once.

:class:`~nixery_core.cache.BuildCache` keeps one build per key on one host
(threads share a flight, processes an ``flock``).  Hosts that share only the
store coordinate here, through a *lease*: a small ``leases/<name>`` object
in the store, written only on a generation precondition
(:class:`~nixery_core.protocols.SupportsLeases`: ``ifGenerationMatch`` on
GCS, ``O_EXCL`` and a lock on a shared filesystem).

For one key (an image's manifest key, or one layer's key):

* the first host to **create** the lease builds; a thread renews it every
  ``ttl / 3`` seconds (a replace conditional on the generation it holds) and
  the lease is **released** (a conditional delete) once the cache entry has
  landed, or when the build fails, so the next host can try;
* every other host **waits**: it polls the cache entry (``ready``) with
  exponential backoff and returns the entry as soon as it appears;
* a waiter that sees the *same generation* for the lease's ``ttl`` by its
  own clock **takes it over** (a replace conditional on that generation, so
  exactly one waiter wins) and builds.  A holder killed with ``SIGKILL``
  therefore delays the others by at most ``ttl`` plus one poll, and no
  clock is compared across hosts: expiry is measured by each waiter's
  monotonic clock, from when it first saw that generation.  A waiter that
  took over a lease remembers its holder as gone and takes over that
  holder's other leases (the layers it was packing) at once, so a killed
  image build costs its waiters one ``ttl``, not one per lease.
* a waiter that can see the holder has **died** takes over at once, with
  the same conditional replace.  Each lease body names its holder's
  process (:class:`~nixery_core.liveness.ProcessId`: host, pid, start
  time); a waiter on the same host, in the same pid namespace, whose
  :class:`~nixery_core.protocols.ProcessProbe` finds that process gone
  (no such pid, a different start time, a zombie) does not wait for the
  ttl.  A holder in *this* process whose hold ended without a release (the
  store failed at the delete) is found the same way: the process keeps
  the set of leases its flights hold.  A holder on another host, and a
  lease written before bodies named processes, keep the ttl rule.

The lease is an optimisation, never a correctness requirement: blobs are
content-addressed and entries identical, so a host that cannot reach the
lease (a storage error) logs a warning and builds, and a holder that lost
its lease to a takeover (it stalled for ``ttl``) finishes harmlessly.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import socket
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from typing import TypeVar

import attrs

from nixery_core.errors import StorageError
from nixery_core.liveness import ProcessId, ProcfsProbe
from nixery_core.protocols import ProcessProbe, SupportsLeases
from nixery_core.tally import Tally

__all__ = ["FleetFlight", "FleetStats", "LeasePolicy"]

log = logging.getLogger(__name__)
T = TypeVar("T")


def _positive(instance: object, attribute: attrs.Attribute[float], value: float) -> None:
    if not value > 0:
        raise ValueError(f"{attribute.name} must be positive, not {value!r}")


@attrs.frozen
class LeasePolicy:
    """How long a lease lives and how waiters poll.

    ``ttl``: seconds a lease stays valid without renewal (the longest a
    killed holder delays the others); the holder renews every ``ttl / 3``.
    Waiters poll the cache entry first after ``poll_min`` seconds, then
    ``backoff`` times longer each time, up to ``poll_max``.
    """

    ttl: float = attrs.field(default=30.0, validator=_positive)
    poll_min: float = attrs.field(default=0.05, validator=_positive)
    poll_max: float = attrs.field(default=1.0, validator=_positive)
    backoff: float = attrs.field(default=1.5, validator=_positive)

    @property
    def renew_every(self) -> float:
        return self.ttl / 3


@attrs.frozen
class FleetStats:
    """What the fleet flights of one :class:`FleetFlight` did.

    ``acquired``: leases created (this host built); ``taken_over``: expired
    leases taken over (their holder had died or stalled); ``waited``: flights
    that found another host's lease and waited; ``served_by_others``: of
    those, the ones another host's entry answered; ``lost``: leases taken
    over from this host while it still built; ``errors``: lease operations
    that failed (the build then went ahead without a lease);
    ``dead_holders``: of ``taken_over``, the leases taken at once because
    their holder's process was seen to have ended on this host.
    """

    acquired: int = 0
    taken_over: int = 0
    dead_holders: int = 0
    waited: int = 0
    served_by_others: int = 0
    lost: int = 0
    errors: int = 0


def _fields(body: bytes) -> dict[str, object]:
    """A lease body's JSON fields (empty when it is not a JSON object)."""
    try:
        data = json.loads(body)
    except ValueError:
        return {}
    return data if isinstance(data, dict) else {}


def _default_holder() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:12]}"


class _HeldHere:
    """The leases flights in this process hold: ``(name, holder)`` pairs, counted.

    A pair is added just before the create or replace that may win the
    lease and dropped when that write lost or the hold ended, so a lease
    body naming this process and a pair not in here is an orphan: its
    holder's release failed.  One per process (:data:`_HELD_HERE`): every
    flight in the process must see every other's holds.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._pairs: Counter[tuple[str, str]] = Counter()

    def add(self, name: str, holder: str) -> None:
        with self._lock:
            self._pairs[name, holder] += 1

    def drop(self, name: str, holder: str) -> None:
        with self._lock:
            self._pairs[name, holder] -= 1
            if self._pairs[name, holder] <= 0:
                del self._pairs[name, holder]

    def holds(self, name: str, holder: str) -> bool:
        with self._lock:
            return self._pairs[name, holder] > 0


_HELD_HERE = _HeldHere()


@attrs.define
class _Held:
    """A lease this host holds, and the thread renewing it."""

    name: str
    generation: str
    lost: bool = False
    stop: threading.Event = attrs.Factory(threading.Event)


@attrs.define
class FleetFlight:
    """Runs builds under fleet leases (see the module docs); one per cache.

    ``clock`` is monotonic seconds and ``sleep`` waits, both injectable;
    ``holder`` names this flight in lease bodies (unique per flight);
    ``probe`` names this process in lease bodies and tells whether another
    holder's process has ended (``/proc`` by default; where it cannot tell,
    the ttl rule alone applies).
    """

    policy: LeasePolicy = attrs.Factory(LeasePolicy)
    clock: Callable[[], float] = time.monotonic
    sleep: Callable[[float], None] = time.sleep
    holder: str = attrs.Factory(_default_holder)
    probe: ProcessProbe = attrs.Factory(ProcfsProbe)
    _tally: Tally[FleetStats] = attrs.field(init=False, factory=lambda: Tally(FleetStats))
    _seq: int = attrs.field(init=False, default=0)
    _seq_lock: threading.Lock = attrs.field(init=False, factory=threading.Lock)
    # Holders whose lease expired unrenewed: their other leases are taken over at once.
    _gone: set[str] = attrs.field(init=False, factory=set)

    @property
    def stats(self) -> FleetStats:
        """Totals since this object was made."""
        return self._tally.snapshot()

    def _body(self) -> bytes:
        """A lease body, unique per write (holder and sequence number)."""
        with self._seq_lock:
            self._seq += 1
            seq = self._seq
        fields: dict[str, object] = {
            "holder": self.holder, "seq": seq, "ttl": self.policy.ttl, "written": time.time(),
        }
        process = self.probe.this_process()
        if process is not None:
            fields["process"] = process.to_json()
        return json.dumps(fields, sort_keys=True).encode()

    def _dead(self, name: str, fields: dict[str, object]) -> ProcessId | None:
        """The holder's process when this host sees it has ended (or orphaned the lease)."""
        process = ProcessId.from_json(fields.get("process"))
        holder = fields.get("holder")
        if process is None or not isinstance(holder, str):
            return None
        if process == self.probe.this_process():
            # This process holds it, or held it and could not release it.
            return None if _HELD_HERE.holds(name, holder) else process
        return process if self.probe.gone(process) else None

    def _ttl_of(self, fields: dict[str, object]) -> float:
        """The holder's ttl from its lease body (ours when unreadable); 0 for a gone holder."""
        holder = fields.get("holder")
        if isinstance(holder, str):
            with self._seq_lock:
                if holder in self._gone:
                    return 0.0
        ttl = fields.get("ttl")
        if isinstance(ttl, int | float) and not isinstance(ttl, bool) and ttl > 0:
            return float(ttl)
        return self.policy.ttl

    def _mark_gone(self, fields: dict[str, object]) -> None:
        holder = fields.get("holder")
        if isinstance(holder, str) and holder != self.holder:
            with self._seq_lock:
                self._gone.add(holder)

    def run(
        self,
        store: SupportsLeases,
        name: str,
        ready: Callable[[], T | None],
        build: Callable[[], T],
    ) -> T:
        """``ready()`` if another host provides it, else ``build()`` under the lease ``name``.

        Call it after ``ready()`` has just missed; ``ready`` is polled while
        another host holds the lease and checked again once this host holds
        it, and ``build`` must write the entry ``ready`` looks for.
        """
        try:
            held = self._acquire_or_wait(store, name, ready)
        except StorageError as exc:
            log.warning("lease %s unavailable (%s); building without it", name, exc)
            self._tally.add("errors")
            return build()
        if not isinstance(held, _Held):
            return held
        try:
            with self._renewing(store, held):
                found = ready()
                if found is not None:
                    return found
                return build()
        finally:
            _HELD_HERE.drop(name, self.holder)

    def _acquire_or_wait(
        self, store: SupportsLeases, name: str, ready: Callable[[], T | None]
    ) -> _Held | T:
        seen: str | None = None  # the generation last seen
        seen_since = 0.0
        delay = self.policy.poll_min
        waited = False
        vanished = 0
        while True:
            generation = self._claim(name, lambda: store.create_lease(name, self._body()))
            if generation is not None:
                self._tally.add("acquired")
                return _Held(name, generation)
            current = store.read_lease(name)
            if current is None and vanished < 3:
                vanished += 1
                continue  # released between the two calls: try to create it again
            vanished = 0
            body, generation = current if current is not None else (b"", "")
            now = self.clock()
            if generation != seen:
                seen, seen_since = generation, now
            fields = _fields(body)  # the lease body, read once for every check below
            dead = self._dead(name, fields) if current is not None else None
            if dead is not None or now - seen_since >= self._ttl_of(fields):
                taken = self._claim(
                    name, functools.partial(store.replace_lease, name, self._body(), generation)
                )
                if taken is not None:
                    if dead is not None:
                        log.warning("lease %s: its holder, pid %d on this host, has ended; "
                                    "taking it over", name, dead.pid)
                        self._tally.add("dead_holders")
                    else:
                        log.warning("lease %s expired (holder gone); taking it over", name)
                    if dead is None or dead != self.probe.this_process():
                        self._mark_gone(fields)  # not a flight of this (live) process
                    self._tally.add("taken_over")
                    return _Held(name, taken)
                seen = None  # another waiter took it over first
            if not waited:
                waited = True
                self._tally.add("waited")
            self.sleep(delay)
            delay = min(delay * self.policy.backoff, self.policy.poll_max)
            found = ready()
            if found is not None:
                self._tally.add("served_by_others")
                return found

    def _claim(self, name: str, write: Callable[[], str | None]) -> str | None:
        """``write()`` (a create or replace of lease ``name``) with this flight's hold recorded.

        The hold is recorded first, so no flight in this process ever sees
        this flight's fresh lease unrecorded; it stays recorded when the
        write won (until :meth:`run` ends the hold), else it is dropped.
        """
        _HELD_HERE.add(name, self.holder)
        won: str | None = None
        try:
            won = write()
        finally:
            if won is None:
                _HELD_HERE.drop(name, self.holder)
        return won

    @contextlib.contextmanager
    def _renewing(self, store: SupportsLeases, held: _Held) -> Iterator[None]:
        """Renew ``held`` in a thread while the body runs; release it afterwards."""
        thread = threading.Thread(
            target=self._renew_loop, args=(store, held), name=f"lease-{held.name[:20]}",
            daemon=True,
        )
        thread.start()
        try:
            yield
        finally:
            held.stop.set()
            thread.join()
            self._release(store, held)

    def _renew_loop(self, store: SupportsLeases, held: _Held) -> None:
        while not held.stop.wait(self.policy.renew_every):
            try:
                renewed = store.replace_lease(held.name, self._body(), held.generation)
            except StorageError as exc:
                log.warning("renewing lease %s failed (%s); retrying", held.name, exc)
                continue
            if renewed is None:
                log.warning("lease %s was taken over while this host built it", held.name)
                held.lost = True
                self._tally.add("lost")
                return
            held.generation = renewed

    def _release(self, store: SupportsLeases, held: _Held) -> None:
        if held.lost:
            return
        try:
            store.delete_lease(held.name, held.generation)
        except StorageError as exc:  # it expires by itself
            log.warning("releasing lease %s failed (%s); it expires in %ss", held.name, exc,
                        self.policy.ttl)
