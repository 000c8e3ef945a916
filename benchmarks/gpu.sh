#!/usr/bin/env bash
# One prepared pass on a lent GPU machine, about 7 minutes: versions, a CUDA smoke test of every script,
# the loss and training benchmarks (--gpu_aug included), the largest batch with and without --grad_cache,
# a short correctness check, then torch.compile (last: its warm-up is long).
#
#   bash benchmarks/gpu.sh                 # from the repository root; logs also go to ${OUT:-/tmp/gpu_out}
#   GPU_BUDGET_S=300 bash benchmarks/gpu.sh
#   GPU_PART=2 bash benchmarks/gpu.sh      # only the Fashion-MNIST protocol (about 9 minutes): a call of its own
#   GPU_PART=all bash benchmarks/gpu.sh    # both parts, about 16 minutes
#
# Every step has its own timeout and the whole run a budget (GPU_BUDGET_S, default 450 s): a step that
# cannot get at least 20 s is skipped, so one hang never eats the machine. Steps whose Python modules are
# missing are skipped, not failed. Nothing stops at a failure; the summary at the end lists every step.
set -u
cd "$(dirname "$0")/.." || exit 1
OUT=${OUT:-/tmp/gpu_out}
mkdir -p "$OUT"
WORK=$(mktemp -d)   # the scripts write ./save under their working directory: keep it out of the repo
REPO=$(pwd)
PY=${PYTHON:-python3}
BUDGET=${GPU_BUDGET_S:-450}
DEVICE=${DEVICE:-cuda}  # DEVICE=cpu only rehearses this script's flow on a machine without a GPU
PART=${GPU_PART:-1}     # 1: everything but Fashion-MNIST; 2: Fashion-MNIST only; all: both
START=$SECONDS
SUMMARY=()
export PYTHONUNBUFFERED=1 PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"

exec > >(tee "$OUT/gpu.log") 2>&1

# step NAME TIMEOUT_S COMMAND...: run with a timeout, log to $OUT/NAME.log, record the outcome
step() {
    local name=$1 limit=$2
    shift 2
    local left=$((BUDGET - (SECONDS - START)))
    if ((left < 20)); then
        SUMMARY+=("SKIP  $name (budget of ${BUDGET}s spent)")
        echo "=== $name: skipped, budget spent"
        return 0
    fi
    ((limit > left)) && limit=$left
    echo "=== $name (timeout ${limit}s): $*"
    local t0=$SECONDS
    timeout -k 10 "$limit" "$@" >"$OUT/$name.log" 2>&1
    local rc=$?
    tail -n 40 "$OUT/$name.log"
    local took=$((SECONDS - t0))
    if ((rc == 0)); then
        SUMMARY+=("OK    $name (${took}s)")
    elif ((rc == 124 || rc == 137)); then
        SUMMARY+=("TIME  $name (killed after ${limit}s)")
    else
        SUMMARY+=("FAIL  $name (rc=$rc, ${took}s, see $OUT/$name.log)")
    fi
    echo
}

skip() {
    SUMMARY+=("SKIP  $1 ($2)")
    echo "=== $1: skipped, $2"
}

has() { "$PY" -c "import $1" >/dev/null 2>&1; }

# --------------------------------------------------------------------------- versions and modules
echo "=== machine"
nvidia-smi 2>&1 | head -n 20 || echo "nvidia-smi not found"
"$PY" - <<'EOF'
import torch
print('torch', torch.__version__, 'cuda', torch.version.cuda, 'cudnn', torch.backends.cudnn.version())
print('cuda available', torch.cuda.is_available(), torch.cuda.get_device_name() if torch.cuda.is_available() else '')
if torch.cuda.is_available():
    print('bf16 supported', torch.cuda.is_bf16_supported(), 'capability', torch.cuda.get_device_capability())
EOF
MISSING=()
for module in torchvision sklearn tensorboard PIL numpy pytest timm kornia; do
    if has $module; then
        echo "module $module: $("$PY" -c "import $module; print(getattr($module, '__version__', 'present'))")"
    else
        echo "module $module: MISSING"
        MISSING+=("$module")
    fi
done
if [[ $DEVICE == cuda* ]] && ! "$PY" -c 'import torch, sys; sys.exit(not torch.cuda.is_available())'; then
    echo "no CUDA device visible to torch: nothing to do"
    exit 1
fi
DATA_OK=1; has torchvision && has sklearn && has PIL || DATA_OK=0  # data.py and --dataset digits
SCRIPTS_OK=$DATA_OK; has tensorboard || SCRIPTS_OK=0               # the scripts log to TensorBoard

if [[ $PART == 1 || $PART == all ]]; then
# --------------------------------------------------------------------------- CUDA smoke test, 1 epoch each
IN_WORK=(bash -c 'cd "$1" && shift && exec "$@"' _ "$WORK")
COMMON=(--dataset digits --size 32 --batch_size 128 --epochs 1 --device $DEVICE --amp --num_workers 8
        --print_freq 5 --seed 0)
if ((SCRIPTS_OK)); then
    step smoke_supcon 90 "${IN_WORK[@]}" "$PY" "$REPO/main_supcon.py" "${COMMON[@]}" --model resnet18
    step smoke_supcon_fp16 90 "${IN_WORK[@]}" "$PY" "$REPO/main_supcon.py" "${COMMON[@]}" --model resnet18 \
        --amp_dtype float16 --method SimCLR --trial fp16
    step smoke_ce 90 "${IN_WORK[@]}" "$PY" "$REPO/main_ce.py" "${COMMON[@]}" --model resnet18
    CKPT=$(find "$WORK/save/SupCon/digits_models" -path '*SupCon_digits*trial_0*' -name last.pth 2>/dev/null | head -n 1)
    if [[ -n "$CKPT" ]]; then
        step smoke_linear 90 "${IN_WORK[@]}" "$PY" "$REPO/main_linear.py" "${COMMON[@]}" --ckpt "$CKPT"
    else
        skip smoke_linear "main_supcon wrote no last.pth"
    fi
else
    skip smoke_scripts "missing modules: ${MISSING[*]}"
fi

# --------------------------------------------------------------------------- benchmarks
TRAIN=(benchmarks/bench_train.py --device $DEVICE --model resnet50 --size 32 --batch_size 128 --steps 20 --warmup 3)
if ((DATA_OK)); then
    step bench_train 200 "$PY" "${TRAIN[@]}" --timeout 120 --configs fp32 fp32+cl amp-bf16 amp-fp16 amp-no-cl \
        --json "$OUT/bench_train.json"
else
    skip bench_train "missing modules: ${MISSING[*]}"
fi
step bench_loss 120 "$PY" benchmarks/bench_loss.py --device $DEVICE
# --gpu_aug: main_supcon images/s with the augmentation on the GPU vs in the loader workers (all CPUs),
# ResNet-18 and ResNet-50 at 32x32; the "data %" column is the DT share (time waiting for the loader)
if ((DATA_OK)) && has kornia; then
    step bench_gpu_aug 200 "$PY" benchmarks/bench_train.py --device $DEVICE --models resnet18 resnet50 \
        --size 32 --batch_size 256 --steps 15 --warmup 3 --timeout 90 --configs amp amp+gpu_aug \
        --json "$OUT/bench_gpu_aug.json"
else
    skip bench_gpu_aug "missing modules: ${MISSING[*]}"
fi

# --grad_cache: the largest --batch_size whose step fits in the GPU's memory (ResNet-50, 32x32, --amp) without it
# and with --grad_cache 128, and images/s at each (random images on the GPU; batches doubled, then bisected)
if ((DATA_OK)); then
    step grad_cache_largest 150 "$PY" benchmarks/bench_grad_cache.py --largest --device $DEVICE --model resnet50 \
        --size 32 --amp --chunks 0 128 --max_batch 32768 --search_s 35 --steps 2 --warmup 1
else
    skip grad_cache_largest "missing modules: ${MISSING[*]}"
fi

# --------------------------------------------------------------------------- correctness
if has pytest; then
    # the CUDA cases of test_amp.py (autocast dtypes, scaler, channels_last on the GPU), then the loss and
    # network tests, which check this machine's torch build
    step pytest_amp_cuda 60 "$PY" -m pytest -q -p no:cacheprovider tests/test_amp.py -k cuda
    step pytest_losses_networks 120 "$PY" -m pytest -q -x -p no:cacheprovider tests/test_losses.py \
        tests/test_networks.py
else
    skip pytest "pytest missing"
fi

# --------------------------------------------------------------------------- torch.compile (long warm-up)
if ((DATA_OK)); then
    step bench_train_compile 300 "$PY" "${TRAIN[@]}" --timeout 200 --configs amp+compile compile \
        --json "$OUT/bench_train_compile.json"
fi
fi  # part 1

# --------------------------------------------------------------------------- Fashion-MNIST (GPU_PART=2)
# SupCon + linear on all 60,000 images at 28x28, ResNet-18, as many epochs as fit in FMNIST_S seconds
# (default 480): images/s and the test accuracy. The IDX files come from FMNIST_DIR (default: Debian's
# dataset-fashion-mnist folder); a machine without the package needs them copied there first.
FMNIST_DIR=${FMNIST_DIR:-/usr/share/datasets/fashion-mnist}
FMNIST_S=${FMNIST_S:-480}
if [[ $PART == 2 || $PART == all ]]; then
    if ((SCRIPTS_OK)) && ls "$FMNIST_DIR"/train-images-idx3-ubyte* >/dev/null 2>&1; then
        BUDGET=$((SECONDS - START + FMNIST_S + 60))
        step fashion_mnist_gpu $((FMNIST_S + 60)) "$PY" benchmarks/fashion_mnist_gpu.py --device $DEVICE \
            --budget_s "$FMNIST_S" --data_folder "$FMNIST_DIR" --out "$WORK/fashion_mnist"
    else
        skip fashion_mnist_gpu "no Fashion-MNIST files in $FMNIST_DIR (or missing modules)"
    fi
fi

# --------------------------------------------------------------------------- summary
echo "=== summary ($((SECONDS - START))s of ${BUDGET}s budget; logs in $OUT)"
printf '%s\n' "${SUMMARY[@]}" | tee "$OUT/summary.txt"
rm -rf "$WORK"
