"""Train model3: a dual encoder (one vector per product, one per query), InfoNCE loss.

    python model3/train.py --data DATA --export runs/multilabel/encoder.pt --out runs/model3
    torchrun --nproc_per_node=N model3/train.py ...
    python -m torch.distributed.launch --nproc_per_node=N model3/train.py ...

In-batch InfoNCE both ways over every rank's rows, rows of the same query masked, plus
each row's sampled negative query and product (last word w.p. 0.8, else the K-Means
cluster, as model1 draws them). Keeps OUT/best.pt by valid NDCG@5; then run
model3/validation.py.
"""
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import engine  # noqa: E402
import matching  # noqa: E402
import runtime  # noqa: E402
from model3.model import PRESETS, build_model  # noqa: E402


def parse_args(argv=None):
    p = matching.train_parser(__doc__.split("\n")[0], PRESETS, in_batch=True)
    g = p.add_argument_group("model3")
    g.add_argument("--dim", type=runtime.bounded(low=1, why="a width"),
                   help="width of the product and query vectors")
    g.add_argument("--freeze-trunk", type=int, choices=[0, 1],
                   help="1: keep the pretrained trunk frozen; 0: fine-tune it at --lr-trunk")
    g.add_argument("--pool", choices=["attn", "mean"],
                   help="pooling over the regions: the pretrained attention pooling, or the mean")
    g.add_argument("--text", choices=["attn", "gru"],
                   help="text side: attention pooling of the word embeddings, or of BiGRU states")
    g.add_argument("--raw-path", type=int, choices=[0, 1],
                   help="1: add an MLP of the square-rooted detector features, learned from "
                        "scratch, to the trunk's regions (not published)")
    return p.parse_args(argv)


def main(argv=None):
    args = engine.apply_preset(parse_args(argv), PRESETS)
    return matching.train_main(args, build_model, fallback="cluster")


if __name__ == "__main__":
    runtime.cli(main)
