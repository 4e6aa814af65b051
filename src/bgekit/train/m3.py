"""BGE-M3 unified fine-tuning: dense, sparse (lexical) and ColBERT heads trained together with
InfoNCE each, an ensemble loss on their weighted sum, and optional self-distillation from the
ensemble into every head (FlagEmbedding's M3 recipe), on the shared Trainer.

The model handed to the Trainer is the encoder plus both linear heads as one module, so one
forward pass (through DDP when there is one) yields all three outputs. Checkpoints and the
final folder use the layout :class:`bgekit.BGEM3FlagModel` loads: the transformers encoder,
its tokenizer, ``colbert_linear.pt`` and ``sparse_linear.pt``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from .. import hub, registry
from ..errors import InputError
from ..models.embedder import unescape_format
from ..models.m3 import M3Module, load_head
from ..models.pooling import pool
from ..models.tokenization import TextTokenizer, load_hf_tokenizer
from . import losses
from .embedder import KD_LOSSES, EmbedderCollator, EmbedderOptions
from .same_dataset import SameSetCollator, group_dataset
from .trainer import (
    BgekitTrainer,
    EpochCallback,
    LossPartsLogging,
    OwnFolderLayout,
    ThroughputCallback,
    fit_lengths,
    freeze_position_embeddings,
    load_pretrained,
    resolve_resume,
    training_data,
    with_current_names,
)

logger = logging.getLogger(__name__)

HEADS = ("dense", "sparse", "colbert")


@dataclass
class M3Options(EmbedderOptions):
    """What to train and how; see ``bgekit finetune m3 --help``.

    ``unified_finetuning`` trains all three heads (else dense only); ``heads`` picks any subset
    instead. ``sparse_loss_weight`` is FlagEmbedding's 0.1 on the sparse InfoNCE (and its
    self-distillation term) when several heads train together. ``new_sparse_bias`` starts a
    sparse head that the model does not have yet with every token weight just above zero, so
    no relu unit starts dead and the lexical scores start small (see :func:`new_sparse_head`).
    ``sparse_floor`` (0 turns it off) adds ``relu(floor - strongest token logit)`` per text: it is
    0 while a text has a token above the floor and keeps the sparse head from collapsing to all
    zero weights (dead relu units get no gradient, so such a collapse never recovers).
    """

    temperature: float = 0.02
    learning_rate: float = 1e-5
    unified_finetuning: bool = True
    use_self_distill: bool = False
    self_distill_start_step: int = -1
    fix_encoder: bool = False
    heads: list[str] | None = None
    colbert_dim: int = -1
    sparse_loss_weight: float = 0.1
    new_sparse_bias: float = 0.05
    sparse_floor: float = 0.05


def resolve_heads(options: M3Options) -> tuple[str, ...]:
    """The heads to train, in ``HEADS`` order; checked against the other options."""
    if options.heads is None:
        heads = HEADS if options.unified_finetuning else ("dense",)
    else:
        unknown = [h for h in options.heads if h not in HEADS]
        if unknown or not options.heads:
            raise InputError(f"heads must be a non-empty subset of {HEADS}, got {options.heads!r}")
        heads = tuple(h for h in HEADS if h in options.heads)
    if options.use_self_distill and len(heads) < 2:
        raise InputError("use_self_distill needs at least two heads (it distils their ensemble into each)")
    if options.fix_encoder and heads == ("dense",):
        raise InputError("fix_encoder with only the dense head leaves nothing to train (dense has no head weights)")
    return heads


def new_sparse_head(hidden_size: int, bias: float) -> torch.nn.Linear:
    """A fresh ``hidden -> 1`` head whose relu outputs start near ``bias`` (> 0) for every token.

    FlagEmbedding's default ``nn.Linear`` init leaves about half the tokens below zero, where relu
    passes no gradient; with a positive bias and small weights every token starts alive and the
    lexical scores start small, so ``score / temperature`` is not saturated on the first steps.
    """
    head = torch.nn.Linear(hidden_size, 1)
    # hidden states are layer-normed (about unit scale per dimension): outputs ~ bias +- 0.2 * bias
    torch.nn.init.normal_(head.weight, std=0.2 * bias / hidden_size**0.5)
    torch.nn.init.constant_(head.bias, bias)
    return head


class M3TrainModule(M3Module):
    """Encoder plus heads whose forward returns what the trained heads need, masked and pooled.

    ``dense`` ``(B, D)``, ``sparse`` ``(B, L)`` relu token weights (0 at padding and special
    tokens), ``colbert`` ``(B, L - 1, D')`` (zero at padding), ``mask`` the attention mask.
    """

    def __init__(
        self,
        encoder: torch.nn.Module,
        colbert_linear: torch.nn.Linear,
        sparse_linear: torch.nn.Linear,
        *,
        heads: tuple[str, ...],
        normalize: bool,
        fix_encoder: bool,
        skip_ids: list[int],
    ):
        super().__init__(encoder, colbert_linear, sparse_linear)
        self.heads = heads
        self.normalize = normalize
        self.fix_encoder = fix_encoder
        self.register_buffer("skip_ids", torch.tensor(skip_ids, dtype=torch.long), persistent=False)
        if fix_encoder:
            encoder.requires_grad_(False)

    def gradient_checkpointing_enable(self, **kwargs) -> None:
        self.encoder.gradient_checkpointing_enable(**kwargs)

    def forward(self, **inputs: torch.Tensor) -> dict[str, torch.Tensor]:  # type: ignore[override]
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.fix_encoder):
            hidden = self.encoder(**inputs, return_dict=True).last_hidden_state
        mask = inputs["attention_mask"]
        out = {"mask": mask}
        if "dense" in self.heads:
            dense = pool(hidden, mask, "cls")
            out["dense"] = F.normalize(dense, dim=-1) if self.normalize else dense
        if "sparse" in self.heads:
            ids = inputs["input_ids"]
            keep = mask.bool() & ~torch.isin(ids, self.skip_ids)
            logits = self.sparse_linear(hidden).squeeze(-1)
            out["sparse"] = torch.relu(logits) * keep
            out["sparse_logits"] = logits.masked_fill(~keep, torch.finfo(logits.dtype).min)
            out["sparse_keep"] = keep
        if "colbert" in self.heads:
            multi = self.colbert_linear(hidden[:, 1:]) * mask[:, 1:, None]
            out["colbert"] = F.normalize(multi, dim=-1) if self.normalize else multi
        return out


def save_m3_folder(module: M3Module, folder: str | Path, state_dict: dict[str, torch.Tensor] | None = None) -> None:
    """Write the encoder (``save_pretrained``) and the two heads as ``*_linear.pt`` state dicts."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = module.state_dict() if state_dict is None else state_dict

    def part(prefix: str) -> dict[str, torch.Tensor]:
        return {k[len(prefix) :]: v.detach().cpu().clone() for k, v in state.items() if k.startswith(prefix)}

    # an explicit state_dict only when the Trainer gives one (DeepSpeed): transformers 5.0 renames
    # LayerNorm weights to gamma/beta in a state_dict it is handed
    encoder_state = None if state_dict is None else part("encoder.")
    module.encoder.save_pretrained(str(folder), state_dict=encoder_state)
    torch.save(part("colbert_linear."), folder / "colbert_linear.pt")
    torch.save(part("sparse_linear."), folder / "sparse_linear.pt")


class M3Trainer(LossPartsLogging, OwnFolderLayout, BgekitTrainer):
    """The Trainer with the M3 unified loss in ``compute_loss``; saves and resumes the M3 layout."""

    def __init__(self, *args, options: M3Options, heads: tuple[str, ...], **kwargs):
        super().__init__(*args, **kwargs)
        self.options = options
        self.heads = heads
        self._warned_dead = False

    def head_weight(self, head: str) -> float:
        if len(self.heads) == 1:
            return 1.0
        return self.options.sparse_loss_weight if head == "sparse" else 1.0

    def score_matrices(self, q: dict, p: dict) -> dict[str, torch.Tensor]:
        """``(B, B * G)`` score matrix of each trained head (in-batch candidates)."""
        scores = {}
        if "dense" in self.heads:
            scores["dense"] = q["dense"] @ p["dense"].T
        if "sparse" in self.heads:
            scores["sparse"] = losses.m3_sparse_scores(q["ids"], q["sparse"], p["ids"], p["sparse"])
        if "colbert" in self.heads:
            scores["colbert"] = losses.m3_colbert_scores(q["colbert"], q["mask"][:, 1:], p["colbert"], p["mask"][:, 1:])
        return scores

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        self.count_tokens(inputs["query"], inputs["passage"])
        opts = self.options
        # a same-dataset batch brings its group size, and in_batch=False for a no_in_batch_neg file
        group = inputs.get("group_size", opts.train_group_size)
        in_batch = opts.use_inbatch_neg and inputs.get("in_batch", True)
        q = {**model(**inputs["query"]), "ids": inputs["query"]["input_ids"]}
        p = {**model(**inputs["passage"]), "ids": inputs["passage"]["input_ids"]}
        scores = self.score_matrices(q, p)
        if not in_batch:
            scores = {name: losses.own_group(value, group) for name, value in scores.items()}
        teacher = inputs.get("teacher_scores")  # FlagEmbedding's teacher terms go into every head's loss

        def head_loss(value: torch.Tensor) -> torch.Tensor:
            first = losses.first_columns(value, group, in_batch)
            return losses.scores_loss(value, first, group, opts.temperature, teacher, opts.kd_loss_type)

        head_losses = {name: head_loss(value) for name, value in scores.items()}
        if "dense" in scores and opts.negatives_cross_device and in_batch:
            head_losses["dense"] = losses.embedding_loss(
                q["dense"], p["dense"], group, opts.temperature, teacher, opts.kd_loss_type, cross_device=True
            )
        terms = [self.head_weight(name) * value for name, value in head_losses.items()]
        logged = {f"{name}_loss": value for name, value in head_losses.items()}
        if len(scores) > 1:
            ensemble = losses.m3_ensemble(scores)
            logged["ensemble_loss"] = head_loss(ensemble)
            terms.append(logged["ensemble_loss"])
        loss = torch.stack(terms).sum() / len(terms)
        if opts.use_self_distill and self.state.global_step > opts.self_distill_start_step:
            self_teacher = (ensemble / opts.temperature).detach()
            distill = sum(
                self.head_weight(name) * losses.soft_cross_entropy(value, self_teacher, opts.temperature)
                for name, value in scores.items()
            ) / len(scores)
            logged["self_distill_loss"] = distill
            loss = (loss + distill) / 2
        if "sparse" in q and opts.sparse_floor > 0:
            # every text keeps its strongest token above 0, so the relu units can never all die
            best = torch.cat([q["sparse_logits"].max(dim=1).values, p["sparse_logits"].max(dim=1).values])
            has_tokens = torch.cat([q["sparse_keep"].any(dim=1), p["sparse_keep"].any(dim=1)])
            logged["sparse_floor_loss"] = (torch.relu(opts.sparse_floor - best) * has_tokens).mean()
            loss = loss + logged["sparse_floor_loss"]
        if "sparse" in q:
            keep = torch.cat([q["sparse_keep"].flatten(), p["sparse_keep"].flatten()])
            active = torch.cat([q["sparse"].flatten(), p["sparse"].flatten()])[keep] > 0
            logged["sparse_active"] = active.float().mean() if active.numel() else torch.tensor(0.0)
        self.record_parts(logged)
        return (loss, {"scores": scores}) if return_outputs else loss

    def on_logged_parts(self, logs: dict[str, float]) -> None:
        """Warns once when the sparse head's weights are all 0 (its relu units are dead)."""
        if logs.get("sparse_active", 1.0) == 0.0 and not self._warned_dead:
            self._warned_dead = True
            logger.warning(
                "every sparse token weight is 0: the sparse head's relu units are dead and it cannot learn. "
                "Lower --learning-rate, raise --temperature, or start from a fresh sparse head."
            )

    def save_weights(self, output_dir: str, state_dict: dict | None) -> None:
        save_m3_folder(self.accelerator.unwrap_model(self.model), output_dir, state_dict)

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        from safetensors.torch import load_file

        module = self.accelerator.unwrap_model(model if model is not None else self.model)
        folder = Path(resume_from_checkpoint)
        state = load_file(str(folder / "model.safetensors"))
        module.encoder.load_state_dict(with_current_names(state, module.encoder.state_dict().keys()))
        for name in ("colbert_linear", "sparse_linear"):
            getattr(module, name).load_state_dict(torch.load(folder / f"{name}.pt", weights_only=True))


def load_m3_for_training(folder: Path, options: M3Options, heads: tuple[str, ...], hf_tokenizer) -> M3TrainModule:
    """The encoder with the folder's heads, or fresh heads when it has none (a plain encoder)."""
    from transformers import AutoModel

    encoder = load_pretrained(AutoModel, folder, options, dtype=torch.float32)
    hidden = encoder.config.hidden_size
    if (folder / "colbert_linear.pt").exists():
        colbert = load_head(folder / "colbert_linear.pt", options.colbert_dim if options.colbert_dim > 0 else None)
    else:
        colbert = torch.nn.Linear(hidden, options.colbert_dim if options.colbert_dim > 0 else hidden)
    if (folder / "sparse_linear.pt").exists():
        sparse = load_head(folder / "sparse_linear.pt")
    else:
        sparse = new_sparse_head(hidden, options.new_sparse_bias)
    hf = hf_tokenizer
    skip = [i for i in (hf.cls_token_id, hf.eos_token_id, hf.pad_token_id, hf.unk_token_id) if i is not None]
    return M3TrainModule(
        encoder,
        colbert,
        sparse,
        heads=heads,
        normalize=options.normalize_embeddings,
        fix_encoder=options.fix_encoder,
        skip_ids=skip,
    )


def finetune_m3(options: M3Options) -> Path:
    """Fine-tune a BGE-M3 model (or start one from a plain encoder) and save it in the M3 layout.

    Example:
        >>> from bgekit.train.m3 import M3Options, finetune_m3
        >>> out = finetune_m3(M3Options(output_dir="m3-ft", model_name_or_path="BAAI/bge-m3",
        ...                             train_data=["train.jsonl"], use_self_distill=True))  # doctest: +SKIP
        >>> from bgekit import BGEM3FlagModel
        >>> BGEM3FlagModel(str(out)).encode(["hi"], return_sparse=True)  # doctest: +SKIP

    Per-head losses (``dense_loss``, ``sparse_loss``, ``colbert_loss``, ``ensemble_loss``) and
    ``sparse_active`` (share of token weights above 0) go to the Trainer's logs and to
    ``trainer_state.json`` in the output folder.
    """
    resume = resolve_resume(options.resume_from_checkpoint, options.output_dir, options.overwrite_output_dir)
    files = training_data(options)  # validated before any model loads
    records = [r for _, _, file_records in files for r in file_records]
    heads = resolve_heads(options)
    if options.kd_loss_type not in KD_LOSSES:
        raise InputError(f"kd_loss_type must be one of {KD_LOSSES}, got {options.kd_loss_type!r}")
    options.query_instruction_format = unescape_format(
        options.query_instruction_format, what="query_instruction_format"
    )
    if options.sentence_pooling_method not in (None, "cls"):
        raise InputError("BGE-M3's dense vector is the CLS state; sentence_pooling_method must be 'cls'")
    # embedder options this trainer does not implement (getattr: not every version has them)
    names = ("matryoshka_dims", "sub_batch_size", "use_lora", "from_peft", "raw_peft", "model_class")
    unsupported = [name for name in names if getattr(options, name, None)]
    if unsupported:
        raise InputError(f"{', '.join(unsupported)} not supported for M3 fine-tuning; leave them unset")
    if options.sparse_loss_weight < 0 or options.sparse_floor < 0 or options.new_sparse_bias <= 0:
        raise InputError("sparse_loss_weight and sparse_floor must be >= 0, new_sparse_bias > 0")
    if options.negatives_cross_device:
        options.extra.setdefault("dataloader_drop_last", True)
    if len(heads) < len(HEADS) or options.fix_encoder:  # DDP must not wait for heads that get no gradient
        options.extra.setdefault("ddp_find_unused_parameters", True)
    args = options.training_arguments()
    dataset = group_dataset(records, files, options, args)  # checked before the model loads
    folder = hub.model_folder(options.model_name_or_path)
    hf_tokenizer = load_hf_tokenizer(folder)
    tokenizer = TextTokenizer(hf_tokenizer)
    model = load_m3_for_training(folder, options, heads, hf_tokenizer)
    if options.fix_position_embedding:
        freeze_position_embeddings(model)
    fit_lengths(options, model.encoder.config, "query_max_len", "passage_max_len")
    collator = EmbedderCollator(tokenizer, options)
    throughput = ThroughputCallback()
    trainer = M3Trainer(
        model=model,
        args=args,
        train_dataset=dataset,
        data_collator=SameSetCollator(collator) if options.same_dataset_within_batch else collator,
        processing_class=hf_tokenizer,
        callbacks=[EpochCallback(dataset), throughput],
        text_tokenizer=tokenizer,
        throughput=throughput,
        options=options,
        heads=heads,
    )
    trainer.train(resume_from_checkpoint=resume)
    output = Path(options.output_dir)
    trainer.save_model(str(output))
    if trainer.is_world_process_zero():
        trainer.state.save_to_json(str(output / "trainer_state.json"))
        # the prompts it was trained with, so BGEM3FlagModel(output) uses them too
        hub.write_folder_metadata(
            output,
            registry.M3,
            "cls",
            query_instruction_for_retrieval=options.query_instruction_for_retrieval or None,
            query_instruction_format=options.query_instruction_format,
            passage_instruction_for_retrieval=options.passage_instruction_for_retrieval or None,
        )
    return output
