"""experiments/compare.py: the paired difference of NDCG@5 and its bootstrap interval."""
import json
import math
import os
import sys

import numpy as np
import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                "experiments"))
import compare  # noqa: E402
from tsv import DataError  # noqa: E402


def write(path, obj):
    with open(path, "w") as f:
        json.dump(obj, f)
    return str(path)


@pytest.fixture
def world(tmp_path):
    """Two queries, answers {1} and {12}; A ranks both answers first; B ranks query 1's
    answer second and query 2's first; the submission C equals B."""
    ans = write(tmp_path / "ans.json", {"1": [1], "2": [12]})
    a = write(tmp_path / "a.json", {"1": [["1", 0.9], ["2", 0.5]], "2": [["12", 0.8], ["11", 0.1]]})
    b = write(tmp_path / "b.json", {"1": [["2", 0.9], ["1", 0.5]], "2": [["12", 0.8], ["11", 0.1]]})
    c = tmp_path / "c.csv"
    c.write_text("query-id,product1,product2,product3,product4,product5\n"
                 "1,2,1,3,4,5\n2,12,11,13,14,15\n")
    return ans, a, b, str(c)


def test_per_query_scores_by_hand(world):
    ans, a, b, c = world
    sa, sb = compare.paired_scores(ans, a, b)
    assert sa.tolist() == [1.0, 1.0]
    assert sb.tolist() == pytest.approx([1 / math.log2(3), 1.0])
    assert compare.paired_scores(ans, c, b)[0].tolist() == pytest.approx(sb.tolist())


def test_interval_of_identical_and_of_uniformly_better(world):
    ans, a, b, _ = world
    r = compare.compare([(ans, a, a)], resamples=200)
    assert r["pooled"] == (0.0, 0.0, 0.0)
    d = 1 - 1 / math.log2(3)
    mean, lo, hi = compare.compare([(ans, a, b)], resamples=2000)["pooled"]
    assert mean == pytest.approx(d / 2)
    assert 0 <= lo <= mean <= hi <= d  # a resample holds 0, 1 or 2 copies of query 1


def test_bootstrap_pools_queries_and_covers_the_truth():
    rng = np.random.default_rng(0)
    big, small = rng.normal(0.05, 0.3, 2000), rng.normal(-1.0, 0.3, 10)
    mean, lo, hi = compare.bootstrap([big, small], resamples=1000)
    assert mean == pytest.approx(np.concatenate([big, small]).mean())  # weighs by size
    assert lo < mean < hi and hi - lo < 0.06
    _, wlo, whi = compare.bootstrap([big, small], resamples=1000, worlds=True)
    assert whi - wlo > 0.5  # two worlds that disagree: the worlds interval says so


def test_bad_submission_is_named(tmp_path, world):
    ans, a, _, _ = world
    bad = tmp_path / "bad.csv"
    bad.write_text("query-id,product1,product2,product3,product4,product5\n1,2,x,3,4,5\n")
    with pytest.raises(DataError, match=r"bad.csv:2"):
        compare.paired_scores(ans, str(bad), a)
    with pytest.raises(SystemExit, match="not found"):
        compare.main(["--answers", ans, a, str(tmp_path / "missing.json")])


def test_command_prints_the_table(world, capsys):
    ans, a, b, _ = world
    compare.main(["--world", ans, a, b, "--world", ans, a, a, "--resamples", "200"])
    out = capsys.readouterr().out
    assert "pooled over queries" in out and "worlds resampled too" in out
