"""Every stage run in-process on the tiny world (main(argv)), exports, resume, predictions,
and 2-process gloo runs that must keep every trainable parameter identical on both ranks."""
import json
import os
import subprocess
import sys

import pytest
import torch

import engine
import metric
import tsv
import runtime
import utils
from layers import load_export
from multilabel import train as ml_train, validation as ml_validation
from model1 import train as m1_train, validation as m1_validation
from model2 import model as m2_model, train as m2_train, validation as m2_validation

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _common(w, out, epochs=2, preset="tiny"):
    return ["--data", w.data, "--info", w.info, "--preset", preset, "--workers", "0",
            "--epochs", str(epochs), "--no-progress", "--out", out]


def _log(out):
    with open(os.path.join(out, "log.jsonl")) as f:
        return [json.loads(line) for line in f]


def test_multilabel_trains_and_logs(pretrained):
    log = _log(pretrained)
    assert [r["epoch"] for r in log] == [0, 1]
    assert log[1]["loss"] < log[0]["loss"]
    ck = runtime.load_checkpoint(os.path.join(pretrained, "last.pt"))
    assert ck["epoch"] == 1 and ck["args"]["preset"] == "tiny"
    best = max(log, key=lambda r: r["valid_ndcg5"])  # the first of equals, as fit keeps it
    assert runtime.load_checkpoint(os.path.join(pretrained, "best.pt"))["epoch"] == best["epoch"]


def test_pretraining_learning_rate_decays_per_epoch(pretrained):
    """log.jsonl gives each epoch's rate after its scheduler step: that of the next epoch."""
    gamma = ml_train.PRESETS["tiny"]["gamma"]
    assert [r["lr"] for r in _log(pretrained)] == \
        [pytest.approx([3e-3 * gamma ** (e + 1)], rel=1e-12) for e in range(2)]


def test_export_loads_strictly_and_matches(pretrained, tiny_world):
    model, vocab, _ = ml_validation.load_pretrainer(os.path.join(pretrained, "best.pt"))
    enc, emb, vocab2, cfg = load_export(os.path.join(pretrained, "encoder.pt"))
    assert vocab2.itos == vocab.itos and torch.equal(emb, model.word_emb.weight)
    cset = utils.CandidateSet.from_tsv(os.path.join(tiny_world.data, "valid/valid.tsv"), vocab)
    b = next(cset.product_batches(8))
    model.eval(), enc.eval()
    assert torch.equal(enc(b["boxes"], b["feats"], b["mask"]),
                       model.encoder(b["boxes"], b["feats"], b["mask"]))
    # the export stores no frozen vocabulary-sized table beyond the learned embeddings
    ex = torch.load(os.path.join(pretrained, "encoder.pt"), weights_only=True)
    assert set(ex) == {"config", "encoder", "word_emb", "vocab", "source", "stage", "format"}


def test_multilabel_validation_prints_captions(pretrained, tiny_world, capsys):
    r = ml_validation.main(["--ckpt", os.path.join(pretrained, "best.pt"),
                            "--data", tiny_world.data, "--captions", "3"])
    # the figure logged for the epoch of best.pt, computed again from the checkpoint
    assert r["ndcg5"] == pytest.approx(max(x["valid_ndcg5"] for x in _log(pretrained)),
                                       abs=1e-6)
    assert len(r["captions"]) == 3
    assert "caption:" in capsys.readouterr().out


def test_multilabel_validation_writes_prediction_files(pretrained, tiny_world, tmp_path, capsys):
    """--out with --split repeated: the pretraining score as a blend member's files."""
    pred = str(tmp_path / "pred")
    r = ml_validation.main(["--ckpt", os.path.join(pretrained, "best.pt"), "--data",
                            tiny_world.data, "--captions", "2", "--split", "valid",
                            "--split", "testB", "--out", pred])
    assert sorted(os.listdir(pred)) == ["test_pred_multilabel.json", "valid_pred_multilabel.json"]
    assert set(r["splits"]) == {"valid", "testB"} and r["ndcg5"] == r["splits"]["valid"]
    assert len(r["captions"]) == 2
    for split, name in (("valid", "valid"), ("testB", "test")):
        preds = metric.load_predictions(os.path.join(pred, "%s_pred_multilabel.json" % name))
        cands = tsv.read_candidates(os.path.join(tiny_world.data, split, split + ".tsv"))
        assert {q: set(s) for q, s in preds.items()} == \
            {q: {p["product_id"] for p in c["products"]} for q, c in cands.items()}
        answers = metric.load_answers(os.path.join(tiny_world.data, split, split + "_answer.json"))
        assert metric.ndcg_at_k({q: list(s.items()) for q, s in preds.items()}, answers) == \
            pytest.approx(r["splits"][split])
    out = capsys.readouterr().out
    assert "testB NDCG@5" in out and "caption:" in out and "valid_pred_multilabel.json" in out


def _params(path):
    return runtime.load_checkpoint(path)["model"]


def test_multilabel_resume_equals_uninterrupted(pretrained, tiny_world, tmp_path):
    out = str(tmp_path / "ml")
    ml_train.main(_common(tiny_world, out, epochs=1) + ["--lr", "3e-3"])
    ml_train.main(_common(tiny_world, out, epochs=2) + ["--lr", "3e-3", "--resume"])
    a, b = _params(os.path.join(out, "last.pt")), _params(os.path.join(pretrained, "last.pt"))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-6), k


@pytest.mark.parametrize("stage,val,name", [(m1_train, m1_validation, "model1"),
                                            (m2_train, m2_validation, "model2")])
def test_matching_stage_trains_and_predicts(stage, val, name, pretrained, tiny_world, tmp_path):
    out, pred = str(tmp_path / name), str(tmp_path / "pred")
    export = os.path.join(pretrained, "encoder.pt")
    stage.main(_common(tiny_world, out, epochs=2) + ["--export", export])
    log = _log(out)
    assert log[-1]["loss"] < log[0]["loss"] and "valid_ndcg5" in log[0]
    ck = runtime.load_checkpoint(os.path.join(out, "best.pt"))
    assert not any(k.startswith("encoder.trunk.") for k in ck["model"])  # frozen: not stored
    res = val.main(["--ckpt", os.path.join(out, "best.pt"), "--split", "valid", "--split",
                    "testB", "--out", pred])
    assert set(res) == {"valid", "testB"}
    cands = tsv.read_candidates(os.path.join(tiny_world.data, "valid/valid.tsv"))
    with open(os.path.join(pred, "valid_pred_%s.json" % name)) as f:
        preds = json.load(f)
    assert set(map(int, preds)) == set(cands)
    for q, items in preds.items():
        assert sorted(int(p) for p, _ in items) == \
            sorted(r["product_id"] for r in cands[int(q)]["products"])
        scores = [s for _, s in items]
        assert scores == sorted(scores, reverse=True)
    assert os.path.exists(os.path.join(pred, "test_pred_%s.json" % name))


@pytest.mark.parametrize("stage", [m1_train, m2_train])
def test_group_rates_decay_and_the_frozen_trunk_stays_bit_identical(stage, pretrained,
                                                                     tiny_world, tmp_path,
                                                                     monkeypatch):
    """image side at lr_image, text side at lr_text, each decayed by gamma per epoch; after
    training (default: trunk frozen) the trunk and the word embeddings are the export's,
    bit for bit, while the image side has moved."""
    export, out, trained = os.path.join(pretrained, "encoder.pt"), str(tmp_path / "run"), []
    real_fit = engine.fit

    def fit(args, model, *a, **k):  # keeps the model that main trains
        trained.append(model)
        return real_fit(args, model, *a, **k)
    monkeypatch.setattr(engine, "fit", fit)
    stage.main(_common(tiny_world, out, epochs=3) + ["--export", export, "--no-eval",
                                                     "--steps-per-epoch", "2"])
    p, log = stage.PRESETS["tiny"], _log(out)
    assert len(log) == 3
    for e, row in enumerate(log):
        assert row["lr"] == pytest.approx([p["lr_image"] * p["gamma"] ** (e + 1),
                                           p["lr_text"] * p["gamma"] ** (e + 1)], rel=1e-12)
    ck = runtime.load_checkpoint(os.path.join(out, "last.pt"))
    assert ck["scheduler"]["base_lrs"] == [p["lr_image"], p["lr_text"]]
    assert [g["weight_decay"] for g in ck["optimizer"]["param_groups"]] == \
        [p["weight_decay"]] * 2
    encoder, word_emb, _, _ = load_export(export)
    model = trained[0]
    after = model.encoder.trunk.state_dict()
    for k, v in encoder.trunk.state_dict().items():
        assert torch.equal(after[k], v), k
    assert torch.equal((model.text.emb if stage is m1_train else model.emb).weight, word_emb)
    assert not torch.equal(model.encoder.out[0].weight, encoder.out[0].weight)


def test_only_rank_0_reads_the_evaluation_split(pretrained, tiny_world, tmp_path, monkeypatch):
    """Rank 0 alone scores the split after each epoch: the other ranks never build it."""
    def refuse(*a, **k):
        raise AssertionError("a rank other than 0 read the evaluation split")
    monkeypatch.setattr(utils.CandidateSet, "from_tsv", refuse)
    monkeypatch.setattr(runtime.Dist, "main", property(lambda self: False))  # as rank 1 sees it
    export = ["--export", os.path.join(pretrained, "encoder.pt")]
    for stage, extra in ((ml_train, []), (m1_train, export), (m2_train, export)):
        out = str(tmp_path / stage.__name__)
        history = stage.main(_common(tiny_world, out, epochs=1) + extra
                             + ["--steps-per-epoch", "1"])
        assert len(history) == 1 and "valid_ndcg5" not in history[0]
        assert not os.path.exists(out)  # and writes nothing


def test_matching_resume_equals_uninterrupted(pretrained, tiny_world, tmp_path):
    export = os.path.join(pretrained, "encoder.pt")
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    m1_train.main(_common(tiny_world, a, epochs=2) + ["--export", export, "--no-eval"])
    m1_train.main(_common(tiny_world, b, epochs=1) + ["--export", export, "--no-eval"])
    m1_train.main(_common(tiny_world, b, epochs=2) + ["--export", export, "--no-eval",
                                                      "--resume"])
    pa, pb = _params(os.path.join(a, "last.pt")), _params(os.path.join(b, "last.pt"))
    for k in pa:
        assert torch.allclose(pa[k], pb[k], atol=1e-6), k


def test_model2_checkpoint_from_before_input_norm_is_refused(pretrained, tiny_world, tmp_path):
    """A model2 checkpoint written before --input-norm/--readout existed (no such args, no
    in_norm weights) is refused, naming the file and the option: the preset is the one
    home of an option's value, and a checkpoint's model is never guessed at."""
    import matching
    out = str(tmp_path / "m2")
    export = os.path.join(pretrained, "encoder.pt")
    m2_train.main(_common(tiny_world, out, epochs=1) + ["--export", export, "--no-eval",
                                                        "--input-norm", "0"])
    ck = runtime.load_checkpoint(os.path.join(out, "last.pt"))
    assert not any(k.startswith("in_norm.") for k in ck["model"])
    new, _, _ = matching.load_trained(m2_model.build_model, os.path.join(out, "last.pt"))
    assert isinstance(new.in_norm, torch.nn.Identity) and new.readout == "last"
    for k in ("input_norm", "readout"):
        del ck["args"][k]
    old_path = os.path.join(out, "old.pt")
    runtime.save_checkpoint(ck, old_path)
    with pytest.raises(utils.DataError, match=r"old.pt: records no --input-norm: written by an "
                                              r"older version of this project; retrain it"):
        matching.load_trained(m2_model.build_model, old_path)


def test_workers_train_exactly_as_the_main_process(pretrained, tiny_world, tmp_path):
    """--workers 1 (unpadded regions from the worker, padded on arrival) = --workers 0."""
    export = os.path.join(pretrained, "encoder.pt")
    logs = []
    for workers in ("0", "1"):
        out = str(tmp_path / workers)
        argv = _common(tiny_world, out, epochs=1) + ["--export", export, "--no-eval"]
        argv[argv.index("--workers") + 1] = workers
        m1_train.main(argv)
        logs.append(_log(out)[0])
        logs[-1]["params"] = _params(os.path.join(out, "last.pt"))
    assert logs[0]["loss"] == logs[1]["loss"]
    for k, v in logs[0]["params"].items():
        assert torch.equal(v, logs[1]["params"][k]), k


def test_checkpoint_from_another_preset_is_refused(pretrained, tiny_world, tmp_path):
    out = str(tmp_path / "ml")
    ml_train.main(_common(tiny_world, out, epochs=1))
    with pytest.raises(utils.DataError, match="preset"):
        ml_train.main(_common(tiny_world, out, epochs=2, preset="small") + ["--resume"])


def _torchrun(script, args, tmp_path):
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           os.path.join(ROOT, script)] + args
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600,
                       cwd=str(tmp_path))
    assert r.returncode == 0, r.stderr[-3000:]
    return r


@pytest.mark.parametrize("script,extra", [
    ("multilabel/train.py", []), ("model1/train.py", ["--export"]),
    ("model2/train.py", ["--export"])])
def test_two_process_gloo_keeps_replicas_identical(script, extra, pretrained, tiny_world,
                                                   tmp_path):
    out = str(tmp_path / "run")
    args = _common(tiny_world, out, epochs=2)
    if extra:
        args += ["--export", os.path.join(pretrained, "encoder.pt")]
    _torchrun(script, args, tmp_path)
    log = _log(out)
    assert len(log) == 2 and all(r["rank_param_maxdiff"] == 0.0 for r in log)
    assert os.path.exists(os.path.join(out, "best.pt"))


@pytest.mark.slow
@pytest.mark.parametrize("script,extra", [
    ("multilabel/train.py", []), ("model1/train.py", ["--export"]),
    ("model2/train.py", ["--export"])])
def test_two_nodes_train_as_two_processes_on_one(script, extra, pretrained, tiny_world,
                                                 tmp_path):
    """Two torchrun agents (--nnodes=2, c10d rendezvous on 127.0.0.1, one process each), as on
    two machines, end with the parameters of --standalone --nproc_per_node=2."""
    import socket
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1")
    args = ["--no-eval"] + (["--export", os.path.join(pretrained, "encoder.pt")] if extra
                            else [])
    one = str(tmp_path / "one")
    _torchrun(script, _common(tiny_world, one) + args, tmp_path)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    two = str(tmp_path / "two")
    agents = [subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--node_rank=%d" % i,
         "--nproc_per_node=1", "--rdzv-backend=c10d", "--rdzv-id=twonodes",
         "--rdzv-endpoint=127.0.0.1:%d" % port, os.path.join(ROOT, script)]
        + _common(tiny_world, two) + args, env=env, cwd=str(tmp_path),
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True) for i in range(2)]
    errs = [a.communicate(timeout=600)[1] for a in agents]
    assert [a.returncode for a in agents] == [0, 0], errs[0][-2000:] + errs[1][-2000:]
    assert all(r["rank_param_maxdiff"] == 0.0 for r in _log(two))
    a, b = _params(os.path.join(one, "last.pt")), _params(os.path.join(two, "last.pt"))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_legacy_launcher_and_inside_folder(pretrained, tiny_world, tmp_path):
    """python -m torch.distributed.launch passes --local-rank=N; scripts also run from their folder."""
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1")
    out = str(tmp_path / "legacy")
    cmd = [sys.executable, "-m", "torch.distributed.launch", "--nproc_per_node=2", "train.py"] \
        + _common(tiny_world, out, epochs=1) + ["--no-eval"]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600,
                       cwd=os.path.join(ROOT, "multilabel"))
    assert r.returncode == 0, r.stderr[-3000:]
    assert _log(out)[0]["rank_param_maxdiff"] == 0.0
