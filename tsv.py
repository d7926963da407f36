"""The competition's TSV format: the columns, one row parsed and checked, candidate splits.

Every split of a data root is a TSV with a header row and the nine ``COLUMNS``; ``boxes``,
``features`` and ``class_labels`` are base64 arrays (docs/data.md). Only the standard library
and numpy: the generator, the preprocessing workers and every stage read the format here.
"""
import base64
import binascii
import logging
import math
import os
import sys

import numpy as np

from errors import DataError

FEAT_DIM = 2048
N_CLASSES = 33
# Bottom-up-attention features are non-negative with maxima in the tens: a value beyond
# this is a broken row, and one at 3e38 turns every weight into NaN at the first step
FEATURE_LIMIT = 1e4
INT64_MAX = 2 ** 63 - 1  # ids and sizes become int64 arrays (and ids file names)
COLUMNS = ["product_id", "image_h", "image_w", "num_boxes", "boxes", "features",
           "class_labels", "query", "query_id"]
log = logging.getLogger("kddmm")


# synthetic.py writes this file into a data root first and removes it last: a generator
# stopped part-way (train.tsv written, no valid split yet) leaves it behind. A real release
# never has it.
GENERATING = ".generating"


def check_finished(root):
    """A DataError when ``root`` is a generated world that synthetic.py did not finish."""
    if os.path.exists(os.path.join(root, GENERATING)):
        raise DataError("%s: a generated world that synthetic.py did not finish (%s is there): "
                        "regenerate it with synthetic.py, or delete it" % (root, GENERATING))


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
    (``bytes.split`` copies it, a large part of parsing a row)."""
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
        if len(v) > 19 or int(v) > INT64_MAX:  # the length first: int() of 5000 digits raises
            raise ValueError("%s %s%s is beyond int64 (at most %d)"
                             % (name, _ascii(v[:25]), "..." if len(v) > 25 else "", INT64_MAX))
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
        lo, hi = f.min(), f.max()  # NaN propagates: one test for range and NaN
        if not (-FEATURE_LIMIT <= lo and hi <= FEATURE_LIMIT) or not np.isfinite(b).all():
            if not np.isfinite(f).all() or not np.isfinite(b).all():
                raise ValueError("features or boxes contain NaN or infinity")
            raise ValueError("a feature is %g, beyond the limit |x| <= %g (tsv.FEATURE_LIMIT)"
                             % (hi if hi > FEATURE_LIMIT else lo, FEATURE_LIMIT))
        if c.min() < 0 or c.max() >= N_CLASSES:
            raise ValueError("class label outside 0..%d" % (N_CLASSES - 1))
        tol = 1.0  # detectors emit boxes a pixel past the border
        top, left, bottom, right = b.T  # whole-column reductions: few numpy calls per row
        if ((bottom < top).any() or (right < left).any() or b[:, :2].min() < -tol
                or bottom.max() > h + tol or right.max() > w + tol):
            raise ValueError("box outside the %dx%d image or with bottom<top / right<left" % (h, w))
        row.update(boxes=b, features=f, class_labels=c)
    return row


def check_header(path, line):
    """The first line of a split must name the nine COLUMNS in their order: rows are read by
    position, so columns in another order would be read as the wrong fields."""
    header = line.rstrip(b"\r\n").decode("utf-8", "replace").split("\t")
    if header == COLUMNS:
        return
    if sorted(header) == sorted(COLUMNS):
        raise DataError("%s:1: the columns are in another order (%s); rows are read by "
                        "position, in the competition's order %s: reorder the file"
                        % (path, ", ".join(header), ", ".join(COLUMNS)))
    raise DataError("%s:1: missing header row or not the columns %s (got %r)"
                    % (path, ", ".join(COLUMNS), header[:3]))


def iter_lines(path, start=0, end=None, raw=False):
    """Yield (byte offset, text) of the data lines whose first byte lies in [start, end).

    text is None for a truncated last line, a ValueError for a line that is not UTF-8, and
    with ``raw`` the line's bytes (not decoded: ``parse_row`` decodes only the query).
    """
    with open(path, "rb") as f:
        if start == 0:
            check_header(path, f.readline())
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


def line_numbers(path, offsets):
    """1-based line numbers of the lines starting at the byte ``offsets`` (any order), counted
    in one pass up to the last of them: a pass per offset would be quadratic in bad rows."""
    out, n, done = [0] * len(offsets), 1, 0
    with open(path, "rb") as f:
        for i in sorted(range(len(offsets)), key=offsets.__getitem__):
            while done < offsets[i]:
                chunk = f.read(min(1 << 24, offsets[i] - done))
                if not chunk:
                    break
                n += chunk.count(b"\n")
                done += len(chunk)
            out[i] = n
    return out


def line_number(path, offset):
    """1-based line number of the line starting at byte ``offset``."""
    return line_numbers(path, [offset])[0]


def read_candidates(path, skip_bad=False, with_arrays=True):
    """Read a valid/test TSV -> {query_id: {"query": str, "products": [row dicts]}}.

    Candidate splits are small (about 15k rows) and read directly, as the original did.
    A product listed twice for one query is a bad row (it would count twice in NDCG), as
    is a query id whose rows carry two texts. ``with_arrays=False``: ids and texts only.
    """
    out, bad, first = {}, [], {}  # first: query id, (query id, product id) -> first line
    for line, (_, text) in enumerate(iter_lines(path), start=2):
        try:
            if text is None:
                raise ValueError("truncated last line")
            if isinstance(text, Exception):
                raise text
            row = parse_row(text, with_arrays)
            q, pid = row["query_id"], row["product_id"]
            if (q, pid) in first:
                raise ValueError("query %d lists product %d again (first on line %d)"
                                 % (q, pid, first[q, pid]))
        except ValueError as e:
            msg = "%s:%d: %s" % (path, line, e)
            if not skip_bad:
                raise DataError(msg) from None
            bad.append(msg)
            continue
        if q in out and out[q]["query"] != row["query"]:
            raise DataError("%s:%d: query_id %d has two different texts: %r (line %d) and %r "
                            "(line %d)" % (path, line, q, out[q]["query"], first[q], row["query"],
                                           line))
        first.setdefault(q, line)
        first[q, pid] = line
        out.setdefault(q, {"query": row["query"], "products": []})["products"].append(row)
    if not out:
        raise DataError("%s: no %s after the header; a candidate split lists one query at "
                        "least" % (path, "good rows (%d bad rows skipped)" % len(bad) if bad
                                   else "rows"))
    if bad:
        log.warning("%s: skipped %d bad rows:\n  %s", path, len(bad), "\n  ".join(bad[:20]))
    return out
