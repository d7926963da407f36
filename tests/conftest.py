"""Shared fixtures (one tiny synthetic world, generated and preprocessed once per run) and
the ``slow`` marker of the files in which every test trains a stage or runs the pipeline."""
import os
import sys
import types

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
# one thread per process, as torchrun gives each rank: with two, a machine busy with other
# jobs stalls every GRU step (docs/decisions.md, "One thread per process"), and the fast
# tier with it
os.environ.setdefault("OMP_NUM_THREADS", "1")
# files whose every test is slow, longest first; they also run first: pytest-xdist (-n 2,
# --dist loadgroup) deals the tests out in order as test processes come free, so the two
# longest start at once and the rest fill in around them
SLOW_FILES = ["test_learning.py", "test_pipeline.py", "test_stages.py"]


def pytest_collection_modifyitems(items):
    rank = {name: i for i, name in enumerate(SLOW_FILES)}
    for item in items:
        if item.path.name in rank:
            item.add_marker(pytest.mark.slow)
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))


@pytest.fixture(scope="session")
def tiny_world(tmp_path_factory):
    import prepare
    import synthetic
    root = tmp_path_factory.mktemp("tiny")
    data, info = str(root / "data"), str(root / "info")
    report = synthetic.generate(data, "tiny", seed=0, log=lambda *a: None)
    prepare.preprocess(data, info=info, workers=1, progress=False)
    return types.SimpleNamespace(data=data, info=info, features=os.path.join(data, "features"),
                                 report=report, root=str(root))


@pytest.fixture(scope="session")
def pretrained(tiny_world):
    """Pretraining on the tiny world (2 epochs) and its export, once per run -> its folder.
    Defined here, not imported into test files: an imported fixture is a new fixture per
    module, and each would train again into the same folder."""
    from multilabel import export_model, train as ml_train
    out = os.path.join(tiny_world.root, "ml")
    ml_train.main(["--data", tiny_world.data, "--info", tiny_world.info, "--preset", "tiny",
                   "--workers", "0", "--epochs", "2", "--no-progress", "--out", out,
                   "--lr", "3e-3"])
    export_model.main(["--ckpt", os.path.join(out, "best.pt"),
                       "--out", os.path.join(out, "encoder.pt")])
    return out
