"""The training loop on a toy model (seconds, no data on disk): --resume loads only a
checkpoint that fits the model, a non-finite loss or parameter stops training, and the loop
reads losses back from the device every PROGRESS_EVERY steps, not at every step."""
import argparse
import json
import os
import sys

import pytest
import torch
import torch.nn as nn

import engine
import runtime
import utils


class Toy(nn.Module):
    """A regression head and a frozen part that checkpoints leave out, as model1/model2's
    trunk and word embeddings."""

    def __init__(self):
        super().__init__()
        self.head = nn.Linear(3, 1)
        self.frozen = nn.Linear(3, 3)
        self.frozen.requires_grad_(False)

    def forward(self, p_feats, y):
        loss = (self.head(self.frozen(p_feats)).squeeze(-1) - y).pow(2).mean()
        return loss, {"mse": loss.detach()}


class Pairs(torch.utils.data.Dataset):
    """48 pairs of products 1000..1047."""

    def __init__(self, n=48):
        g = torch.Generator().manual_seed(0)
        self.x, self.y = torch.randn(n, 3, generator=g), torch.randn(n, generator=g)

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return {"p_feats": self.x[i], "y": self.y[i], "pid": 1000 + i}

    def set_epoch(self, epoch):
        pass


def _args(out, epochs, resume=False, progress=False):
    return argparse.Namespace(out=out, epochs=epochs, resume=resume, batch_size=4, seed=0,
                              workers=0, amp="off", steps_per_epoch=None,
                              no_progress=not progress, preset="tiny", gamma=0.5,
                              local_rank=0)


def _fit(args, model=None, data=None, lr=1e-2):
    torch.manual_seed(0)
    model = model or Toy()
    groups = [dict(params=list(model.parameters()), lr=lr, weight_decay=0.0)]
    return engine.fit(args, model, data or Pairs(), stage="model1", dist=runtime.Dist(),
                      groups=groups, collate=torch.utils.data.default_collate)


def test_a_non_finite_loss_stops_training_naming_the_step_and_products(tmp_path):
    """One product at 3e38 makes the loss infinite: training stops at that step, naming it
    and its batch's products, and writes no checkpoint (no NaN model can become best.pt)."""
    data = Pairs()
    data.x[7] = 3e38
    out = str(tmp_path / "run")
    with pytest.raises(utils.DataError, match=r"epoch 0, step \d+: the loss is NaN or infinite; "
                                              r"the batch's products: \[.*1007.*\]") as e:
        _fit(_args(out, 2), data=data)
    step = int(str(e.value).split("step ")[1].split(":")[0])
    sampler = torch.utils.data.DistributedSampler(data, num_replicas=1, rank=0, seed=0,
                                                  drop_last=True)
    assert 7 in list(sampler)[4 * step:4 * step + 4]  # batch_size 4: the step that read it
    assert not os.path.exists(os.path.join(out, "last.pt"))
    assert not os.path.exists(os.path.join(out, "best.pt"))


@pytest.mark.parametrize("key,value,named", [
    ("batch_size", 8, r"--batch-size 4 \(this run: 8\)"),
    ("seed", 1, r"--seed 0 \(this run: 1\)"),
    ("gamma", 0.9, r"--gamma 0.5 \(this run: 0.9\)"),
    ("preset", "small", r"--preset 'tiny' \(this run: 'small'\)"),
    ("data", "elsewhere", r"--data '.*data' \(this run: 'elsewhere'\)")])
def test_resume_refuses_changed_settings_naming_them(tmp_path, key, value, named):
    out = str(tmp_path / "run")
    args = _args(out, 1)
    args.data = str(tmp_path / "data")
    _fit(args)
    args = _args(out, 2, resume=True)
    args.data = os.path.relpath(str(tmp_path / "data"))  # the same folder, written otherwise
    args.workers = 1  # how it runs may change, as may the epochs
    setattr(args, key, value)
    with pytest.raises(utils.DataError, match=r"checkpoint was trained with %s; resume with the "
                                              r"same settings \(only .*--epochs.* may change\)"
                                              % named):
        _fit(args)


def test_resume_of_the_same_settings_continues_and_counts_processes(tmp_path):
    out = str(tmp_path / "run")
    args = _args(out, 1)
    args.data = str(tmp_path / "data")
    _fit(args)
    args = _args(out, 2, resume=True)
    args.data = os.path.relpath(str(tmp_path / "data"))
    args.workers = 1
    assert len(_fit(args)) == 2
    ck = runtime.load_checkpoint(os.path.join(out, "last.pt"))
    with pytest.raises(utils.DataError, match=r"trained with 1 processes \(this run: 2\)"):
        engine.check_compatible(ck, args, world=2)


def test_the_log_holds_this_runs_epochs_only(tmp_path):
    """A fresh run into an old folder starts log.jsonl afresh (appended, a rerun's "best"
    would be the best of both runs); a resumed run keeps the epochs its checkpoint holds and
    drops any line written after it."""
    out = str(tmp_path / "run")

    def logged():
        with open(os.path.join(out, "log.jsonl")) as f:
            return [json.loads(line)["epoch"] for line in f]
    _fit(_args(out, 2))
    _fit(_args(out, 1))
    assert logged() == [0]
    with open(os.path.join(out, "log.jsonl"), "a") as f:
        f.write('{"epoch": 1, "note": "written after last.pt"}\n')
    history = _fit(_args(out, 2, resume=True))
    assert logged() == [0, 1] == [h["epoch"] for h in history]
    with open(os.path.join(out, "log.jsonl")) as f:
        assert "note" not in f.read()


def test_resume_with_nothing_left_to_train_is_an_error(tmp_path):
    """--epochs at or below the epochs last.pt holds: one line, not an exit 0 that trained
    nothing."""
    out = str(tmp_path / "run")
    _fit(_args(out, 2))
    for epochs in (1, 2):
        with pytest.raises(utils.DataError, match=r"already holds 2 epochs and --epochs is %d"
                           % epochs):
            _fit(_args(out, epochs, resume=True))


def test_resume_without_a_checkpoint_is_an_error(tmp_path):
    out = str(tmp_path / "run")
    with pytest.raises(utils.DataError, match=r"run/last\.pt: not found; --resume continues"):
        _fit(_args(out, 1, resume=True))
    assert not os.path.exists(out)


class Overflowing(Toy):
    """A weight at -3.3e38 that Adam's first step (about lr) takes beyond float32."""

    def __init__(self):
        super().__init__()
        self.edge = nn.Parameter(torch.tensor(-3.3e38))

    def forward(self, p_feats, y):
        loss, parts = super().forward(p_feats, y)
        return loss + 1e-3 * self.edge, parts


def test_non_finite_parameters_stop_training(tmp_path):
    """A finite loss whose update overflows a weight: caught before any checkpoint."""
    out = str(tmp_path / "run")
    args = _args(out, 1)
    args.steps_per_epoch = 1
    with pytest.raises(utils.DataError, match=r"epoch 0, step 0: a parameter is NaN or "
                                              r"infinite after the update; the batch's "
                                              r"products: \[10\d\d, "):
        _fit(args, model=Overflowing(), lr=3e37)
    assert not os.path.exists(os.path.join(out, "last.pt"))


@pytest.mark.parametrize("value", ["0", "-1"])
def test_max_boxes_below_one_is_refused_at_parsing(value, capsys):
    from multilabel import validation as ml_validation
    p = engine.core_parser("toy", {"tiny": {}})
    for parse in (lambda: p.parse_args(["--out", "x", "--max-boxes", value]),
                  lambda: ml_validation.main(["--ckpt", "x.pt", "--max-boxes", value])):
        with pytest.raises(SystemExit) as e:
            parse()
        assert e.value.code == 2
        assert "--max-boxes: must be >= 1 (leave it out to keep every box), got %s" % value \
            in capsys.readouterr().err


def test_resume_refuses_a_checkpoint_that_does_not_fit_naming_the_keys(tmp_path):
    out = str(tmp_path / "run")
    _fit(_args(out, 1))
    last = os.path.join(out, "last.pt")
    ck = runtime.load_checkpoint(last)
    assert not any(k.startswith("frozen.") for k in ck["model"])  # frozen: left out, fine
    _fit(_args(out, 2, resume=True))                              # resumes
    ck = runtime.load_checkpoint(last)
    ck["model"]["old_head.weight"] = ck["model"].pop("head.weight")
    runtime.save_checkpoint(ck, last)
    with pytest.raises(utils.DataError, match=r"missing \['head\.weight'\].*unexpected "
                                              r"\['old_head\.weight'\]"):
        _fit(_args(out, 3, resume=True))


@pytest.mark.parametrize("progress", [False, True])
def test_the_loop_reads_the_device_every_progress_window(tmp_path, monkeypatch, progress):
    """On a GPU each .item(), float(t), .tolist() waits for every queued kernel: 12 steps,
    2 epochs, per epoch one read by ``Dist.mean`` (the mean over the ranks) and one by the
    loop every PROGRESS_EVERY (here 5) steps and at the end, with the progress bar on or
    off. (torch's own reads of CPU tensors, the optimizer's step count and the sampler's
    permutation, are not the loop's.)"""
    loop = {os.path.abspath(engine.__file__), os.path.abspath(runtime.__file__)}
    reads = []
    for name in ("item", "tolist", "__float__"):
        real = getattr(torch.Tensor, name)

        def counted(t, *a, _real=real):
            caller = sys._getframe(1).f_code
            if os.path.abspath(caller.co_filename) in loop:
                reads.append(caller.co_name)
            return _real(t, *a)
        monkeypatch.setattr(torch.Tensor, name, counted)
    monkeypatch.setattr(engine, "PROGRESS_EVERY", 5)
    history = _fit(_args(str(tmp_path / "run"), 2, progress=progress))
    monkeypatch.undo()
    assert len(history) == 2 and history[1]["mse"] < history[0]["mse"]
    assert history[0]["loss"] == history[0]["mse"]
    # per epoch: the mean, and the finiteness check (which the bar shares) every 5 steps
    # and at the end
    assert len(reads) == 2 * (1 + 12 // 5 + 1), reads


def test_evaluation_without_the_answer_file_is_an_error(tmp_path):
    """Without valid_answer.json, best.pt would silently be the last epoch: every stage's
    evaluator refuses, naming the file and --no-eval."""
    import matching
    from multilabel import validation as ml_validation
    os.makedirs(tmp_path / "valid")
    (tmp_path / "valid" / "valid.tsv").write_text("")
    args = argparse.Namespace(data=str(tmp_path), eval_split="valid", max_boxes=None,
                              skip_bad=False)
    for make in (matching.make_evaluator, ml_validation.make_evaluator):
        with pytest.raises(utils.DataError, match=r"valid/valid_answer\.json: not found; the "
                                                  r"per-epoch evaluation needs the answers of "
                                                  r"the valid split \(pass --no-eval"):
            make(args, vocab=None)


def test_a_truncated_or_corrupt_checkpoint_is_named(tmp_path):
    path = str(tmp_path / "last.pt")
    runtime.save_checkpoint({"model": Toy().state_dict(), "epoch": 0}, path)
    whole = open(path, "rb").read()
    for broken in (whole[:len(whole) // 2], whole[:-40] + b"\0" * 40, b""):
        open(path, "wb").write(broken)
        with pytest.raises(utils.DataError, match=r"last\.pt: not a readable checkpoint "
                                                  r"\(.+\); truncated or corrupt\?"):
            runtime.load_checkpoint(path)


def test_a_data_error_ends_a_script_with_one_line(capsys):
    def main():
        raise utils.DataError("info/queries.pkl: not found")
    with pytest.raises(SystemExit) as e:
        runtime.cli(main)
    assert e.value.code == "error: info/queries.pkl: not found"  # printed on stderr, exit 1


@pytest.mark.slow
@pytest.mark.parametrize("script", ["multilabel/train.py", "model1/validation.py"])
def test_stage_scripts_print_a_data_error_as_one_line(tmp_path, script):
    import subprocess
    argv = (["--info", str(tmp_path / "none"), "--out", str(tmp_path / "out")]
            if script.endswith("train.py") else ["--ckpt", str(tmp_path / "none.pt")])
    r = subprocess.run([sys.executable, os.path.join(utils.ROOT, script)] + argv,
                       capture_output=True, text=True, timeout=120,
                       env=dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES=""))
    assert r.returncode == 1
    assert "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines()[-1].startswith("error: %s" % tmp_path)
