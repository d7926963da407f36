#!/usr/bin/env bash
# The one short, prepared GPU check: every training stage at the paper preset with AMP for a
# few steps (samples/s from each log.jsonl), the loader feeding it, and scoring on the GPU
# against a one-pair-at-a-time loop. Run from anywhere; writes logs and a summary to $OUT.
#
#   bash bench/gpu_smoke.sh                                   # on a GPU machine (~5 min)
#   PRESET=tiny WORLD=tiny STEPS=3 DEVICE=cpu bash bench/gpu_smoke.sh   # checks the script on a CPU
#
#   PRESET  model preset (default paper)      WORLD  synthetic world (default small)
#   STEPS   training steps per stage (20)     DEVICE scoring device (default cuda)
#   OUT     where logs go (default /tmp/kddmm_gpu_smoke/out; $OUT on the device machine)
#   WORK    scratch for the world and checkpoints (default /tmp/kddmm_gpu_smoke)
# Needs torch, numpy, pandas, scikit-learn, tqdm; the English world needs no jieba.
set -euo pipefail
cd "$(dirname "$0")/.."
PRESET=${PRESET:-paper}
WORLD=${WORLD:-small}
STEPS=${STEPS:-20}
DEVICE=${DEVICE:-cuda}
WORK=${WORK:-/tmp/kddmm_gpu_smoke}
OUT=${OUT:-$WORK/out}
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
mkdir -p "$WORK" "$OUT"
exec > >(tee "$OUT/gpu_smoke.log") 2>&1

run() { echo "+ $*"; "$@"; }
$PY - <<'EOF'
import torch
print("torch", torch.__version__, "cuda", torch.cuda.is_available(),
      torch.cuda.get_device_name(0) if torch.cuda.is_available() else "-",
      "bf16", torch.cuda.is_available() and torch.cuda.is_bf16_supported())
EOF
D="$WORK/data"
[ -f "$D/train/train.tsv" ] || run $PY synthetic.py --preset "$WORLD" --out "$D"
run $PY prepare.py preprocess --data "$D" --info "$WORK/info" --workers "$(nproc)" --no-progress
run $PY prepare.py pack --features "$D/features" --info "$WORK/info" --out "$WORK/packed" --no-progress
COMMON=(--data "$D" --info "$WORK/info" --preset "$PRESET" --epochs 1 --steps-per-epoch "$STEPS"
        --no-eval --no-progress --amp auto --store packed --packed "$WORK/packed" --workers 0)
rm -rf "$WORK/multilabel" "$WORK/model1" "$WORK/model2"
run $PY multilabel/train.py "${COMMON[@]}" --out "$WORK/multilabel"
run $PY multilabel/export_model.py --ckpt "$WORK/multilabel/last.pt" --out "$WORK/multilabel/encoder.pt"
for m in model1 model2; do
  run $PY $m/train.py "${COMMON[@]}" --export "$WORK/multilabel/encoder.pt" --out "$WORK/$m"
done
for s in multilabel model1 model2; do cp "$WORK/$s/log.jsonl" "$OUT/$s.log.jsonl"; done
$PY - "$WORK" "$PRESET" "$STEPS" <<'EOF' | tee "$OUT/training.txt"
import json, sys
work, preset, steps = sys.argv[1:]
for s in ("multilabel", "model1", "model2"):
    with open("%s/%s/log.jsonl" % (work, s)) as f:
        r = json.loads(f.readline())
    print("%-10s preset %s, %s steps (first included): %.0f samples/s, loss %.4f, %.1f s"
          % (s, preset, steps, r["samples_per_s"], r["loss"], r["time_s"]))
EOF
run $PY bench/loading.py --data "$D" --info "$WORK/info" --store packed="$WORK/packed" \
  --workers 0 2 4 --repeats 1 --batches 20 | tee "$OUT/loading.txt"
run $PY bench/scoring.py --data "$D" --model1 "$WORK/model1/last.pt" --model2 "$WORK/model2/last.pt" \
  --export "$WORK/multilabel/encoder.pt" --naive 200 --repeats 2 --device "$DEVICE" | tee "$OUT/scoring.txt"
echo "gpu_smoke: done; logs in $OUT"
