"""model4, the cross-encoder: shapes and padding (padded words and regions change no score,
one stream or two), the listwise loss by hand, the pairs a batch scores, forward's loss
against the pairs scored one by one, masked-word prediction, the detector classes in the
batches and candidate sets, the presets; slow: a batch split across two gloo processes
against one process on the whole batch, training writes both prediction files (and the
re-ranking scores it alike), and a resumed run ends bit-identical to an uninterrupted
one."""
import argparse
import math
import os

import pytest
import torch
import torch.distributed as td
from torch.nn.parallel import DistributedDataParallel

import engine
import matching
import metric
import sampler
import tsv
import utils
from catalogue import rerank
from layers import ENCODER_PRESETS, ImageEncoder
from model4 import model as m4_model, train as m4_train, validation as m4_validation
from test_stages import _common, _log, _params

CFG = ENCODER_PRESETS["tiny"]


def _model(**options):
    torch.manual_seed(0)
    a = argparse.Namespace(**dict(m4_model.PRESETS["tiny"], **options))
    return m4_model.build_model(ImageEncoder(CFG), torch.randn(12, CFG["d_word"]), a), a


def _regions(b, n, seed):
    g = torch.Generator().manual_seed(seed)
    return [torch.rand(b, n, 5, generator=g), torch.rand(b, n, CFG["feat_dim"], generator=g),
            torch.ones(b, n, dtype=torch.bool), torch.randint(0, 33, (b, n), generator=g)]


def _batch(b=8):
    """b rows; rows 0 and 1 one query; the first product has 2 of its 3 boxes."""
    out = dict(q_tokens=torch.randint(4, 12, (b, 3), generator=torch.Generator().manual_seed(2)),
               qi=torch.tensor([0, 0] + list(range(1, b - 1))))
    out["q_tokens"][2, 1:] = 0                                     # a one-word query
    p, n = _regions(b, 3, 0), _regions(b, 4, 1)
    p[2][0, 2] = False
    out.update(zip(["p_boxes", "p_feats", "p_mask", "p_labels"], p))
    out.update(zip(["n_boxes", "n_feats", "n_mask", "n_labels"], n))
    out["nq_tokens"] = out["q_tokens"].roll(1, 0)
    return out


@pytest.mark.parametrize("streams", [1, 2])
def test_one_score_a_pair_and_padding_changes_none(streams):
    m, _ = _model(streams=streams)
    m.eval()
    b = _batch()
    p = [b[k] for k in ("p_boxes", "p_feats", "p_mask", "p_labels")]
    with torch.no_grad():
        s = m.pair_scores(b["q_tokens"], *p)
        # the 2-box product alone and unpadded; its query with two more padding words
        alone = m.pair_scores(b["q_tokens"][:1], *(x[:1, :2] for x in p))
        longer = m.pair_scores(torch.nn.functional.pad(b["q_tokens"][:1], (0, 2)),
                               *(x[:1] for x in p))
        # what lies under the padding is never read
        noisy = [x.clone() for x in p]
        noisy[0][0, 2], noisy[1][0, 2], noisy[3][0, 2] = 9.0, 9.0, 32
        masked = m.pair_scores(b["q_tokens"][:1], *(x[:1] for x in noisy))
    assert s.shape == (8,) and torch.isfinite(s).all()
    for other in (alone, longer, masked):
        torch.testing.assert_close(other, s[:1], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(s[1:2], s[:1])                       # pairs differ


def test_listwise_loss_by_hand():
    pos = torch.tensor([1.0, 0.0])
    negatives = torch.tensor([[0.0, 2.0, float("-inf")], [-1.0, float("-inf"), float("-inf")]])
    want = (-math.log(math.e / (math.e + 1 + math.e ** 2))
            - math.log(1 / (1 + math.e ** -1))) / 2
    assert m4_model.listwise_loss(pos, negatives).item() == pytest.approx(want, rel=1e-6)


def test_a_batch_scores_its_runs_without_same_query_rows():
    """Rows in runs of 3: (0 1 2) (3 4 5) (6); rows 0 and 1 one query."""
    qi = torch.tensor([5, 5, 6, 7, 8, 9, 4])
    ti, ri, (i, j) = m4_model.pair_index(qi, 3)
    assert sorted(zip(i.tolist(), j.tolist())) == [(0, 2), (1, 2), (2, 0), (2, 1), (3, 4),
                                                    (3, 5), (4, 3), (4, 5), (5, 3), (5, 4)]
    B = len(qi)
    assert ti[:3 * B].tolist() == list(range(B)) * 2 + list(range(B, 2 * B))
    assert ri[:3 * B].tolist() == list(range(B)) + list(range(B, 2 * B)) + list(range(B))
    assert torch.equal(ti[3 * B:], i) and torch.equal(ri[3 * B:], j)
    _, _, (i, _) = m4_model.pair_index(qi, 0)
    assert len(i) == 0


@pytest.mark.parametrize("streams", [1, 2])
def test_forward_is_the_listwise_loss_of_the_pairs_scored_one_by_one(streams):
    """Row r: its positive against (query, negative product), (negative query, product) and
    the products of the other rows of its block of 4 of another query."""
    m, a = _model(streams=streams, block_rows=4)
    m.eval()
    b = _batch()
    with torch.no_grad():
        loss, parts = m(**b)
        regions = {s: [b[s + k] for k in ("_boxes", "_feats", "_mask", "_labels")]
                   for s in ("p", "n")}

        def score(tokens, side, k):
            return m.pair_scores(tokens[k:k + 1], *(x[k:k + 1] for x in regions[side]))[0]
        rows = []
        for r in range(8):
            others = [j for j in range(8) if j // a.block_rows == r // a.block_rows
                      and b["qi"][j] != b["qi"][r]]
            logits = torch.stack([score(b["q_tokens"], "p", r), score(b["q_tokens"], "n", r),
                                  score(b["nq_tokens"], "p", r)]
                                 + [m.pair_scores(b["q_tokens"][r:r + 1],
                                                  *(x[j:j + 1] for x in regions["p"]))[0]
                                    for j in others])
            rows.append(torch.logsumexp(logits, 0) - logits[0])
    assert loss.item() == pytest.approx(torch.stack(rows).mean().item(), rel=1e-5)
    assert set(parts) == {"match", "pos"}


def test_masked_words_add_a_loss_and_training_lowers_both():
    """Dropout off (eval), so that 25 steps on one batch show the trend of both parts."""
    m, a = _model(mlm_weight=0.5)
    m.eval()
    b = _batch()
    opt = torch.optim.Adam([p for p in m.parameters() if p.requires_grad], lr=3e-3)
    seen = []
    for _ in range(25):
        loss, parts = m(**b)
        opt.zero_grad()
        loss.backward()
        opt.step()
        assert loss.item() == pytest.approx((parts["match"] + 0.5 * parts["mlm"]).item(),
                                            rel=1e-5)
        seen.append({k: v.item() for k, v in parts.items()})
    assert seen[-1]["match"] < seen[0]["match"] - 0.2 and seen[-1]["mlm"] < seen[0]["mlm"] / 2
    assert all(p.grad is None for p in m.encoder.trunk.parameters())   # frozen
    assert _model()[0].mlm is None and _model()[0].words.mask is None  # off: not built


def test_batches_and_candidate_sets_carry_each_regions_class(tiny_world):
    queries, vocab = utils.load_info(tiny_world.info)
    store = utils.ProductStore(tiny_world.features)
    neg = sampler.NegativeSampler(queries)
    ds = utils.PairDataset(queries, vocab, store, sampler=neg, labels=True)
    items = [ds[i] for i in range(5)]
    padded, flat = utils.collate_pairs(items), utils.unflatten(utils.collate_pairs_flat(items))
    for side, key in (("p", "pid"), ("n", "npid")):
        assert torch.equal(padded[side + "_labels"], flat[side + "_labels"])
        assert padded[side + "_labels"].shape == padded[side + "_mask"].shape
        for k, it in enumerate(items):
            want = store.get(it[key])[2]
            assert padded[side + "_labels"][k, :len(want)].tolist() == want.tolist()
    assert "p_labels" not in utils.collate_pairs([utils.PairDataset(queries, vocab, store)[0]])
    path = os.path.join(tiny_world.data, "valid", "valid.tsv")
    cset = utils.CandidateSet.from_tsv(path, vocab)
    rows = {p["product_id"]: p for c in tsv.read_candidates(path).values() for p in c["products"]}
    b = next(cset.product_batches(7))
    for k, pid in enumerate(b["pids"].tolist()):
        n = int(b["mask"][k].sum())
        assert b["labels"][k, :n].tolist() == rows[pid]["class_labels"].tolist()


def test_presets_pinned():
    def args(preset):
        return engine.apply_preset(m4_train.parse_args(["--out", "o", "--preset", preset]),
                                   m4_train.PRESETS)
    keys = ("batch_size", "lr_text", "lr_image", "weight_decay", "gamma", "epochs", "p_near",
            "group_rows", "block_rows", "word_match", "streams", "d_model", "heads", "d_ff",
            "layers", "text_layers", "region_layers", "cross_layers", "dropout", "mlm_weight")
    assert {p: tuple(getattr(args(p), k) for k in keys) for p in ("paper", "small", "tiny")} == {
        "paper": (32, 5e-5, 5e-5, 1e-6, 0.95, 4, 0.0, 0, 8, 0, 2, 768, 12, 3072, 12, 9, 5, 5,
                  0.1, 0.0),
        "small": (32, 1e-3, 1e-3, 1e-6, 0.9, 3, 0.5, 0, 8, 1, 1, 128, 4, 256, 3, 1, 1, 2,
                  0.1, 0.0),
        "tiny": (16, 1e-3, 1e-3, 1e-6, 0.95, 2, 0.5, 0, 8, 1, 1, 32, 2, 64, 2, 1, 1, 1,
                 0.1, 0.0)}
    a = args("paper")
    with torch.device("meta"):
        m = m4_model.build_model(ImageEncoder(ENCODER_PRESETS["paper"]), torch.empty(100, 1024), a)
    assert (len(m.text_body.layers), len(m.region_body.layers), len(m.cross)) == (9, 5, 5)
    layer = m.text_body.layers[0]
    assert (layer.self_attn.embed_dim, layer.self_attn.num_heads, layer.linear1.out_features,
            layer.norm_first) == (768, 12, 3072, True)
    assert (m.words.proj.in_features, m.encoder.proj.in_features) == (1024, 2048)
    assert m.cross[-1].text_only and not m.cross[0].text_only
    assert not any(p.requires_grad for p in m.encoder.trunk.parameters())
    assert m.words.emb.weight.requires_grad                    # initialised, then trained
    groups = matching.param_groups(m, a)
    assert {id(p) for p in groups[0]["params"]} == {
        id(p) for n, p in m.named_parameters() if n.startswith("encoder.")
        and not n.startswith("encoder.trunk.")}


def test_the_word_match_feature_is_the_pretraining_word_score():
    """Each word token carries max over the export's word heads 1..4 of <its export
    embedding, head>, through a Linear layer; [CLS] and a masked word carry none."""
    m, _ = _model(mlm_weight=1.0)
    words = m.words.eval()
    words.norm = torch.nn.Identity()
    tokens, heads = torch.tensor([[4, 7, 0]]), torch.randn(1, 5, CFG["d_word"])
    emb = words.match_emb.weight
    s = torch.stack([(heads[0, 1:] @ emb[t]).max() for t in (4, 7, 0)])
    with torch.no_grad():
        got = words(tokens, heads) - words(tokens, torch.zeros_like(heads))
        want = words.match(s[:, None]) - words.match(torch.zeros(3, 1))
        torch.testing.assert_close(got[0, 1:], want)
        assert torch.equal(got[0, 0], torch.zeros_like(got[0, 0]))
        masked = words(tokens, heads, mask_at=torch.tensor([[False, True, False]])) \
            - words(tokens, torch.zeros_like(heads), mask_at=torch.tensor([[False, True, False]]))
    assert torch.equal(masked[0, 2], torch.zeros_like(masked[0, 2]))
    assert not words.match_emb.weight.requires_grad
    assert not any(p.requires_grad for p in m.encoder.out.parameters())


def test_word_embeddings_start_from_the_export():
    emb = torch.randn(12, CFG["d_word"])
    a = argparse.Namespace(**m4_model.PRESETS["tiny"])
    m = m4_model.build_model(ImageEncoder(CFG), emb, a)
    assert torch.equal(m.words.emb.weight, emb) and m.words.emb.weight.data_ptr() != emb.data_ptr()


# ---------------------------------------------------------------------------------------
# slow: two gloo processes; training on the tiny world and the export of test_stages.py
# ---------------------------------------------------------------------------------------
def _halves(batch):
    return [{k: v[r * 4:r * 4 + 4] for k, v in batch.items()} for r in (0, 1)]


def _loss_and_grads(model, batch):
    loss, _ = model(**batch)
    loss.backward()
    out = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    return loss.detach(), out


def _gloo_rank(rank, init, batch, out):
    """One of two gloo processes: its half of ``batch`` (one block of 4) through DDP; saves
    its loss and the gradients DDP averaged."""
    td.init_process_group("gloo", init_method="file://" + init, rank=rank, world_size=2)
    try:
        m, _ = _model(block_rows=4)
        loss, grads = _loss_and_grads(DistributedDataParallel(m.eval()), _halves(batch)[rank])
        torch.save((loss, {n.removeprefix("module."): g for n, g in grads.items()}),
                   os.path.join(out, "%d.pt" % rank))
    finally:
        td.destroy_process_group()


@pytest.mark.slow
def test_two_gloo_processes_give_the_doubled_batch_loss_and_gradient(tmp_path):
    """Each row's loss reads only its own pairs and its block's (blocks of 4 never straddle
    the ranks' halves), so the mean of the ranks' losses is the one-process loss of the 8
    rows and DDP's averaged gradient is its gradient."""
    batch = _batch()
    torch.multiprocessing.spawn(_gloo_rank, args=(str(tmp_path / "init"), batch,
                                                  str(tmp_path)), nprocs=2)
    ranks = [torch.load(tmp_path / ("%d.pt" % r)) for r in (0, 1)]
    m, _ = _model(block_rows=4)
    full_loss, full = _loss_and_grads(m.eval(), batch)
    assert (ranks[0][0] + ranks[1][0]).item() / 2 == pytest.approx(full_loss.item(), rel=1e-6)
    for _, rank_grads in ranks:
        assert set(rank_grads) == set(full)
        for n, g in rank_grads.items():
            torch.testing.assert_close(g, full[n], rtol=1e-5, atol=1e-6, msg=n)


@pytest.mark.slow
def test_trains_and_writes_predictions_the_blend_reads(pretrained, tiny_world, tmp_path):
    export = os.path.join(pretrained, "encoder.pt")
    out, pred = str(tmp_path / "model4"), str(tmp_path / "pred")
    m4_train.main(_common(tiny_world, out, epochs=1) + ["--export", export, "--streams", "2",
                                                        "--mlm-weight", "0.5"])
    log = _log(out)
    assert {"match", "mlm", "valid_ndcg5"} <= set(log[0])
    res = m4_validation.main(["--ckpt", os.path.join(out, "best.pt"), "--split", "valid",
                              "--split", "testB", "--out", pred])
    assert res["valid"] == pytest.approx(log[0]["valid_ndcg5"], abs=1e-6)
    preds_valid = metric.load_predictions(os.path.join(pred, "valid_pred_model4.json"))
    for split, name in (("valid", "valid"), ("testB", "test")):
        preds = metric.load_predictions(os.path.join(pred, "%s_pred_model4.json" % name))
        cands = tsv.read_candidates(os.path.join(tiny_world.data, split, split + ".tsv"))
        assert {q: set(s) for q, s in preds.items()} == \
            {q: {p["product_id"] for p in c["products"]} for q, c in cands.items()}
    # the re-ranking of a retrieved top K loads it as a member and scores the same
    score, vocab, _ = rerank.load_member("model4", os.path.join(out, "best.pt"),
                                         torch.device("cpu"))
    cset = utils.CandidateSet.from_tsv(os.path.join(tiny_world.data, "valid", "valid.tsv"), vocab)
    got = score(cset)
    assert all(s == pytest.approx(preds_valid[q][p], abs=1e-6)
               for q, ps in got.items() for p, s in ps)


@pytest.mark.slow
def test_resume_equals_uninterrupted_bit_for_bit(pretrained, tiny_world, tmp_path):
    export = os.path.join(pretrained, "encoder.pt")
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    flags = ["--export", export, "--no-eval", "--mlm-weight", "0.5"]  # dropout and masking
    m4_train.main(_common(tiny_world, a, epochs=2) + flags)
    m4_train.main(_common(tiny_world, b, epochs=1) + flags)
    m4_train.main(_common(tiny_world, b, epochs=2) + flags + ["--resume"])
    pa, pb = _params(os.path.join(a, "last.pt")), _params(os.path.join(b, "last.pt"))
    assert pa.keys() == pb.keys()
    for k in pa:
        assert torch.equal(pa[k], pb[k]), k
    assert _log(a)[1]["loss"] == _log(b)[1]["loss"]
