"""Builds off the event loop, one per distinct image at a time, in both manifest forms.

:class:`Builder` wraps one :class:`nixery_core.builder.Builder` made from
the :class:`~examples.registry.config.RegistryConfig` and awaits its async
facade: :meth:`~nixery_core.builder.Builder.abuild` runs each build on the
library builder's build threads (``build_workers`` of them), so a build
never blocks the event loop that serves blobs and cached manifests, and
requests for the same image that arrive while it is being built await the
same build.  The next request after it finished finds the manifest in the
:class:`~nixery_core.cache.BuildCache`.  Threads and processes sharing that
cache are deduplicated by the cache's own single flight underneath.

Every build produces the OCI manifest (the library's default and the
manifest cache's one entry per image); the Docker schema 2 manifest is
rendered from the same config and layers and stored beside it, so both can
be fetched by digest; an entry of its own (``manifests/docker-<key>``, in the
manifest entry's form and expiring with it) names it, so garbage collection
keeps it as long as the OCI one.  Rendering is byte for byte what ``build_image(...,
manifest_format="docker")`` produces (pinned by a test), without a second
Nix call.  A failed build is not remembered: the next request tries again.

With architectures configured (:attr:`RegistryConfig.archs
<examples.registry.config.RegistryConfig.archs>`), :meth:`Builder.build_index`
builds an OCI image index or a Docker manifest list with
:meth:`~nixery_core.builder.Builder.abuild_multiarch`, shared between
identical requests the same way (keyed by the index format too).  Its
children are built in the index's format, so a Docker manifest list names
Docker schema 2 manifests; the amd64 OCI child is the very manifest a
single-architecture request gets (same manifest cache entry).  The index
and every child are stored as blobs, so clients fetch them by digest.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Callable
from typing import TypeVar

import attrs

from examples.registry.config import ManifestFormat, RegistryConfig
from nixery_core import builder as library
from nixery_core.cache import ManifestRecord
from nixery_core.digests import sha256_digest
from nixery_core.errors import InvalidCacheRecord, InvalidInput
from nixery_core.manifest import DOCKER_MANIFEST, OCI_CONFIG, LayerDescriptor, render_manifest
from nixery_core.names import Image
from nixery_core.protocols import BlobInfo, Uploader
from nixery_core.results import BuildResult
from nixery_core.sources import canonical_json

__all__ = ["Builder", "BuiltImage", "ServedManifest", "docker_entry_key", "docker_manifest"]

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


def docker_entry_key(result: BuildResult) -> str:
    """The cache entry that names an image's Docker manifest: ``manifests/docker-<key>``."""
    return f"manifests/docker-{result.cache_key}"


def _store_docker_manifest(
    store: Uploader, result: BuildResult, named: set[str]
) -> ServedManifest | None:
    data = docker_manifest(result)
    if data is None:
        return None
    info = store.put_blob(data, DOCKER_MANIFEST)
    if info.digest not in named:
        _name_docker_manifest(store, result, data)
        named.add(info.digest)
    return ServedManifest(data, info.digest, DOCKER_MANIFEST)


def _name_docker_manifest(store: Uploader, result: BuildResult, data: bytes) -> None:
    """Garbage collection keeps what an entry names: the Docker manifest gets an entry
    beside the image's OCI one (same config and layers), expiring when that one does."""
    expires_at = None
    raw = store.get_object(f"manifests/{result.cache_key}")
    if raw is not None:
        # Not JSON, or not a manifest record: the Docker entry does not expire.
        with contextlib.suppress(json.JSONDecodeError, InvalidCacheRecord):
            expires_at = ManifestRecord.from_json(json.loads(raw)).expires_at
    body = {
        "manifest": data.decode(),
        "manifest_media_type": DOCKER_MANIFEST,
        "config": result.config.decode(),
    }
    blobs = (sha256_digest(data), result.config_digest, *(layer.digest for layer in result.layers))
    record = ManifestRecord(body, blobs, expires_at)
    store.put_object(docker_entry_key(result), canonical_json(record.to_json()))


def library_builder(config: RegistryConfig) -> library.Builder:
    """The :class:`nixery_core.builder.Builder` for ``config``: its settings, its build threads."""
    return library.Builder(
        runner=config.runner,
        uploader=config.store,
        cache=config.cache,
        archive=config.archive,
        timeout=config.timeout,
        nix_options=config.nix_options,
        store_root=config.store_root,
        max_concurrent_builds=config.build_workers,
    )


@attrs.define
class Builder:
    """The registry's builds: a library builder's async facade, plus the Docker manifest.

    ``builds_started`` counts builds the library builder started (cache hits
    included; identical concurrent requests count once); close its threads
    with :meth:`shutdown`.
    """

    config: RegistryConfig
    _library: library.Builder = attrs.field(init=False)
    #: Docker manifests this process has named by an entry (written once each).
    _named_docker: set[str] = attrs.field(init=False, factory=set)

    def __attrs_post_init__(self) -> None:
        self._library = library_builder(self.config)

    @property
    def builds_started(self) -> int:
        return self._library.builds_started

    async def build(self, image: Image) -> BuiltImage:
        """The image's manifests, building it (or joining a running build) when needed."""
        result = await self._library.abuild(image, self.config.source)
        log.info(
            "%s %s: %s", "cached" if result.from_cache else "built", image.reference,
            result.manifest_digest,
        )
        oci = ServedManifest(result.manifest, result.manifest_digest, result.manifest_media_type)
        store = self.config.store
        named = self._named_docker
        docker = await self.run_io(lambda: _store_docker_manifest(store, result, named))
        return BuiltImage(result, oci, docker)

    async def build_index(self, image: Image, fmt: ManifestFormat) -> ServedManifest:
        """The index over the configured architectures in form ``fmt``, built when needed.

        ``image``'s own architecture is ignored (each child uses
        ``image.with_arch``).  Raises :class:`~nixery_core.errors.InvalidInput`
        when no architectures are configured, and whatever
        :meth:`~nixery_core.builder.Builder.build_multiarch` raises (the first
        failing architecture's error).
        """
        if not self.config.archs:
            raise InvalidInput("this registry is not configured for several architectures")
        result = await self._library.abuild_multiarch(
            image, self.config.source, archs=self.config.archs, format=fmt
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
        self._library.close()
