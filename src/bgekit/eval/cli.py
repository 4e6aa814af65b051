"""CLI commands for evaluation and search: ``bgekit eval retrieval | sts``, ``bgekit index build``,
``bgekit search``. Registered on the main app by :func:`register`; every command is a thin
wrapper over :mod:`bgekit.eval` (imported only when a command runs).
"""

from __future__ import annotations

import json
import sys
from enum import StrEnum
from pathlib import Path
from typing import Annotated

import typer

from ..cli_options import Bf16Opt, Fp16Opt, model_text, path_text, path_value, precision_options, text_value


class IndexKind(StrEnum):
    flat = "flat"
    ivf = "ivf"
    hnsw = "hnsw"


class Quantization(StrEnum):
    none = "none"
    int8 = "int8"
    binary = "binary"


class M3Modes(StrEnum):
    dense = "dense"
    sparse = "sparse"
    dense_sparse = "dense+sparse"
    all = "all"


def parse_m3_weights(text: str | None) -> list[float] | None:
    if text is None:
        return None
    try:
        values = [float(part) for part in text.replace(" ", "").split(",") if part]
    except ValueError:
        values = []
    if len(values) != 3:
        raise typer.BadParameter(
            f"expected three numbers dense,sparse,colbert, got {text!r}", param_hint="--m3-weights"
        )
    return values


M3WeightsOpt = Annotated[
    str | None,
    typer.Option(
        help="Weights dense,sparse,colbert for --m3-modes (default 1,0.3,1, the bge-m3 paper's).", parser=text_value
    ),
]


class ScoreFunction(StrEnum):
    cosine = "cosine"
    dot = "dot"


ModelOpt = Annotated[
    str | None,
    typer.Option(
        "--model",
        "-m",
        help="Embedder hub id or folder. Default: BAAI/bge-small-en-v1.5, offline all-MiniLM-L6-v2.",
        parser=model_text,
    ),
]
RerankerOpt = Annotated[
    str | None,
    typer.Option(
        "--reranker", "-r", help="Rerank the top candidates with this model (hub id or folder).", parser=model_text
    ),
]
DevicesOpt = Annotated[
    list[str] | None,
    typer.Option("--device", help="Device(s), e.g. cpu or cuda:0; repeat for several.", parser=text_value),
]
QueryInstructionOpt = Annotated[
    str | None, typer.Option(help="Query instruction (overrides the model's; '' for none).")
]


def parse_k_values(text: str) -> list[int]:
    try:
        values = [int(part) for part in text.replace(" ", "").split(",") if part]
    except ValueError:
        values = []
    if not values or any(v < 1 for v in values):
        raise typer.BadParameter(f"expected positive integers separated by commas, got {text!r}", param_hint="--k")
    return values


def _model_options(device: list[str] | None, fp16: bool, bf16: bool) -> dict:
    return {**precision_options(fp16, bf16), "devices": device or None}


def eval_retrieval(
    dataset: Annotated[
        str,
        typer.Option(
            "--dataset",
            "-d",
            help="Dataset folder (BEIR or custom layout); online also a BEIR name, FlagEmbedding's miracl/LANG, "
            "mldr/LANG, msmarco-passage (--split dev|dl19|dl20), mkqa/LANG (QA recall), bright/TASK or "
            "bright-long/TASK (--split examples|gpt4_reason|...), or a hub id. CQADupStack's folder (or name): "
            "every forum in its own corpus, the score their mean.",
            parser=path_text,
        ),
    ],
    model: ModelOpt = None,
    split: Annotated[str, typer.Option(help="Which qrels split to evaluate.", parser=text_value)] = "test",
    reranker: RerankerOpt = None,
    rerank_top_k: Annotated[int, typer.Option(min=1, help="How many retrieved documents to rerank per query.")] = 100,
    query_instruction: Annotated[
        str | None,
        typer.Option(help="Query instruction (overrides the model's, and bright/TASK's per-task one; '' for none)."),
    ] = None,
    k: Annotated[str, typer.Option("--k", help="Metric cutoffs, comma-separated.", parser=text_value)] = "1,3,5,10,100",
    top_k: Annotated[
        int | None, typer.Option(min=1, help="Documents retrieved per query (default: the largest k).")
    ] = None,
    output: Annotated[
        Path | None,
        typer.Option(
            "--output", "-o", help="Write the JSON report here (+ .md and TREC .trec run files).", parser=path_value
        ),
    ] = None,
    batch_size: Annotated[int | None, typer.Option(min=1)] = None,
    max_length: Annotated[int | None, typer.Option(min=1, help="Token limit (default: the model's).")] = None,
    reranker_max_length: Annotated[int | None, typer.Option(min=8)] = None,
    score_function: Annotated[ScoreFunction, typer.Option(help="cosine (MTEB) or dot.")] = ScoreFunction.cosine,
    index: Annotated[IndexKind, typer.Option(help="flat (exact), ivf or hnsw.")] = IndexKind.flat,
    quantization: Annotated[Quantization, typer.Option(help="none, int8 or binary codes.")] = Quantization.none,
    m3_modes: Annotated[
        M3Modes | None,
        typer.Option(
            help="BGE-M3 only: retrieve by dense, sparse (lexical weights), dense+sparse (weighted sum) or all "
            "(dense+sparse, then the top --rerank-top-k rescored with dense, sparse and ColBERT scores)."
        ),
    ] = None,
    m3_weights: M3WeightsOpt = None,
    ignore_identical_ids: Annotated[
        bool, typer.Option(help="Drop a retrieved document whose id equals the query id (ArguAna-style).")
    ] = False,
    cache: Annotated[bool, typer.Option("--cache/--no-cache", help="Cache corpus embeddings on disk.")] = True,
    cache_dir: Annotated[
        Path | None,
        typer.Option(
            help="Cache folder: corpus vectors in DIR/corpus, downloads in DIR/datasets (default: "
            "$BGEKIT_CACHE, or ~/.cache/bgekit: vectors under eval/corpus, downloads under datasets).",
            parser=path_value,
        ),
    ] = None,
    chunk_size: Annotated[
        int, typer.Option(min=1, help="Documents per cached chunk (a killed run resumes from it).")
    ] = 2048,
    device: DevicesOpt = None,
    fp16: Fp16Opt = True,
    bf16: Bf16Opt = False,
) -> None:
    """Evaluate an embedder (and optionally a reranker) on a retrieval dataset; print the report."""
    from .. import hub, io
    from .retrieval import evaluate_retrieval

    io.check_outputs(output)
    k_values = parse_k_values(k)
    name = model or hub.default_model()
    result = evaluate_retrieval(
        name,
        dataset,
        split,
        reranker=reranker,
        rerank_top_k=rerank_top_k,
        k_values=k_values,
        top_k=top_k,
        query_instruction=query_instruction,
        score_function=score_function.value,
        batch_size=batch_size,
        max_length=max_length,
        reranker_max_length=reranker_max_length,
        ignore_identical_ids=ignore_identical_ids,
        index=index.value,
        quantization=quantization.value,
        m3_modes=m3_modes.value if m3_modes is not None else None,
        m3_weights=parse_m3_weights(m3_weights),
        cache_dir=cache_dir,
        use_cache=cache,
        chunk_size=chunk_size,
        model_options=_model_options(device, fp16, bf16),
        reranker_options=_model_options(device, fp16, bf16),
        output=output,
        show_progress_bar=sys.stderr.isatty(),
    )
    typer.echo(result.to_markdown())
    if output is not None:
        typer.echo(f"wrote {', '.join(result.files.values())}", err=True)


def eval_sts(
    data: Annotated[
        Path,
        typer.Option("--data", help="TSV: sentence1<TAB>sentence2<TAB>score (header optional).", parser=path_value),
    ],
    model: ModelOpt = None,
    output: Annotated[
        Path | None, typer.Option("--output", "-o", help="Write the JSON report here (+ .md).", parser=path_value)
    ] = None,
    batch_size: Annotated[int | None, typer.Option(min=1)] = None,
    max_length: Annotated[int | None, typer.Option(min=1)] = None,
    device: DevicesOpt = None,
    fp16: Fp16Opt = True,
    bf16: Bf16Opt = False,
) -> None:
    """Cosine Spearman / Pearson correlation on sentence pairs (MTEB's STS method)."""
    from .. import hub, io
    from .sts import evaluate_sts

    io.check_outputs(output, inputs=[data])
    result = evaluate_sts(
        model or hub.default_model(),
        data,
        batch_size=batch_size,
        max_length=max_length,
        model_options=_model_options(device, fp16, bf16),
        output=output,
        show_progress_bar=sys.stderr.isatty(),
    )
    typer.echo(result.to_markdown())
    if output is not None:
        typer.echo(f"wrote {', '.join(result.files.values())}", err=True)


class Symmetric(StrEnum):
    auto = "auto"
    query = "query"
    plain = "plain"


def eval_mteb(
    model: Annotated[
        str | None,
        typer.Option(
            "--model",
            "--embedder-name-or-path",
            "-m",
            help="Embedder hub id or folder. Default: BAAI/bge-small-en-v1.5, offline all-MiniLM-L6-v2.",
            parser=model_text,
        ),
    ] = None,
    tasks: Annotated[
        list[str] | None,
        typer.Option(
            "--tasks",
            "-t",
            help="MTEB task names (repeat, or separate with commas), e.g. SciFact,STS12.",
            parser=text_value,
        ),
    ] = None,
    task_types: Annotated[
        list[str] | None,
        typer.Option(help="MTEB task types: Retrieval, STS, Classification, Clustering, ...", parser=text_value),
    ] = None,
    languages: Annotated[
        list[str] | None,
        typer.Option(
            help="ISO 639-3 language codes (eng, deu, ...); multilingual tasks keep these.", parser=text_value
        ),
    ] = None,
    output_folder: Annotated[
        Path,
        typer.Option(
            "--output-folder",
            "--output-dir",
            "-o",
            help="Results in mteb's layout: FOLDER/results/MODEL/REVISION/TASK.json (as `mteb run` writes them).",
            parser=path_value,
        ),
    ] = Path("results"),
    summary: Annotated[
        Path | None,
        typer.Option(
            "--summary",
            "--eval-output-path",
            help="The summary JSON (each task's main score). Default: OUTPUT-FOLDER/summary.json.",
            parser=path_value,
        ),
    ] = None,
    overwrite: Annotated[
        bool, typer.Option(help="Run tasks again whose results are in the output folder (else they are reused).")
    ] = False,
    query_instruction: Annotated[
        str | None,
        typer.Option(
            "--query-instruction",
            "--query-instruction-for-retrieval",
            help="Query instruction (overrides the model's; '' for none).",
        ),
    ] = None,
    use_special_instructions: Annotated[
        bool,
        typer.Option(help="Each task's own instruction (mteb's task definitions) for its queries, as FlagEmbedding."),
    ] = False,
    model_prompts: Annotated[
        Path | None,
        typer.Option(
            help="JSON object of per-task instructions by MtebEncoder prompt name ('SciFact-query', 'STS'); wins "
            "over --use-special-instructions.",
            parser=path_value,
        ),
    ] = None,
    examples_path: Annotated[
        Path | None,
        typer.Option(
            "--examples-path",
            "--task-examples",
            help="In-context examples (bge-en-icl): a folder of TASK.json files, or one JSON object of task to list.",
            parser=path_value,
        ),
    ] = None,
    use_special_examples: Annotated[
        bool,
        typer.Option(help="FlagEmbedding's bundled examples: not shipped with bgekit; give them with --examples-path."),
    ] = False,
    model_class: Annotated[
        str | None,
        typer.Option(
            "--model-class",
            "--embedder-model-class",
            help="encoder-only-base, encoder-only-m3, decoder-only-base...",
            parser=text_value,
        ),
    ] = None,
    pooling_method: Annotated[
        str | None, typer.Option(help="cls, mean or last_token (overrides the model's).", parser=text_value)
    ] = None,
    symmetric: Annotated[
        Symmetric,
        typer.Option(help="STS / classification / clustering texts: auto, query (FlagEmbedding's runner) or plain."),
    ] = Symmetric.auto,
    normalize_for_classification: Annotated[
        bool | None,
        typer.Option(
            "--normalize-for-classification/--no-normalize-for-classification",
            help="L2-normalize Classification tasks' vectors or not (FlagEmbedding's runner: not). Default: model's.",
        ),
    ] = None,
    batch_size: Annotated[int | None, typer.Option("--batch-size", "--embedder-batch-size", min=1)] = None,
    max_length: Annotated[
        int | None, typer.Option(min=1, help="Token limit of queries and documents (default: the model's).")
    ] = None,
    device: Annotated[
        list[str] | None,
        typer.Option(
            "--device", "--devices", help="Device(s), e.g. cpu or cuda:0; repeat for several.", parser=text_value
        ),
    ] = None,
    fp16: Fp16Opt = True,
    bf16: Bf16Opt = False,
) -> None:
    """Run an embedder on MTEB tasks with the mteb package (the mteb extra); print each task's main score.

    FlagEmbedding's spellings work too: --task_types, --embedder_name_or_path, --output_dir...
    """
    from .. import hub, io
    from ..cli_options import family_options
    from ..errors import InputError
    from .mteb_run import evaluate_mteb, read_model_prompts, read_task_examples, select_tasks

    if use_special_examples and examples_path is None:
        raise InputError(
            "--use-special-examples: FlagEmbedding's bundled examples are not shipped with bgekit; give examples "
            "with --examples-path (a folder of TASK.json files, or one JSON object of task name to examples)"
        )
    selected = select_tasks(tasks, task_types, languages)  # mteb missing, or a bad name, before the model loads
    summary_path = summary if summary is not None else output_folder / "summary.json"
    io.check_output_folder(output_folder)
    io.check_outputs(summary_path, inputs=[model_prompts, examples_path])
    prompts = read_model_prompts(model_prompts) if model_prompts is not None else None
    examples = read_task_examples(examples_path, selected) if examples_path is not None else None
    name = model or hub.default_model()
    kind, options = family_options(name, model_class, pooling_method, query_instruction)
    if max_length is not None:
        options.update(query_max_length=max_length, passage_max_length=max_length)
    if examples:  # a decoder given examples runs as an ICL model, as `embed --examples` has it
        from .. import registry

        if kind not in (registry.ICL, registry.DECODER):
            raise InputError(f"--examples-path needs an in-context-learning model such as BAAI/bge-en-icl, not {name}")
        options["model_class"] = registry.ICL
    run = evaluate_mteb(
        name,
        selected=selected,
        output_folder=output_folder,
        summary=summary_path,
        overwrite=overwrite,
        use_special_instructions=use_special_instructions,
        model_prompts=prompts,
        task_examples=examples,
        batch_size=batch_size,
        symmetric=symmetric.value,
        normalize_for_classification=normalize_for_classification,
        model_options={**_model_options(device, fp16, bf16), **options},
        show_progress_bar=sys.stderr.isatty(),
    )
    typer.echo(run.to_markdown())
    typer.echo(f"wrote {run.files['results']}, {run.files['summary']}", err=True)


def index_build(
    corpus: Annotated[
        Path,
        typer.Option("--corpus", "-c", help="Text file or JSONL with 'text' [+ 'title'] and '_id'.", parser=path_value),
    ],
    out: Annotated[Path, typer.Option("--out", "-o", help="Index folder to write.", parser=path_value)],
    model: ModelOpt = None,
    index_type: Annotated[IndexKind, typer.Option("--index-type", help="flat (exact), ivf or hnsw.")] = IndexKind.flat,
    quantization: Annotated[Quantization, typer.Option(help="none, int8 or binary codes.")] = Quantization.none,
    batch_size: Annotated[int | None, typer.Option(min=1)] = None,
    max_length: Annotated[int | None, typer.Option(min=1)] = None,
    text_field: Annotated[
        str | None,
        typer.Option(help="JSONL field holding the text (default: text); JSONL input only.", parser=text_value),
    ] = None,
    m3_sparse: Annotated[
        bool,
        typer.Option("--m3-sparse", help="BGE-M3 only: keep the lexical weights too, for `bgekit search --m3-modes`."),
    ] = False,
    device: DevicesOpt = None,
    fp16: Fp16Opt = True,
    bf16: Bf16Opt = False,
) -> None:
    """Embed a corpus and save a searchable index (faiss) with its texts."""
    from .. import hub, io
    from ..errors import InputError
    from ..models.embedder import Embedder
    from ..search import SearchIndex
    from .index import require_faiss

    require_faiss()  # before the corpus is read and embedded
    io.check_outputs(out / "docs.jsonl")  # before the corpus is embedded: a file in the way, no write access
    records = io.read_texts(corpus, field=text_field)
    seen: set[str] = set()
    for r in records:  # said with the file's name, before the model loads
        if r.id in seen:
            raise InputError(f"{corpus}: duplicate id {r.id!r}; every document needs its own id")
        seen.add(r.id)
    name = model or hub.default_model()
    embedder = Embedder.from_pretrained(name, **_model_options(device, fp16, bf16))
    built = SearchIndex.build(
        embedder,
        [r.text for r in records],
        [r.id for r in records],
        kind=index_type.value,
        quantization=quantization.value,
        batch_size=batch_size,
        max_length=max_length,
        show_progress_bar=sys.stderr.isatty(),
        meta={"corpus": str(corpus.resolve())},
        m3_sparse=m3_sparse,
    )
    built.save(out)
    typer.echo(
        f"wrote {out}: {len(built)} documents x {built.dim} ({index_type.value}, {quantization.value}) "
        f"from {built.meta['model']}",
        err=True,
    )


def _absolute_if_local(name: str) -> str:
    """:func:`bgekit.search.absolute_if_local` (the name this module gave it first)."""
    from ..search import absolute_if_local

    return absolute_if_local(name)


def search(
    index: Annotated[
        Path, typer.Option("--index", "-i", help="Index folder from `bgekit index build`.", parser=path_value)
    ],
    query: Annotated[
        str | None, typer.Argument(metavar="QUERY", help="The query text (or give it as -q/--query).")
    ] = None,
    query_option: Annotated[
        str | None,
        typer.Option("--query", "-q", help="The query text, as `bgekit rerank` takes it.", parser=text_value),
    ] = None,
    top_k: Annotated[
        int, typer.Option(min=1, help="How many results to print (with a reranker, of the reranked candidates).")
    ] = 10,
    reranker: RerankerOpt = None,
    rerank_top_k: Annotated[
        int | None, typer.Option(min=1, help="Candidates to rerank (default: max(top-k, 100)).")
    ] = None,
    model: Annotated[
        str | None,
        typer.Option("--model", "-m", help="Query encoder (default: the index's model).", parser=model_text),
    ] = None,
    query_instruction: QueryInstructionOpt = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON lines: id, score, rank, text.")] = False,
    other_model: Annotated[
        bool,
        typer.Option(
            "--other-model",
            help="Search with a --model whose vectors differ from the index's (e.g. a separate query encoder).",
        ),
    ] = False,
    m3_modes: Annotated[
        M3Modes | None,
        typer.Option(
            help="BGE-M3 index built with --m3-sparse: dense, sparse, dense+sparse (weighted sum) or all "
            "(dense+sparse, the top --rerank-top-k rescored with dense, sparse and ColBERT scores)."
        ),
    ] = None,
    m3_weights: M3WeightsOpt = None,
    device: DevicesOpt = None,
    fp16: Fp16Opt = True,
    bf16: Bf16Opt = False,
) -> None:
    """Search an index for QUERY; optionally rerank the candidates. Prints rank, score, id, text."""
    from ..models.embedder import Embedder
    from ..search import SearchIndex
    from .retrieval import check_m3_modes, load_reranker

    modes = m3_modes.value if m3_modes is not None else None
    weights = parse_m3_weights(m3_weights)
    check_m3_modes(modes, weights, reranker)  # said before the index and the model load

    if query is not None and query_option is not None:
        raise typer.BadParameter("give the query once: as QUERY or as -q/--query, not both", param_hint="QUERY")
    query = query if query_option is None else query_option
    if query is None:
        raise typer.BadParameter("no query: bgekit search -i INDEX -q 'query text'", param_hint="QUERY")
    if not query.strip():
        raise typer.BadParameter("the query is empty", param_hint="QUERY")
    options = _model_options(device, fp16, bf16)

    def model_for(meta: dict):
        name = model or meta.get("model")
        if not name:
            raise typer.BadParameter("the index does not name its model; pass --model", param_hint="--model")
        if reranker:  # a reranker that cannot load is said before the query is embedded and searched
            from .. import hub, registry

            hub.resolve(reranker, registry.RERANKERS, for_reranker=True)
        return Embedder.from_pretrained(name, **options)

    searcher = SearchIndex._open(
        index,
        model_for,
        query_instruction=query_instruction,
        recorded_instruction=model is None,  # the index's own model: the instruction it was built with
        other_model=other_model,
        keep_texts=False,  # one query: only its hits' texts are read from docs.jsonl
        option="--other-model",
        say=lambda level, message: typer.echo(f"{level}: {message}", err=True),
    )
    rerank_model = load_reranker(reranker, options) if reranker else None
    hits = searcher.search(
        query, top_k, reranker=rerank_model, rerank_top_k=rerank_top_k or max(top_k, 100), m3_modes=modes,
        m3_weights=weights,
    )  # fmt: skip
    if rerank_model is not None and len(hits) < top_k:  # as eval's rerank stage: the reranked candidates
        typer.echo(f"note: {len(hits)} results, the reranked candidates (--rerank-top-k)", err=True)
    for hit in hits:
        if as_json:
            typer.echo(json.dumps({"rank": hit.rank, "id": hit.id, "score": hit.score, "text": hit.text},
                                  ensure_ascii=False))  # fmt: skip
        else:
            typer.echo(f"{hit.rank}\t{hit.score:.6f}\t{hit.id}\t{hit.text.replace(chr(10), ' ')[:100]}")


def _dashes(token: str) -> str:
    """An option name with underscores for dashes (click normalizes option names with it)."""
    return token.replace("_", "-")


def register(app: typer.Typer) -> None:
    """Add ``eval``, ``index`` and ``search`` to the ``bgekit`` app."""
    from ..cli import friendly_errors

    eval_app = typer.Typer(help="Evaluate models: retrieval (BEIR layout), STS and MTEB.", no_args_is_help=True)
    eval_app.command("retrieval")(friendly_errors(eval_retrieval))
    eval_app.command("sts")(friendly_errors(eval_sts))
    # FlagEmbedding's spellings (--task_types, --output_dir) as well as bgekit's (--task-types)
    eval_app.command("mteb", context_settings={"token_normalize_func": _dashes})(friendly_errors(eval_mteb))
    index_app = typer.Typer(help="Build vector indexes for `bgekit search`.", no_args_is_help=True)
    index_app.command("build")(friendly_errors(index_build))
    app.add_typer(eval_app, name="eval")
    app.add_typer(index_app, name="index")
    app.command("search")(friendly_errors(search))
