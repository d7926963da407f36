"""Retrieval at a million products: exact search against faiss's approximate indexes.

    python bench/retrieval.py --ckpt RUN/model3/best.pt [--data DATA] [--n 1000000] \
        [--threads 2] [--hnsw-ef 128 160 192] [--ivf-nprobe 16 32 64 128 256] \
        [--single 200] [--scratch /var/tmp] [--in-process]
    python bench/retrieval.py --n 1000000 --queries 1000      # no checkpoint

The gallery: every product model3's checkpoint can encode (train from its product store,
valid/testA/testB from their TSV; ``catalogue/retrieve.py``'s own functions), padded out to
``--n`` vectors with synthetic ones of the same statistics: drawn from a Gaussian with the
real vectors' mean and covariance, then L2-normalised (as model3's are). The real products
are placed at random rows, so any block of rows is a random sample. The queries: the
encoded queries of ``--split`` (valid). Without ``--ckpt`` every vector is synthetic: a
Gaussian with mean 0 and a covariance of eigenvalues 1/i (i = 1..D) in a random basis,
``--queries`` query vectors drawn the same way.

Every index is measured in a fresh subprocess (``--in-process``: in this one, for tests;
its memory figures mean nothing then) that reads the gallery from a raw file a block of
rows at a time, so the only full copy is the index's own (exact search: one (N, D) float32
tensor). Each reports:

- build s: adding the gallery (IVF: training, on ``--ivf-train`` x nlist rows, included);
  reading the file is not counted;
- peak RSS: the subprocess's VmHWM (imports, the gallery or index, the searches);
- queries/s batched: all queries in one call, the median of ``--repeats`` calls (fewer if
  ``--max-seconds`` ran out, at least one);
- queries/s one at a time: up to ``--single`` queries, one call each (fewer if
  ``--max-seconds`` ran out);
- Recall@100: the share of exact search's top K (``retrieve.exact_search``: chunked matmul,
  running top K) that the index returns in its top K, averaged over the queries.

Indexes: ``exact`` (``retrieve.exact_search``), ``flat`` (faiss IndexFlatIP, what
``--index faiss`` builds), ``hnsw`` (IndexHNSWFlat, M = ``--hnsw-m`` and efConstruction
``--hnsw-efc`` (32 and 128, as ``--index hnsw``), one row per efSearch; faiss searches with
max(efSearch, K)), ``ivf`` (IndexIVFFlat, nlist = ``--nlist`` or 4 sqrt(N), one row per
nprobe). The goal: Recall@100 >= ``--goal-recall`` at >= ``--goal-qps`` queries/s batched
with a peak RSS under ``--goal-mb``; each row says whether it meets it. bench/README.md.
"""
import argparse
import json
import os
import resource
import shlex
import shutil
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [HERE, os.path.dirname(HERE)]

import numpy as np  # noqa: E402

from common import load, machine  # noqa: E402

KINDS = ("exact", "flat", "hnsw", "ivf")
BLOCK = 65536  # gallery rows read (and added) at a time


# --------------------------------------------------------------------------------------
# The vectors
# --------------------------------------------------------------------------------------
def real_vectors(a):
    """-> (gallery (P, D), queries (Q, D)) float32, encoded by the checkpoint's model3 with
    catalogue/retrieve.py's functions, the gallery as ``retrieve.py`` builds it."""
    import engine
    import matching
    import tsv
    from catalogue import retrieve
    from model3.model import build_model
    model, vocab, ck = matching.load_trained(build_model, a.ckpt, None)
    model.eval()
    ra = retrieve.parse_args(["--ckpt", a.ckpt] + (["--data", a.data] if a.data else []))
    data = a.data or ck["args"]["data"]
    splits = ["train"] + [s for s in retrieve.CANDIDATE_SPLITS
                          if os.path.exists(engine.split_paths(data, s)[0])]
    t = time.perf_counter()
    _, gallery = retrieve.encode_gallery(
        model, retrieve.gallery_rows(retrieve.product_sources(ra, ck["args"], splits)))
    cands = tsv.read_candidates(engine.split_paths(data, a.split)[0], with_arrays=False)
    queries = retrieve.encode_texts(model, vocab, [cands[q]["query"] for q in sorted(cands)])
    print("encoded %d products and %d %s queries in %.0f s"
          % (len(gallery), len(queries), a.split, time.perf_counter() - t), flush=True)
    return gallery.numpy().astype(np.float32), queries.numpy().astype(np.float32)


def gaussian(mean, cov):
    """-> draw(n, rng): n L2-normalised float32 rows of N(mean, cov)."""
    w, v = np.linalg.eigh(cov)
    root = (v * np.sqrt(np.clip(w, 0, None))).T  # z @ root has covariance cov

    def draw(n, rng):
        x = (rng.standard_normal((n, len(mean))) @ root + mean).astype(np.float32)
        return x / np.linalg.norm(x, axis=1, keepdims=True)
    return draw


def default_gaussian(dim, rng):
    """No checkpoint: mean 0, eigenvalues 1/i in a random orthonormal basis."""
    q, _ = np.linalg.qr(rng.standard_normal((dim, dim)))
    return gaussian(np.zeros(dim), (q * (1.0 / np.arange(1, dim + 1))) @ q.T)


def write_gallery(path, n, real, draw, rng):
    """Write n rows of float32 to ``path`` (raw): ``real`` at random rows, the rest drawn."""
    dim = real.shape[1] if real is not None else None
    at = np.zeros(n, bool)
    if real is not None:
        if len(real) > n:
            raise SystemExit("--n %d is below the %d real products" % (n, len(real)))
        at[rng.choice(n, len(real), replace=False)] = True
    taken = 0
    with open(path, "wb") as f:
        for s in range(0, n, BLOCK):
            x = draw(min(BLOCK, n - s), rng)
            dim = x.shape[1]
            here = at[s:s + len(x)]
            if here.any():
                x[here] = real[taken:taken + here.sum()]
                taken += here.sum()
            f.write(x.tobytes())
    return dim


def read_blocks(path, dim, block=BLOCK):
    """Yield (first row, (rows, dim) float32) of a raw gallery file, ``block`` rows at a
    time, read (not memory-mapped: the pages would count in the RSS)."""
    with open(path, "rb") as f:
        s = 0
        while True:
            x = np.fromfile(f, np.float32, block * dim)
            if not len(x):
                return
            yield s, x.reshape(-1, dim)
            s += len(x) // dim


# --------------------------------------------------------------------------------------
# One index, in its own process
# --------------------------------------------------------------------------------------
def peak_mb():
    """This process's peak RSS (VmHWM): unlike ``ru_maxrss``, not carried over from the
    parent through fork and exec."""
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmHWM")) / 1024
    except (OSError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def timed_calls(fn, repeats, max_seconds):
    """Call fn up to ``repeats`` times (at least once, no more once ``max_seconds`` have
    gone) -> (last result, seconds of each call)."""
    times, t_all = [], time.perf_counter()
    while True:
        t = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t)
        if len(times) >= repeats or time.perf_counter() - t_all > max_seconds:
            return out, times


def single_rate(search, queries, n, max_seconds):
    """Queries/s of ``search`` one query at a time: up to n queries, ``max_seconds`` at most."""
    t = time.perf_counter()
    done = 0
    for i in range(min(n, len(queries))):
        search(queries[i:i + 1])
        done += 1
        if time.perf_counter() - t > max_seconds:
            break
    return done / (time.perf_counter() - t), done


def build_faiss(kind, a, n, dim):
    """-> (index, build seconds): the gallery added a block at a time."""
    import faiss
    if kind == "flat":
        index = faiss.IndexFlatIP(dim)
    elif kind == "hnsw":
        index = faiss.IndexHNSWFlat(dim, a.hnsw_m, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = a.hnsw_efc
    else:
        nlist = a.nlist or int(round(4 * np.sqrt(n)))
        quantizer = faiss.IndexFlatIP(dim)
        index = faiss.IndexIVFFlat(quantizer, dim, nlist, faiss.METRIC_INNER_PRODUCT)
        index.cp.niter = a.ivf_niter
        index.cp.max_points_per_centroid = a.ivf_train
        # the real rows sit at random places: the first rows are a random sample
        want, parts = min(n, a.ivf_train * nlist), []
        for _, x in read_blocks(a.gallery_file, dim):
            parts.append(x[:want - sum(len(p) for p in parts)].copy())
            if sum(len(p) for p in parts) >= want:
                break
        sample = np.concatenate(parts)
        t = time.perf_counter()
        index.train(sample)
        train_s = time.perf_counter() - t
        del sample, parts
    add_s = 0.0
    for _, x in read_blocks(a.gallery_file, dim):
        t = time.perf_counter()
        index.add(x)
        add_s += time.perf_counter() - t
    return index, add_s + (train_s if kind == "ivf" else 0.0)


def settings(kind, a):
    """The search settings swept for one index: [(label, apply(index))]."""
    if kind == "hnsw":
        return [("efSearch %d" % ef, lambda ix, ef=ef: setattr(ix.hnsw, "efSearch", ef))
                for ef in a.hnsw_ef]
    if kind == "ivf":
        return [("nprobe %d" % p, lambda ix, p=p: setattr(ix, "nprobe", p))
                for p in a.ivf_nprobe]
    return [("", lambda ix: None)]


def measure(kind, a):
    """Build one index, search with each setting -> list of result dicts; each setting's
    top-K rows are saved to SCRATCH/<kind>_<i>.npy (exact: exact.npy)."""
    queries = np.load(a.queries_file)
    n, dim = a.n, queries.shape[1]
    out = []
    if kind == "exact":  # torch only here: the faiss processes do not load it
        import torch

        from catalogue import retrieve
        torch.set_num_threads(a.threads)
        gallery = torch.empty(n, dim)
        g = gallery.numpy()
        for s, x in read_blocks(a.gallery_file, dim):
            g[s:s + len(x)] = x
        q = torch.from_numpy(queries)
        build_s = 0.0  # nothing to build; reading the file is not counted

        def search(qs):
            return retrieve.exact_search(qs, gallery, a.k)
        (_, rows), times = timed_calls(lambda: search(q), a.repeats, a.max_seconds)
        single, done = single_rate(search, q, a.single, a.max_seconds)
        np.save(os.path.join(a.scratch, "exact.npy"), rows.numpy())
        out.append(dict(index="exact", setting="", build_s=build_s, times=times,
                        single_qps=single, single_n=done, rows="exact.npy"))
    else:
        import faiss
        faiss.omp_set_num_threads(a.threads)
        index, build_s = build_faiss(kind, a, n, dim)
        for i, (label, apply) in enumerate(settings(kind, a)):
            apply(index)

            def search(qs):
                return index.search(qs, a.k)
            (_, rows), times = timed_calls(lambda: search(queries), a.repeats, a.max_seconds)
            single, done = single_rate(search, queries, a.single, a.max_seconds)
            name = "%s_%d.npy" % (kind, i)
            np.save(os.path.join(a.scratch, name), rows)
            out.append(dict(index=kind, setting=label, build_s=build_s, times=times,
                            single_qps=single, single_n=done, rows=name))
    for r in out:
        r["peak_mb"] = peak_mb()
    return out


# --------------------------------------------------------------------------------------
# The command
# --------------------------------------------------------------------------------------
def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--ckpt", help="model3 checkpoint (best.pt); without it every vector is "
                                  "synthetic")
    p.add_argument("--data", help="data root (default: the checkpoint's)")
    p.add_argument("--split", default="valid", help="the queries' split (with --ckpt)")
    p.add_argument("--n", type=int, default=1_000_000, help="gallery vectors")
    p.add_argument("--queries", type=int, default=1000, help="queries without --ckpt")
    p.add_argument("--dim", type=int, default=256, help="width without --ckpt (model3's "
                                                        "small preset: 256)")
    p.add_argument("--k", type=int, default=100)
    p.add_argument("--index", nargs="+", default=list(KINDS), choices=KINDS)
    p.add_argument("--threads", type=int, default=2, help="torch and faiss (OpenMP) threads")
    p.add_argument("--hnsw-m", type=int, default=32)
    p.add_argument("--hnsw-efc", type=int, default=128,
                   help="efConstruction (128, as --index hnsw; faiss's default: 40)")
    p.add_argument("--hnsw-ef", type=int, nargs="+", default=[128, 160, 192])
    p.add_argument("--nlist", type=int, help="IVF lists (default 4 sqrt(N))")
    p.add_argument("--ivf-nprobe", type=int, nargs="+", default=[16, 32, 64, 128, 256])
    p.add_argument("--ivf-train", type=int, default=40, help="training rows per list")
    p.add_argument("--ivf-niter", type=int, default=10, help="k-means iterations")
    p.add_argument("--repeats", type=int, default=3, help="batched searches per setting")
    p.add_argument("--single", type=int, default=200, help="queries searched one at a time")
    p.add_argument("--max-seconds", type=float, default=20.0,
                   help="time for each setting's repeats, and for its single queries")
    p.add_argument("--goal-recall", type=float, default=0.95)
    p.add_argument("--goal-qps", type=float, default=1000.0)
    p.add_argument("--goal-mb", type=float, default=2000.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--scratch", default=tempfile.gettempdir(),
                   help="folder for the gallery file (N x D x 4 bytes), removed at the end")
    p.add_argument("--in-process", action="store_true",
                   help="measure every index in this process (tests; memory figures void)")
    p.add_argument("--child", choices=KINDS, help=argparse.SUPPRESS)
    p.add_argument("--gallery-file", help=argparse.SUPPRESS)
    p.add_argument("--queries-file", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def child_argv(a, kind):
    keep = ["--n", a.n, "--k", a.k, "--threads", a.threads, "--hnsw-m", a.hnsw_m,
            "--hnsw-efc", a.hnsw_efc, "--ivf-train", a.ivf_train, "--ivf-niter", a.ivf_niter,
            "--repeats", a.repeats, "--single", a.single, "--max-seconds", a.max_seconds,
            "--scratch", a.scratch, "--gallery-file", a.gallery_file,
            "--queries-file", a.queries_file, "--child", kind]
    keep += ["--hnsw-ef"] + a.hnsw_ef + ["--ivf-nprobe"] + a.ivf_nprobe
    if a.nlist:
        keep += ["--nlist", a.nlist]
    return [sys.executable, os.path.abspath(__file__)] + [str(x) for x in keep]


def recall(rows, truth):
    """Mean share of each query's exact top K found in the index's top K."""
    return float(np.mean([len(np.intersect1d(r[r >= 0], t)) / len(t)
                          for r, t in zip(rows, truth)]))


def command(a):
    """The command line of this run: every option that differs from its default."""
    default = vars(parse_args([]))
    parts = ["python bench/retrieval.py"]
    for key, value in vars(a).items():
        if key in ("child", "gallery_file", "queries_file", "scratch") or value == default[key]:
            continue
        flag = "--" + key.replace("_", "-")
        parts.append(flag if value is True else "%s %s" % (
            flag, " ".join(map(str, value)) if isinstance(value, list) else value))
    return " ".join(parts)


def main(argv=None):
    a = parse_args(argv)
    if a.child:
        print("RESULT " + json.dumps(measure(a.child, a)), flush=True)
        return None
    rng = np.random.default_rng(a.seed)
    if a.ckpt:
        import torch
        torch.set_num_threads(a.threads)
        real, queries = real_vectors(a)
        draw = gaussian(real.astype(np.float64).mean(0), np.cov(real.astype(np.float64).T))
    else:
        real, draw = None, default_gaussian(a.dim, rng)
        queries = draw(a.queries, rng)
    a.scratch = tempfile.mkdtemp(prefix="kddmm_retrieval_", dir=a.scratch)
    try:
        a.gallery_file = os.path.join(a.scratch, "gallery.f32")
        a.queries_file = os.path.join(a.scratch, "queries.npy")
        t = time.perf_counter()
        dim = write_gallery(a.gallery_file, a.n, real, draw, rng)
        np.save(a.queries_file, np.ascontiguousarray(queries, np.float32))
        print("gallery: %d x %d float32 (%d real, %d synthetic) written in %.0f s; %d queries"
              % (a.n, dim, 0 if real is None else len(real),
                 a.n - (0 if real is None else len(real)), time.perf_counter() - t,
                 len(queries)), flush=True)
        del real
        results = []
        for kind in ["exact"] + [k for k in a.index if k != "exact"]:
            if a.in_process:
                rows = measure(kind, a)
            else:
                cmd = child_argv(a, kind)
                p = subprocess.run(cmd, capture_output=True, text=True)
                if p.returncode:
                    raise SystemExit("%s failed (%d):\n%s" % (shlex.join(cmd), p.returncode,
                                                             (p.stdout + p.stderr)[-3000:]))
                rows = json.loads(p.stdout.rsplit("RESULT ", 1)[1])
            print("%s: done (build %.1f s, peak RSS %.0f MB)"
                  % (kind, rows[0]["build_s"], rows[0]["peak_mb"]), flush=True)
            results += rows
        truth = np.load(os.path.join(a.scratch, "exact.npy"))
        for r in results:
            r["recall"] = recall(np.load(os.path.join(a.scratch, r.pop("rows"))), truth)
            r["batched_qps"] = len(queries) / float(np.median(r["times"]))
            r["meets"] = (r["recall"] >= a.goal_recall and r["batched_qps"] >= a.goal_qps
                          and r["peak_mb"] < a.goal_mb)
    finally:
        shutil.rmtree(a.scratch, ignore_errors=True)
    print("\n## retrieval: %d x %d gallery, %d queries, K = %d, %d thread(s)"
          % (a.n, dim, len(queries), a.k, a.threads))
    print("machine: %s" % machine())
    print("reproduce: %s" % command(a))
    print("goal: Recall@%d >= %.2f at >= %.0f queries/s batched, peak RSS < %.0f MB\n"
          % (a.k, a.goal_recall, a.goal_qps, a.goal_mb))
    print("| index | setting | build s | peak RSS MB | queries/s batched | queries/s one at a "
          "time | Recall@%d | meets the goal |" % a.k)
    print("|---|---|---|---|---|---|---|---|")
    for r in results:
        print("| %s | %s | %.1f | %.0f | %.0f | %.0f (%d) | %.4f | %s |"
              % (r["index"], r["setting"], r["build_s"], r["peak_mb"], r["batched_qps"],
                 r["single_qps"], r["single_n"], r["recall"], "yes" if r["meets"] else "no"))
    print("\n(one at a time: queries/s (queries timed)); %s" % load())
    return results


if __name__ == "__main__":
    main()
