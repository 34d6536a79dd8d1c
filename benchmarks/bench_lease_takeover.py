"""How long a SIGKILLed fleet-lease holder delays the next builder: same host against another.

A holder process takes the lease ``img`` in a filesystem store
(:class:`~nixery_core.lease.FleetFlight`, renewing it) and blocks in its
"build"; it is killed with SIGKILL, and a waiter in this process runs the
same flight.  Measured: the time from the kill to the waiter's takeover,

* **same host**: the waiter names the same host as the holder, sees that
  its process has ended (:class:`~nixery_core.liveness.ProcfsProbe`) and
  takes the lease at once;
* **another host** (the baseline, the ttl rule): the waiter's probe names a
  different hostname, so it cannot look the holder up and waits until it
  has seen the lease unchanged for the ttl.

``--reap`` waits for the killed holder before the waiter starts (otherwise
it is a zombie while the waiter looks).

Run from the repository root::

    .venv/bin/python -m benchmarks.bench_lease_takeover            # ttl 2 s, 5 rounds
    .venv/bin/python -m benchmarks.bench_lease_takeover --ttl 5 --rounds 3 --reap
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from nixery_core.lease import FleetFlight, LeasePolicy
from nixery_core.liveness import ProcfsProbe
from nixery_core.storage.filesystem import FilesystemStore

_HOLDER = r"""
import sys, time
from pathlib import Path
from nixery_core.lease import FleetFlight, LeasePolicy
from nixery_core.storage.filesystem import FilesystemStore

def build():
    print("holding", flush=True)
    time.sleep(3600)

store = FilesystemStore(Path(sys.argv[1]), durable=False)
FleetFlight(LeasePolicy(ttl=float(sys.argv[2]))).run(store, "img", lambda: None, build)
"""


def one_round(ttl: float, *, same_host: bool, reap: bool) -> float:
    """Seconds from SIGKILL of a holder to the waiter's takeover."""
    with tempfile.TemporaryDirectory(prefix="bench-lease-") as tmp:
        store = FilesystemStore(Path(tmp) / "bucket", durable=False)
        holder = subprocess.Popen(
            [sys.executable, "-c", _HOLDER, str(store.root), str(ttl)],
            stdout=subprocess.PIPE, text=True,
            env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
        )
        assert holder.stdout is not None
        try:
            if holder.stdout.readline().strip() != "holding":
                raise SystemExit("the holder did not take the lease")
            probe = ProcfsProbe() if same_host else ProcfsProbe(hostname=lambda: "elsewhere")
            flight = FleetFlight(LeasePolicy(ttl=ttl, poll_min=0.05, poll_max=0.25), probe=probe)
            killed = time.monotonic()
            holder.send_signal(signal.SIGKILL)
            if reap:
                holder.wait()
            took: list[float] = []
            flight.run(store, "img", lambda: None, lambda: took.append(time.monotonic()))
            expected = 1 if same_host else 0
            if flight.stats.dead_holders != expected or flight.stats.taken_over != 1:
                raise SystemExit(f"unexpected takeover: {flight.stats}")
            return took[0] - killed
        finally:
            holder.kill()
            holder.wait()
            holder.stdout.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ttl", type=float, default=2.0, help="lease ttl in seconds (2)")
    parser.add_argument("--rounds", type=int, default=5, help="kills per case (5)")
    parser.add_argument("--reap", action="store_true", help="reap the holder before waiting")
    args = parser.parse_args()
    logging.basicConfig(level=logging.ERROR)
    print(f"SIGKILLed lease holder -> takeover; ttl {args.ttl} s, {args.rounds} rounds, "
          f"holder {'reaped' if args.reap else 'a zombie'} while the waiter looks; "
          f"load average {os.getloadavg()[0]:.1f}")
    medians = {}
    for same_host in (False, True):
        times = [one_round(args.ttl, same_host=same_host, reap=args.reap)
                 for _ in range(args.rounds)]
        name = "same host" if same_host else "another host (ttl rule)"
        medians[same_host] = statistics.median(times)
        print(f"  {name:<24} min {min(times) * 1000:8.1f} ms   median "
              f"{medians[same_host] * 1000:8.1f} ms   max {max(times) * 1000:8.1f} ms")
    print(f"  same host takes over {medians[False] / medians[True]:.0f}x sooner (medians)")


if __name__ == "__main__":
    main()
