"""The reranker of the fine-tuning recipe *before* training: an embedder loaded as a 1-label
cross-encoder with a fresh score head (as ``bgekit finetune reranker`` starts it), reranking the
embedder's own top 100. ``bgekit eval retrieval --reranker M`` would load M as a bi-encoder reranker
instead, so this is its own script.

    python benchmarks/untrained_cross_encoder.py --model M --dataset DIR --output before.json
"""

from __future__ import annotations

import argparse
import tempfile

import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from bgekit import hub
from bgekit.eval.retrieval import evaluate_retrieval


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="sentence-transformers/all-MiniLM-L6-v2")
    parser.add_argument("--dataset", required=True)
    parser.add_argument("--split", default="test")
    parser.add_argument("--output", required=True)
    parser.add_argument("--reranker-max-length", type=int, default=256)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--cache-dir", default=None)
    args = parser.parse_args()
    folder = hub.model_folder(args.model)
    with tempfile.TemporaryDirectory() as untrained:
        torch.manual_seed(args.seed)
        AutoModelForSequenceClassification.from_pretrained(str(folder), num_labels=1).save_pretrained(untrained)
        AutoTokenizer.from_pretrained(str(folder)).save_pretrained(untrained)
        result = evaluate_retrieval(
            args.model,
            args.dataset,
            args.split,
            reranker=untrained,
            reranker_max_length=args.reranker_max_length,
            cache_dir=args.cache_dir,
            output=args.output,
        )
    print(result.metrics)


if __name__ == "__main__":
    main()
