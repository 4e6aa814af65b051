"""FlagEmbedding's abstract bases for custom models: ``AbsEmbedder`` and ``AbsReranker``.

Code that wraps its own model for FlagEmbedding subclasses these, loads ``self.model`` and
``self.tokenizer`` itself and implements one method (``encode_single_device`` /
``compute_score_single_gpu``). The same subclass works on bgekit unchanged: instructions, the query /
corpus split and the spreading over ``devices`` (one thread per device here, where FlagEmbedding
spawns processes) come from these bases, and bgekit's evaluation and search take the result like
any embedder.

Example:
    >>> import numpy as np
    >>> from bgekit import AbsEmbedder
    >>> class CharCounts(AbsEmbedder):
    ...     def encode_single_device(self, sentences, batch_size=256, max_length=512,
    ...                              convert_to_numpy=True, device=None, **kwargs):
    ...         one = isinstance(sentences, str)
    ...         rows = np.array([[len(s), s.count(" ")] for s in ([sentences] if one else sentences)], "float32")
    ...         return rows[0] if one else rows
    >>> CharCounts("none", query_instruction_for_retrieval="q: ").encode_queries(["a b"]).tolist()
    [[6.0, 2.0]]
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from .. import hub
from ..runtime.devices import resolve_devices
from .embedder import call_instruction, unescape_format, with_instruction
from .flag_pool import DevicePoolMethods, PoolHandle, joined, spread_over_devices
from .inputs import as_pair_list, as_text_list
from .scoring import RankMethods, SimilarityMethods


class AbsEmbedder(SimilarityMethods, DevicePoolMethods, ABC):
    """FlagEmbedding 1.4.2's ``AbsEmbedder``: same constructor (unknown options become attributes),
    same ``encode`` / ``encode_queries`` / ``encode_corpus``; subclasses implement
    :meth:`encode_single_device`."""

    def __init__(
        self,
        model_name_or_path: str,
        normalize_embeddings: bool = True,
        use_fp16: bool = True,
        use_bf16: bool = False,
        query_instruction_for_retrieval: str | None = None,
        query_instruction_format: str = "{}{}",
        devices: str | int | Sequence[str | int] | None = None,
        batch_size: int = 256,
        query_max_length: int = 512,
        passage_max_length: int = 512,
        convert_to_numpy: bool = True,
        truncate_dim: int | None = None,
        **kwargs: Any,
    ):
        # a name as the CLI and every class give it; anything else (a custom subclass's None) kept, as FlagEmbedding
        self.model_name_or_path = (
            hub.model_name(model_name_or_path) if hub.is_model_name(model_name_or_path) else model_name_or_path
        )
        self.normalize_embeddings = normalize_embeddings
        self.use_fp16, self.use_bf16 = use_fp16, use_bf16
        self.query_instruction_for_retrieval = query_instruction_for_retrieval
        if query_instruction_format is not None:  # None: the default "{}{}" when an instruction is applied
            unescape_format(query_instruction_format, what="query_instruction_format")  # checked, stored as given
        self.query_instruction_format = query_instruction_format
        self.target_devices = resolve_devices(devices)
        self.batch_size = batch_size
        self.query_max_length, self.passage_max_length = query_max_length, passage_max_length
        self.convert_to_numpy = convert_to_numpy
        self.truncate_dim = truncate_dim
        for key, value in kwargs.items():
            setattr(self, key, value)
        self.kwargs = kwargs
        self.tokenizer: Any = None
        self.model: Any = None
        self.pool: PoolHandle | None = None

    @staticmethod
    def get_detailed_instruct(instruction_format: str, instruction: str, sentence: str) -> str:
        """``instruction_format`` (``\\n`` read as a newline) filled with ``instruction`` and ``sentence``."""
        return unescape_format(instruction_format).format(instruction, sentence)

    def encode_queries(self, queries, batch_size=None, max_length=None, convert_to_numpy=None, **kwargs: Any):
        """:meth:`encode` with the query instruction and ``query_max_length``."""
        return self.encode(
            queries,
            batch_size=batch_size,
            max_length=self.query_max_length if max_length is None else max_length,
            convert_to_numpy=convert_to_numpy,
            **call_instruction(kwargs, self.query_instruction_for_retrieval, self.query_instruction_format),
            **kwargs,
        )

    def encode_corpus(self, corpus, batch_size=None, max_length=None, convert_to_numpy=None, **kwargs: Any):
        """:meth:`encode` with the passage instruction, if one was given as an option."""
        return self.encode(
            corpus,
            batch_size=batch_size,
            max_length=self.passage_max_length if max_length is None else max_length,
            convert_to_numpy=convert_to_numpy,
            **call_instruction(
                kwargs,
                self.kwargs.get("passage_instruction_for_retrieval"),
                self.kwargs.get("passage_instruction_format", "{}{}"),
            ),
            **kwargs,
        )

    def encode(
        self,
        sentences,
        batch_size=None,
        max_length=None,
        convert_to_numpy=None,
        instruction: str | None = None,
        instruction_format: str | None = None,
        *,
        show_progress_bar: bool | None = None,
        **kwargs: Any,
    ):
        """Instruction applied, then :meth:`encode_single_device` on one chunk per device.
        ``show_progress_bar`` (bgekit callers pass it) is not handed to the subclass."""
        texts, single = as_text_list(sentences, "sentences")
        texts = with_instruction(texts, instruction, instruction_format)
        options = {
            "batch_size": self.batch_size if batch_size is None else batch_size,
            "max_length": self.passage_max_length if max_length is None else max_length,
            "convert_to_numpy": self.convert_to_numpy if convert_to_numpy is None else convert_to_numpy,
            **kwargs,
        }
        if single:
            return self.encode_single_device(texts[0], device=self.target_devices[0], **options)
        return self.encode_multi_process(texts, self.start_multi_process_pool(), **options)

    @abstractmethod
    def encode_single_device(
        self,
        sentences: str | list[str],
        batch_size: int = 256,
        max_length: int = 512,
        convert_to_numpy: bool = True,
        device: str | None = None,
        **kwargs: Any,
    ):
        """Embed ``sentences`` on ``device``: the one method a subclass writes."""

    def encode_multi_process(self, sentences: list[str], pool: PoolHandle, **kwargs: Any):
        """:meth:`encode_single_device` on one chunk per device of ``pool``, at once; joined in order."""
        run = lambda chunk, device: self.encode_single_device(chunk, device=device, **kwargs)  # noqa: E731
        return joined(spread_over_devices(sentences, pool["devices"], run))

    def stop_self_pool(self) -> None:
        self.pool = None

    # FlagEmbedding's helpers its own encode_single_device code calls
    def _truncate_embeddings(self, embeddings):
        """The first ``truncate_dim`` dimensions (all without one)."""
        return embeddings if self.truncate_dim is None else embeddings[..., : self.truncate_dim]

    def _convert_to_numpy(self, embeddings: torch.Tensor, device: str | None = None) -> np.ndarray:
        """A CPU numpy array; bfloat16, which numpy lacks, as float32."""
        if embeddings.dtype == torch.bfloat16:
            embeddings = embeddings.float()
        return embeddings.cpu().numpy()

    def _concatenate_results_from_multi_process(self, results_list: list[Any]):
        return joined(results_list)

    @staticmethod
    def _encode_multi_process_worker(*args: Any) -> None:
        """Named for FlagEmbedding code that passes it to :meth:`start_multi_process_pool`; bgekit starts
        no worker process, so it never runs."""


class AbsReranker(RankMethods, DevicePoolMethods, ABC):
    """FlagEmbedding 1.4.2's ``AbsReranker``: same constructor, instructions and ``compute_score``;
    subclasses implement :meth:`compute_score_single_gpu`."""

    def __init__(
        self,
        model_name_or_path: str,
        use_fp16: bool = False,
        query_instruction_for_rerank: str | None = None,
        query_instruction_format: str = "{}{}",
        passage_instruction_for_rerank: str | None = None,
        passage_instruction_format: str = "{}{}",
        devices: str | int | Sequence[str | int] | None = None,
        batch_size: int = 128,
        query_max_length: int | None = None,
        max_length: int = 512,
        normalize: bool = False,
        **kwargs: Any,
    ):
        # a name as the CLI and every class give it; anything else (a custom subclass's None) kept, as FlagEmbedding
        self.model_name_or_path = (
            hub.model_name(model_name_or_path) if hub.is_model_name(model_name_or_path) else model_name_or_path
        )
        self.use_fp16, self.use_bf16 = use_fp16, False  # FlagEmbedding takes use_bf16 as an extra option
        self.query_instruction_for_rerank = query_instruction_for_rerank
        for name, fmt in (("query", query_instruction_format), ("passage", passage_instruction_format)):
            if fmt is not None:  # None: the default "{}{}" when an instruction is applied
                unescape_format(fmt, what=f"{name}_instruction_format")  # checked, stored as given
        self.query_instruction_format = query_instruction_format
        self.passage_instruction_for_rerank = passage_instruction_for_rerank
        self.passage_instruction_format = passage_instruction_format
        self.target_devices = resolve_devices(devices)
        self.batch_size = batch_size
        self.query_max_length, self.max_length = query_max_length, max_length
        self.normalize = normalize
        for key, value in kwargs.items():
            setattr(self, key, value)
        self.kwargs = kwargs
        self.model: Any = None
        self.tokenizer: Any = None
        self.pool: PoolHandle | None = None

    get_detailed_instruct = staticmethod(AbsEmbedder.get_detailed_instruct)

    def get_detailed_inputs(self, sentence_pairs) -> list[list[str]]:
        """The pairs with the query and passage instructions applied."""
        pairs, _ = as_pair_list(sentence_pairs)
        queries = with_instruction(
            [q for q, _ in pairs], self.query_instruction_for_rerank, self.query_instruction_format
        )
        passages = with_instruction(
            [p for _, p in pairs], self.passage_instruction_for_rerank, self.passage_instruction_format
        )
        return [[q, p] for q, p in zip(queries, passages, strict=True)]

    def compute_score(self, sentence_pairs, *, show_progress_bar: bool | None = None, **kwargs: Any):
        """Instructions applied, then :meth:`compute_score_single_gpu` on one chunk per device
        (``show_progress_bar``, which bgekit callers pass, is not handed to the subclass)."""
        pairs = self.get_detailed_inputs(sentence_pairs)
        if len(self.target_devices) == 1:
            return self.compute_score_single_gpu(pairs, device=self.target_devices[0], **kwargs)
        return self.encode_multi_process(pairs, self.start_multi_process_pool(), **kwargs)

    @abstractmethod
    def compute_score_single_gpu(
        self,
        sentence_pairs,
        batch_size: int = 256,
        query_max_length: int | None = None,
        max_length: int = 512,
        normalize: bool = False,
        device: str | None = None,
        **kwargs: Any,
    ):
        """Score pairs on ``device``: the one method a subclass writes."""

    stop_self_pool = AbsEmbedder.stop_self_pool

    def encode_multi_process(self, sentence_pairs, pool: PoolHandle, **kwargs: Any):
        """:meth:`compute_score_single_gpu` on one chunk per device of ``pool``, at once; one array."""
        run = lambda chunk, device: self.compute_score_single_gpu(chunk, device=device, **kwargs)  # noqa: E731
        return np.asarray(joined(spread_over_devices(list(sentence_pairs), pool["devices"], run)))
