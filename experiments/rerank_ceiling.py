"""Re-ranking's ceiling: the blend of ensemble.json over every gallery product, against
model3's retrieval and retrieval + re-ranking, for the same queries.

    python experiments/rerank_ceiling.py --ckpt RUN/model3/best.pt \
        --ensemble RUN/prediction_result/ensemble.json [--split valid] [--queries 50] \
        [--k 100] [--out DIR] [--member NAME=CKPT ...]

The gallery is ``catalogue/retrieve.py``'s (train and every candidate split of the data root).
The first ``--queries`` queries of the split by id are ranked three ways: model3's top K
(``retrieve.retrieve``), that K re-ranked by the blend (``retrieve.rerank_splits``, what
``retrieve.py --rerank`` writes), and brute force: every gallery product scored by every
member of the blend and blended (``rerank.rerank`` on the whole gallery, one query at a
time), which is what re-ranking would reach if retrieval lost nothing. Prints Recall@10,
Recall@100 and NDCG@5 of each against ``<split>_gallery_answer.json`` (those queries only),
the ratio of each NDCG@5 to the brute force's, and the wall times; writes them to
OUT/ceiling.json and the brute force's top K to OUT/<split>_gallery_bruteforce.json.
"""
import argparse
import functools
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

import engine  # noqa: E402
import matching  # noqa: E402
import metric  # noqa: E402
import runtime  # noqa: E402
import utils  # noqa: E402
from bench.common import load, machine  # noqa: E402
from catalogue import rerank, retrieve  # noqa: E402
from model3.model import build_model  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--ckpt", required=True, help="model3's best.pt")
    p.add_argument("--ensemble", required=True, help="ensemble.json of ensemble.py")
    p.add_argument("--member", action="append", default=[], metavar="MEMBER=PATH",
                   help="a member's checkpoint, as retrieve.py --member")
    p.add_argument("--data", help="data root (default: the checkpoint's)")
    p.add_argument("--split", default="valid", help="the queries' split")
    p.add_argument("--queries", type=runtime.bounded(low=1, why="queries to re-rank"),
                   default=50, help="the first N queries of the split by id")
    p.add_argument("--k", type=runtime.bounded(low=1, why="products listed per query"),
                   default=100, help="products retrieved")
    p.add_argument("--rerank-chunk", type=runtime.bounded(low=1, why="queries re-ranked at "
                                                                  "once"), default=32,
                   help="queries re-ranked at once, as retrieve.py's")
    p.add_argument("--out", default="ceiling", help="output folder")
    # the train products from the checkpoint's store, as retrieve.py's defaults
    p.set_defaults(store=None, features=None, packed=None, info=None)
    return p.parse_args(argv)


def recorded(sources, pids):
    """The gallery's row sources, each row's product id added to the set ``pids`` as it
    passes (the gallery's products, for the brute force)."""
    for rows in sources:
        yield (row for row in rows if not pids.add(row[0]))


def brute_force(qids, texts, pids, *, blend, get):
    """Every product of ``pids`` for each query, scored by the blend's members and blended
    (``rerank.rerank``, one query at a time: one query's products' regions in memory) ->
    {qid: [(pid, blend), ...]} the whole gallery, best first, ties by product id."""
    everything = [(int(p), 0.0) for p in sorted(pids)]
    out, t = {}, time.time()
    for i, q in enumerate(qids, start=1):
        out.update(rerank.rerank({q: everything}, texts, scorers=blend["scorers"],
                                 weights=blend["weights"], how=blend["how"],
                                 vocab=blend["vocab"], get=get, chunk=1))
        utils.log.info("brute force: %d/%d queries x %d products, %.0f s", i, len(qids),
                       len(everything), time.time() - t)
    return out


def top_in_k(full, retrieved, n=5):
    """The share of the brute force's first ``n`` products that the retrieved K hold."""
    hits = sum(len({p for p, _ in full[q][:n]} & {p for p, _ in retrieved[q]})
               for q in retrieved)
    return hits / (n * len(retrieved))


def figures(rankings, answers, *, k):
    """{name: rankings} -> {name: gallery metrics + NDCG@5 / the brute force's}."""
    out = {name: retrieve.gallery_metrics(preds, answers, k) for name, preds in rankings.items()}
    brute = out["brute force"]["ndcg@5"]
    for m in out.values():
        m["ndcg@5 / brute force"] = m["ndcg@5"] / brute if brute else float("nan")
    return out


def main(argv=None):
    a = parse_args(argv)
    runtime.setup_logging()
    t0 = time.time()
    model, vocab, ck = matching.load_trained(build_model, a.ckpt)
    model.eval()
    blend = rerank.load_blend(a.ensemble, torch.device("cpu"), a.member)
    data = a.data or ck["args"]["data"]
    gallery = ["train"] + [s for s in retrieve.CANDIDATE_SPLITS
                           if os.path.exists(engine.split_paths(data, s)[0])]
    lines, pids = {}, set()
    sources = recorded(retrieve.product_sources(a, ck["args"], gallery, lines), pids)
    results, texts, _ = retrieve.retrieve(model, vocab, data=data, splits=[a.split],
                                          sources=sources, k=a.k)
    qids = sorted(results[a.split])[:a.queries]
    retrieved = {q: results[a.split][q] for q in qids}
    times = {"retrieval": time.time() - t0}
    t = time.time()
    reranked = retrieve.rerank_splits(a, ck["args"], blend, gallery=gallery, lines=lines,
                                      results={a.split: retrieved}, texts=texts)[a.split]
    times["re-ranking"], t = time.time() - t, time.time()
    store = engine.build_store(retrieve.store_options(a, ck["args"], blend["max_boxes"]))
    full = brute_force(qids, texts[a.split], pids, blend=blend,
                       get=rerank.GalleryProducts(store, lines, blend["max_boxes"]).get)
    times["brute force"] = time.time() - t
    answers = metric.load_answers(os.path.join(data, a.split, a.split + "_gallery_answer.json"))
    out = {"queries": len(qids), "gallery": len(pids), "blend": rerank.describe(blend),
           "seconds": times, "brute force top 5 within the K": top_in_k(full, retrieved),
           "figures": figures({"model3": retrieved, "re-ranked": reranked, "brute force": full},
                              {q: answers[q] for q in qids}, k=a.k)}
    utils.write_together(a.out, {
        "ceiling.json": functools.partial(utils.atomic_json, out),
        "%s_gallery_bruteforce.json" % a.split: functools.partial(
            metric.write_predictions, {q: v[:a.k] for q, v in full.items()})})
    print(machine() + "; " + load())
    print("%s: first %d queries by id, gallery of %d products, blend %s" % (
        a.split, len(qids), len(pids), out["blend"]))
    for name, m in out["figures"].items():
        print("%-12s" % name + "".join("  %s %.4f" % kv for kv in m.items()))
    print("brute force's top 5 within model3's K: %.3f" % out["brute force top 5 within the K"])
    print("seconds: " + ", ".join("%s %.0f" % kv for kv in times.items()))
    return out


if __name__ == "__main__":
    runtime.cli(main)
