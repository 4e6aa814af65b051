"""CLI for fine-tuning: ``bgekit finetune embedder|reranker``, ``bgekit mine``, ``bgekit score``,
``bgekit data beir-to-train``. Options keep FlagEmbedding's names (with dashes).

The same commands run on several devices or machines under torchrun:
``torchrun --nproc_per_node 2 -m bgekit.train finetune embedder ...``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from typer.core import TyperCommand

from ..cli_options import (
    Bf16Opt,
    Fp16Opt,
    family_options,
    int_list,
    model_text,
    path_text,
    path_value,
    precision_options,
    text_value,
)

finetune_app = typer.Typer(
    help="Fine-tune embedders and rerankers (transformers Trainer; torchrun for several devices)."
)
data_app = typer.Typer(help="Prepare training data.")

TrainData = Annotated[
    list[Path], typer.Option("--train-data", help="Training JSONL file(s) or folder(s).", parser=path_value)
]
OutputDir = Annotated[
    Path, typer.Option("--output-dir", help="Where checkpoints and the final model go.", parser=path_value)
]
Overwrite = Annotated[
    bool,
    typer.Option(
        "--overwrite-output-dir",
        help="Start afresh in an --output-dir that holds an earlier run (else refused: resume it, or pick another).",
    ),
]
Model = Annotated[
    str,
    typer.Option("--model", "--model-name-or-path", "-m", help="Hub id or folder to start from.", parser=model_text),
]


def _common(
    output_dir: Path,
    epochs: float,
    max_steps: int,
    batch_size: int,
    learning_rate: float,
    group_size: int,
    grad_accum: int,
    gradient_checkpointing: bool,
    bf16: bool,
    fp16: bool,
    deepspeed: str | None,
    logging_steps: int,
    save_steps: int,
    seed: int,
) -> dict:
    return {
        "output_dir": str(output_dir),
        "num_train_epochs": epochs,
        "max_steps": max_steps,
        "per_device_train_batch_size": batch_size,
        "learning_rate": learning_rate,
        "train_group_size": group_size,
        "gradient_accumulation_steps": grad_accum,
        "gradient_checkpointing": gradient_checkpointing,
        "bf16": bf16,
        "fp16": fp16,
        "deepspeed": deepspeed,
        "logging_steps": logging_steps,
        "save_steps": save_steps,
        "seed": seed,
    }


Epochs = Annotated[float, typer.Option("--num-train-epochs", help="Passes over the data.")]
MaxSteps = Annotated[int, typer.Option(help="Stop after this many steps (overrides epochs when > 0).")]
BatchSize = Annotated[int, typer.Option("--per-device-train-batch-size", min=1, help="Queries per device per step.")]
GroupSize = Annotated[int, typer.Option(min=1, help="Passages per query: 1 positive + negatives.")]
GradAccum = Annotated[int, typer.Option("--gradient-accumulation-steps", min=1)]
Flag = Annotated[bool, typer.Option()]
Deepspeed = Annotated[str | None, typer.Option(help="DeepSpeed config file, passed to the Trainer.", parser=path_text)]
Resume = Annotated[
    str | None, typer.Option(help="A checkpoint folder, or 'auto' for the newest in --output-dir.", parser=path_text)
]
UseLora = Annotated[
    bool,
    typer.Option(
        "--lora/--no-lora", "--use-lora", help="Train a LoRA adapter (the lora extra): OUT = merged, OUT/adapter."
    ),
]
LoraRank = Annotated[int, typer.Option(help="LoRA rank r.")]
LoraAlpha = Annotated[float, typer.Option(help="LoRA scaling alpha.")]
LoraDropout = Annotated[float, typer.Option(help="Dropout on the LoRA input.")]
TargetModules = Annotated[
    str | None,
    typer.Option(
        help="Comma-separated LoRA module names (default: the architecture's, e.g. q_proj,...)", parser=text_value
    ),
]
SpecialTokens = Annotated[
    list[str] | None,
    typer.Option(help="Add this special token to the tokenizer (repeat the option for more).", parser=text_value),
]
FromPeft = Annotated[
    str | None,
    typer.Option(
        help="Go on training this LoRA adapter (a folder, or a --lora run's OUT), with its own rank; implies --lora.",
        parser=path_text,
    ),
]
RawPeft = Annotated[
    list[str] | None,
    typer.Option(
        help="Merge this LoRA adapter folder into the base before training (repeat for more, merged in order; "
        "a FlagEmbedding run's embedding/emb.pth is loaded too), as FlagEmbedding's raw_peft.",
        parser=path_text,
    ),
]
UseFlashAttn = Annotated[
    bool,
    typer.Option(
        "--use-flash-attn",
        help="Load the model with flash attention 2 (the flash-attn package, CUDA), as FlagEmbedding's option.",
    ),
]
ModulesToSave = Annotated[
    str | None,
    typer.Option(
        help="With --lora: comma-separated modules trained whole, saved in the adapter (e.g. embed_tokens).",
        parser=text_value,
    ),
]
KnowledgeDistillation = Annotated[
    bool | None,
    typer.Option(
        "--knowledge-distillation/--no-knowledge-distillation",
        help="Distil from the records' pos_scores/neg_scores (they must be there) / ignore them. "
        "Default: distil when they are there (FlagEmbedding's default ignores them).",
    ),
]
FixPositionEmbedding = Annotated[
    bool,
    typer.Option(
        "--fix-position-embedding",
        help="Freeze the position embeddings (parameters named position_embeddings), as FlagEmbedding's option.",
    ),
]
SameDataset = Annotated[
    bool,
    typer.Option(
        help="Every batch from one training file (its own batch size; no in-batch negatives for "
        "*no_in_batch_neg files), as FlagEmbedding's option."
    ),
]
SmallThreshold = Annotated[
    int, typer.Option(min=0, help="With --same-dataset-within-batch: a folder's files under N records merge.")
]
DropThreshold = Annotated[
    int, typer.Option(min=0, help="With --same-dataset-within-batch: ... unless they hold under N records in all.")
]
MaxExamples = Annotated[
    int | None,
    typer.Option(min=1, help="Train on at most N records of each training file, drawn at random (seeded)."),
]
ShuffleRatio = Annotated[
    float,
    typer.Option(
        min=0.0,
        max=1.0,
        help="Augmentation: this share of positives (over 100 characters) cut in 3 pieces at word breaks and shuffled.",
    ),
]
SaveMerged = Annotated[
    bool,
    typer.Option("--save-merged-model/--no-save-merged-model", help="With --lora, also save the merged model in OUT."),
]


def _train(run, options) -> None:
    """``run(options)``, a trainer, then ``saved OUT`` on stderr, once: under torchrun (or another launcher
    that sets ``RANK``) only rank 0 prints it, and the other ranks log bgekit's errors only and show no
    model-loading progress bars, so a 2-process run's output is not every line twice. The Trainer's own
    logs and bars are rank 0's already (``log_level_replica``)."""
    import logging
    import os

    main = int(os.environ.get("RANK", "0")) == 0
    if not main:
        from transformers.utils import logging as hf_logging

        logging.getLogger("bgekit").setLevel(logging.ERROR)
        hf_logging.disable_progress_bar()
    output = run(options)
    if main:
        typer.echo(f"saved {output}", err=True)


def _lora(
    use_lora: bool,
    lora_rank: int,
    lora_alpha: float,
    lora_dropout: float,
    target_modules: str | None,
    additional_special_tokens: list[str] | None,
    save_merged_model: bool,
    from_peft: str | None = None,
    modules_to_save: str | None = None,
    raw_peft: list[str] | None = None,
) -> dict:
    """The LoRA options (FlagEmbedding's names) as keyword arguments."""
    return {
        "from_peft": from_peft,
        "raw_peft": list(raw_peft) if raw_peft else None,
        "modules_to_save": [m.strip() for m in modules_to_save.split(",") if m.strip()] if modules_to_save else None,
        "use_lora": use_lora,
        "lora_rank": lora_rank,
        "lora_alpha": lora_alpha,
        "lora_dropout": lora_dropout,
        "target_modules": [t.strip() for t in target_modules.split(",") if t.strip()] if target_modules else None,
        "additional_special_tokens": list(additional_special_tokens) if additional_special_tokens else None,
        "save_merged_lora_model": save_merged_model,
    }


@finetune_app.command("embedder")
def finetune_embedder_cmd(
    model: Model,
    train_data: TrainData,
    output_dir: OutputDir,
    num_train_epochs: Epochs = 1.0,
    max_steps: MaxSteps = -1,
    per_device_train_batch_size: BatchSize = 16,
    learning_rate: Annotated[float, typer.Option()] = 5e-5,
    train_group_size: GroupSize = 2,
    gradient_accumulation_steps: GradAccum = 1,
    query_max_len: Annotated[int, typer.Option(min=4)] = 64,
    passage_max_len: Annotated[int, typer.Option(min=4)] = 256,
    temperature: Annotated[float, typer.Option(min=1e-4, help="0.05 suits MiniLM/e5; BGE recipes use 0.02.")] = 0.05,
    sentence_pooling_method: Annotated[
        str | None, typer.Option(help="cls | mean | last_token (default: the model's)", parser=text_value)
    ] = None,
    query_instruction_for_retrieval: Annotated[str | None, typer.Option(help="'' for none.")] = None,
    query_instruction_format: Annotated[
        str, typer.Option(help="Two {} slots: instruction, query.", parser=text_value)
    ] = "{}{}",
    passage_instruction_for_retrieval: Annotated[str | None, typer.Option(help="'' for none.")] = None,
    use_inbatch_neg: Annotated[bool, typer.Option("--use-inbatch-neg/--no-inbatch-neg")] = True,
    negatives_cross_device: Flag = False,
    kd_loss_type: Annotated[
        str, typer.Option(help="kl_div | m3_kd_loss (used when records carry teacher scores)", parser=text_value)
    ] = "kl_div",
    matryoshka_dims: Annotated[
        str | None, typer.Option(help="Comma-separated dims, e.g. 384,256,128", parser=text_value)
    ] = None,
    sub_batch_size: Annotated[
        int | None,
        typer.Option(min=1, help="Gradient cache: embed this many sequences at a time (same gradients, less memory)."),
    ] = None,
    gradient_checkpointing: Flag = False,
    bf16: Flag = False,
    fp16: Flag = False,
    deepspeed: Deepspeed = None,
    logging_steps: Annotated[int, typer.Option(min=1)] = 10,
    save_steps: Annotated[int, typer.Option(min=1)] = 500,
    seed: Annotated[int, typer.Option()] = 42,
    resume_from_checkpoint: Resume = None,
    overwrite_output_dir: Overwrite = False,
    use_lora: UseLora = False,
    lora_rank: LoraRank = 64,
    lora_alpha: LoraAlpha = 16.0,
    lora_dropout: LoraDropout = 0.1,
    target_modules: TargetModules = None,
    additional_special_tokens: SpecialTokens = None,
    save_merged_model: SaveMerged = True,
    from_peft: FromPeft = None,
    modules_to_save: ModulesToSave = None,
    raw_peft: RawPeft = None,
    use_flash_attn: UseFlashAttn = False,
    model_class: Annotated[
        str | None,
        typer.Option(
            help="The model's family, e.g. decoder-only-icl (default: the registry's/folder's).", parser=text_value
        ),
    ] = None,
    example_query_max_len: Annotated[int, typer.Option(min=1, help="ICL: tokens of an example's query.")] = 64,
    example_passage_max_len: Annotated[int, typer.Option(min=1, help="ICL: tokens of an example's response.")] = 96,
    retrieval_use_examples: Annotated[
        bool,
        typer.Option(
            "--retrieval-use-examples/--no-retrieval-use-examples", help="ICL: examples for retrieval records too."
        ),
    ] = True,
    icl_suffix_str: Annotated[
        str, typer.Option(help="ICL: what ends each query (FlagICLModel's; '' for none).")
    ] = "\\n<response>",
    max_examples: Annotated[int, typer.Option(min=0, help="ICL: up to this many examples per query (0..N drawn).")] = 5,
    same_dataset_within_batch: SameDataset = False,
    small_threshold: SmallThreshold = 0,
    drop_threshold: DropThreshold = 0,
    fix_position_embedding: FixPositionEmbedding = False,
    knowledge_distillation: KnowledgeDistillation = None,
    max_example_num_per_dataset: MaxExamples = None,
    shuffle_ratio: ShuffleRatio = 0.0,
) -> None:
    """Fine-tune an embedder (InfoNCE with in-batch + hard negatives, optional distillation; LoRA with --lora).

    ICL models (bge-en-icl, --model-class decoder-only-icl) train with in-context examples in the queries."""
    from .embedder import finetune_embedder
    from .icl import ICLOptions

    options = ICLOptions(
        **_common(
            output_dir,
            num_train_epochs,
            max_steps,
            per_device_train_batch_size,
            learning_rate,
            train_group_size,
            gradient_accumulation_steps,
            gradient_checkpointing,
            bf16,
            fp16,
            deepspeed,
            logging_steps,
            save_steps,
            seed,
        ),
        model_name_or_path=model,
        train_data=[str(p) for p in train_data],
        query_max_len=query_max_len,
        passage_max_len=passage_max_len,
        temperature=temperature,
        sentence_pooling_method=sentence_pooling_method,
        query_instruction_for_retrieval=query_instruction_for_retrieval,
        query_instruction_format=query_instruction_format.replace("\\n", "\n"),
        passage_instruction_for_retrieval=passage_instruction_for_retrieval,
        use_inbatch_neg=use_inbatch_neg,
        negatives_cross_device=negatives_cross_device,
        kd_loss_type=kd_loss_type,
        matryoshka_dims=int_list(matryoshka_dims, "--matryoshka-dims"),
        sub_batch_size=sub_batch_size,
        resume_from_checkpoint=resume_from_checkpoint,
        overwrite_output_dir=overwrite_output_dir,
        model_class=model_class,
        example_query_max_len=example_query_max_len,
        example_passage_max_len=example_passage_max_len,
        retrieval_use_examples=retrieval_use_examples,
        icl_suffix_str=icl_suffix_str.replace("\\n", "\n"),
        max_examples=max_examples,
        same_dataset_within_batch=same_dataset_within_batch,
        small_threshold=small_threshold,
        drop_threshold=drop_threshold,
        fix_position_embedding=fix_position_embedding,
        knowledge_distillation=knowledge_distillation,
        max_example_num_per_dataset=max_example_num_per_dataset,
        shuffle_ratio=shuffle_ratio,
        **_lora(
            use_lora,
            lora_rank,
            lora_alpha,
            lora_dropout,
            target_modules,
            additional_special_tokens,
            save_merged_model,
            from_peft,
            modules_to_save,
            raw_peft,
        ),
        use_flash_attn=use_flash_attn,
    )
    _train(finetune_embedder, options)


@finetune_app.command("reranker")
def finetune_reranker_cmd(
    model: Model,
    train_data: TrainData,
    output_dir: OutputDir,
    num_train_epochs: Epochs = 1.0,
    max_steps: MaxSteps = -1,
    per_device_train_batch_size: BatchSize = 8,
    learning_rate: Annotated[float, typer.Option()] = 3e-5,
    train_group_size: GroupSize = 8,
    gradient_accumulation_steps: GradAccum = 1,
    query_max_len: Annotated[int, typer.Option(min=4)] = 64,
    max_len: Annotated[int, typer.Option(min=8)] = 320,
    gradient_checkpointing: Flag = False,
    bf16: Flag = False,
    fp16: Flag = False,
    deepspeed: Deepspeed = None,
    logging_steps: Annotated[int, typer.Option(min=1)] = 10,
    save_steps: Annotated[int, typer.Option(min=1)] = 500,
    seed: Annotated[int, typer.Option()] = 42,
    resume_from_checkpoint: Resume = None,
    overwrite_output_dir: Overwrite = False,
    query_instruction_for_rerank: Annotated[
        str | None, typer.Option(help="Query prefix (LLM rerankers' default 'A: '; cross-encoders: none; '' for none).")
    ] = None,
    passage_instruction_for_rerank: Annotated[
        str | None,
        typer.Option(help="Passage prefix (LLM rerankers' default 'B: '; cross-encoders: none; '' for none)."),
    ] = None,
    prompt: Annotated[
        str | None,
        typer.Option(help="LLM rerankers: the question after the pair (default: FlagEmbedding's; '' for none)."),
    ] = None,
    use_lora: UseLora = False,
    lora_rank: LoraRank = 64,
    lora_alpha: LoraAlpha = 16.0,
    lora_dropout: LoraDropout = 0.1,
    target_modules: TargetModules = None,
    additional_special_tokens: SpecialTokens = None,
    save_merged_model: SaveMerged = True,
    from_peft: FromPeft = None,
    modules_to_save: ModulesToSave = None,
    raw_peft: RawPeft = None,
    use_flash_attn: UseFlashAttn = False,
    model_class: Annotated[
        str | None,
        typer.Option(
            help="The model's family, e.g. decoder-only-layerwise (default: the registry's or folder's).",
            parser=text_value,
        ),
    ] = None,
    start_layer: Annotated[
        int | None, typer.Option(help="Layerwise: train every layer from this one on (default: the model's).")
    ] = None,
    cutoff_layers: Annotated[
        str | None,
        typer.Option(help="Layerwise: comma-separated layers to train instead, e.g. 28,40.", parser=text_value),
    ] = None,
    knowledge_distillation: KnowledgeDistillation = None,
    max_example_num_per_dataset: MaxExamples = None,
    shuffle_ratio: ShuffleRatio = 0.0,
) -> None:
    """Fine-tune a reranker (group cross-entropy: 1 positive vs negatives; LoRA with --lora).

    A cross-encoder, or the "Yes" logit of a decoder-only (causal LM) model, or every cutoff layer of a
    layerwise one."""
    from .layerwise import LayerwiseOptions
    from .reranker import finetune_reranker

    options = LayerwiseOptions(
        **_common(
            output_dir,
            num_train_epochs,
            max_steps,
            per_device_train_batch_size,
            learning_rate,
            train_group_size,
            gradient_accumulation_steps,
            gradient_checkpointing,
            bf16,
            fp16,
            deepspeed,
            logging_steps,
            save_steps,
            seed,
        ),
        model_name_or_path=model,
        train_data=[str(p) for p in train_data],
        query_max_len=query_max_len,
        max_len=max_len,
        resume_from_checkpoint=resume_from_checkpoint,
        overwrite_output_dir=overwrite_output_dir,
        query_instruction_for_rerank=query_instruction_for_rerank,
        passage_instruction_for_rerank=passage_instruction_for_rerank,
        prompt=prompt,
        model_class=model_class,
        start_layer=start_layer,
        cutoff_layers=int_list(cutoff_layers, "--cutoff-layers"),
        knowledge_distillation=knowledge_distillation,
        max_example_num_per_dataset=max_example_num_per_dataset,
        shuffle_ratio=shuffle_ratio,
        **_lora(
            use_lora,
            lora_rank,
            lora_alpha,
            lora_dropout,
            target_modules,
            additional_special_tokens,
            save_merged_model,
            from_peft,
            modules_to_save,
            raw_peft,
        ),
        use_flash_attn=use_flash_attn,
    )
    _train(finetune_reranker, options)


def mine(
    model: Model,
    input: Annotated[
        Path, typer.Option("--input", "-i", help="Training JSONL whose queries get negatives.", parser=path_value)
    ],
    output: Annotated[Path, typer.Option("--output", "-o", help="Where the mined JSONL goes.", parser=path_value)],
    corpus: Annotated[
        Path | None,
        typer.Option(
            "--corpus",
            "--candidate-pool",
            help="Candidate passages (JSONL with text/title, or text, or a BEIR folder's corpus; online also a "
            "dataset name, as eval retrieval --dataset); default: every pos and neg of --input. CQADupStack's "
            "folder (or name): each forum's --input file (FORUM.jsonl in a folder) is mined in its own forum's "
            "corpus, into --output/FORUM.jsonl.",
            parser=path_value,
        ),
    ] = None,
    range_for_sampling: Annotated[
        str,
        typer.Option(
            help="Search ranks to sample from, 0-based, end excluded: 2-200 skips the top 2.", parser=text_value
        ),
    ] = "2-200",
    negative_number: Annotated[
        int, typer.Option(min=1, help="Negatives per query; topped up with random pool passages when short.")
    ] = 15,
    margin: Annotated[
        float, typer.Option(help="Drop candidates scoring above margin x the positive's score; 0 = off.")
    ] = 0.95,
    max_score: Annotated[float | None, typer.Option(help="Drop candidates scoring above this.")] = None,
    query_instruction_for_retrieval: Annotated[str | None, typer.Option(help="'' for none.")] = None,
    query_instruction_format: Annotated[
        str | None,
        typer.Option(help="Two {} slots: instruction, query (default: the model's).", parser=text_value),
    ] = None,
    model_class: Annotated[
        str | None,
        typer.Option(help="Embedder family override (e.g. decoder-only-base, decoder-only-icl).", parser=text_value),
    ] = None,
    pooling_method: Annotated[
        str | None, typer.Option(help="Pooling override: cls, mean or last_token.", parser=text_value)
    ] = None,
    examples: Annotated[
        Path | None, typer.Option(help="In-context examples for ICL models: JSON list or JSONL.", parser=path_value)
    ] = None,
    query_max_length: Annotated[int, typer.Option(min=1)] = 512,
    passage_max_length: Annotated[int, typer.Option(min=1)] = 512,
    batch_size: Annotated[int, typer.Option(min=1)] = 256,
    search_batch_size: Annotated[int, typer.Option(min=1, help="Queries per faiss search call.")] = 64,
    use_gpu_for_searching: Annotated[bool, typer.Option(help="Search on the GPUs faiss sees (faiss-gpu).")] = False,
    seed: Annotated[int, typer.Option()] = 42,
    fp16: Fp16Opt = True,
    bf16: Bf16Opt = False,
) -> None:
    """Mine hard negatives for every query with an embedder, guarding against false negatives."""
    from .. import io
    from ..eval.index import require_faiss
    from ..models.embedder import Embedder
    from .data import load_train_data, write_records
    from .mining import MiningOptions, mine_hard_negatives, parse_range

    require_faiss()  # before the data is read and the model loaded
    corpus = _corpus_dataset(corpus)
    forums = _corpus_forums(corpus)
    if forums is None:
        io.check_outputs(output, inputs=[input, corpus, examples])
    mining = MiningOptions(
        parse_range(range_for_sampling),
        negative_number,
        margin or None,
        max_score,
        batch_size,
        seed,
        search_batch_size,
        use_gpu_for_searching,
    )
    mining.check()  # a bad --margin found before the data is read and the model loaded, not after
    if forums is not None:  # CQADupStack: each forum's training file mined in its own corpus
        from .forums import check_forum_output, forum_corpus, forum_training_files

        files = forum_training_files(input, forums)
        check_forum_output(output, inputs=(input,))
        by_forum = {forum: load_train_data(path, read_scores=False) for forum, path in files.items()}
        pools = {forum.name: forum_corpus(forum) for forum in forums if forum.name in files}
    else:
        records = load_train_data(input, read_scores=False)  # its scores are replaced or dropped
        pool = [r.text for r in io.read_texts(_corpus_file(corpus))] if corpus is not None else None
    _, options = family_options(model, model_class, pooling_method, query_instruction_for_retrieval, examples)
    if query_instruction_format is not None:
        options["query_instruction_format"] = query_instruction_format
    options.update(query_max_length=query_max_length, passage_max_length=passage_max_length)
    embedder = Embedder.from_pretrained(model, **precision_options(fp16, bf16), **options)
    if forums is not None:
        from .forums import write_forum_files

        mined_by_forum = {}
        for forum, forum_records in by_forum.items():
            mined_by_forum[forum], stats = mine_hard_negatives(forum_records, embedder, pools[forum], mining)
            typer.echo(f"{forum}: {len(forum_records)} records; {stats}", err=True)
        written = write_forum_files(output, mined_by_forum)
        typer.echo(f"wrote {output}: {len(written)} forum files ({', '.join(p.name for p in written)})", err=True)
        return
    mined, stats = mine_hard_negatives(records, embedder, pool, mining)
    write_records(output, mined)
    typer.echo(f"wrote {output}: {len(mined)} records; {stats}", err=True)


def _corpus_dataset(corpus: Path | None) -> Path | None:
    """``--corpus`` named as ``eval retrieval --dataset`` names a dataset (``cqadupstack``, ``scifact``,
    ``cqadupstack/gis``, ``mteb/scifact``) is that dataset's folder, resolved (downloaded once, or the
    offline error naming it) by the code evaluation uses; a path here, or anything else, as given."""
    from ..eval.datasets import is_dataset_name, resolve_dataset

    if corpus is None or not is_dataset_name(corpus):
        return corpus
    return resolve_dataset(corpus)


def _corpus_forums(corpus: Path | None) -> list[Path] | None:
    """CQADupStack's forum folders when ``--corpus`` is its folder (each forum mined in its own corpus)."""
    from ..eval.datasets import cqadupstack_forums

    return cqadupstack_forums(corpus) if corpus is not None and corpus.is_dir() else None


def _corpus_file(corpus: Path) -> Path:
    """``--corpus`` as a file: a BEIR dataset folder is its ``corpus.jsonl``."""
    from ..errors import InputError

    if not corpus.is_dir():
        return corpus
    for name in ("corpus.jsonl", "corpus.jsonl.gz"):
        if (corpus / name).is_file():
            return corpus / name
    raise InputError(
        f"--corpus {corpus} is a folder without corpus.jsonl: pass a text or JSONL file, a BEIR dataset folder "
        "or CQADupStack's folder (its forums as subfolders)"
    )


def score(
    reranker: Annotated[
        str, typer.Option("--reranker", "-r", help="Teacher reranker: hub id or folder.", parser=model_text)
    ],
    input: Annotated[Path, typer.Option("--input", "-i", parser=path_value)],
    output: Annotated[Path, typer.Option("--output", "-o", parser=path_value)],
    batch_size: Annotated[int, typer.Option(min=1)] = 128,
    max_length: Annotated[int, typer.Option(min=8, help="Tokens per pair (passages are cut to fit).")] = 512,
    query_max_length: Annotated[
        int | None, typer.Option(min=1, help="Tokens per query (default: the family's, 3/4 of --max-length).")
    ] = None,
    normalize: Annotated[bool, typer.Option("--normalize", help="Sigmoid scores into (0, 1); default raw.")] = False,
    model_class: Annotated[
        str | None,
        typer.Option(
            help="The reranker's family, overriding the registry (e.g. decoder-only-layerwise).", parser=text_value
        ),
    ] = None,
    query_instruction_for_rerank: Annotated[str | None, typer.Option(help="'' for none.")] = None,
    passage_instruction_for_rerank: Annotated[str | None, typer.Option(help="'' for none.")] = None,
    prompt: Annotated[
        str | None, typer.Option(help="LLM rerankers' prompt (default: the family's; '' for none).")
    ] = None,
    cutoff_layers: Annotated[
        str | None,
        typer.Option(help="Layerwise / lightweight rerankers: the one layer that scores.", parser=text_value),
    ] = None,
    fp16: Fp16Opt = True,
    bf16: Bf16Opt = False,
) -> None:
    """Add teacher scores (pos_scores, neg_scores) from a reranker to a training file.

    As FlagEmbedding's add_reranker_score.py: every positive, then every negative, of each record; every
    other field of a record is kept."""
    from .. import io
    from ..models.reranker import Reranker
    from .data import load_train_data, write_records
    from .teacher import score_records

    io.check_outputs(output, inputs=[input])
    layers = int_list(cutoff_layers, "--cutoff-layers")
    if layers is not None and len(layers) != 1:
        raise typer.BadParameter(
            f"teacher scores come from one layer; got {len(layers)} ({cutoff_layers})", param_hint="--cutoff-layers"
        )
    _check_reranker_flags(reranker, model_class, cutoff_layers=layers, prompt=prompt)
    records = load_train_data(input, read_scores=False)  # its scores are replaced or dropped
    options = {
        "model_class": model_class,
        "max_length": max_length,
        "query_max_length": query_max_length,
        "normalize": normalize,
        "query_instruction_for_rerank": query_instruction_for_rerank,
        "passage_instruction_for_rerank": passage_instruction_for_rerank,
        "prompt": prompt,
        "cutoff_layers": layers,
    }
    teacher = Reranker.from_pretrained(reranker, **precision_options(fp16, bf16), **options)
    scored = score_records(records, teacher, batch_size)
    write_records(output, scored)
    typer.echo(f"wrote {output}: {len(scored)} scored records", err=True)


def _check_reranker_flags(name: str, model_class: str | None, **given: object) -> None:
    """``--cutoff-layers`` and ``--prompt`` are for the rerankers that read them (layerwise / lightweight;
    LLM rerankers): for another family they are an error before the model loads, as ``serve`` has them,
    not a Python warning that the option was ignored."""
    from .. import hub, registry
    from ..errors import InputError

    spec = hub.resolve(name, registry.RERANKERS, model_class, for_reranker=True)[1]
    if spec is None:
        return  # an unknown name: loading it says so
    layered = {registry.LAYERWISE_RERANKER, registry.LIGHTWEIGHT_RERANKER}
    takes = {"cutoff_layers": layered, "prompt": layered | {registry.LLM_RERANKER}}
    for key, value in given.items():
        if value is not None and spec.kind not in takes[key]:
            flag = "--" + key.replace("_", "-")
            raise InputError(f"{flag}: the reranker {name} ({spec.kind}) reads no such option; leave it out")


@data_app.command("beir-to-train")
def beir_to_train(
    dataset: Annotated[
        Path,
        typer.Option(
            help="BEIR-layout folder (corpus, queries, qrels/<split>.tsv). CQADupStack's folder (its forums as "
            "subfolders): one training file a forum, OUT/FORUM.jsonl.",
            parser=path_value,
        ),
    ],
    output: Annotated[
        Path,
        typer.Option(
            "--output", "-o", help="The JSONL file (for CQADupStack, the folder of FORUM.jsonl).", parser=path_value
        ),
    ],
    split: Annotated[str, typer.Option(parser=text_value)] = "train",
) -> None:
    """Turn a retrieval dataset's judgements into training records (query + positives)."""
    from .. import io
    from ..eval.datasets import cqadupstack_forums, dataset_files, load_retrieval_dataset
    from .beir import beir_to_records
    from .data import write_records

    forums = cqadupstack_forums(dataset)
    if forums is not None:  # CQADupStack: one training file a forum, each forum's data its own
        from .forums import check_forum_output, forum_records, write_forum_files

        check_forum_output(output)
        by_forum = forum_records(forums, split)
        written = write_forum_files(output, by_forum)
        total = sum(len(records) for records in by_forum.values())
        typer.echo(f"wrote {output}: {total} records in {len(written)} forum files (FORUM.jsonl)", err=True)
        return
    io.check_outputs(output, inputs=dataset_files(dataset, split))  # not over the queries it reads
    records = beir_to_records(load_retrieval_dataset(dataset, split))
    if not records:  # an empty training file would fail only at finetune, far from its cause
        from ..errors import InputError

        raise InputError(
            f"no judged query of {dataset} ({split}) has a relevant document (score > 0) in the corpus: "
            "no training records to write"
        )
    write_records(output, records)
    typer.echo(f"wrote {output}: {len(records)} records", err=True)


def finetune_m3_cmd(
    model: Model,
    train_data: TrainData,
    output_dir: OutputDir,
    num_train_epochs: Epochs = 1.0,
    max_steps: MaxSteps = -1,
    per_device_train_batch_size: BatchSize = 16,
    learning_rate: Annotated[float, typer.Option()] = 1e-5,
    train_group_size: GroupSize = 2,
    gradient_accumulation_steps: GradAccum = 1,
    query_max_len: Annotated[int, typer.Option(min=4)] = 64,
    passage_max_len: Annotated[int, typer.Option(min=4)] = 256,
    temperature: Annotated[float, typer.Option(min=1e-4)] = 0.02,
    unified_finetuning: Annotated[
        bool, typer.Option("--unified-finetuning/--no-unified-finetuning", help="Train dense, sparse and ColBERT.")
    ] = True,
    use_self_distill: Annotated[bool, typer.Option(help="Distil the heads' ensemble into each head.")] = False,
    self_distill_start_step: Annotated[int, typer.Option()] = -1,
    fix_encoder: Annotated[bool, typer.Option(help="Train only the heads; the encoder stays as it is.")] = False,
    heads: Annotated[
        str | None,
        typer.Option(
            help="Heads to train, e.g. dense,sparse,colbert (overrides --unified-finetuning).", parser=text_value
        ),
    ] = None,
    colbert_dim: Annotated[int, typer.Option(help="Output size of a new ColBERT head (-1: hidden size).")] = -1,
    sparse_loss_weight: Annotated[float, typer.Option(min=0)] = 0.1,
    sparse_floor: Annotated[
        float, typer.Option(min=0, help="Keep each text's strongest sparse weight above this (0: off).")
    ] = 0.05,
    query_instruction_for_retrieval: Annotated[str | None, typer.Option(help="'' for none.")] = None,
    query_instruction_format: Annotated[
        str, typer.Option(help="Two {} slots: instruction, query.", parser=text_value)
    ] = "{}{}",
    use_inbatch_neg: Annotated[bool, typer.Option("--use-inbatch-neg/--no-inbatch-neg")] = True,
    negatives_cross_device: Flag = False,
    kd_loss_type: Annotated[
        str, typer.Option(help="kl_div | m3_kd_loss (records with teacher scores)", parser=text_value)
    ] = "m3_kd_loss",
    gradient_checkpointing: Flag = False,
    bf16: Flag = False,
    fp16: Flag = False,
    deepspeed: Deepspeed = None,
    logging_steps: Annotated[int, typer.Option(min=1)] = 10,
    save_steps: Annotated[int, typer.Option(min=1)] = 500,
    seed: Annotated[int, typer.Option()] = 42,
    resume_from_checkpoint: Resume = None,
    overwrite_output_dir: Overwrite = False,
    fix_position_embedding: FixPositionEmbedding = False,
    knowledge_distillation: KnowledgeDistillation = None,
    same_dataset_within_batch: SameDataset = False,
    small_threshold: SmallThreshold = 0,
    drop_threshold: DropThreshold = 0,
    max_example_num_per_dataset: MaxExamples = None,
    shuffle_ratio: ShuffleRatio = 0.0,
) -> None:
    """Fine-tune BGE-M3: dense + sparse + ColBERT InfoNCE, ensemble loss, optional self-distillation."""
    from .m3 import M3Options, finetune_m3

    options = M3Options(
        **_common(
            output_dir,
            num_train_epochs,
            max_steps,
            per_device_train_batch_size,
            learning_rate,
            train_group_size,
            gradient_accumulation_steps,
            gradient_checkpointing,
            bf16,
            fp16,
            deepspeed,
            logging_steps,
            save_steps,
            seed,
        ),
        model_name_or_path=model,
        train_data=[str(p) for p in train_data],
        query_max_len=query_max_len,
        passage_max_len=passage_max_len,
        temperature=temperature,
        unified_finetuning=unified_finetuning,
        use_self_distill=use_self_distill,
        self_distill_start_step=self_distill_start_step,
        fix_encoder=fix_encoder,
        heads=[h.strip() for h in heads.split(",") if h.strip()] if heads is not None else None,
        colbert_dim=colbert_dim,
        sparse_loss_weight=sparse_loss_weight,
        sparse_floor=sparse_floor,
        query_instruction_for_retrieval=query_instruction_for_retrieval,
        query_instruction_format=query_instruction_format.replace("\\n", "\n"),
        use_inbatch_neg=use_inbatch_neg,
        negatives_cross_device=negatives_cross_device,
        kd_loss_type=kd_loss_type,
        resume_from_checkpoint=resume_from_checkpoint,
        overwrite_output_dir=overwrite_output_dir,
        fix_position_embedding=fix_position_embedding,
        knowledge_distillation=knowledge_distillation,
        same_dataset_within_batch=same_dataset_within_batch,
        small_threshold=small_threshold,
        drop_threshold=drop_threshold,
        max_example_num_per_dataset=max_example_num_per_dataset,
        shuffle_ratio=shuffle_ratio,
    )
    _train(finetune_m3, options)


def spread_values(args: list[str], names: tuple[str, ...]) -> list[str]:
    """``--models A B --weights 1 0`` (LM-Cocktail's spelling) as ``--models A --models B --weights 1
    --weights 0``, which click parses: every value up to the next option belongs to the last of
    ``names`` given. A token starting with ``-`` that is not a number ends the run of values."""
    out: list[str] = []
    current, waiting = None, False  # the option the values go to; whether its first value is still due
    for token in args:
        name, eq, _ = token.partition("=")
        if name in names:
            current, waiting = name, not eq
        elif token.startswith("-") and not _is_number(token):
            current = None
        elif current is not None and not waiting:
            out.append(current)
        else:
            waiting = False
        out.append(token)
    return out


def _is_number(token: str) -> bool:
    try:
        float(token)
    except ValueError:
        return False
    return True


class SpreadValuesCommand(TyperCommand):
    """A command whose ``--models`` / ``--weights`` take several values after one flag (see
    :func:`spread_values`), as well as one per flag."""

    spread = ("--models", "--weights")

    def parse_args(self, ctx, args: list[str]) -> list[str]:
        return super().parse_args(ctx, spread_values(args, self.spread))


def merge(
    models: Annotated[
        list[str],
        typer.Option(
            "--models",
            help="The models to merge, hub ids or folders, all of one architecture: --models A B [C ...] "
            "(or --models A --models B).",
            parser=model_text,
        ),
    ],
    output_dir: OutputDir,
    weights: Annotated[
        list[float] | None,
        typer.Option("--weights", help="One weight per model, in their order: --weights 0.7 0.3. Or --example-data."),
    ] = None,
    example_data: Annotated[
        Path | None,
        typer.Option(
            help="A few training JSONL records; each model's loss on them sets its weight.", parser=path_value
        ),
    ] = None,
    examples: Annotated[
        Path | None,
        typer.Option(
            help="ICL embedders (bge-en-icl): their in-context examples for --example-data, JSON list or JSONL "
            "(as encode --examples); the queries are scored behind them, as FlagICLModel embeds them.",
            parser=path_value,
        ),
    ] = None,
    model_type: Annotated[
        str, typer.Option(help="auto | embedder | reranker (for --example-data)", parser=text_value)
    ] = "auto",
    temperature: Annotated[float, typer.Option(help="Weights = softmax(-loss / temperature).")] = 5.0,
    max_examples: Annotated[int, typer.Option(min=1)] = 32,
    group_size: Annotated[int, typer.Option(min=1, help="Passages per example query.")] = 4,
    query_max_len: Annotated[int, typer.Option(min=4)] = 64,
    passage_max_len: Annotated[int, typer.Option(min=4)] = 256,
) -> None:
    """Merge same-architecture models by a weighted average of their weights (LM-Cocktail).

    --models with --weights (one per model), or with --example-data to set the weights from each model's
    loss on those records. The merged weights are saved in float32 whatever the models' dtypes (as
    LM-Cocktail saves them)."""
    from .merge import merge_models

    result = merge_models(
        models,
        weights or None,
        output_dir=output_dir,
        example_data=example_data,
        model_type=model_type,
        temperature=temperature,
        max_examples=max_examples,
        group_size=group_size,
        query_max_len=query_max_len,
        passage_max_len=passage_max_len,
        examples=examples,
    )
    for i, (name, weight) in enumerate(zip(models, result.weights, strict=True)):
        loss = f"  (example loss {result.losses[i]:.4f})" if result.losses else ""
        typer.echo(f"{weight:.4f}  {name}{loss}")
    typer.echo(f"saved {result.output_dir}", err=True)


def pretrain(
    model: Model,
    train_data: Annotated[
        list[Path], typer.Option("--train-data", help="Text or JSONL corpus file(s).", parser=path_value)
    ],
    output_dir: OutputDir,
    num_train_epochs: Epochs = 1.0,
    max_steps: MaxSteps = -1,
    per_device_train_batch_size: BatchSize = 16,
    learning_rate: Annotated[float, typer.Option()] = 1e-4,
    gradient_accumulation_steps: GradAccum = 1,
    max_seq_length: Annotated[int, typer.Option(min=8)] = 256,
    encoder_mlm_probability: Annotated[float, typer.Option()] = 0.3,
    decoder_mlm_probability: Annotated[float, typer.Option()] = 0.5,
    gradient_checkpointing: Flag = False,
    bf16: Flag = False,
    fp16: Flag = False,
    deepspeed: Deepspeed = None,
    logging_steps: Annotated[int, typer.Option(min=1)] = 10,
    save_steps: Annotated[int, typer.Option(min=1)] = 500,
    seed: Annotated[int, typer.Option()] = 42,
    resume_from_checkpoint: Resume = None,
    overwrite_output_dir: Overwrite = False,
) -> None:
    """Pre-train an encoder for retrieval (RetroMAE: MLM encoder + enhanced decoder from the CLS vector)."""
    from .pretrain import PretrainOptions
    from .pretrain import pretrain as run_pretrain

    options = PretrainOptions(
        **_common(
            output_dir,
            num_train_epochs,
            max_steps,
            per_device_train_batch_size,
            learning_rate,
            1,
            gradient_accumulation_steps,
            gradient_checkpointing,
            bf16,
            fp16,
            deepspeed,
            logging_steps,
            save_steps,
            seed,
        ),
        model_name_or_path=model,
        train_data=[str(p) for p in train_data],
        max_seq_length=max_seq_length,
        encoder_mlm_probability=encoder_mlm_probability,
        decoder_mlm_probability=decoder_mlm_probability,
        resume_from_checkpoint=resume_from_checkpoint,
        overwrite_output_dir=overwrite_output_dir,
    )
    _train(run_pretrain, options)


def register(app: typer.Typer) -> None:
    """Add the training commands to the main ``bgekit`` app."""
    from ..cli import friendly_errors

    if not any(c.name == "m3" for c in finetune_app.registered_commands):
        finetune_app.command("m3")(finetune_m3_cmd)
    for group in (finetune_app, data_app):
        for command in group.registered_commands:
            command.callback = friendly_errors(command.callback)
    app.add_typer(finetune_app, name="finetune")
    app.add_typer(data_app, name="data")
    app.command("mine")(friendly_errors(mine))
    app.command("score")(friendly_errors(score))
    app.command("merge", cls=SpreadValuesCommand)(friendly_errors(merge))
    app.command("pretrain")(friendly_errors(pretrain))
