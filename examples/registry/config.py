"""What the example registry needs, and how Nixery's environment variables describe it.

:class:`RegistryConfig` is the value :func:`~examples.registry.app.create_app`
takes: a package source, a blob store, an optional build cache, and the
build knobs.  Embedders build it in code (tests inject a fake runner or an
in-memory store); :meth:`RegistryConfig.from_env` reads it from the
environment, with Nixery's variable names where Nixery has one:

=========================== ==================================================
variable                    meaning
=========================== ==================================================
``NIXERY_PKGS_PATH``        a local package set directory, or
``NIXERY_PKGS_REPO``        a git repository URL (the image tag is the ref), or
``NIXERY_CHANNEL``          a nixpkgs channel or commit (checked in this order)
``NIXERY_STORAGE_BACKEND``  ``filesystem`` (default) or ``gcs``
``STORAGE_PATH``            the filesystem store's directory (filesystem backend)
``GCS_BUCKET``              the bucket (gcs backend); blobs are redirected to it
``GOOGLE_CLOUD_PROJECT``    the project for the GCS client (optional)
``STORAGE_EMULATOR_HOST``   a GCS emulator URL (anonymous credentials)
``NIX_TIMEOUT``             seconds each Nix call may take (default 60)
``NIXERY_CACHE_DIR``        the local cache tier (default: none, the bucket's
                            ``manifests/`` and ``builds/`` tier only)
``NIXERY_MOVING_TTL``       seconds a moving target's manifest is cached (6 h)
``NIXERY_SHARE_FRAGMENTS``  ``1``: share compressed store paths through the
                            bucket too, so instances reuse each other's
                            (needs ``NIXERY_CACHE_DIR``; see
                            :mod:`nixery_core.fragment_bucket`)
``NIXERY_FRAGMENT_MIN_SIZE`` compressed bytes below which a fragment is not
                            shared (default 131072)
``NIXERY_FRAGMENT_CACHE_SIZE`` bytes of compressed store-path fragments kept
                            in ``NIXERY_CACHE_DIR/fragments`` (default 4 GiB;
                            ``0``: none kept); needs ``NIXERY_CACHE_DIR``
``NIXERY_LEASE_TTL``        seconds a fleet lease stays valid unrenewed
                            (default 30): the longest a holder that died on
                            another host delays the others; ``0``: no fleet
                            leases (see :mod:`nixery_core.lease`)
``NIXERY_BUILD_WORKERS``    builds run at once (default 4)
``NIXERY_SIGNED_URL_TTL``   seconds a GCS signed URL is valid (default 300)
``NIXERY_DEFAULT_FORMAT``   ``oci`` (default) or ``docker``: the server's
                            preference, which decides whenever a client's
                            ``Accept`` header allows both forms with the same
                            quality (see :mod:`examples.registry.negotiation`)
``NIXERY_LAYER_COMPRESSION`` ``gzip`` (default), ``zstd`` (OCI clients only:
                            Docker schema 2 has no zstd layer type), ``none``,
                            ``estargz`` (file-granular, served as plain gzip
                            in Docker schema 2) or ``zstd-chunked``
                            (file-granular, OCI clients only); see
                            docs/performance.md, partial pulls
``NIXERY_ARCHS``            unset (default): one image per name; else a comma
                            list such as ``amd64,arm64``: clients that accept
                            an index get one over these architectures (the
                            Nix must be able to build them, see below)
=========================== ==================================================

``GOOGLE_APPLICATION_CREDENTIALS`` is read by the Google client library
itself: a service-account key makes blob redirects V4 signed URLs, other
credentials give the public object URL (as Nixery does).  Nix itself reads
``NIX_CONFIG`` (``substituters =`` for an offline machine; with
``NIXERY_ARCHS`` naming a foreign architecture, ``extra-platforms =
aarch64-linux`` plus binfmt emulation, or remote builders).  The listening
address (``HOST``, ``PORT``) belongs to the server, see
:mod:`examples.registry.server`.
"""

from __future__ import annotations

import functools
import math
import os
from collections.abc import Callable, Mapping
from datetime import timedelta
from pathlib import Path
from typing import Any, Literal

import attrs

from nixery_core.archive import ArchiveOptions
from nixery_core.build import DEFAULT_TIMEOUT
from nixery_core.builder import DEFAULT_CONCURRENT_BUILDS
from nixery_core.cache import SIX_HOURS, BuildCache
from nixery_core.compression import Compression
from nixery_core.errors import InvalidInput, InvalidSource
from nixery_core.fragment_bucket import DEFAULT_MIN_SIZE, FragmentBucketPolicy
from nixery_core.fragments import DEFAULT_FRAGMENT_LIMIT
from nixery_core.lease import FleetFlight, LeasePolicy
from nixery_core.names import AMD64, ARM64, Architecture
from nixery_core.protocols import ReadableStore, Runner
from nixery_core.sources import PackageSource, source_from_env
from nixery_core.storage.filesystem import FilesystemStore

__all__ = ["ARCHITECTURES", "BlobUrl", "ManifestFormat", "RegistryConfig", "parse_archs"]

ManifestFormat = Literal["oci", "docker"]
#: Turns a stored blob's digest into a URL clients are redirected to.
BlobUrl = Callable[[str], str]

_DEFAULT_SIGNED_URL_TTL = 300.0
#: The architectures ``NIXERY_ARCHS`` may name, by their OCI names.
ARCHITECTURES: Mapping[str, Architecture] = {arch.oci_arch: arch for arch in (AMD64, ARM64)}


def _positive(_: object, attribute: attrs.Attribute[Any], value: float) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float) or value <= 0:
        raise InvalidInput(f"{attribute.name} must be a positive number, not {value!r}")


def _format(_: object, attribute: attrs.Attribute[str], value: str) -> None:
    if value not in ("oci", "docker"):
        raise InvalidInput(f"{attribute.name} must be 'oci' or 'docker', not {value!r}")


def _archs(_: object, attribute: attrs.Attribute[Any], value: object) -> None:
    if not isinstance(value, tuple) or not all(isinstance(a, Architecture) for a in value):
        raise InvalidInput(f"{attribute.name} must be a tuple of Architecture, not {value!r}")
    names = [arch.oci_arch for arch in value]
    if len(set(names)) != len(names):
        raise InvalidInput(f"{attribute.name} names an architecture twice: {', '.join(names)}")


def parse_archs(raw: str) -> tuple[Architecture, ...]:
    """The architectures of a ``NIXERY_ARCHS`` value (``amd64,arm64``); empty for ``""``.

    Raises :class:`~nixery_core.errors.InvalidInput` naming the variable for
    an unknown or repeated architecture.
    """
    names = [part.strip() for part in raw.split(",") if part.strip()]
    unknown = [name for name in names if name not in ARCHITECTURES]
    if unknown:
        raise InvalidInput(
            f"NIXERY_ARCHS={raw!r}: unknown architecture {unknown[0]!r}; "
            f"expected a comma list of {', '.join(sorted(ARCHITECTURES))}"
        )
    if len(set(names)) != len(names):
        raise InvalidInput(f"NIXERY_ARCHS={raw!r} names an architecture twice")
    return tuple(ARCHITECTURES[name] for name in names)


@attrs.frozen
class RegistryConfig:
    """Everything the registry app uses; IO objects are injected, none is global.

    ``runner=None`` runs real Nix.  ``cache=None`` builds every request
    (identical concurrent requests still share one build).  ``blob_url``
    set makes ``GET /v2/<name>/blobs/<digest>`` answer ``307`` to that URL
    instead of streaming the blob (the GCS backend sets it to a signed URL).
    ``store_root`` is where ``/nix/store`` is read from (fakes use a
    temporary directory).  ``archive`` picks the layer compression (gzip
    by default); with zstd, only clients accepting OCI manifests can pull.
    ``archs`` empty (the default) serves one image per name; otherwise a
    client that names an index type in ``Accept`` gets an index over these
    architectures (in this order), built with
    :func:`~nixery_core.multiarch.build_multiarch`, while other clients and
    ``arm64/...`` names get a single manifest as before.  ``default_format``
    is the server's preference between the OCI and Docker forms when a
    client accepts both equally (OCI by default; Docker 20.10 and every
    client tested read OCI manifests).  Building a foreign
    architecture needs a Nix that can (``nix_options`` or ``NIX_CONFIG``
    with ``extra-platforms``), which is why this is off by default.
    ``verify_blobs`` hashes every whole blob streamed from here and logs a
    warning when its bytes do not match its digest
    (:class:`~nixery_core.verify.VerifyingReader`; ``NIXERY_VERIFY_BLOBS=1``).
    """

    source: PackageSource
    store: ReadableStore
    cache: BuildCache | None = None
    runner: Runner | None = None
    timeout: float = attrs.field(default=DEFAULT_TIMEOUT, validator=_positive)
    nix_options: Mapping[str, str] = attrs.field(factory=dict)
    blob_url: BlobUrl | None = None
    default_format: ManifestFormat = attrs.field(default="oci", validator=_format)
    build_workers: int = attrs.field(default=DEFAULT_CONCURRENT_BUILDS, validator=_positive)
    store_root: Path = Path("/")
    archive: ArchiveOptions = attrs.field(factory=ArchiveOptions)
    archs: tuple[Architecture, ...] = attrs.field(default=(), validator=_archs)
    verify_blobs: bool = False

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> RegistryConfig:
        """The configuration the environment describes (``os.environ`` by default).

        Raises :class:`~nixery_core.errors.InvalidSource` when no package
        source is set and :class:`~nixery_core.errors.InvalidInput` for other
        missing or malformed values, naming the variable.
        """
        env = os.environ if env is None else env
        source = source_from_env(env)
        backend = env.get("NIXERY_STORAGE_BACKEND", "filesystem")
        blob_url: BlobUrl | None = None
        store: ReadableStore
        if backend == "filesystem":
            path = env.get("STORAGE_PATH")
            if not path:
                raise InvalidInput("STORAGE_PATH must name a directory for the filesystem backend")
            store = FilesystemStore(Path(path))
        elif backend == "gcs":
            store, blob_url = _gcs_store(env)
        else:
            raise InvalidInput(
                f"NIXERY_STORAGE_BACKEND={backend!r}: expected 'filesystem' or 'gcs'"
            )
        cache_dir = env.get("NIXERY_CACHE_DIR")
        lease_ttl = _number(env, "NIXERY_LEASE_TTL", LeasePolicy().ttl, allow_zero=True)
        cache = BuildCache(
            Path(cache_dir) if cache_dir else None,
            moving_ttl=_number(env, "NIXERY_MOVING_TTL", SIX_HOURS, allow_zero=True),
            fragment_bucket=_fragment_bucket(env, has_cache_dir=bool(cache_dir)),
            fleet=FleetFlight(LeasePolicy(ttl=lease_ttl)) if lease_ttl > 0 else None,
            fragment_limit=_fragment_limit(env, has_cache_dir=bool(cache_dir)),
        )
        default_format = env.get("NIXERY_DEFAULT_FORMAT", "oci")
        if default_format not in ("oci", "docker"):
            raise InvalidInput(
                f"NIXERY_DEFAULT_FORMAT={default_format!r}: expected 'docker' or 'oci'"
            )
        compressions: dict[str, Compression] = {
            "gzip": "gzip",
            "zstd": "zstd",
            "none": "none",
            "estargz": "estargz",
            "zstd-chunked": "zstd-chunked",
        }
        compression = env.get("NIXERY_LAYER_COMPRESSION", "gzip")
        if compression not in compressions:
            raise InvalidInput(
                f"NIXERY_LAYER_COMPRESSION={compression!r}: expected 'gzip', 'zstd', 'none', "
                "'estargz' or 'zstd-chunked'"
            )
        return cls(
            source=source,
            store=store,
            cache=cache,
            archive=ArchiveOptions(compression=compressions[compression]),
            timeout=_number(env, "NIX_TIMEOUT", DEFAULT_TIMEOUT),
            blob_url=blob_url,
            default_format="docker" if default_format == "docker" else "oci",
            build_workers=int(_number(env, "NIXERY_BUILD_WORKERS", DEFAULT_CONCURRENT_BUILDS)),
            archs=parse_archs(env.get("NIXERY_ARCHS", "")),
            verify_blobs=env.get("NIXERY_VERIFY_BLOBS", "") in ("1", "true", "yes"),
        )


def _fragment_bucket(
    env: Mapping[str, str], *, has_cache_dir: bool
) -> FragmentBucketPolicy | None:
    """The bucket tier for fragments, when ``NIXERY_SHARE_FRAGMENTS`` asks for it."""
    raw = env.get("NIXERY_SHARE_FRAGMENTS", "")
    if raw in ("", "0", "false", "no"):
        return None
    if raw not in ("1", "true", "yes"):
        raise InvalidInput(f"NIXERY_SHARE_FRAGMENTS={raw!r}: expected 1 or 0")
    if not has_cache_dir:
        raise InvalidInput(
            "NIXERY_SHARE_FRAGMENTS needs NIXERY_CACHE_DIR: fragments fetched from the bucket "
            "are kept in the local cache"
        )
    min_size = _number(env, "NIXERY_FRAGMENT_MIN_SIZE", DEFAULT_MIN_SIZE, allow_zero=True)
    return FragmentBucketPolicy(min_size=int(min_size))


def _fragment_limit(env: Mapping[str, str], *, has_cache_dir: bool) -> int:
    """The local fragment cache's size in bytes (``NIXERY_FRAGMENT_CACHE_SIZE``)."""
    raw = env.get("NIXERY_FRAGMENT_CACHE_SIZE", "")
    size = _number(env, "NIXERY_FRAGMENT_CACHE_SIZE", DEFAULT_FRAGMENT_LIMIT, allow_zero=True)
    if size != int(size):
        raise InvalidInput(f"NIXERY_FRAGMENT_CACHE_SIZE={raw!r} must be a whole number of bytes")
    if raw and not has_cache_dir:
        raise InvalidInput(
            "NIXERY_FRAGMENT_CACHE_SIZE needs NIXERY_CACHE_DIR: fragments are kept in the "
            "local cache"
        )
    return int(size)


def _number(
    env: Mapping[str, str], name: str, default: float, *, allow_zero: bool = False
) -> float:
    raw = env.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = float(raw)
    except ValueError:
        raise InvalidInput(f"{name}={raw!r} is not a number") from None
    if not math.isfinite(value):
        raise InvalidInput(f"{name}={raw!r} must be a finite number")
    if value < 0 or (value == 0 and not allow_zero):
        raise InvalidInput(f"{name}={raw!r} must be positive")
    return value


def _gcs_store(env: Mapping[str, str]) -> tuple[ReadableStore, BlobUrl]:
    """A GcsStore for ``GCS_BUCKET`` and a signed-URL maker for blob redirects."""
    # Imported here: the filesystem backend needs no Google libraries.
    from google.auth.credentials import AnonymousCredentials  # noqa: PLC0415
    from google.cloud import storage  # noqa: PLC0415

    from nixery_core.storage.gcs import (  # noqa: PLC0415
        GcsStore,
        disable_bucket_metadata_cache,
    )
    from nixery_core.storage.serving import signed_url  # noqa: PLC0415

    bucket = env.get("GCS_BUCKET")
    if not bucket:
        raise InvalidSource("GCS_BUCKET must name a bucket for the gcs backend")
    emulator = env.get("STORAGE_EMULATOR_HOST")
    project = env.get("GOOGLE_CLOUD_PROJECT")
    if emulator:
        anonymous: Any = AnonymousCredentials
        client = storage.Client(
            project=project or "emulator",
            credentials=anonymous(),
            client_options={"api_endpoint": emulator},
        )
    else:
        client = storage.Client(project=project)
    disable_bucket_metadata_cache(client)  # no thread and extra request per miss (a 404)
    store = GcsStore(bucket, client=client)
    expiry = timedelta(seconds=_number(env, "NIXERY_SIGNED_URL_TTL", _DEFAULT_SIGNED_URL_TTL))
    return store, functools.partial(signed_url, store, expiry=expiry)
