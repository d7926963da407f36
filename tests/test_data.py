"""The data foundation: generator format, preprocessing round trip, loaders, text, metric."""
import base64
import csv
import os
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest

import metric
import prepare
import synthetic
import text
import tsv
import utils
from metric import ndcg_at_k, ndcg_one
from rows import make_row, write_tsv
from tsv import DataError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_layout_and_format(tiny_world):
    d = tiny_world.data
    for rel in ["multimodal_labels.txt", "train/train.tsv", "valid/valid.tsv",
                "valid/valid_answer.json", "testA/testA.tsv", "testB/testB.tsv",
                "testB/testB_answer.json"]:
        assert os.path.exists(os.path.join(d, rel)), rel
    labels = pd.read_csv(os.path.join(d, "multimodal_labels.txt"), sep="\t")
    assert list(labels.columns) == ["category_id", "category_name"] and len(labels) == 33
    assert labels.category_name[29] == "human face" and labels.category_name[32] == "hand"
    df = pd.read_csv(os.path.join(d, "valid/valid.tsv"), sep="\t", quoting=csv.QUOTE_NONE)
    assert list(df.columns) == tsv.COLUMNS
    for r in df.itertuples():
        n = r.num_boxes
        b = np.frombuffer(base64.b64decode(r.boxes), np.float32).reshape(n, 4)
        f = np.frombuffer(base64.b64decode(r.features), np.float32).reshape(n, 2048)
        c = np.frombuffer(base64.b64decode(r.class_labels), np.int64).reshape(n)
        assert (b[:, 2] >= b[:, 0]).all() and (b[:, 3] >= b[:, 1]).all()
        assert (b[:, 2] <= r.image_h + 1e-3).all() and (b[:, 3] <= r.image_w + 1e-3).all()
        assert (f >= 0).all() and ((c >= 0) & (c < 33)).all()
        assert 103_000_000 <= r.product_id < 104_000_000
    train = pd.read_csv(os.path.join(d, "train/train.tsv"), sep="\t", quoting=csv.QUOTE_NONE,
                        usecols=["product_id", "num_boxes", "query", "query_id"])
    assert train.product_id.between(100_000_000, 102_999_999).all()
    assert train.product_id.is_unique
    assert train.groupby("query_id").size().max() > 1  # many products per query text
    assert 2.5 < train.num_boxes.mean() < 5.5 and train.num_boxes.median() <= 4


def test_candidates_and_answers(tiny_world):
    d = tiny_world.data
    cands = tsv.read_candidates(os.path.join(d, "valid/valid.tsv"))
    answers = metric.load_answers(os.path.join(d, "valid/valid_answer.json"), cands)
    assert set(answers) == set(cands)
    seen = [r["product_id"] for q in cands.values() for r in q["products"]]
    assert len(seen) == len(set(seen))  # each product once: frequency carries no signal
    sizes = [len(q["products"]) for q in cands.values()]
    assert max(sizes) == 30 and min(sizes) >= 9
    assert np.mean([len(a) for a in answers.values()]) > 4.5


def test_gallery_answers_hold_the_candidate_answers(tiny_world):
    d = tiny_world.data
    train = pd.read_csv(os.path.join(d, "train/train.tsv"), sep="\t", quoting=csv.QUOTE_NONE,
                        usecols=["product_id"])
    written = set(train.product_id)
    cands = {}
    for split in ("valid", "testA", "testB"):
        cands[split] = tsv.read_candidates(os.path.join(d, split, split + ".tsv"),
                                           with_arrays=False)
        written |= {r["product_id"] for c in cands[split].values() for r in c["products"]}
    beyond = 0
    for split in ("valid", "testA", "testB"):
        answers = metric.load_answers(os.path.join(d, split, split + "_answer.json"))
        gallery = metric.load_answers(os.path.join(d, split, split + "_gallery_answer.json"))
        assert set(gallery) == set(answers)
        for q, ans in answers.items():
            assert ans <= gallery[q] <= written
            beyond += len(gallery[q] - {r["product_id"] for r in cands[split][q]["products"]})
    assert beyond > 0  # products of train and of other lists satisfy queries too


def test_catalogue_satisfying_by_hand():
    def obj(category, hidden=(), **values):
        return {"category": category, "colour": "red", "material": "cotton",
                "pattern": "solid", "style": "casual", "audience": "kids",
                **values, "hidden": set(hidden)}
    cat = synthetic.Catalogue()
    cat.add(1, [obj("dress")])
    cat.add(2, [obj("dress", colour="blue")])
    cat.add(3, [obj("dress", hidden={"colour"})])          # not shown: still a red dress
    cat.add(4, [obj("shirt", colour="white"), obj("skirt", colour="black")])
    cat.add(5, [obj("shirt", colour="black"), obj("skirt", colour="white")])   # swapped
    cat.add(6, [obj("skirt", colour="black")])
    assert cat.satisfying([("dress", {"colour": "red"})]) == [1, 3]
    assert cat.satisfying([("dress", {"colour": "red", "pattern": "plaid"})]) == []
    assert cat.satisfying([("dress", {})]) == [1, 2, 3]
    assert cat.satisfying([("skirt", {"colour": "black"})]) == [4, 6]   # either object
    two = [("shirt", {"colour": "white"}), ("skirt", {"colour": "black"})]
    assert cat.satisfying(two) == [4]
    assert synthetic.gallery_answers(cat, {"7": two}, {"7": [4]}, "valid") == {"7": [4]}
    with pytest.raises(RuntimeError, match=r"valid query 7: candidate answers \[5\]"):
        synthetic.gallery_answers(cat, {"7": two}, {"7": [4, 5]}, "valid")


def test_generator_is_deterministic(tmp_path):
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    for out in (a, b):
        synthetic.generate(out, "tiny", seed=3, train_queries=10, eval_queries=2,
                           log=lambda *x: None)
    for rel in ["train/train.tsv", "valid/valid.tsv", "testB/testB_answer.json",
                "valid/valid_gallery_answer.json"]:
        with open(os.path.join(a, rel), "rb") as fa, open(os.path.join(b, rel), "rb") as fb:
            assert fa.read() == fb.read(), rel


def test_chinese_queries_segment(tmp_path):
    out = str(tmp_path / "zh")
    synthetic.generate(out, "tiny", seed=1, lang="zh", train_queries=20, eval_queries=2,
                       log=lambda *x: None)
    df = pd.read_csv(os.path.join(out, "train/train.tsv"), sep="\t", quoting=csv.QUOTE_NONE,
                     usecols=["query"])
    toks = text.tokenize(df["query"].iloc[0])
    assert len(toks) >= 1 and all(" " not in t for t in toks)
    assert text.tokenize("白色纯棉衬衫") == ["白色", "纯棉", "衬衫"]


def test_npz_round_trip_equals_tsv(tiny_world):
    store = utils.ProductStore(tiny_world.features)
    n = 0
    for _, line in tsv.iter_lines(os.path.join(tiny_world.data, "train/train.tsv")):
        row = tsv.parse_row(line)
        with np.load(store.path(row["product_id"])) as z:
            assert np.array_equal(z["features"], row["features"])
            assert np.array_equal(z["boxes"], row["boxes"])
            assert np.array_equal(z["class_labels"], row["class_labels"])
        b5, f, _ = store.get(row["product_id"])
        assert np.allclose(b5, utils.row_regions(row)[0])
        n += 1
    assert n == len(utils.load_info(tiny_world.info)[0]["products"].flat) == 631


def test_info_contents(tiny_world):
    queries, vocab = utils.load_info(tiny_world.info)
    df = pd.read_csv(os.path.join(tiny_world.data, "train/train.tsv"), sep="\t",
                     quoting=csv.QUOTE_NONE, usecols=["product_id", "num_boxes", "query",
                                                      "query_id"])
    assert queries["query_id"].tolist() == sorted(df.query_id.unique())
    for i, q in enumerate(queries["query_id"]):
        rows = df[df.query_id == q]
        assert queries["text"][i] == rows["query"].iloc[0]
        assert dict(zip(queries["products"][i].tolist(), queries["num_boxes"][i].tolist())) \
            == dict(zip(rows.product_id, rows.num_boxes))
        assert queries["tokens"][i] == text.tokenize(queries["text"][i])
        assert queries["tokens"][i][-1] == queries["last_word"][i]
    assert vocab.itos[:4] == text.SPECIALS and "shirt" in vocab.stoi
    assert queries["cluster"].shape == (len(queries["query_id"]),)


def test_rerun_skips_and_is_identical(tiny_world, tmp_path):
    info2 = str(tmp_path / "info2")
    feats = sorted(os.listdir(tiny_world.features))
    mtimes = {f: os.stat(os.path.join(tiny_world.features, f)).st_mtime_ns for f in feats[:20]}
    prepare.preprocess(tiny_world.data, info=info2, workers=2, progress=False)
    for f, m in mtimes.items():  # complete files are not rewritten
        assert os.stat(os.path.join(tiny_world.features, f)).st_mtime_ns == m
    for name in ["queries.pkl", "vocab.json"]:
        with open(os.path.join(tiny_world.info, name), "rb") as a, \
                open(os.path.join(info2, name), "rb") as b:
            assert a.read() == b.read(), name


def test_tokenize_and_vocab():
    assert text.tokenize("New 2020 White T-Shirt for Women's, the BEST!") == \
        ["new", "2020", "white", "t-shirt", "women's", "best"]
    assert text.tokenize("the for with") == []
    v, counts = text.Vocab.build([["a1", "b2"], ["b2"]], min_count=1)
    assert v.itos == text.SPECIALS + ["b2", "a1"] and counts["b2"] == 2
    assert v.encode(["b2", "zzz"]) == [4, text.UNK] and v.decode([4, 5, 0]) == ["b2", "a1"]


def test_normalize_boxes_and_padding():
    b = utils.normalize_boxes(np.array([[10, 20, 60, 120]], np.float32), 100, 200)
    assert np.allclose(b, [[0.1, 0.1, 0.6, 0.6, 0.25]])
    boxes, feats, mask = utils.pad_regions([(np.ones((2, 5)), np.ones((2, 8))),
                                            (np.ones((3, 5)), np.ones((3, 8)))])
    assert boxes.shape == (2, 3, 5) and feats.shape == (2, 3, 8)
    assert mask.tolist() == [[True, True, False], [True, True, True]]
    assert feats[0, 2].abs().sum() == 0
    toks, lens = utils.pad_tokens([[5, 6, 7], []])
    assert toks.tolist() == [[5, 6, 7], [0, 0, 0]] and lens.tolist() == [3, 0]


def test_ndcg_hand_computed():
    l2 = np.log2
    assert ndcg_one([1, 2, 3, 4, 5], {1, 2, 3, 4, 5, 6}) == pytest.approx(1.0)
    # hits at ranks 2 and 4, 6 answers -> ideal has 5 ones
    dcg = 1 / l2(3) + 1 / l2(5)
    idcg = sum(1 / l2(i + 2) for i in range(5))
    assert ndcg_one([9, 1, 8, 2, 7], {1, 2, 3, 4, 5, 6}) == pytest.approx(dcg / idcg)
    # two answers, one not among the candidates: the ideal still counts both
    assert ndcg_one([1, 9, 8], {1, 42}) == pytest.approx(1 / (1 + 1 / l2(3)))
    assert ndcg_one([1, 2], set()) == 0.0


def test_ndcg_ties_and_missing_query():
    preds = {"7": [(3, 0.5), (1, 0.5), (2, 0.9)]}  # tie -> lower product id first
    assert metric.rank(preds["7"]) == [2, 1, 3]
    assert ndcg_at_k(preds, {7: {1}}) == pytest.approx(1 / np.log2(3))
    assert ndcg_at_k({7: [1, 2]}, {7: {1}}) == 1.0
    with pytest.raises(DataError, match="query 8"):
        ndcg_at_k(preds, {7: {1}, 8: {2}})


def test_recall_hand_computed():
    assert metric.recall_one([1, 9, 2, 8], {1, 2, 3}, k=2) == pytest.approx(1 / 2)
    assert metric.recall_one([1, 9, 2, 8], {1, 2, 3}, k=4) == pytest.approx(2 / 3)
    # more answers than places: k answers in the first k is a full score
    assert metric.recall_one([1, 2], set(range(1, 50)), k=2) == 1.0
    assert metric.recall_one([50, 1, 2], set(range(1, 50)), k=2) == pytest.approx(1 / 2)
    # a repeat is dropped, as in ndcg_one: it neither counts twice nor takes a place
    assert metric.recall_one([1, 1, 1], {1, 2}, k=2) == pytest.approx(1 / 2)
    assert metric.recall_one([1, 1, 2], {1, 2}, k=2) == 1.0
    assert metric.recall_one([1], set(), k=10) == 0.0
    preds = {"7": [(3, 0.5), (1, 0.5), (2, 0.9)], 8: [4, 5]}   # tie -> lower product id first
    assert metric.recall_at_k(preds, {7: {1, 3}, 8: {6}}, k=2) == pytest.approx((1 / 2 + 0) / 2)
    assert metric.recall_at_k(preds, {7: {1, 3}, 8: {5}}, k=3) == pytest.approx((1 + 1) / 2)
    with pytest.raises(DataError, match="query 9"):
        metric.recall_at_k(preds, {9: {1}}, k=2)


def test_check_submission_rules():
    metric.check_submission([(1, [1, 2, 3, 4, 5])], answers={1: {1}})
    for bad, msg in [([1, 2, 3, 4], "exactly 5"), ([1, 1, 2, 3, 4], "duplicate"),
                     ([1, 2, 3, 4, "x"], "non-digit"), ([1, 2, 3, 4, ""], "non-digit")]:
        with pytest.raises(DataError, match=msg):
            metric.check_submission([(1, bad)])
    with pytest.raises(DataError, match="lacks 1 queries"):
        metric.check_submission([(1, [1, 2, 3, 4, 5])], answers={1: {1}, 2: {3}})
    with pytest.raises(DataError, match="not candidates"):
        metric.check_submission([(1, [1, 2, 3, 4, 99])], candidates={1: [1, 2, 3, 4, 5, 6]})


@pytest.mark.parametrize("mutate,reason", [
    (lambda r: r.replace("\t", "\t\t", 1), "columns"),
    (lambda r: "\t".join(r.split("\t")[:5]) + "\n", "columns"),
    (lambda r: r.replace("\t2\t", "\t3\t", 1), "num_boxes implies"),
    (lambda r: r.replace("\t2\t", "\t0\t", 1), "num_boxes must be >= 1"),
    (lambda r: r.replace("100000008", "../x", 1), "product_id must be"),
    (lambda r: "\t".join(c if i != 5 else "@@@" + c[3:] for i, c in enumerate(r.split("\t"))),
     "base64"),
])
def test_bad_rows_name_file_line_reason(tmp_path, mutate, reason):
    data = str(tmp_path / "d")
    path = os.path.join(data, "train", "train.tsv")
    rows = [make_row(100000001 + i) for i in range(9)]
    rows[7] = mutate(rows[7])
    write_tsv(path, rows)
    with pytest.raises(DataError, match=r"train\.tsv:9: .*%s" % reason):
        prepare.preprocess(data, info=str(tmp_path / "i"), progress=False)
    assert not os.path.exists(os.path.join(data, "features", "..", "x.npz"))
    df = prepare.preprocess(data, info=str(tmp_path / "i"), skip_bad=True, progress=False)
    assert len(df) == 8  # good rows are never lost


def test_truncated_last_line_and_crlf(tmp_path):
    data = str(tmp_path / "d")
    path = os.path.join(data, "train", "train.tsv")
    rows = [make_row(100000001 + i).replace("\n", "\r\n") for i in range(4)]
    write_tsv(path, rows + [make_row(100000099)[:-500]])
    with pytest.raises(DataError, match=r"train\.tsv:6: truncated"):
        prepare.preprocess(data, info=str(tmp_path / "i"), progress=False)
    assert len(prepare.preprocess(data, info=str(tmp_path / "i"), skip_bad=True,
                                progress=False)) == 4


@pytest.mark.slow
def test_cli_preprocess_and_missing_file(tmp_path):
    r = subprocess.run([sys.executable, os.path.join(ROOT, "prepare.py"), "preprocess", "--data",
                        str(tmp_path / "nope"), "--info", str(tmp_path / "i")],
                       capture_output=True, text=True)
    assert r.returncode != 0 and "train.tsv: not found" in r.stderr


@pytest.mark.slow
def test_cli_preprocess_info_loads_anywhere(tiny_world, tmp_path):
    """`python prepare.py preprocess` writes an info/ that plain pickle loads without this
    project, and that load_info reads as the in-process run's."""
    info = str(tmp_path / "info")
    subprocess.run([sys.executable, os.path.join(ROOT, "prepare.py"), "preprocess", "--data",
                    tiny_world.data, "--info", info, "--no-progress"], check=True,
                   capture_output=True)
    code = ("import pickle, sys; q = pickle.load(open(sys.argv[1], 'rb')); "
            "print(len(q['products']['offsets']) - 1)")
    r = subprocess.run([sys.executable, "-c", code, os.path.join(info, "queries.pkl")],
                       cwd=str(tmp_path), capture_output=True, text=True, check=True)
    a, _ = utils.load_info(info)
    b, _ = utils.load_info(tiny_world.info)
    assert int(r.stdout) == len(b["query_id"])
    assert list(a["tokens"]) == list(b["tokens"])
    assert [x.tolist() for x in a["products"]] == [x.tolist() for x in b["products"]]


def test_store_reports_missing_and_corrupt(tmp_path):
    store = utils.ProductStore(str(tmp_path))
    with pytest.raises(DataError, match="missing"):
        store.get(123)
    with open(store.path(124), "wb") as f:
        f.write(b"garbage")
    with pytest.raises(DataError, match="corrupt"):
        store.get(124)
