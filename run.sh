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
#   SEARCH    1 (default): whole-catalogue search by model3, re-ranked by the blend, and the
#             saved index; 0: skip both (their earlier outputs are removed)
#   RESUME    1: skip each stage that finished before in OUT_DIR with the same command,
#             the same inputs and the same outputs (OUT_DIR/.stages/NAME records their
#             fingerprints: provenance.py), up to the first that must run, whose reason is
#             printed: every stage after it runs again, since it may read what changed.
#             Delete a stage's record to redo it and what follows
# Before a stage runs, its record and the files it wrote last time are removed: a stage
# that fails leaves none of its earlier outputs beside the new ones of the stages before it.
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
if [ -e "$DATA_DIR/.generating" ]; then  # written first and removed last by synthetic.py
  echo "run.sh: $DATA_DIR: a generated world that synthetic.py did not finish (.generating is there): regenerate it with synthetic.py, or delete it and run.sh generates the small world there" >&2
  exit 2
fi
M4=""; [ "${MODEL4:-0}" = 1 ] && M4=,model4  # model4 as one more stage and member
if [ "$PRESET" = paper ]; then
  ENSEMBLE_HOW=${ENSEMBLE_HOW:-raw}; ENSEMBLE_MODELS=${ENSEMBLE_MODELS:-model1,model2$M4}
else
  ENSEMBLE_HOW=${ENSEMBLE_HOW:-best}; ENSEMBLE_MODELS=${ENSEMBLE_MODELS:-multilabel,model1,model2,model3$M4}
fi
ENSEMBLE_WEIGHTING=${ENSEMBLE_WEIGHTING:-tuned}
SEARCH=${SEARCH:-1}
case "$SEARCH" in 0|1) ;; *) echo "run.sh: SEARCH must be 0 or 1, got '$SEARCH'" >&2; exit 2 ;; esac
PRED="$OUT_DIR/prediction_result"
mkdir -p "$OUT_DIR" "$PRED"
TIMES="$OUT_DIR/stage_times.tsv"
DONE="$OUT_DIR/.stages"  # per finished stage: its command, inputs, outputs and wall time
mkdir -p "$DONE"
: > "$TIMES"

run() { echo "+ $*"; "$@"; }
RAN=0  # a stage has run: the ones after it may not be skipped
stage() {  # stage NAME --in FILE... --out FILE... -- COMMAND...: run it, record what it did
  local name=$1 t0=$SECONDS ins=() outs=() said; shift 2
  while [ "$1" != --out ]; do ins+=("$1"); shift; done; shift
  while [ "$1" != -- ]; do outs+=("$1"); shift; done; shift
  local io=(--dir "$DONE" --in "${ins[@]}" --out "${outs[@]}" --)
  if [ "${RESUME:-0}" = 1 ] && [ "$RAN" = 0 ]; then
    if said=$(python provenance.py check "$name" "${io[@]}" "$@"); then
      echo "= $name: finished before with this command, inputs and outputs, skipped (RESUME=1)"
      printf '%s\t%s\n' "$name" "$said" >> "$TIMES"
      return
    fi
    echo "# $name runs again: $said"
  fi
  RAN=1
  python provenance.py begin "$name" "${io[@]}" "$@"
  run "$@"
  python provenance.py record "$name" --dir "$DONE" --seconds $((SECONDS - t0))
  printf '%s\t%d\n' "$name" $((SECONDS - t0)) >> "$TIMES"
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

if [ "$STORE" = packed ]; then STORE_DIR=$PACKED; else STORE_DIR="$DATA_DIR/features"; fi
# what the stages read of the data root: valid (ranked after every epoch), the splits scored
# by validation, and every candidate split (the gallery of retrieval)
EVAL=("$DATA_DIR/valid/valid.tsv" "$DATA_DIR/valid/valid_answer.json")
SPLITS=("${EVAL[@]}" "$DATA_DIR/testB/testB.tsv" "$DATA_DIR/testB/testB_answer.json")
GALLERY=("${SPLITS[@]}" "$DATA_DIR/testA/testA.tsv" "$DATA_DIR/valid/valid_gallery_answer.json"
         "$DATA_DIR/testB/testB_gallery_answer.json")
ENCODER="$OUT_DIR/multilabel/encoder.pt"

if [ ! -f "$DATA_DIR/train/train.tsv" ]; then
  stage synthetic --in --out "$DATA_DIR/synthetic_report.json" -- \
    python synthetic.py --preset small --out "$DATA_DIR"
fi
stage preprocess --in "$DATA_DIR/train/train.tsv" --out "$OUT_DIR/info" "$DATA_DIR/features" -- \
  python prepare.py preprocess --data "$DATA_DIR" --info "$OUT_DIR/info" --workers 2 --no-progress
if [ "$STORE" = packed ]; then
  stage pack --in "$DATA_DIR/features" "$OUT_DIR/info" --out "$PACKED" -- \
    python prepare.py pack --features "$DATA_DIR/features" --info "$OUT_DIR/info" --out "$PACKED" --no-progress
fi
read -ra MULTILABEL_EXTRA <<< "${MULTILABEL_ARGS:-}"
read -ra MODEL1_EXTRA <<< "${MODEL1_ARGS:-}"
read -ra MODEL2_EXTRA <<< "${MODEL2_ARGS:-}"
read -ra MODEL3_EXTRA <<< "${MODEL3_ARGS:-}"
read -ra MODEL4_EXTRA <<< "${MODEL4_ARGS:-}"
stage multilabel_train --in "$OUT_DIR/info" "$STORE_DIR" "${EVAL[@]}" --out "$OUT_DIR/multilabel"/{best.pt,last.pt,log.jsonl} -- \
  "${TRAIN[@]}" multilabel/train.py "${COMMON[@]}" "${MULTILABEL_EXTRA[@]}" --out "$OUT_DIR/multilabel"
stage multilabel_export --in "$OUT_DIR/multilabel/best.pt" --out "$ENCODER" -- \
  python multilabel/export_model.py --ckpt "$OUT_DIR/multilabel/best.pt" --out "$ENCODER"
stage multilabel_validation --in "$OUT_DIR/multilabel/best.pt" "${SPLITS[@]}" --out "$PRED"/{valid,test}_pred_multilabel.json -- \
  python multilabel/validation.py --ckpt "$OUT_DIR/multilabel/best.pt" --data "$DATA_DIR" --captions 5 --split valid --split testB --out "$PRED"
for m in model1 model2 model3 ${M4:+model4}; do
  extra=MODEL${m#model}_EXTRA[@]
  stage ${m}_train --in "$OUT_DIR/info" "$STORE_DIR" "$ENCODER" "${EVAL[@]}" --out "$OUT_DIR/$m"/{best.pt,last.pt,log.jsonl} -- \
    "${TRAIN[@]}" $m/train.py "${COMMON[@]}" "${!extra}" --export "$ENCODER" --out "$OUT_DIR/$m"
  stage ${m}_validation --in "$OUT_DIR/$m/best.pt" "$ENCODER" "${SPLITS[@]}" --out "$PRED"/{valid,test}_pred_$m.json -- \
    python $m/validation.py --ckpt "$OUT_DIR/$m/best.pt" --data "$DATA_DIR" --split valid --split testB --out "$PRED"
done
TEST_ANS="$DATA_DIR/testB/testB_answer.json"; [ -f "$TEST_ANS" ] || TEST_ANS=""
IFS=, read -ra MEMBERS <<< "$ENSEMBLE_MODELS"
BLEND_IN=() CKPTS=()
for m in "${MEMBERS[@]}"; do BLEND_IN+=("$PRED"/{valid,test}_pred_"$m".json); CKPTS+=("$OUT_DIR/$m/best.pt"); done
stage ensemble --in "${BLEND_IN[@]}" "${SPLITS[@]}" --out "$PRED/submission.csv" "$PRED/ensemble.json" \
    "$PRED/ensemble_t.png" "$PRED/ensemble_simplex.png" "$OUT_DIR/ensemble.executed.ipynb" -- \
  papermill ensemble.ipynb "$OUT_DIR/ensemble.executed.ipynb" --no-progress-bar \
  -p pred_dir "$PRED" -p valid_answers "$DATA_DIR/valid/valid_answer.json" -p test_answers "$TEST_ANS" \
  -p out "$PRED/submission.csv" -p models "$ENSEMBLE_MODELS" -p how "$ENSEMBLE_HOW" \
  -p weighting "$ENSEMBLE_WEIGHTING"
if [ "$SEARCH" = 1 ]; then
  stage retrieval --in "$OUT_DIR/model3/best.pt" "$ENCODER" "$OUT_DIR/info" "$STORE_DIR" "$PRED/ensemble.json" \
      "${CKPTS[@]}" "${GALLERY[@]}" \
      --out "$PRED"/{valid,test}_gallery_{model3,rerank}.json "$PRED/gallery_metrics.json" -- \
    python catalogue/retrieve.py --ckpt "$OUT_DIR/model3/best.pt" --data "$DATA_DIR" --split valid --split testB --k 100 --out "$PRED" --rerank "$PRED/ensemble.json"
  stage index --in "$OUT_DIR/model3/best.pt" "$ENCODER" "$OUT_DIR/info" "$STORE_DIR" "${GALLERY[@]}" --out "$OUT_DIR/index" -- \
    python catalogue/index.py --ckpt "$OUT_DIR/model3/best.pt" --data "$DATA_DIR" --out "$OUT_DIR/index" --no-progress
else  # no search this run: nothing of an earlier one may pass for this run's
  rm -rf "$PRED"/{valid,test}_gallery_{model3,rerank}.json "$PRED/gallery_metrics.json" \
    "$OUT_DIR/index" "$DONE/retrieval" "$DONE/index"
fi
run python summary.py --out "$OUT_DIR"
