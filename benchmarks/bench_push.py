"""Parallel blob push against serial push, measured in one run on a 94-layer image.

A 94-layer image (Nixery's layer budget) of seeded random layers, sizes
log-uniform between 20 kB and 4 MB, is pushed with
:func:`nixery_core.registry_push.push_image` to Debian's ``docker-registry``
on loopback, once with ``workers=1`` (one blob after another, the old
behaviour) and once with each parallel setting, every run into a fresh
repository with fresh blob bytes (so every blob is uploaded, none skipped
or mounted).  Runs are interleaved and repeated; the medians are compared.

``--delay-ms`` puts a proxy in front of the registry that holds every
request that long before forwarding it, as a registry across a network
would: that is where parallel pushes gain most.  Loopback (``0``) is the
worst case for them: the work is hashing and disk on a shared CPU.

Run: ``.venv/bin/python benchmarks/bench_push.py`` (``--quick``: fewer
rounds; ``--seed``: another image; the reported figures use seed 94, the
default worker count was chosen on seed 13).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import random
import shutil
import socket
import statistics
import subprocess
import tempfile
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

from nixery_core.digests import sha256_digest
from nixery_core.manifest import OCI_CONFIG, LayerDescriptor, render_manifest
from nixery_core.media_types import OCI_LAYER_GZIP
from nixery_core.protocols import BlobInfo
from nixery_core.registry_push import push_image
from nixery_core.storage.filesystem import FilesystemStore

LAYERS = 94


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@contextlib.contextmanager
def docker_registry(work: Path) -> Iterator[str]:
    """docker-registry with filesystem storage under ``work``; yields host:port."""
    binary = shutil.which("docker-registry")
    if binary is None:
        raise SystemExit("docker-registry is not installed (scripts/setup.sh installs it)")
    port = free_port()
    config = work / "config.yml"
    config.write_text(
        "version: 0.1\nlog:\n  level: error\n  accesslog:\n    disabled: true\n"
        f"storage:\n  filesystem:\n    rootdirectory: {work / 'data'}\n"
        f"http:\n  addr: 127.0.0.1:{port}\n  secret: bench\n"
    )
    process = subprocess.Popen(
        [binary, "serve", str(config)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 15
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/v2/", timeout=1):
                    break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        yield f"127.0.0.1:{port}"
    finally:
        process.terminate()
        process.wait(timeout=10)


@contextlib.contextmanager
def delaying_proxy(target: str, delay: float) -> Iterator[str]:
    """A TCP proxy that holds each client-to-server chunk ``delay`` seconds; yields host:port."""
    host, port = target.rsplit(":", 1)
    loop = asyncio.new_event_loop()
    ready = threading.Event()
    address: list[int] = []

    async def pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, hold: float) -> None:
        try:
            while data := await reader.read(1 << 16):
                if hold:
                    await asyncio.sleep(hold)
                writer.write(data)
                await writer.drain()
        except ConnectionError:
            pass
        finally:
            writer.close()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        upstream_reader, upstream_writer = await asyncio.open_connection(host, int(port))
        await asyncio.gather(
            pipe(reader, upstream_writer, delay), pipe(upstream_reader, writer, 0.0)
        )

    stop: list[asyncio.Event] = []

    async def serve() -> None:
        stop.append(asyncio.Event())
        server = await asyncio.start_server(handle, "127.0.0.1", 0)
        address.append(server.sockets[0].getsockname()[1])
        ready.set()
        await stop[0].wait()
        server.close()
        others = [task for task in asyncio.all_tasks() if task is not asyncio.current_task()]
        for task in others:
            task.cancel()
        await asyncio.gather(*others, return_exceptions=True)
        await server.wait_closed()

    thread = threading.Thread(target=loop.run_until_complete, args=(serve(),), daemon=True)
    thread.start()
    ready.wait(10)
    try:
        yield f"127.0.0.1:{address[0]}"
    finally:
        loop.call_soon_threadsafe(stop[0].set)
        thread.join(timeout=10)
        loop.close()


def layer_sizes(seed: int) -> list[int]:
    """94 sizes, log-uniform between 20 kB and 4 MB."""
    rng = random.Random(seed)
    low, high = math.log(20_000), math.log(4_000_000)
    return [int(math.exp(rng.uniform(low, high))) for _ in range(LAYERS)]


def synthetic_image(store: FilesystemStore, sizes: list[int], salt: int) -> bytes:
    """An OCI manifest over random layers of ``sizes`` (bytes differ per ``salt``)."""
    rng = random.Random(salt)
    layers = []
    for size in sizes:
        info = store.put_blob(rng.randbytes(size), OCI_LAYER_GZIP)
        layers.append(LayerDescriptor(info.digest, info.size, OCI_LAYER_GZIP, info.digest))
    config = json.dumps(
        {"architecture": "amd64", "os": "linux", "salt": salt,
         "rootfs": {"type": "layers", "diff_ids": [layer.diff_id for layer in layers]}},
        sort_keys=True,
    ).encode()
    store.put_blob(config, OCI_CONFIG)
    manifest, _ = render_manifest(
        config=BlobInfo(sha256_digest(config), len(config), OCI_CONFIG), layers=layers,
        format="oci",
    )
    return manifest


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--seed", type=int, default=94)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="one round")
    parser.add_argument("--workers", default="4,8", help="parallel settings to compare")
    parser.add_argument("--delay-ms", type=float, default=0.0)
    args = parser.parse_args()
    rounds = 1 if args.quick else args.rounds
    settings = [1, *(int(w) for w in args.workers.split(","))]
    sizes = layer_sizes(args.seed)
    print(f"image: {LAYERS} layers, {sum(sizes) / 1e6:.1f} MB (seed {args.seed}); "
          f"delay {args.delay_ms:g} ms per request chunk; {rounds} rounds")
    with tempfile.TemporaryDirectory(prefix="bench-push-") as tmp:
        work = Path(tmp)
        store = FilesystemStore(work / "store")
        times: dict[int, list[float]] = {w: [] for w in settings}
        with contextlib.ExitStack() as stack:
            host = stack.enter_context(docker_registry(work))
            if args.delay_ms:
                host = stack.enter_context(delaying_proxy(host, args.delay_ms / 1000))
            run = 0
            for _ in range(rounds):
                for workers in settings:
                    run += 1
                    manifest = synthetic_image(store, sizes, salt=args.seed * 1000 + run)
                    started = time.perf_counter()
                    result = push_image(
                        store=store, manifest=manifest,
                        manifest_media_type="application/vnd.oci.image.manifest.v1+json",
                        target=f"{host}/bench/run{run}:latest", insecure=True,
                        workers=workers, referrers=False,
                    )
                    times[workers].append(time.perf_counter() - started)
                    if result.blobs_uploaded != LAYERS + 1:
                        raise SystemExit(f"run {run}: {result.blobs_uploaded} blobs uploaded")
    serial = statistics.median(times[1])
    print(f"{'workers':>8} {'median s':>9} {'MB/s':>7} {'vs serial':>10}")
    for workers in settings:
        median = statistics.median(times[workers])
        print(f"{workers:>8} {median:>9.2f} {sum(sizes) / 1e6 / median:>7.1f} "
              f"{serial / median:>9.2f}x")


if __name__ == "__main__":
    main()
