"""model3, the dual encoder: shapes and unit norm, the loss by hand (same-query pairs are
not negatives; fixed unit vectors by log-sum-exp), the all-gather's backward returning
each rank the gradient on its rows, the presets; slow: a batch split across two gloo
processes against one process on the whole batch (the same loss and gradients), a tiny
world learns,
validation writes both files, two gloo processes keep identical replicas."""
import argparse
import json
import math
import os

import pytest
import torch
import torch.distributed as td
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel

import engine
import matching
import metric
import runtime
import tsv
import utils
from layers import ENCODER_PRESETS, ImageEncoder
from model3 import model as m3_model, train as m3_train, validation as m3_validation
from test_stages import _common, _log, _torchrun

CFG = ENCODER_PRESETS["tiny"]


def _model(**options):
    torch.manual_seed(0)
    a = argparse.Namespace(**dict(m3_model.PRESETS["tiny"], **options))
    return m3_model.build_model(ImageEncoder(CFG), torch.randn(12, CFG["d_word"]), a), a


def _batch(b=4):
    regions = [torch.rand(b, 3, 5), torch.rand(b, 3, CFG["feat_dim"]),
               torch.ones(b, 3, dtype=torch.bool)]
    regions[2][0, 2:] = False                                    # a product with 2 boxes
    out = dict(q_tokens=torch.tensor([[4, 5], [6, 7], [8, 0], [9, 4]])[:b], qi=torch.arange(b))
    out.update(zip(["p_boxes", "p_feats", "p_mask"], regions))
    out.update(zip(["n_boxes", "n_feats", "n_mask"], [r.flip(0) for r in regions]))
    out["nq_tokens"] = out["q_tokens"].roll(1, 0)
    return out


@pytest.mark.parametrize("pool,text", [("attn", "attn"), ("mean", "gru")])
def test_vectors_have_unit_norm_and_the_score_is_their_dot_product(pool, text):
    m, a = _model(pool=pool, text=text)
    m.eval()
    b = _batch()
    with torch.no_grad():
        image = m.encode_product_batch({"boxes": b["p_boxes"], "feats": b["p_feats"],
                                        "mask": b["p_mask"]})
        tokens = torch.tensor([[4, 5, 0], [6, 0, 0], [0, 0, 0]])   # the last one empty
        text_vec = m.encode_queries(tokens)
        pairs = torch.tensor([[0, 1], [2, 3], [1, 0]])
        scores = m.score(tokens, image, pairs)
    assert image.shape == (4, a.dim) and text_vec.shape == (3, a.dim)
    assert torch.allclose(image.norm(dim=1), torch.ones(4), atol=1e-5)
    assert torch.allclose(text_vec.norm(dim=1), torch.ones(3), atol=1e-5)
    assert torch.allclose(scores, (text_vec[pairs[:, 0]] * image[pairs[:, 1]]).sum(1))
    # padding changes nothing: the 2-box product alone, unpadded
    with torch.no_grad():
        alone = m.encode_image(b["p_boxes"][:1, :2], b["p_feats"][:1, :2], b["p_mask"][:1, :2])
    assert torch.allclose(alone, image[:1], atol=1e-5)


def test_loss_masks_pairs_of_the_same_query():
    """Rows 0 and 1 are one query: neither is the other's negative; by hand otherwise."""
    torch.manual_seed(0)
    text, image, neg_text, neg_image = F.normalize(torch.randn(4, 3, 4), dim=2)
    qi, scale = torch.tensor([7, 7, 2]), torch.tensor(10.0)
    loss = m3_model.infonce_loss(text, image, qi, scale, neg_query=neg_text,
                                 neg_product=neg_image)
    keep = [[0, 2], [1, 2], [0, 1, 2]]  # the columns row i compares against

    def side(a, b, neg):
        return sum(-torch.log_softmax(scale * torch.cat([a[i] @ b[keep[i]].t(),
                                                         (a[i] * neg[i]).sum()[None]]), 0)
                   [keep[i].index(i)] for i in range(3)) / 3
    want = (side(text, image, neg_image) + side(image, text, neg_text)) / 2
    assert loss.item() == pytest.approx(want.item(), rel=1e-5)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # the logits stay float32
        assert m3_model.infonce_loss(text, image, qi, scale, neg_query=neg_text,
                                     neg_product=neg_image).item() == pytest.approx(loss.item())
    # as two queries, rows 0 and 1 are each other's negatives: more terms in the softmax
    assert loss < m3_model.infonce_loss(text, image, torch.tensor([7, 8, 2]), scale,
                                        neg_query=neg_text, neg_product=neg_image)


def test_loss_on_fixed_unit_vectors_by_log_sum_exp():
    """Three rows, rows 0 and 1 one query; every logit written out: the row's loss is
    log sum exp over its kept columns (its own pair, the other queries' rows, its sampled
    negative) minus its own pair's, per direction, rows averaged, directions averaged."""
    v = lambda *rows: torch.tensor(rows)                          # noqa: E731
    text, image = v([1, 0], [0, 1], [.6, .8]), v([.8, .6], [0, 1], [1, 0])
    neg_image, neg_text = v([0, 1], [1, 0], [-.6, .8]), v([0, 1], [1, 0], [.8, -.6])
    s = 2.0

    def row(pos, *others):
        return math.log(sum(math.exp(s * x) for x in (pos,) + others)) - s * pos
    # query -> products: row 0 keeps image 0, image 2 and its negative (image 1 is its
    # query's other row); row 1 keeps images 1, 2 and its negative; row 2 keeps all three
    t2i = (row(.8, 1.0, 0.0) + row(1.0, 0.0, 0.0) + row(.6, .96, .8, .28)) / 3
    # product -> queries, the same columns on the text side
    i2t = (row(.8, .96, .6) + row(1.0, .8, 0.0) + row(.6, 1.0, 0.0, .8)) / 3
    loss = m3_model.infonce_loss(text, image, torch.tensor([4, 4, 9]), torch.tensor(s),
                                 neg_query=neg_text, neg_product=neg_image)
    assert loss.item() == pytest.approx((t2i + i2t) / 2, rel=1e-6)


def test_gather_rows_returns_every_ranks_gradient_to_its_rows(monkeypatch):
    """As rank 1 of 2: the gathered rows are rank 0's then x; the backward sums the
    gradient over the ranks (all_reduce; here rank 0 contributes as much as this rank) and
    hands this rank the part of its own rows."""
    other = torch.full((2, 3), 5.0)

    def all_gather(parts, x):
        parts[0].copy_(other), parts[1].copy_(x)

    def all_reduce(t):
        t.mul_(2)                                  # rank 0's gradient equals this rank's
    for name, value in (("is_initialized", lambda: True), ("get_world_size", lambda: 2),
                        ("get_rank", lambda: 1), ("all_gather", all_gather),
                        ("all_reduce", all_reduce)):
        monkeypatch.setattr(td, name, value)
    x = torch.randn(2, 3, requires_grad=True)
    rows, start = m3_model.gather_rows(x)
    assert start == 2 and torch.equal(rows[:2], other) and torch.equal(rows[2:], x.detach())
    (rows * torch.arange(12.0).view(4, 3)).sum().backward()
    assert torch.equal(x.grad, 2 * torch.arange(6.0, 12.0).view(2, 3))


def _halves(batch):
    return [{k: v[r * 2:r * 2 + 2] for k, v in batch.items()} for r in (0, 1)]


def _loss_and_grads(model, batch):
    loss, _ = model(**batch)
    loss.backward()
    out = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    return loss.detach(), out


def _gloo_rank(rank, init, batch, out):
    """One of two gloo processes: its half of ``batch`` through DDP; saves its loss and the
    gradients DDP averaged."""
    td.init_process_group("gloo", init_method="file://" + init, rank=rank, world_size=2)
    try:
        m, _ = _model()
        loss, grads = _loss_and_grads(DistributedDataParallel(m.eval()), _halves(batch)[rank])
        torch.save((loss, {n.removeprefix("module."): g for n, g in grads.items()}),
                   os.path.join(out, "%d.pt" % rank))
    finally:
        td.destroy_process_group()


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    """A batch of 4 (rows 0 and 2 one query, rows 1 and 3 another: the mask crosses the
    ranks), its halves on 2 gloo processes under DDP -> (full batch, [(loss, averaged
    gradients) of each rank])."""
    out = tmp_path_factory.mktemp("gloo")
    torch.manual_seed(1)
    batch = dict(_batch(), qi=torch.tensor([3, 5, 3, 5]))
    torch.multiprocessing.spawn(_gloo_rank, args=(str(out / "init"), batch, str(out)),
                                nprocs=2)
    return batch, [torch.load(out / ("%d.pt" % r)) for r in (0, 1)]


@pytest.mark.slow
def test_gathered_negatives_give_the_doubled_batch_loss_and_gradient(two_ranks):
    """Rank r's loss L_r is the mean over its B rows of l_i, row i against every rank's
    columns, so the mean of the ranks' losses is the one-process loss of the 2B rows,
    L = (L_0 + L_1) / 2. The gather returns to each rank the gradient of every rank's loss
    on its rows, so DDP's average (grad L_0 + grad L_1) / 2 is grad L: the same on both
    ranks and equal to one process on the doubled batch."""
    batch, ranks = two_ranks
    m, _ = _model()
    full_loss, full = _loss_and_grads(m.eval(), batch)
    assert (ranks[0][0] + ranks[1][0]).item() / 2 == pytest.approx(full_loss.item(), rel=1e-6)
    for _, rank_grads in ranks:
        assert set(rank_grads) == set(full)
        for n, g in rank_grads.items():
            torch.testing.assert_close(g, full[n], rtol=1e-5, atol=1e-6, msg=n)


def test_loss_falls_on_one_batch_and_the_frozen_trunk_gets_no_gradient():
    m, _ = _model()
    m.train()
    b = _batch()
    opt = torch.optim.Adam([p for p in m.parameters() if p.requires_grad], lr=3e-3)
    losses = []
    for _ in range(15):
        loss, _ = m(**b)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] / 2
    assert all(p.grad is None for p in m.encoder.trunk.parameters())
    assert not m.text.emb.weight.requires_grad


def test_raw_path_starts_at_zero_and_trains_at_the_image_rate():
    """The raw-feature MLP adds nothing at the start (its last layer is zero), then learns:
    its parameters are in the image group and get gradients while the trunk stays frozen."""
    b = _batch()
    plain, _ = _model(raw_path=0)
    raw, a = _model(raw_path=1)
    raw.load_state_dict(plain.state_dict(), strict=False)
    raw.eval(), plain.eval()
    regions = {"boxes": b["p_boxes"], "feats": b["p_feats"], "mask": b["p_mask"]}
    with torch.no_grad():
        assert torch.equal(raw.encode_product_batch(regions), plain.encode_product_batch(regions))
    raw.train()
    opt, _ = engine.make_optimizer(matching.param_groups(raw, a), a.gamma)
    names = {id(p): n for n, p in raw.named_parameters()}
    assert {n for n in names.values() if ".raw." in n} <= {names[id(p)]
                                                         for p in opt.param_groups[0]["params"]}
    raw(**b)[0].backward()
    assert raw.encoder.raw[2].weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in raw.encoder.trunk.parameters())


@pytest.mark.parametrize("freeze", [1, 0])
def test_parameter_groups(freeze):
    """box embedding, pooling and projection at lr_image; text side and temperature at
    lr_text; the trunk at lr_trunk only when tuned."""
    m, a = _model(tune_trunk=1 - freeze)
    opt, _ = engine.make_optimizer(matching.param_groups(m, a), a.gamma)
    names = {id(p): n for n, p in m.named_parameters()}
    groups = [{names[id(p)] for p in g["params"]} for g in opt.param_groups]
    assert [g["lr"] for g in opt.param_groups] == [a.lr_image, a.lr_text] + \
        ([] if freeze else [a.lr_trunk])
    assert {n.split(".")[1] for n in groups[0]} == {"box", "pool", "proj"}
    assert "logit_scale" in groups[1]
    assert groups[2:] == ([] if freeze else [{n for n in names.values()
                                             if n.startswith("encoder.trunk.")}])


def test_presets_pinned():
    def args(preset):
        return engine.apply_preset(m3_train.parse_args(["--out", "o", "--preset", preset]),
                                   m3_train.PRESETS)
    keys = ("batch_size", "lr_text", "lr_image", "lr_trunk", "weight_decay", "gamma", "epochs",
            "p_near", "dim", "tune_trunk", "pool", "text", "group_rows", "group_share",
            "raw_path")
    assert {p: tuple(getattr(args(p), k) for k in keys) for p in ("paper", "small", "tiny")} == {
        "paper": (130, 1e-4, 1e-4, 5e-6, 1e-6, 0.95, 5, 0.0, 1024, 0, "attn", "attn", 0, 1.0, 0),
        "small": (128, 1e-3, 1e-3, 1e-4, 1e-6, 0.9, 5, 0.5, 256, 0, "attn", "gru", 8, 1.0, 0),
        "tiny": (16, 1e-3, 1e-3, 1e-4, 1e-6, 0.95, 2, 0.5, 32, 0, "attn", "gru", 4, 1.0, 0)}
    a = args("paper")
    with torch.device("meta"):
        m = m3_model.build_model(ImageEncoder(ENCODER_PRESETS["paper"]), torch.empty(100, 1024), a)
    assert (m.encoder.proj.in_features, m.encoder.proj.out_features) == (2048, 1024)
    assert (m.text_proj.in_features, m.text_proj.out_features) == (1024, 1024)
    assert not any(p.requires_grad for p in m.encoder.trunk.parameters())
    assert not m.text.emb.weight.requires_grad


# ---------------------------------------------------------------------------------------
# slow: training, on the tiny world and the export of test_stages.py
# ---------------------------------------------------------------------------------------
@pytest.mark.slow
def test_trains_beats_random_and_writes_predictions(pretrained, tiny_world, tmp_path):
    export = os.path.join(pretrained, "encoder.pt")
    out, pred = str(tmp_path / "model3"), str(tmp_path / "pred")
    m3_train.main(_common(tiny_world, out, epochs=3) + ["--export", export])
    log = _log(out)
    best = max(r["valid_ndcg5"] for r in log)
    assert log[-1]["loss"] < log[0]["loss"]
    assert best > tiny_world.report["valid"]["random"] + 0.1
    ck = runtime.load_checkpoint(os.path.join(out, "best.pt"))
    assert not any(k.startswith("encoder.trunk.") for k in ck["model"])  # frozen: not stored
    res = m3_validation.main(["--ckpt", os.path.join(out, "best.pt"), "--split", "valid",
                              "--split", "testB", "--out", pred])
    assert set(res) == {"valid", "testB"} and res["valid"] == pytest.approx(best, abs=1e-6)
    for split, name in (("valid", "valid"), ("testB", "test")):  # what the blend reads
        path = os.path.join(pred, "%s_pred_model3.json" % name)
        preds = metric.load_predictions(path)
        cands = tsv.read_candidates(os.path.join(tiny_world.data, split, split + ".tsv"))
        assert {q: set(s) for q, s in preds.items()} == \
            {q: {p["product_id"] for p in c["products"]} for q, c in cands.items()}
        with open(path) as f:
            assert all([s for _, s in v] == sorted((s for _, s in v), reverse=True)
                       for v in json.load(f).values())
        answers = metric.load_answers(os.path.join(tiny_world.data, split, split + "_answer.json"))
        assert metric.ndcg_at_k({q: list(s.items()) for q, s in preds.items()}, answers) == \
            pytest.approx(res[split])


@pytest.mark.slow
def test_fine_tuned_trunk_is_stored_and_loads(pretrained, tiny_world, tmp_path):
    export = os.path.join(pretrained, "encoder.pt")
    out = str(tmp_path / "tuned")
    m3_train.main(_common(tiny_world, out, epochs=1) + ["--export", export, "--no-eval",
                                                        "--tune-trunk", "1"])
    ck = runtime.load_checkpoint(os.path.join(out, "last.pt"))
    assert any(k.startswith("encoder.trunk.") for k in ck["model"])
    model, vocab, _ = matching.load_trained(m3_model.build_model, os.path.join(out, "last.pt"))
    assert model.encoder.tune_trunk
    cset = utils.CandidateSet.from_tsv(os.path.join(tiny_world.data, "valid/valid.tsv"), vocab)
    with torch.no_grad():
        v = model.eval().encode_product_batch(next(cset.product_batches(8)))
    assert torch.allclose(v.norm(dim=1), torch.ones(len(v)), atol=1e-5)


@pytest.mark.slow
def test_two_process_gloo_keeps_replicas_identical(pretrained, tiny_world, tmp_path):
    export = os.path.join(pretrained, "encoder.pt")
    """Under torchrun the in-batch pool is both ranks' rows; DDP keeps the replicas equal."""
    out = str(tmp_path / "run")
    _torchrun("model3/train.py", _common(tiny_world, out) + ["--export", export], tmp_path)
    log = _log(out)
    assert len(log) == 2 and all(r["rank_param_maxdiff"] == 0.0 for r in log)

