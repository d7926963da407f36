"""What the benchmark scripts share: the machine line, medians, timed subprocesses with the
peak memory of their whole process tree, and the printed table.

Every script prints one row per figure: name, median over the repeats, every repeat, and
the command that reproduces it. Timings on a shared 2-core machine are noisy: compare
figures of the same run only, and read the load average printed beside them.
"""
import os
import platform
import resource
import shlex
import statistics
import subprocess
import sys
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)


def machine():
    """One line: CPU model, cores, memory, Python, torch and numpy versions."""
    import numpy as np
    import psutil
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    try:
        import torch
        tv = "torch %s (%d threads)" % (torch.__version__, torch.get_num_threads())
    except ImportError:
        tv = "no torch"
    return "%s, %d cores, %.0f GiB RAM, Python %s, %s, numpy %s" % (
        cpu, os.cpu_count(), psutil.virtual_memory().total / 2**30, platform.python_version(),
        tv, np.__version__)


def load():
    return "load average %.2f %.2f %.2f" % os.getloadavg()


def median(xs):
    return statistics.median(xs)


class TreeMemory:
    """Samples the summed RSS of a process and all its descendants every ``interval`` s.

    ``peak``: RSS, counting shared pages once per process and every page of a mapped file
    that was touched (page cache the kernel can drop). ``peak_anon``: RSS minus file-backed
    and shared pages -- the memory a job really holds (a memory-mapped store is not in it).
    """

    def __init__(self, pid, interval=0.05):
        import psutil
        self.proc, self.interval, self.peak, self.peak_anon = psutil.Process(pid), interval, 0, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self):
        import psutil
        while not self._stop.is_set():
            try:
                procs = [self.proc] + self.proc.children(recursive=True)
                total = anon = 0
                for p in procs:
                    try:
                        m = p.memory_info()
                        total, anon = total + m.rss, anon + m.rss - m.shared
                    except psutil.Error:
                        pass
                self.peak, self.peak_anon = max(self.peak, total), max(self.peak_anon, anon)
            except psutil.Error:
                return
            self._stop.wait(self.interval)

    def stop(self):
        self._stop.set()
        self._thread.join()
        return self.peak


def children_cpu():
    """User + system CPU seconds of every child process reaped so far."""
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def run_timed(cmd, env=None, cwd=ROOT, quiet=True):
    """Run ``cmd`` (a list) -> {"wall_s", "cpu_s", "peak_tree_mb", "peak_anon_mb", "stdout"};
    raises on failure.

    cpu_s: user + system seconds of the command and every process it waited for.
    """
    c0, t0 = children_cpu(), time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=cwd, env={**os.environ, **(env or {})},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    mem = TreeMemory(proc.pid)
    out, _ = proc.communicate()
    wall = time.perf_counter() - t0
    peak = mem.stop()
    if proc.returncode:
        raise RuntimeError("%s failed (%d):\n%s" % (shlex.join(cmd), proc.returncode, out[-3000:]))
    if not quiet:
        print(out)
    return {"wall_s": wall, "cpu_s": children_cpu() - c0, "peak_tree_mb": peak / 2**20,
            "peak_anon_mb": mem.peak_anon / 2**20, "stdout": out}


def rate(n, seconds):
    return n / max(seconds, 1e-9)


def report(rows, title, command):
    """Print a table: figure, median, the repeats, unit; then how to reproduce it."""
    print("\n## %s" % title)
    print("machine: %s" % machine())
    print("reproduce: %s" % command)
    w = max(len(r[0]) for r in rows)
    for name, values, unit in rows:
        vals = values if isinstance(values, (list, tuple)) else [values]
        fmt = (lambda v: "%.3g" % v if abs(v) < 100 else "%.0f" % v)
        print("%-*s  median %-9s %-10s  [%s]" % (w, name, fmt(median(vals)), unit,
                                                  ", ".join(fmt(v) for v in vals)))
