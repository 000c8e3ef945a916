#!/usr/bin/env bash
# End-to-end demo on the built-in digits data set (no download): SupCon pretraining of a ResNet-18,
# then a linear classifier on the frozen encoder. Prints the linear top-1 accuracy at the end.
# Shorter or longer: EPOCHS=5 LINEAR_EPOCHS=5 bash demo_digits.sh; METHOD=SimCLR for SimCLR.
set -euo pipefail
cd "$(dirname "$0")"

EPOCHS=${EPOCHS:-30}
LINEAR_EPOCHS=${LINEAR_EPOCHS:-12}
METHOD=${METHOD:-SupCon}
COMMON="--dataset digits --model resnet18 --size 8 --amp --seed 0"

python main_supcon.py $COMMON --method "$METHOD" --batch_size 64 --learning_rate 0.1 --temp 0.1 \
    --cosine --epochs "$EPOCHS" --save_freq "$EPOCHS" --print_freq 100
ckpt="save/SupCon/digits_models/${METHOD}_digits_resnet18_lr_0.1_decay_0.0001_bsz_64_temp_0.1_trial_0_cosine/last.pth"

python main_linear.py $COMMON --batch_size 64 --learning_rate 0.5 --cosine --epochs "$LINEAR_EPOCHS" \
    --print_freq 100 --ckpt "$ckpt"
