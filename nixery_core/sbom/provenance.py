"""The standard ``org.opencontainers.image.*`` keys an image carries about its origin.

Labels (in the image config) and annotations (on the OCI manifest):

- ``org.opencontainers.image.created``: the image config's ``created``;
- ``org.opencontainers.image.source``: where the package set comes from (the
  nixpkgs repository or the git URL; absent for a local directory, whose
  path means nothing elsewhere);
- ``org.opencontainers.image.revision``: the package set's revision when it
  is pinned (the nixpkgs commit, the git commit, or the content hash of a
  local directory); absent for moving targets (a channel or branch).

All three follow from the cache key's inputs, so the image stays
deterministic: the same source and config give the same bytes.  Labels the
caller sets in :class:`~nixery_core.image_config.ImageConfig` win.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import attrs

from nixery_core.image_config import ImageConfig
from nixery_core.sources import SourceSpec, is_commit

__all__ = ["CREATED", "REVISION", "SOURCE", "source_labels", "standard_labels", "with_labels"]

CREATED = "org.opencontainers.image.created"
SOURCE = "org.opencontainers.image.source"
REVISION = "org.opencontainers.image.revision"

_NIXPKGS_ARCHIVE = re.compile(r"(https://github\.com/[^/]+/[^/]+)/archive/([^/]+)\.tar\.gz")


def source_labels(spec: SourceSpec) -> dict[str, str]:
    """``source`` and ``revision`` for a resolved package source (see the module doc)."""
    args = spec.nix_args
    labels: dict[str, str] = {}
    kind = args.get("type")
    if kind == "nixpkgs":
        url = args.get("url", "")
        match = _NIXPKGS_ARCHIVE.fullmatch(url)
        labels[SOURCE] = match.group(1) if match else url
        if match and is_commit(match.group(2)):
            labels[REVISION] = match.group(2)
    elif kind == "git":
        labels[SOURCE] = args.get("url", "")
        if "rev" in args:
            labels[REVISION] = args["rev"]
    elif spec.pinned and spec.revision is not None:
        labels[REVISION] = spec.revision
    return labels


def standard_labels(config: ImageConfig, spec: SourceSpec) -> dict[str, str]:
    """Every standard key for an image built from ``spec`` with ``config``."""
    return {CREATED: config.created, **source_labels(spec)}


def with_labels(config: ImageConfig, spec: SourceSpec) -> ImageConfig:
    """``config`` with the standard labels added under the caller's own."""
    merged: Mapping[str, str] = {**standard_labels(config, spec), **dict(config.labels)}
    return attrs.evolve(config, labels=merged)
