"""One-time data preparation: the competition's train.tsv -> one ``{product_id}.npz`` per
product and ``info/`` (the queries, their tokens and products, K-Means clusters, the
vocabulary); optionally every train product packed into one memory-mapped store.

    python prepare.py preprocess --data DATA [--features DATA/features] [--info info] [--workers 2]
    python prepare.py pack --features DATA/features --info info [--out DATA/packed] [--fp16]

Across machines: ``preprocess ... --shard I/N`` for every I (any order, in parallel), then
``preprocess ... --merge``. Every file is written atomically and a rerun skips the products
already written (once their CRC-32 shows them whole, and converted from the same train.tsv:
``claim_features``), so a killed run is resumed by running it again (docs/data.md).
"""
import argparse
import io
import json
import logging
import multiprocessing as mp
import os
import shutil
import pickle
import re
import struct
import sys
import zipfile
import zlib

import numpy as np

import provenance
import runtime
import utils
from errors import DataError
from text import Vocab, tokenize
from tsv import FEAT_DIM, check_finished, iter_lines, line_number, line_numbers, \
    parse_row

META_COLUMNS = ["product_id", "image_h", "image_w", "num_boxes", "query", "query_id"]
META_INTS = ["offset", "product_id", "image_h", "image_w", "num_boxes", "query_id"]
SOURCE = ".source.json"  # in features/: the content fingerprint of the train.tsv converted
NPZ_MEMBERS = {"features.npy", "boxes.npy", "class_labels.npy", "image_hw.npy"}
log = logging.getLogger("kddmm")


# --------------------------------------------------------------------------------------
# The .npz writer
# --------------------------------------------------------------------------------------
def _npy_bytes(a):
    """The .npy (format 1.0) header of a C-contiguous array, as ``np.save`` writes it."""
    d = "{'descr': %r, 'fortran_order': False, 'shape': %r, }" % (
        np.lib.format.dtype_to_descr(a.dtype), a.shape)
    d += " " * ((-(10 + len(d) + 1)) % 64) + "\n"   # the data starts 64-byte aligned
    return b"\x93NUMPY\x01\x00" + struct.pack("<H", len(d)) + d.encode("latin1")


def npz_parts(arrays):
    """{name: array} -> the byte strings of an uncompressed .npz (a stored zip of .npy
    members), without copying the arrays: what ``np.savez`` writes, minus zipfile's
    per-member bookkeeping (a large part of the per-row cost of preprocessing)."""
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


def npz_intact(path):
    """Whether ``path`` is a whole .npz: every member present and matching its CRC-32. A
    torn file, or one with a flipped byte, is not; neither is a missing one."""
    try:
        with open(path, "rb") as f:
            data = f.read()
        with zipfile.ZipFile(io.BytesIO(data)) as z:
            infos = z.infolist()
            if {i.filename for i in infos} != NPZ_MEMBERS:
                return False
            if any(i.compress_type != zipfile.ZIP_STORED for i in infos):  # --compress
                return z.testzip() is None
            for i in infos:  # stored: the CRC of the bytes in place (testzip takes 5x longer)
                o = i.header_offset
                if data[o:o + 4] != b"PK\x03\x04":
                    return False
                start = o + 30 + sum(struct.unpack_from("<HH", data, o + 26))
                member = memoryview(data)[start:start + i.file_size]
                if len(member) != i.file_size or zlib.crc32(member) != i.CRC:
                    return False
        return True
    except (OSError, zipfile.BadZipFile, zlib.error, struct.error, EOFError):
        return False


def save_npz_atomic(path, compress=False, **arrays):
    """np.savez(_compressed) to ``path``, atomically."""
    if compress:
        buf = io.BytesIO()  # zipfile seeks back to patch each member: keep that off the disk
        np.savez_compressed(buf, **arrays)
        parts = [buf.getbuffer()]
    else:
        parts = npz_parts(arrays)
    with utils.atomic_open(path, "wb") as f:
        f.writelines(parts)


# --------------------------------------------------------------------------------------
# Preprocessing
# --------------------------------------------------------------------------------------
def byte_ranges(path, n, start=0, end=None):
    """[start, end) of a file (default: all of it) cut into n byte ranges."""
    end = os.path.getsize(path) if end is None else end
    cuts = [start + (end - start) * i // n for i in range(n + 1)]
    return list(zip(cuts[:-1], cuts[1:]))


def _save_row(row, path, compress):
    save_npz_atomic(path, compress, features=row["features"], boxes=row["boxes"],
                    class_labels=row["class_labels"],
                    image_hw=np.array([row["image_h"], row["image_w"]], np.int64))


def _meta(ints, texts):
    """Metadata of preprocessed rows, compact: (ints (n, 6) int64 by META_INTS, texts).

    An int64 array where a tuple per row would take five times the memory, and a query text
    repeated on many rows (one per matching product) is one string.
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
            pid = text[:text.find(b"\t")]
            out = utils.npz_path(features, pid) if pid.isdigit() and len(pid) <= 19 else None
            # a file already there (a rerun) is kept only when whole: decoding the row again
            # costs 5x checking it
            row = parse_row(text, with_arrays=out is None or not npz_intact(out))
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


def _scan(path, span, *, features, workers, compress, skip_bad, progress):
    """Rows of ``path`` that start in the byte range ``span`` = (start, end or None) -> their
    .npz, across ``workers`` processes.

    Returns (meta (``_meta``) in file order, bad [(byte offset, reason)]).
    """
    n_jobs = max(1, workers) * 8  # small jobs keep the progress bar and the workers busy
    jobs = [(path, s, e, features, compress, skip_bad)
            for s, e in byte_ranges(path, n_jobs, *span)]
    meta, bad = [], []
    from tqdm import tqdm
    bar = tqdm(total=len(jobs), desc="preprocess", unit="chunk", disable=not progress)
    if workers > 1:
        with mp.get_context("spawn").Pool(workers) as pool:
            results = pool.imap(_preprocess_range, jobs)
            # while the workers convert, this process would only wait: load what building
            # info/ needs (pandas, scikit-learn: seconds of imports) in the meantime
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


def _pickle(obj, path):
    with utils.atomic_open(path, "wb") as f:
        pickle.dump(obj, f, protocol=4)


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


def preprocess(data, *, features=None, info="info", workers=1, skip_bad=False, compress=False,
               kmeans_k=None, seed=0, min_count=1, progress=True, shard=None, merge=False):
    """train.tsv -> ``features/{pid}.npz`` + ``info/``. Returns the train DataFrame.

    ``shard=(i, n)`` converts only the i-th of n byte ranges and writes its metadata to
    ``info/parts/`` (returns None); once every shard is done, ``merge=True`` builds ``info/``
    from the parts exactly as a single run would.
    """
    import pandas as pd
    check_finished(data)
    path = os.path.join(data, "train", "train.tsv")
    if not os.path.exists(path):
        raise DataError("%s: not found (is --data a competition data root?)" % path)
    features = features or os.path.join(data, "features")
    os.makedirs(features, exist_ok=True)
    os.makedirs(info, exist_ok=True)
    if not merge:  # the merge writes no .npz; it checks the parts against train.tsv
        claim_features(features, path, sharded=shard is not None)
    if shard is None:  # shards run side by side: the merge clears what killed ones left
        for name in os.listdir(features):  # temporaries of a killed run were never renamed
            if ".npz.tmp" in name:
                os.remove(os.path.join(features, name))
    if merge:
        meta, bad = _read_parts(path, info)
    else:
        span = (0, None) if shard is None else byte_ranges(path, shard[1])[shard[0]]
        meta, bad = _scan(path, span, features=features, workers=workers, compress=compress,
                          skip_bad=skip_bad, progress=progress)
    if shard is not None:
        if bad and not skip_bad:
            off, reason = min(bad)
            raise DataError("%s:%d: %s (use --skip-bad to skip and count bad rows)"
                            % (path, line_number(path, off), reason))
        os.makedirs(os.path.join(info, "parts"), exist_ok=True)
        _pickle({"shard": shard[0], "shards": shard[1], "size": os.path.getsize(path),
                 "meta": meta, "bad": bad}, _part_path(info, *shard))
        log.info("shard %d/%d: %d rows, %d bad", *shard, len(meta[1]), len(bad))
        return None
    bad = sorted(bad)
    bad = list(zip(line_numbers(path, [off for off, _ in bad]), (reason for _, reason in bad)))
    if bad and not skip_bad:
        raise DataError("%s:%d: %s (use --skip-bad to skip and count bad rows)" % (path, *bad[0]))
    if not len(meta[1]):
        raise DataError("%s: no good rows (%d bad rows skipped); %s/ left as it was"
                        % (path, len(bad), info))
    ints, texts = meta
    df = pd.DataFrame({c: texts if c == "query" else ints[:, META_INTS.index(c)]
                       for c in META_COLUMNS})
    offsets = ints[:, 0].copy()
    del meta, ints, texts  # the frame holds a copy: free the scan's before building info/
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
                os.remove(utils.npz_path(features, pid))
            raise DataError("%s:%d: %s" % (path, line, msg))
        _rewrite_rows(path, offsets[np.flatnonzero(twice)].tolist(), features, compress)
        bad.append((line, msg + "; kept the first"))
        df, offsets = df[~dup], offsets[~dup.to_numpy()]
    df = df.reset_index(drop=True)
    if bad:
        log.warning("%s: skipped %d bad rows:\n  %s", path, len(bad),
                    "\n  ".join("line %d: %s" % b for b in bad[:50]))
    build_info(df, info, kmeans_k=kmeans_k, seed=seed, min_count=min_count,
               where=lambda i: (path, line_number(path, int(offsets[i]))))
    return df


def claim_features(features, path, sharded=False):
    """Make ``features`` the .npz folder of the train.tsv at ``path``: a rerun keeps the
    whole .npz it finds, which is right only for the same rows, and a world regenerated in
    place keeps its product ids. ``features/.source.json`` holds the content fingerprint of
    the train.tsv converted (``provenance.content``: size and the sha256 of its ends); the
    .npz of another train.tsv, or of an unknown one, are removed (by a sharded run, an
    error: the other shards are writing there)."""
    marker, want = os.path.join(features, SOURCE), provenance.content(path)
    try:
        with open(marker, encoding="utf-8") as f:
            have = json.load(f)
    except (FileNotFoundError, ValueError):
        have = None
    if have == want:
        return
    old = [name for name in os.listdir(features) if name.endswith(".npz")]
    if old and sharded:
        raise DataError("%s: holds the .npz files of another train.tsv than %s; delete it, "
                        "then run every shard again" % (features, path))
    if old:
        log.warning("%s: %d .npz files of another train.tsv removed; every row is converted"
                    % (features, len(old)))
    for name in old:
        os.remove(os.path.join(features, name))
    utils.atomic_json(want, marker)


def _rewrite_rows(path, offsets, features, compress):
    """Write again the .npz of the rows that start at these byte offsets of ``path``."""
    with open(path, "rb") as f:
        for off in offsets:
            f.seek(off)
            row = parse_row(f.readline().rstrip(b"\r\n"))
            _save_row(row, utils.npz_path(features, row["product_id"]), compress)


def pack(features, info, out=None, fp16=False, progress=True):
    """``features/{pid}.npz`` of every train product of ``info/`` -> a PackedStore folder.

    OUT/features.npy (R, 2048) float32 (float16 with ``fp16``), OUT/boxes.npy (R, 5)
    normalised, OUT/class_labels.npy (R,) int64; OUT/index.npz: pids (P,) ascending and
    offsets (P + 1,), product k owning rows offsets[k]:offsets[k + 1]. The index is written
    last, so a killed run leaves no pack that loads. Returns OUT.
    """
    from tqdm import tqdm
    queries, _ = utils.load_info(info)
    if not len(queries["products"].flat):
        raise DataError("%s: lists no products; nothing to pack (rerun preprocess)"
                        % os.path.join(info, "queries.pkl"))
    order = np.argsort(queries["products"].flat, kind="stable")
    pids = queries["products"].flat[order]
    offsets = np.zeros(len(pids) + 1, np.int64)
    np.cumsum(queries["num_boxes"].flat[order], out=offsets[1:])
    out = out or utils.default_packed(features)
    os.makedirs(out, exist_ok=True)
    index = os.path.join(out, "index.npz")
    if os.path.exists(index):
        os.remove(index)
    R, ftype = int(offsets[-1]), np.float16 if fp16 else np.float32
    specs = dict(zip(utils.PackedStore.FILES, [(ftype, (R, FEAT_DIM)), (np.float32, (R, 5)),
                                               (np.int64, (R,))]))
    need = sum(np.dtype(dt).itemsize * int(np.prod(shape)) for dt, shape in specs.values())
    free = shutil.disk_usage(out).free
    if need > free:  # a memory-mapped write to a full disk is a SIGBUS, not an error
        raise DataError("%s: the packed store needs %.2f GB, the disk has %.2f GB free; free "
                        "space or pack to another --out" % (out, need / 1e9, free / 1e9))
    arrays = [np.lib.format.open_memmap(os.path.join(out, name + ".tmp"), "w+", dt, shape)
              for name, (dt, shape) in specs.items()]
    store = utils.ProductStore(features)
    for k in tqdm(range(len(pids)), desc="pack", unit="product", disable=not progress):
        parts = store.get(pids[k])
        a, b = offsets[k], offsets[k + 1]
        if len(parts[2]) != b - a:
            raise DataError("%s: %d boxes, %s/queries.pkl says %d; rerun preprocess"
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


# --------------------------------------------------------------------------------------
# info/
# --------------------------------------------------------------------------------------
def _two_texts(df, where=None):
    """A DataError naming the first query id whose rows carry two texts, or None.

    where: row position -> (file, line), for a message that points at both rows.
    """
    g = df.groupby("query_id", sort=True)["query"]
    odd = np.flatnonzero((df["query"] != g.transform("first")).to_numpy())
    if not len(odd):
        return None
    j = int(odd[0])
    q = int(df.query_id.iat[j])
    i = int(np.flatnonzero((df.query_id == q).to_numpy())[0])
    a, b = df["query"].iat[i], df["query"].iat[j]
    if where is None:
        return DataError("train: query_id %d has two different texts: %r and %r" % (q, a, b))
    (path, li), (_, lj) = where(i), where(j)
    return DataError("%s:%d: query_id %d has two different texts: %r (line %d) and %r (line %d)"
                     % (path, lj, q, a, li, b, lj))


def build_info(df, info, *, kmeans_k=None, seed=0, min_count=1, where=None):
    """The train rows (a DataFrame of META_COLUMNS) -> ``info/``: every query with its text,
    tokens, last word, K-Means cluster, products and their box counts; the vocabulary.

    where: row position -> (file, line), for errors. The files are replaced together or not
    at all.
    """
    from sklearn.cluster import MiniBatchKMeans
    from sklearn.feature_extraction.text import TfidfVectorizer
    if not len(df):
        raise DataError("no train rows to build %s/ from" % info)
    err = _two_texts(df, where)
    if err:
        raise err
    texts = df.groupby("query_id", sort=True)["query"].first()
    qids = texts.index.to_numpy(np.int64)
    # one string per distinct word and arrays cut by query: with millions of rows, new
    # strings and Python ints per query were most of the peak memory
    pool = {}
    tokens = [[pool.setdefault(w, w) for w in tokenize(t)] for t in texts]
    code = np.searchsorted(qids, df.query_id.to_numpy(np.int64))
    offsets = np.zeros(len(qids) + 1, np.int64)
    np.cumsum(np.bincount(code, minlength=len(qids)), out=offsets[1:])
    order = np.argsort(code, kind="stable")
    products = utils.Ragged(df.product_id.to_numpy(np.int64)[order], offsets)
    num_boxes = utils.Ragged(df.num_boxes.to_numpy(np.int64)[order], offsets)
    last = [ts[-1] if ts else "<empty>" for ts in tokens]
    k = kmeans_k or max(2, min(1000, len(qids) // 20))
    k = min(k, len(qids))
    vec = TfidfVectorizer(analyzer=lambda s: s).fit_transform(
        [ts or ["<empty>"] for ts in tokens])
    km = MiniBatchKMeans(n_clusters=k, random_state=seed, n_init=3, batch_size=4096)
    clusters = km.fit_predict(vec).astype(np.int64)
    vocab, counts = Vocab.build(tokens, min_count)
    # Ragged rows are pickled as their plain state: the file needs no class of this project
    # to load
    queries = {"query_id": qids, "text": list(texts),
               "tokens": utils.Ragged.from_words(tokens).state(), "products": products.state(),
               "num_boxes": num_boxes.state(), "last_word": np.array(last, dtype=object),
               "cluster": clusters}
    meta = {"rows": len(df), "products": int(df.product_id.nunique()), "queries": len(qids),
            "vocab": len(vocab), "kmeans_k": k, "last_word_groups": len(set(last)), "seed": seed}
    utils.write_together(info, {
        "queries.pkl": lambda p: _pickle(queries, p),
        "vocab.json": lambda p: utils.atomic_json(
            {"itos": vocab.itos, "counts": {w: counts[w] for w in vocab.itos[4:]},
             "min_count": min_count}, p),
        "meta.json": lambda p: utils.atomic_json(meta, p)})
    log.info("info: %d rows, %d queries, %d words, %d last-word groups, %d clusters",
             len(df), len(qids), len(vocab), len(set(last)), k)


# --------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------
def parse_args(argv=None):
    p = argparse.ArgumentParser(description="One-time data preparation.")
    sub = p.add_subparsers(dest="cmd", required=True)
    pp = sub.add_parser("preprocess", help="train.tsv -> features/*.npz + info/")
    pp.add_argument("--data", required=True, help="competition data root")
    pp.add_argument("--features", help="output folder for .npz (default DATA/features)")
    pp.add_argument("--info", default=os.path.join(utils.ROOT, "info"),
                    help="output info folder")
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
    pk.add_argument("--info", default=os.path.join(utils.ROOT, "info"),
                    help="info folder of that run")
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
    runtime.setup_logging()
    a = parse_args(argv)
    try:
        if a.cmd == "pack":
            pack(a.features, a.info, a.out, a.fp16, progress=not a.no_progress)
        else:
            preprocess(a.data, features=a.features, info=a.info, workers=a.workers,
                       skip_bad=a.skip_bad, compress=a.compress, kmeans_k=a.kmeans_k,
                       seed=a.seed, min_count=a.min_count, progress=not a.no_progress,
                       shard=a.shard, merge=a.merge)
    except DataError as e:
        sys.exit("error: %s" % e)


if __name__ == "__main__":
    main()
