"""FlagEmbedding's auto classes, with its argument names and defaults.

As FlagEmbedding 1.4.2 they know a local folder by its name (``.../bge-m3``, or a ``checkpoint-N``
inside it); they also match the full hub id (``BAAI/bge-m3``) and read other folders' own files
(sentence-transformers modules, M3 heads, ``config.json``), where FlagEmbedding needs ``model_class``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from . import hub, registry
from .models.embedder import Embedder, embedder_class
from .models.reranker import Reranker


class FlagAutoModel:
    """``FlagAutoModel.from_finetuned(name)`` picks the embedder class for a model."""

    def __init__(self):
        raise OSError("use FlagAutoModel.from_finetuned(model_name_or_path) to build an embedder")

    @classmethod
    def from_finetuned(
        cls,
        model_name_or_path: str,
        model_class: str | None = None,
        normalize_embeddings: bool = True,
        use_fp16: bool = True,
        use_bf16: bool = False,
        query_instruction_for_retrieval: str | None = None,
        devices: str | int | Sequence[str | int] | None = None,
        pooling_method: str | None = None,
        trust_remote_code: bool | None = None,
        query_instruction_format: str | None = None,
        truncate_dim: int | None = None,
        **kwargs: Any,
    ) -> Embedder:
        """Like FlagEmbedding: no query instruction unless you pass one. With ``model_class`` (a string
        or FlagEmbedding's enum) the class's defaults apply, as there: its pooling (``cls`` for
        encoders, ``last_token`` for decoders) and the ``"{}{}"`` query format, unless you pass them."""
        model_class = getattr(model_class, "value", model_class)  # EmbedderModelClass members
        name, spec = hub.resolve(model_name_or_path, registry.EMBEDDERS, model_class)
        chosen = embedder_class(spec.kind)
        if model_class is not None:
            pooling_method = pooling_method or chosen.DEFAULT_POOLING_METHOD
            query_instruction_format = query_instruction_format or "{}{}"
        options: dict[str, Any] = {
            "normalize_embeddings": normalize_embeddings,
            "use_fp16": use_fp16,
            "use_bf16": use_bf16,
            "query_instruction_for_retrieval": query_instruction_for_retrieval,
            "query_instruction_format": query_instruction_format or spec.query_instruction_format,
            "devices": devices,
            "pooling_method": pooling_method or spec.pooling_method or chosen.DEFAULT_POOLING_METHOD,
            "trust_remote_code": spec.trust_remote_code if trust_remote_code is None else trust_remote_code,
            "truncate_dim": truncate_dim,
        }
        return chosen(name, **options, **kwargs)


class FlagAutoReranker:
    """``FlagAutoReranker.from_finetuned(name)`` picks the reranker class for a model."""

    def __init__(self):
        raise OSError("use FlagAutoReranker.from_finetuned(model_name_or_path) to build a reranker")

    @classmethod
    def from_finetuned(
        cls,
        model_name_or_path: str,
        model_class: str | None = None,
        use_fp16: bool = False,
        trust_remote_code: bool | None = None,
        **kwargs: Any,
    ) -> Reranker:
        """The reranker class for ``model_name_or_path``, as :meth:`Reranker.from_pretrained` loads it: a
        folder bgekit's training wrote scores with its recorded prompt and instructions (unless you pass
        others), and a LoRA adapter folder (``OUT/adapter``) loads over its base."""
        model_class = getattr(model_class, "value", model_class)  # RerankerModelClass members
        return Reranker.from_pretrained(
            model_name_or_path, model_class, use_fp16=use_fp16, trust_remote_code=trust_remote_code, **kwargs
        )
