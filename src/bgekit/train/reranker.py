"""Cross-encoder reranker fine-tuning: each query with 1 positive and ``train_group_size - 1``
negatives, cross-entropy over the group, on transformers' Trainer.

Pairs are tokenized exactly as :class:`bgekit.FlagReranker` tokenizes them at inference
(query cut to ``query_max_len`` first, then the passage fills ``max_len``), and the saved
folder is a sequence-classification model that ``Reranker.from_pretrained`` loads.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import torch

from .. import hub, registry
from ..errors import InputError
from ..models.tokenization import TextTokenizer, load_hf_tokenizer
from . import lora, losses
from .data import Group, GroupSampler, with_teacher_scores
from .trainer import (
    BgekitTrainer,
    DataOptions,
    EpochCallback,
    GroupDataset,
    ThroughputCallback,
    TrainOptions,
    fit_lengths,
    load_pretrained,
    resolve_resume,
    training_records,
)


@dataclass
class RerankerOptions(TrainOptions, DataOptions, lora.LoraOptions):
    """What to train and how; see ``bgekit finetune reranker --help``."""

    model_name_or_path: str = ""
    train_data: list[str] = field(default_factory=list)
    query_max_len: int = 64
    max_len: int = 320
    learning_rate: float = 3e-5
    resume_from_checkpoint: str | None = None
    model_class: str | None = None  # the model's family, overriding the registry (e.g. decoder-only-layerwise)
    # LLM rerankers (decoder-only-base): None keeps FlagLLMReranker's "A: ", "B: " and default prompt;
    # cross-encoders: None is no instruction, as FlagReranker's; set ones go in OUT's bgekit.json
    query_instruction_for_rerank: str | None = None
    passage_instruction_for_rerank: str | None = None
    prompt: str | None = None
    #: distil from the records' teacher scores: None when they carry them, False never, True (they must)
    knowledge_distillation: bool | None = None


class RerankerCollator:
    def __init__(self, tokenizer: TextTokenizer, options: RerankerOptions):
        self.tokenizer = tokenizer
        self.options = options

    def query_text(self, group: Group) -> str:
        """FlagEmbedding's rule, as :class:`~bgekit.FlagReranker` applies ``query_instruction_for_rerank``:
        a record's ``prompt`` takes the instruction's place, and only when there is one."""
        instruction = self.options.query_instruction_for_rerank
        if instruction is None:
            return group.query
        return (group.prompt if group.prompt is not None else instruction) + group.query

    def passage_text(self, text: str) -> str:
        instruction = self.options.passage_instruction_for_rerank
        return text if instruction is None else instruction + text

    def __call__(self, groups: list[Group]) -> dict:
        queries = [self.query_text(g) for g in groups for _ in g.passages]
        passages = [self.passage_text(p) for g in groups for p in g.passages]
        pairs = self.tokenizer.encode_pairs(queries, passages, self.options.query_max_len, self.options.max_len)
        batch = {"pairs": self.tokenizer.collate(pairs.ids, pairs.type_ids)}
        return with_teacher_scores(batch, groups)


class RerankerTrainer(BgekitTrainer):
    def __init__(self, *args, group_size: int, **kwargs):
        super().__init__(*args, **kwargs)
        self.group_size = group_size

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        self.count_tokens(inputs["pairs"])
        scores = model(**inputs["pairs"], return_dict=True).logits.view(-1).float()
        loss = losses.reranker_loss(scores, self.group_size, inputs.get("teacher_scores"))
        return (loss, {"scores": scores}) if return_outputs else loss


def write_reranker_metadata(folder: Path, kind: str, options: RerankerOptions) -> None:
    """``bgekit.json``: the reranker family and the instructions and prompt it trained with, so
    ``Reranker.from_pretrained`` scores with them by default, for the saved model (``OUT``) and its LoRA
    adapter (``OUT/adapter``, which then loads alone). Settings left at the class's default are not written."""
    settings = {key: getattr(options, key) for key in hub.RERANKER_SETTINGS if getattr(options, key) is not None}
    hub.write_folder_metadata(folder, kind, None, task=hub.RERANK_TASK, **settings)


def finetune_reranker(options: RerankerOptions) -> Path:
    """Fine-tune a cross-encoder reranker and save it in ``options.output_dir``."""
    from transformers import AutoModelForSequenceClassification

    resume = resolve_resume(options.resume_from_checkpoint, options.output_dir, options.overwrite_output_dir)

    records = training_records(options)
    folder = hub.model_folder(options.model_name_or_path)
    kind = options.model_class or hub.describe_folder(folder, registry.RERANKERS, for_reranker=True).kind
    if kind == registry.LAYERWISE_RERANKER:  # a score head per layer
        from .layerwise import finetune_layerwise

        return finetune_layerwise(options, records, folder)
    if kind == registry.LLM_RERANKER:  # the "Yes" logit of a causal LM
        from .llm_reranker import finetune_llm_reranker

        return finetune_llm_reranker(options, records, folder)
    options.check_lora()
    if options.prompt is not None:
        raise InputError("prompt is the question an LLM reranker answers; a cross-encoder has none (leave it out)")
    hf_tokenizer = load_hf_tokenizer(lora.tokenizer_folder(folder, options))
    model = load_pretrained(AutoModelForSequenceClassification, folder, options, num_labels=1, dtype=torch.float32)
    model, changed = lora.prepare_base(model, options)  # raw_peft adapters merged; saved embeddings loaded
    fit_lengths(options, model.config, "query_max_len", "max_len")
    resized = changed | lora.add_special_tokens(
        hf_tokenizer, model, options.additional_special_tokens, from_adapter=bool(options.from_peft or options.raw_peft)
    )
    tokenizer = TextTokenizer(hf_tokenizer)
    if options.use_lora:  # the new score head trains in full (peft's SEQ_CLS task)
        model = lora.wrap(model, options, gradient_checkpointing=options.gradient_checkpointing, task_type="SEQ_CLS")
    sampler = GroupSampler.from_options(records, options)
    dataset = GroupDataset(sampler)
    throughput = ThroughputCallback()
    trainer = RerankerTrainer(
        model=model,
        args=options.training_arguments(),
        train_dataset=dataset,
        data_collator=RerankerCollator(tokenizer, options),
        processing_class=hf_tokenizer,
        callbacks=[EpochCallback(dataset), throughput],
        text_tokenizer=tokenizer,
        throughput=throughput,
        group_size=options.train_group_size,
    )
    trainer.train(resume_from_checkpoint=resume)
    # with LoRA: OUT/adapter and the merged model in OUT (see bgekit.train.lora)
    describe = partial(write_reranker_metadata, kind=registry.CROSS_ENCODER, options=options)
    return lora.save_trained(
        trainer,
        hf_tokenizer,
        options.output_dir,
        options,
        resized=resized,
        write_extra=describe,
        describe_adapter=describe,
    )
