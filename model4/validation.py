"""Score every valid/test candidate with model4 and write the prediction files.

    python model4/validation.py --ckpt runs/model4/best.pt --split valid --split testB \
        [--out prediction_result]

Each (query, candidate) pair is read whole by the cross-encoder. Writes
OUT/valid_pred_model4.json and OUT/test_pred_model4.json (testB), each
{"<query_id>": [["<product_id>", score], ...]} sorted by score, every candidate included;
prints NDCG@5 where the split has answers.
"""
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import matching  # noqa: E402
import runtime  # noqa: E402
from model4.model import build_model  # noqa: E402


def main(argv=None):
    return matching.validation_main(build_model, "model4", argv)


if __name__ == "__main__":
    runtime.cli(main)
