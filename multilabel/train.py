"""Pretrain the image encoder: multi-label word classification + query generation (captions).

    python multilabel/train.py --data DATA --out runs/multilabel [--preset small|paper]
    torchrun --nproc_per_node=N multilabel/train.py --data DATA --out runs/multilabel
    python -m torch.distributed.launch --nproc_per_node=N multilabel/train.py ...

Then export the encoder for model1/model2 with ``multilabel/export_model.py``.
"""
import logging
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import numpy as np  # noqa: E402
import torch  # noqa: E402

import engine  # noqa: E402
import runtime  # noqa: E402
import utils  # noqa: E402
from errors import DataError  # noqa: E402
from layers import ENCODER_PRESETS  # noqa: E402
from multilabel.model import PRESETS, build_model  # noqa: E402
from multilabel.validation import make_evaluator  # noqa: E402

log = logging.getLogger("kddmm")


def parse_args(argv=None):
    p = engine.core_parser(__doc__.split("\n")[0], PRESETS)
    g = p.add_argument_group("pretraining")
    g.add_argument("--encoder", choices=sorted(ENCODER_PRESETS),
                   help="the image encoder's sizes (layers.ENCODER_PRESETS)")
    g.add_argument("--lr", type=runtime.bounded(float, low=0, above=True, why="a learning rate"))
    g.add_argument("--weight-decay", type=runtime.bounded(float, low=0, why="0: no decay"))
    g.add_argument("--gamma", type=runtime.bounded(float, low=0, above=True, why="the factor "
                                                   "of the learning rate after each epoch"),
                   help="learning-rate decay per epoch")
    g.add_argument("--k-hard", type=runtime.bounded(low=1, why="negative words per sample"),
                   help="hardest negative words per sample")
    g.add_argument("--transform", choices=["none", "sqrt", "log1p"],
                   help="variance-stabilising transform of the raw region features "
                        "(published: none)")
    g.add_argument("--input-norm", type=int, choices=[0, 1],
                   help="1: LayerNorm over each region's raw features (published: 0)")
    g.add_argument("--word-vectors", help="optional word2vec/GloVe text file to initialise "
                                          "the word embeddings (dimension must match)")
    return p.parse_args(argv)


def load_word_vectors(path, vocab, dim):
    """Rows of a word2vec/GloVe text file for the words of ``vocab`` -> (rows dict, hits)."""
    found = {}
    with open(path, encoding="utf-8", errors="replace") as f:
        for i, line in enumerate(f, 1):
            parts = line.rstrip().split(" ")
            if i == 1 and len(parts) == 2:
                continue  # word2vec header "count dim"
            if parts[0] in vocab.stoi:
                if len(parts) - 1 != dim:
                    raise DataError("%s:%d: %d values, the preset needs %d"
                                    % (path, i, len(parts) - 1, dim))
                found[vocab.stoi[parts[0]]] = np.asarray(parts[1:], np.float32)
    return found


def main(argv=None):
    args = engine.apply_preset(parse_args(argv), PRESETS)
    runtime.check_writable(args.out)
    dist = runtime.Dist(args.local_rank, timeout_s=args.dist_timeout)
    runtime.setup_logging(dist.main)
    runtime.seed_everything(args.seed, dist.rank)
    queries, vocab = utils.load_info(args.info)
    dataset = utils.PairDataset(queries, vocab, engine.build_store(args), sampler=None,
                                seed=args.seed)
    model = build_model(args, len(vocab))
    if args.word_vectors:
        rows = load_word_vectors(args.word_vectors, vocab, model.word_emb.embedding_dim)
        with torch.no_grad():
            for i, v in rows.items():
                model.word_emb.weight[i] = torch.from_numpy(v)
        log.info("word vectors: %d of %d words initialised", len(rows), len(vocab))
    groups = [dict(params=list(model.parameters()), lr=args.lr, weight_decay=args.weight_decay)]
    # only rank 0 evaluates: the other ranks never read the evaluation split
    evaluate = make_evaluator(args, vocab) if dist.main and not args.no_eval else None
    history = engine.fit(args, model, dataset, stage="multilabel", dist=dist, groups=groups,
                         collate=utils.collate_pairs_flat if args.workers else utils.collate_pairs,
                         evaluate=evaluate,
                         extra_state={"vocab": vocab.itos, "encoder_config": model.encoder.config})
    dist.close()
    return history


if __name__ == "__main__":
    runtime.cli(main)
