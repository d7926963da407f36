"""The time of one search from the command line: catalogue/search.py, index load included.

    python bench/search.py --ckpt runs/model3/best.pt [--data DATA] [--index-dir /tmp/index] \
        [--n 10] [--threads 2] [--query "red floral dress"] [--skip-build]

Builds the index once (``catalogue/index.py``, not timed beyond its own line), then runs N
single-query searches, each a fresh ``python catalogue/search.py --index DIR QUERY``
subprocess as a user would type it, and N bare ``python -c "import torch"`` subprocesses,
the floor every search pays. Both under ``--threads`` (OMP_NUM_THREADS and taskset to that
many cores when taskset exists). Prints each one's median, min and max wall seconds; the
target is a median under 2 s on 2 cores on the small world. bench/README.md.
"""
import argparse
import os
import shutil
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def timed(cmd, env):
    """Wall seconds of one subprocess, which must succeed."""
    t = time.perf_counter()
    r = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True)
    if r.returncode != 0:
        sys.exit("bench/search.py: %s failed:\n%s" % (" ".join(cmd), r.stderr[-2000:]))
    return time.perf_counter() - t


def summary(name, times):
    return "%-28s median %.2f s  min %.2f  max %.2f  (%d runs)" % (
        name, statistics.median(times), min(times), max(times), len(times))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--ckpt", required=True, help="model3 checkpoint")
    p.add_argument("--data", help="data root (default: the checkpoint's)")
    p.add_argument("--index-dir", default=os.path.join("runs", "bench_index"))
    p.add_argument("--n", type=int, default=10, help="searches timed")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--query", default="red floral dress")
    p.add_argument("--skip-build", action="store_true", help="time an index already built")
    a = p.parse_args(argv)
    env = dict(os.environ, OMP_NUM_THREADS=str(a.threads))
    pin = (["taskset", "-c", "0-%d" % (a.threads - 1)]
           if shutil.which("taskset") and a.threads <= os.cpu_count() else [])
    if not a.skip_build:
        build = [sys.executable, "catalogue/index.py", "--ckpt", a.ckpt, "--out", a.index_dir,
                 "--no-progress"] + (["--data", a.data] if a.data else [])
        print("index built in %.1f s: %s" % (timed(build, env), a.index_dir))
    search = pin + [sys.executable, "catalogue/search.py", "--index", a.index_dir, a.query]
    torch_only = pin + [sys.executable, "-c", "import torch"]
    times = {"import torch": [], "search, one query": []}
    for _ in range(a.n):  # interleaved, so a busy spell of the machine hits both
        times["import torch"].append(timed(torch_only, env))
        times["search, one query"].append(timed(search, env))
    print("%d threads%s, query %r" % (a.threads, " (taskset)" if pin else "", a.query))
    for name, ts in times.items():
        print(summary(name, ts))


if __name__ == "__main__":
    main()
