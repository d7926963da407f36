"""Hostile input to the data side: each case is refused with the file, the line or key and
the reason (or has the documented behaviour of docs/bad-input.md), and no later stage runs
on poisoned or partial inputs."""
import json
import os
import re
import shutil

import numpy as np
import pytest

import ensemble
import metric
import prepare
import tsv
import utils
from rows import make_row, write_tsv
from tsv import DataError


def _train(tmp_path, rows, header=tsv.COLUMNS):
    """A data root whose train.tsv holds ``rows`` -> (data, info)."""
    data, info = str(tmp_path / "d"), str(tmp_path / "i")
    write_tsv(os.path.join(data, "train", "train.tsv"), rows, header)
    return data, info


def _good_rows(n=9):
    return [make_row(100000001 + i, qid=5 + i % 2) for i in range(n)]


def _tree(folder):
    out = {}
    for d, _, names in os.walk(folder):
        for name in names:
            with open(os.path.join(d, name), "rb") as f:
                out[os.path.relpath(os.path.join(d, name), folder)] = f.read()
    return out


# --------------------------------------------------------------------------------------
# Feature range and --max-boxes
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("value", [3e38, -2e4])
def test_huge_finite_feature_is_refused_with_the_limit(tmp_path, value):
    rows = _good_rows()
    f = np.ones((2, 2048), np.float32)
    f[1, 5] = value
    rows[7] = make_row(100000008, feats=f)
    data, info = _train(tmp_path, rows)
    with pytest.raises(DataError, match=r"train\.tsv:9: a feature is %s, beyond the limit "
                                        r"\|x\| <= 10000" % re.escape("%g" % value)):
        prepare.preprocess(data, info=info, progress=False)
    assert not os.path.exists(os.path.join(info, "queries.pkl"))
    df = prepare.preprocess(data, info=info, skip_bad=True, progress=False)
    assert len(df) == 8 and 100000008 not in set(df.product_id)
    path = write_tsv(str(tmp_path / "v.tsv"), rows)
    with pytest.raises(DataError, match=r"v\.tsv:9: a feature is"):
        tsv.read_candidates(path)
    f[1, 5] = tsv.FEATURE_LIMIT  # the limit itself is accepted
    tsv.parse_row(make_row(100000008, feats=f).rstrip("\n"))


@pytest.mark.parametrize("k", [0, -1])
def test_max_boxes_below_one_is_refused(tiny_world, k):
    with pytest.raises(DataError, match="max_boxes must be >= 1 .*got %d" % k):
        utils.ProductStore(tiny_world.features, k)
    with pytest.raises(DataError, match="max_boxes must be >= 1"):
        utils.PackedStore(str(tiny_world.root), k)
    cands = tsv.read_candidates(os.path.join(tiny_world.data, "valid", "valid.tsv"))
    _, vocab = utils.load_info(tiny_world.info)
    with pytest.raises(DataError, match="max_boxes must be >= 1"):
        utils.CandidateSet(cands, vocab, k)


# --------------------------------------------------------------------------------------
# The submission covers every test query
# --------------------------------------------------------------------------------------
def _ensemble_world(root):
    """Prediction files of 6 valid and 6 test queries, 6 candidates each, and a data root
    with valid answers and the test TSV -> (pred_dir, data)."""
    rng = np.random.default_rng(0)
    cands = {q: [103000000 + 10 * q + j for j in range(6)] for q in range(1, 7)}
    pred, data = root / "pred", root / "data"
    for split in ("valid", "test"):
        for m in ensemble.MODELS:
            metric.write_predictions({q: [(p, float(rng.random())) for p in ps]
                                      for q, ps in cands.items()},
                                     str(pred / ("%s_pred_%s.json" % (split, m))))
    os.makedirs(data / "valid")
    (data / "valid" / "valid_answer.json").write_text(
        json.dumps({str(q): ps[:2] for q, ps in cands.items()}))
    write_tsv(str(data / "testB" / "testB.tsv"),
              [make_row(p, qid=q, n=1) for q, ps in cands.items() for p in ps])
    return str(pred), str(data)


def test_submission_needs_every_test_query_without_test_answers(tmp_path):
    """The real-release case: no test answers. A test query of testB.tsv that the prediction
    files lack stops the run, naming it; submission.csv is not written."""
    pred, data = _ensemble_world(tmp_path / "t")
    out = str(tmp_path / "sub" / "submission.csv")
    argv = ["--pred-dir", pred, "--valid-answers",
            os.path.join(data, "valid", "valid_answer.json"), "--out", out, "--k", "2",
            "--grid", "5"]
    ensemble.main(argv)  # testB/testB.tsv found beside valid/: complete, fine
    os.remove(out)
    for m in ensemble.MODELS:
        path = os.path.join(pred, "test_pred_%s.json" % m)
        preds = metric.load_predictions(path)
        del preds[3], preds[5]
        metric.write_predictions({q: list(s.items()) for q, s in preds.items()}, path)
    with pytest.raises(SystemExit, match=r"test predictions lack 2 of the 6 queries of "
                                         r".*testB\.tsv: query ids 3, 5"):
        ensemble.main(argv)
    assert not os.path.exists(out)
    with pytest.raises(SystemExit, match=r"elsewhere\.tsv: not found"):
        ensemble.main(argv + ["--test-tsv", str(tmp_path / "elsewhere.tsv")])
    # a valid query of the answer file missing from the predictions stops it too
    pred, data = _ensemble_world(tmp_path / "v")
    for m in ensemble.MODELS:
        path = os.path.join(pred, "valid_pred_%s.json" % m)
        preds = metric.load_predictions(path)
        del preds[3]
        metric.write_predictions({q: list(s.items()) for q, s in preds.items()}, path)
    argv[1], argv[3] = pred, os.path.join(data, "valid", "valid_answer.json")
    with pytest.raises(SystemExit, match="no entry for query 3"):
        ensemble.main(argv)
    assert not os.path.exists(out)


# --------------------------------------------------------------------------------------
# Corrupt .npz
# --------------------------------------------------------------------------------------
def _damage(path, how):
    with open(path, "rb") as f:
        data = bytearray(f.read())
    if how == "truncated":
        data = data[:len(data) // 2]
    else:  # one flipped byte among the features
        data[len(data) // 2] ^= 0x10
    with open(path, "wb") as f:
        f.write(data)


@pytest.mark.parametrize("how", ["truncated", "flipped byte"])
def test_corrupt_npz_is_named_and_a_rerun_rewrites_it(tiny_world, tmp_path, how):
    data, info = str(tmp_path / "d"), str(tmp_path / "i")
    os.makedirs(os.path.join(data, "train"))
    shutil.copy(os.path.join(tiny_world.data, "train", "train.tsv"),
                os.path.join(data, "train"))
    feats = os.path.join(data, "features")
    shutil.copytree(tiny_world.features, feats)
    shutil.copytree(tiny_world.info, info)
    pid = int(utils.load_info(info)[0]["products"].flat[0])
    path = utils.npz_path(feats, pid)
    _damage(path, how)
    store = utils.ProductStore(feats)
    msg = r"%s: corrupt .*rerun `python prepare.py preprocess`" % path
    with pytest.raises(DataError, match=msg):
        store.get(pid)
    with pytest.raises(DataError, match=msg):
        prepare.pack(feats, info, str(tmp_path / "pack"), progress=False)
    prepare.preprocess(data, info=info, workers=1, progress=False)
    with open(path, "rb") as a, open(utils.npz_path(tiny_world.features, pid), "rb") as b:
        assert a.read() == b.read()


def test_corrupt_pack_is_named(tiny_world, tmp_path):
    out = prepare.pack(tiny_world.features, tiny_world.info, str(tmp_path / "pack"),
                       progress=False)
    _damage(os.path.join(out, "index.npz"), "truncated")
    with pytest.raises(DataError, match=r"index\.npz: corrupt .*rerun `python prepare.py pack"):
        utils.PackedStore(out)


# --------------------------------------------------------------------------------------
# Ids: leading zeros, out of range
# --------------------------------------------------------------------------------------
def test_id_with_a_leading_zero_is_stored_where_readers_look(tmp_path):
    rows = _good_rows()
    rows[7] = make_row(102807161).replace("102807161", "0102807161", 1)
    data, info = _train(tmp_path, rows)
    df = prepare.preprocess(data, info=info, progress=False)
    assert 102807161 in set(df.product_id)
    feats = os.path.join(data, "features")
    boxes, f, labels = utils.ProductStore(feats).get(102807161)
    assert f.shape == (2, 2048)
    prepare.pack(feats, info, str(tmp_path / "pack"), progress=False)
    assert np.array_equal(utils.PackedStore(str(tmp_path / "pack")).get(102807161)[1], f)
    cands = tsv.read_candidates(write_tsv(str(tmp_path / "v.tsv"), rows))
    assert 102807161 in {r["product_id"] for r in cands[5]["products"]}
    write_tsv(os.path.join(data, "train", "train.tsv"), rows + [make_row(102807161, qid=6)])
    with pytest.raises(DataError, match=r"train\.tsv:11: duplicate product_id 102807161"):
        prepare.preprocess(data, info=str(tmp_path / "i2"), progress=False)


OUT_OF_RANGE = {  # name -> (column, text); row 9 of train.tsv
    "product_id beyond int64": (0, str(2 ** 63)),
    "product_id too long for a file name": (0, "1" * 300),
    "image_h beyond int64": (1, "9" * 30),
    "num_boxes beyond int64": (3, str(2 ** 64)),
    "query_id beyond int64": (8, "1" * 25),
}


@pytest.mark.parametrize("case", sorted(OUT_OF_RANGE))
def test_out_of_range_field_is_a_bad_row(tmp_path, case):
    col, text = OUT_OF_RANGE[case]
    rows = _good_rows()
    cells = rows[7].rstrip("\n").split("\t")
    cells[col] = text
    rows[7] = "\t".join(cells) + "\n"
    data, info = _train(tmp_path, rows)
    name = tsv.COLUMNS[col]
    with pytest.raises(DataError, match=r"train\.tsv:9: %s .*beyond int64" % name):
        prepare.preprocess(data, info=info, workers=2, progress=False)
    df = prepare.preprocess(data, info=info, workers=2, skip_bad=True, progress=False)
    assert len(df) == 8
    with pytest.raises(DataError, match=r"v\.tsv:9: %s .*beyond int64" % name):
        tsv.read_candidates(write_tsv(str(tmp_path / "v.tsv"), rows))


# --------------------------------------------------------------------------------------
# Duplicate candidates
# --------------------------------------------------------------------------------------
def test_duplicate_candidates_do_not_inflate_ndcg(tmp_path):
    assert metric.ndcg_one([7, 7, 7, 7, 7], {7}) == 1.0
    assert metric.ndcg_one([7, 7, 8], {7, 8}) == pytest.approx(
        metric.ndcg_one([7, 8], {7, 8}))
    rows = [make_row(103000001 + i, qid=7) for i in range(6)]
    rows[4] = rows[1]
    path = write_tsv(str(tmp_path / "v.tsv"), rows)
    with pytest.raises(DataError, match=r"v\.tsv:6: query 7 lists product 103000002 again "
                                        r"\(first on line 3\)"):
        tsv.read_candidates(path)
    cands = tsv.read_candidates(path, skip_bad=True)
    assert [r["product_id"] for r in cands[7]["products"]] == [103000001, 103000002, 103000003,
                                                                103000004, 103000006]


# --------------------------------------------------------------------------------------
# A failed preprocess, an empty pack
# --------------------------------------------------------------------------------------
def test_failed_preprocess_leaves_info_as_it_was(tmp_path, monkeypatch):
    data, info = _train(tmp_path, _good_rows())
    prepare.preprocess(data, info=info, progress=False)
    before = _tree(info)
    bad = [make_row(100000101 + i).replace("\t2\t", "\t0\t", 1) for i in range(4)]
    write_tsv(os.path.join(data, "train", "train.tsv"), bad)
    with pytest.raises(DataError, match=r"train\.tsv: no good rows \(4 bad rows skipped\)"):
        prepare.preprocess(data, info=info, skip_bad=True, progress=False)
    assert _tree(info) == before
    # a failure while writing info/ (here: the last file) leaves it as it was too
    write_tsv(os.path.join(data, "train", "train.tsv"), _good_rows(6))
    real = utils.atomic_json

    def failing(obj, path):
        if "meta.json" in path:
            raise OSError(28, "No space left on device")
        real(obj, path)
    monkeypatch.setattr(utils, "atomic_json", failing)
    with pytest.raises(OSError, match="No space left"):
        prepare.preprocess(data, info=info, progress=False)
    assert _tree(info) == before


def test_pack_of_no_products_is_an_error(tiny_world, tmp_path):
    info = str(tmp_path / "info")
    shutil.copytree(tiny_world.info, info)
    with open(os.path.join(info, "queries.pkl"), "rb") as f:
        q = __import__("pickle").load(f)
    q["products"] = utils.Ragged(np.zeros(0, np.int64), np.zeros(len(q["query_id"]) + 1,
                                                                  np.int64)).state()
    prepare._pickle(q, os.path.join(info, "queries.pkl"))
    with pytest.raises(DataError, match=r"queries\.pkl: lists no products"):
        prepare.pack(tiny_world.features, info, str(tmp_path / "pack"), progress=False)


# --------------------------------------------------------------------------------------
# Messages: answer files, two query texts, header order
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("content,reason", [
    (b'{"7": [103000001', "not valid JSON"),
    ('{"7": [103000001]}'.encode("utf-16"), "not UTF-8"),
    (b'[[7, 103000001]]', "expected an object"),
    (b'{"x": [103000001]}', "query id 'x' is not an integer"),
    (b'{"7": 103000001}', "query 7: expected a list of product ids"),
    (b'{"7": ["a1"]}', "query 7: product id 'a1' is not an integer"),
    (b'{"7": [1.5]}', "query 7: product id 1.5 is not an integer"),
])
def test_bad_answer_file_names_file_and_reason(tmp_path, content, reason):
    path = tmp_path / "valid_answer.json"
    path.write_bytes(content)
    with pytest.raises(DataError, match=r"valid_answer\.json: .*%s" % reason):
        metric.load_answers(str(path))
    with pytest.raises(DataError, match=r"nope\.json: not found"):
        metric.load_answers(str(tmp_path / "nope.json"))


def test_two_query_texts_give_both_lines_and_texts(tmp_path):
    rows = [make_row(100000001 + i, qid=5) for i in range(4)]
    rows[3] = make_row(100000004, query="blue shirt", qid=5)
    data, info = _train(tmp_path, rows)
    msg = r"query_id 5 has two different texts: 'red dress' \(line 2\) and 'blue shirt' " \
          r"\(line 5\)"
    with pytest.raises(DataError, match=r"train\.tsv:5: " + msg):
        prepare.preprocess(data, info=info, progress=False)
    with pytest.raises(DataError, match=r"v\.tsv:5: " + msg):
        tsv.read_candidates(write_tsv(str(tmp_path / "v.tsv"), rows))


def test_header_in_another_order_says_so(tmp_path):
    header = list(tsv.COLUMNS)
    header[1], header[2] = header[2], header[1]
    data, info = _train(tmp_path, _good_rows(), header)
    with pytest.raises(DataError, match=r"train\.tsv:1: the columns are in another order"):
        prepare.preprocess(data, info=info, progress=False)
    with pytest.raises(DataError, match=r"v\.tsv:1: the columns are in another order"):
        tsv.read_candidates(write_tsv(str(tmp_path / "v.tsv"), _good_rows(), header))


def test_a_full_disk_is_named_and_the_previous_file_kept(tmp_path, monkeypatch):
    """A write that runs out of space (``/dev/full`` stands in for a full disk) names the
    file and keeps what was there; no temporary is left behind."""
    import runtime
    import torch
    path = str(tmp_path / "last.pt")
    runtime.save_checkpoint({"w": torch.ones(3)}, path)
    before = open(path, "rb").read()
    real = open

    def full(name, mode="r", *a, **k):  # every temporary lands on a full disk
        return real("/dev/full" if ".tmp" in str(name) else name, mode, *a, **k)
    monkeypatch.setattr(utils, "open", full, raising=False)
    for write in (lambda: runtime.save_checkpoint({"w": torch.zeros(10 ** 5)}, path),
                  lambda: utils.atomic_json({"q": list(range(10 ** 4))}, path)):
        with pytest.raises(DataError, match=re.escape(path) + ".*no space left on the disk"):
            write()
    assert open(path, "rb").read() == before and os.listdir(tmp_path) == ["last.pt"]


def test_pack_refuses_a_disk_without_room(tiny_world, tmp_path, monkeypatch):
    """The packed store is written through a memory map, where a full disk would be a
    SIGBUS: pack checks the room first and says how much it needs."""
    monkeypatch.setattr(prepare.shutil, "disk_usage",
                        lambda p: shutil._ntuple_diskusage(10 ** 9, 10 ** 9 - 1000, 1000))
    out = str(tmp_path / "packed")
    with pytest.raises(DataError, match=re.escape(out) + ": the packed store needs .* GB, "
                                        "the disk has 0.00 GB free"):
        prepare.pack(tiny_world.features, info=tiny_world.info, out=out, progress=False)
    assert not any(n.endswith(".tmp") for n in os.listdir(out))


# --------------------------------------------------------------------------------------
# Numbers refused at parse time, each with its own message
# --------------------------------------------------------------------------------------
def _parsers():
    from catalogue import retrieve
    from model3 import train as m3_train
    from multilabel import validation as ml_validation
    return {"train": lambda argv: m3_train.parse_args(["--out", "o"] + argv),
            "retrieve": lambda argv: retrieve.parse_args(["--ckpt", "c.pt"] + argv),
            "ensemble": lambda argv: ensemble.parse_args(["--valid-answers", "v.json"] + argv),
            "captions": lambda argv: ml_validation.main(["--ckpt", "c.pt"] + argv)}


BAD_NUMBERS = [  # parser, flag, value, what its message says
    ("train", "--epochs", "0", r"must be >= 1 \(the epochs to train"),
    ("train", "--epochs", "-2", r"must be >= 1 \(the epochs to train"),
    ("train", "--batch-size", "0", r"must be >= 1 \(the pairs of a step on each process\)"),
    ("train", "--dist-timeout", "0", r"must be > 0 \(the seconds a collective waits\)"),
    ("train", "--dist-timeout", "-5", r"must be > 0 \(the seconds a collective waits\)"),
    ("train", "--dist-timeout", "nan", r"must be > 0 \(the seconds a collective waits\)"),
    ("train", "--workers", "-1", r"must be >= 0 \(0 reads in the main process\)"),
    ("train", "--steps-per-epoch", "0", r"must be >= 1 \(leave it out for whole epochs\)"),
    ("train", "--lr-text", "0", r"must be > 0 \(a learning rate\)"),
    ("train", "--p-last", "1.5", r"must be in \[0, 1\] \(a probability\)"),
    ("train", "--epochs", "two", r"expected an integer, got 'two'"),
    ("retrieve", "--k", "0", r"must be >= 1 \(the products listed per query\)"),
    ("retrieve", "--batch-size", "0", r"must be >= 1 \(the products encoded at once\)"),
    ("retrieve", "--rerank-chunk", "0", r"must be >= 1 \(the queries re-ranked at once\)"),
    ("ensemble", "--simplex-step", "0", r"must be in \(0, 1\] \(1/m for a whole m\)"),
    ("ensemble", "--simplex-step", "0.3", r"must be 1/m for a whole m"),
    ("ensemble", "--grid", "1", r"must be >= 2 \(the t grid's points"),
    ("ensemble", "--k", "1", r"must be >= 2 \(the folds of the k-fold estimate\)"),
    ("captions", "--beam", "0", r"must be >= 1 \(the captions kept at each step\)"),
]


@pytest.mark.parametrize("parser,flag,value,says", BAD_NUMBERS)
def test_a_number_out_of_range_is_refused_at_parse_time(capsys, parser, flag, value, says):
    with pytest.raises(SystemExit) as e:
        _parsers()[parser]([flag, value])
    assert e.value.code == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert re.search(r"error: argument %s: (%s)" % (flag, says), last), last
    assert "every box" not in last


def test_each_flag_has_its_own_message(capsys):
    said = {}
    for parser, flag, value, _ in BAD_NUMBERS:
        with pytest.raises(SystemExit):
            _parsers()[parser]([flag, value])
        last = capsys.readouterr().err.strip().splitlines()[-1]
        if "must be" in last:
            said.setdefault((parser, flag), last.split(flag + ": ", 1)[1].rsplit(", got", 1)[0])
    assert len(set(said.values())) == len(said), said


# --------------------------------------------------------------------------------------
# Files checked before heavy work: the output folder, splits, answers, folders for files
# --------------------------------------------------------------------------------------
def _read_only(tmp_path):
    """A folder this process cannot write in: a chmod 555 folder, or /sys for root."""
    ro = tmp_path / "ro"
    os.makedirs(ro)
    os.chmod(ro, 0o555)
    try:
        with open(ro / "probe", "w"):
            pass
    except OSError:
        return str(ro)
    os.remove(ro / "probe")
    return "/sys"


def test_a_read_only_out_is_one_line_before_any_work(tmp_path, tiny_world):
    from model3 import train as m3_train
    ro = os.path.join(_read_only(tmp_path), "m3")
    with pytest.raises(DataError, match=r"--out %s: cannot write in " % re.escape(ro)):
        m3_train.main(["--data", tiny_world.data, "--info", str(tmp_path / "no-info"),
                       "--preset", "tiny", "--out", ro])
    pred, data = _ensemble_world(tmp_path / "e")
    with pytest.raises(SystemExit, match=r"error: --out .*: cannot write in "):
        ensemble.main(["--pred-dir", pred, "--valid-answers",
                       os.path.join(data, "valid", "valid_answer.json"),
                       "--out", os.path.join(ro, "submission.csv"), "--k", "2"])
    a_file = tmp_path / "a_file"
    a_file.write_text("")
    with pytest.raises(SystemExit, match=r"error: --out .*a_file/sub: .*a_file is a file, "
                                         r"not a folder"):
        ensemble.main(["--pred-dir", pred, "--valid-answers",
                       os.path.join(data, "valid", "valid_answer.json"),
                       "--out", str(a_file / "sub" / "submission.csv"), "--k", "2"])


def test_a_missing_valid_answers_file_is_named_as_such(tmp_path):
    pred, data = _ensemble_world(tmp_path / "e")
    os.remove(os.path.join(data, "testB", "testB.tsv"))
    with pytest.raises(SystemExit, match=r"error: .*nowhere\.json: not found; expected the "
                                         r"--valid-answers file"):
        ensemble.main(["--pred-dir", pred, "--valid-answers", str(tmp_path / "nowhere.json"),
                       "--out", str(tmp_path / "s.csv")])
    with pytest.raises(SystemExit, match=r"error: .*valid: a folder; expected the "
                                         r"--valid-answers file"):
        ensemble.main(["--pred-dir", pred, "--valid-answers", os.path.join(data, "valid"),
                       "--out", str(tmp_path / "s.csv")])


def test_a_split_missing_empty_or_a_folder_is_one_line(tmp_path):
    import engine
    data = tmp_path / "d"
    with pytest.raises(DataError, match=r"valid\.tsv: not found; expected the candidate TSV "
                                        r"of the valid split"):
        engine.split_tsv(str(data), "valid")
    os.makedirs(data / "testB" / "testB.tsv")
    with pytest.raises(DataError, match=r"testB\.tsv: a folder; expected the candidate TSV"):
        engine.split_tsv(str(data), "testB")
    empty = write_tsv(str(data / "valid" / "valid.tsv"), [])
    with pytest.raises(DataError, match=r"valid\.tsv: no rows after the header"):
        tsv.read_candidates(empty)
    bad = write_tsv(str(data / "valid" / "bad.tsv"), [make_row(1, n=1)[:-30] + "\n"])
    with pytest.raises(DataError, match=r"bad\.tsv: no good rows \(1 bad rows skipped\)"):
        tsv.read_candidates(bad, skip_bad=True)
    with pytest.raises(DataError, match=r"testB: a folder; expected a JSON file"):
        metric.load_answers(str(data / "testB"))
