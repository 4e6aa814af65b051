"""Why the host pipeline's ceiling (speed.py --host) sits below the tokenizer's own rate.

On the H100 host (16 cores) one tokenizer call did 4,000 SciFact documents in 0.198 s, yet bgekit's
encode with an instant forward took 0.482 s. This probe times, on the same texts, best of ``--rounds``:
the tokenizer in one call and chunk by chunk (the chunks ``run_texts`` uses, no overlap), then the
instant-forward encode as it ships, with one chunk (tokenize first, then run), and with torch's CPU
threads cut to one (do torch's idle OpenMP workers take cores from the tokenizer's?), and prints the
worker thread's per-chunk tokenization times inside one overlapped encode. Its first H100 run (2026-11-26,
RESULTS.md): 8,200 documents/s as shipped then, 14,000/s with torch on one thread; the batch loop's
result writes are numpy since.

    python benchmarks/host_probe.py --n 4000 --tokenizer .gpu/tok     # GPU machine (gpu_run.sh STEPS=host)
    python benchmarks/host_probe.py --n 4000                          # here (MiniLM's tokenizer)
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Callable
from pathlib import Path

import torch
from speed import encoder_and_texts, one_chunk

from bgekit import Embedder
from bgekit.runtime import packed as packing


def best(call: Callable[[], object], rounds: int) -> float:
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=4000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--tokenizer", type=Path, default=None)
    args = parser.parse_args()
    path, pooling, docs = encoder_and_texts("bge-small", args.n, args.tokenizer)
    model = Embedder.from_pretrained(str(path), devices="cpu", pooling_method=pooling, packed=True)
    width = model.host.module.config.hidden_size

    zeros = torch.zeros(args.batch_size, width)  # made once: a device's output arrives by copy, no CPU op

    def instant(module, inputs):
        return zeros[: len(inputs[packing.LENGTHS])]

    model._forward = instant
    tok = model.tokenizer
    chunks = [docs[c.start : c.stop] for c in model.host.chunks(len(docs), args.batch_size)]
    encode = lambda: model.encode_corpus(docs, batch_size=args.batch_size)  # noqa: E731
    encode()  # warm-up
    rows = {
        "tokenizer, one call": lambda: tok.encode(docs, 512),
        f"tokenizer, chunk by chunk ({', '.join(str(len(c)) for c in chunks)})": lambda: [
            tok.encode(c, 512) for c in chunks
        ],
        "encode, instant forward (as shipped)": encode,
    }
    times = {label: best(call, args.rounds) for label, call in rows.items()}
    with one_chunk(len(docs)):
        times["encode, instant forward, one chunk (tokenize all, then run)"] = best(encode, args.rounds)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    times["encode, instant forward, torch.set_num_threads(1)"] = best(encode, args.rounds)
    torch.set_num_threads(threads)
    print(f"\nHost probe: {len(docs)} SciFact documents, {os.cpu_count()} CPUs, torch threads {threads}, "
          f"RAYON_NUM_THREADS={os.environ.get('RAYON_NUM_THREADS', 'unset')}, best of {args.rounds}")  # fmt: skip
    print("| what | seconds | documents/s |\n|---|---:|---:|")
    for label, seconds in times.items():
        print(f"| {label} | {seconds:.3f} | {len(docs) / seconds:,.0f} |")
    log: list[tuple[int, float, float]] = []
    plain = tok.encode

    def timed(texts, *more, **options):
        start = time.perf_counter()
        out = plain(texts, *more, **options)
        log.append((len(texts), start, time.perf_counter() - start))
        return out

    tok.encode = timed
    start = time.perf_counter()
    encode()
    total = time.perf_counter() - start
    tok.encode = plain
    print(f"one overlapped encode, {total:.3f} s; the worker's tokenizer calls (texts, start s, seconds):")
    print("  " + "; ".join(f"{n} at {t - start:.3f} took {d:.3f}" for n, t, d in log))


if __name__ == "__main__":
    main()
