#!/usr/bin/env bash
# The main job, from a fresh clone: sets up the machine (venv, Debian's Fashion-MNIST), trains
# a free adversarial model (m=8, ε=0.1) on Fashion-MNIST, evaluates it, exports a SavedModel,
# and prints where the TensorBoard logs and the SavedModel are. About 2.5 minutes on 2 CPU cores.
#   bash scripts/run.sh                          # flags/quickstart.cfg
#   bash scripts/run.sh --m=4 --model_dir=runs/m4   # extra flags go to tf_free.train
set -euo pipefail
source "$(dirname "$0")/setup.sh"
MODEL_DIR=runs/quickstart
for arg in "$@"; do
  case "$arg" in --model_dir=*) MODEL_DIR="${arg#--model_dir=}" ;; esac
done
python -m tf_free.train --flagfile=flags/quickstart.cfg "$@"
echo
echo "== Evaluating the exported SavedModel (python -m tf_free.evaluate)"
python -m tf_free.evaluate --model_dir="$MODEL_DIR" --attacks=natural,pgd20,cw20
echo
echo "TensorBoard: tensorboard --logdir $MODEL_DIR/logs"
echo "SavedModel:  $MODEL_DIR/export  (saved_model_cli show --all --dir $MODEL_DIR/export)"
