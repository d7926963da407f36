"""Hard negatives: for a query, another query (and one of its products) that looks alike
but is not a match.

A negative query shares the query's last word (the head noun, usually) with probability
``p_last``, else comes from the query's K-Means cluster (model1) or, half and half, from
the cluster or from all queries (model2). Beyond the published method, a share ``p_near``
of the negatives can come first from the queries one word apart (``near_groups``): the
changed or swapped attributes a candidate list is full of. Reads only the numpy arrays of
``info/``.
"""
import numpy as np

from errors import DataError
from utils import Ragged, ragged_parts


def _groups(labels, members):
    """labels (Q,) any hashable, members: sorted query indices to keep ->
    (group id (Q,), flat members sorted ascending within each group, offsets (G + 1,))."""
    _, gid = np.unique(np.asarray(labels), return_inverse=True)
    gid = gid.reshape(-1).astype(np.int64)
    flat = members[np.argsort(gid[members], kind="stable")]
    off = np.zeros(gid.max() + 2 if len(gid) else 1, np.int64)
    np.cumsum(np.bincount(gid[members], minlength=len(off) - 1), out=off[1:])
    return gid, flat, off


def _pick(members, exclude, rng):
    """A uniform draw from ``members`` (sorted) minus ``exclude`` (sorted, unique), or None.

    Exact and loop-free in the group size: the r-th allowed member is found by skipping the
    excluded positions, so a group holding only excluded queries costs nothing to detect.
    """
    if len(members) == 0:
        return None
    idx = np.searchsorted(members, exclude)
    hit = idx[(idx < len(members)) & (members[np.minimum(idx, len(members) - 1)] == exclude)]
    n = len(members) - len(hit)
    if n <= 0:
        return None
    r = int(rng.integers(n))
    for h in hit:  # ascending
        if h > r:
            break
        r += 1
    return int(members[r])


def near_groups(tokens, allowed):
    """Groups of queries one word apart: the same words in another order (an attribute
    bound to the other garment) or one word replaced (a colour changed).

    tokens: Q word lists; allowed: sorted query indices that may be drawn. Two queries share
    a group when their sorted words are equal, or equal once one word is taken from each.
    -> (member flat, member offsets (G + 1,), groups-of-query flat, offsets (Q + 1,));
    groups with fewer than two members are dropped.
    """
    keys, pairs = {}, []
    ok = np.zeros(len(tokens), bool)
    ok[allowed] = True
    for q, ts in enumerate(tokens):
        s = tuple(sorted(ts))
        mine = {("=",) + s} | {("-",) + s[:i] + s[i + 1:] for i in range(len(s))} if s else set()
        pairs += [(keys.setdefault(k, len(keys)), q) for k in mine]
    if not pairs:
        return (np.zeros(0, np.int64), np.zeros(1, np.int64), np.zeros(0, np.int64),
                np.zeros(len(tokens) + 1, np.int64))
    g, q = np.array(pairs, np.int64).T
    size = np.bincount(g[ok[q]], minlength=len(keys))
    keep = size[g] >= 2
    g, q = g[keep], q[keep]
    _, g = np.unique(g, return_inverse=True)
    g = g.reshape(-1)
    order = np.lexsort((q, g))
    members = q[order][ok[q[order]]]
    m_off = np.zeros(g.max() + 2 if len(g) else 1, np.int64)
    np.cumsum(np.bincount(g[order][ok[q[order]]], minlength=len(m_off) - 1), out=m_off[1:])
    order = np.lexsort((g, q))
    q_off = np.zeros(len(tokens) + 1, np.int64)
    np.cumsum(np.bincount(q, minlength=len(tokens)), out=q_off[1:])
    return members, m_off, g[order], q_off


class NegativeSampler:
    """Hard negative queries and products, from numpy arrays only.

    With probability ``p_last`` a negative query shares the query's last word; otherwise it
    comes from the query's K-Means cluster (``fallback="cluster"``, model1) or, half and
    half, from the cluster or from all queries (``"cluster_or_random"``, model2). A group
    with no allowed query falls through to the other group, then to all queries. Allowed:
    another text, no product in common with the query, at least one token and one product.
    With ``p_near`` > 0, a draw first tries, with that probability, the queries one word
    apart (``near_groups``), falling through to the published draw. Everything lives in flat arrays plus offsets, so forked DataLoader workers share the
    pages instead of touching (and copying) millions of Python objects.
    """

    FALLBACKS = ("cluster", "cluster_or_random")

    def __init__(self, queries, p_last=0.8, fallback="cluster", p_near=0.0):
        if fallback not in self.FALLBACKS:
            raise ValueError("fallback must be one of %s, got %r" % (self.FALLBACKS, fallback))
        if not 0.0 <= p_last <= 1.0:
            raise ValueError("p_last must lie in [0, 1], got %r" % p_last)
        Q = len(queries["query_id"])
        if Q < 2:
            raise ValueError("negative sampling needs at least 2 queries, got %d" % Q)
        if not 0.0 <= p_near <= 1.0:
            raise ValueError("p_near must lie in [0, 1], got %r" % p_near)
        self.p_last, self.fallback, self.p_near = float(p_last), fallback, float(p_near)
        self.prod_flat, self.prod_off = ragged_parts(queries["products"])
        ok = np.diff(self.prod_off) > 0
        tokens = queries.get("tokens")
        if isinstance(tokens, Ragged):
            ok &= tokens.lengths() > 0
        elif tokens is not None:
            ok &= np.array([len(t) > 0 for t in tokens], bool)
        self.allowed = np.flatnonzero(ok)
        everyone = np.arange(Q)
        self.last_id, self.last_flat, self.last_off = _groups(
            np.asarray(queries["last_word"], dtype=object).astype(str), self.allowed)
        self.clu_id, self.clu_flat, self.clu_off = _groups(queries["cluster"], self.allowed)
        self.text_id, self.text_flat, self.text_off = _groups(
            np.asarray(queries["text"], dtype=object).astype(str), everyone)
        # product -> the queries it is a positive of (real data may share products)
        owner = np.repeat(everyone, np.diff(self.prod_off))
        order = np.argsort(self.prod_flat, kind="stable")
        self.pids, counts = np.unique(self.prod_flat[order], return_counts=True)
        self.owner_flat = owner[order]
        self.owner_off = np.concatenate([[0], np.cumsum(counts)])
        if self.p_near:
            self.near_flat, self.near_off, self.near_of, self.near_of_off = near_groups(
                [list(t) for t in tokens], self.allowed)

    def _near(self, qi, exclude, rng):
        """A query one word apart from qi (a random one of its groups first), or None."""
        gs = self.near_of[self.near_of_off[qi]:self.near_of_off[qi + 1]]
        for g in rng.permutation(gs):
            j = _pick(self.near_flat[self.near_off[g]:self.near_off[g + 1]], exclude, rng)
            if j is not None:
                return j
        return None

    def _excluded(self, qi):
        """Sorted queries that cannot be qi's negative: itself, same text, shared products."""
        ks = np.searchsorted(self.pids, self.prod_flat[self.prod_off[qi]:self.prod_off[qi + 1]])
        t = self.text_id[qi]
        parts = [self.owner_flat[self.owner_off[k]:self.owner_off[k + 1]] for k in ks]
        parts += [self.text_flat[self.text_off[t]:self.text_off[t + 1]], [qi]]
        return np.unique(np.concatenate(parts).astype(np.int64))

    def _members(self, name, qi):
        if name == "last":
            g = self.last_id[qi]
            return self.last_flat[self.last_off[g]:self.last_off[g + 1]]
        g = self.clu_id[qi]
        return self.clu_flat[self.clu_off[g]:self.clu_off[g + 1]]

    def negative_query(self, qi, rng):
        """A query index != qi, drawn as the class docstring says; rng: np.random.Generator."""
        qi = int(qi)
        if self.p_near and rng.random() < self.p_near:
            j = self._near(qi, self._excluded(qi), rng)
            if j is not None:
                return j
        u = rng.random()
        if u < self.p_last:
            order = ("last", "cluster")
        elif self.fallback == "cluster" or u < (1.0 + self.p_last) / 2:
            order = ("cluster", "last")
        else:
            order = ()
        exclude = self._excluded(qi)
        for name in order:
            j = _pick(self._members(name, qi), exclude, rng)
            if j is not None:
                return j
        j = _pick(self.allowed, exclude, rng)
        if j is None:
            raise DataError("query index %d has no possible negative: every other query shares "
                            "its text or a product, or has no tokens" % qi)
        return j

    def negative_product(self, qi, rng):
        """A product id of a fresh negative query; never a positive of qi."""
        j = self.negative_query(qi, rng)
        a, b = self.prod_off[j], self.prod_off[j + 1]
        return int(self.prod_flat[a + rng.integers(b - a)])


class GroupedBatches:
    """This rank's batches of pair indices, each global batch (every rank's rows: the
    columns of an in-batch loss) cut from runs of ``run`` pairs of one group.

    groups: (P,) the group of each pair (e.g. its query's last word). Per epoch, from
    ``default_rng([seed, epoch])``: the pairs are shuffled; a ``share`` of them is laid out
    group by group in a random group order and cut into runs of ``run`` pairs, the rest are
    runs of one; the runs are shuffled; every ``world * batch_size`` pairs make one global
    batch, rank r takes its r-th slice, and the remainder is dropped. Each pair is drawn at
    most once an epoch; a row of a run meets the rest of its run, products of the same
    garment with other attributes, among its in-batch negatives, where a shuffled batch holds
    a few, and the single rows keep the other garments in every batch. A batch sampler for
    torch's DataLoader.
    """

    def __init__(self, groups, batch_size, run, *, share=1.0, world=1, rank=0, seed=0):
        groups = np.asarray(groups)
        if not 0.0 < share <= 1.0:
            raise ValueError("the grouped share must lie in (0, 1], got %r" % (share,))
        if not 1 <= run <= batch_size * world:
            raise ValueError("a run must hold 1 to %d pairs (the global batch), got %r"
                             % (batch_size * world, run))
        if len(groups) < batch_size * world:
            raise DataError("%d pairs cannot fill one global batch of %d"
                            % (len(groups), batch_size * world))
        _, self.gid = np.unique(groups, return_inverse=True)
        self.gid = self.gid.reshape(-1)
        self.batch_size, self.run, self.share = batch_size, run, float(share)
        self.world, self.rank = world, rank
        self.seed, self.epoch = int(seed), 0

    def set_epoch(self, epoch):
        self.epoch = int(epoch)

    def __len__(self):
        return len(self.gid) // (self.batch_size * self.world)

    def order(self):
        """(P,) every pair index in this epoch's order, shared by all ranks."""
        rng = np.random.default_rng([self.seed, self.epoch])
        order = rng.permutation(len(self.gid))
        k = round(self.share * len(order))
        group_rank = rng.permutation(self.gid.max() + 1)       # a random order of the groups
        grouped = order[:k][np.argsort(group_rank[self.gid[order[:k]]], kind="stable")]
        runs = np.concatenate([np.arange(k) // self.run,
                               -(-k // self.run) + np.arange(len(order) - k)])
        order = np.concatenate([grouped, order[k:]])
        return order[np.argsort(rng.permutation(runs[-1] + 1)[runs], kind="stable")]

    def __iter__(self):
        order, b = self.order(), self.batch_size
        for start in range(0, len(self) * b * self.world, b * self.world):
            yield order[start + self.rank * b:start + (self.rank + 1) * b].tolist()
