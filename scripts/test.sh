#!/usr/bin/env bash
# Set up .venv and run the test suite (CPU, offline: tiny real models and a local hub mirror).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python -m pytest -q -p no:cacheprovider "$@"
