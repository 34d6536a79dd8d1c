"""Push an image from an :class:`~nixery_core.protocols.Uploader` to an OCI registry.

:func:`push_image` speaks the OCI distribution API over ``httpx`` (sync):

1. Every blob the manifest names (config and layers; for an image index,
   each child manifest's blobs) is looked up in the store first, so a
   missing blob fails before anything is sent.
2. ``HEAD /v2/<repo>/blobs/<digest>``: a blob the repository has is skipped.
3. With ``mount_from``, ``POST /v2/<repo>/blobs/uploads/?mount=<digest>&from=<repo>``
   asks the registry to link the blob from another repository (201 means
   mounted; 202 means it opened an upload instead, which is then used).
4. Otherwise ``POST /v2/<repo>/blobs/uploads/`` opens an upload; blobs up
   to ``chunk_size`` bytes go in one ``PUT ?digest=``, larger ones as
   ``PATCH`` chunks of ``chunk_size`` read from
   :meth:`~nixery_core.protocols.SupportsReading.open_blob`
   (a blob is never held in memory whole) and a closing ``PUT ?digest=``.
   The bytes are hashed while they are sent; a store returning other bytes
   raises :class:`~nixery_core.errors.DigestMismatch` before the closing PUT.
5. The manifest is ``PUT`` with its media type as ``Content-Type`` (child
   manifests of an index by digest, the top one under the tag), and the
   ``Docker-Content-Digest`` the registry answers must be the sha256 of the
   bytes sent (:class:`~nixery_core.errors.RegistryError` otherwise).

Authentication: :class:`BasicAuth` answers a ``Basic`` challenge and is
used to fetch tokens; a ``WWW-Authenticate: Bearer realm=...,service=...,scope=...``
challenge is answered by ``GET realm?service=...&scope=...`` (with the basic
credentials when given, anonymously otherwise) and the token is reused for
later requests.  :class:`BearerToken` sends a token you already have.

Credentials stay with their origin.  The ``Authorization`` header goes only
to the registry's own origin (scheme, host and port); a request elsewhere
(an upload ``Location`` at another host, say) carries none, and a challenge
from elsewhere is not answered.  A token ``realm`` gets the basic
credentials only over HTTPS, or over plain HTTP to a loopback host when
``insecure=True``; any other realm is asked anonymously.  Redirects are not
followed unless an injected ``client`` says so, and httpx then drops the
header on a redirect to another origin.

HTTPS is the default.  ``insecure=True`` speaks plain HTTP, and only to a
loopback host (``localhost``, ``127.0.0.0/8``, ``::1``) unless
``allow_insecure_remote=True`` says otherwise.  Every transport error and
every unexpected status is a :class:`~nixery_core.errors.RegistryError`
(``status`` 0 for transport errors) chained to its cause.  Nothing is
retried here: every step is idempotent, so a caller may simply push again.
"""

from __future__ import annotations

import base64
import ipaddress
import re
import threading
from collections.abc import Generator, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Final

import attrs
import httpx

from nixery_core.digests import Sha256Counter, sha256_digest, validate_digest
from nixery_core.errors import (
    DigestMismatch,
    InvalidImageName,
    InvalidInput,
    InvalidManifest,
    RegistryError,
)
from nixery_core.manifest import Descriptor, parse_index, parse_manifest
from nixery_core.media_types import IMAGE_MANIFEST_TYPES, INDEX_TYPES
from nixery_core.names import is_name_component, is_tag
from nixery_core.protocols import ReadableStore
from nixery_core.push_ledger import PushLedger
from nixery_core.push_report import plain_http_to_tls_hint, transport_hint
from nixery_core.sbom.push import ReferrersPushed, push_referrers

__all__ = [
    "DEFAULT_CHUNK_SIZE",
    "DEFAULT_TAG",
    "DEFAULT_WORKERS",
    "BasicAuth",
    "BearerToken",
    "ImageTarget",
    "PushResult",
    "push_image",
]

#: Blobs up to this size go up in one PUT; larger ones in PATCH chunks of it.
DEFAULT_CHUNK_SIZE: Final = 16 * 1024 * 1024
#: The tag of a target named without one.
DEFAULT_TAG: Final = "latest"
#: Blobs pushed at once by default (each a HEAD, then an upload or mount).
DEFAULT_WORKERS: Final = 4

_HOST = re.compile(
    r"(?:\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?"
    r"(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?)*)(?::[0-9]{1,5})?"
)
_CHALLENGE_PARAM = re.compile(r'([A-Za-z_]+)=(?:"([^"]*)"|([^,\s]*))')
_OCTET = "application/octet-stream"


# --- values --------------------------------------------------------------------


@attrs.frozen
class BasicAuth:
    """A registry user name and password (basic auth, and for fetching tokens)."""

    username: str
    password: str = attrs.field(repr=False)


@attrs.frozen
class BearerToken:
    """A bearer token obtained elsewhere, sent as ``Authorization: Bearer``."""

    token: str = attrs.field(repr=False)


def _check_repository(target: str, repository: str) -> str:
    if not repository or len(repository) > 255:
        raise InvalidImageName(target, repository, "is empty or longer than 255 characters")
    for component in repository.split("/"):
        if not is_name_component(component):
            raise InvalidImageName(
                target, component, "is not a lower-case repository path component"
            )
    return repository


def _is_loopback_name(name: str) -> bool:
    """Whether a bare host name (no port, no brackets) is a loopback host."""
    if name.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def _is_loopback(host: str) -> bool:
    name = host[1 : host.index("]")] if host.startswith("[") else host.split(":", 1)[0]
    return _is_loopback_name(name)


_DEFAULT_PORTS: Final = {"http": 80, "https": 443}


def _origin(url: httpx.URL) -> tuple[str, str, int | None]:
    """A URL's origin: scheme, host and port (the scheme's default port filled in)."""
    return url.scheme, url.host.lower(), url.port or _DEFAULT_PORTS.get(url.scheme)


@attrs.frozen
class ImageTarget:
    """Where an image goes: ``HOST[:PORT]/REPO`` plus a tag or a manifest digest."""

    host: str
    repository: str
    tag: str | None = None
    digest: str | None = None

    @classmethod
    def parse(cls, target: str) -> ImageTarget:
        """Read ``HOST[:PORT]/REPO:TAG``, ``HOST[:PORT]/REPO`` or ``HOST[:PORT]/REPO@sha256:<hex>``.

        Without a tag or digest the tag is :data:`DEFAULT_TAG` (``latest``),
        as Docker assumes.  The host part is required (there is no default
        registry); a bad reference raises
        :class:`~nixery_core.errors.InvalidImageName`.
        """
        if not isinstance(target, str) or "/" not in target:
            raise InvalidImageName(str(target), str(target), "needs the form HOST[:PORT]/REPO:TAG")
        host, rest = target.split("/", 1)
        if not _HOST.fullmatch(host):
            raise InvalidImageName(target, host, "is not a registry host[:port]")
        tag: str | None = None
        digest: str | None = None
        if "@" in rest:
            rest, digest = rest.split("@", 1)
            if not digest.startswith("sha256:"):
                raise InvalidImageName(target, digest, "is not a sha256 digest")
            validate_digest(digest)
        elif ":" in rest:
            rest, tag = rest.rsplit(":", 1)
            if not is_tag(tag):
                raise InvalidImageName(target, tag, "is not a valid tag")
        else:
            tag = DEFAULT_TAG  # as docker and skopeo read a reference without one
        return cls(host, _check_repository(target, rest), tag, digest)

    @property
    def reference(self) -> str:
        """The tag, or the digest when pushing by digest."""
        return self.tag if self.tag is not None else str(self.digest)

    @property
    def is_loopback(self) -> bool:
        """Whether the host is ``localhost``, in ``127.0.0.0/8`` or ``::1``."""
        return _is_loopback(self.host)

    def __str__(self) -> str:
        separator = ":" if self.tag is not None else "@"
        return f"{self.host}/{self.repository}{separator}{self.reference}"


@attrs.frozen
class PushResult:
    """What a push did.

    ``blobs_uploaded`` were sent, ``blobs_skipped`` were already in the
    repository (HEAD), ``blobs_mounted`` were linked from ``mount_from``;
    ``bytes_sent`` counts blob bytes uploaded (not manifests);
    ``manifests_pushed`` is 1, or 1 plus the children of an index;
    ``referrers`` are the artifact manifests (SBOMs) pushed for them, and
    ``fallback_tags`` the ``sha256-<hex>`` tags written for a registry
    without the referrers API (see :mod:`nixery_core.sbom.push`).
    """

    target: str
    manifest_digest: str
    blobs_uploaded: int = 0
    blobs_skipped: int = 0
    blobs_mounted: int = 0
    bytes_sent: int = 0
    manifests_pushed: int = 0
    referrers: tuple[str, ...] = ()
    fallback_tags: tuple[str, ...] = ()


# --- authentication --------------------------------------------------------------


def _parse_challenge(header: str) -> tuple[str, dict[str, str]]:
    scheme, _, params = header.strip().partition(" ")
    values = {
        match.group(1).lower(): match.group(2) if match.group(2) is not None else match.group(3)
        for match in _CHALLENGE_PARAM.finditer(params)
    }
    return scheme.lower(), values


def _merge_scopes(scopes: list[str]) -> list[str]:
    """``type:name:actions`` scopes with the actions of one resource merged, in first-seen order."""
    merged: dict[str, list[str]] = {}
    for scope in scopes:
        resource, _, actions = scope.rpartition(":")
        if not resource:
            resource, actions = scope, ""
        known = merged.setdefault(resource, [])
        known += [action for action in actions.split(",") if action and action not in known]
    return [
        f"{resource}:{','.join(sorted(actions))}" if actions else resource
        for resource, actions in merged.items()
    ]


class _RegistryAuth(httpx.Auth):
    """Answers Basic and Bearer challenges; keeps the last token for later requests.

    Only requests to ``origin`` (the registry's scheme, host and port) get
    an ``Authorization`` header or have their challenges answered.
    """

    requires_response_body = True

    def __init__(
        self,
        credentials: BasicAuth | BearerToken | None,
        origin: httpx.URL,
        *,
        insecure: bool = False,
        scopes: tuple[str, ...] = (),
    ) -> None:
        self._credentials = credentials
        self._origin = _origin(origin)
        self._insecure = insecure
        self._scopes = scopes
        self._header: str | None = None
        self._withheld: str | None = None
        if isinstance(credentials, BearerToken):
            self._header = f"Bearer {credentials.token}"

    def _realm_may_have_basic(self, realm: httpx.URL) -> bool:
        """Basic credentials go to a realm over HTTPS, or plain HTTP to loopback if insecure."""
        if realm.scheme == "https":
            return True
        return realm.scheme == "http" and self._insecure and _is_loopback_name(realm.host)

    def _basic(self) -> str | None:
        if not isinstance(self._credentials, BasicAuth):
            return None
        pair = f"{self._credentials.username}:{self._credentials.password}".encode()
        return "Basic " + base64.b64encode(pair).decode("ascii")

    def auth_flow(self, request: httpx.Request) -> Generator[httpx.Request, httpx.Response, None]:
        if _origin(request.url) != self._origin:
            # Another origin (an upload Location elsewhere): no credentials, and
            # its challenges are not answered with ours.
            request.headers.pop("Authorization", None)
            yield request
            return
        if self._header is not None:
            request.headers["Authorization"] = self._header
        response = yield request
        if response.status_code != 401 or isinstance(self._credentials, BearerToken):
            return
        scheme, params = _parse_challenge(response.headers.get("WWW-Authenticate", ""))
        if scheme == "basic":
            header = self._basic()
            if header is None:
                return
        elif scheme == "bearer" and params.get("realm"):
            token_response = yield self._token_request(params)
            header = self._token_header(token_response, params["realm"])
        else:
            return
        self._header = header
        request.headers["Authorization"] = header
        yield request

    def _token_request(self, params: Mapping[str, str]) -> httpx.Request:
        # Several scopes come space-separated in one challenge parameter and
        # go to the token server as repeated ``scope`` query parameters.
        query: list[tuple[str, str | int | float | bool | None]] = []
        if params.get("service"):
            query.append(("service", params["service"]))
        # The scopes the push will need are asked for up front (as docker does),
        # so one token serves HEAD, upload, mount and manifest PUT.
        scopes = _merge_scopes([*params.get("scope", "").split(), *self._scopes])
        query += [("scope", scope) for scope in scopes]
        realm = httpx.URL(params["realm"])
        headers = {}
        basic = self._basic()
        if basic is not None:
            if self._realm_may_have_basic(realm):
                headers["Authorization"] = basic
            else:
                self._withheld = (
                    f" (credentials withheld from {realm.scheme}://{realm.netloc.decode()}: "
                    "a token realm gets them over HTTPS, or plain HTTP to loopback with insecure)"
                )
        return httpx.Request("GET", realm, params=query, headers=headers)

    def _token_header(self, response: httpx.Response, realm: str) -> str:
        if response.status_code != 200:
            raise RegistryError(
                f"token server {realm} refused a token{self._withheld or ''}",
                response.status_code,
                response.text,
            )
        try:
            body = response.json()
        except ValueError as exc:
            raise RegistryError(
                f"token server {realm} answered no JSON", response.status_code, response.text
            ) from exc
        token = body.get("token") or body.get("access_token") if isinstance(body, dict) else None
        if not isinstance(token, str) or not token:
            raise RegistryError(
                f"token server {realm} answered no token", response.status_code, response.text
            )
        return f"Bearer {token}"


# --- the push --------------------------------------------------------------------


@attrs.define
class _Pusher:
    client: httpx.Client
    base: str
    target: ImageTarget
    store: ReadableStore
    auth: _RegistryAuth
    chunk_size: int
    mount_from: str | None
    ledger: PushLedger | None = None
    uploaded: int = 0
    skipped: int = 0
    mounted: int = 0
    bytes_sent: int = 0
    manifests: int = 0
    done: set[str] = attrs.Factory(set)
    _lock: threading.Lock = attrs.Factory(threading.Lock)

    def _url(self, path: str) -> str:
        return f"{self.base}/v2/{self.target.repository}/{path}"

    def _send(self, request: httpx.Request, what: str, ok: tuple[int, ...]) -> httpx.Response:
        try:
            response = self.client.send(request, auth=self.auth)
        except httpx.HTTPError as exc:
            hint = transport_hint(exc, insecure=self.base.startswith("http:"))
            raise RegistryError(f"{what} at {self.target.host} failed: {exc}{hint}") from exc
        if response.status_code == 400 and self.base.startswith("http:"):
            hint = plain_http_to_tls_hint(response.text)
            if hint:
                message = f"{what} at {self.target.host} failed{hint}"
                raise RegistryError(message, 400, response.text)
        if response.status_code not in ok:
            challenge = response.headers.get("WWW-Authenticate")
            hint = f" (challenge: {challenge})" if response.status_code == 401 and challenge else ""
            raise RegistryError(
                f"{what} at {self.target.host} was refused{hint}",
                response.status_code,
                response.text,
            )
        return response

    def _request(
        self,
        method: str,
        url: str,
        what: str,
        ok: tuple[int, ...],
        *,
        params: Mapping[str, str] | None = None,
        content: bytes | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> httpx.Response:
        request = self.client.build_request(
            method, url, params=params, content=content, headers=headers
        )
        return self._send(request, what, ok)

    def _location(self, response: httpx.Response, what: str) -> httpx.URL:
        location = response.headers.get("Location")
        if not location:
            raise RegistryError(f"{what}: no Location header", response.status_code, response.text)
        return response.url.join(location)

    # -- blobs ----------------------------------------------------------------------

    def _count(self, **increments: int) -> None:
        with self._lock:
            for name, value in increments.items():
                setattr(self, name, getattr(self, name) + value)

    def _held(self, digest: str) -> None:
        if self.ledger is not None:
            self.ledger.record(self.target.host, self.target.repository, digest)

    def _mount_source(self, digest: str) -> str | None:
        """The repository to mount ``digest`` from: ``mount_from``, else one the ledger knows."""
        repository = self.target.repository
        if self.mount_from is not None and self.mount_from != repository:
            return self.mount_from
        if self.ledger is not None:
            return self.ledger.source_for(self.target.host, digest, besides=repository)
        return None

    def _claim(self, blob: Descriptor) -> bool:
        """Whether this call is the first to push ``blob`` (each digest goes up once)."""
        with self._lock:
            if blob.digest in self.done:
                return False
            self.done.add(blob.digest)
            return True

    def _head(self, blob: Descriptor) -> bool:
        """Whether the target repository has ``blob`` already."""
        head = self._request("HEAD", self._url(f"blobs/{blob.digest}"), "HEAD blob", (200, 404))
        return head.status_code == 200

    def push_blob(self, blob: Descriptor, present: bool | None = None) -> None:
        """Push one blob unless the repository has it (``present``: HEAD already answered)."""
        if present is None:
            if not self._claim(blob):
                return
            present = self._head(blob)
        if present:
            self._count(skipped=1)
            self._held(blob.digest)
            return
        source = self._mount_source(blob.digest)
        if source is not None:
            start = self._request(
                "POST",
                self._url("blobs/uploads/"),
                f"mount of {blob.digest} from {source}",
                (201, 202),
                params={"mount": blob.digest, "from": source},
            )
            if start.status_code == 201:
                self._count(mounted=1)
                self._held(blob.digest)
                return
        else:
            start = self._request("POST", self._url("blobs/uploads/"), "start of upload", (202,))
        self._upload(blob, self._location(start, "start of upload"))
        self._count(uploaded=1, bytes_sent=blob.size)
        self._held(blob.digest)

    def _head_and_push(self, blob: Descriptor) -> None:
        self.push_blob(blob, self._head(blob))

    def push_blobs(self, blobs: tuple[Descriptor, ...], workers: int) -> None:
        """Push ``blobs``, up to ``workers`` at a time; the first failure is raised.

        The first blob's ``HEAD`` goes alone, so an authentication challenge
        is answered (and a token fetched) once, before the others start.
        """
        pending = [blob for blob in blobs if self._claim(blob)]
        if not pending:
            return
        first_present = self._head(pending[0])
        if workers == 1 or len(pending) == 1:
            self.push_blob(pending[0], first_present)
            for blob in pending[1:]:
                self._head_and_push(blob)
            return
        pool = ThreadPoolExecutor(
            max_workers=min(workers, len(pending)), thread_name_prefix="push-blob"
        )
        try:
            futures = [pool.submit(self.push_blob, pending[0], first_present)]
            futures += [pool.submit(self._head_and_push, blob) for blob in pending[1:]]
            for future in futures:
                future.result()
        finally:
            pool.shutdown(wait=True, cancel_futures=True)

    def _chunks(self, blob: Descriptor) -> Iterator[bytes]:
        """The blob's bytes in ``chunk_size`` pieces, checked against its size and digest."""
        counter = Sha256Counter()
        with self.store.open_blob(blob.digest) as stream:
            while chunk := stream.read(self.chunk_size):
                counter.update(chunk)
                yield chunk
        if counter.digest() != blob.digest or counter.size != blob.size:
            raise DigestMismatch(blob.digest, counter.digest())

    def _upload(self, blob: Descriptor, location: httpx.URL) -> None:
        what = f"upload of {blob.digest}"
        if blob.size <= self.chunk_size:
            data = b"".join(self._chunks(blob))
            self._finish(location, blob.digest, data, what)
            return
        offset = 0
        for chunk in self._chunks(blob):
            response = self._request(
                "PATCH",
                str(location),
                what,
                (202,),
                content=chunk,
                headers={
                    "Content-Type": _OCTET,
                    "Content-Range": f"{offset}-{offset + len(chunk) - 1}",
                },
            )
            offset += len(chunk)
            location = self._location(response, what)
        self._finish(location, blob.digest, b"", what)

    def _finish(self, location: httpx.URL, digest: str, data: bytes, what: str) -> None:
        response = self._request(
            "PUT",
            str(location.copy_merge_params({"digest": digest})),
            what,
            (201,),
            content=data,
            headers={"Content-Type": _OCTET},
        )
        _check_answered(response, digest, what)

    # -- manifests ------------------------------------------------------------------

    def push_manifest(self, data: bytes, media_type: str, reference: str) -> str:
        """PUT a manifest under ``reference``; its digest."""
        self.put_manifest(data, media_type, reference)
        return sha256_digest(data)

    def get_manifest(self, reference: str, accept: str) -> bytes | None:
        """The manifest under ``reference``, ``None`` when there is none (404)."""
        response = self._request(
            "GET", self._url(f"manifests/{reference}"), f"GET manifest {reference}", (200, 404),
            headers={"Accept": accept},
        )
        return response.content if response.status_code == 200 else None

    def put_manifest(self, data: bytes, media_type: str, reference: str) -> httpx.Response:
        digest = sha256_digest(data)
        response = self._request(
            "PUT",
            self._url(f"manifests/{reference}"),
            f"PUT manifest {reference}",
            (200, 201),
            content=data,
            headers={"Content-Type": media_type},
        )
        _check_answered(response, digest, f"PUT manifest {reference}")
        self._count(manifests=1)
        return response


def _check_answered(response: httpx.Response, digest: str, what: str) -> None:
    """A blob's or manifest's ``Docker-Content-Digest`` answer, when there is one, is the
    digest sent (:class:`~nixery_core.errors.RegistryError` otherwise)."""
    answered = response.headers.get("Docker-Content-Digest")
    if answered is not None and answered != digest:
        raise RegistryError(
            f"{what}: the registry answered digest {answered}, sent {digest}",
            response.status_code,
            response.text,
        )


def _check_blobs(store: ReadableStore, blobs: tuple[Descriptor, ...]) -> None:
    """Every blob is in the store with the size the manifest says (BlobNotFound otherwise)."""
    for blob in blobs:
        info = store.blob_info(blob.digest)
        if info is None:
            store.open_blob(blob.digest).close()  # raises the store's BlobNotFound
            raise InvalidManifest(f"blob {blob.digest} vanished from the store")
        if info.size != blob.size:
            raise InvalidManifest(
                f"the manifest gives {blob.digest} size {blob.size}, the store has {info.size}"
            )


def _plan(
    store: ReadableStore, manifest: bytes, media_type: str
) -> list[tuple[bytes, str, tuple[Descriptor, ...]]]:
    """The manifests to push, children first: (bytes, media type, blobs)."""
    if media_type in INDEX_TYPES:
        index = parse_index(manifest, media_type)
        plan = []
        for child in index.manifests:
            data = store.read_blob(child.digest)
            if len(data) != child.size:
                raise InvalidManifest(
                    f"index entry {child.digest} has size {child.size}, the store has {len(data)}"
                )
            plan.append((data, child.media_type, parse_manifest(data, child.media_type).blobs))
        return [*plan, (manifest, media_type, ())]
    return [(manifest, media_type, parse_manifest(manifest, media_type).blobs)]


def _scopes_needed(
    target: ImageTarget, mount_from: str | None, ledger: PushLedger | None = None
) -> tuple[str, ...]:
    scopes = [f"repository:{target.repository}:pull,push"]
    sources = {mount_from} if mount_from is not None else set()
    if ledger is not None:
        sources.update(ledger.repositories(target.host))
    scopes += [f"repository:{repo}:pull" for repo in sorted(sources - {target.repository})]
    return tuple(scopes)


def push_image(
    *,
    store: ReadableStore,
    manifest: bytes,
    manifest_media_type: str,
    target: str,
    insecure: bool = False,
    allow_insecure_remote: bool = False,
    auth: BasicAuth | BearerToken | None = None,
    mount_from: str | None = None,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    client: httpx.Client | None = None,
    timeout: float = 60.0,
    referrers: bool = True,
    workers: int = DEFAULT_WORKERS,
    ledger: PushLedger | None = None,
) -> PushResult:
    """Push the image ``manifest`` names (blobs from ``store``) to ``target``.

    ``target`` is ``HOST[:PORT]/REPO:TAG`` (or ``@sha256:<hex>``).  An image
    index pushes each child manifest (read from the store by digest) and its
    blobs first.  ``mount_from`` names another repository of the same
    registry to mount blobs from.  ``client`` injects the ``httpx.Client``
    (transport, event hooks, TLS settings); without it one is made with
    ``timeout`` and closed afterwards.  ``referrers`` pushes each image
    manifest's SBOMs too (those the store's referrers index names), with the
    referrers API or its fallback tag (:func:`~nixery_core.sbom.push.push_referrers`).
    ``workers`` blobs are pushed at once (1: one after another; the
    manifests always go last, in order).  ``ledger`` (one per process,
    shared by its pushes) records where blobs went, and a blob the target
    repository lacks is mounted from another repository of the same
    registry that the ledger names (:mod:`nixery_core.push_ledger`).
    """
    parsed = ImageTarget.parse(target)
    if mount_from is not None:
        _check_repository(mount_from, mount_from)
    if isinstance(chunk_size, bool) or chunk_size <= 0:
        raise InvalidInput(f"chunk_size {chunk_size!r} must be a positive number of bytes")
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise InvalidInput(f"workers {workers!r} must be a positive integer")
    if insecure and not parsed.is_loopback and not allow_insecure_remote:
        raise InvalidInput(
            f"refusing plain HTTP to {parsed.host}: insecure=True is for loopback hosts "
            "unless allow_insecure_remote=True"
        )
    if parsed.digest is not None and parsed.digest != sha256_digest(manifest):
        raise InvalidInput(f"{target} names a digest other than the manifest's")
    plan = _plan(store, manifest, manifest_media_type)
    for _, _, blobs in plan:
        _check_blobs(store, blobs)

    own_client = client is None
    http = client if client is not None else httpx.Client(timeout=timeout)
    base = f"{'http' if insecure else 'https'}://{parsed.host}"
    pusher = _Pusher(
        client=http,
        base=base,
        target=parsed,
        store=store,
        auth=_RegistryAuth(
            auth,
            httpx.URL(base),
            insecure=insecure,
            scopes=_scopes_needed(parsed, mount_from, ledger),
        ),
        chunk_size=chunk_size,
        mount_from=mount_from,
        ledger=ledger,
    )
    attached = ReferrersPushed()
    try:
        digest = ""
        for position, (data, media_type, blobs) in enumerate(plan, start=1):
            pusher.push_blobs(blobs, workers)
            is_top = position == len(plan)
            digest = pusher.push_manifest(
                data, media_type, parsed.reference if is_top else sha256_digest(data)
            )
            if referrers and media_type in IMAGE_MANIFEST_TYPES:
                attached = attached + push_referrers(pusher, store, sha256_digest(data))
    finally:
        if own_client:
            http.close()
    return PushResult(
        target=str(parsed),
        manifest_digest=digest,
        blobs_uploaded=pusher.uploaded,
        blobs_skipped=pusher.skipped,
        blobs_mounted=pusher.mounted,
        bytes_sent=pusher.bytes_sent,
        manifests_pushed=pusher.manifests - len(attached.manifests) - len(attached.fallback_tags),
        referrers=attached.manifests,
        fallback_tags=attached.fallback_tags,
    )
