#!/usr/bin/env bash
# Set everything up, then build shell/hello from the bundled offline package
# set into an OCI layout, show its layers, unpack it and run hello from it.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python -m nixery_core demo "$@"
