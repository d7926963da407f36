"""Train model2: sentence–image matching, pointwise (binary cross-entropy) loss.

    python model2/train.py --data DATA --export runs/multilabel/encoder.pt --out runs/model2
    torchrun --nproc_per_node=N model2/train.py ...
    python -m torch.distributed.launch --nproc_per_node=N model2/train.py ...

Each positive (q, p) comes with a negative query (last word w.p. 0.8, else the K-Means
cluster or a random query, half and half) and a negative product; labels (1, 0, 0).
Keeps OUT/best.pt by valid NDCG@5; then run model2/validation.py.
"""
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import engine  # noqa: E402
import matching  # noqa: E402
import runtime  # noqa: E402
import sampler  # noqa: E402
import utils  # noqa: E402
from model2.model import PRESETS, build_model  # noqa: E402


def parse_args(argv=None):
    p = matching.train_parser(__doc__.split("\n")[0], PRESETS)
    g = p.add_argument_group("model2")
    g.add_argument("--input-norm", type=int, choices=[0, 1],
                   help="1: LayerNorm the word embeddings before the GRU (published: 0)")
    g.add_argument("--h0-norm", type=int, choices=[0, 1],
                   help="1: LayerNorm the sentence head before it seeds the GRU (published: 0)")
    g.add_argument("--readout", choices=["last", "mean"],
                   help="last: final states of the last layer; mean: its outputs averaged "
                        "over the words (both directions averaged either way)")
    return p.parse_args(argv)


def main(argv=None):
    args = matching.apply_preset(parse_args(argv), PRESETS)
    runtime.check_writable(args.out)
    dist = runtime.Dist(args.local_rank, timeout_s=args.dist_timeout)
    runtime.setup_logging(dist.main)
    runtime.seed_everything(args.seed, dist.rank)
    queries, vocab = utils.load_info(args.info)
    negatives = sampler.NegativeSampler(queries, p_last=args.p_last, fallback="cluster_or_random",
                                        p_near=args.p_near)
    dataset = utils.PairDataset(queries, vocab, engine.build_store(args), sampler=negatives,
                                seed=args.seed)
    encoder, word_emb, _ = matching.load_pretrained(args.export, vocab, args.info)
    model = build_model(encoder, word_emb, args)
    # only rank 0 evaluates: the other ranks never read the evaluation split
    evaluate = matching.make_evaluator(args, vocab) if dist.main and not args.no_eval else None
    # the vocabulary the frozen embeddings index: checked on resume and in load_trained
    history = engine.fit(args, model, dataset, stage="model2", dist=dist,
                         groups=matching.param_groups(model, args),
                         collate=utils.collate_pairs_flat if args.workers else utils.collate_pairs,
                         evaluate=evaluate, extra_state={"vocab": vocab.itos})
    dist.close()
    return history


if __name__ == "__main__":
    runtime.cli(main)
