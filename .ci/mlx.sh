#!/usr/bin/env bash
# mlx-lm backend CI: installs the CPU build of mlx, mlx-lm and flashtts-mlx into the active (CI) venv and runs the
# flashtts-mlx tests (conformance on tiny Qwen2/Llama checkpoints + the Spark demo end to end). Run it after .ci/run
# has built its venv (`. .venv-ci/bin/activate && bash .ci/mlx.sh`), or in any venv that has flashtts-core[test].
#
# mlx-lm pulls mlx only on macOS; on Linux the CPU build must be named (mlx[cpu] = mlx + mlx-cpu, glibc >= 2.35).
# It adds mlx, mlx-cpu, mlx-lm, protobuf and sentencepiece and changes no installed version (checked with pip check).
set -euo pipefail
cd "$(dirname "$0")/.."

start=$(date +%s)
export PIP_DISABLE_PIP_VERSION_CHECK=1
export FLASHTTS_CACHE_DIR="${FLASHTTS_CACHE_DIR:-$PWD/.cache/flashtts}"
python -m pip install -q "mlx[cpu]==0.32.4" "mlx-lm==0.32.2" -e plugins/flashtts-mlx
python -m pip check
installed=$(date +%s)
echo "mlx installed in $(( installed - start )) s"
python -m pytest -q -p no:cacheprovider plugins/flashtts-mlx
echo "mlx CI finished in $(( $(date +%s) - start )) s"
