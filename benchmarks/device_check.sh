#!/bin/bash
# GPU checks in one bounded run, from the repo root on a CUDA machine that has torch + transformers but not this
# project installed (the workplace's device machine): the gpu-marked tests of the torch backend and the Mega engine,
# then the LLM backend benchmark on a Spark-0.5B-sized random Qwen2 (static + CUDA graphs, and the dynamic path as
# the same machine's baseline). Missing pure-Python/binary deps come as wheels in .whl/ (msgspec, av, soxr, pytest,
# pytest-asyncio for Python 3.12). Results go to $OUT (default /tmp/flashtts-device).
set -o pipefail
OUT=${OUT:-/tmp/flashtts-device}
mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=${PYTHONPATH:+$PYTHONPATH:}$PWD:$PWD/plugins/flashtts-torch/src
export PYTHONUNBUFFERED=1 PYTEST_DISABLE_PLUGIN_AUTOLOAD=1 HF_HUB_OFFLINE=1 TRANSFORMERS_VERBOSITY=error
export FLASHTTS_CACHE_DIR=${FLASHTTS_CACHE_DIR:-/tmp/flashtts-cache}
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__, torch.cuda.get_device_name())"
# 1. gpu-marked tests (the entry-point test needs an installed distribution, so it is left out).
timeout "${TEST_TIMEOUT:-240}" python3 -m pytest -q -p no:cacheprovider -p pytest_asyncio.plugin --run-gpu \
  -m gpu plugins/flashtts-torch/tests tests/engines/mega -k "not entry_point" 2>&1 | tee "$OUT/gpu_tests.log" | tail -15
[ -n "$TESTS_ONLY" ] && exit 0
# 2. LLM backend throughput, Spark-0.5B dims, bfloat16.
B="python3 -m benchmarks.llm_backend --backend flashtts_torch:TorchBackend --preset spark-0.5b --device cuda --dtype bfloat16 --max_model_len 4096"
timeout 200 $B --concurrency "${CONCURRENCY:-1,4,16,32}" --tokens 256 --repeat 2 --backend_option cache_implementation=static \
  --backend_option static_cache_len=4096 2>&1 | grep -v Loading | tee "$OUT/bench_static.log"
timeout 90 $B --concurrency 1,8 --tokens 64 --backend_option cache_implementation=dynamic 2>&1 | grep -v Loading \
  | tee "$OUT/bench_dynamic.log"
