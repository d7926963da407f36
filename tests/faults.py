"""Fault injection for the reliability tests: one rank vanishes or raises at one step.

    faults.inject(monkeypatch.setattr, "RANK:EPOCH:STEP:exit|raise", out)     # in-process
    python tests/faults.py RANK:EPOCH:STEP:exit|raise|stop multilabel/train.py ARGS  # torchrun

``exit`` ends the process at once (``os._exit``, as when a worker is OOM-killed); ``raise``
raises a RuntimeError; ``stop`` stops the process (SIGSTOP: alive, never answering, as a
stalled rank or a hung node). The fault fires once per ``--out`` folder: the marker
OUT/fault_injected stops it firing again in the job that torchrun restarts.
"""
import os
import runpy
import signal
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import engine  # noqa: E402


def inject(patch, spec, out):
    """Wrap ``engine``'s epoch and per-step functions (through ``patch(module, name, value)``)
    so that the fault fires before the forward pass of the step ``spec`` names."""
    rank, epoch, step, kind = spec.split(":")
    target = (int(rank), int(epoch), int(step))
    where = {"epoch": None, "step": 0}
    real_epoch, real_to_device = engine.train_one_epoch, engine.to_device

    def train_one_epoch(*args, epoch, **kwargs):
        where.update(epoch=epoch, step=0)
        return real_epoch(*args, epoch=epoch, **kwargs)

    def to_device(batch, device):  # once per step
        here = (int(os.environ.get("RANK", 0)), where["epoch"], where["step"])
        where["step"] += 1
        marker = os.path.join(out, "fault_injected")
        if here == target and not os.path.exists(marker):
            os.makedirs(out, exist_ok=True)
            open(marker, "w").close()
            if kind == "exit":
                os._exit(1)
            if kind == "stop":
                os.kill(os.getpid(), signal.SIGSTOP)
            raise RuntimeError("injected fault on rank %d, epoch %d, step %d" % here)
        return real_to_device(batch, device)

    patch(engine, "train_one_epoch", train_one_epoch)
    patch(engine, "to_device", to_device)


if __name__ == "__main__":
    spec, script, *argv = sys.argv[1:]
    inject(setattr, spec, argv[argv.index("--out") + 1])
    sys.argv = [script] + argv
    runpy.run_path(script, run_name="__main__")
