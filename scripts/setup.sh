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
# System programs the tests use, installed when missing (Debian/Ubuntu): the store's tests start a
# real redis-server on loopback; the report's test renders the HTML page in headless Chromium.
# KVLIFE_NO_APT=1 skips this (those tests are then skipped with a reason).
apt_missing=()
command -v redis-server >/dev/null 2>&1 || apt_missing+=(redis-server)
command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 || apt_missing+=(chromium)
if [ ${#apt_missing[@]} -gt 0 ] && [ -z "${KVLIFE_NO_APT:-}" ] && command -v apt-get >/dev/null 2>&1; then
  SUDO=$([ "$(id -u)" -eq 0 ] || echo sudo)
  { $SUDO apt-get update -qq && $SUDO apt-get install -y -qq "${apt_missing[@]}" >/dev/null; } \
    || echo "setup: could not install ${apt_missing[*]}; the tests that need them will be skipped" >&2
fi
models=("$@")
[ ${#models[@]} -gt 0 ] || models=(qwen2.5-coder-0.5b smollm2-135m)
for name in "${models[@]}"; do
  .venv/bin/kvlife models pull "$name"
done
