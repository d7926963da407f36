"""Shared fixtures: one tiny synthetic world, generated and preprocessed once per session."""
import os
import sys
import types

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")


@pytest.fixture(scope="session")
def tiny_world(tmp_path_factory):
    import synthetic
    import utils
    root = tmp_path_factory.mktemp("tiny")
    data, info = str(root / "data"), str(root / "info")
    report = synthetic.generate(data, "tiny", seed=0, log=lambda *a: None)
    utils.preprocess(data, info=info, workers=1, progress=False)
    return types.SimpleNamespace(data=data, info=info, features=os.path.join(data, "features"),
                                 report=report, root=str(root))
