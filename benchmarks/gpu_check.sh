#!/usr/bin/env bash
# The estimate and the recommended batch against one GPU's peak memory statistics (benchmarks/gpu_check.py).
#
#   bash benchmarks/gpu_check.sh              # on a machine with one CUDA GPU: under 8 minutes on an H100 / H200
#   bash benchmarks/gpu_check.sh --only qwen  # a part of the grid
#
# It appends its table (GPU, driver, library versions) to benchmarks/RESULTS.md.  It uses .venv/bin/python when
# there is one, else python3 (a GPU image's own torch).  A machine without internet whose python lacks the
# project's stack can take it as wheels in .whl/ (made beforehand where pip works:
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --platform manylinux2014_x86_64 \
#       --platform manylinux_2_17_x86_64 -d .whl trl==1.16.0 transformers==5.24.0 peft==0.21.2 datasets==5.2.0 \
#       accelerate==1.15.0 dill==0.4.1 multiprocess==0.70.19
# ); they are installed into /tmp/site first.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
PY=python3
[ -x .venv/bin/python ] && PY=.venv/bin/python
exec "$PY" benchmarks/gpu_check.py --results benchmarks/RESULTS.md "$@"
