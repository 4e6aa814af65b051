"""Where a packed encoder forward's GPU time goes, and what a compiled forward would win.

The H100 profile (RESULTS.md) put 77% of a bge-base encode in the transformer forward itself. This
probe takes the host out entirely: each model's length-sorted batches are packed and moved to the
device first, then the forward runs over all of them

- eager, timed (best of ``--rounds``), with the host's time to issue the work beside it (issue time
  close to the whole means the forward is bound by Python and kernel launches, not by the GPU);
- eager under ``torch.profiler``: CUDA kernel time by kind (matrix multiplies, attention, LayerNorm,
  GELU, other element-wise work), and how busy the GPU was over the pass;
- bgekit's lean layer loop (:mod:`bgekit.runtime.lean_encoder`: the same kernels without
  transformers' Python around them, as encode() runs them), timed and profiled the same way;
- with the transformers module compiled (``torch.compile``, ``dynamic=True``: every packed batch has
  its own token count), timed the same way, with the compile time and the largest difference from the
  eager CLS vectors.

    # GPU machine (gpu_run.sh STEPS=forward), random bge models with MiniLM's tokenizer:
    python benchmarks/forward_probe.py --device cuda --models bge-small,bge-base --n 4000 --tokenizer .gpu/tok
    # here, a CPU smoke run (padded-grid attention, fp32):
    python benchmarks/forward_probe.py --device cpu --models bge-small --n 64 --batch-size 32 --rounds 1
"""

from __future__ import annotations

import argparse
import collections
import time
from collections.abc import Callable
from pathlib import Path

import torch
from speed import encoder_and_texts

from bgekit import Embedder
from bgekit.runtime import lean_encoder, packed
from bgekit.runtime.batching import length_sorted_batches

#: kernel kinds, by a piece of the kernel's name (first match wins)
KINDS = (
    ("attention (flash)", ("flash", "fmha", "attention")),
    ("matrix multiply", ("gemm", "cutlass", "xmma", "cublas", "sm90_", "sm80_", "ampere_", "nvjet")),
    ("fused (compiled, Triton)", ("triton",)),
    ("LayerNorm", ("layer_norm", "layernorm")),
    ("GELU", ("gelu",)),
    ("copies", ("copy", "memcpy", "memset", "cat")),
)


def kind_of(kernel: str) -> str:
    name = kernel.lower()
    return next((kind for kind, marks in KINDS if any(m in name for m in marks)), "other element-wise / indexing")


def device_batches(model: Embedder, texts: list[str], batch_size: int, device: torch.device) -> list[dict]:
    """The encode's packed batches (length-sorted, as the runtime makes them), already on the device."""
    tokenized = model.tokenizer.encode(texts, 512)
    offset = packed.position_offset(model.host.module)
    _, batches = length_sorted_batches([len(x) for x in tokenized.ids], batch_size)
    rows = []
    for batch in batches:
        ids = [tokenized.ids[i] for i in batch]
        types = None if tokenized.type_ids is None else [tokenized.type_ids[i] for i in batch]
        row = packed.pack(ids, types, offset)
        rows.append({k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in row.items()})
    return rows


def through(module: Callable) -> Callable[[dict], torch.Tensor]:
    """A packed batch's ``[T, H]`` states by ``module``'s own forward (transformers', compiled or graphed)."""
    return lambda batch: module(**packed.model_inputs(batch)).last_hidden_state[0]


def lean(module: torch.nn.Module) -> Callable[[dict], torch.Tensor]:
    """The same by bgekit's lean layer loop (:mod:`bgekit.runtime.lean_encoder`), as encode() runs it."""
    return lambda batch: lean_encoder.run(module, batch)


def run_all(forward: Callable[[dict], torch.Tensor], batches: list[dict]) -> tuple[float, float, torch.Tensor]:
    """``(seconds, seconds to issue, CLS vectors)`` for one pass of ``forward`` (batch -> [T, H]) over them."""
    start = time.perf_counter()
    with torch.inference_mode():
        cls = [packed.first_tokens(forward(b), b) for b in batches]
    issued = time.perf_counter() - start
    if cls[0].is_cuda:
        torch.cuda.synchronize()
    return time.perf_counter() - start, issued, torch.cat(cls).float()


def best_of(rounds: int, forward: Callable, batches: list[dict]) -> tuple[float, float, torch.Tensor]:
    runs = [run_all(forward, batches) for _ in range(rounds)]
    seconds, issued, cls = min(runs, key=lambda r: r[0])
    return seconds, issued, cls


def kernel_table(forward: Callable, batches: list[dict]) -> None:
    """Kernel time by kind over one eager pass, and the GPU's busy share of the pass's wall time."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        start = time.perf_counter()
        run_all(forward, batches)
        wall = time.perf_counter() - start
    by_kind: collections.Counter = collections.Counter()
    by_kernel: collections.Counter = collections.Counter()
    for event in prof.key_averages():
        micros = getattr(event, "self_device_time_total", 0) or getattr(event, "self_cuda_time_total", 0)
        if micros > 0:
            by_kind[kind_of(event.key)] += micros
            by_kernel[event.key[:90]] += micros
    busy = sum(by_kind.values()) / 1e6
    print(f"kernels: {busy:.3f} s of GPU time in a {wall:.3f} s pass ({100 * busy / wall:.0f}% busy, profiled)")
    print("| kernel kind | seconds | share |\n|---|---:|---:|")
    for kind, micros in by_kind.most_common():
        print(f"| {kind} | {micros / 1e6:.3f} | {100 * micros / 1e6 / busy:.1f}% |")
    print("top kernels:")
    for kernel, micros in by_kernel.most_common(8):
        print(f"  {micros / 1e6:.3f} s  {kernel}")


def packed_model(name: str, args) -> tuple[Embedder, torch.device, list[str]]:
    """A random-weight ``name`` (fp16 on CUDA) with packed batches, its device, and its SciFact texts."""
    path, pooling, texts = encoder_and_texts(name, args.n, args.tokenizer)
    device = torch.device("cuda:0" if args.device == "cuda" else args.device)
    model = Embedder.from_pretrained(
        str(path), devices=str(device), pooling_method=pooling, use_fp16=device.type == "cuda", packed=True
    )
    return model, device, texts


def probe(name: str, args) -> None:
    model, device, texts = packed_model(name, args)
    module = model.host.module
    batches = device_batches(model, texts, args.batch_size, device)
    tokens = sum(int(b["cu_seq_lens_q"][-1]) for b in batches)
    print(f"\n## {name}: {len(texts)} texts, {tokens:,} tokens, {len(batches)} packed batches of {args.batch_size}, "
          f"{next(module.parameters()).dtype}, {device}")  # fmt: skip
    run_all(through(module), batches)  # warm-up
    eager, issued, reference = best_of(args.rounds, through(module), batches)
    print(f"eager: {eager:.3f} s, {len(texts) / eager:,.0f} texts/s; the host issued it in {issued:.3f} s")
    if device.type == "cuda":
        kernel_table(through(module), batches)
    assert lean_encoder.usable(module, batches[0]), "the lean loop does not take this model"

    def against_eager(label: str, forward: Callable[[dict], torch.Tensor], note: str = "") -> None:
        """Time ``forward`` (already warmed up) as eager was, and print it beside eager."""
        seconds, issued, cls = best_of(args.rounds, forward, batches)
        diff = float((cls - reference).abs().max())
        print(f"{label}: {seconds:.3f} s, {len(texts) / seconds:,.0f} texts/s ({eager / seconds:.2f}x eager); host "
              f"issued it in {issued:.3f} s{note}; max |CLS difference| {diff:.1e}")  # fmt: skip
        if device.type == "cuda":
            kernel_table(forward, batches)

    run_all(lean(module), batches)  # warm-up
    against_eager("lean loop", lean(module))
    if args.no_compile:
        return
    compiled = through(torch.compile(module, dynamic=True))
    start = time.perf_counter()
    run_all(compiled, batches)
    against_eager("compiled", compiled, f"; compile + first pass {time.perf_counter() - start:.1f} s")


def probe_arguments(description: str) -> argparse.ArgumentParser:
    """The options this probe and graph_probe.py share: device, models, texts, batch size, rounds."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--models", default="bge-small,bge-base")
    parser.add_argument("--n", type=int, default=4000)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--tokenizer", type=Path, default=None, help="BERT tokenizer folder for the random models")
    return parser


def main() -> None:
    parser = probe_arguments(__doc__.split("\n\n")[0])
    parser.add_argument("--no-compile", action="store_true", help="eager only")
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.cuda.get_device_name(0) if args.device == 'cuda' else 'cpu'}")
    for name in args.models.split(","):
        probe(name, args)


if __name__ == "__main__":
    main()
