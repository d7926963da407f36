"""Pretraining stage: encoder shapes, padding invariance, the losses, training, export."""
import math

import pytest
import torch

from layers import ENCODER_PRESETS, ImageEncoder
from multilabel.model import Pretrainer, multilabel_loss, word_logits

CFG = ENCODER_PRESETS["tiny"]


def _regions(b=3, n=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    boxes = torch.rand(b, n, 5, generator=g)
    feats = torch.rand(b, n, CFG["feat_dim"], generator=g)
    mask = torch.ones(b, n, dtype=torch.bool)
    mask[1, 2:] = False
    return boxes, feats, mask


def test_encoder_shapes():
    enc = ImageEncoder(CFG).eval()
    heads = enc(*_regions())
    assert heads.shape == (3, 5, CFG["d_word"]) and torch.isfinite(heads).all()


def test_padding_does_not_change_outputs():
    enc = ImageEncoder(CFG).eval()
    boxes, feats, mask = _regions(b=2, n=3)
    mask[:] = True
    ref = enc(boxes, feats, mask)
    pb = torch.cat([boxes, torch.rand(2, 4, 5) * 9], 1)
    pf = torch.cat([feats, torch.rand(2, 4, CFG["feat_dim"]) * 9], 1)
    pm = torch.cat([mask, torch.zeros(2, 4, dtype=torch.bool)], 1)
    assert torch.allclose(enc(pb, pf, pm), ref, atol=1e-5)


def test_word_logits_is_max_over_word_heads():
    heads = torch.tensor([[[9.0, 9.0], [1.0, 0.0], [0.0, 2.0], [0.5, 0.5], [0.0, 0.0]]])
    emb = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    # head 0 (sentence) is excluded even though it would win
    assert word_logits(heads, emb).tolist() == [[1.0, 2.0, 2.0]]


def test_multilabel_loss_hand_computed():
    logits = torch.tensor([[2.0, -1.0, 0.5, 3.0, -2.0, 1.0]])
    labels = torch.tensor([[0.0, 1.0, 0.0, 0.0, 0.0, 0.0]])
    ignore = torch.tensor([True, False, False, False, False, False])
    # positive: word 1; the 2 hardest negatives among words 2..5: word 3 (3.0), word 5 (1.0)
    sp = lambda x: math.log1p(math.exp(x))  # noqa: E731
    want = (sp(1.0) + sp(3.0) + sp(1.0)) / 3  # -log(sigmoid(-1)) = softplus(1)
    got = multilabel_loss(logits, labels, k_hard=2, ignore=ignore)
    assert got.item() == pytest.approx(want, rel=1e-6)


def test_pretrainer_loss_falls():
    torch.manual_seed(0)
    model = Pretrainer(CFG, vocab_size=12, k_hard=4)
    boxes, feats, mask = _regions(b=4, n=3)
    q = torch.tensor([[4, 5, 0], [6, 0, 0], [7, 8, 9], [10, 11, 0]])
    cap_in = torch.cat([torch.full((4, 1), 2), q], 1)
    cap_out = torch.cat([q, torch.zeros(4, 1, dtype=torch.long)], 1)
    for i, n in enumerate((q != 0).sum(1).tolist()):
        cap_out[i, n] = 3
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(80):
        loss, parts = model(boxes, feats, mask, q, cap_in, cap_out)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]
    model.eval()
    heads = model.encoder(boxes, feats, mask)
    caps = model.decoder.beam_search(heads[:, 0], model.word_emb.weight, bos=2, eos=3, beam=3)
    assert caps[2] == [7, 8, 9]
    scores = model.query_scores(heads, [[4, 5], [], [7, 8, 9]])
    assert scores.shape == (3, 4) and scores[1].eq(0).all() and scores[2].argmax() == 2
