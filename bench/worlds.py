"""Worlds x stages x the two-tower peer, side by side: does the pipeline hold on worlds it was
not tuned on?

For each world (preset:seed:lang) it generates the data root if absent, runs ``run.sh`` on it
once per variant (a name and extra stage flags), runs ``bench/two_tower.py`` on the same
preprocessed data, and prints one table of NDCG@5 on valid and testB, the whole-gallery
figures of testB (model3's retrieval, then re-ranked by the blend) and wall times.

    python bench/worlds.py --worlds hard:0:en hard:1:en hard:0:zh hard:1:zh --out runs/worlds
    python bench/worlds.py --worlds hard:0:en --variant published \
        "MULTILABEL_ARGS=--transform none --input-norm 0" "MODEL1_ARGS=--p-near 0" \
        "MODEL2_ARGS=--p-near 0"
Every run's artefacts stay under OUT/<world>/<variant>/, and run.sh runs with RESUME=1: the
stages that finished before with the same command, inputs and outputs, up to the first that
must run, are not redone, so an interrupted benchmark resumes where it stopped.
"""
import argparse
import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STAGES = ("pretraining", "model1", "model2", "model3", "blend")


def world_root(out, world):
    preset, seed, lang = world.split(":")
    data = os.path.join(out, "data", world.replace(":", "-"))
    if not os.path.exists(os.path.join(data, "synthetic_report.json")):
        subprocess.run([sys.executable, os.path.join(ROOT, "synthetic.py"), "--preset", preset,
                        "--seed", seed, "--lang", lang, "--out", data], check=True)
    with open(os.path.join(data, "synthetic_report.json")) as f:
        return data, json.load(f)


def run_pipeline(data, out, env_extra):
    env = dict(os.environ, DATA_DIR=data, OUT_DIR=out, RESUME="1", **env_extra)
    os.makedirs(out, exist_ok=True)
    with open(out + ".log", "a") as log:
        subprocess.run(["bash", os.path.join(ROOT, "run.sh")], env=env, check=True,
                       stdout=log, stderr=subprocess.STDOUT)
    with open(os.path.join(out, "summary.json")) as f:
        s = json.load(f)
    table, rows = s["ensemble"]["table"], s["ensemble"]["table_rows"]
    # rows: each member, then "blend (...)"; columns: valid, test (testB)
    row = {name.split()[0]: {"valid": table["valid"][i], "testB": table.get("test", [None] * len(rows))[i]}
           for i, name in enumerate(rows)}
    empty = {"valid": None, "testB": None}
    return {"pretraining": {"valid": s.get("pretraining_only_valid_ndcg5")},
            **{m: row.get(m, empty) for m in STAGES[1:]},
            "gallery": s.get("gallery", {}).get("testB", {}),
            "wall_s": sum(s["stage_times_s"].values())}


def run_two_tower(data, run_out):
    path = run_out + ".two_tower.json"
    if not os.path.exists(path):
        subprocess.run([sys.executable, os.path.join(ROOT, "bench", "two_tower.py"),
                        "--data", data, "--info", os.path.join(run_out, "info"),
                        "--packed", os.path.join(run_out, "packed"), "--json", path],
                       check=True, stdout=subprocess.DEVNULL)
    with open(path) as f:
        return json.load(f)


def fmt(x):
    return "—" if x is None else "%.3f" % x


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--worlds", nargs="+", default=["hard:0:en", "hard:1:en", "hard:0:zh",
                                                   "hard:1:zh"], help="preset:seed:lang")
    p.add_argument("--variant", nargs="+", action="append", metavar=("NAME", "VAR=FLAGS"),
                   help="a named run with extra run.sh variables (repeatable); "
                        "default: one run named 'default' with none")
    p.add_argument("--out", default=os.path.join(ROOT, "runs", "worlds"))
    a = p.parse_args(argv)
    variants = [(v[0], dict(kv.split("=", 1) for kv in v[1:])) for v in a.variant or
                [["default"]]]
    rows = []
    for world in a.worlds:
        data, report = world_root(a.out, world)
        for name, env_extra in variants:
            run_out = os.path.join(a.out, world.replace(":", "-"), name)
            t0 = time.time()
            r = run_pipeline(data, run_out, env_extra)
            print("%s %s: done (%.0f s)" % (world, name, time.time() - t0), file=sys.stderr)
            rows.append((world, name, report, r))
        tt = run_two_tower(data, os.path.join(a.out, world.replace(":", "-"), variants[0][0]))
        rows.append((world, "two-tower", report, tt))
    head = ("| world | run | random | class-match | pretraining valid | model1 | model2 | model3 "
            "| blend | gallery testB R@100: retrieval / re-ranked | gallery testB NDCG@5 | wall s |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for world, name, report, r in rows:
        base = "%s / %s" % (fmt(report["valid"]["random"]), fmt(report["testB"]["random"]))
        cls = "%s / %s" % (fmt(report["valid"]["class_match"]), fmt(report["testB"]["class_match"]))
        if name == "two-tower":
            cells = ["—"] * 4 + ["%s / %s" % (fmt(r["valid"]), fmt(r["testB"])), "—", "—",
                                 "%.0f" % r["wall_s"]]
        else:
            g = r["gallery"]
            cells = [fmt(r["pretraining"]["valid"])] + [
                "%s / %s" % (fmt(r[s]["valid"]), fmt(r[s]["testB"])) for s in STAGES[1:]] + [
                "%s / %s" % (fmt(g.get("recall@100")), fmt(g.get("rerank_recall@100"))),
                "%s / %s" % (fmt(g.get("ndcg@5")), fmt(g.get("rerank_ndcg@5"))),
                "%.0f" % r["wall_s"]]
        lines.append("| %s | %s | %s | %s | %s |" % (world, name, base, cls, " | ".join(cells)))
    print("NDCG@5, valid / testB\n" + "\n".join(lines))
    with open(os.path.join(a.out, "table.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    return rows


if __name__ == "__main__":
    main()
