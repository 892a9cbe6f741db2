#!/usr/bin/env bash
# One command of a GPU lease: install the peers' wheels, run bench/run.py, keep the results.
#
#   bash bench/gpu.sh --workloads W1                      # then W2, W3 (--no-shared-figures)
#   bash bench/gpu.sh --workloads W2 --figures top10 warm --no-shared-figures
#
# The peers (docs/benchmarks.md) travel as wheels in .whl/ (carry it; docs/benchmarks.md shows
# the download). Results go to bench/results/ and, after every figure, to $OUT when it is
# set, so a command cut off at the lease's limit still returns its finished figures. The
# day's earlier results for this device (copied back into bench/results/ after the last
# command) travel with the working tree, and run.py merges the new figures into them.
set -euo pipefail
cd "$(dirname "$0")/.."
if compgen -G ".whl/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/peers .whl/*.whl
  export PYTHONPATH="/tmp/peers:$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
python3 -c "import torch, lightning; print('torch', torch.__version__, 'lightning', lightning.__version__)"
python3 - <<'EOF'
for peer in ("pyhessian", "hessian_eigenthings", "curvlinops"):
    try:
        __import__(peer)
        print(peer, "imports")
    except Exception as error:  # recorded by run.py as "not installed"
        print(peer, "does not import:", error)
EOF
status=0
if [ -n "${OUT:-}" ]; then
  # Start from the day's results that travelled here, then write straight into $OUT.
  cp bench/results/peers-NVIDIA-*-"$(date -I)".json "$OUT"/ 2> /dev/null || true
  python3 -m bench.run --device cuda --out "$OUT" "$@" || status=$?
  cp "$OUT"/peers-NVIDIA-* bench/results/ 2> /dev/null || true
else
  python3 -m bench.run --device cuda "$@" || status=$?
fi
exit "$status"
