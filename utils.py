"""What every stage shares: the competition TSVs, preprocessing, the product store, text,
the official NDCG@5, submission rules, seeding, checkpoints and distributed helpers.

Preprocess a data root (train rows -> one ``{product_id}.npz`` each, plus ``info/``):
    python utils.py preprocess --data DATA [--features DATA/features] [--info info] [--workers 2]
Across machines: ``preprocess ... --shard I/N`` for every I (any order, in parallel), then
``preprocess ... --merge``. Optionally pack the train features into one memory-mapped store
(``train.py --store packed``):
    python utils.py pack --features DATA/features --info info [--out DATA/packed] [--fp16]
"""
import argparse
import base64
import binascii
import io
import json
import logging
import math
import multiprocessing as mp
import os
import pickle
import random
import re
import struct
import sys
import zlib
from collections import Counter

import numpy as np

ROOT = os.path.dirname(os.path.abspath(__file__))
FEAT_DIM = 2048
N_CLASSES = 33
COLUMNS = ["product_id", "image_h", "image_w", "num_boxes", "boxes", "features",
           "class_labels", "query", "query_id"]
META_COLUMNS = ["product_id", "image_h", "image_w", "num_boxes", "query", "query_id"]
META_INTS = ["offset", "product_id", "image_h", "image_w", "num_boxes", "query_id"]
SPECIALS = ["<pad>", "<unk>", "<bos>", "<eos>"]
PAD, UNK, BOS, EOS = range(4)
log = logging.getLogger("kddmm")


class DataError(ValueError):
    """Bad input; the message names the file, the line and the reason."""


# --------------------------------------------------------------------------------------
# TSV rows
# --------------------------------------------------------------------------------------
if sys.version_info >= (3, 11):  # what b64decode(validate=True) runs, minus its copy of views
    def _b64(field):
        return binascii.a2b_base64(field, strict_mode=True)
else:
    def _b64(field):
        return base64.b64decode(bytes(field) if isinstance(field, memoryview) else field,
                                validate=True)


def _decode(field, dtype, shape, name):
    try:
        raw = _b64(field)
    except (binascii.Error, ValueError) as e:
        raise ValueError("column %s is not valid base64 (%s)" % (name, e)) from None
    want = math.prod(shape) * np.dtype(dtype).itemsize
    if len(raw) != want:
        raise ValueError("column %s decodes to %d bytes, num_boxes implies %d"
                         % (name, len(raw), want))
    return np.frombuffer(raw, dtype).reshape(shape)


def _ascii(v):
    return v.decode("ascii", "replace") if isinstance(v, bytes) else v


def _split_tabs(line):
    """bytes -> memoryview slices between tabs: no copy of the 40 KB of base64 in a row
    (``bytes.split`` copies it: 31 us of a row's ~100 us of parsing)."""
    view, out, start = memoryview(line), [], 0
    while True:
        end = line.find(b"\t", start)
        if end < 0:
            out.append(view[start:])
            return out
        out.append(view[start:end])
        start = end + 1


def parse_row(line, with_arrays=True):
    """One TSV line (str or bytes, without its newline) -> dict; raises ValueError with the
    reason. Given bytes, only the query column is decoded to text (the fast path)."""
    raw = isinstance(line, (bytes, bytearray))
    cols = _split_tabs(line) if raw else line.split("\t")
    if len(cols) != len(COLUMNS):
        raise ValueError("expected %d tab-separated columns, found %d" % (len(COLUMNS), len(cols)))
    pid, h, w, n, boxes, feats, labels, query, qid = cols
    if raw:  # the short columns as bytes; the base64 ones stay views into the line
        pid, h, w, n, query, qid = map(bytes, (pid, h, w, n, query, qid))
    for name, v in (("product_id", pid), ("image_h", h), ("image_w", w), ("num_boxes", n),
                    ("query_id", qid)):
        if not v.isdigit() or not v.isascii():
            raise ValueError("%s must be a non-negative integer, got %r" % (name, _ascii(v[:40])))
    n, h, w = int(n), int(h), int(w)
    if n < 1:
        raise ValueError("num_boxes must be >= 1, got %d" % n)
    if h < 1 or w < 1:
        raise ValueError("image size must be positive, got %dx%d" % (h, w))
    if raw:
        try:
            query = query.decode("utf-8")
        except UnicodeDecodeError as e:
            raise ValueError("query is not UTF-8 (%s)" % e.reason) from None
    if not query.strip():
        raise ValueError("empty query")
    row = {"product_id": int(pid), "image_h": h, "image_w": w, "num_boxes": n,
           "query": query, "query_id": int(qid)}
    if with_arrays:
        b = _decode(boxes, np.float32, (n, 4), "boxes")
        f = _decode(feats, np.float32, (n, FEAT_DIM), "features")
        c = _decode(labels, np.int64, (n,), "class_labels")
        if not np.isfinite(f).all() or not np.isfinite(b).all():
            raise ValueError("features or boxes contain NaN or infinity")
        if c.min() < 0 or c.max() >= N_CLASSES:
            raise ValueError("class label outside 0..%d" % (N_CLASSES - 1))
        tol = 1.0  # detectors emit boxes a pixel past the border
        top, left, bottom, right = b.T  # whole-column reductions: few numpy calls per row
        if ((bottom < top).any() or (right < left).any() or b[:, :2].min() < -tol
                or bottom.max() > h + tol or right.max() > w + tol):
            raise ValueError("box outside the %dx%d image or with bottom<top / right<left" % (h, w))
        row.update(boxes=b, features=f, class_labels=c)
    return row


def iter_lines(path, start=0, end=None, raw=False):
    """Yield (byte offset, text) of the data lines whose first byte lies in [start, end).

    text is None for a truncated last line, a ValueError for a line that is not UTF-8, and
    with ``raw`` the line's bytes (not decoded: ``parse_row`` decodes only the query).
    """
    with open(path, "rb") as f:
        if start == 0:
            header = f.readline().rstrip(b"\r\n").decode("utf-8", "replace").split("\t")
            if header[:1] != ["product_id"]:
                raise DataError("%s:1: missing header row (got %r)" % (path, header[:3]))
        else:
            f.seek(start - 1)
            f.readline()  # finish the line that straddles the boundary
        pos = f.tell()
        while end is None or pos < end:
            line = f.readline()
            if not line:
                return
            if not line.endswith(b"\n"):
                yield pos, None  # truncated last line
                return
            text = line.rstrip(b"\r\n")
            if not raw:
                try:
                    text = text.decode("utf-8")
                except UnicodeDecodeError as e:
                    text = ValueError("not UTF-8 (%s)" % e.reason)
            yield pos, text
            pos += len(line)


def line_number(path, offset):
    """1-based line number of the line starting at byte ``offset`` (counted on demand)."""
    n, done = 1, 0
    with open(path, "rb") as f:
        while done < offset:
            chunk = f.read(min(1 << 24, offset - done))
            n += chunk.count(b"\n")
            done += len(chunk)
    return n


def read_candidates(path, skip_bad=False):
    """Read a valid/test TSV -> {query_id: {"query": str, "products": [row dicts]}}.

    Candidate splits are small (about 15k rows) and read directly, as the original did.
    """
    out, bad = {}, []
    for off, text in iter_lines(path):
        try:
            if text is None:
                raise ValueError("truncated last line")
            if isinstance(text, Exception):
                raise text
            row = parse_row(text)
        except ValueError as e:
            msg = "%s:%d: %s" % (path, line_number(path, off), e)
            if not skip_bad:
                raise DataError(msg) from None
            bad.append(msg)
            continue
        q = out.setdefault(row["query_id"], {"query": row["query"], "products": []})
        if q["query"] != row["query"]:
            raise DataError("%s:%d: query_id %d has two different texts"
                            % (path, line_number(path, off), row["query_id"]))
        q["products"].append(row)
    if bad:
        log.warning("%s: skipped %d bad rows:\n  %s", path, len(bad), "\n  ".join(bad[:20]))
    return out


def load_answers(path, candidates=None):
    """valid_answer.json -> {int query_id: set(product ids)}; checks them against candidates.

    candidates: ``read_candidates`` output or {query_id: [product_id, ...]}. A query with
    answers but no candidates is an error; answers that are not candidates are a warning.
    """
    with open(path, encoding="utf-8") as f:
        raw = json.load(f)
    answers = {int(q): set(int(p) for p in ps) for q, ps in raw.items()}
    if candidates is not None:
        for q, ps in answers.items():
            if q not in candidates:
                raise DataError("%s: query %d has answers but no candidates" % (path, q))
            c = candidates[q]
            missing = ps - ({r["product_id"] for r in c["products"]} if isinstance(c, dict)
                            else {int(p) for p in c})
            if missing:
                log.warning("%s: query %d: %d answers are not among its candidates (they can "
                            "never be ranked; NDCG stays below 1)", path, q, len(missing))
    return answers


# --------------------------------------------------------------------------------------
# Boxes, the product store and padding
# --------------------------------------------------------------------------------------
def normalize_boxes(boxes, h, w):
    """(n, 4) pixel boxes (top, left, bottom, right) -> (n, 5) in [0, 1] plus the area."""
    b = np.asarray(boxes, np.float32) / np.array([h, w, h, w], np.float32)
    b = np.clip(b, 0.0, 1.0)
    area = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    return np.concatenate([b, area[:, None]], 1).astype(np.float32)


def _npy_bytes(a):
    """The .npy (format 1.0) header of a C-contiguous array, as ``np.save`` writes it."""
    d = "{'descr': %r, 'fortran_order': False, 'shape': %r, }" % (
        np.lib.format.dtype_to_descr(a.dtype), a.shape)
    d += " " * ((-(10 + len(d) + 1)) % 64) + "\n"   # the data starts 64-byte aligned
    return b"\x93NUMPY\x01\x00" + struct.pack("<H", len(d)) + d.encode("latin1")


def npz_parts(arrays):
    """{name: array} -> the byte strings of an uncompressed .npz (a stored zip of .npy
    members), without copying the arrays; what ``np.savez`` writes, minus zipfile's
    per-member bookkeeping (~40 us a row on the preprocessing path)."""
    parts, central, offset = [], [], 0
    for name, a in arrays.items():
        a = np.ascontiguousarray(a)
        body = memoryview(a).cast("B") if a.size else b""
        head = _npy_bytes(a)
        crc = zlib.crc32(body, zlib.crc32(head))
        size = len(head) + len(body)
        fname = (name + ".npy").encode()
        # local header: version 2.0, no flags, stored, DOS date 1980-01-01 00:00
        parts += [struct.pack("<IHHHHHIIIHH", 0x04034B50, 20, 0, 0, 0, 0x21, crc, size, size,
                              len(fname), 0) + fname, head, body]
        central.append(struct.pack("<IHHHHHHIIIHHHHHII", 0x02014B50, 20, 20, 0, 0, 0, 0x21,
                                   crc, size, size, len(fname), 0, 0, 0, 0, 0o600 << 16,
                                   offset) + fname)
        offset += 30 + len(fname) + size
    cd = b"".join(central)
    return parts + [cd, struct.pack("<IHHHHIIH", 0x06054B50, 0, 0, len(central), len(central),
                                    len(cd), offset, 0)]


def save_npz_atomic(path, compress=False, **arrays):
    """np.savez(_compressed) to ``path`` through a temporary file and a rename."""
    tmp = path + ".tmp%d" % os.getpid()
    if compress:
        buf = io.BytesIO()  # zipfile seeks back to patch each member: keep that off the disk
        np.savez_compressed(buf, **arrays)
        parts = [buf.getbuffer()]
    else:
        parts = npz_parts(arrays)
    with open(tmp, "wb") as f:
        f.writelines(parts)
    os.replace(tmp, path)


class ProductStore:
    """Per-product ``.npz`` files, opened lazily and closed at once.

    ``get(pid)`` -> (boxes (n, 5) normalised, features (n, 2048) float32, labels (n,)).
    """

    def __init__(self, folder, max_boxes=None):
        self.folder, self.max_boxes = folder, max_boxes

    def path(self, pid):
        return _npz_path(self.folder, int(pid))

    def get(self, pid):
        path = self.path(pid)
        try:
            with np.load(path) as z:
                h, w = z["image_hw"]
                boxes, feats, labels = z["boxes"], z["features"], z["class_labels"]
        except FileNotFoundError:
            raise DataError("%s: missing; rerun `python utils.py preprocess`" % path) from None
        except (OSError, ValueError, KeyError, EOFError) as e:
            raise DataError("%s: unreadable or corrupt (%s); delete it and rerun preprocess"
                            % (path, e)) from None
        k = self.max_boxes or len(labels)
        return normalize_boxes(boxes[:k], h, w), np.asarray(feats[:k], np.float32), labels[:k]


def default_packed(features):
    """Where ``pack`` writes by default: ``packed/`` beside the .npz folder."""
    return os.path.join(os.path.dirname(os.path.abspath(features)), "packed")


class PackedStore:
    """The train products in one memory-mapped array plus offsets (``python utils.py pack``).

    ``get(pid)`` returns what ProductStore.get returns (a float16 pack is widened back to
    float32). Forked workers share the mapped pages; pickling (spawned workers) reopens the
    files instead of copying them.
    """
    FILES = ("features.npy", "boxes.npy", "class_labels.npy")

    def __init__(self, folder, max_boxes=None):
        self.folder, self.max_boxes = folder, max_boxes
        index = os.path.join(folder, "index.npz")
        if not os.path.exists(index):
            raise DataError("%s: not found; run `python utils.py pack --out %s`" % (index, folder))
        with np.load(index) as z:
            self.pids, self.offsets = z["pids"], z["offsets"]
        # plain ndarray views of the maps: slicing a np.memmap costs microseconds more
        self.feats, self.boxes, self.labels = (
            np.load(os.path.join(folder, name), mmap_mode="r").view(np.ndarray)
            for name in self.FILES)

    def __getstate__(self):
        return {"folder": self.folder, "max_boxes": self.max_boxes}

    def __setstate__(self, state):
        self.__init__(state["folder"], state["max_boxes"])

    def get(self, pid):
        k = int(np.searchsorted(self.pids, pid))
        if k == len(self.pids) or self.pids[k] != pid:
            raise DataError("product %d is not in %s; rerun `python utils.py pack`"
                            % (pid, self.folder))
        a, b = self.offsets[k], self.offsets[k + 1]
        if self.max_boxes:
            b = min(b, a + self.max_boxes)
        return self.boxes[a:b].copy(), self.feats[a:b].astype(np.float32), self.labels[a:b].copy()


def row_regions(row, max_boxes=None):
    """A decoded TSV row -> the same (boxes5, features, labels) triple as ProductStore.get."""
    k = max_boxes or row["num_boxes"]
    return (normalize_boxes(row["boxes"][:k], row["image_h"], row["image_w"]),
            np.asarray(row["features"][:k], np.float32), row["class_labels"][:k])


def pad_regions(items):
    """[(boxes (n_i, 5), features (n_i, D)), ...] -> boxes (B, N, 5), feats (B, N, D), mask (B, N).

    ``mask`` is True on real boxes; padding is zeros.
    """
    import torch
    n = max(len(b) for b, _ in items)
    B, D = len(items), items[0][1].shape[1]
    boxes = np.zeros((B, n, 5), np.float32)
    feats = np.zeros((B, n, D), np.float32)
    mask = np.zeros((B, n), bool)
    for i, (b, f) in enumerate(items):
        boxes[i, :len(b)], feats[i, :len(f)], mask[i, :len(b)] = b, f, True
    return torch.from_numpy(boxes), torch.from_numpy(feats), torch.from_numpy(mask)


def flat_regions(items):
    """[(boxes (n_i, 5), features (n_i, D)), ...] -> boxes (R, 5), feats (R, D), lengths (B,):
    every item's regions one after the other, R = sum n_i. What a DataLoader worker should
    send: a padded batch is mostly zeros (3.9 boxes on average, padded to the most in the
    batch), and every byte of it crosses shared memory."""
    import torch
    lengths = np.array([len(b) for b, _ in items], np.int64)
    boxes = np.concatenate([b for b, _ in items]).astype(np.float32, copy=False)
    feats = np.concatenate([f for _, f in items]).astype(np.float32, copy=False)
    return torch.from_numpy(boxes), torch.from_numpy(feats), torch.from_numpy(lengths)


def pad_flat_regions(boxes, feats, lengths, device=None):
    """The inverse of ``flat_regions`` -> exactly ``pad_regions``'s boxes (B, N, 5),
    feats (B, N, D), mask (B, N), padded on ``device`` (default: where ``feats`` is).

    The shape and the scatter index come from ``lengths`` on the CPU, so a GPU never has
    to stop and report a size (no device synchronisation).
    """
    import torch
    device = feats.device if device is None else device
    lengths = lengths.cpu()
    B, n = len(lengths), int(lengths.max())
    mask = torch.arange(n)[None] < lengths[:, None]
    index = mask.flatten().nonzero().squeeze(1).to(device, non_blocking=True)
    boxes, feats = (x.to(device, non_blocking=True) for x in (boxes, feats))
    out_b = boxes.new_zeros(B * n, boxes.shape[1]).index_copy_(0, index, boxes)
    out_f = feats.new_zeros(B * n, feats.shape[1]).index_copy_(0, index, feats)
    return out_b.view(B, n, -1), out_f.view(B, n, -1), mask.to(device, non_blocking=True)


def pad_tokens(seqs, pad=PAD):
    """[[id, ...], ...] -> LongTensor (B, L) padded with ``pad``, lengths (B,)."""
    import torch
    L = max(1, max(len(s) for s in seqs))
    out = np.full((len(seqs), L), pad, np.int64)
    for i, s in enumerate(seqs):  # numpy: a torch.as_tensor per row cost most of a collate
        out[i, :len(s)] = s
    return torch.from_numpy(out), torch.tensor([len(s) for s in seqs], dtype=torch.long)


# --------------------------------------------------------------------------------------
# Text
# --------------------------------------------------------------------------------------
_ASCII_TOKEN = re.compile(r"[a-z0-9]+(?:['\-][a-z0-9]+)*")
_jieba = None
_stopwords = None


def _jieba_cut(text):
    global _jieba
    if _jieba is None:
        import jieba
        jieba.setLogLevel(logging.WARNING)
        jieba.initialize()
        _jieba = jieba
    return _jieba.lcut(text)


def stopwords():
    global _stopwords
    if _stopwords is None:
        _stopwords = set()
        for name in ("en.txt", "zh.txt"):
            with open(os.path.join(ROOT, "stopwords", name), encoding="utf-8") as f:
                _stopwords |= {w.strip() for w in f if w.strip() and not w.startswith("#")}
    return _stopwords


def tokenize(text, drop_stopwords=True):
    """Lower-case; ASCII words keep hyphens/apostrophes ("t-shirt"); Chinese goes to jieba."""
    tokens = []
    for chunk in text.lower().split():
        if chunk.isascii():
            tokens += _ASCII_TOKEN.findall(chunk)
        else:
            for t in _jieba_cut(chunk):
                t = t.strip()
                if t and (not t.isascii() or _ASCII_TOKEN.fullmatch(t)) and re.search(r"\w", t):
                    tokens.append(t)
    if drop_stopwords:
        sw = stopwords()
        tokens = [t for t in tokens if t not in sw]
    return tokens


class Vocab:
    """Token <-> id, with ``<pad> <unk> <bos> <eos>`` first."""

    def __init__(self, itos):
        if list(itos[:4]) != SPECIALS:
            raise ValueError("a vocabulary starts with %s" % SPECIALS)
        self.itos = list(itos)
        self.stoi = {t: i for i, t in enumerate(self.itos)}

    @classmethod
    def build(cls, token_lists, min_count=1):
        counts = Counter(t for ts in token_lists for t in ts)
        words = sorted((w for w, c in counts.items() if c >= min_count),
                       key=lambda w: (-counts[w], w))
        return cls(SPECIALS + words), counts

    def encode(self, tokens):
        return [self.stoi.get(t, UNK) for t in tokens]

    def decode(self, ids):
        return [self.itos[i] for i in ids if i >= len(SPECIALS)]

    def __len__(self):
        return len(self.itos)


# --------------------------------------------------------------------------------------
# Preprocessing
# --------------------------------------------------------------------------------------
def byte_ranges(path, n, start=0, end=None):
    """[start, end) of a file (default: all of it) cut into n byte ranges."""
    end = os.path.getsize(path) if end is None else end
    cuts = [start + (end - start) * i // n for i in range(n + 1)]
    return list(zip(cuts[:-1], cuts[1:]))


def _npz_path(features, pid):
    return os.path.join(features, "%s.npz" % pid)


def _save_row(row, path, compress):
    save_npz_atomic(path, compress, features=row["features"], boxes=row["boxes"],
                    class_labels=row["class_labels"],
                    image_hw=np.array([row["image_h"], row["image_w"]], np.int64))


def _meta(ints, texts):
    """Metadata of preprocessed rows, compact: (ints (n, 6) int64 by META_INTS, texts).

    ~75 bytes a row where a tuple per row took ~370 (3 M rows: 0.2 GB, not 1.1 GB): a query
    text repeated on many rows (one per matching product) is one string.
    """
    seen = {}
    return (np.asarray(ints, np.int64).reshape(-1, len(META_INTS)),
            [seen.setdefault(t, t) for t in texts])


def _cat_meta(parts):
    return _meta(np.concatenate([p[0] for p in parts]) if parts else [],
                 [t for p in parts for t in p[1]])


def _preprocess_range(job):
    """Worker: decode rows of one byte range, write their .npz -> (meta (``_meta``) of the
    good rows, bad rows [(byte offset, reason)])."""
    path, start, end, features, compress, skip_bad = job
    ints, texts, bad = [], [], []
    for off, text in iter_lines(path, start, end, raw=True):
        try:
            if text is None:
                raise ValueError("truncated last line (no newline)")
            # the id only: split(b"\t", 1) would copy the 40 KB rest of the line
            out = _npz_path(features, text[:text.find(b"\t")].decode("ascii", "replace"))
            row = parse_row(text, with_arrays=not os.path.exists(out))
            if "features" in row:
                _save_row(row, out, compress)
        except ValueError as e:
            bad.append((off, str(e)))
            if not skip_bad:
                break
            continue
        ints.append((off,) + tuple(row[c] for c in META_INTS[1:]))
        texts.append(row["query"])
    return _meta(ints, texts), bad


def _scan(path, start, end, features, workers, compress, skip_bad, progress):
    """Rows of ``path`` that start in [start, end) -> their .npz, across ``workers`` processes.

    Returns (meta (``_meta``) in file order, bad [(byte offset, reason)]).
    """
    n_jobs = max(1, workers) * 8  # small jobs keep the progress bar and the workers busy
    jobs = [(path, s, e, features, compress, skip_bad)
            for s, e in byte_ranges(path, n_jobs, start, end)]
    meta, bad = [], []
    from tqdm import tqdm
    bar = tqdm(total=len(jobs), desc="preprocess", unit="chunk", disable=not progress)
    if workers > 1:
        with mp.get_context("spawn").Pool(workers) as pool:
            results = pool.imap(_preprocess_range, jobs)
            # while the workers convert, this process would only wait: load what building
            # info/ needs (pandas, scikit-learn: ~1.5 s of imports) in the meantime
            import pandas  # noqa: F401
            import sklearn.cluster  # noqa: F401
            import sklearn.feature_extraction.text  # noqa: F401
            for m, b in results:
                meta.append(m)
                bad += b
                bar.update()
    else:
        for job in jobs:
            m, b = _preprocess_range(job)
            meta.append(m)
            bad += b
            bar.update()
    bar.close()
    return _cat_meta(meta), bad


def _part_path(info, i, n):
    return os.path.join(info, "parts", "part-%05d-of-%05d.pkl" % (i, n))


def _read_parts(path, info):
    """The metadata parts of ``preprocess --shard I/N`` -> (meta, bad) of the whole file."""
    folder = os.path.join(info, "parts")
    names = os.listdir(folder) if os.path.isdir(folder) else []
    counts = {int(m[1]) for m in (re.fullmatch(r"part-\d{5}-of-(\d{5})\.pkl", x) for x in names)
              if m}
    if len(counts) != 1:
        raise DataError("%s: %s" % (folder, "parts of several --shard splits %s: remove the stale "
                                             "ones" % sorted(counts) if counts else
                                    "no parts; run `preprocess --shard I/N` for every I first"))
    n = counts.pop()
    missing = [i for i in range(n) if not os.path.exists(_part_path(info, i, n))]
    if missing:
        raise DataError("%s: shards %s of %d have not finished" % (folder, missing[:10], n))
    meta, bad = [], []
    for i in range(n):
        with open(_part_path(info, i, n), "rb") as f:
            part = pickle.load(f)
        if part["size"] != os.path.getsize(path):
            raise DataError("%s: written for a %d-byte %s, which now has %d bytes: rerun the "
                            "shards" % (_part_path(info, i, n), part["size"], path,
                                        os.path.getsize(path)))
        meta.append(part["meta"])
        bad += part["bad"]
    return _cat_meta(meta), bad


def preprocess(data, features=None, info="info", workers=1, skip_bad=False, compress=False,
               kmeans_k=None, seed=0, min_count=1, progress=True, shard=None, merge=False):
    """train.tsv -> ``features/{pid}.npz`` + ``info/``. Returns the train DataFrame.

    ``shard=(i, n)`` converts only the i-th of n byte ranges and writes its metadata to
    ``info/parts/`` (returns None); once every shard is done, ``merge=True`` builds ``info/``
    from the parts exactly as a single run would.
    """
    import pandas as pd
    path = os.path.join(data, "train", "train.tsv")
    if not os.path.exists(path):
        raise DataError("%s: not found (is --data a competition data root?)" % path)
    features = features or os.path.join(data, "features")
    os.makedirs(features, exist_ok=True)
    os.makedirs(info, exist_ok=True)
    if shard is None:  # shards run side by side: the merge clears what killed ones left
        for name in os.listdir(features):  # temporaries of a killed run were never renamed
            if ".npz.tmp" in name:
                os.remove(os.path.join(features, name))
    if merge:
        meta, bad = _read_parts(path, info)
    else:
        span = (0, None) if shard is None else byte_ranges(path, shard[1])[shard[0]]
        meta, bad = _scan(path, *span, features, workers, compress, skip_bad, progress)
    if shard is not None:
        if bad and not skip_bad:
            off, reason = min(bad)
            raise DataError("%s:%d: %s (use --skip-bad to skip and count bad rows)"
                            % (path, line_number(path, off), reason))
        os.makedirs(os.path.join(info, "parts"), exist_ok=True)
        atomic_pickle({"shard": shard[0], "shards": shard[1], "size": os.path.getsize(path),
                       "meta": meta, "bad": bad}, _part_path(info, *shard))
        log.info("shard %d/%d: %d rows, %d bad", *shard, len(meta[1]), len(bad))
        return None
    bad = [(line_number(path, off), reason) for off, reason in sorted(bad)]
    if bad and not skip_bad:
        raise DataError("%s:%d: %s (use --skip-bad to skip and count bad rows)" % (path, *bad[0]))
    ints, texts = meta
    df = pd.DataFrame({c: texts if c == "query" else ints[:, META_INTS.index(c)]
                       for c in META_COLUMNS})
    offsets = ints[:, 0].copy()
    del meta, ints, texts  # the frame holds a copy: 0.2 GB of the peak at 3 M rows
    dup = df.duplicated("product_id", keep="first")
    if dup.any():
        i = int(np.flatnonzero(dup)[0])
        line = line_number(path, int(offsets[i]))
        msg = "duplicate product_id %d (%d rows repeat an earlier product id)" \
            % (df.product_id[i], dup.sum())
        # parallel or resumed workers may have kept any of the rows' .npz: decide it here
        twice = df.product_id.duplicated(keep=False) & ~dup
        if not skip_bad:
            for pid in df.product_id[twice]:  # leave no file that a rerun would trust
                os.remove(_npz_path(features, pid))
            raise DataError("%s:%d: %s" % (path, line, msg))
        _rewrite_rows(path, offsets[np.flatnonzero(twice)].tolist(), features, compress)
        bad.append((line, msg + "; kept the first"))
        df = df[~dup]
    df = df.reset_index(drop=True)
    if bad:
        log.warning("%s: skipped %d bad rows:\n  %s", path, len(bad),
                    "\n  ".join("line %d: %s" % b for b in bad[:50]))
    build_info(df, info, kmeans_k=kmeans_k, seed=seed, min_count=min_count)
    return df


def _rewrite_rows(path, offsets, features, compress):
    """Write again the .npz of the rows that start at these byte offsets of ``path``."""
    with open(path, "rb") as f:
        for off in offsets:
            f.seek(off)
            row = parse_row(f.readline().rstrip(b"\r\n"))
            _save_row(row, _npz_path(features, row["product_id"]), compress)


def pack(features, info, out=None, fp16=False, progress=True):
    """``features/{pid}.npz`` of every train product (``info/data.pkl``) -> a PackedStore folder.

    OUT/features.npy (R, 2048) float32 (float16 with ``fp16``), OUT/boxes.npy (R, 5)
    normalised, OUT/class_labels.npy (R,) int64; OUT/index.npz: pids (P,) ascending and
    offsets (P + 1,), product k owning rows offsets[k]:offsets[k + 1]. The index is written
    last, so a killed run leaves no pack that loads. Returns OUT.
    """
    import pandas as pd
    from tqdm import tqdm
    df = pd.read_pickle(os.path.join(info, "data.pkl")).sort_values("product_id")
    pids = df.product_id.to_numpy(np.int64)
    offsets = np.zeros(len(pids) + 1, np.int64)
    np.cumsum(df.num_boxes.to_numpy(np.int64), out=offsets[1:])
    out = out or default_packed(features)
    os.makedirs(out, exist_ok=True)
    index = os.path.join(out, "index.npz")
    if os.path.exists(index):
        os.remove(index)
    R, ftype = int(offsets[-1]), np.float16 if fp16 else np.float32
    specs = dict(zip(PackedStore.FILES, [(ftype, (R, FEAT_DIM)), (np.float32, (R, 5)),
                                         (np.int64, (R,))]))
    arrays = [np.lib.format.open_memmap(os.path.join(out, name + ".tmp"), "w+", dt, shape)
              for name, (dt, shape) in specs.items()]
    store = ProductStore(features)
    for k in tqdm(range(len(pids)), desc="pack", unit="product", disable=not progress):
        parts = store.get(pids[k])
        a, b = offsets[k], offsets[k + 1]
        if len(parts[2]) != b - a:
            raise DataError("%s: %d boxes, %s/data.pkl says %d; rerun preprocess"
                            % (store.path(pids[k]), len(parts[2]), info, b - a))
        f = parts[1].astype(ftype)
        if fp16 and not np.isfinite(f).all():
            raise DataError("product %d: a feature exceeds float16's range; pack without "
                            "--fp16" % pids[k])
        for arr, x in zip(arrays, (f, parts[0], parts[2])):
            arr[a:b] = x
    for arr in arrays:
        arr.flush()
    del arrays
    for name in specs:
        os.replace(os.path.join(out, name + ".tmp"), os.path.join(out, name))
    save_npz_atomic(index, pids=pids, offsets=offsets)
    log.info("packed %d products, %d regions (%s) into %s", len(pids), R, np.dtype(ftype), out)
    return out


class Ragged:
    """A list of variable-length rows kept as one flat array plus offsets.

    Row i is ``flat[offsets[i]:offsets[i + 1]]``: an int64 array view, or with ``pool`` the
    list of ``pool[j]`` for its entries (word strings). Pickles as a few arrays instead of
    one object per row (at 3 M rows, the pickle memo of 665 k lists and 665 k arrays alone
    took 0.33 GB), and forked DataLoader workers share its pages. Indexing, ``len`` and
    iteration behave like the list of rows it replaces.
    """

    def __init__(self, flat, offsets, pool=None):
        self.flat, self.offsets = np.asarray(flat), np.asarray(offsets, np.int64)
        self.pool = None if pool is None else list(pool)
        if self.offsets.ndim != 1 or len(self.offsets) < 1 or self.offsets[0] != 0 \
                or self.offsets[-1] != len(self.flat) or (np.diff(self.offsets) < 0).any():
            raise ValueError("Ragged: offsets must rise from 0 to len(flat)")

    @classmethod
    def from_rows(cls, rows, dtype=np.int64):
        flat, off = _ragged(rows, dtype)
        return cls(flat, off)

    @classmethod
    def from_words(cls, rows):
        """[[str, ...], ...] -> Ragged over a pool of the distinct words (first-seen order)."""
        index = {}
        ids = [[index.setdefault(w, len(index)) for w in r] for r in rows]
        flat, off = _ragged(ids, np.int32)
        return cls(flat, off, list(index))

    def state(self):
        """Plain arrays and lists (what ``queries.pkl`` stores; ``Ragged(**state)`` is back)."""
        return {"flat": self.flat, "offsets": self.offsets, "pool": self.pool}

    def lengths(self):
        return np.diff(self.offsets)

    def __len__(self):
        return len(self.offsets) - 1

    def __getitem__(self, i):
        if not -len(self) <= i < len(self):
            raise IndexError("Ragged index %d out of range (%d rows)" % (i, len(self)))
        i = int(i) % len(self)
        row = self.flat[self.offsets[i]:self.offsets[i + 1]]
        return row if self.pool is None else [self.pool[j] for j in row]

    def __iter__(self):
        return (self[i] for i in range(len(self)))


def ragged_parts(rows, dtype=np.int64):
    """A Ragged of ints or a list of int sequences -> (flat, offsets)."""
    if isinstance(rows, Ragged) and rows.pool is None:
        return rows.flat.astype(dtype, copy=False), rows.offsets
    return _ragged(rows, dtype)


def atomic_pickle(obj, path):
    with open(path + ".tmp", "wb") as f:
        pickle.dump(obj, f, protocol=4)
    os.replace(path + ".tmp", path)


def atomic_json(obj, path):
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        json.dump(obj, f, ensure_ascii=False, indent=1)
    os.replace(path + ".tmp", path)


def build_info(df, info, kmeans_k=None, seed=0, min_count=1):
    """Query map, last-word groups, K-Means clusters and vocabulary -> ``info/``."""
    from sklearn.cluster import MiniBatchKMeans
    from sklearn.feature_extraction.text import TfidfVectorizer
    g = df.groupby("query_id", sort=True)
    texts = g["query"].first()
    if (g["query"].nunique() > 1).any():
        q = int(texts.index[(g["query"].nunique() > 1).values][0])
        raise DataError("train: query_id %d carries two different query texts" % q)
    atomic_pickle(df, os.path.join(info, "data.pkl"))  # after the check: no half-built info/
    qids = texts.index.to_numpy(np.int64)
    # one string per distinct word and one array cut by query: at 3 M rows, a list of new
    # strings per query and a list of Python ints per query cost 0.4 GB more at the peak
    pool = {}
    tokens = [[pool.setdefault(w, w) for w in tokenize(t)] for t in texts]
    code = np.searchsorted(qids, df.query_id.to_numpy(np.int64))
    offsets = np.zeros(len(qids) + 1, np.int64)
    np.cumsum(np.bincount(code, minlength=len(qids)), out=offsets[1:])
    products = Ragged(df.product_id.to_numpy(np.int64)[np.argsort(code, kind="stable")],
                      offsets)
    last = [ts[-1] if ts else "<empty>" for ts in tokens]
    groups = {}
    for i, w in enumerate(last):
        groups.setdefault(w, []).append(i)
    k = kmeans_k or max(2, min(1000, len(qids) // 20))
    k = min(k, len(qids))
    vec = TfidfVectorizer(analyzer=lambda s: s).fit_transform(
        [ts or ["<empty>"] for ts in tokens])
    km = MiniBatchKMeans(n_clusters=k, random_state=seed, n_init=3, batch_size=4096)
    clusters = km.fit_predict(vec).astype(np.int64)
    vocab, counts = Vocab.build(tokens, min_count)
    # Ragged rows are pickled as their plain state: the file needs no class of this project
    # to load (and utils.py run as a script would otherwise pickle __main__.Ragged)
    atomic_pickle({"query_id": qids, "text": list(texts),
                   "tokens": Ragged.from_words(tokens).state(),
                   "products": products.state(), "last_word": np.array(last, dtype=object),
                   "groups": {w: np.asarray(v, np.int64) for w, v in groups.items()},
                   "cluster": clusters}, os.path.join(info, "queries.pkl"))
    atomic_json({"itos": vocab.itos, "counts": {w: counts[w] for w in vocab.itos[4:]},
                 "min_count": min_count}, os.path.join(info, "vocab.json"))
    atomic_json({"rows": len(df), "products": int(df.product_id.nunique()),
                 "queries": len(qids), "vocab": len(vocab), "kmeans_k": k,
                 "last_word_groups": len(groups), "seed": seed},
                os.path.join(info, "meta.json"))
    log.info("info: %d rows, %d queries, %d words, %d last-word groups, %d clusters",
             len(df), len(qids), len(vocab), len(groups), k)


def load_info(info="info"):
    """-> (queries dict from ``queries.pkl``, Vocab). Only load this project's own outputs."""
    path = os.path.join(info, "queries.pkl")
    if not os.path.exists(path):
        raise DataError("%s: not found; run `python utils.py preprocess --data DATA --info %s`"
                        % (path, info))
    with open(path, "rb") as f:
        queries = pickle.load(f)
    for key in ("tokens", "products"):
        if isinstance(queries.get(key), dict):
            queries[key] = Ragged(**queries[key])
    with open(os.path.join(info, "vocab.json"), encoding="utf-8") as f:
        vocab = Vocab(json.load(f)["itos"])
    return queries, vocab


# --------------------------------------------------------------------------------------
# The official metric and the submission rules
# --------------------------------------------------------------------------------------
def rank(scored):
    """[(pid, score), ...] -> pids by score descending, ties broken by product id ascending."""
    return [int(p) for p, s in sorted(scored, key=lambda x: (-float(x[1]), int(x[0])))]


def ndcg_one(ranked, answers, k=5):
    """Official NDCG@k of one ranked list against a set of correct product ids."""
    answers = {int(a) for a in answers}
    if not answers:
        return 0.0
    dcg = sum(1.0 / math.log2(i + 2) for i, p in enumerate(ranked[:k]) if int(p) in answers)
    idcg = sum(1.0 / math.log2(i + 2) for i in range(min(len(answers), k)))
    return dcg / idcg


def ndcg_at_k(predictions, answers, k=5):
    """Mean official NDCG@k over every query of ``answers``.

    predictions: {query_id: [(pid, score), ...]} (ranked here, ties by product id) or
    {query_id: [pid, ...]} already ranked. Keys may be str or int. A query of the answer
    file missing from the predictions is an error.
    """
    preds = {int(q): v for q, v in predictions.items()}
    total = 0.0
    for q, ans in answers.items():
        if int(q) not in preds:
            raise DataError("predictions have no entry for query %s" % q)
        v = preds[int(q)]
        ranked = rank(v) if v and isinstance(v[0], (list, tuple)) else [int(p) for p in v]
        total += ndcg_one(ranked, ans, k)
    return total / max(1, len(answers))


def check_submission(rows, candidates=None, answers=None):
    """Apply the official rules to [(query_id, [5 pids]), ...]; raise DataError on a breach."""
    seen = set()
    for i, (q, pids) in enumerate(rows, start=2):
        where = "submission line %d (query %s)" % (i, q)
        if len(pids) != 5:
            raise DataError("%s: %d products, exactly 5 are required" % (where, len(pids)))
        if any(not str(p).isdigit() for p in pids):
            raise DataError("%s: empty or non-digit product id in %s" % (where, pids))
        if len(set(map(int, pids))) != 5:
            raise DataError("%s: duplicate product ids %s" % (where, pids))
        if candidates is not None:
            allowed = {r["product_id"] if isinstance(r, dict) else int(r)
                       for r in candidates[int(q)]}
            if not set(map(int, pids)) <= allowed:
                raise DataError("%s: products that are not candidates of the query" % where)
        seen.add(int(q))
    if answers is not None:
        missing = set(map(int, answers)) - seen
        if missing:
            raise DataError("submission lacks %d queries of the answer file, e.g. %d"
                            % (len(missing), min(missing)))


# --------------------------------------------------------------------------------------
# Training samples: hard negatives, (query, product) pairs, candidates, prediction files
# --------------------------------------------------------------------------------------
def _ragged(lists, dtype=np.int64):
    """[[int, ...], ...] -> (flat, offsets (len + 1,)); item i is flat[off[i]:off[i+1]]."""
    off = np.zeros(len(lists) + 1, np.int64)
    np.cumsum([len(x) for x in lists], out=off[1:])
    flat = np.zeros(int(off[-1]), dtype)
    for i, x in enumerate(lists):
        flat[off[i]:off[i + 1]] = x
    return flat, off


def _groups(labels, members):
    """labels (Q,) any hashable, members: sorted query indices to keep ->
    (group id (Q,), flat members sorted ascending within each group, offsets (G + 1,))."""
    _, gid = np.unique(np.asarray(labels), return_inverse=True)
    gid = gid.reshape(-1).astype(np.int64)
    flat = members[np.argsort(gid[members], kind="stable")]
    off = np.zeros(gid.max() + 2 if len(gid) else 1, np.int64)
    np.cumsum(np.bincount(gid[members], minlength=len(off) - 1), out=off[1:])
    return gid, flat, off


def _pick(members, exclude, rng):
    """A uniform draw from ``members`` (sorted) minus ``exclude`` (sorted, unique), or None.

    Exact and loop-free in the group size: the r-th allowed member is found by skipping the
    excluded positions, so a group holding only excluded queries costs nothing to detect.
    """
    if len(members) == 0:
        return None
    idx = np.searchsorted(members, exclude)
    hit = idx[(idx < len(members)) & (members[np.minimum(idx, len(members) - 1)] == exclude)]
    n = len(members) - len(hit)
    if n <= 0:
        return None
    r = int(rng.integers(n))
    for h in hit:  # ascending
        if h > r:
            break
        r += 1
    return int(members[r])


class NegativeSampler:
    """Hard negative queries and products (SPEC §4), from numpy arrays only.

    With probability ``p_last`` a negative query shares the query's last word; otherwise it
    comes from the query's K-Means cluster (``fallback="cluster"``, model1) or, half and
    half, from the cluster or from all queries (``"cluster_or_random"``, model2). A group
    with no allowed query falls through to the other group, then to all queries. Allowed:
    another text, no product in common with the query, at least one token and one product.
    Everything lives in flat arrays plus offsets, so forked DataLoader workers share the
    pages instead of touching (and copying) millions of Python objects.
    """

    FALLBACKS = ("cluster", "cluster_or_random")

    def __init__(self, queries, p_last=0.8, fallback="cluster"):
        if fallback not in self.FALLBACKS:
            raise ValueError("fallback must be one of %s, got %r" % (self.FALLBACKS, fallback))
        if not 0.0 <= p_last <= 1.0:
            raise ValueError("p_last must lie in [0, 1], got %r" % p_last)
        Q = len(queries["query_id"])
        if Q < 2:
            raise ValueError("negative sampling needs at least 2 queries, got %d" % Q)
        self.p_last, self.fallback = float(p_last), fallback
        self.prod_flat, self.prod_off = ragged_parts(queries["products"])
        ok = np.diff(self.prod_off) > 0
        tokens = queries.get("tokens")
        if isinstance(tokens, Ragged):
            ok &= tokens.lengths() > 0
        elif tokens is not None:
            ok &= np.array([len(t) > 0 for t in tokens], bool)
        self.allowed = np.flatnonzero(ok)
        everyone = np.arange(Q)
        self.last_id, self.last_flat, self.last_off = _groups(
            np.asarray(queries["last_word"], dtype=object).astype(str), self.allowed)
        self.clu_id, self.clu_flat, self.clu_off = _groups(queries["cluster"], self.allowed)
        self.text_id, self.text_flat, self.text_off = _groups(
            np.asarray(queries["text"], dtype=object).astype(str), everyone)
        # product -> the queries it is a positive of (real data may share products)
        owner = np.repeat(everyone, np.diff(self.prod_off))
        order = np.argsort(self.prod_flat, kind="stable")
        self.pids, counts = np.unique(self.prod_flat[order], return_counts=True)
        self.owner_flat = owner[order]
        self.owner_off = np.concatenate([[0], np.cumsum(counts)])

    def _excluded(self, qi):
        """Sorted queries that cannot be qi's negative: itself, same text, shared products."""
        ks = np.searchsorted(self.pids, self.prod_flat[self.prod_off[qi]:self.prod_off[qi + 1]])
        t = self.text_id[qi]
        parts = [self.owner_flat[self.owner_off[k]:self.owner_off[k + 1]] for k in ks]
        parts += [self.text_flat[self.text_off[t]:self.text_off[t + 1]], [qi]]
        return np.unique(np.concatenate(parts).astype(np.int64))

    def _members(self, name, qi):
        if name == "last":
            g = self.last_id[qi]
            return self.last_flat[self.last_off[g]:self.last_off[g + 1]]
        g = self.clu_id[qi]
        return self.clu_flat[self.clu_off[g]:self.clu_off[g + 1]]

    def negative_query(self, qi, rng):
        """A query index != qi, drawn as the class docstring says; rng: np.random.Generator."""
        qi = int(qi)
        u = rng.random()
        if u < self.p_last:
            order = ("last", "cluster")
        elif self.fallback == "cluster" or u < (1.0 + self.p_last) / 2:
            order = ("cluster", "last")
        else:
            order = ()
        exclude = self._excluded(qi)
        for name in order:
            j = _pick(self._members(name, qi), exclude, rng)
            if j is not None:
                return j
        j = _pick(self.allowed, exclude, rng)
        if j is None:
            raise DataError("query index %d has no possible negative: every other query shares "
                            "its text or a product, or has no tokens" % qi)
        return j

    def negative_product(self, qi, rng):
        """A product id of a fresh negative query; never a positive of qi."""
        j = self.negative_query(qi, rng)
        a, b = self.prod_off[j], self.prod_off[j + 1]
        return int(self.prod_flat[a + rng.integers(b - a)])


class PairDataset:
    """One item per positive (query, product) pair, for torch's DataLoader (map-style).

    Queries without tokens are skipped. Item i of epoch e draws its negatives from
    ``default_rng([seed, e, i])``, so it is the same whatever worker or rank loads it; call
    ``set_epoch`` before each epoch (and keep ``persistent_workers=False``, or workers keep
    the old epoch). Not a torch Dataset subclass only so that ``import utils`` needs no
    torch; the DataLoader needs nothing but ``__len__`` and ``__getitem__``.
    """

    def __init__(self, queries, vocab, store, sampler=None, seed=0, max_words=None):
        tokens = queries["tokens"]
        if isinstance(tokens, Ragged) and tokens.pool is not None:
            # encode the distinct words once, then every row by indexing
            wid = np.asarray(vocab.encode(tokens.pool), np.int32)
            flat, off = wid[tokens.flat], tokens.offsets
        else:
            flat, off = _ragged([vocab.encode(t) for t in tokens], np.int32)
        if max_words:  # keep the first max_words of every row
            n = np.diff(off)
            flat = flat[np.arange(len(flat)) - np.repeat(off[:-1], n) < max_words]
            off = np.concatenate([[0], np.cumsum(np.minimum(n, max_words))])
        self.tok_flat, self.tok_off = flat.astype(np.int32, copy=False), off
        Q = len(off) - 1
        prod_flat, prod_off = ragged_parts(queries["products"])
        counts = np.diff(prod_off)
        kept = np.repeat(np.diff(off) > 0, counts)          # per pair: its query has tokens
        self.pair_query = np.repeat(np.arange(Q, dtype=np.int64), counts)[kept]
        self.pair_product = prod_flat[kept].astype(np.int64)
        skipped = int((np.diff(off) == 0).sum())
        if skipped:
            log.warning("PairDataset: skipped %d of %d queries with no token left after "
                        "stopword removal", skipped, Q)
        if len(self.pair_query) == 0:
            raise DataError("PairDataset: no (query, product) pair to train on")
        self.store, self.sampler, self.seed, self.epoch = store, sampler, int(seed), 0

    def set_epoch(self, epoch):
        self.epoch = int(epoch)

    def __len__(self):
        return len(self.pair_query)

    def tokens(self, qi):
        return self.tok_flat[self.tok_off[qi]:self.tok_off[qi + 1]].tolist()

    def __getitem__(self, i):
        """-> {q: [ids], qi, pid, p: (boxes (n, 5), feats (n, D))} and, with a sampler,
        {nq: [ids], nqi, npid, np: (boxes (m, 5), feats (m, D))}."""
        i = int(i)
        qi, pid = int(self.pair_query[i]), int(self.pair_product[i])
        boxes, feats, _ = self.store.get(pid)
        item = {"q": self.tokens(qi), "qi": qi, "pid": pid, "p": (boxes, feats)}
        if self.sampler is not None:
            rng = np.random.default_rng([self.seed, self.epoch, i])
            nqi = self.sampler.negative_query(qi, rng)
            npid = self.sampler.negative_product(qi, rng)
            nboxes, nfeats, _ = self.store.get(npid)
            item.update(nq=self.tokens(nqi), nqi=nqi, npid=npid, np=(nboxes, nfeats))
        return item


def collate_pairs(batch, flat=False):
    """PairDataset items -> dict of tensors (L: longest query, N/M: most boxes, PAD = 0).

    q_tokens (B, L) long, q_len (B,), qi (B,), pid (B,), p_boxes (B, N, 5), p_feats (B, N, D),
    p_mask (B, N) bool (True on real boxes); caption_in (B, L+1) = [BOS] + ids,
    caption_out (B, L+1) = ids + [EOS], caption_len (B,) = q_len + 1; with negatives also
    nq_tokens (B, L'), nq_len, nqi, npid, n_boxes (B, M, 5), n_feats (B, M, D), n_mask (B, M).

    ``flat=True`` (for DataLoader workers) leaves the regions unpadded: p_boxes (R, 5),
    p_feats (R, D) and p_lengths (B,) in place of p_mask (the same for n_); ``unflatten``
    pads them where the batch arrives, giving exactly the padded batch.
    """
    import torch
    regions = flat_regions if flat else pad_regions
    qs = [b["q"] for b in batch]
    out = {}
    out["q_tokens"], out["q_len"] = pad_tokens(qs)
    out["qi"] = torch.tensor([b["qi"] for b in batch], dtype=torch.long)
    out["pid"] = torch.tensor([b["pid"] for b in batch], dtype=torch.long)
    out["p_boxes"], out["p_feats"], out["p_lengths" if flat else "p_mask"] = \
        regions([b["p"] for b in batch])
    out["caption_in"], out["caption_len"] = pad_tokens([[BOS] + q for q in qs])
    out["caption_out"], _ = pad_tokens([q + [EOS] for q in qs])
    if "nq" in batch[0]:
        out["nq_tokens"], out["nq_len"] = pad_tokens([b["nq"] for b in batch])
        out["nqi"] = torch.tensor([b["nqi"] for b in batch], dtype=torch.long)
        out["npid"] = torch.tensor([b["npid"] for b in batch], dtype=torch.long)
        out["n_boxes"], out["n_feats"], out["n_lengths" if flat else "n_mask"] = \
            regions([b["np"] for b in batch])
    return out


def collate_pairs_flat(batch):
    """``collate_pairs(batch, flat=True)``, picklable for spawned DataLoader workers."""
    return collate_pairs(batch, flat=True)


def unflatten(batch, device=None):
    """A ``collate_pairs(..., flat=True)`` batch -> the padded batch, its regions padded on
    ``device`` (default: where they are); a padded batch passes through unchanged."""
    for side in ("p", "n"):
        if side + "_lengths" in batch:
            batch[side + "_boxes"], batch[side + "_feats"], batch[side + "_mask"] = \
                pad_flat_regions(batch[side + "_boxes"], batch[side + "_feats"],
                                 batch.pop(side + "_lengths"), device)
    return batch


class CandidateSet:
    """A valid/test split laid out for scoring: encode every product once, then each query.

    Queries (sorted by id): ``qids`` (Q,) int64, ``texts``, ``tokens`` (lists of ids, EMPTY
    for a query of stopwords only: models must still score it). Products: ``pids`` (P,)
    int64, ``pos`` (P,) the position of their query, ``offsets`` (Q + 1,) so query k owns
    ``pids[offsets[k]:offsets[k+1]]``; regions in ``boxes`` (R, 5), ``feats`` (R, D) with
    ``box_off`` (P + 1,).
    """

    def __init__(self, candidates, vocab, max_boxes=None, max_words=None):
        self.qids = np.array(sorted(candidates), np.int64)
        self.texts = [candidates[q]["query"] for q in self.qids]
        self.tokens = [vocab.encode(tokenize(t))[:max_words] if max_words
                       else vocab.encode(tokenize(t)) for t in self.texts]
        rows = [candidates[q]["products"] for q in self.qids]
        self.offsets = np.concatenate([[0], np.cumsum([len(r) for r in rows])]).astype(np.int64)
        self.pos = np.repeat(np.arange(len(rows)), np.diff(self.offsets))
        flat = [r for rs in rows for r in rs]
        self.pids = np.array([r["product_id"] for r in flat], np.int64)
        regions = [row_regions(r, max_boxes) for r in flat]
        self.box_off = np.concatenate([[0], np.cumsum([len(b) for b, _, _ in regions])])
        self.boxes = (np.concatenate([b for b, _, _ in regions]) if flat
                      else np.zeros((0, 5), np.float32))
        self.feats = (np.concatenate([f for _, f, _ in regions]) if flat
                      else np.zeros((0, FEAT_DIM), np.float32))

    @classmethod
    def from_tsv(cls, path, vocab, max_boxes=None, max_words=None, skip_bad=False):
        return cls(read_candidates(path, skip_bad), vocab, max_boxes, max_words)

    def products(self):
        """{qid: [pid, ...]}, the candidates of each query (for ``load_answers``)."""
        return {int(q): self.pids[a:b].tolist()
                for q, a, b in zip(self.qids, self.offsets[:-1], self.offsets[1:])}

    def __len__(self):
        return len(self.qids)

    def product_batches(self, batch_size):
        """Yield {boxes (B, N, 5), feats (B, N, D), mask (B, N), pids (B,), pos (B,),
        index (B,) positions in ``pids``} over every product, fewest boxes first: a batch
        of alike products pads little (in file order, padding was most of the work)."""
        import torch
        order = np.argsort(np.diff(self.box_off), kind="stable")
        for s in range(0, len(self.pids), batch_size):
            idx = order[s:s + batch_size]
            items = [(self.boxes[self.box_off[k]:self.box_off[k + 1]],
                      self.feats[self.box_off[k]:self.box_off[k + 1]]) for k in idx]
            boxes, feats, mask = pad_regions(items)
            yield {"boxes": boxes, "feats": feats, "mask": mask,
                   "pids": torch.from_numpy(self.pids[idx]), "pos": torch.from_numpy(self.pos[idx]),
                   "index": torch.from_numpy(idx)}

    def query_batches(self, batch_size):
        """Yield {tokens (B, L) long, lengths (B,) (may be 0), pos (B,), qids (B,)}."""
        import torch
        for s in range(0, len(self.qids), batch_size):
            idx = np.arange(s, min(s + batch_size, len(self.qids)))
            tokens, lengths = pad_tokens([self.tokens[k] for k in idx])
            yield {"tokens": tokens, "lengths": lengths, "pos": torch.from_numpy(idx),
                   "qids": torch.from_numpy(self.qids[idx])}

    def predictions(self, scores):
        """Scores (P,) aligned with ``pids`` -> {qid: [(pid, score), ...]}."""
        scores = np.asarray(scores, np.float64).reshape(-1)
        if len(scores) != len(self.pids):
            raise ValueError("%d scores for %d candidates" % (len(scores), len(self.pids)))
        return {int(q): [(int(p), float(s)) for p, s in
                         zip(self.pids[a:b], scores[a:b])]
                for q, a, b in zip(self.qids, self.offsets[:-1], self.offsets[1:])}


def write_predictions(scores, path):
    """{qid: [(pid, score), ...]} -> ``{"<qid>": [["<pid>", score], ...]}`` (SPEC §4), each
    list in ``rank`` order (score descending, then product id), written atomically."""
    out = {}
    for q, items in scores.items():
        items = [(int(p), float(s)) for p, s in items]
        bad = [p for p, s in items if not math.isfinite(s)]
        if bad:
            raise DataError("%s: query %s: product %d has a NaN or infinite score"
                            % (path, q, bad[0]))
        if len({p for p, _ in items}) != len(items):
            raise DataError("%s: query %s lists a product twice" % (path, q))
        items.sort(key=lambda x: (-x[1], x[0]))
        out[str(int(q))] = [[str(p), s] for p, s in items]
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp%d" % os.getpid()
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(out, f)
    os.replace(tmp, path)


def load_predictions(path):
    """A prediction file -> {int qid: [(int pid, float score), ...]} in file order."""
    with open(path, encoding="utf-8") as f:
        raw = json.load(f)
    return {int(q): [(int(p), float(s)) for p, s in v] for q, v in raw.items()}


# --------------------------------------------------------------------------------------
# Seeds, checkpoints, distributed
# --------------------------------------------------------------------------------------
def seed_everything(seed, rank=0):
    import torch
    s = seed + rank
    random.seed(s)
    np.random.seed(s % 2**32)
    torch.manual_seed(s)


def save_checkpoint(state, path):
    """torch.save to a temporary file, then rename: a crash never leaves a torn checkpoint."""
    import torch
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    torch.save(state, tmp)
    os.replace(tmp, path)


def load_checkpoint(path):
    import torch
    if not os.path.exists(path):
        raise DataError("%s: checkpoint not found" % path)
    return torch.load(path, map_location="cpu", weights_only=True)


def add_launcher_args(parser):
    """Accept what every launcher passes: --local-rank=N, --local_rank N, or LOCAL_RANK."""
    parser.add_argument("--local-rank", "--local_rank", dest="local_rank", type=int,
                        default=int(os.environ.get("LOCAL_RANK", 0)), help=argparse.SUPPRESS)


class Dist:
    """Process-group state from the environment (torchrun / torch.distributed.launch)."""

    def __init__(self, local_rank=0):
        import torch
        import torch.distributed as td
        self.world = int(os.environ.get("WORLD_SIZE", 1))
        self.rank = int(os.environ.get("RANK", 0))
        self.local_rank = int(os.environ.get("LOCAL_RANK", local_rank))
        cuda = torch.cuda.is_available()
        self.device = torch.device("cuda", self.local_rank) if cuda else torch.device("cpu")
        if cuda:
            torch.cuda.set_device(self.device)
        if self.world > 1 and not td.is_initialized():
            td.init_process_group("nccl" if cuda else "gloo")
        self.enabled = self.world > 1

    @property
    def main(self):
        return self.rank == 0

    def barrier(self):
        if self.enabled:
            import torch.distributed as td
            td.barrier()

    def mean(self, values):
        """All-reduce a dict of floats to their mean over ranks (for logging)."""
        if not self.enabled:
            return values
        import torch
        import torch.distributed as td
        keys = sorted(values)
        t = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64,
                         device=self.device)
        td.all_reduce(t)
        return {k: v / self.world for k, v in zip(keys, t.tolist())}

    def close(self):
        if self.enabled:
            import torch.distributed as td
            if td.is_initialized():
                td.destroy_process_group()


def setup_logging(main=True):
    logging.basicConfig(level=logging.INFO if main else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S")


# --------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------
def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Shared data tools.")
    sub = p.add_subparsers(dest="cmd", required=True)
    pp = sub.add_parser("preprocess", help="train.tsv -> features/*.npz + info/")
    pp.add_argument("--data", required=True, help="competition data root")
    pp.add_argument("--features", help="output folder for .npz (default DATA/features)")
    pp.add_argument("--info", default=os.path.join(ROOT, "info"), help="output info folder")
    pp.add_argument("--workers", type=int, default=max(1, min(8, os.cpu_count() or 1)))
    pp.add_argument("--skip-bad", action="store_true", help="skip, count and list bad rows")
    pp.add_argument("--compress", action="store_true", help="np.savez_compressed (smaller, slower)")
    pp.add_argument("--kmeans-k", type=int, help="K-Means clusters (default queries/20, <=1000)")
    pp.add_argument("--min-count", type=int, default=1, help="vocabulary minimum count")
    pp.add_argument("--seed", type=int, default=0)
    g = pp.add_mutually_exclusive_group()
    g.add_argument("--shard", type=_shard, metavar="I/N",
                   help="convert only the I-th of N byte ranges (0 <= I < N); then --merge")
    g.add_argument("--merge", action="store_true",
                   help="build info/ from the parts of every --shard (same other flags)")
    pp.add_argument("--no-progress", action="store_true")
    pk = sub.add_parser("pack", help="features/*.npz of the train split -> one mapped store")
    pk.add_argument("--features", required=True, help="the .npz folder of preprocess")
    pk.add_argument("--info", default=os.path.join(ROOT, "info"), help="info folder of that run")
    pk.add_argument("--out", help="pack folder (default: packed/ beside --features)")
    pk.add_argument("--fp16", action="store_true", help="features as float16 (half the size)")
    pk.add_argument("--no-progress", action="store_true")
    return p.parse_args(argv)


def _shard(text):
    m = re.fullmatch(r"(\d+)/(\d+)", text)
    if not m or not int(m[1]) < int(m[2]) <= 99999:
        raise argparse.ArgumentTypeError("expected I/N with 0 <= I < N <= 99999, got %r" % text)
    return int(m[1]), int(m[2])


def main(argv=None):
    setup_logging()
    a = parse_args(argv)
    try:
        if a.cmd == "pack":
            pack(a.features, a.info, a.out, a.fp16, progress=not a.no_progress)
        else:
            preprocess(a.data, a.features, a.info, a.workers, a.skip_bad, a.compress,
                       a.kmeans_k, a.seed, a.min_count, progress=not a.no_progress,
                       shard=a.shard, merge=a.merge)
    except DataError as e:
        sys.exit("error: %s" % e)


if __name__ == "__main__":
    main()
