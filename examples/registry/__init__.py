"""An on-demand registry on nixery_core: ``docker pull HOST/shell/hello`` builds the image.

The read side of the Docker Registry HTTP API V2 on Starlette and uvicorn.
Start it with one command, configured by Nixery's environment variables::

    NIXERY_PKGS_PATH=nix/offline STORAGE_PATH=/tmp/registry PORT=8080 \\
        python -m examples.registry

or embed it: ``create_app(RegistryConfig(source=..., store=..., cache=...))``
gives an ASGI app.  Modules: :mod:`~examples.registry.config` (the
configuration), :mod:`~examples.registry.negotiation` (``Accept`` handling),
:mod:`~examples.registry.builds` (builds off the event loop, shared between
identical requests), :mod:`~examples.registry.blobs` (blob answers) with
:mod:`~examples.registry.ranges` and :mod:`~examples.registry.conditional`
(``Range``, ``If-None-Match``), :mod:`~examples.registry.tags` (tag
pagination), :mod:`~examples.registry.failures` (one record per failed
build), :mod:`~examples.registry.error_bodies` (bounded errors),
:mod:`~examples.registry.app` (routes and errors),
:mod:`~examples.registry.server` (starting it), :mod:`~examples.registry.bench`
(latency figures).
"""

from examples.registry.app import create_app
from examples.registry.config import RegistryConfig
from examples.registry.server import serving

__all__ = ["RegistryConfig", "create_app", "serving"]
