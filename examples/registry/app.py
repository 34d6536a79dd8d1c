"""The read side of the Docker Registry HTTP API V2, building images on demand.

Routes (``HEAD`` is answered wherever ``GET`` is, with the same headers and
no body):

- ``GET /v2/``: ``200 {}``, the API version check every client starts with;
- ``GET /v2/<name>/manifests/<tag>``: the image named by ``<name>`` (package
  names, as Nixery reads them), built on a miss; the manifest form is chosen
  from the ``Accept`` header (:mod:`examples.registry.negotiation`).  With
  architectures configured (``RegistryConfig.archs``, ``NIXERY_ARCHS``) a
  client that names an index type gets an OCI image index or a Docker
  manifest list over them instead (names starting ``arm64/`` stay
  single-architecture);
- ``GET /v2/<name>/manifests/<digest>``: a manifest or index this registry
  stored, by digest (what Docker and containerd fetch after a ``HEAD`` by
  tag, and an index's per-architecture manifests);
- ``GET /v2/<name>/blobs/<digest>``: a config or layer blob, streamed from
  the store, or a ``307`` redirect to ``config.blob_url(digest)`` (a GCS
  signed URL); ``Range`` requests, single or multiple, and ``If-None-Match``
  are answered as :mod:`examples.registry.blobs` says;
- ``GET /v2/<name>/referrers/<digest>``: the OCI 1.1 referrers of a
  manifest built here (its SBOMs, :mod:`nixery_core.sbom`), an OCI image
  index, empty when there are none; ``?artifactType=`` filters it (and the
  answer says so in ``OCI-Filters-Applied``);
- ``GET /v2/<name>/tags/list``: ``["latest"]`` once the image builds (any tag
  is accepted; what it means depends on the package source), paginated with
  ``n`` and ``last`` (:mod:`examples.registry.tags`); ``NAME_UNKNOWN`` when
  the name's packages do not exist;
- ``GET /``: a plain-text page with the most recent build failures and their
  ids (:mod:`examples.registry.failures`).

Manifests carry ``Content-Type``, ``Content-Length`` and
``Docker-Content-Digest``; blobs carry the same, the stored media type as
``Content-Type``.  Errors use the registry's JSON form
``{"errors": [{"code", "message", "detail"}]}``:

=============================  ======  =================================================
code                           status  when
=============================  ======  =================================================
``NAME_INVALID``               400     the name or tag breaks the grammar (``..``,
                                       upper case, empty components: path tricks)
``DIGEST_INVALID``             400     a digest is not ``sha256:`` + 64 lower-case hex
``MANIFEST_UNKNOWN``           404     unknown packages (``detail.packages`` names every
                                       one, for any architecture of an index), an
                                       unknown manifest digest, or no form the client
                                       accepts
``NAME_UNKNOWN``               404     tags/list of a name whose packages do not exist
``BLOB_UNKNOWN``               404     no such blob
``RANGE_INVALID``              416     no requested byte range lies within the blob
``PAGINATION_NUMBER_INVALID``  400     ``n`` is not a non-negative integer
``UNSUPPORTED``                404/405 any other path or method (this registry is
                                       read-only)
``UNAVAILABLE``                503     the store failed
``UNKNOWN``                    500/504 Nix failed or timed out (``detail`` names the error
                                       type and the failure id; the log stays on the
                                       server)
=============================  ======  =================================================

Error bodies are bounded (:mod:`examples.registry.error_bodies`).

Names are checked with :meth:`nixery_core.names.Image.from_name` and digests
with :func:`nixery_core.digests.validate_digest` before either touches the
store, so percent-encoded ``..``, slashes in digests and the like never name
a file.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import BinaryIO, cast

import attrs
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from examples.registry.blobs import answer_blob
from examples.registry.builds import Builder, BuiltImage, ServedManifest
from examples.registry.conditional import etag, none_match
from examples.registry.config import ManifestFormat, RegistryConfig
from examples.registry.error_bodies import error_body
from examples.registry.failures import FailureLog, client_message, failure_id
from examples.registry.negotiation import index_preferences, preferences
from examples.registry.tags import page, parse_n
from nixery_core.digests import validate_digest
from nixery_core.errors import (
    BlobNotFound,
    InvalidDigest,
    InvalidImageName,
    InvalidInput,
    NixeryError,
    NixTimeout,
    StorageError,
    UnknownPackages,
)
from nixery_core.media_types import (
    DOCKER_MANIFEST,
    IMAGE_MANIFEST_TYPES,
    INDEX_TYPES,
    OCI_INDEX,
    OCI_MANIFEST,
    docker_layer_media_type,
)
from nixery_core.names import Image
from nixery_core.recent_errors import RecentErrors
from nixery_core.sbom.referrers import referrers_index
from nixery_core.verify import VerifyingReader

__all__ = ["API_VERSION", "RegistryError", "create_app"]

#: The header value every V2 registry answers with.
API_VERSION = "registry/2.0"
_MANIFEST_TYPES = IMAGE_MANIFEST_TYPES | INDEX_TYPES


class RegistryError(Exception):
    """An error answer in the registry's JSON form."""

    def __init__(
        self, status: int, code: str, message: str, detail: object = None
    ) -> None:
        super().__init__(f"{code}: {message}")
        self.status = status
        self.code = code
        self.message = message
        self.detail = detail

    def response(self) -> Response:
        """The JSON answer, bounded (:mod:`examples.registry.error_bodies`)."""
        body = error_body(self.code, self.message, self.detail)
        return Response(body, status_code=self.status, media_type="application/json")


#: Library errors as registry answers: status and code, most specific class first.
_ANSWERS: tuple[tuple[type[NixeryError], int, str], ...] = (
    (BlobNotFound, 404, "BLOB_UNKNOWN"),
    (StorageError, 503, "UNAVAILABLE"),
    (NixTimeout, 504, "UNKNOWN"),
    (InvalidInput, 400, "UNSUPPORTED"),
    (NixeryError, 500, "UNKNOWN"),
)


def _translate(exc: NixeryError) -> RegistryError:
    """The registry answer for a library error."""
    if isinstance(exc, UnknownPackages):
        return RegistryError(
            404, "MANIFEST_UNKNOWN", f"unknown packages: {', '.join(exc.packages)}",
            {"packages": list(exc.packages)},
        )
    if isinstance(exc, InvalidImageName):
        return RegistryError(400, "NAME_INVALID", str(exc), {"name": exc.name, "part": exc.part})
    if isinstance(exc, InvalidDigest):
        return RegistryError(400, "DIGEST_INVALID", str(exc), {"digest": exc.digest})
    status, code = next((s, c) for kind, s, c in _ANSWERS if isinstance(exc, kind))
    return RegistryError(status, code, str(exc), {"error": type(exc).__name__})


def _image(name: str, tag: str = "latest") -> Image:
    """The image a URL's name and tag (or reference) describe.

    A ``:`` in the name is refused here: ``Image.from_name`` reads
    ``hello:1.0`` with the default tag as name and tag, which would let
    ``/v2/hello:1.0/manifests/latest`` build tag ``1.0``.
    """
    if ":" in name:
        bad = InvalidImageName(name, name, "contains ':' (the tag goes after /manifests/)")
        raise _translate(bad)
    try:
        return Image.from_name(name, tag)
    except InvalidImageName as exc:
        raise _translate(exc) from exc


def _digest(value: str) -> str:
    try:
        return validate_digest(value)
    except InvalidDigest as exc:
        raise _translate(exc) from exc


def _manifest_response(request: Request, manifest: ServedManifest) -> Response:
    tag = etag(manifest.digest)
    if none_match(request.headers.getlist("if-none-match"), tag):
        headers = {"Docker-Content-Digest": manifest.digest, "ETag": tag}
        return Response(b"", status_code=304, headers=headers)
    headers = {
        "Content-Type": manifest.media_type,
        "Content-Length": str(len(manifest.data)),
        "Docker-Content-Digest": manifest.digest,
        "ETag": tag,
    }
    body = b"" if request.method == "HEAD" else manifest.data
    return Response(body, headers=headers)


class _ApiVersionHeader:
    """ASGI middleware: ``Docker-Distribution-API-Version`` on every answer."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_header(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [
                    *message.get("headers", []),
                    (b"docker-distribution-api-version", API_VERSION.encode()),
                ]
            await send(message)

        await self.app(scope, receive, send_with_header)


@attrs.define
class _Endpoints:
    """The route handlers, over one configuration, builder and failure record."""

    config: RegistryConfig
    builder: Builder
    recent: RecentErrors
    failures: FailureLog = attrs.field(init=False)

    def __attrs_post_init__(self) -> None:
        self.failures = FailureLog(self.recent)

    async def index(self, request: Request) -> Response:
        del request
        failures = self.recent.snapshot()
        lines = [
            "nixery_core example registry: docker pull HOST/shell/hello",
            "",
            f"recent build failures ({len(failures)}):",
            *(
                f"  failure {failure_id(f)}: {f.image_reference}: {f.error_type}: {f.message}"
                for f in failures
            ),
        ]
        return PlainTextResponse("\n".join(lines) + "\n")

    def _build_failed(self, image: Image, exc: NixeryError) -> RegistryError:
        """Record a failed build once; the answer names the failure, never the build log."""
        failure = self.failures.record(image, exc)
        answer = _translate(exc)
        if isinstance(exc, UnknownPackages | InvalidInput):
            return answer
        detail = {"error": type(exc).__name__, "failure": failure.failure_id}
        message = client_message(image, exc, failure)
        return RegistryError(answer.status, answer.code, message, detail)

    async def api_root(self, request: Request) -> Response:
        del request
        return JSONResponse({})

    async def manifests(self, request: Request) -> Response:
        name: str = request.path_params["name"]
        reference: str = request.path_params["reference"]
        if ":" in reference:
            _image(name)
            return await self._manifest_by_digest(request, _digest(reference))
        image = _image(name, reference)
        accept = request.headers.getlist("accept")
        index_forms = self._index_forms(image, accept)
        if index_forms:
            return await self._index(request, image, index_forms[0])
        accepted = preferences(accept, self.config.default_format)
        if not accepted:
            raise RegistryError(
                404, "MANIFEST_UNKNOWN",
                "no manifest in a media type the client accepts; this registry serves "
                f"{OCI_MANIFEST} and {DOCKER_MANIFEST}",
            )
        try:
            built: BuiltImage = await self.builder.build(image)
        except NixeryError as exc:
            raise self._build_failed(image, exc) from exc
        for fmt in accepted:
            manifest = built.manifest(fmt)
            if manifest is not None:
                return _manifest_response(request, manifest)
        raise RegistryError(
            404, "MANIFEST_UNKNOWN",
            f"{image.reference} has zstd layers, which Docker schema 2 cannot describe; "
            f"accept {OCI_MANIFEST}",
        )

    def _index_forms(self, image: Image, accept: list[str]) -> tuple[ManifestFormat, ...]:
        """The index forms to answer with, best first; empty for a single manifest.

        Empty unless architectures are configured, the name does not pick one
        (``arm64/...``) and the client names an index type.  A Docker manifest
        list is left out when the layers have no Docker type (zstd).
        """
        config = self.config
        if not config.archs or "arm64" in image.meta:
            return ()
        forms = index_preferences(accept, config.default_format)
        try:
            docker_layer_media_type(config.archive.media_type)
        except InvalidInput:
            forms = tuple(fmt for fmt in forms if fmt != "docker")
        return forms

    async def _index(self, request: Request, image: Image, fmt: ManifestFormat) -> Response:
        try:
            index = await self.builder.build_index(image, fmt)
        except NixeryError as exc:
            raise self._build_failed(image, exc) from exc
        return _manifest_response(request, index)

    async def _manifest_by_digest(self, request: Request, digest: str) -> Response:
        store = self.config.store
        info = await self.builder.run_io(lambda: store.blob_info(digest))
        if info is None or info.media_type not in _MANIFEST_TYPES:
            raise RegistryError(
                404, "MANIFEST_UNKNOWN", f"manifest unknown to registry: {digest}",
                {"digest": digest},
            )
        data = await self.builder.run_io(lambda: store.read_blob(digest))
        return _manifest_response(request, ServedManifest(data, digest, info.media_type))

    async def blobs(self, request: Request) -> Response:
        _image(request.path_params["name"])
        digest = _digest(request.path_params["digest"])
        store, blob_url = self.config.store, self.config.blob_url
        info = await self.builder.run_io(lambda: store.blob_info(digest))
        if info is None:
            raise _translate(BlobNotFound(digest))

        redirect: Callable[[], Awaitable[str]] | None = None
        if blob_url is not None:
            url_of = blob_url

            async def to_storage() -> str:
                return await self.builder.run_io(lambda: url_of(digest))

            redirect = to_storage
        def open_stream() -> BinaryIO:
            stream = store.open_blob(digest)
            if self.config.verify_blobs:  # a mismatch is logged once the whole blob is sent
                return cast(BinaryIO, VerifyingReader(stream, digest))
            return stream

        return await answer_blob(
            request, digest=digest, size=info.size, media_type=info.media_type,
            open_stream=open_stream, run_io=self.builder.run_io, redirect=redirect,
        )

    async def referrers(self, request: Request) -> Response:
        """OCI 1.1 referrers of a manifest (its SBOMs), optionally filtered by artifactType."""
        _image(request.path_params["name"])
        digest = _digest(request.path_params["digest"])
        artifact_type = request.query_params.get("artifactType")
        store = self.config.store
        body = await self.builder.run_io(lambda: referrers_index(store, digest, artifact_type))
        headers = {"OCI-Filters-Applied": "artifactType"} if artifact_type is not None else {}
        return Response(body, media_type=OCI_INDEX, headers=headers)

    async def tags(self, request: Request) -> Response:
        """The tags of a name whose image builds; ``NAME_UNKNOWN`` when its packages do not exist.

        Listing builds the image (or finds it cached), so a name is listed
        exactly when its manifest can be pulled.
        """
        name = request.path_params["name"]
        image = _image(name)
        try:
            n = parse_n(request.query_params.get("n"))
        except ValueError as exc:
            raise RegistryError(400, "PAGINATION_NUMBER_INVALID", str(exc)) from exc
        try:
            await self.builder.build(image)
        except UnknownPackages as exc:
            self._build_failed(image, exc)
            raise RegistryError(
                404, "NAME_UNKNOWN", f"repository name not known to registry: {exc}",
                {"name": name, "packages": list(exc.packages)},
            ) from exc
        except NixeryError as exc:
            raise self._build_failed(image, exc) from exc
        listed = page(name, ["latest"], n=n, last=request.query_params.get("last"))
        headers = {"Link": listed.next_link} if listed.next_link else None
        return JSONResponse({"name": name, "tags": list(listed.tags)}, headers=headers)

    # --- error answers ---

    async def registry_error(self, request: Request, exc: Exception) -> Response:
        del request
        if not isinstance(exc, RegistryError):  # pragma: no cover - registered for this type
            raise exc
        return exc.response()

    async def library_error(self, request: Request, exc: Exception) -> Response:
        del request
        if not isinstance(exc, NixeryError):  # pragma: no cover - registered for this type
            raise exc
        return _translate(exc).response()

    async def http_error(self, request: Request, exc: Exception) -> Response:
        if not isinstance(exc, HTTPException):  # pragma: no cover - registered for this type
            raise exc
        if exc.status_code == 405:
            message = f"{request.method} is not supported: this registry is read-only"
        else:
            message = f"no such endpoint: {request.url.path}"
        response = RegistryError(exc.status_code, "UNSUPPORTED", message).response()
        response.headers.update(exc.headers or {})
        return response


def create_app(config: RegistryConfig) -> Starlette:
    """The registry as an ASGI app; serve it with uvicorn (see :mod:`examples.registry.server`).

    The app owns a :class:`~examples.registry.builds.Builder` (its thread
    pool is shut down when the app's lifespan ends); ``app.state.builder``
    and ``app.state.recent_errors`` are there for tests and status pages.
    The store and cache stay the caller's to close.
    """
    endpoints = _Endpoints(config, Builder(config), RecentErrors(capacity=50))

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        del app
        try:
            yield
        finally:
            endpoints.builder.shutdown()

    app = Starlette(
        routes=[
            Route("/", endpoints.index, methods=["GET"]),
            Route("/v2/", endpoints.api_root, methods=["GET"]),
            Route("/v2/{name:path}/manifests/{reference}", endpoints.manifests, methods=["GET"]),
            Route("/v2/{name:path}/blobs/{digest}", endpoints.blobs, methods=["GET"]),
            Route("/v2/{name:path}/tags/list", endpoints.tags, methods=["GET"]),
            Route("/v2/{name:path}/referrers/{digest}", endpoints.referrers, methods=["GET"]),
        ],
        exception_handlers={
            RegistryError: endpoints.registry_error,
            NixeryError: endpoints.library_error,
            HTTPException: endpoints.http_error,
        },
        lifespan=lifespan,
    )
    # A trailing slash is not silently redirected: paths that do not fit the API
    # (a slash inside a digest) get a JSON error, not a 307 to another path.
    app.router.redirect_slashes = False
    app.add_middleware(_ApiVersionHeader)
    app.state.builder = endpoints.builder
    app.state.recent_errors = endpoints.recent
    return app
