"""What the matching stages (model1 to model4) share: flags and their preset, the
pretrained export, parameter groups, scoring, the per-epoch evaluator, loading a trained
checkpoint and writing prediction files.

Each stage's ``model.py`` supplies ``PRESETS`` and ``build_model(encoder, word_emb, args)``;
its ``train.py`` and ``validation.py`` call the helpers here.
"""
import argparse
import functools
import os

import torch

import engine
import metric
import runtime
import utils
from errors import DataError
from layers import load_export

DEFAULT_EXPORT = os.path.join(utils.ROOT, "runs", "multilabel", "encoder.pt")


def train_parser(description, presets, *, in_batch=False):
    """The flags of every matching stage; ``in_batch``: the stage's loss takes negatives from
    the other rows of its batch, so their make-up is an option too (``--group-rows``)."""
    p = engine.core_parser(description, presets)
    g = p.add_argument_group("matching")
    g.add_argument("--export", default=DEFAULT_EXPORT, help="multilabel/export_model.py output")
    rate = runtime.bounded(float, low=0, above=True, why="a learning rate")
    g.add_argument("--lr-text", type=rate, help="learning rate of the text side")
    g.add_argument("--lr-image", type=rate, help="learning rate of pooling + output MLP")
    g.add_argument("--tune-trunk", type=int, choices=[0, 1],
                   help="1: fine-tune the pretrained trunk at --lr-trunk; 0: keep it as "
                        "pretraining left it (published)")
    g.add_argument("--lr-trunk", type=rate, help="learning rate of the trunk (--tune-trunk 1)")
    g.add_argument("--weight-decay", type=runtime.bounded(float, low=0, why="0: no decay"))
    g.add_argument("--gamma", type=runtime.bounded(float, low=0, above=True, why="the factor "
                                                   "of the learning rate after each epoch"),
                   help="learning-rate decay per epoch")
    share = runtime.bounded(float, low=0, high=1, why="a probability")
    g.add_argument("--p-last", type=share, default=0.8,
                   help="probability that a negative query shares the last word")
    g.add_argument("--p-near", type=share,
                   help="probability that a negative query is one word apart (a changed or "
                        "swapped attribute) before the published draw; published: 0")
    if in_batch:
        g.add_argument("--group-rows", type=runtime.bounded(low=0, why="0: shuffled batches"),
                       help="build each batch from runs of this many pairs whose queries share "
                            "the last word, so most in-batch negatives are the same garment; 0: "
                            "shuffled batches (published)")
        g.add_argument("--group-share", type=share, default=1.0,
                       help="the share of the pairs laid out in those runs; the rest come "
                            "singly, so every batch also holds other garments")
    return p


def apply_preset(args, presets):
    """``engine.apply_preset``, and the trunk's two flags checked together: ``--tune-trunk``
    alone decides whether the trunk is tuned, so a ``--lr-trunk`` given without it (which
    would change nothing) or a tuned trunk without a rate is refused."""
    lr_trunk_given = args.lr_trunk is not None
    args = engine.apply_preset(args, presets)
    if lr_trunk_given and not args.tune_trunk:
        raise DataError("--lr-trunk %g: the trunk is frozen (--tune-trunk 0, preset %s); "
                        "add --tune-trunk 1 to fine-tune it" % (args.lr_trunk, args.preset))
    if args.tune_trunk and args.lr_trunk is None:
        raise DataError("--tune-trunk 1: preset %s gives the trunk no learning rate; "
                        "add --lr-trunk LR" % args.preset)
    return args


def load_pretrained(export, vocab=None, info=None):
    """The export -> (encoder, word embeddings (V, E), its Vocab); refuses an export
    pretrained on another vocabulary than ``vocab`` (that of the ``info`` folder)."""
    encoder, word_emb, ex_vocab, _ = load_export(export)
    if vocab is not None and ex_vocab.itos != vocab.itos:
        raise DataError("%s was pretrained with another vocabulary (%d words) than %s "
                        "(%d words): rerun pretraining on this info/"
                        % (export, len(ex_vocab), info, len(vocab)))
    return encoder, word_emb, ex_vocab


def param_groups(model, args):
    """Image side (pooling + output MLP) at lr_image, everything else trainable at lr_text;
    the trunk at lr_trunk (a frozen trunk's group holds no trainable parameter:
    ``engine.make_optimizer`` drops it)."""
    named = list(model.named_parameters())
    trunk = [p for n, p in named if n.startswith("encoder.trunk.")]
    image = [p for n, p in named if n.startswith("encoder.") and not n.startswith("encoder.trunk.")]
    text = [p for n, p in named if not n.startswith("encoder.")]
    return [dict(params=image, lr=args.lr_image, weight_decay=args.weight_decay),
            dict(params=text, lr=args.lr_text, weight_decay=args.weight_decay),
            dict(params=trunk, lr=args.lr_trunk, weight_decay=args.weight_decay)]


@torch.no_grad()
def score_split(model, cset, device, batch_size=4096):
    """Every candidate of a CandidateSet -> {qid: [(pid, score), ...]}; products encoded once.

    A query with no known word gets the same score for all its candidates (model1) or reads
    ``<unk>`` (model2); ties rank by product id. A model that reads each pair whole (a
    cross-encoder, model4) scores the candidates itself: ``score_candidates``.
    """
    model.eval()
    if hasattr(model, "score_candidates"):
        return cset.predictions(model.score_candidates(cset, device, batch_size).numpy())
    image = engine.encode_products(model.encode_image, cset, device)
    tokens, _ = utils.pad_tokens(cset.tokens)
    tokens = tokens.to(device)
    pairs = torch.stack([torch.from_numpy(cset.pos), torch.arange(len(cset.pids))], 1).to(device)
    scores = torch.cat([model.score(tokens, image, pairs[s:s + batch_size]).float()
                        for s in range(0, len(pairs), batch_size)])
    return cset.predictions(scores.cpu().numpy())


def make_evaluator(args, vocab):
    tsv, ans = engine.eval_paths(args.data, args.eval_split)
    cset = utils.CandidateSet.from_tsv(tsv, vocab, args.max_boxes, skip_bad=args.skip_bad)
    answers = metric.load_answers(ans, cset.products())

    def evaluate(model):
        preds = score_split(model, cset, next(model.parameters()).device)
        return {"valid_ndcg5": metric.ndcg_at_k(preds, answers)}
    return evaluate


def stage_of(build_model):
    """The stage a ``build_model`` builds: the package of its ``model.py`` (model1, ...)."""
    return build_model.__module__.split(".")[0]


def load_trained(build_model, ckpt_path, export=None):
    """A trained stage checkpoint (trainable weights only) + its export -> (model, vocab, ck);
    ``build_model`` is the stage's (``model*/model.py``), whose checkpoints alone it reads."""
    ck = runtime.load_checkpoint(ckpt_path, stage_of(build_model))
    args = runtime.saved_args(ck, ckpt_path)
    if export:
        args.export = export
    encoder, word_emb, vocab = load_pretrained(args.export)
    model = build_model(encoder, word_emb, args)
    if "vocab" in ck and ck["vocab"] != vocab.itos:
        raise DataError("%s was trained on another vocabulary than its export %s: "
                        "retrain it on this export" % (ckpt_path, args.export))
    engine.load_trainable(model, ck["model"], "%s (preset %s)" % (ckpt_path, args.preset))
    return model, vocab, ck


def validation_main(build_model, name, argv=None):
    p = argparse.ArgumentParser(description="Score every candidate and write prediction files.")
    p.add_argument("--ckpt", required=True, help="best.pt or last.pt of %s/train.py" % name)
    p.add_argument("--data", help="data root (default: the one the checkpoint trained on)")
    p.add_argument("--split", action="append", help="valid, testA, testB (repeatable; "
                                                    "default valid and testB)")
    p.add_argument("--out", default="prediction_result", help="prediction folder")
    p.add_argument("--export", help="encoder export (default: the checkpoint's)")
    p.add_argument("--batch-size", type=runtime.bounded(low=1, why="the pairs scored at once"),
                   default=4096, help="pairs scored at once")
    p.add_argument("--skip-bad", action="store_true", help="skip, count and list bad rows")
    a = p.parse_args(argv)
    runtime.setup_logging()
    runtime.check_writable(a.out)
    model, vocab, ck = load_trained(build_model, a.ckpt, a.export)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model.to(device)
    data = a.data or ck["args"]["data"]
    splits = a.split or ["valid", "testB"]
    for split in splits:  # all there before the first is scored
        engine.split_tsv(data, split)
    # every split scored before any file is replaced: the files of one run go together
    results, writers, lines = {}, {}, []
    for split in splits:
        tsv, ans = engine.split_paths(data, split)
        cset = utils.CandidateSet.from_tsv(tsv, vocab, ck["args"].get("max_boxes"),
                                           skip_bad=a.skip_bad)
        answers = metric.load_answers(ans, cset.products()) if ans else None  # fail early
        preds = score_split(model, cset, device, a.batch_size)
        fname = "%s_pred_%s.json" % ({"testB": "test"}.get(split, split), name)
        writers[fname] = functools.partial(metric.write_predictions, preds)
        line = "%s: wrote %s (%d queries, %d candidates)" % (
            split, os.path.join(a.out, fname), len(cset), len(cset.pids))
        if answers:
            results[split] = metric.ndcg_at_k(preds, answers)
            line += "  NDCG@5 %.4f" % results[split]
        lines.append(line)
    utils.write_together(a.out, writers)
    print("\n".join(lines))
    return results
