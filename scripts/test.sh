#!/usr/bin/env bash
# One command: set up (with the small test model), then run the test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh smollm2-135m
# `bench --backend openai`'s integration test needs llama.cpp's llama-server. Building it takes
# ~15 min on 2 cores, once per machine (cached under $KVLIFE_HOME), so only when asked (CI asks);
# without it that test is skipped with the reason.
if [ "${KVLIFE_BUILD_LLAMA_SERVER:-0}" = 1 ]; then
  scripts/llama-server.sh >/dev/null \
    || echo "test: could not build llama-server; the llama.cpp integration test will be skipped" >&2
fi
exec .venv/bin/python -m pytest "$@"
