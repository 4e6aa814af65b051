"""CLI for fine-tuning: ``bgekit finetune embedder|reranker``, ``bgekit mine``, ``bgekit score``,
``bgekit data beir-to-train``. Options keep FlagEmbedding's names (with dashes).

The same commands run on several devices or machines under torchrun:
``torchrun --nproc_per_node 2 -m bgekit.train finetune embedder ...``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

finetune_app = typer.Typer(
    help="Fine-tune embedders and rerankers (transformers Trainer; torchrun for several devices)."
)
data_app = typer.Typer(help="Prepare training data.")

TrainData = Annotated[list[Path], typer.Option("--train-data", help="Training JSONL file(s) or folder(s).")]
OutputDir = Annotated[Path, typer.Option("--output-dir", help="Where checkpoints and the final model go.")]
Model = Annotated[str, typer.Option("--model", "--model-name-or-path", "-m", help="Hub id or folder to start from.")]


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
Deepspeed = Annotated[str | None, typer.Option(help="DeepSpeed config file, passed to the Trainer.")]
Resume = Annotated[str | None, typer.Option(help="A checkpoint folder, or 'auto' for the newest in --output-dir.")]


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
        str | None, typer.Option(help="cls | mean | last_token (default: the model's)")
    ] = None,
    query_instruction_for_retrieval: Annotated[str | None, typer.Option()] = None,
    query_instruction_format: Annotated[str, typer.Option()] = "{}{}",
    passage_instruction_for_retrieval: Annotated[str | None, typer.Option()] = None,
    use_inbatch_neg: Annotated[bool, typer.Option("--use-inbatch-neg/--no-inbatch-neg")] = True,
    negatives_cross_device: Flag = False,
    kd_loss_type: Annotated[
        str, typer.Option(help="kl_div | m3_kd_loss (used when records carry teacher scores)")
    ] = "kl_div",
    matryoshka_dims: Annotated[str | None, typer.Option(help="Comma-separated dims, e.g. 384,256,128")] = None,
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
) -> None:
    """Fine-tune an embedder (InfoNCE with in-batch + hard negatives, optional distillation)."""
    from .embedder import EmbedderOptions, finetune_embedder

    options = EmbedderOptions(
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
        matryoshka_dims=[int(d) for d in matryoshka_dims.split(",")] if matryoshka_dims else None,
        sub_batch_size=sub_batch_size,
        resume_from_checkpoint=resume_from_checkpoint,
    )
    typer.echo(f"saved {finetune_embedder(options)}", err=True)


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
) -> None:
    """Fine-tune a cross-encoder reranker (group cross-entropy: 1 positive vs negatives)."""
    from .reranker import RerankerOptions, finetune_reranker

    options = RerankerOptions(
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
    )
    typer.echo(f"saved {finetune_reranker(options)}", err=True)


def mine(
    model: Model,
    input: Annotated[Path, typer.Option("--input", "-i", help="Training JSONL whose queries get negatives.")],
    output: Annotated[Path, typer.Option("--output", "-o", help="Where the mined JSONL goes.")],
    corpus: Annotated[Path | None, typer.Option(help="Candidate passages (JSONL with text/title, or text).")] = None,
    range_for_sampling: Annotated[str, typer.Option(help="Ranks to sample negatives from, e.g. 2-200.")] = "2-200",
    negative_number: Annotated[int, typer.Option(min=1)] = 15,
    margin: Annotated[
        float, typer.Option(help="Drop candidates scoring above margin x the positive's score; 0 = off.")
    ] = 0.95,
    max_score: Annotated[float | None, typer.Option(help="Drop candidates scoring above this.")] = None,
    query_instruction_for_retrieval: Annotated[str | None, typer.Option()] = None,
    batch_size: Annotated[int, typer.Option(min=1)] = 256,
    seed: Annotated[int, typer.Option()] = 42,
) -> None:
    """Mine hard negatives for every query with an embedder, guarding against false negatives."""
    from .. import io
    from ..models.embedder import Embedder
    from .data import load_train_data, write_records
    from .mining import MiningOptions, mine_hard_negatives, parse_range

    records = load_train_data(input)
    pool = [r.text for r in io.read_texts(corpus)] if corpus is not None else None
    options = (
        {}
        if query_instruction_for_retrieval is None
        else {"query_instruction_for_retrieval": query_instruction_for_retrieval}
    )
    embedder = Embedder.from_pretrained(model, **options)
    mined, stats = mine_hard_negatives(
        records,
        embedder,
        pool,
        MiningOptions(parse_range(range_for_sampling), negative_number, margin or None, max_score, batch_size, seed),
    )
    write_records(output, mined)
    typer.echo(f"wrote {output}: {len(mined)} records; dropped {stats}", err=True)


def score(
    reranker: Annotated[str, typer.Option("--reranker", "-r", help="Teacher reranker: hub id or folder.")],
    input: Annotated[Path, typer.Option("--input", "-i")],
    output: Annotated[Path, typer.Option("--output", "-o")],
    batch_size: Annotated[int, typer.Option(min=1)] = 128,
    fp16: Annotated[bool, typer.Option("--fp16/--no-fp16")] = True,
) -> None:
    """Add teacher scores (pos_scores, neg_scores) from a reranker to a training file."""
    from ..models.reranker import Reranker
    from .data import load_train_data, write_records
    from .teacher import score_records

    records = load_train_data(input)
    scored = score_records(records, Reranker.from_pretrained(reranker, use_fp16=fp16), batch_size)
    write_records(output, scored)
    typer.echo(f"wrote {output}: {len(scored)} scored records", err=True)


@data_app.command("beir-to-train")
def beir_to_train(
    dataset: Annotated[Path, typer.Option(help="BEIR-layout folder (corpus, queries, qrels/<split>.tsv).")],
    output: Annotated[Path, typer.Option("--output", "-o")],
    split: Annotated[str, typer.Option()] = "train",
) -> None:
    """Turn a retrieval dataset's judgements into training records (query + positives)."""
    from ..eval.datasets import load_retrieval_dataset
    from .beir import beir_to_records
    from .data import write_records

    records = beir_to_records(load_retrieval_dataset(dataset, split))
    write_records(output, records)
    typer.echo(f"wrote {output}: {len(records)} records", err=True)


def register(app: typer.Typer) -> None:
    """Add the training commands to the main ``bgekit`` app."""
    from ..cli import friendly_errors

    for group in (finetune_app, data_app):
        for command in group.registered_commands:
            command.callback = friendly_errors(command.callback)
    app.add_typer(finetune_app, name="finetune")
    app.add_typer(data_app, name="data")
    app.command("mine")(friendly_errors(mine))
    app.command("score")(friendly_errors(score))
