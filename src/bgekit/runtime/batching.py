"""Length-sorted batches, order restore, and batch-size back-off on device OOM.

Sorting by length before batching keeps padding waste small; the caller gets results
back in input order. Only a real out-of-memory error shrinks a batch (FlagEmbedding
retries on any RuntimeError, which hides genuine bugs); below the floor it stops with a
clear message.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Callable, Sequence
from typing import TypeVar

import numpy as np
import torch

from ..errors import DeviceOutOfMemoryError

logger = logging.getLogger(__name__)
T = TypeVar("T")


def length_sorted_batches(
    lengths: Sequence[int], batch_size: int, max_tokens: int | None = None
) -> tuple[np.ndarray, list[np.ndarray]]:
    """Sort indices longest first and cut them into batches.

    Returns ``(order, batches)``: ``order`` is the sorted index array, each batch an
    array of original indices. A batch holds at most ``batch_size`` items and, when
    ``max_tokens`` is set, at most that many padded tokens (but always one item).
    """
    lengths = np.asarray(lengths, dtype=np.int64)
    order = np.argsort(-lengths, kind="stable")
    batches: list[np.ndarray] = []
    start = 0
    while start < len(order):
        size = min(batch_size, len(order) - start)
        if max_tokens is not None:
            longest = int(lengths[order[start]])
            size = max(1, min(size, max_tokens // max(longest, 1)))
        batches.append(order[start : start + size])
        start += size
    return order, batches


def overlap_chunks(count: int, chunk_size: int, ramp: bool = True) -> list[range]:
    """Cut ``count`` items into the chunks a pipeline tokenizes ahead of the forward pass.

    The device idles while the first chunk is tokenized, so with ``ramp`` and more than one chunk the
    first is a quarter of ``chunk_size`` and the second a half (each at least one item): the device
    starts after a sixteenth of a 4,096-item call's tokenization instead of a quarter. Without
    ``ramp`` every chunk is ``chunk_size`` (the last one the rest): where the host prepares a chunk
    barely faster than the device runs one, each doubling of the ramp leaves the device waiting
    for the bigger next chunk. A call of at most ``chunk_size`` items stays one chunk.
    """
    if count <= chunk_size:
        return [range(count)]
    sizes = [max(chunk_size // 4, 1), max(chunk_size // 2, 1)] if ramp else []
    chunks, start = [], 0
    while start < count:
        size = sizes.pop(0) if sizes else chunk_size
        chunks.append(range(start, min(start + size, count)))
        start += size
    return chunks


def flatten(rows: Sequence[Sequence[int]], total: int) -> np.ndarray:
    """Concatenate lists of ints (token ids of a batch) into one int64 array of ``total`` items at
    C speed: three times faster than a generator, which matters when the host prepares a batch
    while the device waits."""
    return np.fromiter(itertools.chain.from_iterable(rows), dtype=np.int64, count=total)


def is_out_of_memory(exc: BaseException) -> bool:
    """True only for device out-of-memory errors."""
    return isinstance(exc, torch.OutOfMemoryError) or (
        isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower() and "CUDA" in str(exc)
    )


def run_with_oom_backoff(
    fn: Callable[[np.ndarray], T],
    batch: np.ndarray,
    join: Callable[[T, T], T] = lambda a, b: torch.cat([a, b]),
    min_batch_size: int = 1,
) -> T:
    """Run ``fn(batch)``; on device OOM split the batch in halves and retry each half.

    ``join`` puts the halves' results back together (row concatenation by default).
    """
    try:
        return fn(batch)
    except Exception as exc:
        if not is_out_of_memory(exc):
            raise
        if len(batch) <= min_batch_size:
            raise DeviceOutOfMemoryError(
                f"out of memory even with a batch of {len(batch)} item(s); lower max_length, "
                "use fp16/bf16, or free device memory"
            ) from exc
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        half = len(batch) // 2
        logger.warning(
            "device out of memory on a batch of %d; retrying as %d + %d", len(batch), half, len(batch) - half
        )
        first = run_with_oom_backoff(fn, batch[:half], join, min_batch_size)
        return join(first, run_with_oom_backoff(fn, batch[half:], join, min_batch_size))
