"""Training samples: hard negatives, pair items, the collate, candidates, prediction files."""
import copy
import json
import logging
import os
import pickle

import numpy as np
import pytest
import torch

import metric
import text
import tsv
import utils
from sampler import GroupedBatches, NegativeSampler
from tsv import DataError
from text import BOS, EOS, PAD


def make_queries(texts, last, cluster, products, tokens=None):
    """A hand-made queries dict with the fields of ``utils.load_info`` the sampler reads."""
    tokens = tokens if tokens is not None else [t.split() for t in texts]
    return {"query_id": np.arange(len(texts), dtype=np.int64) + 1, "text": list(texts),
            "tokens": tokens, "products": [np.asarray(p, np.int64) for p in products],
            "last_word": np.array(last, dtype=object), "cluster": np.asarray(cluster, np.int64)}


@pytest.fixture(scope="module")
def world(tiny_world):
    queries, vocab = utils.load_info(tiny_world.info)
    return queries, vocab, utils.ProductStore(tiny_world.features, max_boxes=10)


def shared_queries(queries):
    """tiny_world's queries made harder: chained product sharing and a duplicated text."""
    q = copy.deepcopy(queries)
    q["products"] = list(q["products"])  # a plain list of arrays: the other accepted form
    for w in set(q["last_word"]):
        members = np.flatnonzero(q["last_word"] == w)
        for a, b in zip(members[:-1], members[1:]):  # b also matches a's first product
            q["products"][b] = np.append(q["products"][b], q["products"][a][0])
    q["text"][1] = q["text"][0]
    return q


@pytest.mark.parametrize("fallback", ["cluster", "cluster_or_random"])
def test_negatives_are_never_positives(world, fallback):
    queries = shared_queries(world[0])
    sampler = NegativeSampler(queries, fallback=fallback)
    rng = np.random.default_rng(0)
    sources = set()
    for qi in range(len(queries["query_id"])):
        pos = set(queries["products"][qi].tolist())
        for _ in range(40):
            nq = sampler.negative_query(qi, rng)
            assert nq != qi and queries["text"][nq] != queries["text"][qi]
            assert not pos & set(queries["products"][nq].tolist())
            assert sampler.negative_product(qi, rng) not in pos
            sources.add(queries["last_word"][nq] == queries["last_word"][qi])
    assert sources == {True, False}  # both the last-word group and the fallbacks were used


def ratio_queries():
    """Query 0: last word "a" with 1..9, cluster 0 with 10..19; 20..59 share neither."""
    last = ["a"] * 10 + ["b"] * 10 + ["c"] * 40
    cluster = [0] + [1] * 9 + [0] * 10 + [1] * 40
    texts = ["q%d %s" % (i, w) for i, w in enumerate(last)]
    return make_queries(texts, last, cluster, [[1000 + i] for i in range(60)])


@pytest.mark.parametrize("fallback,want_last,want_cluster", [
    ("cluster", 0.8, 0.2), ("cluster_or_random", 0.8 + 0.1 * 9 / 59, 0.1 + 0.1 * 10 / 59)])
def test_p_last_ratio(fallback, want_last, want_cluster):
    sampler = NegativeSampler(ratio_queries(), p_last=0.8, fallback=fallback)
    rng = np.random.default_rng(1)
    draws = np.array([sampler.negative_query(0, rng) for _ in range(4000)])
    assert (draws != 0).all()
    assert np.mean((draws >= 1) & (draws < 10)) == pytest.approx(want_last, abs=0.03)
    assert np.mean((draws >= 10) & (draws < 20)) == pytest.approx(want_cluster, abs=0.03)
    outside = np.mean(draws >= 20)
    assert outside == 0 if fallback == "cluster" else outside > 0.03
    counts = np.bincount(draws[draws < 10], minlength=10)[1:]  # uniform inside the group
    assert counts.min() > 0.6 * counts.mean()


def test_degenerate_groups_fall_through():
    # query 0 is alone in its cluster; its last-word group holds 3 (shares a product with 0),
    # 4 (same text) and 5 (no tokens): only 1 and 2, in no group of 0, are possible
    texts = ["red x", "blue y", "green y", "pink x", "red x", "the x"]
    tokens = [t.split() for t in texts[:5]] + [[]]
    queries = make_queries(texts, ["x", "y", "y", "x", "x", "x"], [5, 6, 6, 7, 7, 7],
                           [[10], [11], [12], [13, 10], [14], [15]], tokens)
    for fallback in NegativeSampler.FALLBACKS:
        sampler = NegativeSampler(queries, fallback=fallback)
        rng = np.random.default_rng(2)
        got = {sampler.negative_query(0, rng) for _ in range(300)}
        assert got == {1, 2}
        assert {sampler.negative_product(0, rng) for _ in range(300)} == {11, 12}


def test_two_queries_and_impossible_cases():
    two = make_queries(["a x", "b y"], ["x", "y"], [0, 1], [[1], [2]])
    sampler = NegativeSampler(two)
    rng = np.random.default_rng(3)
    assert {sampler.negative_query(0, rng) for _ in range(50)} == {1}
    assert {sampler.negative_product(1, rng) for _ in range(50)} == {1}
    same = make_queries(["a x", "a x"], ["x", "x"], [0, 0], [[1], [2]])
    with pytest.raises(DataError, match="no possible negative"):
        NegativeSampler(same).negative_query(0, rng)
    with pytest.raises(ValueError, match="at least 2 queries"):
        NegativeSampler(make_queries(["a x"], ["x"], [0], [[1]]))
    with pytest.raises(ValueError, match="fallback"):
        NegativeSampler(two, fallback="random")


def test_sampler_is_deterministic(world):
    sampler = NegativeSampler(world[0], fallback="cluster_or_random")

    def draws(seed):
        rng = np.random.default_rng(seed)
        return [(sampler.negative_query(qi, rng), sampler.negative_product(qi, rng))
                for qi in range(0, 150, 3)]
    assert draws(7) == draws(7)
    assert draws(7) != draws(8)
    # the arrays a forked worker shares are numpy, not Python containers
    assert all(isinstance(v, (np.ndarray, float, str)) for v in vars(sampler).values())


def test_grouped_batches_split_each_global_batch_across_the_ranks():
    """Rank r's step t is the r-th slice of the t-th global batch of one shared order: every
    pair at most once an epoch, the remainder dropped, the same with one rank of the doubled
    batch."""
    groups = np.repeat(np.arange(7), [30, 11, 5, 40, 1, 9, 20])          # 116 pairs
    ranks = [GroupedBatches(groups, 8, 4, world=2, rank=r, seed=3) for r in (0, 1)]
    one = GroupedBatches(groups, 16, 4, seed=3)
    order = one.order()
    assert sorted(order.tolist()) == list(range(116))
    assert len(ranks[0]) == len(one) == 116 // 16
    steps = list(zip(*ranks))
    assert [a + b for a, b in steps] == list(one) == \
        [order[i:i + 16].tolist() for i in range(0, 7 * 16, 16)]
    drawn = [i for a, b in steps for i in a + b]
    assert len(drawn) == len(set(drawn)) == 112


def test_grouped_batches_are_runs_of_one_group():
    """The order lays each group out whole and cuts it into runs: a run of `run` pairs meets
    at most one group boundary, so a row's in-batch neighbours mostly share its group,
    where a shuffle gives it about its group's share."""
    groups = np.repeat(np.arange(20), 48)
    b = GroupedBatches(groups, 32, 16, seed=0)
    g = groups[b.order()].reshape(-1, 16)
    assert all(len(set(r)) == 1 for r in g)         # 48 = 3 runs: no run crosses a boundary
    for batch in b:
        assert max(np.bincount(groups[batch])) >= 16
    ragged = GroupedBatches(np.repeat(np.arange(9), [13, 7, 30, 2, 2, 2, 50, 11, 3]), 16, 8)
    runs = np.array_split(np.repeat(np.arange(9), [13, 7, 30, 2, 2, 2, 50, 11, 3])[
        ragged.order()], np.arange(8, 120, 8))
    assert all(np.count_nonzero(np.diff(r)) <= 3 for r in runs)
    assert sum(np.count_nonzero(np.diff(r)) for r in runs) <= 8      # 9 groups, 8 boundaries


def test_grouped_batches_lay_out_only_their_share_in_runs():
    """share 0.5: half the pairs come in runs of one group, half singly. Neighbours in the
    order share a group for about 15 of 16 positions of a run and 1 in 20 elsewhere."""
    groups = np.repeat(np.arange(20), 48)
    same = {}
    for share in (1.0, 0.5):
        order = GroupedBatches(groups, 32, 16, share=share, seed=1).order()
        assert sorted(order.tolist()) == list(range(960))
        same[share] = (np.diff(groups[order]) == 0).mean()
    assert same[1.0] > 0.9 and 0.35 < same[0.5] < 0.6


def test_grouped_batches_are_deterministic_per_seed_and_epoch():
    groups = np.repeat(np.arange(5), 20)

    def epoch(seed, e):
        b = GroupedBatches(groups, 10, 5, seed=seed)
        b.set_epoch(e)
        return list(b)
    assert epoch(0, 1) == epoch(0, 1)
    assert epoch(0, 1) != epoch(0, 2) and epoch(0, 1) != epoch(1, 1)


def test_grouped_batches_refuse_bad_sizes():
    with pytest.raises(ValueError, match="a run must hold 1 to 8 pairs"):
        GroupedBatches(np.zeros(20), 4, 9, world=2)
    with pytest.raises(ValueError, match="a run must hold"):
        GroupedBatches(np.zeros(20), 4, 0)
    with pytest.raises(ValueError, match="the grouped share must lie in"):
        GroupedBatches(np.zeros(20), 4, 2, share=0.0)
    with pytest.raises(DataError, match="3 pairs cannot fill one global batch of 4"):
        GroupedBatches(np.zeros(3), 4, 2)


def test_pair_items(world):
    queries, vocab, store = world
    ds = utils.PairDataset(queries, vocab, store, NegativeSampler(queries), seed=5)
    assert len(ds) == sum(len(p) for p in queries["products"])
    assert sorted(zip(ds.pair_query.tolist(), ds.pair_product.tolist())) == sorted(
        (qi, int(p)) for qi, ps in enumerate(queries["products"]) for p in ps)
    for i in [0, len(ds) // 2, len(ds) - 1]:
        it = ds[i]
        qi = it["qi"]
        assert it["q"] == vocab.encode(queries["tokens"][qi]) and isinstance(it["q"][0], int)
        assert it["pid"] in queries["products"][qi].tolist()
        boxes, feats = it["p"]
        assert boxes.shape[1] == 5 and feats.shape == (len(boxes), 2048)
        assert feats.dtype == np.float32 and np.array_equal(feats, store.get(it["pid"])[1])
        assert it["nqi"] != qi and it["nq"] == vocab.encode(queries["tokens"][it["nqi"]])
        assert it["npid"] not in queries["products"][qi].tolist()
        assert it["np"][1].shape == (len(it["np"][0]), 2048)
    plain = utils.PairDataset(queries, vocab, store)[0]
    assert set(plain) == {"q", "qi", "pid", "p"}


def test_pair_items_are_deterministic_per_seed_epoch_index(world):
    queries, vocab, store = world
    sampler = NegativeSampler(queries)

    def negatives(ds, idx):
        return [(ds[i]["nqi"], ds[i]["npid"]) for i in idx]
    a = utils.PairDataset(queries, vocab, store, sampler, seed=1)
    b = utils.PairDataset(queries, vocab, store, sampler, seed=1)
    idx = list(range(0, len(a), 7))
    assert negatives(a, idx) == negatives(b, idx) == negatives(a, idx[::-1])[::-1]
    a.set_epoch(1)
    assert negatives(a, idx) != negatives(b, idx)
    b.set_epoch(1)
    assert negatives(a, idx) == negatives(b, idx)
    assert negatives(utils.PairDataset(queries, vocab, store, sampler, seed=2), idx) != \
        negatives(utils.PairDataset(queries, vocab, store, sampler, seed=1), idx)


@pytest.mark.slow
def test_same_batches_with_or_without_workers(world):
    queries, vocab, store = world
    ds = utils.PairDataset(queries, vocab, store, NegativeSampler(queries), seed=3)
    ds.set_epoch(2)
    batches = []
    for workers in (0, 2):  # the stages' choice: workers send unpadded regions
        loader = torch.utils.data.DataLoader(
            ds, batch_size=16, num_workers=workers,
            collate_fn=utils.collate_pairs_flat if workers else utils.collate_pairs)
        batches.append([(b["qi"], b["q_tokens"], b["nq_tokens"], b["n_feats"], b["n_mask"])
                        for b in map(utils.unflatten, loader)])
    assert len(batches[0]) == len(batches[1]) == -(-len(ds) // 16)
    for x, y in zip(*batches):
        assert all(torch.equal(u, v) for u, v in zip(x, y))


@pytest.mark.parametrize("form", ["ragged", "list"])
def test_empty_queries_are_skipped(world, caplog, form):
    queries, vocab, store = world
    q = copy.deepcopy(queries)
    rows = list(q["tokens"])
    rows[0] = rows[5] = []
    q["tokens"] = utils.Ragged.from_words(rows) if form == "ragged" else rows
    if form == "list":
        q["products"] = list(q["products"])
    sampler = NegativeSampler(q)
    with caplog.at_level(logging.WARNING, logger="kddmm"):
        ds = utils.PairDataset(q, vocab, store, sampler)
    assert "skipped 2 of 150 queries" in caplog.text
    assert len(ds) == sum(len(p) for p in q["products"]) - len(q["products"][0]) \
        - len(q["products"][5])
    assert not set(ds.pair_query.tolist()) & {0, 5}
    rng = np.random.default_rng(0)
    assert not {sampler.negative_query(qi, rng) for qi in range(150) for _ in range(20)} & {0, 5}
    q["tokens"] = [[] for _ in q["tokens"]]
    with pytest.raises(DataError, match="no .* pair"):
        utils.PairDataset(q, vocab, store)


def test_flat_collate_unflattens_to_the_padded_batch(world):
    """Workers' unpadded batches, padded where they arrive, equal the padded collate exactly."""
    queries, vocab, store = world
    ds = utils.PairDataset(queries, vocab, store, NegativeSampler(queries), seed=3)
    items = [ds[i] for i in range(0, len(ds), 7)][:16]
    items.append(dict(items[0], p=(items[0]["p"][0][:1], items[0]["p"][1][:1])))  # 1 box
    padded = utils.collate_pairs(items)
    flat = utils.collate_pairs_flat(items)
    regions = sum(len(it["p"][1]) for it in items)
    assert flat["p_feats"].shape == (regions, padded["p_feats"].shape[2])
    assert "p_mask" not in flat and flat["p_lengths"].tolist() == padded["p_mask"].sum(1).tolist()
    back = utils.unflatten(dict(flat))
    assert set(back) == set(padded)
    for k, v in padded.items():
        assert v.dtype == back[k].dtype and torch.equal(v, back[k]), k


def _item(ids, n, nids=None, m=None):
    it = {"q": ids, "qi": len(ids), "pid": 100 + n,
          "p": (np.full((n, 5), 0.5, np.float32), np.ones((n, 4), np.float32))}
    if nids is not None:
        it.update(nq=nids, nqi=9, npid=200 + m,
                  np=(np.full((m, 5), 0.25, np.float32), np.ones((m, 4), np.float32)))
    return it


POSITIVE_KEYS = {"q_tokens", "qi", "pid", "p_boxes", "p_feats", "p_mask", "caption_in", "caption_out"}


def test_collate_shapes_masks_and_caption():
    out = utils.collate_pairs([_item([5, 6, 7], 2), _item([8], 3)])
    assert set(out) == POSITIVE_KEYS  # what the models read, and the ids errors name
    assert out["pid"].tolist() == [102, 103]
    assert out["q_tokens"].tolist() == [[5, 6, 7], [8, PAD, PAD]]
    assert out["qi"].tolist() == [3, 1]
    assert out["p_boxes"].shape == (2, 3, 5) and out["p_feats"].shape == (2, 3, 4)
    assert out["p_mask"].tolist() == [[True, True, False], [True, True, True]]
    assert out["p_feats"][0, 2].abs().sum() == 0 and out["p_boxes"][0, 2].abs().sum() == 0
    assert out["caption_in"].tolist() == [[BOS, 5, 6, 7], [BOS, 8, PAD, PAD]]
    assert out["caption_out"].tolist() == [[5, 6, 7, EOS], [8, EOS, PAD, PAD]]
    assert out["q_tokens"].dtype == out["caption_in"].dtype == torch.long
    assert out["p_mask"].dtype == torch.bool and out["p_feats"].dtype == torch.float32

    out = utils.collate_pairs([_item([5], 1, [4, 4], 1), _item([6], 1, [3], 4)])
    assert set(out) == POSITIVE_KEYS | {"nq_tokens", "npid", "n_boxes", "n_feats", "n_mask"}
    assert out["npid"].tolist() == [201, 204]
    assert out["nq_tokens"].tolist() == [[4, 4], [3, PAD]]
    assert out["n_boxes"].shape == (2, 4, 5) and out["n_feats"].shape == (2, 4, 4)
    assert out["n_mask"].sum(1).tolist() == [1, 4]


def test_candidate_set_covers_every_candidate(tiny_world, world):
    vocab = world[1]
    path = os.path.join(tiny_world.data, "valid", "valid.tsv")
    cands = tsv.read_candidates(path)
    cs = utils.CandidateSet.from_tsv(path, vocab, max_boxes=3)
    assert len(cs) == len(cands) and sorted(cs.qids.tolist()) == cs.qids.tolist()
    want = {(q, r["product_id"]) for q, v in cands.items() for r in v["products"]}
    assert set(zip(cs.qids[cs.pos].tolist(), cs.pids.tolist())) == want
    assert len(cs.pids) == len(want)
    seen = []
    rows = {r["product_id"]: r for v in cands.values() for r in v["products"]}
    for b in cs.product_batches(7):
        assert b["boxes"].shape[:2] == b["feats"].shape[:2] == b["mask"].shape
        assert len(b["pids"]) <= 7 and torch.equal(b["pids"], torch.from_numpy(cs.pids[b["index"]]))
        for k, pid in enumerate(b["pids"].tolist()):
            row = rows[pid]
            n = min(3, row["num_boxes"])
            assert b["mask"][k].sum() == n
            assert np.array_equal(b["feats"][k, :n].numpy(), row["features"][:n])
            assert cs.qids[b["pos"][k]] in [q for q, p in want if p == pid]
        seen += b["pids"].tolist()
    assert sorted(seen) == sorted(cs.pids.tolist())
    assert cs.tokens == [vocab.encode(text.tokenize(cands[q]["query"])) for q in cs.qids]

    preds = cs.predictions(np.arange(len(cs.pids), dtype=np.float32))
    assert set(preds) == set(cands) and sum(len(v) for v in preds.values()) == len(want)
    with pytest.raises(ValueError, match="scores for"):
        cs.predictions(np.zeros(3))


def test_candidate_set_keeps_empty_queries(tiny_world, world):
    path = os.path.join(tiny_world.data, "valid", "valid.tsv")
    cands = tsv.read_candidates(path)
    q0 = min(cands)
    cands[q0]["query"] = "the for with"
    cs = utils.CandidateSet(cands, world[1])
    assert cs.qids[0] == q0 and cs.tokens[0] == []
    tokens, lengths = utils.pad_tokens(cs.tokens[:4])  # as the models' scoring pads them
    assert lengths[0] == 0 and (tokens[0] == PAD).all()
    assert cs.offsets[1] == len(cands[q0]["products"])


def test_write_predictions_round_trip(tmp_path):
    path = str(tmp_path / "out" / "valid.json")
    scores = {7: [(3, 0.5), (1, 0.5), (2, np.float32(0.9))], "8": [(10, -1.0), (4, 2.0)]}
    metric.write_predictions(scores, path)
    with open(path, encoding="utf-8") as f:
        raw = json.load(f)
    assert raw == {"7": [["2", pytest.approx(0.9)], ["1", 0.5], ["3", 0.5]],
                   "8": [["4", 2.0], ["10", -1.0]]}
    back = metric.load_predictions(path)
    assert list(back[7]) == metric.rank(scores[7]) == [2, 1, 3]
    assert back[8] == {4: 2.0, 10: -1.0}
    assert metric.ndcg_at_k({q: list(s.items()) for q, s in back.items()},
                            {7: {2}, 8: {4}}) == 1.0
    assert os.listdir(tmp_path / "out") == ["valid.json"]


@pytest.mark.parametrize("bad,msg", [(float("nan"), "NaN"), (float("inf"), "infinite")])
def test_write_predictions_rejects_bad_scores(tmp_path, bad, msg):
    path = str(tmp_path / "p.json")
    metric.write_predictions({1: [(5, 1.0)]}, path)
    with pytest.raises(DataError, match="query 2: product 9 .*%s" % msg):
        metric.write_predictions({1: [(5, 1.0)], 2: [(8, 0.1), (9, bad)]}, path)
    assert metric.load_predictions(path) == {1: {5: 1.0}}  # the old file is intact
    with pytest.raises(DataError, match="twice"):
        metric.write_predictions({1: [(5, 1.0), (5, 2.0)]}, path)
    assert os.listdir(tmp_path) == ["p.json"]  # no temporary file left


def test_ragged_round_trip_and_pickle():
    r = utils.Ragged(np.array([3, 1, 7]), [0, 2, 2, 3])
    assert len(r) == 3 and [x.tolist() for x in r] == [[3, 1], [], [7]]
    assert r[-1].tolist() == [7] and r.lengths().tolist() == [2, 0, 1]
    words = utils.Ragged.from_words([["red", "dress"], [], ["red"]])
    back = pickle.loads(pickle.dumps(words))
    assert list(back) == [["red", "dress"], [], ["red"]] and back.pool == ["red", "dress"]
    with pytest.raises(IndexError):
        r[3]
    with pytest.raises(ValueError, match="offsets"):
        utils.Ragged(np.arange(3), [0, 2, 1, 3])


def test_dataset_same_from_ragged_and_lists(world):
    queries, vocab, store = world
    as_lists = dict(queries, tokens=list(queries["tokens"]), products=list(queries["products"]))
    a, b = utils.PairDataset(queries, vocab, store), utils.PairDataset(as_lists, vocab, store)
    for name in ("pair_query", "pair_product", "tok_flat", "tok_off"):
        assert np.array_equal(getattr(a, name), getattr(b, name)), name
    sa, sb = NegativeSampler(queries), NegativeSampler(as_lists)
    assert np.array_equal(sa.allowed, sb.allowed) and np.array_equal(sa.prod_flat, sb.prod_flat)
