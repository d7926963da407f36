"""Rank candidates by the pretraining score and show what the encoder learned.

    python multilabel/validation.py --ckpt runs/multilabel/best.pt --data DATA [--captions 8] \
        [--split valid --split testB --out prediction_result]

Score of a product for a query: the sum over the query's words of log sigmoid(word logit).
Prints NDCG@5 of each split, then beam-search captions of a few products of the first split
beside their true query. With ``--out`` it also writes ``{valid,test}_pred_multilabel.json``
(testB -> test), so the pretraining score can join the blend (``ensemble.py --models``).
"""
import argparse
import functools
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import numpy as np  # noqa: E402
import torch  # noqa: E402

import engine  # noqa: E402
import metric  # noqa: E402
import runtime  # noqa: E402
import text  # noqa: E402
import utils  # noqa: E402
from multilabel.model import Pretrainer  # noqa: E402


@torch.no_grad()
def rank_split(model, cset, device, batch_size=256):
    """-> {qid: [(pid, score), ...]}: pretraining scores of every candidate."""
    model.eval()
    heads = engine.encode_products(model.encoder, cset, device, batch_size)     # (P, 5, E)
    scores = np.zeros(len(cset.pids))
    for k in range(len(cset)):
        a, b = cset.offsets[k], cset.offsets[k + 1]
        scores[a:b] = model.query_scores(heads[a:b], [cset.tokens[k]])[0].cpu().numpy()
    return cset.predictions(scores), heads


def make_evaluator(args, vocab):
    """A closure for engine.fit: NDCG@5 of the pretraining ranking on ``args.eval_split``."""
    tsv, ans = engine.eval_paths(args.data, args.eval_split)
    cset = utils.CandidateSet.from_tsv(tsv, vocab, args.max_boxes, skip_bad=args.skip_bad)
    answers = metric.load_answers(ans, cset.products())

    def evaluate(model):
        preds, _ = rank_split(model, cset, next(model.parameters()).device)
        return {"valid_ndcg5": metric.ndcg_at_k(preds, answers)}
    return evaluate


def load_pretrainer(path):
    ck = runtime.load_checkpoint(path, "multilabel")
    vocab = text.Vocab(ck["vocab"])
    model = Pretrainer(ck["encoder_config"], len(vocab), ck["args"]["k_hard"])
    model.load_state_dict(ck["model"], strict=True)
    return model, vocab, ck


def show_captions(model, vocab, cset, heads, answers, n, beam):
    """Beam-search captions of n products, printed beside their query -> [(pid, query, caption)].

    With answers: one correct product of each of the first queries, so query and caption agree.
    """
    if answers:
        first = {}
        for i, pid in enumerate(cset.pids):
            q = int(cset.qids[cset.pos[i]])
            if int(pid) in answers.get(q, ()):
                first.setdefault(q, i)
        shown = list(first.values())[:n]
    else:
        shown = list(range(min(n, len(cset.pids))))
    caps = model.decoder.beam_search(heads[shown, 0], model.word_emb.weight, text.BOS,
                                     text.EOS, beam=beam)
    out = []
    for i, c in zip(shown, caps):
        true, gen = cset.texts[cset.pos[i]], " ".join(vocab.decode(c))
        out.append((int(cset.pids[i]), true, gen))
        print("product %d\n  query:   %s\n  caption: %s" % (cset.pids[i], true, gen))
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--ckpt", required=True)
    p.add_argument("--data", default=os.path.join(ROOT, "data", "small"))
    p.add_argument("--split", action="append", help="valid, testA, testB (repeatable; default "
                                                    "valid); captions are of the first")
    p.add_argument("--out", help="prediction folder: write {valid,test}_pred_multilabel.json")
    p.add_argument("--captions", type=runtime.bounded(low=0, why="0: none"), default=8,
                   help="products to caption")
    p.add_argument("--beam", type=runtime.bounded(low=1, why="the captions kept at each step"),
                   default=3)
    p.add_argument("--max-boxes", type=runtime.bounded(low=1, why="leave it out to keep every "
                                                                  "box"),
                   help="keep at most this many boxes per product (default: every box)")
    p.add_argument("--skip-bad", action="store_true", help="skip, count and list bad rows")
    a = p.parse_args(argv)
    if a.out:
        runtime.check_writable(a.out)
    splits = a.split or ["valid"]
    for split in splits:  # all there before the first is scored
        engine.split_tsv(a.data, split)
    model, vocab, ck = load_pretrainer(a.ckpt)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model.to(device)
    # result: "ndcg5" and "captions" of the first split, {split: NDCG@5} under "splits"
    result, writers = {"splits": {}}, {}
    for split in splits:
        tsv, ans = engine.split_paths(a.data, split)
        cset = utils.CandidateSet.from_tsv(tsv, vocab, a.max_boxes, skip_bad=a.skip_bad)
        answers = metric.load_answers(ans, cset.products()) if ans else None
        preds, heads = rank_split(model, cset, device)
        if answers:
            result["splits"][split] = metric.ndcg_at_k(preds, answers)
            print("%s NDCG@5 (pretraining score): %.4f  (%d queries, checkpoint epoch %d)"
                  % (split, result["splits"][split], len(answers), ck["epoch"]))
        if "captions" not in result:
            if answers:
                result["ndcg5"] = result["splits"][split]
            result["captions"] = show_captions(model, vocab, cset, heads, answers, a.captions,
                                               a.beam)
        fname = "%s_pred_multilabel.json" % {"testB": "test"}.get(split, split)
        writers[fname] = functools.partial(metric.write_predictions, preds)
    if a.out:  # every split scored before any file is replaced
        utils.write_together(a.out, writers)
        print("wrote %s in %s" % (", ".join(writers), a.out))
    return result

if __name__ == "__main__":
    runtime.cli(main)
