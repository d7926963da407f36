"""Re-ranking a retrieved top K with the blend of ``ensemble.py``.

Each query's K retrieved products are scored by every member of the blend that can score
any (query, product) pair: model1 to model4 (``matching.score_split``) and the
pretraining score (``multilabel``, ``rank_split``). The scores are normalised per query with
the blend's normalisation and mixed with its weights (``ensemble.blend_members``), a chunk
of queries at a time: only that chunk's products have their regions in memory.
``catalogue/retrieve.py --rerank`` runs it; docs/retrieval.md.
"""
import json
import os
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import ensemble  # noqa: E402
import matching  # noqa: E402
import model1.model  # noqa: E402
import model2.model  # noqa: E402
import model3.model  # noqa: E402
import model4.model  # noqa: E402
import tsv  # noqa: E402
import utils  # noqa: E402
from errors import DataError  # noqa: E402
from multilabel.validation import load_pretrainer, rank_split  # noqa: E402

BUILDERS = {"model1": model1.model.build_model, "model2": model2.model.build_model,
            "model3": model3.model.build_model, "model4": model4.model.build_model}
PAIR_SCORERS = ("multilabel",) + tuple(BUILDERS)


# --------------------------------------------------------------------------------------
# The blend and its members
# --------------------------------------------------------------------------------------
def read_blend(path):
    """ensemble.json -> (members, weights in their order, normalisation), every part checked
    (a small file, read before anything heavy runs): a DataError naming the file and what
    is wrong with it."""
    try:
        with open(path) as f:
            blend = json.load(f)
        models, how, weights = blend["models"], blend["how"], blend["weights"]
    except FileNotFoundError:
        raise DataError("%s: not found; run ensemble.py first" % path) from None
    except IsADirectoryError:
        raise DataError("%s: a folder; expected the ensemble.json of ensemble.py"
                        % path) from None
    except (ValueError, KeyError, TypeError) as e:
        raise DataError("%s: not a blend of ensemble.py (%s: %s); rerun ensemble.py"
                        % (path, type(e).__name__, e)) from None

    def bad(reason, *args):
        return DataError("%s: %s" % (path, reason % args))
    if not isinstance(models, list) or len(models) < 2 or \
            not all(isinstance(m, str) for m in models):
        raise bad("\"models\" must list two or more member names, got %r", models)
    twice = sorted({m for m in models if models.count(m) > 1})
    if twice:
        raise bad("member %s is listed twice", twice[0])
    unknown = [m for m in models if m not in PAIR_SCORERS]
    if unknown:
        raise bad("member %s scores only the candidates of its prediction files; re-ranking "
                  "needs members that score any pair (%s)", unknown[0], ", ".join(PAIR_SCORERS))
    if how not in ensemble.HOWS:
        raise bad("normalisation \"how\" is %r, not one of %s", how, ", ".join(ensemble.HOWS))
    if not isinstance(weights, dict):
        raise bad("\"weights\" must map each member to its weight, got %r", weights)
    stray = sorted(set(weights) - set(models))
    if stray:
        raise bad("a weight for %s, which is not among the members %s", stray[0],
                  ", ".join(models))
    for m in models:
        if m not in weights:
            raise bad("no weight for member %s", m)
        if isinstance(weights[m], bool) or not isinstance(weights[m], (int, float)):
            raise bad("the weight of %s is %r, not a number", m, weights[m])
    try:
        w = ensemble.check_weights([weights[m] for m in models], len(models), models)
    except ValueError as e:
        raise bad("%s", e) from None
    return models, w.tolist(), how


def member_checkpoints(blend_path, models, given=()):
    """{member: checkpoint}: ``<RUN>/<member>/best.pt``, RUN the parent of the folder of
    ensemble.json, unless ``given`` ("member=path" strings) names another."""
    run = os.path.dirname(os.path.dirname(os.path.abspath(blend_path)))
    paths = {m: os.path.join(run, m, "best.pt") for m in models}
    for item in given:
        name, sep, path = item.partition("=")
        if not sep or name not in paths:
            raise DataError("--member %s: want MEMBER=PATH, MEMBER one of the blend's "
                            "%s" % (item, ", ".join(models)))
        paths[name] = path
    return paths


def load_member(name, path, device):
    """A member's checkpoint -> (score(cset) -> {qid: [(pid, score), ...]}, vocab,
    max_boxes)."""
    if name == "multilabel":
        model, vocab, ck = load_pretrainer(path)
        model.to(device)
        return (lambda cset: rank_split(model, cset, device)[0]), vocab, ck["args"].get("max_boxes")
    model, vocab, ck = matching.load_trained(BUILDERS[name], path)
    model.to(device)
    return (lambda cset: matching.score_split(model, cset, device)), vocab, \
        ck["args"].get("max_boxes")


def load_members(paths, device):
    """{member: checkpoint} -> (scorers in order, the vocabulary, max_boxes), the last two
    common to every member: one set of tokens and regions serves them all."""
    loaded = [load_member(m, p, device) for m, p in paths.items()]
    first = list(paths)[0]
    for (name, path), (_, vocab, max_boxes) in zip(paths.items(), loaded):
        if vocab.itos != loaded[0][1].itos or max_boxes != loaded[0][2]:
            raise DataError("%s (%s) was trained on another vocabulary or --max-boxes "
                            "than %s: the members of a re-ranking must share both"
                            % (path, name, first))
    return [s for s, _, _ in loaded], loaded[0][1], loaded[0][2]


def weighted_members(models, weights):
    """The members whose weight is not 0 (a weight of 0 changes no score, so they are never
    loaded or run), as (models, weights); two at least, since a blend has two or more."""
    keep = [i for i, w in enumerate(weights) if w > 0]
    keep += [i for i in range(len(models)) if i not in keep][:max(0, 2 - len(keep))]
    keep.sort()
    return [models[i] for i in keep], [weights[i] for i in keep]


def load_blend(path, device, given=()):
    """ensemble.json -> {models, weights, how, scorers, vocab, max_boxes}: the blend with
    its members of non-zero weight loaded (checkpoints as ``member_checkpoints`` finds
    them)."""
    models, weights, how = read_blend(path)
    models, weights = weighted_members(models, weights)
    scorers, vocab, max_boxes = load_members(member_checkpoints(path, models, given), device)
    return dict(models=models, weights=weights, how=how, scorers=scorers, vocab=vocab,
                max_boxes=max_boxes)


def describe(blend):
    """"model1 + model2 (rank, t = 0.3333)"."""
    return "%s (%s)" % (" + ".join(blend["models"]),
                        ensemble.describe(blend["how"], blend["weights"], blend["models"]))


# --------------------------------------------------------------------------------------
# The products of the gallery, read again
# --------------------------------------------------------------------------------------
class GalleryProducts:
    """``get(pid)`` -> (boxes, feats, labels) of any gallery product: from its candidate
    TSV's line when ``lines`` ({pid: (path, byte offset)}) has it, else from the train
    ``store``."""

    def __init__(self, store, lines, max_boxes=None):
        self.store, self.lines, self.max_boxes = store, lines, max_boxes

    def get(self, pid):
        if pid not in self.lines:
            return self.store.get(pid)
        path, offset = self.lines[pid]
        _, text = next(tsv.iter_lines(path, start=offset), (None, None))
        try:
            row = tsv.parse_row(text) if isinstance(text, str) else None
        except ValueError:
            row = None
        if row is None or row["product_id"] != pid:
            raise DataError("%s: byte %d no longer starts product %d's row: the file "
                            "changed since its rows were listed (a saved index: build "
                            "it again)" % (path, offset, pid))
        return utils.row_regions(row, self.max_boxes)


# --------------------------------------------------------------------------------------
# Re-ranking
# --------------------------------------------------------------------------------------
def chunk_set(queries, vocab, get):
    """{qid: (text, [pid, ...])} -> a CandidateSet of those pairs, each distinct product's
    regions read once."""
    regions = {p: get(p) for p in {p for _, pids in queries.values() for p in pids}}
    return utils.CandidateSet.from_products(queries, vocab, regions.__getitem__)


@torch.no_grad()
def rerank(retrieved, texts, *, scorers, weights, how, vocab, get, chunk=32):
    """retrieved {qid: [(pid, score), ...]}, texts {qid: query} -> {qid: [(pid, blend),
    ...]} best first (ties by product id): each query's products scored by every scorer,
    normalised per query (``how``), mixed with ``weights``; ``chunk`` queries at a time."""
    out, qids = {}, sorted(retrieved)
    names = ["member %d" % (i + 1) for i in range(len(scorers))]
    for s in range(0, len(qids), chunk):
        part = {q: (texts[q], [p for p, _ in retrieved[q]]) for q in qids[s:s + chunk]}
        cset = chunk_set(part, vocab, get)
        preds = [{q: dict(items) for q, items in score(cset).items()} for score in scorers]
        mixed = ensemble.blend_members(preds, weights, how, names)
        out.update({q: sorted(m.items(), key=lambda x: (-x[1], x[0])) for q, m in mixed.items()})
    return out
