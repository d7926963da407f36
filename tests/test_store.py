"""Performance features: the packed store, sharded preprocessing, and the fast paths that
must give what the slow ones give."""
import json
import os
import pickle
import shutil

import numpy as np
import pytest
import torch

import engine
import prepare
import utils
from tsv import DataError

INFO_FILES = ["queries.pkl", "vocab.json", "meta.json"]


@pytest.fixture(scope="module")
def packs(tiny_world, tmp_path_factory):
    root = tmp_path_factory.mktemp("packs")
    fp32, fp16 = str(root / "fp32"), str(root / "fp16")
    prepare.main(["pack", "--features", tiny_world.features, "--info", tiny_world.info,
                "--out", fp32, "--no-progress"])
    prepare.pack(tiny_world.features, tiny_world.info, fp16, fp16=True, progress=False)
    return fp32, fp16


def _train_pids(info):
    return utils.load_info(info)[0]["products"].flat.tolist()


@pytest.mark.parametrize("max_boxes", [None, 2])
def test_packed_get_equals_npz_exactly(tiny_world, packs, max_boxes):
    npz = utils.ProductStore(tiny_world.features, max_boxes)
    packed = utils.PackedStore(packs[0], max_boxes)
    pids = _train_pids(tiny_world.info)
    assert len(packed.pids) == len(pids)
    for pid in pids:
        for a, b in zip(npz.get(pid), packed.get(pid)):
            assert a.dtype == b.dtype and a.shape == b.shape and np.array_equal(a, b)


def test_packed_fp16_is_npz_rounded_to_half(tiny_world, packs):
    npz, half = utils.ProductStore(tiny_world.features), utils.PackedStore(packs[1])
    assert np.load(os.path.join(packs[1], "features.npy"), mmap_mode="r").dtype == np.float16
    for pid in _train_pids(tiny_world.info):
        (b1, f1, c1), (b2, f2, c2) = npz.get(pid), half.get(pid)
        assert f2.dtype == np.float32
        assert np.array_equal(f2, f1.astype(np.float16).astype(np.float32))
        assert np.array_equal(b1, b2) and np.array_equal(c1, c2)


def test_packed_errors_and_pickling(tiny_world, packs, tmp_path):
    with pytest.raises(DataError, match="index.npz: not found"):
        utils.PackedStore(str(tmp_path / "none"))
    store = utils.PackedStore(packs[0])
    with pytest.raises(DataError, match="not in"):
        store.get(5)
    # spawned DataLoader workers get the store pickled: the folder, not the arrays
    blob = pickle.dumps(store)
    assert len(blob) < 1000
    pid = _train_pids(tiny_world.info)[0]
    assert all(np.array_equal(a, b) for a, b in zip(pickle.loads(blob).get(pid), store.get(pid)))


def test_a_killed_pack_leaves_no_loadable_pack(tiny_world, packs, tmp_path, monkeypatch):
    out = str(tmp_path / "pack")
    shutil.copytree(packs[0], out)
    calls = []

    def dying_get(self, pid):
        calls.append(pid)
        if len(calls) == 10:
            raise KeyboardInterrupt
        return get(self, pid)
    get = utils.ProductStore.get
    monkeypatch.setattr(utils.ProductStore, "get", dying_get)
    with pytest.raises(KeyboardInterrupt):
        prepare.pack(tiny_world.features, tiny_world.info, out, progress=False)
    with pytest.raises(DataError, match="not found"):
        utils.PackedStore(out)


def _preprocess_sharded(w, features, info, order, n):
    for i in order:
        assert prepare.preprocess(w.data, features=features, info=info, workers=1,
                                  progress=False, shard=(i, n)) is None
    return prepare.preprocess(w.data, features=features, info=info, merge=True, progress=False)


@pytest.mark.slow
def test_union_of_shards_equals_a_plain_run_byte_for_byte(tiny_world, tmp_path):
    plain_f, plain_i = str(tmp_path / "pf"), str(tmp_path / "pi")
    prepare.preprocess(tiny_world.data, features=plain_f, info=plain_i, workers=2,
                       progress=False)
    shard_f, shard_i = str(tmp_path / "sf"), str(tmp_path / "si")
    _preprocess_sharded(tiny_world, shard_f, shard_i, [2, 0, 1], 3)  # any order
    names = sorted(os.listdir(plain_f))
    # every product's .npz and the fingerprint of the train.tsv they came from
    assert names == sorted(os.listdir(shard_f)) and len(names) == 631 + 1
    assert names[0] == prepare.SOURCE
    for name in names:
        with open(os.path.join(plain_f, name), "rb") as a, \
                open(os.path.join(shard_f, name), "rb") as b:
            assert a.read() == b.read(), name
    for name in INFO_FILES:
        with open(os.path.join(plain_i, name), "rb") as a, \
                open(os.path.join(shard_i, name), "rb") as b:
            assert a.read() == b.read(), name


def test_shards_on_the_command_line(tiny_world, tmp_path):
    feats, info = str(tmp_path / "f"), str(tmp_path / "i")
    base = ["preprocess", "--data", tiny_world.data, "--features", feats, "--info", info,
            "--workers", "1", "--no-progress"]
    for i in range(2):
        prepare.main(base + ["--shard", "%d/2" % i])
    assert sorted(os.listdir(os.path.join(info, "parts"))) == [
        "part-00000-of-00002.pkl", "part-00001-of-00002.pkl"]
    assert not os.path.exists(os.path.join(info, "queries.pkl"))  # only the merge writes it
    prepare.main(base + ["--merge"])
    with open(os.path.join(info, "meta.json")) as f:
        assert json.load(f)["rows"] == 631
    for bad in ["2/2", "1", "a/3", "-1/2"]:
        with pytest.raises(SystemExit):
            prepare.parse_args(base + ["--shard", bad])
    with pytest.raises(SystemExit):
        prepare.parse_args(base + ["--shard", "0/2", "--merge"])


def test_merge_refuses_missing_mixed_or_stale_parts(tiny_world, tmp_path):
    data = str(tmp_path / "data")
    shutil.copytree(tiny_world.data, data, ignore=shutil.ignore_patterns("features"))
    feats, info = str(tmp_path / "f"), str(tmp_path / "i")
    with pytest.raises(DataError, match="no parts"):
        prepare.preprocess(data, features=feats, info=info, merge=True, progress=False)
    prepare.preprocess(data, features=feats, info=info, shard=(0, 3), progress=False)
    prepare.preprocess(data, features=feats, info=info, shard=(2, 3), progress=False)
    with pytest.raises(DataError, match=r"shards \[1\] of 3 have not finished"):
        prepare.preprocess(data, features=feats, info=info, merge=True, progress=False)
    prepare.preprocess(data, features=feats, info=info, shard=(0, 2), progress=False)
    with pytest.raises(DataError, match="several --shard splits"):
        prepare.preprocess(data, features=feats, info=info, merge=True, progress=False)
    os.remove(os.path.join(info, "parts", "part-00000-of-00002.pkl"))
    prepare.preprocess(data, features=feats, info=info, shard=(1, 3), progress=False)
    path = os.path.join(data, "train", "train.tsv")
    os.truncate(path, os.path.getsize(path) - 1)  # the input changed since the shards ran
    with pytest.raises(DataError, match="rerun the shards"):
        prepare.preprocess(data, features=feats, info=info, merge=True, progress=False)


def test_a_bad_row_stops_its_shard_with_file_and_line(tiny_world, tmp_path):
    data = str(tmp_path / "data")
    shutil.copytree(tiny_world.data, data, ignore=shutil.ignore_patterns("features"))
    path = os.path.join(data, "train", "train.tsv")
    with open(path, encoding="utf-8") as f:
        lines = f.readlines()
    cols = lines[600].split("\t")
    cols[3] = "x"
    lines[600] = "\t".join(cols)
    with open(path, "w", encoding="utf-8") as f:
        f.writelines(lines)
    run = dict(features=str(tmp_path / "f"), info=str(tmp_path / "i"), progress=False)
    prepare.preprocess(data, shard=(0, 2), **run)  # the row is not in it
    with pytest.raises(DataError, match=r"train.tsv:601: num_boxes"):
        prepare.preprocess(data, shard=(1, 2), **run)
    prepare.preprocess(data, shard=(1, 2), skip_bad=True, **run)
    df = prepare.preprocess(data, merge=True, skip_bad=True, **run)
    assert len(df) == 630


def _log(out):
    with open(os.path.join(out, "log.jsonl")) as f:
        return [json.loads(line) for line in f]


@pytest.mark.slow
def test_every_stage_trains_the_same_from_either_store(tiny_world, packs, tmp_path):
    from model1 import train as m1_train
    from multilabel import export_model, train as ml_train
    common = ["--data", tiny_world.data, "--info", tiny_world.info, "--preset", "tiny",
              "--workers", "0", "--epochs", "1", "--no-progress", "--no-eval",
              "--steps-per-epoch", "4"]
    runs = {}
    for store in ("npz", "packed"):
        out = str(tmp_path / ("ml_" + store))
        ml_train.main(common + ["--out", out, "--store", store, "--packed", packs[0]])
        runs["ml", store] = _log(out)[0]
        export = os.path.join(out, "encoder.pt")
        export_model.main(["--ckpt", os.path.join(out, "best.pt"), "--out", export])
        out = str(tmp_path / ("m1_" + store))
        m1_train.main(common + ["--out", out, "--store", store, "--packed", packs[0],
                                "--export", export])
        runs["m1", store] = _log(out)[0]
    for stage in ("ml", "m1"):
        assert runs[stage, "npz"]["loss"] == runs[stage, "packed"]["loss"]


def test_store_flag_defaults_to_npz_and_packed_beside_features():
    from multilabel import train as ml_train
    args = engine.apply_preset(ml_train.parse_args(["--out", "o", "--data", "/d"]),
                               ml_train.PRESETS)
    assert args.store == "npz" and isinstance(engine.build_store(args), utils.ProductStore)
    assert args.packed == os.path.join("/d", "packed")


def test_pad_tokens_keeps_ids_and_lengths():
    toks, lens = utils.pad_tokens([[5, 6, 7], [], [9]], pad=0)
    assert toks.dtype == torch.long and toks.tolist() == [[5, 6, 7], [0, 0, 0], [9, 0, 0]]
    assert lens.tolist() == [3, 0, 1]


@pytest.mark.parametrize("uniform", [False, True])
def test_model1_score_pairs_is_the_diagonal_of_score_matrix(uniform):
    from model1.model import WordImageMatcher
    from layers import ENCODER_PRESETS, ImageEncoder
    torch.manual_seed(0)
    m = WordImageMatcher(ImageEncoder(ENCODER_PRESETS["tiny"]), torch.randn(12, 32), hidden=8,
                         weight_hidden=8, uniform_weights=uniform).eval()
    mask = torch.rand(5, 4) < 0.7
    mask[:, 0] = True
    heads = m.encode_image(torch.rand(5, 4, 5), torch.rand(5, 4, 2048), mask)
    text = m.encode_text(torch.tensor([[4, 5, 0], [6, 0, 0], [0, 0, 0], [7, 8, 9], [3, 0, 0]]))
    got = m.score_pairs(text, heads)
    assert got.shape == (5,) and got[2] == 0  # a query with no words
    assert torch.allclose(got, m.score_matrix(text, heads).diagonal(), atol=1e-6)


def test_products_are_encoded_in_size_order_and_returned_in_pid_order(tiny_world):
    queries, vocab = utils.load_info(tiny_world.info)
    cset = utils.CandidateSet.from_tsv(os.path.join(tiny_world.data, "valid/valid.tsv"), vocab)
    sizes = [int(b["mask"].sum(1).max()) for b in cset.product_batches(16)]
    assert sizes == sorted(sizes)  # alike products batched together: little padding

    def encode(boxes, feats, mask):  # (B, 2): the first feature and the box count
        return torch.stack([feats[:, 0, 0], mask.sum(1).float()], 1)
    got = engine.encode_products(encode, cset, torch.device("cpu"), batch_size=16)
    first = torch.from_numpy(cset.feats[cset.box_off[:-1], 0])
    assert torch.equal(got[:, 0], first)
    assert torch.equal(got[:, 1], torch.from_numpy(np.diff(cset.box_off)).float())


def test_npz_writer_matches_numpy(tmp_path):
    """The hand-written .npz is a valid zip (CRCs checked) whose members are np.save's bytes."""
    import io
    import zipfile
    rng = np.random.default_rng(0)
    arrays = dict(features=rng.random((3, 2048), dtype=np.float32),
                  boxes=rng.random((3, 4), dtype=np.float32), class_labels=np.arange(3),
                  image_hw=np.array([5, 6]), empty=np.zeros((0, 4), np.float32),
                  big_endian=np.arange(4, dtype=">i4"), fortran=np.asfortranarray(np.eye(3)))
    path = str(tmp_path / "x.npz")
    prepare.save_npz_atomic(path, **arrays)
    with zipfile.ZipFile(path) as z:
        assert z.testzip() is None and z.namelist() == [k + ".npy" for k in arrays]
        for k, v in arrays.items():
            buf = io.BytesIO()
            np.save(buf, np.ascontiguousarray(v))
            assert z.read(k + ".npy") == buf.getvalue(), k
    with np.load(path) as d:
        for k, v in arrays.items():
            assert d[k].dtype == v.dtype and np.array_equal(d[k], v), k
    assert os.listdir(tmp_path) == ["x.npz"]  # no temporary file left
