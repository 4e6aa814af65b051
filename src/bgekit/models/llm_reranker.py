"""LLM rerankers (bge-reranker-v2-gemma and friends): the score is the logit of "Yes".

The prompt layout is FlagEmbedding's, token for token: ``[bos] + ids("A: " + query) +
ids("\\n") + ids("B: " + passage)``, each piece tokenized on its own, the query cut to
``query_max_length``, the passage to ``max_length``, the pair cut (passage side) to
``max_length + len(sep) + len(prompt)``, and then ``sep + prompt`` appended. Batches are
padded to a multiple of 8 on the tokenizer's side.

The model is transformers' own ``AutoModelForCausalLM``; an optional LoRA adapter folder
(``peft_path``) is merged into it at load time (needs the ``lora`` extra: peft).
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from .. import hub
from ..errors import InputError, ModelNotFoundError
from ..runtime import packed as packing
from .adapters import merge_lora, tokenizer_folder
from .base import ModelHost, load_module
from .flag_pool import given
from .inputs import as_pair_list
from .pooling import last_positions
from .reranker import Reranker
from .tokenization import TextTokenizer, Tokenized, load_hf_tokenizer

DEFAULT_PROMPT = (
    "Given a query A and a passage B, determine whether the passage contains an answer to the query by "
    "providing a prediction of either 'Yes' or 'No'."
)
SEPARATOR = "\n"
PAD_TO_MULTIPLE_OF = 8


def yes_token_id(tokenizer: TextTokenizer, name: str) -> int:
    """Id of the first token of "Yes": the logit that scores a pair."""
    yes = tokenizer.plain_ids(["Yes"])[0][0]
    if not yes:
        raise ModelNotFoundError(f"the tokenizer of {name} has no token for 'Yes'")
    return yes[0]


def yes_logits(module: torch.nn.Module, inputs: dict[str, torch.Tensor], yes_loc: int) -> torch.Tensor:
    """The "Yes" logit at each row's last real token (left or right padding). Inference and
    training (:mod:`bgekit.train.llm_reranker`) both score pairs here."""
    if packing.is_packed(inputs):  # packed rows: the language-model head only at each pair's last token
        last = inputs["cu_seq_lens_q"][1:].long() - 1
        logits = module(**packing.model_inputs(inputs), logits_to_keep=last, return_dict=True).logits[0]
        return logits[:, yes_loc]
    # the head runs only at the positions where some row ends: one for left padding, K distinct lengths
    # for right padding (training pads right), [B, K, vocab] instead of every position's [B, L, vocab]
    # (a Gemma's 256,000-word vocabulary makes that gigabytes, kept for training's backward pass)
    positions, column = torch.unique(last_positions(inputs["attention_mask"]), return_inverse=True)
    logits = module(**inputs, logits_to_keep=positions, return_dict=True).logits
    return logits[torch.arange(len(column), device=column.device), column, yes_loc]


def llm_pair_inputs(
    tokenizer: TextTokenizer,
    pairs: list[tuple[str, str]],
    query_max_length: int,
    max_length: int,
    prompt: str | None,
    always_bos: bool = False,
    whole_up_to: int | None = None,
) -> tuple[Tokenized, int]:
    """Token ids of every ``(query, passage)`` pair (instructions already applied) in
    FlagEmbedding's layout; also ``len(sep + prompt)``. Inference and training share it.

    The pair ``bos + query`` / ``sep + passage`` is cut on the passage side (the tokenizer's
    ``truncation_side``) to ``max_length + len(sep + prompt)``. When ``bos + query`` alone fills
    that, ``whole_up_to=None`` drops the whole passage side; an int is FlagEmbedding 1.4.2's
    inference rule (``prepare_for_model(..., truncation="only_second")`` cuts nothing then): the
    pair stays whole while the row has at most ``whole_up_to`` tokens, and is cut to that beyond.
    """
    if prompt is not None and not isinstance(prompt, str):
        raise InputError(f"prompt must be a string, got {type(prompt).__name__}")
    queries, cut_q = tokenizer.plain_ids([q for q, _ in pairs], query_max_length)
    passages, cut_p = tokenizer.plain_ids([p for _, p in pairs], max_length)
    (sep,), _ = tokenizer.plain_ids([SEPARATOR])
    (prompt_ids,), _ = tokenizer.plain_ids([DEFAULT_PROMPT if prompt is None else prompt])
    hf = tokenizer.hf
    bos = hf.bos_token_id
    prefix = [bos] if bos is not None and (always_bos or bos != hf.pad_token_id) else []
    pair_limit = max_length + len(sep) + len(prompt_ids)
    tail = sep + prompt_ids
    keep_tail = tokenizer.truncation_side == "left"
    ids, cut_pair = [], 0
    for query, passage in zip(queries, passages, strict=True):
        first, second = prefix + query, sep + passage
        over = len(first) + len(second) - pair_limit
        if 0 < over < len(second) or (over > 0 and whole_up_to is None):
            room = max(len(second) - over, 0)
        elif over > 0 and len(first) + len(second) + len(tail) > whole_up_to:
            # FlagEmbedding would leave this pair whole (its query fills the budget), but it is
            # longer than the model's positions: the passage side gives way, then the query
            room = max(whole_up_to - len(first) - len(tail), 0)
            first = first[: max(whole_up_to - len(tail), 0)]
        else:
            room = len(second)
        if room < len(second):
            cut_pair += 1
            second = second[len(second) - room :] if keep_tail else second[:room]
        ids.append(first + second + tail)
    return Tokenized(ids, None, max(cut_q, cut_p, cut_pair)), len(tail)


class FlagLLMReranker(Reranker):
    """Decoder-only reranker scored by the "Yes" logit at the last position.

    ``packed`` (default ``None``: on CUDA in fp16/bf16 for Gemma / Mistral / Llama / Qwen bases)
    lays each batch's pairs end to end instead of padding them, and runs the language-model head
    on each pair's last token only; ``False`` keeps padded batches.

    Example:
        >>> from bgekit import FlagLLMReranker
        >>> reranker = FlagLLMReranker("BAAI/bge-reranker-v2-gemma", use_bf16=True)  # doctest: +SKIP
        >>> reranker.compute_score([("what is panda?", "The giant panda is a bear.")])  # doctest: +SKIP
    """

    CALL_OPTIONS = ("prompt", "use_dataloader", "num_workers")

    def compute_score_single_gpu(
        self,
        sentence_pairs,
        batch_size: int | None = None,
        query_max_length: int | None = None,
        max_length: int | None = None,
        prompt: str | None = None,
        normalize: bool | None = None,
        use_dataloader: bool = False,
        num_workers: int | None = None,
        device: str | None = None,
        **kwargs: Any,
    ):
        """FlagEmbedding's LLM-reranker order (``prompt`` fifth): the pairs as they are, on one device."""
        options = given(prompt=prompt, num_workers=num_workers)
        return super().compute_score_single_gpu(
            sentence_pairs, batch_size, query_max_length, max_length, normalize, device, **options, **kwargs
        )

    #: layerwise and lightweight models always start with bos; the base model only if bos != pad
    ALWAYS_BOS = False
    #: whether batches can be packed (:mod:`bgekit.runtime.packed`); not for the layerwise and
    #: lightweight models, whose own forwards read per-layer states of padded batches
    PACKABLE = True

    def __init__(
        self,
        model_name_or_path: str,
        peft_path: str | None = None,
        use_fp16: bool = False,
        use_bf16: bool = False,
        query_instruction_for_rerank: str = "A: ",
        query_instruction_format: str = "{}{}",
        passage_instruction_for_rerank: str = "B: ",
        passage_instruction_format: str = "{}{}",
        cache_dir: str | None = None,
        trust_remote_code: bool = False,
        devices: str | int | Sequence[str | int] | None = None,
        prompt: str | None = None,
        batch_size: int = 128,
        query_max_length: int | None = None,
        max_length: int = 512,
        normalize: bool = False,
        packed: bool | None = None,
        **kwargs: Any,
    ):
        super().__init__(
            model_name_or_path,
            use_fp16=use_fp16,
            use_bf16=use_bf16,
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
        self.prompt = prompt
        folder = hub.model_folder(model_name_or_path, cache_dir=cache_dir)
        tokens_from = tokenizer_folder(folder, peft_path)
        hf_tokenizer = load_hf_tokenizer(tokens_from, trust_remote_code)
        self.tokenizer = TextTokenizer(hf_tokenizer)
        module = self._load_module(folder, trust_remote_code)
        if peft_path:
            module = merge_lora(module, peft_path, len(hf_tokenizer) if tokens_from != folder else None)
        self.yes_loc = yes_token_id(self.tokenizer, model_name_or_path)
        self.host = ModelHost(
            module, self.tokenizer, devices, self.use_fp16, self.use_bf16, packed=packed, packable=self.PACKABLE
        )
        self.target_devices = self.host.devices

    def _load_module(self, folder: Path, trust_remote_code: bool) -> torch.nn.Module:
        from transformers import AutoModelForCausalLM

        return load_module(AutoModelForCausalLM, folder, trust_remote_code)

    @property
    def model(self) -> torch.nn.Module:
        return self.host.module

    # -- prompt layout ----------------------------------------------------------------------
    def pair_inputs(
        self, pairs: list[tuple[str, str]], query_max_length: int, max_length: int, prompt: str | None
    ) -> tuple[Tokenized, int]:
        """Token ids of every pair in FlagEmbedding's layout (:func:`llm_pair_inputs`); also ``len(sep + prompt)``."""
        positions = self.host.max_positions if self.host.max_positions is not None else sys.maxsize
        return llm_pair_inputs(
            self.tokenizer, pairs, query_max_length, max_length, prompt, self.ALWAYS_BOS, whole_up_to=positions
        )

    def _lengths(self, query_max_length: int | None, max_length: int) -> tuple[int, int]:
        max_length = self.host.clamp_length(max_length, self.max_length)
        if query_max_length is None:
            query_max_length = max_length * 3 // 4
        return self.host.clamp_length(query_max_length, max_length, "query_max_length"), max_length

    def _prompt(self, options: dict[str, Any]) -> str | None:
        """The call's ``prompt``, or the constructor's when the call gives none (``None`` included, as
        FlagEmbedding's ``if prompt is None: prompt = self.prompt``)."""
        prompt = options.get("prompt")
        return self.prompt if prompt is None else prompt

    # -- scoring ----------------------------------------------------------------------------
    def _forward(self, module: torch.nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        return yes_logits(module, inputs, self.yes_loc)

    def _score(self, pairs, batch_size, query_max_length, max_length, show_progress_bar, **options):
        query_max_length, max_length = self._lengths(query_max_length, max_length)
        tokenized, _ = self.pair_inputs(pairs, query_max_length, max_length, self._prompt(options))
        self.host.log_truncation(tokenized, max_length, "pairs")
        scores = self.host.run(
            tokenized,
            self._forward,
            batch_size,
            desc="Reranking",
            pad_to_multiple_of=PAD_TO_MULTIPLE_OF,
            show_progress_bar=show_progress_bar,
        )
        return scores.tolist()

    def tokenize_pairs(
        self,
        sentence_pairs: tuple[str, str] | Sequence[tuple[str, str]],
        query_max_length: int | None = None,
        max_length: int | None = None,
        prompt: str | None = None,
    ) -> Tokenized:
        """Token ids of the pairs exactly as :meth:`compute_score` lays them out (instructions,
        truncation, prompt), for callers that run the stages themselves."""
        pairs = self.detailed_pairs(as_pair_list(sentence_pairs)[0])
        query_max_length, max_length = self._lengths(
            self.query_max_length if query_max_length is None else query_max_length,
            self.max_length if max_length is None else max_length,
        )
        return self.pair_inputs(pairs, query_max_length, max_length, self.prompt if prompt is None else prompt)[0]

    def score_tokenized(self, tokenized: Tokenized, batch_size: int | None = None) -> list[float]:
        """Raw "Yes" logits (input order) of pairs from :meth:`tokenize_pairs`. Subclasses with
        their own forward (layerwise, lightweight) score through :meth:`compute_score` instead."""
        if type(self)._score is not FlagLLMReranker._score:
            raise NotImplementedError(f"{type(self).__name__} has its own forward; score with compute_score")
        scores = self.host.run(
            tokenized,
            self._forward,
            self.batch_size if batch_size is None else batch_size,
            desc="Reranking",
            pad_to_multiple_of=PAD_TO_MULTIPLE_OF,
            show_progress_bar=False,
        )
        return scores.tolist()

    def close(self) -> None:
        self.host.close()
