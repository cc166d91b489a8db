#!/usr/bin/env bash
# Set up kvlife on a fresh machine: .venv/, CPU PyTorch (if no torch yet), kvlife with its test
# extras, and the embedded models named as arguments (default: the default and the test model).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
PIP=(.venv/bin/python -m pip --disable-pip-version-check -q)
if ! .venv/bin/python -c "import torch" >/dev/null 2>&1; then
  # The pinned CPU wheel is on this project's machines; elsewhere fall back to PyTorch's CPU index
  # so that no multi-GB CUDA build is pulled in by accident.
  "${PIP[@]}" install torch==2.13.0 2>/dev/null \
    || "${PIP[@]}" install torch --index-url https://download.pytorch.org/whl/cpu
fi
"${PIP[@]}" install -e '.[test]'
# The store's tests start a real redis-server on loopback; install it when missing (Debian/Ubuntu).
if ! command -v redis-server >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1; then
  SUDO=$([ "$(id -u)" -eq 0 ] || echo sudo)
  { $SUDO apt-get update -qq && $SUDO apt-get install -y -qq redis-server >/dev/null; } \
    || echo "setup: could not install redis-server; the store's Redis tests will be skipped" >&2
fi
models=("$@")
[ ${#models[@]} -gt 0 ] || models=(qwen2.5-coder-0.5b smollm2-135m)
for name in "${models[@]}"; do
  .venv/bin/kvlife models pull "$name"
done
