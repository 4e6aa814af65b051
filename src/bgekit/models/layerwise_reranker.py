"""Layerwise and lightweight LLM rerankers: scores read from chosen layers.

:class:`LayerWiseFlagLLMReranker` runs bge-reranker-v2-minicpm-layerwise and
:class:`LightWeightFlagLLMReranker` runs bge-reranker-v2.5-gemma2-lightweight, with
FlagEmbedding's names, arguments, defaults and prompt layout (``[bos] A: q \\n B: p \\n
prompt``, see :mod:`bgekit.models.llm_reranker`). Both architectures are bgekit's own
(:mod:`.arch_minicpm_layerwise`, :mod:`.arch_costwise_gemma2`): FlagEmbedding's bundled
copies no longer run on current transformers.

``cutoff_layers`` picks the layers whose score heads give the scores: one layer (or the
default, the last one) gives a list of floats, several give one list per layer in the order
asked. Unlike FlagEmbedding, which warned and dropped them, a layer the model has no
score head for is an error.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial
from pathlib import Path
from typing import Any

import torch

from ..errors import InputError, ModelNotFoundError
from .flag_pool import RerankerPoolMethods, given
from .llm_reranker import PAD_TO_MULTIPLE_OF, SEPARATOR, FlagLLMReranker
from .tokenization import Tokenized

LIGHTWEIGHT_PROMPT = "Predict whether passage B contains an answer to query A."
# token segments of a lightweight input row, carried as token type ids
QUERY_PART, PASSAGE_PART, PROMPT_PART = 0, 1, 2


def _layer_list(value: Any, what: str) -> tuple[list[int], bool]:
    """``value`` (an int or a sequence of ints) as a list; also whether one int was given."""
    if isinstance(value, bool):
        raise InputError(f"{what} must be an int or a list of ints, got {value!r}")
    if isinstance(value, int):
        return [value], True
    if not isinstance(value, Sequence) or isinstance(value, str):
        raise InputError(f"{what} must be an int or a list of ints, got {value!r}")
    layers = list(value)
    bad = [v for v in layers if isinstance(v, bool) or not isinstance(v, int)]
    if bad:
        raise InputError(f"{what} must hold ints (layer numbers), got {bad!r}")
    return layers, False


def check_cutoff_layers(value: Any, allowed: Sequence[int]) -> list[int]:
    """Validated cutoff layers: an int or a non-empty list of distinct ints, each in ``allowed``."""
    layers, _ = _layer_list(value, "cutoff_layers")
    if not layers:
        raise InputError("cutoff_layers is empty; give at least one layer (or None for the last layer)")
    if len(set(layers)) != len(layers):
        raise InputError(f"cutoff_layers repeats a layer: {layers}")
    missing = [v for v in layers if v not in allowed]
    if missing:
        step = allowed[1] - allowed[0] if len(allowed) > 1 else 1
        span = f"[{allowed[0]}, {allowed[-1]}]" + (f" in steps of {step}" if step != 1 else "")
        raise InputError(f"cutoff_layers {missing} have no score head in this model; use layers in {span}")
    return layers


class LayerWiseFlagLLMReranker(FlagLLMReranker):
    """bge-reranker-v2-minicpm-layerwise: one score head per layer from ``start_layer`` on.

    Example:
        >>> from bgekit import LayerWiseFlagLLMReranker
        >>> reranker = LayerWiseFlagLLMReranker("BAAI/bge-reranker-v2-minicpm-layerwise")  # doctest: +SKIP
        >>> pairs = [("what is panda?", "The giant panda is a bear.")]
        >>> reranker.compute_score(pairs, cutoff_layers=[28])  # doctest: +SKIP
    """

    ALWAYS_BOS = True
    PACKABLE = False
    CALL_OPTIONS = (*FlagLLMReranker.CALL_OPTIONS, "cutoff_layers")

    def compute_score_single_gpu(
        self,
        sentence_pairs,
        batch_size: int | None = None,
        query_max_length: int | None = None,
        max_length: int | None = None,
        cutoff_layers: list[int] | None = None,
        prompt: str | None = None,
        normalize: bool | None = None,
        use_dataloader: bool = False,
        num_workers: int | None = None,
        device: str | None = None,
        **kwargs: Any,
    ):
        """FlagEmbedding's layerwise order (``cutoff_layers`` fifth, then ``prompt``)."""
        options = given(cutoff_layers=cutoff_layers, prompt=prompt, num_workers=num_workers)
        return RerankerPoolMethods.compute_score_single_gpu(
            self, sentence_pairs, batch_size, query_max_length, max_length, normalize, device, **options, **kwargs
        )

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
        cutoff_layers: int | list[int] | None = None,
        prompt: str | None = None,
        batch_size: int = 128,
        query_max_length: int | None = None,
        max_length: int = 512,
        normalize: bool = False,
        **kwargs: Any,
    ):
        # FlagEmbedding: "due to model constraints" fp16 is used when neither fp16 nor bf16 is
        # asked for; on the CPU everything still runs in float32
        super().__init__(
            model_name_or_path,
            peft_path=peft_path,
            use_fp16=use_fp16 or not use_bf16,
            use_bf16=use_bf16,
            query_instruction_for_rerank=query_instruction_for_rerank,
            query_instruction_format=query_instruction_format,
            passage_instruction_for_rerank=passage_instruction_for_rerank,
            passage_instruction_format=passage_instruction_format,
            cache_dir=cache_dir,
            trust_remote_code=trust_remote_code,
            devices=devices,
            prompt=prompt,
            batch_size=batch_size,
            query_max_length=query_max_length,
            max_length=max_length,
            normalize=normalize,
            **kwargs,
        )
        self.cutoff_layers = cutoff_layers
        if cutoff_layers is not None:
            self._cutoffs(cutoff_layers)  # fail at construction, not at the first call

    def _load_module(self, folder: Path, trust_remote_code: bool) -> torch.nn.Module:
        from .arch_minicpm_layerwise import LayerWiseMiniCPMReranker

        _expect_model_type(folder, "minicpm", "LayerWiseFlagLLMReranker")
        return LayerWiseMiniCPMReranker.from_folder(folder)

    def _cutoffs(self, value: Any) -> list[int]:
        config = self.model.config
        allowed = list(range(config.start_layer, config.num_hidden_layers + 1))
        return check_cutoff_layers(config.num_hidden_layers if value is None else value, allowed)

    @staticmethod
    def _forward_layers(module: torch.nn.Module, inputs: dict[str, torch.Tensor], cutoffs: list[int]) -> torch.Tensor:
        return module(inputs["input_ids"], inputs["attention_mask"], cutoff_layers=cutoffs)

    def _score(self, pairs, batch_size, query_max_length, max_length, show_progress_bar, **options):
        requested = options.get("cutoff_layers")
        cutoffs = self._cutoffs(self.cutoff_layers if requested is None else requested)
        query_max_length, max_length = self._lengths(query_max_length, max_length)
        tokenized, _ = self.pair_inputs(pairs, query_max_length, max_length, self._prompt(options))
        self.host.log_truncation(tokenized, max_length, "pairs")
        scores = self.host.run(
            tokenized,
            partial(self._forward_layers, cutoffs=cutoffs),
            batch_size,
            desc="Reranking",
            pad_to_multiple_of=PAD_TO_MULTIPLE_OF,
            show_progress_bar=show_progress_bar,
        )
        return _per_layer(scores)


class LightWeightFlagLLMReranker(FlagLLMReranker):
    """bge-reranker-v2.5-gemma2-lightweight: layer choice plus passage token compression.

    ``compress_ratio`` > 1 averages the passage tokens in runs of that many before each of
    ``compress_layers``; ``compress_ratio=1`` (the default) compresses nothing.

    Example:
        >>> from bgekit import LightWeightFlagLLMReranker
        >>> reranker = LightWeightFlagLLMReranker("BAAI/bge-reranker-v2.5-gemma2-lightweight")  # doctest: +SKIP
        >>> reranker.compute_score(
        ...     [("what is panda?", "The giant panda is a bear.")],
        ...     cutoff_layers=[28], compress_ratio=2, compress_layers=[24, 40],
        ... )  # doctest: +SKIP
    """

    ALWAYS_BOS = True
    PACKABLE = False
    CALL_OPTIONS = ("prompt", "cutoff_layers", "compress_layers", "compress_layer", "compress_ratio")

    def compute_score_single_gpu(
        self,
        sentence_pairs,
        batch_size: int | None = None,
        query_max_length: int | None = None,
        max_length: int | None = None,
        cutoff_layers: list[int] | None = None,
        compress_layer: list[int] | None = None,
        compress_layers: list[int] | None = None,
        compress_ratio: int | None = None,
        prompt: str | None = None,
        normalize: bool | None = None,
        device: str | None = None,
        **kwargs: Any,
    ):
        """FlagEmbedding's lightweight order (layers and compression before ``prompt``)."""
        options = given(
            cutoff_layers=cutoff_layers,
            compress_layer=compress_layer,
            compress_layers=compress_layers,
            compress_ratio=compress_ratio,
            prompt=prompt,
        )
        return RerankerPoolMethods.compute_score_single_gpu(
            self, sentence_pairs, batch_size, query_max_length, max_length, normalize, device, **options, **kwargs
        )

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
        cutoff_layers: int | list[int] | None = None,
        compress_layers: int | Sequence[int] = (8,),
        compress_ratio: int = 1,
        prompt: str | None = None,
        batch_size: int = 128,
        query_max_length: int | None = None,
        max_length: int = 512,
        normalize: bool = False,
        **kwargs: Any,
    ):
        super().__init__(
            model_name_or_path,
            peft_path=peft_path,
            use_fp16=use_fp16,
            use_bf16=use_bf16,
            query_instruction_for_rerank=query_instruction_for_rerank,
            query_instruction_format=query_instruction_format,
            passage_instruction_for_rerank=passage_instruction_for_rerank,
            passage_instruction_format=passage_instruction_format,
            cache_dir=cache_dir,
            trust_remote_code=trust_remote_code,
            devices=devices,
            prompt=prompt,
            batch_size=batch_size,
            query_max_length=query_max_length,
            max_length=max_length,
            normalize=normalize,
            **kwargs,
        )
        # token compression needs right padding (real tokens first); FlagEmbedding forces it too
        self.tokenizer.hf.padding_side = "right"
        self.tokenizer.padding_side = "right"
        self.cutoff_layers = cutoff_layers
        self.compress_layers = compress_layers
        self.compress_ratio = compress_ratio
        # fail at construction, not at the first call (the default layer is checked when used, as there)
        self._settings(cutoff_layers, compress_layers, compress_ratio, check_default=False)

    def _load_module(self, folder: Path, trust_remote_code: bool) -> torch.nn.Module:
        from .arch_costwise_gemma2 import CostWiseGemmaReranker

        _expect_model_type(folder, "cost_wise_gemma", "LightWeightFlagLLMReranker")
        return CostWiseGemmaReranker.from_folder(folder)

    def _settings(
        self, cutoff_layers: Any, compress_layers: Any, compress_ratio: Any, check_default: bool = True
    ) -> tuple[list[int], list[int], int]:
        """Validated ``(cutoffs, compress_layers, compress_ratio)``."""
        module = self.model
        n_layers = module.config.num_hidden_layers
        cutoffs = [n_layers] if cutoff_layers is None else cutoff_layers
        if cutoff_layers is not None or check_default:
            cutoffs = check_cutoff_layers(cutoffs, module.head_layers)
        if isinstance(compress_ratio, bool) or not isinstance(compress_ratio, int) or compress_ratio < 1:
            raise InputError(f"compress_ratio must be an int >= 1 (1: no compression), got {compress_ratio!r}")
        layers, _ = _layer_list(compress_layers, "compress_layers")
        if compress_ratio == 1:
            return cutoffs, [], 1  # nothing is compressed, so the layers do not matter (FlagEmbedding's default [8])
        outside = [v for v in layers if not 1 <= v < n_layers]
        if outside:
            raise InputError(
                f"compress_layers {outside} are outside this model: a passage can be compressed before layers "
                f"1 to {n_layers - 1} (a compress layer k acts after the first k layers)"
            )
        return cutoffs, layers, compress_ratio

    def pair_inputs(
        self, pairs: list[tuple[str, str]], query_max_length: int, max_length: int, prompt: str | None
    ) -> tuple[Tokenized, int]:
        """FlagEmbedding's layout with the lightweight prompt; type ids mark query / passage / prompt parts.

        The query part is ``bos + query + sep`` and the prompt part ``sep + prompt``, as
        FlagEmbedding counts them for token compression.
        """
        tokenized, tail = super().pair_inputs(
            pairs, query_max_length, max_length, LIGHTWEIGHT_PROMPT if prompt is None else prompt
        )
        queries, _ = self.tokenizer.plain_ids([q for q, _ in pairs], query_max_length)
        (sep,), _ = self.tokenizer.plain_ids([SEPARATOR])
        bos = int(self.tokenizer.hf.bos_token_id is not None)
        type_ids = []
        for ids, query in zip(tokenized.ids, queries, strict=True):
            head = min(bos + len(query) + len(sep), len(ids) - tail)
            body = len(ids) - tail - head
            type_ids.append([QUERY_PART] * head + [PASSAGE_PART] * body + [PROMPT_PART] * tail)
        return Tokenized(tokenized.ids, type_ids, tokenized.truncated), tail

    @staticmethod
    def _forward_layers(
        module: torch.nn.Module,
        inputs: dict[str, torch.Tensor],
        cutoffs: list[int],
        compress_layers: list[int],
        compress_ratio: int,
    ) -> torch.Tensor:
        mask, parts = inputs["attention_mask"], inputs["token_type_ids"]
        real = mask.bool()
        return module(
            inputs["input_ids"],
            mask,
            cutoff_layers=cutoffs,
            compress_layers=compress_layers,
            compress_ratio=compress_ratio,
            query_lengths=((parts == QUERY_PART) & real).sum(dim=1),
            prompt_lengths=((parts == PROMPT_PART) & real).sum(dim=1),
        )

    def _score(self, pairs, batch_size, query_max_length, max_length, show_progress_bar, **options):
        if options.get("compress_layer") is not None:  # FlagEmbedding's deprecated spelling wins, as there
            options["compress_layers"] = options["compress_layer"]
        cutoffs, compress_layers, compress_ratio = self._settings(
            *(self._option(options, name) for name in ("cutoff_layers", "compress_layers", "compress_ratio"))
        )
        query_max_length, max_length = self._lengths(query_max_length, max_length)
        tokenized, _ = self.pair_inputs(pairs, query_max_length, max_length, self._prompt(options))
        self.host.log_truncation(tokenized, max_length, "pairs")
        forward = partial(
            self._forward_layers, cutoffs=cutoffs, compress_layers=compress_layers, compress_ratio=compress_ratio
        )
        scores = self.host.run(
            tokenized,
            forward,
            batch_size,
            desc="Reranking",
            pad_to_multiple_of=PAD_TO_MULTIPLE_OF,
            show_progress_bar=show_progress_bar,
        )
        return _per_layer(scores)

    def _option(self, options: dict[str, Any], name: str) -> Any:
        value = options.get(name)
        return getattr(self, name) if value is None else value


def _per_layer(scores: torch.Tensor) -> list[float] | list[list[float]]:
    """(pairs, layers) scores -> one list per layer; a plain list for one layer."""
    per_layer = scores.T.tolist()
    return per_layer[0] if len(per_layer) == 1 else per_layer


def _expect_model_type(folder: Path, model_type: str, cls: str) -> None:
    import json

    try:
        found = json.loads((Path(folder) / "config.json").read_text(encoding="utf-8")).get("model_type")
    except (OSError, ValueError) as exc:
        raise ModelNotFoundError(f"could not read {folder / 'config.json'}: {exc}") from exc
    if found != model_type:
        raise ModelNotFoundError(
            f"{cls} runs models of type {model_type!r}, but {folder} holds a {found!r} model; "
            "use Reranker.from_pretrained to pick the right class"
        )
