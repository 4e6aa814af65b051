"""The last layer on each sequence's first row only (``cls_rows_only``) against the whole last layer.

CLS pooling and a cross-encoder's head read one row per sequence, so bgekit's last layer computes
only that row (bgekit.runtime.first_tokens). This probe times the same model's full encode (or
compute_score) both ways, interleaved, best of ``--rounds``, and prints the ratio and the largest
difference between the two results:

    # GPU machine (gpu_run.sh STEPS=firstrows): random bge models with MiniLM's tokenizer, fp16
    python benchmarks/first_rows_probe.py --device cuda --n 4000 --tokenizer .gpu/tok
    # here (CPU, fp32, padded batches), and on ONNX Runtime (its export holds one forward or the other):
    python benchmarks/first_rows_probe.py --device cpu --models bge-small,bge-reranker-base --n 64
    python benchmarks/first_rows_probe.py --device cpu --backend onnx-int8 --models bge-small --n 256
"""

from __future__ import annotations

import atexit
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from forward_probe import probe_arguments
from speed import random_model, scifact_docs

from bgekit import FlagModel, FlagReranker


def systems(name: str, args) -> tuple[dict[bool, FlagModel | FlagReranker], dict[bool, Callable[[], np.ndarray]], int]:
    """``({rows only: model}, {rows only: one full pass}, item count)`` for a random-weight ``name`` on
    SciFact texts: two models, as an ONNX export holds one forward or the other."""
    workdir = Path(tempfile.mkdtemp(prefix="bgekit-model-"))
    atexit.register(shutil.rmtree, workdir, True)
    path = str(random_model(name, workdir, args.tokenizer))
    options = {"devices": args.device, "use_fp16": args.device.startswith("cuda"), "backend": args.backend}
    docs, queries = scifact_docs(args.n)
    reranks = name.startswith("bge-reranker")
    kind = FlagReranker if reranks else FlagModel
    models = {rows: type(kind.__name__, (kind,), {"cls_rows_only": rows})(path, **options) for rows in (True, False)}
    if reranks:
        pairs = [[q, d] for q, d in zip(queries, docs, strict=True)]
        runs = {
            rows: lambda m=m: np.asarray(m.compute_score(pairs, batch_size=args.batch_size))
            for rows, m in models.items()
        }
        return models, runs, len(pairs)
    runs = {rows: lambda m=m: m.encode(docs, batch_size=args.batch_size) for rows, m in models.items()}
    return models, runs, len(docs)


def timed(run: Callable[[], np.ndarray], device: str) -> tuple[float, np.ndarray]:
    start = time.perf_counter()
    out = run()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return time.perf_counter() - start, out


def probe(name: str, args) -> None:
    models, runs, count = systems(name, args)
    seconds: dict[bool, list[float]] = {True: [], False: []}
    results: dict[bool, np.ndarray] = {}
    for setting in (True, False):  # warm-up, both ways
        runs[setting]()
    for _ in range(args.rounds):
        for setting in (True, False):
            elapsed, results[setting] = timed(runs[setting], args.device)
            seconds[setting].append(elapsed)
    fast, full = count / min(seconds[True]), count / min(seconds[False])
    diff = float(np.abs(results[True] - results[False]).max())
    print(f"| {name} | {count} | {fast:,.1f} | {full:,.1f} | {fast / full:.3f}x | {diff:.1e} |", flush=True)
    for model in models.values():
        model.close()


def main() -> None:
    parser = probe_arguments(__doc__.split("\n\n")[0])
    parser.set_defaults(models="bge-small,bge-base,bge-large,bge-reranker-base")
    parser.add_argument("--backend", default="torch", choices=["torch", "onnx", "onnx-int8"])
    args = parser.parse_args()
    cuda = args.device.startswith("cuda")
    where = torch.cuda.get_device_name(0) if cuda else f"cpu, {torch.get_num_threads()} threads"
    print(f"torch {torch.__version__}, {where}, backend {args.backend}; best of {args.rounds}, interleaved")
    print("| model | items | first rows only: items/s | whole last layer: items/s | ratio | largest difference |")
    print("|---|---:|---:|---:|---:|---:|")
    for name in args.models.split(","):
        probe(name, args)


if __name__ == "__main__":
    main()
