"""Layerwise LLM reranker fine-tuning (bge-reranker-v2-minicpm-layerwise), on transformers' Trainer.

Every cutoff layer's score head is trained at once, as in FlagEmbedding's layerwise recipe:
the loss is the group cross-entropy (1 positive against its negatives) at each cutoff
layer, plus a distillation term per layer: without teacher scores the deepest cutoff
layer teaches the shallower ones (its softmax, detached), with teacher scores the teacher
teaches every layer. Trained layers are ``cutoff_layers`` if given, else every layer from
``start_layer`` (default: the model's ``start_layer``) to the last.

Pairs are laid out by :class:`bgekit.LayerWiseFlagLLMReranker` itself
(:meth:`~bgekit.FlagLLMReranker.tokenize_pairs`: ``[bos] A: q \\n B: p \\n prompt``), and the
module trained is the one that class runs, so the saved folder scores in it as trained.

Example:
    >>> from bgekit.train.layerwise import LayerwiseOptions, finetune_layerwise  # doctest: +SKIP
    >>> options = LayerwiseOptions(output_dir="out", model_name_or_path="BAAI/bge-reranker-v2-minicpm-layerwise",
    ...     train_data=["train.jsonl"], cutoff_layers=[28, 40])  # doctest: +SKIP
    >>> finetune_layerwise(options)  # doctest: +SKIP
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, fields
from functools import partial
from pathlib import Path

import torch

from .. import hub, registry
from ..errors import InputError
from ..models.layerwise_reranker import LayerWiseFlagLLMReranker, check_cutoff_layers
from ..models.llm_reranker import PAD_TO_MULTIPLE_OF
from . import lora, losses
from .data import Group, GroupSampler, TrainRecord, with_teacher_scores
from .llm_reranker import ids_by_prompt, pair_prompts
from .reranker import RerankerOptions, write_reranker_metadata
from .trainer import (
    BgekitTrainer,
    EpochCallback,
    GroupDataset,
    ThroughputCallback,
    resolve_resume,
    training_records,
)

# files of the model folder that are not weights or tokenizer and must travel with the weights
FOLDER_FILES = (
    "config.json",
    "generation_config.json",
    "configuration_minicpm_reranker.py",
    "modeling_minicpm_reranker.py",
)


@dataclass
class LayerwiseOptions(RerankerOptions):
    """Reranker options plus the layers to train (FlagEmbedding's ``start_layer``; or ``cutoff_layers``).

    ``query_instruction_for_rerank`` / ``passage_instruction_for_rerank`` / ``prompt`` left at
    None mean the inference class's defaults ("A: ", "B: ", FlagEmbedding's prompt).
    """

    start_layer: int | None = None
    cutoff_layers: list[int] | None = None


def layerwise_loss(scores: torch.Tensor, group_size: int, teacher: torch.Tensor | None = None) -> torch.Tensor:
    """FlagEmbedding's layerwise loss from ``(pairs, layers)`` scores, layers shallow to deep.

    Sum over layers of the group cross-entropy, plus the soft cross-entropy of each layer
    against the teacher's distribution (``teacher``: ``(queries, group_size)`` scores) or, with
    no teacher, of each shallower layer against the deepest layer's (detached).
    """
    n_layers = scores.shape[1]
    loss = sum(losses.reranker_ce(scores[:, i], group_size) for i in range(n_layers))
    if teacher is None:
        target, students = scores[:, -1].detach().view(-1, group_size), range(n_layers - 1)
    else:
        target, students = teacher.view(-1, group_size).to(scores), range(n_layers)
    for i in students:
        loss = loss + losses.soft_cross_entropy(scores[:, i].view(-1, group_size), target, temperature=1.0)
    return loss


class TrainableScorer(torch.nn.Module):
    """The layerwise module as the Trainer sees it.

    A plain torch module: the architecture's own ``config`` is not a transformers config,
    which the Trainer would otherwise use as one. Its state dict is the inner module's, so
    checkpoints keep the original parameter names and load in the inference class.
    """

    def __init__(self, module: torch.nn.Module):
        super().__init__()
        self.inner = module

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, cutoff_layers: list[int]) -> torch.Tensor:
        return self.inner(input_ids, attention_mask, cutoff_layers=cutoff_layers)

    def state_dict(self, *args, **kwargs):
        return self.inner.state_dict(*args, **kwargs)

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        return self.inner.load_state_dict(state_dict, strict=strict, assign=assign)


class LayerwiseCollator:
    """Groups -> the pairs, tokenized and padded by the inference class (multiple of 8, its side)."""

    def __init__(self, reranker: LayerWiseFlagLLMReranker, options: LayerwiseOptions):
        self.reranker = reranker
        self.options = options

    def __call__(self, groups: list[Group]) -> dict:
        pairs = [(g.query, p) for g in groups for p in g.passages]
        opts = self.options

        def tokenize(some: list[tuple[str, str]], prompt: str | None) -> list[list[int]]:
            return self.reranker.tokenize_pairs(some, opts.query_max_len, opts.max_len, prompt).ids

        ids = ids_by_prompt(pairs, pair_prompts(groups, opts.prompt), tokenize)
        batch = {"pairs": self.reranker.tokenizer.collate(ids, None, PAD_TO_MULTIPLE_OF)}
        return with_teacher_scores(batch, groups)


class LayerwiseTrainer(BgekitTrainer):
    """The Trainer with :func:`layerwise_loss` over the cutoff layers in ``compute_loss``."""

    def __init__(self, *args, group_size: int, cutoff_layers: list[int], **kwargs):
        super().__init__(*args, **kwargs)
        self.group_size = group_size
        self.cutoff_layers = cutoff_layers

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        pairs = inputs["pairs"]
        self.count_tokens(pairs)
        scores = model(pairs["input_ids"], pairs["attention_mask"], cutoff_layers=self.cutoff_layers).float()
        loss = layerwise_loss(scores, self.group_size, inputs.get("teacher_scores"))
        return (loss, {"scores": scores}) if return_outputs else loss


def training_layers(options: LayerwiseOptions, config) -> list[int]:
    """The cutoff layers to train, shallow to deep, checked against the model's score heads."""
    allowed = list(range(config.start_layer, config.num_hidden_layers + 1))
    if options.cutoff_layers is not None:
        if options.start_layer is not None:
            raise InputError("give start_layer or cutoff_layers, not both")
        return sorted(check_cutoff_layers(options.cutoff_layers, allowed))
    start = config.start_layer if options.start_layer is None else options.start_layer
    if isinstance(start, bool) or not isinstance(start, int) or start not in allowed:
        raise InputError(
            f"start_layer must be an int in [{allowed[0]}, {allowed[-1]}] (this model has score heads from layer "
            f"{config.start_layer} to {config.num_hidden_layers}), got {start!r}"
        )
    return list(range(start, config.num_hidden_layers + 1))


def copy_folder_files(source: Path, target: Path) -> None:
    """The config (and FlagEmbedding's remote-code files) next to saved weights, so the folder loads."""
    for name in FOLDER_FILES:
        if (source / name).exists():
            shutil.copy(source / name, target / name)
    config_path = target / "config.json"
    config = json.loads(config_path.read_text(encoding="utf-8"))
    config.pop("torch_dtype", None)
    config["dtype"] = "float32"  # the weights are saved as trained
    config_path.write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")


def save_folder_files(source: Path, target: Path, options: RerankerOptions) -> None:
    """:func:`copy_folder_files`, and ``bgekit.json`` with the prompt and instructions it trained with."""
    copy_folder_files(source, target)
    write_reranker_metadata(target, registry.LAYERWISE_RERANKER, options)


def as_layerwise_options(options: RerankerOptions) -> LayerwiseOptions:
    """A copy of ``options`` as :class:`LayerwiseOptions` (layerwise defaults for what plain options lack)."""
    return LayerwiseOptions(**{f.name: getattr(options, f.name) for f in fields(options)})


def finetune_layerwise(
    options: RerankerOptions, records: list[TrainRecord] | None = None, folder: Path | None = None
) -> Path:
    """Fine-tune a layerwise LLM reranker and save it in ``options.output_dir``; returns that folder.

    ``bgekit.train.reranker.finetune_reranker`` calls this for layerwise models; plain
    :class:`~bgekit.train.reranker.RerankerOptions` get the layerwise defaults.
    """
    resume = resolve_resume(options.resume_from_checkpoint, options.output_dir, options.overwrite_output_dir)
    from transformers import TrainerCallback

    options = as_layerwise_options(options)
    if records is None:
        records = training_records(options)
    options.check_lora()
    if options.additional_special_tokens:
        raise InputError("additional_special_tokens is not supported for layerwise rerankers (a fixed vocabulary)")
    if options.gradient_checkpointing:
        raise InputError("gradient_checkpointing is not supported for layerwise rerankers (bgekit's own architecture)")
    for name in ("raw_peft", "use_flash_attn"):
        if getattr(options, name):
            raise InputError(f"{name} is not supported for layerwise rerankers (bgekit's own architecture)")
    folder = hub.model_folder(options.model_name_or_path) if folder is None else Path(folder)
    # the inference class loads the module (float32 on the CPU) and lays out the pairs
    reranker = LayerWiseFlagLLMReranker(
        str(folder),
        devices="cpu",
        **{
            name: getattr(options, name)
            for name in ("query_instruction_for_rerank", "passage_instruction_for_rerank")
            if getattr(options, name) is not None
        },
        prompt=options.prompt,
        query_max_length=options.query_max_len,
        max_length=options.max_len,
    )
    module = reranker.model
    cutoffs = training_layers(options, module.config)
    if options.use_lora:  # the adapter trains; the score heads and the rest stay as they are
        module = lora.wrap(module, options, gradient_checkpointing=False)
    dataset = GroupDataset(GroupSampler.from_options(records, options))
    throughput = ThroughputCallback()
    output = Path(options.output_dir)

    class SaveFolderFiles(TrainerCallback):
        def on_save(self, args, state, control, **kwargs):
            checkpoint = output / f"checkpoint-{state.global_step}"
            if not (checkpoint.is_dir() and state.is_world_process_zero):
                return
            if options.use_lora:  # the checkpoint's weights are the wrapped module's; its adapter loads as peft_path
                module.save_pretrained(str(checkpoint / lora.ADAPTER_DIR))
                lora.name_base_model(checkpoint / lora.ADAPTER_DIR, options.model_name_or_path)
            else:
                copy_folder_files(folder, checkpoint)

    trainer = LayerwiseTrainer(
        model=TrainableScorer(module),
        args=options.training_arguments(),
        train_dataset=dataset,
        data_collator=LayerwiseCollator(reranker, options),
        processing_class=reranker.tokenizer.hf,
        callbacks=[EpochCallback(dataset), throughput, SaveFolderFiles()],
        text_tokenizer=reranker.tokenizer,
        throughput=throughput,
        group_size=options.train_group_size,
        cutoff_layers=cutoffs,
    )
    trainer.train(resume_from_checkpoint=resume)
    if options.use_lora:  # OUT/adapter, and the merged module in OUT (see bgekit.train.lora)
        return lora.save_trained(
            trainer,
            reranker.tokenizer.hf,
            output,
            options,
            resized=False,
            write_extra=lambda target: save_folder_files(folder, target, options),
            model=module,
            describe_adapter=partial(write_reranker_metadata, kind=registry.LAYERWISE_RERANKER, options=options),
        )
    trainer.save_model(str(output))
    if trainer.is_world_process_zero():
        save_folder_files(folder, output, options)
    return output
