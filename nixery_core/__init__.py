"""nixery_core: Nix package names in, container images out, the work cached.

The heart of it: :meth:`Image.from_name`, :class:`Builder` (and its
one-shot form :func:`build_image`) and :class:`BuildCache`.  Seams are protocols (:class:`Runner`,
:class:`Uploader`, :class:`LayeringStrategy`) with real defaults; fakes for
tests live in :mod:`nixery_core.testing`.  Everything here is re-exported
from the module that implements it.
"""

from nixery_core.archive import ArchiveOptions, PackedLayer
from nixery_core.build import BuildSettings, build_image
from nixery_core.builder import Builder
from nixery_core.cache import BuildCache, CacheStats
from nixery_core.errors import (
    BadCachedFragment,
    BlobNotFound,
    CommandNotFound,
    DigestMismatch,
    FileChangedDuringPacking,
    InvalidCacheRecord,
    InvalidDigest,
    InvalidImageConfig,
    InvalidImageName,
    InvalidInput,
    InvalidManifest,
    InvalidSource,
    LayerError,
    MissingEncoder,
    NixBuildFailed,
    NixError,
    NixeryError,
    NixOutputError,
    NixTimeout,
    RegistryError,
    StorageError,
    StorageUnavailable,
    StorePathMissing,
    UnknownPackages,
    UnsafeStoreContent,
)
from nixery_core.expressions import NixExpression
from nixery_core.fragment_bucket import FragmentBucketPolicy
from nixery_core.gc import GcReport, collect_garbage
from nixery_core.graph import RuntimeGraph, StorePath
from nixery_core.image_config import ImageConfig, User
from nixery_core.lease import FleetFlight, LeasePolicy
from nixery_core.multiarch import build_multiarch, write_multiarch_layout
from nixery_core.names import AMD64, ARM64, Architecture, Image
from nixery_core.oci_layout import write_oci_layout
from nixery_core.protocols import (
    BlobInfo,
    BlobWriter,
    LayerGroup,
    LayeringStrategy,
    Runner,
    RunResult,
    SupportsLeases,
    Uploader,
)
from nixery_core.recent_errors import BuildFailure, RecentErrors
from nixery_core.results import BuildResult, BuiltLayer, MultiArchResult, ProgressEvent
from nixery_core.runner import SubprocessRunner
from nixery_core.sources import (
    GitSource,
    LocalPathSource,
    NixpkgsSource,
    PackageSource,
    SourceSpec,
    source_from_env,
)
from nixery_core.storage.filesystem import FilesystemStore

__all__ = [
    "AMD64",
    "ARM64",
    "Architecture",
    "ArchiveOptions",
    "BadCachedFragment",
    "BlobInfo",
    "BlobNotFound",
    "BlobWriter",
    "BuildCache",
    "BuildFailure",
    "BuildResult",
    "BuildSettings",
    "Builder",
    "BuiltLayer",
    "CacheStats",
    "CommandNotFound",
    "DigestMismatch",
    "FileChangedDuringPacking",
    "FilesystemStore",
    "FleetFlight",
    "FragmentBucketPolicy",
    "GcReport",
    "GitSource",
    "Image",
    "ImageConfig",
    "InvalidCacheRecord",
    "InvalidDigest",
    "InvalidImageConfig",
    "InvalidImageName",
    "InvalidInput",
    "InvalidManifest",
    "InvalidSource",
    "LayerError",
    "LayerGroup",
    "LayeringStrategy",
    "LeasePolicy",
    "LocalPathSource",
    "MissingEncoder",
    "MultiArchResult",
    "NixBuildFailed",
    "NixError",
    "NixExpression",
    "NixOutputError",
    "NixTimeout",
    "NixeryError",
    "NixpkgsSource",
    "PackageSource",
    "PackedLayer",
    "ProgressEvent",
    "RecentErrors",
    "RegistryError",
    "RunResult",
    "Runner",
    "RuntimeGraph",
    "SourceSpec",
    "StorageError",
    "StorageUnavailable",
    "StorePath",
    "StorePathMissing",
    "SubprocessRunner",
    "SupportsLeases",
    "UnknownPackages",
    "UnsafeStoreContent",
    "Uploader",
    "User",
    "build_image",
    "build_multiarch",
    "collect_garbage",
    "source_from_env",
    "write_multiarch_layout",
    "write_oci_layout",
]
