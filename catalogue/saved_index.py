"""A saved index of the catalogue: its files, its manifest and the checks made on reading.

``catalogue/index.py`` writes the folder once; ``catalogue/search.py`` reads it instead of
encoding the catalogue again. The folder (written as one set, ``utils.write_folder``):

- ``index.faiss``: the product vectors in a faiss index (``faiss.write_index``), row i
  product ``pids[i]``: IndexFlatIP (exact inner product) or IndexHNSWFlat;
- ``vectors.npy`` (P, D) float32 and ``pids.npy`` (P,) int64 ascending: the vectors and ids;
- ``products.npz``: what a person can judge a product by without pixels, row-aligned with
  ``pids``: ``num_boxes``, the detector classes of its boxes (``class_flat``/``class_off``),
  the train queries it was a positive of (``query_flat``/``query_off`` into ``train_texts``),
  and where a re-ranking reads its regions again (``line_file``: index into the manifest's
  ``tsv_files``, -1 for the train product store; ``line_offset``: the row's byte offset);
- ``manifest.json``: the checkpoint (path and sha256 of the file), the catalogue (product
  count and sha256 of ``pids``, data root, info, gallery splits), the train product store,
  the class names of ``multimodal_labels.txt``.

Reading refuses a folder whose ``pids.npy`` is not the manifest's catalogue, a checkpoint
other than the one the index was built from, and (asked with a data root) another
catalogue. Imports stay lean: no model is built here.
"""
import collections
import hashlib
import json
import os

import numpy as np

import tsv
import utils
from errors import DataError

FORMAT = "model3-index/1"
MANIFEST, INDEX, VECTORS, PIDS, PRODUCTS = ("manifest.json", "index.faiss", "vectors.npy",
                                            "pids.npy", "products.npz")


def import_faiss():
    try:
        import faiss
    except ImportError:
        raise DataError("a saved index needs faiss: pip install faiss-cpu") from None
    return faiss


# --------------------------------------------------------------------------------------
# Fingerprints
# --------------------------------------------------------------------------------------
def file_sha256(path):
    """sha256 of a file's bytes, read a MiB at a time."""
    h = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    except FileNotFoundError:
        raise DataError("%s: checkpoint not found" % path) from None
    return h.hexdigest()


def ids_sha256(pids):
    """sha256 of product ids as ascending little-endian int64."""
    return hashlib.sha256(np.ascontiguousarray(pids, "<i8").tobytes()).hexdigest()


# --------------------------------------------------------------------------------------
# What is shown of a product
# --------------------------------------------------------------------------------------
def class_names(data):
    """``multimodal_labels.txt`` of a data root -> [name of class 0, ...]; [] without it."""
    path = os.path.join(data, "multimodal_labels.txt")
    if not os.path.exists(path):
        return []
    names = {}
    with open(path, encoding="utf-8") as f:
        for line, text in enumerate(f.read().splitlines()[1:], start=2):
            cid, sep, name = text.partition("\t")
            if not sep or not cid.isdigit():
                raise DataError("%s:%d: want category_id<TAB>category_name, got %r"
                                % (path, line, text[:60]))
            names[int(cid)] = name
    return [names.get(i, "class %d" % i) for i in range(max(names, default=-1) + 1)]


def train_query_rows(pids, products):
    """pids (P,) ascending, the train queries' product rows (Ragged) -> (flat, offsets):
    row i the indices of the queries that list product pids[i]."""
    flat, off = utils.ragged_parts(products)
    owner = np.repeat(np.arange(len(off) - 1), np.diff(off))
    order = np.lexsort((owner, flat))
    flat, owner = flat[order], owner[order]
    lo, hi = np.searchsorted(flat, pids, "left"), np.searchsorted(flat, pids, "right")
    out = np.concatenate([owner[a:b] for a, b in zip(lo, hi)] + [np.zeros(0, np.int64)])
    return out, np.concatenate([[0], np.cumsum(hi - lo)])


# --------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------
def write(folder, *, manifest, pids, vectors, index, products):
    """The whole folder, as one set (``utils.write_folder``)."""
    faiss = import_faiss()
    utils.write_folder(folder, {
        INDEX: lambda path: faiss.write_index(index, path),
        VECTORS: lambda path: np.save(path, vectors),
        PIDS: lambda path: np.save(path, pids),
        PRODUCTS: lambda path: np.savez(path, **products),
        MANIFEST: lambda path: utils.atomic_json(manifest, path),
    })


# --------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------
class SavedIndex:
    """A saved index folder, read: ``manifest``, ``pids``, the faiss ``index``; the product
    details are read on first use."""

    def __init__(self, folder):
        self.folder = folder
        path = os.path.join(folder, MANIFEST)
        try:
            with open(path, encoding="utf-8") as f:
                self.manifest = json.load(f)
            if self.manifest.get("format") != FORMAT:
                raise ValueError("format %r, not %r" % (self.manifest.get("format"), FORMAT))
            self.pids = np.load(os.path.join(folder, PIDS))
        except FileNotFoundError as e:
            raise DataError("%s: not found; build the index with `python catalogue/index.py "
                            "--ckpt CKPT --out %s`" % (e.filename, folder)) from None
        except (ValueError, OSError) as e:
            raise DataError("%s: not a saved index (%s); build it again with "
                            "catalogue/index.py" % (folder, e)) from None
        if ids_sha256(self.pids) != self.manifest["catalogue"]["sha256"]:
            raise DataError("%s: pids.npy is not the catalogue its manifest names (files "
                            "of two builds?); build it again with catalogue/index.py" % folder)
        self.index = import_faiss().read_index(os.path.join(folder, INDEX))
        if self.index.ntotal != len(self.pids):
            raise DataError("%s: index.faiss holds %d vectors, pids.npy %d products; build "
                            "it again with catalogue/index.py"
                            % (folder, self.index.ntotal, len(self.pids)))
        self._products = None

    def check_checkpoint(self, path):
        """Refuse a checkpoint other than the one the vectors were encoded with."""
        built = self.manifest["checkpoint"]
        if file_sha256(path) != built["sha256"]:
            raise DataError(
                "%s was built from another checkpoint (%s, sha256 %s...) than %s: its product "
                "vectors would not match this model's queries; build it again with "
                "`python catalogue/index.py --ckpt %s --out %s`"
                % (self.folder, built["path"], built["sha256"][:12], path, path, self.folder))

    def check_catalogue(self, data):
        """Refuse an index whose products are not those of ``data`` (its train products, from
        the index's info/, and the rows of its gallery's candidate splits)."""
        ids = catalogue_ids(data, self.manifest["catalogue"]["info"],
                            self.manifest["catalogue"]["gallery"])
        if ids_sha256(ids) != self.manifest["catalogue"]["sha256"]:
            raise DataError(
                "%s was built from another catalogue (%s: %d products) than %s (%d products); "
                "build it again with `python catalogue/index.py --data %s`"
                % (self.folder, self.manifest["catalogue"]["data"], len(self.pids), data,
                   len(ids), data))

    def vectors(self):
        """(P, D) float32 product vectors, memory-mapped."""
        return np.load(os.path.join(self.folder, VECTORS), mmap_mode="r")

    def products(self):
        if self._products is None:
            with np.load(os.path.join(self.folder, PRODUCTS)) as z:
                self._products = {k: z[k] for k in z.files}
        return self._products

    def row(self, pid):
        """A product id -> its row."""
        return int(np.searchsorted(self.pids, pid))

    def describe(self, row):
        """Row i -> {product_id, boxes, classes [[name, count], ...] most boxes first,
        train_queries [text, ...]}."""
        p, names = self.products(), self.manifest["classes"]
        labels = p["class_flat"][p["class_off"][row]:p["class_off"][row + 1]]
        counts = collections.Counter(names[c] if c < len(names) else "class %d" % c
                                     for c in labels.tolist())
        queries = p["query_flat"][p["query_off"][row]:p["query_off"][row + 1]]
        return {"product_id": int(self.pids[row]), "boxes": int(p["num_boxes"][row]),
                "classes": [[n, c] for n, c in counts.most_common()],
                "train_queries": [str(p["train_texts"][q]) for q in queries]}

    def lines(self):
        """{pid: (TSV path, byte offset)} of the products read from a candidate split."""
        p, files = self.products(), self.manifest["tsv_files"]
        keep = p["line_file"] >= 0
        return {int(pid): (files[f], int(o)) for pid, f, o in
                zip(self.pids[keep], p["line_file"][keep], p["line_offset"][keep])}


def catalogue_ids(data, info, gallery):
    """The product ids of a catalogue, ascending: the train products of ``info`` and the
    rows of ``gallery``'s candidate splits of ``data`` (read without their arrays)."""
    ids = []
    for split in gallery:
        if split == "train":
            queries, _ = utils.load_info(info)
            ids.append(utils.ragged_parts(queries["products"])[0])
        else:
            path = os.path.join(data, split, split + ".tsv")
            if not os.path.exists(path):
                raise DataError("%s: not found, and the index's catalogue has the %s "
                                "split: another catalogue" % (path, split))
            cands = tsv.read_candidates(path, with_arrays=False)
            ids.append(np.array([r["product_id"] for c in cands.values()
                                 for r in c["products"]], np.int64))
    return np.unique(np.concatenate(ids))
