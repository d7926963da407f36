"""Ablation rows of the robustness options, on valid only (testB stays held out).

Pretraining: the feature transform x the input LayerNorm, each run's best valid NDCG@5 of
the pretraining score. Matching: model1 and model2 trained on the run's encoder without the
negatives one word apart (``--p-near 0``), and model1 with batches cut from runs of 16
same-garment pairs, beside the run's own model1 and model2. model3: the attention-pooled bag
of words in place of the BiGRU text side (and the same with another seed, for the spread of
one run), and other make-ups of its batches (``--group-rows``, ``--group-share``); each row
also gives the 5-fold estimate of the blend of the run's pretraining score, model1 and
model2 with that model3, normalisation chosen as ``run.sh`` chooses it, and that model3's
whole-gallery Recall@100 on valid (``catalogue/retrieve.py``). The run's own rows ("preset")
are read from its logs and prediction files.

    python experiments/ablate.py --data DATA --run OUT [--stages model3]
OUT is a finished ``run.sh`` output folder (its info/, packed/, multilabel/encoder.pt and
prediction_result/ are reused); every ablation run goes to OUT/ablate/ and a finished one is
not redone.
"""
import argparse
import json
import os
import shutil
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import ensemble  # noqa: E402
import metric  # noqa: E402
PRETRAIN = {"transform none, no input norm (published)": ["--transform", "none", "--input-norm", "0"],
            "sqrt only": ["--transform", "sqrt", "--input-norm", "0"],
            "input norm only": ["--transform", "none", "--input-norm", "1"]}
MATCHING = {"model1": {"p-near 0 (published)": ["--p-near", "0"],
                       "runs of 16": ["--group-rows", "16"]},
            "model2": {"p-near 0 (published)": ["--p-near", "0"]}}
MODEL3 = {"text attn": ["--text", "attn"], "text attn, seed 1": ["--text", "attn", "--seed", "1"],
          "shuffled batches": ["--group-rows", "0"], "runs of 32": ["--group-rows", "32"],
          "runs of 32, half the pairs": ["--group-rows", "32", "--group-share", "0.5"]}
MEMBERS = ("multilabel", "model1", "model2", "model3")


def train_once(out, cmd):
    """Run the training command ``cmd`` into ``out`` unless it finished there before."""
    if not os.path.exists(os.path.join(out, "best.pt")):
        subprocess.run(cmd + ["--out", out], check=True, stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL)


def best_valid(out, cmd=None):
    """Best valid NDCG@5 in OUT/log.jsonl, training first with ``cmd`` unless it finished."""
    if cmd:
        train_once(out, cmd)
    with open(os.path.join(out, "log.jsonl")) as f:
        return max(json.loads(line)["valid_ndcg5"] for line in f)


def valid_score(pred_dir, answers):
    """NDCG@5 of ``pred_dir``/valid_pred_model3.json."""
    preds = metric.load_predictions(os.path.join(pred_dir, "valid_pred_model3.json"))
    return ensemble.score(preds, answers)


def blend_estimate(pred_dir, answers):
    """The 5-fold estimate of the tuned blend of MEMBERS' valid predictions in ``pred_dir``,
    normalisation chosen by that estimate, as ``run.sh`` blends."""
    tuning = ensemble.tune_members(ensemble.load_members(pred_dir, "valid", MEMBERS), answers)
    how = ensemble.choose_blend(tuning, "best", "tuned")[0]
    return tuning[how]["kfold"]


def pretraining_rows(a, common):
    """The run's pretraining score and each PRETRAIN variant's best valid NDCG@5."""
    rows = [("pretraining", "preset", best_valid(os.path.join(a.run, "multilabel")))]
    for i, (name, flags) in enumerate(PRETRAIN.items()):
        out = os.path.join(a.run, "ablate", "multilabel-%d" % i)
        cmd = [sys.executable, os.path.join(ROOT, "multilabel", "train.py")] + common + flags
        rows.append(("pretraining", name, best_valid(out, cmd)))
        print("%-12s %-44s %.4f" % rows[-1], flush=True)
    return rows


def matching_rows(a, common, export):
    """The run's model1 and model2 and each MATCHING variant of them."""
    rows = []
    for stage, variants in MATCHING.items():
        rows.append((stage, "preset", best_valid(os.path.join(a.run, stage))))
        for i, (name, flags) in enumerate(variants.items()):
            out = os.path.join(a.run, "ablate", "%s-%d" % (stage, i))
            cmd = [sys.executable, os.path.join(ROOT, stage, "train.py")] + common + flags + \
                ["--export", export]
            rows.append((stage, name, best_valid(out, cmd)))
            print("%-12s %-44s %.4f" % rows[-1], flush=True)
    return rows


def gallery_recall(metrics_dir, ckpt=None, data=None):
    """Valid whole-gallery Recall@100 from ``metrics_dir``/gallery_metrics.json, retrieving
    with ``ckpt`` first unless it is there."""
    path = os.path.join(metrics_dir, "gallery_metrics.json")
    if ckpt and not os.path.exists(path):
        subprocess.run([sys.executable, os.path.join(ROOT, "model3", "retrieve.py"), "--ckpt",
                        ckpt, "--data", data, "--split", "valid", "--k", "100", "--out",
                        metrics_dir], check=True, stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL)
    with open(path) as f:
        return json.load(f)["valid"]["recall@100"]


def model3_rows(a, common, export):
    """The run's model3 and each MODEL3 variant: the valid NDCG@5 of its prediction file
    (validation.py's, on best.pt), the blend's estimate with it, its gallery Recall@100."""
    answers = metric.load_answers(os.path.join(a.data, "valid", "valid_answer.json"))
    own = os.path.join(a.run, "prediction_result")
    rows = [("model3", "preset", valid_score(own, answers)),
            ("blend", "preset", blend_estimate(own, answers)),
            ("gallery R@100", "preset", gallery_recall(own))]
    for i, (name, flags) in enumerate(MODEL3.items()):
        out = os.path.join(a.run, "ablate", "model3-%d" % i)
        pred = os.path.join(out, "pred")
        if not os.path.exists(os.path.join(pred, "valid_pred_model3.json")):
            train_once(out, [sys.executable, os.path.join(ROOT, "model3", "train.py")] + common +
                       flags + ["--export", export])
            subprocess.run([sys.executable, os.path.join(ROOT, "model3", "validation.py"),
                            "--ckpt", os.path.join(out, "best.pt"), "--data", a.data,
                            "--split", "valid", "--out", pred], check=True,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        for m in MEMBERS[:-1]:
            shutil.copy(os.path.join(own, "valid_pred_%s.json" % m), pred)
        rows += [("model3", name, valid_score(pred, answers)),
                 ("blend", name, blend_estimate(pred, answers)),
                 ("gallery R@100", name, gallery_recall(os.path.join(out, "gallery"),
                                                        os.path.join(out, "best.pt"), a.data))]
        print("%-12s %-44s %.4f / blend %.4f / gallery R@100 %.4f"
              % (*rows[-3], rows[-2][2], rows[-1][2]), flush=True)
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", required=True)
    p.add_argument("--run", required=True, help="a finished run.sh OUT_DIR on DATA")
    p.add_argument("--preset", default="small")
    p.add_argument("--stages", nargs="+", choices=("pretraining", "matching", "model3"),
                   default=["pretraining", "matching", "model3"])
    a = p.parse_args(argv)
    common = ["--data", a.data, "--info", os.path.join(a.run, "info"), "--preset", a.preset,
              "--store", "packed", "--packed", os.path.join(a.run, "packed"), "--workers", "0",
              "--no-progress"]
    export = os.path.join(a.run, "multilabel", "encoder.pt")
    rows = []
    if "pretraining" in a.stages:
        rows += pretraining_rows(a, common)
    if "matching" in a.stages:
        rows += matching_rows(a, common, export)
    if "model3" in a.stages:
        rows += model3_rows(a, common, export)
    os.makedirs(os.path.join(a.run, "ablate"), exist_ok=True)
    with open(os.path.join(a.run, "ablate", "table-%s.json" % "-".join(a.stages)), "w") as f:
        json.dump(rows, f, indent=1)
    return rows


if __name__ == "__main__":
    main()
