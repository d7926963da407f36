"""Scoring: candidates/s of model1 and model2 validation against a one-pair-at-a-time loop.

    python bench/scoring.py --data DATA --model1 runs/model1/best.pt --model2 runs/model2/best.pt \
        [--export runs/multilabel/encoder.pt] [--split valid] [--naive 400] [--repeats 3] \
        [--device cuda]

Fast: ``matching.score_split`` (what validation.py and the per-epoch evaluation run):
every product encoded once in batches, every query once, then the pairs scored in
batches. Naive: for each candidate, encode its product alone and its query alone and score
that single pair -- the loop a first implementation writes. Both score the same split in
the same process (the naive loop on its first ``--naive`` candidates; a rate), one thread,
reading the split (CandidateSet) excluded. The ratio is taken within each repeat.
"Allowed by arithmetic": the FLOPs score_split spends per candidate (torch.utils.flop_counter)
at the fp32 matmul GFLOP/s this process measures -- the ceiling of the fast path, and so of
the ratio (CPU only; on --device cuda the two paths are timed with synchronisation and
the ceiling rows are left out).
"""
import argparse
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [HERE, os.path.dirname(HERE)]

import numpy as np  # noqa: E402
import torch  # noqa: E402

import engine  # noqa: E402
import matching  # noqa: E402
import utils  # noqa: E402
from common import load, report  # noqa: E402
from training import matmul_gflops  # noqa: E402


def file_order_batches(cset, batch_size):
    """product_batches as it was before products were grouped by box count: file order."""
    for s in range(0, len(cset.pids), batch_size):
        idx = np.arange(s, min(s + batch_size, len(cset.pids)))
        boxes, feats, mask = utils.pad_regions(
            [(cset.boxes[cset.box_off[k]:cset.box_off[k + 1]],
              cset.feats[cset.box_off[k]:cset.box_off[k + 1]]) for k in idx])
        yield {"boxes": boxes, "feats": feats, "mask": mask, "index": torch.from_numpy(idx)}


@torch.no_grad()
def naive(model, cset, n, device=torch.device("cpu")):
    """Score the first n candidates one pair at a time -> scores (n,)."""
    model.eval()
    out = []
    pair = torch.tensor([[0, 0]], device=device)
    for k in range(min(n, len(cset.pids))):
        a, b = cset.box_off[k], cset.box_off[k + 1]
        boxes, feats, mask = (x.to(device) for x in utils.pad_regions(
            [(cset.boxes[a:b], cset.feats[a:b])]))
        heads = model.encode_image(boxes, feats, mask)
        tokens, _ = utils.pad_tokens([cset.tokens[cset.pos[k]]])
        out.append(float(model.score(tokens.to(device), heads, pair)[0]))  # syncs
    return np.array(out)


def timed(fn, device):
    """-> (fn's result, seconds), the device's queued work included."""
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    out = fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return out, time.perf_counter() - t0


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", required=True)
    p.add_argument("--model1", required=True, help="model1 checkpoint")
    p.add_argument("--model2", required=True, help="model2 checkpoint")
    p.add_argument("--export", help="encoder export (default: the checkpoints')")
    p.add_argument("--split", default="valid")
    p.add_argument("--naive", type=int, default=400, help="candidates scored one at a time")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    device = torch.device(a.device)
    table = []
    for name, ckpt in (("model1", a.model1), ("model2", a.model2)):
        stage = __import__("%s.model" % name, fromlist=["model"])
        model, vocab, ck = matching.load_trained(stage.build_model, ckpt, a.export)
        model.to(device)
        tsv, _ = engine.split_paths(a.data, a.split)
        t0 = time.perf_counter()
        cset = utils.CandidateSet.from_tsv(tsv, vocab, ck["args"].get("max_boxes"))
        read_s = time.perf_counter() - t0
        fast, before, slow, ratio = [], [], [], []
        for _ in range(a.repeats):
            preds, dt = timed(lambda: matching.score_split(model, cset, device), device)
            f = len(cset.pids) / dt
            cset.product_batches = lambda bs: file_order_batches(cset, bs)
            _, dt = timed(lambda: matching.score_split(model, cset, device), device)
            before.append(len(cset.pids) / dt)
            del cset.product_batches
            s, dt = timed(lambda: naive(model, cset, a.naive, device), device)
            n = len(s) / dt
            fast.append(f)
            slow.append(n)
            ratio.append(f / n)
        if device.type == "cpu":
            from torch.utils.flop_counter import FlopCounterMode
            with FlopCounterMode(display=False) as fc:
                matching.score_split(model, cset, device)
            allowed = matmul_gflops(a.threads) * 1e9 / (fc.get_total_flops() / len(cset.pids))
        flat = np.array([sc for q in cset.qids for _, sc in preds[int(q)]])
        agree = np.abs(flat[:len(s)] - s).max()
        table += [("%s: reading the split (CandidateSet)" % name, len(cset.pids) / read_s,
                   "candidates/s"),
                  ("%s: score_split" % name, fast, "candidates/s"),
                  ("%s: score_split, products in file order (before)" % name, before,
                   "candidates/s"),
                  ("%s: one pair at a time" % name, slow, "candidates/s"),
                  ("%s: score_split / one pair at a time" % name, ratio, "x"),
                  ("%s: largest |difference| of the two scores" % name, agree, "")]
        if device.type == "cpu":
            table += [("%s: allowed by arithmetic (matmul peak / FLOPs per candidate)" % name,
                       allowed, "candidates/s"),
                      ("%s: score_split / allowed" % name, [x / allowed for x in fast], "x")]
    report(table, "scoring %s/%s on %s: %d candidates, %d thread(s), %d repeats (median)"
           % (a.data, a.split, a.device, len(cset.pids), a.threads, a.repeats),
           "python bench/scoring.py --data %s --model1 %s --model2 %s%s --split %s --naive %d "
           "--repeats %d --threads %d --device %s"
           % (a.data, a.model1, a.model2, " --export " + a.export if a.export else "",
              a.split, a.naive, a.repeats, a.threads, a.device))
    print(load())


if __name__ == "__main__":
    main()
