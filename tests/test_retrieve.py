"""catalogue/retrieve.py: the exact chunked top K against a full sort (ties, chunk edges), K
beyond the gallery, faiss against the exact search, the command's files on the tiny world
with a stand-in model; re-ranking (catalogue/rerank.py) with stand-in members: one member
weighted 1 sorts the K by its own pair scores, a blend computed by hand, the brute force of
experiments/rerank_ceiling.py, the products read again from the store and the TSVs, the blend's
file and checkpoints; slow: model3 trained on the tiny world, retrieved end to end, and
re-ranked with model1 and the pretraining score."""
import argparse
import json
import os
import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import metric
import text
import tsv
import utils
from ensemble import HOWS
from model1 import train as m1_train
from catalogue import rerank, retrieve
from model3 import train as m3_train
from test_stages import _common
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
    hnsw = retrieve.faiss_index(16, hnsw=True).hnsw  # the settings bench/README.md measured
    assert (hnsw.efConstruction, hnsw.efSearch) == (128, 160)


# ---------------------------------------------------------------------------------------
# the command on the tiny world, with a stand-in for model3
# ---------------------------------------------------------------------------------------
class StandIn(torch.nn.Module):
    """model3's interface: a Linear of the mean region, a bag of word embeddings."""

    def __init__(self, n_words, dim=8):
        super().__init__()
        torch.manual_seed(0)
        self.image, self.words = torch.nn.Linear(2048, dim), torch.nn.Embedding(n_words, dim)

    def encode_product_batch(self, batch):
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
            batch = dict(zip(("boxes", "feats", "mask"), regions))
            vecs.append(model.encode_product_batch(batch)[0])
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
    encode = model.encode_product_batch
    monkeypatch.setattr(model, "encode_product_batch",
                        lambda b: sizes.append(len(b["mask"])) or encode(b))
    rows = [(p, np.ones((1 + p % 3, 5), np.float32), np.ones((1 + p % 3, 2048), np.float32))
            for p in [9, 3, 7, 1, 5, 2, 8]]
    pids, vecs = retrieve.encode_gallery(model, iter(rows), batch_size=2, sort_window=2)
    assert pids.tolist() == [1, 2, 3, 5, 7, 8, 9] and vecs.shape == (7, 8)
    assert sizes == [2, 2, 2, 1]
    assert list(retrieve.gallery_rows([iter(rows[:3]), iter(rows[1:])])) == rows


# ---------------------------------------------------------------------------------------
# re-ranking with stand-in members
# ---------------------------------------------------------------------------------------
VOCAB = text.Vocab(text.SPECIALS + ["red", "shoe"])


def _one_box(pid):
    """A stand-in product getter: one box, its only feature the product id."""
    return np.zeros((1, 5), np.float32), np.full((1, 1), pid, np.float32), np.zeros(1)


def _pair_scorer(fn):
    """A stand-in member: fn(qid, pid) for every pair of a CandidateSet."""
    def score(cset):
        return cset.predictions([fn(int(cset.qids[k]), int(p))
                                 for k, p in zip(cset.pos, cset.pids)])
    return score


def _first_feature(cset):
    """A stand-in member that reads the regions: the mean first feature of the product."""
    return cset.predictions([cset.feats[a:b, 0].mean()
                             for a, b in zip(cset.box_off[:-1], cset.box_off[1:])])


def _retrieved(seed=0, n_queries=7, k=12):
    rng = np.random.default_rng(seed)
    return {int(q): [(int(p), 0.0) for p in rng.choice(60, k, replace=False)]
            for q in rng.choice(1000, n_queries, replace=False)}


@pytest.mark.parametrize("how", HOWS)
@pytest.mark.parametrize("chunk", [1, 3, 100])
def test_one_member_weighted_1_sorts_the_k_by_its_own_pair_scores(how, chunk):
    own = lambda q, p: float((3 * p + q) % 5)           # noqa: E731 (many ties)
    other = lambda q, p: float((p * p + 7 * q) % 11)    # noqa: E731
    retrieved = _retrieved()
    texts = {q: "red shoe" for q in retrieved}
    out = rerank.rerank(retrieved, texts, scorers=[_pair_scorer(own), _pair_scorer(other)],
                        weights=[1.0, 0.0], how=how, vocab=VOCAB, get=_one_box, chunk=chunk)
    assert sorted(out) == sorted(retrieved)
    for q, items in out.items():
        want = sorted((p for p, _ in retrieved[q]), key=lambda p: (-own(q, p), p))
        assert [p for p, _ in items] == want
        if how == "raw":
            assert [s for _, s in items] == [own(q, p) for p in want]


@pytest.mark.parametrize("how,weights,want", [
    ("raw", [0.5, 0.5], [(10, 2.5), (30, 2.0), (20, 1.5)]),
    # ranks in [0, 1]: first 10 -> 0, 30 -> 0.5, 20 -> 1; second 10 -> 1, 30 -> 0.5, 20 -> 0
    ("rank", [0.25, 0.75], [(10, 0.75), (30, 0.5), (20, 0.25)])])
def test_a_blend_of_two_members_by_hand(how, weights, want):
    first, second = {10: 1.0, 20: 3.0, 30: 2.0}, {10: 4.0, 20: 0.0, 30: 2.0}
    out = rerank.rerank({1: [(10, 0.0), (20, 0.0), (30, 0.0)]}, {1: "shoe"},
                        scorers=[_pair_scorer(lambda q, p: first[p]),
                                 _pair_scorer(lambda q, p: second[p])],
                        weights=weights, how=how, vocab=VOCAB, get=_one_box)
    assert out == {1: want}


def test_brute_force_sorts_every_pair_score_and_re_ranking_keeps_its_order():
    """experiments/rerank_ceiling.py: every gallery product scored by the blend, ranked as all
    the pair scores sorted; a raw blend re-ranks any retrieved K in that order."""
    from experiments import rerank_ceiling
    own = lambda q, p: float((3 * p + q) % 5)           # noqa: E731 (many ties)
    other = lambda q, p: float((p * p + 7 * q) % 11)    # noqa: E731
    blend = dict(scorers=[_pair_scorer(own), _pair_scorer(other)], weights=[0.25, 0.75],
                 how="raw", vocab=VOCAB)
    retrieved = _retrieved(k=12)
    texts = {q: "red shoe" for q in retrieved}
    full = rerank_ceiling.brute_force(sorted(retrieved), texts, set(range(60)), blend=blend,
                                      get=_one_box)
    reranked = rerank.rerank(retrieved, texts, get=_one_box, **{
        k: blend[k] for k in ("scorers", "weights", "how", "vocab")})
    for q, items in full.items():
        score = {p: 0.25 * own(q, p) + 0.75 * other(q, p) for p in range(60)}
        assert items == sorted(score.items(), key=lambda x: (-x[1], x[0]))
        kept = {p for p, _ in retrieved[q]}
        assert reranked[q] == [(p, s) for p, s in items if p in kept]
    assert rerank_ceiling.top_in_k(full, {q: v[2:14] for q, v in full.items()}) == 3 / 5


def test_a_chunk_reads_each_product_once_and_keeps_the_order():
    calls = []
    cset = rerank.chunk_set({4: ("red", [7, 3, 9]), 2: ("shoe", [9, 1])}, VOCAB,
                            lambda p: calls.append(p) or _one_box(p))
    assert sorted(calls) == [1, 3, 7, 9]
    assert cset.qids.tolist() == [2, 4] and cset.tokens == [[5], [4]]
    assert cset.products() == {2: [9, 1], 4: [7, 3, 9]}
    assert cset.feats[:, 0].tolist() == [9, 1, 7, 3, 9] and cset.pos.tolist() == [0, 0, 1, 1, 1]


def test_candidate_set_from_products_equals_from_tsv(tiny_world):
    _, vocab = utils.load_info(tiny_world.info)
    path = os.path.join(tiny_world.data, "valid", "valid.tsv")
    lines = {}
    for _ in retrieve.split_rows(path, 3, lines):
        pass
    want = utils.CandidateSet.from_tsv(path, vocab, 3)
    queries = {q: (t, want.pids[a:b].tolist()) for q, t, a, b in
               zip(want.qids.tolist(), want.texts, want.offsets[:-1], want.offsets[1:])}
    got = utils.CandidateSet.from_products(queries, vocab,
                                           rerank.GalleryProducts(None, lines, 3).get)
    for name in ("qids", "offsets", "pos", "pids", "box_off", "boxes", "feats"):
        assert np.array_equal(getattr(got, name), getattr(want, name)), name
    assert got.texts == want.texts and got.tokens == want.tokens


def test_gallery_products_read_train_from_the_store(tiny_world):
    store = utils.ProductStore(tiny_world.features, max_boxes=2)
    queries, _ = utils.load_info(tiny_world.info)
    pid = int(utils.ragged_parts(queries["products"])[0][0])
    got = rerank.GalleryProducts(store, {}, 2).get(pid)
    assert all(np.array_equal(g, w) for g, w in zip(got, store.get(pid)))


def _write_blend(folder, models, weights, how="rank"):
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, "ensemble.json")
    with open(path, "w") as f:
        json.dump({"how": how, "models": models, "weights": dict(zip(models, weights))}, f)
    return path


def test_the_blend_and_its_checkpoints(tmp_path):
    path = _write_blend(str(tmp_path / "run" / "prediction_result"),
                        ["model2", "multilabel", "model1"], [0.5, 0.2, 0.3], "zscore")
    assert rerank.read_blend(path) == (["model2", "multilabel", "model1"], [0.5, 0.2, 0.3],
                                       "zscore")
    run = str(tmp_path / "run")
    assert rerank.member_checkpoints(path, ["model1", "model2"], ["model2=x/last.pt"]) == {
        "model1": os.path.join(run, "model1", "best.pt"), "model2": "x/last.pt"}
    with pytest.raises(DataError, match="--member model3=a: want MEMBER=PATH"):
        rerank.member_checkpoints(path, ["model1", "model2"], ["model3=a"])
    with pytest.raises(DataError, match="member model5 scores only the candidates"):
        rerank.read_blend(_write_blend(str(tmp_path / "b"), ["model1", "model5"], [0.5, 0.5]))
    with open(path, "w") as f:
        json.dump({"how": "rank", "t": 0.5}, f)
    with pytest.raises(DataError, match="not a blend of ensemble.py"):
        rerank.read_blend(path)
    with pytest.raises(DataError, match="not found; run ensemble.py"):
        rerank.read_blend(str(tmp_path / "none.json"))


def test_members_of_weight_zero_are_not_run():
    """A weight of 0 changes no score: such members are dropped, two members kept."""
    assert rerank.weighted_members(list("abcd"), [0.1, 0.0, 0.05, 0.85]) == (
        list("acd"), [0.1, 0.05, 0.85])
    assert rerank.weighted_members(list("abc"), [0.0, 1.0, 0.0]) == (list("ab"), [0.0, 1.0])
    assert rerank.weighted_members(list("ab"), [1.0, 0.0]) == (list("ab"), [1.0, 0.0])


def test_command_reranks_the_k_with_the_blend(tiny_world, tmp_path, monkeypatch, capsys):
    model, vocab = _stand_in(tiny_world, monkeypatch)
    run, out = str(tmp_path / "run"), str(tmp_path / "retrieval")
    blend = _write_blend(os.path.join(run, "prediction_result"), ["model1", "model2"], [1, 0])
    loaded = []
    scorers = {"model1": _first_feature, "model2": _pair_scorer(lambda q, p: float(p % 7))}
    monkeypatch.setattr(rerank, "load_member", lambda name, path, device: loaded.append(path)
                        or (scorers[name], vocab, None))
    res = retrieve.main(["--ckpt", "unused.pt", "--k", "30", "--out", out, "--rerank", blend,
                         "--member", "model2=elsewhere.pt", "--rerank-chunk", "5"])
    assert loaded == [os.path.join(run, "model1", "best.pt"), "elsewhere.pt"]
    keys = {"recall@10", "ndcg@5"}
    assert set(res["valid"]) == keys | {"rerank_" + k for k in keys}
    printed = capsys.readouterr().out
    assert "valid_gallery_rerank.json" in printed
    assert "re-ranked by model1 + model2 (rank" in printed
    # the first feature of every gallery product, read as the gallery read it
    a = argparse.Namespace(data=None, store=None, features=None, packed=None, info=None)
    ck_args = {"data": tiny_world.data, "info": tiny_world.info, "store": "npz",
               "features": tiny_world.features}
    first = {p: f[:, 0].mean() for p, _, f in retrieve.gallery_rows(retrieve.product_sources(
        a, ck_args, ["train", "valid", "testA", "testB"]))}
    for split in ("valid", "test"):
        with open(os.path.join(out, "%s_gallery_model3.json" % split)) as f:
            retrieved = json.load(f)
        with open(os.path.join(out, "%s_gallery_rerank.json" % split)) as f:
            reranked = json.load(f)
        assert set(reranked) == set(retrieved)
        for q, items in reranked.items():
            pids = [int(p) for p, _ in retrieved[q]]
            want = sorted(pids, key=lambda p: (-first[p], p))
            assert len(items) == 30 and [int(p) for p, _ in items] == want


def test_a_run_leaves_only_its_own_files(tiny_world, tmp_path, monkeypatch):
    """A run without --rerank, on a data root without gallery answers (the real release has
    none), into the folder of a run that had both: the earlier run's re-ranked lists and
    figures are removed, never shown as this run's."""
    _stand_in(tiny_world, monkeypatch)
    run, out = str(tmp_path / "run"), str(tmp_path / "retrieval")
    blend = _write_blend(os.path.join(run, "prediction_result"), ["model1", "model2"], [1, 0])
    scorers = {"model1": _first_feature, "model2": _first_feature}
    monkeypatch.setattr(rerank, "load_member", lambda name, path, device:
                        (scorers[name], utils.load_info(tiny_world.info)[1], None))
    retrieve.main(["--ckpt", "unused.pt", "--k", "20", "--out", out, "--rerank", blend])
    assert sorted(os.listdir(out)) == ["gallery_metrics.json", "test_gallery_model3.json",
                                       "test_gallery_rerank.json", "valid_gallery_model3.json",
                                       "valid_gallery_rerank.json"]
    data = str(tmp_path / "release")
    os.makedirs(os.path.join(data, "train"))
    shutil.copy(os.path.join(tiny_world.data, "train", "train.tsv"), os.path.join(data, "train"))
    for split in ("valid", "testA", "testB"):
        os.makedirs(os.path.join(data, split))
        for name in (split + ".tsv", split + "_answer.json"):
            shutil.copy(os.path.join(tiny_world.data, split, name), os.path.join(data, split))
    assert retrieve.main(["--ckpt", "unused.pt", "--data", data, "--k", "20",
                          "--out", out]) == {}
    assert sorted(os.listdir(out)) == ["test_gallery_model3.json", "valid_gallery_model3.json"]


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


@pytest.mark.slow
def test_model3_retrieves_and_reranks_with_model1_and_pretraining(pretrained, tiny_world,
                                                                   tmp_path, capsys):
    run, ret = str(tmp_path / "run"), str(tmp_path / "retrieval")
    export = ["--export", os.path.join(pretrained, "encoder.pt"), "--no-eval"]
    m1_train.main(_common(tiny_world, os.path.join(run, "model1"), epochs=1) + export)
    m3_train.main(_common(tiny_world, os.path.join(run, "model3"), epochs=1) + export)
    blend = _write_blend(os.path.join(run, "prediction_result"),
                         ["multilabel", "model1", "model3"], [0.2, 0.3, 0.5], "zscore")
    res = retrieve.main(["--ckpt", os.path.join(run, "model3", "best.pt"), "--k", "50",
                         "--out", ret, "--rerank", blend,
                         "--member", "multilabel=" + os.path.join(pretrained, "best.pt")])
    assert set(res["valid"]) == {"recall@10", "ndcg@5", "rerank_recall@10", "rerank_ndcg@5"}
    assert all(0 <= v <= 1 for v in res["valid"].values())
    assert "re-ranked by multilabel + model1 + model3 (zscore" in capsys.readouterr().out
    for split in ("valid", "test"):
        model3, reranked = (metric.load_predictions(os.path.join(ret, "%s_gallery_%s.json"
                                                                 % (split, name)))
                            for name in ("model3", "rerank"))
        assert set(reranked) == set(model3)
        assert all(len(reranked[q]) == 50 and set(reranked[q]) == set(model3[q])
                   for q in model3)
