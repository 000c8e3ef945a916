#!/usr/bin/env bash
# End-to-end demo on the built-in digits data set (no download): SupCon pretraining of a ResNet-18,
# then a linear classifier on the frozen encoder. Prints the linear top-1 accuracy at the end.
# Shorter or longer: EPOCHS=5 LINEAR_EPOCHS=5 bash demo_digits.sh; METHOD=SimCLR for SimCLR;
# PRECISION=fp32 for float32 instead of --amp (bfloat16 on CPU); SEED=1 for another seed. Runs other than
# the default one are saved under their own --trial (fp32, seed1, fp32_seed1, ...).
set -euo pipefail
cd "$(dirname "$0")"

EPOCHS=${EPOCHS:-30}
LINEAR_EPOCHS=${LINEAR_EPOCHS:-12}
METHOD=${METHOD:-SupCon}
PRECISION=${PRECISION:-amp}
SEED=${SEED:-0}
case "$PRECISION" in
    amp) AMP_FLAG=--amp; TRIAL=0 ;;
    fp32) AMP_FLAG=; TRIAL=fp32 ;;
    *) echo "error: PRECISION must be amp or fp32, not '$PRECISION'" >&2; exit 2 ;;
esac
if [ "$SEED" != 0 ]; then
    if [ "$TRIAL" = 0 ]; then TRIAL="seed$SEED"; else TRIAL="${TRIAL}_seed$SEED"; fi
fi
COMMON="--dataset digits --model resnet18 --size 8 $AMP_FLAG --seed $SEED"

python main_supcon.py $COMMON --method "$METHOD" --batch_size 64 --learning_rate 0.1 --temp 0.1 \
    --cosine --epochs "$EPOCHS" --save_freq "$EPOCHS" --print_freq 100 --trial "$TRIAL"
ckpt="save/SupCon/digits_models/${METHOD}_digits_resnet18_lr_0.1_decay_0.0001_bsz_64_temp_0.1_trial_${TRIAL}_cosine/last.pth"

python main_linear.py $COMMON --batch_size 64 --learning_rate 0.5 --cosine --epochs "$LINEAR_EPOCHS" \
    --print_freq 100 --ckpt "$ckpt"
