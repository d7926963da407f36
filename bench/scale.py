"""Scale: time and peak memory of preprocessing, packing and one training epoch per world size.

    python bench/scale.py --world tiny=/work/bench_data/tiny --world small=/work/bench_data/small \
        --world large=/work/bench_data/large --scratch /var/tmp/kddmm_scale [--rows 3000000]

For each world (train rows from its info/meta.json): `prepare.py preprocess --workers 2`,
`prepare.py pack`, then one epoch of multilabel/train.py (small preset, packed store, 0
workers, no evaluation), each a subprocess timed with the peak memory of its process tree
(RSS, and the anonymous part: RSS without the pages of mapped files, which the page cache
holds for the packed store). A straight line through the two largest worlds gives seconds
and MB per million rows, and the extrapolation to ``--rows`` (the real release: 3 M rows).

Memory grows only with the metadata (feature arrays are streamed), so it is also measured
at ``--rows`` directly: the largest world's train rows (from its info/) replicated to that
many rows (fresh product and query ids, ~4.5 rows a query as in the worlds), laid out as
preprocess holds them after the scan, then the DataFrame and info/ that preprocess builds
from them. One run per
world: the large world takes most of an hour.
"""
import argparse
import json
import os
import resource
import shutil
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [HERE, os.path.dirname(HERE)]

from common import load, report, run_timed  # noqa: E402


def measure(name, data, scratch, epoch_args):
    feats, info = os.path.join(scratch, name, "features"), os.path.join(scratch, name, "info")
    packed, out = os.path.join(scratch, name, "packed"), os.path.join(scratch, name, "ml")
    shutil.rmtree(os.path.join(scratch, name), ignore_errors=True)
    py = sys.executable
    print("%s: preprocess %s" % (name, load()), flush=True)
    pre = run_timed([py, "prepare.py", "preprocess", "--data", data, "--features", feats,
                     "--info", info, "--workers", "2", "--no-progress"])
    with open(os.path.join(info, "meta.json")) as f:
        rows = json.load(f)["rows"]
    print("%s: pack %s" % (name, load()), flush=True)
    pk = run_timed([py, "prepare.py", "pack", "--features", feats, "--info", info, "--out", packed,
                    "--no-progress"])
    print("%s: one epoch %s" % (name, load()), flush=True)
    ep = run_timed([py, "multilabel/train.py", "--data", data, "--info", info, "--features", feats,
                    "--store", "packed", "--packed", packed, "--out", out, "--epochs", "1",
                    "--no-eval", "--no-progress", "--workers", "0"] + epoch_args)
    with open(os.path.join(out, "log.jsonl")) as f:
        epoch_s = json.loads(f.readline())["time_s"]
    return {"rows": rows, "preprocess": pre, "pack": pk, "epoch": ep, "epoch_s": epoch_s,
            "info": info}


def metadata_at(info, rows, out):
    """In this process: preprocess's metadata half at ``rows`` rows -> prints peak RSS (MB)."""
    import numpy as np
    import pandas as pd
    import prepare
    import utils
    q, _ = utils.load_info(info)
    n = q["products"].lengths()
    pid, boxes, qid = q["products"].flat, q["num_boxes"].flat, np.repeat(q["query_id"], n)
    text = [t for t, k in zip(q["text"], n) for _ in range(k)]
    del q
    reps = int(np.ceil(rows / len(pid)))
    qmax, pmax, size = int(qid.max()) + 1, int(pid.max()) + 1, np.full(len(pid), 800)
    ints = np.concatenate([np.stack([np.arange(len(pid)) * 40000 + k, pid + k * pmax, size,
                                     size, boxes, qid + k * qmax], 1)
                           for k in range(reps)])[:rows]
    texts = []
    for k in range(reps):  # one string per query text, as the scan's workers return them
        fresh = {t: "%s v%d" % (t, k) for t in set(text)}
        texts += [fresh[t] for t in text]
    texts = texts[:rows]
    del text
    os.makedirs(out, exist_ok=True)
    ints, texts = prepare._meta(ints, texts)
    df = pd.DataFrame({c: texts if c == "query" else ints[:, prepare.META_INTS.index(c)]
                       for c in prepare.META_COLUMNS})
    del ints, texts  # as preprocess does
    prepare.build_info(df, out)
    print(json.dumps({"rows": len(df), "queries": int(df.query_id.nunique()),
                      "peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))


def main(argv=None):
    if argv is None and sys.argv[1:2] == ["metadata"]:
        return metadata_at(sys.argv[2], int(float(sys.argv[3])), sys.argv[4])
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--world", action="append", required=True, metavar="NAME=DATA")
    p.add_argument("--scratch", default="/var/tmp/kddmm_scale")
    p.add_argument("--rows", type=float, default=3e6, help="extrapolate to this many rows")
    p.add_argument("--preset", default="small", help="multilabel preset of the epoch")
    a = p.parse_args(argv)
    worlds = [w.split("=", 1) for w in a.world]
    res = {name: measure(name, data, a.scratch, ["--preset", a.preset]) for name, data in worlds}
    table = []
    for name, _ in worlds:
        r = res[name]
        table.append(("%s: train rows" % name, r["rows"], "rows"))
        for step, label in (("preprocess", "preprocess (2 workers)"), ("pack", "pack"),
                            ("epoch", "one multilabel epoch")):
            table += [("%s: %s time (whole command)" % (name, label), r[step]["wall_s"], "s"),
                      ("%s: %s peak RSS" % (name, label), r[step]["peak_tree_mb"], "MB"),
                      ("%s: %s peak anonymous memory" % (name, label),
                       r[step]["peak_anon_mb"], "MB")]
        table.append(("%s: the epoch alone (log.jsonl time_s)" % name, r["epoch_s"], "s"))
    (n1, _), (n2, _) = sorted(worlds, key=lambda w: res[w[0]]["rows"])[-2:]
    r1, r2 = res[n1], res[n2]
    meta = json.loads(run_timed([sys.executable, os.path.abspath(__file__), "metadata",
                                 r2["info"], str(int(a.rows)),
                                 os.path.join(a.scratch, "meta_info")])["stdout"].splitlines()[-1])
    shutil.rmtree(a.scratch, ignore_errors=True)
    table.append(("metadata half of preprocess at %d rows, %d queries: peak RSS (measured)"
                  % (meta["rows"], meta["queries"]), meta["peak_mb"], "MB"))
    drows = (r2["rows"] - r1["rows"]) / 1e6
    for what, get, unit in (
            ("preprocess time", lambda r: r["preprocess"]["wall_s"], "s"),
            ("preprocess peak anonymous memory", lambda r: r["preprocess"]["peak_anon_mb"], "MB"),
            ("pack time", lambda r: r["pack"]["wall_s"], "s"),
            ("pack peak anonymous memory", lambda r: r["pack"]["peak_anon_mb"], "MB"),
            ("epoch time", lambda r: r["epoch_s"], "s"),
            ("epoch peak anonymous memory", lambda r: r["epoch"]["peak_anon_mb"], "MB")):
        slope = (get(r2) - get(r1)) / drows
        table.append(("%s per million rows (%s -> %s)" % (what, n1, n2), slope, unit))
        table.append(("%s at %.3g rows (extrapolated)" % (what, a.rows),
                      get(r2) + slope * (a.rows - r2["rows"]) / 1e6, unit))
    report(table, "scale: one run per world", "python bench/scale.py %s --scratch %s --preset %s"
           % (" ".join("--world " + w for w in a.world), a.scratch, a.preset))
    print(load())


if __name__ == "__main__":
    main()
