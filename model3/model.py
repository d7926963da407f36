"""model3: a dual encoder, one unit vector per product and one per query, scored by their
dot product, so a whole catalogue can be encoded once and searched.

Image side: the exported trunk (frozen, or fine-tuned) -> plus a box embedding of each
region (zero at the start, so pooling first sees what it was pretrained on) and, with
``raw_path``, an MLP of the square-rooted detector features learned from scratch (also zero
at the start), which reaches what pretraining left out of the trunk -> pooling over
the regions (the exported attention pooling, or the mean) -> Linear -> L2 norm. Text side:
the exported word embeddings (frozen) -> LayerNorm -> attention pooling (or a BiGRU whose
states are attention-pooled) -> Linear -> L2 norm. Its batches carry no detector class,
so there is no class embedding.

Loss: InfoNCE in both directions with a learned temperature over every pair of the batch
(of every rank under DDP); rows of the same query are not each other's negatives, and each
row's sampled negative product (query -> products) and negative query (product -> queries)
are one more column.
"""
import math

import torch
import torch.distributed as td
import torch.nn as nn
import torch.nn.functional as F

from layers import AttentionPool, TextSide
from text import UNK
from tsv import FEAT_DIM

# the inverse temperature starts at 1 / 0.07 and is clamped to at most 100 (CLIP's values)
LOG_SCALE_INIT, LOG_SCALE_MAX = math.log(1 / 0.07), math.log(100.0)

# model3 is not published. paper: the published matching stages' batch, text rate, decay
# and frozen trunk; the new image layers (box embedding, projection) train at the text
# rate, not at the 5e-6 those stages give the pretrained pooling. small: this CPU, the trunk
# frozen, the BiGRU text side and batches cut from runs of 8 same-last-word pairs (each the
# better across the worlds, docs/method.md); tiny: tests
PRESETS = {
    "paper": dict(batch_size=130, lr_text=1e-4, lr_image=1e-4, lr_trunk=5e-6,
                  weight_decay=1e-6, gamma=0.95, epochs=5, p_near=0.0, dim=1024,
                  tune_trunk=0, pool="attn", text="attn", group_rows=0, raw_path=0),
    "small": dict(batch_size=128, lr_text=1e-3, lr_image=1e-3, lr_trunk=1e-4,
                  weight_decay=1e-6, gamma=0.9, epochs=5, p_near=0.5, dim=256,
                  tune_trunk=0, pool="attn", text="gru", group_rows=8, raw_path=0),
    "tiny": dict(batch_size=16, lr_text=1e-3, lr_image=1e-3, lr_trunk=1e-4,
                 weight_decay=1e-6, gamma=0.95, epochs=2, p_near=0.5, dim=32,
                 tune_trunk=0, pool="attn", text="gru", group_rows=4, raw_path=0),
}


class MeanPool(nn.Module):
    """The mean over the real regions: (B, N, d), mask (B, N) -> (B, d)."""

    def forward(self, x, mask):
        m = mask[..., None].to(x.dtype)
        return (x * m).sum(1) / m.sum(1).clamp(min=1)


class ImageSide(nn.Module):
    """Regions -> (B, dim) unit vectors on the exported trunk; its pooling is kept for
    ``pool="attn"``, its output MLP (the word heads) is not used."""

    def __init__(self, encoder, dim, *, pool="attn", tune_trunk=False, raw_path=False):
        super().__init__()
        if pool not in ("attn", "mean"):
            raise ValueError("pool must be 'attn' or 'mean', got %r" % (pool,))
        d = encoder.config["d_model"]
        self.trunk, self.tune_trunk = encoder.trunk, tune_trunk
        for p in self.trunk.parameters():
            p.requires_grad = tune_trunk
        self.box = nn.Linear(5, d)
        nn.init.zeros_(self.box.weight), nn.init.zeros_(self.box.bias)
        self.raw = nn.Sequential(nn.Linear(FEAT_DIM, d), nn.GELU(), nn.Linear(d, d)) \
            if raw_path else None
        if raw_path:
            nn.init.zeros_(self.raw[2].weight), nn.init.zeros_(self.raw[2].bias)
        self.pool = encoder.pool if pool == "attn" else MeanPool()
        self.proj = nn.Linear(d, dim)

    def forward(self, boxes, feats, mask):
        """boxes (B, N, 5), feats (B, N, F), mask (B, N) -> (B, dim), unit norm."""
        with torch.set_grad_enabled(self.tune_trunk and torch.is_grad_enabled()):
            x = self.trunk(boxes, feats, mask)
        x = x + self.box(boxes)
        if self.raw is not None:
            x = x + self.raw(feats.clamp(min=0).sqrt())
        x = self.pool(x, mask)
        return F.normalize(self.proj(x).float(), dim=-1)


class QueryEncoder(nn.Module):
    """The text side alone: query tokens -> (Q, dim) unit vectors. A search builds only
    this (``catalogue/query.py``); DualEncoder is one with the image side beside it."""

    def __init__(self, word_emb, *, dim=256, text_kind="attn"):
        super().__init__()
        self.add_text_side(word_emb, dim=dim, text_kind=text_kind)

    def add_text_side(self, word_emb, *, dim, text_kind):
        """The submodules ``text`` (``layers.TextSide``), ``text_norm``, ``text_pool`` and
        ``text_proj``. ``text_kind`` "attn": the exported word embeddings (frozen) ->
        LayerNorm -> attention pooling -> Linear; "gru": their 2-layer BiGRU states
        (directions averaged, packed) -> attention pooling -> Linear."""
        if text_kind not in ("attn", "gru"):
            raise ValueError("text must be 'attn' or 'gru', got %r" % (text_kind,))
        d_word = word_emb.shape[1]
        self.text = TextSide(word_emb, d_word, gru=text_kind == "gru")
        self.text_norm = nn.LayerNorm(d_word) if text_kind == "attn" else nn.Identity()
        self.text_pool = AttentionPool(d_word, [d_word])
        self.text_proj = nn.Linear(d_word, dim)

    def encode_queries(self, tokens):
        """tokens (Q, L) 0-padded -> (Q, dim) unit vectors; an empty query reads <unk>."""
        tokens = tokens.to(self.text_proj.weight.device).clone()
        tokens[(tokens != 0).sum(1) == 0, 0] = UNK
        e, states, mask = self.text(tokens)
        x = self.text_norm(e) if states is None else states
        return F.normalize(self.text_proj(self.text_pool(x, mask)).float(), dim=-1)


class DualEncoder(QueryEncoder):
    """ImageSide + the text side + the learned temperature."""

    def __init__(self, encoder, word_emb, *, dim=256, pool="attn", text_kind="attn",
                 tune_trunk=False, raw_path=False):
        nn.Module.__init__(self)
        # the image side first: the layers are created, and their weights drawn, in the
        # order the trained checkpoints and the seeds' figures were made with
        self.encoder = ImageSide(encoder, dim, pool=pool, tune_trunk=tune_trunk,
                                 raw_path=raw_path)
        self.add_text_side(word_emb, dim=dim, text_kind=text_kind)
        self.logit_scale = nn.Parameter(torch.tensor(LOG_SCALE_INIT))

    def train(self, mode=True):
        super().train(mode)
        if not self.encoder.tune_trunk:
            self.encoder.trunk.eval()  # frozen: no dropout noise either
        return self

    def encode_image(self, boxes, feats, mask):
        """Region tensors of N products, on the model's device -> (N, dim) unit vectors."""
        return self.encoder(boxes, feats, mask)

    def encode_product_batch(self, batch):
        """A product batch as ``utils.CandidateSet.product_batches`` yields it (a dict, on
        any device) -> (N, dim) unit vectors, on the model's device."""
        dev = self.logit_scale.device
        return self.encode_image(batch["boxes"].to(dev), batch["feats"].to(dev),
                                 batch["mask"].to(dev))

    def score(self, tokens, products, pairs):
        """tokens (Q, L), products (P, dim) vectors, pairs (N, 2) of (query, product)
        indices -> (N,)."""
        queries = self.encode_queries(tokens)
        return (queries[pairs[:, 0]] * products[pairs[:, 1]]).sum(1)

    def forward(self, q_tokens, qi, p_boxes, p_feats, p_mask, nq_tokens, n_boxes, n_feats,
                n_mask):
        query, product = self.encode_queries(q_tokens), self.encode_image(p_boxes, p_feats, p_mask)
        neg_query = self.encode_queries(nq_tokens)
        neg_product = self.encode_image(n_boxes, n_feats, n_mask)
        scale = self.logit_scale.clamp(0.0, LOG_SCALE_MAX).exp()
        loss = infonce_loss(query, product, qi, scale, neg_query=neg_query,
                            neg_product=neg_product)
        return loss, {"pos": (query * product).sum(1).mean().detach(), "scale": scale.detach()}


class _GatherWithGrad(torch.autograd.Function):
    """all_gather whose backward hands each rank the gradient on its own rows summed over
    every rank's loss: with DDP's average of the ranks' gradients, the gradient of the
    whole batch's loss, as one process would compute it."""

    @staticmethod
    def forward(ctx, x):
        parts = [torch.empty_like(x) for _ in range(td.get_world_size())]
        td.all_gather(parts, x.contiguous())
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous()
        td.all_reduce(grad)
        n = len(grad) // td.get_world_size()
        return grad[td.get_rank() * n:(td.get_rank() + 1) * n]


def gather_rows(x):
    """This rank's rows x (B, ...) -> (every rank's rows in rank order (world * B, ...), the
    index of this rank's first row). Gradients flow through every part back to the rank
    that holds it (``_GatherWithGrad``): each rank's loss trains every rank's embeddings as
    its columns, and DDP's average is the gradient of one process on the whole batch.
    Every rank must hold the same B (DistributedSampler gives each the same count). Without
    a process group: (x, 0)."""
    if not td.is_initialized() or td.get_world_size() == 1:
        return x, 0
    return _GatherWithGrad.apply(x), td.get_rank() * len(x)


def infonce_loss(query, product, qi, scale, *, neg_query, neg_product):
    """InfoNCE query -> products and product -> queries, averaged.

    query, product (B, D) unit vectors, row i a positive pair; qi (B,) query indices; scale
    the inverse temperature; neg_product (B, D) row i's sampled negative product, neg_query
    (B, D) its sampled negative query, each one extra column of row i only (the sampler keeps
    them off row i's query, not off the others'). The in-batch columns are every rank's
    rows (``gather_rows``); a column of the same query as the row, other than the row's
    own pair, is masked out: it is a positive too, not a negative.
    """
    all_query, start = gather_rows(query)
    all_product, _ = gather_rows(product)
    all_qi, _ = gather_rows(qi)
    target = torch.arange(len(qi), device=qi.device) + start
    same = qi[:, None] == all_qi[None, :]
    same[torch.arange(len(qi)), target] = False
    same = F.pad(same, (0, 1), value=False)               # the sampled negative's column
    # in float32 under autocast too: scaled bf16 logits lose what tells near candidates apart
    with torch.autocast(query.device.type, enabled=False):
        q2p = torch.cat([query @ all_product.t(), (query * neg_product).sum(1, keepdim=True)], 1)
        p2q = torch.cat([product @ all_query.t(), (product * neg_query).sum(1, keepdim=True)], 1)
        return sum(F.cross_entropy((scale * s).masked_fill(same, float("-inf")), target)
                   for s in (q2p, p2q)) / 2


def build_model(encoder, word_emb, args):
    """The dual encoder the options (of train.py, or a checkpoint's) name, on the exported
    encoder and word embeddings (V, E)."""
    return DualEncoder(encoder, word_emb, dim=args.dim, pool=args.pool, text_kind=args.text,
                       tune_trunk=bool(args.tune_trunk), raw_path=bool(args.raw_path))
