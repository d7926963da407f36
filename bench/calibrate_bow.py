"""Calibrate the synthetic world: how far does a small bag-of-words two-tower model get?

    python bench/calibrate_bow.py --data data/small --info runs/info [--seconds 60]

Text tower: mean of learned word embeddings. Image tower: mean of the region features
through a linear layer. Score: dot product; in-batch softmax loss both ways; trained for a
fixed wall-clock budget on one process. A world this model solves (NDCG@5 >= 0.95) could
not tell the real methods apart; prints valid NDCG@5 beside the random and class-match
baselines of the generator's report.
"""
import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402

import metric  # noqa: E402
import utils  # noqa: E402


class BowTwoTower(nn.Module):
    def __init__(self, vocab_size, feat_dim=2048, dim=128):
        super().__init__()
        self.emb = nn.EmbeddingBag(vocab_size, dim, mode="mean", padding_idx=0)
        self.img = nn.Linear(feat_dim, dim)

    def text(self, tokens):
        return self.emb(tokens)

    def image(self, feats, mask):
        m = mask[..., None].float()
        return self.img((feats * m).sum(1) / m.sum(1).clamp(min=1))


def evaluate(model, cset, answers):
    with torch.no_grad():
        img = torch.cat([model.image(b["feats"], b["mask"])
                         for b in cset.product_batches(512)])
        tokens, _ = utils.pad_tokens(cset.tokens)
        txt = model.text(tokens)
        scores = (txt[torch.from_numpy(cset.pos)] * img).sum(1)
    return metric.ndcg_at_k(cset.predictions(scores.numpy()), answers)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", default="data/small")
    p.add_argument("--info", default="runs/info")
    p.add_argument("--seconds", type=float, default=60)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    torch.manual_seed(a.seed)
    queries, vocab = utils.load_info(a.info)
    ds = utils.PairDataset(queries, vocab, utils.ProductStore(os.path.join(a.data, "features")))
    loader = DataLoader(ds, batch_size=128, shuffle=True, collate_fn=utils.collate_pairs,
                        num_workers=1, drop_last=True)
    cset = utils.CandidateSet.from_tsv(os.path.join(a.data, "valid", "valid.tsv"), vocab)
    answers = metric.load_answers(os.path.join(a.data, "valid", "valid_answer.json"))
    model = BowTwoTower(len(vocab))
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    t0, steps, epoch = time.time(), 0, 0
    while time.time() - t0 < a.seconds:
        for b in loader:
            t, i = model.text(b["q_tokens"]), model.image(b["p_feats"], b["p_mask"])
            logits = t @ i.t()
            same = b["qi"][:, None] == b["qi"][None, :]
            logits = logits.masked_fill(same & ~torch.eye(len(t), dtype=torch.bool), -1e4)
            target = torch.arange(len(t))
            loss = (F.cross_entropy(logits, target) + F.cross_entropy(logits.t(), target)) / 2
            opt.zero_grad()
            loss.backward()
            opt.step()
            steps += 1
            if time.time() - t0 > a.seconds:
                break
        epoch += 1
    ndcg = evaluate(model, cset, answers)
    report = {}
    rp = os.path.join(a.data, "synthetic_report.json")
    if os.path.exists(rp):
        with open(rp) as f:
            report = json.load(f).get("valid", {})
    print("bag-of-words two-tower, %d steps (%.1f epochs) in %.0f s: valid NDCG@5 %.4f"
          % (steps, steps * 128 / len(ds), time.time() - t0, ndcg))
    if report:
        print("generator baselines on valid: random %.4f, class-match %.4f"
              % (report["random"], report["class_match"]))
    return ndcg


if __name__ == "__main__":
    main()
