"""FlagEmbedding's per-device and process-pool methods, on bgekit's in-process device threads.

FlagEmbedding spreads a call over GPUs with one spawned process per device
(``start_multi_process_pool`` / ``encode_multi_process`` / ``stop_multi_process_pool``) and runs
each chunk with ``encode_single_device`` (``compute_score_single_gpu`` for rerankers). bgekit already
runs one thread per device inside the process (:class:`~bgekit.runtime.devices.ReplicaPool`), so code
written against those names keeps working here: a single-device method runs the calling thread's
work on that one device, and a "pool" is a handle that starts no process (``processes`` is empty);
``encode_multi_process`` spreads the call over the model's devices as ``encode`` does.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractContextManager, nullcontext
from typing import Any

import numpy as np
import torch

from ..errors import InputError
from ..runtime.devices import resolve_devices, resolve_dtype
from .inputs import as_pair_list

#: what ``start_multi_process_pool`` returns: FlagEmbedding's keys, no queues and no processes
PoolHandle = dict[str, Any]


class DevicePoolMethods:
    """What embedders and rerankers share: device names, dtype, the pool handle."""

    target_devices: list[str]
    use_fp16: bool
    use_bf16: bool

    @staticmethod
    def get_target_devices(devices: str | int | Sequence[str | int] | None) -> list[str]:
        """FlagEmbedding's helper: ``devices`` as torch device strings (``None``: every GPU, else the CPU)."""
        return resolve_devices(devices)

    def get_model_torch_dtype(self) -> torch.dtype:
        """The dtype the model computes in on its first device: float32 on a CPU unless ``use_bf16``
        (FlagEmbedding names float16 there too, then runs float32)."""
        return resolve_dtype(self.target_devices[0], self.use_fp16, self.use_bf16)

    def on_device(self, device: str | int | torch.device | None) -> AbstractContextManager[None]:
        """Run this thread's calls on ``device`` alone (one of :attr:`target_devices`; ``"cuda"`` is
        ``"cuda:0"``, a ``torch.device`` works) inside the block."""
        if device is None:
            return nullcontext()
        wanted = torch.device(resolve_devices(device if isinstance(device, int) else str(device))[0])
        for name in self.target_devices:
            have = torch.device(name)
            if have.type == wanted.type and (have.index or 0) == (wanted.index or 0):
                return self.host.pool.only(name)  # type: ignore[attr-defined]
        return self.host.pool.only(str(device))  # type: ignore[attr-defined]  # its error names the devices

    def start_multi_process_pool(self, process_target_func: Any = None) -> PoolHandle:
        """A handle for :meth:`encode_multi_process`. No process starts: bgekit already runs one
        thread per device in this process, so the handle only records the devices."""
        return {"input": None, "output": None, "processes": [], "devices": list(self.target_devices)}

    @staticmethod
    def stop_multi_process_pool(pool: PoolHandle | None) -> None:
        """Nothing to stop (no processes were started); kept for FlagEmbedding code."""


class EmbedderPoolMethods(DevicePoolMethods):
    """``encode_single_device`` and ``encode_multi_process`` on an embedder's own ``encode``."""

    def encode_single_device(
        self,
        sentences: str | list[str],
        batch_size: int = 256,
        max_length: int = 512,
        convert_to_numpy: bool = True,
        device: str | int | None = None,
        **kwargs: Any,
    ):
        """Embed ``sentences`` as they are (no instruction) on one device (default: all of the
        model's, as :meth:`encode`). FlagEmbedding's defaults: 256 per batch, 512 tokens, numpy."""
        with self.on_device(device):
            return self.encode(  # type: ignore[attr-defined]
                sentences, batch_size=batch_size, max_length=max_length, convert_to_numpy=convert_to_numpy, **kwargs
            )

    def encode_multi_process(self, sentences: list[str], pool: PoolHandle, **kwargs: Any):
        """Embed ``sentences`` over every device of the model, as :meth:`encode` (``pool`` is not needed)."""
        return self.encode(sentences, **kwargs)  # type: ignore[attr-defined]


class RerankerPoolMethods(DevicePoolMethods):
    """``compute_score_single_gpu`` and ``encode_multi_process`` on a reranker's scoring."""

    def get_detailed_inputs(self, sentence_pairs: Sequence[Sequence[str]]) -> list[list[str]]:
        """FlagEmbedding's helper: the pairs with the query / passage instructions applied."""
        pairs, _ = as_pair_list(sentence_pairs)
        return [list(pair) for pair in self.detailed_pairs(pairs)]  # type: ignore[attr-defined]

    def compute_score_single_gpu(
        self,
        sentence_pairs: Sequence[str] | Sequence[Sequence[str]],
        batch_size: int | None = None,
        query_max_length: int | None = None,
        max_length: int | None = None,
        normalize: bool | None = None,
        device: str | int | None = None,
        **kwargs: Any,
    ):
        """Score pairs as they are (no instructions: FlagEmbedding applies them before this step) on
        one device (default: all of the model's). Options default to the model's."""
        pairs, _ = as_pair_list(sentence_pairs)
        with self.on_device(device):
            return self._scores(  # type: ignore[attr-defined]
                pairs,
                batch_size=batch_size,
                query_max_length=query_max_length,
                max_length=max_length,
                normalize=normalize,
                **kwargs,
            )

    def encode_multi_process(self, sentence_pairs: Sequence[Sequence[str]], pool: PoolHandle, **kwargs: Any):
        """Score pairs as they are over every device of the model: a numpy array, as FlagEmbedding's."""
        pairs, _ = as_pair_list(sentence_pairs)
        return np.asarray(self._scores(pairs, **kwargs))  # type: ignore[attr-defined]


def spread_over_devices(items: list[Any], devices: Sequence[str], run: Callable[[list[Any], str], Any]) -> list[Any]:
    """``run(chunk, device)`` for one contiguous chunk of ``items`` per device, all at once (a thread
    each), as FlagEmbedding's pool splits them; the chunks' results in item order."""
    if not items:
        raise InputError("nothing to run: pass at least one input")
    size = -(-len(items) // len(devices))
    starts = range(0, len(items), size)  # no more starts than devices
    chunks = [(items[start : start + size], device) for start, device in zip(starts, devices, strict=False)]
    if len(chunks) == 1:
        return [run(*chunks[0])]
    with ThreadPoolExecutor(max_workers=len(chunks), thread_name_prefix="bgekit-abs") as executor:
        return list(executor.map(lambda chunk: run(*chunk), chunks))


def joined(results: list[Any]) -> Any:
    """The chunks' results as one array (numpy or torch, as they came), or one list."""
    if isinstance(results[0], torch.Tensor):
        return torch.cat([result.to(results[0].device) for result in results])
    if isinstance(results[0], np.ndarray):
        return np.concatenate(results)
    return [value for result in results for value in result]


def given(**options: Any) -> dict[str, Any]:
    """The options a caller set (not ``None``), to pass on by name."""
    return {key: value for key, value in options.items() if value is not None}
