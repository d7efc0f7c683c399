#!/usr/bin/env bash
# Set up .venv and run the test suite (CPU, offline: tiny real models and a local hub mirror).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# two workers (pytest-xdist): most tests wait on a real server on loopback, so two keep two cores busy
exec .venv/bin/python -m pytest -q -p no:cacheprovider -n "${CODELLM_TEST_WORKERS:-2}" "$@"
