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
import sampler  # noqa: E402
import utils  # noqa: E402
from model1.model import PRESETS, build_model  # noqa: E402


def parse_args(argv=None):
    p = matching.train_parser(__doc__.split("\n")[0], PRESETS, in_batch=True)
    g = p.add_argument_group("model1")
    width = runtime.bounded(low=1, why="a width")
    g.add_argument("--hidden", type=width, help="GRU width")
    g.add_argument("--weight-hidden", type=width, help="hidden width of the word-weight MLP")
    g.add_argument("--margin", type=runtime.bounded(float, low=0, why="a margin"))
    g.add_argument("--uniform-weights", type=int, choices=[0, 1],
                   help="1: average the word scores instead of learning weights (ablation)")
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
    history = engine.fit(args, model, dataset, stage="model1", dist=dist,
                         groups=matching.param_groups(model, args),
                         collate=utils.collate_pairs_flat if args.workers else utils.collate_pairs,
                         evaluate=evaluate, extra_state={"vocab": vocab.itos},
                         batches=batches)
    dist.close()
    return history


if __name__ == "__main__":
    runtime.cli(main)
