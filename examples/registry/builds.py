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

With architectures configured (:attr:`RegistryConfig.archs
<examples.registry.config.RegistryConfig.archs>`), :meth:`Builder.build_index`
builds an OCI image index or a Docker manifest list with
:func:`~nixery_core.multiarch.build_multiarch` in the same pool, shared
between identical requests the same way (keyed by the index format too).
Its children are built in the index's format, so a Docker manifest list
names Docker schema 2 manifests; the amd64 OCI child is the very manifest a
single-architecture request gets (same manifest cache entry).  The index
and every child are stored as blobs, so clients fetch them by digest.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import attrs

from examples.registry.config import ManifestFormat, RegistryConfig
from nixery_core.build import BuildResult, build_image
from nixery_core.errors import InvalidInput
from nixery_core.manifest import DOCKER_MANIFEST, OCI_CONFIG, LayerDescriptor, render_manifest
from nixery_core.multiarch import build_multiarch
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

    ``builds_started`` counts calls to ``build_image`` and ``build_multiarch``
    (cache hits included); close the pool with :meth:`shutdown`.
    """

    config: RegistryConfig
    builds_started: int = 0
    _executor: ThreadPoolExecutor = attrs.field(init=False)
    _in_flight: dict[tuple[object, ...], asyncio.Future[Any]] = attrs.field(
        init=False, factory=dict
    )

    def __attrs_post_init__(self) -> None:
        self._executor = ThreadPoolExecutor(
            max_workers=self.config.build_workers, thread_name_prefix="registry-build"
        )

    async def build(self, image: Image) -> BuiltImage:
        """The image's manifests, building it (or joining a running build) when needed."""
        key = ("image", image.packages, image.arch.nix_system, image.tag)
        return await self._shared(key, lambda: self._build_sync(image))

    async def build_index(self, image: Image, fmt: ManifestFormat) -> ServedManifest:
        """The index over the configured architectures in form ``fmt``, built when needed.

        ``image``'s own architecture is ignored (each child uses
        ``image.with_arch``).  Raises :class:`~nixery_core.errors.InvalidInput`
        when no architectures are configured, and whatever
        :func:`~nixery_core.multiarch.build_multiarch` raises (the first
        failing architecture's error).
        """
        if not self.config.archs:
            raise InvalidInput("this registry is not configured for several architectures")
        archs = tuple(arch.nix_system for arch in self.config.archs)
        key = ("index", fmt, image.packages, archs, image.tag)
        return await self._shared(key, lambda: self._build_index_sync(image, fmt))

    async def _shared(self, key: tuple[object, ...], work: Callable[[], T]) -> T:
        """Run ``work`` in the pool, or join the running call with the same key."""
        future = self._in_flight.get(key)
        if future is None:
            loop = asyncio.get_running_loop()
            self.builds_started += 1
            future = loop.run_in_executor(self._executor, work)
            self._in_flight[key] = future
            future.add_done_callback(lambda done: self._finished(key, done))
        # shield: a client that hangs up cancels its wait, never the shared build.
        result: T = await asyncio.shield(future)
        return result

    def _finished(self, key: tuple[object, ...], future: asyncio.Future[Any]) -> None:
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

    def _build_index_sync(self, image: Image, fmt: ManifestFormat) -> ServedManifest:
        config = self.config
        result = build_multiarch(
            image,
            config.source,
            archs=config.archs,
            format=fmt,
            uploader=config.store,
            cache=config.cache,
            archive=config.archive,
            runner=config.runner,
            timeout=config.timeout,
            nix_options=dict(config.nix_options),
            store_root=config.store_root,
        )
        log.info(
            "%s %s index of %s: %s", "cached" if result.from_cache else "built", fmt,
            image.reference, result.index_digest,
        )
        return ServedManifest(result.index, result.index_digest, result.media_type)

    async def run_io(self, function: Callable[[], T]) -> T:
        """Run a blocking storage call in the event loop's default thread pool."""
        return await asyncio.get_running_loop().run_in_executor(None, function)

    def shutdown(self) -> None:
        """Stop the build threads (running builds finish; queued ones are dropped)."""
        self._executor.shutdown(wait=True, cancel_futures=True)
