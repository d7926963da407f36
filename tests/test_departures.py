"""Departures from the published method are options: `paper` leaves every one of them off,
and each option does what it says."""
import torch

import utils
from layers import ENCODER_PRESETS, ImageEncoder
from model1 import train as m1_train
from model1.model import WordImageMatcher
from model2 import train as m2_train
from model2.model import SentenceImageMatcher
from model3 import train as m3_train
from multilabel import train as ml_train


def _parts():
    torch.manual_seed(0)
    return ImageEncoder(ENCODER_PRESETS["tiny"]), torch.randn(12, ENCODER_PRESETS["tiny"]["d_word"])


def _batch(b=4):
    g = torch.Generator().manual_seed(1)
    regions = dict(p_boxes=torch.rand(b, 3, 5, generator=g), p_feats=torch.rand(b, 3, 2048, generator=g),
                   p_mask=torch.ones(b, 3, dtype=torch.bool),
                   n_boxes=torch.rand(b, 2, 5, generator=g), n_feats=torch.rand(b, 2, 2048, generator=g),
                   n_mask=torch.ones(b, 2, dtype=torch.bool))
    return dict(q_tokens=torch.tensor([[4, 5, 0], [6, 0, 0], [7, 8, 9], [10, 11, 0]]),
                nq_tokens=torch.tensor([[5, 6, 0], [7, 0, 0], [4, 8, 9], [11, 0, 0]]),
                qi=torch.arange(b), **regions)


def test_paper_presets_leave_every_departure_off():
    ml, m1, m2 = ml_train.PRESETS["paper"], m1_train.PRESETS["paper"], m2_train.PRESETS["paper"]
    assert ml["transform"] == "none" and ml["input_norm"] == 0
    assert ENCODER_PRESETS["paper"]["post_norm"] is False
    assert m1["p_near"] == 0.0 and m2["p_near"] == 0.0
    assert m1["group_rows"] == 0 and m3_train.PRESETS["paper"]["group_rows"] == 0
    assert m2["input_norm"] == 0 and m2["h0_norm"] == 0
    assert m1.get("lr_trunk") is None and m2.get("lr_trunk") is None
    m = SentenceImageMatcher(*_parts(), input_norm=False, h0_norm=False)
    assert isinstance(m.in_norm, torch.nn.Identity) and isinstance(m.h0_norm, torch.nn.Identity)


def test_uniform_weights_leave_no_parameter_without_a_gradient():
    """Under DDP a parameter that never gets a gradient stops training; the word-weight MLP
    of --uniform-weights used to be built anyway."""
    m = WordImageMatcher(*_parts(), hidden=8, weight_hidden=8, uniform_weights=True)
    loss, _ = m(**utils.batch_inputs(_batch(), utils.forward_keys(m.forward)))
    loss.backward()
    idle = [n for n, p in m.named_parameters() if p.requires_grad and p.grad is None]
    assert idle == []


def test_trunk_is_frozen_unless_tuned():
    for cls in (WordImageMatcher, SentenceImageMatcher):
        frozen, tuned = cls(*_parts()), cls(*_parts(), tune_trunk=True)
        assert not any(p.requires_grad for p in frozen.encoder.trunk.parameters())
        assert all(p.requires_grad for p in tuned.encoder.trunk.parameters())
        frozen.train(), tuned.train()
        assert not frozen.encoder.trunk.training and tuned.encoder.trunk.training
        loss, _ = tuned(**utils.batch_inputs(_batch(), utils.forward_keys(tuned.forward)))
        loss.backward()
        assert all(p.grad is not None for p in tuned.encoder.trunk.parameters())
