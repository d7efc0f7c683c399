#!/usr/bin/env bash
# Create .venv and install codellm with its test tools. Torch is pinned first: on these machines
# torch==2.13.0 is a CPU wheel on disk, while an unpinned torch would pull gigabytes of CUDA wheels.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --disable-pip-version-check "torch==${CODELLM_TORCH:-2.13.0}"
.venv/bin/python -m pip install -q --disable-pip-version-check -e ".[dev]"
# real vocabularies and chat templates for the tests (tests/.assets, not in git); without them those tests skip
.venv/bin/python scripts/fetch_test_assets.py || echo "warning: test assets not fetched; tests/test_real_vocabs.py will skip" >&2
