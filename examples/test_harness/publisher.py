"""The embedder's code under test: publish one image per service, keep a lock file.

A CI job calls :func:`publish` with ``{service: [packages]}`` and a
:class:`nixery_core.builder.Builder` (which holds the runner, the store and
the cache: the test suite passes one made of fakes); it builds each image
with :meth:`~nixery_core.builder.Builder.build` and reports, per
service, the manifest digest and how many layers were new.  Failures are
reported in the embedder's own terms (:class:`PublishError` names the
service), which is exactly what its tests want to pin.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence

import attrs

from nixery_core.builder import Builder
from nixery_core.errors import NixBuildFailed, NixeryError, UnknownPackages
from nixery_core.names import Image
from nixery_core.sources import PackageSource

__all__ = ["PublishError", "Published", "lock_file", "publish"]


class PublishError(Exception):
    """A service's image could not be published; ``reason`` says why in plain words."""

    def __init__(self, service: str, reason: str) -> None:
        self.service = service
        self.reason = reason
        super().__init__(f"cannot publish {service}: {reason}")


@attrs.frozen
class Published:
    """One published service image."""

    service: str
    digest: str
    new_layers: int
    reused_layers: int


def publish(
    services: Mapping[str, Sequence[str]], *, source: PackageSource, builder: Builder
) -> list[Published]:
    """Build every service's image (sorted by service name) with ``builder``."""
    published = []
    for service, packages in sorted(services.items()):
        image = Image.from_packages(packages)
        try:
            result = builder.build(image, source)
        except UnknownPackages as exc:
            raise PublishError(service, f"no such packages: {', '.join(exc.packages)}") from exc
        except NixBuildFailed as exc:
            raise PublishError(service, f"Nix failed: {exc.stderr_tail}") from exc
        except NixeryError as exc:
            raise PublishError(service, str(exc)) from exc
        reused = sum(layer.reused for layer in result.layers)
        published.append(
            Published(service, result.manifest_digest, len(result.layers) - reused, reused)
        )
    return published


def lock_file(published: Sequence[Published]) -> str:
    """``{"service": "sha256:..."}`` as stable JSON text, for committing next to the config."""
    return json.dumps({p.service: p.digest for p in published}, indent=2, sort_keys=True) + "\n"
