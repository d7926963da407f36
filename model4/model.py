"""model4: a cross-encoder re-ranker, the query and the product's regions read together.

Input: [CLS], the query's words and the product's regions in one sequence. A word is its
embedding (initialised from the export's learned word embeddings, trained) projected to the
model width, plus a position embedding; a region is the exported trunk's vector of it (the
trunk frozen, or fine-tuned) projected, plus a box projection and an embedding of its
detector class; each side adds its type embedding. ``streams=1`` (VisualBERT style): one
pre-norm transformer encoder over the whole sequence. ``streams=2`` (LXMERT style): a text
encoder and a region encoder, then cross layers in which each stream attends to the other
and then to itself. The [CLS] vector, layer-normed, goes through a Linear layer to the
pair's score.

Loss: a softmax over each positive pair and its negatives (``listwise_loss``): the sampled
negative product (query, other product), the sampled negative query (other query, product)
and the products of the other rows of its block of ``block_rows`` consecutive rows of the
batch, rows of the same query left out (shuffled batches: mostly other garments; with
``--group-rows`` runs of same-last-word pairs, the same garment). Optional:
masked-word prediction on the positive pairs (``mlm_weight``), an auxiliary loss.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

import utils
from errors import DataError
from tsv import N_CLASSES

MAX_WORDS = 32      # words a query keeps (its position embeddings); the rest are dropped
SCORE_BATCH = 256   # pairs per forward when scoring candidates: every pair is read whole
MASK_SHARE = 0.15   # masked-word prediction: the share of a query's words masked

# model4 is not published by the team. paper: LXMERT's sizes (d 768, 12 heads, 9 text, 5
# region and 5 cross layers, two streams) and its fine-tuning rate, no word-match feature;
# built, not trained at that size. small: this CPU, one stream of 3 layers, the word-match
# feature (without it the small model stayed near random on the hard world in 2 epochs);
# tiny: tests
PRESETS = {
    "paper": dict(batch_size=32, lr_text=5e-5, lr_image=5e-5, weight_decay=1e-6, gamma=0.95,
                  epochs=4, p_near=0.0, group_rows=0, block_rows=8, word_match=0, streams=2,
                  d_model=768, heads=12, d_ff=3072, layers=12, text_layers=9,
                  region_layers=5, cross_layers=5, dropout=0.1, mlm_weight=0.0, tune_trunk=0),
    "small": dict(batch_size=32, lr_text=1e-3, lr_image=1e-3, weight_decay=1e-6, gamma=0.9,
                  epochs=3, p_near=0.5, group_rows=0, block_rows=8, word_match=1, streams=1,
                  d_model=128, heads=4, d_ff=256, layers=3, text_layers=1, region_layers=1,
                  cross_layers=2, dropout=0.1, mlm_weight=0.0, tune_trunk=0),
    "tiny": dict(batch_size=16, lr_text=1e-3, lr_image=1e-3, weight_decay=1e-6, gamma=0.95,
                 epochs=2, p_near=0.5, group_rows=0, block_rows=8, word_match=1, streams=1,
                 d_model=32, heads=2, d_ff=64, layers=2, text_layers=1, region_layers=1,
                 cross_layers=1, dropout=0.1, mlm_weight=0.0, tune_trunk=0),
}


def encoder_stack(d, heads, d_ff, layers, dropout):
    """``layers`` pre-norm self-attention layers (nn.TransformerEncoder), no final norm."""
    layer = nn.TransformerEncoderLayer(d, heads, d_ff, dropout, batch_first=True,
                                       norm_first=True)
    return nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)


class WordEmbedding(nn.Module):
    """Word ids (B, L) -> [CLS] + words (B, 1 + L, d): embedding -> projection, plus a
    position and the text segment; LayerNorm, dropout. ``mask_at`` (B, L) bool puts the
    learned [MASK] vector in place of those words."""

    def __init__(self, word_emb, d, dropout, with_mask=False, word_match=False):
        super().__init__()
        e = word_emb.shape[1]
        self.emb = nn.Embedding.from_pretrained(word_emb.clone(), freeze=False, padding_idx=0)
        self.proj = nn.Linear(e, d)
        # the pretraining's word score of each word for the product, as a feature: the
        # export's embedding (frozen) against the export's word heads
        self.match_emb = nn.Embedding.from_pretrained(word_emb.clone(), freeze=True) \
            if word_match else None
        self.match = nn.Linear(1, d) if word_match else None
        self.cls = nn.Parameter(torch.zeros(e))
        self.mask = nn.Parameter(torch.zeros(e)) if with_mask else None
        self.pos = nn.Embedding(MAX_WORDS + 1, d)
        self.segment = nn.Parameter(torch.zeros(d))
        self.norm, self.drop = nn.LayerNorm(d), nn.Dropout(dropout)

    def forward(self, tokens, heads=None, mask_at=None):
        """tokens (B, L); heads (B, 5, E) the export's heads of each row's product (read
        with ``word_match``) -> (B, 1 + L, d)."""
        x = self.emb(tokens)
        if mask_at is not None:
            x = torch.where(mask_at[..., None], self.mask.to(x.dtype), x)
        x = torch.cat([self.cls.expand(len(x), 1, -1).to(x.dtype), x], 1)
        x = self.proj(x) + self.pos.weight[:x.shape[1]] + self.segment
        if self.match is not None:
            s = torch.einsum("ble,bhe->blh", self.match_emb(tokens), heads[:, 1:]).max(-1).values
            if mask_at is not None:
                s = s.masked_fill(mask_at, 0.0)                 # a masked word tells nothing
            x = x + F.pad(self.match(s[..., None].to(x.dtype)), (0, 0, 1, 0))  # [CLS]: none
        return self.drop(self.norm(x))


class RegionEmbedding(nn.Module):
    """Regions -> (B, N, d): the exported trunk's region vectors projected, plus a box
    projection, a detector-class embedding and the region segment; LayerNorm, dropout.
    With ``heads``, also the export's (B, 5, E) heads of the product (its pooling and
    output MLP, frozen)."""

    def __init__(self, encoder, d, dropout, tune_trunk=False, heads=False):
        super().__init__()
        self.trunk, self.tune_trunk = encoder.trunk, tune_trunk
        for p in self.trunk.parameters():
            p.requires_grad = tune_trunk
        self.pool, self.out = (encoder.pool, encoder.out) if heads else (None, None)
        for part in (self.pool, self.out) if heads else ():
            part.requires_grad_(False)
        self.n_out = encoder.config["n_out"]
        self.proj = nn.Linear(encoder.config["d_model"], d)
        self.box = nn.Linear(5, d)
        self.label = nn.Embedding(N_CLASSES, d)
        self.segment = nn.Parameter(torch.zeros(d))
        self.norm, self.drop = nn.LayerNorm(d), nn.Dropout(dropout)

    def forward(self, boxes, feats, mask, labels):
        """boxes (B, N, 5), feats (B, N, F), mask (B, N), labels (B, N) -> ((B, N, d), the
        heads (B, 5, E) or None)."""
        with torch.set_grad_enabled(self.tune_trunk and torch.is_grad_enabled()):
            x = self.trunk(boxes, feats, mask)
        heads = None
        if self.out is not None:
            with torch.no_grad():
                heads = self.out(self.pool(x, mask)).view(len(x), self.n_out, -1)
        x = self.proj(x) + self.box(boxes) + self.label(labels) + self.segment
        return self.drop(self.norm(x)), heads


class CrossLayer(nn.Module):
    """LXMERT's cross-modality layer, pre-norm: each stream attends to the other (both from
    the layer's inputs), then to itself, then its feed-forward. ``text_only`` (the last
    layer: the score reads the text stream's [CLS]) updates the text stream alone and
    returns the regions as they came."""

    def __init__(self, d, heads, d_ff, dropout, text_only=False):
        super().__init__()
        self.t_norm, self.r_norm = nn.LayerNorm(d), nn.LayerNorm(d)
        self.t_cross = nn.MultiheadAttention(d, heads, dropout=dropout, batch_first=True)
        self.drop = nn.Dropout(dropout)
        self.t_self = encoder_stack(d, heads, d_ff, 1, dropout)
        self.text_only = text_only
        if not text_only:  # under DDP every parameter must get a gradient
            self.r_cross = nn.MultiheadAttention(d, heads, dropout=dropout, batch_first=True)
            self.r_self = encoder_stack(d, heads, d_ff, 1, dropout)

    def forward(self, t, r, t_pad, r_pad):
        tn, rn = self.t_norm(t), self.r_norm(r)
        t2, _ = self.t_cross(tn, rn, rn, key_padding_mask=r_pad, need_weights=False)
        t_out = self.t_self(t + self.drop(t2), src_key_padding_mask=t_pad)
        if self.text_only:
            return t_out, r
        r2, _ = self.r_cross(rn, tn, tn, key_padding_mask=t_pad, need_weights=False)
        return t_out, self.r_self(r + self.drop(r2), src_key_padding_mask=r_pad)


class CrossEncoder(nn.Module):
    """The word and region embeddings, the transformer (one or two streams) and the
    score head; with ``mlm_weight`` > 0 also the masked-word head (tied to the word
    embeddings)."""

    def __init__(self, encoder, word_emb, *, streams=1, d_model=128, heads=4, d_ff=256,
                 layers=3, text_layers=1, region_layers=1, cross_layers=2, dropout=0.1,
                 block_rows=0, mlm_weight=0.0, word_match=False, tune_trunk=False):
        super().__init__()
        if streams not in (1, 2):
            raise ValueError("streams must be 1 or 2, got %r" % (streams,))
        if streams == 2 and cross_layers < 1:
            raise DataError("two streams meet in the cross layers: --cross-layers must "
                            "be >= 1, got %r" % (cross_layers,))
        d = d_model
        self.encoder = RegionEmbedding(encoder, d, dropout, tune_trunk=tune_trunk,
                                       heads=word_match)
        self.words = WordEmbedding(word_emb, d, dropout, with_mask=mlm_weight > 0,
                                   word_match=word_match)
        self.streams, self.block_rows, self.mlm_weight = streams, block_rows, mlm_weight
        if streams == 1:
            self.body = encoder_stack(d, heads, d_ff, layers, dropout)
        else:
            self.text_body = encoder_stack(d, heads, d_ff, text_layers, dropout)
            self.region_body = encoder_stack(d, heads, d_ff, region_layers, dropout)
            self.cross = nn.ModuleList(CrossLayer(d, heads, d_ff, dropout,
                                                  text_only=k == cross_layers - 1)
                                       for k in range(cross_layers))
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, 1)
        # masked words: built only when trained (DDP stops on a parameter with no gradient)
        self.mlm = nn.Linear(d, word_emb.shape[1]) if mlm_weight > 0 else None

    def train(self, mode=True):
        super().train(mode)
        if not self.encoder.tune_trunk:
            self.encoder.trunk.eval()  # frozen: no dropout noise either
        return self

    def encode(self, t, t_pad, r, r_pad):
        """Embedded text (B, 1 + L, d) and regions (B, N, d), their padding masks -> the
        text positions' outputs (B, 1 + L, d), layer-normed; position 0 is [CLS]."""
        if self.streams == 1:
            x = self.body(torch.cat([t, r], 1), src_key_padding_mask=torch.cat([t_pad, r_pad], 1))
            return self.norm(x[:, :t.shape[1]])
        t = self.text_body(t, src_key_padding_mask=t_pad)
        r = self.region_body(r, src_key_padding_mask=r_pad)
        for layer in self.cross:
            t, r = layer(t, r, t_pad, r_pad)
        return self.norm(t)

    def text_padding(self, tokens):
        """tokens (B, L) -> (B, 1 + L) True on padding ([CLS] never is)."""
        return F.pad(tokens == 0, (1, 0), value=False)

    def pair_scores(self, tokens, boxes, feats, mask, labels):
        """Aligned pairs: tokens (B, L), regions (B, N, ...) -> (B,) scores."""
        tokens = tokens[:, :MAX_WORDS]
        r, heads = self.encoder(boxes, feats, mask, labels)
        t = self.words(tokens, heads)
        return self.head(self.encode(t, self.text_padding(tokens), r, ~mask)[:, 0]).squeeze(-1)

    @torch.no_grad()
    def score_candidates(self, cset, device, batch_size=SCORE_BATCH):
        """Every candidate of a ``utils.CandidateSet`` -> (P,) scores aligned with its pids,
        on the CPU; a query with no known word is read as [CLS] alone."""
        self.eval()
        out = torch.empty(len(cset.pids))
        for b in cset.product_batches(min(batch_size, SCORE_BATCH)):
            tokens, _ = utils.pad_tokens([cset.tokens[k] for k in b["pos"].tolist()])
            s = self.pair_scores(tokens.to(device), *(b[k].to(device) for k in
                                                      ("boxes", "feats", "mask", "labels")))
            out[b["index"]] = s.float().cpu()
        return out

    def forward(self, q_tokens, qi, p_boxes, p_feats, p_mask, p_labels, nq_tokens, n_boxes,
                n_feats, n_mask, n_labels):
        B = len(q_tokens)
        q_tokens, nq_tokens = q_tokens[:, :MAX_WORDS], nq_tokens[:, :MAX_WORDS]
        width = max(q_tokens.shape[1], nq_tokens.shape[1])
        tokens = torch.cat([F.pad(q, (0, width - q.shape[1])) for q in (q_tokens, nq_tokens)])
        n = max(p_mask.shape[1], n_mask.shape[1])
        regions = [torch.cat([F.pad(p, (0, 0) * (p.dim() - 2) + (0, n - p.shape[1]))
                              for p in pair]) for pair in
                   ((p_boxes, n_boxes), (p_feats, n_feats), (p_mask, n_mask),
                    (p_labels, n_labels))]
        # each product embedded once (the trunk runs on 2B products), then paired: text
        # row ti[k] with product row ri[k]
        r_all, heads = self.encoder(*regions)
        ti, ri, block = pair_index(qi, self.block_rows)
        t = self.words(tokens[ti], None if heads is None else heads[ri])
        s = self.head(self.encode(t, self.text_padding(tokens)[ti], r_all[ri],
                                  ~regions[2][ri])[:, 0]).squeeze(-1)
        pos, neg = s[:B], s[B:].float()
        neg_block = neg.new_full((B, B), float("-inf"))
        neg_block[block[0], block[1]] = neg[2 * B:]
        negatives = torch.cat([neg[:2 * B].view(2, B).t(), neg_block], 1)   # (B, 2 + B)
        loss = listwise_loss(pos.float(), negatives)
        parts = {"match": loss.detach(), "pos": pos.detach().mean()}
        if self.mlm is not None:
            mlm = self.masked_word_loss(q_tokens, p_boxes, p_feats, p_mask, p_labels)
            loss = loss + self.mlm_weight * mlm
            parts["mlm"] = mlm.detach()
        return loss, parts

    def masked_word_loss(self, tokens, boxes, feats, mask, labels):
        """Mask MASK_SHARE of each query's words (at least one) in the positive pairs and
        predict them from the pair -> the mean cross-entropy over the masked words."""
        real = tokens != 0
        u = torch.rand(tokens.shape, device=tokens.device).masked_fill(~real, 2.0)
        at = (u < MASK_SHARE) | (u == u.min(1, keepdim=True).values)
        at &= real
        r, heads = self.encoder(boxes, feats, mask, labels)
        t = self.words(tokens, heads, mask_at=at)
        h = self.encode(t, self.text_padding(tokens), r, ~mask)[:, 1:][at]
        logits = self.mlm(h) @ self.words.emb.weight.t()
        return F.cross_entropy(logits.float(), tokens[at])


def pair_index(qi, block_rows):
    """The pairs a batch of B rows scores, as (text row, product row) of the stacked
    [queries; negative queries] and [products; negative products]: the B positives, the B
    (query, negative product), the B (negative query, product), then (query i, product j)
    for the other rows j of i's block of ``block_rows`` consecutive rows whose query is not
    i's -> (text rows, product rows, (i, j) of those block pairs)."""
    B = len(qi)
    rows = torch.arange(B, device=qi.device)
    if block_rows > 1:
        run = rows // block_rows
        ok = (run[:, None] == run[None, :]) & (qi[:, None] != qi[None, :])
        i, j = ok.nonzero(as_tuple=True)
    else:
        i = j = rows[:0]
    ti = torch.cat([rows, rows, rows + B, i])
    ri = torch.cat([rows, rows + B, rows, j])
    return ti, ri, (i, j)


def listwise_loss(pos, negatives):
    """pos (B,) scores of the positive pairs, negatives (B, K) of their negatives (-inf:
    none) -> mean over rows of -log softmax(pos among [pos, negatives])."""
    logits = torch.cat([pos[:, None], negatives], 1)
    return (torch.logsumexp(logits, 1) - pos).mean()


def build_model(encoder, word_emb, args):
    """The cross-encoder the options (of train.py, or a checkpoint's) name, on the exported
    encoder and word embeddings (V, E)."""
    return CrossEncoder(encoder, word_emb, streams=args.streams, d_model=args.d_model,
                        heads=args.heads, d_ff=args.d_ff, layers=args.layers,
                        text_layers=args.text_layers, region_layers=args.region_layers,
                        cross_layers=args.cross_layers, dropout=args.dropout,
                        block_rows=args.block_rows, mlm_weight=args.mlm_weight,
                        word_match=bool(args.word_match),
                        tune_trunk=bool(args.tune_trunk))
