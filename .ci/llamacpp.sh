#!/usr/bin/env bash
# CI for the llama-cpp backend and the GGUF converter. Runs inside the CI virtual environment that .ci/run has already
# created and activated (core + test extras installed). llama-cpp-python has no binary wheels for this platform, so it
# is built from source here: a portable build (-DGGML_NATIVE=OFF, no -march=native), 5.5-11 minutes on 2 cores the first
# time; pip caches the built wheel, so a rerun on the same machine installs in seconds.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ -z "${VIRTUAL_ENV:-}" ]; then
  echo "error: activate the CI virtual environment first (.ci/run does)" >&2
  exit 2
fi

start=$(date +%s)
export PIP_DISABLE_PIP_VERSION_CHECK=1
export FLASHTTS_CACHE_DIR="${FLASHTTS_CACHE_DIR:-$PWD/.cache/flashtts}"

# Versions verified on this machine kind (the distributions themselves declare ranges).
python -m pip install -q "gguf==0.19.0"
CMAKE_ARGS="${CMAKE_ARGS:--DGGML_NATIVE=OFF}" CMAKE_BUILD_PARALLEL_LEVEL="$(nproc)" \
  python -m pip install -q "llama-cpp-python==0.3.36"
python -m pip install -q -e plugins/flashtts-llamacpp
installed=$(date +%s)

python -m pytest -q -p no:cacheprovider plugins/flashtts-llamacpp tests/convert

end=$(date +%s)
echo "llama-cpp CI finished in $(( end - start )) s (install $(( installed - start )) s, tests $(( end - installed )) s)"
