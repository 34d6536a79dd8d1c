"""nixery_core: Nix package names in, container images out, the work cached."""

from nixery_core.errors import (
    InvalidImageName,
    NixeryError,
    UnknownPackages,
)
from nixery_core.graph import RuntimeGraph, StorePath
from nixery_core.names import AMD64, ARM64, Architecture, Image
from nixery_core.runner import SubprocessRunner
from nixery_core.sources import GitSource, LocalPathSource, NixpkgsSource, SourceSpec

__all__ = [
    "AMD64",
    "ARM64",
    "Architecture",
    "GitSource",
    "Image",
    "InvalidImageName",
    "LocalPathSource",
    "NixeryError",
    "NixpkgsSource",
    "RuntimeGraph",
    "SourceSpec",
    "StorePath",
    "SubprocessRunner",
    "UnknownPackages",
]
