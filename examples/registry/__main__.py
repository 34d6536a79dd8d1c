"""``python -m examples.registry``: serve the registry configured by the environment."""

import sys

from examples.registry.server import main

sys.exit(main(sys.argv[1:]))
