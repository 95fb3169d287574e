#!/usr/bin/env bash
# One GPU call for a session lent a CUDA machine that has PyTorch but not open_clip or Hydra (see
# docs/gpu_bench.md, "On a lent machine"). In this order:
#   1. preflight, in the first second: every carried wheel is in .whl/ and every module the machine
#      must bring is importable; otherwise it lists what is missing and exits 2, before anything runs;
#   2. installs the carried wheels into /tmp/site and records the machine ($OUT/machine.txt);
#   3. the whole pipeline once, end to end on CUDA: feclip-train +experiment=demo
#      backbone=vit_l14_336_random (synthetic data at 336, random ViT-L weights: the real weights are
#      too large to travel), its log and small outputs into $OUT/demo/;
#   4. scripts/bench_gpu.py, its JSON and full log into $OUT.
# $OUT defaults to ./gpu_out. Exit status: 2 preflight failed; otherwise 0 when both the demo and the
# bench succeeded, else the first failure's status.
#
#   bash scripts/gpu_session.sh                 # demo + the full bench (a few minutes on an H200)
#   bash scripts/gpu_session.sh --quick         # demo + every bench section at small sizes
#   bash scripts/gpu_session.sh --preflight     # the checks only (what the tests run)
#   bash scripts/gpu_session.sh --no-demo ...   # the bench only
#
# Other arguments go to bench_gpu.py. FECLIP_WHEELS names another wheel folder (default .whl);
# FECLIP_REQUIRED_MODULES replaces the list of modules the machine must have (tests). How to build
# the wheels: docs/gpu_bench.md.
set -euo pipefail
cd "$(dirname "$0")/.."

wheels="${FECLIP_WHEELS:-.whl}"
# carried wheel files, by the start of their file names (a version where one is required)
required_wheels=(
    open_clip_torch-3.3.0 ftfy wcwidth
    hydra_core omegaconf antlr4_python3_runtime-4.9.3
)
# modules the machine itself must have (PyTorch's image): import names
read -r -a required_modules <<< "${FECLIP_REQUIRED_MODULES:-torch torchvision numpy scipy sklearn skimage pandas PIL safetensors yaml regex tqdm packaging}"

preflight_only=0 demo=1 bench_args=()
for arg in "$@"; do
    case "$arg" in
        --preflight) preflight_only=1 ;;
        --no-demo) demo=0 ;;
        *) bench_args+=("$arg") ;;
    esac
done

# -- 1. preflight: nothing is installed or run before this passes ----------------------------------
missing=()
for w in "${required_wheels[@]}"; do
    compgen -G "$wheels/$w-*.whl" > /dev/null || missing+=("wheel $w (no $wheels/$w-*.whl)")
done
absent=$(python3 - "${required_modules[@]}" <<'EOF'
import importlib.util, sys
print(" ".join(m for m in sys.argv[1:] if importlib.util.find_spec(m) is None))
EOF
)
for m in $absent; do missing+=("module $m (not installed on this machine)"); done
if ((${#missing[@]})); then
    {
        echo "gpu_session.sh: preflight failed, nothing was run; missing:"
        printf '  - %s\n' "${missing[@]}"
        echo "build the wheels into $wheels/ and carry it (docs/gpu_bench.md, 'On a lent machine')"
    } >&2
    exit 2
fi
echo "gpu_session.sh: preflight ok ($(ls "$wheels"/*.whl | wc -l) wheels in $wheels, ${#required_modules[@]} modules present)"
((preflight_only)) && exit 0

# -- 2. install and record the machine -------------------------------------------------------------
out="${OUT:-gpu_out}"
mkdir -p "$out"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "$wheels"/*.whl
export PYTHONPATH="$PWD:/tmp/site:${PYTHONPATH:-}" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
export CUBLAS_WORKSPACE_CONFIG="${CUBLAS_WORKSPACE_CONFIG:-:4096:8}"
{
    date -u +"%Y-%m-%d %H:%M UTC"
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
    python3 -c "import torch, open_clip, hydra; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'open_clip', open_clip.__version__, 'hydra', hydra.__version__)"
    nproc
} 2>&1 | tee "$out/machine.txt"

status=0
# -- 3. the whole pipeline once: train and evaluate the demo on CUDA -------------------------------
if ((demo)); then
    results=/tmp/feclip_gpu_demo
    rm -rf "$results"
    demo_status=0
    timeout 300 python3 -c "from feclip.cli import train_main; train_main()" \
        +experiment=demo backbone=vit_l14_336_random device=cuda \
        paths.cache_dir=/tmp/feclip_gpu_cache paths.results_dir="$results" \
        data.num_workers="$(( $(nproc) < 8 ? $(nproc) : 8 ))" train.progress=false \
        2>&1 | tee "$out/demo.log" || demo_status=$?
    mkdir -p "$out/demo"
    # the small files only: the ViT-L adapters (171 MB) and train_state.pt stay behind
    find "$results" -type f -not -path "*/.hydra/*" \( -name metrics.csv -o -name metrics.partial.csv \
        -o -name train.log -o -name env.txt -o -name config.yaml -o -name identity.json \) \
        -exec cp {} "$out/demo/" \; || true
    echo "gpu_session.sh: demo exit status $demo_status" | tee -a "$out/demo.log"
    status=$demo_status
fi

# -- 4. the benchmark ----------------------------------------------------------------------------
bench_status=0
python3 scripts/bench_gpu.py --out "$out/bench_gpu.json" ${bench_args[@]+"${bench_args[@]}"} 2>&1 | tee "$out/bench_gpu.log" || bench_status=$?
((status)) || status=$bench_status
exit "$status"
