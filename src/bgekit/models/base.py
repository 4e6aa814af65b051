"""The part every embedder and reranker shares: a loaded model on its devices, and the
batch loop ``tokenized inputs -> length-sorted batches -> forward -> input order``.

The loop's host-side work on the results is numpy, not torch: a torch CPU op large enough to run in
parallel wakes torch's OpenMP workers, which then compete with the tokenizer thread's Rayon workers
for the cores. On the H100 host (16 cores) the host pipeline with torch writes did 8,200 documents/s
with torch's 16 CPU threads and 14,000/s with one; with numpy writes, 14,816/s
(benchmarks/host_probe.py, RESULTS.md)."""

from __future__ import annotations

import collections
import functools
import logging
import numbers
import operator
import sys
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch
from tqdm.auto import tqdm

from ..errors import InputError
from ..runtime import packed as packing
from ..runtime.batching import length_sorted_batches, overlap_chunks, run_with_oom_backoff
from ..runtime.devices import ReplicaPool, resolve_devices, resolve_dtype
from .onnx_backend import runs_on_onnx
from .tokenization import TextTokenizer, Tokenized

logger = logging.getLogger(__name__)

Forward = Callable[[torch.nn.Module, dict[str, torch.Tensor]], torch.Tensor]
# a forward that returns one Python object per input row, for outputs that do not stack
ItemForward = Callable[[torch.nn.Module, dict[str, torch.Tensor]], list[Any]]
T = TypeVar("T")
PROGRESS_MIN_ITEMS = 256
# inputs tokenized per chunk by run_texts for padded batches; the next chunks are tokenized while
# this one runs. Small enough that the device does not wait long for the first (a quarter of this:
# overlap_chunks), large enough that length sorting within a chunk still leaves little padding
OVERLAP_CHUNK = 1024
# packed batches have no padding to sort away, so their chunks are one batch per device (at least
# this many items, for the tokenizer's threads): equal chunks, no ramp, and the device waits only
# for the first (benchmarks/pipeline_probe.py)
PACKED_CHUNK_MIN = 64
# chunks queued for the worker thread: it starts the next one as soon as it finishes one
PREPARE_AHEAD = 2


@dataclass
class Prepared:
    """A chunk of tokenized inputs cut into its length-sorted batches, each batch's host tensors
    already built (packed or padded): :meth:`ModelHost.run_texts` makes the next chunk's in its
    worker thread, so the loop that feeds the device does not build them while the device waits."""

    tokenized: Tokenized
    batches: list[np.ndarray]
    inputs: list[dict[str, Any] | None]


class ModelHost:
    """A transformers module and its tokenizer, placed on one or more devices."""

    #: CUDA only: copy inputs from pinned memory and each batch's output back without stopping the
    #: device: the host waits for batch k's copy only after batch k + 1 is launched (one batch of
    #: lag), so the device never idles while the host prepares a batch, and the host never runs
    #: more than one batch ahead (its waits release the GIL for the tokenizer thread). Results equal
    #: the plain path's (tests/test_fast_paths.py), but on an H100 it was slower on every row of the
    #: speed table (bge-small documents 6,073/s against 8,457/s with plain copies: benchmarks/RESULTS.md),
    #: so it stays opt-in: ``host.async_copies = True``.
    async_copies: bool = False
    #: whether :meth:`run_texts`' worker thread builds each chunk's batch tensors and runs
    #: :data:`PREPARE_AHEAD` chunks ahead (True) or only tokenizes, one chunk ahead, leaving each batch
    #: to be built just before it runs (False). ``None``: True when every device is an accelerator. A
    #: CPU forward already keeps every core busy, and more host work beside it slowed MiniLM on 2 cores
    #: (benchmarks/RESULTS.md).
    build_ahead: bool | None = None

    def __init__(
        self,
        module: torch.nn.Module,
        tokenizer: TextTokenizer,
        devices: str | int | Sequence[str | int] | None,
        use_fp16: bool,
        use_bf16: bool,
        max_tokens_per_batch: int | None = None,
        packed: bool | None = False,
        packable: bool = True,
    ):
        """``packed``: lay each batch's sequences end to end instead of padding them
        (:mod:`bgekit.runtime.packed`; ``None`` packs where it pays, on CUDA in fp16/bf16).
        ``packable`` is False for a family whose forward cannot take packed batches. A module that
        runs on ONNX Runtime (an :class:`OnnxModule` in it) is placed on the CPU, on padded batches."""
        budget = max_tokens_per_batch
        if budget is not None and (isinstance(budget, bool) or not isinstance(budget, int) or budget < 1):
            raise InputError(f"max_tokens_per_batch must be a positive int or None, got {max_tokens_per_batch!r}")
        #: token budget per batch (padded tokens); ``None`` batches by ``batch_size`` alone
        self.max_tokens_per_batch = max_tokens_per_batch
        self.tokenizer = tokenizer
        if runs_on_onnx(module):  # the export takes padded batches, and its session runs on the CPU
            devices, packable = "cpu", False
        self.devices = resolve_devices(devices)
        self.use_fp16, self.use_bf16 = use_fp16, use_bf16
        module.eval()
        if not packable:
            if packed:
                raise InputError(f"packed=True is not supported for {type(module).__name__}; use packed=False")
            packed = False
        dtypes = [resolve_dtype(d, use_fp16, use_bf16) for d in self.devices]
        #: first position id of each packed sequence; None when batches are padded
        self.position_offset = packing.choose(packed, module, dtypes, self.devices)
        if self.position_offset is not None:
            try:
                packing.use_packed_attention(module)  # before the replicas are copied from it
            except (ValueError, NotImplementedError) as exc:  # a model class that refuses custom attention
                if packed:
                    raise InputError(f"packed=True: {type(module).__name__} refused packed attention: {exc}") from exc
                logger.info("padded batches for %s: it refused packed attention (%s)", type(module).__name__, exc)
                self.position_offset = None
        if self.position_offset is not None:
            logger.info("packed (padding-free) batches for %s", type(packing.packing_core(module)).__name__)
        _without_key_value_cache(module)  # before the replicas are copied from it
        dtype_for = functools.partial(resolve_dtype, use_fp16=use_fp16, use_bf16=use_bf16)  # picklable
        self.pool = ReplicaPool(module, self.devices, dtype_for)
        self.max_positions = max_positions(module.config)

    @property
    def module(self) -> torch.nn.Module:
        return self.pool.primary

    @property
    def packed(self) -> bool:
        """True when batches reach the forward packed (``cu_seq_lens_q`` in its inputs), not padded."""
        return self.position_offset is not None

    def clamp_length(self, max_length: int | None, default: int, name: str = "max_length") -> int:
        """Validate ``max_length`` and keep it inside the model's position table; ``name`` is the
        option the value came from, for the error and log messages."""
        value = default if max_length is None else max_length
        _check_positive_int(name, value)
        if self.max_positions is not None and value > self.max_positions:
            logger.info(
                "%s=%d is beyond the model's %d positions; using %d",
                name,
                value,
                self.max_positions,
                self.max_positions,
            )
            value = self.max_positions
        return value

    def run(
        self,
        tokenized: Tokenized | Prepared,
        forward: Forward,
        batch_size: int,
        *,
        desc: str,
        pad_to_multiple_of: int | None = None,
        show_progress_bar: bool | None = None,
        into: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Forward every input in length-sorted batches; rows come back in input order (float32, CPU).

        ``tokenized`` may be a :class:`Prepared` chunk (:meth:`prepare`), whose batches are used as
        they are (``pad_to_multiple_of`` was :meth:`prepare`'s to apply). With :attr:`async_copies`
        on CUDA each batch's output is copied back into pinned memory while the next batch runs
        (:class:`_LaggedCopies`). ``into``: a float32 CPU tensor with a row per input to write the
        rows into (and return), instead of a new one.
        """
        copies = _LaggedCopies(self.async_copies)

        def joined(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
            copies.finish()  # the halves of an OOM split may still be in flight
            return torch.cat([a, b])

        batches, outputs = self._run_batches(
            tokenized,
            lambda module, inputs: copies.submit(forward(module, inputs).float()),
            batch_size,
            joined,
            desc=desc,
            pad_to_multiple_of=pad_to_multiple_of,
            show_progress_bar=show_progress_bar,
        )
        copies.finish()
        if not outputs:
            raise InputError("nothing to run: no inputs were given")
        if into is None:
            into = outputs[0].new_empty((_count(tokenized), *outputs[0].shape[1:]))
        # each batch's rows straight to their input positions: one copy, not a cat and a scatter
        target = into.numpy()
        for rows, output in zip(batches, outputs, strict=True):
            target[rows] = output.numpy()
        return into

    def run_texts(
        self,
        items: Sequence[Any],
        tokenize: Callable[[list[Any]], Tokenized],
        forward: Forward,
        batch_size: int,
        *,
        desc: str,
        chunk_size: int | None = None,
        show_progress_bar: bool | None = None,
    ) -> tuple[torch.Tensor, int]:
        """Tokenize and forward ``items`` (texts or pairs) chunk by chunk, tokenizing the next chunk
        and building its batches (:meth:`prepare`) in a worker thread while this one runs (the Rust
        tokenizer releases the GIL, and so does the loop while it waits for the device).

        Returns ``(rows in input order, float32 CPU; how many inputs were truncated)``. Inputs are
        length-sorted within a chunk (:meth:`chunks`), so a call of one chunk is exactly :meth:`run`
        on the whole input.
        """
        items = list(items)
        chunks = [items[part.start : part.stop] for part in self.chunks(len(items), batch_size, chunk_size)]
        if len(chunks) == 1:
            tokenized = tokenize(chunks[0])
            return self.run(tokenized, forward, batch_size, desc=desc, show_progress_bar=show_progress_bar), (
                tokenized.truncated
            )
        if show_progress_bar is None:
            show_progress_bar = len(items) >= PROGRESS_MIN_ITEMS and sys.stderr.isatty()
        bar = tqdm(total=len(items), desc=desc, disable=not show_progress_bar, unit="item")
        result: torch.Tensor | None = None  # every chunk's rows land in their slice of one tensor
        truncated = done = 0
        build = self.build_ahead
        if build is None:
            build = all(torch.device(d).type != "cpu" for d in self.devices)
        # with build_ahead, PREPARE_AHEAD chunks queued: the worker moves on to the next chunk as soon
        # as it has one done, instead of waiting for the loop to take the one before
        ahead = PREPARE_AHEAD if build else 1
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="bgekit-tokenize") as executor:

            def prepared(chunk: list[Any]) -> Prepared:
                return self.prepare(tokenize(chunk), batch_size, build=build)

            pending = collections.deque(executor.submit(prepared, c) for c in chunks[:ahead])
            try:
                for index, chunk in enumerate(chunks):
                    ready = pending.popleft().result()
                    if index + ahead < len(chunks):
                        pending.append(executor.submit(prepared, chunks[index + ahead]))
                    if result is None:  # the row width is known once the first chunk has run
                        first = self.run(ready, forward, batch_size, desc=desc, show_progress_bar=False)
                        result = first.new_empty((len(items), *first.shape[1:]))
                        result.numpy()[: len(chunk)] = first.numpy()
                    else:
                        part = result[done : done + len(chunk)]
                        self.run(ready, forward, batch_size, desc=desc, show_progress_bar=False, into=part)
                    done += len(chunk)
                    truncated += ready.tokenized.truncated
                    bar.update(len(chunk))
            finally:
                for future in pending:
                    future.cancel()
                bar.close()
        assert result is not None  # more than one chunk ran
        return result, truncated

    def chunks(self, count: int, batch_size: int, chunk_size: int | None = None) -> list[range]:
        """How :meth:`run_texts` cuts ``count`` inputs into chunks. Padded batches: chunks of
        ``chunk_size`` (default :data:`OVERLAP_CHUNK`), the first two smaller
        (:func:`~bgekit.runtime.batching.overlap_chunks`). Packed batches have no padding for a long
        sort to save, so their chunks are equal, one batch per device by default
        (:data:`PACKED_CHUNK_MIN` items at least): then the device waits only for the first."""
        _check_positive_int("batch_size", batch_size)
        if chunk_size is None:
            chunk_size = max(batch_size * len(self.devices), PACKED_CHUNK_MIN) if self.packed else OVERLAP_CHUNK
        _check_positive_int("chunk_size", chunk_size)
        return overlap_chunks(count, chunk_size, ramp=not self.packed)

    def run_items(
        self,
        tokenized: Tokenized,
        forward: ItemForward,
        batch_size: int,
        *,
        desc: str,
        pad_to_multiple_of: int | None = None,
        show_progress_bar: bool | None = None,
    ) -> list[Any]:
        """Like :meth:`run` for a forward that returns one Python object per input row (outputs that
        do not stack into one tensor, such as per-token vectors of varying length); input order."""

        def checked(module: torch.nn.Module, inputs: dict[str, torch.Tensor]) -> list[Any]:
            items = list(forward(module, inputs))
            rows = len(inputs[packing.LENGTHS] if packing.is_packed(inputs) else inputs["input_ids"])
            if len(items) != rows:
                raise RuntimeError(f"forward returned {len(items)} items for a batch of {rows}")
            return items

        batches, outputs = self._run_batches(
            tokenized,
            checked,
            batch_size,
            operator.add,
            desc=desc,
            pad_to_multiple_of=pad_to_multiple_of,
            show_progress_bar=show_progress_bar,
        )
        result: list[Any] = [None] * len(tokenized.ids)
        for rows, items in zip(batches, outputs, strict=True):
            for position, item in zip(rows.tolist(), items, strict=True):
                result[position] = item
        return result

    def prepare(
        self, tokenized: Tokenized, batch_size: int, pad_to_multiple_of: int | None = None, *, build: bool = True
    ) -> Prepared:
        """``tokenized`` cut into length-sorted batches with every batch's host tensors built
        (``build=False``: not built; :meth:`run` then builds each just before it runs)."""
        batches = self._batches(tokenized, batch_size)
        inputs: list[dict[str, Any] | None] = [
            self._host_inputs(tokenized, rows, pad_to_multiple_of) if build else None for rows in batches
        ]
        return Prepared(tokenized, batches, inputs)

    def _batches(self, tokenized: Tokenized, batch_size: int) -> list[np.ndarray]:
        _check_positive_int("batch_size", batch_size)
        _, batches = length_sorted_batches([len(x) for x in tokenized.ids], batch_size, self.max_tokens_per_batch)
        return batches

    def _host_inputs(self, tokenized: Tokenized, rows: np.ndarray, pad_to_multiple_of: int | None) -> dict[str, Any]:
        """One batch's CPU tensors: packed end to end, or padded by the tokenizer."""
        ids = [tokenized.ids[i] for i in rows]
        types = None if tokenized.type_ids is None else [tokenized.type_ids[i] for i in rows]
        if self.position_offset is not None:
            return packing.pack(ids, types, self.position_offset)
        return self.tokenizer.collate(ids, types, pad_to_multiple_of)

    def _run_batches(
        self,
        source: Tokenized | Prepared,
        forward: Callable[[torch.nn.Module, dict[str, torch.Tensor]], T],
        batch_size: int,
        join: Callable[[T, T], T],
        *,
        desc: str,
        pad_to_multiple_of: int | None,
        show_progress_bar: bool | None,
    ) -> tuple[list[np.ndarray], list[T]]:
        """The batch loop both ``run`` flavours share: ``(each batch's input indices, its output)``.
        A :class:`Prepared` source brings its batches' tensors (a batch an OOM split cuts is rebuilt);
        a :class:`Tokenized` one has each batch's built just before it runs."""
        if isinstance(source, Prepared):
            tokenized, batches, ready = source.tokenized, source.batches, source.inputs
        else:
            tokenized, batches = source, self._batches(source, batch_size)
            ready = [None] * len(batches)
        if show_progress_bar is None:
            show_progress_bar = len(tokenized.ids) >= PROGRESS_MIN_ITEMS and sys.stderr.isatty()
        bar = tqdm(total=len(tokenized.ids), desc=desc, disable=not show_progress_bar, unit="item")

        def work(module: torch.nn.Module, device: str, index: int) -> T:
            batch, built = batches[index], ready[index]
            ready[index] = None  # not needed once this batch has run
            pin = self.async_copies and torch.device(device).type == "cuda"

            def step(rows: np.ndarray) -> T:
                whole = built is not None and len(rows) == len(batch)
                inputs = built if whole else self._host_inputs(tokenized, rows, pad_to_multiple_of)
                return forward(module, _to_device(inputs, device, pin))

            with torch.inference_mode():
                out = run_with_oom_backoff(step, batch, join)
            bar.update(len(batch))
            return out

        try:
            outputs = self.pool.map(work, range(len(batches)))
        finally:
            bar.close()
        return batches, outputs

    def log_truncation(self, tokenized: Tokenized, max_length: int, what: str) -> None:
        self.log_cut(tokenized.truncated, len(tokenized.ids), max_length, what)

    @staticmethod
    def log_cut(cut: int, total: int, max_length: int, what: str) -> None:
        """Say at INFO level how many of ``total`` inputs were truncated (nothing when none were)."""
        if cut:
            logger.info(
                "%d of %d %s were longer than max_length=%d tokens and were truncated", cut, total, what, max_length
            )

    def close(self) -> None:
        self.pool.close()


def _check_positive_int(name: str, value: object) -> None:
    """An :class:`InputError` naming ``name`` unless ``value`` is an int >= 1 (a bool is not)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:  # numpy ints too
        raise InputError(f"{name} must be a positive int, got {value!r}")


def _count(source: Tokenized | Prepared) -> int:
    return len((source.tokenized if isinstance(source, Prepared) else source).ids)


def _to_device(inputs: dict[str, Any], device: str, pin: bool) -> dict[str, Any]:
    """Move a batch's tensors to ``device`` (plain values such as a packed batch's longest length
    stay); a tensor under two keys is copied once. Pinned host memory makes the copy truly
    asynchronous (from pageable memory the driver may wait for the stream)."""
    moved: dict[int, torch.Tensor] = {}
    out: dict[str, Any] = {}
    for key, value in inputs.items():
        if isinstance(value, torch.Tensor):
            if id(value) not in moved:
                moved[id(value)] = (_pinned(value) if pin else value).to(device, non_blocking=True)
            value = moved[id(value)]
        out[key] = value
    return out


def _pinned(value: torch.Tensor) -> torch.Tensor:
    """``value`` copied into page-locked memory by numpy: ``Tensor.pin_memory()`` copies with a
    parallel torch CPU op, which wakes torch's OpenMP workers against the tokenizer thread's (the
    module docstring). Not yet timed on a GPU against ``pin_memory()``."""
    pinned = torch.empty(value.shape, dtype=value.dtype, pin_memory=True)
    np.copyto(pinned.numpy(), value.numpy())
    return pinned


class _LaggedCopies:
    """Each batch's output to host memory, one batch late on CUDA (with ``asynchronous``).

    ``submit`` queues the device-to-host copy of batch k into pinned memory behind batch k's
    kernels, records an event, and then waits for batch k - 1's event only: by then batch k is
    queued, so the device stays busy while the host prepares batch k + 1. A plain ``.cpu()``
    (copy and wait) otherwise. Read the returned tensors after :meth:`finish`.
    """

    def __init__(self, asynchronous: bool):
        self.asynchronous = asynchronous
        self._last: dict[torch.device, torch.cuda.Event] = {}  # one entry per device thread

    def submit(self, tensor: torch.Tensor) -> torch.Tensor:
        if not self.asynchronous or tensor.device.type != "cuda":
            return tensor.cpu()
        host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
        host.copy_(tensor, non_blocking=True)
        done = torch.cuda.Event()
        done.record(torch.cuda.current_stream(tensor.device))
        previous = self._last.get(tensor.device)
        self._last[tensor.device] = done
        if previous is not None:
            previous.synchronize()
        return host

    def finish(self) -> None:
        """Wait for every copy submitted so far."""
        for done in list(self._last.values()):
            done.synchronize()


def _without_key_value_cache(module: torch.nn.Module) -> None:
    """Turn off a decoder's key/value cache for the host's forwards (``config.use_cache``; ``generate``
    keeps its own setting). Embedding or scoring a batch is one pass: a cache would only copy every
    layer's keys and values and hold them all until the forward returns, GPU memory that grows with the
    batch (about 0.7 GB per 64 SciFact documents on 8 Mistral-7B-width layers) for nothing."""
    config = getattr(packing.packing_core(module), "config", None)
    if getattr(config, "use_cache", False):
        config.use_cache = False


#: model types whose position ids start after the padding index (``create_position_ids_from_input_ids``)
_PADDING_OFFSET_POSITIONS = frozenset(
    {
        "roberta",
        "xlm-roberta",
        "xlm-roberta-xl",
        "camembert",
        "mpnet",
        "data2vec-text",
        "roberta-prelayernorm",
        "longformer",
        "luke",
        "ibert",
        "xmod",
        "bart",
    }
)


def max_positions(config) -> int | None:
    """Longest input the position table allows (RoBERTa-style models reserve pad+1 slots)."""
    limit = getattr(config, "max_position_embeddings", None)
    if not isinstance(limit, int):
        return None
    if getattr(config, "model_type", "") in _PADDING_OFFSET_POSITIONS:
        pad = getattr(config, "pad_token_id", 1) or 1
        limit -= pad + 1
    if getattr(config, "position_embedding_type", "absolute") != "absolute":
        return None  # relative positions have no hard table
    return limit


def load_module(loader, folder: Path, trust_remote_code: bool, **kwargs) -> torch.nn.Module:
    """``loader.from_pretrained`` with float32 weights and a clear error on failure."""
    from transformers.utils import logging as hf_logging

    from ..errors import ModelNotFoundError

    bars_were_on = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        return loader.from_pretrained(str(folder), trust_remote_code=trust_remote_code, dtype=torch.float32, **kwargs)
    except Exception as exc:  # corrupt, mismatched or unreadable weights all end here
        raise ModelNotFoundError(
            f"could not load model weights from {folder}: {type(exc).__name__}: {exc}".strip()
        ) from exc
    finally:
        if bars_were_on:
            hf_logging.enable_progress_bar()
