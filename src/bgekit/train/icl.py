"""In-context-learning embedder fine-tuning (the bge-en-icl recipe), on the embedder Trainer.

Each training query may carry a few demonstrations drawn from OTHER records of the same
task (same file and same ``prompt``): their query and first positive, cut to
``example_query_max_len`` / ``example_passage_max_len`` tokens, become
``{"instruct": prompt, "query": ..., "response": ...}`` examples. As in FlagEmbedding the
number of examples is drawn uniformly from ``0..max_examples`` (so most queries get some),
and ``retrieval_use_examples=False`` keeps them only for ``symmetric*`` records.

The query prompt is built by the functions :class:`bgekit.FlagICLModel` itself uses
(:func:`~bgekit.models.llm.icl_examples_prefix`, :func:`~bgekit.models.llm.icl_query_tokens`),
so a query and its examples are the same token ids in training and at inference. Passages
are encoded plainly; pooling is the last token. Unlike FlagEmbedding's trainer, which cuts
examples and query together to ``query_max_len``, ``query_max_len`` is the query's own
budget, as ``query_max_length`` is at inference.

The saved folder holds a ``bgekit.json`` that marks it as the ICL family with its query
instruction and format, so ``Embedder.from_pretrained(folder)`` gives a ``FlagICLModel``.

Example:
    >>> from bgekit.train.icl import ICLOptions, finetune_icl  # doctest: +SKIP
    >>> options = ICLOptions(output_dir="out", model_name_or_path="BAAI/bge-en-icl", train_data=["train.jsonl"],
    ...     query_instruction_for_retrieval="Given a query, retrieve passages.")  # doctest: +SKIP
    >>> finetune_icl(options)  # doctest: +SKIP
"""

from __future__ import annotations

import logging
import random
from collections import defaultdict
from dataclasses import dataclass, fields
from pathlib import Path

from .. import hub, registry
from ..errors import DataFormatError, InputError
from ..models.embedder import unescape_format
from ..models.llm import (
    ICL_EXAMPLE_FORMAT,
    ICL_QUERY_FORMAT,
    ICL_SUFFIX,
    check_examples,
    icl_examples_prefix,
    icl_query_tokens,
)
from ..models.tokenization import TextTokenizer, Tokenized, load_hf_tokenizer
from . import lora
from .data import SYMMETRIC_TYPES, Group, GroupSampler, TrainRecord
from .embedder import EmbedderCollator, EmbedderOptions, EmbedderTrainer
from .same_dataset import SameSetCollator, SameSetDataset, same_set_dataset
from .trainer import (
    EpochCallback,
    GroupDataset,
    ThroughputCallback,
    freeze_position_embeddings,
    load_pretrained,
    resolve_resume,
    training_data,
    training_tokenizer,
)

logger = logging.getLogger(__name__)


@dataclass
class ICLOptions(EmbedderOptions):
    """Embedder options plus FlagEmbedding's ICL data options.

    ``query_instruction_format`` "{}{}" (the generic default) means the ICL layout
    ``"<instruct>{}\\n<query>{}"``; the examples are laid out as that format plus
    ``icl_suffix_str`` plus the response, the layout FlagICLModel reads.
    """

    example_query_max_len: int = 64
    example_passage_max_len: int = 96
    retrieval_use_examples: bool = True
    icl_suffix_str: str = ICL_SUFFIX
    max_examples: int = 5


@dataclass
class ICLGroup(Group):
    """A :class:`~bgekit.train.data.Group` with its in-context examples."""

    examples: list[dict[str, str]]


def as_icl_options(options: EmbedderOptions) -> ICLOptions:
    """A copy of ``options`` as :class:`ICLOptions` (ICL defaults for what plain options lack)."""
    return ICLOptions(**{f.name: getattr(options, f.name) for f in fields(options)})


class ExamplePicker:
    """Draws a record's demonstrations from other records of its task (file and prompt).

    ``tokenizer`` (which cuts the examples) may be set after the records are checked, once it is loaded."""

    def __init__(self, records: list[TrainRecord], tokenizer: TextTokenizer | None, options: ICLOptions):
        self.records = records
        self.tokenizer = tokenizer
        self.options = options
        self.tasks: dict[tuple[str, str | None], list[int]] = defaultdict(list)
        for index, record in enumerate(records):
            self.tasks[self.task(record)].append(index)
            if record.type == "symmetric_clustering":
                category = (record.raw or {}).get("category")
                if not isinstance(category, str) or not category.strip():
                    path, _, line = record.source.rpartition(":")
                    raise DataFormatError(
                        path or "training records",
                        int(line) if line.isdigit() else None,
                        "a 'symmetric_clustering' record needs a 'category' (a non-empty string): it is the "
                        "response when the record is another query's in-context example",
                    )
        self._cut: dict[int, tuple[str, str]] = {}

    @staticmethod
    def task(record: TrainRecord) -> tuple[str, str | None]:
        return record.source.rsplit(":", 1)[0], record.prompt

    def wants_examples(self, record: TrainRecord) -> bool:
        return self.options.retrieval_use_examples or (record.type or "").startswith("symmetric")

    def pick(self, index: int, epoch: int, instruction: str | None) -> list[dict[str, str]]:
        record = self.records[index]
        if not self.wants_examples(record):
            return []
        rng = random.Random(hash((self.options.seed, epoch, index, 1)))  # ints only: the same in every process
        count = rng.randint(0, self.options.max_examples)
        task = self.tasks[self.task(record)]
        # one more than needed, then drop the record itself (FlagEmbedding's way; no scan of the task)
        chosen = [task[k] for k in rng.sample(range(len(task)), min(count + 1, len(task)))]
        chosen = [i for i in chosen if i != index][:count]
        examples = []
        for i in chosen:
            query, response = self.cut(i)
            example = {"query": query, "response": response}
            if instruction is not None:
                example["instruct"] = instruction
            examples.append(example)
        return examples

    def cut(self, index: int) -> tuple[str, str]:
        """Record ``index``'s query and first positive (a ``symmetric_clustering`` record's ``category``, as
        FlagEmbedding 1.4.2 answers its examples), cut to the example lengths (decoded when cut)."""
        if index not in self._cut:
            record = self.records[index]
            response = record.raw["category"] if record.type == "symmetric_clustering" else record.pos[0]
            self._cut[index] = (
                self._shorten(record.query, self.options.example_query_max_len),
                self._shorten(response, self.options.example_passage_max_len),
            )
        return self._cut[index]

    def _shorten(self, text: str, limit: int) -> str:
        (ids,), cut = self.tokenizer.plain_ids([text], limit)
        return self.tokenizer.hf.decode(ids) if cut else text


class ICLDataset(GroupDataset):
    """Groups as for the plain embedder, each with its examples for this epoch."""

    def __init__(self, sampler: GroupSampler, picker: ExamplePicker, options: ICLOptions):
        super().__init__(sampler)
        self.picker = picker
        self.options = options

    def __getitem__(self, index: int) -> ICLGroup:
        return with_examples(super().__getitem__(index), index, self.epoch, self.picker, self.options)


class ICLSameSetDataset(SameSetDataset):
    """``same_dataset_within_batch`` for ICL embedders: every batch from one training file, each query
    with examples from other records of its file and prompt (FlagEmbedding takes them from the query's
    own batch, of one file too)."""

    def __init__(self, *args, picker: ExamplePicker, options: ICLOptions, **kwargs):
        super().__init__(*args, **kwargs)
        self.picker = picker
        self.options = options

    def make_group(self, index: int, group_size: int) -> ICLGroup:
        return with_examples(super().make_group(index, group_size), index, self.epoch, self.picker, self.options)


def with_examples(group: Group, index: int, epoch: int, picker: ExamplePicker, options: ICLOptions) -> ICLGroup:
    """Record ``index``'s group with its examples for ``epoch``."""
    instruction = query_instruction(group, options)
    return ICLGroup(**vars(group), examples=picker.pick(index, epoch, instruction))


def query_instruction(group: Group, options: ICLOptions) -> str | None:
    return group.prompt if group.prompt is not None else options.query_instruction_for_retrieval


class ICLCollator(EmbedderCollator):
    """Queries behind their examples (FlagICLModel's prompt builder); passages as the plain embedder."""

    options: ICLOptions

    def query_tokens(self, groups: list[ICLGroup]) -> Tokenized:
        opts = self.options
        queries, prefixes = [], []
        for group in groups:
            instruction = query_instruction(group, opts)
            queries.append(
                group.query if instruction is None else opts.query_instruction_format.format(instruction, group.query)
            )
            prefixes.append(icl_examples_prefix(group.examples, instruction, example_format(opts)))
        return icl_query_tokens(self.tokenizer, queries, prefixes, opts.query_max_len, opts.icl_suffix_str)

    def query_text(self, group: Group, text: str | None = None) -> str:
        """The query (or ``text``) behind the record's prompt or the query instruction (plain when neither
        is set, as :meth:`query_tokens` does)."""
        instruction = query_instruction(group, self.options)
        text = group.query if text is None else text
        return text if instruction is None else self.options.query_instruction_format.format(instruction, text)

    def passage_tokens(self, groups: list[ICLGroup]) -> Tokenized:
        """Plain passages as the plain embedder; a ``symmetric_sts`` / ``symmetric_clustering`` record's
        passages laid out as queries without examples (instruction, ICL suffix: FlagEmbedding 1.4.2), the
        prompt ``FlagICLModel.encode_queries`` gives them at inference, cut to ``passage_max_len``."""
        opts = self.options
        texts = [(g.type in SYMMETRIC_TYPES, t) for g in groups for t in self.passage_texts(g)]
        plain = self.tokenizer.encode([t for symmetric, t in texts if not symmetric], opts.passage_max_len)
        symmetric = [t for is_symmetric, t in texts if is_symmetric]
        if not symmetric:
            return plain
        asked = icl_query_tokens(
            self.tokenizer, symmetric, [""] * len(symmetric), opts.passage_max_len, opts.icl_suffix_str
        )
        parts = {
            False: iter(zip(plain.ids, plain.type_ids or [None] * len(plain.ids), strict=True)),
            True: iter(zip(asked.ids, asked.type_ids or [None] * len(asked.ids), strict=True)),
        }
        rows = [next(parts[is_symmetric]) for is_symmetric, _ in texts]
        type_ids = (
            None
            if plain.type_ids is None and asked.type_ids is None
            else [t if t is not None else [0] * len(i) for i, t in rows]
        )
        return Tokenized([i for i, _ in rows], type_ids, plain.truncated + asked.truncated)


class ICLInferenceCollator(EmbedderCollator):
    """Queries laid out as a saved ICL model's ``FlagICLModel.tokenize_queries`` lays them out: instructed,
    behind the model's few-shot examples (one block for every query), ending with its ICL suffix. For
    scoring a model as it will be used (``bgekit merge --example-data``), not for training."""

    prefix = ""
    suffix = ICL_SUFFIX

    def use_model_prompts(self, folder: Path, examples: list[dict[str, str]] | None) -> None:
        """The folder's suffix and example layout (its ``bgekit.json``; bge-en-icl's by default) and
        ``examples`` as ``examples_for_task``."""
        meta = hub.read_folder_metadata(folder) or {}
        self.suffix = meta.get("icl_suffix_str", ICL_SUFFIX)
        layout = meta.get("examples_instruction_format", ICL_EXAMPLE_FORMAT)
        examples = check_examples(examples)
        instruction = self.options.query_instruction_for_retrieval
        # an empty list is FlagICLModel's "\n\n" (FlagEmbedding 1.4.2's set_examples)
        self.prefix = "\n\n" if examples == [] else icl_examples_prefix(examples, instruction, layout)

    def query_tokens(self, groups: list[Group]) -> Tokenized:
        opts = self.options
        instruction = opts.query_instruction_for_retrieval
        texts = [
            g.query if instruction is None else opts.query_instruction_format.format(instruction, g.query)
            for g in groups
        ]
        return icl_query_tokens(self.tokenizer, texts, [self.prefix] * len(texts), opts.query_max_len, self.suffix)


def example_format(options: ICLOptions) -> str:
    """``query_instruction_format + icl_suffix_str + "{}"``: FlagEmbedding joins an example's
    instructed query and its response with the suffix; with the defaults this is FlagICLModel's
    ``"<instruct>{}\\n<query>{}\\n<response>{}"``."""
    return options.query_instruction_format + options.icl_suffix_str.replace("{", "{{").replace("}", "}}") + "{}"


def check_icl_options(options: ICLOptions, spec: registry.ModelSpec | None) -> ICLOptions:
    """Fill the ICL defaults (format, the registry's instruction) and reject what inference could not reproduce."""
    if options.query_instruction_format == "{}{}":
        options.query_instruction_format = spec.query_instruction_format if spec else "{}{}"
        if options.query_instruction_format == "{}{}":
            options.query_instruction_format = ICL_QUERY_FORMAT
    options.query_instruction_format = unescape_format(
        options.query_instruction_format, what="query_instruction_format"
    )
    if options.query_instruction_format != ICL_QUERY_FORMAT:
        logger.warning(
            "query_instruction_format %r is not FlagICLModel's default: load the model with "
            "examples_instruction_format=%r so examples read as in training",
            options.query_instruction_format,
            example_format(options),
        )
    options.icl_suffix_str = options.icl_suffix_str.replace("\\n", "\n")
    if options.icl_suffix_str != ICL_SUFFIX:
        raise InputError(
            f"icl_suffix_str must be {ICL_SUFFIX!r}: FlagICLModel ends every query with it, so a model trained with "
            f"{options.icl_suffix_str!r} would be asked with other prompts than it learned"
        )
    if options.query_instruction_for_retrieval is None and spec is not None:
        options.query_instruction_for_retrieval = spec.query_instruction
    for name in ("example_query_max_len", "example_passage_max_len"):
        if getattr(options, name) < 1:
            raise InputError(f"{name} must be >= 1, got {getattr(options, name)}")
    if options.max_examples < 0:
        raise InputError(f"max_examples must be >= 0, got {options.max_examples}")
    if options.sentence_pooling_method not in (None, "last_token"):
        raise InputError(
            f"ICL embedders pool the last token; sentence_pooling_method={options.sentence_pooling_method!r} "
            "is not supported"
        )
    if options.matryoshka_dims:
        raise InputError("matryoshka_dims is not supported for ICL embedders")
    return options


def write_metadata(folder: Path, options: ICLOptions) -> None:
    """``bgekit.json``: the family and prompt settings that ``Embedder.from_pretrained`` reads."""
    hub.write_folder_metadata(
        folder,
        registry.ICL,
        "last_token",
        query_instruction_for_retrieval=options.query_instruction_for_retrieval,
        query_instruction_format=options.query_instruction_format,
        examples_instruction_format=example_format(options),
        icl_suffix_str=options.icl_suffix_str,
        normalize_embeddings=options.normalize_embeddings,
    )


def finetune_icl(
    options: EmbedderOptions,
    files: list[tuple[Path, Path | None, list[TrainRecord]]] | None = None,
    name: str | None = None,
    spec: registry.ModelSpec | None = None,
) -> Path:
    """Fine-tune an ICL embedder and save it in ``options.output_dir``; returns that folder.

    ``bgekit.train.embedder.finetune_embedder`` calls this for ``decoder-only-icl`` models
    (plain :class:`~bgekit.train.embedder.EmbedderOptions` get the ICL defaults).
    """
    resume = resolve_resume(options.resume_from_checkpoint, options.output_dir, options.overwrite_output_dir)
    from transformers import AutoModel, TrainerCallback

    options = as_icl_options(options)
    if files is None:
        files = training_data(options)
    records = [r for _, _, file_records in files for r in file_records]
    if name is None:
        name, spec = hub.resolve(options.model_name_or_path, registry.EMBEDDERS, options.model_class or registry.ICL)
    options = check_icl_options(options, spec)
    options.check_lora()
    if options.query_instruction_for_retrieval is None and not any(r.prompt for r in records):
        logger.warning("no query instruction and no record prompts: examples will read '<instruct>None'")
    args = options.training_arguments()
    sampler = GroupSampler.from_options(records, options)
    picker = ExamplePicker(records, None, options)  # checks the records; cuts examples once the tokenizer loads
    if options.same_dataset_within_batch:  # one item is one batch, of one file; checked before the model loads
        dataset = same_set_dataset(files, sampler, options, args, ICLSameSetDataset, picker=picker, options=options)
    else:
        dataset = ICLDataset(sampler, picker, options)
    folder = hub.model_folder(name)
    hf_tokenizer = load_hf_tokenizer(lora.tokenizer_folder(folder, options))
    model = load_pretrained(AutoModel, folder, options, dtype=options.base_dtype(options.bf16))
    model, changed = lora.prepare_base(model, options)  # raw_peft adapters merged; saved embeddings loaded
    resized = changed | lora.add_special_tokens(
        hf_tokenizer, model, options.additional_special_tokens, from_adapter=bool(options.from_peft or options.raw_peft)
    )
    tokenizer = training_tokenizer(hf_tokenizer)  # after any added tokens, the same ids inference sees
    use_cache, model.config.use_cache = getattr(model.config, "use_cache", None), False  # no cache in training
    if options.fix_position_embedding:
        freeze_position_embeddings(model)
    if options.use_lora:
        model = lora.wrap(model, options, gradient_checkpointing=options.gradient_checkpointing)
    picker.tokenizer = tokenizer
    collator = ICLCollator(tokenizer, options)
    throughput = ThroughputCallback()
    output = Path(options.output_dir)

    class SaveMetadata(TrainerCallback):
        def on_save(self, args, state, control, **kwargs):
            checkpoint = output / f"checkpoint-{state.global_step}"
            if (checkpoint / "config.json").exists() and state.is_world_process_zero:
                write_metadata(checkpoint, options)

    trainer = EmbedderTrainer(
        model=model,
        args=args,
        train_dataset=dataset,
        data_collator=SameSetCollator(collator) if options.same_dataset_within_batch else collator,
        processing_class=hf_tokenizer,
        callbacks=[EpochCallback(dataset), throughput, SaveMetadata()],
        text_tokenizer=tokenizer,
        throughput=throughput,
        options=options,
        pooling_method="last_token",
    )
    trainer.train(resume_from_checkpoint=resume)
    trainer.model.config.use_cache = use_cache  # the saved config as it came
    return lora.save_trained(  # with LoRA: OUT/adapter and the merged model in OUT (see bgekit.train.lora)
        trainer,
        hf_tokenizer,
        output,
        options,
        resized=resized,
        write_extra=lambda folder: write_metadata(folder, options),
        describe_adapter=lambda folder: write_metadata(folder, options),
    )
