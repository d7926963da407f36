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
import zipfile

import numpy as np

from tsv import DataError
from utils import atomic_open


def seed_everything(seed, rank=0):
    import torch
    s = seed + rank
    random.seed(s)
    np.random.seed(s % 2**32)
    torch.manual_seed(s)


def save_checkpoint(state, path):
    """torch.save, atomically: a crash never leaves a torn checkpoint."""
    import torch
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with atomic_open(path, "wb") as f:
        torch.save(state, f)


def load_checkpoint(path):
    import torch
    if not os.path.exists(path):
        raise DataError("%s: checkpoint not found" % path)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise DataError("%s: holds objects other than tensors and plain types, which are "
                        "refused rather than run; not a checkpoint this project wrote"
                        % path) from None
    except (RuntimeError, EOFError, zipfile.BadZipFile) as e:  # a torn copy, a flipped byte
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise DataError("%s: not a readable checkpoint (%s); truncated or corrupt? copy it "
                        "again or retrain" % (path, reason)) from None


def cli(main):
    """Run a script's ``main()``: a DataError (bad input, named) ends it with one line
    ``error: ...`` and exit code 1, without a traceback."""
    try:
        main()
    except DataError as e:
        sys.exit("error: %s" % e)


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
