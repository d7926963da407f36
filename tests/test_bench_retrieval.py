"""bench/retrieval.py on a tiny synthetic gallery: exact search finds itself, every index
reports its figures, and the table is printed."""
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "bench"))

import pytest  # noqa: E402

import retrieval  # noqa: E402

FIELDS = {"index", "setting", "build_s", "peak_mb", "batched_qps", "single_qps", "single_n",
          "recall", "meets"}


def test_tiny_gallery(tmp_path, capsys):
    pytest.importorskip("faiss")
    results = retrieval.main([
        "--n", "2000", "--queries", "20", "--dim", "32", "--in-process",
        "--scratch", str(tmp_path), "--hnsw-ef", "100", "--nlist", "40", "--ivf-nprobe", "2", "40",
        "--repeats", "1", "--single", "5", "--threads", "1"])
    assert [(r["index"], r["setting"]) for r in results] == [
        ("exact", ""), ("flat", ""), ("hnsw", "efSearch 100"), ("ivf", "nprobe 2"),
        ("ivf", "nprobe 40")]
    for r in results:
        assert FIELDS <= set(r), r
        assert r["batched_qps"] > 0 and r["single_n"] == 5 and 0 <= r["recall"] <= 1
    by = {(r["index"], r["setting"]): r for r in results}
    assert by["exact", ""]["recall"] == 1.0
    assert by["flat", ""]["recall"] > 0.99  # exact too, ties in faiss's order
    # nprobe 40 of 40 lists scans the whole gallery
    assert by["ivf", "nprobe 40"]["recall"] > 0.99 > by["ivf", "nprobe 2"]["recall"]
    out = capsys.readouterr().out
    assert "| index | setting | build s | peak RSS MB |" in out
    assert "reproduce: python bench/retrieval.py --n 2000 --queries 20 --dim 32 --threads 1 " \
        "--hnsw-ef 100 --nlist 40 --ivf-nprobe 2 40 --repeats 1 --single 5 --in-process" in out
    assert os.listdir(tmp_path) == []  # the scratch folder is removed
