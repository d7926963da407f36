"""The training loop on a toy model (seconds, no data on disk): --resume loads only a
checkpoint that fits the model, and the loop reads losses back from the device once per
epoch, not at every step."""
import argparse
import os
import sys

import pytest
import torch
import torch.nn as nn

import engine
import utils


class Toy(nn.Module):
    """A regression head and a frozen part that checkpoints leave out, as model1/model2's
    trunk and word embeddings."""

    def __init__(self):
        super().__init__()
        self.head = nn.Linear(3, 1)
        self.frozen = nn.Linear(3, 3)
        self.frozen.requires_grad_(False)

    def forward(self, p_feats, y, **_):
        loss = (self.head(self.frozen(p_feats)).squeeze(-1) - y).pow(2).mean()
        return loss, {"mse": loss.detach()}


class Pairs(torch.utils.data.Dataset):
    def __init__(self, n=48):
        g = torch.Generator().manual_seed(0)
        self.x, self.y = torch.randn(n, 3, generator=g), torch.randn(n, generator=g)

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return {"p_feats": self.x[i], "y": self.y[i]}

    def set_epoch(self, epoch):
        pass


def _args(out, epochs, resume=False, progress=False):
    return argparse.Namespace(out=out, epochs=epochs, resume=resume, batch_size=4, seed=0,
                              workers=0, amp="off", steps_per_epoch=None,
                              no_progress=not progress, preset="tiny", gamma=0.5,
                              local_rank=0)


def _fit(args, model=None):
    torch.manual_seed(0)
    model = model or Toy()
    groups = [dict(params=list(model.parameters()), lr=1e-2, weight_decay=0.0)]
    return engine.fit(args, model, Pairs(), dist=utils.Dist(), groups=groups,
                      collate=torch.utils.data.default_collate)


def test_resume_refuses_a_checkpoint_that_does_not_fit_naming_the_keys(tmp_path):
    out = str(tmp_path / "run")
    _fit(_args(out, 1))
    last = os.path.join(out, "last.pt")
    ck = utils.load_checkpoint(last)
    assert not any(k.startswith("frozen.") for k in ck["model"])  # frozen: left out, fine
    _fit(_args(out, 2, resume=True))                              # resumes
    ck = utils.load_checkpoint(last)
    ck["model"]["old_head.weight"] = ck["model"].pop("head.weight")
    utils.save_checkpoint(ck, last)
    with pytest.raises(utils.DataError, match=r"missing \['head\.weight'\].*unexpected "
                                              r"\['old_head\.weight'\]"):
        _fit(_args(out, 3, resume=True))


@pytest.mark.parametrize("progress", [False, True])
def test_the_loop_reads_the_device_once_per_epoch(tmp_path, monkeypatch, progress):
    """On a GPU each .item(), float(t), .tolist() waits for every queued kernel: 12 steps,
    2 epochs, 2 reads by the loop (engine, utils), plus one every PROGRESS_EVERY (here 5)
    steps with the progress bar on. (torch's own reads of CPU tensors, the optimizer's step count and
    the sampler's permutation, are not the loop's.)"""
    loop = {os.path.abspath(engine.__file__), os.path.abspath(utils.__file__)}
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
    assert len(reads) == 2 + 2 * (12 // 5 if progress else 0), reads
