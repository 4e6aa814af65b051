"""LLM reranker fine-tuning (bge-reranker-v2-gemma style): the score of a pair is the "Yes"
logit at the last position of a causal LM, trained with cross-entropy over each group
(1 positive + negatives), on transformers' Trainer.

Pairs are built by the very function :class:`bgekit.FlagLLMReranker` scores with
(:func:`bgekit.models.llm_reranker.llm_pair_inputs`: ``A: query``, ``B: passage``, the
prompt, FlagEmbedding's truncation and padding to a multiple of 8), so the saved model is
asked at inference exactly what it was trained on. With ``use_lora`` the folder layout is
:mod:`bgekit.train.lora`'s (``OUT`` merged, ``OUT/adapter``); without it ``OUT`` is the
fully fine-tuned causal LM. Either way ``Reranker.from_pretrained(OUT)`` loads a
:class:`~bgekit.FlagLLMReranker`.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

from .. import registry
from ..models.llm_reranker import PAD_TO_MULTIPLE_OF, llm_pair_inputs, yes_logits, yes_token_id
from ..models.tokenization import TextTokenizer, load_hf_tokenizer
from . import lora, losses
from .data import Group, GroupSampler, TrainRecord, with_teacher_scores
from .reranker import write_reranker_metadata
from .trainer import (
    BgekitTrainer,
    EpochCallback,
    GroupDataset,
    ThroughputCallback,
    load_pretrained,
    resolve_resume,
    training_tokenizer,
)

if TYPE_CHECKING:
    from .reranker import RerankerOptions

QUERY_INSTRUCTION = "A: "  # FlagLLMReranker's defaults
PASSAGE_INSTRUCTION = "B: "


class LLMRerankerCollator:
    """Groups -> one padded batch of prompts, laid out as FlagLLMReranker lays them out."""

    def __init__(self, tokenizer: TextTokenizer, options: RerankerOptions):
        self.tokenizer = tokenizer
        self.options = options
        q_ins, p_ins = options.query_instruction_for_rerank, options.passage_instruction_for_rerank
        self.query_instruction = QUERY_INSTRUCTION if q_ins is None else q_ins
        self.passage_instruction = PASSAGE_INSTRUCTION if p_ins is None else p_ins

    def pairs(self, groups: list[Group]) -> list[tuple[str, str]]:
        """``(instructed query, instructed passage)`` for every passage of every group, in order."""
        return [(self.query_instruction + g.query, self.passage_instruction + p) for g in groups for p in g.passages]

    def __call__(self, groups: list[Group]) -> dict:
        opts = self.options

        def tokenize(pairs: list[tuple[str, str]], prompt: str | None) -> list[list[int]]:
            return llm_pair_inputs(self.tokenizer, pairs, opts.query_max_len, opts.max_len, prompt)[0].ids

        ids = ids_by_prompt(self.pairs(groups), pair_prompts(groups, opts.prompt), tokenize)
        batch = {"pairs": self.tokenizer.collate(ids, None, PAD_TO_MULTIPLE_OF)}
        return with_teacher_scores(batch, groups)


def pair_prompts(groups: list[Group], default: str | None) -> list[str | None]:
    """Each pair's task prompt: its record's ``prompt`` field, else ``default`` (FlagEmbedding's LLM
    reranker data reads ``prompt`` so; for embedders the field is a query instruction)."""
    return [g.prompt or default for g in groups for _ in g.passages]


def ids_by_prompt(
    pairs: list[tuple[str, str]],
    prompts: list[str | None],
    tokenize: Callable[[list[tuple[str, str]], str | None], list[list[int]]],
) -> list[list[int]]:
    """Token ids of every pair, tokenized in one call per distinct prompt; in pair order."""
    ids: list[list[int]] = [[] for _ in pairs]
    for prompt in dict.fromkeys(prompts):
        rows = [i for i, p in enumerate(prompts) if p == prompt]
        for row, row_ids in zip(rows, tokenize([pairs[i] for i in rows], prompt), strict=True):
            ids[row] = row_ids
    return ids


class LLMRerankerTrainer(BgekitTrainer):
    """The Trainer with group cross-entropy over "Yes" logits in ``compute_loss``."""

    def __init__(self, *args, group_size: int, yes_loc: int, **kwargs):
        super().__init__(*args, **kwargs)
        self.group_size = group_size
        self.yes_loc = yes_loc

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        self.count_tokens(inputs["pairs"])
        scores = yes_logits(model, inputs["pairs"], self.yes_loc).float()
        loss = losses.reranker_loss(scores, self.group_size, inputs.get("teacher_scores"))
        return (loss, {"scores": scores}) if return_outputs else loss


def finetune_llm_reranker(options: RerankerOptions, records: list[TrainRecord], folder: Path) -> Path:
    """Fine-tune a decoder-only reranker (optionally with LoRA) and save it in ``options.output_dir``.

    ``bgekit.train.reranker.finetune_reranker`` calls this for causal-LM folders (or
    ``model_class="decoder-only-base"``).

    Example:
        >>> from bgekit.train.reranker import RerankerOptions, finetune_reranker
        >>> finetune_reranker(RerankerOptions(output_dir="OUT", model_name_or_path="google/gemma-2b",  # doctest: +SKIP
        ...     train_data=["train.jsonl"], use_lora=True))
        >>> from bgekit import Reranker
        >>> Reranker.from_pretrained("OUT").compute_score([("what is a panda?", "A bear.")])  # doctest: +SKIP
    """
    resume = resolve_resume(options.resume_from_checkpoint, options.output_dir, options.overwrite_output_dir)
    from transformers import AutoModelForCausalLM

    options.check_lora()
    hf_tokenizer = load_hf_tokenizer(lora.tokenizer_folder(folder, options))
    model = load_pretrained(AutoModelForCausalLM, folder, options, dtype=options.base_dtype(options.bf16))
    model, changed = lora.prepare_base(model, options)  # raw_peft adapters merged; saved embeddings loaded
    use_cache, model.config.use_cache = model.config.use_cache, False  # no key/value cache while training
    resized = changed | lora.add_special_tokens(
        hf_tokenizer, model, options.additional_special_tokens, from_adapter=bool(options.from_peft or options.raw_peft)
    )
    tokenizer = training_tokenizer(hf_tokenizer)
    yes_loc = yes_token_id(tokenizer, options.model_name_or_path)
    if options.use_lora:
        model = lora.wrap(model, options, gradient_checkpointing=options.gradient_checkpointing)
    dataset = GroupDataset(GroupSampler.from_options(records, options))
    throughput = ThroughputCallback()
    trainer = LLMRerankerTrainer(
        model=model,
        args=options.training_arguments(),
        train_dataset=dataset,
        data_collator=LLMRerankerCollator(tokenizer, options),
        processing_class=hf_tokenizer,
        callbacks=[EpochCallback(dataset), throughput],
        text_tokenizer=tokenizer,
        throughput=throughput,
        group_size=options.train_group_size,
        yes_loc=yes_loc,
    )
    trainer.train(resume_from_checkpoint=resume)
    output = Path(options.output_dir)
    trainer.model.config.use_cache = use_cache  # the saved config as it came
    describe = partial(write_reranker_metadata, kind=registry.LLM_RERANKER, options=options)
    return lora.save_trained(
        trainer, hf_tokenizer, output, options, resized=resized, write_extra=describe, describe_adapter=describe
    )
