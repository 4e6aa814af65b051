"""Does the host pipeline keep a device busy? bgekit's encode against an emulated device.

The emulated device runs each batch for ``tokens / rate`` seconds in a sleep (the GIL released, as a
host waiting for a GPU's copy back is), so the probe needs no accelerator and times only the host's
side: the tokenizer thread, building batches, the loop that feeds the device. Per encode it reports
how long the device waited for the first batch, between batches (gaps), and after the last (tail),
against the wall time, for the pipeline as it ships and with each of its two latest changes undone:

- as shipped: packed batches in equal chunks of one batch, each chunk's batches built (tokenized and
  packed) by the worker thread, two chunks queued ahead;
- batches built in the loop: the worker only tokenizes, one chunk ahead, and the loop packs each batch
  just before it runs, as before (``build_ahead=False``, what a CPU device gets);
- ramped chunks: chunks of 256, 512, then 1,024 texts, as before (:func:`overlap_chunks`' ramp);
- both: the pipeline before the change.

    python benchmarks/pipeline_probe.py --n 4000                        # here (MiniLM's tokenizer)
    python benchmarks/pipeline_probe.py --n 4000 --tokenizer .gpu/tok   # GPU machine's host (gpu_run.sh)

``--device-rate`` is the emulated device's speed in documents/s (default: 0.7 of the measured host
ceiling, so the device, not the host, should bound the encode; on the H100 bge-small's forward alone
ran at 13,354 documents/s against a host ceiling of 14,816). ``--launch`` makes the loop spend that
share of each batch's device time on tiny torch ops before it waits, as launching a real forward's
kernels does (each op takes the GIL, so this is where the worker thread's Python work competes).
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from speed import encoder_and_texts

from bgekit import Embedder
from bgekit.runtime import packed as packing
from bgekit.runtime.batching import overlap_chunks


class EmulatedDevice:
    """A forward that takes ``tokens / rate`` seconds and logs when it ran. The first ``launch`` of that
    time the calling thread issues tiny torch CPU ops, each taking and releasing the GIL as a kernel
    launch does; the rest it sleeps with the GIL released, as a host waiting for a GPU's copy back."""

    def __init__(self, tokens_per_second: float, width: int, launch: float = 0.0):
        self.rate = tokens_per_second
        self.launch = launch
        self.zeros = torch.zeros(4096, width)  # made once: a device's output arrives by copy, no CPU op
        self.scalar = torch.zeros(1)
        self.log: list[tuple[float, float, float]] = []  # (start, end, intended seconds)

    def __call__(self, module: torch.nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        start = time.perf_counter()
        seconds = inputs["input_ids"].shape[1] / self.rate
        launched = start + self.launch * seconds
        while time.perf_counter() < launched:
            for _ in range(20):
                self.scalar.add_(1)
        left = start + seconds - time.perf_counter()
        if left > 0:
            time.sleep(left)
        self.log.append((start, time.perf_counter(), seconds))
        return self.zeros[: len(inputs[packing.LENGTHS])]


@contextmanager
def variant(model: Embedder, built_in_loop: bool, ramped: bool) -> Iterator[None]:
    """Undo one or both parts of the change on ``model``'s host for the duration."""
    host = model.host
    chunks = host.chunks
    host.build_ahead = not built_in_loop  # False: the worker only tokenizes, one chunk ahead, as before
    if ramped:
        host.chunks = lambda count, batch_size, size=None: overlap_chunks(count, 1024)  # type: ignore[method-assign]
    try:
        yield
    finally:
        host.chunks = chunks  # type: ignore[method-assign]
        host.build_ahead = True


def timeline(device: EmulatedDevice, start: float, end: float) -> dict[str, float]:
    log = device.log
    busy = sum(e - s for s, e, _ in log)
    gaps = [log[i + 1][0] - log[i][1] for i in range(len(log) - 1)]
    return {
        "wall": end - start,
        "busy": busy,
        "first": log[0][0] - start,
        "gaps": sum(gaps),
        "largest gap": max(gaps, default=0.0),
        "tail": end - log[-1][1],
    }


def best(call: Callable[[], dict[str, float]], rounds: int) -> dict[str, float]:
    return min((call() for _ in range(rounds)), key=lambda row: row["wall"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=4000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--device-rate", type=float, default=None, help="emulated device, documents/s")
    parser.add_argument(
        "--launch", type=float, default=0.0, help="share of each batch's device time the loop spends launching it"
    )
    parser.add_argument("--tokenizer", type=Path, default=None)
    args = parser.parse_args()
    path, pooling, docs = encoder_and_texts("bge-small", args.n, args.tokenizer)
    model = Embedder.from_pretrained(str(path), devices="cpu", pooling_method=pooling, packed=True)
    model.host.build_ahead = True  # as on an accelerator (the CPU default is False)
    tokens_per_doc = float(np.mean([len(x) for x in model.tokenizer.encode(docs, 512).ids]))
    encode = lambda: model.encode_corpus(docs, batch_size=args.batch_size)  # noqa: E731

    instant = EmulatedDevice(float("inf"), model.host.module.config.hidden_size)
    model._forward = instant
    encode()  # warm-up

    def ceiling() -> dict[str, float]:
        start = time.perf_counter()
        encode()
        return {"wall": time.perf_counter() - start}

    host_rate = args.n / best(ceiling, args.rounds)["wall"]
    rate = args.device_rate or 0.7 * host_rate
    device = EmulatedDevice(rate * tokens_per_doc, model.host.module.config.hidden_size, args.launch)
    model._forward = device

    def timed() -> dict[str, float]:
        device.log.clear()
        start = time.perf_counter()
        encode()
        return timeline(device, start, time.perf_counter())

    print(
        f"\nPipeline probe: {args.n} SciFact documents ({tokens_per_doc:.0f} tokens on average), batch "
        f"{args.batch_size}, {os.cpu_count()} CPUs; host ceiling (instant device) {host_rate:,.0f} documents/s, "
        f"emulated device {rate:,.0f} documents/s, launching {args.launch:.0%} of its time; best of {args.rounds}"
    )
    print(
        "| pipeline | documents/s | of the device's rate | first wait s | gaps s | largest gap s | tail s |\n"
        "|---|---:|---:|---:|---:|---:|---:|"
    )
    rows = {
        "as shipped": (False, False),
        "batches built in the loop": (True, False),
        "ramped chunks (256, 512, 1,024)": (False, True),
        "both (the pipeline before)": (True, True),
    }
    for label, (in_loop, ramped) in rows.items():
        with variant(model, in_loop, ramped):
            row = best(timed, args.rounds)
        speed = args.n / row["wall"]
        print(
            f"| {label} | {speed:,.0f} | {speed / rate:.2f} | {row['first']:.3f} | {row['gaps']:.3f} | "
            f"{row['largest gap']:.3f} | {row['tail']:.3f} |"
        )


if __name__ == "__main__":
    main()
