"""What bgekit's lean layer loop (``bgekit.runtime.lean_encoder``) saves per ``encode()`` call.

The same loaded model encodes the same texts two ways, interleaved, best of ``--rounds``: as it ships
(the lean loop) and through transformers' own layers (a no-op forward hook on the first layer's query
projection sends every call there, as it would for a user watching that layer; everything else, the
last layer on the first rows included, stays as it ships). Small calls show the Python the loop removes
(one query: the serving case); a full batch shows it is no slower where the multiplies dominate.

    python benchmarks/lean_probe.py --models minilm,bge-small --rounds 5     # CPU, 2 cores here
    python benchmarks/lean_probe.py --device cuda --models bge-small --tokenizer .gpu/tok
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch
from speed import encoder_and_texts, stsb_sentences

from bgekit import Embedder

CALLS = (("1 query", 1, 1), ("8 queries", 8, 8), ("32 sentences", 32, 32))


def per_call(model: Embedder, texts: list[str], batch_size: int, repeat: int) -> tuple[float, np.ndarray]:
    """Seconds per ``encode(texts)`` over ``repeat`` calls, and the last call's vectors."""
    start = time.perf_counter()
    for _ in range(repeat):
        vectors = model.encode(texts, batch_size=batch_size)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / repeat, vectors


def probe(name: str, args) -> None:
    path, pooling, _ = encoder_and_texts(name, 32, args.tokenizer)
    device = "cuda:0" if args.device == "cuda" else args.device
    model = Embedder.from_pretrained(str(path), devices=device, pooling_method=pooling, use_fp16=device != "cpu")
    sentences = stsb_sentences(32)
    print(f"\n## {name} ({pooling} pooling), {device}, {next(model.model.parameters()).dtype}")
    print("| call | lean loop: ms | transformers' layers: ms | ratio | largest difference |")
    print("|---|---:|---:|---:|---:|")
    for label, count, batch_size in CALLS:
        texts = sentences[:count]
        repeat = max(1, args.repeat // count)
        per_call(model, texts, batch_size, 2)  # warm-up
        lean, plain = [], []
        for _ in range(args.rounds):
            seconds, fast = per_call(model, texts, batch_size, repeat)
            lean.append(seconds)
            handle = model.model.encoder.layer[0].attention.self.query.register_forward_hook(lambda *_: None)
            try:
                seconds, full = per_call(model, texts, batch_size, repeat)
            finally:
                handle.remove()
            plain.append(seconds)
        diff = float(np.abs(fast - full).max())
        fast_ms, plain_ms = 1e3 * min(lean), 1e3 * min(plain)
        print(f"| {label} | {fast_ms:.2f} | {plain_ms:.2f} | {plain_ms / fast_ms:.2f}x | {diff:.1e} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--models", default="minilm,bge-small")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--repeat", type=int, default=32, help="texts per timed round (calls = this / texts a call)")
    parser.add_argument("--tokenizer", type=Path, default=None, help="BERT tokenizer folder for the random models")
    args = parser.parse_args()
    torch.set_grad_enabled(False)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads")
    for name in args.models.split(","):
        probe(name, args)


if __name__ == "__main__":
    main()
