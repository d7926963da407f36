"""The world family (``--preset family``): a world drawn from its seed, its report, and the
oracle every split's report holds beside random and class-match."""
import json
import os

import numpy as np
import pytest

import metric
import synthetic

SIZES = dict(train_queries=40, eval_queries=24)


def _generate(out, preset="family", seed=1, **kw):
    return synthetic.generate(str(out), preset, seed=seed, log=lambda *a: None,
                              **{**SIZES, **kw})


def _read(path):
    with open(path, "rb") as f:
        return f.read()


def test_family_world_is_deterministic_per_seed_and_differs_across_seeds(tmp_path):
    for name, seed in (("a", 1), ("b", 1), ("c", 2)):
        _generate(tmp_path / name, seed=seed)
    for rel in ["train/train.tsv", "valid/valid.tsv", "testB/testB_answer.json",
                "valid/valid_pred_oracle.json", "synthetic_report.json"]:
        assert _read(tmp_path / "a" / rel) == _read(tmp_path / "b" / rel), rel
        assert _read(tmp_path / "a" / rel) != _read(tmp_path / "c" / rel), rel


def test_family_report_records_the_draw_and_the_world_follows_it(tmp_path):
    report = _generate(tmp_path / "w", seed=4)
    drawn = json.loads(json.dumps(synthetic.draw_family(4)))
    with open(tmp_path / "w" / "synthetic_report.json") as f:
        written = json.load(f)
    assert written["family"] == drawn and report["difficulty"] is None
    assert {k: written["world"][k] for k in drawn} == drawn
    assert set(synthetic.KNOBS) == set(written["world"])
    # the lists hold the drawn number of positives; pictures the drawn number of regions
    lo, hi = drawn["positives"]
    with open(tmp_path / "w" / "valid" / "valid_answer.json") as f:
        answers = json.load(f)
    assert all(lo <= len(a) <= hi for a in answers.values())
    import tsv
    cands = tsv.read_candidates(str(tmp_path / "w" / "valid" / "valid.tsv"))
    boxes = [r["num_boxes"] for c in cands.values() for r in c["products"]]
    assert drawn["boxes"][0] + 1 <= min(boxes) and max(boxes) <= drawn["boxes"][1] + 2
    assert report["testA"]["queries"] == 24 and report["valid"]["queries"] == 24


def test_family_presets_sizes():
    family, large = synthetic.PRESETS["family"], synthetic.PRESETS["family-large"]
    assert family["train_queries"] * 4.5 >= 19_000 and large["train_queries"] * 4.5 >= 100_000
    assert family["eval_queries"] == large["eval_queries"] == 1000
    assert family["testA_queries"] == 50


def _inside(x, lo, hi):
    return lo <= x <= hi


def test_family_draws_stay_inside_their_ranges():
    F, seen = synthetic.FAMILY, {"signal": set(), "two_attrs": set(), "subspace": set()}
    for seed in range(50):
        k = synthetic.draw_family(seed)
        assert set(k) <= set(synthetic.KNOBS)
        seen["signal"].add(k["signal"])
        seen["two_attrs"].add(k["two_attrs"])
        seen["subspace"].add(k["subspace"] > 0)
        for key in ("sig_dims", "sig_scale", "tail", "basis", "mix", "attr_weight", "visible",
                    "label_noise", "similar", "phrases", "two_objects", "swap"):
            assert _inside(k[key], *F[key]), (seed, key, k[key])
        assert _inside(k["noise"] / k["sig_scale"], F["noise"][0] - 1e-3, F["noise"][1] + 1e-3)
        assert k["subspace"] == 0 or (k["signal"] == "sparse"
                                       and _inside(k["subspace"], *F["subspace"]))
        for (lo, hi), r_lo, r_hi in ((k["magnitude"], *F["magnitude"]),
                                     (k["boxes"], *F["boxes"]),
                                     (k["positives"], *F["positives"]),
                                     (k["fillers"], *F["fillers"])):
            assert lo <= hi and _inside(lo, *r_lo) and _inside(hi, *r_hi), (seed, k)
        assert _inside(len(k["categories"]), *F["categories"])
        assert [c for c in synthetic.CATEGORIES if c in k["categories"]] == k["categories"]
        assert sum(c in synthetic.TOPS for c in k["categories"]) >= 2
        assert sum(c in synthetic.BOTTOMS for c in k["categories"]) >= 2
        for slot, values in k["attr_values"].items():
            pool = synthetic.VALUE_POOL[slot]
            assert _inside(len(values), F["attr_values"][0], len(pool))
            assert set(values) <= set(pool) and len(set(values)) == len(values)
        colour, other = F["slot_p"]
        assert all(_inside(p, *(colour if s == "colour" else other))
                   for s, p in k["slot_p"].items())
        hard, look, rand = k["negatives"]
        assert _inside(hard, *F["negatives"]) and look > 0 and rand > 0
        assert abs(hard + look + rand - 1) < 1e-3
        synthetic.World(seed, **k)                    # every draw makes a world
    assert seen == {"signal": set(F["signal"]), "two_attrs": {False, True},
                    "subspace": {False, True}}


def test_signals():
    dense = synthetic.World(0, signal="dense", tail=1.0)
    assert all((v > 0).all() for v in dense.sig.values())      # no silent dimension
    low = synthetic.World(0, signal="lowrank", basis=8, mix=3)
    sigs = np.stack([low.sig[c] for c in synthetic.CATEGORIES])
    assert np.linalg.matrix_rank(sigs) <= 8                      # concepts share a basis
    sparse = synthetic.World(0, sig_dims=20, sig_scale=2.0)
    assert (sparse.sig["dress"] > 0).sum() == 20 and sparse.sig["dress"].max() > 1.5


def test_every_new_word_has_a_distinct_chinese_name():
    words = {w for p in synthetic.PHRASES.values() for w in p.split()}
    words |= {v for vs in synthetic.EXTRA_VALUES.values() for v in vs}
    assert words <= set(synthetic.ZH)
    assert len(set(synthetic.ZH.values())) == len(synthetic.ZH)
    world = synthetic.World(0, lang="zh", phrases=1.0)
    text = world.query_text(np.random.default_rng(0), [("dress", {"colour": "red"})])
    assert "一体式连衣裙" in text


def test_oracle_beats_the_baselines(tmp_path, tiny_world):
    family = _generate(tmp_path / "f", seed=3)
    for report in (family, tiny_world.report):
        for split in ("valid", "testA", "testB"):
            r = report[split]
            assert r["oracle"] > r["random"] and r["oracle"] >= r["class_match"], (split, r)


def test_oracle_misses_what_the_picture_hides(tmp_path):
    shown = _generate(tmp_path / "shown", "tiny", seed=5, visible=1.0, label_noise=0.0)
    hidden = _generate(tmp_path / "hidden", "tiny", seed=5, visible=0.4, label_noise=0.0)
    for split in ("valid", "testB"):
        assert hidden[split]["oracle"] < 1.0
        assert hidden[split]["oracle"] < shown[split]["oracle"] - 0.05


def test_oracle_predictions_reproduce_its_score(tmp_path):
    report = _generate(tmp_path / "w", seed=6)
    for split in ("valid", "testA", "testB"):
        path = str(tmp_path / "w" / split / (split + "_pred_oracle.json"))
        preds = metric.load_predictions(path)
        answers = metric.load_answers(str(tmp_path / "w" / split / (split + "_answer.json")))
        assert set(preds) == set(answers)
        ranked = {q: list(scores.items()) for q, scores in preds.items()}
        assert metric.ndcg_at_k(ranked, answers) == pytest.approx(report[split]["oracle"],
                                                                  abs=1e-12)
        with open(path) as f:
            first = next(iter(json.load(f).values()))
        assert [s for _, s in first] == sorted((s for _, s in first), reverse=True)


@pytest.mark.parametrize("argv,reason", [
    (["--preset", "family", "--difficulty", "2"], "--difficulty scales the default world"),
    (["--preset", "tiny", "--categories", "dress,spaceship"], "spaceship"),
    (["--preset", "tiny", "--categories", "dress,sofa"], "need a top and a bottom"),
    (["--preset", "tiny", "--attr-values", '{"colour": ["red"]}'], "two values of every slot"),
    (["--preset", "tiny", "--attr-values", '{"size": ["xl", "s"]}'], "size"),
])
def test_bad_world_arguments_end_with_one_line(tmp_path, argv, reason):
    out = str(tmp_path / "w")
    with pytest.raises(SystemExit) as e:
        synthetic.main(argv + ["--out", out])
    assert reason in str(e.value) and "\n" not in str(e.value)
    assert not os.path.exists(out)


def test_family_knobs_override_the_draw(tmp_path):
    report = _generate(tmp_path / "w", seed=2, signal="sparse", visible=1.0)
    assert report["world"]["signal"] == "sparse" and report["world"]["visible"] == 1.0
    assert report["family"] == synthetic.draw_family(2)


def test_share_of_achievable():
    assert metric.share_of_achievable(0.5, 0.2, 0.8) == pytest.approx(0.5)
    assert metric.share_of_achievable(0.2, 0.2, 0.8) == 0.0
    with pytest.raises(ValueError, match="does not beat random"):
        metric.share_of_achievable(0.5, 0.3, 0.3)
