"""The blend: normalisations, the t search, the k-fold estimate, submission rules, the notebook."""
import csv
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest

import ensemble
from ensemble import normalise, write_submission
from metric import load_predictions, ndcg_at_k, rank
from rows import make_row, write_tsv
from tsv import DataError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MISS = 1 / math.log2(3)  # NDCG@5 of a single answer ranked second


def blend(p1, p2, t, how="raw"):
    """t * model1 + (1 - t) * model2 per candidate: the published two-model blend."""
    return ensemble.blend_members([p1, p2], [t, 1.0 - t], how)


def tune(p1, p2, answers, **kw):
    """``ensemble.tune_members`` of two models, whose "t" is model1's weight."""
    return ensemble.tune_members([p1, p2], answers, **kw)


def search_t(p1, p2, answers, how="raw", grid=100):
    """-> (t tuned on all of ``answers``, curve (grid,)): what ``tune`` reports as "t"."""
    points = ensemble.weight_grid(2, grid=grid)
    curve = ensemble.ndcg_table([p1, p2], answers, how, points)[1].mean(0)
    return float(points[ensemble.pick_weights(points, curve), 0]), curve


def kfold_estimate(p1, p2, answers, how="raw", k=5, seed=0, grid=100):
    return tune(p1, p2, answers, hows=(how,), grid=grid, k=k, seed=seed)[how]["kfold"]


def dump(preds, path):
    """{qid: {pid: score}} -> the model prediction-file format, sorted by score."""
    with open(path, "w") as f:
        json.dump({str(q): [[str(p), s] for p, s in sorted(sc.items(), key=lambda x: -x[1])]
                   for q, sc in preds.items()}, f)
    return str(path)


def random_world(n_queries=40, n_cands=12, n_pos=3, seed=0, first_qid=1000):
    """model1 sees the answers of even queries, model2 those of odd ones; model2 on a 5x scale."""
    rng = np.random.default_rng(seed)
    p1, p2, answers = {}, {}, {}
    for i in range(n_queries):
        q = first_qid + i
        pids = [103_000_000 + 100 * q + j for j in range(n_cands)]
        pos = set(rng.choice(pids, n_pos, replace=False).tolist())
        good = np.array([p in pos for p in pids], float)
        s1 = rng.normal(0, 1, n_cands) + good * (2.0 if i % 2 == 0 else 0.3)
        s2 = 5 * (rng.normal(0, 1, n_cands) + good * (0.3 if i % 2 == 0 else 2.0))
        p1[q] = dict(zip(pids, s1.round(3).tolist()))
        p2[q] = dict(zip(pids, s2.round(2).tolist()))
        answers[q] = pos
    return p1, p2, answers


def windows_case(windows):
    """Query i is answered right only when t lies inside windows[i]; outside its answer is 2nd.

    The answer scores (1, 1) -> 1 at any t; a decoy (1/hi, 0) -> t/hi beats it above hi and a
    decoy (0, 1/(1-lo)) -> (1-t)/(1-lo) beats it below lo.
    """
    p1, p2, answers = {}, {}, {}
    for q, (lo, hi) in enumerate(windows):
        a, d1, d2 = 10 * q + 1, 10 * q + 2, 10 * q + 3
        p1[q] = {a: 1.0, d1: 1 / hi, d2: 0.0}
        p2[q] = {a: 1.0, d1: 0.0, d2: 1 / (1 - lo)}
        answers[q] = {a}
    return p1, p2, answers


# ---------------------------------------------------------------------------------------
# Normalisation and blend
# ---------------------------------------------------------------------------------------
def test_normalise_hand_numbers():
    p = {7: {1: 1.0, 2: 2.0, 3: 3.0}, 8: {4: 5.0, 5: 5.0, 6: 5.0}, 9: {10: 0.25}}
    assert normalise(p, "raw") == p
    z = normalise(p, "zscore")
    s = math.sqrt(2 / 3)
    assert z[7] == pytest.approx({1: -1 / s, 2: 0.0, 3: 1 / s})
    assert z[8] == {4: 0.0, 5: 0.0, 6: 0.0} and z[9] == {10: 0.0}  # no spread, no noise
    r = normalise({1: {10: 0.3, 11: 0.9, 12: 0.3, 13: 0.5}, 2: {5: -1.0}}, "rank")
    assert r[1] == pytest.approx({10: 1 / 6, 11: 1.0, 12: 1 / 6, 13: 2 / 3})  # ties averaged
    assert r[2] == {5: 0.5}
    with pytest.raises(ValueError, match="normalisation"):
        normalise(p, "minmax")


def test_zscore_survives_rounding_of_constant_scores():
    # mean of 30 x 0.1 is not exactly 0.1; without the guard this becomes random order
    z = normalise({1: {p: 0.1 for p in range(30)}}, "zscore")
    assert set(z[1].values()) == {0.0}


@pytest.mark.parametrize("how", ensemble.HOWS)
def test_blend_ends_are_the_single_models(how):
    p1, p2, _ = random_world(n_queries=8, seed=1)
    for q in p2:  # ties inside a model: its own ranking breaks them by product id
        p2[q] = {p: round(s / 10) for p, s in p2[q].items()}
    b0, b1 = blend(p1, p2, 0.0, how), blend(p1, p2, 1.0, how)
    for q in p1:
        assert rank(b0[q].items()) == rank(p2[q].items())
        assert rank(b1[q].items()) == rank(p1[q].items())
    if how == "raw":
        assert b0 == {q: {p: float(s) for p, s in sc.items()} for q, sc in p2.items()}
    mid = blend({1: {1: 1.0, 2: 3.0}}, {1: {1: 5.0, 2: 1.0}}, 0.25, "raw")
    assert mid == {1: {1: pytest.approx(4.0), 2: pytest.approx(1.5)}}
    with pytest.raises(ValueError, match=r"in \[0, 1\] summing to 1"):
        blend(p1, p2, 1.5)


# ---------------------------------------------------------------------------------------
# Choosing t
# ---------------------------------------------------------------------------------------
def test_search_t_finds_the_window_where_both_models_are_right():
    # query 0: only model1 ranks its answer first, needs t > 0.55; query 1: model2, t < 0.85
    p1 = {0: {1: 1.0, 2: 0.0}, 1: {3: 0.0, 4: 0.15 / 0.85}}
    p2 = {0: {1: 0.0, 2: 0.55 / 0.45}, 1: {3: 1.0, 4: 0.0}}
    answers = {0: {1}, 1: {3}}
    t, curve = search_t(p1, p2, answers, "raw", grid=11)
    ts = np.linspace(0, 1, 11)
    assert curve == pytest.approx(np.where((ts > 0.55) & (ts < 0.85), 1.0, (1 + MISS) / 2))
    assert t == pytest.approx(0.6)  # 0.6, 0.7, 0.8 tie; the closest to 0.5 wins
    t100, _ = search_t(p1, p2, answers, "raw", grid=100)
    assert t100 == pytest.approx(55 / 99)  # first grid point inside (0.55, 0.85)


def test_search_t_tie_break_is_closest_to_half_then_smaller():
    # every t gives the same ranking: the flat curve must return the point nearest 0.5
    p1 = p2 = {0: {1: 2.0, 2: 1.0}}
    assert search_t(p1, p2, {0: {1}}, grid=11)[0] == pytest.approx(0.5)
    assert search_t(p1, p2, {0: {1}}, grid=4)[0] == pytest.approx(1 / 3)


@pytest.mark.parametrize("how", ensemble.HOWS)
def test_curve_is_the_official_ndcg_of_the_blend(how):
    p1, p2, answers = random_world(n_queries=12, seed=2)
    t, curve = search_t(p1, p2, answers, how, grid=9)
    for ti, c in zip(np.linspace(0, 1, 9), curve):
        b = blend(p1, p2, ti, how)
        assert c == pytest.approx(ndcg_at_k({q: list(s.items()) for q, s in b.items()}, answers))
    assert curve.max() == pytest.approx(ensemble.score(blend(p1, p2, t, how), answers))
    # each model knows half the answers: the blend beats both
    assert curve.max() > max(curve[0], curve[-1]) + 0.05


def test_kfold_is_honest_where_tuning_on_valid_is_not():
    # ten disjoint windows: tuning on all queries fits one of them; a held-out query never
    # sees its own window chosen, so its score is that of the answer ranked second
    p1, p2, answers = windows_case([(0.1 * i + 0.02, 0.1 * i + 0.08) for i in range(10)])
    t, curve = search_t(p1, p2, answers, grid=100)
    assert curve.max() == pytest.approx((1 + 9 * MISS) / 10)
    for k in (2, 5, 10):
        assert kfold_estimate(p1, p2, answers, k=k, grid=100) == pytest.approx(MISS)


def test_kfold_equals_valid_when_every_fold_agrees():
    # every query is right for t in (0.3, 0.7): any training fold picks a t inside
    p1, p2, answers = windows_case([(0.3, 0.7)] * 6 + [(0.2, 0.9)] * 6)
    assert search_t(p1, p2, answers)[1].max() == pytest.approx(1.0)
    assert kfold_estimate(p1, p2, answers, k=4, seed=3) == pytest.approx(1.0)
    with pytest.raises(DataError, match="k-fold"):
        kfold_estimate(p1, p2, answers, k=13)


def test_kfold_is_deterministic_and_below_the_tuned_score():
    p1, p2, answers = random_world(n_queries=30, seed=4)
    est = [kfold_estimate(p1, p2, answers, "zscore", k=5, seed=s) for s in (0, 0, 1)]
    assert est[0] == est[1]
    best = search_t(p1, p2, answers, "zscore")[1].max()
    assert max(est) <= best + 1e-12


def test_choose_blend_by_scores_on_unfitted_queries():
    """Tuned weights count by their k-fold estimate, equal weights by their valid score."""
    w = [0.7, 0.3]
    tuning = {"raw": {"kfold": 0.6, "equal": 0.5, "weights": w},
              "zscore": {"kfold": 0.7, "equal": 0.65, "weights": w},
              "rank": {"kfold": 0.7, "equal": 0.72, "weights": w}}
    choose = ensemble.choose_blend
    assert choose(tuning, weighting="tuned") == ("zscore", "tuned", w)  # first among equals
    assert choose(tuning) == ("rank", "equal", [0.5, 0.5])
    assert choose(tuning, "zscore") == ("zscore", "tuned", w)
    assert choose(tuning, "raw", "equal") == ("raw", "equal", [0.5, 0.5])
    tuning["rank"]["equal"] = 0.7  # a tie: tuned first
    assert choose(tuning, "rank") == ("rank", "tuned", w)
    with pytest.raises(ValueError, match="not tuned"):
        choose({"raw": tuning["raw"]}, "rank")
    with pytest.raises(ValueError, match="weighting"):
        choose(tuning, weighting="learned")


def test_a_member_that_knows_nothing_keeps_the_tuned_weights():
    """Beside a member that knows nothing, tuned weights leave it out and equal weights do
    not: tuned wins. Two members alike: every weight scores the same, and tuned wins the
    tie."""
    p1, _, answers = random_world(n_queries=30, seed=7)
    perfect = {q: {p: float(p in answers[q]) for p in sc} for q, sc in p1.items()}
    tuning = ensemble.tune_members([perfect, noisy_member(p1, 1)], answers, hows=("raw",),
                                   grid=11)
    assert tuning["raw"]["equal"] < 0.9 < 0.99 < tuning["raw"]["kfold"]
    assert ensemble.choose_blend(tuning)[1] == "tuned"
    tuning = ensemble.tune_members([perfect, perfect], answers, hows=("raw",), grid=11)
    assert tuning["raw"]["equal"] == tuning["raw"]["kfold"] == 1.0
    assert ensemble.choose_blend(tuning) == ("raw", "tuned", tuning["raw"]["weights"])


# ---------------------------------------------------------------------------------------
# Three or more members
# ---------------------------------------------------------------------------------------
def noisy_member(p, seed):
    """Scores of the candidates of ``p`` that know nothing about the answers."""
    rng = np.random.default_rng(seed)
    return {q: {c: float(x) for c, x in zip(sc, rng.normal(0, 1, len(sc)))} for q, sc in p.items()}


def caps_case(caps):
    """Query i is answered right only while member i's weight stays at or below caps[i].

    The answer scores 1 in every member -> 1 at any weights; the decoy scores 1/caps[i] in
    member i alone -> w_i / caps[i], above the answer once w_i > caps[i].
    """
    preds, answers = [{} for _ in caps], {}
    for q, cap in enumerate(caps):
        for i, p in enumerate(preds):
            p[q] = {10 * q + 1: 1.0, 10 * q + 2: 1 / cap if i == q else 0.0}
        answers[q] = {10 * q + 1}
    return preds, answers


def test_weight_grid_counts_and_sums():
    assert ensemble.weight_grid(2, grid=11) == pytest.approx(
        np.stack([np.linspace(0, 1, 11), 1 - np.linspace(0, 1, 11)], 1))
    for n, step, count in ((3, 0.05, 231), (3, 0.1, 66), (4, 0.05, 1771), (5, 0.25, 70)):
        w = ensemble.weight_grid(n, simplex_step=step)
        assert w.shape == (count, n) and len(np.unique(w, axis=0)) == count
        assert w.sum(1) == pytest.approx(np.ones(count)) and w.min() == 0 and w.max() == 1
        assert np.allclose(w / step, np.round(w / step))
    for bad in ({"n": 1}, {"n": 3, "simplex_step": 0.3}):
        with pytest.raises(ValueError):
            ensemble.weight_grid(**bad)


def test_three_members_only_a_mix_ranks_every_query_right():
    # caps 0.52, 0.32, 0.22: on the 0.05 grid only (0.5, 0.3, 0.2) keeps all three answers first
    preds, answers = caps_case([0.52, 0.32, 0.22])
    r = ensemble.tune_members(preds, answers, hows=("raw",), k=3)["raw"]
    assert r["weights"] == pytest.approx([0.5, 0.3, 0.2]) and r["valid"] == 1.0
    assert r["curve"].shape == (231,) and np.sum(r["curve"] == 1.0) == 1
    # a held-out query has no cap on its own member, so its fold puts more weight there
    assert r["kfold"] < 1.0 and len(r["fold_weights"]) == 3
    assert all(sum(w) == pytest.approx(1.0) for w in r["fold_weights"]) and "t" not in r
    assert ensemble.score(ensemble.blend_members(preds, r["weights"]), answers) == 1.0


@pytest.mark.parametrize("how", ensemble.HOWS)
def test_weight_goes_to_the_one_member_that_knows(how):
    p1, _, answers = random_world(n_queries=30, seed=7)
    perfect = {q: {p: float(p in answers[q]) for p in sc} for q, sc in p1.items()}
    preds = [noisy_member(p1, 1), perfect, noisy_member(p1, 2)]
    r = ensemble.tune_members(preds, answers, hows=(how,))[how]
    # the point nearest equal weights that is perfect on a fold can slip on the held-out one
    assert r["valid"] == 1.0 and 0.99 < r["kfold"] <= 1.0
    assert r["weights"][1] >= 0.5 and sum(r["weights"]) == pytest.approx(1.0)
    ends = [ensemble.score(ensemble.normalise(p, how), answers) for p in preds]
    assert ends[1] == 1.0 and max(ends[0], ends[2]) < 0.7


def test_simplex_tie_rule_prefers_equal_weights_then_lexicographic():
    p1, _, answers = random_world(n_queries=6, seed=8)
    r = ensemble.tune_members([p1, p1, p1], answers, hows=("raw",), k=2)["raw"]
    assert len(set(r["curve"])) == 1  # every point ranks alike
    assert r["weights"] == pytest.approx([0.3, 0.35, 0.35])  # of the 3 nearest (1/3, 1/3, 1/3)


@pytest.mark.parametrize("how", ensemble.HOWS)
def test_two_members_report_t_as_model1s_weight(how):
    p1, p2, answers = random_world(n_queries=20, seed=9)
    r = tune(p1, p2, answers, hows=(how,), grid=21)[how]
    assert r["weights"] == [r["t"], 1.0 - r["t"]]
    assert r["fold_t"] == [w[0] for w in r["fold_weights"]]
    raw = blend(p1, p2, 0.3, "raw")  # t * s1 + (1 - t) * s2, bit for bit
    assert raw == {q: {p: 0.3 * s + 0.7 * p2[q][p] for p, s in p1[q].items()} for q in p1}
    with pytest.raises(ValueError, match="summing to 1"):
        ensemble.blend_members([p1, p2, p2], [0.5, 0.5, 0.5])
    with pytest.raises(ValueError, match="two or more"):
        ensemble.blend_members([p1], [1.0])


def test_members_must_align_naming_the_file(tmp_path):
    p1, p2, _ = random_world(n_queries=4)
    p3 = noisy_member(p1, 3)
    q = sorted(p3)[1]
    for split in ("valid", "test"):
        for name, p in (("model1", p1), ("model2", p2), ("model3", p3)):
            dump(p, tmp_path / ("%s_pred_%s.json" % (split, name)))
    assert len(ensemble.load_members(str(tmp_path), "valid", ["model1", "model2", "model3"])) == 3
    del p3[q]
    dump(p3, tmp_path / "valid_pred_model3.json")
    with pytest.raises(DataError, match=r"query %d is in \S*valid_pred_model1\.json's predictions "
                       r"but not in \S*valid_pred_model3\.json's" % q):
        ensemble.load_members(str(tmp_path), "valid", ["model1", "model2", "model3"])
    p3[q] = dict(list(p1[q].items())[1:])
    dump(p3, tmp_path / "test_pred_model3.json")
    with pytest.raises(DataError, match=r"query %d: \S*test_pred_model1\.json and "
                       r"\S*test_pred_model3\.json score different candidates" % q):
        ensemble.load_members(str(tmp_path), "test", ["model1", "model2", "model3"])
    with pytest.raises(ValueError, match="distinct"):
        ensemble.load_members(str(tmp_path), "test", ["model1", "model1"])


def test_plots_write_a_png(tmp_path):
    p1, p2, answers = random_world(n_queries=10, seed=10)
    names = ["a", "b", "c"]
    tuning = ensemble.tune_members([p1, p2, noisy_member(p1, 4)], answers, simplex_step=0.1)
    path = str(tmp_path / "plot.new")  # a temporary name: PNG whatever the name says
    ensemble.plot_blend(tuning, "rank", [0.2, 0.3, 0.5], names=names, path=path)
    with open(path, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n" and os.path.getsize(path) > 1000
    tuning = tune(p1, p2, answers, grid=11)
    ensemble.plot_blend(tuning, "raw", [0.5, 0.5], names=["a", "b"], path=path)
    with open(path, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n" and os.path.getsize(path) > 1000
    assert ensemble.PLOTS == {2: "ensemble_t.png", 3: "ensemble_simplex.png"}  # 4+: none


# ---------------------------------------------------------------------------------------
# Loading and submission
# ---------------------------------------------------------------------------------------
def test_load_predictions_round_trip_and_errors(tmp_path):
    p1, _, _ = random_world(n_queries=3)
    assert load_predictions(dump(p1, tmp_path / "a.json")) == p1
    with pytest.raises(DataError, match="not found"):
        load_predictions(str(tmp_path / "missing.json"))
    bad = tmp_path / "bad.json"
    for text, msg in [('{"1": [["5", 0.1]', "not valid JSON"), ("[]", "non-empty"),
                      ('{"1": []}', "query 1"), ('{"x": [["5", 0.1]]}', "not an integer"),
                      ('{"1": [["5", NaN]]}', "finite"), ('{"1": [["a5", 0.1]]}', "bad entry"),
                      ('{"1": [["5", 0.1], ["5", 0.2]]}', "product 5 listed twice")]:
        bad.write_text(text)
        with pytest.raises(DataError, match=msg):
            load_predictions(str(bad))


def test_models_must_cover_the_same_queries_and_candidates(tmp_path):
    p1, p2, answers = random_world(n_queries=4)
    q = sorted(p2)[2]
    del p2[q]
    with pytest.raises(DataError, match="query %d is in model1's" % q):
        blend(p1, p2, 0.5)
    p1, p2, answers = random_world(n_queries=4)
    p2[q].pop(next(iter(p2[q])))
    with pytest.raises(DataError, match="query %d: model1 and model2" % q):
        search_t(p1, p2, answers)
    p1, p2, answers = random_world(n_queries=4)
    answers[999] = {1}
    with pytest.raises(DataError, match="query 999"):
        search_t(p1, p2, answers)


def read_csv(path):
    with open(path, newline="") as f:
        return list(csv.reader(f))


def test_write_submission_rules(tmp_path):
    preds = {5: {11: 0.9, 12: 0.5, 13: 0.5, 14: 0.1, 15: 0.7, 16: 0.5, 17: -1.0},
             3: {21: 1.0, 22: 2.0, 23: 3.0, 24: 4.0, 25: 5.0}}
    path = str(tmp_path / "sub" / "submission.csv")
    write_submission(preds, path, candidates={5: list(preds[5]), 3: list(preds[3])})
    rows = read_csv(path)
    assert rows[0] == ensemble.HEADER
    assert rows[1:] == [["3", "25", "24", "23", "22", "21"],
                        ["5", "11", "15", "12", "13", "16"]]  # 0.5 ties by product id
    assert os.listdir(os.path.dirname(path)) == ["submission.csv"]  # no temporary file left

    with pytest.raises(DataError, match="query 9 has only 4 candidates"):
        write_submission({**preds, 9: {1: 1.0, 2: 0.5, 3: 0.2, 4: 0.0}}, path)
    with pytest.raises(DataError, match="lacks 1 queries"):
        write_submission(preds, path, queries=[3, 5, 8])
    with pytest.raises(DataError, match="no candidates"):
        write_submission(preds, path, candidates={5: list(preds[5])})
    with pytest.raises(DataError, match="not candidates"):
        write_submission(preds, path, candidates={5: [11, 12, 13, 14, 15], 3: list(preds[3])})
    assert read_csv(path) == rows  # a refused submission leaves the last good one intact


# ---------------------------------------------------------------------------------------
# The whole stage: CLI and notebook
# ---------------------------------------------------------------------------------------
@pytest.fixture()
def pred_world(tmp_path):
    pred = tmp_path / "prediction_result"
    pred.mkdir()
    valid = random_world(n_queries=40, seed=5, first_qid=1000)
    test = random_world(n_queries=30, seed=6, first_qid=5000)
    for split, (p1, p2, answers) in (("valid", valid), ("test", test)):
        dump(p1, pred / ("%s_pred_model1.json" % split))
        dump(p2, pred / ("%s_pred_model2.json" % split))
        with open(tmp_path / ("%s_answer.json" % split), "w") as f:
            json.dump({str(q): sorted(a) for q, a in answers.items()}, f)
    write_tsv(str(tmp_path / "test.tsv"),
              [make_row(p, qid=q, n=1) for q, ps in test[0].items() for p in ps])
    return tmp_path, valid, test


def check_outputs(out, valid, test, grid):
    rows = read_csv(out)
    assert rows[0] == ensemble.HEADER
    assert sorted(int(r[0]) for r in rows[1:]) == sorted(test[0])
    for r in rows[1:]:
        assert len(set(r[1:])) == 5 and {int(p) for p in r[1:]} <= set(test[0][int(r[0])])
    with open(os.path.join(os.path.dirname(out), "ensemble.json")) as f:
        report = json.load(f)
    tuning = tune(valid[0], valid[1], valid[2], grid=grid)
    assert report["how"] == max(tuning, key=lambda h: tuning[h]["kfold"])
    t, curve = search_t(valid[0], valid[1], valid[2], report["how"], grid)
    assert report["t"] == t and report["valid_ndcg"] == pytest.approx(curve.max())
    assert os.path.getsize(os.path.join(os.path.dirname(out), "ensemble_t.png")) > 1000
    # the submitted rows are the top 5 of the test blend at the chosen t
    b = blend(test[0], test[1], t, report["how"])
    assert all(list(map(int, r[1:])) == rank(b[int(r[0])].items())[:5] for r in rows[1:])
    return report


def test_main_cli(pred_world, capsys):
    tmp, valid, test = pred_world
    out = str(tmp / "out" / "submission.csv")
    r = ensemble.main(["--pred-dir", str(tmp / "prediction_result"), "--valid-answers",
                       str(tmp / "valid_answer.json"), "--test-tsv", str(tmp / "test.tsv"),
                       "--test-answers", str(tmp / "test_answer.json"), "--out", out,
                       "--grid", "21", "--weighting", "tuned"])
    report = check_outputs(out, valid, test, 21)
    assert list(r["table"].columns) == ["valid", "test"]
    assert report["table"]["test"][2] > max(report["table"]["test"][:2])  # blend beats both
    assert "chose" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="valid_pred_model1.json: not found"):
        ensemble.main(["--pred-dir", str(tmp), "--valid-answers", str(tmp / "x.json")])


def test_main_cli_three_members(pred_world, capsys):
    tmp, valid, test = pred_world
    pred = tmp / "prediction_result"
    for split, (p1, _, _) in (("valid", valid), ("test", test)):
        dump(noisy_member(p1, 11), pred / ("%s_pred_model3.json" % split))
    models = ["model1", "model2", "model3"]
    out = str(tmp / "out3" / "submission.csv")
    r = ensemble.main(["--pred-dir", str(pred), "--valid-answers", str(tmp / "valid_answer.json"),
                       "--test-tsv", str(tmp / "test.tsv"), "--models", ",".join(models),
                       "--simplex-step", "0.1", "--out", out, "--weighting", "tuned"])
    with open(os.path.join(os.path.dirname(out), "ensemble.json")) as f:
        report = json.load(f)
    tuning = ensemble.tune_members(list(valid[:2]) + [noisy_member(valid[0], 11)], valid[2],
                                   simplex_step=0.1)
    assert report["models"] == models and "t" not in report
    assert report["how"] == max(tuning, key=lambda h: tuning[h]["kfold"])
    assert list(report["weights"].values()) == tuning[report["how"]]["weights"]
    assert sum(report["weights"].values()) == pytest.approx(1.0)
    assert all(set(n) >= {"weights", "valid", "kfold", "fold_weights", "equal"}
               for n in report["normalisations"].values())
    assert report["table_rows"][:3] == models and len(report["table"]["valid"]) == 4
    assert r["png"].endswith("ensemble_simplex.png") and os.path.getsize(r["png"]) > 1000
    b = ensemble.blend_members([test[0], test[1], noisy_member(test[0], 11)],
                               tuning[report["how"]]["weights"], report["how"])
    rows = read_csv(out)
    assert all(list(map(int, r[1:])) == rank(b[int(r[0])].items())[:5] for r in rows[1:])
    assert "chose %s, model1 " % report["how"] in capsys.readouterr().out
    # two members: t and the weights agree
    ensemble.main(["--pred-dir", str(pred), "--valid-answers", str(tmp / "valid_answer.json"),
                   "--test-tsv", str(tmp / "test.tsv"), "--grid", "21", "--out", out])
    with open(os.path.join(os.path.dirname(out), "ensemble.json")) as f:
        report = json.load(f)
    assert report["weights"] == {"model1": report["t"], "model2": 1.0 - report["t"]}


def _executed_outputs(path):
    import nbformat
    executed = nbformat.read(path, as_version=4)
    return executed, json.dumps([c.get("outputs", []) for c in executed.cells])


def test_the_files_of_one_blend_are_replaced_together(pred_world, monkeypatch):
    """submission.csv, ensemble.json and the plot are one set: a plot that fails to write
    leaves the previous set as it was (no new submission beside the old blend's record),
    and a blend of another member count removes the plot it does not draw."""
    tmp, valid, test = pred_world
    pred = tmp / "prediction_result"
    for split, (p1, _, _) in (("valid", valid), ("test", test)):
        dump(noisy_member(p1, 11), pred / ("%s_pred_model3.json" % split))
        dump(noisy_member(p1, 12), pred / ("%s_pred_model4.json" % split))
    out = str(tmp / "out" / "submission.csv")
    folder = os.path.dirname(out)

    def run(models):
        return ensemble.run_ensemble(str(pred), str(tmp / "valid_answer.json"), out,
                                     models=models, test_tsv=str(tmp / "test.tsv"), grid=11,
                                     simplex_step=0.25)

    run(["model1", "model2"])
    files = ["ensemble.json", "ensemble_t.png", "submission.csv"]
    assert sorted(os.listdir(folder)) == files
    before = {n: os.stat(os.path.join(folder, n)).st_ino for n in files}

    def broken(*a, **k):
        raise OSError("no space left for the plot")
    monkeypatch.setattr(ensemble, "plot_simplex", broken)
    with pytest.raises(OSError, match="no space left for the plot"):
        run(["model1", "model2", "model3"])
    assert sorted(os.listdir(folder)) == files  # no temporaries left
    assert {n: os.stat(os.path.join(folder, n)).st_ino for n in files} == before
    monkeypatch.undo()
    r = run(["model1", "model2", "model3"])
    assert sorted(os.listdir(folder)) == ["ensemble.json", "ensemble_simplex.png",
                                          "submission.csv"]
    assert r["png"] == os.path.join(folder, "ensemble_simplex.png")
    r = run(["model1", "model2", "model3", "model4"])
    assert sorted(os.listdir(folder)) == ["ensemble.json", "submission.csv"]
    assert r["png"] is None
    with open(os.path.join(folder, "ensemble.json")) as f:
        assert json.load(f)["models"] == ["model1", "model2", "model3", "model4"]


@pytest.mark.slow
def test_notebook_runs_through_papermill_with_its_parameters(pred_world):
    import nbformat
    nb = nbformat.read(os.path.join(ROOT, "ensemble.ipynb"), as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert "parameters" in code[0].metadata.get("tags", [])
    assert all(not c.outputs and c.execution_count is None for c in code)  # stored cleared
    assert not any("environ" in c.source or "getenv" in c.source for c in code)

    tmp, valid, test = pred_world
    out = str(tmp / "out" / "submission.csv")
    executed_path = str(tmp / "ensemble.executed.ipynb")
    params = dict(pred_dir=str(tmp / "prediction_result"),
                  valid_answers=str(tmp / "valid_answer.json"), models="model1,model2",
                  test_tsv=str(tmp / "test.tsv"), test_answers=str(tmp / "test_answer.json"),
                  out=out, grid=21, weighting="tuned")
    proc = subprocess.run(
        [sys.executable, "-m", "papermill", os.path.join(ROOT, "ensemble.ipynb"), executed_path,
         "--cwd", ROOT, "--no-progress-bar", "--execution-timeout", "120"]
        + [x for name, v in params.items() for x in ("-p", name, str(v))],
        capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = check_outputs(out, valid, test, 21)
    executed, text = _executed_outputs(executed_path)
    assert "chose %s, t = %.4f" % (report["how"], report["t"]) in text
    assert "image/png" in text
    # the executed copy shows what it ran with: papermill's cell after the defaults
    injected = executed.cells[[c.cell_type for c in executed.cells].index("code") + 1]
    assert "injected-parameters" in injected.metadata.tags
    assert "grid = 21" in injected.source and 'pred_dir = "%s"' % params["pred_dir"] in \
        injected.source
    assert executed.metadata.papermill.parameters["grid"] == 21


@pytest.mark.slow
def test_bare_nbconvert_runs_on_the_defaults(tmp_path):
    """The defaults are run.sh's on the small world: runs/prediction_result with the four
    members, data/small's answers, beside the notebook."""
    import shutil
    pred = tmp_path / "runs" / "prediction_result"
    pred.mkdir(parents=True)
    answers_dir = {"valid": tmp_path / "data" / "small" / "valid",
                   "test": tmp_path / "data" / "small" / "testB"}
    for split, seed, first in (("valid", 5, 1000), ("test", 6, 5000)):
        p1, p2, answers = random_world(n_queries=30, seed=seed, first_qid=first)
        for name, preds in (("multilabel", noisy_member(p1, 3)), ("model1", p1),
                            ("model2", p2), ("model3", noisy_member(p2, 4))):
            dump(preds, pred / ("%s_pred_%s.json" % (split, name)))
        answers_dir[split].mkdir(parents=True)
        with open(answers_dir[split] / ("%s_answer.json" % answers_dir[split].name), "w") as f:
            json.dump({str(q): sorted(a) for q, a in answers.items()}, f)
        if split == "test":
            write_tsv(str(answers_dir[split] / "testB.tsv"),
                      [make_row(p, qid=q, n=1) for q, ps in p1.items() for p in ps])
    shutil.copy(os.path.join(ROOT, "ensemble.ipynb"), tmp_path / "ensemble.ipynb")
    proc = subprocess.run(
        [sys.executable, "-m", "jupyter", "nbconvert", "--to", "notebook", "--execute",
         str(tmp_path / "ensemble.ipynb"), "--ExecutePreprocessor.timeout=300"],
        env=dict(os.environ, PYTHONPATH=ROOT), capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stderr[-3000:]
    with open(pred / "ensemble.json") as f:
        report = json.load(f)
    assert report["models"] == ["multilabel", "model1", "model2", "model3"]
    assert len(read_csv(str(pred / "submission.csv"))) == 31
    _, text = _executed_outputs(str(tmp_path / "ensemble.nbconvert.ipynb"))
    assert "chose %s" % report["how"] in text
