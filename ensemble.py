"""The blend of model1 and model2: score = t * model1 + (1 - t) * model2 per candidate.

t is searched on ``np.linspace(0, 1, grid)`` by the official NDCG@5 on the validation
answers (ranking ties broken by product id, as ``metric.rank`` does). Among grid points whose
score equals the best (within 1e-12), the one closest to 0.5 wins, then the smaller one.
Tuning t on the same queries it is scored on is optimistic (the published 0.7417 was
measured that way), so the k-fold estimate -- t chosen on k-1 folds, scored on the held-out
fold -- is reported beside it, and ``how="best"`` picks the normalisation by that estimate.

    python ensemble.py --pred-dir prediction_result --valid-answers DATA/valid/valid_answer.json \
        [--test-tsv DATA/testB/testB.tsv] [--test-answers DATA/testB/testB_answer.json] \
        --out prediction_result/submission.csv

writes ``submission.csv``, ``ensemble.json`` (chosen normalisation and t, every score) and
``ensemble_t.png`` (valid NDCG@5 against t) in the folder of ``--out``. The submission is
written only when the test predictions cover every query of the test split (``--test-tsv``,
by default testB/testB.tsv of the data root that holds ``--valid-answers``), each with 5
of its candidates.
"""
import argparse
import os
import sys

import numpy as np

from metric import check_submission, load_answers, load_predictions, ndcg_at_k, ndcg_one, rank
from tsv import DataError, read_candidates
from utils import atomic_json, atomic_open

HOWS = ("raw", "zscore", "rank")
MODELS = ("model1", "model2")
HEADER = ["query-id", "product1", "product2", "product3", "product4", "product5"]
TIE = 1e-12  # curve values closer than this count as equal when picking t


# --------------------------------------------------------------------------------------
# The two models' prediction files
# --------------------------------------------------------------------------------------
def check_aligned(p1, p2, names=MODELS):
    """Both models must score the same candidates of the same queries."""
    for a, b, na, nb in ((p1, p2, *names), (p2, p1, *names[::-1])):
        missing = sorted(set(a) - set(b))
        if missing:
            raise DataError("query %d is in %s's predictions but not in %s's (%d such queries)"
                            % (missing[0], na, nb, len(missing)))
    for q in sorted(p1):
        if set(p1[q]) != set(p2[q]):
            odd = sorted(set(p1[q]) ^ set(p2[q]))
            raise DataError("query %d: %s and %s score different candidates (e.g. product %d)"
                            % (q, names[0], names[1], odd[0]))


def load_pair(pred_dir, split):
    """``{split}_pred_model1.json`` and ``..._model2.json`` from ``pred_dir``, checked."""
    p1, p2 = (load_predictions(os.path.join(pred_dir, "%s_pred_%s.json" % (split, m)))
              for m in MODELS)
    check_aligned(p1, p2, ("%s_pred_model1" % split, "%s_pred_model2" % split))
    return p1, p2


# --------------------------------------------------------------------------------------
# Normalisation and the blend
# --------------------------------------------------------------------------------------
def _normalise_query(s, how):
    """(n,) scores of one query -> (n,) normalised scores, order preserved."""
    if how == "raw":
        return s
    if how == "zscore":
        std = s.std()
        # constant scores: rounding in the mean would turn zero spread into random order
        return np.zeros_like(s) if std <= TIE * np.abs(s).max() else (s - s.mean()) / std
    if how == "rank":
        # average position of ties (0 = lowest score), so ties stay ties and the product
        # id decides only at the final ranking, never inside the blend
        srt = np.sort(s)
        pos = (np.searchsorted(srt, s, "left") + np.searchsorted(srt, s, "right") - 1) / 2
        return pos / (len(s) - 1) if len(s) > 1 else np.full_like(s, 0.5)
    raise ValueError("normalisation must be one of %s, got %r" % (HOWS, how))


def normalise(preds, how):
    """Per-query normalisation: raw (as published), zscore, or rank in [0, 1] (best = 1)."""
    out = {}
    for q, scores in preds.items():
        pids = list(scores)
        s = _normalise_query(np.array([scores[p] for p in pids], np.float64), how)
        out[q] = dict(zip(pids, s.tolist()))
    return out


def _mix(n1, n2, t):
    t = float(t)
    return {q: {p: t * s + (1.0 - t) * n2[q][p] for p, s in sc.items()} for q, sc in n1.items()}


def blend(p1, p2, t, how="raw"):
    """t * model1 + (1 - t) * model2 per candidate, after normalising each model per query."""
    if not 0.0 <= t <= 1.0:
        raise ValueError("t must lie in [0, 1], got %r" % t)
    check_aligned(p1, p2)
    return _mix(normalise(p1, how), normalise(p2, how), t)


def score(preds, answers):
    """Official NDCG@5 of {qid: {pid: score}} over every query of ``answers``."""
    return ndcg_at_k({q: list(s.items()) for q, s in preds.items()}, answers)


# --------------------------------------------------------------------------------------
# Choosing t
# --------------------------------------------------------------------------------------
def grid_points(grid):
    if grid < 2:
        raise ValueError("the t grid needs at least 2 points, got %d" % grid)
    return np.linspace(0.0, 1.0, grid)


def ndcg_matrix(p1, p2, answers, how, grid=100):
    """Per-query NDCG@5 of the blend at every grid t -> (qids (Q,), ts (T,), matrix (Q, T))."""
    check_aligned(p1, p2)
    qids = sorted(int(q) for q in answers)
    missing = [q for q in qids if q not in p1]
    if missing:
        raise DataError("predictions have no entry for query %d of the answer file "
                        "(%d such queries)" % (missing[0], len(missing)))
    n1, n2 = normalise(p1, how), normalise(p2, how)
    n1 = {q: n1[q] for q in qids}
    ts = grid_points(grid)
    m = np.zeros((len(qids), len(ts)))
    for j, t in enumerate(ts):
        mixed = _mix(n1, n2, t)
        for i, q in enumerate(qids):
            m[i, j] = ndcg_one(rank(mixed[q].items()), answers[q])
    return np.array(qids, np.int64), ts, m


def pick_t(ts, curve):
    """Index of the best curve value; ties -> t closest to 0.5, then the smaller t."""
    best = np.flatnonzero(curve >= curve.max() - TIE)
    # rounded: 1/3 and 2/3 must count as equally far from 0.5 despite float error
    return int(min(best, key=lambda j: (round(abs(ts[j] - 0.5), 9), ts[j])))


def _kfold(ts, m, k, seed):
    """Out-of-fold NDCG@5 and the t chosen for each fold, from a (Q, T) matrix."""
    if not 2 <= k <= len(m):
        raise DataError("k-fold needs 2 <= k <= number of answered queries (%d), got k=%d"
                        % (len(m), k))
    folds = np.array_split(np.random.default_rng(seed).permutation(len(m)), k)
    held, chosen = np.zeros(len(m)), []
    for f in folds:
        train = np.setdiff1d(np.arange(len(m)), f)
        j = pick_t(ts, m[train].mean(0))
        held[f] = m[f, j]
        chosen.append(float(ts[j]))
    return float(held.mean()), chosen


def tune(p1, p2, answers, *, hows=HOWS, grid=100, k=5, seed=0):
    """Per normalisation: t tuned on all of valid, its (optimistic) score, the k-fold estimate.

    -> {how: {"t", "valid", "kfold", "fold_t", "curve"}}; one matrix per normalisation.
    """
    out = {}
    for how in hows:
        _, ts, m = ndcg_matrix(p1, p2, answers, how, grid)
        curve = m.mean(0)
        j = pick_t(ts, curve)
        est, fold_t = _kfold(ts, m, k, seed)
        out[how] = {"t": float(ts[j]), "valid": float(curve[j]), "kfold": est,
                    "fold_t": fold_t, "curve": curve}
    return out


def choose_how(tuning, how="best"):
    """``"best"``: the normalisation with the highest k-fold estimate (first listed on ties)."""
    if how != "best":
        if how not in tuning:
            raise ValueError("normalisation %r was not tuned (have %s)" % (how, list(tuning)))
        return how
    return max(tuning, key=lambda h: (tuning[h]["kfold"], -list(tuning).index(h)))


# --------------------------------------------------------------------------------------
# The test split
# --------------------------------------------------------------------------------------
def default_test_tsv(valid_answers):
    """testB/testB.tsv of the data root whose valid/ holds ``valid_answers``."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(valid_answers)))
    return os.path.join(root, "testB", "testB.tsv")


def candidates_of_test_split(preds, test_tsv):
    """The test split's {qid: [pid, ...]}, read from its TSV; a DataError naming the queries
    of the split that ``preds`` lacks (validation skipped or lost them)."""
    if not os.path.exists(test_tsv):
        raise DataError("%s: not found; pass --test-tsv (ENSEMBLE_TEST_TSV in the notebook), "
                        "the test split the predictions are for" % test_tsv)
    # ids only: the rows validation skipped as bad are skipped (and counted) here too
    cands = {q: [r["product_id"] for r in v["products"]]
             for q, v in read_candidates(test_tsv, skip_bad=True, with_arrays=False).items()}
    missing = sorted(set(cands) - set(preds))
    if missing:
        raise DataError("test predictions lack %d of the %d queries of %s: query ids %s%s; "
                        "submission not written" % (
                            len(missing), len(cands), test_tsv,
                            ", ".join(map(str, missing[:20])), ", ..." if len(missing) > 20 else ""))
    return cands


# --------------------------------------------------------------------------------------
# Submission, tables, plot
# --------------------------------------------------------------------------------------
def submission_rows(preds, candidates=None, queries=None):
    """{qid: {pid: score}} -> [(qid, top-5 pids)], sorted by qid, checked by the official rules.

    candidates: optional {qid: [pid or row dict, ...]} (or ``tsv.read_candidates`` output)
    that every listed product must belong to; queries: ids that must all appear (default:
    the candidates' queries).
    """
    short = sorted(q for q, s in preds.items() if len(s) < 5)
    if short:
        raise DataError("query %d has only %d candidates; a submission needs 5 distinct "
                        "products per query (%d such queries)"
                        % (short[0], len(preds[short[0]]), len(short)))
    if candidates is not None:
        candidates = {int(q): v["products"] if isinstance(v, dict) else list(v)
                      for q, v in candidates.items()}
        stray = sorted(set(preds) - set(candidates))
        if stray:
            raise DataError("query %d has predictions but no candidates" % stray[0])
        queries = candidates if queries is None else queries
    rows = [(q, rank(preds[q].items())[:5]) for q in sorted(preds)]
    check_submission(rows, candidates, queries)
    return rows


def write_submission(preds, path, candidates=None, queries=None):
    """Check the rows, then write ``submission.csv`` atomically; returns the rows."""
    rows = submission_rows(preds, candidates, queries)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with atomic_open(path, newline="") as f:
        f.write(",".join(HEADER) + "\n")
        f.writelines("%d,%s\n" % (q, ",".join(map(str, pids))) for q, pids in rows)
    return rows


def summary_table(splits, t, how):
    """splits: {name: (p1, p2, answers)} -> DataFrame of NDCG@5, rows model1/model2/blend."""
    import pandas as pd
    table = {}
    for name, (p1, p2, answers) in splits.items():
        table[name] = {"model1": score(p1, answers), "model2": score(p2, answers),
                       "blend": score(blend(p1, p2, t, how), answers)}
    df = pd.DataFrame(table).loc[["model1", "model2", "blend"]]
    df.index = ["model1", "model2", "blend (%s, t=%.4f)" % (how, t)]
    return df


def tuning_table(tuning):
    import pandas as pd
    return pd.DataFrame({h: {"t": r["t"], "valid (t tuned on it)": r["valid"],
                             "valid k-fold (honest)": r["kfold"]}
                         for h, r in tuning.items()}).T


def plot_curves(tuning, how, path=None):
    """Valid NDCG@5 against t, one line per normalisation, each chosen t marked."""
    from matplotlib.figure import Figure  # no pyplot: works headless, no global state
    fig = Figure(figsize=(7, 4.2))
    ax = fig.add_subplot()
    for h, r in tuning.items():
        ts = grid_points(len(r["curve"]))
        line, = ax.plot(ts, r["curve"], label="%s (t=%.3f, k-fold %.4f)" % (h, r["t"], r["kfold"]),
                        lw=2.5 if h == how else 1.2)
        ax.plot([r["t"]], [r["valid"]], "*" if h == how else "o", color=line.get_color(), ms=12)
    ax.axvline(tuning[how]["t"], color="grey", ls=":", lw=1)
    ax.set(xlabel="t (weight of model1)", ylabel="valid NDCG@5",
           title="blend t*model1 + (1-t)*model2; chosen: %s, t=%.3f" % (how, tuning[how]["t"]))
    ax.legend(fontsize=8)
    fig.tight_layout()
    if path:
        fig.savefig(path, dpi=110)
    return fig


# --------------------------------------------------------------------------------------
# The whole stage
# --------------------------------------------------------------------------------------
def run_ensemble(pred_dir, valid_answers, out, *, test_tsv=None, test_answers=None, grid=100,
                 hows=HOWS, how="best", k=5, seed=0):
    """Tune on valid, blend test, write submission.csv, ensemble.json, ensemble_t.png.

    test_tsv: the test split (default ``default_test_tsv(valid_answers)``); every one of its
    queries must be in the test predictions.
    """
    v1, v2 = load_pair(pred_dir, "valid")
    t1, t2 = load_pair(pred_dir, "test")
    cands = candidates_of_test_split(t1, test_tsv or default_test_tsv(valid_answers))
    answers = load_answers(valid_answers)
    tuning = tune(v1, v2, answers, hows=hows, grid=grid, k=k, seed=seed)
    how = choose_how(tuning, how)
    t = tuning[how]["t"]
    splits = {"valid": (v1, v2, answers)}
    if test_answers:  # reported only; never used to choose t or the normalisation
        splits["test"] = (t1, t2, load_answers(test_answers))
    table = summary_table(splits, t, how)  # first: a test query missing fails before writing
    write_submission(blend(t1, t2, t, how), out, candidates=cands)
    folder = os.path.dirname(os.path.abspath(out))
    png, js = os.path.join(folder, "ensemble_t.png"), os.path.join(folder, "ensemble.json")
    plot_curves(tuning, how, png)
    atomic_json({"how": how, "t": t, "grid": grid, "k": k, "seed": seed,
                 "valid_ndcg": tuning[how]["valid"], "kfold_ndcg": tuning[how]["kfold"],
                 "normalisations": {h: {x: r[x] for x in ("t", "valid", "kfold", "fold_t")}
                                    for h, r in tuning.items()},
                 "table": {c: table[c].tolist() for c in table.columns},
                 "table_rows": list(table.index), "submission": os.path.abspath(out)}, js)
    return {"how": how, "t": t, "tuning": tuning, "tuning_table": tuning_table(tuning),
            "table": table, "submission": out, "png": png, "json": js}


def rank_correlation(p1, p2):
    """Mean over queries of the Spearman correlation of two models' candidate scores."""
    out = []
    for q, s1 in p1.items():
        pids = sorted(s1)
        if len(pids) > 1:
            r1 = np.argsort(np.argsort([s1[p] for p in pids], kind="stable"), kind="stable")
            r2 = np.argsort(np.argsort([p2[q][p] for p in pids], kind="stable"), kind="stable")
            out.append(np.corrcoef(r1, r2)[0, 1])
    return float(np.mean(out))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Blend model1 and model2; write submission.csv.")
    p.add_argument("--pred-dir", default="prediction_result",
                   help="folder with {valid,test}_pred_model{1,2}.json")
    p.add_argument("--valid-answers", required=True, help="DATA/valid/valid_answer.json")
    p.add_argument("--test-tsv", help="the test split, whose every query the submission must "
                   "cover (default: testB/testB.tsv beside the valid/ of --valid-answers)")
    p.add_argument("--test-answers", help="test answers, reported only (synthetic data)")
    p.add_argument("--out", default="prediction_result/submission.csv", help="submission path")
    p.add_argument("--grid", type=int, default=100, help="t grid points over [0, 1]")
    p.add_argument("--normalisations", nargs="+", default=list(HOWS), choices=HOWS)
    p.add_argument("--how", default="best", choices=("best",) + HOWS,
                   help="normalisation to submit; best = highest k-fold estimate")
    p.add_argument("--k", type=int, default=5, help="folds of the honest estimate")
    p.add_argument("--seed", type=int, default=0, help="fold assignment seed")
    return p.parse_args(argv)


def main(argv=None):
    a = parse_args(argv)
    try:
        r = run_ensemble(a.pred_dir, a.valid_answers, a.out, test_tsv=a.test_tsv,
                         test_answers=a.test_answers, grid=a.grid, hows=a.normalisations,
                         how=a.how, k=a.k, seed=a.seed)
    except (DataError, ValueError) as e:
        sys.exit("error: %s" % e)
    print(r["tuning_table"].to_string(float_format="%.4f"))
    print(r["table"].to_string(float_format="%.4f"))
    print("chose %s, t=%.4f -> %s" % (r["how"], r["t"], r["submission"]))
    return r


if __name__ == "__main__":
    main()
