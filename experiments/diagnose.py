"""Why does a world learn little? Five measurements of a pretrained encoder on a synthetic world.

1. the scale of the raw region features entering the first Linear;
2. pretraining's valid NDCG@5 epoch by epoch (from its log.jsonl);
3. per-word average precision of the multi-label head on the valid positives, by word kind
   (category, attribute, filler);
4. a linear probe of the frozen trunk's pooled output for the colour a query names, beside
   the same probe on the raw features (what the trunk could have kept);
5. how often the hard-negative sampler's negative query differs from the query by exactly
   one attribute word (what the candidate lists of the hard world are made of), with the
   published draw and with ``--p-near 0.5``.

    python experiments/diagnose.py --data DATA --info runs/info --packed runs/packed \
        --ckpt runs/multilabel/best.pt
Word kinds come from the generator's tables, so this reads synthetic worlds only.
"""
import argparse
import json
import os
import sys

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import sampler  # noqa: E402
import synthetic  # noqa: E402
import utils  # noqa: E402
from multilabel.model import word_logits  # noqa: E402
from multilabel.validation import load_pretrainer  # noqa: E402
from text import tokenize  # noqa: E402


def word_kinds(lang):
    """{token: "category" | "attribute:<slot>" | "filler"} in the tokenizer's own tokens."""
    kinds = {}

    def add(word, kind):
        text = synthetic.ZH.get(word, word) if lang == "zh" else word
        for t in tokenize(text):
            kinds.setdefault(t, kind)
    for c in list(synthetic.CATEGORIES) + [s for v in synthetic.SYNONYMS.values() for s in v]:
        add(c, "category")
    for slot, values in synthetic.ATTRIBUTES.items():
        for v in values:
            add(v, "attribute:" + slot)
    for f in synthetic.FILLERS:
        add(f, "filler")
    return kinds


def feature_scale(store, pids):
    f = np.concatenate([store.get(int(p))[1] for p in pids])
    norms = np.linalg.norm(f, axis=1)
    return {"regions": len(f), "zeros": float((f == 0).mean()), "mean": float(f.mean()),
            "std": float(f.std()), "p99": float(np.quantile(f, 0.99)), "max": float(f.max()),
            "region_norm_mean": float(norms.mean()), "region_norm_cv": float(norms.std() / norms.mean())}


def average_precision(scores, labels):
    order = np.argsort(-scores, kind="stable")
    hits = labels[order]
    if hits.sum() == 0:
        return None
    precision = np.cumsum(hits) / np.arange(1, len(hits) + 1)
    return float((precision * hits).sum() / hits.sum())


@torch.no_grad()
def encode(model, store, pids, batch=256):
    """-> heads (P, 5, E), trunk attention-pooled (P, d), raw sqrt mean-pooled (P, F)."""
    heads, pooled, raw = [], [], []
    enc = model.encoder
    for s in range(0, len(pids), batch):
        items = [store.get(int(p)) for p in pids[s:s + batch]]
        boxes, feats, mask = utils.pad_regions([(b, f) for b, f, _ in items])
        x = enc.trunk(boxes, feats, mask)
        pooled.append(enc.pool(x, mask))
        heads.append(enc.out(pooled[-1]).view(len(x), enc.config["n_out"], -1))
        raw.append(torch.stack([torch.from_numpy(np.sqrt(np.maximum(f, 0)).mean(0))
                                for _, f, _ in items]))
    return torch.cat(heads), torch.cat(pooled).numpy(), torch.cat(raw).numpy()


def word_ap(model, heads, tokens_of_product, vocab, kinds):
    logits = word_logits(heads, model.word_emb.weight).detach().numpy()   # (P, V)
    by_kind = {}
    for w, k in kinds.items():
        i = vocab.stoi.get(w)
        if i is None:
            continue
        labels = np.array([i in t for t in tokens_of_product], float)
        ap = average_precision(logits[:, i], labels)
        if ap is not None:
            by_kind.setdefault(k.split(":")[0], []).append(ap)
    return {k: round(float(np.mean(v)), 4) for k, v in sorted(by_kind.items())}


def colour_of(tokens, colour_ids):
    named = [t for t in tokens if t in colour_ids]
    return named[0] if len(named) == 1 else None


def probe(x_train, y_train, x_test, y_test):
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler
    sc = StandardScaler().fit(x_train)
    clf = LogisticRegression(max_iter=2000, C=1.0).fit(sc.transform(x_train), y_train)
    return round(float(clf.score(sc.transform(x_test), y_test)), 4)


def negative_kinds(queries, kinds, p_near=0.0, n=3000, seed=0):
    """Shares of sampled negative queries: one attribute changed, same head, other."""
    negatives = sampler.NegativeSampler(queries, 0.8, "cluster", p_near)
    rng = np.random.default_rng(seed)
    tokens = [list(t) for t in queries["tokens"]]
    counts = {"one_attribute_changed": 0, "same_head_other": 0, "other_head": 0}
    for qi in rng.integers(len(tokens), size=n):
        a, b = tokens[qi], tokens[negatives.negative_query(qi, rng)]
        if not a or not b or a[-1] != b[-1]:
            counts["other_head"] += 1
            continue
        strip = [[t for t in ts if kinds.get(t, "").startswith(("attribute", "category"))]
                 for ts in (a, b)]
        diff = set(strip[0]) ^ set(strip[1])
        one = len(strip[0]) == len(strip[1]) and len(diff) == 2 and \
            len({kinds[t] for t in diff}) == 1
        counts["one_attribute_changed" if one else "same_head_other"] += 1
    return {k: round(v / n, 4) for k, v in counts.items()}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", required=True)
    p.add_argument("--info", required=True)
    p.add_argument("--packed", required=True)
    p.add_argument("--ckpt", required=True, help="multilabel best.pt")
    p.add_argument("--lang", default="en", choices=["en", "zh"])
    p.add_argument("--probe-products", type=int, default=4000)
    a = p.parse_args(argv)
    torch.manual_seed(0)
    queries, vocab = utils.load_info(a.info)
    store = utils.PackedStore(a.packed)
    model, _, _ = load_pretrainer(a.ckpt)
    model.eval()
    kinds = word_kinds(a.lang)
    out = {}
    prods = utils.ragged_parts(queries["products"])
    rng = np.random.default_rng(0)
    pick = rng.choice(len(prods[0]), min(a.probe_products, len(prods[0])), replace=False)
    out["feature_scale"] = feature_scale(store, prods[0][pick[:300]])
    with open(os.path.join(os.path.dirname(a.ckpt), "log.jsonl")) as f:
        out["pretrain_valid_ndcg5"] = [round(json.loads(line).get("valid_ndcg5", float("nan")), 4)
                                       for line in f]
    # valid positives: products whose labels (their query's words) are known
    cset = utils.CandidateSet.from_tsv(os.path.join(a.data, "valid", "valid.tsv"), vocab)
    with open(os.path.join(a.data, "valid", "valid_answer.json")) as f:
        answers = {int(q): set(v) for q, v in json.load(f).items()}
    pos = np.array([pid in answers[int(cset.qids[k])] for pid, k in zip(cset.pids, cset.pos)])
    valid_store = _CandidateStore(cset)
    v_heads, v_pooled, v_raw = encode(model, valid_store, np.flatnonzero(pos))
    v_tokens = [set(cset.tokens[cset.pos[i]]) for i in np.flatnonzero(pos)]
    out["word_ap"] = word_ap(model, v_heads, v_tokens, vocab, kinds)
    # probe: the colour a single-colour query names, train products -> valid positives
    colour_ids = {vocab.stoi[w] for w, k in kinds.items() if k == "attribute:colour" and w in vocab.stoi}
    q_of = np.repeat(np.arange(len(prods[1]) - 1), np.diff(prods[1]))
    t_tokens = [vocab.encode(list(queries["tokens"][q])) for q in q_of[pick]]
    y_tr = np.array([colour_of(t, colour_ids) or -1 for t in t_tokens])
    y_te = np.array([colour_of(t, colour_ids) or -1 for t in v_tokens])
    _, t_pooled, t_raw = encode(model, store, prods[0][pick])
    tr, te = y_tr >= 0, y_te >= 0
    out["colour_probe"] = {
        "classes": len(set(y_tr[tr])), "train": int(tr.sum()), "test": int(te.sum()),
        "trunk_pooled": probe(t_pooled[tr], y_tr[tr], v_pooled[te], y_te[te]),
        "raw_sqrt_mean": probe(t_raw[tr], y_tr[tr], v_raw[te], y_te[te])}
    out["negatives"] = {"p_near %g" % p: negative_kinds(queries, kinds, p) for p in (0.0, 0.5)}
    print(json.dumps(out, indent=1))
    return out


class _CandidateStore:
    """ProductStore.get over a CandidateSet's rows, by position in ``cset.pids``."""

    def __init__(self, cset):
        self.cset = cset

    def get(self, k):
        a, b = self.cset.box_off[k], self.cset.box_off[k + 1]
        return self.cset.boxes[a:b], self.cset.feats[a:b], None


if __name__ == "__main__":
    main()
