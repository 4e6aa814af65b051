"""Would CUDA graphs pay for bgekit's packed encoder forward? A probe, not a feature.

The H100 runs (RESULTS.md) put bge-small's documents at 8,457/s end to end while its forward alone
runs at 13,354/s and the host pipeline alone at 14,816/s: most likely the host's Python launching each
batch's dozen-odd kernels a layer. A CUDA graph replays a whole forward with one launch. Graphs need
fixed shapes and packed batches change size every time, so each batch is padded up to a token bucket
(16 a doubling, so at most 6% more tokens) with dummy sequences of at most ``max_length`` tokens and
zero-length ones up to a fixed row count; one graph is captured per (tokens, rows) bucket on first use
and replayed after. The flash kernel reads the sequence boundaries from the device, so real sequences
still attend only to themselves, and the dummy rows are dropped.

Per model: the forward alone on device-resident batches (forward_probe.py's), eager against graphed,
then ``encode()`` end to end with the graphed forward installed on the transformers module, best of
``--rounds``, with the largest difference from eager, how many graphs were captured and the peak memory.
On the CPU (no graphs) it checks only that the bucket padding leaves the real tokens' states unchanged.

    python benchmarks/graph_probe.py --device cuda --models bge-small,bge-base --n 4000 --tokenizer .gpu/tok
    python benchmarks/graph_probe.py --device cpu --models tiny --n 48 --batch-size 16 --rounds 1
"""

from __future__ import annotations

import time
import traceback
from typing import Any

import numpy as np
import torch
from forward_probe import best_of, device_batches, packed_model, probe_arguments, through
from transformers.modeling_outputs import BaseModelOutput

ROW_STEP = 64  # row slots round up to this


def bucket(tokens: int, per_doubling: int = 16, smallest: int = 1024) -> int:
    """``tokens`` rounded up to a bucket: steps of a power of two, ``per_doubling`` of them per doubling."""
    if tokens <= smallest:
        return smallest
    step = max(1, (1 << (tokens.bit_length() - 1)) // per_doubling)
    return -(-tokens // step) * step


class GraphedForward:
    """Stands in for a transformers module's ``forward``: packed calls run padded to a bucket, through a
    CUDA graph per bucket on CUDA (plain eager calls on the CPU, to check the padding); other calls
    go to the module's own forward unchanged."""

    def __init__(self, module: torch.nn.Module, position_offset: int, pad_id: int, max_length: int):
        self.eager = module.forward
        self.offset, self.pad_id, self.max_length = position_offset, pad_id, max_length
        self.graphs: dict[tuple[int, int], tuple[Any, dict[str, Any], torch.Tensor]] = {}
        self.pool = None
        self.capture_seconds = 0.0

    def __call__(self, *args, **kwargs):
        cu = kwargs.get("cu_seq_lens_q")
        if args or cu is None:
            return self.eager(*args, **kwargs)
        ids = kwargs["input_ids"]
        real = ids.shape[1]
        tokens = bucket(real)
        rows = -(-(len(cu) - 1 + -(-(tokens - real) // self.max_length)) // ROW_STEP) * ROW_STEP
        if not ids.is_cuda:
            return self._padded_eager(kwargs, tokens, rows)
        key = (tokens, rows)
        if key not in self.graphs:
            self.graphs[key] = self._capture(tokens, rows, ids.device, ids.dtype)
        graph, statics, out = self.graphs[key]
        self._fill(statics, kwargs)
        graph.replay()
        return BaseModelOutput(last_hidden_state=out[:, :real].clone())

    def _inputs(self, tokens: int, rows: int, device: torch.device, dtype: torch.dtype) -> dict[str, Any]:
        """Fixed-shape inputs for a bucket, holding only dummy sequences until :meth:`_fill`."""
        cu = torch.full((rows + 1,), tokens, dtype=torch.int32, device=device)
        statics = {
            "input_ids": torch.full((1, tokens), self.pad_id, dtype=dtype, device=device),
            "token_type_ids": torch.zeros((1, tokens), dtype=dtype, device=device),
            "position_ids": torch.full((1, tokens), self.offset, dtype=dtype, device=device),
            "cu_seq_lens_q": cu,
            "cu_seq_lens_k": cu,
            "max_length_q": self.max_length,
            "max_length_k": self.max_length,
        }
        self._fill(statics, {"input_ids": statics["input_ids"][:, :0], "cu_seq_lens_q": cu[:1] * 0})
        return statics

    def _fill(self, statics: dict[str, Any], kwargs: dict[str, Any]) -> None:
        """Copy a packed batch into a bucket's inputs; the rest of the bucket becomes dummy sequences of
        at most ``max_length`` tokens (then zero-length ones), with pad ids and the first position."""
        real = kwargs["input_ids"].shape[1]
        tokens = statics["input_ids"].shape[1]
        cu, statics_cu = kwargs["cu_seq_lens_q"], statics["cu_seq_lens_q"]
        for name, fill in (("input_ids", self.pad_id), ("token_type_ids", 0), ("position_ids", self.offset)):
            if name in kwargs:
                statics[name][:, :real].copy_(kwargs[name])
                statics[name][:, real:].fill_(fill)
            else:
                statics[name].fill_(fill)
        count = len(cu)
        statics_cu[:count].copy_(cu)
        dummies = torch.arange(1, len(statics_cu) - count + 1, device=cu.device, dtype=torch.int32)
        statics_cu[count:].copy_((real + dummies * self.max_length).clamp_(max=tokens))

    def _padded_eager(self, kwargs: dict[str, Any], tokens: int, rows: int) -> BaseModelOutput:
        ids = kwargs["input_ids"]
        statics = self._inputs(tokens, rows, ids.device, ids.dtype)
        self._fill(statics, kwargs)
        out = self.eager(**statics, return_dict=True).last_hidden_state
        return BaseModelOutput(last_hidden_state=out[:, : ids.shape[1]])

    def _capture(self, tokens: int, rows: int, device: torch.device, dtype: torch.dtype):
        start = time.perf_counter()
        statics = self._inputs(tokens, rows, device, dtype)
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):  # warm-up off the capture, as torch's graph docs advise
            self.eager(**statics, return_dict=True)
        torch.cuda.current_stream(device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            out = self.eager(**statics, return_dict=True).last_hidden_state
        self.pool = graph.pool()
        torch.cuda.synchronize(device)
        self.capture_seconds += time.perf_counter() - start
        return graph, statics, out


def probe(name: str, args) -> None:
    model, device, texts = packed_model(name, args)
    module = model.host.module
    graphed = GraphedForward(
        module, model.host.position_offset, model.tokenizer.pad_id, module.config.max_position_embeddings
    )
    if module.config.model_type != "bert":  # RoBERTa-family positions start after the padding index
        graphed.max_length -= model.host.position_offset
    print(f"\n## {name}: {len(texts)} texts, batch {args.batch_size}, {device}")
    batches = device_batches(model, texts, args.batch_size, device)
    eager_s, _, eager_cls = best_of(args.rounds, through(module), batches)
    module.forward = graphed
    best_of(1, through(module), batches)  # captures
    graphed_s, issued, graphed_cls = best_of(args.rounds, through(module), batches)
    diff = float((graphed_cls - eager_cls).abs().max())
    label = "graphed" if device.type == "cuda" else "bucket-padded (no graphs on the CPU)"
    print(f"forward alone: eager {len(texts) / eager_s:,.0f} texts/s, {label} {len(texts) / graphed_s:,.0f} texts/s "
          f"({eager_s / graphed_s:.2f}x; host issued it in {issued:.3f} s); max |CLS difference| {diff:.1e}; "
          f"{len(graphed.graphs)} graphs captured in {graphed.capture_seconds:.1f} s")  # fmt: skip
    if device.type != "cuda":
        return
    del module.forward  # the class's forward again
    model.cls_rows_only = False  # both encodes run the whole forward that the graphs replay
    encode = lambda: model.encode(texts, batch_size=args.batch_size)  # noqa: E731
    reference = encode()
    eager_e = min(_timed(encode) for _ in range(args.rounds))
    module.forward = graphed
    torch.cuda.reset_peak_memory_stats(device)
    out = encode()  # captures any bucket the forward-only pass did not
    graphed_e = min(_timed(encode) for _ in range(args.rounds))
    peak = torch.cuda.max_memory_allocated(device) / 2**30
    print(f"encode(): eager {len(texts) / eager_e:,.0f} texts/s, graphed {len(texts) / graphed_e:,.0f} texts/s "
          f"({eager_e / graphed_e:.2f}x); max |vector difference| {np.abs(out - reference).max():.1e}; "
          f"{len(graphed.graphs)} graphs, peak memory {peak:.2f} GiB")  # fmt: skip


def _timed(call) -> float:
    start = time.perf_counter()
    call()
    return time.perf_counter() - start


def main() -> None:
    args = probe_arguments(__doc__.split("\n\n")[0]).parse_args()
    print(f"torch {torch.__version__}, {torch.cuda.get_device_name(0) if args.device == 'cuda' else 'cpu'}")
    for name in args.models.split(","):
        try:
            probe(name, args)
        except Exception:  # a capture that fails says which op broke it; the next model still runs
            traceback.print_exc()


if __name__ == "__main__":
    main()
