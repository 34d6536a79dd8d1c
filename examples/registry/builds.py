"""Builds off the event loop, one per distinct image at a time, in both manifest forms.

:class:`Builder` runs :func:`nixery_core.build.build_image` in its own
thread pool (``build_workers`` threads), so a build never blocks the event
loop that serves blobs and cached manifests.  Requests for the same image
that arrive while it is being built await the same build (an in-flight
table keyed by packages, system and tag); the next request after it
finished finds the manifest in the :class:`~nixery_core.cache.BuildCache`.
Threads and processes sharing that cache are deduplicated by the cache's
own single flight underneath.

Every build produces the OCI manifest (the library's default and the
manifest cache's one entry per image); the Docker schema 2 manifest is
rendered from the same config and layers and stored beside it, so both can
be fetched by digest.  Rendering is byte for byte what ``build_image(...,
manifest_format="docker")`` produces (pinned by a test), without a second
Nix call.  A failed build is not remembered: the next request tries again.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

import attrs

from examples.registry.config import ManifestFormat, RegistryConfig
from nixery_core.build import BuildResult, build_image
from nixery_core.errors import InvalidInput
from nixery_core.manifest import DOCKER_MANIFEST, OCI_CONFIG, LayerDescriptor, render_manifest
from nixery_core.names import Image
from nixery_core.protocols import BlobInfo, Uploader

__all__ = ["Builder", "BuiltImage", "ServedManifest", "docker_manifest"]

log = logging.getLogger(__name__)
T = TypeVar("T")


@attrs.frozen
class ServedManifest:
    """A manifest as it goes on the wire: bytes, digest, media type."""

    data: bytes
    digest: str
    media_type: str


@attrs.frozen
class BuiltImage:
    """A built image's manifests; ``docker`` is ``None`` when a layer has no Docker type (zstd)."""

    result: BuildResult
    oci: ServedManifest
    docker: ServedManifest | None

    def manifest(self, fmt: ManifestFormat) -> ServedManifest | None:
        """The manifest in form ``fmt``, if the image has one."""
        return self.oci if fmt == "oci" else self.docker


def docker_manifest(result: BuildResult) -> bytes | None:
    """The Docker schema 2 manifest of a built image, ``None`` if it cannot have one."""
    layers = [
        LayerDescriptor(layer.digest, layer.size, layer.media_type, layer.diff_id)
        for layer in result.layers
    ]
    config = BlobInfo(result.config_digest, len(result.config), OCI_CONFIG)
    try:
        data, _ = render_manifest(config=config, layers=layers, format="docker")
    except InvalidInput:
        return None
    return data


def _store_docker_manifest(store: Uploader, result: BuildResult) -> ServedManifest | None:
    data = docker_manifest(result)
    if data is None:
        return None
    info = store.put_blob(data, DOCKER_MANIFEST)
    return ServedManifest(data, info.digest, DOCKER_MANIFEST)


@attrs.define
class Builder:
    """Runs builds in a bounded thread pool; identical concurrent requests share one.

    ``builds_started`` counts calls to ``build_image`` (cache hits included);
    close the pool with :meth:`shutdown`.
    """

    config: RegistryConfig
    builds_started: int = 0
    _executor: ThreadPoolExecutor = attrs.field(init=False)
    _in_flight: dict[tuple[object, ...], asyncio.Future[BuiltImage]] = attrs.field(
        init=False, factory=dict
    )

    def __attrs_post_init__(self) -> None:
        self._executor = ThreadPoolExecutor(
            max_workers=self.config.build_workers, thread_name_prefix="registry-build"
        )

    async def build(self, image: Image) -> BuiltImage:
        """The image's manifests, building it (or joining a running build) when needed."""
        key = (image.packages, image.arch.nix_system, image.tag)
        future = self._in_flight.get(key)
        if future is None:
            loop = asyncio.get_running_loop()
            self.builds_started += 1
            future = loop.run_in_executor(self._executor, self._build_sync, image)
            self._in_flight[key] = future
            future.add_done_callback(lambda done: self._finished(key, done))
        # shield: a client that hangs up cancels its wait, never the shared build.
        return await asyncio.shield(future)

    def _finished(self, key: tuple[object, ...], future: asyncio.Future[BuiltImage]) -> None:
        if self._in_flight.get(key) is future:
            del self._in_flight[key]
        if not future.cancelled():
            future.exception()  # retrieved here, so an unawaited failure is not logged as lost

    def _build_sync(self, image: Image) -> BuiltImage:
        config = self.config
        result = build_image(
            image,
            config.source,
            runner=config.runner,
            uploader=config.store,
            cache=config.cache,
            manifest_format="oci",
            timeout=config.timeout,
            nix_options=dict(config.nix_options),
            store_root=config.store_root,
            archive=config.archive,
        )
        log.info(
            "%s %s: %s", "cached" if result.from_cache else "built", image.reference,
            result.manifest_digest,
        )
        oci = ServedManifest(result.manifest, result.manifest_digest, result.manifest_media_type)
        return BuiltImage(result, oci, _store_docker_manifest(config.store, result))

    async def run_io(self, function: Callable[[], T]) -> T:
        """Run a blocking storage call in the event loop's default thread pool."""
        return await asyncio.get_running_loop().run_in_executor(None, function)

    def shutdown(self) -> None:
        """Stop the build threads (running builds finish; queued ones are dropped)."""
        self._executor.shutdown(wait=True, cancel_futures=True)
