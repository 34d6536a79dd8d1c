"""Latency figures for the example registry, measured against itself in one run.

``python -m examples.registry.bench`` (needs Nix; offline package set) starts
the registry in a thread over a fresh store and cache and prints:

- **cold**: a manifest request that builds (Nix evaluation, realisation with
  the outputs already in the Nix store, layering, packing, uploading),
  once per image of :data:`IMAGES`;
- **cached**: the same requests once the manifest cache holds them;
- **concurrent**: 50 requests over the 5 images at once, cold then cached;
- **blob**: streaming the largest layer.

Ratios are against the cold build of the same run, so the figures compare
on any machine; absolute times are printed for context only.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import httpx

from examples.registry.app import create_app
from examples.registry.config import RegistryConfig
from examples.registry.server import serving
from nixery_core.cache import BuildCache
from nixery_core.nixexprs import offline_package_set
from nixery_core.sources import LocalPathSource
from nixery_core.storage.filesystem import FilesystemStore

__all__ = ["IMAGES", "main"]

IMAGES = ("hello", "shell", "shell/hello", "busybox", "coreutils")
_ACCEPT = {"Accept": "application/vnd.oci.image.manifest.v1+json"}


def _get(client: httpx.Client, path: str) -> float:
    start = time.perf_counter()
    response = client.get(path, headers=_ACCEPT)
    elapsed = time.perf_counter() - start
    response.raise_for_status()
    return elapsed


async def _burst(base: str, count: int) -> float:
    limits = httpx.Limits(max_connections=count)
    async with httpx.AsyncClient(base_url=base, timeout=300, limits=limits) as client:
        start = time.perf_counter()
        responses = await asyncio.gather(*(
            client.get(f"/v2/{IMAGES[i % len(IMAGES)]}/manifests/latest", headers=_ACCEPT)
            for i in range(count)
        ))
        elapsed = time.perf_counter() - start
    for response in responses:
        response.raise_for_status()
    return elapsed


def _ms(seconds: float) -> str:
    return f"{seconds * 1000:.1f} ms"


def _run(work: Path, repeats: int) -> None:
    store = FilesystemStore(work / "store")
    with BuildCache(work / "cache") as cache:
        config = RegistryConfig(
            source=LocalPathSource(offline_package_set()), store=store, cache=cache,
            nix_options={"substituters": ""},
        )
        with (
            serving(create_app(config)) as base,
            httpx.Client(base_url=base, timeout=300) as client,
        ):
            cold = [_get(client, f"/v2/{name}/manifests/latest") for name in IMAGES]
            cached = [
                _get(client, f"/v2/{name}/manifests/latest")
                for _ in range(repeats)
                for name in IMAGES
            ]
            manifest = client.get("/v2/shell/hello/manifests/latest", headers=_ACCEPT).json()
            largest = max(manifest["layers"], key=lambda layer: layer["size"])
            blob_times = [
                _get(client, f"/v2/shell/hello/blobs/{largest['digest']}") for _ in range(repeats)
            ]
        cold_median = statistics.median(cold)
        cached_median = statistics.median(cached)
        print(f"{f'cold build, median of {len(cold)} images':<42}{_ms(cold_median)}")
        print(
            f"{f'cached manifest, median of {len(cached)}':<42}{_ms(cached_median)}"
            f"  ({cold_median / cached_median:.0f}x faster than cold)"
        )
        cached_p95 = statistics.quantiles(cached, n=20)[-1]
        print(f"{'cached manifest, p95':<42}{_ms(cached_p95)}")
        blob_mib = largest["size"] / (1 << 20)
        blob_median = statistics.median(blob_times)
        print(
            f"{f'largest layer ({blob_mib:.1f} MiB), median':<42}{_ms(blob_median)}"
            f"  ({blob_mib / blob_median:.0f} MiB/s)"
        )

    burst_store = work / "burst"
    with BuildCache(burst_store / "cache") as cache:
        config = RegistryConfig(
            source=LocalPathSource(offline_package_set()),
            store=FilesystemStore(burst_store / "store"), cache=cache,
            nix_options={"substituters": ""},
        )
        with serving(create_app(config)) as base:
            burst_cold = asyncio.run(_burst(base, 50))
            burst_cached = asyncio.run(_burst(base, 50))
        print(f"{'50 concurrent requests, 5 images, cold':<42}{_ms(burst_cold)}")
        print(
            f"{'50 concurrent requests, 5 images, cached':<42}{_ms(burst_cached)}"
            f"  ({burst_cold / burst_cached:.1f}x faster than cold)"
        )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=40, help="cached requests per image")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="registry-bench-") as work:
        _run(Path(work), args.repeats)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
