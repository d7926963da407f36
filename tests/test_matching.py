"""model1 and model2: shapes, masking, the losses by hand, empty queries."""
import pytest
import torch

import utils
from layers import ENCODER_PRESETS, ImageEncoder
from model1.model import WordImageMatcher, pairwise_loss
from model2.model import SentenceImageMatcher

CFG = ENCODER_PRESETS["tiny"]


def _parts(seed=0, vocab=10):
    torch.manual_seed(seed)
    return ImageEncoder(CFG), torch.randn(vocab, CFG["d_word"])


def _regions(b, n=3):
    return torch.rand(b, n, 5), torch.rand(b, n, CFG["feat_dim"]), torch.ones(b, n, dtype=torch.bool)


def _batch():
    """4 queries (one padded) with their products, negative products and negative queries."""
    b = dict(q_tokens=torch.tensor([[4, 5], [6, 7], [8, 0], [9, 4]]), qi=torch.arange(4))
    b.update(zip(["p_boxes", "p_feats", "p_mask"], _regions(4)))
    b.update(zip(["n_boxes", "n_feats", "n_mask"], _regions(4)))
    b["nq_tokens"] = b["q_tokens"].roll(1, 0)
    return b


def _fit_one_batch(m, steps=40):
    """Adam on the trainable parameters over one fixed batch -> the loss of each step."""
    b = _batch()
    opt = torch.optim.Adam([p for p in m.parameters() if p.requires_grad], lr=3e-3)
    losses = []
    for _ in range(steps):
        loss, _ = m(**utils.batch_inputs(b, utils.forward_keys(m.forward)))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def test_model1_score_shapes_and_masking():
    enc, emb = _parts()
    m = WordImageMatcher(enc, emb, hidden=8, weight_hidden=8).eval()
    heads = m.encode_image(*_regions(4))
    tokens = torch.tensor([[4, 5, 0, 0], [6, 0, 0, 0], [0, 0, 0, 0]])
    S = m.score_matrix(m.encode_text(tokens), heads)
    assert S.shape == (3, 4) and torch.isfinite(S).all()
    assert S[2].eq(0).all()  # a query with no words: same score for all -> ties by id
    # padding words change nothing
    S2 = m.score_matrix(m.encode_text(torch.tensor([[4, 5, 0, 0, 0, 0]])), heads)
    assert torch.allclose(S2[0], S[0], atol=1e-6)
    pairs = torch.tensor([[0, 1], [1, 3], [0, 2]])
    assert torch.allclose(m.score(tokens, heads, pairs), S[pairs[:, 0], pairs[:, 1]], atol=1e-6)


def test_model1_uniform_weights_is_plain_average():
    enc, emb = _parts()
    m = WordImageMatcher(enc, emb, hidden=8, weight_hidden=8, uniform_weights=True).eval()
    heads = m.encode_image(*_regions(2))
    tokens = torch.tensor([[4, 5, 0]])
    s = torch.einsum("le,phe->lph", emb[[4, 5]], heads[:, 1:]).max(-1).values.mean(0)
    assert torch.allclose(m.score_matrix(m.encode_text(tokens), heads)[0], s, atol=1e-5)


def test_pairwise_loss_hand_computed():
    S = torch.tensor([[2.0, 1.5, 0.0], [0.5, 1.0, 3.0], [0.0, 0.2, 1.0]])
    s_np = torch.tensor([1.0, 0.0, 0.5])
    s_nq = torch.tensor([0.0, 0.5, 0.3])
    qi = torch.tensor([0, 1, 1])  # rows 1 and 2 are the same query: not each other's negatives
    m = 0.9
    r = lambda x: max(0.0, x)  # noqa: E731
    l0 = r(m - 2 + 1.0) + r(m - 2 + 0.0) + max(r(m - 2 + 1.5), r(m - 2 + 0.0)) \
        + max(r(m - 2 + 0.5), r(m - 2 + 0.0))
    l1 = r(m - 1 + 0.0) + r(m - 1 + 0.5) + r(m - 1 + 0.5) + r(m - 1 + 1.5)
    l2 = r(m - 1 + 0.5) + r(m - 1 + 0.3) + r(m - 1 + 0.0) + r(m - 1 + 0.0)
    got = pairwise_loss(S, s_np, s_nq, qi, m)
    assert got.item() == pytest.approx((l0 + l1 + l2) / 3, rel=1e-6)


def test_model1_trunk_frozen_and_loss_falls():
    enc, emb = _parts()
    m = WordImageMatcher(enc, emb, hidden=8, weight_hidden=8)
    assert not any(p.requires_grad for p in m.encoder.trunk.parameters())
    assert all(p.requires_grad for p in m.encoder.out.parameters())
    assert not m.text.emb.weight.requires_grad
    losses = _fit_one_batch(m)
    assert losses[-1] < 0.5 * losses[0]


@pytest.mark.parametrize("input_norm,readout", [(True, "last"), (True, "mean"),
                                                (False, "last")])
def test_model2_shapes_empty_query_and_loss_falls(input_norm, readout):
    enc, emb = _parts()
    m = SentenceImageMatcher(enc, emb, input_norm=input_norm, readout=readout)
    assert not any(p.requires_grad for p in m.encoder.trunk.parameters())
    img = m.encode_image(*_regions(3))
    assert img.shape == (3, CFG["d_word"])
    tokens = torch.tensor([[4, 5, 6], [7, 0, 0], [0, 0, 0]])
    m.eval()
    out = m.logits(tokens, img)
    assert out.shape == (3,) and torch.isfinite(out).all()
    # padding words change nothing
    assert torch.allclose(m.logits(torch.tensor([[7, 0, 0, 0, 0]]), img[1:2]), out[1:2],
                          atol=1e-6)
    pairs = torch.tensor([[0, 2], [1, 0]])
    assert torch.allclose(m.score(tokens, img, pairs),
                          m.logits(tokens[[0, 1]], img[[2, 0]]), atol=1e-6)
    m.train()
    losses = _fit_one_batch(m)
    assert losses[-1] < 0.5 * losses[0]


@pytest.mark.parametrize("readout", ["last", "mean"])
def test_model2_loss_is_the_three_pair_kinds_scored_apart(readout):
    """forward scores (q, p), (negative q, p) and (q, negative p) in one GRU call, the
    negative queries padded to another width: the loss of three separate calls."""
    import torch.nn.functional as F
    m = SentenceImageMatcher(*_parts(), readout=readout).eval()
    b = _batch()
    b["nq_tokens"] = torch.tensor([[9, 4, 5, 6], [4, 0, 0, 0], [6, 7, 8, 0], [8, 0, 0, 0]])
    img, n_img = m.encode_image(b["p_boxes"], b["p_feats"], b["p_mask"]), \
        m.encode_image(b["n_boxes"], b["n_feats"], b["n_mask"])
    logits = torch.cat([m.logits(b["q_tokens"], img), m.logits(b["nq_tokens"], img),
                        m.logits(b["q_tokens"], n_img)])
    want = F.binary_cross_entropy_with_logits(logits, torch.tensor([1.0] * 4 + [0.0] * 8))
    assert torch.allclose(m(**utils.batch_inputs(b, utils.forward_keys(m.forward)))[0], want,
                          atol=1e-6)


def test_model2_rejects_unknown_readout():
    with pytest.raises(ValueError, match="readout"):
        SentenceImageMatcher(*_parts(), readout="max")
