"""The `paper` presets are the published method's sizes and hyperparameters, as a user gets
them from the command line, and the models built from them have those sizes (built on the
meta device: no memory, no time). The parameter groups put each part at its learning rate."""
import argparse

import pytest
import torch

import engine
import layers
import matching
from model1 import model as m1_model, train as m1_train
from model2 import model as m2_model, train as m2_train
from multilabel import model as ml_model, train as ml_train


def _paper(train):
    return engine.apply_preset(train.parse_args(["--out", "o", "--preset", "paper"]),
                               train.PRESETS)


def _linears(seq):
    return [(m.in_features, m.out_features) for m in seq if isinstance(m, torch.nn.Linear)]


def test_pretraining_paper_preset():
    a = _paper(ml_train)
    assert (a.batch_size, a.lr, a.weight_decay, a.gamma, a.k_hard, a.epochs) == \
        (200, 1e-4, 1e-6, 0.96, 1000, 6)
    with torch.device("meta"):
        model = ml_model.build_model(a, vocab_size=100)
    trunk, enc = model.encoder.trunk, model.encoder
    assert isinstance(trunk.proj, torch.nn.Identity)                   # 2048-d features as is
    assert (trunk.attn.embed_dim, trunk.attn.num_heads) == (2048, 16)
    assert _linears(trunk.ff) == [(2048, 4096), (4096, 2048)]          # d_ff 4096
    assert _linears(trunk.box) == [(5, 100), (100, 2048)]              # box MLP 100
    assert _linears(enc.pool.score) == [(2048, 512), (512, 256), (256, 128), (128, 1)]
    assert _linears(enc.out) == [(2048, 5120), (5120, 5 * 1024)]      # 5 heads x 1024
    assert model.word_emb.weight.shape == (100, 1024) and model.k_hard == 1000


def _matcher(stage, a):
    with torch.device("meta"):
        encoder = layers.ImageEncoder(layers.ENCODER_PRESETS["paper"])
        return stage.build_model(encoder, torch.empty(100, 1024), a)


def test_model1_paper_preset():
    a = _paper(m1_train)
    assert (a.batch_size, a.lr_text, a.lr_image, a.weight_decay, a.gamma, a.margin,
            a.epochs) == (130, 1e-4, 5e-6, 1e-6, 0.95, 0.9, 5)
    m = _matcher(m1_model, a)
    gru = m.text.gru
    assert (gru.input_size, gru.hidden_size, gru.num_layers, gru.bidirectional) == \
        (1024, 256, 2, True)
    assert m.w_text.out_features == m.w_image.out_features == 512      # weight MLP 512
    assert m.margin == 0.9 and not m.uniform_weights
    assert not any(p.requires_grad for p in m.encoder.trunk.parameters())
    assert not m.text.emb.weight.requires_grad


def test_model2_paper_preset():
    a = _paper(m2_train)
    assert (a.batch_size, a.lr_text, a.lr_image, a.weight_decay, a.gamma, a.epochs) == \
        (150, 1e-4, 5e-6, 1e-6, 0.95, 2)
    m = _matcher(m2_model, a)
    gru = m.gru
    assert (gru.input_size, gru.hidden_size, gru.num_layers, gru.bidirectional) == \
        (1024, 1024, 2, True)
    assert (m.out.in_features, m.out.out_features) == (1024, 1)
    assert not any(p.requires_grad for p in m.encoder.trunk.parameters())
    assert not m.emb.weight.requires_grad


def _tiny(stage, **options):
    torch.manual_seed(0)
    cfg = layers.ENCODER_PRESETS["tiny"]
    a = argparse.Namespace(**dict(stage.PRESETS["tiny"], **options))
    return stage.build_model(layers.ImageEncoder(cfg), torch.randn(12, cfg["d_word"]), a), a


@pytest.mark.parametrize("stage", [m1_model, m2_model])
@pytest.mark.parametrize("lr_trunk", [None, 1e-6])
def test_parameter_groups(stage, lr_trunk):
    """image (pooling + output MLP) at lr_image, the trainable rest at lr_text, the trunk at
    lr_trunk only when tuned; the frozen word embeddings in no group of the optimizer."""
    model, a = _tiny(stage, lr_trunk=lr_trunk, tune_trunk=int(bool(lr_trunk)))
    opt, _ = engine.make_optimizer(matching.param_groups(model, a), a.gamma)
    names = {id(p): n for n, p in model.named_parameters()}
    groups = [{names[id(p)] for p in g["params"]} for g in opt.param_groups]
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    trunk = {n for n in names.values() if n.startswith("encoder.trunk.")}
    assert [g["lr"] for g in opt.param_groups] == \
        [a.lr_image, a.lr_text] + ([lr_trunk] if lr_trunk else [])  # frozen: no trunk group
    assert all(g["weight_decay"] == a.weight_decay for g in opt.param_groups)
    image, text = groups[:2]
    assert image == {n for n in names.values()
                     if n.startswith(("encoder.pool.", "encoder.out."))}
    assert text == {n for n in trainable if not n.startswith("encoder.")}
    assert groups[2:] == ([trunk] if lr_trunk else [])
    assert set().union(*groups) == trainable
    assert not any("emb." in n for n in trainable)                    # frozen embeddings
