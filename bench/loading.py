"""Loading: training samples/s the DataLoader delivers, negatives included, per product store.

    python bench/loading.py --data /work/bench_data/small --info /work/bench_data/small/info \
        --store npz=DATA/features --store npz-compressed=DATA/features_z \
        --store packed=DATA/packed --store packed-fp16=DATA/packed16 [--workers 0 1 2]

Prepare the stores with `prepare.py preprocess` (with and without --compress) and
`prepare.py pack` (with and without --fp16). Each sample is what model1/model2 train on: a
(query, product) pair plus a hard negative query and a negative product (PairDataset with
a NegativeSampler), so it reads two products; collated by utils.collate_pairs into padded
batches. With workers, also "flat": what the stages train with then, workers sending the regions
unpadded (utils.collate_pairs_flat) and the main process padding them (utils.unflatten,
timed too). Timed after 3 warm-up batches (worker start-up excluded: it is paid once an epoch);
the page cache is warm (the small world fits in memory). Every repeat visits the stores in
a rotated order. "per core" is products per CPU-second of the loading process itself with 0
workers, which the other jobs on a shared machine disturb least.
"""
import argparse
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [HERE, os.path.dirname(HERE)]

import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch.utils.data import DataLoader, RandomSampler  # noqa: E402

import utils  # noqa: E402
from common import load, report  # noqa: E402
from sampler import NegativeSampler  # noqa: E402


def open_store(kind, folder):
    return utils.PackedStore(folder) if kind.startswith("packed") else utils.ProductStore(folder)


def loader_rate(dataset, workers, batch_size, batches, seed=0, flat=False):
    """-> (samples/s, samples per CPU-second of this process) over ``batches`` timed batches."""
    g = torch.Generator().manual_seed(seed)
    need = (batches + 3) * batch_size  # a world too small for that many draws repeats samples
    sampler = RandomSampler(dataset, generator=g) if len(dataset) >= need else \
        RandomSampler(dataset, replacement=True, num_samples=need, generator=g)
    loader = DataLoader(dataset, batch_size=batch_size, sampler=sampler,
                        collate_fn=utils.collate_pairs_flat if flat else utils.collate_pairs,
                        num_workers=workers, drop_last=True)
    it = iter(loader)
    for _ in range(3):
        next(it)
    t0, c0 = time.perf_counter(), time.process_time()
    for _ in range(batches):
        utils.unflatten(next(it))
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    del it
    n = batches * batch_size
    return n / wall, n / max(cpu, 1e-9)


def get_rate(store, pids, n=20000):
    """store.get alone on random train products -> gets per second."""
    sel = np.random.default_rng(0).choice(pids, n)
    for p in sel[:1000]:
        store.get(p)
    t0 = time.perf_counter()
    for p in sel:
        store.get(p)
    return n / (time.perf_counter() - t0)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", required=True)
    p.add_argument("--info", required=True)
    p.add_argument("--store", action="append", required=True, metavar="NAME=FOLDER",
                   help="npz*, packed* (the name's prefix picks the class); repeatable")
    p.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--batches", type=int, default=40, help="timed batches per measurement")
    p.add_argument("--repeats", type=int, default=3)
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    queries, vocab = utils.load_info(a.info)
    negatives = NegativeSampler(queries, 0.8, "cluster")
    stores = dict(s.split("=", 1) for s in a.store)
    pids = utils.ragged_parts(queries["products"])[0]
    modes = [(w, False) for w in a.workers] + [(w, True) for w in a.workers if w > 0]
    res = {(s, m): [] for s in stores for m in modes}
    cpu0 = {s: [] for s in stores}
    gets = {s: [] for s in stores}
    names = list(stores)
    for r in range(a.repeats):
        print("repeat %d %s" % (r, load()), flush=True)
        for s in names[r % len(names):] + names[:r % len(names)]:
            store = open_store(s, stores[s])
            gets[s].append(get_rate(store, pids))
            ds = utils.PairDataset(queries, vocab, store, negatives, seed=0)
            for w, flat in modes:
                wall, cpu = loader_rate(ds, w, a.batch_size, a.batches, seed=r, flat=flat)
                res[(s, (w, flat))].append(wall)
                if w == 0:
                    cpu0[s].append(cpu)
    table = []
    for s in names:
        table.append(("%s: store.get alone" % s, gets[s], "products/s"))
        for w, flat in modes:
            name = "%s, %d workers%s" % (s, w, ", flat" if flat else "")
            table.append((name + ": samples/s", res[(s, (w, flat))], "samples/s"))
        if 0 in a.workers:
            table.append(("%s, per core (0 workers, per CPU-second)" % s,
                          [2 * x for x in cpu0[s]], "products/cpu-s"))
    report(table, "loading %s: batch %d, %d timed batches, %d repeats (median)"
           % (a.data, a.batch_size, a.batches, a.repeats),
           "python bench/loading.py --data %s --info %s %s --workers %s --repeats %d"
           % (a.data, a.info, " ".join("--store " + s for s in a.store),
              " ".join(map(str, a.workers)), a.repeats))
    print(load())


if __name__ == "__main__":
    main()
