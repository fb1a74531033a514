#!/usr/bin/env bash
# The demo: synthetic multi-dataset -> manifests -> MultiTrain training -> multi-view evaluation,
# all on CPU in a few minutes. Extra arguments are config overrides for train.py.
set -euo pipefail
cd "$(dirname "$0")"
rm -rf runs/demo  # the demo always starts afresh; real runs resume instead
python -m dali_pipes.synthetic --out demo_data --manifests
python train.py --cfg configs/demo.yaml --resume none train.output_dir=runs/demo "$@"
python eval.py --ckpt runs/demo
echo
echo "eval results: runs/demo/eval.json"
echo "TensorBoard:  tensorboard --logdir runs/demo/tb"
