"""Decoder embedders with domain routing ("pseudo-MoE"): FlagEmbedding's ``FlagPseudoMoEModel``.

The checkpoint's own code (``trust_remote_code``) routes by an active domain, ``general``,
``coding`` or ``reasoning`` for example. As in FlagEmbedding 1.4.2 the domain comes from the call
(``domain_for_pseudo_moe=`` or ``domain=``) or the constructor; the module's ``set_domain`` is called
with it when it has one, and the forward gets ``domain=`` (a forward that refuses it runs without).
Everything else is :class:`~bgekit.models.llm.FlagLLMModel`: last-token pooling, E5 prompts.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch

from ..registry import E5_INSTRUCT
from ..runtime.devices import resolve_devices
from .llm import FlagLLMModel
from .pooling import pool
from .tokenization import Tokenized


class FlagPseudoMoEModel(FlagLLMModel):
    """Decoder-only embedder for domain-routed checkpoints (FlagEmbedding's ``FlagPseudoMoEModel``).

    Example:
        >>> from bgekit import FlagPseudoMoEModel
        >>> model = FlagPseudoMoEModel("path/to/pseudo-moe-embedder", domain_for_pseudo_moe="coding")  # doctest: +SKIP
        >>> model.encode_queries(["sort a list in place"], domain="reasoning").shape  # doctest: +SKIP

    ``use_bf16=None`` (the default) is FlagEmbedding's: bfloat16 on accelerators, float32 on the CPU.
    Batches stay padded (``packed=False``): the checkpoint's own forward reads them.
    """

    def __init__(
        self,
        model_name_or_path: str,
        normalize_embeddings: bool = True,
        use_fp16: bool = False,
        use_bf16: bool | None = None,
        query_instruction_for_retrieval: str | None = None,
        query_instruction_format: str = E5_INSTRUCT,
        devices: str | int | Sequence[str | int] | None = None,
        trust_remote_code: bool = True,
        cache_dir: str | None = None,
        batch_size: int = 256,
        query_max_length: int = 512,
        passage_max_length: int = 512,
        convert_to_numpy: bool = True,
        truncate_dim: int | None = None,
        domain_for_pseudo_moe: str | None = None,
        **kwargs: Any,
    ):
        if use_bf16 is None:
            use_bf16 = any(torch.device(device).type != "cpu" for device in resolve_devices(devices))
        kwargs.setdefault("packed", False)
        self.domain_for_pseudo_moe = domain_for_pseudo_moe
        self._domain = domain_for_pseudo_moe  # the running call's domain, read by every device's forward
        self._calls = threading.Lock()  # one domain at a time: calls on one model run one after another
        super().__init__(
            model_name_or_path,
            normalize_embeddings=normalize_embeddings,
            use_fp16=use_fp16,
            use_bf16=use_bf16,
            query_instruction_for_retrieval=query_instruction_for_retrieval,
            query_instruction_format=query_instruction_format,
            devices=devices,
            trust_remote_code=trust_remote_code,
            cache_dir=cache_dir,
            batch_size=batch_size,
            query_max_length=query_max_length,
            passage_max_length=passage_max_length,
            convert_to_numpy=convert_to_numpy,
            truncate_dim=truncate_dim,
            **kwargs,
        )

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        del state["_calls"]
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._calls = threading.Lock()

    def encode(
        self,
        sentences: str | list[str],
        batch_size: int | None = None,
        max_length: int | None = None,
        convert_to_numpy: bool | None = None,
        instruction: str | None = None,
        instruction_format: str | None = None,
        *,
        domain_for_pseudo_moe: str | None = None,
        domain: str | None = None,
        **kwargs: Any,
    ):
        """:meth:`FlagLLMModel.encode` with this call's domain (``domain_for_pseudo_moe``, else
        ``domain``, else the constructor's)."""
        chosen = domain_for_pseudo_moe if domain_for_pseudo_moe is not None else domain
        with self._in_domain(self.domain_for_pseudo_moe if chosen is None else chosen):
            return super().encode(
                sentences, batch_size, max_length, convert_to_numpy, instruction, instruction_format, **kwargs
            )

    def embed_tokenized(self, tokenized: Tokenized, batch_size: int | None = None) -> torch.Tensor:
        with self._in_domain(self.domain_for_pseudo_moe):
            return super().embed_tokenized(tokenized, batch_size)

    @contextmanager
    def _in_domain(self, domain: str | None) -> Iterator[None]:
        with self._calls:
            self._domain = domain
            try:
                yield
            finally:
                self._domain = self.domain_for_pseudo_moe

    def _forward(self, module: torch.nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        domain = self._domain
        if domain is None:
            hidden = module(**inputs, return_dict=True).last_hidden_state
        else:
            if hasattr(module, "set_domain"):
                module.set_domain(domain)
            try:
                hidden = module(**inputs, domain=domain, return_dict=True).last_hidden_state
            except TypeError:  # a forward without a domain argument (routing by set_domain alone)
                hidden = module(**inputs, return_dict=True).last_hidden_state
        pooled = pool(hidden, inputs["attention_mask"], "last_token")
        return torch.nan_to_num(pooled, nan=0.0, posinf=1e4, neginf=-1e4)  # as FlagEmbedding's
