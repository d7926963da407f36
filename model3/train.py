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
import sampler  # noqa: E402
import utils  # noqa: E402
from model3.model import PRESETS, build_model  # noqa: E402


def parse_args(argv=None):
    p = matching.train_parser(__doc__.split("\n")[0], PRESETS, in_batch=True)
    g = p.add_argument_group("model3")
    g.add_argument("--dim", type=runtime.bounded(low=1, why="a width"),
                   help="width of the product and query vectors")
    g.add_argument("--pool", choices=["attn", "mean"],
                   help="pooling over the regions: the pretrained attention pooling, or the mean")
    g.add_argument("--text", choices=["attn", "gru"],
                   help="text side: attention pooling of the word embeddings, or of BiGRU states")
    g.add_argument("--raw-path", type=int, choices=[0, 1],
                   help="1: add an MLP of the square-rooted detector features, learned from "
                        "scratch, to the trunk's regions (not published)")
    return p.parse_args(argv)


def main(argv=None):
    args = matching.apply_preset(parse_args(argv), PRESETS)
    runtime.check_writable(args.out)
    dist = runtime.Dist(args.local_rank, timeout_s=args.dist_timeout)
    runtime.setup_logging(dist.main)
    runtime.seed_everything(args.seed, dist.rank)
    queries, vocab = utils.load_info(args.info)
    negatives = sampler.NegativeSampler(queries, p_last=args.p_last, fallback="cluster",
                                        p_near=args.p_near)
    dataset = utils.PairDataset(queries, vocab, engine.build_store(args), sampler=negatives,
                                seed=args.seed)
    encoder, word_emb, _ = matching.load_pretrained(args.export, vocab, args.info)
    model = build_model(encoder, word_emb, args)
    # only rank 0 evaluates: the other ranks never read the evaluation split
    evaluate = matching.make_evaluator(args, vocab) if dist.main and not args.no_eval else None
    # runs of --group-rows pairs of the same last word (0: the default shuffle)
    batches = sampler.GroupedBatches(negatives.last_id[dataset.pair_query], args.batch_size,
                                     args.group_rows, share=args.group_share, world=dist.world,
                                     rank=dist.rank, seed=args.seed) if args.group_rows else None
    # the vocabulary the frozen embeddings index: checked on resume and in load_trained
    history = engine.fit(args, model, dataset, stage="model3", dist=dist,
                         groups=matching.param_groups(model, args),
                         collate=utils.collate_pairs_flat if args.workers else utils.collate_pairs,
                         evaluate=evaluate, extra_state={"vocab": vocab.itos},
                         batches=batches)
    dist.close()
    return history


if __name__ == "__main__":
    runtime.cli(main)
