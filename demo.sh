#!/usr/bin/env bash
# The demo: synthetic multi-dataset -> manifests -> MultiTrain training -> multi-view evaluation,
# all on CPU in a few minutes. Extra arguments are config overrides for train.py.
set -euo pipefail
cd "$(dirname "$0")"
rm -rf runs/demo runs/demo.*  # the demo always starts afresh; real runs resume instead
python -m dali_pipes.synthetic --out demo_data --manifests
python train.py --cfg configs/demo.yaml --resume none train.output_dir=runs/demo "$@"  # evaluates at the end
echo
echo "eval results: runs/demo/eval.json (confusion matrices: runs/demo/confusion_*.png)"
echo "TensorBoard:  tensorboard --logdir runs/demo/tb"
echo "evaluate again, e.g. with other views: python eval.py --ckpt runs/demo data.datasets.0.test_views=[4,1]"
