"""Hand-made competition rows for the bad-input tests: one good row of a 500x400 picture,
and a TSV written as bytes (so that invalid UTF-8 survives)."""
import os

import numpy as np

import synthetic
import tsv


def make_row(pid, query="red dress", qid=5, n=2, boxes=None, feats=None, labels=None):
    """One TSV line (str, with its newline)."""
    feats = np.random.default_rng(int(pid)).random((n, 2048), dtype=np.float32) \
        if feats is None else feats
    boxes = np.array([[0, 0, 100, 100]] * n, np.float32) if boxes is None else boxes
    labels = np.zeros(n, np.int64) if labels is None else labels
    return synthetic.tsv_row(pid, (500, 400, np.asarray(boxes, np.float32),
                                   np.asarray(feats, np.float32), labels), query, qid)


def write_tsv(path, rows, header=tsv.COLUMNS):
    """rows: str or bytes lines, after a header row of ``header``."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(("\t".join(header) + "\n").encode())
        f.writelines(r.encode() if isinstance(r, str) else r for r in rows)
    return path
