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

import matching  # noqa: E402
from model1.model import WordImageMatcher  # noqa: E402

PRESETS = {  # paper: the published settings (batch per GPU); small: this CPU; tiny: tests
    "paper": dict(batch_size=130, lr_text=1e-4, lr_image=5e-6, weight_decay=1e-6, gamma=0.95,
                  epochs=5, p_near=0.0, hidden=256, weight_hidden=512, margin=0.9),
    "small": dict(batch_size=64, lr_text=1e-3, lr_image=5e-5, weight_decay=1e-6, gamma=0.95,
                  epochs=4, p_near=0.5, hidden=128, weight_hidden=128, margin=0.9),
    "tiny": dict(batch_size=16, lr_text=1e-3, lr_image=5e-5, weight_decay=1e-6, gamma=0.95,
                 epochs=2, p_near=0.5, hidden=32, weight_hidden=32, margin=0.9),
}


def parse_args(argv=None):
    p = matching.train_parser(__doc__.split("\n")[0], PRESETS)
    g = p.add_argument_group("model1")
    g.add_argument("--hidden", type=int, help="GRU width")
    g.add_argument("--weight-hidden", type=int, help="hidden width of the word-weight MLP")
    g.add_argument("--margin", type=float)
    g.add_argument("--uniform-weights", action="store_true",
                   help="average the word scores instead of learning weights (ablation)")
    return p.parse_args(argv)


def build_model(encoder, word_emb, args):
    return WordImageMatcher(encoder, word_emb, hidden=args.hidden, weight_hidden=args.weight_hidden,
                            uniform_weights=getattr(args, "uniform_weights", False),
                            margin=args.margin, tune_trunk=bool(getattr(args, "lr_trunk", None)))


def main(argv=None):
    return matching.train_main(sys.modules[__name__], argv, __doc__, fallback="cluster")


if __name__ == "__main__":
    main()
