#!/usr/bin/env bash
# End-to-end demo on the built-in digits data set (no download): SupCon pretraining of a ResNet-18,
# then a linear classifier on the frozen encoder, trained on un-augmented images (main_linear.py
# --aug none). Prints the linear top-1 accuracy at the end ("best accuracy": the best test accuracy
# over the linear epochs, as the reference prints it; "final accuracy": the last epoch's), then the
# demo's wall-clock time. The settings were chosen on a validation split (benchmarks/README.md,
# "Digits results"); benchmarks/digits_results.sh compares them with SimCLR and cross-entropy.
# Shorter or longer: EPOCHS=5 LINEAR_EPOCHS=5 bash demo_digits.sh; METHOD=SimCLR for SimCLR (at
# SupCon's learning rate; benchmarks/digits_results.sh chooses SimCLR's own);
# PRECISION=fp32 for float32 instead of --amp (bfloat16 on CPU); SEED=1 for another seed. Runs other than
# the default one are saved under their own --trial (fp32, seed1, fp32_seed1, ...).
# SUBSET=300 trains both stages on a fixed, class-balanced 300 of the 1437 training images
# (--train_subset; the run's folder ends in _sub300): a quick try, not the figure above.
# THREADS (default 1) is the number of intra-op threads per process: on the shared 2-core machine
# this was written on, two threads were several times slower than one whenever other jobs ran
# (benchmarks/README.md, "Digits results"); on a machine of your own, THREADS=2 or more may be faster.
# The thread count changes the bfloat16 arithmetic, and so the accuracy, a little.
set -euo pipefail
cd "$(dirname "$0")"

EPOCHS=${EPOCHS:-20}
LINEAR_EPOCHS=${LINEAR_EPOCHS:-20}
METHOD=${METHOD:-SupCon}
PRECISION=${PRECISION:-amp}
SEED=${SEED:-0}
THREADS=${THREADS:-1}
SUBSET=${SUBSET:-0}
SIZE=12         # the 8x8 digits upscaled: the crops keep more detail than at --size 8
BATCH=128
LR=0.03         # pretraining learning rate: the one benchmarks/digits_results.sh chose for SupCon
LINEAR_LR=0.1
case "$PRECISION" in
    amp) AMP_FLAG=--amp; TRIAL=0 ;;
    fp32) AMP_FLAG=; TRIAL=fp32 ;;
    *) echo "error: PRECISION must be amp or fp32, not '$PRECISION'" >&2; exit 2 ;;
esac
case "$THREADS" in
    ''|*[!0-9]*|0) echo "error: THREADS must be a number of threads, 1 or more, not '$THREADS'" >&2
                   exit 2 ;;
esac
case "$SUBSET" in
    ''|*[!0-9]*) echo "error: SUBSET must be a number of training images (0 = all), not '$SUBSET'" >&2
                 exit 2 ;;
esac
SUBSET=$((10#$SUBSET))
if [ "$SEED" != 0 ]; then
    if [ "$TRIAL" = 0 ]; then TRIAL="seed$SEED"; else TRIAL="${TRIAL}_seed$SEED"; fi
fi
export OMP_NUM_THREADS=$THREADS MKL_NUM_THREADS=$THREADS
COMMON="--dataset digits --model resnet18 --size $SIZE $AMP_FLAG --seed $SEED --num_workers 1"
RUN_SUFFIX=
if [ "$SUBSET" != 0 ]; then COMMON="$COMMON --train_subset $SUBSET"; RUN_SUFFIX="_sub$SUBSET"; fi

python main_supcon.py $COMMON --method "$METHOD" --batch_size "$BATCH" --learning_rate "$LR" \
    --temp 0.1 --cosine --epochs "$EPOCHS" --save_freq "$EPOCHS" --print_freq 100 --trial "$TRIAL"
ckpt="save/SupCon/digits_models/${METHOD}_digits_resnet18_lr_${LR}_decay_0.0001_bsz_${BATCH}_temp_0.1_trial_${TRIAL}_cosine${RUN_SUFFIX}/last.pth"

python main_linear.py $COMMON --batch_size 64 --learning_rate "$LINEAR_LR" --cosine --aug none \
    --epochs "$LINEAR_EPOCHS" --print_freq 100 --ckpt "$ckpt"
echo "demo: $METHOD, $EPOCHS pretraining + $LINEAR_EPOCHS linear epochs, $THREADS thread(s): ${SECONDS} s"
