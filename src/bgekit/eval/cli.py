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

from ..cli_options import Bf16Opt, Fp16Opt, path_text, path_value, precision_options


class IndexKind(StrEnum):
    flat = "flat"
    ivf = "ivf"
    hnsw = "hnsw"


class Quantization(StrEnum):
    none = "none"
    int8 = "int8"
    binary = "binary"


class ScoreFunction(StrEnum):
    cosine = "cosine"
    dot = "dot"


ModelOpt = Annotated[
    str | None,
    typer.Option(
        "--model", "-m", help="Embedder hub id or folder. Default: BAAI/bge-small-en-v1.5, offline all-MiniLM-L6-v2."
    ),
]
RerankerOpt = Annotated[
    str | None, typer.Option("--reranker", "-r", help="Rerank the top candidates with this model (hub id or folder).")
]
DevicesOpt = Annotated[
    list[str] | None, typer.Option("--device", help="Device(s), e.g. cpu or cuda:0; repeat for several.")
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
    split: Annotated[str, typer.Option(help="Which qrels split to evaluate.")] = "test",
    reranker: RerankerOpt = None,
    rerank_top_k: Annotated[int, typer.Option(min=1, help="How many retrieved documents to rerank per query.")] = 100,
    query_instruction: Annotated[
        str | None,
        typer.Option(help="Query instruction (overrides the model's, and bright/TASK's per-task one; '' for none)."),
    ] = None,
    k: Annotated[str, typer.Option("--k", help="Metric cutoffs, comma-separated.")] = "1,3,5,10,100",
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
        str | None, typer.Option(help="JSONL field holding the text (default: text); JSONL input only.")
    ] = None,
    device: DevicesOpt = None,
    fp16: Fp16Opt = True,
    bf16: Bf16Opt = False,
) -> None:
    """Embed a corpus and save a searchable index (faiss) with its texts."""
    from .. import hub, io
    from ..errors import InputError
    from ..models.embedder import Embedder
    from .index import DenseIndex, require_faiss
    from .retrieval import normalize_rows, vector_space

    require_faiss()  # before the corpus is read and embedded
    io.check_outputs(out / "docs.jsonl")  # before the corpus is embedded: a file in the way, no write access
    records = io.read_texts(corpus, field=text_field)
    ids = [r.id for r in records]
    seen: set[str] = set()
    for r in records:
        if r.id in seen:
            raise InputError(f"{corpus}: duplicate id {r.id!r}; every document needs its own id")
        seen.add(r.id)
    name = model or hub.default_model()
    embedder = Embedder.from_pretrained(name, **_model_options(device, fp16, bf16))
    vectors = embedder.encode_corpus(
        [r.text for r in records], batch_size=batch_size, max_length=max_length, show_progress_bar=sys.stderr.isatty()
    )
    if isinstance(vectors, dict):
        vectors = vectors["dense_vecs"]
    built = DenseIndex.build(normalize_rows(vectors), ids, kind=index_type.value, quantization=quantization.value)
    io.write_jsonl(out / "docs.jsonl", ({"id": r.id, "text": r.text} for r in records))
    recorded = _absolute_if_local(embedder.model_name_or_path)
    built.save(
        out,
        extra={
            "type": "dense",
            # a local folder by its absolute path: `search` may run from another directory
            "model": recorded,
            "vector_space": vector_space(embedder),  # `search` refuses a query model of another space
            "query_instruction": embedder.query_instruction_for_retrieval,
            "score_function": "cosine",
            "max_length": max_length,
            "corpus": str(corpus.resolve()),
        },
    )
    typer.echo(
        f"wrote {out}: {len(built)} documents x {built.dim} ({index_type.value}, {quantization.value}) from {recorded}",
        err=True,
    )


def _absolute_if_local(name: str) -> str:
    """A model folder that exists here as its absolute path; a hub id as the loader reads it (without
    the stray whitespace or trailing slash it accepts: ``"org/name/"`` is ``"org/name"``)."""
    from .. import hub

    name = hub.model_name(name)  # the library's own normalisation, so the CLI and every class agree
    path = Path(name).expanduser()
    return str(path.resolve()) if path.is_dir() else name


def search(
    index: Annotated[
        Path, typer.Option("--index", "-i", help="Index folder from `bgekit index build`.", parser=path_value)
    ],
    query: Annotated[
        str | None, typer.Argument(metavar="QUERY", help="The query text (or give it as -q/--query).")
    ] = None,
    query_option: Annotated[
        str | None, typer.Option("--query", "-q", help="The query text, as `bgekit rerank` takes it.")
    ] = None,
    top_k: Annotated[
        int, typer.Option(min=1, help="How many results to print (with a reranker, of the reranked candidates).")
    ] = 10,
    reranker: RerankerOpt = None,
    rerank_top_k: Annotated[
        int | None, typer.Option(min=1, help="Candidates to rerank (default: max(top-k, 100)).")
    ] = None,
    model: Annotated[
        str | None, typer.Option("--model", "-m", help="Query encoder (default: the index's model).")
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
    device: DevicesOpt = None,
    fp16: Fp16Opt = True,
    bf16: Bf16Opt = False,
) -> None:
    """Search an index for QUERY; optionally rerank the candidates. Prints rank, score, id, text."""
    from .. import io
    from ..errors import InputError
    from ..models.embedder import Embedder
    from .index import DenseIndex
    from .retrieval import encode_queries, load_reranker, normalize_rows

    if query is not None and query_option is not None:
        raise typer.BadParameter("give the query once: as QUERY or as -q/--query, not both", param_hint="QUERY")
    query = query if query_option is None else query_option
    if query is None:
        raise typer.BadParameter("no query: bgekit search -i INDEX -q 'query text'", param_hint="QUERY")
    if not query.strip():
        raise typer.BadParameter("the query is empty", param_hint="QUERY")
    dense = DenseIndex.load(index)
    name = model or dense.meta.get("model")
    if not name:
        raise typer.BadParameter("the index does not name its model; pass --model", param_hint="--model")
    options = _model_options(device, fp16, bf16)
    instruction = query_instruction
    if instruction is None and model is None:
        instruction = dense.meta.get("query_instruction") or ""
    if reranker:  # a reranker that cannot load is said before the query is embedded and searched
        from .. import hub, registry

        hub.resolve(reranker, registry.RERANKERS, for_reranker=True)
    embedder = Embedder.from_pretrained(name, **options)
    _check_query_model(embedder, dense, index, other_model)
    vector = normalize_rows(encode_queries(embedder, [query], instruction, None, dense.meta.get("max_length")))
    if vector.shape[1] != dense.dim:
        raise InputError(f"{name} gives {vector.shape[1]}-dimensional vectors; the index at {index} holds {dense.dim}")
    depth = max(top_k, rerank_top_k or 100) if reranker else top_k
    scores, rows = dense.search(vector, depth)
    hits = [(dense.ids[i], float(s)) for s, i in zip(scores[0], rows[0], strict=True) if i >= 0]
    texts = {}
    docs_path = index / "docs.jsonl"
    if docs_path.exists():
        wanted = {doc_id for doc_id, _ in hits}
        for _, obj in io.read_jsonl(docs_path):
            if str(obj.get("id")) in wanted:
                texts[str(obj["id"])] = obj.get("text", "")
    if reranker:
        rerank_model = load_reranker(reranker, options)
        candidates = hits[: rerank_top_k or depth]
        if len(candidates) < top_k:  # as eval's rerank stage: the result list is the reranked candidates
            typer.echo(f"note: {len(candidates)} results, the reranked candidates (--rerank-top-k)", err=True)
        new_scores = rerank_model.compute_score([(query, texts.get(d, "")) for d, _ in candidates])
        hits = sorted(zip((d for d, _ in candidates), map(float, new_scores), strict=True), key=lambda h: -h[1])
    for rank, (doc_id, score) in enumerate(hits[:top_k], start=1):
        text = texts.get(doc_id, "")
        if as_json:
            typer.echo(json.dumps({"rank": rank, "id": doc_id, "score": score, "text": text}, ensure_ascii=False))
        else:
            typer.echo(f"{rank}\t{score:.6f}\t{doc_id}\t{text.replace(chr(10), ' ')[:100]}")


def _check_query_model(embedder, dense, index: Path, other_model: bool) -> None:
    """Refuse a query model whose vectors are not the index's: its scores would be silently wrong."""
    from ..errors import InputError
    from .retrieval import space_differences, vector_space

    built = dense.meta.get("vector_space")
    if built is None:  # an index of an older bgekit: only its model's name to go by
        same = _absolute_if_local(embedder.model_name_or_path) == dense.meta.get("model")  # as build records it
        if not same and not other_model:
            typer.echo(
                f"warning: {index} records no model identity (built by an older bgekit); searching it with "
                f"{embedder.model_name_or_path}, which cannot be checked against {dense.meta.get('model')}",
                err=True,
            )
        return
    differences = space_differences(built, vector_space(embedder))
    if not differences:
        return
    if differences == ["file_times"]:  # a copy, a new download, or weights retrained in place
        typer.echo(
            f"warning: the files of {embedder.model_name_or_path} have the names and sizes of those {index} "
            "was built with but other modification times; if the model was retrained, rebuild the index",
            err=True,
        )
        return
    what = (
        f"{embedder.model_name_or_path} does not give the vectors of the model {index} was built with "
        f"({dense.meta.get('model')}): {', '.join(differences)} differ"
    )
    if not other_model:
        raise InputError(f"{what}; rebuild the index with this model, or pass --other-model to search anyway")
    typer.echo(f"note: {what}; searching anyway (--other-model)", err=True)


def register(app: typer.Typer) -> None:
    """Add ``eval``, ``index`` and ``search`` to the ``bgekit`` app."""
    from ..cli import friendly_errors

    eval_app = typer.Typer(help="Evaluate models: retrieval (BEIR layout) and STS.", no_args_is_help=True)
    eval_app.command("retrieval")(friendly_errors(eval_retrieval))
    eval_app.command("sts")(friendly_errors(eval_sts))
    index_app = typer.Typer(help="Build vector indexes for `bgekit search`.", no_args_is_help=True)
    index_app.command("build")(friendly_errors(index_build))
    app.add_typer(eval_app, name="eval")
    app.add_typer(index_app, name="index")
    app.command("search")(friendly_errors(search))
