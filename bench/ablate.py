"""Ablation rows of the robustness options, on valid only (testB stays held out).

Pretraining: the feature transform x the input LayerNorm, each run's best valid NDCG@5 of
the pretraining score. Matching: model1 and model2 trained on the run's encoder without the
negatives one word apart (``--p-near 0``), beside the run's own model1 and model2. The
run's own rows ("preset") are read from its logs.

    python bench/ablate.py --data DATA --run OUT
OUT is a finished ``run.sh`` output folder (its info/, packed/ and multilabel/encoder.pt are
reused); every ablation run goes to OUT/ablate/ and a finished one is not redone.
"""
import argparse
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PRETRAIN = {"transform none, no input norm (published)": ["--transform", "none", "--input-norm", "0"],
            "sqrt only": ["--transform", "sqrt", "--input-norm", "0"],
            "input norm only": ["--transform", "none", "--input-norm", "1"]}
MATCHING = {"p-near 0 (published)": ["--p-near", "0"]}


def best_valid(out, cmd=None):
    """Best valid NDCG@5 in OUT/log.jsonl, training first with ``cmd`` unless it finished."""
    if cmd and not os.path.exists(os.path.join(out, "best.pt")):
        subprocess.run(cmd + ["--out", out], check=True, stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL)
    with open(os.path.join(out, "log.jsonl")) as f:
        return max(json.loads(line)["valid_ndcg5"] for line in f)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", required=True)
    p.add_argument("--run", required=True, help="a finished run.sh OUT_DIR on DATA")
    p.add_argument("--preset", default="small")
    a = p.parse_args(argv)
    common = ["--data", a.data, "--info", os.path.join(a.run, "info"), "--preset", a.preset,
              "--store", "packed", "--packed", os.path.join(a.run, "packed"), "--workers", "0",
              "--no-progress"]
    rows = [("pretraining", "preset", best_valid(os.path.join(a.run, "multilabel")))]
    for i, (name, flags) in enumerate(PRETRAIN.items()):
        out = os.path.join(a.run, "ablate", "multilabel-%d" % i)
        cmd = [sys.executable, os.path.join(ROOT, "multilabel", "train.py")] + common + flags
        rows.append(("pretraining", name, best_valid(out, cmd)))
        print("%-12s %-44s %.4f" % rows[-1], flush=True)
    export = os.path.join(a.run, "multilabel", "encoder.pt")
    for stage in ("model1", "model2"):
        rows.append((stage, "preset", best_valid(os.path.join(a.run, stage))))
        for i, (name, flags) in enumerate(MATCHING.items()):
            out = os.path.join(a.run, "ablate", "%s-%d" % (stage, i))
            cmd = [sys.executable, os.path.join(ROOT, stage, "train.py")] + common + flags + \
                ["--export", export]
            rows.append((stage, name, best_valid(out, cmd)))
            print("%-12s %-44s %.4f" % rows[-1], flush=True)
    with open(os.path.join(a.run, "ablate", "table.json"), "w") as f:
        json.dump(rows, f, indent=1)
    return rows


if __name__ == "__main__":
    main()
