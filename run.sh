#!/usr/bin/env bash
# The whole pipeline on one data root, printing every command it runs so it can be copied.
#   DATA_DIR  data root (default data/small: the synthetic small world, generated if absent)
#   OUT_DIR   where every artefact goes (default runs/)
#   PRESET    model preset of every stage: small (CPU, default), paper (published sizes), tiny
#   NPROC     processes per training stage (torchrun when > 1; default 1)
#   EPOCHS    override every stage's epoch count
#   STORE     packed (default: `prepare.py pack` after preprocessing, one memory-mapped file)
#             or npz (read the per-product .npz files of preprocessing directly)
#   WORKERS   DataLoader workers per process (default 0 with the packed store, 1 with npz)
#   ENSEMBLE_HOW  blend normalisation: raw, zscore, rank, or best (by 5-fold estimate);
#             default raw with PRESET=paper (the published blend), best otherwise
#   ENSEMBLE_WEIGHTING  tuned (the weights best on valid; default), equal, or best (tuned
#             weights' 5-fold estimate against equal weights' valid score)
#   ENSEMBLE_MODELS  the blend's members; default model1,model2 with PRESET=paper,
#             multilabel,model1,model2,model3 otherwise
#   MODEL4    1: also train model4, the cross-encoder re-ranker, after model3 and add it to
#             the blend's default members (default 0: no model4)
#   MULTILABEL_ARGS, MODEL1_ARGS, MODEL2_ARGS, MODEL3_ARGS, MODEL4_ARGS  extra flags of one
#             stage's train.py (e.g. MODEL1_ARGS="--p-near 0" for an ablation)
#   RESUME    1: skip each stage that finished before in OUT_DIR with the same command
#             (OUT_DIR/.stages/NAME records it), up to the first that must run: every
#             stage after it runs again, since it may read what changed. Delete a stage's
#             record to redo it and what follows
set -euo pipefail
cd "$(dirname "$0")"
DATA_DIR=${DATA_DIR:-data/small}
OUT_DIR=${OUT_DIR:-runs}
PRESET=${PRESET:-small}
NPROC=${NPROC:-1}
STORE=${STORE:-packed}
case "$STORE" in
  packed) WORKERS=${WORKERS:-0} ;;
  npz) WORKERS=${WORKERS:-1} ;;
  *) echo "run.sh: STORE must be packed or npz, got '$STORE'" >&2; exit 2 ;;
esac
M4=""; [ "${MODEL4:-0}" = 1 ] && M4=,model4  # model4 as one more stage and member
if [ "$PRESET" = paper ]; then
  ENSEMBLE_HOW=${ENSEMBLE_HOW:-raw}; ENSEMBLE_MODELS=${ENSEMBLE_MODELS:-model1,model2$M4}
else
  ENSEMBLE_HOW=${ENSEMBLE_HOW:-best}; ENSEMBLE_MODELS=${ENSEMBLE_MODELS:-multilabel,model1,model2,model3$M4}
fi
ENSEMBLE_WEIGHTING=${ENSEMBLE_WEIGHTING:-tuned}
PRED="$OUT_DIR/prediction_result"
mkdir -p "$OUT_DIR" "$PRED"
TIMES="$OUT_DIR/stage_times.tsv"
DONE="$OUT_DIR/.stages"  # per finished stage: its wall time, then its command
mkdir -p "$DONE"
: > "$TIMES"

run() { echo "+ $*"; "$@"; }
RAN=0  # a stage has run: the ones after it may not be skipped
stage() {  # stage NAME command...: run and record the wall time and the command
  local name=$1 t0=$SECONDS; shift
  if [ "${RESUME:-0}" = 1 ] && [ "$RAN" = 0 ] && [ -f "$DONE/$name" ] \
      && [ "$(tail -n +2 "$DONE/$name")" = "$*" ]; then
    echo "= $name: finished before with this command, skipped (RESUME=1)"
    printf '%s\t%s\n' "$name" "$(head -n 1 "$DONE/$name")" >> "$TIMES"
    return
  fi
  rm -f "$DONE/$name"
  RAN=1
  run "$@"
  printf '%s\t%d\n' "$name" $((SECONDS - t0)) >> "$TIMES"
  printf '%d\n%s\n' $((SECONDS - t0)) "$*" > "$DONE/$name.tmp" && mv "$DONE/$name.tmp" "$DONE/$name"
}
if [ "$NPROC" -gt 1 ]; then
  TRAIN=(torchrun --standalone --nproc_per_node="$NPROC")
else
  TRAIN=(python)
fi
COMMON=(--data "$DATA_DIR" --info "$OUT_DIR/info" --preset "$PRESET" --workers "$WORKERS" --no-progress)
if [ "$STORE" = packed ]; then
  PACKED="$OUT_DIR/packed"
  COMMON+=(--store packed --packed "$PACKED")
fi
[ -n "${EPOCHS:-}" ] && COMMON+=(--epochs "$EPOCHS")

if [ ! -f "$DATA_DIR/train/train.tsv" ]; then
  stage synthetic python synthetic.py --preset small --out "$DATA_DIR"
fi
stage preprocess python prepare.py preprocess --data "$DATA_DIR" --info "$OUT_DIR/info" --workers 2 --no-progress
if [ "$STORE" = packed ]; then
  stage pack python prepare.py pack --features "$DATA_DIR/features" --info "$OUT_DIR/info" --out "$PACKED" --no-progress
fi
read -ra MULTILABEL_EXTRA <<< "${MULTILABEL_ARGS:-}"
read -ra MODEL1_EXTRA <<< "${MODEL1_ARGS:-}"
read -ra MODEL2_EXTRA <<< "${MODEL2_ARGS:-}"
read -ra MODEL3_EXTRA <<< "${MODEL3_ARGS:-}"
read -ra MODEL4_EXTRA <<< "${MODEL4_ARGS:-}"
stage multilabel_train "${TRAIN[@]}" multilabel/train.py "${COMMON[@]}" "${MULTILABEL_EXTRA[@]}" --out "$OUT_DIR/multilabel"
stage multilabel_export python multilabel/export_model.py --ckpt "$OUT_DIR/multilabel/best.pt" --out "$OUT_DIR/multilabel/encoder.pt"
stage multilabel_validation python multilabel/validation.py --ckpt "$OUT_DIR/multilabel/best.pt" --data "$DATA_DIR" --captions 5 --split valid --split testB --out "$PRED"
for m in model1 model2 model3 ${M4:+model4}; do
  extra=MODEL${m#model}_EXTRA[@]
  stage ${m}_train "${TRAIN[@]}" $m/train.py "${COMMON[@]}" "${!extra}" --export "$OUT_DIR/multilabel/encoder.pt" --out "$OUT_DIR/$m"
  stage ${m}_validation python $m/validation.py --ckpt "$OUT_DIR/$m/best.pt" --data "$DATA_DIR" --split valid --split testB --out "$PRED"
done
TEST_ANS="$DATA_DIR/testB/testB_answer.json"; [ -f "$TEST_ANS" ] || TEST_ANS=""
stage ensemble env ENSEMBLE_PRED_DIR="$PRED" ENSEMBLE_VALID_ANSWERS="$DATA_DIR/valid/valid_answer.json" \
  ENSEMBLE_TEST_ANSWERS="$TEST_ANS" ENSEMBLE_OUT="$PRED/submission.csv" ENSEMBLE_HOW="$ENSEMBLE_HOW" \
  ENSEMBLE_MODELS="$ENSEMBLE_MODELS" ENSEMBLE_WEIGHTING="$ENSEMBLE_WEIGHTING" \
  jupyter nbconvert --to notebook --execute ensemble.ipynb --output-dir "$OUT_DIR" --output ensemble.executed.ipynb
stage retrieval python model3/retrieve.py --ckpt "$OUT_DIR/model3/best.pt" --data "$DATA_DIR" --split valid --split testB --k 100 --out "$PRED" --rerank "$PRED/ensemble.json"
run python summary.py --out "$OUT_DIR"
