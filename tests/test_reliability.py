"""Reliability: bad input is an error naming file, line and reason (or, with
--skip-bad, skipped and counted); crashes resume to the same result; a distributed fault
restarts or stops the job, never hangs it; nothing unsafe is loaded or written.

Cases already covered elsewhere are not repeated: tests/test_data.py (column count, base64,
decoded length, num_boxes 0, a non-digit id, truncated last line, CRLF, a missing train.tsv,
a missing or corrupt .npz) and tests/test_stages.py (multilabel and model1 resume, a
checkpoint of another preset).
"""
import argparse
import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

import faults
import matching
import metric
import prepare
import provenance
import synthetic
import tsv
import runtime
import utils
from layers import load_export
from multilabel import export_model, train as ml_train, validation as ml_validation
from model1 import model as m1_model, train as m1_train
from model2 import model as m2_model, train as m2_train, validation as m2_validation
from rows import make_row, write_tsv
from sampler import NegativeSampler
from tsv import DataError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# --------------------------------------------------------------------------------------
# Hand-made rows
# --------------------------------------------------------------------------------------
def _nan(n=2):
    f = np.ones((n, 2048), np.float32)
    f[-1, 7] = np.nan
    return f


BAD_ROWS = {  # name -> (row 9 of train.tsv, the reason the error must give)
    "nan feature": (make_row(100000008, feats=_nan()), "NaN or infinity"),
    "inf feature": (make_row(100000008, feats=np.full((2, 2048), np.inf, np.float32)),
                    "NaN or infinity"),
    "nan box": (make_row(100000008, boxes=[[0, 0, np.nan, 9], [0, 0, 9, 9]]), "NaN or infinity"),
    "box below the image": (make_row(100000008, boxes=[[0, 0, 600, 100], [0, 0, 9, 9]]),
                            "box outside the 500x400 image"),
    "box left of the image": (make_row(100000008, boxes=[[0, -30, 90, 100], [0, 0, 9, 9]]),
                              "box outside"),
    "bottom above top": (make_row(100000008, boxes=[[100, 0, 50, 100], [0, 0, 9, 9]]),
                         "bottom<top"),
    "class label 33": (make_row(100000008, labels=np.array([0, 33])), "class label outside"),
    "non-UTF-8 query": (make_row(100000008, query="red @@ dress").encode().replace(b"@@", b"\xff\xfe"),
                        "not UTF-8"),
    "tab inside the query": (make_row(100000008, query="red\tdress"), "found 10"),
}


@pytest.mark.parametrize("case", sorted(BAD_ROWS))
def test_bad_train_row_is_an_error_or_skipped_with_a_count(tmp_path, caplog, case):
    """Error `train.tsv:9: reason`, info/ not written; --skip-bad keeps the 8 good rows and
    logs the count and the line. A tab in the query must never shift the columns."""
    data, info = str(tmp_path / "d"), str(tmp_path / "i")
    rows = [make_row(100000001 + i, qid=5 + i % 2) for i in range(9)]
    rows[7], reason = BAD_ROWS[case]
    write_tsv(os.path.join(data, "train", "train.tsv"), rows)
    with pytest.raises(DataError, match=r"train\.tsv:9: .*%s" % reason):
        prepare.preprocess(data, info=info, progress=False)
    assert not os.path.exists(os.path.join(info, "queries.pkl"))
    with caplog.at_level(logging.WARNING, logger="kddmm"):
        df = prepare.preprocess(data, info=info, skip_bad=True, progress=False)
    assert len(df) == 8 and 100000008 not in set(df.product_id)
    assert "skipped 1 bad rows" in caplog.text and "line 9: " in caplog.text
    assert not os.path.exists(os.path.join(data, "features", "100000008.npz"))


@pytest.mark.slow
def test_cli_bad_row_exits_non_zero_naming_file_and_line(tmp_path):
    data, info = str(tmp_path / "d"), str(tmp_path / "i")
    rows = [make_row(100000001 + i) for i in range(9)]
    rows[7] = BAD_ROWS["tab inside the query"][0]
    write_tsv(os.path.join(data, "train", "train.tsv"), rows)
    r = subprocess.run([sys.executable, os.path.join(ROOT, "prepare.py"), "preprocess", "--data",
                        data, "--info", info, "--workers", "1", "--no-progress"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode != 0
    assert "train.tsv:9: expected 9 tab-separated columns, found 10" in r.stderr
    assert not os.path.exists(os.path.join(info, "queries.pkl"))


def test_bad_candidate_row_is_an_error_or_skipped_with_a_count(tmp_path, caplog):
    path = str(tmp_path / "valid" / "valid.tsv")
    rows = [make_row(103000001 + i, qid=7) for i in range(6)]
    rows[3] = make_row(103000004, qid=7, feats=_nan())
    rows[4] = make_row(103000005, query="red\tdress", qid=7)
    write_tsv(path, rows)
    with pytest.raises(DataError, match=r"valid\.tsv:5: .*NaN"):
        tsv.read_candidates(path)
    with caplog.at_level(logging.WARNING, logger="kddmm"):
        cands = tsv.read_candidates(path, skip_bad=True)
    assert [r["product_id"] for r in cands[7]["products"]] == [103000001, 103000002,
                                                                103000003, 103000006]
    assert "skipped 2 bad rows" in caplog.text and "valid.tsv:6: expected 9" in caplog.text


def test_quotes_in_queries_round_trip_untouched(tmp_path):
    """Quoting is disabled everywhere: quotes, even unbalanced, reach info/ and the
    candidate reader exactly as written."""
    texts = ['women\'s "red" dress', 'say "hi shirt', "''single'' 'quoted' skirt",
             '"""triple"""']
    rows = [make_row(100000001 + 3 * i + j, query=t, qid=10 + i) for i, t in enumerate(texts)
            for j in range(3)]
    data, info = str(tmp_path / "d"), str(tmp_path / "i")
    write_tsv(os.path.join(data, "train", "train.tsv"), rows)
    df = prepare.preprocess(data, info=info, progress=False)
    assert sorted(set(df["query"])) == sorted(texts)
    queries, _ = utils.load_info(info)
    assert sorted(queries["text"]) == sorted(texts)
    assert queries["tokens"][queries["text"].index('say "hi shirt')] == ["say", "hi", "shirt"]
    write_tsv(str(tmp_path / "v.tsv"), rows)
    cands = tsv.read_candidates(str(tmp_path / "v.tsv"))
    assert sorted(c["query"] for c in cands.values()) == sorted(texts)


def test_stopword_only_query_is_skipped_in_training_with_a_count(tmp_path, caplog):
    texts = ["red dress", "blue shirt", "the for with"]
    rows = [make_row(100000001 + 3 * i + j, query=t, qid=10 + i) for i, t in enumerate(texts)
            for j in range(3)]
    data, info = str(tmp_path / "d"), str(tmp_path / "i")
    write_tsv(os.path.join(data, "train", "train.tsv"), rows)
    prepare.preprocess(data, info=info, progress=False)
    queries, vocab = utils.load_info(info)
    k = list(queries["query_id"]).index(12)
    assert queries["tokens"][k] == [] and queries["last_word"][k] == "<empty>"
    store = utils.ProductStore(os.path.join(data, "features"))
    with caplog.at_level(logging.WARNING, logger="kddmm"):
        ds = utils.PairDataset(queries, vocab, store, NegativeSampler(queries))
    assert "skipped 1 of 3 queries" in caplog.text
    assert len(ds) == 6 and k not in set(ds.pair_query.tolist())
    assert all(ds[i]["nqi"] != k for i in range(len(ds)))


def test_duplicate_product_id_is_an_error_or_keeps_the_first_row(tmp_path, caplog):
    """Error, and no .npz of that product left for a rerun to trust; --skip-bad keeps the
    first row's arrays even when a parallel (or killed) run wrote the later row's file."""
    data, info = str(tmp_path / "d"), str(tmp_path / "i")
    feats = str(tmp_path / "d" / "features")
    first = np.full((2, 2048), 1.0, np.float32)
    later = np.full((2, 2048), 2.0, np.float32)
    rows = [make_row(100000001 + i, qid=5 + i % 2) for i in range(9)]
    rows[2] = make_row(100000042, feats=first)
    rows[7] = make_row(100000042, feats=later, qid=6)
    write_tsv(os.path.join(data, "train", "train.tsv"), rows)
    with pytest.raises(DataError, match=r"train\.tsv:9: duplicate product_id 100000042"):
        prepare.preprocess(data, info=info, progress=False)
    npz = os.path.join(feats, "100000042.npz")
    assert not os.path.exists(npz) and not os.path.exists(os.path.join(info, "queries.pkl"))
    prepare.save_npz_atomic(npz, features=later, boxes=np.zeros((2, 4), np.float32),
                          class_labels=np.zeros(2, np.int64),
                          image_hw=np.array([500, 400], np.int64))
    with caplog.at_level(logging.WARNING, logger="kddmm"):
        df = prepare.preprocess(data, info=info, skip_bad=True, progress=False)
    assert len(df) == 8 and df.query_id[df.product_id == 100000042].tolist() == [5]
    assert "line 9: duplicate product_id 100000042" in caplog.text
    assert "kept the first" in caplog.text
    _, f, _ = utils.ProductStore(feats).get(100000042)
    assert np.array_equal(f, first)


def test_one_query_id_with_two_texts_is_an_error(tmp_path):
    rows = [make_row(100000001 + i, qid=5) for i in range(4)]
    rows[3] = make_row(100000004, query="blue shirt", qid=5)
    data, info = str(tmp_path / "d"), str(tmp_path / "i")
    write_tsv(os.path.join(data, "train", "train.tsv"), rows)
    with pytest.raises(DataError, match="query_id 5 has two different texts"):
        prepare.preprocess(data, info=info, progress=False)
    assert os.listdir(info) == []  # nothing half-built for a later stage to trust
    write_tsv(str(tmp_path / "v.tsv"), rows)
    with pytest.raises(DataError, match=r"v\.tsv:5: query_id 5 has two different texts"):
        tsv.read_candidates(str(tmp_path / "v.tsv"))


def test_answers_against_candidates(tmp_path, caplog):
    """A query with answers but no candidates is an error; an answer that is not among its
    query's candidates is a warning (it can never be ranked: NDCG stays below 1)."""
    path = str(tmp_path / "valid" / "valid.tsv")
    write_tsv(path, [make_row(103000001 + i, qid=7) for i in range(4)])
    cands = tsv.read_candidates(path)
    ans = tmp_path / "valid_answer.json"
    ans.write_text(json.dumps({"7": [103000001, 103000099]}))
    for form in (cands, {7: [103000001, 103000002, 103000003, 103000004]}):
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="kddmm"):
            answers = metric.load_answers(str(ans), form)
        assert answers == {7: {103000001, 103000099}}
        assert "query 7: 1 answers are not among its candidates" in caplog.text
    ans.write_text(json.dumps({"7": [103000001], "8": [103000002]}))
    with pytest.raises(DataError, match="query 8 has answers but no candidates"):
        metric.load_answers(str(ans), cands)


# --------------------------------------------------------------------------------------
# Trained stages on the tiny world (a few steps each)
# --------------------------------------------------------------------------------------
def _common(w, out, epochs=2, info=None):
    return ["--data", w.data, "--info", info or w.info, "--preset", "tiny", "--workers", "0",
            "--epochs", str(epochs), "--no-progress", "--out", out, "--steps-per-epoch", "4"]


@pytest.fixture(scope="module")
def pre(tiny_world, tmp_path_factory):
    """A multilabel run (1 epoch of 4 steps) and its export."""
    out = str(tmp_path_factory.mktemp("rel") / "ml")
    ml_train.main(_common(tiny_world, out, epochs=1) + ["--no-eval"])
    export_model.main(["--ckpt", os.path.join(out, "last.pt"),
                       "--out", os.path.join(out, "encoder.pt")])
    return out


@pytest.fixture(scope="module")
def m2(pre, tiny_world, tmp_path_factory):
    """model2 trained 2 epochs without interruption."""
    out = str(tmp_path_factory.mktemp("rel") / "m2")
    m2_train.main(_common(tiny_world, out) + ["--export", os.path.join(pre, "encoder.pt"),
                                              "--no-eval"])
    return out


def _other_vocab_export(pre, path):
    """The export with two words swapped: same size, another vocabulary."""
    ex = torch.load(os.path.join(pre, "encoder.pt"), weights_only=True)
    ex["vocab"][4], ex["vocab"][5] = ex["vocab"][5], ex["vocab"][4]
    runtime.save_checkpoint(ex, path)
    return path


@pytest.mark.slow
def test_model2_crash_mid_epoch_then_resume_equals_uninterrupted(m2, pre, tiny_world, tmp_path,
                                                                 monkeypatch):
    out = str(tmp_path / "m2")
    argv = _common(tiny_world, out) + ["--export", os.path.join(pre, "encoder.pt"), "--no-eval"]
    faults.inject(monkeypatch.setattr, "0:1:2:raise", out)
    with pytest.raises(RuntimeError, match="injected fault on rank 0, epoch 1, step 2"):
        m2_train.main(argv)
    monkeypatch.undo()
    assert runtime.load_checkpoint(os.path.join(out, "last.pt"))["epoch"] == 0
    m2_train.main(argv + ["--resume"])
    a = runtime.load_checkpoint(os.path.join(m2, "last.pt"))
    b = runtime.load_checkpoint(os.path.join(out, "last.pt"))
    assert a["model"].keys() == b["model"].keys() and b["epoch"] == 1
    for k in a["model"]:
        assert torch.allclose(a["model"][k], b["model"][k], atol=1e-6), k


@pytest.mark.slow
def test_checkpoint_or_export_of_another_vocabulary_is_refused(pre, m2, tiny_world, tmp_path):
    other = _other_vocab_export(pre, str(tmp_path / "other.pt"))
    with pytest.raises(DataError, match="another vocabulary"):  # export vs info/
        m1_train.main(_common(tiny_world, str(tmp_path / "m1")) + ["--export", other])
    with pytest.raises(DataError, match="another vocabulary"):  # trained model vs export
        m2_validation.main(["--ckpt", os.path.join(m2, "best.pt"), "--export", other,
                            "--out", str(tmp_path / "pred")])
    # resuming pretraining on an info/ whose vocabulary differs (same size: no shape error)
    info = str(tmp_path / "info")
    shutil.copytree(tiny_world.info, info)
    with open(os.path.join(info, "vocab.json"), encoding="utf-8") as f:
        v = json.load(f)
    v["itos"][4], v["itos"][5] = v["itos"][5], v["itos"][4]
    utils.atomic_json(v, os.path.join(info, "vocab.json"))
    out = str(tmp_path / "ml")
    shutil.copytree(pre, out)
    last = os.path.join(out, "last.pt")
    ck = runtime.load_checkpoint(last)
    ck["args"]["info"] = info  # as if preprocess had rewritten the checkpoint's own info/
    runtime.save_checkpoint(ck, last)
    with pytest.raises(DataError, match="another vocab"):
        ml_train.main(_common(tiny_world, out, info=info) + ["--no-eval", "--resume"])


def _edit_valid(tiny_world, root, edit):
    """Copy valid/ of the tiny world to root/valid, rows passed through edit(row dict)."""
    os.makedirs(os.path.join(root, "valid"))
    shutil.copy(os.path.join(tiny_world.data, "valid", "valid_answer.json"),
                os.path.join(root, "valid"))
    rows = []
    for _, text in tsv.iter_lines(os.path.join(tiny_world.data, "valid", "valid.tsv")):
        r = edit(tsv.parse_row(text))
        if r is not None:
            rows.append(synthetic.tsv_row(r["product_id"], (
                r["image_h"], r["image_w"], r["boxes"], r["features"], r["class_labels"]),
                r["query"], r["query_id"]))
    write_tsv(os.path.join(root, "valid", "valid.tsv"), rows)
    return root


@pytest.mark.slow
def test_validation_ranks_stopword_queries_and_skips_bad_rows(m2, pre, tiny_world, tmp_path,
                                                              caplog):
    """A stopword-only query still gets every candidate scored; a NaN row (an answer) is an
    error naming file and line, or with --skip-bad skipped, counted, and warned about."""
    answers = metric.load_answers(os.path.join(tiny_world.data, "valid", "valid_answer.json"))
    q_empty, q_bad = sorted(answers)[:2]
    bad_pid = min(answers[q_bad])

    def edit(r):
        if r["query_id"] == q_empty:
            r["query"] = "the for with"
        if r["product_id"] == bad_pid:
            r["features"] = _nan(r["num_boxes"])
        return r
    data = _edit_valid(tiny_world, str(tmp_path / "d"), edit)
    pred = str(tmp_path / "pred")
    argv = ["--ckpt", os.path.join(m2, "best.pt"), "--data", data, "--split", "valid",
            "--out", pred]
    with pytest.raises(DataError, match=r"valid\.tsv:\d+: features or boxes contain NaN"):
        m2_validation.main(argv)
    with caplog.at_level(logging.WARNING, logger="kddmm"):
        res = m2_validation.main(argv + ["--skip-bad"])
    assert "skipped 1 bad rows" in caplog.text
    assert "query %d: 1 answers are not among its candidates" % q_bad in caplog.text
    preds = metric.load_predictions(os.path.join(pred, "valid_pred_model2.json"))
    cands = tsv.read_candidates(os.path.join(tiny_world.data, "valid", "valid.tsv"))
    assert set(preds) == set(cands)
    for q, scores in preds.items():
        want = {r["product_id"] for r in cands[q]["products"]} - {bad_pid}
        assert set(scores) == want
    # the figure printed is the NDCG@5 of the file written
    assert res["valid"] == metric.ndcg_at_k({q: list(s.items()) for q, s in preds.items()},
                                            answers)
    # the same flag, and the same figure, for the validation inside training
    model, vocab, _ = matching.load_trained(m2_model.build_model, os.path.join(m2, "best.pt"))
    args = argparse.Namespace(data=data, eval_split="valid", max_boxes=None, skip_bad=True)
    assert matching.make_evaluator(args, vocab)(model)["valid_ndcg5"] == res["valid"]
    # and for the pretraining ranking, by its script and inside pretraining
    argv = ["--ckpt", os.path.join(pre, "last.pt"), "--data", data, "--captions", "1"]
    with pytest.raises(DataError, match=r"valid\.tsv:\d+: features or boxes contain NaN"):
        ml_validation.main(argv)
    model, vocab, _ = ml_validation.load_pretrainer(os.path.join(pre, "last.pt"))
    assert ml_validation.main(argv + ["--skip-bad"])["ndcg5"] == \
        ml_validation.make_evaluator(args, vocab)(model)["valid_ndcg5"]


@pytest.mark.slow
def test_validation_replaces_the_files_of_one_run_together(m2, tiny_world, tmp_path):
    """testB fails (a torn last line) after valid was scored: neither file is replaced,
    so the ensemble never blends a new valid file with an old test one."""
    data, pred = str(tmp_path / "d"), str(tmp_path / "pred")
    for split in ("valid", "testB"):
        shutil.copytree(os.path.join(tiny_world.data, split), os.path.join(data, split))
    argv = ["--ckpt", os.path.join(m2, "best.pt"), "--data", data, "--split", "valid",
            "--split", "testB", "--out", pred]
    m2_validation.main(argv)
    files = sorted(os.listdir(pred))
    assert files == ["test_pred_model2.json", "valid_pred_model2.json"]
    valid = os.path.join(pred, "valid_pred_model2.json")
    inode = os.stat(valid).st_ino  # a replaced file is a new inode, even with the same bytes
    os.remove(os.path.join(pred, "test_pred_model2.json"))
    with open(os.path.join(data, "testB", "testB.tsv"), "rb+") as f:
        f.truncate(os.path.getsize(f.name) - 7)
    with pytest.raises(DataError, match=r"testB\.tsv:\d+"):
        m2_validation.main(argv)
    assert sorted(os.listdir(pred)) == ["valid_pred_model2.json"]  # no temporaries left
    assert os.stat(valid).st_ino == inode


@pytest.mark.slow
def test_validation_query_with_answers_but_no_candidates_is_an_error(m2, tiny_world, tmp_path):
    gone = min(tsv.read_candidates(os.path.join(tiny_world.data, "valid", "valid.tsv")))
    data = _edit_valid(tiny_world, str(tmp_path / "d"),
                       lambda r: None if r["query_id"] == gone else r)
    with pytest.raises(DataError, match="query %d has answers but no candidates" % gone):
        m2_validation.main(["--ckpt", os.path.join(m2, "best.pt"), "--data", data,
                            "--split", "valid", "--out", str(tmp_path / "pred")])


@pytest.mark.slow
def test_every_model_ranks_a_stopword_only_query(pre, tiny_world):
    """model1 (all candidates tie: product id order), model2 (reads <unk>) and the
    pretraining score (0 for all) give every candidate a finite score."""
    cands = tsv.read_candidates(os.path.join(tiny_world.data, "valid", "valid.tsv"))
    q0 = min(cands)
    cands[q0]["query"] = "the for with"
    model, vocab, _ = ml_validation.load_pretrainer(os.path.join(pre, "last.pt"))
    cset = utils.CandidateSet(cands, vocab)
    assert cset.tokens[0] == []
    cpu = torch.device("cpu")
    results = {"multilabel": ml_validation.rank_split(model, cset, cpu)[0]}
    encoder, word_emb, _ = matching.load_pretrained(os.path.join(pre, "encoder.pt"), vocab)
    for name, stage in (("model1", m1_model), ("model2", m2_model)):
        model = stage.build_model(encoder, word_emb, argparse.Namespace(**stage.PRESETS["tiny"]))
        results[name] = matching.score_split(model, cset, cpu)
    for name, preds in results.items():
        assert set(preds) == set(cands), name
        for q, items in preds.items():
            assert sorted(p for p, _ in items) == \
                sorted(r["product_id"] for r in cands[q]["products"]), name
            assert np.isfinite([s for _, s in items]).all(), name
    ties = {s for _, s in results["model1"][q0]}
    assert len(ties) == 1  # no word to match: a tie, broken by product id


# --------------------------------------------------------------------------------------
# Crashes
# --------------------------------------------------------------------------------------
def _npz_count(folder):
    return sum(name.endswith(".npz") for name in os.listdir(folder)) \
        if os.path.isdir(folder) else 0


def _tree(folder):
    out = {}
    for name in sorted(os.listdir(folder)):
        with open(os.path.join(folder, name), "rb") as f:
            out[name] = f.read()
    return out


@pytest.mark.slow
def test_preprocess_killed_half_way_then_rerun_is_byte_identical(tiny_world, tmp_path):
    """SIGKILL with a third of the products written, rerun: features/ and info/ equal a
    clean run's byte for byte (no torn file, no leftover temporary)."""
    data, info = str(tmp_path / "d"), str(tmp_path / "i")
    feats = os.path.join(data, "features")
    os.makedirs(os.path.join(data, "train"))
    shutil.copy(os.path.join(tiny_world.data, "train", "train.tsv"),
                os.path.join(data, "train"))
    total = _npz_count(tiny_world.features)
    proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "prepare.py"), "preprocess",
                             "--data", data, "--info", info, "--workers", "1", "--no-progress"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env=dict(os.environ, OMP_NUM_THREADS="1"))
    try:
        deadline = time.time() + 120
        # run it in slices of a few milliseconds, so a busy machine cannot let it finish
        while _npz_count(feats) < total // 3:
            assert proc.poll() is None and time.time() < deadline
            os.kill(proc.pid, signal.SIGCONT)
            time.sleep(0.003)
            os.kill(proc.pid, signal.SIGSTOP)
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    assert total // 3 <= _npz_count(feats) < total
    assert not os.path.exists(os.path.join(info, "queries.pkl"))
    with open(os.path.join(feats, "100000000.npz.tmp99999"), "wb") as f:
        f.write(b"torn")  # what a kill during a write leaves
    prepare.preprocess(data, info=info, workers=1, progress=False)
    clean, rerun = _tree(tiny_world.features), _tree(feats)
    assert sorted(rerun) == sorted(clean)
    assert all(rerun[n] == clean[n] for n in clean)
    assert _tree(info) == _tree(tiny_world.info)


def test_preprocess_of_another_train_tsv_rewrites_the_npz_it_finds(tmp_path):
    """A world regenerated in place keeps its product ids: the whole .npz of the old
    train.tsv must not pass for the new one's rows."""
    data, info = str(tmp_path / "d"), str(tmp_path / "i")
    path = os.path.join(data, "train", "train.tsv")

    def rows(value):
        return [make_row(100000001 + i, qid=5 + i % 2, feats=np.full((2, 2048), value,
                                                                      np.float32))
                for i in range(4)]
    write_tsv(path, rows(1.0))
    prepare.preprocess(data, info=info, progress=False)
    write_tsv(path, rows(2.0))
    prepare.preprocess(data, info=info, progress=False)
    store = utils.ProductStore(os.path.join(data, "features"))
    assert all((store.get(100000001 + i)[1] == 2.0).all() for i in range(4))


def test_a_record_sees_a_file_rewritten_in_place_a_link_re_pointed_and_a_lost_output(
        tmp_path, capsys):
    """What RESUME=1 compares (provenance.py): the same bytes count as unchanged; a file
    rewritten at the same size and mtime, a large file changed at its end, a data root
    re-pointed, a folder with a file more, an output deleted and another command do not."""
    world, other = tmp_path / "w1", tmp_path / "w2"
    for w, text in ((world, "rows of the first world\n"), (other, "rows of the other world\n")):
        (w / "train").mkdir(parents=True)
        (w / "train" / "train.tsv").write_text(text)
    os.symlink(world, tmp_path / "root")
    big, out, folder = tmp_path / "big.bin", tmp_path / "model.pt", tmp_path / "info"
    big.write_bytes(b"x" * (9 << 20))
    folder.mkdir()
    (folder / "a.json").write_text("{}")
    train = str(tmp_path / "root" / "train" / "train.tsv")
    io = ["--dir", str(tmp_path / ".stages"), "--in", train, str(big), str(folder),
          "--out", str(out), "--"]
    command = ["python", "stage.py", "--x", "1"]

    def check(cmd=command):
        code = provenance.main(["check", "s"] + io + cmd)
        return code, capsys.readouterr().out.strip()
    assert check() == (1, "no record of a finished run")
    provenance.main(["begin", "s"] + io + command)
    out.write_bytes(b"weights")
    provenance.main(["record", "s", "--dir", str(tmp_path / ".stages"), "--seconds", "7"])
    assert check() == (0, "7")
    assert check(command[:-1] + ["2"]) == (1, "another command (or a record of an older "
                                              "run.sh)")

    def rewrite(path, data):  # the same size and mtime, other bytes
        st = os.stat(path)
        with open(path, "r+b") as f:
            f.seek(st.st_size - len(data))
            f.write(data)
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    rewrite(train, b"X\n")
    assert check() == (1, "input %s changed" % train)
    rewrite(train, b"d\n")
    assert check()[0] == 0  # the same bytes again
    rewrite(str(big), b"y")
    assert check() == (1, "input %s changed" % big)
    rewrite(str(big), b"x")
    os.remove(tmp_path / "root")
    os.symlink(other, tmp_path / "root")
    assert check() == (1, "input %s changed" % train)
    os.remove(tmp_path / "root")
    os.symlink(world, tmp_path / "root")
    (folder / "b.json").write_text("{}")
    assert check() == (1, "input %s changed" % folder)
    os.remove(folder / "b.json")
    assert check()[0] == 0
    os.rename(out, str(out) + ".kept")
    assert check() == (1, "output %s is missing" % out)
    os.rename(str(out) + ".kept", out)
    assert check()[0] == 0
    # begin removes the record and the stage's earlier output files, never its folders
    provenance.main(["begin", "s", "--dir", str(tmp_path / ".stages"), "--in",
                     "--out", str(out), str(folder), "--"] + command)
    assert not out.exists() and folder.is_dir()
    assert check() == (1, "no record of a finished run")


@pytest.mark.slow
def test_a_generated_world_stopped_part_way_is_refused(tmp_path, monkeypatch):
    """synthetic.py killed after train.tsv (no valid split yet): preprocessing and run.sh
    refuse the world in one line that says to regenerate it, before any stage runs; once
    generated to the end, it is accepted."""
    data, out = str(tmp_path / "world"), str(tmp_path / "runs")

    def killed(*args, **kwargs):
        raise KeyboardInterrupt  # where a kill after the train split would stop it
    monkeypatch.setattr(synthetic, "write_candidates", killed)
    with pytest.raises(KeyboardInterrupt):
        synthetic.generate(data, "tiny", log=lambda *a: None)
    monkeypatch.undo()
    assert os.path.exists(os.path.join(data, "train", "train.tsv"))
    with pytest.raises(DataError, match="%s: a generated world that synthetic.py did not "
                                        "finish.*regenerate" % re.escape(data)):
        prepare.preprocess(data, info=str(tmp_path / "info"), progress=False)
    r = subprocess.run(["bash", os.path.join(ROOT, "run.sh")], capture_output=True, text=True,
                       env=dict(os.environ, DATA_DIR=data, OUT_DIR=out, PRESET="tiny"),
                       timeout=120)
    assert r.returncode != 0 and r.stdout == ""
    assert len(r.stderr.splitlines()) == 1 and "regenerate" in r.stderr, r.stderr
    assert not os.path.exists(os.path.join(out, ".stages"))
    synthetic.generate(data, "tiny", log=lambda *a: None)
    prepare.preprocess(data, info=str(tmp_path / "info"), progress=False)


def _torchrun(args, tmp_path, fault, restarts=0, timeout=300):
    """multilabel/train.py on 2 gloo processes, with the fault of ``faults.py``."""
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1",
               # a restarted gloo job reads its peers' stale addresses from the rendezvous
               # store that torchrun shares with it (pytorch/pytorch#135712)
               TORCH_DISABLE_SHARE_RDZV_TCP_STORE="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "--max-restarts=%d" % restarts, os.path.join(ROOT, "tests", "faults.py"), fault,
           os.path.join(ROOT, "multilabel", "train.py")] + args
    t0 = time.time()
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout,
                       cwd=str(tmp_path))
    return r, time.time() - t0


@pytest.mark.slow
def test_torchrun_restarts_a_killed_rank_from_the_last_checkpoint(tiny_world, tmp_path):
    """Rank 1 vanishes (os._exit) mid-epoch 1; torchrun --max-restarts=1 restarts both
    ranks, which resume from last.pt by themselves and finish both epochs."""
    out = str(tmp_path / "ml")
    r, _ = _torchrun(_common(tiny_world, out) + ["--no-eval"], tmp_path, "1:1:2:exit",
                     restarts=1)
    assert r.returncode == 0, r.stderr[-3000:]
    assert os.path.exists(os.path.join(out, "fault_injected"))
    assert "resumed from %s at epoch 1" % os.path.join(out, "last.pt") in r.stderr
    with open(os.path.join(out, "log.jsonl")) as f:
        log = [json.loads(line) for line in f]
    assert [x["epoch"] for x in log] == [0, 1] and log[1]["rank_param_maxdiff"] == 0.0
    assert runtime.load_checkpoint(os.path.join(out, "last.pt"))["epoch"] == 1


@pytest.mark.slow
def test_a_raising_rank_stops_the_whole_job_quickly(tiny_world, tmp_path):
    """Rank 1 raises while rank 0 waits in a collective: non-zero exit, the error in the
    output, well within the bound (no hang)."""
    r, seconds = _torchrun(_common(tiny_world, str(tmp_path / "ml")) + ["--no-eval"],
                           tmp_path, "1:0:2:raise", timeout=120)
    assert r.returncode != 0
    assert "RuntimeError: injected fault on rank 1, epoch 0, step 2" in r.stderr
    assert seconds < 120


@pytest.mark.slow
def test_a_stalled_rank_is_named_within_twice_the_timeout(tiny_world, tmp_path):
    """Rank 1 stops (SIGSTOP: alive, never answering) at step 2: rank 0's collective times
    out after --dist-timeout, a monitored barrier names rank 1, rank 0 kills it (same
    host), and the whole job exits non-zero within twice the timeout of the stall."""
    out, timeout = str(tmp_path / "ml"), 6
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           os.path.join(ROOT, "tests", "faults.py"), "1:0:2:stop",
           os.path.join(ROOT, "multilabel", "train.py")] + _common(tiny_world, out) + [
               "--no-eval", "--dist-timeout", str(timeout)]
    p = subprocess.Popen(cmd, env=env, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL,
                         text=True, cwd=str(tmp_path))
    named, lines = None, []
    for line in p.stderr:  # read as it comes: when the rank was named
        lines.append(line)
        if named is None and "timed out after --dist-timeout" in line:
            named = (time.time(), line)
    assert p.wait(timeout=120) != 0
    ended = time.time()
    assert named, "".join(lines)[-3000:]
    assert "Ranks 1 failed to pass monitoredBarrier" in named[1]
    stalled = os.path.getmtime(os.path.join(out, "fault_injected"))
    assert ended - stalled < 2 * timeout, (named[0] - stalled, ended - stalled)


# --------------------------------------------------------------------------------------
# Safety
# --------------------------------------------------------------------------------------
class _Payload:
    """Unpickling this would create a file: what a hostile checkpoint could do."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return open, (self.path, "w")


@pytest.mark.slow
def test_checkpoints_and_exports_are_plain_and_objects_are_refused(pre, m2, tmp_path):
    for path in (os.path.join(pre, "last.pt"), os.path.join(pre, "encoder.pt"),
                 os.path.join(m2, "last.pt"), os.path.join(m2, "best.pt")):
        assert isinstance(torch.load(path, map_location="cpu", weights_only=True), dict)
    hostile, marker = str(tmp_path / "hostile.pt"), str(tmp_path / "pwned")
    torch.save({"model": {}, "x": _Payload(marker)}, hostile)
    for load in (runtime.load_checkpoint, load_export):
        with pytest.raises(DataError, match=r"hostile\.pt: holds objects other than tensors "
                                            r"and plain types, which are refused rather than "
                                            r"run"):
            load(hostile)
    assert not os.path.exists(marker)


def _snapshot(folder):
    return {os.path.join(d, n): os.stat(os.path.join(d, n)).st_mtime_ns
            for d, _, names in os.walk(folder) for n in names}


@pytest.mark.slow
def test_nothing_is_written_outside_the_given_folders(tmp_path, tiny_world, pre):
    """Product ids that are paths ('../x', '/abs', '..\\y') are bad rows, never file names;
    preprocessing writes only under features/ and info/, training only under --out."""
    data = tmp_path / "root" / "data"
    rows = [make_row(100000001 + i) for i in range(4)]
    rows += [make_row(100000009).replace("100000009", bad, 1)
             for bad in ["../x", "/tmp/kddmm_abs", "..\\y", "../../../x"]]
    write_tsv(str(data / "train" / "train.tsv"), rows)
    before = _snapshot(str(tmp_path))
    prepare.preprocess(str(data), features=str(data / "features"), info=str(data / "info"),
                     skip_bad=True, progress=False)
    new = set(_snapshot(str(tmp_path))) - set(before)
    assert new and all(p.startswith((str(data / "features") + os.sep,
                                     str(data / "info") + os.sep)) for p in new), new
    assert not os.path.exists("/tmp/kddmm_abs.npz")
    before = _snapshot(tiny_world.root)
    m2_train.main(_common(tiny_world, str(tmp_path / "m2"), epochs=1)
                  + ["--export", os.path.join(pre, "encoder.pt"), "--no-eval"])
    assert _snapshot(tiny_world.root) == before


# --------------------------------------------------------------------------------------
# Search: every list holds K; one world per command; the blend checked before the search
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("k", [400, 455, 460])
def test_hnsw_lists_hold_k_products_even_near_the_gallery_size(k):
    from catalogue import retrieve
    gen = torch.Generator().manual_seed(0)
    gallery = torch.nn.functional.normalize(torch.randn(460, 16, generator=gen), dim=1)
    queries = torch.nn.functional.normalize(torch.randn(40, 16, generator=gen), dim=1)
    scores, rows = retrieve.faiss_search(queries, gallery, k, hnsw=True)
    assert rows.shape == (40, k) and (rows >= 0).all()
    assert all(len(set(r)) == k for r in rows.tolist())
    assert (scores[:, :-1] >= scores[:, 1:] - 1e-6).all()  # best first
    exact_scores, _ = retrieve.exact_search(queries, gallery, k)
    true = (queries @ gallery.t()).gather(1, rows)
    assert torch.allclose(scores, true, atol=1e-5)  # each score is its row's dot product
    # HNSW is approximate: the K it finds score no better than the exact K, and close
    assert (scores.sum(1) <= exact_scores.sum(1) + 1e-4).all()
    ranked = retrieve.rankings(list(range(40)), np.arange(460) + 10 ** 8, scores, rows)
    assert all(len(v) == k for v in ranked.values())


def _stand_in_retrieval(tiny_world, monkeypatch):
    from test_retrieve import _stand_in
    return _stand_in(tiny_world, monkeypatch)


def _rows_of(root, splits):
    """{pid: (boxes, feats)} of every row of the given TSVs of a data root, first row kept."""
    from catalogue import retrieve
    out = {}
    for split in splits:
        for pid, boxes, feats in retrieve.split_rows(os.path.join(root, split, split + ".tsv")):
            out.setdefault(pid, (boxes, feats))
    return out


def test_data_builds_the_whole_gallery_from_its_own_root(tiny_world, tmp_path, monkeypatch):
    """--data OTHER: every product comes from OTHER (train from its train.tsv), none from the
    checkpoint's store; --data naming the checkpoint's world by another path gives the
    store's results exactly."""
    from catalogue import retrieve
    model, vocab = _stand_in_retrieval(tiny_world, monkeypatch)
    other = str(tmp_path / "other")
    synthetic.generate(other, "tiny", seed=3, log=lambda *a: None)
    out = str(tmp_path / "r")
    retrieve.main(["--ckpt", "unused.pt", "--data", other, "--k", "20", "--out", out,
                   "--split", "valid"])
    rows = _rows_of(other, ["train", "valid", "testA", "testB"])
    pids = sorted(rows)
    with torch.no_grad():
        vecs = torch.cat([model.encode_product_batch(dict(zip(("boxes", "feats", "mask"),
                                                              utils.pad_regions([rows[p]]))))
                          for p in pids])
    cands = tsv.read_candidates(os.path.join(other, "valid", "valid.tsv"), with_arrays=False)
    got = metric.load_predictions(os.path.join(out, "valid_gallery_model3.json"))
    for q, ranked in got.items():
        text = retrieve.encode_texts(model, vocab, [cands[q]["query"]])[0]
        want = dict(zip(pids, (vecs @ text).tolist()))
        assert len(ranked) == 20 and set(ranked) <= set(pids)
        assert all(abs(s - want[p]) < 1e-5 for p, s in ranked.items())
        assert sorted(want.values(), reverse=True)[19] <= min(ranked.values()) + 1e-5
    # the checkpoint's own world, named through a link: train.tsv gives what the store gives
    link, same = str(tmp_path / "link"), str(tmp_path / "same")
    os.symlink(tiny_world.data, link)
    retrieve.main(["--ckpt", "unused.pt", "--k", "20", "--out", out, "--split", "valid"])
    retrieve.main(["--ckpt", "unused.pt", "--data", link, "--k", "20", "--out", same,
                   "--split", "valid"])
    for name in ("valid_gallery_model3.json", "gallery_metrics.json"):
        with open(os.path.join(out, name)) as a, open(os.path.join(same, name)) as b:
            assert json.load(a) == json.load(b), name
    with pytest.raises(DataError, match=r"--info names the train store of the checkpoint's "
                                        r"data root .*; with --data .*other the whole gallery "
                                        r"comes from .*other, train from its train/train\.tsv"):
        retrieve.main(["--ckpt", "unused.pt", "--data", other, "--info", tiny_world.info,
                       "--out", out])


BAD_BLENDS = {  # ensemble.json content -> the one line it gives
    "sum 2": ('{"how": "rank", "models": ["model1", "model2"], '
              '"weights": {"model1": 1.0, "model2": 1.0}}', r"the weights sum to 2"),
    "negative": ('{"how": "rank", "models": ["model1", "model2"], '
                 '"weights": {"model1": -0.5, "model2": 1.5}}',
                 r"the weight of model1 is -0.5, outside \[0, 1\]"),
    "NaN": ('{"how": "rank", "models": ["model1", "model2"], '
            '"weights": {"model1": NaN, "model2": 1.0}}', r"the weight of model1 is nan"),
    "string": ('{"how": "rank", "models": ["model1", "model2"], '
               '"weights": {"model1": "0.5", "model2": 0.5}}',
               r"the weight of model1 is '0\.5', not a number"),
    "unknown how": ('{"how": "softmax", "models": ["model1", "model2"], '
                    '"weights": {"model1": 0.5, "model2": 0.5}}',
                    r"normalisation \"how\" is 'softmax', not one of raw, zscore, rank"),
    "member twice": ('{"how": "rank", "models": ["model1", "model1"], '
                     '"weights": {"model1": 0.5}}', r"member model1 is listed twice"),
    "unknown member": ('{"how": "rank", "models": ["model1", "model7"], '
                       '"weights": {"model1": 0.5, "model7": 0.5}}',
                       r"member model7 scores only the candidates"),
    "stray weight": ('{"how": "rank", "models": ["model1", "model2"], '
                     '"weights": {"model1": 0.5, "model2": 0.5, "model9": 0.0}}',
                     r"a weight for model9, which is not among the members model1, model2"),
    "missing weight": ('{"how": "rank", "models": ["model1", "model2"], '
                       '"weights": {"model1": 1.0}}', r"no weight for member model2"),
}


@pytest.mark.parametrize("case", sorted(BAD_BLENDS))
def test_a_bad_blend_is_refused_before_the_gallery_is_encoded(tiny_world, tmp_path,
                                                              monkeypatch, case):
    from catalogue import rerank, retrieve
    _stand_in_retrieval(tiny_world, monkeypatch)
    content, says = BAD_BLENDS[case]
    blend = tmp_path / "run" / "prediction_result" / "ensemble.json"
    os.makedirs(blend.parent)
    blend.write_text(content)
    monkeypatch.setattr(retrieve, "encode_gallery", lambda *a, **k: pytest.fail("encoded"))
    monkeypatch.setattr(rerank, "load_member", lambda *a: pytest.fail("a member loaded"))
    with pytest.raises(DataError, match=r"ensemble\.json: " + says):
        retrieve.main(["--ckpt", "unused.pt", "--k", "10", "--out", str(tmp_path / "r"),
                       "--rerank", str(blend)])


def test_a_missing_split_is_named_before_the_gallery_is_encoded(tiny_world, tmp_path,
                                                                monkeypatch):
    from catalogue import retrieve
    _stand_in_retrieval(tiny_world, monkeypatch)
    monkeypatch.setattr(retrieve, "encode_gallery", lambda *a, **k: pytest.fail("encoded"))
    with pytest.raises(DataError, match=r"testB\.tsv: not found; expected the candidate TSV "
                                        r"of the testB split"):
        retrieve.main(["--ckpt", "unused.pt", "--data", _without(tiny_world, tmp_path, "testB"),
                       "--out", str(tmp_path / "r"), "--split", "valid", "--split", "testB"])


def _without(tiny_world, tmp_path, split):
    """A copy of the tiny world's candidate splits without ``split`` -> its root."""
    root = tmp_path / "copy"
    for s in ("train", "valid", "testA", "testB"):
        if s != split and os.path.exists(os.path.join(tiny_world.data, s)):
            shutil.copytree(os.path.join(tiny_world.data, s), root / s)
    return str(root)


# --------------------------------------------------------------------------------------
# The blend's weight search is bounded
# --------------------------------------------------------------------------------------
def test_the_simplex_grows_as_counted_and_is_generated_in_the_old_order():
    import itertools
    import ensemble
    assert [ensemble.simplex_size(n) for n in range(3, 9)] == [231, 1771, 10626, 53130,
                                                               230230, 888030]
    for n, step in ((3, 0.05), (4, 0.1), (5, 0.25)):
        m = round(1 / step)
        old = [[*c, m - sum(c)] for c in itertools.product(range(m + 1), repeat=n - 1)
               if sum(c) <= m]
        assert np.array_equal(ensemble.simplex_points(n, step), np.array(old) / m)
    assert ensemble.simplex_size(5) <= ensemble.MAX_GRID < ensemble.simplex_size(6)
    with pytest.raises(ValueError, match="simplex_step must be 1/m"):
        ensemble.simplex_points(3, 0.0)


def test_coordinate_ascent_climbs_from_equal_weights_to_the_best_lattice_move():
    import ensemble
    target = np.array([0.6, 0.25, 0.1, 0.05, 0.0, 0.0])
    w = ensemble.coordinate_ascent(lambda p: -((p - target) ** 2).sum(1), 6, 0.05)
    assert w.sum() == pytest.approx(1.0) and (w >= 0).all()
    assert np.abs(w - target).max() <= 0.05 + 1e-9


def test_eight_members_are_tuned_by_coordinate_ascent_not_the_whole_grid(monkeypatch):
    """8 members: 888030 grid points, so coordinate ascent instead; the one member that
    knows the answers gets the weight, and the grid is never built."""
    import ensemble
    from test_ensemble import noisy_member, random_world
    p1, _, answers = random_world(n_queries=30, seed=7)
    perfect = {q: {p: float(p in answers[q]) for p in sc} for q, sc in p1.items()}
    preds = [noisy_member(p1, s) for s in range(7)]
    preds.insert(5, perfect)
    monkeypatch.setattr(ensemble, "simplex_points", lambda *a: pytest.fail("grid built"))
    r = ensemble.tune_members(preds, answers, hows=("rank",), k=3)["rank"]
    assert r["valid"] == 1.0 and r["weights"][5] == max(r["weights"])
    assert sum(r["weights"]) == pytest.approx(1.0) and min(r["weights"]) >= 0
    assert 0.9 <= r["kfold"] <= 1.0 and len(r["fold_weights"]) == 3
    assert r["points"].shape == (1, 8) and r["curve"].shape == (1,)
    equal = ensemble.score(ensemble.blend_members(preds, [1 / 8] * 8, "rank"), answers)
    assert r["equal"] == pytest.approx(equal) and r["valid"] > equal


def test_a_large_grid_shows_its_progress(monkeypatch, capsys):
    import ensemble
    from test_ensemble import random_world
    p1, p2, answers = random_world(n_queries=6)
    monkeypatch.setattr(ensemble, "PROGRESS_AT", 6 * 11)
    ensemble.tune_members([p1, p2], answers, hows=("raw",), grid=11, k=2)
    assert "blend grid (11 points)" in capsys.readouterr().err
    monkeypatch.setattr(ensemble, "PROGRESS_AT", 6 * 11 + 1)
    ensemble.tune_members([p1, p2], answers, hows=("raw",), grid=11, k=2)
    assert "blend grid" not in capsys.readouterr().err
