"""Checkpoints say what they are: every one records its stage and format, every loader
refuses another stage, another format or an old checkpoint with one line naming the file
and what it expected, and a checkpoint cut at any byte is named, never a traceback."""
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import matching
import runtime
import utils
from layers import load_export
from model1 import model as m1_model
from model2 import model as m2_model
from model3 import model as m3_model
from multilabel import export_model
from multilabel.validation import load_pretrainer
from tsv import DataError

# each loader and the stage it reads
LOADERS = {"model1": lambda p: matching.load_trained(m1_model.build_model, p),
           "model2": lambda p: matching.load_trained(m2_model.build_model, p),
           "model3": lambda p: matching.load_trained(m3_model.build_model, p),
           "multilabel": load_pretrainer,
           "export": load_export}


def _stamped(tmp_path, stage, name="ck.pt", **extra):
    path = str(tmp_path / name)
    runtime.save_checkpoint(runtime.stamp({"model": {"w": torch.ones(3)}, "args": {},
                                           **extra}, stage), path)
    return path


@pytest.mark.parametrize("want", sorted(LOADERS))
def test_every_loader_refuses_another_stage_naming_file_and_expectation(tmp_path, want):
    for stage in sorted(set(LOADERS) - {want}):
        path = _stamped(tmp_path, stage, "%s.pt" % stage)
        with pytest.raises(DataError, match=r"%s\.pt: a %s checkpoint; expected a %s "
                                            r"checkpoint \(%s" % (stage, stage, want,
                                                                 want if want != "export"
                                                                 else "multilabel/export")):
            LOADERS[want](path)


def test_export_reads_only_a_pretraining_checkpoint(tmp_path):
    path = _stamped(tmp_path, "model1", "best.pt")
    with pytest.raises(DataError, match=r"best\.pt: a model1 checkpoint; expected a "
                                        r"multilabel checkpoint"):
        export_model.export(path, str(tmp_path / "encoder.pt"))
    assert not os.path.exists(tmp_path / "encoder.pt")


def test_a_checkpoint_without_a_stage_or_of_another_format_is_refused(tmp_path):
    old = str(tmp_path / "old.pt")
    runtime.save_checkpoint({"model": {}, "args": {"dim": 8}}, old)
    with pytest.raises(DataError, match=r"old\.pt: records no stage: written by an older "
                                        r"version.*expected a model3 checkpoint.*retrain it"):
        LOADERS["model3"](old)
    newer = _stamped(tmp_path, "model3", "newer.pt")
    ck = runtime.load_checkpoint(newer)
    ck["format"] = runtime.CHECKPOINT_FORMAT + 1
    runtime.save_checkpoint(ck, newer)
    with pytest.raises(DataError, match=r"newer\.pt: checkpoint format %d; this version reads "
                                        r"format %d" % (runtime.CHECKPOINT_FORMAT + 1,
                                                        runtime.CHECKPOINT_FORMAT)):
        LOADERS["model3"](newer)
    tensor = str(tmp_path / "tensor.pt")
    torch.save(torch.ones(2), tensor)
    with pytest.raises(DataError, match=r"tensor\.pt: holds a Tensor, not a checkpoint"):
        LOADERS["model2"](tensor)


def test_a_checkpoint_cut_at_any_byte_is_named(tmp_path):
    """50 cut points from 0 to the whole file, and the small ones (6 to 58 KB) at which
    torch.load raised OSError: each is one DataError naming the file."""
    path = _stamped(tmp_path, "model1", **{"history": [{"loss": 1.0}] * 50,
                                          "extra": torch.randn(400, 400)})
    whole = open(path, "rb").read()
    cuts = sorted(set(np.linspace(0, len(whole) - 1, 50).astype(int).tolist()
                      + list(range(6 << 10, 59 << 10, 4 << 10))))
    assert len(cuts) >= 50 and len(whole) > 600 << 10
    cut_path = str(tmp_path / "cut.pt")
    for cut in cuts:
        with open(cut_path, "wb") as f:
            f.write(whole[:cut])
        with pytest.raises(DataError, match=r"cut\.pt: not a readable checkpoint \(.+\); "
                                            r"truncated or corrupt\?"):
            runtime.load_checkpoint(cut_path, "model1")
    assert runtime.load_checkpoint(path, "model1")["stage"] == "model1"


def test_a_folder_or_a_missing_file_given_as_checkpoint_is_named(tmp_path):
    os.makedirs(tmp_path / "runs")
    with pytest.raises(DataError, match=r"runs: a folder; expected a checkpoint file"):
        runtime.load_checkpoint(str(tmp_path / "runs"))
    with pytest.raises(DataError, match=r"none\.pt: not found; expected a checkpoint file"):
        LOADERS["model1"](str(tmp_path / "none.pt"))


def test_resume_reads_only_its_own_stage(tmp_path):
    import argparse
    import engine
    out = str(tmp_path / "run")
    _stamped(tmp_path, "model2", os.path.join("run", "last.pt"))
    args = argparse.Namespace(out=out, resume=True, gamma=0.5)
    model = torch.nn.Linear(2, 1)
    with pytest.raises(DataError, match=r"last\.pt: a model2 checkpoint; expected a model1"):
        engine.fit(args, model, None, stage="model1", dist=runtime.Dist(),
                   groups=[dict(params=list(model.parameters()), lr=0.1)], collate=None)


@pytest.mark.slow
def test_the_pretraining_checkpoint_and_export_record_their_stage(pretrained):
    for name, stage in (("best.pt", "multilabel"), ("last.pt", "multilabel"),
                        ("encoder.pt", "export")):
        ck = runtime.load_checkpoint(os.path.join(pretrained, name))
        assert (ck["stage"], ck["format"]) == (stage, runtime.CHECKPOINT_FORMAT)


@pytest.mark.slow
@pytest.mark.parametrize("script,argv,stage", [
    ("model3/validation.py", ["--split", "valid"], "model3"),
    ("catalogue/retrieve.py", ["--k", "5"], "model3"),
    ("model1/validation.py", [], "model1"),
])
def test_a_script_given_another_stages_checkpoint_ends_in_one_line(pretrained, tmp_path,
                                                                    script, argv, stage):
    ckpt = os.path.join(pretrained, "best.pt")
    r = subprocess.run([sys.executable, os.path.join(utils.ROOT, script), "--ckpt", ckpt,
                        "--out", str(tmp_path / "out")] + argv, capture_output=True,
                       text=True, timeout=300,
                       env=dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES=""))
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
    assert r.stderr.strip().splitlines()[-1] == (
        "error: %s: a multilabel checkpoint; expected a %s checkpoint (%s/train.py's best.pt "
        "or last.pt)" % (ckpt, stage, stage))
