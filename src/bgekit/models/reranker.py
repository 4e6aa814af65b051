"""Rerankers: ``(query, passage)`` pairs in, relevance scores out.

:class:`Reranker` is the base (instructions, input checks, sigmoid); :class:`FlagReranker`
is the cross-encoder (bge-reranker-base/large/v2-m3), with FlagEmbedding's name,
arguments and token layout: the query is cut to ``query_max_length`` on its own first,
then the passage fills what is left of ``max_length``.
"""

from __future__ import annotations

import importlib
import json
import logging
import sys
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from .. import hub, registry
from ..errors import InputError
from ..runtime import first_tokens, lean_encoder
from ..runtime import packed as packing
from .adapters import adapter_folder, check_adapter_backend, merge_lora, tokenizer_folder
from .base import ModelHost, load_module
from .embedder import Embedder, unescape_format
from .flag_pool import RerankerPoolMethods
from .inputs import as_pair_list
from .onnx_backend import RowsForward, check_backend, load_onnx_module, refuse_backend
from .scoring import RankMethods, non_finite_rows, sigmoid, warn_non_finite
from .tokenization import TextTokenizer, Tokenized, load_hf_tokenizer

logger = logging.getLogger(__name__)


class Reranker(RankMethods, RerankerPoolMethods):
    """Base class of bgekit's rerankers. Build one with :meth:`from_pretrained`.

    Example:
        >>> from bgekit import Reranker
        >>> reranker = Reranker.from_pretrained("BAAI/bge-reranker-base")          # doctest: +SKIP
        >>> reranker.compute_score([("what is panda?", "The giant panda is a bear.")])  # doctest: +SKIP
        [...]  # one float per pair
    """

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
        use_bf16: bool = False,
        **kwargs: Any,
    ):
        self.model_name_or_path = hub.model_name(model_name_or_path)  # as the CLI and every class name it
        self.use_fp16, self.use_bf16 = use_fp16, use_bf16
        self.query_instruction_for_rerank = query_instruction_for_rerank
        self.query_instruction_format = unescape_format(query_instruction_format, what="query_instruction_format")
        self.passage_instruction_for_rerank = passage_instruction_for_rerank
        self.passage_instruction_format = unescape_format(passage_instruction_format, what="passage_instruction_format")
        self.batch_size = batch_size
        self.query_max_length = query_max_length
        self.max_length = max_length
        self.normalize = normalize
        refuse_backend(type(self).__name__, kwargs.pop("backend", None))  # FlagReranker takes it by name
        if kwargs:
            warnings.warn(f"{type(self).__name__} ignores unknown options: {sorted(kwargs)}", stacklevel=3)
        self.kwargs = kwargs

    @classmethod
    def from_pretrained(cls, model_name_or_path: str, model_class: str | None = None, **options: Any) -> Reranker:
        """Load any reranker by hub id or folder; the family comes from the registry or the folder.

        A folder bgekit's reranker training wrote scores with the instructions and prompt it trained with
        (its ``bgekit.json``) unless you pass others; a LoRA adapter folder (``OUT/adapter``) loads its base
        with the adapter merged, as the reranker it trained as.
        """
        name, spec = hub.resolve(model_name_or_path, registry.RERANKERS, model_class, for_reranker=True)
        adapter = None if options.get("peft_path") or spec.kind == registry.BI_ENCODER else hub.lora_adapter(name)
        if adapter is not None:  # the embedder of a bi-encoder loads an adapter folder itself
            base, folder = adapter
            name, _ = hub.resolve_adapter_base(base, folder, registry.RERANKERS, spec.kind, for_reranker=True)
            options = {**options, "peft_path": str(folder)}
        if spec.trust_remote_code:
            options.setdefault("trust_remote_code", True)
        kind = spec.kind
        if kind == registry.BI_ENCODER and model_class is None and _classifier_adapter(options.get("peft_path")):
            kind = registry.CROSS_ENCODER  # a plain encoder plus a cross-encoder's adapter (and its score head)
        defaults = dict(spec.extra.get("options") or {})  # what its training recorded
        defaults.update({k: v for k, v in options.items() if v is not None})
        return reranker_class(kind)(name, **defaults)

    def detailed_pairs(self, pairs: list[tuple[str, str]]) -> list[tuple[str, str]]:
        """Apply the query and passage instructions, as text, before tokenizing."""
        q_ins, p_ins = self.query_instruction_for_rerank, self.passage_instruction_for_rerank
        return [
            (
                q if q_ins is None else self.query_instruction_format.format(q_ins, q),
                p if p_ins is None else self.passage_instruction_format.format(p_ins, p),
            )
            for q, p in pairs
        ]

    def compute_score(
        self,
        sentence_pairs: tuple[str, str] | Sequence[tuple[str, str]],
        batch_size: int | None = None,
        query_max_length: int | None = None,
        max_length: int | None = None,
        normalize: bool | None = None,
        *,
        show_progress_bar: bool | None = None,
        **kwargs: Any,
    ) -> list[float]:
        """Score pairs; always a list of floats in input order (one pair gives a list of one).

        ``normalize=True`` maps scores through a sigmoid into (0, 1).
        """
        pairs, _ = as_pair_list(sentence_pairs)
        return self._scores(
            self.detailed_pairs(pairs), batch_size, query_max_length, max_length, normalize, show_progress_bar, **kwargs
        )

    def _scores(
        self,
        pairs: list[tuple[str, str]],
        batch_size: int | None = None,
        query_max_length: int | None = None,
        max_length: int | None = None,
        normalize: bool | None = None,
        show_progress_bar: bool | None = None,
        **kwargs: Any,
    ) -> list[float]:
        """:meth:`compute_score` on checked pairs (``as_pair_list``'s), without adding the instructions."""
        unknown = set(kwargs) - set(self.CALL_OPTIONS)
        if unknown:
            raise InputError(f"compute_score() got unexpected options {sorted(unknown)}")
        scores = self._score(
            pairs,
            batch_size=self.batch_size if batch_size is None else batch_size,
            query_max_length=self.query_max_length if query_max_length is None else query_max_length,
            max_length=self.max_length if max_length is None else max_length,
            show_progress_bar=show_progress_bar,
            **kwargs,
        )
        layers = scores if scores and isinstance(scores[0], list) else [scores]
        bad = {i for layer in layers for i in non_finite_rows(np.asarray(layer, dtype=np.float64))}
        warn_non_finite(logger, bad, len(pairs), self.model_name_or_path, "pairs")
        normalize = self.normalize if normalize is None else normalize
        if not normalize:
            return scores
        return [sigmoid(s) for s in scores] if scores and isinstance(scores[0], list) else sigmoid(scores)

    #: extra keyword options a subclass's ``compute_score`` accepts (passed on to ``_score``)
    CALL_OPTIONS: tuple[str, ...] = ()

    def _score(
        self,
        pairs: list[tuple[str, str]],
        batch_size: int,
        query_max_length: int | None,
        max_length: int,
        show_progress_bar: bool | None,
        **options: Any,
    ) -> list[float] | list[list[float]]:
        """Raw scores in input order (one list per cutoff layer for layerwise models)."""
        raise NotImplementedError

    def close(self) -> None:
        """Release worker threads of a multi-device pool (the model stays usable)."""

    def stop_self_pool(self) -> None:
        """FlagEmbedding's name for :meth:`close` (the model keeps its device memory until deleted)."""
        self.close()

    get_detailed_instruct = staticmethod(Embedder.get_detailed_instruct)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.model_name_or_path!r})"


class FlagReranker(Reranker):
    """Cross-encoder reranker (bge-reranker-base / large / v2-m3 and other sequence classifiers).

    ``backend="onnx"`` / ``"onnx-int8"`` runs the forward on ONNX Runtime (CPU only):

        >>> from bgekit import FlagReranker
        >>> FlagReranker("BAAI/bge-reranker-base", devices="cpu", backend="onnx")  # doctest: +SKIP

    ``packed`` lays each batch's pairs end to end instead of padding them (BERT and RoBERTa-family
    classifiers; the default ``None`` packs on CUDA in fp16/bf16, ``True`` forces it, ``False``
    keeps padded batches); the scores are the padded path's within float rounding.

    Their head reads each pair's first token alone, so the last layer computes only that row
    (:mod:`bgekit.runtime.first_tokens`; ``cls_rows_only = False`` runs the whole layer). The ONNX
    backends export that forward too (``cls_rows_only`` is read when the model is loaded).

    ``peft_path`` names a LoRA adapter folder (``bgekit finetune reranker --lora`` writes one in
    ``OUT/adapter``, with the trained score head and the tokenizer), merged into the base at load
    time: ``FlagReranker(BASE, peft_path="OUT/adapter")`` scores as ``FlagReranker("OUT")``.
    """

    #: run the last layer on the first rows only where the model supports it (same scores within rounding)
    cls_rows_only: bool = True

    def __init__(
        self,
        model_name_or_path: str,
        use_fp16: bool = False,
        query_instruction_for_rerank: str | None = None,
        query_instruction_format: str = "{}{}",
        passage_instruction_for_rerank: str | None = None,
        passage_instruction_format: str = "{}{}",
        trust_remote_code: bool = False,
        cache_dir: str | None = None,
        devices: str | int | Sequence[str | int] | None = None,
        batch_size: int = 128,
        query_max_length: int | None = None,
        max_length: int = 512,
        normalize: bool = False,
        backend: str = "torch",
        max_tokens_per_batch: int | None = None,
        packed: bool | None = None,
        peft_path: str | None = None,
        **kwargs: Any,
    ):
        super().__init__(
            model_name_or_path,
            use_fp16=use_fp16,
            query_instruction_for_rerank=query_instruction_for_rerank,
            query_instruction_format=query_instruction_format,
            passage_instruction_for_rerank=passage_instruction_for_rerank,
            passage_instruction_format=passage_instruction_format,
            devices=devices,
            batch_size=batch_size,
            query_max_length=query_max_length,
            max_length=max_length,
            normalize=normalize,
            **kwargs,
        )
        from transformers import AutoModelForSequenceClassification

        folder = hub.model_folder(model_name_or_path, cache_dir=cache_dir)
        self.peft_path = peft_path
        tokens_from = tokenizer_folder(folder, peft_path)
        hf_tokenizer = load_hf_tokenizer(tokens_from, trust_remote_code)
        self.tokenizer = TextTokenizer(hf_tokenizer).pad_right()
        self.backend = check_backend(backend, devices, self.use_bf16)
        check_adapter_backend(peft_path, backend, self.backend)
        if self.backend == "torch":
            # training's head has one label (bgekit finetune loads every base so): a base without a
            # trained head gets that shape too, and the adapter brings the trained head itself
            labels = {"num_labels": 1} if peft_path else {}
            module = load_module(AutoModelForSequenceClassification, folder, trust_remote_code, **labels)
            if peft_path:
                module = merge_lora(module, peft_path, len(hf_tokenizer) if tokens_from != folder else None)
        else:  # ONNX Runtime replaces only the forward (CPU); see bgekit.models.onnx_backend
            module = load_onnx_module(
                AutoModelForSequenceClassification,
                folder,
                trust_remote_code,
                self.backend,
                "logits",
                self.tokenizer.uses_type_ids,
                first_rows=_logits_export if self.cls_rows_only else None,
            )
        if module.config.num_labels != 1:
            raise InputError(
                f"{model_name_or_path} has {module.config.num_labels} output labels; a cross-encoder reranker needs 1"
            )
        self.host = ModelHost(
            module,
            self.tokenizer,
            devices,
            self.use_fp16,
            self.use_bf16,
            max_tokens_per_batch,
            packed=packed,
            packable=type(module).__name__ in FIRST_TOKEN_HEADS,
        )
        self.target_devices = self.host.devices

    @property
    def model(self) -> torch.nn.Module:
        return self.host.module

    def _forward(self, module: torch.nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        if type(module).__name__ in FIRST_TOKEN_HEADS:
            encoder = module.base_model
            if self.cls_rows_only and first_tokens.supports(encoder):
                return _head_logits(module, first_tokens.first_token_states(encoder, inputs)).view(-1)
            if packing.is_packed(inputs):
                hidden = lean_encoder.states(encoder, inputs)
                return _head_logits(module, packing.first_tokens(hidden, inputs)).view(-1)
        return module(**inputs, return_dict=True).logits.view(-1)

    def _score(self, pairs, batch_size, query_max_length, max_length, show_progress_bar):
        max_length = self.host.clamp_length(max_length, self.max_length)
        if query_max_length is None:
            query_max_length = max_length * 3 // 4
        query_max_length = self.host.clamp_length(query_max_length, max_length, "query_max_length")
        # the next chunk is tokenized while this one runs (one chunk, the plain path, for short inputs)
        scores, truncated = self.host.run_texts(
            pairs,
            lambda chunk: self.tokenizer.encode_pairs(
                [q for q, _ in chunk], [p for _, p in chunk], query_max_length, max_length, self._whole_up_to()
            ),
            self._forward,
            batch_size,
            desc="Reranking",
            show_progress_bar=show_progress_bar,
        )
        self.host.log_cut(truncated, len(pairs), max_length, "pairs")
        return scores.tolist()

    def tokenize_pairs(
        self,
        sentence_pairs: tuple[str, str] | Sequence[tuple[str, str]],
        query_max_length: int | None = None,
        max_length: int | None = None,
    ) -> Tokenized:
        """Token ids of the pairs exactly as :meth:`compute_score` feeds them to the model
        (instructions applied, truncated; ``truncated`` counts pairs cut), for callers that run
        the stages themselves; :meth:`score_tokenized` scores them."""
        pairs = self.detailed_pairs(as_pair_list(sentence_pairs)[0])
        max_length = self.host.clamp_length(self.max_length if max_length is None else max_length, self.max_length)
        if query_max_length is None:
            query_max_length = self.query_max_length if self.query_max_length is not None else max_length * 3 // 4
        query_max_length = self.host.clamp_length(query_max_length, max_length, "query_max_length")
        return self.tokenizer.encode_pairs(
            [q for q, _ in pairs], [p for _, p in pairs], query_max_length, max_length, self._whole_up_to()
        )

    def _whole_up_to(self) -> int:
        """Longest pair left whole when its query fills ``max_length`` (FlagEmbedding keeps such a
        pair uncut; :meth:`TextTokenizer.encode_pairs`): the model's positions, where it has a table."""
        return self.host.max_positions if self.host.max_positions is not None else sys.maxsize

    def score_tokenized(self, tokenized: Tokenized, batch_size: int | None = None) -> list[float]:
        """Raw scores (input order) of pairs from :meth:`tokenize_pairs`; :func:`sigmoid` normalizes them."""
        scores = self.host.run(
            tokenized,
            self._forward,
            self.batch_size if batch_size is None else batch_size,
            desc="Reranking",
            show_progress_bar=False,
        )
        return scores.tolist()

    def close(self) -> None:
        self.host.close()


class BiEncoderReranker(Reranker):
    """Reranks with an embedder: the score is the cosine of query and passage vectors.

    Used when ``Reranker.from_pretrained`` (or ``bgekit rerank``) is given an embedding
    model; queries get the model's query instruction, passages its passage rule
    (``query_instruction_for_rerank`` / ``passage_instruction_for_rerank`` replace them).
    """

    def __init__(
        self,
        model_name_or_path: str,
        use_fp16: bool = False,
        devices: str | int | Sequence[str | int] | None = None,
        batch_size: int = 128,
        query_max_length: int | None = None,
        max_length: int = 512,
        normalize: bool = False,
        **embedder_options: Any,
    ):
        super().__init__(
            model_name_or_path,
            use_fp16=use_fp16,
            devices=devices,
            batch_size=batch_size,
            query_max_length=query_max_length,
            max_length=max_length,
            normalize=normalize,
        )
        for rerank_name, embed_name in _BI_ENCODER_INSTRUCTIONS:  # a reranker's instruction is the embedder's
            if embedder_options.get(rerank_name) is not None:
                embedder_options[embed_name] = embedder_options.pop(rerank_name)
            embedder_options.pop(rerank_name, None)
        self.embedder = Embedder.from_pretrained(
            model_name_or_path, use_fp16=use_fp16, devices=devices, normalize_embeddings=True, **embedder_options
        )
        logger.warning(
            "%s is an embedding model: it reranks by the cosine of its query and passage vectors (a "
            "bi-encoder); after a first stage by the same model that gives back the same ranking. A "
            "cross-encoder (e.g. BAAI/bge-reranker-base) is what a second stage usually wants",
            model_name_or_path,
        )

    def _score(self, pairs, batch_size, query_max_length, max_length, show_progress_bar):
        queries = list(dict.fromkeys(q for q, _ in pairs))
        row = {q: i for i, q in enumerate(queries)}
        # the embedder's own limits (e.g. 256 for MiniLM) win over the reranker-style 512 default
        query_limit = min(query_max_length or max_length, self.embedder.query_max_length)
        q_vecs = self.embedder.encode_queries(
            queries, batch_size=batch_size, max_length=query_limit, convert_to_numpy=False
        )
        p_vecs = self.embedder.encode_corpus(
            [p for _, p in pairs],
            batch_size=batch_size,
            max_length=min(max_length, self.embedder.passage_max_length),
            convert_to_numpy=False,
            show_progress_bar=show_progress_bar,
        )
        q_vecs, p_vecs = _dense_of(q_vecs), _dense_of(p_vecs)
        index = torch.tensor([row[q] for q, _ in pairs])
        return (q_vecs[index] * p_vecs).sum(dim=-1).tolist()

    def close(self) -> None:
        self.embedder.close()


def _dense_of(output: Any) -> torch.Tensor:
    """An embedder's dense vectors: the tensor itself, or M3's ``dense_vecs``."""
    return output["dense_vecs"] if isinstance(output, dict) else output


#: reranker instruction option -> the embedder option a bi-encoder reranker gives it to
_BI_ENCODER_INSTRUCTIONS = (
    ("query_instruction_for_rerank", "query_instruction_for_retrieval"),
    ("passage_instruction_for_rerank", "passage_instruction_for_retrieval"),
)

# reranker kind -> (module, class), imported only when a model of that kind is built
RERANKER_CLASSES = {
    registry.CROSS_ENCODER: ("bgekit.models.reranker", "FlagReranker"),
    registry.BI_ENCODER: ("bgekit.models.reranker", "BiEncoderReranker"),
    registry.LLM_RERANKER: ("bgekit.models.llm_reranker", "FlagLLMReranker"),
    registry.LAYERWISE_RERANKER: ("bgekit.models.layerwise_reranker", "LayerWiseFlagLLMReranker"),
    registry.LIGHTWEIGHT_RERANKER: ("bgekit.models.layerwise_reranker", "LightWeightFlagLLMReranker"),
}


#: sequence classifiers whose head reads only the first token: they run packed batches, and their
#: last layer on the first rows alone
FIRST_TOKEN_HEADS = (
    "BertForSequenceClassification",
    "XLMRobertaForSequenceClassification",
    "RobertaForSequenceClassification",
    "CamembertForSequenceClassification",
)


def _head_logits(module: torch.nn.Module, first: torch.Tensor) -> torch.Tensor:
    """A sequence classifier's logits from its encoder's first-token states ``[B, H]`` (all its head reads)."""
    first = first.unsqueeze(1)  # [B, 1, H]: the head takes [:, 0]
    if type(module).__name__ == "BertForSequenceClassification":
        return module.classifier(module.dropout(module.base_model.pooler(first)))
    return module.classifier(first)


def _logits_export(module: torch.nn.Module) -> tuple[str, RowsForward] | None:
    """For the ONNX export: the logits from the first-rows forward, where the model supports it."""
    if type(module).__name__ not in FIRST_TOKEN_HEADS or not first_tokens.supports(module.base_model):
        return None
    return "logits", lambda inputs, key_mask: _head_logits(
        module, first_tokens.first_token_states(module.base_model, inputs, key_mask)
    )


def _classifier_adapter(peft_path: str | None) -> bool:
    """Whether ``peft_path`` is a sequence-classification LoRA adapter (``bgekit finetune reranker --lora``
    over an encoder writes one): its base, a plain encoder, reranks as a cross-encoder then."""
    if not peft_path:
        return False
    config = json.loads((adapter_folder(peft_path) / "adapter_config.json").read_text())
    return config.get("task_type") == "SEQ_CLS"


def reranker_class(kind: str) -> type[Reranker]:
    """The bgekit class that runs a reranker kind."""
    if kind not in RERANKER_CLASSES:
        raise InputError(f"unknown reranker class {kind!r}; use one of {sorted(RERANKER_CLASSES)}")
    module, name = RERANKER_CLASSES[kind]
    return getattr(importlib.import_module(module), name)
