"""A fleet on loopback: three example-registry processes sharing one fake-gcs-server bucket.

Issue 18, "a fleet that builds each image once".  Starts fake-gcs-server
and three ``python -m examples.registry`` processes (each with its own local
cache directory, the offline package set, real Nix with no substituters),
then sends ``--requests`` manifest GETs over ``--images`` images none of them
has built, ``--concurrency`` at a time, in a seeded random order, each to one
of the three registries in turn.  Each registry process is instrumented
through a ``sitecustomize`` module (on its ``PYTHONPATH`` only) that logs
every Nix realisation (with the image) and every layer packed (with its
digest) to a file; nothing in the registry is changed.

Printed:

* Nix realisations per image (target: exactly 1 for every image);
* layers packed per distinct layer (target: exactly 1 for every layer);
* latency of *cached* requests (sent after that image's first answer
  arrived, anywhere): p50 and p95; and, for context, of the others;
* whether every answer for an image named the same manifest digest.

Run from the repository root::

    .venv/bin/python -m benchmarks.bench_fleet                 # 200 requests, 20 images
    .venv/bin/python -m benchmarks.bench_fleet --images 3 --requests 24
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, contextmanager
from pathlib import Path

import attrs

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))

from servers import FakeGcsServer  # noqa: E402 - tests/ is put on the path just above

from nixery_core.names import Image  # noqa: E402 - after the path set-up, like the line above

#: Packages of the offline set that make distinct images in pairs (cacert and iana-etc are
#: in every image already, so pairs with them would name the same image twice).
PACKAGES = ("hello", "nano", "curl", "socat", "openssl", "moreutils", "busybox", "coreutils")
ACCEPT = "application/vnd.oci.image.manifest.v1+json"

_SITECUSTOMIZE = textwrap.dedent(
    '''
    """Benchmark instrumentation: log Nix realisations and packed layers (bench_fleet)."""
    import json, os

    _LOG = os.environ["NIXERY_BENCH_LOG"]


    def _record(kind, value):
        line = json.dumps({"kind": kind, "value": value, "pid": os.getpid()}) + "\\n"
        fd = os.open(_LOG, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, line.encode())
        finally:
            os.close(fd)


    from nixery_core import build as _build, nix as _nix

    _realise = _nix.realise


    def realise(image, *args, **kwargs):
        _record("realise", image.reference)
        return _realise(image, *args, **kwargs)


    _nix.realise = realise
    _pack = _build._Build._pack


    def _logged_pack(self, *args, **kwargs):
        built = _pack(self, *args, **kwargs)
        _record("packed", built.digest)
        return built


    _build._Build._pack = _logged_pack
    '''
)


def image_names(count: int, seed: int) -> list[str]:
    """``count`` distinct two-package images in a seeded order."""
    pairs = [f"{a}/{b}" for i, a in enumerate(PACKAGES) for b in PACKAGES[i + 1 :]]
    random.Random(seed).shuffle(pairs)
    chosen: dict[tuple[str, ...], str] = {}
    for name in pairs:  # distinct package sets only
        chosen.setdefault(Image.from_name(name).packages, name)
    if count > len(chosen):
        raise SystemExit(f"at most {len(chosen)} images")
    return list(chosen.values())[:count]


@attrs.frozen
class Answer:
    image: str
    registry: int
    started: float
    seconds: float
    status: int
    digest: str


@attrs.frozen
class Report:
    answers: tuple[Answer, ...]
    realisations: dict[str, int]
    packed: dict[str, int]
    cached_latencies: tuple[float, ...]
    cold_latencies: tuple[float, ...]

    @property
    def consistent(self) -> bool:
        digests: dict[str, set[str]] = collections.defaultdict(set)
        for answer in self.answers:
            digests[answer.image].add(answer.digest)
        return all(len(d) == 1 for d in digests.values())


def _percentile(values: Sequence[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


@contextmanager
def registries(work: Path, gcs: FakeGcsServer, bucket: str, count: int) -> Iterator[list[str]]:
    """``count`` example-registry processes on one bucket; their base URLs."""
    site = work / "site"
    site.mkdir(exist_ok=True)
    (site / "sitecustomize.py").write_text(_SITECUSTOMIZE)
    procs: list[subprocess.Popen[str]] = []
    urls: list[str] = []
    try:
        for i in range(count):
            env = {
                **os.environ,
                "PYTHONPATH": f"{site}{os.pathsep}{REPO}",
                "NIXERY_BENCH_LOG": str(work / "events.jsonl"),
                "NIXERY_PKGS_PATH": str(REPO / "nix" / "offline"),
                "NIXERY_STORAGE_BACKEND": "gcs",
                "GCS_BUCKET": bucket,
                "STORAGE_EMULATOR_HOST": gcs.url,
                "GOOGLE_CLOUD_PROJECT": "test",
                "NIXERY_CACHE_DIR": str(work / f"cache-{i}"),
                "NIX_CONFIG": "substituters =",
                "NIX_TIMEOUT": "300",
                "HOST": "127.0.0.1",
                "PORT": "0",
            }
            with (work / f"registry-{i}.log").open("w") as log:
                proc = subprocess.Popen(
                    [sys.executable, "-m", "examples.registry"], cwd=REPO, env=env,
                    stdout=subprocess.PIPE, stderr=log, text=True,
                )
            procs.append(proc)
            assert proc.stdout is not None
            line = proc.stdout.readline()
            if not line.startswith("listening on "):
                raise RuntimeError(f"registry {i} did not start: {line!r}, see {work}")
            urls.append(line.split()[-1])
        yield urls
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            if proc.stdout is not None:
                proc.stdout.close()


def _get(url: str, image: str) -> tuple[int, str]:
    request = urllib.request.Request(  # noqa: S310 - a loopback URL built here
        f"{url}/v2/{image}/manifests/latest", headers={"Accept": ACCEPT}
    )
    try:
        with urllib.request.urlopen(request, timeout=600) as response:  # noqa: S310 - as above
            return response.status, response.headers.get("Docker-Content-Digest", "")
    except urllib.error.HTTPError as exc:  # reported, not raised: the summary counts them
        with exc:
            return exc.code, exc.read()[:300].decode(errors="replace")


def run_load(
    work: Path, *, images: int, requests: int, concurrency: int, seed: int, instances: int = 3
) -> Report:
    """The whole experiment in ``work``; returns what the registries did and what clients saw."""
    names = image_names(images, seed)
    order = [names[i % len(names)] for i in range(requests)]
    random.Random(seed + 1).shuffle(order)
    first_answer: dict[str, float] = {}
    lock = threading.Lock()
    with ExitStack() as stack:
        gcs = stack.enter_context(FakeGcsServer())
        gcs.make_bucket("fleet-bench")
        urls = stack.enter_context(registries(work, gcs, "fleet-bench", instances))

        def one(index: int) -> Answer:
            image = order[index]
            registry = index % len(urls)
            started = time.monotonic()
            status, digest = _get(urls[registry], image)
            done = time.monotonic()
            with lock:
                first_answer.setdefault(image, done)
            return Answer(image, registry, started, done - started, status, digest)

        with ThreadPoolExecutor(concurrency) as pool:
            answers = tuple(pool.map(one, range(requests)))
    events = [json.loads(line) for line in (work / "events.jsonl").read_text().splitlines()]
    realisations = collections.Counter(e["value"] for e in events if e["kind"] == "realise")
    packed = collections.Counter(e["value"] for e in events if e["kind"] == "packed")
    cached = tuple(a.seconds for a in answers if a.started >= first_answer[a.image])
    cold = tuple(a.seconds for a in answers if a.started < first_answer[a.image])
    return Report(
        answers,
        {name: realisations.get(Image.from_name(name).reference, 0) for name in names},
        dict(packed),
        cached,
        cold,
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n", 1)[0])
    parser.add_argument("--images", type=int, default=20)
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--seed", type=int, default=18)
    args = parser.parse_args(argv)
    print(f"{args.requests} requests over {args.images} new images, {args.concurrency} at a "
          f"time, to 3 registries on one fake-gcs-server bucket; load average "
          f"{os.getloadavg()[0]:.1f}", flush=True)
    start = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="bench-fleet-") as tmp:
        report = run_load(Path(tmp), images=args.images, requests=args.requests,
                          concurrency=args.concurrency, seed=args.seed)
    for failed in {(a.image, a.status, a.digest) for a in report.answers if a.status != 200}:
        print(f"  failed: {failed}")
    print(f"  done in {time.monotonic() - start:.0f} s; every answer 200: "
          f"{all(a.status == 200 for a in report.answers)}; one digest per image: "
          f"{report.consistent}")
    real = list(report.realisations.values())
    packs = list(report.packed.values())
    print(f"\nNix realisations per image: min {min(real)}, max {max(real)}, "
          f"total {sum(real)} for {len(real)} images")
    print(f"layers packed per distinct layer: min {min(packs)}, max {max(packs)}, "
          f"total {sum(packs)} for {len(packs)} distinct layers")
    cached, cold = report.cached_latencies, report.cold_latencies
    print(f"cached requests ({len(cached)}): p50 {1000 * _percentile(cached, 0.5):.1f} ms, "
          f"p95 {1000 * _percentile(cached, 0.95):.1f} ms")
    if cold:
        print(f"requests before the image's first answer ({len(cold)}): "
              f"p50 {statistics.median(cold):.2f} s, max {max(cold):.2f} s")
    ok = max(real) == min(real) == 1 and max(packs) == 1
    print(f"\n  {'PASS' if ok else 'MISS'}  exactly one realisation per image and one pack "
          "per distinct layer")
    return 0


if __name__ == "__main__":
    sys.exit(main())
