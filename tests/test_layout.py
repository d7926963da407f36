"""How the code is laid out, checked: no stage folder imports another, every preset value
has its flag and one home, the trunk's two flags are read together, a checkpoint older
than an option is refused by name, and a batch's keys are a known set."""
import argparse
import ast
import os

import numpy as np
import pytest
import torch

import engine
import layers
import matching
import runtime
import utils
from errors import DataError
from model1 import model as m1_model, train as m1_train
from model2 import model as m2_model, train as m2_train
from model3 import model as m3_model, train as m3_train
from model4 import model as m4_model, train as m4_train
from multilabel import model as ml_model, train as ml_train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STAGES = ["multilabel", "model1", "model2", "model3", "model4"]
TRAINS = {"multilabel": ml_train, "model1": m1_train, "model2": m2_train, "model3": m3_train,
          "model4": m4_train}
MATCHING = {"model1": (m1_train, m1_model), "model2": (m2_train, m2_model),
            "model3": (m3_train, m3_model), "model4": (m4_train, m4_model)}


def _imported(path):
    """The top-level packages a file imports."""
    tree = ast.parse(open(path).read())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module.split(".")[0])
    return names


@pytest.mark.parametrize("stage", STAGES)
def test_no_stage_folder_imports_another(stage):
    folder = os.path.join(ROOT, stage)
    for name in sorted(os.listdir(folder)):
        if name.endswith(".py"):
            others = _imported(os.path.join(folder, name)) & (set(STAGES) - {stage})
            assert not others, "%s/%s imports %s" % (stage, name, sorted(others))


@pytest.mark.parametrize("stage", STAGES)
def test_every_preset_key_has_a_flag_whose_default_is_the_presets(stage):
    train = TRAINS[stage]
    bare = train.parse_args(["--out", "o"])
    for preset, values in train.PRESETS.items():
        assert set(values) <= set(vars(bare)), (preset, set(values) - set(vars(bare)))
        assert all(getattr(bare, k) is None for k in values), preset  # the preset decides


@pytest.mark.parametrize("stage", sorted(MATCHING))
def test_a_trunk_rate_without_tuning_is_refused(stage):
    train, _ = MATCHING[stage]
    with pytest.raises(DataError, match=r"--lr-trunk 0.0001: the trunk is frozen "
                                        r"\(--tune-trunk 0, preset tiny\); add --tune-trunk 1"):
        matching.apply_preset(train.parse_args(["--out", "o", "--preset", "tiny",
                                                "--lr-trunk", "1e-4"]), train.PRESETS)
    tuned = matching.apply_preset(train.parse_args(["--out", "o", "--preset", "tiny",
                                                    "--tune-trunk", "1", "--lr-trunk", "1e-4"]),
                                  train.PRESETS)
    assert (tuned.tune_trunk, tuned.lr_trunk) == (1, 1e-4)


def test_tuning_needs_a_rate_where_the_preset_has_none():
    with pytest.raises(DataError, match=r"--tune-trunk 1: preset tiny gives the trunk no "
                                        r"learning rate; add --lr-trunk LR"):
        matching.apply_preset(m1_train.parse_args(["--out", "o", "--preset", "tiny",
                                                   "--tune-trunk", "1"]), m1_train.PRESETS)
    a = matching.apply_preset(m3_train.parse_args(["--out", "o", "--preset", "tiny",
                                                   "--tune-trunk", "1"]), m3_train.PRESETS)
    assert a.lr_trunk == m3_train.PRESETS["tiny"]["lr_trunk"]


def _tiny_model(model_module):
    cfg = layers.ENCODER_PRESETS["tiny"]
    args = argparse.Namespace(**model_module.PRESETS["tiny"])
    return model_module.build_model(layers.ImageEncoder(cfg), torch.randn(12, cfg["d_word"]),
                                    args)


@pytest.mark.parametrize("stage", sorted(MATCHING))
def test_a_checkpoint_older_than_an_option_is_refused_by_name(stage):
    """The options a checkpoint records, without one added since: building its model names
    the file and the option; resuming it names the option."""
    train, model_module = MATCHING[stage]
    args = engine.apply_preset(train.parse_args(["--out", "o", "--preset", "tiny"]),
                               train.PRESETS)
    old = {k: v for k, v in engine.plain_args(args).items() if k != "tune_trunk"}
    saved = runtime.saved_args({"args": old}, "old/best.pt")
    cfg = layers.ENCODER_PRESETS["tiny"]
    with pytest.raises(DataError, match=r"old/best.pt: records no --tune-trunk: written by an "
                                        r"older version of this project; retrain it"):
        model_module.build_model(layers.ImageEncoder(cfg), torch.randn(12, cfg["d_word"]), saved)
    with pytest.raises(DataError, match=r"checkpoint records no --tune-trunk: written by an "
                                        r"older version of this project; start a fresh --out"):
        engine.check_compatible({"args": old}, args)


def _item(qi, n, labels):
    rng = np.random.default_rng(qi)
    item = {"q": [4, 5][:1 + qi % 2], "qi": qi, "pid": 100 + qi,
            "p": (rng.random((n, 5), np.float32), rng.random((n, 2048), np.float32)),
            "nq": [6], "nqi": 9, "npid": 200 + qi,
            "np": (rng.random((n + 1, 5), np.float32), rng.random((n + 1, 2048), np.float32))}
    if labels:
        item.update(pl=np.ones(n, np.int64), nl=np.ones(n + 1, np.int64))
    return item


@pytest.mark.parametrize("flat", [False, True])
def test_every_key_of_a_collated_batch_is_a_batch_key(flat):
    batch = utils.collate_pairs([_item(0, 2, True), _item(1, 3, True)], flat=flat)
    assert set(utils.unflatten(batch)) == utils.BATCH_KEYS


def test_every_forward_reads_batch_keys_only():
    forwards = [_tiny_model(m).forward for _, m in MATCHING.values()]
    forwards.append(ml_model.build_model(argparse.Namespace(**ml_train.PRESETS["tiny"]),
                                         vocab_size=12).forward)
    for forward in forwards:
        keys = utils.forward_keys(forward)
        assert keys and set(keys) <= utils.BATCH_KEYS, forward.__qualname__


def test_a_misspelt_or_unread_key_is_an_error_not_dropped():
    batch = utils.collate_pairs([_item(0, 2, False), _item(1, 3, False)])
    model = _tiny_model(m2_model)
    keys = utils.forward_keys(model.forward)
    assert set(utils.batch_inputs(batch, keys)) == set(keys)  # caption_in etc. left aside
    batch["q_token"] = batch.pop("q_tokens")
    with pytest.raises(KeyError, match=r"the batch lacks \['q_tokens'\] that forward reads; it "
                                       r"holds \['q_token'\] that is not a batch key"):
        utils.batch_inputs(batch, keys)

    def loose(q_tokens, **rest):
        return q_tokens
    with pytest.raises(TypeError, match=r"takes \*rest: name each batch key it reads"):
        utils.forward_keys(loose)
