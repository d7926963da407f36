"""catalogue/index.py and catalogue/search.py on the tiny world: the saved index searched with a
stand-in model equals retrieve.py's ranking for the same query texts; each product shown
with its classes, box count and train queries; another checkpoint, a changed checkpoint,
another catalogue and a folder of mixed files are refused; a query of unknown words is
named and not searched; the re-ranking of the K by a blend of stand-in members; slow:
model3 trained on the tiny world, its index built and searched with a train query's text,
and its lean text side against the whole model's."""
import json
import os
import shutil

import numpy as np
import pytest
import torch

import tsv
import utils
from catalogue import index as index_cmd, query, rerank, retrieve, saved_index, search
from model3 import train as m3_train
from test_retrieve import _first_feature, _pair_scorer, _stand_in, _write_blend
from test_stages import _common
from tsv import DataError

pytest.importorskip("faiss")


def _checkpoint(path, content=b"model3 weights"):
    """A file standing for the checkpoint: the index fingerprints its bytes."""
    with open(path, "wb") as f:
        f.write(content)
    return str(path)


@pytest.fixture()
def stand_in_index(tiny_world, tmp_path, monkeypatch):
    """The tiny world's catalogue indexed with the stand-in model -> (index folder, its
    checkpoint, the model, vocab)."""
    model, vocab = _stand_in(tiny_world, monkeypatch)
    monkeypatch.setattr(query, "load_query_encoder", lambda *a: (model, vocab, {}))
    ckpt, out = _checkpoint(tmp_path / "best.pt"), str(tmp_path / "index")
    index_cmd.main(["--ckpt", ckpt, "--out", out, "--batch-size", "64", "--no-progress"])
    return out, ckpt, model, vocab


def _valid_queries(tiny_world):
    cands = tsv.read_candidates(os.path.join(tiny_world.data, "valid", "valid.tsv"),
                                with_arrays=False)
    return sorted(cands), [cands[q]["query"] for q in sorted(cands)]


def _search_json(argv, capsys):
    status = search.main(argv + ["--json"])
    return status, json.loads(capsys.readouterr().out)


def test_search_equals_retrieve_for_the_same_queries(stand_in_index, tiny_world, tmp_path,
                                                     capsys):
    out, ckpt, _, _ = stand_in_index
    qids, texts = _valid_queries(tiny_world)
    qfile = tmp_path / "queries.txt"
    qfile.write_text("\n".join(texts) + "\n", encoding="utf-8")
    status, entries = _search_json(["--index", out, "--queries", str(qfile), "--k", "10"],
                                   capsys)
    assert status == 0 and [e["query"] for e in entries] == texts
    for index in ("faiss", "exact"):
        ret = str(tmp_path / index)
        retrieve.main(["--ckpt", ckpt, "--split", "valid", "--k", "10", "--out", ret,
                       "--index", index])
        capsys.readouterr()
        want = metric_items(os.path.join(ret, "valid_gallery_model3.json"))
        for q, e in zip(qids, entries):
            got = [(r["product_id"], r["score"]) for r in e["results"]]
            assert [p for p, _ in got] == [p for p, _ in want[q]]
            if index == "faiss":   # the same index on the same vectors: bit for bit
                assert got == want[q]
            else:
                assert np.allclose([s for _, s in got], [s for _, s in want[q]], atol=1e-5)


def metric_items(path):
    with open(path) as f:
        return {int(q): [(int(p), s) for p, s in items] for q, items in json.load(f).items()}


def test_each_product_shows_its_classes_boxes_and_train_queries(stand_in_index, tiny_world,
                                                                capsys):
    out, _, _, _ = stand_in_index
    queries, _ = utils.load_info(tiny_world.info)
    text = queries["text"][0]
    status, [entry] = _search_json(["--index", out, text, "--k", "30"], capsys)
    assert status == 0 and len(entry["results"]) == 30
    names = saved_index.class_names(tiny_world.data)
    store = utils.ProductStore(tiny_world.features)
    lines = {}
    for split in ("valid", "testA", "testB"):
        for _ in retrieve.split_rows(os.path.join(tiny_world.data, split, split + ".tsv"),
                                     lines=lines):
            pass
    get = rerank.GalleryProducts(store, lines).get
    positives = {}
    for t, ps in zip(queries["text"], queries["products"]):
        for p in ps.tolist():
            positives.setdefault(p, []).append(t)
    for r in entry["results"]:
        labels = get(r["product_id"])[2].tolist()
        assert r["boxes"] == len(labels)
        assert sorted(r["classes"]) == sorted([names[c], labels.count(c)] for c in set(labels))
        assert sorted(r["train_queries"]) == sorted(positives.get(r["product_id"], []))
    shown = search.show(entry)
    assert shown[0] == "query: " + text and len(shown) == 31
    assert "train queries: none" in "\n".join(shown) or all(r["train_queries"]
                                                            for r in entry["results"])


def test_an_index_from_another_checkpoint_is_refused(stand_in_index, tmp_path, capsys):
    out, ckpt, _, _ = stand_in_index
    other = _checkpoint(tmp_path / "other.pt", b"other weights")
    with pytest.raises(DataError, match="index was built from another checkpoint .*best.pt, "
                                        "sha256 .* than .*other.pt"):
        search.main(["--index", out, "--ckpt", other, "red"])
    _checkpoint(ckpt, b"retrained weights")           # the index's own, changed since
    with pytest.raises(DataError, match="built from another checkpoint"):
        search.main(["--index", out, "red"])
    with pytest.raises(DataError, match="checkpoint not found"):
        search.main(["--index", out, "--ckpt", str(tmp_path / "none.pt"), "red"])


def test_an_index_of_another_catalogue_is_refused(stand_in_index, tiny_world, tmp_path,
                                                  capsys):
    out, _, _, _ = stand_in_index
    status, _ = _search_json(["--index", out, "--data", tiny_world.data, "red"], capsys)
    assert status in (0, 1)                             # the same catalogue: searched
    other = str(tmp_path / "other")
    shutil.copytree(tiny_world.data, other, ignore=shutil.ignore_patterns("features", "train"))
    path = os.path.join(other, "testB", "testB.tsv")
    with open(path) as f:
        rows = f.readlines()
    pids = {r.split("\t")[0] for r in rows[1:]}
    with open(path, "w") as f:                          # one product fewer
        f.writelines([rows[0]] + [r for r in rows[1:] if r.split("\t")[0] != min(pids)])
    with pytest.raises(DataError, match="index was built from another catalogue .* than "
                                        ".*other"):
        search.main(["--index", out, "--data", other, "red"])


def test_a_folder_of_mixed_builds_is_refused(stand_in_index, tmp_path):
    out, _, _, _ = stand_in_index
    pids = np.load(os.path.join(out, "pids.npy"))
    np.save(os.path.join(out, "pids.npy"), pids[:-1])
    with pytest.raises(DataError, match="pids.npy is not the catalogue its manifest names"):
        saved_index.SavedIndex(out)
    with pytest.raises(DataError, match="manifest.json: not found; build the index"):
        saved_index.SavedIndex(str(tmp_path / "nothing"))


def test_the_index_is_replaced_as_one_set(stand_in_index, tiny_world, tmp_path, monkeypatch):
    out, ckpt, _, _ = stand_in_index
    before = {n: os.path.getmtime(os.path.join(out, n)) for n in os.listdir(out)}
    assert set(before) == {"manifest.json", "index.faiss", "vectors.npy", "pids.npy",
                           "products.npz"}

    def fail(path, **arrays):
        raise OSError("disk gone")
    monkeypatch.setattr(np, "savez", fail)
    with pytest.raises(OSError, match="disk gone"):
        index_cmd.main(["--ckpt", ckpt, "--out", out, "--no-progress"])
    assert {n: os.path.getmtime(os.path.join(out, n)) for n in os.listdir(out)} == before
    assert sorted(os.listdir(tmp_path)) == ["best.pt", "index"]   # no leftover folder


def test_a_query_of_unknown_words_is_named_not_searched(stand_in_index, capsys):
    out, _, _, vocab = stand_in_index
    word = next(w for w in vocab.itos[4:] if w.isascii())
    status, entries = _search_json(["--index", out, "zzqx blorf", word + " zzqx", "the"],
                                   capsys)
    assert status == 1
    unknown, partly, stop = entries
    assert unknown["results"] is None and unknown["unknown"] == ["zzqx", "blorf"]
    assert unknown["notice"] == ("no word of it is known to the model (unknown: zzqx, "
                                 "blorf); not searched")
    assert len(partly["results"]) == 10 and partly["unknown"] == ["zzqx"]
    assert partly["notice"] is None and partly["words"] == [word]
    assert stop["results"] is None and "only stop words" in stop["notice"]
    assert search.main(["--index", out, "zzqx"]) == 1
    assert capsys.readouterr().out == ("query: zzqx\n  no word of it is known to the model "
                                       "(unknown: zzqx); not searched\n")
    assert search.main(["--index", out, word]) == 0


def test_search_reranks_the_k_with_the_blend(stand_in_index, tiny_world, tmp_path,
                                             monkeypatch, capsys):
    out, _, _, vocab = stand_in_index
    blend = _write_blend(str(tmp_path / "run" / "prediction_result"), ["model1", "model2"],
                         [1, 0])
    scorers = {"model1": _first_feature, "model2": _pair_scorer(lambda q, p: float(p % 7))}
    monkeypatch.setattr(rerank, "load_member",
                        lambda name, path, device: (scorers[name], vocab, None))
    _, [plain] = _search_json(["--index", out, "red dress", "--k", "20"], capsys)
    _, [entry] = _search_json(["--index", out, "red dress", "--k", "20", "--rerank", blend],
                              capsys)
    saved = saved_index.SavedIndex(out)
    get = rerank.GalleryProducts(utils.ProductStore(tiny_world.features), saved.lines()).get
    first = {r["product_id"]: get(r["product_id"])[1][:, 0].mean() for r in plain["results"]}
    assert [r["product_id"] for r in entry["results"]] == sorted(first, key=lambda p: (
        -first[p], p))
    assert {r["product_id"]: r["retrieval_score"] for r in entry["results"]} == {
        r["product_id"]: r["score"] for r in plain["results"]}


def test_a_moved_tsv_row_is_refused_on_re_reading(tiny_world, tmp_path):
    path = str(tmp_path / "valid.tsv")
    shutil.copy(os.path.join(tiny_world.data, "valid", "valid.tsv"), path)
    lines = {}
    pid = next(retrieve.split_rows(path, lines=lines))[0]
    with open(path) as f:
        header, first, *rest = f.readlines()
    with open(path, "w") as f:
        f.writelines([header] + rest)
    with pytest.raises(DataError, match="no longer starts product %d's row" % pid):
        rerank.GalleryProducts(None, lines).get(pid)


# ---------------------------------------------------------------------------------------
# slow: model3 trained on the tiny world
# ---------------------------------------------------------------------------------------
@pytest.mark.slow
def test_a_typed_train_query_finds_its_products(pretrained, tiny_world, tmp_path, capsys):
    run = str(tmp_path / "model3")
    m3_train.main(_common(tiny_world, run, epochs=3) + [
        "--export", os.path.join(pretrained, "encoder.pt"), "--no-eval"])
    ckpt, out = os.path.join(run, "last.pt"), str(tmp_path / "index")
    index_cmd.main(["--ckpt", ckpt, "--out", out, "--no-progress"])
    capsys.readouterr()
    # the lean text side gives the whole model's query vectors
    model, vocab, _ = retrieve.matching.load_trained(retrieve.build_model, ckpt)
    lean, lean_vocab, _ = query.load_query_encoder(ckpt)
    _, texts = _valid_queries(tiny_world)
    assert lean_vocab.itos == vocab.itos
    assert torch.equal(query.encode_texts(lean, vocab, texts),
                       query.encode_texts(model.eval(), vocab, texts))
    # the train queries with the most positives: typed, their products come back
    queries, _ = utils.load_info(tiny_world.info)
    sizes = queries["products"].lengths()
    typed = np.argsort(-sizes, kind="stable")[:5]
    status, entries = _search_json(["--index", out] + [queries["text"][i] for i in typed],
                                   capsys)
    assert status == 0
    for i, e in zip(typed, entries):
        top = {r["product_id"] for r in e["results"]}
        assert top & set(queries["products"][i].tolist()), (queries["text"][i], e)


def test_hnsw_index_fills_every_list_to_k(stand_in_index, tmp_path, capsys):
    """K near the catalogue's size: an HNSW graph leaves lists short, the exact search
    fills them; every list holds K distinct products, best first."""
    out, ckpt, _, _ = stand_in_index
    hnsw = str(tmp_path / "hnsw")
    index_cmd.main(["--ckpt", ckpt, "--out", hnsw, "--index", "hnsw", "--batch-size", "64",
                    "--no-progress"])
    capsys.readouterr()
    n = saved_index.SavedIndex(hnsw).index.ntotal
    _, entries = _search_json(["--index", hnsw, "red dress", "black jeans", "--k", str(n - 3)],
                              capsys)
    for e in entries:
        pids = [r["product_id"] for r in e["results"]]
        scores = [r["score"] for r in e["results"]]
        assert len(pids) == len(set(pids)) == n - 3
        assert scores == sorted(scores, reverse=True)
