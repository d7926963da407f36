"""The query side of model3 alone: what a search of a saved index needs, without the image
side or the training machinery (``catalogue/search.py`` imports little more than this, torch
and faiss).

``load_query_encoder`` reads a model3 checkpoint and its export and builds only the text
side (``model3.model.QueryEncoder``); ``encode_texts`` turns query texts into the vectors
``retrieve.py`` searches with; ``split_known`` tells the words the vocabulary knows from
those it does not.
"""
import torch

import runtime
import utils
from errors import DataError
from model3.model import QueryEncoder
from text import Vocab, tokenize


def load_query_encoder(ckpt_path, export=None):
    """A model3 checkpoint (trainable weights) + its export -> (QueryEncoder in eval mode,
    vocab, ck): the text layers from the checkpoint, the frozen word embeddings from the
    export (``export`` or the checkpoint's), the export's image encoder never built."""
    ck = runtime.load_checkpoint(ckpt_path)
    args = runtime.saved_args(ck, ckpt_path)
    export = export or args.export
    ex = runtime.load_checkpoint(export)
    if "word_emb" not in ex or "vocab" not in ex:
        raise DataError("%s: not an encoder export (no word embeddings or vocabulary); "
                        "use multilabel/export_model.py" % export)
    vocab = Vocab(ex["vocab"])
    if "vocab" in ck and ck["vocab"] != vocab.itos:
        raise DataError("%s was trained on another vocabulary than its export %s: "
                        "retrain it on this export" % (ckpt_path, export))
    model = QueryEncoder(ex["word_emb"], dim=args.dim, text_kind=args.text)
    state = model.state_dict()
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    missing = sorted(k for k in state if k not in frozen and k not in ck["model"])
    if missing:
        raise DataError("%s does not fit model3's text side: missing %s (not a model3 "
                        "checkpoint, or another code version?)"
                        % (ckpt_path, ", ".join(missing[:5])))
    model.load_state_dict({**state, **{k: ck["model"][k] for k in state if k not in frozen}})
    return model.eval(), vocab, ck


@torch.no_grad()
def encode_texts(model, vocab, texts, batch_size=1024):
    """Query texts -> (Q, D) unit vectors on the CPU."""
    tokens = [vocab.encode(tokenize(t)) for t in texts]
    out = [model.encode_queries(utils.pad_tokens(tokens[s:s + batch_size])[0]).float().cpu()
           for s in range(0, len(tokens), batch_size)]
    return torch.cat(out)


def split_known(vocab, text):
    """A query text -> (its words the vocabulary knows, those it does not), stop words
    dropped as the model drops them."""
    words = tokenize(text)
    return [w for w in words if w in vocab.stoi], [w for w in words if w not in vocab.stoi]


def check_k(k, n):
    """K must fit the gallery: a shorter list would pass for a full one."""
    if not 1 <= k <= n:
        raise DataError("--k %d: must be between 1 and the gallery's %d products" % (k, n))
