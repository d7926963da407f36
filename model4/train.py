"""Train model4: a cross-encoder re-ranker (query and regions in one transformer), listwise loss.

    python model4/train.py --data DATA --export runs/multilabel/encoder.pt --out runs/model4
    torchrun --nproc_per_node=N model4/train.py ...
    python -m torch.distributed.launch --nproc_per_node=N model4/train.py ...

Each positive pair is scored against its sampled negative product and negative query (last
word w.p. 0.8, else the K-Means cluster, as model1 draws them) and against the products of
the other rows of its block of --block-rows rows; a softmax over them, plus
optionally masked-word prediction (--mlm-weight). Keeps OUT/best.pt by valid NDCG@5; then
run model4/validation.py.
"""
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import engine  # noqa: E402
import matching  # noqa: E402
import runtime  # noqa: E402
from model4.model import PRESETS, build_model  # noqa: E402


def parse_args(argv=None):
    p = matching.train_parser(__doc__.split("\n")[0], PRESETS, in_batch=True)
    g = p.add_argument_group("model4")
    g.add_argument("--streams", type=int, choices=[1, 2],
                   help="1: one encoder over words and regions (VisualBERT); 2: a text and a "
                        "region encoder, then cross-attention layers (LXMERT)")
    g.add_argument("--d-model", type=int, help="width of the transformer")
    g.add_argument("--heads", type=int, help="attention heads")
    g.add_argument("--d-ff", type=int, help="feed-forward width")
    g.add_argument("--layers", type=int, help="layers of the single stream (--streams 1)")
    g.add_argument("--text-layers", type=int, help="text-only layers (--streams 2)")
    g.add_argument("--region-layers", type=int, help="region-only layers (--streams 2)")
    g.add_argument("--cross-layers", type=int, help="cross-attention layers (--streams 2)")
    g.add_argument("--dropout", type=float)
    g.add_argument("--block-rows", type=int,
                   help="each row is also scored against the products of the other rows of "
                        "its block of this many consecutive rows (0: none); a run of "
                        "--group-rows shares a block with its own garment")
    g.add_argument("--word-match", type=int, choices=[0, 1],
                   help="1: each word token also carries its pretraining score for the "
                        "product (its export embedding against the export's word heads)")
    g.add_argument("--mlm-weight", type=float,
                   help="weight of the auxiliary masked-word loss on the positive pairs "
                        "(0: off)")
    return p.parse_args(argv)


def main(argv=None):
    args = engine.apply_preset(parse_args(argv), PRESETS)
    return matching.train_main(args, build_model, fallback="cluster", labels=True)


if __name__ == "__main__":
    runtime.cli(main)
