"""Full-gallery retrieval with model3: every query against every product of the data root.

    python catalogue/retrieve.py --ckpt runs/model3/best.pt --split valid --split testB \
        --k 100 --out runs/retrieval [--data DATA] [--index exact|faiss|hnsw] \
        [--rerank runs/prediction_result/ensemble.json [--member NAME=CKPT ...]]

The gallery is every product of train (read from the checkpoint's product store) and of
the candidate splits (streamed from their TSV), each encoded once, in batches, keeping only
its vector. ``--data`` another data root than the checkpoint's: the whole gallery comes
from that root, train streamed from its train/train.tsv (one world per command). Each
query's K best products by dot product: exact by default (chunked matmul with a running top
K, ties by product id), or through faiss (``faiss``: IndexFlatIP, exact; ``hnsw``:
IndexHNSWFlat, approximate; a query whose K it cannot fill gets the exact K). Writes
OUT/valid_gallery_model3.json and OUT/test_gallery_model3.json (testB),
{"<query_id>": [["<product_id>", score], ...]}, K entries best first; prints Recall@10, Recall@100 and NDCG@5 where the split has
``<split>_gallery_answer.json`` (generated worlds), and writes them to
OUT/gallery_metrics.json ({split: {metric: value}}). The files of one run are one set: those
of an earlier run that this one does not write (another split, no --rerank, no gallery
answers) are removed. With ``--rerank ENSEMBLE_JSON``, each
query's K are then re-ranked by the blend ensemble.py recorded (``catalogue/rerank.py``) and
written to OUT/{valid,test}_gallery_rerank.json, the metrics printed beside retrieval's.
docs/retrieval.md.
"""
import argparse
import functools
import os
import sys
import time

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import engine  # noqa: E402
import matching  # noqa: E402
import metric  # noqa: E402
import runtime  # noqa: E402
import tsv  # noqa: E402
import utils  # noqa: E402
from catalogue import rerank  # noqa: E402
from catalogue.query import check_k, encode_texts  # noqa: E402
from errors import DataError  # noqa: E402
from model3.model import build_model  # noqa: E402

CANDIDATE_SPLITS = ("valid", "testA", "testB")
RECALL_AT = (10, 100)
LOW32 = (1 << 32) - 1


# --------------------------------------------------------------------------------------
# Exact top K
# --------------------------------------------------------------------------------------
def order_keys(scores, first):
    """scores (Q, C) of gallery rows first..first+C-1 -> int64 keys (Q, C), one per pair,
    all distinct, ordered as (score descending, row ascending): the largest keys are the
    best rows, ties going to the lower row. The float bits are made to order as integers
    (negative floats flip their magnitude bits) and the row fills the low 32 bits."""
    bits = (scores.float() + 0.0).contiguous().view(torch.int32).long()  # + 0.0: no -0.0
    bits = torch.where(bits < 0, bits ^ 0x7FFFFFFF, bits)
    rows = torch.arange(first, first + scores.shape[1], dtype=torch.int64, device=scores.device)
    return (bits << 32) | (LOW32 - rows)


@torch.no_grad()
def exact_search(queries, gallery, k, chunk=16384):
    """queries (Q, D), gallery (P, D) -> (scores (Q, k), rows (Q, k)): each query's k
    largest dot products, best first, ties by the lower gallery row; the gallery is scored
    ``chunk`` rows at a time (moved to the queries' device) against a running top k, so
    memory is Q x (k + chunk)."""
    check_k(k, len(gallery))
    keys = torch.empty(len(queries), 0, dtype=torch.int64, device=queries.device)
    scores = torch.empty(len(queries), 0, device=queries.device)
    for s in range(0, len(gallery), chunk):
        sims = (queries @ gallery[s:s + chunk].to(queries.device).t()).float()
        keys = torch.cat([keys, order_keys(sims, s)], 1)
        scores = torch.cat([scores, sims], 1)
        top = keys.topk(min(k, keys.shape[1]), dim=1).indices
        keys, scores = keys.gather(1, top), scores.gather(1, top)
    return scores, LOW32 - (keys & LOW32)


# HNSW: links per node, and the candidate lists of building and of searching, as measured
# at a million products in bench/README.md (section 6)
HNSW_M, HNSW_EF_CONSTRUCTION, HNSW_EF_SEARCH = 32, 128, 160


def faiss_index(dim, hnsw=False):
    """An empty IndexFlatIP, or with ``hnsw`` an IndexHNSWFlat with the settings above
    (faiss searches with max(efSearch, K))."""
    try:
        import faiss
    except ImportError:
        raise DataError("--index faiss/hnsw needs faiss: pip install faiss-cpu") from None
    if not hnsw:
        return faiss.IndexFlatIP(dim)
    index = faiss.IndexHNSWFlat(dim, HNSW_M, faiss.METRIC_INNER_PRODUCT)
    index.hnsw.efConstruction, index.hnsw.efSearch = HNSW_EF_CONSTRUCTION, HNSW_EF_SEARCH
    return index


def faiss_search(queries, gallery, k, hnsw=False):
    """The same through faiss: IndexFlatIP (exact; ties in faiss's order) or, with ``hnsw``,
    IndexHNSWFlat (approximate). HNSW leaves a list short (rows of -1) when its graph walk
    reaches fewer than K products, as when K nears the gallery's size: such a query gets
    the exact K instead, so every list holds K."""
    check_k(k, len(gallery))
    g = np.ascontiguousarray(gallery.cpu().numpy(), np.float32)
    index = faiss_index(g.shape[1], hnsw)
    index.add(g)
    queries = queries.cpu()
    scores, rows = index.search(np.ascontiguousarray(queries.numpy(), np.float32), k)
    scores, rows = torch.from_numpy(scores), torch.from_numpy(rows)
    short = (rows < 0).any(1).nonzero()[:, 0]
    if len(short):
        utils.log.info("hnsw: %d of %d queries found fewer than %d products; their lists come "
                       "from the exact search", len(short), len(rows), k)
        scores[short], rows[short] = exact_search(queries[short], gallery, k)
    return scores, rows


# --------------------------------------------------------------------------------------
# The gallery and the queries
# --------------------------------------------------------------------------------------
def split_rows(path, max_boxes=None, lines=None):
    """Yield (pid, boxes (n, 5), feats (n, D)) of every row of a candidate TSV, one at a
    time (a split's regions never sit in memory together); a bad row is a DataError.
    ``lines``, a dict, gets {pid: (path, byte offset)} of the rows, to read them again."""
    for line, (offset, text) in enumerate(tsv.iter_lines(path), start=2):
        try:
            if text is None:
                raise ValueError("truncated last line")
            if isinstance(text, Exception):
                raise text
            row = tsv.parse_row(text)
        except ValueError as e:
            raise DataError("%s:%d: %s" % (path, line, e)) from None
        boxes, feats, _ = utils.row_regions(row, max_boxes)
        if lines is not None:
            lines.setdefault(row["product_id"], (path, offset))
        yield row["product_id"], boxes, feats


def store_rows(store, pids):
    """Yield (pid, boxes, feats) of ``pids`` from a product store."""
    for pid in pids:
        boxes, feats, _ = store.get(pid)
        yield int(pid), boxes, feats


def gallery_rows(sources):
    """Chain the sources, each product once (the first time it comes)."""
    seen = set()
    for rows in sources:
        for pid, boxes, feats in rows:
            if pid not in seen:
                seen.add(pid)
                yield pid, boxes, feats


@torch.no_grad()
def encode_gallery(model, rows, batch_size=256, sort_window=16):
    """(pid, boxes, feats) rows -> (pids (P,) ascending, vectors (P, D) on the CPU).

    ``batch_size * sort_window`` rows are read at a time and batched fewest boxes first,
    so a batch pads little; only the vectors are kept.
    """
    pids, vecs, window = [], [], []

    def flush():
        window.sort(key=lambda r: len(r[1]))
        for s in range(0, len(window), batch_size):
            part = window[s:s + batch_size]
            boxes, feats, mask = utils.pad_regions([(b, f) for _, b, f in part])
            vecs.append(model.encode_product_batch(dict(boxes=boxes, feats=feats, mask=mask))
                        .float().cpu())
            pids.extend(p for p, _, _ in part)
        window.clear()

    for row in rows:
        window.append(row)
        if len(window) == batch_size * sort_window:
            flush()
    flush()
    if not pids:
        raise DataError("the gallery is empty")
    order = np.argsort(np.asarray(pids, np.int64), kind="stable")
    return np.asarray(pids, np.int64)[order], torch.cat(vecs)[torch.from_numpy(order)]


def rankings(qids, pids, scores, rows):
    """-> {qid: [(pid, score), ...]} best first."""
    return {int(q): [(int(pids[j]), v) for v, j in zip(s, r)]
            for q, s, r in zip(qids, scores.tolist(), rows.tolist())}


def gallery_metrics(preds, answers, k):
    """Recall@10, Recall@100 (those within K) and NDCG@5 of full-gallery rankings."""
    out = {"recall@%d" % n: metric.recall_at_k(preds, answers, n) for n in RECALL_AT if n <= k}
    out["ndcg@5"] = metric.ndcg_at_k(preds, answers)
    return out


# --------------------------------------------------------------------------------------
# The command
# --------------------------------------------------------------------------------------
def add_gallery_args(p):
    """The flags that say which products form the gallery and where they are read (each
    defaults to the checkpoint's); ``index.py`` takes them too."""
    p.add_argument("--data", help="data root (default: the checkpoint's)")
    p.add_argument("--gallery", action="append", choices=("train",) + CANDIDATE_SPLITS,
                   help="splits whose products form the gallery (repeatable; default train "
                        "and every candidate split the data root has)")
    p.add_argument("--store", choices=["npz", "packed"],
                   help="where the train products are read (default: the checkpoint's)")
    p.add_argument("--features", help="per-product .npz folder (default: the checkpoint's)")
    p.add_argument("--packed", help="packed store folder (default: the checkpoint's)")
    p.add_argument("--info", help="info/ folder, for the train products (default: the "
                                  "checkpoint's)")
    p.add_argument("--export", help="encoder export (default: the checkpoint's)")
    p.add_argument("--batch-size", type=runtime.bounded(low=1, why="the products encoded at "
                                                                "once"), default=256,
                   help="products encoded at once")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--ckpt", required=True, help="best.pt or last.pt of model3/train.py")
    p.add_argument("--split", action="append", choices=CANDIDATE_SPLITS,
                   help="queries to retrieve for (repeatable; default valid and testB)")
    p.add_argument("--k", type=runtime.bounded(low=1, why="the products listed per query"),
                   default=100, help="products per query")
    p.add_argument("--out", default="retrieval", help="output folder")
    p.add_argument("--index", default="exact", choices=["exact", "faiss", "hnsw"],
                   help="exact: chunked matmul; faiss: IndexFlatIP; hnsw: IndexHNSWFlat")
    add_gallery_args(p)
    r = p.add_argument_group("re-ranking")
    r.add_argument("--rerank", metavar="ENSEMBLE_JSON",
                   help="re-rank each query's K products with the blend ensemble.py recorded "
                        "there (members, normalisation, weights); writes "
                        "{valid,test}_gallery_rerank.json too. A member's checkpoint is "
                        "RUN/<member>/best.pt, RUN the parent of the folder holding "
                        "ENSEMBLE_JSON, unless --member names it")
    r.add_argument("--member", action="append", default=[], metavar="MEMBER=PATH",
                   help="a member's checkpoint, e.g. model1=runs/model1/last.pt (repeatable)")
    r.add_argument("--rerank-chunk", type=runtime.bounded(low=1, why="the queries re-ranked "
                                                                  "at once"), default=32,
                   help="queries re-ranked at once (their K products' regions in memory)")
    return p.parse_args(argv)


def store_options(a, ck_args, max_boxes):
    """The train product store the options name, each defaulting to the checkpoint's."""
    return argparse.Namespace(store=a.store or ck_args["store"],
                              features=a.features or ck_args["features"],
                              packed=a.packed or ck_args.get("packed"), max_boxes=max_boxes)


def gallery_splits(a, data):
    """--gallery, or train and every candidate split the data root has."""
    return a.gallery or ["train"] + [s for s in CANDIDATE_SPLITS
                                     if os.path.exists(engine.split_paths(data, s)[0])]


def train_from_tsv(a, ck_args):
    """Whether the train products come from DATA/train/train.tsv: when --data names another
    data root than the checkpoint's, whose store would be another world's. The store's
    options then name nothing of this world and are refused."""
    if not a.data or os.path.abspath(a.data) == os.path.abspath(ck_args["data"]):
        return False
    given = [f for f in ("store", "features", "packed", "info") if getattr(a, f, None)]
    if given:
        raise DataError("--%s names the train store of the checkpoint's data root %s; "
                        "with --data %s the whole gallery comes from %s, train from its "
                        "train/train.tsv: leave --%s out" % (
                            given[0], ck_args["data"], a.data, a.data, given[0]))
    return True


def product_sources(a, ck_args, splits, lines=None):
    """The row sources of the gallery splits: train from the store the options name (each
    defaults to the checkpoint's) or, with ``train_from_tsv``, from its TSV as the candidate
    splits (``lines`` gets where each TSV row lies, see ``split_rows``). Every file is
    checked here, before any product is read."""
    data, max_boxes = a.data or ck_args["data"], ck_args.get("max_boxes")
    sources = []
    for split in splits:
        if split == "train" and not train_from_tsv(a, ck_args):
            queries, _ = utils.load_info(a.info or ck_args["info"])
            pids = np.unique(utils.ragged_parts(queries["products"])[0])
            sources.append(store_rows(engine.build_store(store_options(a, ck_args, max_boxes)),
                                      pids))
        else:
            sources.append(split_rows(engine.split_tsv(data, split), max_boxes, lines))
    return sources


def retrieve(model, vocab, *, data, splits, sources, k, index="exact", batch_size=256):
    """Encode the gallery once, then each split's queries -> ({split: rankings},
    {split: {qid: query text}}, number of products). The queries are read first: a bad
    split fails before the gallery is encoded."""
    texts = {}
    for split in splits:
        cands = tsv.read_candidates(engine.split_tsv(data, split), with_arrays=False)
        texts[split] = {q: cands[q]["query"] for q in sorted(cands)}
    t, device = time.time(), next(model.parameters()).device
    pids, gallery = encode_gallery(model, gallery_rows(sources), batch_size)
    utils.log.info("gallery: %d products encoded in %.0f s", len(pids), time.time() - t)
    results = {}
    for split in splits:
        qids = list(texts[split])
        queries = encode_texts(model, vocab, list(texts[split].values())).to(device)
        if index == "exact":
            scores, rows = exact_search(queries, gallery, k)
        else:
            scores, rows = faiss_search(queries, gallery, k, hnsw=index == "hnsw")
        results[split] = rankings(qids, pids, scores, rows)
    return results, texts, len(pids)


def gallery_file(split, name):
    """The file of a split's lists: ``name`` is model3 (retrieved) or rerank."""
    return "%s_gallery_%s.json" % ({"testB": "test"}.get(split, split), name)


# every file a run may write in --out: one set, each run's replacing the last one's
OUTPUTS = [gallery_file(s, n) for s in CANDIDATE_SPLITS for n in ("model3", "rerank")] \
    + ["gallery_metrics.json"]


def split_metrics(data, split, preds, k):
    """``gallery_metrics`` where the split has ``<split>_gallery_answer.json``, else {}."""
    answers = os.path.join(data, split, split + "_gallery_answer.json")
    if not os.path.exists(answers):
        return {}
    return gallery_metrics(preds, metric.load_answers(answers), k)


def rerank_splits(a, ck_args, blend, *, gallery, lines, results, texts):
    """--rerank: every split's retrieved K re-ranked by the blend (``rerank.load_blend``)
    -> {split: rankings}; the products are read again from where the gallery read them."""
    store = (engine.build_store(store_options(a, ck_args, blend["max_boxes"]))
             if "train" in gallery and not train_from_tsv(a, ck_args) else None)
    get = rerank.GalleryProducts(store, lines, blend["max_boxes"]).get
    out = {}
    for split, retrieved in results.items():
        t = time.time()
        out[split] = rerank.rerank(retrieved, texts[split], scorers=blend["scorers"],
                                   weights=blend["weights"], how=blend["how"],
                                   vocab=blend["vocab"], get=get, chunk=a.rerank_chunk)
        utils.log.info("%s: %d queries re-ranked in %.0f s", split, len(retrieved),
                       time.time() - t)
    return out


def main(argv=None):
    a = parse_args(argv)
    runtime.setup_logging()
    runtime.check_writable(a.out)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    # everything that can be checked is, before the gallery is encoded: the output folder,
    # the blend and its members, the checkpoint, every split and the gallery's files
    blend = rerank.load_blend(a.rerank, device, a.member) if a.rerank else None
    model, vocab, ck = matching.load_trained(build_model, a.ckpt, a.export)
    model.to(device).eval()
    data = a.data or ck["args"]["data"]
    splits = a.split or ["valid", "testB"]
    gallery = gallery_splits(a, data)
    lines = {}
    sources = product_sources(a, ck["args"], gallery, lines)
    results, texts, n = retrieve(model, vocab, data=data, splits=splits, k=a.k, index=a.index,
                                 sources=sources, batch_size=a.batch_size)
    # output name -> (rankings, what the printed line says, prefix of its metrics)
    outputs = {"model3": (results, "top %d of %d products" % (a.k, n), "")}
    if blend:
        outputs["rerank"] = (rerank_splits(a, ck["args"], blend, gallery=gallery, lines=lines,
                                           results=results, texts=texts),
                             "re-ranked by " + rerank.describe(blend), "rerank_")
    writers, printed, metrics = {}, [], {}
    for split in splits:
        for name, (preds, what, prefix) in outputs.items():
            fname = gallery_file(split, name)
            writers[fname] = functools.partial(metric.write_predictions, preds[split])
            m = split_metrics(data, split, preds[split], a.k)
            if m:
                metrics.setdefault(split, {}).update({prefix + k: v for k, v in m.items()})
            printed.append("%s: wrote %s (%d queries, %s)%s" % (
                split, os.path.join(a.out, fname), len(preds[split]), what,
                "".join("  %s %.4f" % kv for kv in m.items())))
    if metrics:  # for run.sh's summary
        writers["gallery_metrics.json"] = functools.partial(utils.atomic_json, metrics)
    # the files of an earlier run that this one does not write go: another run's lists or
    # figures beside this run's would pass for its own
    utils.write_together(a.out, writers, remove=OUTPUTS)
    print("\n".join(printed))
    return metrics


if __name__ == "__main__":
    runtime.cli(main)
