"""Training: samples/s of each stage, 1 vs 2 processes, against what the arithmetic allows.

    python bench/training.py --data DATA --info INFO --packed DATA/packed \
        --scratch /tmp/kddmm_bench_training [--preset small] [--steps 30] [--repeats 3]
    python bench/training.py ... --preset paper --steps 3 --repeats 1 --configs 1p2t
    python bench/training.py ... --profile      # torch.profiler: top ops of each stage
    python bench/training.py ... --ab           # model1 step before/after score_pairs

Each stage's own train.py runs as a subprocess for ``--steps`` steps of one epoch
(``--steps-per-epoch``, ``--no-eval``) and its log.jsonl gives samples/s (the epoch's
wall time, first batch included). Configurations: 1p2t = one process, two threads (plain
``python``); 1p1t = one process, one thread; 2p1t = ``torchrun --nproc_per_node=2`` on
gloo, one thread each (torchrun's default). Scaling efficiency = 2p1t / (2 x 1p1t). These
runs read the packed store with 0 DataLoader workers, so the figure is the model's; the
``default`` configuration (npz store, 1 worker, as run.sh) shows what loading adds.
multilabel runs first; its export (``multilabel/export_model.py``) feeds model1/model2.

"Allowed" samples/s = the fp32 matmul GFLOP/s this process measures (2048^3, same
threads) / the FLOPs of one training sample (torch.utils.flop_counter over a forward and
backward pass of a real batch).
"""
import argparse
import json
import os
import shutil
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [HERE, os.path.dirname(HERE)]

import torch  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402

import engine  # noqa: E402
import matching  # noqa: E402
import utils  # noqa: E402
from common import load, report, run_timed  # noqa: E402
from sampler import NegativeSampler  # noqa: E402

STAGES = ("multilabel", "model1", "model2")
CONFIGS = {"1p2t": (1, 2, "packed"), "1p1t": (1, 1, "packed"), "2p1t": (2, 1, "packed"),
           "default": (1, 2, "npz")}


def stage_args(stage, a, out, export, steps, store="packed", workers=0):
    args = ["%s/train.py" % stage, "--data", a.data, "--info", a.info, "--preset", a.preset,
            "--out", out, "--epochs", "1", "--steps-per-epoch", str(steps), "--no-eval",
            "--no-progress", "--workers", str(workers), "--store", store, "--packed", a.packed]
    if a.features:
        args += ["--features", a.features]
    return args + (["--export", export] if stage != "multilabel" else [])


def run_stage(stage, a, config, export, repeat):
    nproc, threads, store = CONFIGS[config]
    out = os.path.join(a.scratch, "%s_%s_%d" % (stage, config, repeat))
    shutil.rmtree(out, ignore_errors=True)
    args = stage_args(stage, a, out, export, a.steps, store, 1 if config == "default" else 0)
    launch = [sys.executable] if nproc == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--standalone",
        "--nproc_per_node=%d" % nproc]
    run_timed(launch + args, env={"OMP_NUM_THREADS": str(threads)})
    with open(os.path.join(out, "log.jsonl")) as f:
        return json.loads(f.readline())["samples_per_s"], out


def build(stage, a, export):
    """In-process model, parameter groups and a loader, as the stage's train.py builds them."""
    mod = __import__("%s.train" % stage, fromlist=["train"])
    args = engine.apply_preset(mod.parse_args(stage_args(stage, a, a.scratch, export, 1)[1:]),
                               mod.PRESETS)
    queries, vocab = utils.load_info(a.info)
    store = engine.build_store(args)
    if stage == "multilabel":
        model = mod.build_model(args, len(vocab))
        groups = [dict(params=list(model.parameters()), lr=args.lr,
                       weight_decay=args.weight_decay)]
        ds = utils.PairDataset(queries, vocab, store, None)
    else:
        encoder, word_emb, _ = matching.load_pretrained(args.export, vocab, args.info)
        model = mod.build_model(encoder, word_emb, args)
        groups = matching.param_groups(model, args)
        fallback = "cluster" if stage == "model1" else "cluster_or_random"
        ds = utils.PairDataset(queries, vocab, store, NegativeSampler(queries, 0.8, fallback))
    opt, _ = engine.make_optimizer(groups, 1.0)
    loader = DataLoader(ds, batch_size=args.batch_size, shuffle=True, drop_last=True,
                        collate_fn=utils.collate_pairs)
    return model, opt, loader


def step(model, opt, batch):
    loss, _ = model(**utils.batch_inputs(batch, utils.forward_keys(model.forward)))
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()


def flops_per_sample(stage, a, export, batches=4):
    """Mean over a few batches: padding, and so the work, varies with the longest product."""
    from torch.utils.flop_counter import FlopCounterMode
    model, opt, loader = build(stage, a, export)
    model.train()
    it = iter(loader)
    step(model, opt, next(it))
    flops, n = 0, 0
    for _ in range(batches):
        batch = next(it)
        with FlopCounterMode(display=False) as fc:
            step(model, opt, batch)
        flops, n = flops + fc.get_total_flops(), n + len(batch["p_feats"])
    return flops / n


def ab_score_pairs(a, export, steps=5, repeats=3):
    """model1 ms/step, same batches, same process: the sampled negatives scored through the
    full score matrix and its diagonal (before), and through score_pairs (now)."""
    from model1.model import WordImageMatcher, pairwise_loss
    model, opt, loader = build("model1", a, export)
    model.train()
    it = iter(loader)
    batches = [next(it) for _ in range(steps + 1)]
    now = WordImageMatcher.forward

    def before(self, q_tokens, qi, p_boxes, p_feats, p_mask, nq_tokens, n_boxes, n_feats,
               n_mask):
        heads, n_heads = self.encode_image(p_boxes, p_feats, p_mask), \
            self.encode_image(n_boxes, n_feats, n_mask)
        text, n_text = self.encode_text(q_tokens), self.encode_text(nq_tokens)
        S = self.score_matrix(text, heads)
        return pairwise_loss(S, self.score_matrix(text, n_heads).diagonal(),
                             self.score_matrix(n_text, heads).diagonal(), qi, self.margin), {}
    res = {"before": [], "now": []}
    try:
        for _ in range(repeats):
            for name, fwd in (("before", before), ("now", now)):
                WordImageMatcher.forward = fwd
                step(model, opt, batches[0])
                t0 = time.perf_counter()
                for b in batches[1:]:
                    step(model, opt, b)
                res[name].append((time.perf_counter() - t0) / steps * 1e3)
    finally:
        WordImageMatcher.forward = now
    return res


def matmul_gflops(threads, n=2048, reps=5):
    torch.set_num_threads(threads)
    x, y = torch.randn(n, n), torch.randn(n, n)
    x @ y
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        x @ y
        best = min(best, time.perf_counter() - t0)
    return 2 * n ** 3 / best / 1e9


def profile(stage, a, export, steps=8):
    from torch.profiler import ProfilerActivity, profile as tprofile
    model, opt, loader = build(stage, a, export)
    model.train()
    it = iter(loader)
    batches = [next(it) for _ in range(steps + 2)]
    for b in batches[:2]:
        step(model, opt, b)
    with tprofile(activities=[ProfilerActivity.CPU]) as prof:
        for b in batches[2:]:
            step(model, opt, b)
    print("\n## torch.profiler, %s, preset %s, %d steps of batch %d, %d threads" % (
        stage, a.preset, steps, len(batches[0]["p_feats"]), torch.get_num_threads()))
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", required=True)
    p.add_argument("--info", required=True)
    p.add_argument("--features", help="npz folder (default DATA/features)")
    p.add_argument("--packed", required=True, help="prepare.py pack output")
    p.add_argument("--scratch", default="/tmp/kddmm_bench_training")
    p.add_argument("--preset", default="small")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    p.add_argument("--stages", nargs="+", default=list(STAGES), choices=STAGES)
    p.add_argument("--profile", action="store_true", help="print torch.profiler tables too")
    p.add_argument("--ab", action="store_true",
                   help="model1 ms/step before/after score_pairs, in this process, 1 thread")
    a = p.parse_args(argv)
    os.makedirs(a.scratch, exist_ok=True)
    export = os.path.join(a.scratch, "encoder_%s.pt" % a.preset)
    if a.ab:
        torch.set_num_threads(1)
        res = ab_score_pairs(a, export)
        report([("model1 step, sampled negatives via score_matrix().diagonal() (before)",
                 res["before"], "ms"), ("model1 step, via score_pairs (now)", res["now"], "ms"),
                ("before / now", [x / y for x, y in zip(res["before"], res["now"])], "x")],
               "model1 training step A/B, preset %s, 1 thread" % a.preset,
               "python bench/training.py --data %s --info %s --packed %s --scratch %s --preset "
               "%s --ab  (needs SCRATCH/encoder_%s.pt from a full run)"
               % (a.data, a.info, a.packed, a.scratch, a.preset, a.preset))
        return
    res = {}
    for stage in a.stages:
        for r in range(a.repeats):
            for c in a.configs[r % len(a.configs):] + a.configs[:r % len(a.configs)]:
                print("%s %s repeat %d %s" % (stage, c, r, load()), flush=True)
                sps, out = run_stage(stage, a, c, export, r)
                res.setdefault((stage, c), []).append(sps)
                if stage == "multilabel" and not os.path.exists(export):
                    run_timed([sys.executable, "multilabel/export_model.py", "--ckpt",
                               os.path.join(out, "best.pt"), "--out", export])
    threads = {c: CONFIGS[c][1] for c in a.configs}
    peak = {t: matmul_gflops(t) for t in sorted(set(threads.values()))}
    table = [("fp32 matmul, %d thread(s)" % t, g, "GFLOP/s") for t, g in peak.items()]
    for stage in a.stages:
        fps = flops_per_sample(stage, a, export)
        table.append(("%s: training FLOPs per sample" % stage, fps / 1e6, "MFLOP"))
        for c in a.configs:
            table.append(("%s %s samples/s" % (stage, c), res[(stage, c)], "samples/s"))
            nproc = CONFIGS[c][0]
            allowed = nproc * peak[threads[c]] * 1e9 / fps
            table.append(("%s %s achieved / allowed by arithmetic" % (stage, c),
                          [x / allowed for x in res[(stage, c)]], "x"))
        if {"1p1t", "2p1t"} <= set(a.configs):
            table.append(("%s scaling efficiency 2p1t / (2 x 1p1t)" % stage,
                          [y / (2 * x) for x, y in zip(res[(stage, "1p1t")],
                                                       res[(stage, "2p1t")])], "x"))
    report(table, "training, preset %s, %d steps, %d repeats (median)"
           % (a.preset, a.steps, a.repeats),
           "python bench/training.py --data %s --info %s --packed %s --preset %s --steps %d "
           "--repeats %d --configs %s --stages %s"
           % (a.data, a.info, a.packed, a.preset, a.steps, a.repeats, " ".join(a.configs),
              " ".join(a.stages)))
    print(load())
    if a.profile:
        torch.set_num_threads(1)  # one thread: what a shared machine cannot distort
        for stage in a.stages:
            profile(stage, a, export)


if __name__ == "__main__":
    main()
