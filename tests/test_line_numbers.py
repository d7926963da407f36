"""Bad rows are named by their line, and finding the lines of many bad rows reads the file
once: counting the lines again from the start for each bad row is quadratic in them."""
import logging
import os

import numpy as np
import pytest

import prepare
import synthetic
import tsv


def _write(path, n=40, bad=range(3, 40, 4)):
    """A split of ``n`` one-box rows; rows ``bad`` have a tab in their query (10 columns).
    -> (file size, the line numbers of the bad rows)."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    feats = np.ones((1, tsv.FEAT_DIM), np.float32)
    prod = (500, 400, np.array([[0, 0, 100, 100]], np.float32), feats, np.zeros(1, np.int64))
    with open(path, "w") as f:
        f.write("\t".join(tsv.COLUMNS) + "\n")
        for i in range(n):
            query = "red\tdress" if i in bad else "red dress %d" % (i % 5)
            f.write(synthetic.tsv_row(100000001 + i, prod, query, 5 + i % 5))
    return os.path.getsize(path), [i + 2 for i in bad]


@pytest.fixture
def bytes_read(monkeypatch):
    """Bytes that the tsv module reads from files, however it opens them."""
    total = [0]

    class Counted:
        def __init__(self, f):
            self.f = f

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

        def __iter__(self):
            for line in self.f:
                total[0] += len(line)
                yield line

        def read(self, *a):
            b = self.f.read(*a)
            total[0] += len(b)
            return b

        def readline(self, *a):
            b = self.f.readline(*a)
            total[0] += len(b)
            return b

        def __getattr__(self, name):
            return getattr(self.f, name)

    monkeypatch.setattr(tsv, "open", lambda *a, **k: Counted(open(*a, **k)), raising=False)
    return total


def test_line_numbers_in_one_pass(tmp_path, bytes_read):
    path = str(tmp_path / "x.tsv")
    _write(path)
    with open(path, "rb") as f:
        starts = [0]
        for line in f:
            starts.append(starts[-1] + len(line))
    offsets = starts[:-1][::-1]  # any order, repeats allowed
    assert tsv.line_numbers(path, offsets + offsets[:2]) == \
        list(range(len(offsets), 0, -1)) + [len(offsets), len(offsets) - 1]
    assert tsv.line_number(path, starts[7]) == 8
    assert tsv.line_numbers(path, []) == []


def test_many_bad_candidate_rows_read_the_file_once(tmp_path, bytes_read, caplog):
    path = str(tmp_path / "valid" / "valid.tsv")
    size, lines = _write(path)
    with caplog.at_level(logging.WARNING, logger="kddmm"):
        tsv.read_candidates(path, skip_bad=True)
    assert "skipped %d bad rows" % len(lines) in caplog.text
    assert "valid.tsv:%d: expected 9" % lines[-1] in caplog.text
    assert bytes_read[0] <= 1.5 * size, bytes_read[0] / size


def test_many_bad_train_rows_read_the_file_twice_at_most(tmp_path, bytes_read, caplog):
    data = str(tmp_path / "d")
    size, lines = _write(os.path.join(data, "train", "train.tsv"))
    with caplog.at_level(logging.WARNING, logger="kddmm"):
        prepare.preprocess(data, info=str(tmp_path / "i"), skip_bad=True, progress=False)
    assert "skipped %d bad rows" % len(lines) in caplog.text
    assert "line %d: expected 9" % lines[-1] in caplog.text
    assert bytes_read[0] <= 2.5 * size, bytes_read[0] / size  # the scan, then the lines
