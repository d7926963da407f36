"""What every stage shares: the product stores, padding and the collate, the training and
candidate datasets, atomic writes.

Around it: ``tsv.py`` reads the competition's files, ``text.py`` tokenizes and holds the
vocabulary, ``prepare.py`` turns them once into
per-product files and ``info/``, ``sampler.py`` draws the hard negatives, ``metric.py``
scores and writes predictions, and ``runtime.py`` holds seeds, checkpoints and the
distributed helpers. Importing this module loads no torch (the preprocessing
workers need none): the functions that build tensors import it themselves.
"""
import contextlib
import errno
import inspect
import json
import logging
import os
import pickle
import shutil
import zipfile
import zlib

import numpy as np

from errors import DataError
from text import BOS, EOS, PAD, Vocab, tokenize
from tsv import FEAT_DIM, read_candidates

ROOT = os.path.dirname(os.path.abspath(__file__))
log = logging.getLogger("kddmm")


# --------------------------------------------------------------------------------------
# Files written whole or not at all
# --------------------------------------------------------------------------------------
@contextlib.contextmanager
def atomic_open(path, mode="w", **kwargs):
    """``open(path, mode)`` for writing, through a temporary file that is renamed over
    ``path`` when the block ends: a crash never leaves a torn file, and a failed write
    leaves the previous one. Text is UTF-8 unless ``encoding`` says otherwise. A full disk
    is a DataError naming ``path``."""
    if "b" not in mode:
        kwargs.setdefault("encoding", "utf-8")
    tmp = "%s.tmp%d" % (path, os.getpid())
    try:
        with disk_full_named(path), open(tmp, mode, **kwargs) as f:
            yield f
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        raise
    os.replace(tmp, path)


@contextlib.contextmanager
def disk_full_named(path):
    """A write that fails for want of space (``ENOSPC``, ``EDQUOT``, or torch's writer
    failing on a disk with no space left) -> a DataError naming ``path``."""
    try:
        yield
    except (OSError, RuntimeError) as e:
        folder = os.path.dirname(os.path.abspath(path))
        full = getattr(e, "errno", None) in (errno.ENOSPC, errno.EDQUOT) or (
            isinstance(e, RuntimeError) and "write" in str(e).lower()
            and shutil.disk_usage(folder).free < 1 << 20)
        if not full:
            raise
        raise DataError("%s: cannot write it: no space left on the disk (%s); the previous "
                        "file, if any, is kept. Free space or write elsewhere" % (path, e)) from None


def atomic_json(obj, path):
    with atomic_open(path) as f:
        json.dump(obj, f, ensure_ascii=False, indent=1)


def write_together(folder, writers, remove=()):
    """{name: write(path)} -> every file written under a temporary name, then all renamed:
    a failure on the way leaves ``folder`` as it was (never a new queries.pkl beside an old
    vocab.json, nor a new valid prediction file beside an old test one). ``remove``: names of
    the same set that this run does not write (a plot of another member count, the figures
    of answers this data root lacks), removed just before the renames, so an earlier run's
    file never passes for this run's."""
    os.makedirs(folder, exist_ok=True)
    tmp = {name: os.path.join(folder, name + ".new") for name in writers}
    try:
        for name, write in writers.items():
            write(tmp[name])
    except BaseException:
        for p in tmp.values():
            if os.path.exists(p):
                os.remove(p)
        raise
    for name in remove:
        if name not in writers and os.path.exists(os.path.join(folder, name)):
            os.remove(os.path.join(folder, name))
    for name, p in tmp.items():
        os.replace(p, os.path.join(folder, name))


def write_folder(folder, writers):
    """{name: write(path)} -> a folder of exactly those files, replacing ``folder`` whole:
    they are written into a new folder beside it, which is then renamed over it. A reader
    sees the old set or the new one, never a mix; a failure on the way leaves the old."""
    folder = os.path.abspath(folder)
    new, old = folder + ".new%d" % os.getpid(), folder + ".old%d" % os.getpid()
    os.makedirs(new)
    try:
        for name, write in writers.items():
            path = os.path.join(new, name)
            with disk_full_named(path):
                write(path)
    except BaseException:
        shutil.rmtree(new, ignore_errors=True)
        raise
    if os.path.exists(folder):
        os.replace(folder, old)
    os.replace(new, folder)
    shutil.rmtree(old, ignore_errors=True)


# --------------------------------------------------------------------------------------
# Boxes, the product stores and padding
# --------------------------------------------------------------------------------------
def normalize_boxes(boxes, h, w):
    """(n, 4) pixel boxes (top, left, bottom, right) -> (n, 5) in [0, 1] plus the area."""
    b = np.asarray(boxes, np.float32) / np.array([h, w, h, w], np.float32)
    b = np.clip(b, 0.0, 1.0)
    area = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    return np.concatenate([b, area[:, None]], 1).astype(np.float32)


def npz_path(features, pid):
    """Where preprocessing writes product ``pid``'s arrays: named by the integer, so that an
    id written with a leading zero lands where the readers look."""
    return os.path.join(features, "%d.npz" % int(pid))


def check_max_boxes(max_boxes):
    """None keeps every box; 0 or a negative count would silently mean all boxes or drop
    them all (NaN from an empty mean)."""
    if max_boxes is not None and max_boxes < 1:
        raise DataError("max_boxes must be >= 1 (None keeps every box), got %d" % max_boxes)
    return max_boxes


CORRUPT = (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile, zlib.error)


class ProductStore:
    """Per-product ``.npz`` files, opened lazily and closed at once.

    ``get(pid)`` -> (boxes (n, 5) normalised, features (n, 2048) float32, labels (n,)).
    """

    def __init__(self, folder, max_boxes=None):
        self.folder, self.max_boxes = folder, check_max_boxes(max_boxes)

    def path(self, pid):
        return npz_path(self.folder, int(pid))

    def get(self, pid):
        path = self.path(pid)
        try:
            with np.load(path) as z:
                h, w = z["image_hw"]
                boxes, feats, labels = z["boxes"], z["features"], z["class_labels"]
        except FileNotFoundError:
            raise DataError("%s: missing; rerun `python prepare.py preprocess`" % path) from None
        except CORRUPT as e:
            raise DataError("%s: corrupt or unreadable (%s); rerun `python prepare.py "
                            "preprocess`, which rewrites it" % (path, e)) from None
        k = self.max_boxes or len(labels)
        return normalize_boxes(boxes[:k], h, w), np.asarray(feats[:k], np.float32), labels[:k]


def default_packed(features):
    """Where ``pack`` writes by default: ``packed/`` beside the .npz folder."""
    return os.path.join(os.path.dirname(os.path.abspath(features)), "packed")


class PackedStore:
    """The train products in one memory-mapped array plus offsets (``python prepare.py pack``).

    ``get(pid)`` returns what ProductStore.get returns (a float16 pack is widened back to
    float32). Forked workers share the mapped pages; pickling (spawned workers) reopens the
    files instead of copying them.
    """
    FILES = ("features.npy", "boxes.npy", "class_labels.npy")

    def __init__(self, folder, max_boxes=None):
        self.folder, self.max_boxes = folder, check_max_boxes(max_boxes)
        index = os.path.join(folder, "index.npz")
        if not os.path.exists(index):
            raise DataError("%s: not found; run `python prepare.py pack --out %s`"
                            % (index, folder))
        path = index
        try:
            with np.load(index) as z:
                self.pids, self.offsets = z["pids"], z["offsets"]
            # plain ndarray views of the maps: slicing a np.memmap costs microseconds more
            arrays = []
            for name in self.FILES:
                path = os.path.join(folder, name)
                arrays.append(np.load(path, mmap_mode="r").view(np.ndarray))
        except CORRUPT as e:
            raise DataError("%s: corrupt or unreadable (%s); rerun `python prepare.py pack`"
                            % (path, e)) from None
        self.feats, self.boxes, self.labels = arrays

    def __getstate__(self):
        return {"folder": self.folder, "max_boxes": self.max_boxes}

    def __setstate__(self, state):
        self.__init__(state["folder"], state["max_boxes"])

    def get(self, pid):
        k = int(np.searchsorted(self.pids, pid))
        if k == len(self.pids) or self.pids[k] != pid:
            raise DataError("product %d is not in %s; rerun `python prepare.py pack`"
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
    for i, s in enumerate(seqs):  # numpy: a torch.as_tensor per row is slow
        out[i, :len(s)] = s
    return torch.from_numpy(out), torch.tensor([len(s) for s in seqs], dtype=torch.long)


# --------------------------------------------------------------------------------------
# Ragged rows and info/
# --------------------------------------------------------------------------------------
def _ragged(lists, dtype=np.int64):
    """[[int, ...], ...] -> (flat, offsets (len + 1,)); item i is flat[off[i]:off[i+1]]."""
    off = np.zeros(len(lists) + 1, np.int64)
    np.cumsum([len(x) for x in lists], out=off[1:])
    flat = np.zeros(int(off[-1]), dtype)
    for i, x in enumerate(lists):
        flat[off[i]:off[i + 1]] = x
    return flat, off


class Ragged:
    """A list of variable-length rows kept as one flat array plus offsets.

    Row i is ``flat[offsets[i]:offsets[i + 1]]``: an int64 array view, or with ``pool`` the
    list of ``pool[j]`` for its entries (word strings). Pickles as a few arrays instead of
    one object per row (the pickle memo of millions of small lists and arrays was most of
    preprocessing's peak memory), and forked DataLoader workers share its pages. Indexing,
    ``len`` and iteration behave like the list of rows it replaces.
    """

    def __init__(self, flat, offsets, pool=None):
        self.flat, self.offsets = np.asarray(flat), np.asarray(offsets, np.int64)
        self.pool = None if pool is None else list(pool)
        if self.offsets.ndim != 1 or len(self.offsets) < 1 or self.offsets[0] != 0 \
                or self.offsets[-1] != len(self.flat) or (np.diff(self.offsets) < 0).any():
            raise ValueError("Ragged: offsets must rise from 0 to len(flat)")

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


RAGGED_KEYS = ("tokens", "products", "num_boxes")  # queries.pkl keys stored as Ragged state


def load_info(info="info"):
    """-> (queries dict from ``queries.pkl``, Vocab). Only load this project's own outputs.

    The rows stored as plain ``Ragged.state()`` dicts (``tokens``, ``products`` and
    ``num_boxes``) come back as Ragged.
    """
    path = os.path.join(info, "queries.pkl")
    if not os.path.exists(path):
        raise DataError("%s: not found; run `python prepare.py preprocess --data DATA --info %s`"
                        % (path, info))
    with open(path, "rb") as f:
        queries = pickle.load(f)
    for key in RAGGED_KEYS:
        queries[key] = Ragged(**queries[key])
    with open(os.path.join(info, "vocab.json"), encoding="utf-8") as f:
        vocab = Vocab(json.load(f)["itos"])
    return queries, vocab


# --------------------------------------------------------------------------------------
# Training pairs, the collate, candidate sets
# --------------------------------------------------------------------------------------
class PairDataset:
    """One item per positive (query, product) pair, for torch's DataLoader (map-style).

    Queries without tokens are skipped. Item i of epoch e draws its negatives from
    ``default_rng([seed, e, i])``, so it is the same whatever worker or rank loads it; call
    ``set_epoch`` before each epoch (and keep ``persistent_workers=False``, or workers keep
    the old epoch). Not a torch Dataset subclass only so that ``import utils`` needs no
    torch; the DataLoader needs nothing but ``__len__`` and ``__getitem__``.
    """

    def __init__(self, queries, vocab, store, sampler=None, seed=0, labels=False):
        tokens = queries["tokens"]
        if isinstance(tokens, Ragged) and tokens.pool is not None:
            # encode the distinct words once, then every row by indexing
            wid = np.asarray(vocab.encode(tokens.pool), np.int32)
            flat, off = wid[tokens.flat], tokens.offsets
        else:
            flat, off = _ragged([vocab.encode(t) for t in tokens], np.int32)
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
        self.labels = labels  # also carry each region's detector class (model4 reads them)

    def set_epoch(self, epoch):
        self.epoch = int(epoch)

    def __len__(self):
        return len(self.pair_query)

    def tokens(self, qi):
        return self.tok_flat[self.tok_off[qi]:self.tok_off[qi + 1]].tolist()

    def __getitem__(self, i):
        """-> {q: [ids], qi, pid, p: (boxes (n, 5), feats (n, D))} and, with a sampler,
        {nq: [ids], nqi, npid, np: (boxes (m, 5), feats (m, D))}; with ``labels`` also
        pl (n,) and nl (m,), the regions' detector classes."""
        i = int(i)
        qi, pid = int(self.pair_query[i]), int(self.pair_product[i])
        boxes, feats, labels = self.store.get(pid)
        item = {"q": self.tokens(qi), "qi": qi, "pid": pid, "p": (boxes, feats)}
        if self.labels:
            item["pl"] = labels
        if self.sampler is not None:
            rng = np.random.default_rng([self.seed, self.epoch, i])
            nqi = self.sampler.negative_query(qi, rng)
            npid = self.sampler.negative_product(qi, rng)
            nboxes, nfeats, nlabels = self.store.get(npid)
            item.update(nq=self.tokens(nqi), nqi=nqi, npid=npid, np=(nboxes, nfeats))
            if self.labels:
                item["nl"] = nlabels
        return item


def collate_pairs(batch, flat=False):
    """PairDataset items -> what the models' ``forward`` reads (L: longest query, N/M: most
    boxes, PAD = 0).

    q_tokens (B, L) long, qi (B,) query indices, pid (B,) product ids, p_boxes (B, N, 5), p_feats (B, N, D),
    p_mask (B, N) bool (True on real boxes); caption_in (B, L+1) = [BOS] + ids,
    caption_out (B, L+1) = ids + [EOS]; with negatives also nq_tokens (B, L'), npid (B,),
    n_boxes (B, M, 5), n_feats (B, M, D), n_mask (B, M); items with detector classes add
    p_labels (B, N) and n_labels (B, M), long, 0 on padding.

    ``flat=True`` leaves the regions unpadded: p_boxes (R, 5), p_feats (R, D) and
    p_lengths (B,) in place of p_mask (the same for n_); ``unflatten`` pads them where the
    batch arrives, giving exactly the padded batch.
    """
    import torch
    regions = flat_regions if flat else pad_regions
    qs = [b["q"] for b in batch]
    out = {}
    out["q_tokens"], _ = pad_tokens(qs)
    out["qi"] = torch.tensor([b["qi"] for b in batch], dtype=torch.long)
    out["pid"] = torch.tensor([b["pid"] for b in batch], dtype=torch.long)
    out["p_boxes"], out["p_feats"], out["p_lengths" if flat else "p_mask"] = \
        regions([b["p"] for b in batch])
    out["caption_in"], _ = pad_tokens([[BOS] + q for q in qs])
    out["caption_out"], _ = pad_tokens([q + [EOS] for q in qs])
    if "nq" in batch[0]:
        out["nq_tokens"], _ = pad_tokens([b["nq"] for b in batch])
        out["npid"] = torch.tensor([b["npid"] for b in batch], dtype=torch.long)
        out["n_boxes"], out["n_feats"], out["n_lengths" if flat else "n_mask"] = \
            regions([b["np"] for b in batch])
    for side in ("p", "n"):  # a few integers a region: padded even in a flat batch
        if side + "l" in batch[0]:
            out[side + "_labels"], _ = pad_tokens([b[side + "l"] for b in batch])
    return out


# the keys of a training batch as ``collate_pairs`` and ``unflatten`` give it; a model's
# ``forward`` reads some of them by name
BATCH_KEYS = frozenset(["q_tokens", "qi", "pid", "p_boxes", "p_feats", "p_mask", "p_labels",
                        "caption_in", "caption_out", "nq_tokens", "npid", "n_boxes",
                        "n_feats", "n_mask", "n_labels"])


def forward_keys(forward):
    """The batch keys a model's ``forward`` reads: its parameters, named one by one (a
    ``**kwargs`` would swallow a misspelt key)."""
    params = inspect.signature(forward).parameters.values()
    loose = [p.name for p in params if p.kind in (p.VAR_KEYWORD, p.VAR_POSITIONAL)]
    if loose:
        raise TypeError("%s takes *%s: name each batch key it reads (utils.BATCH_KEYS)"
                        % (forward.__qualname__, loose[0]))
    return [p.name for p in params]


def batch_inputs(batch, keys):
    """A training batch -> {key: tensor} of the ``keys`` its model's forward reads
    (``forward_keys``). A key forward reads that the batch lacks, or a batch key that
    forward does not read and that is not in BATCH_KEYS, is a KeyError: a misspelt key on
    either side is never dropped silently."""
    missing = [k for k in keys if k not in batch]
    stray = sorted(set(batch) - set(keys) - BATCH_KEYS)
    if missing or stray:
        raise KeyError("the batch lacks %s that forward reads; it holds %s that is not a batch "
                       "key (utils.BATCH_KEYS)" % (missing, stray))
    return {k: batch[k] for k in keys}


def collate_pairs_flat(batch):
    """``collate_pairs(batch, flat=True)``, picklable: what DataLoader workers should send
    (see ``flat_regions``)."""
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
    ``pids[offsets[k]:offsets[k+1]]``; regions in ``boxes`` (R, 5), ``feats`` (R, D),
    ``labels`` (R,) detector classes, with ``box_off`` (P + 1,).
    """

    def __init__(self, candidates, vocab, max_boxes=None):
        check_max_boxes(max_boxes)
        qids = sorted(candidates)
        rows = [candidates[q]["products"] for q in qids]
        self._fill(qids, [candidates[q]["query"] for q in qids], vocab,
                   [[r["product_id"] for r in rs] for rs in rows],
                   [row_regions(r, max_boxes) for rs in rows for r in rs])

    def _fill(self, qids, texts, vocab, pids, regions):
        """qids ascending, their texts, their product ids (a list per query), the regions
        (boxes, feats, labels) of every product of every query one after the other."""
        self.qids = np.array(qids, np.int64)
        self.texts = texts
        self.tokens = [vocab.encode(tokenize(t)) for t in self.texts]
        self.offsets = np.concatenate([[0], np.cumsum([len(r) for r in pids])]).astype(np.int64)
        self.pos = np.repeat(np.arange(len(pids)), np.diff(self.offsets))
        self.pids = np.array([p for ps in pids for p in ps], np.int64)
        self.box_off = np.concatenate([[0], np.cumsum([len(b) for b, _, _ in regions])])
        self.boxes = (np.concatenate([b for b, _, _ in regions]) if regions
                      else np.zeros((0, 5), np.float32))
        self.feats = (np.concatenate([f for _, f, _ in regions]) if regions
                      else np.zeros((0, FEAT_DIM), np.float32))
        self.labels = (np.concatenate([c for _, _, c in regions]).astype(np.int64)
                       if regions else np.zeros(0, np.int64))

    @classmethod
    def from_tsv(cls, path, vocab, max_boxes=None, skip_bad=False):
        return cls(read_candidates(path, skip_bad), vocab, max_boxes)

    @classmethod
    def from_products(cls, queries, vocab, get):
        """{qid: (query text, [pid, ...])} and ``get(pid)`` -> (boxes, feats, labels) as
        ``ProductStore.get`` returns them: any products for any queries, read from wherever
        ``get`` reads them (no candidate TSV); a query's products keep their order."""
        self = cls.__new__(cls)
        qids = sorted(queries)
        self._fill(qids, [queries[q][0] for q in qids], vocab, [queries[q][1] for q in qids],
                   [get(p) for q in qids for p in queries[q][1]])
        return self

    def products(self):
        """{qid: [pid, ...]}, the candidates of each query (for ``load_answers``)."""
        return {int(q): self.pids[a:b].tolist()
                for q, a, b in zip(self.qids, self.offsets[:-1], self.offsets[1:])}

    def __len__(self):
        return len(self.qids)

    def product_batches(self, batch_size):
        """Yield {boxes (B, N, 5), feats (B, N, D), mask (B, N), labels (B, N) detector
        classes (0 on padding), pids (B,), pos (B,), index (B,) positions in ``pids``} over
        every product, fewest boxes first: a batch of alike products pads little (in file
        order, most of the work was padding)."""
        import torch
        order = np.argsort(np.diff(self.box_off), kind="stable")
        for s in range(0, len(self.pids), batch_size):
            idx = order[s:s + batch_size]
            spans = [slice(self.box_off[k], self.box_off[k + 1]) for k in idx]
            boxes, feats, mask = pad_regions([(self.boxes[r], self.feats[r]) for r in spans])
            labels, _ = pad_tokens([self.labels[r] for r in spans])
            yield {"boxes": boxes, "feats": feats, "mask": mask, "labels": labels,
                   "pids": torch.from_numpy(self.pids[idx]), "pos": torch.from_numpy(self.pos[idx]),
                   "index": torch.from_numpy(idx)}

    def predictions(self, scores):
        """Scores (P,) aligned with ``pids`` -> {qid: [(pid, score), ...]}."""
        scores = np.asarray(scores, np.float64).reshape(-1)
        if len(scores) != len(self.pids):
            raise ValueError("%d scores for %d candidates" % (len(scores), len(self.pids)))
        return {int(q): [(int(p), float(s)) for p, s in
                         zip(self.pids[a:b], scores[a:b])]
                for q, a, b in zip(self.qids, self.offsets[:-1], self.offsets[1:])}
