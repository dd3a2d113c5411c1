#!/usr/bin/env bash
# Source priors for the pre-training-source study (issue 7; config
# experiments/configs/source_fashion59.json). Every prior is the small CNN's backbone,
# learned on Fashion-MNIST classes 0-4 (or MNIST-5k) and used on Fashion-MNIST classes
# 5-9. Each command resumes from its checkpoint directory when rerun after an
# interruption. About 5 minutes per supervised prior on 2 idle CPU cores.
#
# Every prior gets about the same number of optimizer steps (~600 of training, ~400 of
# SWAG at batch 128) and 20+ snapshots (one every 19 steps), so K = 20 everywhere:
# smaller sources get proportionally more epochs.
#
#   bash experiments/source_priors.sh            # all of them, into experiments/priors/
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-experiments/priors}
COMMON=(--arch small_cnn --no-augment --lr 0.05 --weight-decay 0 --swag-epochs 2
        --swag-lr 0.01 --rank 20 --every 19 --dtype bfloat16 --overwrite)

learn() {
  local name=$1; shift
  if [ -f "$OUT/$name/metadata.json" ]; then echo "have $OUT/$name"; return; fi
  bayes-transfer learn-prior "${COMMON[@]}" "$@" --checkpoint-dir "$OUT/ckpt/$name" \
    --out "$OUT/$name"
}

# The clean in-domain source is the published prior fashion-mnist-0-4/small-cnn (its
# model card has the same command without --label-noise / --source-shots).
# Source label noise: 20% and 40% of the source labels replaced by wrong classes.
learn fashion04-noise20 --dataset fashion_mnist --classes 0-4 --epochs 3 --label-noise 0.2
learn fashion04-noise40 --dataset fashion_mnist --classes 0-4 --epochs 3 --label-noise 0.4
# Source size: 500 images per class (2,500 images, 19 steps an epoch).
learn fashion04-500 --dataset fashion_mnist --classes 0-4 --epochs 30 --swag-epochs 20 \
  --source-shots 500
# Out-of-domain source: handwritten digits (MNIST-5k, 3,600 training images, 28 steps).
learn mnist5k --dataset mnist_5k --epochs 22 --swag-epochs 14
# A mix of both: Fashion-MNIST classes 0-4 and the ten digits as one 15-class task
# (each part standardised with its own statistics; see bayes_transfer/data/mixing.py).
learn fashion04+mnist5k --dataset fashion_mnist:0-4+mnist_5k --epochs 3
# Self-supervised sources. The published SimCLR prior fashion-mnist/small-cnn-simclr
# saw all 60k training images (labels unused), so also the target classes 5-9; this
# one sees classes 0-4 only, like the supervised in-domain source (~40 min on 2 cores:
# a SimCLR step is about two supervised ones). 105 steps an epoch at batch 256: 5
# epochs of training and 5 of SWAG (26 snapshots, one every 20 steps).
if [ -f "$OUT/fashion04-simclr/metadata.json" ]; then echo "have $OUT/fashion04-simclr"; else
  bayes-transfer learn-prior --objective simclr --dataset fashion_mnist --classes 0-4 \
    --arch small_cnn --epochs 5 --batch-size 256 --optimizer adam --lr 1e-3 \
    --weight-decay 0 --swag-epochs 5 --swag-lr 1e-4 --rank 20 --every 20 \
    --dtype bfloat16 --overwrite --checkpoint-dir "$OUT/ckpt/fashion04-simclr" \
    --out "$OUT/fashion04-simclr"
fi
