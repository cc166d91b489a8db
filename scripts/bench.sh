#!/usr/bin/env bash
# One command: set up, then run the default benchmark on the embedded default model.
# Extra arguments go to `kvlife bench` (e.g. --tasks kv --samples 2).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh qwen2.5-coder-0.5b
exec .venv/bin/kvlife bench "$@"
