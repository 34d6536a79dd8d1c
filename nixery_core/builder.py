"""``Builder``: what lives as long as a service, kept in one object.

A registry, a notebook or a test harness builds many images with the same
runner, store, cache, layering strategy, archive options, Nix options and
callbacks.  A :class:`Builder` holds those (as
:class:`~nixery_core.build.BuildSettings`) and the one bounded packing
executor every build shares; each call names only what varies per build::

    with Builder(uploader=store, cache=cache) as builder:
        result = builder.build(Image.from_name("shell/hello"), source)
        index = builder.build_multiarch(Image.from_name("hello"), source)

It is a context manager (or call :meth:`Builder.close`) that shuts down
what it opened: the packing executor it made (not one passed in) and the
threads its async methods build on.  The store and the cache are the
caller's, as an ``httpx.Client`` leaves a passed-in transport alone.

:func:`~nixery_core.build.build_image` and
:func:`~nixery_core.multiarch.build_multiarch` are the one-shot forms: the
same settings for one call, with an executor opened and closed around it.

Async services call :meth:`Builder.abuild` and
:meth:`Builder.abuild_multiarch`: the build runs on the builder's build
threads (``max_concurrent_builds`` of them), never on the event loop, and
identical requests awaiting at the same time share one build (single
flight, keyed by image, source, config, format and expression).  A waiter
that is cancelled (a client hanging up) never cancels the shared build.

Threads: a builder starts at most ``max_workers`` packing threads (layers
are packed and hashed on them) plus, once an async method is used,
``max_concurrent_builds`` build threads, whatever ``os.cpu_count()`` says.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Executor, ThreadPoolExecutor
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar, final

from nixery_core.archive import ArchiveOptions
from nixery_core.build import (
    DEFAULT_LAYER_BUDGET,
    DEFAULT_TIMEOUT,
    BuildSettings,
    ManifestFormat,
    run_build,
)
from nixery_core.cache import BuildCache
from nixery_core.errors import InvalidInput
from nixery_core.expressions import NixExpression
from nixery_core.image_config import ImageConfig
from nixery_core.manifest import Format
from nixery_core.multiarch import DEFAULT_ARCHS, run_multiarch
from nixery_core.names import Architecture, Image
from nixery_core.protocols import LayeringStrategy, LogCallback, Runner, Uploader
from nixery_core.results import BuildResult, MultiArchResult, ProgressCallback
from nixery_core.sources import PackageSource
from nixery_core.workers import WorkerPool

__all__ = ["DEFAULT_CONCURRENT_BUILDS", "Builder"]

#: Builds the async methods run at once unless told otherwise.
DEFAULT_CONCURRENT_BUILDS = 4

T = TypeVar("T")


def _source_key(source: PackageSource) -> object:
    """The source itself when hashable (the built-in ones are values), else its identity."""
    try:
        hash(source)
    except TypeError:
        return ("id", id(source))
    return source


@final
class Builder:
    """Builds images with settings fixed for its lifetime; see the module docstring.

    Every keyword means what it means to :class:`~nixery_core.build.BuildSettings`
    (``None``: the default documented there).  ``executor`` is a packing
    executor to share (it is never shut down here; by default the builder
    opens its own of ``max_workers`` threads on first use and closes it in
    :meth:`close`).  ``max_concurrent_builds`` bounds the builds the async
    methods run at once.  Bad values raise
    :class:`~nixery_core.errors.InvalidInput` here, not at the first build.
    """

    def __init__(
        self,
        *,
        runner: Runner | None = None,
        uploader: Uploader | None = None,
        cache: BuildCache | None = None,
        strategy: LayeringStrategy | None = None,
        archive: ArchiveOptions | None = None,
        layer_budget: int = DEFAULT_LAYER_BUDGET,
        timeout: float = DEFAULT_TIMEOUT,
        nix_options: Mapping[str, str] | None = None,
        store_root: Path = Path("/"),
        max_workers: int | None = None,
        executor: Executor | None = None,
        max_concurrent_builds: int = DEFAULT_CONCURRENT_BUILDS,
        progress: ProgressCallback | None = None,
        on_log_line: LogCallback | None = None,
        clock: Callable[[], float] = time.perf_counter,
        prior_layers_from_cache: bool = False,
    ) -> None:
        self._settings = BuildSettings(
            runner=runner, uploader=uploader, cache=cache, strategy=strategy, archive=archive,
            layer_budget=layer_budget, timeout=timeout, nix_options=nix_options,
            store_root=store_root, max_workers=max_workers, progress=progress,
            on_log_line=on_log_line, clock=clock,
            prior_layers_from_cache=prior_layers_from_cache,
        )
        if executor is not None and not isinstance(executor, Executor):
            raise InvalidInput(f"executor must be a concurrent.futures.Executor, not {executor!r}")
        if (
            isinstance(max_concurrent_builds, bool)
            or not isinstance(max_concurrent_builds, int)
            or max_concurrent_builds < 1
        ):
            raise InvalidInput(
                f"max_concurrent_builds must be a positive int, not {max_concurrent_builds!r}"
            )
        self._max_concurrent_builds = max_concurrent_builds
        self._given_executor = executor
        self._executor: WorkerPool | None = None
        self._build_threads: ThreadPoolExecutor | None = None
        self._lock = threading.Lock()
        self._closed = False
        self._started = 0
        self._in_flight: dict[tuple[object, ...], asyncio.Future[Any]] = {}

    # --- what it holds -------------------------------------------------------

    @property
    def settings(self) -> BuildSettings:
        """The settings every build of this builder uses."""
        return self._settings

    @property
    def uploader(self) -> Uploader:
        """Where blobs go (the default store when none was given)."""
        return self._settings.uploader

    @property
    def cache(self) -> BuildCache | None:
        """The build cache, ``None`` when building uncached."""
        return self._settings.cache

    @property
    def builds_started(self) -> int:
        """Calls of :meth:`build` and :meth:`build_multiarch` so far, cache hits included.

        Identical async requests that shared one build count once.
        """
        return self._started

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` was called."""
        return self._closed

    # --- building ------------------------------------------------------------

    def build(
        self,
        image: Image,
        source: PackageSource,
        *,
        config: ImageConfig | None = None,
        format: ManifestFormat = "oci",  # noqa: A002 - the manifest's format, as in build_multiarch
        expression: str | NixExpression | None = None,
    ) -> BuildResult:
        """Build ``image`` from ``source``: blobs into the uploader, a manifest out.

        ``config`` ``None`` is the default :class:`~nixery_core.image_config.ImageConfig`;
        ``format`` is the manifest's (``"oci"`` or ``"docker"``);
        ``expression`` is trusted Nix source whose outputs join the packages
        (see :func:`~nixery_core.build.build_image`, which documents the errors).
        Safe to call from several threads at once; they share the executor.
        """
        return run_build(
            self._settings, self._packing_executor(), image, source, config=config,
            manifest_format=format, expression=expression,
        )

    def build_multiarch(
        self,
        image: Image,
        source: PackageSource,
        *,
        archs: Sequence[Architecture] = DEFAULT_ARCHS,
        format: Format = "oci",  # noqa: A002 - the index's format, as in render_index
        config: ImageConfig | None = None,
        expression: str | NixExpression | None = None,
    ) -> MultiArchResult:
        """Build ``image`` for each of ``archs`` and combine them in one index.

        See :func:`~nixery_core.multiarch.build_multiarch` for the index,
        its cache entry and the errors.
        """
        return run_multiarch(
            self._settings, self._packing_executor(), image, source, archs=archs,
            format=format, config=config, expression=expression,
        )

    async def abuild(
        self,
        image: Image,
        source: PackageSource,
        *,
        config: ImageConfig | None = None,
        format: ManifestFormat = "oci",  # noqa: A002 - as in build
        expression: str | NixExpression | None = None,
    ) -> BuildResult:
        """:meth:`build`, off the event loop; identical concurrent calls share one build."""
        key = ("image", image, _source_key(source), config, format, expression)
        return await self._shared(
            key,
            lambda: self.build(
                image, source, config=config, format=format, expression=expression
            ),
        )

    async def abuild_multiarch(
        self,
        image: Image,
        source: PackageSource,
        *,
        archs: Sequence[Architecture] = DEFAULT_ARCHS,
        format: Format = "oci",  # noqa: A002 - as in build_multiarch
        config: ImageConfig | None = None,
        expression: str | NixExpression | None = None,
    ) -> MultiArchResult:
        """:meth:`build_multiarch`, off the event loop, with single flight as :meth:`abuild`."""
        arch_key = tuple(archs) if not isinstance(archs, Architecture) else (archs,)
        key = ("index", image, _source_key(source), arch_key, format, config, expression)
        return await self._shared(
            key,
            lambda: self.build_multiarch(
                image, source, archs=archs, format=format, config=config, expression=expression
            ),
        )

    # --- lifecycle -----------------------------------------------------------

    def close(self) -> None:
        """Shut down the threads this builder started; later builds raise InvalidInput.

        Running builds finish first.  The uploader, the cache and an
        executor passed in are left open: they are the caller's.
        """
        with self._lock:
            self._closed = True
            pools = [p for p in (self._build_threads, self._executor) if p is not None]
            self._build_threads = self._executor = None
        for pool in pools:
            pool.shutdown(wait=True, cancel_futures=True)

    def __enter__(self) -> Builder:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    async def __aenter__(self) -> Builder:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        """Close off the event loop (running builds may take a while to finish)."""
        await asyncio.to_thread(self.close)

    # --- internals -----------------------------------------------------------

    def _packing_executor(self) -> WorkerPool | None:
        """The shared packing pool for a build starting now (``None``: one worker)."""
        with self._lock:
            if self._closed:
                raise InvalidInput("this Builder is closed")
            self._started += 1
            if self._executor is None and self._given_executor is not None:
                self._executor = WorkerPool.wrapping(self._given_executor, self._settings.workers)
            elif self._executor is None and self._settings.workers > 1:
                self._executor = WorkerPool(self._settings.workers)
            return self._executor

    def _build_pool(self) -> ThreadPoolExecutor:
        with self._lock:
            if self._closed:
                raise InvalidInput("this Builder is closed")
            if self._build_threads is None:
                self._build_threads = ThreadPoolExecutor(
                    max_workers=self._max_concurrent_builds, thread_name_prefix="nixery-build"
                )
            return self._build_threads

    async def _shared(self, key: tuple[object, ...], work: Callable[[], T]) -> T:
        """Run ``work`` on a build thread, or join the running call with the same key."""
        loop = asyncio.get_running_loop()
        flight_key = (id(loop), *key)
        future = self._in_flight.get(flight_key)
        if future is None:
            future = loop.run_in_executor(self._build_pool(), work)
            self._in_flight[flight_key] = future
            future.add_done_callback(lambda done: self._finished(flight_key, done))
        # shield: a waiter that is cancelled never cancels the shared build.
        result: T = await asyncio.shield(future)
        return result

    def _finished(self, key: tuple[object, ...], future: asyncio.Future[Any]) -> None:
        if self._in_flight.get(key) is future:
            del self._in_flight[key]
        if not future.cancelled():
            future.exception()  # retrieved here, so an unawaited failure is not logged as lost
