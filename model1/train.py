"""Train model1: word–image matching with learned word weights, pairwise loss.

    python model1/train.py --data DATA --export runs/multilabel/encoder.pt --out runs/model1
    torchrun --nproc_per_node=N model1/train.py ...
    python -m torch.distributed.launch --nproc_per_node=N model1/train.py ...

Negative queries share the last word (p = 0.8) or else the K-Means cluster; the loss is a
margin ranking against both sampled negatives plus the hardest in-batch ones (VSE++).
Keeps OUT/best.pt by valid NDCG@5; then run model1/validation.py.
"""
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import engine  # noqa: E402
import matching  # noqa: E402
import runtime  # noqa: E402
from model1.model import PRESETS, build_model  # noqa: E402


def parse_args(argv=None):
    p = matching.train_parser(__doc__.split("\n")[0], PRESETS, in_batch=True)
    g = p.add_argument_group("model1")
    width = runtime.bounded(low=1, why="a width")
    g.add_argument("--hidden", type=width, help="GRU width")
    g.add_argument("--weight-hidden", type=width, help="hidden width of the word-weight MLP")
    g.add_argument("--margin", type=runtime.bounded(float, low=0, why="a margin"))
    g.add_argument("--uniform-weights", action="store_true",
                   help="average the word scores instead of learning weights (ablation)")
    return p.parse_args(argv)


def main(argv=None):
    args = engine.apply_preset(parse_args(argv), PRESETS)
    return matching.train_main(args, build_model, fallback="cluster")


if __name__ == "__main__":
    runtime.cli(main)
