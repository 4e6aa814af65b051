"""What the embedder and reranker trainers share: a ``transformers.Trainer`` with the loss in
``compute_loss``, the training arguments, and the per-epoch group re-sampling.

The model handed to the Trainer is the plain transformers model (``AutoModel`` or
``AutoModelForSequenceClassification``), so checkpoints, resume, DeepSpeed, mixed
precision and gradient checkpointing are the Trainer's own, and every checkpoint folder
is a model folder bgekit (and sentence-transformers) can load.
"""

from __future__ import annotations

import logging
import os
import re
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from transformers import Trainer, TrainerCallback, TrainingArguments

from ..errors import InputError
from ..io import check_output_folder
from ..models.tokenization import TextTokenizer
from .data import GroupSampler, TrainRecord, load_train_files

logger = logging.getLogger(__name__)


@dataclass
class TrainOptions:
    """Options shared by both trainers (names follow FlagEmbedding's where they exist)."""

    output_dir: str
    num_train_epochs: float = 1.0
    max_steps: int = -1
    per_device_train_batch_size: int = 16
    learning_rate: float = 2e-5
    warmup_ratio: float = 0.1
    weight_decay: float = 0.01
    train_group_size: int = 4
    gradient_accumulation_steps: int = 1
    gradient_checkpointing: bool = False
    bf16: bool = False
    fp16: bool = False
    deepspeed: str | None = None
    logging_steps: int = 10
    save_steps: int = 500
    save_total_limit: int | None = 2
    seed: int = 42
    dataloader_num_workers: int = 0
    #: start afresh in an ``output_dir`` that holds an earlier run (its checkpoints may be rotated away)
    overwrite_output_dir: bool = False
    #: load the model with ``attn_implementation="flash_attention_2"`` (FlagEmbedding's option; the
    #: flash-attn package and a CUDA device it supports)
    use_flash_attn: bool = False
    extra: dict[str, Any] = field(default_factory=dict)

    def training_arguments(self) -> TrainingArguments:
        if self.per_device_train_batch_size < 1 or self.train_group_size < 1:
            raise InputError("per_device_train_batch_size and train_group_size must be >= 1")
        attention_options(self.use_flash_attn)  # a missing flash-attn found before any model loads
        # without an accelerator the Trainer only runs DDP (gloo) under torchrun when told it is on the CPU
        extra: dict[str, Any] = {}
        if not torch.cuda.is_available():
            extra["use_cpu"] = True
            if int(os.environ.get("WORLD_SIZE", "1")) > 1:
                extra["ddp_backend"] = "gloo"
        return TrainingArguments(
            output_dir=self.output_dir,
            num_train_epochs=self.num_train_epochs,
            max_steps=self.max_steps,
            per_device_train_batch_size=self.per_device_train_batch_size,
            learning_rate=self.learning_rate,
            warmup_steps=self.warmup_ratio,
            weight_decay=self.weight_decay,
            gradient_accumulation_steps=self.gradient_accumulation_steps,
            **{_CHECKPOINTING: self.gradient_checkpointing},
            bf16=self.bf16,
            fp16=self.fp16,
            deepspeed=self.deepspeed,
            logging_steps=self.logging_steps,
            save_steps=self.save_steps,
            save_total_limit=self.save_total_limit,
            seed=self.seed,
            dataloader_num_workers=self.dataloader_num_workers,
            remove_unused_columns=False,
            report_to=[],
            disable_tqdm=False,
            **{**extra, **self.extra},
        )


def _checkpointing_argument() -> str:
    """``activation_checkpointing`` where TrainingArguments has it (transformers 5.x later releases call
    ``gradient_checkpointing`` a deprecated alias and warn on every run), else the old name."""
    import dataclasses

    names = {f.name for f in dataclasses.fields(TrainingArguments)}
    return "activation_checkpointing" if "activation_checkpointing" in names else "gradient_checkpointing"


_CHECKPOINTING = _checkpointing_argument()


def attention_options(use_flash_attn: bool) -> dict[str, str]:
    """``from_pretrained`` keywords for ``use_flash_attn``: FlagEmbedding's ``use_flash_attention_2=True``
    is transformers 5's ``attn_implementation="flash_attention_2"``. Without the flash-attn package it is
    a one-line error naming it (transformers would fail later, deep in the model's loading)."""
    if not use_flash_attn:
        return {}
    import importlib.util

    if importlib.util.find_spec("flash_attn") is None:
        raise InputError(
            "use_flash_attn (--use-flash-attn) needs the flash-attn package, which is not installed: "
            "pip install flash-attn (CUDA only), or leave the option out"
        )
    return {"attn_implementation": "flash_attention_2"}


def load_pretrained(auto_class: Any, folder: str | Path, options: Any, **kwargs: Any) -> Any:
    """``auto_class.from_pretrained(folder, **kwargs)`` with the attention ``options.use_flash_attn`` asks
    for; what transformers refuses about it (no CUDA device, an architecture without flash attention)
    becomes a one-line error."""
    attention = attention_options(getattr(options, "use_flash_attn", False))
    try:
        return auto_class.from_pretrained(str(folder), **attention, **kwargs)
    except (ImportError, ValueError, RuntimeError) as exc:
        if not attention:
            raise
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise InputError(f"use_flash_attn: {first}") from None


@dataclass(kw_only=True)
class DataOptions:
    """FlagEmbedding's data options shared by the trainers that read query / pos / neg records."""

    #: train on at most this many records of each file, drawn at random (None: all)
    max_example_num_per_dataset: int | None = None
    #: the share of positives (over 100 characters) cut in three and shuffled, as augmentation
    shuffle_ratio: float = 0.0


def training_data(options: Any) -> list[tuple[Path, Path | None, list[TrainRecord]]]:
    """``options.train_data`` file by file, validated, as the options have them train: at most
    ``max_example_num_per_dataset`` records of each file (drawn first: only those are parsed and checked),
    teacher scores as ``knowledge_distillation`` says (checked before any model loads)."""
    if not 0.0 <= options.shuffle_ratio <= 1.0:  # NaN too
        raise InputError(f"shuffle_ratio must be between 0 and 1, got {options.shuffle_ratio}")
    files = load_train_files(options.train_data, max_per_file=options.max_example_num_per_dataset, seed=options.seed)
    return [
        (path, folder, distillation_records(records, options.knowledge_distillation)) for path, folder, records in files
    ]


def training_records(options: Any) -> list[TrainRecord]:
    """:func:`training_data`'s records, all files together."""
    return [r for _, _, records in training_data(options) for r in records]


def fit_lengths(options: Any, config: Any, *names: str) -> None:
    """Cut each length option ``names`` of ``options`` to the model's position table, with a warning,
    as inference cuts ``max_length``: a longer input has no position embedding, and training stopped
    at its first long batch with a tensor-size error deep in the model."""
    from ..models.base import max_positions

    limit = max_positions(config)
    if limit is None:
        return
    for name in names:
        value = getattr(options, name)
        if value > limit:
            logger.warning("%s=%d is beyond the model's %d positions; training with %d", name, value, limit, limit)
            setattr(options, name, limit)


def distillation_records(records: list[TrainRecord], knowledge_distillation: bool | None) -> list[TrainRecord]:
    """The records as ``knowledge_distillation`` has them train. None (bgekit's default): teacher scores are
    distilled when the records carry them (a file ``bgekit score`` wrote is scored to be distilled from).
    False (FlagEmbedding 1.4.2's default): they are ignored. True: they must be there; FlagEmbedding then
    fails on the first record without them with a KeyError, bgekit names the file and line."""
    if knowledge_distillation is None:
        return records
    if knowledge_distillation:
        missing = next((r for r in records if r.pos_scores is None), None)
        if missing is not None:
            raise InputError(
                "knowledge_distillation needs teacher scores (pos_scores, neg_scores) on every record; "
                f"{missing.source} has none (add them with bgekit score, or leave knowledge_distillation unset)"
            )
        return records
    if any(r.pos_scores is not None for r in records):
        logger.info("knowledge_distillation off: the records' teacher scores are not used")
    return [replace(r, pos_scores=None, neg_scores=None) for r in records]


def freeze_position_embeddings(model: torch.nn.Module) -> list[str]:
    """``fix_position_embedding``: stop every parameter whose name holds ``position_embeddings`` from
    training (FlagEmbedding's rule, for encoder embedders and BGE-M3): a long-context model's
    position table then keeps the positions short training texts never reach. Returns the names
    frozen; a model with none (rotary positions) is told in the log and trains as it would."""
    frozen = []
    for name, parameter in model.named_parameters():
        if "position_embeddings" in name:
            parameter.requires_grad_(False)
            frozen.append(name)
    if frozen:
        logger.info("fix_position_embedding: frozen %s", ", ".join(frozen))
    else:
        logger.warning("fix_position_embedding: the model has no position_embeddings parameters; nothing frozen")
    return frozen


def training_tokenizer(hf_tokenizer) -> TextTokenizer:
    """The collators' tokenizer: the model's own ids, padded on the right whatever side inference
    pads. Under causal attention a left pad position has no key it may attend to. On an H200, a
    bf16 LoRA run of a 7B-width Mistral embedder padded on the left had NaN gradient norms from
    its first step; padded on the right the same run trained (benchmarks/RESULTS.md). Last-token
    pooling and the Yes logit read the last real token on either side, so nothing else changes."""
    tokenizer = TextTokenizer(hf_tokenizer)
    tokenizer.padding_side = "right"
    return tokenizer


class GroupDataset(torch.utils.data.Dataset):
    """One item per record: its group (query, 1 positive + negatives, teacher scores) for this epoch."""

    def __init__(self, sampler: GroupSampler):
        self.sampler = sampler
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.sampler)

    def __getitem__(self, index: int):
        return self.sampler.group(index, self.epoch)


class EpochCallback(TrainerCallback):
    """Re-draws the negatives each epoch."""

    def __init__(self, dataset: GroupDataset):
        self.dataset = dataset

    def on_epoch_begin(self, args, state, control, **kwargs):
        self.dataset.epoch = int(state.epoch or 0)


class ThroughputCallback(TrainerCallback):
    """Adds ``tokens_per_second`` (real, unpadded tokens) to the Trainer's logs."""

    def __init__(self):
        self.tokens = 0
        self._last = (time.perf_counter(), 0)

    def on_train_begin(self, args, state, control, **kwargs):
        self._last = (time.perf_counter(), self.tokens)

    def on_log(self, args, state, control, logs=None, **kwargs):
        now = time.perf_counter()
        seen = self.tokens - self._last[1]
        if logs is not None and seen > 0 and now > self._last[0]:
            logs["tokens_per_second"] = round(seen / (now - self._last[0]), 1)
            if state.log_history and state.log_history[-1].get("step") == state.global_step:
                # the Trainer stored a copy of these logs before calling us: checkpoints' trainer_state.json too
                state.log_history[-1]["tokens_per_second"] = logs["tokens_per_second"]
        self._last = (now, self.tokens)


def move(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device) for k, v in batch.items()}


def resolve_resume(resume: str | None, output_dir: str, overwrite: bool = False) -> str | None:
    """The checkpoint to resume from, checked before any model loads (the finetune functions call it
    first). ``"auto"``: the newest complete ``checkpoint-N`` in ``output_dir``, if any. Without a
    resume, an ``output_dir`` that holds an earlier run is refused unless ``overwrite``: the Trainer's
    checkpoint rotation would delete that run's checkpoints and the new model replace its own. An
    ``output_dir`` that cannot be created (a file, or under one) is refused here too."""
    check_output_folder(output_dir)
    if resume is None:
        earlier = sorted(p.name for p in Path(output_dir).glob("*") if not p.name.startswith("."))
        if earlier and not overwrite:
            shown = ", ".join(earlier[:4]) + (", ..." if len(earlier) > 4 else "")
            raise InputError(
                f"--output-dir {output_dir} already holds a run ({shown}): continue it with "
                "--resume-from-checkpoint auto, start over there with --overwrite-output-dir, or pick another folder"
            )
        return None
    if resume == "auto":
        return newest_checkpoint(output_dir)
    if not Path(resume).is_dir():
        raise InputError(f"resume_from_checkpoint {resume} is not a checkpoint folder")
    if not (Path(resume) / "trainer_state.json").exists():
        raise InputError(
            f"resume_from_checkpoint {resume} has no trainer_state.json: it is not a complete checkpoint "
            "(a run stopped while saving it?); pick an earlier one or --resume-from-checkpoint auto"
        )
    return resume


def newest_checkpoint(output_dir: str) -> str | None:
    """The highest-numbered ``checkpoint-N`` folder with a ``trainer_state.json`` (one a run stopped
    while saving lacks it, and other names such as ``checkpoint-best`` are not the Trainer's)."""
    found = []
    for folder in Path(output_dir).glob("checkpoint-*"):
        match = re.fullmatch(r"checkpoint-(\d+)", folder.name)
        if match and folder.is_dir():
            if (folder / "trainer_state.json").exists():
                found.append((int(match[1]), folder))
            else:
                logger.warning("%s is incomplete (no trainer_state.json): not resuming from it", folder)
    return str(max(found)[1]) if found else None


class LossPartsLogging:
    """Trainer mixin: the mean of each recorded loss part (per-head losses, say) since the last log,
    added to the Trainer's logs. ``on_logged_parts`` sees those logs first (warnings, say)."""

    def record_parts(self, values: dict[str, torch.Tensor]) -> None:
        sums = self.__dict__.setdefault("_part_sums", {})
        for name, value in values.items():
            sums[name] = sums.get(name, 0.0) + float(value.detach())
        self._part_count = getattr(self, "_part_count", 0) + 1

    def on_logged_parts(self, logs: dict[str, float]) -> None:
        """Called with the logs once the part means are in them."""

    def log(self, logs: dict[str, float], *args, **kwargs) -> None:
        count = getattr(self, "_part_count", 0)
        if "loss" in logs and count:
            logs.update({name: round(total / count, 4) for name, total in self._part_sums.items()})
            self.on_logged_parts(logs)
            self._part_sums, self._part_count = {}, 0
        super().log(logs, *args, **kwargs)


class OwnFolderLayout:
    """Trainer mixin for a model that is not one transformers model (M3's encoder and heads, RetroMAE's
    encoder and decoder): checkpoints and the final save write ``save_weights`` in the model's own
    layout, plus the tokenizer and the training arguments as the Trainer's own ``_save`` does."""

    def save_weights(self, output_dir: str, state_dict: dict | None) -> None:
        raise NotImplementedError

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        from transformers.trainer import TRAINING_ARGS_NAME

        output_dir = output_dir if output_dir is not None else self.args.output_dir
        if not self.args.should_save:
            return
        self.save_weights(output_dir, state_dict)
        if self.processing_class is not None:
            self.processing_class.save_pretrained(output_dir)
        torch.save(self.args, os.path.join(output_dir, TRAINING_ARGS_NAME))


# transformers 5.0.0 writes LayerNorm parameters under their old names (gamma, beta) and its Trainer
# reads a checkpoint back without renaming them: resuming silently kept the starting LayerNorms
_OLD_NORM_NAMES = {".gamma": ".weight", ".beta": ".bias"}


def with_current_names(state: dict[str, torch.Tensor], expected) -> dict[str, torch.Tensor]:
    """``state`` with every ``X.gamma`` / ``X.beta`` the module lacks, whose ``X.weight`` / ``X.bias``
    it has, renamed to the latter (how transformers 5.0.0 saves LayerNorms); other keys as they are."""
    expected = set(expected)
    renamed = {}
    for key, value in state.items():
        for old, new in _OLD_NORM_NAMES.items():
            if key.endswith(old) and key not in expected and key[: -len(old)] + new in expected:
                key = key[: -len(old)] + new
                break
        renamed[key] = value
    return renamed


def checkpoint_weights(folder: Path, expected) -> dict[str, torch.Tensor] | None:
    """A checkpoint's safetensors weights (one file or shards) with current LayerNorm names, or None
    when no key needs renaming (the Trainer's own loading is right then)."""
    import json

    from safetensors import safe_open
    from safetensors.torch import load_file

    index = folder / "model.safetensors.index.json"
    if (folder / "model.safetensors").is_file():
        files = [folder / "model.safetensors"]
    elif index.is_file():
        files = [folder / name for name in sorted(set(json.loads(index.read_text())["weight_map"].values()))]
    else:
        return None
    keys = []
    for path in files:
        with safe_open(str(path), framework="pt") as opened:
            keys += list(opened.keys())
    probe = dict.fromkeys(keys)
    if list(with_current_names(probe, expected)) == keys:
        return None
    state = {}
    for path in files:
        state.update(load_file(str(path), device="cpu"))
    return with_current_names(state, expected)


class BgekitTrainer(Trainer):
    """Trainer whose data are :class:`~bgekit.train.data.Group` lists and which counts tokens."""

    def __init__(self, *args, text_tokenizer: TextTokenizer, throughput: ThroughputCallback, **kwargs):
        super().__init__(*args, **kwargs)
        self.text_tokenizer = text_tokenizer
        self.throughput = throughput

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        """The Trainer's loading, except for a checkpoint transformers 5.0.0 wrote with old LayerNorm
        names (see :func:`with_current_names`), which it would load leaving those LayerNorms untouched."""
        target = model if model is not None else self.model
        state = None
        if not self.is_fsdp_enabled:
            state = checkpoint_weights(Path(resume_from_checkpoint), target.state_dict().keys())
        if state is None:
            return super()._load_from_checkpoint(resume_from_checkpoint, model)
        self._issue_warnings_after_load(target.load_state_dict(state, False))

    def _get_train_sampler(self, train_dataset=None):
        """A same-dataset plan is read in order: its items are whole batches, already shuffled."""
        from .same_dataset import SameSetDataset

        dataset = self.train_dataset if train_dataset is None else train_dataset
        if isinstance(dataset, SameSetDataset):
            return torch.utils.data.SequentialSampler(dataset)
        return super()._get_train_sampler(train_dataset)

    def count_tokens(self, *batches: dict[str, torch.Tensor]) -> None:
        self.throughput.tokens += int(sum(b["attention_mask"].sum() for b in batches))
