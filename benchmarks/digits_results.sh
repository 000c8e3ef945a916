#!/usr/bin/env bash
# The digits results of README.md: SupCon and SimCLR (pretraining + linear evaluation, as
# demo_digits.sh) and the cross-entropy baseline, each trained for the same number of epochs, then
# the t-SNE figures of the three checkpoints into figures/. Run from the repository root.
set -euo pipefail
cd "$(dirname "$0")/.."
EPOCHS=${EPOCHS:-30}
export EPOCHS

METHOD=SupCon bash demo_digits.sh
METHOD=SimCLR bash demo_digits.sh
python main_ce.py --dataset digits --model resnet18 --size 8 --amp --seed 0 --batch_size 64 \
    --learning_rate 0.05 --cosine --epochs "$EPOCHS" --save_freq "$EPOCHS" --print_freq 100

runs=save/SupCon/digits_models
mkdir -p figures
for pair in "SupCon:$runs/SupCon_digits_resnet18_lr_0.1_decay_0.0001_bsz_64_temp_0.1_trial_0_cosine" \
            "SimCLR:$runs/SimCLR_digits_resnet18_lr_0.1_decay_0.0001_bsz_64_temp_0.1_trial_0_cosine" \
            "SupCE:$runs/SupCE_digits_resnet18_lr_0.05_decay_0.0001_bsz_64_trial_0_cosine"; do
    name=${pair%%:*}
    python main_tsne.py --dataset digits --size 8 --ckpt "${pair#*:}/last.pth" --max_samples 360 \
        --out "figures/tsne_digits_${name}.png"
done
