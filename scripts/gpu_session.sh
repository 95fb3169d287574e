#!/usr/bin/env bash
# One GPU call for a session lent a CUDA machine that has PyTorch but not open_clip or Hydra (see
# docs/gpu_bench.md, "On a lent machine"). In this order:
#   1. preflight, in the first second: every carried wheel is in .whl/ and every module the machine
#      must bring is importable; otherwise it lists what is missing and exits 2, before anything runs;
#   2. installs the carried wheels into /tmp/site and records the machine ($OUT/machine.txt);
#   3. the CUDA tests (pytest -m gpu tests/test_cuda.py), their log into $OUT/gpu_tests.log;
#   4. the whole pipeline once, end to end on CUDA: feclip-train +experiment=demo
#      backbone=vit_l14_336_random (synthetic data at 336, random ViT-L weights: the real weights are
#      too large to travel), then the demo with the tiny fallback at train.amp=bf16 and =none (bf16
#      against fp32 on a GPU); logs in $OUT/demo.log, small outputs in $OUT/demo.tar.gz;
#   5. scripts/bench_gpu.py, its JSON (written after every section) and full log into $OUT.
# The device tool brings back at most 8 files from $OUT: this script leaves 6 there.
# $OUT defaults to ./gpu_out. Exit status: 2 preflight failed; otherwise 0 when both the demo and the
# bench succeeded, else the first failure's status.
#
#   bash scripts/gpu_session.sh                 # demo + the full bench (a few minutes on an H200)
#   bash scripts/gpu_session.sh --quick         # demo + every bench section at small sizes
#   bash scripts/gpu_session.sh --preflight     # the checks only (what the tests run)
#   bash scripts/gpu_session.sh --no-demo ...   # no demo (the tests and the bench)
#   bash scripts/gpu_session.sh --no-tests ...  # no CUDA tests
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
read -r -a required_modules <<< "${FECLIP_REQUIRED_MODULES:-torch torchvision numpy scipy sklearn skimage pandas PIL safetensors yaml regex tqdm packaging pytest}"

preflight_only=0 demo=1 tests=1 bench_args=()
for arg in "$@"; do
    case "$arg" in
        --preflight) preflight_only=1 ;;
        --no-demo) demo=0 ;;
        --no-tests) tests=0 ;;
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
out="$(cd "$out" && pwd)"
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
# -- 3. the CUDA tests --------------------------------------------------------------------------------
if ((tests)); then
    tests_status=0
    timeout 150 python3 -m pytest -q -rA -p no:cacheprovider -m gpu tests/test_cuda.py 2>&1 \
        | tee "$out/gpu_tests.log" || tests_status=$?
    echo "gpu_session.sh: CUDA tests exit status $tests_status" | tee -a "$out/gpu_tests.log"
    status=$tests_status
fi

# -- 4. the whole pipeline once, then the benchmark --------------------------------------------------
# (a) random ViT-L/14@336 at bf16: data generation, prefix cache, training, checkpoints, evaluation
# and metrics on CUDA at the real size; (b) the tiny fallback (no weights travel) at train.amp=bf16
# and =none: how far bf16 moves the demo's numbers on a real GPU (docs/method.md); (c) the benchmark,
# last: its JSON keeps every finished section when the call's time limit stops it.
results=/tmp/feclip_gpu_demo
workers=$(( $(nproc) < 8 ? $(nproc) : 8 ))
demo_status=0
demo_run() {  # one feclip-train of the demo on CUDA; its log appended to $out/demo.log
    echo "gpu_session.sh: demo $1" | tee -a "$out/demo.log"
    timeout "$2" python3 -c "from feclip.apps.train import train_main; train_main()" \
        +experiment=demo "$1" device=cuda \
        paths.cache_dir=/tmp/feclip_gpu_cache paths.results_dir="$results" \
        data.num_workers="$workers" train.progress=false \
        2>&1 | tee -a "$out/demo.log" || { local s=$?; ((demo_status)) || demo_status=$s; }
}
pack_demo() {  # the runs' small files, in one archive (the tool brings back 8 files at most): the
    # ViT-L adapters (171 MB) and train_state.pt stay behind
    (cd "$results" 2>/dev/null && find . -type f -not -path "*/.hydra/*" \( -name metrics.csv \
        -o -name metrics.partial.csv -o -name train.log -o -name env.txt -o -name config.yaml \
        -o -name identity.json \) -print0 | tar -czf "$out/demo.tar.gz" --null -T -) || true
}
if ((demo)); then
    rm -rf "$results"
    demo_run backbone=vit_l14_336_random 240
    demo_run train.amp=bf16 120
    demo_run train.amp=none 120
    pack_demo
    echo "gpu_session.sh: demo exit status $demo_status" | tee -a "$out/demo.log"
    ((status)) || status=$demo_status
fi

bench_status=0
python3 scripts/bench_gpu.py --out "$out/bench_gpu.json" ${bench_args[@]+"${bench_args[@]}"} 2>&1 | tee "$out/bench_gpu.log" || bench_status=$?
((status)) || status=$bench_status
exit "$status"
