#!/usr/bin/env bash
# Capacity probe (2026-12-05): the shipped generator's recipe (recipes/bootstrap.yaml) at half width, then its rendition of real
# faces and the data-rich benchmark on it (docs/experiments/2026-12-02-downstream.md, lever table). ~46 min on 2 cores; resumable by step:
#     bash bench/capacity_probe.sh
set -euo pipefail
export OMP_NUM_THREADS=2
S=.venv/bin/synfer
M=out/models/half
date -u
[ -f $M-base/unet/diffusion_pytorch_model.safetensors ] || $S -q train generator --data out/fetext-procedural --out $M-base --channels 16,32,32 --iters 1600 --batch-size 24 --threads 2 --checkpoint-interval 400
date -u
[ -f $M-focus/unet/diffusion_pytorch_model.safetensors ] || $S -q train generator --data out/fetext-procedural --model $M-base --out $M-focus --iters 600 --lr 3e-4 --expression-focus 20 --batch-size 24 --threads 2
date -u
[ -f $M/unet/diffusion_pytorch_model.safetensors ] || $S -q train generator --data out/fetext-procedural --model $M-focus --out $M --iters 2400 --lr 3e-4 --expression-focus 40 --snr-gamma 5 --batch-size 24 --threads 2 --checkpoint-interval 600
date -u
[ -f $M/au_adapter.safetensors ] || $S -q train au-adapter --data out/fetext-procedural --model $M --out $M --iters 1500 --batch-size 24 --threads 2 --expression-focus 40 --snr-gamma 5
date -u
.venv/bin/python bench/reconstruct_real.py out/fetext-procedural out/recon-half --per-class 300 --model $M
date -u
$S benchmark downstream recipes/downstream.yaml real_train=out/fetext-procedural real_test=out/fetext-test real_test_2=out/fetext-test2 allow_short=true threads=2 real_per_class=250 'scales=[1]' 'settings=[synthetic]' synthetic=out/recon-half output=out/bm-recon-half-rich
date -u
