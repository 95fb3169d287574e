#!/usr/bin/env bash
# One GPU check for a session lent a CUDA machine that has PyTorch but not open_clip (see
# docs/gpu_bench.md, "On a lent machine"): install the carried wheels, print the machine, run
# scripts/bench_gpu.py, and leave its JSON and full log in $OUT (or ./gpu_out when OUT is unset).
#
#   bash scripts/gpu_session.sh            # the full run (a few minutes on an H200)
#   bash scripts/gpu_session.sh --quick    # every section at small sizes (about a minute)
#
# Extra arguments go to bench_gpu.py. The wheels are expected in .whl/ (open_clip_torch, ftfy, wcwidth;
# the command that fetches them is in docs/gpu_bench.md); without .whl/ the installed packages are used.
set -euo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-gpu_out}"
mkdir -p "$out"
if compgen -G ".whl/*.whl" > /dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH="/tmp/site:${PYTHONPATH:-}"
fi
export PYTHONPATH="$PWD:${PYTHONPATH:-}" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
{
    date -u +"%Y-%m-%d %H:%M UTC"
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
    python3 -c "import torch, open_clip; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'open_clip', open_clip.__version__)"
    nproc
} 2>&1 | tee "$out/machine.txt"
status=0
python3 scripts/bench_gpu.py --out "$out/bench_gpu.json" "$@" 2>&1 | tee "$out/bench_gpu.log" || status=$?
exit "$status"
