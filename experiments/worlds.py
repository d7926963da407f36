"""Worlds x members x the two-tower peer x the oracle: does the pipeline hold on worlds it was
not tuned on, how far is it from each world's ceiling, and is its lead more than noise?

For each world (preset:seed:lang, e.g. family:301:zh) it generates the data root if absent,
runs ``run.sh`` on it once per variant (a name and extra run.sh variables), trains
``experiments/two_tower.py`` on the same preprocessed data, and prints, for one split (testB by
default): NDCG@5 of random, the oracle (the generator's own relevance model: the ceiling),
the two-tower, every blend member and the blend; each as a share of the achievable,
(x - random) / (oracle - random); and paired 95% bootstrap intervals (experiments/compare.py) of
the blend against the two-tower and against each member, per world and pooled over worlds.

    python experiments/worlds.py --worlds family:301:en family:302:zh --out runs/worlds
    python experiments/worlds.py --worlds family:301:en --variant nomodel3 ENSEMBLE_MODELS=multilabel,model1,model2
Every run's artefacts stay under OUT/<world>/<variant>/, and run.sh runs with RESUME=1 (a
stage whose command, inputs and outputs are unchanged is not redone), so an interrupted
experiment resumes where it stopped. OUT/table.md and OUT/table.json hold the tables; ``--threads`` sets OMP_NUM_THREADS of every job (1 when worlds run side by side).
"""
import argparse
import json
import os
import subprocess
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path[:0] = [HERE, ROOT]
import compare  # noqa: E402
import ensemble  # noqa: E402
from metric import load_answers, load_predictions, ndcg_per_query  # noqa: E402

SPLIT_FILE = {"valid": "valid", "testB": "test"}  # split -> prefix of its prediction files


def world_root(out, world, threads):
    preset, seed, lang = world.split(":")
    data = os.path.join(out, "data", world.replace(":", "-"))
    if not os.path.exists(os.path.join(data, "synthetic_report.json")):
        subprocess.run([sys.executable, os.path.join(ROOT, "synthetic.py"), "--preset", preset,
                        "--seed", seed, "--lang", lang, "--out", data], check=True,
                       env=dict(os.environ, OMP_NUM_THREADS=str(threads)))
    with open(os.path.join(data, "synthetic_report.json")) as f:
        return data, json.load(f)


def run_pipeline(data, out, env_extra, threads):
    env = dict(os.environ, DATA_DIR=data, OUT_DIR=out, RESUME="1",
               OMP_NUM_THREADS=str(threads), **env_extra)
    os.makedirs(out, exist_ok=True)
    with open(out + ".log", "a") as log:
        subprocess.run(["bash", os.path.join(ROOT, "run.sh")], env=env, check=True,
                       stdout=log, stderr=subprocess.STDOUT)
    with open(os.path.join(out, "summary.json")) as f:
        return json.load(f)


def run_two_tower(data, run_out, threads):
    """The peer on the run's own info/ and store; its prediction files beside the members'."""
    pred = os.path.join(run_out, "prediction_result")
    path = run_out + ".two_tower.json"
    if not os.path.exists(os.path.join(pred, "test_pred_two_tower.json")):
        subprocess.run([sys.executable, os.path.join(HERE, "two_tower.py"),
                        "--data", data, "--info", os.path.join(run_out, "info"),
                        "--packed", os.path.join(run_out, "packed"), "--json", path,
                        "--pred-dir", pred], check=True, stdout=subprocess.DEVNULL,
                       env=dict(os.environ, OMP_NUM_THREADS=str(threads)))
    with open(path) as f:
        return json.load(f)


def per_query(data, run_out, split, summary):
    """{column: (Q,) per-query NDCG@5}, queries aligned: the oracle (where the generator
    wrote one), the two-tower, every blend member, and the blend rebuilt from ensemble.json."""
    answers = load_answers(os.path.join(data, split, split + "_answer.json"))
    qids = sorted(answers)
    pred = os.path.join(run_out, "prediction_result")
    ens = summary["ensemble"]
    members = list(ens["weights"])
    files = {"oracle": os.path.join(data, split, split + "_pred_oracle.json"),
             "two-tower": os.path.join(pred, "%s_pred_two_tower.json" % SPLIT_FILE[split]),
             **{m: os.path.join(pred, "%s_pred_%s.json" % (SPLIT_FILE[split], m))
                for m in members}}
    preds = {name: load_predictions(p) for name, p in files.items() if os.path.exists(p)}
    preds["blend"] = ensemble.blend_members([preds[m] for m in members],
                                            list(ens["weights"].values()), ens["how"], members)
    out = {}
    for name, p in preds.items():
        s = ndcg_per_query(p, answers)
        out[name] = np.array([s[q] for q in qids])
    return out, members


def share(x, random, oracle):
    """(x - random) / (oracle - random): the share of what is achievable above chance."""
    return (x - random) / (oracle - random) if oracle is not None and oracle > random else None


def fmt(x, spec="%.3f"):
    return "—" if x is None else spec % x


def world_rows(results, split):
    """The NDCG table and the share table, one row per (world, variant)."""
    cols = ["random", "oracle", "two-tower"]
    members = []
    for r in results:
        members += [m for m in r["members"] if m not in members]
    cols += members + ["blend"]
    head = "| world | run | " + " | ".join(cols) + " | blend − two-tower [95%] |"
    ndcg = [head, "|" + "---|" * (len(cols) + 3)]
    shares = [head.replace(" blend − two-tower [95%] |", ""), "|" + "---|" * (len(cols) + 2)]
    for r in results:
        rep = r["report"][split]
        vals = {"random": rep["random"], "oracle": rep.get("oracle"),
                **{c: float(v.mean()) for c, v in r["scores"].items()}}
        d = r["scores"]["blend"] - r["scores"]["two-tower"]
        ci = compare.interval(*compare.bootstrap([d], resamples=2000))
        ndcg.append("| %s | %s | %s | %s |" % (r["world"], r["variant"],
                                               " | ".join(fmt(vals.get(c)) for c in cols), ci))
        shares.append("| %s | %s | %s |" % (r["world"], r["variant"], " | ".join(
            fmt(share(vals.get(c), vals["random"], vals["oracle"]), "%.2f")
            if vals.get(c) is not None else "—" for c in cols)))
    return ndcg, shares, members


def pooled_rows(results, members):
    """Blend against the two-tower and against each member, pooled over the worlds."""
    lines = ["| blend − … | pooled over queries [95%] | worlds resampled too [95%] |",
             "|---|---|---|"]
    for other in ["two-tower"] + members:
        diffs = [r["scores"]["blend"] - r["scores"][other] for r in results
                 if other in r["scores"]]
        if len(diffs) < len(results):
            continue
        lines.append("| %s | %s | %s |" % (
            other, compare.interval(*compare.bootstrap(diffs, resamples=2000)),
            compare.interval(*compare.bootstrap(diffs, resamples=2000, worlds=True))))
    return lines


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--worlds", nargs="+", required=True, help="preset:seed:lang")
    p.add_argument("--variant", nargs="+", action="append", metavar=("NAME", "VAR=FLAGS"),
                   help="a named run with extra run.sh variables (repeatable); "
                        "default: one run named 'default' with none")
    p.add_argument("--split", default="testB", choices=sorted(SPLIT_FILE))
    p.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", 2)))
    p.add_argument("--out", default=os.path.join(ROOT, "runs", "worlds"))
    a = p.parse_args(argv)
    variants = [(v[0], dict(kv.split("=", 1) for kv in v[1:])) for v in a.variant or
                [["default"]]]
    results = []
    for world in a.worlds:
        data, report = world_root(a.out, world, a.threads)
        for name, env_extra in variants:
            run_out = os.path.join(a.out, world.replace(":", "-"), name)
            t0 = time.time()
            summary = run_pipeline(data, run_out, env_extra, a.threads)
            tt = run_two_tower(data, run_out, a.threads)
            scores, members = per_query(data, run_out, a.split, summary)
            print("%s %s: done (%.0f s)" % (world, name, time.time() - t0), file=sys.stderr)
            results.append({"world": world, "variant": name, "report": report,
                            "members": members, "scores": scores,
                            "wall_s": sum(summary["stage_times_s"].values()),
                            "two_tower_wall_s": tt["wall_s"]})
    ndcg, shares, members = world_rows(results, a.split)
    text = ["NDCG@5 on %s" % a.split, *ndcg, "", "share of the achievable, (x − random) / "
            "(oracle − random)", *shares, "", "pooled over the worlds", *pooled_rows(results, members)]
    print("\n".join(text))
    with open(os.path.join(a.out, "table.md"), "w") as f:
        f.write("\n".join(text) + "\n")
    with open(os.path.join(a.out, "table.json"), "w") as f:
        json.dump([{**{k: v for k, v in r.items() if k != "scores"},
                    "ndcg5": {c: float(v.mean()) for c, v in r["scores"].items()}}
                   for r in results], f, indent=1)
    return results


if __name__ == "__main__":
    main()
