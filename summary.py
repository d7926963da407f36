"""Print the pipeline's summary table: NDCG@5 of each model and the blend, and stage times.

    python summary.py --out runs
Reads OUT/prediction_result/ensemble.json (written by ensemble.ipynb), its
gallery_metrics.json (catalogue/retrieve.py, where the data has gallery answers) and
OUT/stage_times.tsv (written by run.sh); writes OUT/summary.json.
"""
import argparse
import json
import os
import sys

import ensemble
from utils import atomic_json


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="runs")
    a = p.parse_args(argv)
    ens_path = os.path.join(a.out, "prediction_result", "ensemble.json")
    if not os.path.exists(ens_path):
        sys.exit("error: %s not found: run the ensemble notebook first" % ens_path)
    with open(ens_path) as f:
        ens = json.load(f)
    times = []
    tpath = os.path.join(a.out, "stage_times.tsv")
    if os.path.exists(tpath):
        with open(tpath) as f:
            times = [(n, int(s)) for n, s in (line.split("\t") for line in f if line.strip())]
    extra = {}
    ml_log = os.path.join(a.out, "multilabel", "log.jsonl")
    if os.path.exists(ml_log):
        with open(ml_log) as f:
            extra["pretraining_only_valid_ndcg5"] = max(
                json.loads(line).get("valid_ndcg5", 0.0) for line in f)
    pred = os.path.join(a.out, "prediction_result")
    if os.path.exists(os.path.join(pred, "valid_pred_model2.json")):
        p1, p2 = ensemble.load_members(pred, "valid")
        extra["valid_rank_correlation_model1_model2"] = ensemble.rank_correlation(p1, p2)
    gallery = {}
    if os.path.exists(os.path.join(pred, "gallery_metrics.json")):
        with open(os.path.join(pred, "gallery_metrics.json")) as f:
            gallery = json.load(f)
    cols = list(ens["table"])
    chosen = ensemble.describe(ens["how"], list(ens["weights"].values()), list(ens["weights"]))
    print("NDCG@5 (blend: %s, %s weights chosen on valid; estimate %.4f)"
          % (chosen, ens["weighting"], ens["estimate"]))
    width = max(28, *(len(r) + 2 for r in ens["table_rows"]))
    print(" " * width + "".join("%10s" % c for c in cols))
    for i, row in enumerate(ens["table_rows"]):
        print(row.ljust(width) + "".join("%10.4f" % ens["table"][c][i] for c in cols))
    for k, v in extra.items():
        print("%-40s %.4f" % (k.replace("_", " "), v))
    if gallery:
        print("\nwhole gallery: model3's top K, then (rerank_) those K re-ranked by the blend")
        for split, m in gallery.items():
            print("  %-6s " % split + "  ".join("%s %.4f" % kv for kv in m.items()))
    if times:
        print("\nwall time per stage (s)")
        for n, s in times:
            print("  %-24s %6d" % (n, s))
        print("  %-24s %6d" % ("total", sum(s for _, s in times)))
    atomic_json({"ensemble": ens, "gallery": gallery, "stage_times_s": dict(times), **extra},
                os.path.join(a.out, "summary.json"))


if __name__ == "__main__":
    main()
