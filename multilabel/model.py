"""The image encoder, the multi-label word head and the caption decoder (pretraining stage).

ImageEncoder: box MLP (5 -> 100 -> d) added to the (projected) region features ->
LayerNorm -> dropout -> masked multi-head self-attention with residual -> feed-forward with
residual -> masked attention pooling -> output MLP -> (B, 5, d_word) heads. Head 0 is the
"sentence" head, heads 1..4 the "word" heads.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

import runtime
import text

PRESETS = {  # paper: the published settings; small: this CPU in minutes; tiny: tests
    "paper": dict(encoder="paper", batch_size=200, lr=1e-4, weight_decay=1e-6, gamma=0.96,
                  k_hard=1000, epochs=6, transform="none", input_norm=0),
    "small": dict(encoder="small", batch_size=64, lr=1e-3, weight_decay=1e-6, gamma=0.96,
                  k_hard=50, epochs=4, transform="sqrt", input_norm=1),
    "tiny": dict(encoder="tiny", batch_size=16, lr=1e-3, weight_decay=1e-6, gamma=0.96,
                 k_hard=20, epochs=2, transform="sqrt", input_norm=1),
}

# the published sizes, and CPU-sized ones; "tiny" is for tests
ENCODER_PRESETS = {
    "paper": dict(feat_dim=2048, d_model=2048, n_heads=16, d_ff=4096, box_hidden=100,
                  pool_hidden=[512, 256, 128], out_hidden=5120, n_out=5, d_word=1024,
                  dropout=0.1, post_norm=False),
    "small": dict(feat_dim=2048, d_model=256, n_heads=4, d_ff=512, box_hidden=64,
                  pool_hidden=[128, 64], out_hidden=640, n_out=5, d_word=128, dropout=0.1,
                  post_norm=True),
    "tiny": dict(feat_dim=2048, d_model=64, n_heads=2, d_ff=128, box_hidden=16,
                 pool_hidden=[32], out_hidden=160, n_out=5, d_word=32, dropout=0.1,
                 post_norm=True),
}


def mlp(sizes):
    """Linear layers with PReLU between them (none after the last)."""
    layers = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(nn.Linear(a, b))
        if i < len(sizes) - 2:
            layers.append(nn.PReLU())
    return nn.Sequential(*layers)


def stabilise(feats, transform):
    """Variance-stabilising transform of non-negative region features: the published method
    uses them raw ("none"); detector features are heavy-tailed, and "sqrt" (or "log1p")
    keeps a few large activations from drowning the many small ones."""
    if transform == "none":
        return feats
    if transform == "sqrt":
        return feats.clamp(min=0).sqrt()
    if transform == "log1p":
        return feats.clamp(min=0).log1p()
    raise ValueError("feature transform must be none, sqrt or log1p, got %r" % (transform,))


class Trunk(nn.Module):
    """Regions -> contextual region vectors (B, N, d). Frozen after pretraining.

    Options beyond the published encoder (config keys, absent = published): ``transform``
    of the raw features (see ``stabilise``) and ``input_norm``, a LayerNorm over each
    region's raw feature vector, which takes out a picture's overall magnitude;
    ``post_norm`` (absent = on, as exports written before it was an option) adds a LayerNorm
    after the attention and after the feed-forward residuals, which the published trunk
    does not have.
    """

    def __init__(self, c):
        super().__init__()
        d = c["d_model"]
        self.transform = c.get("transform", "none")
        stabilise(torch.zeros(1), self.transform)  # fail at build time on a bad name
        self.input_norm = nn.LayerNorm(c["feat_dim"]) if c.get("input_norm") else nn.Identity()
        # the paper's trunk is as wide as the features; narrower presets project first
        self.proj = nn.Identity() if c["feat_dim"] == d else nn.Linear(c["feat_dim"], d)
        self.box = mlp([5, c["box_hidden"], d])
        self.norm = nn.LayerNorm(d)
        self.drop = nn.Dropout(c["dropout"])
        self.attn = nn.MultiheadAttention(d, c["n_heads"], dropout=c["dropout"], batch_first=True)
        self.ff = mlp([d, c["d_ff"], d])
        post = c.get("post_norm", True)
        self.norm_attn = nn.LayerNorm(d) if post else nn.Identity()
        self.norm_ff = nn.LayerNorm(d) if post else nn.Identity()

    def forward(self, boxes, feats, mask):
        """boxes (B, N, 5), feats (B, N, F), mask (B, N) True on real boxes -> (B, N, d)."""
        # project real boxes only: padding is most of a batch (3.8 boxes on average, up to 91)
        real = self.proj(self.input_norm(stabilise(feats[mask], self.transform))) \
            + self.box(boxes[mask])
        x = real.new_zeros(*mask.shape, real.shape[-1])  # the dtype autocast gave
        x[mask] = real
        x = self.drop(self.norm(x))
        a, _ = self.attn(x, x, x, key_padding_mask=~mask, need_weights=False)
        x = self.norm_attn(x + self.drop(a))
        x = self.norm_ff(x + self.drop(self.ff(x)))
        return x.masked_fill(~mask[..., None], 0.0)


class AttentionPool(nn.Module):
    """A score per region from an MLP, masked softmax, weighted sum: (B, N, d) -> (B, d)."""

    def __init__(self, d, hidden):
        super().__init__()
        self.score = mlp([d] + list(hidden) + [1])

    def forward(self, x, mask):
        s = self.score(x).squeeze(-1).masked_fill(~mask, float("-inf"))
        w = torch.softmax(s.float(), dim=1).to(x.dtype)
        return torch.einsum("bn,bnd->bd", w, x)


class ImageEncoder(nn.Module):
    """Regions -> (B, n_out, d_word) heads; ``trunk`` is frozen downstream, ``pool``/``out`` tuned."""

    def __init__(self, c):
        super().__init__()
        self.config = dict(c)
        self.trunk = Trunk(c)
        self.pool = AttentionPool(c["d_model"], c["pool_hidden"])
        self.out = mlp([c["d_model"], c["out_hidden"], c["n_out"] * c["d_word"]])

    def forward(self, boxes, feats, mask):
        x = self.pool(self.trunk(boxes, feats, mask), mask)      # (B, d)
        return self.out(x).view(len(x), self.config["n_out"], self.config["d_word"])


def word_logits(heads, emb):
    """heads (B, n_out, E), emb (V, E) -> (B, V): max over the word heads 1.. of <head, word>."""
    return torch.einsum("bhe,ve->bhv", heads[:, 1:], emb).max(dim=1).values


def multilabel_loss(logits, labels, k_hard, ignore):
    """BCE over every positive word and the ``k_hard`` highest-scoring negatives per sample.

    logits, labels (B, V) (labels 0/1); ``ignore`` (V,) bool marks words that are never
    labels (the special tokens). Returns the mean BCE over the selected (sample, word) pairs.
    """
    pos = labels.bool() & ~ignore
    neg_scores = logits.detach().masked_fill(pos | ignore, float("-inf"))
    k = min(k_hard, int((~ignore).sum()) - int(pos.sum(1).max()))
    sel = pos.clone()
    if k > 0:
        hard = neg_scores.topk(k, dim=1).indices
        sel.scatter_(1, hard, True)
    sel &= ~ignore
    return F.binary_cross_entropy_with_logits(logits[sel].float(), labels[sel].float())


class CaptionDecoder(nn.Module):
    """GRU decoder from the sentence head; output tied to the word embeddings."""

    def __init__(self, d_word):
        super().__init__()
        self.gru = nn.GRU(d_word, d_word, batch_first=True)

    def forward(self, h0, tokens, emb):
        """h0 (B, E), tokens (B, L) -> logits (B, L, V)."""
        out, _ = self.gru(F.embedding(tokens, emb), h0[None].contiguous())
        return out @ emb.t()

    @torch.no_grad()
    def beam_search(self, h0, emb, bos, eos, beam=3, max_len=12):
        """Decode one caption per row of h0 (B, E) -> list of token id lists (no BOS/EOS)."""
        results = []
        for b in range(len(h0)):
            beams = [(0.0, [bos], h0[b:b + 1, None].transpose(0, 1).contiguous(), False)]
            for _ in range(max_len):
                cand = []
                for score, seq, h, done in beams:
                    if done:
                        cand.append((score, seq, h, True))
                        continue
                    out, h2 = self.gru(F.embedding(torch.tensor([[seq[-1]]], device=emb.device),
                                                   emb), h)
                    logp = torch.log_softmax((out[0, -1] @ emb.t()).float(), -1)
                    top = logp.topk(beam)
                    for lp, t in zip(top.values.tolist(), top.indices.tolist()):
                        cand.append((score + lp, seq + [t], h2, t == eos))
                beams = sorted(cand, key=lambda x: -x[0] / len(x[1]))[:beam]
                if all(d for *_, d in beams):
                    break
            best = beams[0][1][1:]
            results.append([t for t in best if t != eos])
        return results


class Pretrainer(nn.Module):
    """Image encoder + learned word embeddings + caption decoder; forward returns the loss."""

    def __init__(self, c, vocab_size, k_hard=1000, n_special=4):
        super().__init__()
        self.encoder = ImageEncoder(c)
        self.word_emb = nn.Embedding(vocab_size, c["d_word"])
        nn.init.normal_(self.word_emb.weight, std=c["d_word"] ** -0.5)
        self.decoder = CaptionDecoder(c["d_word"])
        self.k_hard = k_hard
        ignore = torch.zeros(vocab_size, dtype=torch.bool)
        ignore[:n_special] = True
        self.register_buffer("ignore", ignore, persistent=False)

    def forward(self, p_boxes, p_feats, p_mask, q_tokens, caption_in, caption_out, **_):
        """q_tokens (B, L) word ids (0-padded) are the labels; caption_in/out (B, L + 1)
        are the query with <bos> prepended / <eos> appended -> (loss, {name: tensor})."""
        heads = self.encoder(p_boxes, p_feats, p_mask)
        emb = self.word_emb.weight
        labels = torch.zeros(len(heads), len(emb), device=emb.device).scatter_(1, q_tokens, 1.0)
        ml = multilabel_loss(word_logits(heads, emb), labels, self.k_hard, self.ignore)
        logits = self.decoder(heads[:, 0], caption_in, emb)
        cap = F.cross_entropy(logits.flatten(0, 1).float(), caption_out.flatten(), ignore_index=0)
        return ml + cap, {"multilabel": ml.detach(), "caption": cap.detach()}

    @torch.no_grad()
    def query_scores(self, heads, token_lists):
        """Pretraining score of each product for each query: sum of log-sigmoid word logits.

        heads (P, n_out, E); token_lists: Q lists of word ids -> (Q, P). An empty query scores 0.
        """
        lp = F.logsigmoid(word_logits(heads, self.word_emb.weight).float())   # (P, V)
        return torch.stack([lp[:, t].sum(1) if len(t) else lp.new_zeros(len(lp))
                            for t in token_lists])


def build_model(args, vocab_size):
    """The Pretrainer the options name: ``args.encoder`` sizes, feature transform, input norm.
    Its encoder's ``config`` is what the checkpoint and the export record."""
    cfg = dict(ENCODER_PRESETS[args.encoder], transform=args.transform,
               input_norm=bool(args.input_norm))
    return Pretrainer(cfg, vocab_size, args.k_hard)


def load_export(path):
    """-> (ImageEncoder with the pretrained weights, word embeddings (V, E), Vocab, config)."""
    ex = runtime.load_checkpoint(path, "export")
    enc = ImageEncoder(ex["config"])
    enc.load_state_dict(ex["encoder"], strict=True)
    return enc, ex["word_emb"], text.Vocab(ex["vocab"]), dict(ex["config"])
