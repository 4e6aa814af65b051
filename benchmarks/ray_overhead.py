"""Check 4 of the distributed-encoding issue: the Ray path's throughput on one device against the
plain library's, on the same documents, model and settings.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/ray_overhead.py              # GPU if there is one, else CPU
    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/ray_overhead.py --model /models/bge-base-en-v1.5 --n-docs 20000

Both sides load the model once, encode the first shard as a warm-up, and are timed on the rest:
the library as ``encode_corpus`` over those documents, Ray as the time from the first shard's
completion to the last one's by the worker's clock (reading, encoding, Parquet writing and
scheduling included; one worker with one GPU, or ``--cpus`` cores). End-to-end times (cluster start and model load
included) are printed too. Prints one JSON line; ``--output`` also writes it to a file.
"""

from __future__ import annotations

import argparse
import gzip
import itertools
import json
import os
import platform
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCIFACT = Path(os.environ.get("BGEKIT_SHARED", ROOT.parent / "shared")) / "data" / "scifact" / "corpus.jsonl.gz"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="sentence-transformers/all-MiniLM-L6-v2")
    parser.add_argument("--input", type=Path, default=SCIFACT, help="JSONL(.gz) corpus (default: SciFact)")
    parser.add_argument("--n-docs", type=int, default=2000, help="documents (the corpus repeats if shorter)")
    parser.add_argument("--shard-size", type=int, default=500)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--cpus", type=int, default=1, help="CPU cores for each side when there is no GPU")
    parser.add_argument("--output", type=Path)
    args = parser.parse_args()

    import numpy as np
    import torch

    from bgekit import Embedder, io
    from bgekit.distributed import encode_dataset, read_embeddings

    gpu = torch.cuda.is_available()
    device = "cuda:0" if gpu else "cpu"
    if not gpu:
        torch.set_num_threads(args.cpus)
    work = Path(tempfile.mkdtemp(prefix="bgekit-ray-overhead-"))
    corpus = work / "docs.jsonl"
    opener = gzip.open if args.input.suffix == ".gz" else open
    with opener(args.input, "rt", encoding="utf-8") as source:
        records = [json.loads(line) for line in itertools.islice(source, args.n_docs) if line.strip()]
    with corpus.open("w", encoding="utf-8") as target:  # the corpus repeated up to --n-docs, ids kept unique
        for i in range(args.n_docs):
            record = dict(records[i % len(records)])
            if i >= len(records):
                record["_id"] = f"{record.get('_id', i % len(records))}-{i // len(records)}"
            target.write(json.dumps(record) + "\n")
    texts = [r.text for r in io.read_texts(corpus)]
    warm, timed = texts[: args.shard_size], texts[args.shard_size :]
    if not timed:
        raise SystemExit("--n-docs must exceed --shard-size (the first shard is the warm-up)")
    options = {"use_fp16": gpu, "batch_size": args.batch_size, "max_length": args.max_length}

    def sync() -> None:
        if gpu:
            torch.cuda.synchronize()

    # plain library
    start = time.perf_counter()
    model = Embedder.from_pretrained(args.model, devices=device, use_fp16=gpu)
    model.encode_corpus(warm, batch_size=args.batch_size, max_length=args.max_length)
    sync()
    tick = time.perf_counter()
    library_vectors = model.encode_corpus(timed, batch_size=args.batch_size, max_length=args.max_length)
    sync()
    library_s = time.perf_counter() - tick
    library_total_s = time.perf_counter() - start
    del model
    if gpu:
        torch.cuda.empty_cache()

    # Ray Data, one worker
    done: list[tuple[float, int, float]] = []  # (worker's finish time, rows, worker's seconds) per shard
    start = time.perf_counter()
    encode_dataset(
        args.model, corpus, work / "emb", num_workers=1, cpus_per_worker=args.cpus, shard_size=args.shard_size,
        on_shard=lambda r: done.append((float(r["finished"]), int(r["rows"]), float(r["seconds"]))), **options,
    )  # fmt: skip
    ray_total_s = time.perf_counter() - start
    done.sort()  # by the worker's clock: the driver may hear of several shards at once
    ray_s = done[-1][0] - done[0][0]
    ray_rows = sum(rows for _, rows, _ in done[1:])
    in_worker_s = sum(seconds for _, _, seconds in done[1:])
    _, ray_vectors = read_embeddings(work / "emb")
    difference = float(np.abs(ray_vectors[len(warm) :] - library_vectors).max())

    library_rate, ray_rate = len(timed) / library_s, ray_rows / ray_s
    result = {
        "device": torch.cuda.get_device_name(0) if gpu else f"CPU ({platform.processor() or platform.machine()})",
        "threads": None if gpu else args.cpus,
        "model": args.model,
        "docs": len(texts),
        "timed_docs": len(timed),
        "shard_size": args.shard_size,
        "batch_size": args.batch_size,
        "max_length": args.max_length,
        "fp16": gpu,
        "library_docs_per_s": round(library_rate, 1),
        "ray_docs_per_s": round(ray_rate, 1),
        "ray_vs_library": round(ray_rate / library_rate, 3),
        "ray_in_worker_docs_per_s": round(ray_rows / in_worker_s, 1),  # read + encode + write, no scheduling
        "library_end_to_end_s": round(library_total_s, 1),
        "ray_end_to_end_s": round(ray_total_s, 1),
        "max_abs_difference": difference,
        "load_average": os.getloadavg()[0],
    }
    line = json.dumps(result)
    print(line)
    if args.output:
        args.output.write_text(line + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
