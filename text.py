"""Text: the tokenizer (ASCII words, jieba for Chinese, stop words dropped) and the
vocabulary with its four special ids."""
import logging
import os
import re
from collections import Counter

ROOT = os.path.dirname(os.path.abspath(__file__))
SPECIALS = ["<pad>", "<unk>", "<bos>", "<eos>"]
PAD, UNK, BOS, EOS = range(4)


_ASCII_TOKEN = re.compile(r"[a-z0-9]+(?:['\-][a-z0-9]+)*")
_jieba = None
_stopwords = None


def _jieba_cut(text):
    global _jieba
    if _jieba is None:
        import jieba
        jieba.setLogLevel(logging.WARNING)
        jieba.initialize()
        _jieba = jieba
    return _jieba.lcut(text)


def stopwords():
    global _stopwords
    if _stopwords is None:
        _stopwords = set()
        for name in ("en.txt", "zh.txt"):
            with open(os.path.join(ROOT, "stopwords", name), encoding="utf-8") as f:
                _stopwords |= {w.strip() for w in f if w.strip() and not w.startswith("#")}
    return _stopwords


def tokenize(text, drop_stopwords=True):
    """Lower-case; ASCII words keep hyphens/apostrophes ("t-shirt"); Chinese goes to jieba."""
    tokens = []
    for chunk in text.lower().split():
        if chunk.isascii():
            tokens += _ASCII_TOKEN.findall(chunk)
        else:
            for t in _jieba_cut(chunk):
                t = t.strip()
                if t and (not t.isascii() or _ASCII_TOKEN.fullmatch(t)) and re.search(r"\w", t):
                    tokens.append(t)
    if drop_stopwords:
        sw = stopwords()
        tokens = [t for t in tokens if t not in sw]
    return tokens


class Vocab:
    """Token <-> id, with ``<pad> <unk> <bos> <eos>`` first."""

    def __init__(self, itos):
        if list(itos[:4]) != SPECIALS:
            raise ValueError("a vocabulary starts with %s" % SPECIALS)
        self.itos = list(itos)
        self.stoi = {t: i for i, t in enumerate(self.itos)}

    @classmethod
    def build(cls, token_lists, min_count=1):
        counts = Counter(t for ts in token_lists for t in ts)
        words = sorted((w for w, c in counts.items() if c >= min_count),
                       key=lambda w: (-counts[w], w))
        return cls(SPECIALS + words), counts

    def encode(self, tokens):
        return [self.stoi.get(t, UNK) for t in tokens]

    def decode(self, ids):
        return [self.itos[i] for i in ids if i >= len(SPECIALS)]

    def __len__(self):
        return len(self.itos)
