#!/usr/bin/env bash
# Set up .venv and serve the default model on http://127.0.0.1:11435 (OpenAI API under /v1).
# With the hub reachable, the default is qwen2.5-coder:0.5b, pulled on first use; offline, a tiny
# model built locally (codellm-tiny), so the registry -> engine -> server path still runs.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/codellm serve --model default "$@"
