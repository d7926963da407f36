"""Search the saved catalogue with your own words.

    python catalogue/search.py --index runs/index "red floral dress" "black jeans" \
        [--queries FILE] [--k 10] [--json] [--ckpt CKPT] [--data DATA] \
        [--rerank runs/prediction_result/ensemble.json [--member NAME=CKPT ...]]

Each query (English or Chinese: the project's tokenizer, jieba for Chinese) is encoded by
model3's text side alone and looked up in the index ``catalogue/index.py`` saved: the K best
products by inner product, each with its score, its detector classes, its box count and
the train queries it was a positive of. The checkpoint (``--ckpt``, default the one the
index names) must be the one the index was built from; ``--data`` also checks that the
index holds that data root's catalogue. A query none of whose words the model knows is not
searched: a notice names the unknown words, and the exit status is 1. ``--rerank``
re-ranks each query's K with the blend, as ``retrieve.py --rerank`` does for the gallery.
docs/retrieval.md.
"""
import argparse
import json
import os
import sys

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import runtime  # noqa: E402
from catalogue import query, saved_index  # noqa: E402
from errors import DataError  # noqa: E402

SHOWN_QUERIES = 3  # train queries printed per product (--json gives them all)


def read_queries(path):
    """One query per line; blank lines are skipped."""
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except FileNotFoundError:
        raise DataError("%s: not found" % path) from None
    except UnicodeDecodeError as e:
        raise DataError("%s: not UTF-8 (%s)" % (path, e.reason)) from None
    return [t.strip() for t in lines if t.strip()]


def search(saved, model, vocab, texts, k):
    """texts -> ({i: [(pid, score), ...]} of the texts with a known word, best first,
    {i: (known words, unknown words)} of every text)."""
    words = {i: query.split_known(vocab, t) for i, t in enumerate(texts)}
    found = [i for i in words if words[i][0]]
    if not found:
        return {}, words
    query.check_k(k, saved.index.ntotal)
    vectors = query.encode_texts(model, vocab, [texts[i] for i in found]).numpy()
    scores, rows = saved.index.search(vectors, k)
    short = (rows < 0).any(1)
    if short.any():  # an HNSW index can leave a list short: those come from the exact search
        exact = vectors[short] @ saved.vectors().T
        rows[short] = np.argsort(-exact, 1, kind="stable")[:, :k]
        scores[short] = np.take_along_axis(exact, rows[short], 1)
    ranked = {i: [(int(saved.pids[r]), float(s)) for s, r in zip(ss, rr)]
              for i, ss, rr in zip(found, scores.tolist(), rows.tolist())}
    return ranked, words


def rerank_ranked(a, saved, ranked, texts):
    """--rerank: each query's K re-ranked by the blend (``retrieve.rerank_splits``), its
    products read again from where the index read them."""
    from catalogue import rerank, retrieve  # the blend's members: loaded only when asked for
    blend = rerank.load_blend(a.rerank, torch.device("cpu"), a.member)
    store, gallery = saved.manifest["store"], saved.manifest["catalogue"]["gallery"]
    if not store:  # train was read from its TSV (or is not in the gallery): rows, like the rest
        store, gallery = dict(store=None, features=None, packed=None), \
            [g for g in gallery if g != "train"]
    options = argparse.Namespace(rerank_chunk=a.rerank_chunk, data=None, **store)
    return retrieve.rerank_splits(
        options, {}, blend, gallery=gallery,
        lines=saved.lines(), results={"search": ranked},
        texts={"search": {i: texts[i] for i in ranked}})["search"]


def notice(known, unknown):
    """Why a query was not searched, or None."""
    if known:
        return None
    if not unknown:
        return "no word to search by (only stop words or punctuation)"
    return "no word of it is known to the model (unknown: %s); not searched" % ", ".join(unknown)


def report(saved, texts, words, retrieval, reranked=None):
    """-> one dict per query: query, words, unknown, notice, results [{rank, product_id,
    score, boxes, classes, train_queries}, ...] (None if not searched); re-ranked, the score
    is the blend's and ``retrieval_score`` model3's."""
    out = []
    for i, text in enumerate(texts):
        known, unknown = words[i]
        results = None
        if i in retrieval:
            first = dict(retrieval[i])
            results = [{"rank": r + 1, "score": s, **saved.describe(saved.row(p)),
                        **({"retrieval_score": first[p]} if reranked else {})}
                       for r, (p, s) in enumerate((reranked or retrieval)[i])]
        out.append({"query": text, "words": known, "unknown": unknown,
                    "notice": notice(known, unknown), "results": results})
    return out


def show(entry):
    """A query's entry -> the lines printed for it."""
    lines = ["query: %s" % entry["query"]]
    if entry["notice"]:
        return lines + ["  %s" % entry["notice"]]
    if entry["unknown"]:
        lines.append("  unknown words, ignored: %s" % ", ".join(entry["unknown"]))
    for r in entry["results"]:
        classes = ", ".join(n if c == 1 else "%s x%d" % (n, c) for n, c in r["classes"])
        trained = r["train_queries"]
        seen = "; ".join(trained[:SHOWN_QUERIES]) + (
            " (+%d more)" % (len(trained) - SHOWN_QUERIES) if len(trained) > SHOWN_QUERIES else "")
        lines.append("  %2d. product %d  score %.4f  %d box%s: %s  |  train queries: %s"
                     % (r["rank"], r["product_id"], r["score"], r["boxes"],
                        "" if r["boxes"] == 1 else "es", classes, seen or "none"))
    return lines


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("queries", nargs="*", metavar="QUERY", help="query texts")
    p.add_argument("--queries", dest="queries_file", metavar="FILE",
                   help="a file of queries, one per line")
    p.add_argument("--index", default=os.path.join("runs", "index"),
                   help="the folder catalogue/index.py wrote")
    p.add_argument("--k", type=int, default=10, help="products per query")
    p.add_argument("--json", action="store_true", help="print one JSON list of the queries")
    p.add_argument("--ckpt", help="model3 checkpoint (default: the one the index was built "
                                  "from); refused unless it is that one")
    p.add_argument("--export", help="encoder export (default: the checkpoint's)")
    p.add_argument("--data", help="check that the index holds this data root's catalogue")
    r = p.add_argument_group("re-ranking")
    r.add_argument("--rerank", metavar="ENSEMBLE_JSON",
                   help="re-rank each query's K by the blend ensemble.py recorded (see "
                        "retrieve.py --rerank)")
    r.add_argument("--member", action="append", default=[], metavar="MEMBER=PATH",
                   help="a member's checkpoint, e.g. model1=runs/model1/last.pt (repeatable)")
    r.add_argument("--rerank-chunk", type=int, default=32, help="queries re-ranked at once")
    a = p.parse_args(argv)
    if not a.queries and not a.queries_file:
        p.error("give at least one QUERY or --queries FILE")
    return a


def main(argv=None):
    """-> the exit status: 1 when a query was not searched, else 0."""
    a = parse_args(argv)
    texts = a.queries + (read_queries(a.queries_file) if a.queries_file else [])
    saved = saved_index.SavedIndex(a.index)
    ckpt = a.ckpt or saved.manifest["checkpoint"]["path"]
    saved.check_checkpoint(ckpt)
    if a.data:
        saved.check_catalogue(a.data)
    model, vocab, _ = query.load_query_encoder(ckpt, a.export)
    retrieval, words = search(saved, model, vocab, texts, a.k)
    reranked = rerank_ranked(a, saved, retrieval, texts) if a.rerank and retrieval else None
    entries = report(saved, texts, words, retrieval, reranked)
    if a.json:
        print(json.dumps(entries, ensure_ascii=False, indent=1))
    else:
        print("\n".join(line for e in entries for line in show(e)))
    return 1 if any(e["notice"] for e in entries) else 0


if __name__ == "__main__":
    runtime.cli(lambda: sys.exit(main()))
