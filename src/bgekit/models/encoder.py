"""Encoder embedders (BERT, XLM-R, ...): one forward, then ``cls`` or ``mean`` pooling.

:class:`FlagModel` keeps FlagEmbedding's name, argument names and defaults, so
``from bgekit import FlagModel`` is a drop-in replacement.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from .. import hub
from ..errors import InputError
from ..runtime import first_tokens, lean_encoder
from ..runtime import packed as packing
from .adapters import check_adapter_backend, merge_lora, tokenizer_folder
from .base import ModelHost, load_module
from .embedder import Embedder
from .onnx_backend import OnnxModule, RowsForward, check_backend, load_onnx_module
from .pooling import check_pooling, pool, pool_packed
from .tokenization import TextTokenizer, Tokenized, load_hf_tokenizer

#: the output of an ONNX graph that runs the last layer on the first rows (``[B, H]``)
CLS_STATE = "first_token_state"


def _cls_states_export(module: torch.nn.Module) -> tuple[str, RowsForward] | None:
    """For the ONNX export with ``cls`` pooling: the first-rows forward, where the model supports it."""
    if not first_tokens.supports(module):
        return None
    return CLS_STATE, lambda inputs, key_mask: first_tokens.first_token_states(module, inputs, key_mask)


class FlagModel(Embedder):
    """Encoder-only embedder (bge-*-v1.5, e5, gte, bce, MiniLM...).

    Example:
        >>> from bgekit import FlagModel
        >>> model = FlagModel("BAAI/bge-base-en-v1.5",  # doctest: +SKIP
        ...     query_instruction_for_retrieval="Represent this sentence for searching relevant passages: ")
        >>> q = model.encode_queries(["what is BGE?"])   # doctest: +SKIP
        >>> p = model.encode_corpus(["BGE is an embedding model."])  # doctest: +SKIP
        >>> scores = q @ p.T                             # doctest: +SKIP

    ``backend="onnx"`` (or ``"onnx-int8"``) runs the forward on ONNX Runtime on the CPU
    (``pip install 'bgekit[onnx]'``); the export is cached after the first load:

        >>> fast = FlagModel("sentence-transformers/all-MiniLM-L6-v2", pooling_method="mean",  # doctest: +SKIP
        ...     devices="cpu", backend="onnx")

    ``packed`` lays each batch's texts end to end instead of padding them, so no layer computes
    on padding and attention runs the variable-length flash kernel. The default (``None``) packs
    on CUDA in fp16/bf16 (cards of compute capability 8.0 and up) for BERT and RoBERTa-family
    encoders and Mistral / Llama / Qwen / Gemma decoders (:class:`FlagLLMModel`,
    :class:`FlagICLModel`); ``True`` forces it (on the CPU and in fp32 attention then runs over a padded
    grid: exact, no faster), ``False`` keeps padded batches. The vectors are the padded path's within float
    rounding (tests/test_packed.py).

    ``max_tokens_per_batch=N`` also caps each length-sorted batch at N padded tokens, so a batch
    of long texts shrinks and a batch of short ones keeps ``batch_size`` (same vectors).

    With ``cls`` pooling on a BERT or RoBERTa-family model, the last layer computes only each
    text's first row (its keys and values still see every token): a twelfth less work for a
    12-layer model, the same vectors within float rounding (:mod:`bgekit.runtime.first_tokens`).
    The ONNX backends export that forward too (read when the model is loaded; the cached graph
    then returns the CLS states alone).

    ``peft_path`` names a LoRA adapter folder (``bgekit finetune embedder --lora`` writes one in
    ``OUT/adapter``, with the tokenizer) merged into the base at load time: the vectors of
    ``FlagModel(BASE, peft_path="OUT/adapter")`` are those of the merged ``OUT``.
    """

    #: ``cls`` pooling: run the last layer on the first rows only where the model supports it;
    #: False runs the whole last layer, as the plain forward does (same vectors within rounding)
    cls_rows_only: bool = True
    #: a bidirectional encoder: batches pad on the right whatever the tokenizer's config says
    #: (:meth:`TextTokenizer.pad_right`); decoders (:class:`FlagLLMModel`) keep their tokenizer's side
    bidirectional: bool = True
    #: FlagEmbedding's class attribute: the pooling ``FlagAutoModel`` gives this class by ``model_class``
    DEFAULT_POOLING_METHOD = "cls"

    def __init__(
        self,
        model_name_or_path: str,
        normalize_embeddings: bool = True,
        use_fp16: bool = True,
        use_bf16: bool = False,
        query_instruction_for_retrieval: str | None = None,
        query_instruction_format: str = "{}{}",
        devices: str | int | Sequence[str | int] | None = None,
        pooling_method: str = "cls",
        trust_remote_code: bool = False,
        cache_dir: str | None = None,
        batch_size: int = 256,
        query_max_length: int = 512,
        passage_max_length: int = 512,
        convert_to_numpy: bool = True,
        truncate_dim: int | None = None,
        backend: str = "torch",
        max_tokens_per_batch: int | None = None,
        packed: bool | None = None,
        peft_path: str | None = None,
        **kwargs: Any,
    ):
        super().__init__(
            model_name_or_path,
            normalize_embeddings=normalize_embeddings,
            use_fp16=use_fp16,
            use_bf16=use_bf16,
            query_instruction_for_retrieval=query_instruction_for_retrieval,
            query_instruction_format=query_instruction_format,
            devices=devices,
            batch_size=batch_size,
            query_max_length=query_max_length,
            passage_max_length=passage_max_length,
            convert_to_numpy=convert_to_numpy,
            truncate_dim=truncate_dim,
            **kwargs,
        )
        self.pooling_method = check_pooling(pooling_method)
        from transformers import AutoModel

        folder = hub.model_folder(model_name_or_path, cache_dir=cache_dir)
        self.peft_path = peft_path  # part of what the vectors depend on (the eval cache key reads it)
        tokens_from = tokenizer_folder(folder, peft_path)  # the adapter's, with any added special tokens
        hf_tokenizer = load_hf_tokenizer(tokens_from, trust_remote_code)
        self.tokenizer = TextTokenizer(hf_tokenizer)
        if self.bidirectional:
            self.tokenizer.pad_right()
        self.backend = check_backend(backend, devices, self.use_bf16)
        check_adapter_backend(peft_path, backend, self.backend)
        self.packed_option = packed
        if self.backend == "torch":
            module = load_module(AutoModel, folder, trust_remote_code)
            if peft_path:
                module = merge_lora(module, peft_path, len(hf_tokenizer) if tokens_from != folder else None)
        else:  # ONNX Runtime replaces only the forward; tokenizer, batching and pooling stay
            module = load_onnx_module(
                AutoModel,
                folder,
                trust_remote_code,
                self.backend,
                "last_hidden_state",
                self.tokenizer.uses_type_ids,
                first_rows=_cls_states_export if self._cls_rows() else None,
            )
        self.host = ModelHost(
            module, self.tokenizer, devices, self.use_fp16, self.use_bf16, max_tokens_per_batch, packed=packed
        )
        self.target_devices = self.host.devices

    @property
    def model(self) -> torch.nn.Module:
        """The underlying transformers module (on the first device)."""
        return self.host.module

    def _cls_rows(self) -> bool:
        """Whether the last layer may run on the first rows alone (where the model supports it)."""
        return self.pooling_method == "cls" and self.cls_rows_only

    def _forward(self, module: torch.nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        if isinstance(module, OnnxModule) and module.output == CLS_STATE:  # a graph of the first-rows forward
            if self.pooling_method != "cls":
                raise InputError(
                    f"this ONNX export computes the CLS state only; load the model with "
                    f"pooling_method={self.pooling_method!r} to pool another way"
                )
            return module(**inputs).first_token_state
        if self._cls_rows() and first_tokens.supports(module):
            return first_tokens.first_token_states(module, inputs)
        hidden = lean_encoder.states(module, inputs)
        if packing.is_packed(inputs):
            return pool_packed(hidden, inputs, self.pooling_method)
        return pool(hidden, inputs["attention_mask"], self.pooling_method)

    def _embed(
        self, texts: list[str], batch_size: int, max_length: int, show_progress_bar: bool | None
    ) -> torch.Tensor:
        max_length = self.host.clamp_length(max_length, self.passage_max_length)
        # the next chunk is tokenized while this one runs (one chunk, the plain path, for short inputs)
        embeddings, truncated = self.host.run_texts(
            texts,
            lambda chunk: self.tokenizer.encode(chunk, max_length),
            self._forward,
            batch_size,
            desc="Embedding",
            show_progress_bar=show_progress_bar,
        )
        self.host.log_cut(truncated, len(texts), max_length, "texts")
        return embeddings

    def embed_tokenized(self, tokenized: Tokenized, batch_size: int | None = None) -> torch.Tensor:
        """Pooled float32 vectors ``(n, dim)`` (CPU, input order) of inputs from :meth:`tokenize`,
        before ``truncate_dim`` and normalization: :meth:`postprocess` finishes them as ``encode`` does."""
        return self.host.run(
            tokenized,
            self._forward,
            self.batch_size if batch_size is None else batch_size,
            desc="Embedding",
            show_progress_bar=False,
        )

    def close(self) -> None:
        self.host.close()
