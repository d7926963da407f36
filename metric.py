"""The official metric and submission rules, and the answer and prediction files.

NDCG@5 as the competition scores it: the ideal DCG puts ``min(|answers|, 5)`` ones at the
top, a query without answers scores 0, the mean runs over every query of the answer file,
and ties rank by product id (docs/method.md). Recall@k, for rankings of the full gallery,
divides the answers in the first k by ``min(k, |answers|)`` (docs/retrieval.md).
"""
import json
import logging
import math
import os

from errors import DataError
from utils import atomic_open

log = logging.getLogger("kddmm")


# --------------------------------------------------------------------------------------
# Ranking, NDCG and the submission rules
# --------------------------------------------------------------------------------------
def rank(scored):
    """[(pid, score), ...] -> pids by score descending, ties broken by product id ascending."""
    return [int(p) for p, s in sorted(scored, key=lambda x: (-float(x[1]), int(x[0])))]


def ndcg_one(ranked, answers, k=5):
    """Official NDCG@k of one ranked list against a set of correct product ids.

    A product listed again counts once, at its first place: repeats would add gain for the
    same answer and lift the score above 1.
    """
    answers = {int(a) for a in answers}
    if not answers:
        return 0.0
    ranked = list(dict.fromkeys(int(p) for p in ranked))
    dcg = sum(1.0 / math.log2(i + 2) for i, p in enumerate(ranked[:k]) if p in answers)
    idcg = sum(1.0 / math.log2(i + 2) for i in range(min(len(answers), k)))
    return dcg / idcg


def recall_one(ranked, answers, k):
    """Recall@k of one ranked list: answers among the first k, over ``min(k, |answers|)``,
    so a list that fills its k places with answers scores 1 however many more there are;
    a product listed again is dropped, as in ``ndcg_one``; no answers scores 0."""
    answers = {int(a) for a in answers}
    if not answers:
        return 0.0
    ranked = list(dict.fromkeys(int(p) for p in ranked))[:k]
    return sum(p in answers for p in ranked) / min(k, len(answers))


def _per_query(one, predictions, answers, k):
    """{int query_id: ``one(ranked, answers, k)``} for every query of ``answers``.

    predictions: {query_id: [(pid, score), ...]} (ranked here, ties by product id),
    {query_id: {pid: score}}, or {query_id: [pid, ...]} already ranked. Keys may be str or
    int. A query of the answer file missing from the predictions is an error.
    """
    preds = {int(q): v for q, v in predictions.items()}
    out = {}
    for q, ans in answers.items():
        if int(q) not in preds:
            raise DataError("predictions have no entry for query %s" % q)
        v = preds[int(q)]
        if isinstance(v, dict):
            v = list(v.items())
        ranked = rank(v) if v and isinstance(v[0], (list, tuple)) else [int(p) for p in v]
        out[int(q)] = one(ranked, ans, k)
    return out


def _mean_over_answers(one, predictions, answers, k):
    """Mean of ``one`` over every query of ``answers`` (0 for an empty answer file)."""
    per_query = _per_query(one, predictions, answers, k)
    return sum(per_query.values()) / max(1, len(per_query))


def ndcg_per_query(predictions, answers, k=5):
    """{query_id: official NDCG@k} over every query of ``answers``: what a paired
    comparison of two rankers resamples (experiments/compare.py)."""
    return _per_query(ndcg_one, predictions, answers, k)


def ndcg_at_k(predictions, answers, k=5):
    """Mean official NDCG@k over every query of ``answers`` (predictions as ``_per_query``
    takes them): candidate lists or full-gallery rankings alike."""
    return _mean_over_answers(ndcg_one, predictions, answers, k)


def recall_at_k(predictions, answers, k):
    """Mean Recall@k (``recall_one``) over every query of ``answers``, for full-gallery
    rankings against ``<split>_gallery_answer.json``."""
    return _mean_over_answers(recall_one, predictions, answers, k)


def share_of_achievable(x, random, oracle):
    """(x - random) / (oracle - random): the share of the gap between a random ranking and a
    synthetic world's oracle (its ``synthetic_report.json``) that a score ``x`` closes; 0 is
    random, 1 the oracle (docs/worlds.md)."""
    if oracle <= random:
        raise ValueError("the oracle (%.4f) does not beat random (%.4f): nothing is achievable"
                         % (oracle, random))
    return (x - random) / (oracle - random)


def check_submission(rows, candidates=None, answers=None):
    """Apply the official rules to [(query_id, [5 pids]), ...]; raise DataError on a breach."""
    seen = set()
    for i, (q, pids) in enumerate(rows, start=2):
        where = "submission line %d (query %s)" % (i, q)
        if len(pids) != 5:
            raise DataError("%s: %d products, exactly 5 are required" % (where, len(pids)))
        if any(not str(p).isdigit() for p in pids):
            raise DataError("%s: empty or non-digit product id in %s" % (where, pids))
        if len(set(map(int, pids))) != 5:
            raise DataError("%s: duplicate product ids %s" % (where, pids))
        if candidates is not None:
            allowed = {r["product_id"] if isinstance(r, dict) else int(r)
                       for r in candidates[int(q)]}
            if not set(map(int, pids)) <= allowed:
                raise DataError("%s: products that are not candidates of the query" % where)
        seen.add(int(q))
    if answers is not None:
        missing = set(map(int, answers)) - seen
        if missing:
            raise DataError("submission lacks %d queries of the answer file, e.g. %d"
                            % (len(missing), min(missing)))


# --------------------------------------------------------------------------------------
# Answer and prediction files
# --------------------------------------------------------------------------------------
def _is_id(v):
    """An id as JSON may hold it: a non-negative integer or its decimal string."""
    return (isinstance(v, int) and not isinstance(v, bool) and v >= 0) or \
        (isinstance(v, str) and v.isascii() and v.isdigit())


def _read_json(path, hint):
    """A JSON file -> its value; DataError naming the file when it is missing, not UTF-8 or
    not JSON."""
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        raise DataError("%s: not found; %s" % (path, hint)) from None
    except IsADirectoryError:
        raise DataError("%s: a folder; expected a JSON file (%s)" % (path, hint)) from None
    except UnicodeDecodeError as e:
        raise DataError("%s: not UTF-8 (%s; UTF-16 or another encoding?)" % (path, e.reason)) \
            from None
    except json.JSONDecodeError as e:
        raise DataError("%s: not valid JSON (%s)" % (path, e)) from None


def load_answers(path, candidates=None):
    """valid_answer.json -> {int query_id: set(product ids)}; checks them against candidates.

    candidates: ``read_candidates`` output or {query_id: [product_id, ...]}. A query with
    answers but no candidates is an error; answers that are not candidates are a warning.
    """
    raw = _read_json(path, "give the split's answer file (e.g. DATA/valid/valid_answer.json)")
    if not isinstance(raw, dict):
        raise DataError("%s: expected an object {query_id: [product_id, ...]}, got a %s"
                        % (path, type(raw).__name__))
    answers = {}
    for q, ps in raw.items():
        if not _is_id(q):
            raise DataError("%s: query id %r is not an integer" % (path, q))
        if not isinstance(ps, list):
            raise DataError("%s: query %s: expected a list of product ids, got %r"
                            % (path, q, ps))
        for p in ps:
            if not _is_id(p):
                raise DataError("%s: query %s: product id %r is not an integer" % (path, q, p))
        answers[int(q)] = {int(p) for p in ps}
    if candidates is not None:
        for q, ps in answers.items():
            if q not in candidates:
                raise DataError("%s: query %d has answers but no candidates" % (path, q))
            c = candidates[q]
            missing = ps - ({r["product_id"] for r in c["products"]} if isinstance(c, dict)
                            else {int(p) for p in c})
            if missing:
                log.warning("%s: query %d: %d answers are not among its candidates (they can "
                            "never be ranked; NDCG stays below 1)", path, q, len(missing))
    return answers


def write_predictions(scores, path):
    """{qid: [(pid, score), ...]} -> ``{"<qid>": [["<pid>", score], ...]}``, each
    list in ``rank`` order (score descending, then product id), written atomically."""
    out = {}
    for q, items in scores.items():
        items = [(int(p), float(s)) for p, s in items]
        bad = [p for p, s in items if not math.isfinite(s)]
        if bad:
            raise DataError("%s: query %s: product %d has a NaN or infinite score"
                            % (path, q, bad[0]))
        if len({p for p, _ in items}) != len(items):
            raise DataError("%s: query %s lists a product twice" % (path, q))
        items.sort(key=lambda x: (-x[1], x[0]))
        out[str(int(q))] = [[str(p), s] for p, s in items]
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with atomic_open(path) as f:
        json.dump(out, f)


def load_predictions(path):
    """``{"<qid>": [["<pid>", score], ...]}`` -> {int qid: {int pid: float score}}."""
    raw = _read_json(path, "run that model's validation.py first")
    if not isinstance(raw, dict) or not raw:
        raise DataError("%s: expected a non-empty {query_id: [[product_id, score], ...]}" % path)
    out = {}
    for q, items in raw.items():
        where = "%s: query %s" % (path, q)
        if not str(q).isdigit():
            raise DataError("%s: query id is not an integer" % where)
        if not isinstance(items, list) or not items:
            raise DataError("%s: expected a non-empty list of [product_id, score]" % where)
        scores = {}
        for item in items:
            if (not isinstance(item, (list, tuple)) or len(item) != 2
                    or not str(item[0]).isdigit() or isinstance(item[1], bool)
                    or not isinstance(item[1], (int, float)) or not math.isfinite(item[1])):
                raise DataError("%s: bad entry %r (want [product_id, finite score])"
                                % (where, item))
            pid = int(item[0])
            if pid in scores:
                raise DataError("%s: product %d listed twice" % (where, pid))
            scores[pid] = float(item[1])
        out[int(q)] = scores
    return out
