"""Score every valid/test candidate with model3 and write the prediction files.

    python model3/validation.py --ckpt runs/model3/best.pt --split valid --split testB \
        [--out prediction_result]

The score of a candidate is the dot product of its product vector and its query's vector.
Writes OUT/valid_pred_model3.json and OUT/test_pred_model3.json (testB), each
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
from model3.model import build_model  # noqa: E402


def main(argv=None):
    return matching.validation_main(build_model, "model3", argv)


if __name__ == "__main__":
    runtime.cli(main)
