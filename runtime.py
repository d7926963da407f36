"""What a running stage needs around its model: seeds, atomic checkpoints, the process
group of a distributed launch (with its stalled-rank watch), logging, and the one-line exit
on bad input."""
import argparse
import contextlib
import datetime
import logging
import os
import pickle
import random
import re
import signal
import socket
import sys
import tempfile
import zipfile

import numpy as np

from errors import DataError
from utils import atomic_open


def seed_everything(seed, rank=0):
    import torch
    s = seed + rank
    random.seed(s)
    np.random.seed(s % 2**32)
    torch.manual_seed(s)


# What a checkpoint holds, versioned: every checkpoint records its stage and this number,
# and every loader refuses another stage or another format, naming the file
CHECKPOINT_FORMAT = 1
WRITTEN_BY = {"multilabel": "multilabel/train.py's best.pt or last.pt",
              "model1": "model1/train.py's best.pt or last.pt",
              "model2": "model2/train.py's best.pt or last.pt",
              "model3": "model3/train.py's best.pt or last.pt",
              "model4": "model4/train.py's best.pt or last.pt",
              "export": "multilabel/export_model.py's encoder.pt"}


def save_checkpoint(state, path):
    """torch.save, atomically: a crash never leaves a torn checkpoint."""
    import torch
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with atomic_open(path, "wb") as f:
        torch.save(state, f)


def stamp(state, stage):
    """``state`` with what it is: its stage (a key of WRITTEN_BY) and CHECKPOINT_FORMAT."""
    return {**state, "stage": stage, "format": CHECKPOINT_FORMAT}


def load_checkpoint(path, stage=None):
    """A checkpoint of this project -> its dict. Given ``stage``, it must be one of that
    stage in this format: a checkpoint of another stage, of another format, or from before
    checkpoints recorded their stage is refused, naming the file and what was expected
    (old checkpoints are not guessed at: retrain them)."""
    ck = read_checkpoint(input_file(path, "expected a checkpoint file"))
    if stage is None:
        return ck
    want = "expected a %s checkpoint (%s)" % (stage, WRITTEN_BY[stage])
    if not isinstance(ck, dict):
        raise DataError("%s: holds a %s, not a checkpoint of this project; %s"
                        % (path, type(ck).__name__, want))
    if "stage" not in ck:
        raise DataError("%s: records no stage: written by an older version of this project "
                        "(or not by it); %s: retrain it" % (path, want))
    if ck["stage"] != stage:
        raise DataError("%s: a %s checkpoint; %s" % (path, ck["stage"], want))
    if ck.get("format") != CHECKPOINT_FORMAT:
        raise DataError("%s: checkpoint format %s; this version reads format %d: retrain it"
                        % (path, ck.get("format"), CHECKPOINT_FORMAT))
    return ck


class SavedArgs(argparse.Namespace):
    """A checkpoint's options (``saved_args``): reading one it lacks, an option added after
    it was written, is a DataError naming the file, not an AttributeError."""

    def __getattr__(self, name):
        if name.startswith("__"):  # copy and pickle probe for special methods
            raise AttributeError(name)
        raise DataError("%s: records no --%s: written by an older version of this project; "
                        "retrain it" % (self.__dict__.get("_path"), name.replace("_", "-")))


def saved_args(ck, path):
    """The options ``ck`` (read from ``path``) was trained with, as a Namespace."""
    args = SavedArgs(**ck["args"])
    args._path = path
    return args


def read_checkpoint(path):
    """torch.load with weights_only; any file it cannot read is a DataError naming it."""
    import torch
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if "Unsupported global" in str(e):
            raise DataError("%s: holds objects other than tensors and plain types, which are "
                            "refused rather than run; not a checkpoint this project wrote"
                            % path) from None
        reason = "not a file torch.save wrote"
    # a torn copy or a flipped byte: by the cut point, torch.load fails in any of these
    except (RuntimeError, EOFError, OSError, ValueError, KeyError, IndexError,
            zipfile.BadZipFile) as e:
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        reason = "%s: %s" % (type(e).__name__, reason) if isinstance(e, KeyError) else reason
    raise DataError("%s: not a readable checkpoint (%s); truncated or corrupt? copy it "
                    "again or retrain" % (path, reason))


def input_file(path, hint):
    """``path`` when it is a file; a DataError naming it when it is missing or a folder,
    followed by ``hint`` (what was expected there)."""
    if os.path.isdir(path):
        raise DataError("%s: a folder; %s" % (path, hint))
    if not os.path.exists(path):
        raise DataError("%s: not found; %s" % (path, hint))
    return path


def check_writable(folder, flag="--out"):
    """Before any heavy work: ``folder`` (made later, if absent) can be written. Probes the
    nearest folder that exists with a file created and removed at once; a DataError naming
    ``flag``, the folder and the reason otherwise (read-only, a file in the way)."""
    here = os.path.abspath(folder)
    while not os.path.exists(here):
        here = os.path.dirname(here)
    if not os.path.isdir(here):
        raise DataError("%s %s: %s is a file, not a folder" % (flag, folder, here))
    try:
        with tempfile.TemporaryFile(dir=here):
            pass
    except OSError as e:
        raise DataError("%s %s: cannot write in %s (%s)" % (flag, folder, here,
                                                            e.strerror or e)) from None


def cli(main):
    """Run a script's ``main()``: a DataError (bad input, named) ends it with one line
    ``error: ...`` and exit code 1, without a traceback."""
    try:
        main()
    except DataError as e:
        sys.exit("error: %s" % e)


def bounded(kind=int, *, low, why, above=False, high=None):
    """An argparse type: a ``kind`` (int or float) >= ``low`` (> with ``above``; <=
    ``high`` if given), finite, else the flag's own one-line message that says ``why``."""
    rng = ("%s %g" % (">" if above else ">=", low) if high is None
           else "in %s%g, %g]" % ("(" if above else "[", low, high))

    def parse(text):
        try:
            v = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError("expected %s, got %r" % (
                "an integer" if kind is int else "a number", text)) from None
        ok = (v > low if above else v >= low) and (high is None or v <= high)
        if not ok or not np.isfinite(v):
            raise argparse.ArgumentTypeError("must be %s (%s), got %s" % (rng, why, text))
        return v
    parse.__name__ = kind.__name__
    return parse


DIST_TIMEOUT_S = 600  # longer than rank 0's evaluation, which the other ranks wait for


def add_launcher_args(parser):
    """Accept what every launcher passes: --local-rank=N, --local_rank N, or LOCAL_RANK."""
    parser.add_argument("--local-rank", "--local_rank", dest="local_rank", type=int,
                        default=int(os.environ.get("LOCAL_RANK", 0)), help=argparse.SUPPRESS)


class Dist:
    """Process-group state from the environment (torchrun / torch.distributed.launch).

    ``timeout_s`` bounds every collective: a rank that stops answering (stalled, SIGSTOP,
    a hung node) makes the others' collectives fail after it instead of hanging the job;
    ``stalled`` then names that rank and stops it where it shares this host.
    """

    def __init__(self, local_rank=0, timeout_s=DIST_TIMEOUT_S):
        import torch
        import torch.distributed as td
        self.world = int(os.environ.get("WORLD_SIZE", 1))
        self.rank = int(os.environ.get("RANK", 0))
        self.local_rank = int(os.environ.get("LOCAL_RANK", local_rank))
        self.timeout_s = timeout_s
        cuda = torch.cuda.is_available()
        self.device = torch.device("cuda", self.local_rank) if cuda else torch.device("cpu")
        if cuda:
            torch.cuda.set_device(self.device)
        self.enabled = self.world > 1
        if self.enabled and not td.is_initialized():
            td.init_process_group("nccl" if cuda else "gloo",
                                  timeout=datetime.timedelta(seconds=timeout_s))
        # monitored_barrier, which names the ranks that do not arrive, runs on gloo only
        self.monitor = td.new_group(backend="gloo") if self.enabled else None
        self.peers = [(socket.gethostname(), os.getpid())] * self.world  # rank -> host, pid
        if self.enabled:
            td.all_gather_object(self.peers, self.peers[self.rank], group=self.monitor)

    @contextlib.contextmanager
    def watch(self):
        """Collectives in the block: a timeout becomes an error naming the stalled ranks."""
        try:
            yield
        except RuntimeError as e:
            if not self.enabled or "timed out" not in str(e).lower():
                raise
            raise self.stalled(e) from None

    def stalled(self, error):
        """After a collective failed with ``error``: a RuntimeError naming the ranks that do
        not answer a monitored barrier within a quarter of the timeout, or ``error`` when
        all do."""
        import torch.distributed as td
        try:
            td.monitored_barrier(group=self.monitor, wait_all_ranks=True,
                                 timeout=datetime.timedelta(seconds=self.timeout_s / 4))
        except RuntimeError as e:
            named = str(e).strip().splitlines()[0]
            self.kill_local(named)
            return RuntimeError("a collective timed out after --dist-timeout %g s (%s); %s: "
                                "stalled, stopped or its node hung" % (
                                    self.timeout_s, str(error).splitlines()[0], named))
        return error

    def kill_local(self, named):
        """SIGKILL the ranks that ``named`` (monitored_barrier's "Ranks 1, 3 failed to pass")
        lists and that run on this host. The job is failing anyway; a stopped process cannot
        answer the launcher's SIGTERM, and torchrun would wait a fixed 30 s before it kills
        it itself."""
        m = re.search(r"Ranks? ([\d, ]+) failed to pass monitoredBarrier", named)
        for rank in (int(r) for r in m.group(1).split(",")) if m else ():
            host, pid = self.peers[rank]
            if host == socket.gethostname() and pid != os.getpid():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)

    @property
    def main(self):
        return self.rank == 0

    def barrier(self):
        if self.enabled:
            import torch.distributed as td
            with self.watch():
                td.barrier()

    def mean(self, values):
        """A dict of scalar tensors (or floats) -> their means over the ranks, as floats.

        One read back from the device for the whole dict: each read waits for the GPU.
        """
        import torch
        keys = list(values)  # every rank builds the dict in the same order
        if not keys:
            return {}
        t = torch.stack([torch.as_tensor(values[k], dtype=torch.float64, device=self.device)
                         for k in keys])
        if self.enabled:
            import torch.distributed as td
            td.all_reduce(t)
            t /= self.world
        return dict(zip(keys, t.tolist()))

    def close(self):
        if self.enabled:
            import torch.distributed as td
            if td.is_initialized():
                td.destroy_process_group()


def setup_logging(main=True):
    logging.basicConfig(level=logging.INFO if main else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S")
