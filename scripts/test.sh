#!/usr/bin/env bash
# Set everything up, then run the whole test suite with the lint and type gates.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export PATH="$PWD/.venv/bin:$PATH"
echo "== ruff" >&2
ruff check .
echo "== mypy --strict" >&2
mypy
echo "== pytest" >&2
exec python -m pytest "$@"
