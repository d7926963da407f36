"""model3/retrieve.py: the exact chunked top K against a full sort (ties, chunk edges), K
beyond the gallery, faiss against the exact search, the command's files on the tiny world
with a stand-in model; slow: model3 trained on the tiny world, retrieved end to end."""
import argparse
import json
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import metric
import tsv
import utils
from model3 import retrieve, train as m3_train
from test_stages import _common, pretrained  # noqa: F401 (a fixture)
from tsv import DataError


def _full_sort(queries, gallery, k):
    """Brute force: every score, sorted by (score descending, row ascending)."""
    s = (queries @ gallery.t()).tolist()
    rows = [sorted(range(len(r)), key=lambda j: (-r[j], j))[:k] for r in s]
    return [[r[j] for j in row] for r, row in zip(s, rows)], rows


def test_order_keys_order_scores_then_rows():
    v = [3.5, -2.0, -0.0, 0.0, 1e-30, -1e-30, 3.5, float("inf"), -float("inf"), -2.0, 0.25]
    keys = retrieve.order_keys(torch.tensor([v]), first=7)[0].tolist()
    assert len(set(keys)) == len(v)
    by_key = sorted(range(len(v)), key=lambda j: -keys[j])
    assert by_key == sorted(range(len(v)), key=lambda j: (-v[j], j))   # -0.0 ties 0.0


@pytest.mark.parametrize("chunk", [1, 3, 7, 19, 20, 21, 64])
@pytest.mark.parametrize("k", [1, 5, 20])
def test_exact_search_equals_a_full_sort(chunk, k):
    g = torch.Generator().manual_seed(chunk * 100 + k)
    # small integers: exact dot products, and many ties
    queries = torch.randint(-2, 3, (6, 4), generator=g).float()
    gallery = torch.randint(-1, 2, (20, 4), generator=g).float()
    gallery[5] = gallery[12] = gallery[19]              # equal rows, across chunk edges
    queries[0] = 0                                      # a query that ties everything
    scores, rows = retrieve.exact_search(queries, gallery, k, chunk=chunk)
    want_scores, want_rows = _full_sort(queries, gallery, k)
    assert rows.tolist() == want_rows and scores.tolist() == want_scores
    assert rows[0].tolist() == list(range(k))


def test_exact_search_on_random_unit_vectors():
    g = torch.Generator().manual_seed(0)
    queries = F.normalize(torch.randn(30, 16, generator=g), dim=1)
    gallery = F.normalize(torch.randn(1000, 16, generator=g), dim=1)
    scores, rows = retrieve.exact_search(queries, gallery, 50, chunk=128)
    full = queries @ gallery.t()
    want = full.topk(50, dim=1)
    assert torch.equal(rows, want.indices) and torch.allclose(scores, want.values)


def test_k_beyond_the_gallery_is_an_error():
    with pytest.raises(DataError, match="--k 11: must be between 1 and the gallery's 10"):
        retrieve.exact_search(torch.ones(2, 3), torch.ones(10, 3), 11)
    with pytest.raises(DataError, match="--k 0"):
        retrieve.check_k(0, 10)


def test_faiss_flat_equals_the_exact_search():
    pytest.importorskip("faiss")
    g = torch.Generator().manual_seed(1)
    queries = F.normalize(torch.randn(20, 16, generator=g), dim=1)
    gallery = F.normalize(torch.randn(500, 16, generator=g), dim=1)
    scores, rows = retrieve.exact_search(queries, gallery, 10, chunk=64)
    f_scores, f_rows = retrieve.faiss_search(queries, gallery, 10)
    assert torch.equal(f_rows, rows) and torch.allclose(f_scores, scores, atol=1e-5)
    h_scores, h_rows = retrieve.faiss_search(queries, gallery, 10, hnsw=True)
    assert h_rows.shape == (20, 10) and (h_rows[:, 0] == rows[:, 0]).float().mean() > 0.9


# ---------------------------------------------------------------------------------------
# the command on the tiny world, with a stand-in for model3
# ---------------------------------------------------------------------------------------
class StandIn(torch.nn.Module):
    """model3's interface: a Linear of the mean region, a bag of word embeddings."""

    def __init__(self, n_words, dim=8):
        super().__init__()
        torch.manual_seed(0)
        self.image, self.words = torch.nn.Linear(2048, dim), torch.nn.Embedding(n_words, dim)

    def encode_images(self, batch):
        m = batch["mask"][..., None].float()
        return F.normalize(self.image((batch["feats"] * m).sum(1) / m.sum(1)), dim=-1)

    def encode_queries(self, tokens):
        e = (self.words(tokens) * (tokens != 0)[..., None]).sum(1)
        return F.normalize(e + 1e-6, dim=-1)


def _stand_in(tiny_world, monkeypatch):
    _, vocab = utils.load_info(tiny_world.info)
    model = StandIn(len(vocab)).eval()
    ck = {"args": {"data": tiny_world.data, "info": tiny_world.info, "store": "npz",
                   "features": tiny_world.features, "max_boxes": None}}
    monkeypatch.setattr(retrieve.matching, "load_trained", lambda *a: (model, vocab, ck))
    return model, vocab


def _brute_force(model, vocab, tiny_world, split):
    """Every gallery product encoded alone and every query of ``split`` -> pids (P,),
    {qid: scores (P,)}."""
    ck_args = {"data": tiny_world.data, "info": tiny_world.info, "store": "npz",
               "features": tiny_world.features}
    a = argparse.Namespace(data=None, store=None, features=None, packed=None, info=None)
    sources = retrieve.product_sources(a, ck_args, ["train", "valid", "testA", "testB"])
    pids, vecs = [], []
    with torch.no_grad():
        for pid, boxes, feats in retrieve.gallery_rows(sources):
            regions = utils.pad_regions([(boxes, feats)])
            vecs.append(model.encode_images(dict(zip(("boxes", "feats", "mask"), regions)))[0])
            pids.append(pid)
    cands = tsv.read_candidates(os.path.join(tiny_world.data, split, split + ".tsv"),
                                with_arrays=False)
    qids = sorted(cands)
    text = retrieve.encode_texts(model, vocab, [cands[q]["query"] for q in qids])
    return np.array(pids), dict(zip(qids, (text @ torch.stack(vecs).t()).numpy()))


def test_command_writes_the_k_best_products(tiny_world, tmp_path, monkeypatch, capsys):
    model, vocab = _stand_in(tiny_world, monkeypatch)
    out = str(tmp_path / "retrieval")
    res = retrieve.main(["--ckpt", "unused.pt", "--split", "valid", "--split", "testB",
                         "--k", "100", "--out", out, "--batch-size", "64"])
    assert set(res) == {"valid", "testB"}
    for r in res.values():
        assert set(r) == {"recall@10", "recall@100", "ndcg@5"}
        assert all(0 <= v <= 1 for v in r.values())
    pids, full = _brute_force(model, vocab, tiny_world, "valid")
    assert "top 100 of %d products" % len(pids) in capsys.readouterr().out
    with open(os.path.join(out, "valid_gallery_model3.json")) as f:
        raw = json.load(f)
    answers = metric.load_answers(os.path.join(tiny_world.data, "valid",
                                               "valid_gallery_answer.json"))
    assert set(map(int, raw)) == set(answers) == set(full)
    assert os.path.exists(os.path.join(out, "test_gallery_model3.json"))
    for q, items in raw.items():
        assert len(items) == 100 and all(isinstance(p, str) for p, _ in items)
        scores = np.array([s for _, s in items])
        assert (np.diff(scores) <= 0).all()                           # best first
        # the true dot products, and the 100 largest (up to float noise)
        by_pid = dict(zip(pids.tolist(), full[int(q)]))
        assert np.allclose(scores, [by_pid[int(p)] for p, _ in items], atol=1e-5)
        assert np.allclose(scores, np.sort(full[int(q)])[::-1][:100], atol=1e-5)
    assert metric.load_predictions(os.path.join(out, "valid_gallery_model3.json"))


def test_the_gallery_is_read_in_batches_and_sorted_by_product(tiny_world, monkeypatch):
    model, vocab = _stand_in(tiny_world, monkeypatch)
    sizes = []
    encode = model.encode_images
    monkeypatch.setattr(model, "encode_images", lambda b: sizes.append(len(b["mask"])) or
                        encode(b))
    rows = [(p, np.ones((1 + p % 3, 5), np.float32), np.ones((1 + p % 3, 2048), np.float32))
            for p in [9, 3, 7, 1, 5, 2, 8]]
    pids, vecs = retrieve.encode_gallery(model, iter(rows), batch_size=2, sort_window=2)
    assert pids.tolist() == [1, 2, 3, 5, 7, 8, 9] and vecs.shape == (7, 8)
    assert sizes == [2, 2, 2, 1]
    assert list(retrieve.gallery_rows([iter(rows[:3]), iter(rows[1:])])) == rows


# ---------------------------------------------------------------------------------------
# slow: model3 trained on the tiny world, then retrieved
# ---------------------------------------------------------------------------------------
@pytest.mark.slow
def test_model3_retrieves_end_to_end(pretrained, tiny_world, tmp_path):
    out, ret = str(tmp_path / "model3"), str(tmp_path / "retrieval")
    m3_train.main(_common(tiny_world, out, epochs=1) + [
        "--export", os.path.join(pretrained, "encoder.pt"), "--no-eval"])
    res = retrieve.main(["--ckpt", os.path.join(out, "last.pt"), "--k", "50", "--out", ret,
                         "--index", "exact"])
    assert set(res) == {"valid", "testB"} and set(res["valid"]) == {"recall@10", "ndcg@5"}
    with open(os.path.join(ret, "test_gallery_model3.json")) as f:
        assert all(len(v) == 50 for v in json.load(f).values())
