"""The peer: a small CLIP-style two-tower model, the number every world's pipeline must beat.

Image tower: sqrt of the region features -> Linear-GELU-Linear, plus a Linear of the box,
attention pooling over regions, L2-normalised. Text tower: a bag of word embeddings with
attention pooling, L2-normalised. Loss: in-batch contrastive (InfoNCE, both directions,
learned temperature); pairs of the same query are not each other's negatives. It reads the
same preprocessed info/ and product store as the stages, and prints valid/testB NDCG@5 and
its wall time.

    python experiments/two_tower.py --data DATA --info runs/info --packed runs/packed
"""
import argparse
import json
import os
import sys
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import metric  # noqa: E402
import text  # noqa: E402
import tsv  # noqa: E402
import utils  # noqa: E402


class ImageTower(nn.Module):
    def __init__(self, feat_dim, d):
        super().__init__()
        self.feat = nn.Sequential(nn.Linear(feat_dim, d), nn.GELU(), nn.Linear(d, d))
        self.box = nn.Linear(5, d)
        self.score = nn.Linear(d, 1)
        self.proj = nn.Linear(d, d)

    def forward(self, boxes, feats, mask):
        """boxes (B, N, 5), feats (B, N, F), mask (B, N) -> (B, d) unit vectors."""
        x = self.feat(feats.clamp(min=0).sqrt()) + self.box(boxes)
        w = torch.softmax(self.score(x).squeeze(-1).masked_fill(~mask, float("-inf")), 1)
        return F.normalize(self.proj(torch.einsum("bn,bnd->bd", w, x)), dim=-1)


class TextTower(nn.Module):
    def __init__(self, vocab_size, d):
        super().__init__()
        self.emb = nn.Embedding(vocab_size, d, padding_idx=0)
        self.score = nn.Linear(d, 1)
        self.proj = nn.Linear(d, d)

    def forward(self, tokens):
        """tokens (B, L) 0-padded -> (B, d) unit vectors (an empty query reads <unk>)."""
        tokens = tokens.clone()
        tokens[(tokens != 0).sum(1) == 0, 0] = text.UNK
        x = self.emb(tokens)
        w = torch.softmax(self.score(x).squeeze(-1).masked_fill(tokens == 0, float("-inf")), 1)
        return F.normalize(self.proj(torch.einsum("bl,bld->bd", w, x)), dim=-1)


def contrastive_loss(text, image, qi, logit_scale):
    """text, image (B, d) unit vectors, row i a positive pair; qi (B,) query index."""
    logits = logit_scale.exp() * text @ image.t()                         # (B, B)
    same = (qi[:, None] == qi[None, :]) & ~torch.eye(len(qi), dtype=torch.bool)
    logits = logits.masked_fill(same, float("-inf"))
    target = torch.arange(len(qi))
    return (F.cross_entropy(logits, target) + F.cross_entropy(logits.t(), target)) / 2


@torch.no_grad()
def predict(text_tower, image_tower, cset):
    """{qid: [(pid, score), ...]} of every candidate of ``cset``."""
    text_tower.eval(), image_tower.eval()
    image = torch.empty(len(cset.pids), text_tower.proj.out_features)
    for b in cset.product_batches(512):
        image[b["index"]] = image_tower(b["boxes"], b["feats"], b["mask"])
    tokens, _ = utils.pad_tokens(cset.tokens)
    text = text_tower(tokens)                                             # (Q, d)
    scores = (text[torch.from_numpy(cset.pos)] * image).sum(1)
    text_tower.train(), image_tower.train()
    return cset.predictions(scores.numpy())


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", required=True)
    p.add_argument("--info", required=True)
    p.add_argument("--packed", help="packed train products (default: DATA/features .npz)")
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--epochs", type=int, default=6)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", help="also write the figures here")
    p.add_argument("--pred-dir", help="also write {valid,test}_pred_two_tower.json here, "
                                      "for experiments/compare.py")
    return p.parse_args(argv)


def main(argv=None):
    a = parse_args(argv)
    t0 = time.time()
    torch.manual_seed(a.seed)
    queries, vocab = utils.load_info(a.info)
    store = utils.PackedStore(a.packed) if a.packed else \
        utils.ProductStore(os.path.join(a.data, "features"))
    dataset = utils.PairDataset(queries, vocab, store, seed=a.seed)
    loader = torch.utils.data.DataLoader(dataset, a.batch_size, shuffle=True, drop_last=True,
                                         collate_fn=utils.collate_pairs)
    image_tower, text_tower = ImageTower(tsv.FEAT_DIM, a.dim), TextTower(len(vocab), a.dim)
    logit_scale = nn.Parameter(torch.tensor(np.log(1 / 0.07), dtype=torch.float32))
    params = list(image_tower.parameters()) + list(text_tower.parameters()) + [logit_scale]
    opt = torch.optim.AdamW(params, lr=a.lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, a.lr, total_steps=a.epochs * len(loader))
    for epoch in range(a.epochs):
        total = 0.0
        for b in loader:
            loss = contrastive_loss(text_tower(b["q_tokens"]),
                                    image_tower(b["p_boxes"], b["p_feats"], b["p_mask"]),
                                    b["qi"], logit_scale)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            with torch.no_grad():
                logit_scale.clamp_(0, np.log(100))
            total += loss.item()
        print("epoch %d  loss %.4f  %.0f s" % (epoch + 1, total / len(loader), time.time() - t0))
    result = {"train_s": round(time.time() - t0, 1)}
    for split in ("valid", "testB"):
        path, ans = os.path.join(a.data, split, split + ".tsv"), \
            os.path.join(a.data, split, split + "_answer.json")
        cset = utils.CandidateSet.from_tsv(path, vocab)
        preds = predict(text_tower, image_tower, cset)
        result[split] = round(metric.ndcg_at_k(preds, metric.load_answers(ans, cset.products())), 4)
        if a.pred_dir:
            metric.write_predictions(preds, os.path.join(
                a.pred_dir, "%s_pred_two_tower.json" % ("test" if split == "testB" else split)))
    result["wall_s"] = round(time.time() - t0, 1)
    print("two-tower  valid %.4f  testB %.4f  (train %.0f s, wall %.0f s)"
          % (result["valid"], result["testB"], result["train_s"], result["wall_s"]))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(result, f)
    return result


if __name__ == "__main__":
    main()
