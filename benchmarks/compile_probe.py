"""Does ``torch.compile`` pay for bgekit's encoder forward? A probe, not a feature: ``FlagModel.encode``
eager and then with the transformers module's forward compiled (``dynamic=True``: batch shapes vary),
best of 3 each, plus the compile time and the largest difference. MiniLM on STSB sentences, or a
random-weight bge model (speed.py's) on SciFact documents.

    python benchmarks/compile_probe.py --device cpu --n 1000 --batch-size 32
    # gpu_run.sh STEPS=compile (the GPU machine has no MiniLM: a random bge-base with MiniLM's tokenizer)
    python benchmarks/compile_probe.py --device cuda --fp16 --model bge-base --tokenizer .gpu/tok \\
        --n 4000 --batch-size 256
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from speed import encoder_and_texts

from bgekit import FlagModel


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--n", type=int, default=1000)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--fp16", action="store_true", help="CUDA: half precision (packed batches, bgekit's default)")
    parser.add_argument("--model", default="minilm", help="minilm, or a speed.py encoder: bge-small, bge-base, ...")
    parser.add_argument("--tokenizer", type=Path, default=None, help="BERT tokenizer folder for a random model")
    args = parser.parse_args()
    folder, pooling, texts = encoder_and_texts(args.model, args.n, args.tokenizer)
    model = FlagModel(str(folder), devices=args.device, pooling_method=pooling, use_fp16=args.fp16)
    model.cls_rows_only = False  # like with like: the compiled forward is the whole model, last layer included
    reference = model.encode(texts, batch_size=args.batch_size)

    def best_rate() -> tuple[float, float]:
        best = float("inf")
        for _ in range(3):
            start = time.perf_counter()
            out = model.encode(texts, batch_size=args.batch_size)
            best = min(best, time.perf_counter() - start)
        return len(texts) / best, float(abs(out - reference).max())

    eager, _ = best_rate()
    module = model.host.module
    start = time.perf_counter()
    module.forward = torch.compile(module.forward, dynamic=True)
    model.encode(texts[: 2 * args.batch_size], batch_size=args.batch_size)
    compile_s = time.perf_counter() - start
    compiled, diff = best_rate()
    layout = "packed" if model.host.packed else "padded"
    print(f"{args.model}, torch {torch.__version__}, {args.device}, fp16={args.fp16}, {layout}, n={args.n}, "
          f"batch {args.batch_size}")  # fmt: skip
    print(f"eager {eager:.1f} texts/s; compiled {compiled:.1f} texts/s ({compiled / eager:.2f}x); "
          f"compile + first call {compile_s:.1f} s; max abs difference {diff:.1e}")  # fmt: skip


if __name__ == "__main__":
    main()
