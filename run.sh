#!/usr/bin/env bash
# The whole pipeline on one data root, printing every command it runs.
#   DATA_DIR  data root (default data/small, the synthetic small world, generated if absent)
#   OUT_DIR   where every artefact goes (default runs/)
#   PRESET    model preset: small (CPU) or paper (published sizes)
#   NPROC     processes per training stage (torchrun when > 1)
#   EPOCHS    override every stage's epoch count
set -euo pipefail
cd "$(dirname "$0")"
DATA_DIR=${DATA_DIR:-data/small}
OUT_DIR=${OUT_DIR:-runs}
PRESET=${PRESET:-small}
NPROC=${NPROC:-1}
export CUDA_VISIBLE_DEVICES=${CUDA_VISIBLE_DEVICES-}
mkdir -p "$OUT_DIR"
run() { echo "+ $*"; "$@"; }

if [ ! -f "$DATA_DIR/train/train.tsv" ]; then
  run python synthetic.py --preset small --out "$DATA_DIR"
fi
run python utils.py preprocess --data "$DATA_DIR" --info "$OUT_DIR/info" --workers 2
