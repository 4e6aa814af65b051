"""Embedder fine-tuning: InfoNCE with in-batch, hard and cross-device negatives, optional
distillation from teacher scores and Matryoshka dimensions, on transformers' Trainer.

The saved folder holds the transformers model, its tokenizer and sentence-transformers
module files (pooling, max length, prompts, normalization), so ``bgekit.Embedder.from_pretrained``
and ``sentence_transformers.SentenceTransformer`` load it as it is.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from .. import hub, registry
from ..errors import InputError
from ..models.embedder import unescape_format
from ..models.pooling import check_pooling, pool
from ..models.tokenization import TextTokenizer, Tokenized, load_hf_tokenizer
from . import grad_cache, lora, losses
from .data import SYMMETRIC_TYPES, Group, with_teacher_scores
from .same_dataset import SameSetCollator, group_dataset
from .trainer import (
    BgekitTrainer,
    DataOptions,
    EpochCallback,
    ThroughputCallback,
    TrainOptions,
    fit_lengths,
    freeze_position_embeddings,
    load_pretrained,
    resolve_resume,
    training_data,
    training_tokenizer,
)

logger = logging.getLogger(__name__)

KD_LOSSES = ("kl_div", "m3_kd_loss")


@dataclass
class EmbedderOptions(TrainOptions, DataOptions, lora.LoraOptions):
    """What to train and how; see ``bgekit finetune embedder --help``."""

    model_name_or_path: str = ""
    train_data: list[str] = field(default_factory=list)
    query_max_len: int = 64
    passage_max_len: int = 256
    temperature: float = 0.05
    learning_rate: float = 5e-5
    train_group_size: int = 2
    per_device_train_batch_size: int = 16
    sentence_pooling_method: str | None = None
    normalize_embeddings: bool = True
    query_instruction_for_retrieval: str | None = None
    query_instruction_format: str = "{}{}"
    passage_instruction_for_retrieval: str | None = None
    use_inbatch_neg: bool = True
    negatives_cross_device: bool = False
    kd_loss_type: str = "kl_div"
    matryoshka_dims: list[int] | None = None
    resume_from_checkpoint: str | None = None
    sub_batch_size: int | None = None  # gradient cache: embed this many sequences at a time
    model_class: str | None = None  # the model's family, overriding the registry (e.g. decoder-only-icl)
    #: every batch from one training file, with per-file batch size and negatives (bgekit.train.same_dataset)
    same_dataset_within_batch: bool = False
    small_threshold: int = 0  # that mode: a folder's files under this many records batch together
    drop_threshold: int = 0  # that mode: ... unless they hold fewer than this many in all
    fix_position_embedding: bool = False  # freeze the position embedding table (FlagEmbedding's option)
    #: distil from the records' teacher scores: None when they carry them, False never, True (they must)
    knowledge_distillation: bool | None = None


class EmbedderCollator:
    """Groups -> padded query and passage batches (bgekit's own tokenizer, as at inference)."""

    def __init__(self, tokenizer: TextTokenizer, options: EmbedderOptions):
        self.tokenizer = tokenizer
        self.options = options

    def query_text(self, group: Group, text: str | None = None) -> str:
        """The query (or ``text`` in its place) with its instruction: a record's ``prompt`` stands in for
        ``query_instruction_for_retrieval``, and only when there is one (FlagEmbedding 1.4.2's rule: the
        saved model asks queries with that instruction, or with none)."""
        text = group.query if text is None else text
        instruction = self.options.query_instruction_for_retrieval
        if instruction is None:
            return text
        if group.prompt is not None:
            instruction = group.prompt
        return self.options.query_instruction_format.format(instruction, text)

    def passage_text(self, text: str) -> str:
        instruction = self.options.passage_instruction_for_retrieval
        return text if instruction is None else f"{instruction}{text}"

    def passage_texts(self, group: Group) -> list[str]:
        """The group's passages as the model reads them: ``symmetric_sts`` / ``symmetric_clustering``
        records compare texts of one kind, so their passages take the query's instruction (FlagEmbedding
        1.4.2's rule; at inference both sides are encoded with ``encode_queries``); others the passage one."""
        if group.type in SYMMETRIC_TYPES:
            return [self.query_text(group, p) for p in group.passages]
        return [self.passage_text(p) for p in group.passages]

    def passage_tokens(self, groups: list[Group]) -> Tokenized:
        """The batch's passages, tokenized (the ICL collator lays symmetric ones out as queries)."""
        return self.tokenizer.encode([t for g in groups for t in self.passage_texts(g)], self.options.passage_max_len)

    def query_tokens(self, groups: list[Group]) -> Tokenized:
        """The batch's queries, tokenized (the ICL collator adds examples here)."""
        return self.tokenizer.encode([self.query_text(g) for g in groups], self.options.query_max_len)

    def __call__(self, groups: list[Group]) -> dict:
        queries = self.query_tokens(groups)
        passages = self.passage_tokens(groups)
        batch = {
            "query": self.tokenizer.collate(queries.ids, queries.type_ids),
            "passage": self.tokenizer.collate(passages.ids, passages.type_ids),
        }
        return with_teacher_scores(batch, groups)


class EmbedderTrainer(BgekitTrainer):
    """The Trainer with the contrastive / distillation loss in ``compute_loss``."""

    def __init__(self, *args, options: EmbedderOptions, pooling_method: str, **kwargs):
        super().__init__(*args, **kwargs)
        self.options = options
        self.pooling_method = pooling_method

    def embed(self, model: torch.nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        hidden = model(**inputs, return_dict=True).last_hidden_state
        vectors = pool(hidden, inputs["attention_mask"], self.pooling_method)
        return F.normalize(vectors, dim=-1) if self.options.normalize_embeddings else vectors

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        self.count_tokens(inputs["query"], inputs["passage"])
        q = self.embed(model, inputs["query"])
        p = self.embed(model, inputs["passage"])
        loss = self.loss_from_vectors(q, p, inputs.get("teacher_scores"), inputs)
        return (loss, {"q": q, "p": p}) if return_outputs else loss

    def loss_from_vectors(
        self, q: torch.Tensor, p: torch.Tensor, teacher: torch.Tensor | None, inputs: dict | None = None
    ) -> torch.Tensor:
        """Contrastive loss (+ distillation when the batch has teacher scores) of query and passage vectors.
        A same-dataset batch (``inputs``) brings its own group size, and ``in_batch=False`` for a
        ``no_in_batch_neg`` file: then each query meets its own passages only, on no other device either."""
        opts = self.options
        inputs = inputs or {}
        in_batch = opts.use_inbatch_neg and inputs.get("in_batch", True)
        return losses.embedding_loss(
            q,
            p,
            inputs.get("group_size", opts.train_group_size),
            opts.temperature,
            teacher,
            opts.kd_loss_type,
            in_batch=in_batch,
            cross_device=opts.negatives_cross_device,
            matryoshka_dims=opts.matryoshka_dims,
        )

    def training_step(self, model, inputs, num_items_in_batch=None):
        """The Trainer's step, or with ``sub_batch_size`` the gradient-cache step (same gradients,
        a fraction of the activation memory): see :mod:`bgekit.train.grad_cache`."""
        size = self.options.sub_batch_size
        if not size or (len(inputs["query"]["input_ids"]) <= size and len(inputs["passage"]["input_ids"]) <= size):
            return super().training_step(model, inputs, num_items_in_batch)
        model.train()
        inputs = self._prepare_inputs(inputs)
        self.count_tokens(inputs["query"], inputs["passage"])
        query_chunks = grad_cache.split_batch(inputs["query"], size)
        passage_chunks = grad_cache.split_batch(inputs["passage"], size)

        def embed(chunk: dict[str, torch.Tensor]) -> torch.Tensor:
            with self.compute_loss_context_manager():
                return self.embed(model, chunk)

        q, q_states = grad_cache.embed_without_graph(embed, query_chunks)
        p, p_states = grad_cache.embed_without_graph(embed, passage_chunks)
        q, p = q.detach().requires_grad_(), p.detach().requires_grad_()
        with self.compute_loss_context_manager():
            loss = self.loss_from_vectors(q, p, inputs.get("teacher_scores"), inputs)
        loss = loss / self.current_gradient_accumulation_steps
        with self.accelerator.no_sync(model):  # the loss touches no weight: nothing to all-reduce yet
            self.accelerator.backward(loss)
        no_sync = lambda: self.accelerator.no_sync(model)  # noqa: E731
        grad_cache.backward_through_chunks(embed, query_chunks, q_states, q.grad, no_sync, last_syncs=False)
        grad_cache.backward_through_chunks(embed, passage_chunks, p_states, p.grad, no_sync, last_syncs=True)
        return loss.detach()


def write_sentence_transformers_files(
    folder: Path, pooling_method: str, options: EmbedderOptions, *, decoder: bool = False
) -> None:
    """Module files so sentence-transformers (and bgekit's folder reader) know pooling, length, prompts;
    decoder folders also get ``bgekit.json`` (:func:`bgekit.hub.write_folder_metadata`)."""
    modes = {
        "cls": "pooling_mode_cls_token",
        "mean": "pooling_mode_mean_tokens",
        "last_token": "pooling_mode_lasttoken",
    }
    (folder / "1_Pooling").mkdir(parents=True, exist_ok=True)
    config = json.loads((folder / "config.json").read_text())
    pooling = {key: False for key in modes.values()}
    pooling[modes[pooling_method]] = True
    pooling["word_embedding_dimension"] = config.get("hidden_size")
    (folder / "1_Pooling" / "config.json").write_text(json.dumps(pooling, indent=2))
    modules = [
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
    ]
    if options.normalize_embeddings:
        modules.append({"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"})
        (folder / "2_Normalize").mkdir(exist_ok=True)
    (folder / "modules.json").write_text(json.dumps(modules, indent=2))
    (folder / "sentence_bert_config.json").write_text(
        json.dumps({"max_seq_length": options.passage_max_len, "do_lower_case": False}, indent=2)
    )
    prompts = {}
    if options.query_instruction_for_retrieval:
        prompts["query"] = options.query_instruction_format.format(options.query_instruction_for_retrieval, "")
    if options.passage_instruction_for_retrieval:
        prompts["passage"] = options.passage_instruction_for_retrieval
    settings = {"prompts": prompts, "default_prompt_name": None, "similarity_fn_name": "cosine"}
    (folder / "config_sentence_transformers.json").write_text(json.dumps(settings, indent=2))
    if decoder or not options.normalize_embeddings:  # what the module files do not tell bgekit
        write_embedder_metadata(folder, pooling_method, options, decoder=decoder)


def write_embedder_metadata(folder: Path, pooling_method: str, options: EmbedderOptions, *, decoder: bool) -> None:
    """``bgekit.json``: family, pooling and query prompt (and unnormalized vectors) of the trained model. A
    LoRA adapter folder always gets it: ``Embedder.from_pretrained(OUT/adapter)`` loads the base with the
    adapter as this family (it has no module files or config to tell)."""
    settings = {} if options.normalize_embeddings else {"normalize_embeddings": False}
    hub.write_folder_metadata(
        folder,
        registry.DECODER if decoder else registry.ENCODER,
        pooling_method,
        query_instruction_for_retrieval=options.query_instruction_for_retrieval or None,
        query_instruction_format=options.query_instruction_format,
        **settings,
    )


def finetune_embedder(options: EmbedderOptions) -> Path:
    """Fine-tune an embedder and save it in ``options.output_dir``; returns that folder."""
    from transformers import AutoModel, TrainerCallback

    resume = resolve_resume(options.resume_from_checkpoint, options.output_dir, options.overwrite_output_dir)

    files = training_data(options)  # validated before any model loads
    records = [r for _, _, file_records in files for r in file_records]
    if options.kd_loss_type not in KD_LOSSES:
        raise InputError(f"kd_loss_type must be one of {KD_LOSSES}, got {options.kd_loss_type!r}")
    options.query_instruction_format = unescape_format(
        options.query_instruction_format, what="query_instruction_format"
    )
    if options.matryoshka_dims and any(d < 1 for d in options.matryoshka_dims):
        raise InputError("matryoshka_dims must be positive")
    if options.sub_batch_size is not None and options.sub_batch_size < 1:
        raise InputError(f"sub_batch_size must be >= 1, got {options.sub_batch_size}")
    if options.sub_batch_size and options.deepspeed:
        raise InputError("sub_batch_size (gradient cache) does not work with DeepSpeed; use one or the other")
    if options.negatives_cross_device:  # every rank must hold the same number of queries
        options.extra.setdefault("dataloader_drop_last", True)
    options.check_lora()
    name, spec = hub.resolve(options.model_name_or_path, registry.EMBEDDERS, options.model_class)
    if (
        options.query_instruction_for_retrieval is None
        and any(r.prompt for r in records)
        and not (spec is not None and spec.kind == registry.ICL)
    ):
        logger.warning(
            "records carry a 'prompt' but no query instruction is set: the prompts are not used (as in "
            "FlagEmbedding); pass --query-instruction-for-retrieval to train with them"
        )
    if spec is not None and spec.kind == registry.PSEUDO_MOE:  # routing lives in the checkpoint's own code
        raise InputError("fine-tuning a pseudo-MoE (domain-routed) embedder is not supported; it embeds only")
    if spec is not None and spec.kind == registry.ICL:  # bge-en-icl: examples in the queries
        from .icl import finetune_icl

        return finetune_icl(options, files, name, spec)
    pooling_method = check_pooling(options.sentence_pooling_method or (spec.pooling_method if spec else None) or "cls")
    decoder = spec is not None and spec.kind == registry.DECODER
    if decoder:
        decoder_prompts(options, spec, pooling_method)
    args = options.training_arguments()
    dataset = group_dataset(records, files, options, args)  # checked before the model loads
    folder = hub.model_folder(name)
    hf_tokenizer = load_hf_tokenizer(lora.tokenizer_folder(folder, options))
    model = load_pretrained(AutoModel, folder, options, dtype=options.base_dtype(options.bf16))
    model, changed = lora.prepare_base(model, options)  # raw_peft adapters merged; saved embeddings loaded
    fit_lengths(options, model.config, "query_max_len", "passage_max_len")
    width = getattr(model.config, "hidden_size", None)
    if options.matryoshka_dims and width and max(options.matryoshka_dims) > width:
        raise InputError(f"matryoshka_dims {options.matryoshka_dims} go past the model's {width} dimensions")
    resized = changed | lora.add_special_tokens(
        hf_tokenizer, model, options.additional_special_tokens, from_adapter=bool(options.from_peft or options.raw_peft)
    )
    tokenizer = training_tokenizer(hf_tokenizer)  # after any added tokens, the same ids inference sees
    use_cache = getattr(model.config, "use_cache", None)
    if decoder:
        model.config.use_cache = False  # no key/value cache while training
    if options.fix_position_embedding:
        freeze_position_embeddings(model)
    if options.use_lora:
        model = lora.wrap(model, options, gradient_checkpointing=options.gradient_checkpointing)
    collator = EmbedderCollator(tokenizer, options)
    if options.same_dataset_within_batch:
        collator = SameSetCollator(collator)
    throughput = ThroughputCallback()
    output = Path(options.output_dir)

    class SaveModuleFiles(TrainerCallback):
        def on_save(self, args, state, control, **kwargs):
            checkpoint = output / f"checkpoint-{state.global_step}"
            # rank 0 alone: another rank could read config.json while rank 0 is still writing it
            if state.is_world_process_zero and (checkpoint / "config.json").exists():
                write_sentence_transformers_files(checkpoint, pooling_method, options, decoder=decoder)

    trainer = EmbedderTrainer(
        model=model,
        args=args,
        train_dataset=dataset,
        data_collator=collator,
        processing_class=hf_tokenizer,
        callbacks=[EpochCallback(dataset), throughput, SaveModuleFiles()],
        text_tokenizer=tokenizer,
        throughput=throughput,
        options=options,
        pooling_method=pooling_method,
    )
    trainer.train(resume_from_checkpoint=resume)
    if decoder:
        trainer.model.config.use_cache = use_cache  # the saved config as it came
    return lora.save_trained(  # with LoRA: OUT/adapter and the merged model in OUT (see bgekit.train.lora)
        trainer,
        hf_tokenizer,
        output,
        options,
        resized=resized,
        write_extra=lambda folder: write_sentence_transformers_files(folder, pooling_method, options, decoder=decoder),
        describe_adapter=lambda folder: write_embedder_metadata(folder, pooling_method, options, decoder=decoder),
    )


def decoder_prompts(options: EmbedderOptions, spec: registry.ModelSpec, pooling_method: str) -> None:
    """Decoder-only embedders pool the last token and prompt queries with the family's format
    (e.g. ``<instruct>{}\n<query>{}``) unless one was given, as :class:`~bgekit.FlagLLMModel` does."""
    if pooling_method != "last_token":
        raise InputError(
            f"{options.model_name_or_path} is a decoder-only model: it pools the last token, "
            f"not {pooling_method!r} (leave sentence_pooling_method unset)"
        )
    if options.query_instruction_format == "{}{}":
        options.query_instruction_format = spec.query_instruction_format
