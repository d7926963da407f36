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
import sampler  # noqa: E402
import utils  # noqa: E402
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
    args = matching.apply_preset(parse_args(argv), PRESETS)
    runtime.check_writable(args.out)
    dist = runtime.Dist(args.local_rank, timeout_s=args.dist_timeout)
    runtime.setup_logging(dist.main)
    runtime.seed_everything(args.seed, dist.rank)
    queries, vocab = utils.load_info(args.info)
    negatives = sampler.NegativeSampler(queries, p_last=args.p_last, fallback="cluster",
                                        p_near=args.p_near)
    dataset = utils.PairDataset(queries, vocab, engine.build_store(args), sampler=negatives,
                                seed=args.seed, labels=True)
    encoder, word_emb, _ = matching.load_pretrained(args.export, vocab, args.info)
    model = build_model(encoder, word_emb, args)
    # only rank 0 evaluates: the other ranks never read the evaluation split
    evaluate = matching.make_evaluator(args, vocab) if dist.main and not args.no_eval else None
    # runs of --group-rows pairs of the same last word (0: the default shuffle)
    batches = sampler.GroupedBatches(negatives.last_id[dataset.pair_query], args.batch_size,
                                     args.group_rows, share=args.group_share, world=dist.world,
                                     rank=dist.rank, seed=args.seed) if args.group_rows else None
    # the vocabulary the frozen embeddings index: checked on resume and in load_trained
    history = engine.fit(args, model, dataset, stage="model4", dist=dist,
                         groups=matching.param_groups(model, args),
                         collate=utils.collate_pairs_flat if args.workers else utils.collate_pairs,
                         evaluate=evaluate, extra_state={"vocab": vocab.itos},
                         batches=batches)
    dist.close()
    return history


if __name__ == "__main__":
    runtime.cli(main)
