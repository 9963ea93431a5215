#!/usr/bin/env bash
# One prepared GPU check (under 8 minutes on one GPU): bf16 whole-volume and sliding-window inference of the
# small and reference generators, one training step of each with its peak GPU memory (benchmarks/gpu_check.py),
# then the test suite (make test's pytest command) with the GPU visible. Figures and logs go to $OUT.
#
#   OUT=/tmp/gpu benchmarks/gpu_check.sh          # on a machine with a CUDA GPU
#   OUT=/tmp/gpu benchmarks/gpu_check.sh --cpu    # the CPU path: tiny model, 32^3, no test suite (seconds)
#
# Python: $PYTHON, else .venv/bin/python, else python3; the package is taken from bidsapp/ (PYTHONPATH), so
# nothing is installed. Wheels in .whl/ (packages the machine lacks) are unpacked to /tmp/site first.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/gpu_check_out}
mkdir -p "$OUT"
PY=${PYTHON:-}
if [ -z "$PY" ]; then
    if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
fi
if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$PWD/bidsapp${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
status=0
if [ "${1:-}" = "--cpu" ]; then
    timeout 300 "$PY" benchmarks/gpu_check.py --device cpu --quick --out "$OUT" 2>&1 | tee "$OUT/figures.txt" || status=1
    exit $status
fi
nvidia-smi --query-gpu=name,memory.total,memory.used,driver_version --format=csv >"$OUT/nvidia-smi.csv" 2>&1 || true
"$PY" -c "import torch; assert torch.cuda.is_available(), 'no CUDA GPU visible to torch'" || exit 2
# About 2 minutes on an H200 (estimated from the CPU figures, not yet measured); bounded at 4.
timeout 240 "$PY" benchmarks/gpu_check.py --device cuda --out "$OUT" 2>&1 | tee "$OUT/figures.txt" || status=1
# The suite on 8 workers with the GPU visible (make test without its install step); bounded at 3.5 minutes.
timeout 210 "$PY" -m pytest -n 8 --dist loadfile -q -p no:cacheprovider 2>&1 | tail -n 60 >"$OUT/tests.txt" || status=1
tail -n 3 "$OUT/tests.txt"
exit $status
