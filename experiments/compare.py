"""Is A better than B, or is it noise? The paired difference of NDCG@5 with a bootstrap 95%
interval over queries, on one world or pooled over many.

A ranker is a prediction file (``{split}_pred_<member>.json``: every candidate scored) or a
submission (``submission.csv``: the top five). Both are scored per query with the official
NDCG@5 against the split's answers; the difference A - B is taken query by query, so what
the two share (an easy query, a hard one) cancels, and the queries are resampled with
replacement (``--resamples`` times, seeded) to give the 95% percentile interval.

    # one world
    python experiments/compare.py --answers DATA/testB/testB_answer.json \\
        runs/prediction_result/submission.csv runs/prediction_result/test_pred_two_tower.json
    # many worlds: one --world per world, each ANSWERS A B; the pooled interval resamples
    # the queries within each world (every world keeps its size), the worlds interval
    # resamples the worlds too
    python experiments/compare.py --world W1/testB_answer.json W1/a.csv W1/b.json \\
                            --world W2/testB_answer.json W2/a.csv W2/b.json

An effect whose interval holds 0 is not an effect: every adopt/reject decision of the
project names the interval this prints (docs/decisions.md).
"""
import argparse
import csv
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from errors import DataError  # noqa: E402
from metric import load_answers, load_predictions, ndcg_per_query  # noqa: E402


def load_ranker(path):
    """A prediction file or a submission -> {int qid: {pid: score} or [pid, ...] ranked}."""
    if not path.endswith(".csv"):
        return load_predictions(path)
    try:
        with open(path, newline="", encoding="utf-8") as f:
            rows = list(csv.reader(f))
    except FileNotFoundError:
        raise DataError("%s: not found" % path) from None
    if not rows or rows[0][:1] != ["query-id"]:
        raise DataError("%s:1: expected the header query-id,product1,...,product5" % path)
    out = {}
    for line, row in enumerate(rows[1:], start=2):
        if not row or not all(c.strip().isdigit() for c in row):
            raise DataError("%s:%d: expected a query id and product ids, got %r"
                            % (path, line, row))
        out[int(row[0])] = [int(p) for p in row[1:]]
    return out


def paired_scores(answers_path, path_a, path_b):
    """Per-query NDCG@5 of A and of B on one world: two (Q,) arrays, queries aligned."""
    answers = load_answers(answers_path)
    a = ndcg_per_query(load_ranker(path_a), answers)
    b = ndcg_per_query(load_ranker(path_b), answers)
    qids = sorted(answers)
    return np.array([a[q] for q in qids]), np.array([b[q] for q in qids])


def bootstrap(diffs, *, resamples=10_000, seed=0, worlds=False):
    """diffs: one (Q_w,) array of per-query A - B per world -> (mean, lo, hi).

    The mean pools every query (each world weighs by its size). The interval resamples the
    queries within each world; with ``worlds=True`` it first resamples the worlds too,
    which also counts how much the effect varies from world to world.
    """
    rng = np.random.default_rng(seed)
    pooled = np.concatenate(diffs)
    means = np.empty(resamples)
    for r in range(resamples):
        picked = [diffs[i] for i in rng.integers(len(diffs), size=len(diffs))] if worlds \
            else diffs
        draws = [d[rng.integers(len(d), size=len(d))] for d in picked]
        means[r] = np.concatenate(draws).mean()
    lo, hi = np.percentile(means, [2.5, 97.5])
    return float(pooled.mean()), float(lo), float(hi)


def compare(worlds, *, resamples=10_000, seed=0):
    """worlds: [(answers, A, B), ...] -> {"worlds": per-world rows, "pooled": (mean, lo, hi),
    "over_worlds": (mean, lo, hi) or None for one world}."""
    rows, diffs = [], []
    for i, (answers, path_a, path_b) in enumerate(worlds):
        a, b = paired_scores(answers, path_a, path_b)
        d = a - b
        mean, lo, hi = bootstrap([d], resamples=resamples, seed=seed + i)
        rows.append({"answers": answers, "queries": len(d), "a": float(a.mean()),
                     "b": float(b.mean()), "diff": mean, "lo": lo, "hi": hi})
        diffs.append(d)
    return {"worlds": rows, "pooled": bootstrap(diffs, resamples=resamples, seed=seed),
            "over_worlds": bootstrap(diffs, resamples=resamples, seed=seed, worlds=True)
            if len(diffs) > 1 else None}


def interval(mean, lo, hi):
    return "%+.3f [%+.3f, %+.3f]" % (mean, lo, hi)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("a", nargs="?", help="ranker A: prediction .json or submission .csv")
    p.add_argument("b", nargs="?", help="ranker B")
    p.add_argument("--answers", help="the split's answer file (one world)")
    p.add_argument("--world", nargs=3, action="append", metavar=("ANSWERS", "A", "B"),
                   help="one world of several (repeatable)")
    p.add_argument("--resamples", type=int, default=10_000)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    if a.resamples < 100:
        p.error("--resamples must be at least 100, got %d" % a.resamples)
    worlds = list(a.world or [])
    if a.a or a.b or a.answers:
        if not (a.a and a.b and a.answers):
            p.error("one world takes --answers and two rankers A B")
        worlds.append((a.answers, a.a, a.b))
    if not worlds:
        p.error("give --answers A B, or one --world ANSWERS A B per world")
    try:
        r = compare(worlds, resamples=a.resamples, seed=a.seed)
    except DataError as e:
        sys.exit("compare.py: %s" % e)
    print("| world | queries | A | B | A - B [95%% interval] |\n|---|---|---|---|---|")
    for w in r["worlds"]:
        print("| %s | %d | %.4f | %.4f | %s |" % (w["answers"], w["queries"], w["a"], w["b"],
                                                 interval(w["diff"], w["lo"], w["hi"])))
    print("pooled over queries: %s" % interval(*r["pooled"]))
    if r["over_worlds"]:
        print("worlds resampled too: %s" % interval(*r["over_worlds"]))
    return r


if __name__ == "__main__":
    main()
