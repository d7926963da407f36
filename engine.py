"""The training loop every stage shares: flags, DDP, AMP, checkpoints, resume, logs.

A stage's ``main`` creates the process group (``runtime.Dist``) and hands ``fit`` a model
whose ``forward`` takes the batch keys it reads by name (``utils.BATCH_KEYS``) and returns
``(loss, {name: tensor})``, its parameter groups, a
dataset with ``set_epoch``, a collate, and on rank 0 optionally an
``evaluate(model) -> {metric: float}`` run after each epoch.
"""
import argparse
import collections
import json
import logging
import os
import random
import time

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader
from torch.utils.data.distributed import DistributedSampler

import runtime
import utils
from errors import DataError

log = logging.getLogger("kddmm")
BEST_METRIC = "valid_ndcg5"  # what an evaluator returns and best.pt maximises
PROGRESS_EVERY = 50  # steps between the progress bar's loss readings


def core_parser(description, presets):
    """The flags every stage's train.py takes, so the stages read alike."""
    p = argparse.ArgumentParser(description=description)
    g = p.add_argument_group("data")
    g.add_argument("--data", default=os.path.join(utils.ROOT, "data", "small"),
                   help="competition data root")
    g.add_argument("--features", help="per-product .npz folder (default DATA/features)")
    g.add_argument("--store", default="npz", choices=["npz", "packed"],
                   help="read products from the .npz folder or from `prepare.py pack`'s store")
    g.add_argument("--packed", help="packed store folder (default: packed/ beside --features)")
    g.add_argument("--info", default=os.path.join(utils.ROOT, "info"), help="info/ folder")
    g.add_argument("--max-boxes", type=runtime.bounded(low=1, why="leave it out to keep "
                                                                   "every box"),
                   help="keep at most this many boxes per product (default: every box)")
    g.add_argument("--workers", type=runtime.bounded(low=0, why="0 reads in the main process"),
                   default=2, help="DataLoader workers per process")
    g.add_argument("--skip-bad", action="store_true",
                   help="skip, count and list bad rows of the evaluation split")
    g.add_argument("--eval-split", default="valid", help="split ranked after each epoch")
    g.add_argument("--no-eval", action="store_true", help="skip the per-epoch validation")
    g = p.add_argument_group("training")
    g.add_argument("--out", required=True, help="checkpoint and log folder")
    g.add_argument("--preset", default="small", choices=sorted(presets))
    g.add_argument("--epochs", type=runtime.bounded(low=1, why="the epochs to train, counting "
                                                            "a resumed checkpoint's"))
    g.add_argument("--batch-size", type=runtime.bounded(low=1, why="the pairs of a step on "
                                                                "each process"),
                   help="per process")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--resume", action="store_true", help="continue from OUT/last.pt")
    g.add_argument("--steps-per-epoch", type=runtime.bounded(low=1, why="leave it out for "
                                                                     "whole epochs"),
                   help="cap the steps of an epoch")
    g.add_argument("--amp", default="auto", choices=["auto", "off", "bf16", "fp16"],
                   help="mixed precision on CUDA (auto: bf16 where supported); off on CPU")
    g.add_argument("--no-progress", action="store_true")
    g.add_argument("--dist-timeout", type=runtime.bounded(
                       float, low=0, above=True, why="the seconds a collective waits"),
                   default=runtime.DIST_TIMEOUT_S,
                   help="seconds a collective waits for the other ranks before the job "
                        "stops, naming a rank that does not answer")
    runtime.add_launcher_args(p)
    return p


def apply_preset(args, presets):
    """Fill every option left unset with the preset's value; returns args."""
    for k, v in presets[args.preset].items():
        if getattr(args, k, None) is None:
            setattr(args, k, v)
    args.features = args.features or os.path.join(args.data, "features")
    args.packed = args.packed or utils.default_packed(args.features)
    return args


def build_store(args):
    """The product store the flags name: per-product .npz (default) or the packed store."""
    if args.store == "packed":
        return utils.PackedStore(args.packed, args.max_boxes)
    return utils.ProductStore(args.features, args.max_boxes)


def make_optimizer(groups, gamma):
    """Adam over explicit parameter groups (each with its own lr and weight decay)."""
    groups = [g for g in groups if any(p.requires_grad for p in g["params"])]
    for g in groups:
        g["params"] = [p for p in g["params"] if p.requires_grad]
    opt = torch.optim.Adam(groups)
    return opt, torch.optim.lr_scheduler.ExponentialLR(opt, gamma)


def trainable_state(model):
    """state_dict without frozen parameters: they live once, in the export file."""
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    return {k: v for k, v in model.state_dict().items() if k not in frozen}


def load_trainable(model, state, path):
    """Load checkpoint weights into ``model``, refusing any that do not fit: a key the model
    lacks, or a trainable parameter the checkpoint lacks (the frozen ones are absent from
    model1/model2 checkpoints by design: they live in the export)."""
    missing, unexpected = model.load_state_dict(state, strict=False)
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    missing = [k for k in missing if k not in frozen]
    if missing or unexpected:
        raise DataError("%s does not fit this model: missing %s, unexpected %s (another "
                        "model option or code version?)"
                        % (path, _first(missing), _first(unexpected)))


def _first(keys, n=5):
    """The first ``n`` of ``keys`` sorted, and how many more there are."""
    more = " and %d more" % (len(keys) - n) if len(keys) > n else ""
    return "%s%s" % (sorted(keys)[:n], more)


def rng_state():
    """torch, numpy and random generator states as tensors and ints (weights_only-safe)."""
    _, keys, pos, *_ = np.random.get_state()
    version, internal, _ = random.getstate()
    return {"torch": torch.get_rng_state(), "numpy": torch.from_numpy(keys.astype(np.int64)),
            "numpy_pos": int(pos), "random": torch.tensor(internal, dtype=torch.int64),
            "random_version": version}


def set_rng_state(s):
    torch.set_rng_state(s["torch"])
    np.random.set_state(("MT19937", s["numpy"].numpy().astype(np.uint32), s["numpy_pos"], 0, 0.0))
    random.setstate((s["random_version"], tuple(s["random"].tolist()), None))


def amp_setup(mode, device):
    """-> (autocast dtype or None, GradScaler or None). Mixed precision only on CUDA."""
    if device.type != "cuda" or mode == "off":
        return None, None
    if mode == "bf16" or (mode == "auto" and torch.cuda.is_bf16_supported()):
        return torch.bfloat16, None
    return torch.float16, torch.amp.GradScaler("cuda")


def to_device(batch, device):
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v
            for k, v in batch.items()}


def train_one_epoch(model, loader, opt, *, keys, dist, args, amp_dtype, scaler, epoch):
    """One pass over ``loader``, ``model`` reading the ``keys`` of each batch
    (``utils.forward_keys``) -> {loss and each part: mean over the steps and the ranks,
    samples_per_s}. The sums stay on the device: reading a value back waits for the GPU,
    so the loop does it every PROGRESS_EVERY steps and at the end of the epoch, where it
    checks that no loss and no parameter is NaN or infinite (``check_finite``)."""
    model.train()
    sums, n, seen, t0 = {}, 0, 0, time.time()
    from tqdm import tqdm
    steps = len(loader) if not args.steps_per_epoch else min(len(loader), args.steps_per_epoch)
    bar = tqdm(total=steps, desc="epoch %d" % epoch, disable=not dist.main or args.no_progress)
    first_bad = torch.tensor(-1, device=dist.device)  # first step with a non-finite loss
    recent = collections.deque(maxlen=PROGRESS_EVERY)  # (step, product ids) not yet checked
    for step, batch in enumerate(loader):
        if step >= steps:
            break
        recent.append((step, [batch.pop(k) for k in ("pid", "npid") if k in batch]))
        batch = to_device(utils.unflatten(batch, dist.device), dist.device)
        with torch.autocast(dist.device.type, dtype=amp_dtype or torch.float32,
                            enabled=amp_dtype is not None):
            loss, parts = model(**utils.batch_inputs(batch, keys))
        opt.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
        else:
            loss.backward()
            opt.step()
        bad = ~torch.isfinite(loss.detach()) & (first_bad < 0)
        # new_full fills on the device: torch.tensor(step, device=...) would copy and wait
        first_bad = torch.where(bad, first_bad.new_full((), step), first_bad)
        for k, v in {"loss": loss, **parts}.items():
            v = v.detach().double()  # float64: the sums a Python float would give
            sums[k] = sums[k] + v if k in sums else v
        n += 1
        seen += len(batch["p_feats"])
        if n % PROGRESS_EVERY == 0:
            mean = check_finite(first_bad, sums["loss"] / n, recent, epoch=epoch)
            if not bar.disable:
                bar.set_postfix(loss="%.4f" % mean)
        bar.update()
    if n:
        check_finite(first_bad, sums["loss"] / n, recent, epoch=epoch, model=model)
    stats = dist.mean({k: v / max(1, n) for k, v in sums.items()})
    if "loss" in stats:
        bar.set_postfix(loss="%.4f" % stats["loss"])
    bar.close()
    stats["samples_per_s"] = seen * dist.world / max(1e-9, time.time() - t0)
    return stats


def check_finite(first_bad, mean_loss, recent, *, epoch, model=None):
    """Stop training at the first NaN or infinite loss (or, given ``model``, parameter),
    naming the step and its batch's products: every later step, and so every checkpoint,
    would be NaN. One read back from the device -> the mean loss so far."""
    checks = [first_bad.double(), mean_loss.double()]
    if model is not None:
        checks.append(torch.stack([torch.isfinite(p).all() for p in model.parameters()
                                   if p.requires_grad]).all().double())
    got = torch.stack(checks).tolist()
    what = None
    if got[0] >= 0:
        step, what = int(got[0]), "the loss is NaN or infinite"
    elif len(got) > 2 and not got[2]:
        step, what = recent[-1][0], "a parameter is NaN or infinite after the update"
    if what is not None:
        products = [pids for s, pids in recent if s == step]
        pids = sorted({int(p) for t in (products[0] if products else []) for p in t})
        raise DataError(
            "epoch %d, step %d: %s; the batch's products: %s%s. Check their features "
            "(prepare.py range-checks them), or lower --lr" % (
                epoch, step, what, pids[:20] or "(not recorded)",
                " and %d more" % (len(pids) - 20) if len(pids) > 20 else ""))
    recent.clear()
    return got[1]


def fit(args, model, dataset, *, stage, dist, groups, collate, evaluate=None, extra_state=None,
        batches=None):
    """Train ``model`` for ``args.epochs``; checkpoints OUT/last.pt (each epoch) and OUT/best.pt,
    each recording ``stage`` (``runtime.stamp``); --resume reads only a checkpoint of it.

    ``dist`` is the process group's ``runtime.Dist`` (the stage's main creates and closes it);
    ``groups`` the optimizer's parameter groups, decayed by ``args.gamma`` per epoch;
    ``collate`` turns a list of ``dataset`` items into the batch ``model`` reads,
    or into a flat batch that ``utils.unflatten`` pads on the training device; ``evaluate``
    (rank 0 only) returns {metric: float} after each epoch, and best.pt keeps the epoch of
    the highest ``BEST_METRIC``; ``extra_state`` must match on resume; ``batches``, a batch
    sampler with ``set_epoch`` that yields this rank's index lists (``sampler.GroupedBatches``),
    replaces the default: a shuffle split across the ranks.

    Returns the list of per-epoch log dicts (rank 0; other ranks get theirs without eval).
    """
    model.to(dist.device)
    opt, sched = make_optimizer(groups, args.gamma)
    start, best, history = 0, -float("inf"), []
    last = os.path.join(args.out, "last.pt")
    # a job that torchrun restarted after a failure resumes by itself (--max-restarts)
    restarted = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", 0)) > 0
    if args.resume and not os.path.exists(last):
        raise DataError("%s: not found; --resume continues a run from its last "
                        "checkpoint (leave --resume out to start one)" % last)
    if (args.resume or restarted) and os.path.exists(last):
        ck = runtime.load_checkpoint(last, stage)
        check_compatible(ck, args, extra_state, world=dist.world)
        load_trainable(model, ck["model"], last)
        opt.load_state_dict(ck["optimizer"])
        sched.load_state_dict(ck["scheduler"])
        start, best, history = ck["epoch"] + 1, ck["best"], ck["history"]
        if start >= args.epochs:
            raise DataError("%s: --resume: it already holds %d epochs and --epochs is %d: "
                            "nothing to train; give --epochs above %d to train on"
                            % (last, start, args.epochs, start))
        set_rng_state(ck["rng"])
        if dist.main:
            log.info("resumed from %s at epoch %d", last, start)
    log_path = os.path.join(args.out, "log.jsonl")
    if dist.main:  # this run's epochs only: none yet, or those its checkpoint holds
        os.makedirs(args.out, exist_ok=True)
        with utils.atomic_open(log_path) as f:
            f.writelines(log_line(stats) for stats in history)
    ddp = DDP(model, device_ids=[dist.device.index] if dist.device.type == "cuda" else None) \
        if dist.enabled else model
    if batches is None:
        sampler = DistributedSampler(dataset, num_replicas=dist.world, rank=dist.rank,
                                     shuffle=True, seed=args.seed, drop_last=True)
        batching = dict(batch_size=args.batch_size, sampler=sampler, drop_last=True)
    else:
        sampler, batching = batches, dict(batch_sampler=batches)
    loader = DataLoader(dataset, **batching, collate_fn=collate, num_workers=args.workers,
                        pin_memory=dist.device.type == "cuda",
                        persistent_workers=False)
    amp_dtype, scaler = amp_setup(args.amp, dist.device)
    keys = utils.forward_keys(model.forward)
    for epoch in range(start, args.epochs):
        sampler.set_epoch(epoch)
        dataset.set_epoch(epoch)
        t0 = time.time()
        with dist.watch():
            stats = train_one_epoch(ddp, loader, opt, keys=keys, dist=dist, args=args,
                                    amp_dtype=amp_dtype, scaler=scaler, epoch=epoch)
        sched.step()
        stats.update(epoch=epoch, time_s=round(time.time() - t0, 2),
                     lr=[g["lr"] for g in opt.param_groups])
        if dist.main and evaluate is not None:
            stats.update(evaluate(model))
        if dist.enabled:
            with dist.watch():
                stats["rank_param_maxdiff"] = replica_divergence(model, dist)
        dist.barrier()
        improved = BEST_METRIC in stats and stats[BEST_METRIC] > best
        if improved:
            best = stats[BEST_METRIC]
        history.append(stats)
        if dist.main:
            state = runtime.stamp({
                "model": trainable_state(model), "optimizer": opt.state_dict(),
                "scheduler": sched.state_dict(), "epoch": epoch, "best": best,
                "history": history, "args": plain_args(args), "rng": rng_state(),
                "world": dist.world, **(extra_state or {})}, stage)
            runtime.save_checkpoint(state, last)
            if improved or evaluate is None:
                runtime.save_checkpoint(state, os.path.join(args.out, "best.pt"))
            with utils.disk_full_named(log_path), open(log_path, "a") as f:
                f.write(log_line(stats))
            log.info("epoch %d %s", epoch, json.dumps(
                {k: round(v, 4) if isinstance(v, float) else v for k, v in stats.items()
                 if k not in ("lr", "epoch")}))
        dist.barrier()
    return history


def log_line(stats):
    """One epoch's stats -> its line of OUT/log.jsonl."""
    return json.dumps({k: round(v, 6) if isinstance(v, float) else v
                       for k, v in stats.items()}) + "\n"


@torch.no_grad()
def replica_divergence(model, dist):
    """Largest difference between ranks of a weighted checksum of every trainable tensor.

    0.0 when DDP keeps the replicas identical (the published model2 drifted: its image
    encoder was outside DDP). Cheap: one float64 per tensor crosses the wire.
    """
    import torch.distributed as td
    sums = []
    for p in model.parameters():
        if p.requires_grad:
            w = torch.arange(p.numel(), device=p.device, dtype=torch.float64) % 7 + 1
            sums.append((p.detach().double().flatten() * w).sum())
    mine = torch.stack(sums)
    every = [torch.empty_like(mine) for _ in range(dist.world)]
    td.all_gather(every, mine)
    return float(max((e - mine).abs().max() for e in every))


def plain_args(args):
    """vars(args) with plain types only, so checkpoints load with weights_only=True."""
    return {k: v for k, v in vars(args).items()
            if isinstance(v, (int, float, str, bool, list, type(None)))}


# what may differ between a run and the run it resumes: how it runs, not what it computes
# (the store is the same products in another layout; --skip-bad touches evaluation only)
MAY_CHANGE = frozenset(["epochs", "workers", "no_progress", "resume", "local_rank", "out",
                        "store", "packed", "skip_bad", "dist_timeout"])
PATH_KEYS = frozenset(["data", "features", "info", "export"])


def check_compatible(ck, args, extra_state=None, world=1):
    """Refuse to resume ``ck`` under other settings: every option outside MAY_CHANGE (the
    preset and sizes, batch size, seed, data and info paths, learning rates and the other
    optimisation settings) and the number of processes must equal the checkpoint's, and so
    must the vocabulary and encoder config (same-sized vocabularies would otherwise load
    silently into the wrong words)."""
    now = plain_args(args)
    newer = sorted(k for k in now if k not in ck.get("args", {}) and k not in MAY_CHANGE)
    if newer:
        raise DataError("checkpoint records no --%s: written by an older version of this "
                        "project; start a fresh --out" % newer[0].replace("_", "-"))
    changed = []
    for k, was in sorted(ck.get("args", {}).items()):
        if k in MAY_CHANGE or k not in now:
            continue
        same = (os.path.abspath(was) == os.path.abspath(now[k]) if k in PATH_KEYS and was
                and now[k] else was == now[k])
        if not same:
            changed.append("--%s %r (this run: %r)" % (k.replace("_", "-"), was, now[k]))
    if ck.get("world", world) != world:
        changed.append("%d processes (this run: %d)" % (ck["world"], world))
    if changed:
        raise DataError("checkpoint was trained with %s; resume with the same settings "
                        "(only %s may change) or start a fresh --out"
                        % (", ".join(changed), ", ".join(
                            "--" + k.replace("_", "-") for k in sorted(MAY_CHANGE)
                            if k not in ("resume", "local_rank"))))
    for k, v in (extra_state or {}).items():
        if k in ck and ck[k] != v:
            raise DataError("checkpoint has another %s than this run (another info/ or "
                            "export?); start a fresh --out" % k)


@torch.no_grad()
def encode_products(encode, cset, device, batch_size=256):
    """Encode every product of a CandidateSet once: encode(boxes, feats, mask) -> (P, ...),
    row k for ``cset.pids[k]``."""
    out = None
    for b in cset.product_batches(batch_size):
        y = encode(b["boxes"].to(device), b["feats"].to(device), b["mask"].to(device)).float()
        if out is None:
            out = y.new_empty((len(cset.pids),) + y.shape[1:])
        out[b["index"].to(device)] = y
    return out


def eval_paths(data, split):
    """-> (candidate TSV, answer JSON) of the split ranked after each epoch; its answers are
    required: without them best.pt would silently be the last epoch."""
    tsv, ans = split_tsv(data, split), split_paths(data, split)[1]
    if ans is None:
        raise DataError("%s: not found; the per-epoch evaluation needs the answers of "
                        "the %s split (pass --no-eval to train without it)"
                        % (os.path.join(data, split, split + "_answer.json"), split))
    return tsv, ans


def split_paths(data, split):
    """-> (candidate TSV, answer JSON or None) of a split of a data root."""
    tsv = os.path.join(data, split, split + ".tsv")
    ans = os.path.join(data, split, split + "_answer.json")
    return tsv, ans if os.path.exists(ans) else None


def split_tsv(data, split):
    """The candidate TSV of a split of a data root; a DataError when it is missing or a
    folder (checked before any heavy work)."""
    return runtime.input_file(split_paths(data, split)[0], "expected the candidate TSV of "
                                                           "the %s split" % split)
