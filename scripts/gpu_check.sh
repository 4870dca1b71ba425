#!/usr/bin/env bash
# The GPU proof in one call (docs/benchmarks.md, "GPU check"): `cyborg bench gpu` with the log beside its JSON.
#
#   bash scripts/gpu_check.sh                 # on a GPU machine: writes $OUT/gpu_check.json and $OUT/gpu_check.log
#   bash scripts/gpu_check.sh --dry-run       # anywhere: tiny models on the CPU, GPU-only steps skipped with the reason
#
# Extra arguments go to `cyborg bench gpu` (--help lists them). Wheels in .whl/ (carried to the device
# machine) are installed into /tmp/site first; the repository itself runs from its root, uninstalled.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 2
OUT=${OUT:-runs/gpu-check}
mkdir -p "$OUT"
if compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 2
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
PYTHON=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 OUT
"$PYTHON" -m cyborg.cli --log-level INFO bench gpu --out "$OUT" "$@" 2>&1 | tee "$OUT/gpu_check.log"
exit "${PIPESTATUS[0]}"
