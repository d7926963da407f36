"""Preprocessing: the floor loop beside `prepare.py preprocess` with 1 and 2 workers (and 2 shards).

    python bench/preprocess.py --data /work/bench_data/large --scratch /var/tmp/kddmm_pre \
        [--repeats 3] [--shards]

The scratch folder decides much: a file create cost 20 us to 1 ms of system time on the
disk of the machine these figures come from, and nothing on tmpfs (/dev/shm): the script
measures creates/s in the scratch folder before every run and prints them.

Floor: one process reads train.tsv line by line, base64-decodes boxes, features and labels
and np.saves them into one file per row: no checks, no zip container, no metadata, no info/
-- the least any converter must do. Each repeat runs the floor, then preprocess with 1 and
with 2 workers (and, with --shards, `--shard 0/2` and `--shard 1/2` side by side plus
`--merge`), in a rotated order, each a fresh subprocess writing into an emptied scratch
folder. Prints MB/s and rows/s of the whole command (info/ included), the ratios of each
repeat, and the peak summed RSS of the process tree. Medians over the repeats.
"""
import argparse
import base64
import json
import os
import shutil
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [HERE, os.path.dirname(HERE)]

import numpy as np  # noqa: E402

from common import (ROOT, TreeMemory, children_cpu, load, rate, report,  # noqa: E402
                    run_timed)


def floor(tsv, out, part=(0, 1)):
    """Read, decode, np.save the rows starting in byte range ``part`` (i, n); prints the
    row count."""
    os.makedirs(out, exist_ok=True)
    rows = 0
    size = os.path.getsize(tsv)
    start, end = size * part[0] // part[1], size * (part[0] + 1) // part[1]
    with open(tsv, "rb") as f:
        if start == 0:
            f.readline()
        else:
            f.seek(start - 1)
            f.readline()
        pos = f.tell()
        while pos < end:
            raw = f.readline()
            if not raw:
                break
            pos += len(raw)
            c = raw.split(b"\t")
            n = int(c[3])
            with open(os.path.join(out, c[0].decode() + ".npy"), "wb") as g:
                np.save(g, np.frombuffer(base64.b64decode(c[4]), np.float32).reshape(n, 4))
                np.save(g, np.frombuffer(base64.b64decode(c[5]), np.float32).reshape(n, 2048))
                np.save(g, np.frombuffer(base64.b64decode(c[6]), np.int64))
            rows += 1
    print(json.dumps({"rows": rows}))


def floor_pair(data, scratch):
    """Two floor processes on the two halves of the file, side by side: how far this machine
    lets two processes of the bare loop scale -> (wall s, CPU s, peak tree MB)."""
    c0, t0 = children_cpu(), time.perf_counter()
    procs = [subprocess.Popen([sys.executable, os.path.abspath(__file__), "floor", "--data",
                               data, "--scratch", scratch, "--part", "%d/2" % i],
                              stdout=subprocess.DEVNULL) for i in range(2)]
    mems = [TreeMemory(p.pid) for p in procs]
    if any(p.wait() for p in procs):
        raise RuntimeError("a floor process failed")
    peak = sum(m.stop() for m in mems) / 2**20
    return time.perf_counter() - t0, children_cpu() - c0, peak


def shards_then_merge(data, features, info):
    """Two shards as parallel processes, then the merge -> (wall s, peak tree MB)."""
    base = [sys.executable, "prepare.py", "preprocess", "--data", data, "--features", features,
            "--info", info, "--workers", "1", "--no-progress"]
    c0, t0 = children_cpu(), time.perf_counter()
    procs = [subprocess.Popen(base + ["--shard", "%d/2" % i], cwd=ROOT,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
             for i in range(2)]
    mems = [TreeMemory(p.pid) for p in procs]
    if any(p.wait() for p in procs):
        raise RuntimeError("a shard failed")
    peak = sum(m.stop() for m in mems) / 2**20
    merged = run_timed(base + ["--merge"])
    return time.perf_counter() - t0, children_cpu() - c0, max(peak, merged["peak_tree_mb"])


def creates_per_s(folder, n=500):
    """Empty files created (and removed) per second in ``folder``: what a file costs here."""
    os.makedirs(folder, exist_ok=True)
    t0 = time.perf_counter()
    for i in range(n):
        os.close(os.open(os.path.join(folder, "%d" % i), os.O_WRONLY | os.O_CREAT, 0o644))
    dt = time.perf_counter() - t0
    shutil.rmtree(folder)
    return n / dt


def breakdown(tsv, n=1500):
    """CPU microseconds per row of each step, in this process, on the first n rows."""
    import io
    import prepare
    import tsv
    with open(tsv, "rb") as f:
        f.readline()
        lines = [f.readline() for _ in range(n)]
    lines = [x for x in lines if x]
    rows = [tsv.parse_row(x.rstrip(b"\n")) for x in lines]

    def floor_decode():
        for x in lines:
            [base64.b64decode(c) for c in x.split(b"\t")[4:7]]

    def floor_save():
        for r in rows:
            g = io.BytesIO()
            for k in ("boxes", "features", "class_labels"):
                np.save(g, r[k])

    def npz():
        for r in rows:
            np.savez(io.BytesIO(), features=r["features"], boxes=r["boxes"],
                     class_labels=r["class_labels"], image_hw=np.array([1, 1]))

    def npz_direct():
        for r in rows:
            b"".join(prepare.npz_parts(dict(features=r["features"], boxes=r["boxes"],
                                            class_labels=r["class_labels"],
                                            image_hw=np.array([1, 1]))))
    steps = [("utf-8 decode + split of the line", lambda: [x.decode().split("\t") for x in lines]),
             ("parse_row of the text line (every check)",
              lambda: [tsv.parse_row(x.rstrip(b"\n").decode()) for x in lines]),
             ("parse_row of the bytes (what preprocess runs)",
              lambda: [tsv.parse_row(x.rstrip(b"\n")) for x in lines]),
             ("floor: base64 decode only", floor_decode),
             ("floor: np.save x3 (in memory)", floor_save),
             ("np.savez (in memory)", npz),
             ("prepare.npz_parts, joined (what preprocess runs)", npz_direct)]
    out = []
    for name, fn in steps:
        best = float("inf")
        for _ in range(3):
            c = time.process_time()
            fn()
            best = min(best, time.process_time() - c)
        out.append(("cpu us/row: " + name, best / len(lines) * 1e6, "us"))
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("cmd", nargs="?", default="bench", choices=["bench", "floor"])
    p.add_argument("--data", required=True, help="data root (train/train.tsv)")
    p.add_argument("--scratch", default="/tmp/kddmm_bench_preprocess",
                   help="emptied before every run; keep it off the repository")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--shards", action="store_true", help="also 2 shards side by side + merge")
    p.add_argument("--part", default="0/1", help="floor only: byte range I/N of the file")
    a = p.parse_args(argv)
    tsv = os.path.join(a.data, "train", "train.tsv")
    if a.cmd == "floor":
        return floor(tsv, a.scratch, tuple(int(x) for x in a.part.split("/")))
    mb = os.path.getsize(tsv) / 1e6
    configs = ["floor", "floor2", "workers1", "workers2"] + (["shards2"] if a.shards else [])
    res = {c: {"s": [], "cpu": [], "mem": []} for c in configs}
    probe = []
    rows = None
    for r in range(a.repeats):
        for c in configs[r % len(configs):] + configs[:r % len(configs)]:
            # subfolders of one scratch folder: ext4 keeps them near it, so every run
            # creates its files under the same conditions
            feats, info = os.path.join(a.scratch, "features"), os.path.join(a.scratch, "info")
            for d in (feats, info):
                shutil.rmtree(d, ignore_errors=True)
            probe.append(creates_per_s(os.path.join(a.scratch, "probe")))
            print("repeat %d %-8s %s, %.0f file creates/s" % (r, c, load(), probe[-1]),
                  flush=True)
            if c == "floor":
                out = run_timed([sys.executable, os.path.abspath(__file__), "floor",
                                 "--data", a.data, "--scratch", feats])
                rows = json.loads(out["stdout"].strip().splitlines()[-1])["rows"]
                wall, cpu, peak = out["wall_s"], out["cpu_s"], out["peak_tree_mb"]
            elif c == "floor2":
                wall, cpu, peak = floor_pair(a.data, feats)
            elif c == "shards2":
                wall, cpu, peak = shards_then_merge(a.data, feats, info)
            else:
                out = run_timed([sys.executable, "prepare.py", "preprocess", "--data", a.data,
                                 "--features", feats, "--info", info, "--no-progress",
                                 "--workers", c[-1]])
                wall, cpu, peak = out["wall_s"], out["cpu_s"], out["peak_tree_mb"]
            res[c]["s"].append(wall)
            res[c]["cpu"].append(cpu)
            res[c]["mem"].append(peak)
    shutil.rmtree(a.scratch, ignore_errors=True)
    table = [("file creates/s in the scratch folder", probe, "1/s")]
    for c in configs:
        table.append(("%s MB/s" % c, [rate(mb, s) for s in res[c]["s"]], "MB/s"))
        table.append(("%s rows/s" % c, [rate(rows, s) for s in res[c]["s"]], "rows/s"))
        table.append(("%s rows per CPU-second" % c, [rate(rows, s) for s in res[c]["cpu"]],
                      "rows/cpu-s"))
        table.append(("%s peak memory (process tree)" % c, res[c]["mem"], "MB"))
    f, w1, w2 = (np.array(res[c]["s"]) for c in ("floor", "workers1", "workers2"))
    fc, w1c, w2c = (np.array(res[c]["cpu"]) for c in ("floor", "workers1", "workers2"))
    table.append(("1 worker / floor (wall)", list(f / w1), "x"))
    table.append(("1 worker / floor (CPU time)", list(fc / w1c), "x"))
    table.append(("2 workers / 1 worker (wall)", list(w1 / w2), "x"))
    table.append(("floor: 2 processes / 1 (wall; what this machine allows)",
                  list(f / np.array(res["floor2"]["s"])), "x"))
    table.append(("2 workers per worker / floor (wall)", list(f / w2 / 2), "x"))
    table.append(("2 workers / 1 worker (CPU time, 1.0 = no overhead)", list(w1c / w2c), "x"))
    if a.shards:
        table.append(("2 shards + merge / 1 worker (wall)",
                      list(w1 / np.array(res["shards2"]["s"])), "x"))
    table += breakdown(tsv)
    report(table, "preprocess %s: %.0f MB, %d rows, %d repeats (median)"
           % (a.data, mb, rows, a.repeats),
           "python bench/preprocess.py --data %s --scratch %s --repeats %d%s"
           % (a.data, a.scratch, a.repeats, " --shards" if a.shards else ""))
    print(load())


if __name__ == "__main__":
    main()
