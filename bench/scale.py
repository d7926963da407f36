"""Scale: time and peak memory of preprocessing, packing and one training epoch per world size.

    python bench/scale.py --world tiny=/work/bench_data/tiny --world small=/work/bench_data/small \
        --world large=/work/bench_data/large --scratch /var/tmp/kddmm_scale [--rows 3000000]

For each world (train rows from its info/meta.json): `utils.py preprocess --workers 2`,
`utils.py pack`, then one epoch of multilabel/train.py (small preset, packed store, 0
workers, no evaluation), each a subprocess timed with the peak summed RSS of its process
tree. Then a straight line through the two largest worlds gives seconds and MB per
million rows, and the extrapolation to ``--rows`` (the real release: 3 M rows). One run
per world: the large world takes most of an hour.
"""
import argparse
import json
import os
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
    pre = run_timed([py, "utils.py", "preprocess", "--data", data, "--features", feats,
                     "--info", info, "--workers", "2", "--no-progress"])
    with open(os.path.join(info, "meta.json")) as f:
        rows = json.load(f)["rows"]
    print("%s: pack %s" % (name, load()), flush=True)
    pk = run_timed([py, "utils.py", "pack", "--features", feats, "--info", info, "--out", packed,
                    "--no-progress"])
    print("%s: one epoch %s" % (name, load()), flush=True)
    ep = run_timed([py, "multilabel/train.py", "--data", data, "--info", info, "--features", feats,
                    "--store", "packed", "--packed", packed, "--out", out, "--epochs", "1",
                    "--no-eval", "--no-progress", "--workers", "0"] + epoch_args)
    with open(os.path.join(out, "log.jsonl")) as f:
        epoch_s = json.loads(f.readline())["time_s"]
    shutil.rmtree(os.path.join(scratch, name), ignore_errors=True)
    return {"rows": rows, "preprocess": pre, "pack": pk, "epoch": ep, "epoch_s": epoch_s}


def main(argv=None):
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
        table += [("%s: train rows" % name, r["rows"], "rows"),
                  ("%s: preprocess (2 workers) time" % name, r["preprocess"]["wall_s"], "s"),
                  ("%s: preprocess peak memory" % name, r["preprocess"]["peak_tree_mb"], "MB"),
                  ("%s: pack time" % name, r["pack"]["wall_s"], "s"),
                  ("%s: pack peak memory" % name, r["pack"]["peak_tree_mb"], "MB"),
                  ("%s: one multilabel epoch (whole command)" % name, r["epoch"]["wall_s"], "s"),
                  ("%s: one multilabel epoch (the epoch alone)" % name, r["epoch_s"], "s"),
                  ("%s: epoch peak memory" % name, r["epoch"]["peak_tree_mb"], "MB")]
    (n1, _), (n2, _) = sorted(worlds, key=lambda w: res[w[0]]["rows"])[-2:]
    r1, r2 = res[n1], res[n2]
    drows = (r2["rows"] - r1["rows"]) / 1e6
    for what, get, unit in (
            ("preprocess time", lambda r: r["preprocess"]["wall_s"], "s"),
            ("preprocess peak memory", lambda r: r["preprocess"]["peak_tree_mb"], "MB"),
            ("pack time", lambda r: r["pack"]["wall_s"], "s"),
            ("epoch time", lambda r: r["epoch_s"], "s"),
            ("epoch peak memory", lambda r: r["epoch"]["peak_tree_mb"], "MB")):
        slope = (get(r2) - get(r1)) / drows
        table.append(("%s per million rows (%s -> %s)" % (what, n1, n2), slope, unit))
        table.append(("%s at %.3g rows (extrapolated)" % (what, a.rows),
                      get(r2) + slope * (a.rows - r2["rows"]) / 1e6, unit))
    report(table, "scale: one run per world", "python bench/scale.py %s --scratch %s --preset %s"
           % (" ".join("--world " + w for w in a.world), a.scratch, a.preset))
    print(load())


if __name__ == "__main__":
    main()
