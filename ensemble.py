"""The blend of N >= 2 members: score = sum_i w_i * member_i per candidate, weights summing to 1.

The members are prediction files ``{split}_pred_<member>.json``; by default model1 and model2,
where the blend is t * model1 + (1 - t) * model2 as published. Two members: t is searched on
``np.linspace(0, 1, grid)``. Three or more: every point of the simplex whose coordinates are
multiples of ``simplex_step`` (0.05: 231 points for three members, 1771 for four). The score
is the official NDCG@5 on the validation answers (ranking ties broken by product id, as
``metric.rank`` does). Among points whose score equals the best (within 1e-12), the one
closest to equal weights wins, then the lexicographically smaller weights (two members: the
t closest to 0.5, then the smaller t). Tuning weights on the same queries they are scored on
is optimistic (the published 0.7417 was measured that way), so the k-fold estimate --
weights chosen on k-1 folds, scored on the held-out fold -- is reported beside it. Equal
weights fit nothing, so their valid score is honest as it is. ``how="best"`` picks the
normalisation by the tuned weights' k-fold estimate; with ``weighting="best"`` (not the
default) equal weights, judged by their valid score, compete too (``choose_blend``).

    python ensemble.py --pred-dir prediction_result --valid-answers DATA/valid/valid_answer.json \
        [--models model1,model2] [--weighting best|tuned|equal] [--test-tsv DATA/testB/testB.tsv] \
        [--test-answers DATA/testB/testB_answer.json] --out prediction_result/submission.csv

writes ``submission.csv``, ``ensemble.json`` (members, chosen normalisation and weights, every
score) and a plot in the folder of ``--out``: ``ensemble_t.png`` (valid NDCG@5 against t) for
two members, ``ensemble_simplex.png`` (valid NDCG@5 over the weight triangle) for three, none
for more. The three are one set, written under temporary names and renamed together; the
plot of another member count left by an earlier run is removed. The submission is written only when the test predictions cover every query of the
test split (``--test-tsv``, by default testB/testB.tsv of the data root that holds
``--valid-answers``), each with 5 of its candidates.
"""
import argparse
import functools
import itertools
import math
import os
import sys

import numpy as np

from errors import DataError
from metric import check_submission, load_answers, load_predictions, ndcg_at_k, rank
from runtime import bounded, check_writable, input_file
from tsv import read_candidates
from utils import atomic_json, atomic_open, write_together

HOWS = ("raw", "zscore", "rank")
WEIGHTINGS = ("tuned", "equal")
MODELS = ("model1", "model2")
HEADER = ["query-id", "product1", "product2", "product3", "product4", "product5"]
TIE = 1e-12  # curve values closer than this count as equal when picking weights
MAX_GRID = 20000  # simplex points searched one by one; past it, coordinate ascent
PROGRESS_AT = 10 ** 6  # (queries x points) from which scoring the grid shows a progress bar


# --------------------------------------------------------------------------------------
# The members' prediction files
# --------------------------------------------------------------------------------------
def check_aligned(p1, p2, names):
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


def check_members(preds, names=None):
    """Every member must score the same candidates of the same queries as the first.

    names: one per member, for the messages (default model1, model2, ...).
    """
    if len(preds) < 2:
        raise ValueError("a blend needs two or more members, got %d" % len(preds))
    names = names or ["model%d" % (i + 1) for i in range(len(preds))]
    for p, name in zip(preds[1:], names[1:]):
        check_aligned(preds[0], p, (names[0], name))


def load_members(pred_dir, split, models=MODELS):
    """``{split}_pred_<model>.json`` of every member from ``pred_dir``, checked aligned."""
    if len(models) < 2 or len(set(models)) != len(models):
        raise ValueError("a blend needs two or more distinct members, got %s" % list(models))
    paths = [os.path.join(pred_dir, "%s_pred_%s.json" % (split, m)) for m in models]
    preds = [load_predictions(p) for p in paths]
    check_members(preds, paths)
    return preds


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


def _stack(preds, qids, how):
    """{qid: (pids (C,) ascending, (N, C) normalised scores of the N members)} of ``qids``."""
    norm = [normalise({q: p[q] for q in qids}, how) for p in preds]
    out = {}
    for q in qids:
        pids = sorted(norm[0][q])
        out[q] = (np.array(pids, np.int64), np.array([[n[q][p] for p in pids] for n in norm]))
    return out


def _mix_scores(weights, s):
    """(W, N) weights, (N, C) scores -> (W, C) blends, members added in order (so two members
    give t * s1 + (1 - t) * s2 bit for bit, whether one blend is built or a whole grid)."""
    out = weights[:, :1] * s[0]
    for i in range(1, len(s)):
        out = out + weights[:, i:i + 1] * s[i]
    return out


def check_weights(weights, n, names=None):
    """-> (n,) float array: n weights in [0, 1] summing to 1, else a ValueError saying which
    weight (``names``: one per member) is wrong and how. NaN is refused, never read as 0."""
    w = np.asarray(weights, np.float64)
    rule = "weights are %d numbers in [0, 1] summing to 1" % n
    if w.shape != (n,):
        raise ValueError("%r: %s, one per member" % (list(weights), rule))
    names = names or ["member %d" % (i + 1) for i in range(n)]
    for name, v in zip(names, w):
        if not np.isfinite(v):
            raise ValueError("the weight of %s is %s: %s" % (name, v, rule))
        if not 0 <= v <= 1:
            raise ValueError("the weight of %s is %g, outside [0, 1]: %s" % (name, v, rule))
    if abs(w.sum() - 1.0) > 1e-9:
        raise ValueError("the weights sum to %.10g: %s" % (w.sum(), rule))
    return w


def blend_members(preds, weights, how="raw", names=None):
    """sum_i w_i * member_i per candidate, after normalising each member per query."""
    w = check_weights(weights, len(preds), names)
    check_members(preds, names)
    return {q: dict(zip(pids.tolist(), _mix_scores(w[None], s)[0].tolist()))
            for q, (pids, s) in _stack(preds, sorted(preds[0]), how).items()}


def score(preds, answers):
    """Official NDCG@5 of {qid: {pid: score}} over every query of ``answers``."""
    return ndcg_at_k({q: list(s.items()) for q, s in preds.items()}, answers)


# --------------------------------------------------------------------------------------
# Choosing the weights
# --------------------------------------------------------------------------------------
def grid_points(grid):
    if grid < 2:
        raise ValueError("the t grid needs at least 2 points, got %d" % grid)
    return np.linspace(0.0, 1.0, grid)


def simplex_points(n, step=0.05):
    """(W, n) points of the simplex whose coordinates are multiples of ``step``, in
    lexicographic order of their integer coordinates: ``simplex_size(n, step)`` of them,
    generated directly (not filtered out of the (1/step + 1)^(n-1) integer boxes)."""
    m = simplex_units(step)

    def compositions(parts, total):  # lexicographic: first coordinate slowest
        if parts == 1:
            yield (total,)
            return
        for c in range(total + 1):
            for rest in compositions(parts - 1, total - c):
                yield (c,) + rest
    return np.array(list(compositions(n, m)), np.float64) / m


def simplex_units(step):
    """1/step, checked to be a whole number m >= 1."""
    m = round(1.0 / step) if step > 0 else 0
    if m < 1 or abs(m * step - 1.0) > 1e-9:
        raise ValueError("simplex_step must be 1/m for a whole m, got %r" % step)
    return m


def simplex_size(n, step=0.05):
    """The number of points of ``simplex_points(n, step)``: C(1/step + n - 1, n - 1); at
    0.05, 231 for three members, 1771 for four, 10626 for five, 53130 for six, 888030 for
    eight."""
    return math.comb(simplex_units(step) + n - 1, n - 1)


def weight_grid(n, *, grid=100, simplex_step=0.05):
    """(W, n) candidate weights: two members -> (t, 1 - t) for t on ``grid_points(grid)``;
    three or more -> ``simplex_points(n, simplex_step)``."""
    if n < 2:
        raise ValueError("a blend needs two or more members, got %d" % n)
    if n == 2:
        ts = grid_points(grid)
        return np.stack([ts, 1.0 - ts], 1)
    return simplex_points(n, simplex_step)


def _ndcg_rows(pids, mixed, answers, k=5):
    """(C,) pids, (W, C) blends of one query -> (W,) official NDCG@k, ties by product id."""
    if not answers:
        return np.zeros(len(mixed))
    order = np.lexsort((np.broadcast_to(pids, mixed.shape), -mixed))[:, :k]
    disc = np.array([1.0 / math.log2(i + 2) for i in range(k)])
    hit = np.isin(pids[order], list(answers))
    return (hit * disc[:order.shape[1]]).sum(1) / disc[:min(len(answers), k)].sum()


def answered_stack(preds, answers, how, names=None):
    """The answered queries, each member normalised once -> (qids (Q,), [(pids (C,),
    scores (N, C), answer set)] in the order of qids)."""
    check_members(preds, names)
    qids = sorted(int(q) for q in answers)
    missing = [q for q in qids if q not in preds[0]]
    if missing:
        raise DataError("predictions have no entry for query %d of the answer file "
                        "(%d such queries)" % (missing[0], len(missing)))
    stacked = [(pids, s, answers[q]) for q, (pids, s) in _stack(preds, qids, how).items()]
    return np.array(qids, np.int64), stacked


def ndcg_matrix(stacked, points, rows=None):
    """Per-query NDCG@5 of the blend at every weight point -> (Q, W), or of the queries
    ``rows`` only; a progress bar when the grid is large (PROGRESS_AT)."""
    from tqdm import tqdm
    part = stacked if rows is None else [stacked[i] for i in rows]
    m = np.zeros((len(part), len(points)))
    bar = tqdm(part, desc="blend grid (%d points)" % len(points), leave=False,
               disable=len(part) * len(points) < PROGRESS_AT)
    for i, (pids, s, answers) in enumerate(bar):
        m[i] = _ndcg_rows(pids, _mix_scores(points, s), answers)
    return m


def ndcg_table(preds, answers, how, points, *, names=None):
    """Per-query NDCG@5 of the blend at every weight point -> (qids (Q,), matrix (Q, W))."""
    qids, stacked = answered_stack(preds, answers, how, names)
    return qids, ndcg_matrix(stacked, points)


def pick_weights(points, curve):
    """Index of the best curve value; ties -> the point closest to equal weights, then the
    lexicographically smaller weights."""
    best = np.flatnonzero(curve >= curve.max() - TIE)
    # rounded: 1/3 and 2/3 must count as equally far from 0.5 despite float error
    dist = np.round(np.linalg.norm(points - 1.0 / points.shape[1], axis=1), 9)
    return int(min(best, key=lambda j: (dist[j], tuple(points[j]))))


def coordinate_ascent(score, n, step):
    """Weights chosen by coordinate ascent on the simplex, for more members than the grid
    takes (MAX_GRID): from equal weights, every move of ``step`` (or all there is) of
    weight from one member to another is scored by ``score`` ((W, n) points -> (W,)), and
    the best (ties as ``pick_weights``) taken while it gains more than TIE -> (n,) weights."""
    w = np.full(n, 1.0 / n)
    best = score(w[None])[0]
    while True:
        moves = []
        for i, j in itertools.permutations(range(n), 2):
            if w[j] > 0:
                v = w.copy()
                v[i], v[j] = v[i] + min(step, w[j]), v[j] - min(step, w[j])
                moves.append(v)
        moves = np.array(moves)
        got = score(moves)
        j = pick_weights(moves, got)
        if got[j] <= best + TIE:
            return w
        w, best = moves[j], got[j]


def _kfold(n_rows, k, seed, fit):
    """Out-of-fold NDCG@5 and the weights chosen for each fold: ``fit(train rows)`` ->
    (weights, per-query NDCG@5 (Q,) at them)."""
    if not 2 <= k <= n_rows:
        raise DataError("k-fold needs 2 <= k <= number of answered queries (%d), got k=%d"
                        % (n_rows, k))
    folds = np.array_split(np.random.default_rng(seed).permutation(n_rows), k)
    held, chosen = np.zeros(n_rows), []
    for f in folds:
        weights, per_query = fit(np.setdiff1d(np.arange(n_rows), f))
        held[f] = per_query[f]
        chosen.append(list(weights))
    return float(held.mean()), chosen


def _tune_grid(stacked, points, k, seed):
    """Every point of ``points`` scored -> (weights, valid, k-fold, fold weights, curve)."""
    m = ndcg_matrix(stacked, points)
    curve = m.mean(0)

    def fit(train):
        j = pick_weights(points, m[train].mean(0))
        return points[j].tolist(), m[:, j]
    est, fold_w = _kfold(len(m), k, seed, fit)
    j = pick_weights(points, curve)
    return points[j].tolist(), float(curve[j]), est, fold_w, curve


def _tune_coordinates(stacked, n, step, k, seed):
    """``coordinate_ascent`` on all queries and on each fold -> as ``_tune_grid``, the curve
    being the chosen weights' score alone."""
    def fit(train=None):
        w = coordinate_ascent(lambda p: ndcg_matrix(stacked, p, train).mean(0), n, step)
        return w.tolist(), ndcg_matrix(stacked, w[None])[:, 0]
    est, fold_w = _kfold(len(stacked), k, seed, fit)
    weights, per_query = fit()
    return weights, float(per_query.mean()), est, fold_w, np.array([per_query.mean()])


def tune_members(preds, answers, *, names=None, hows=HOWS, grid=100, simplex_step=0.05, k=5,
                 seed=0):
    """Per normalisation: weights tuned on all of valid, their (optimistic) score, the k-fold
    estimate, and the score of equal weights (nothing fitted, so it needs no k-fold). The
    weights are searched on ``weight_grid`` up to MAX_GRID points, by ``coordinate_ascent``
    beyond (``simplex_step`` its step).

    -> {how: {"weights", "valid", "kfold", "fold_weights", "equal", "curve" (W,),
    "points" (W, N)}}, plus "t" and "fold_t" (the weight of the first member) for two members.
    """
    n = len(preds)
    grid_search = n == 2 or simplex_size(n, simplex_step) <= MAX_GRID
    points = weight_grid(n, grid=grid, simplex_step=simplex_step) if grid_search else None
    equal = np.full((1, n), 1.0 / n)
    out = {}
    for how in hows:
        _, stacked = answered_stack(preds, answers, how, names)
        equal_score = float(ndcg_matrix(stacked, equal).mean())
        if grid_search:
            weights, valid, est, fold_w, curve = _tune_grid(stacked, points, k, seed)
        else:
            weights, valid, est, fold_w, curve = _tune_coordinates(stacked, n, simplex_step,
                                                                   k, seed)
        out[how] = {"weights": weights, "valid": valid, "kfold": est, "fold_weights": fold_w,
                    "equal": equal_score, "curve": curve,
                    "points": points if grid_search else np.array([weights])}
        if n == 2:
            out[how].update(t=float(weights[0]), fold_t=[w[0] for w in fold_w])
    return out


def honest_score(result, weighting):
    """A normalisation's score on queries its weights were not fitted to: the tuned weights'
    k-fold estimate, or equal weights' valid score."""
    return result["kfold" if weighting == "tuned" else "equal"]


def choose_blend(tuning, how="best", weighting="best"):
    """-> (normalisation, weighting, weights). Tuned weights are judged by their k-fold
    estimate, equal weights by their valid score: both are scores on queries the weights were
    not fitted to. ``"best"`` takes the highest of the candidates (the first listed on ties:
    normalisations in order, tuned before equal)."""
    if how != "best" and how not in tuning:
        raise ValueError("normalisation %r was not tuned (have %s)" % (how, list(tuning)))
    if weighting != "best" and weighting not in WEIGHTINGS:
        raise ValueError("weighting must be best or one of %s, got %r" % (WEIGHTINGS, weighting))
    cands = [(h, w) for h in (tuning if how == "best" else [how])
             for w in (WEIGHTINGS if weighting == "best" else [weighting])]
    h, w = max(cands, key=lambda c: (honest_score(tuning[c[0]], c[1]), -cands.index(c)))
    n = len(tuning[h]["weights"])
    return h, w, tuning[h]["weights"] if w == "tuned" else [1.0 / n] * n


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


def write_rows(rows, path):
    """Checked submission rows -> ``path``, a CSV under ``HEADER``, atomically."""
    with atomic_open(path, newline="") as f:
        f.write(",".join(HEADER) + "\n")
        f.writelines("%d,%s\n" % (q, ",".join(map(str, pids))) for q, pids in rows)


def write_submission(preds, path, candidates=None, queries=None):
    """Check the rows, then write ``submission.csv`` atomically; returns the rows."""
    rows = submission_rows(preds, candidates, queries)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    write_rows(rows, path)
    return rows


def describe(how, weights, names):
    """"raw, t = 0.6869" for two members; "rank, a 0.20 + b 0.35 + c 0.45" for more."""
    if len(weights) == 2:
        return "%s, t = %.4f" % (how, weights[0])
    return "%s, %s" % (how, " + ".join("%s %.2f" % (n, w) for n, w in zip(names, weights)))


def summary_table(splits, weights, how, names=MODELS):
    """splits: {name: (member predictions, answers)} -> DataFrame of NDCG@5, a row per member
    and one for the blend."""
    import pandas as pd
    label = "blend (%s)" % describe(how, weights, names).replace(" = ", "=")
    table = {}
    for split, (preds, answers) in splits.items():
        table[split] = {n: score(p, answers) for n, p in zip(names, preds)}
        table[split][label] = score(blend_members(preds, weights, how, names), answers)
    return pd.DataFrame(table).loc[[*names, label]]


def tuning_table(tuning, names=MODELS):
    """One row per normalisation: t (two members) or each member's weight, both scores."""
    import pandas as pd
    rows = {}
    for h, r in tuning.items():
        head = {"t": r["t"]} if "t" in r else {"w " + n: w for n, w in zip(names, r["weights"])}
        rows[h] = {**head, "valid (%s tuned on it)" % ("t" if "t" in r else "weights"): r["valid"],
                   "valid k-fold (honest)": r["kfold"], "valid, equal weights": r["equal"]}
    return pd.DataFrame(rows).T


def plot_curves(tuning, how, weights, *, path=None, names=MODELS):
    """Two members: valid NDCG@5 against t, one line per normalisation, each tuned t marked
    (o) and the submitted one (the line of ``how`` at ``weights``, *)."""
    from matplotlib.figure import Figure  # no pyplot: works headless, no global state
    fig = Figure(figsize=(7, 4.2))
    ax = fig.add_subplot()
    for h, r in tuning.items():
        ts = grid_points(len(r["curve"]))
        line, = ax.plot(ts, r["curve"], label="%s (t=%.3f, k-fold %.4f)" % (h, r["t"], r["kfold"]),
                        lw=2.5 if h == how else 1.2)
        ax.plot([r["t"]], [r["valid"]], "o", color=line.get_color(), ms=8)
        if h == how:  # the tuned t, or equal weights (0.5, maybe between grid points)
            ax.plot([weights[0]], [r["valid"] if weights[0] == r["t"] else r["equal"]], "*",
                    color=line.get_color(), ms=14)
    ax.axvline(weights[0], color="grey", ls=":", lw=1)
    ax.set(xlabel="t (weight of %s)" % names[0], ylabel="valid NDCG@5",
           title="blend t*%s + (1-t)*%s; chosen: %s, t=%.3f" % (*names, how, weights[0]))
    ax.legend(fontsize=8)
    fig.tight_layout()
    if path:
        fig.savefig(path, dpi=110, format="png")
    return fig


def plot_simplex(tuning, how, weights, *, names, path=None):
    """Three members: valid NDCG@5 over the weight triangle (barycentric coordinates; a corner
    is one member alone), one panel per normalisation, each tuned point marked (o) and the
    submitted one (``weights`` in the panel of ``how``, *)."""
    from matplotlib.figure import Figure
    corners = np.array([[0.0, 0.0], [1.0, 0.0], [0.5, math.sqrt(3) / 2]])
    fig = Figure(figsize=(4.6 * len(tuning), 4.4))
    for ax, (h, r) in zip(fig.subplots(1, len(tuning), squeeze=False)[0], tuning.items()):
        xy = r["points"] @ corners
        im = ax.tripcolor(xy[:, 0], xy[:, 1], r["curve"], shading="gouraud", cmap="viridis")
        ax.plot(*(np.array(r["weights"]) @ corners), "o", color="red", ms=9, mec="white")
        if h == how:
            ax.plot(*(np.array(weights) @ corners), "*", color="red", ms=16, mec="white")
        for (x, y), n in zip(corners, names):
            ax.annotate(n, (x, y), ha="center", va="top" if y == 0 else "bottom", fontsize=9,
                        xytext=(0, -4 if y == 0 else 4), textcoords="offset points")
        ax.set_title("%s%s: %.4f, k-fold %.4f" % (h, " (submitted)" if h == how else "",
                                                   r["valid"], r["kfold"]), pad=18)
        ax.set_aspect("equal")
        ax.set_axis_off()
        fig.colorbar(im, ax=ax, shrink=0.6, label="valid NDCG@5")
    fig.suptitle("blend weights; chosen: %s" % describe(how, weights, names))
    if path:
        fig.savefig(path, dpi=110, bbox_inches="tight", format="png")
    return fig


PLOTS = {2: "ensemble_t.png", 3: "ensemble_simplex.png"}  # members -> plot (more: none)


def plot_blend(tuning, how, weights, *, names, path):
    """The t curve (two members) or the weight triangle (three) to ``path``, the submitted
    ``weights`` marked."""
    if len(names) == 2:
        plot_curves(tuning, how, weights, path=path, names=names)
    else:
        plot_simplex(tuning, how, weights, names=names, path=path)


# --------------------------------------------------------------------------------------
# The whole stage
# --------------------------------------------------------------------------------------
def check_inputs(pred_dir, models, *, valid_answers, test_answers, out):
    """What the blend can check before it reads or tunes anything: every prediction file
    and answer file there, the submission's folder writable. A missing file is named by
    the flag that gives it."""
    for split in ("valid", "test"):
        for m in models:
            input_file(os.path.join(pred_dir, "%s_pred_%s.json" % (split, m)),
                       "the prediction file of member %s: run its validation.py" % m)
    input_file(valid_answers, "expected the --valid-answers file")
    if test_answers:
        input_file(test_answers, "expected the --test-answers file")
    if os.path.isdir(out):
        raise DataError("--out %s: a folder; give the submission file to write" % out)
    check_writable(os.path.dirname(os.path.abspath(out)))


def run_ensemble(pred_dir, valid_answers, out, *, models=MODELS, test_tsv=None,
                 test_answers=None, grid=100, simplex_step=0.05, hows=HOWS, how="best",
                 weighting="tuned", k=5, seed=0):
    """Tune on valid, blend test, write submission.csv, ensemble.json and the plot.
    ``how`` and ``weighting`` as ``choose_blend`` takes them.

    models: the members, ``{split}_pred_<model>.json`` in ``pred_dir``. test_tsv: the test
    split (default ``default_test_tsv(valid_answers)``); every one of its queries must be in
    the test predictions.
    """
    models = [m.strip() for m in models if m.strip()]  # "model1, model2" from a command line
    check_inputs(pred_dir, models, valid_answers=valid_answers, test_answers=test_answers,
                 out=out)
    valid, test = load_members(pred_dir, "valid", models), load_members(pred_dir, "test", models)
    cands = candidates_of_test_split(test[0], test_tsv or default_test_tsv(valid_answers))
    answers = load_answers(valid_answers)
    tuning = tune_members(valid, answers, names=models, hows=hows, grid=grid,
                          simplex_step=simplex_step, k=k, seed=seed)
    how, weighting, weights = choose_blend(tuning, how, weighting)
    splits = {"valid": (valid, answers)}
    if test_answers:  # reported only; never used to choose weights or the normalisation
        splits["test"] = (test, load_answers(test_answers))
    table = summary_table(splits, weights, how, models)  # first: a missing test query fails
    rows = submission_rows(blend_members(test, weights, how, models), candidates=cands)
    folder = os.path.dirname(os.path.abspath(out))
    estimate = honest_score(tuning[how], weighting)
    report = {"how": how, "weighting": weighting, "models": models,
              "weights": dict(zip(models, weights)),
              **({"t": weights[0]} if len(models) == 2 else {}),
              "grid": grid, "simplex_step": simplex_step, "k": k, "seed": seed,
              "valid_ndcg": tuning[how]["valid" if weighting == "tuned" else "equal"],
              "estimate": estimate,
              "normalisations": {h: {x: v for x, v in r.items() if x not in ("curve", "points")}
                                 for h, r in tuning.items()},
              "table": {c: table[c].tolist() for c in table.columns},
              "table_rows": list(table.index), "submission": os.path.abspath(out)}
    # one set, written together: never a new submission beside an earlier blend's record,
    # nor the plot of an earlier member count beside this blend
    writers = {os.path.basename(out): functools.partial(write_rows, rows),
               "ensemble.json": functools.partial(atomic_json, report)}
    plot = PLOTS.get(len(models))
    if plot:
        writers[plot] = lambda path: plot_blend(tuning, how, weights, names=models, path=path)
    write_together(folder, writers, remove=list(PLOTS.values()))
    png, js = os.path.join(folder, plot) if plot else None, os.path.join(folder, "ensemble.json")
    return {"how": how, "weighting": weighting, "models": models, "weights": weights,
            "estimate": estimate, "tuning": tuning,
            "tuning_table": tuning_table(tuning, models), "table": table, "submission": out,
            "png": png, "json": js}


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


def simplex_step_arg(text):
    """argparse type of --simplex-step: 1/m for a whole m >= 1."""
    step = bounded(float, low=0, above=True, high=1, why="1/m for a whole m")(text)
    try:
        simplex_units(step)
    except ValueError:
        raise argparse.ArgumentTypeError("must be 1/m for a whole m (0.05, 0.1, 0.25, ...), "
                                         "got %s" % text) from None
    return step


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Blend two or more models; write submission.csv.")
    p.add_argument("--pred-dir", default="prediction_result",
                   help="folder with {valid,test}_pred_<model>.json of every member")
    p.add_argument("--models", default=",".join(MODELS),
                   help="comma-separated members, e.g. multilabel,model1,model2")
    p.add_argument("--valid-answers", required=True, help="DATA/valid/valid_answer.json")
    p.add_argument("--test-tsv", help="the test split, whose every query the submission must "
                   "cover (default: testB/testB.tsv beside the valid/ of --valid-answers)")
    p.add_argument("--test-answers", help="test answers, reported only (synthetic data)")
    p.add_argument("--out", default="prediction_result/submission.csv", help="submission path")
    p.add_argument("--grid", type=bounded(low=2, why="the t grid's points, both ends "
                                                  "included"),
                   default=100, help="t grid points over [0, 1] (2 members)")
    p.add_argument("--simplex-step", type=simplex_step_arg, default=0.05,
                   help="weight step on the simplex (3 or more members)")
    p.add_argument("--normalisations", nargs="+", default=list(HOWS), choices=HOWS)
    p.add_argument("--how", default="best", choices=("best",) + HOWS,
                   help="normalisation to submit; best: see --weighting")
    p.add_argument("--weighting", default="tuned", choices=("best",) + WEIGHTINGS,
                   help="tuned: the weights best on valid (default); equal: 1/N each; best: "
                        "the higher of the tuned weights' k-fold estimate and equal weights' "
                        "valid score")
    p.add_argument("--k", type=bounded(low=2, why="the folds of the k-fold estimate"),
                   default=5, help="folds of the honest estimate")
    p.add_argument("--seed", type=int, default=0, help="fold assignment seed")
    return p.parse_args(argv)


def main(argv=None):
    a = parse_args(argv)
    try:
        r = run_ensemble(a.pred_dir, a.valid_answers, a.out, models=a.models.split(","),
                         test_tsv=a.test_tsv, test_answers=a.test_answers, grid=a.grid,
                         simplex_step=a.simplex_step, hows=a.normalisations, how=a.how,
                         weighting=a.weighting, k=a.k, seed=a.seed)
    except (DataError, ValueError) as e:
        sys.exit("error: %s" % e)
    print(r["tuning_table"].to_string(float_format="%.4f"))
    print(r["table"].to_string(float_format="%.4f"))
    print("chose %s -> %s" % (describe(r["how"], r["weights"], r["models"]), r["submission"]))
    return r


if __name__ == "__main__":
    main()
