"""Blend rules side by side on finished runs: which way of blending the members holds on
worlds it was not chosen on, with paired 95% intervals against the rule run.sh uses.

Each rule takes members (prediction files of a finished ``run.sh`` output folder, the
two-tower's too where ``experiments/worlds.py`` wrote it), picks its normalisation and weights
on valid only, and is scored on testB; ``compare.bootstrap`` gives the paired interval of
every rule against the first (run.sh's), per world and pooled over the worlds.

    python experiments/blends.py runs/dec/family-1001-en/default runs/dec/family-1002-zh/default
A run folder's data root is read from its model3 checkpoint's arguments (``--data``).
"""
import argparse
import json
import os
import sys

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import compare  # noqa: E402
import ensemble  # noqa: E402
import runtime  # noqa: E402
from metric import load_answers, ndcg_per_query  # noqa: E402

PRESET = ["multilabel", "model1", "model2", "model3"]
# name -> (members, weighting, shrink toward equal weights: 0 none, 1 equal weights)
RULES = {
    "run.sh (tuned, normalisation by 5-fold)": (PRESET, "tuned", 0.0),
    "equal weights": (PRESET, "equal", 0.0),
    "tuned, halfway to equal": (PRESET, "tuned", 0.5),
    "best of tuned and equal": (PRESET, "best", 0.0),
    "+ two-tower, tuned": (PRESET + ["two_tower"], "tuned", 0.0),
    "+ two-tower, halfway to equal": (PRESET + ["two_tower"], "tuned", 0.5),
}


def rule_scores(pred_dir, valid_ans, test_ans, members, weighting, shrink):
    """Per-query testB NDCG@5 (queries sorted) of one rule, chosen on valid."""
    valid = ensemble.load_members(pred_dir, "valid", members)
    test = ensemble.load_members(pred_dir, "test", members)
    tuning = ensemble.tune_members(valid, valid_ans, names=members)
    how, _, weights = ensemble.choose_blend(tuning, "best", weighting)
    n = len(members)
    weights = (1 - shrink) * np.asarray(weights) + shrink / n
    weights = weights / weights.sum()
    scores = ndcg_per_query({q: list(s.items()) for q, s in ensemble.blend_members(
        test, list(weights), how, members).items()}, test_ans)
    return np.array([scores[q] for q in sorted(test_ans)]), how, weights


def data_root(run):
    """The data root a finished run trained on: its model3 checkpoint's --data."""
    return runtime.load_checkpoint(os.path.join(run, "model3", "best.pt"))["args"]["data"]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("runs", nargs="+", help="finished run.sh output folders")
    p.add_argument("--resamples", type=int, default=4000)
    a = p.parse_args(argv)
    per_rule = {name: [] for name in RULES}
    for run in a.runs:
        data, pred = data_root(run), os.path.join(run, "prediction_result")
        valid_ans = load_answers(os.path.join(data, "valid", "valid_answer.json"))
        test_ans = load_answers(os.path.join(data, "testB", "testB_answer.json"))
        for name, (members, weighting, shrink) in RULES.items():
            s, how, w = rule_scores(pred, valid_ans, test_ans, members, weighting, shrink)
            per_rule[name].append(s)
            print("%s | %s | testB %.4f | %s %s" % (run, name, s.mean(), how,
                                                   json.dumps([round(x, 2) for x in w])))
    base = per_rule[next(iter(RULES))]
    print("\n| rule | testB NDCG@5 (mean of worlds) | − run.sh's rule, pooled [95%] |\n|---|---|---|")
    for name, scores in per_rule.items():
        diffs = [s - b for s, b in zip(scores, base)]
        print("| %s | %.4f | %s |" % (name, np.mean([s.mean() for s in scores]),
                                      compare.interval(*compare.bootstrap(
                                          diffs, resamples=a.resamples))))
    return per_rule


if __name__ == "__main__":
    main()
