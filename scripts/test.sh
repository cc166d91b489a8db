#!/usr/bin/env bash
# One command: set up (with the small test model), then run the test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh smollm2-135m
exec .venv/bin/python -m pytest "$@"
