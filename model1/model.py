"""model1: word–image matching with learned word weights, pairwise (margin) loss.

Per word i and product p: s_i = max over word heads h=1..4 of <e_i, head_h(p)>;
w_i = softmax over the query's words of MLP([gru_i ; head_0(p)]); score = sum_i w_i s_i.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

from layers import TextSide


PRESETS = {  # paper: the published settings (batch per GPU); small: this CPU; tiny: tests
    "paper": dict(batch_size=130, lr_text=1e-4, lr_image=5e-6, weight_decay=1e-6, gamma=0.95,
                  epochs=5, p_near=0.0, hidden=256, weight_hidden=512, margin=0.9,
                  group_rows=0, uniform_weights=0, tune_trunk=0),
    "small": dict(batch_size=64, lr_text=1e-3, lr_image=5e-5, weight_decay=1e-6, gamma=0.95,
                  epochs=4, p_near=0.5, hidden=128, weight_hidden=128, margin=0.9,
                  group_rows=0, uniform_weights=0, tune_trunk=0),
    "tiny": dict(batch_size=16, lr_text=1e-3, lr_image=5e-5, weight_decay=1e-6, gamma=0.95,
                 epochs=2, p_near=0.5, hidden=32, weight_hidden=32, margin=0.9,
                 group_rows=0, uniform_weights=0, tune_trunk=0),
}


class WordImageMatcher(nn.Module):
    """The exported encoder (trunk frozen) + TextSide + the word-weight MLP."""

    def __init__(self, encoder, word_emb, *, hidden=256, weight_hidden=512, uniform_weights=False,
                 margin=0.9, tune_trunk=False):
        super().__init__()
        self.encoder = encoder
        self.tune_trunk = tune_trunk  # published: the trunk stays as pretraining left it
        for p in encoder.trunk.parameters():
            p.requires_grad = tune_trunk
        self.text = TextSide(word_emb, hidden, gru=not uniform_weights)
        d_word = word_emb.shape[1]
        # MLP([gru_i ; head_0]) with its first layer split so words and products are
        # projected once and combined by broadcasting: (Q, L, 1, K) + (1, 1, P, K)
        # with uniform weights neither the GRU nor the MLP is built: under DDP a parameter
        # that gets no gradient stops the all-reduce
        self.uniform_weights, self.margin = uniform_weights, margin
        if not uniform_weights:
            self.w_text = nn.Linear(hidden, weight_hidden)
            self.w_image = nn.Linear(d_word, weight_hidden, bias=False)
            self.w_out = nn.Sequential(nn.PReLU(), nn.Linear(weight_hidden, 1))

    def train(self, mode=True):
        super().train(mode)
        if not self.tune_trunk:
            self.encoder.trunk.eval()  # frozen: no dropout noise either
        return self

    def encode_image(self, boxes, feats, mask):
        return self.encoder(boxes, feats, mask)                    # (P, 5, E)

    def encode_text(self, tokens):
        return self.text(tokens)

    def score_matrix(self, text, heads):
        """text from encode_text for Q queries, heads (P, 5, E) -> scores (Q, P)."""
        e, g, m = text
        s = torch.einsum("qle,phe->qlph", e, heads[:, 1:]).max(-1).values       # (Q, L, P)
        a = None if self.uniform_weights else \
            self.w_text(g)[:, :, None] + self.w_image(heads[:, 0])[None, None]  # (Q, L, P, K)
        return self._weighted_sum(s, a, m[..., None])

    def score_pairs(self, text, heads):
        """text for N queries, heads (N, 5, E) -> (N,) scores of the pairs (query i, product i).

        Equals ``score_matrix(text, heads).diagonal()`` without the N x N work around it.
        """
        e, g, m = text
        s = torch.einsum("nle,nhe->nlh", e, heads[:, 1:]).max(-1).values        # (N, L)
        a = None if self.uniform_weights else \
            self.w_text(g) + self.w_image(heads[:, 0])[:, None]                 # (N, L, K)
        return self._weighted_sum(s, a, m)

    def _weighted_sum(self, s, a, m):
        """Word scores s (Q, L, ...) summed with softmax-over-words weights w_out(a) (uniform
        when a is None); m broadcasts to s and is False on padding."""
        w = m.float().expand_as(s) if a is None else self.w_out(a).squeeze(-1).float()
        w = w.masked_fill(~m, float("-inf"))
        w = torch.softmax(w, dim=1).nan_to_num(0.0)                # empty query -> all zero
        return (w * s.float()).sum(1)

    def score(self, tokens, heads, pairs):
        """tokens (Q, L), heads (P, 5, E), pairs (N, 2) of (query, product) indices -> (N,)."""
        text = self.encode_text(tokens)
        out = torch.empty(len(pairs), device=heads.device)
        for q in pairs[:, 0].unique():
            sel = (pairs[:, 0] == q).nonzero().squeeze(1)
            t = tuple(None if x is None else x[q:q + 1] for x in text)
            out[sel] = self.score_matrix(t, heads[pairs[sel, 1]])[0]
        return out

    def forward(self, q_tokens, qi, p_boxes, p_feats, p_mask, nq_tokens, n_boxes, n_feats,
                n_mask):
        heads = self.encode_image(p_boxes, p_feats, p_mask)
        n_heads = self.encode_image(n_boxes, n_feats, n_mask)
        text, n_text = self.encode_text(q_tokens), self.encode_text(nq_tokens)
        S = self.score_matrix(text, heads)                                 # (B, B)
        s_np = self.score_pairs(text, n_heads)                             # (q, negative p)
        s_nq = self.score_pairs(n_text, heads)                             # (negative q, p)
        loss = pairwise_loss(S, s_np, s_nq, qi, self.margin)
        return loss, {"pos": S.diagonal().mean().detach()}


def pairwise_loss(S, s_neg_product, s_neg_query, qi, margin):
    """Margin ranking against both sampled negatives plus the hardest in-batch negative in
    both directions (VSE++). S (B, B): S[i, j] = score(query i, product j), positives on the
    diagonal; entries where query j has the same id as query i are positives, not negatives.
    """
    pos = S.diagonal()
    loss = F.relu(margin - pos + s_neg_product) + F.relu(margin - pos + s_neg_query)
    same = qi[:, None] == qi[None, :]
    viol = (margin - pos[:, None] + S).masked_fill(same, 0.0).clamp(min=0)   # query i vs p_j
    viol_t = (margin - pos[None, :] + S).masked_fill(same, 0.0).clamp(min=0)  # q_j vs p_i
    loss = loss + viol.max(1).values + viol_t.max(0).values
    return loss.mean()


def build_model(encoder, word_emb, args):
    """The matcher the options (of train.py, or a checkpoint's) name, on the exported
    encoder and word embeddings (V, E)."""
    return WordImageMatcher(encoder, word_emb, hidden=args.hidden, weight_hidden=args.weight_hidden,
                            uniform_weights=bool(args.uniform_weights), margin=args.margin,
                            tune_trunk=bool(args.tune_trunk))
