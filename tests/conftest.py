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
# jobs stalls every GRU step (bench/README.md, section 3), and the fast tier with it
os.environ.setdefault("OMP_NUM_THREADS", "1")
SLOW_FILES = {"test_learning.py", "test_pipeline.py", "test_stages.py"}


def pytest_collection_modifyitems(items):
    for item in items:
        if item.path.name in SLOW_FILES:
            item.add_marker(pytest.mark.slow)


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
