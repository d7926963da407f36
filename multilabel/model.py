"""Pretraining: the image encoder (``layers.ImageEncoder``) with learned word embeddings,
the multi-label word head and the caption decoder."""
import torch
import torch.nn as nn
import torch.nn.functional as F

from layers import ENCODER_PRESETS, ImageEncoder

PRESETS = {  # paper: the published settings; small: this CPU in minutes; tiny: tests
    "paper": dict(encoder="paper", batch_size=200, lr=1e-4, weight_decay=1e-6, gamma=0.96,
                  k_hard=1000, epochs=6, transform="none", input_norm=0),
    "small": dict(encoder="small", batch_size=64, lr=1e-3, weight_decay=1e-6, gamma=0.96,
                  k_hard=50, epochs=4, transform="sqrt", input_norm=1),
    "tiny": dict(encoder="tiny", batch_size=16, lr=1e-3, weight_decay=1e-6, gamma=0.96,
                 k_hard=20, epochs=2, transform="sqrt", input_norm=1),
}


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

    def forward(self, p_boxes, p_feats, p_mask, q_tokens, caption_in, caption_out):
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
