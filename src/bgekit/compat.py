"""FlagEmbedding's auto classes, with its argument names and defaults.

Unlike FlagEmbedding 1.4.2 these match the *full* model name (``BAAI/bge-m3``), also
read local folders' own files, and accept ``checkpoint-N`` folders of fine-tuning runs.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from . import hub, registry
from .models.embedder import Embedder, embedder_class
from .models.reranker import Reranker, reranker_class


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
        query_instruction_for_retrieval: str | None = None,
        devices: str | int | Sequence[str | int] | None = None,
        pooling_method: str | None = None,
        trust_remote_code: bool | None = None,
        query_instruction_format: str | None = None,
        **kwargs: Any,
    ) -> Embedder:
        """Like FlagEmbedding: no query instruction unless you pass one."""
        name, spec = hub.resolve(model_name_or_path, registry.EMBEDDERS, model_class)
        options: dict[str, Any] = {
            "normalize_embeddings": normalize_embeddings,
            "use_fp16": use_fp16,
            "query_instruction_for_retrieval": query_instruction_for_retrieval,
            "query_instruction_format": query_instruction_format or spec.query_instruction_format,
            "devices": devices,
            "pooling_method": pooling_method or spec.pooling_method or "cls",
            "trust_remote_code": spec.trust_remote_code if trust_remote_code is None else trust_remote_code,
        }
        return embedder_class(spec.kind)(name, **options, **kwargs)


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
        name, spec = hub.resolve(model_name_or_path, registry.RERANKERS, model_class, for_reranker=True)
        trust = spec.trust_remote_code if trust_remote_code is None else trust_remote_code
        return reranker_class(spec.kind)(name, use_fp16=use_fp16, trust_remote_code=trust, **kwargs)
