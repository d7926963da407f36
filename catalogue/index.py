"""Encode the whole catalogue once with model3 and save it as an index for catalogue/search.py.

    python catalogue/index.py --ckpt runs/model3/best.pt --out runs/index [--data DATA] \
        [--index flat|hnsw] [--gallery SPLIT ...] [--no-progress]

The catalogue is retrieve.py's gallery (train from the checkpoint's product store, the
candidate splits from their TSV), encoded by retrieve.py's own functions. Then each
product's detector classes and box count are read once more, its train queries looked up
in info/, and the folder ``catalogue/saved_index.py`` describes is written as one set: the
vectors, the ids, the faiss index (exact inner product by default), the product details
and a manifest naming the checkpoint and the catalogue by their fingerprints.
docs/retrieval.md.
"""
import argparse
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
import runtime  # noqa: E402
import utils  # noqa: E402
from catalogue import rerank, retrieve, saved_index  # noqa: E402
from errors import DataError  # noqa: E402
from model3.model import build_model  # noqa: E402


def progress(rows, desc, enabled, total=None):
    from tqdm import tqdm
    return tqdm(rows, desc=desc, unit=" products", total=total, disable=not enabled,
                mininterval=1.0)


def product_details(pids, get, *, queries, tsv_files, lines, show_progress=True):
    """The arrays of ``products.npz`` (saved_index.py), row-aligned with ``pids``: box
    counts and detector classes from ``get(pid)`` (every box), the train queries from
    info/'s ``queries``, and where each candidate-split product's row lies (``lines``)."""
    num_boxes, labels = np.zeros(len(pids), np.int64), []
    for i, pid in enumerate(progress(pids, "classes", show_progress)):
        labels.append(np.asarray(get(int(pid))[2], np.int64))
        num_boxes[i] = len(labels[-1])
    class_flat, class_off = utils.ragged_parts(labels)
    query_flat, query_off = saved_index.train_query_rows(pids, queries["products"])
    file_of = {path: i for i, path in enumerate(tsv_files)}
    line_file = np.array([file_of[lines[p][0]] if p in lines else -1 for p in pids.tolist()])
    line_offset = np.array([lines[p][1] if p in lines else -1 for p in pids.tolist()], np.int64)
    return dict(num_boxes=num_boxes, class_flat=class_flat, class_off=class_off,
                query_flat=query_flat, query_off=query_off,
                train_texts=np.array(list(queries["text"]), dtype=str),
                line_file=line_file.astype(np.int64), line_offset=line_offset)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--ckpt", required=True, help="best.pt or last.pt of model3/train.py")
    p.add_argument("--out", default=os.path.join("runs", "index"), help="index folder")
    p.add_argument("--index", default="flat", choices=["flat", "hnsw"],
                   help="flat: IndexFlatIP, exact; hnsw: IndexHNSWFlat, approximate")
    p.add_argument("--no-progress", action="store_true")
    retrieve.add_gallery_args(p)
    return p.parse_args(argv)


def main(argv=None):
    a = parse_args(argv)
    runtime.setup_logging()
    saved_index.import_faiss()  # before the long encoding, not after it
    t, ckpt_sha256 = time.time(), saved_index.file_sha256(a.ckpt)
    model, vocab, ck = matching.load_trained(build_model, a.ckpt, a.export)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model.to(device).eval()
    data, info = a.data or ck["args"]["data"], a.info or ck["args"]["info"]
    if retrieve.train_from_tsv(a, ck["args"]):
        raise DataError("--data %s: the index holds the catalogue of the checkpoint's "
                        "world (%s), whose train queries it shows; leave --data out"
                        % (a.data, ck["args"]["data"]))
    gallery, lines = retrieve.gallery_splits(a, data), {}
    sources = retrieve.product_sources(a, ck["args"], gallery, lines)
    pids, vectors = retrieve.encode_gallery(
        model, progress(retrieve.gallery_rows(sources), "encoding", not a.no_progress),
        a.batch_size)
    vectors = np.ascontiguousarray(vectors.numpy(), np.float32)
    # the train store again, every box kept: the classes and box counts shown
    store = retrieve.store_options(a, ck["args"], None) if "train" in gallery else None
    get = rerank.GalleryProducts(engine.build_store(store) if store else None, lines).get
    queries, _ = utils.load_info(info)
    tsv_files = sorted({path for path, _ in lines.values()})
    products = product_details(pids, get, queries=queries, tsv_files=tsv_files, lines=lines,
                               show_progress=not a.no_progress)
    index = retrieve.faiss_index(vectors.shape[1], hnsw=a.index == "hnsw")
    index.add(vectors)
    manifest = {
        "format": saved_index.FORMAT,
        "checkpoint": {"path": a.ckpt, "sha256": ckpt_sha256},
        "catalogue": {"products": len(pids), "sha256": saved_index.ids_sha256(pids),
                      "data": data, "info": info, "gallery": gallery},
        "index": a.index, "dim": int(vectors.shape[1]),
        "store": store and {k: getattr(store, k) for k in ("store", "features", "packed")},
        "tsv_files": tsv_files, "classes": saved_index.class_names(data)}
    saved_index.write(a.out, manifest=manifest, pids=pids, vectors=vectors, index=index,
                      products=products)
    print("wrote %s: %d products (%s), %s index, in %.0f s"
          % (a.out, len(pids), " + ".join(gallery), a.index, time.time() - t))
    return manifest


if __name__ == "__main__":
    runtime.cli(main)
