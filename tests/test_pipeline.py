"""The one-command pipeline (run.sh) end to end on the tiny world, with either store."""
import csv
import json
import os
import shutil
import subprocess

import numpy as np
import pytest

import metric
import synthetic
import tsv
import utils

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("store", ["packed", "npz"])
def test_run_sh_end_to_end(tiny_world, tmp_path, store):
    out = str(tmp_path / "runs")
    env = dict(os.environ, DATA_DIR=tiny_world.data, OUT_DIR=out, PRESET="tiny", EPOCHS="1",
               STORE=store, NPROC="1", CUDA_VISIBLE_DEVICES="")
    r = subprocess.run(["bash", os.path.join(ROOT, "run.sh")], env=env, capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    # every command is printed, so a user can copy it
    commands = [line for line in r.stdout.splitlines() if line.startswith("+ ")]
    assert any("model2/train.py" in c for c in commands)
    assert all(("--store packed" in c) == (store == "packed")
               for c in commands if "/train.py" in c)
    with open(os.path.join(out, "stage_times.tsv")) as f:
        stages = [line.split("\t")[0] for line in f]
    assert ("pack" in stages) == (store == "packed") and stages[-3:] == ["ensemble", "retrieval",
                                                                     "index"]
    # the notebook ran through papermill, its parameters in the executed copy
    with open(os.path.join(out, "ensemble.executed.ipynb")) as f:
        assert json.load(f)["metadata"]["papermill"]["parameters"]["pred_dir"] == os.path.join(
            out, "prediction_result")
    with open(os.path.join(out, "index", "manifest.json")) as f:
        assert json.load(f)["checkpoint"]["path"] == os.path.join(out, "model3", "best.pt")
    pred = os.path.join(out, "prediction_result")
    for split in ("valid", "test"):
        for name in ("pred_multilabel", "pred_model1", "pred_model2", "pred_model3",
                     "gallery_model3", "gallery_rerank"):
            assert os.path.exists(os.path.join(pred, "%s_%s.json" % (split, name))), name
    with open(os.path.join(pred, "submission.csv")) as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["query-id", "product1", "product2", "product3", "product4", "product5"]
    cands = tsv.read_candidates(os.path.join(tiny_world.data, "testB", "testB.tsv"))
    metric.check_submission([(int(r[0]), r[1:]) for r in rows[1:]],
                           {q: c["products"] for q, c in cands.items()}, list(cands))
    with open(os.path.join(out, "summary.json")) as f:
        summary = json.load(f)
    ens = summary["ensemble"]
    # the small and tiny presets blend all four, with the weights that score higher on
    # queries they were not fitted to: tuned (by the k-fold) or equal
    assert ens["models"] == ["multilabel", "model1", "model2", "model3"]
    tuned = ens["normalisations"][ens["how"]]
    *members, blend = ens["table"]["valid"]
    if ens["weighting"] == "tuned":
        w = np.array(list(ens["weights"].values())) / ens["simplex_step"]  # a grid point
        assert np.isclose(w.sum() * ens["simplex_step"], 1) and np.allclose(w, w.round())
        assert blend >= max(members) - 1e-12 and ens["estimate"] == tuned["kfold"]
    else:
        assert ens["weighting"] == "equal" and list(ens["weights"].values()) == [0.25] * 4
        assert ens["estimate"] == tuned["equal"] >= tuned["kfold"]
        assert blend == pytest.approx(tuned["equal"])
    assert set(summary["gallery"]["valid"]) == {"recall@10", "recall@100", "ndcg@5",
                                                "rerank_recall@10", "rerank_recall@100",
                                                "rerank_ndcg@5"}
    if store == "packed":
        _resume_skips_finished_stages(env, out, stages)


def _resume_skips_finished_stages(env, out, stages):
    """RESUME=1 skips each stage that finished with the same command; a stage whose record
    is deleted runs again, and so does every stage after it (retrieval reads the blend)."""
    sub = os.path.join(out, "prediction_result", "submission.csv")
    before = open(sub).read()
    os.remove(os.path.join(out, ".stages", "ensemble"))
    r = subprocess.run(["bash", os.path.join(ROOT, "run.sh")], env=dict(env, RESUME="1"),
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    ran = [line for line in r.stdout.splitlines() if line.startswith("+ ")]
    skipped = [line.split(":")[0][2:] for line in r.stdout.splitlines()
               if line.startswith("= ")]
    assert skipped == stages[:stages.index("ensemble")], r.stdout
    assert len(ran) == 4 and "ensemble.ipynb" in ran[0] and "retrieve.py" in ran[1] \
        and "index.py" in ran[2] and "summary.py" in ran[3], r.stdout
    assert open(sub).read() == before
    with open(os.path.join(out, "stage_times.tsv")) as f:
        assert [line.split("\t")[0] for line in f] == stages


def _run_sh(env, **extra):
    r = subprocess.run(["bash", os.path.join(ROOT, "run.sh")], env=dict(env, **extra),
                       capture_output=True, text=True, timeout=900)
    ran = [line for line in r.stdout.splitlines() if line.startswith("+ ")]
    skipped = [line.split(":")[0][2:] for line in r.stdout.splitlines()
               if line.startswith("= ")]
    return r, ran, skipped


def _gallery_files(out):
    return sorted(n for n in os.listdir(os.path.join(out, "prediction_result"))
                  if "gallery" in n)


def test_resume_redoes_what_changed_and_shows_no_stale_figure(tiny_world, tmp_path):
    """RESUME=1 compares what each stage read and wrote, not only its command: a deleted
    output, a torn input and a world regenerated in place each run their stage again and
    every stage after it; outputs a run does not write are gone, never shown as its own."""
    data, out = str(tmp_path / "data"), str(tmp_path / "runs")
    shutil.copytree(tiny_world.data, data, ignore=shutil.ignore_patterns("features"))
    env = dict(os.environ, DATA_DIR=data, OUT_DIR=out, PRESET="tiny", EPOCHS="1",
               NPROC="1", CUDA_VISIBLE_DEVICES="")
    r, _, _ = _run_sh(env)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    with open(os.path.join(out, "stage_times.tsv")) as f:
        stages = [line.split("\t")[0] for line in f]
    assert _gallery_files(out) == ["gallery_metrics.json", "test_gallery_model3.json",
                                   "test_gallery_rerank.json", "valid_gallery_model3.json",
                                   "valid_gallery_rerank.json"]
    # an output deleted: its stage runs again, and every stage after it
    best = os.path.join(out, "model3", "best.pt")
    os.remove(best)
    r, ran, skipped = _run_sh(env, RESUME="1")
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    assert skipped == stages[:stages.index("model3_train")], r.stdout
    assert "model3/train.py" in ran[0] and os.path.exists(best)
    # retrieval fails on an input only it reads (testA, a gallery split, torn): the last
    # model3's gallery files are not left beside this one
    test_a = os.path.join(data, "testA", "testA.tsv")
    with open(test_a, "rb+") as f:
        f.truncate(os.path.getsize(test_a) - 7)
    r, ran, skipped = _run_sh(env, RESUME="1")
    assert r.returncode != 0 and "testA.tsv:" in r.stderr, r.stdout[-2000:] + r.stderr
    assert skipped == stages[:stages.index("retrieval")], r.stdout
    assert _gallery_files(out) == []
    # the world regenerated in place (same path, same product ids, other features), and
    # without gallery answers, as the real release: everything runs again, on the new rows
    synthetic.generate(data, "tiny", seed=0, difficulty=2.0, log=lambda *a: None)
    for split in ("valid", "testA", "testB"):
        os.remove(os.path.join(data, split, split + "_gallery_answer.json"))
    r, ran, skipped = _run_sh(env, RESUME="1")
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    assert skipped == [] and "prepare.py preprocess" in ran[0], r.stdout
    row = next(tsv.iter_lines(os.path.join(data, "train", "train.tsv")))[1]
    row = tsv.parse_row(row)
    _, feats, _ = utils.ProductStore(os.path.join(data, "features")).get(row["product_id"])
    assert np.array_equal(feats, row["features"])
    assert _gallery_files(out) == ["test_gallery_model3.json", "test_gallery_rerank.json",
                                   "valid_gallery_model3.json", "valid_gallery_rerank.json"]
    with open(os.path.join(out, "summary.json")) as f:
        assert json.load(f)["gallery"] == {}
    assert "whole gallery" not in r.stdout
    # SEARCH=0: every stage before the search skipped, the search's files of the run
    # before removed with its records, the index too
    r, ran, skipped = _run_sh(env, RESUME="1", SEARCH="0")
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    assert skipped == stages[:stages.index("retrieval")] and ran[-1].startswith("+ python summary.py")
    assert _gallery_files(out) == [] and not os.path.exists(os.path.join(out, "index"))
    assert not os.path.exists(os.path.join(out, ".stages", "retrieval"))


def test_run_sh_rejects_an_unknown_store(tmp_path):
    env = dict(os.environ, OUT_DIR=str(tmp_path / "runs"), STORE="zip")
    r = subprocess.run(["bash", os.path.join(ROOT, "run.sh")], env=env, capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 2 and "STORE must be packed or npz, got 'zip'" in r.stderr
    assert not os.path.exists(tmp_path / "runs")  # nothing started


def test_gpu_smoke_script_runs_on_cpu(tmp_path):
    """bench/gpu_smoke.sh, the prepared GPU check, keeps working (here with the tiny preset
    and world, scoring on the CPU)."""
    import sys
    work = tmp_path / "smoke"
    env = dict(os.environ, PYTHON=sys.executable, PRESET="tiny", WORLD="tiny", STEPS="2",
               DEVICE="cpu", WORK=str(work), OUT=str(work / "out"), CUDA_VISIBLE_DEVICES="")
    r = subprocess.run(["bash", os.path.join(ROOT, "bench", "gpu_smoke.sh")], env=env,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:]
    files = sorted(os.listdir(work / "out"))
    assert files == ["gpu_smoke.log", "loading.txt", "model1.log.jsonl", "model2.log.jsonl",
                     "multilabel.log.jsonl", "scoring.txt", "training.txt"]
    with open(work / "out" / "training.txt") as f:
        assert len([line for line in f if "samples/s" in line]) == 3
