"""Export the pretrained image encoder, word embeddings, vocabulary and config in one file.

    python multilabel/export_model.py --ckpt runs/multilabel/best.pt --out runs/multilabel/encoder.pt

model1 and model2 load it with ``layers.load_export`` (strict): the file holds
plain tensors and types only, so it loads with ``torch.load(weights_only=True)``.
"""
import argparse
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import runtime  # noqa: E402
from errors import DataError  # noqa: E402
from layers import ImageEncoder, load_export  # noqa: E402


def export(ckpt_path, out):
    ck = runtime.load_checkpoint(ckpt_path, "multilabel")
    state = ck["model"]
    enc = {k[len("encoder."):]: v for k, v in state.items() if k.startswith("encoder.")}
    payload = runtime.stamp({
        "config": ck["encoder_config"], "encoder": enc,
        "word_emb": state["word_emb.weight"].clone(), "vocab": list(ck["vocab"]),
        "source": {"checkpoint": os.path.abspath(ckpt_path), "epoch": ck["epoch"],
                   "preset": ck["args"].get("preset")}}, "export")
    ImageEncoder(payload["config"]).load_state_dict(enc, strict=True)  # fail here, not later
    runtime.save_checkpoint(payload, out)
    return payload


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--ckpt", required=True, help="multilabel checkpoint (best.pt or last.pt)")
    p.add_argument("--out", required=True, help="export file to write")
    a = p.parse_args(argv)
    if os.path.isdir(a.out):
        raise DataError("--out %s: a folder; give the export file to write" % a.out)
    runtime.check_writable(os.path.dirname(os.path.abspath(a.out)))
    epoch = export(a.ckpt, a.out)["source"]["epoch"]
    encoder, word_emb, _, _ = load_export(a.out)  # read back as model1 and model2 will
    n = sum(w.numel() for w in encoder.parameters())
    print("exported %s: encoder %.2fM parameters, %d words x %d, epoch %d"
          % (a.out, n / 1e6, *word_emb.shape, epoch))


if __name__ == "__main__":
    runtime.cli(main)
