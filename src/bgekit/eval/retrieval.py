"""Retrieval evaluation: embed the corpus (cached) -> search -> optional rerank -> metrics -> report.

The method is MTEB's, so published numbers reproduce: documents embedded as
``(title + " " + text).strip()``, queries with the model's query instruction, cosine
similarity, exact search over the whole corpus, trec_eval metrics (:mod:`.metrics`).

Corpus embeddings are cached on disk under a key made of the model (name, files, a sample of the
weights' bytes, pooling, lengths, instructions, precision) and the corpus content. They are written in chunks as they
are made, so a run that is killed resumes from its last finished chunk; a finished cache is one
``embeddings.npy`` and a second run does no forward pass on the corpus.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import shutil
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from .. import __version__, io
from ..errors import InputError
from ..runtime.devices import resolve_dtype
from . import metrics as metrics_mod
from .datasets import (
    CQADUPSTACK_FORUMS,
    RetrievalDataset,
    cqadupstack_forums,
    dataset_json,
    default_cache_dir,
    load_retrieval_dataset,
)

if TYPE_CHECKING:
    from .averaged import AveragedRetrievalResult

logger = logging.getLogger(__name__)

CACHE_VERSION = 1
_CACHE_WORDS = {
    "off": "not cached",
    "miss": "computed and cached",
    "hit": "from the cache",
    "resumed": "resumed from an interrupted run",
}
DEFAULT_CHUNK_SIZE = 2048


@dataclass
class RetrievalResult:
    """What :func:`evaluate_retrieval` found. ``metrics`` are for the final ranking (after
    reranking when a reranker was given; ``retrieval_metrics`` then hold the first stage's)."""

    model: str
    dataset: dict[str, Any]
    split: str
    metrics: dict[str, float]
    k_values: list[int]
    timings: dict[str, float]
    run: dict[str, dict[str, float]] = field(repr=False)
    retrieval_metrics: dict[str, float] | None = None
    retrieval_run: dict[str, dict[str, float]] | None = field(default=None, repr=False)
    reranker: str | None = None
    rerank_top_k: int | None = None
    cache: dict[str, Any] = field(default_factory=dict)
    settings: dict[str, Any] = field(default_factory=dict)
    files: dict[str, str] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        """The report: MTEB's metric names, values as fractions."""
        return {
            "model": self.model,
            "dataset": self.dataset["name"],
            "split": self.split,
            "metrics": self.metrics,
            "k_values": self.k_values,
            "main_score": metrics_mod.main_score(self.metrics),
            "reranker": self.reranker,
            "rerank_top_k": self.rerank_top_k,
            "retrieval_metrics": self.retrieval_metrics,
            "timings": self.timings,
            "dataset_info": self.dataset,
            "cache": self.cache,
            "settings": self.settings,
            "files": self.files,
            "bgekit_version": __version__,
        }

    def to_markdown(self) -> str:
        """A short human report: a metric table (and the first stage's when reranked)."""
        info = self.dataset
        lines = [
            f"## Retrieval: {self.model} on {info['name']} ({self.split})",
            "",
            f"{info['queries']} queries, {info['documents']} documents, "
            + (f"{info['answers']} answers" if "answers" in info else f"{info['judgments']} judgments")
            + "; "
            f"search: {self._search_words()}"
            + (f"; reranked top {self.rerank_top_k} with {self.reranker}" if self.reranker else ""),
            "",
            metrics_mod.metric_table(self.metrics, self.k_values),
        ]
        if self.retrieval_metrics is not None:
            lines += [
                "",
                "First stage (before reranking):",
                "",
                metrics_mod.metric_table(self.retrieval_metrics, self.k_values),
            ]
        timing = ", ".join(f"{k.removesuffix('_s')} {v:.1f}s" for k, v in self.timings.items())
        cache = _CACHE_WORDS.get(self.cache.get("status", "off"), self.cache.get("status"))
        what = "lexical weights" if self.cache.get("output") == "lexical_weights" else "embeddings"
        cached = f"Corpus {what}: {cache}"
        if isinstance(self.cache.get("lexical_weights"), dict):
            status = self.cache["lexical_weights"].get("status", "off")
            cached += f"; lexical weights: {_CACHE_WORDS.get(status, status)}"
        lines += ["", f"Timings: {timing}. {cached}."]
        return "\n".join(lines) + "\n"

    def _search_words(self) -> str:
        """How the first stage searched (and, for M3's "all", how it was rescored), for the report."""
        dense = f"{self.settings.get('index', 'flat')} {self.settings.get('score_function', 'cosine')}"
        mode = self.settings.get("m3_modes")
        if mode is None:
            return dense
        w_dense, w_sparse, w_colbert = (f"{w:g}" for w in self.settings["m3_weights"])
        words = {
            "dense": f"M3 dense ({dense})",
            "sparse": "M3 sparse (lexical weights)",
            "dense+sparse": f"M3 dense+sparse ({w_dense} * dense + {w_sparse} * sparse)",
            "all": f"M3 dense+sparse ({w_dense} * dense + {w_sparse} * sparse), top {self.rerank_top_k} rescored "
            f"by M3 all ({w_dense}:{w_sparse}:{w_colbert} dense:sparse:colbert)",
        }
        return words.get(mode, mode)

    def save(self, output: str | Path) -> dict[str, str]:
        """Write ``OUT.json``, ``OUT.md`` and TREC run files (``OUT.trec``; with a reranker also
        ``OUT.retrieval.trec`` for the first stage), each atomically. Returns the paths."""
        stem = report_stem(output)
        json_path = stem.with_name(stem.name + ".json")
        files = {"json": str(json_path), "markdown": str(stem.with_name(stem.name + ".md"))}
        files.update(self.save_runs(stem))
        remove_other_runs(stem, files.values())
        self.files = files
        io.write_with(files["markdown"], lambda tmp: tmp.write_text(self.to_markdown(), encoding="utf-8"))
        text = json.dumps(self.to_json(), indent=1, ensure_ascii=False) + "\n"
        io.write_with(json_path, lambda tmp: tmp.write_text(text, encoding="utf-8"))
        return files

    def save_runs(self, stem: Path, prefix: str = "") -> dict[str, str]:
        """Write the TREC run files ``STEM.trec`` (and ``STEM.retrieval.trec`` for the first stage);
        returns ``{prefix + "run": path, ...}`` for those written, and removes the others."""
        files = {}
        runs = {"run": (".trec", self.run), "retrieval_run": (".retrieval.trec", self.retrieval_run)}
        for key, (suffix, run) in runs.items():
            path = stem.with_name(stem.name + suffix)
            try:
                if run is not None:
                    files[prefix + key] = str(metrics_mod.write_trec_run(path, run))
            except InputError as exc:  # ids with spaces cannot go into a TREC run file
                logger.warning("no TREC run file written: %s", exc)
            if prefix + key not in files:  # an earlier report's run file must not pass for this one's
                path.unlink(missing_ok=True)
        return files


def remove_other_runs(stem: Path, written: Iterable[str]) -> None:
    """Remove the run files an earlier report saved under ``stem`` that this one did not write, so the
    files named ``STEM.*`` are one report's: ``STEM.trec`` / ``STEM.retrieval.trec`` of one dataset,
    ``STEM.FORUM.trec`` / ``STEM.FORUM.retrieval.trec`` of each CQADupStack forum (a later run over fewer
    forums left the others' behind, passing for part of it). Only these names go, and not a forum's
    run beside its own report (``STEM.FORUM.json``: that report's, ``-o STEM.FORUM.json``)."""
    keep = {Path(p).resolve() for p in written}
    for name in ("", *(f".{forum}" for forum in CQADUPSTACK_FORUMS)):
        if name and stem.with_name(f"{stem.name}{name}.json").exists():
            continue
        for suffix in (".trec", ".retrieval.trec"):
            path = stem.with_name(f"{stem.name}{name}{suffix}")
            if path.resolve() not in keep:
                path.unlink(missing_ok=True)


def check_cache_folder(root: Path) -> None:
    """An :class:`InputError` when the corpus cache cannot go under ``root`` (a file there or above it,
    a folder this process may not write in)."""
    if root.exists() and not root.is_dir():
        raise InputError(f"cache folder {root} is a file: pass a folder as cache_dir (--cache-dir), or --no-cache")
    io.check_creatable_under(root, f"cache folder {root} (--cache-dir)")


def report_stem(output: str | Path) -> Path:
    """``OUT`` for ``OUT.json`` or ``OUT``: the name the report's files share."""
    output = Path(output)
    return output.with_suffix("") if output.suffix.lower() == ".json" else output


# -- the pipeline -----------------------------------------------------------------------------
def evaluate_retrieval(
    model: Any,
    dataset: str | Path | RetrievalDataset,
    split: str = "test",
    *,
    reranker: Any = None,
    rerank_top_k: int = 100,
    k_values: Sequence[int] = metrics_mod.DEFAULT_K,
    top_k: int | None = None,
    query_instruction: str | None = None,
    score_function: str = "cosine",
    batch_size: int | None = None,
    max_length: int | None = None,
    reranker_batch_size: int | None = None,
    reranker_max_length: int | None = None,
    ignore_identical_ids: bool = False,
    index: str = "flat",
    quantization: str | None = None,
    m3_modes: str | None = None,
    m3_weights: Sequence[float] | None = None,
    cache_dir: str | Path | None = None,
    use_cache: bool = True,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    model_options: Mapping[str, Any] | None = None,
    reranker_options: Mapping[str, Any] | None = None,
    output: str | Path | None = None,
    show_progress_bar: bool | None = None,
    on_chunk: Callable[[int, int], None] | None = None,
) -> RetrievalResult | AveragedRetrievalResult:
    """Evaluate an embedder (and optionally a reranker) on a retrieval dataset.

    Args:
        model: an :class:`~bgekit.Embedder` or a name / folder for ``Embedder.from_pretrained``
            (with ``model_options``).
        dataset: a dataset folder (BEIR or custom layout), a BEIR name, one of FlagEmbedding's named sets
            (``"miracl/LANG"``, ``"mldr/LANG"``, ``"msmarco-passage"``, ``"mkqa/LANG"``: ``qa_recall_at_k`` metrics,
            ``"bright/TASK"``, ``"bright-long/TASK"``: :mod:`bgekit.eval.named`) or a hub id
            (online), or a :class:`RetrievalDataset`. CQADupStack as a whole (BEIR's ``cqadupstack`` folder of forum
            folders, or online the name ``cqadupstack``) gives an
            :class:`~bgekit.eval.averaged.AveragedRetrievalResult`: each forum evaluated in its own
            corpus, ``metrics`` the mean over the forums (BEIR's and MTEB's CQADupStack score).
        reranker: a :class:`~bgekit.Reranker` or a name / folder; reranks each query's top
            ``rerank_top_k``, and the metrics are computed on that reranked list.
        k_values: cutoffs for every metric (``ndcg_at_10``, ``map_at_10``, ``recall_at_100``...).
        top_k: how many documents to retrieve per query (default: the largest k, or
            ``rerank_top_k`` when reranking, whichever is larger).
        query_instruction: overrides the model's query instruction (``""`` for none). Without it a dataset's own
            instruction is used where it has one (``bright/TASK``: FlagEmbedding's per-task instruction).
        score_function: ``"cosine"`` (MTEB's; vectors are normalized before the inner product)
            or ``"dot"``.
        index / quantization: :class:`~bgekit.eval.index.DenseIndex` options (exact ``flat`` by default).
        m3_modes: for a :class:`~bgekit.BGEM3FlagModel` only, which of its scores retrieve (the bge-m3
            paper's rows): ``"dense"``, ``"sparse"`` (lexical weights, :class:`~bgekit.eval.index.SparseIndex`),
            ``"dense+sparse"`` (``w_dense * dense + w_sparse * sparse`` over both lists,
            :func:`~bgekit.eval.index.fuse_runs`) or ``"all"`` (that first stage, then each query's top
            ``rerank_top_k`` rescored by ``compute_score``'s ``"colbert+sparse+dense"``). Default: dense.
        m3_weights: ``[dense, sparse, colbert]`` for ``m3_modes`` (default ``[1, 0.3, 1]``, the paper's).
        cache_dir / use_cache / chunk_size: where corpus embeddings are cached (default
            ``$BGEKIT_CACHE`` or ``~/.cache/bgekit``, under ``eval/``), and in how many
            documents a chunk (the unit a killed run resumes from).
        output: write the JSON / Markdown report and TREC run files there (see :meth:`RetrievalResult.save`).
        on_chunk: called as ``on_chunk(done, total)`` after each corpus chunk is embedded.
    """
    started = time.perf_counter()
    timings: dict[str, float] = {}
    k_values = metrics_mod.check_k_values(k_values)
    if score_function not in ("cosine", "dot"):
        raise InputError(f"score_function must be 'cosine' or 'dot', got {score_function!r}")
    if isinstance(rerank_top_k, bool) or not isinstance(rerank_top_k, int) or rerank_top_k < 1:
        raise InputError(f"rerank_top_k must be a positive integer, got {rerank_top_k!r}")
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise InputError(f"chunk_size must be a positive integer, got {chunk_size!r}")
    weights = check_m3_modes(m3_modes, m3_weights, reranker)
    from .index import require_faiss

    require_faiss()  # a missing eval extra is named now, not after the corpus is encoded
    metrics_mod.require_pytrec_eval()

    root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir() / "eval"
    if use_cache:  # said before a model loads, not as a traceback when the first vectors are cached
        check_cache_folder(root)
    if reranker is not None:  # a reranker that would be refused is said before the dataset and the embedder load
        check_reranker(reranker, reranker_options)
    tick = time.perf_counter()
    downloads = None if cache_dir is None else Path(cache_dir) / "datasets"
    forums = cqadupstack_forums(dataset, cache_dir=downloads)  # None for one dataset
    if forums:  # CQADupStack as a whole: each forum in its own corpus, the score their mean
        from .averaged import evaluate_forums

        return evaluate_forums(
            model, forums, split, reranker=reranker, query_instruction=query_instruction,
            model_options=model_options, reranker_options=reranker_options, output=output,
            rerank_top_k=rerank_top_k, k_values=k_values, top_k=top_k, score_function=score_function,
            batch_size=batch_size, max_length=max_length, reranker_batch_size=reranker_batch_size,
            reranker_max_length=reranker_max_length, ignore_identical_ids=ignore_identical_ids, index=index,
            quantization=quantization, cache_dir=cache_dir, use_cache=use_cache, chunk_size=chunk_size,
            show_progress_bar=show_progress_bar, on_chunk=on_chunk, m3_modes=m3_modes, m3_weights=m3_weights,
        )  # fmt: skip
    if not isinstance(dataset, RetrievalDataset):
        dataset = load_retrieval_dataset(dataset, split, cache_dir=downloads)
    if query_instruction is None and dataset.query_instruction is not None:  # BRIGHT's per task, as FlagEmbedding
        query_instruction = dataset.query_instruction
    timings["load_dataset_s"] = time.perf_counter() - tick

    tick = time.perf_counter()
    embedder = load_embedder(model, query_instruction, model_options)
    rerank_model = load_reranker(reranker, reranker_options) if reranker is not None else None
    timings["load_models_s"] = time.perf_counter() - tick

    if m3_modes is not None:
        check_m3_model(embedder)
    use_dense, use_sparse = m3_modes in (None, "dense", "dense+sparse", "all"), m3_modes not in (None, "dense")
    if not use_dense and (index != "flat" or quantization not in (None, "none")):
        logger.warning(
            "index=%s, quantization=%s are dense-vector options: m3_modes 'sparse' searches the lexical weights "
            "exactly", index, quantization,
        )  # fmt: skip
    corpus_vectors = corpus_weights = None
    cache: dict[str, Any] = {}
    tick = time.perf_counter()
    # both outputs: lexical weights the cache lacks come from the dense pass's forward (one pass, not two)
    lexical: dict[int, Any] | None = None
    if use_dense and use_sparse and not has_cached_lexical_weights(embedder, dataset, root if use_cache else None,
                                                                    max_length):  # fmt: skip
        lexical = {}
    if use_dense:
        corpus_vectors, cache = embed_corpus(
            embedder,
            dataset,
            cache_root=root if use_cache else None,
            chunk_size=chunk_size,
            batch_size=batch_size,
            max_length=max_length,
            show_progress_bar=show_progress_bar,
            on_chunk=on_chunk,
            lexical=lexical,
        )
    if use_sparse:
        corpus_weights, sparse_cache = corpus_lexical_weights(
            embedder,
            dataset,
            cache_root=root if use_cache else None,
            batch_size=batch_size,
            max_length=max_length,
            show_progress_bar=show_progress_bar,
            known=lexical,
        )
        cache = (
            {**cache, "lexical_weights": sparse_cache} if use_dense else {**sparse_cache, "output": "lexical_weights"}
        )
    timings["encode_corpus_s"] = time.perf_counter() - tick

    tick = time.perf_counter()
    query_ids = list(dataset.queries)
    query_texts = [dataset.queries[q] for q in query_ids]
    if use_dense:
        query_vectors = encode_queries(embedder, query_texts, query_instruction, batch_size, max_length)
    if use_sparse:
        query_weights = encode_query_weights(embedder, query_texts, query_instruction, batch_size, max_length)
    timings["encode_queries_s"] = time.perf_counter() - tick

    from .index import DenseIndex, SparseIndex, fuse_runs, to_run

    rescore = rerank_model is not None or m3_modes == "all"
    depth = top_k or max(max(k_values), rerank_top_k if rescore else 0)
    if depth < max(k_values):
        logger.warning(
            "top_k=%d retrieves fewer documents than k=%d: metrics @%d count only the first %d",
            depth, max(k_values), max(k_values), depth,
        )  # fmt: skip
    # deeper by what is to be skipped (a query's own document, its excluded ones), so each keeps ``depth`` others
    extra = (1 if ignore_identical_ids else 0) + max((len(d) for d in dataset.excluded.values()), default=0)
    runs = []
    tick = time.perf_counter()
    if use_dense:
        if score_function == "cosine":
            corpus_vectors = normalize_rows(corpus_vectors)
            query_vectors = normalize_rows(query_vectors)
        dense_index = DenseIndex.build(corpus_vectors, dataset.corpus_ids, kind=index, quantization=quantization)
    if use_sparse:
        sparse_index = SparseIndex.build(corpus_weights, dataset.corpus_ids)
    timings["index_s"] = time.perf_counter() - tick
    tick = time.perf_counter()
    if use_dense:
        scores, rows = dense_index.search(query_vectors, depth + extra)
        runs.append(to_run(query_ids, scores, rows, dataset.corpus_ids))
    if use_sparse:
        scores, rows = sparse_index.search(query_weights, depth + extra)
        runs.append(to_run(query_ids, scores, rows, dataset.corpus_ids))
    # two lists: the paper's Dense+Sparse, w_dense * s_dense + w_sparse * s_lex over the union of both
    run = runs[0] if len(runs) == 1 else fuse_runs(runs, weights[:2], k=depth + extra)
    if dataset.excluded:  # BRIGHT's excluded_ids: dropped from the results, as FlagEmbedding's BRIGHT searcher does
        run = without_excluded(run, dataset.excluded, depth + (1 if ignore_identical_ids else 0))
    if ignore_identical_ids:  # before reranking and the TREC file: BEIR's and MTEB's search drop it there
        run = without_self_hits(run, depth)
    timings["search_s"] = time.perf_counter() - tick

    retrieval_run = retrieval_metrics = None
    if rerank_model is not None:
        tick = time.perf_counter()
        retrieval_run = run
        run = rerank_run(
            rerank_model,
            dataset,
            retrieval_run,
            rerank_top_k,
            batch_size=reranker_batch_size,
            max_length=reranker_max_length,
            show_progress_bar=show_progress_bar,
        )
        timings["rerank_s"] = time.perf_counter() - tick
    elif m3_modes == "all":
        tick = time.perf_counter()
        retrieval_run = run
        run = m3_rescore_run(
            embedder, dataset, retrieval_run, rerank_top_k, weights, batch_size=batch_size, max_length=max_length
        )
        timings["rerank_s"] = time.perf_counter() - tick

    tick = time.perf_counter()
    texts = dict(zip(dataset.corpus_ids, dataset.corpus_texts, strict=True)) if dataset.answers else {}

    def evaluate(ranking: dict[str, dict[str, float]]) -> dict[str, float]:
        if dataset.answers:  # MKQA: judged by the answers in the retrieved texts, as FlagEmbedding's evaluator
            return metrics_mod.evaluate_answers(dataset.answers, ranking, texts, k_values)
        return metrics_mod.evaluate_run(dataset.qrels, ranking, k_values, ignore_identical_ids=ignore_identical_ids)

    final_metrics = evaluate(run)
    if retrieval_run is not None:
        retrieval_metrics = evaluate(retrieval_run)
    timings["evaluate_s"] = time.perf_counter() - tick
    timings["total_s"] = time.perf_counter() - started

    result = RetrievalResult(
        model=embedder.model_name_or_path,
        dataset=dataset_json(dataset),
        split=dataset.split,
        metrics=final_metrics,
        k_values=list(k_values),
        timings={k: round(v, 3) for k, v in timings.items()},
        run=run,
        retrieval_metrics=retrieval_metrics,
        retrieval_run=retrieval_run,
        reranker=rerank_model.model_name_or_path if rerank_model is not None else None,
        rerank_top_k=rerank_top_k if rescore else None,
        cache=cache,
        settings={
            "score_function": score_function,
            "index": index,
            "quantization": quantization or "none",
            "top_k": depth,
            "query_instruction": effective_query_instruction(embedder, query_instruction),
            "ignore_identical_ids": ignore_identical_ids,
            "excluded_documents": bool(dataset.excluded),
            "max_length": max_length,
            **({"m3_modes": m3_modes, "m3_weights": list(weights)} if m3_modes is not None else {}),
        },
    )
    if output is not None:
        result.save(output)
    return result


# -- BGE-M3's sparse and hybrid modes ---------------------------------------------------------------
M3_MODES = ("dense", "sparse", "dense+sparse", "all")
#: the bge-m3 paper's weights [dense, sparse, colbert]: Dense+Sparse is ``1 * dense + 0.3 * sparse``,
#: All ``1 * dense + 0.3 * sparse + 1 * colbert`` (as FlagEmbedding's MIRACL/MLDR hybrid scripts)
DEFAULT_M3_WEIGHTS = (1.0, 0.3, 1.0)


def check_m3_modes(modes: str | None, weights: Sequence[float] | None, reranker: Any) -> tuple[float, float, float]:
    """The ``[dense, sparse, colbert]`` weights for ``modes``, or an :class:`InputError` for a mode that is
    none of :data:`M3_MODES`, weights that are not three finite numbers, weights without a mode, or
    ``"all"`` with a reranker (both rescore the first stage)."""
    from ..models.m3 import _mode_weights

    if modes is None:
        if weights is not None:
            raise InputError("m3_weights (--m3-weights) only applies with m3_modes (--m3-modes)")
        return DEFAULT_M3_WEIGHTS
    if modes not in M3_MODES:
        raise InputError(f"m3_modes (--m3-modes) must be one of {', '.join(M3_MODES)}; got {modes!r}")
    if modes == "all" and reranker is not None:
        raise InputError("m3_modes 'all' reranks with BGE-M3's own scores: it cannot be combined with a reranker")
    try:
        return _mode_weights(DEFAULT_M3_WEIGHTS if weights is None else weights)
    except InputError as exc:
        raise InputError(str(exc).replace("weights_for_different_modes", "m3_weights (--m3-weights)")) from None


def check_m3_model(embedder: Any, option: str = "m3_modes (--m3-modes)") -> None:
    """An :class:`InputError` unless ``embedder`` is a BGE-M3 model (lexical weights and ColBERT vectors)."""
    from ..models.m3 import BGEM3FlagModel

    if not isinstance(embedder, BGEM3FlagModel):
        raise InputError(
            f"{option} needs a BGE-M3 model; {getattr(embedder, 'model_name_or_path', '')} "
            f"loads as {type(embedder).__name__}, which has dense vectors only"
        )


def encode_query_weights(embedder: Any, texts: list[str], query_instruction: str | None, batch_size, max_length):
    """M3's queries' lexical weights as a CSR matrix (the query instruction as :func:`encode_queries`)."""
    out = _with_instruction(embedder, query_instruction).encode_queries(
        texts, batch_size=batch_size, max_length=max_length, return_dense=False, return_sparse=True
    )
    return embedder.lexical_weights_to_csr(list(out["lexical_weights"]))


def has_cached_lexical_weights(
    embedder: Any, dataset: RetrievalDataset, cache_root: Path | None, max_length: int | None
) -> bool:
    """Whether :func:`corpus_lexical_weights` would find the corpus's lexical weights in the cache."""
    if cache_root is None or not cacheable(embedder):
        return False
    key = cache_key(embedder, dataset, max_length, output="lexical_weights")
    return (cache_root / "corpus" / key[:32] / "lexical_weights.npz").is_file()


def corpus_lexical_weights(
    embedder: Any,
    dataset: RetrievalDataset,
    *,
    cache_root: Path | None,
    batch_size: int | None = None,
    max_length: int | None = None,
    show_progress_bar: bool | None = None,
    known: Mapping[int, Any] | None = None,
) -> tuple[Any, dict[str, Any]]:
    """The corpus's M3 lexical weights as a CSR matrix ``(documents, vocabulary)``, from the cache where
    possible: ``lexical_weights.npz`` under a key of its own (the dense key plus the output's name), so
    dense vectors and lexical weights of one model and corpus are cached side by side. Written whole
    when the corpus is done (no chunks to resume from). ``known``: weights by row already encoded
    (:func:`embed_corpus`'s ``lexical``): only the other rows go through the model. Returns ``(matrix, info)``."""
    from scipy import sparse

    texts, n = dataset.corpus_texts, len(dataset.corpus_texts)
    known = known or {}

    def encode():
        missing = [i for i in range(n) if i not in known]
        weights = dict(known)
        if missing:
            out = embedder.encode_corpus(
                [texts[i] for i in missing], batch_size=batch_size, max_length=max_length, return_dense=False,
                return_sparse=True, show_progress_bar=show_progress_bar,
            )  # fmt: skip
            weights.update(zip(missing, out["lexical_weights"], strict=True))
        return embedder.lexical_weights_to_csr([weights[i] for i in range(n)])

    if cache_root is None or not cacheable(embedder):
        return encode(), {"status": "off", "cached_documents": 0, "embedded_documents": n}
    key = cache_key(embedder, dataset, max_length, output="lexical_weights")
    folder = cache_root / "corpus" / key[:32]
    path = folder / "lexical_weights.npz"
    info: dict[str, Any] = {"path": str(folder), "key": key}
    if path.exists():
        try:
            matrix = sparse.load_npz(path).tocsr()
        except (OSError, ValueError) as exc:
            logger.warning("cached lexical weights %s are unreadable (%s); encoding again", path, exc)
        else:
            if matrix.shape[0] == n:
                return matrix, {**info, "status": "hit", "cached_documents": n, "embedded_documents": 0}
            logger.warning(
                "cached lexical weights %s have %d rows, the corpus %d; encoding again", path, matrix.shape[0], n
            )
    matrix = encode()
    folder.mkdir(parents=True, exist_ok=True)
    _write_meta(folder / "meta.json", embedder, dataset, max_length)

    def write(tmp: Path) -> None:
        with tmp.open("wb") as handle:
            sparse.save_npz(handle, matrix)

    io.write_with(path, write)
    return matrix, {**info, "status": "miss", "cached_documents": 0, "embedded_documents": n}


def m3_rescore_run(
    embedder: Any,
    dataset: RetrievalDataset,
    run: Mapping[str, Mapping[str, float]],
    top_n: int,
    weights: Sequence[float],
    *,
    batch_size: int | None = None,
    max_length: int | None = None,
) -> dict[str, dict[str, float]]:
    """The bge-m3 paper's "All": each query's top ``top_n`` rescored by ``compute_score``'s
    ``"colbert+sparse+dense"`` with ``weights`` (its weighted mean: the weighted sum over the weights'
    sum, so the same order), as FlagEmbedding's MIRACL / MLDR rerank scripts; queries without an
    instruction, as ``compute_score`` (and FlagEmbedding) scores them."""
    texts = dict(zip(dataset.corpus_ids, dataset.corpus_texts, strict=True))
    owners = [(q, d) for q, docs in run.items() for d, _ in metrics_mod.ranked(docs)[:top_n]]
    rescored: dict[str, dict[str, float]] = {q: {} for q in run}
    if not owners:
        return rescored
    scores = embedder.compute_score(
        [(dataset.queries[q], texts[d]) for q, d in owners],
        batch_size=batch_size,
        max_query_length=max_length,
        max_passage_length=max_length,
        weights_for_different_modes=list(weights),
    )["colbert+sparse+dense"]
    for (query_id, doc_id), score in zip(owners, scores, strict=True):
        rescored[query_id][doc_id] = float(score)
    return {query_id: dict(metrics_mod.ranked(docs)) for query_id, docs in rescored.items()}  # best first


def without_self_hits(run: Mapping[str, Mapping[str, float]], depth: int) -> dict[str, dict[str, float]]:
    """Each query's ranking without the document whose id is the query's own (ArguAna-style sets,
    where every query is also in the corpus), cut to ``depth``."""
    return {
        query_id: dict([(doc_id, score) for doc_id, score in docs.items() if doc_id != query_id][:depth])
        for query_id, docs in run.items()
    }


def without_excluded(
    run: Mapping[str, Mapping[str, float]], excluded: Mapping[str, Iterable[str]], depth: int
) -> dict[str, dict[str, float]]:
    """Each query's ranking without the documents ``excluded`` names for it, cut to ``depth``."""
    kept = {}
    for query_id, docs in run.items():
        skip = set(excluded.get(query_id, ()))
        kept[query_id] = dict([(doc_id, score) for doc_id, score in docs.items() if doc_id not in skip][:depth])
    return kept


def load_embedder(model: Any, query_instruction: str | None, options: Mapping[str, Any] | None):
    """An Embedder instance as given, or built with ``Embedder.from_pretrained``."""
    if isinstance(model, (str, Path)):
        from ..models.embedder import Embedder

        kwargs = dict(options or {})
        if query_instruction is not None:
            kwargs["query_instruction_for_retrieval"] = query_instruction
        return Embedder.from_pretrained(str(model), **kwargs)
    if not hasattr(model, "encode_corpus") or not hasattr(model, "encode_queries"):
        raise InputError(f"model must be a bgekit Embedder or a model name / folder, got {type(model).__name__}")
    return model


def check_reranker(reranker: Any, options: Mapping[str, Any] | None) -> None:
    """What can be said of ``reranker`` before any model loads, so a job that would refuse it fails at once,
    not after the embedder loads (or the corpus is encoded): an instance that is not a reranker, or one
    set to score several cutoff layers (reranking needs one score a document); a name or folder set to
    several cutoff layers by ``options``, or that names no reranker the registry or the folder knows (as
    ``bgekit search`` resolves its ``--reranker`` before the query model loads)."""
    from ..models.scoring import check_one_layer

    if isinstance(reranker, (str, Path)):
        from .. import hub, registry

        check_one_layer(None, options)
        hub.resolve(str(reranker), registry.RERANKERS, (options or {}).get("model_class"), for_reranker=True)
        return
    if not hasattr(reranker, "compute_score"):
        raise InputError(f"reranker must be a bgekit Reranker or a model name / folder, got {type(reranker).__name__}")
    check_one_layer(reranker)


def load_reranker(reranker: Any, options: Mapping[str, Any] | None):
    """``reranker``, loaded when it is a name or folder, after :func:`check_reranker`."""
    check_reranker(reranker, options)
    if isinstance(reranker, (str, Path)):
        from ..models.reranker import Reranker

        return Reranker.from_pretrained(str(reranker), **dict(options or {}))
    return reranker


def effective_query_instruction(embedder: Any, override: str | None) -> str | None:
    if override is not None:
        return override or None
    return getattr(embedder, "query_instruction_for_retrieval", None)


def normalize_rows(vectors: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    return (vectors / np.maximum(norms, 1e-12)).astype(np.float32, copy=False)


def encode_queries(embedder: Any, texts: list[str], query_instruction: str | None, batch_size, max_length):
    """Queries through the model's own query path (M3's dense vectors, ICL's examples); an instruction
    given for an Embedder instance replaces its own on a shallow copy (for a name it was set at load time)."""
    kwargs = {"batch_size": batch_size, "max_length": max_length}
    return _dense(_with_instruction(embedder, query_instruction).encode_queries(texts, **kwargs))


def _with_instruction(embedder: Any, query_instruction: str | None) -> Any:
    """``embedder``, or a shallow copy of it with ``query_instruction`` in place of its own."""
    if query_instruction is not None and query_instruction != (embedder.query_instruction_for_retrieval or ""):
        embedder = copy.copy(embedder)  # shares the loaded model; the caller's keeps its instruction
        embedder.query_instruction_for_retrieval = query_instruction or None
        if hasattr(embedder, "set_examples"):  # ICL: the examples' default instruction changes with it
            embedder.set_examples()
    return embedder


def _dense(output: Any) -> np.ndarray:
    """The dense vectors of an encode call (M3 returns a dict)."""
    if isinstance(output, dict):
        output = output.get("dense_vecs")
        if output is None:
            raise InputError("the model returned no dense vectors")
    if hasattr(output, "detach"):
        output = output.detach().cpu().numpy()
    return np.asarray(output, dtype=np.float32)


# -- corpus embeddings with a resumable cache ---------------------------------------------------
_PRECISION_NAMES = {torch.float16: "fp16", torch.bfloat16: "bf16"}


def model_identity(embedder: Any) -> dict[str, Any]:
    """What a model's corpus vectors depend on: name, files (names, sizes, times, and a sample of the
    weights' bytes: :func:`_weights_sample`), pooling, lengths, instruction, precision (the dtype each
    device really runs), a merged LoRA adapter's files and, off the default torch backend, the backend."""
    # bgekit's classes name devices as torch does; another embedder's bare ordinals are CUDA's
    named = getattr(embedder, "target_devices", None) or ["cpu"]
    devices = [f"cuda:{d}" if str(d).isdigit() else str(d) for d in named]
    use_fp16, use_bf16 = bool(getattr(embedder, "use_fp16", False)), bool(getattr(embedder, "use_bf16", False))
    precisions = {_PRECISION_NAMES.get(resolve_dtype(d, use_fp16, use_bf16), "fp32") for d in devices}
    identity = {
        "class": type(embedder).__name__,
        "name": str(getattr(embedder, "model_name_or_path", "")),
        "pooling": getattr(embedder, "pooling_method", None),
        "passage_max_length": getattr(embedder, "passage_max_length", None),
        "passage_instruction": getattr(embedder, "passage_instruction_for_retrieval", None),
        "passage_instruction_format": getattr(embedder, "passage_instruction_format", None),
        "normalize": getattr(embedder, "normalize_embeddings", None),
        "truncate_dim": getattr(embedder, "truncate_dim", None),
        "precision": "+".join(sorted(precisions)),
        "files": _folder_fingerprint(getattr(embedder, "model_name_or_path", "")),
    }
    if identity["files"]:  # the bytes: other weights copied in with their size and time (cp -p) are a new key
        identity["weights_sample"] = _files_sample(identity["files"])
    adapter = getattr(embedder, "peft_path", None)
    if adapter:  # a LoRA adapter merged at load time changes every vector (only then: old keys stay)
        identity["adapter"] = _folder_fingerprint(str(adapter))
        if identity["adapter"]:
            identity["adapter_sample"] = _files_sample(identity["adapter"])
    backend = getattr(embedder, "backend", "torch")
    if backend != "torch":  # only then, so the torch backend's caches keep their keys
        identity["backend"] = backend
        graphs = _onnx_graphs(embedder)
        if graphs:  # the export it runs: a new one (weights replaced in place, new libraries) is a new key
            identity["onnx"] = graphs
    weights = _weights_digest(embedder)
    if weights:  # trained or loaded into in this process: the files no longer say what it computes
        identity["weights"] = weights
    return identity


def vector_space(embedder: Any) -> dict[str, Any]:
    """What decides which vectors a model gives, for telling whether an index's vectors and a query
    model's can be compared: :func:`model_identity` without what leaves the vectors as they are (where
    the folder lies, file times, precision, backend, document length and instruction). The same files
    under a hub id or a local copy are the same space."""
    identity = model_identity(embedder)
    files = identity.pop("files")
    space = {k: identity.get(k) for k in ("class", "pooling", "normalize", "truncate_dim", "weights")}
    if identity.get("adapter"):
        space["adapter"] = [[row[0], row[1]] for row in identity["adapter"][1]]
    if files:
        space["files"] = [[row[0], row[1]] for row in files[1]]
        space["file_times"] = [row[2] for row in files[1]]  # same sizes, new times: maybe retrained in place
        space["weights_sample"] = identity["weights_sample"]
    else:  # a name no folder answers to: known by that name alone
        space["name"] = identity["name"]
    return space


def space_differences(built: dict[str, Any], query: dict[str, Any]) -> list[str]:
    """The keys of two :func:`vector_space` records that differ (empty: the same space); file times
    only count when nothing else differs, as "file_times" (a copy or a new download has new times),
    and not at all when both records hold a "weights_sample" (the bytes themselves were compared).
    A record without "weights_sample" (an index of bgekit before it) is not compared on it."""
    keys = sorted(k for k in set(built) | set(query) if built.get(k) != query.get(k))
    if "weights_sample" not in built or "weights_sample" not in query:
        keys = [k for k in keys if k != "weights_sample"]
    elif "file_times" in keys:  # the bytes were compared: new times alone are a copy or a new download
        keys.remove("file_times")
    return [k for k in keys if k != "file_times"] or keys


#: bytes read from each weights file for :func:`_weights_sample`: 64 runs of 4 KiB spread over the file
_SAMPLE_RUNS, _SAMPLE_BYTES = 64, 4096


def _weights_sample(folder: Path, names: list[str]) -> str:
    """SHA-256 of 64 runs of 4 KiB spread evenly over each weights file (a quarter MiB a file, read in
    milliseconds): a fine-tuned model of the same architecture has weights files of the same names and
    sizes, so only their bytes tell it from a copy of the model an index was built with."""
    digest = hashlib.sha256()
    for name in names:
        path = folder / name
        if path.suffix not in (".safetensors", ".bin", ".pt"):
            continue
        size = path.stat().st_size
        digest.update(f"{name}\0{size}\0".encode())
        step = max(1, (size - _SAMPLE_BYTES) // (_SAMPLE_RUNS - 1))
        with path.open("rb") as handle:
            for offset in range(0, max(1, size - _SAMPLE_BYTES + 1), step)[:_SAMPLE_RUNS]:
                handle.seek(offset)
                digest.update(handle.read(_SAMPLE_BYTES))
    return digest.hexdigest()


def _files_sample(fingerprint: list[Any]) -> str:
    """:func:`_weights_sample` of the weights files a :func:`_folder_fingerprint` lists."""
    return _weights_sample(Path(fingerprint[0]), [row[0] for row in fingerprint[1]])


def _onnx_graphs(embedder: Any) -> list[str]:
    """The ONNX graphs an embedder runs, each by its export's cache folder name: a digest of the weights
    files (size, modification and change time), the backend and the library versions
    (:func:`bgekit.models.onnx_backend.cache_key`), so it changes with the graph even where the weights'
    names, sizes and modification times (the ``files`` fingerprint) do not."""
    from ..models.onnx_backend import OnnxModule

    module = getattr(getattr(embedder, "host", None), "module", None)
    if not isinstance(module, torch.nn.Module):
        return []
    return [part.path.parent.name for part in module.modules() if isinstance(part, OnnxModule)]


def _weights_digest(embedder: Any) -> str | None:
    """SHA-256 of the model's parameters when they were written after loading (only then: hashing
    a large model costs seconds, and unchanged models keep their keys); None otherwise."""
    host = getattr(embedder, "host", None)
    pool = getattr(host, "pool", None)
    if pool is None or not pool.weights_changed():
        return None
    digest = hashlib.sha256()
    for name, tensor in sorted(pool.primary.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _folder_fingerprint(name: str) -> list[Any]:
    """Names, sizes and modification times of a model's files (no hashing of the weights)."""
    from .. import hub

    try:
        folder = hub.model_folder(name)
    except Exception:  # an unresolvable name: identified by the name alone
        return []
    rows = []
    for path in sorted(folder.rglob("*")):
        if path.is_file() and path.suffix in (".json", ".safetensors", ".bin", ".pt", ".txt", ".model"):
            stat = path.stat()
            rows.append([str(path.relative_to(folder)), stat.st_size, stat.st_mtime_ns])
    return [str(folder.resolve()), rows]


def cacheable(embedder: Any) -> bool:
    """Whether a cache key can tell this model's vectors apart: bgekit's own classes always (a name
    they loaded from, or a digest of weights changed since), another class only when it names a model
    folder bgekit can fingerprint; a custom embedder is otherwise known by its class name alone."""
    if type(embedder).__module__.split(".")[0] == "bgekit":
        return True
    return bool(_folder_fingerprint(str(getattr(embedder, "model_name_or_path", "") or "")))


def cache_key(embedder: Any, dataset: RetrievalDataset, max_length: int | None, output: str = "dense") -> str:
    """The cache key of a model's ``output`` for a corpus: dense vectors' keys hold no output name (the
    keys caches were written under before M3's lexical weights were cached), other outputs' do."""
    payload = {
        "version": CACHE_VERSION,
        "model": model_identity(embedder),
        "corpus": dataset.fingerprint(),
        "max_length": max_length,
    }
    if output != "dense":
        payload["output"] = output
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()


def embed_corpus(
    embedder: Any,
    dataset: RetrievalDataset,
    *,
    cache_root: Path | None,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    batch_size: int | None = None,
    max_length: int | None = None,
    show_progress_bar: bool | None = None,
    on_chunk: Callable[[int, int], None] | None = None,
    lexical: dict[int, Any] | None = None,
) -> tuple[np.ndarray, dict[str, Any]]:
    """Corpus vectors in corpus order, from the cache where possible. Returns ``(vectors, info)``.
    ``lexical`` (a dict, BGE-M3): the lexical weights of the documents this call encodes go into it by
    row, from the same forward pass (:func:`corpus_lexical_weights` then encodes only the others)."""
    texts = dataset.corpus_texts
    n = len(texts)
    both = {"return_dense": True, "return_sparse": True} if lexical is not None else {}

    def encode(rows: Sequence[int]) -> np.ndarray:
        output = embedder.encode_corpus(
            [texts[i] for i in rows], batch_size=batch_size, max_length=max_length,
            show_progress_bar=show_progress_bar, **both,
        )  # fmt: skip
        if lexical is not None:
            lexical.update(zip(rows, output["lexical_weights"], strict=True))
        return _dense(output)

    if cache_root is None:
        vectors = encode(range(n))
        return vectors, {"status": "off", "cached_documents": 0, "embedded_documents": n}

    if not cacheable(embedder):
        logger.warning(
            "corpus embeddings of %s are not cached: it names no model folder bgekit can fingerprint, so a "
            "cache could not tell its vectors from another instance's (give it a model_name_or_path)",
            type(embedder).__name__,
        )
        vectors = encode(range(n))
        return vectors, {
            "status": "off",
            "reason": "unidentifiable model",
            "cached_documents": 0,
            "embedded_documents": n,
        }

    key = cache_key(embedder, dataset, max_length)
    folder = cache_root / "corpus" / key[:32]
    final = folder / "embeddings.npy"
    info: dict[str, Any] = {"path": str(folder), "key": key}
    if final.exists():
        try:
            vectors = np.load(final)
        except (OSError, ValueError) as exc:
            logger.warning("cached embeddings %s are unreadable (%s); embedding again", final, exc)
        else:
            if vectors.shape[0] == n:
                logger.info("corpus embeddings from the cache: %s", final)
                return vectors, {**info, "status": "hit", "cached_documents": n, "embedded_documents": 0}
            logger.warning("cached embeddings %s have %d rows, the corpus %d; embedding again", final, len(vectors), n)

    folder.mkdir(parents=True, exist_ok=True)
    plan = {"documents": n, "chunk_size": chunk_size, "corpus": dataset.fingerprint()}
    plan_path = folder / "plan.json"
    if plan_path.exists():
        try:
            old_plan = json.loads(plan_path.read_text(encoding="utf-8"))
        except ValueError:
            old_plan = None
        if old_plan != plan:
            for stale in folder.glob("chunk-*.npy"):
                stale.unlink()
    io.write_with(plan_path, lambda tmp: tmp.write_text(json.dumps(plan), encoding="utf-8"))
    _write_meta(folder / "meta.json", embedder, dataset, max_length)

    # longest texts first, so each chunk holds texts of similar length (little padding)
    order = np.argsort(-np.fromiter((len(t) for t in texts), dtype=np.int64, count=n), kind="stable")
    chunks = [order[start : start + chunk_size] for start in range(0, n, chunk_size)]
    vectors: np.ndarray | None = None
    cached = embedded = 0
    for number, rows in enumerate(chunks):
        path = folder / f"chunk-{number:05d}.npy"
        block = None
        if path.exists():
            try:
                block = np.load(path)
            except (OSError, ValueError):
                block = None
            if block is not None and block.shape[0] != len(rows):
                block = None
        if block is None:
            block = encode(rows.tolist())
            io.write_with(path, lambda tmp, b=block: _save_npy(tmp, b))
            embedded += len(rows)
        else:
            cached += len(rows)
        if vectors is None:
            vectors = np.empty((n, block.shape[1]), dtype=np.float32)
        vectors[rows] = block
        logger.info("corpus chunk %d/%d done (%d documents)", number + 1, len(chunks), len(rows))
        if on_chunk is not None:
            on_chunk(number + 1, len(chunks))
    assert vectors is not None
    io.write_with(final, lambda tmp: _save_npy(tmp, vectors))
    for path in folder.glob("chunk-*.npy"):
        path.unlink()
    plan_path.unlink(missing_ok=True)
    status = "miss" if cached == 0 else "resumed"
    if cached:
        logger.info("resumed: %d of %d corpus embeddings came from an interrupted run", cached, n)
    return vectors, {**info, "status": status, "cached_documents": cached, "embedded_documents": embedded}


def _save_npy(tmp: Path, array: np.ndarray) -> None:
    with tmp.open("wb") as handle:
        np.save(handle, np.asarray(array, dtype=np.float32))


def _write_meta(path: Path, embedder: Any, dataset: RetrievalDataset, max_length: int | None) -> None:
    meta = {
        "model": model_identity(embedder),
        "dataset": dataset.name,
        "dataset_path": str(dataset.path) if dataset.path else None,
        "documents": len(dataset.corpus_ids),
        "corpus_sha256": dataset.fingerprint(),
        "max_length": max_length,
        "bgekit_version": __version__,
    }
    io.write_with(path, lambda tmp: tmp.write_text(json.dumps(meta, indent=1, default=str), encoding="utf-8"))


def clear_cache(cache_dir: str | Path | None = None) -> None:
    """Remove every cached corpus embedding."""
    root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir() / "eval"
    shutil.rmtree(root / "corpus", ignore_errors=True)


# -- reranking ----------------------------------------------------------------------------------
def rerank_run(
    reranker: Any,
    dataset: RetrievalDataset,
    run: Mapping[str, Mapping[str, float]],
    top_n: int,
    *,
    batch_size: int | None = None,
    max_length: int | None = None,
    show_progress_bar: bool | None = None,
) -> dict[str, dict[str, float]]:
    """Score each query's top ``top_n`` (query text, document text) pairs with ``reranker``;
    the reranked run holds those documents with the reranker's scores. A layerwise reranker set to score
    several cutoff layers is refused (:class:`~bgekit.InputError`): a run needs one score a document."""
    from ..models.scoring import check_one_layer, score_list

    check_one_layer(reranker)
    texts = dict(zip(dataset.corpus_ids, dataset.corpus_texts, strict=True))
    owners: list[tuple[str, str]] = []
    pairs: list[tuple[str, str]] = []
    for query_id, docs in run.items():
        for doc_id, _ in metrics_mod.ranked(docs)[:top_n]:
            owners.append((query_id, doc_id))
            pairs.append((dataset.queries[query_id], texts[doc_id]))
    if not pairs:
        return {q: {} for q in run}
    scores = reranker.compute_score(
        pairs, batch_size=batch_size, max_length=max_length, show_progress_bar=show_progress_bar
    )
    scores = score_list(scores, len(pairs))  # a custom model's numpy array too; several layers are refused
    reranked: dict[str, dict[str, float]] = {q: {} for q in run}
    for (query_id, doc_id), score in zip(owners, scores, strict=True):
        reranked[query_id][doc_id] = float(score)
    return reranked
