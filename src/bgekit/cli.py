"""The ``bgekit`` command line: every command is a thin wrapper over the Python API.

Flags mirror the Python keyword names. Errors bgekit raises on purpose are printed as
one line (``error: ...``) with exit status 2, never as a traceback.
"""

from __future__ import annotations

import functools
import gzip
import inspect
import json
import logging
import sys
from enum import StrEnum
from pathlib import Path
from typing import Annotated

import typer

from .cli_options import (
    BACKEND_HELP,
    Backend,
    Bf16Opt,
    Fp16Opt,
    Packing,
    backend_options,
    family_options,
    model_text,
    packing_options,
    path_value,
    precision_options,
    text_value,
)
from .errors import BgekitError, InputError

app = typer.Typer(
    name="bgekit",
    help="Embed, rerank and list BGE-style models.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


class OutputFormat(StrEnum):
    npy = "npy"
    jsonl = "jsonl"


def friendly_errors(fn):
    """Turn bgekit's own errors, and a full disk or read-only folder, into one clear line and exit
    status 2."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except BgekitError as exc:
            typer.echo(f"error: {exc}", err=True)
            raise typer.Exit(2) from None
        except OSError as exc:  # a full disk or read-only folder met outside bgekit's own writers
            from .io import WRITE_ERRNOS

            if exc.errno not in WRITE_ERRNOS:
                raise
            typer.echo(f"error: {exc.strerror}: {exc.filename or 'while writing'}", err=True)
            raise typer.Exit(2) from None

    return wrapper


VerboseOpt = Annotated[bool, typer.Option("--verbose", "-v", help="Log progress details.")]


@app.callback()
def main(verbose: VerboseOpt = False) -> None:
    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
    )


def takes_verbose(fn):
    """``fn`` with a ``-v/--verbose`` option of its own, so the flag may follow the command's name
    (``bgekit embed ... -v``) as well as precede it (``bgekit -v embed ...``). typer reads the
    options from the signature, so the wrapper's signature is ``fn``'s plus ``verbose``."""
    signature = inspect.signature(fn, eval_str=True)
    if "verbose" in signature.parameters:
        return fn

    @functools.wraps(fn)
    def wrapper(*args, verbose: bool = False, **kwargs):
        if verbose:  # the root callback has set up logging at WARNING by now
            logging.getLogger().setLevel(logging.INFO)
        return fn(*args, **kwargs)

    flag = inspect.Parameter("verbose", inspect.Parameter.KEYWORD_ONLY, default=False, annotation=VerboseOpt)
    wrapper.__signature__ = signature.replace(parameters=[*signature.parameters.values(), flag])
    return wrapper


def _group_verbose(verbose: VerboseOpt = False) -> None:
    # no docstring: typer would show it as the group's help
    if verbose:
        logging.getLogger().setLevel(logging.INFO)


def _verbose_everywhere(group: typer.Typer) -> None:
    """:func:`takes_verbose` on every command of ``group`` and of the groups under it, and a
    ``-v/--verbose`` on each group, so it may also sit between the two (``bgekit finetune -v embedder``)."""
    for command in group.registered_commands:
        command.callback = takes_verbose(command.callback)
    for sub in group.registered_groups:
        own = getattr(sub.callback, "value", sub.callback)  # add_typer(callback=...), a placeholder if none
        if own is None and sub.typer_instance.registered_callback is None:
            sub.typer_instance.callback()(_group_verbose)
        _verbose_everywhere(sub.typer_instance)


ModelOpt = Annotated[
    str | None,
    typer.Option(
        "--model",
        "-m",
        help="Hub id or local folder. Default: BAAI/bge-small-en-v1.5, offline all-MiniLM-L6-v2.",
        parser=model_text,
    ),
]
DevicesOpt = Annotated[
    list[str] | None,
    typer.Option("--device", help="Device(s), e.g. cpu or cuda:0; repeat for several.", parser=text_value),
]
BackendOpt = Annotated[Backend, typer.Option(help=BACKEND_HELP)]
PackedOpt = Annotated[
    Packing,
    typer.Option(
        help="Lay each batch's texts end to end instead of padding them: auto (on for CUDA fp16/bf16), on, off. "
        "Same results within rounding.",
    ),
]


@app.command()
@friendly_errors
def embed(
    input: Annotated[
        Path,
        typer.Option(
            "--input", "-i", help="Text file (one item a line) or JSONL with 'text' [+ 'title'].", parser=path_value
        ),
    ],
    output: Annotated[
        Path,
        typer.Option("--output", "-o", help="Where to write: .npy (rows in input order) or .jsonl.", parser=path_value),
    ],
    model: ModelOpt = None,
    queries: Annotated[bool, typer.Option("--queries", help="Inputs are queries: add the query instruction.")] = False,
    query_instruction: Annotated[
        str | None, typer.Option(help="Query instruction (overrides the model's; '' for none).")
    ] = None,
    batch_size: Annotated[int, typer.Option(min=1)] = 256,
    max_length: Annotated[int | None, typer.Option(min=1, help="Token limit; longer texts are truncated.")] = None,
    text_field: Annotated[
        str | None,
        typer.Option(help="JSONL field holding the text (default: text); JSONL input only.", parser=text_value),
    ] = None,
    output_format: Annotated[
        OutputFormat | None, typer.Option("--format", help="npy or jsonl; default from the suffix.")
    ] = None,
    device: DevicesOpt = None,
    fp16: Fp16Opt = True,
    bf16: Bf16Opt = False,
    packed: PackedOpt = Packing.auto,
    normalize: Annotated[bool, typer.Option("--normalize/--no-normalize", help="L2-normalize the vectors.")] = True,
    examples: Annotated[
        Path | None,
        typer.Option(
            help="In-context examples for ICL models (bge-en-icl): JSON list or JSONL of "
            "{'instruct', 'query', 'response'}; used with --queries.",
            parser=path_value,
        ),
    ] = None,
    model_class: Annotated[
        str | None,
        typer.Option(
            help="Family override: encoder-only-base, encoder-only-m3, decoder-only-base, decoder-only-icl, "
            "decoder-only-pseudo_moe.",
            parser=text_value,
        ),
    ] = None,
    pooling_method: Annotated[
        str | None, typer.Option(help="Pooling override: cls, mean or last_token.", parser=text_value)
    ] = None,
    backend: BackendOpt = Backend.torch,
    sparse: Annotated[
        Path | None,
        typer.Option(
            help="M3 models: also write lexical weights here as JSONL {'id', 'lexical_weights'}.", parser=path_value
        ),
    ] = None,
    colbert: Annotated[
        Path | None,
        typer.Option(
            help="M3 models: also write ColBERT vectors here (.npz: vectors, offsets, ids).", parser=path_value
        ),
    ] = None,
    ray: Annotated[
        bool,
        typer.Option(
            "--ray",
            help="Encode on Ray Data into OUTPUT as a folder of Parquet shards (id, embedding), resumable; "
            "INPUT may be JSONL, text or Parquet, local or a URI (s3://...).",
        ),
    ] = False,
    address: Annotated[
        str | None,
        typer.Option(help="With --ray: the Ray cluster to join (default: start a local one).", parser=text_value),
    ] = None,
    num_workers: Annotated[
        int | None, typer.Option(min=1, help="With --ray: model copies (default: one per GPU, else per CPU).")
    ] = None,
    shard_size: Annotated[int, typer.Option(min=1, help="With --ray: input rows per output shard.")] = 10_000,
) -> None:
    """Embed every line (or JSONL record) of INPUT and save the vectors."""
    if not queries and (query_instruction or examples is not None):  # '' (no instruction) is no change
        flags = " and ".join(f for f, v in (("--query-instruction", query_instruction), ("--examples", examples)) if v)
        raise InputError(f"{flags} shape queries and INPUT is embedded as passages: add --queries, or leave it out")
    if ray:
        if sparse or colbert or output_format is not None or device:
            raise InputError(
                "--ray writes dense Parquet shards and gives each worker its own device; "
                "drop --sparse, --colbert, --format and --device"
            )
        _embed_on_ray(
            input, output, model, queries=queries, query_instruction=query_instruction, batch_size=batch_size,
            max_length=max_length, text_field=text_field, fp16=fp16, bf16=bf16, normalize=normalize, examples=examples,
            model_class=model_class, pooling_method=pooling_method, address=address, num_workers=num_workers,
            shard_size=shard_size, backend=backend, packed=packed,
        )  # fmt: skip
        return
    import numpy as np

    from . import hub, io, registry
    from .models.embedder import Embedder

    io.check_outputs(output, sparse, colbert, inputs=[input, examples])
    records = io.read_texts(input, field=text_field)
    fmt = output_format or (OutputFormat.jsonl if io.has_jsonl_suffix(output) else OutputFormat.npy)
    name = model or hub.default_model()
    options = {**precision_options(fp16, bf16), "devices": device or None, "normalize_embeddings": normalize}
    options.update(packing_options(packed))
    kind, family = family_options(name, model_class, pooling_method, query_instruction, examples)
    if (sparse or colbert) and kind != registry.M3:
        raise InputError(f"--sparse and --colbert need an M3 model such as BAAI/bge-m3, not {name}")
    options.update({**family, "model_class": kind})
    options.update(backend_options(backend, name, model_class=kind))
    embedder = Embedder.from_pretrained(name, **options)
    encode = embedder.encode_queries if queries else embedder.encode_corpus
    m3_outputs = (
        {"return_sparse": sparse is not None, "return_colbert_vecs": colbert is not None} if kind == registry.M3 else {}
    )
    vectors = encode(
        [r.text for r in records],
        batch_size=batch_size,
        max_length=max_length,
        show_progress_bar=sys.stderr.isatty(),
        **m3_outputs,
    )
    writes = []  # every output lands together, or none does (a full disk leaves the old files as they were)
    if kind == registry.M3:
        if sparse is not None:
            weights = (
                {"id": r.id, "lexical_weights": {k: float(v) for k, v in w.items()}}
                for r, w in zip(records, vectors["lexical_weights"], strict=True)
            )
            writes.append((sparse, io.jsonl_writer(sparse, weights)))
        if colbert is not None:
            writes.append((colbert, _colbert_writer([r.id for r in records], vectors["colbert_vecs"])))
        vectors = vectors["dense_vecs"]
    if fmt is OutputFormat.npy:

        def save(tmp: Path) -> None:  # gzipped for a .gz name, as JSONL outputs are
            with gzip.open(tmp, "wb") if output.suffix == ".gz" else tmp.open("wb") as handle:
                np.save(handle, vectors.astype(np.float32))

        writes.append((output, save))
    else:
        rows = ({"id": r.id, "embedding": v.tolist()} for r, v in zip(records, vectors, strict=True))
        writes.append((output, io.jsonl_writer(output, rows)))
    io.write_together(writes)
    typer.echo(f"wrote {output}: {vectors.shape[0]} x {vectors.shape[1]} float32 from {name}", err=True)


def _uri_or_path(path: Path) -> str:
    """Undo the ``s3://`` -> ``s3:/`` that turning an option into a ``Path`` does to URIs."""
    import re

    return re.sub(r"^([A-Za-z][A-Za-z0-9+.-]*):/(?!/)", r"\1://", str(path))


def _embed_on_ray(input: Path, output: Path, model: str | None, **options) -> None:
    """``bgekit embed --ray``: the same embedder options, run by :func:`bgekit.distributed.encode_dataset`."""
    from . import hub
    from .distributed import encode_dataset, storage

    storage.require(ray=True)  # the extra named before the model or the input is looked at
    name = model or hub.default_model()
    embedder_options = {
        **precision_options(options.pop("fp16"), options.pop("bf16")),
        "normalize_embeddings": options.pop("normalize"),
    }
    embedder_options.update(packing_options(options.pop("packed")))
    # checked here, not by each worker with a traceback: the model, the family flags, the output folder
    family = [options.pop(key) for key in ("model_class", "pooling_method", "query_instruction", "examples")]
    embedder_options.update(family_options(name, *family)[1])
    if output.is_file():
        raise InputError(f"output {output} is a file; --ray writes a folder of shards")
    backend = options.pop("backend")
    embedder_options.update(backend_options(backend, name, model_class=embedder_options.get("model_class")))
    result = encode_dataset(
        name, _uri_or_path(input), _uri_or_path(output), use_ray=True, **options, **embedder_options
    )
    typer.echo(
        f"wrote {result.output_dir}: {result.rows} rows in {result.num_shards} shards "
        f"({result.written} written, {result.skipped} already complete) from {name}",
        err=True,
    )


def _colbert_writer(ids: list[str], per_text: list):
    """A writer of the ColBERT vectors of all texts as one ``(total_tokens, dim)`` array plus row offsets."""
    import numpy as np

    offsets = np.cumsum([0] + [len(v) for v in per_text]).astype(np.int64)

    def save(tmp: Path) -> None:
        with tmp.open("wb") as handle:
            np.savez(handle, vectors=np.concatenate(per_text).astype(np.float32), offsets=offsets, ids=np.array(ids))

    return save


@app.command()
@friendly_errors
def rerank(
    query: Annotated[
        str, typer.Option("--query", "-q", help="The query to score passages against.", parser=text_value)
    ],
    input: Annotated[
        Path,
        typer.Option("--input", "-i", help="Passages: text file or JSONL with 'text' [+ 'title'].", parser=path_value),
    ],
    model: Annotated[
        str | None,
        typer.Option("--model", "-m", help="Reranker hub id or folder (cross-encoder).", parser=model_text),
    ] = None,
    output: Annotated[
        Path | None, typer.Option("--output", "-o", help="Write JSONL scores (input order) here.", parser=path_value)
    ] = None,
    top_k: Annotated[int | None, typer.Option(min=1, help="Print only the best K.")] = None,
    normalize: Annotated[bool, typer.Option("--normalize", help="Sigmoid scores into (0, 1).")] = False,
    batch_size: Annotated[int, typer.Option(min=1)] = 128,
    max_length: Annotated[int, typer.Option(min=8)] = 512,
    text_field: Annotated[
        str | None,
        typer.Option(help="JSONL field holding the text (default: text); JSONL input only.", parser=text_value),
    ] = None,
    device: DevicesOpt = None,
    fp16: Fp16Opt = True,
    bf16: Bf16Opt = False,
    packed: PackedOpt = Packing.auto,
    backend: BackendOpt = Backend.torch,
) -> None:
    """Score every passage in INPUT against QUERY and print the ranking.

    --top-k prints the best K only; -o also writes every score as JSONL in input order."""
    from . import hub, io
    from .models.reranker import Reranker
    from .models.scoring import ranking, sigmoid

    if not query.strip():
        raise typer.BadParameter("the query is empty", param_hint="--query")
    io.check_outputs(output, inputs=[input])
    records = io.read_texts(input, field=text_field)
    name = model or hub.default_model("reranker")
    options = {**packing_options(packed), **backend_options(backend, name, reranker=True)}
    reranker = Reranker.from_pretrained(name, **precision_options(fp16, bf16), devices=device or None, **options)
    raw = reranker.compute_score(
        [(query, r.text) for r in records],
        batch_size=batch_size,
        max_length=max_length,
        normalize=False,
        show_progress_bar=sys.stderr.isatty(),
    )
    scores = sigmoid(raw) if normalize else raw
    # ranked by the raw score, as Reranker.rank and the server: a sigmoid ties every logit above ~37 at 1.0
    ranked = [index for index, _ in ranking(raw)]
    rank_of = {index: rank for rank, index in enumerate(ranked, start=1)}
    if output is not None:
        io.write_jsonl(
            output,
            (
                {"id": r.id, "score": s, "rank": rank_of[i]}
                for i, (r, s) in enumerate(zip(records, scores, strict=True))
            ),
        )
        typer.echo(f"wrote {output}: {len(records)} scores", err=True)
    for index in ranked[:top_k]:
        text = records[index].text.replace("\n", " ")
        typer.echo(f"{rank_of[index]}\t{scores[index]:.6f}\t{records[index].id}\t{text[:100]}")


@app.command("models")
def list_models(as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False) -> None:
    """List the model families bgekit knows, with their class and pooling."""
    from . import registry

    rows = [
        {
            "model": name,
            "task": task,
            "class": spec.kind,
            "pooling": spec.pooling_method or "",
            "query_instruction_format": spec.query_instruction_format,
            "packaged": name in registry.PACKAGED_MODELS,
        }
        for task, table in (("embedder", registry.EMBEDDERS), ("reranker", registry.RERANKERS))
        for name, spec in table.items()
    ]
    if as_json:
        typer.echo(json.dumps(rows, indent=1, ensure_ascii=False))
        return
    width = max(len(r["model"]) for r in rows)
    typer.echo(f"{'model':<{width}}  {'task':<8}  {'class':<24}  pooling")
    for r in rows:
        mark = "  (offline: packaged)" if r["packaged"] else ""
        typer.echo(f"{r['model']:<{width}}  {r['task']:<8}  {r['class']:<24}  {r['pooling']}{mark}")


def _register_command_groups() -> None:
    """Evaluation, training and serving commands live beside their code; each module imports
    only typer at load time, so ``bgekit --help`` stays fast."""
    from .eval.cli import register as register_eval
    from .serve.cli import register as register_serve
    from .train.cli import register as register_train

    for register in (register_eval, register_train, register_serve):
        register(app)
    _verbose_everywhere(app)


_register_command_groups()
