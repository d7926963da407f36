"""What model1 and model2 share: flags, building from the export, training, prediction files.

A stage module supplies ``PRESETS``, ``build_model(encoder, word_emb, args)`` and the
negative-query fallback; ``train_main`` and ``validation_main`` do the rest.
"""
import argparse
import logging
import os

import torch

import engine
import metric
import sampler
import utils
from multilabel.export_model import load_export

log = logging.getLogger("kddmm")
DEFAULT_EXPORT = os.path.join(utils.ROOT, "runs", "multilabel", "encoder.pt")


def train_parser(description, presets):
    p = engine.core_parser(description, presets)
    g = p.add_argument_group("matching")
    g.add_argument("--export", default=DEFAULT_EXPORT, help="multilabel/export_model.py output")
    g.add_argument("--lr-text", type=float, help="learning rate of the text side")
    g.add_argument("--lr-image", type=float, help="learning rate of pooling + output MLP")
    g.add_argument("--lr-trunk", type=float,
                   help="fine-tune the pretrained trunk at this learning rate (published: "
                        "frozen)")
    g.add_argument("--weight-decay", type=float)
    g.add_argument("--gamma", type=float, help="learning-rate decay per epoch")
    g.add_argument("--p-last", type=float, default=0.8,
                   help="probability that a negative query shares the last word")
    g.add_argument("--p-near", type=float,
                   help="probability that a negative query is one word apart (a changed or "
                        "swapped attribute) before the published draw; published: 0")
    g.add_argument("--eval-split", default="valid")
    g.add_argument("--no-eval", action="store_true")
    return p


def build(stage, args, vocab=None):
    """Export + stage model; checks the export's vocabulary against info/ when given."""
    encoder, word_emb, ex_vocab, _ = load_export(args.export)
    if vocab is not None and ex_vocab.itos != vocab.itos:
        raise utils.DataError("%s was pretrained with another vocabulary (%d words) than %s "
                              "(%d words): rerun pretraining on this info/"
                              % (args.export, len(ex_vocab), args.info, len(vocab)))
    return stage.build_model(encoder, word_emb, args), ex_vocab


def param_groups(model, args):
    """Image side (pooling + output MLP) at lr_image, everything else trainable at lr_text;
    the trunk, when it is tuned at all, at lr_trunk."""
    named = list(model.named_parameters())
    trunk = [p for n, p in named if n.startswith("encoder.trunk.")]
    image = [p for n, p in named if n.startswith("encoder.") and not n.startswith("encoder.trunk.")]
    text = [p for n, p in named if not n.startswith("encoder.")]
    return [dict(params=image, lr=args.lr_image, weight_decay=args.weight_decay),
            dict(params=text, lr=args.lr_text, weight_decay=args.weight_decay),
            dict(params=trunk, lr=getattr(args, "lr_trunk", None) or 0.0,
                 weight_decay=args.weight_decay)]


@torch.no_grad()
def score_split(model, cset, device, batch_size=4096):
    """Every candidate of a CandidateSet -> {qid: [(pid, score), ...]}; products encoded once.

    A query with no known word gets the same score for all its candidates (model1) or reads
    ``<unk>`` (model2); ties rank by product id.
    """
    model.eval()
    image = engine.encode_products(model.encode_image, cset, device)
    tokens, _ = utils.pad_tokens(cset.tokens)
    tokens = tokens.to(device)
    pairs = torch.stack([torch.from_numpy(cset.pos), torch.arange(len(cset.pids))], 1).to(device)
    scores = torch.cat([model.score(tokens, image, pairs[s:s + batch_size]).float()
                        for s in range(0, len(pairs), batch_size)])
    return cset.predictions(scores.cpu().numpy())


def make_evaluator(args, vocab):
    tsv, ans = engine.split_paths(args.data, args.eval_split)
    if ans is None:
        return None
    cset = utils.CandidateSet.from_tsv(tsv, vocab, args.max_boxes, skip_bad=args.skip_bad)
    answers = metric.load_answers(ans, cset.products())

    def evaluate(model):
        preds = score_split(model, cset, next(model.parameters()).device)
        return {"valid_ndcg5": metric.ndcg_at_k(preds, answers)}
    return evaluate


def train_main(stage, argv, description, fallback):
    args = engine.apply_preset(stage.parse_args(argv), stage.PRESETS)
    rank = int(os.environ.get("RANK", 0))
    utils.setup_logging(rank == 0)
    utils.seed_everything(args.seed, rank)
    queries, vocab = utils.load_info(args.info)
    model, _ = build(stage, args, vocab)
    store = engine.build_store(args)
    negatives = sampler.NegativeSampler(queries, args.p_last, fallback, args.p_near)
    dataset = utils.PairDataset(queries, vocab, store, negatives, seed=args.seed)
    evaluate = None if args.no_eval else make_evaluator(args, vocab)
    # the vocabulary the frozen embeddings index: checked on resume and in load_trained
    return engine.fit(args, model, param_groups(model, args), dataset, gamma=args.gamma,
                      collate=utils.collate_pairs_flat if args.workers else utils.collate_pairs,
                      evaluate=evaluate, extra_state={"vocab": vocab.itos})


def load_trained(stage, ckpt_path, export=None):
    """A trained stage checkpoint (trainable weights only) + its export -> model, vocab."""
    ck = utils.load_checkpoint(ckpt_path)
    args = argparse.Namespace(**ck["args"])
    if export:
        args.export = export
    model, vocab = build(stage, args)
    if "vocab" in ck and ck["vocab"] != vocab.itos:
        raise utils.DataError("%s was trained on another vocabulary than its export %s: "
                              "retrain it on this export" % (ckpt_path, args.export))
    missing, unexpected = model.load_state_dict(ck["model"], strict=False)
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    if unexpected or set(missing) - frozen:
        raise utils.DataError("%s does not fit this model (preset %s): missing %s, unexpected %s"
                              % (ckpt_path, args.preset, sorted(set(missing) - frozen)[:3],
                                 unexpected[:3]))
    return model, vocab, ck


def validation_main(stage, name, argv=None):
    p = argparse.ArgumentParser(description="Score every candidate and write prediction files.")
    p.add_argument("--ckpt", required=True, help="best.pt or last.pt of %s/train.py" % name)
    p.add_argument("--data", help="data root (default: the one the checkpoint trained on)")
    p.add_argument("--split", action="append", help="valid, testA, testB (repeatable; "
                                                    "default valid and testB)")
    p.add_argument("--out", default="prediction_result", help="prediction folder")
    p.add_argument("--export", help="encoder export (default: the checkpoint's)")
    p.add_argument("--batch-size", type=int, default=4096, help="pairs scored at once")
    p.add_argument("--skip-bad", action="store_true", help="skip, count and list bad rows")
    a = p.parse_args(argv)
    utils.setup_logging()
    model, vocab, ck = load_trained(stage, a.ckpt, a.export)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model.to(device)
    data = a.data or ck["args"]["data"]
    results = {}
    for split in a.split or ["valid", "testB"]:
        tsv, ans = engine.split_paths(data, split)
        cset = utils.CandidateSet.from_tsv(tsv, vocab, ck["args"].get("max_boxes"),
                                           skip_bad=a.skip_bad)
        answers = metric.load_answers(ans, cset.products()) if ans else None  # fail early
        preds = score_split(model, cset, device, a.batch_size)
        fname = "%s_pred_%s.json" % ({"testB": "test"}.get(split, split), name)
        metric.write_predictions(preds, os.path.join(a.out, fname))
        line = "%s: wrote %s (%d queries, %d candidates)" % (
            split, os.path.join(a.out, fname), len(cset), len(cset.pids))
        if answers:
            results[split] = metric.ndcg_at_k(preds, answers)
            line += "  NDCG@5 %.4f" % results[split]
        print(line)
    return results

