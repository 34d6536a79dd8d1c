"""An on-demand registry on nixery_core: ``docker pull HOST/shell/hello`` builds the image.

The read side of the Docker Registry HTTP API V2 on Starlette and uvicorn.
Start it with one command, configured by Nixery's environment variables::

    NIXERY_PKGS_PATH=nix/offline STORAGE_PATH=/tmp/registry PORT=8080 \\
        python -m examples.registry

or embed it: ``create_app(RegistryConfig(source=..., store=..., cache=...))``
gives an ASGI app.  Modules: :mod:`~examples.registry.config` (the
configuration), :mod:`~examples.registry.negotiation` (``Accept`` handling),
:mod:`~examples.registry.builds` (builds off the event loop, shared between
identical requests), :mod:`~examples.registry.app` (routes and errors),
:mod:`~examples.registry.server` (starting it), :mod:`~examples.registry.bench`
(latency figures).
"""

from examples.registry.app import create_app
from examples.registry.config import RegistryConfig
from examples.registry.server import serving

__all__ = ["RegistryConfig", "create_app", "serving"]
