"""The layers every stage builds on: the pretrained image encoder (its trunk, attention
pooling and output MLP, and the sizes of each preset), the text side of word embeddings and
a BiGRU, and ``load_export``, which reads the encoder and word embeddings pretraining
exported. A stage folder imports these, never another stage folder.

ImageEncoder: box MLP (5 -> 100 -> d) added to the (projected) region features ->
LayerNorm -> dropout -> masked multi-head self-attention with residual -> feed-forward with
residual -> masked attention pooling -> output MLP -> (B, 5, d_word) heads. Head 0 is the
"sentence" head, heads 1..4 the "word" heads.
"""
import torch
import torch.nn as nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

import runtime
import text

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


class TextSide(nn.Module):
    """Word ids -> (frozen word embeddings (B, L, E), GRU states (B, L, H), mask (B, L)).

    ``gru=False`` (uniform word weights, which read no GRU state) builds no GRU and returns
    None for its states.
    """

    def __init__(self, word_emb, hidden, gru=True):
        super().__init__()
        self.emb = nn.Embedding.from_pretrained(word_emb.clone(), freeze=True, padding_idx=0)
        if gru:
            self.norm = nn.LayerNorm(word_emb.shape[1])
            self.gru = nn.GRU(word_emb.shape[1], hidden, num_layers=2, batch_first=True,
                              bidirectional=True)
        self.with_gru = gru

    def forward(self, tokens):
        e = self.emb(tokens)
        mask = tokens != 0
        if not self.with_gru:
            return e, None, mask
        # packed, so the backward direction starts at the last word, not at the padding
        packed = pack_padded_sequence(self.norm(e), mask.sum(1).clamp(min=1).cpu(),
                                      batch_first=True, enforce_sorted=False)
        out, _ = self.gru(packed)
        out, _ = pad_packed_sequence(out, batch_first=True, total_length=tokens.shape[1])
        out = out.view(*tokens.shape, 2, -1).mean(2)   # forward and backward averaged
        return e, out, mask


def load_export(path):
    """-> (ImageEncoder with the pretrained weights, word embeddings (V, E), Vocab, config)."""
    ex = runtime.load_checkpoint(path, "export")
    enc = ImageEncoder(ex["config"])
    enc.load_state_dict(ex["encoder"], strict=True)
    return enc, ex["word_emb"], text.Vocab(ex["vocab"]), dict(ex["config"])
