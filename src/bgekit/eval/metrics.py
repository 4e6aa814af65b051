"""Retrieval metrics through pytrec_eval (the trec_eval C code), exactly as MTEB computes them.

- ``ndcg_at_k`` = trec_eval ``ndcg_cut.k``, ``map_at_k`` = ``map_cut.k``, ``recall_at_k`` =
  ``recall.k``, ``precision_at_k`` = ``P.k``;
- ``mrr_at_k`` = trec_eval ``recip_rank`` on each query's top k, ranked the way trec_eval ranks
  (score descending, ties by document id descending), which is MTEB's MRR@k.

Values are fractions averaged over the judged queries that have results (MTEB's rule; a
judged query with no results at all counts 0, as ``trec_eval -c``). Runs and qrels are the
pytrec_eval dicts: ``{query_id: {doc_id: score}}`` and ``{query_id: {doc_id: int}}``.

Datasets judged by answers rather than documents (MKQA) get ``qa_recall_at_k`` (:func:`evaluate_answers`):
the share of queries with an answer string in one of their top k texts, as FlagEmbedding's MKQA evaluator
(RocketQA's and DPR's retrieval accuracy) computes it.
"""

from __future__ import annotations

import math
import unicodedata
from collections.abc import Iterable, Mapping, Sequence
from functools import cache
from pathlib import Path
from typing import Any

from .. import io
from ..errors import DataFormatError, InputError

Run = dict[str, dict[str, float]]
Qrels = dict[str, dict[str, int]]

#: metric family -> (pytrec_eval measure, key prefix in the result)
_MEASURES = {"ndcg": ("ndcg_cut", "ndcg_cut_"), "map": ("map_cut", "map_cut_"), "recall": ("recall", "recall_")}
_MEASURES["precision"] = ("P", "P_")
METRICS = ("ndcg", "map", "recall", "precision", "mrr")
DEFAULT_K = (1, 3, 5, 10, 100)


def check_k_values(k_values: Iterable[int]) -> tuple[int, ...]:
    """Sorted unique positive cutoffs."""
    values = sorted({int(k) for k in k_values}) if k_values is not None else []
    if not values or any(isinstance(k, bool) or k < 1 for k in values):
        raise InputError(f"k values must be positive integers, got {k_values!r}")
    return tuple(values)


def ranked(docs: Mapping[str, float]) -> list[tuple[str, float]]:
    """A query's documents in trec_eval's order: score descending, then document id descending."""
    return sorted(docs.items(), key=lambda item: (item[1], item[0]), reverse=True)


def truncate(run: Mapping[str, Mapping[str, float]], k: int) -> Run:
    """Each query's top ``k`` documents in trec_eval's order."""
    return {q: dict(ranked(docs)[:k]) for q, docs in run.items()}


def _clean(run: Mapping[str, Mapping[str, float]], ignore_identical_ids: bool) -> Run:
    cleaned: Run = {}
    for query_id, docs in run.items():
        values = {}
        for doc_id, score in docs.items():
            if ignore_identical_ids and doc_id == query_id:
                continue
            value = float(score)
            if math.isnan(value):
                raise InputError(f"the run scores document {doc_id!r} for query {query_id!r} as NaN")
            values[str(doc_id)] = value
        cleaned[str(query_id)] = values
    return cleaned


def require_pytrec_eval() -> Any:
    """The ``pytrec_eval`` module, or an :class:`InputError` naming the ``eval`` extra (callers check
    before a corpus is encoded, not after)."""
    try:
        import pytrec_eval
    except ImportError:
        raise InputError("retrieval metrics need pytrec_eval: pip install 'bgekit[eval]'") from None
    return pytrec_eval


def evaluate_run(
    qrels: Mapping[str, Mapping[str, int]],
    run: Mapping[str, Mapping[str, float]],
    k_values: Sequence[int] = DEFAULT_K,
    *,
    ignore_identical_ids: bool = False,
    per_query: bool = False,
) -> dict[str, float] | tuple[dict[str, float], dict[str, dict[str, float]]]:
    """nDCG, MAP, recall, precision and MRR at each k, as MTEB's key names.

    ``ignore_identical_ids`` drops a document whose id equals the query id (MTEB does so
    for tasks like ArguAna, where the query is itself in the corpus). With ``per_query``,
    also returns ``{query_id: {metric: value}}``.
    """
    pytrec_eval = require_pytrec_eval()
    k_values = check_k_values(k_values)
    qrels = {str(q): {str(d): int(r) for d, r in docs.items()} for q, docs in qrels.items()}
    if not qrels:
        raise InputError("no relevance judgments to evaluate against")
    run = _clean(run, ignore_identical_ids)
    cut = ",".join(str(k) for k in k_values)
    measures = {f"{name}.{cut}" for name, _ in _MEASURES.values()}
    scores = pytrec_eval.RelevanceEvaluator(qrels, measures).evaluate(run)
    rr_evaluator = pytrec_eval.RelevanceEvaluator(qrels, {"recip_rank"})
    for k in k_values:
        for query_id, values in rr_evaluator.evaluate(truncate(run, k)).items():
            scores.setdefault(query_id, {})[f"mrr_{k}"] = values["recip_rank"]
    # judged queries whose run is empty or missing: trec_eval -c counts them as zero
    missing = [q for q in qrels if q not in scores and any(r > 0 for r in qrels[q].values())]
    names = {
        f"{family}_at_{k}": (_MEASURES[family][1] if family != "mrr" else "mrr_") + str(k)
        for family in METRICS
        for k in k_values
    }
    per: dict[str, dict[str, float]] = {
        q: {name: float(values.get(key, 0.0)) for name, key in names.items()} for q, values in scores.items()
    }
    for q in missing:
        per[q] = dict.fromkeys(names, 0.0)
    if not per:
        raise InputError("the run shares no query with the judgments")
    averages = {name: sum(values[name] for values in per.values()) / len(per) for name in names}
    return (averages, per) if per_query else averages


def main_score(metrics: Mapping[str, float]) -> float | None:
    """The report's headline number: nDCG@10, or for answer-judged sets QA recall@100 (the bge-m3 paper's
    MKQA figure), else at the largest k reported."""
    if "ndcg_at_10" in metrics or not any(name.startswith("qa_recall_at_") for name in metrics):
        return metrics.get("ndcg_at_10")
    if "qa_recall_at_100" in metrics:
        return metrics["qa_recall_at_100"]
    return metrics[max((n for n in metrics if n.startswith("qa_recall_at_")), key=lambda n: int(n.rsplit("_", 1)[1]))]


@cache
def _word_pattern() -> Any:
    """DPR's ``SimpleTokenizer``: runs of letters, digits and marks, or any other visible character."""
    import regex  # a transformers dependency: \p{...} classes, which re lacks

    return regex.compile(
        r"([\p{L}\p{N}\p{M}]+)|([^\p{Z}\p{C}])", flags=regex.IGNORECASE | regex.UNICODE | regex.MULTILINE
    )


def answer_tokens(text: str) -> list[str]:
    """A text as answer matching sees it: NFD-normalized, split into DPR's simple tokens, lower-cased."""
    return [match.group().lower() for match in _word_pattern().finditer(unicodedata.normalize("NFD", text))]


def has_answer(answers: Sequence[Sequence[str]], tokens: Sequence[str]) -> bool:
    """Whether one of the answers (each as :func:`answer_tokens`) is a run of consecutive ``tokens``."""
    return any(
        list(answer) == list(tokens[i : i + len(answer)])
        for answer in answers
        for i in range(len(tokens) - len(answer) + 1)
    )


def evaluate_answers(
    answers: Mapping[str, Sequence[str]],
    run: Mapping[str, Mapping[str, float]],
    texts: Mapping[str, str],
    k_values: Sequence[int] = DEFAULT_K,
) -> dict[str, float]:
    """``qa_recall_at_k``: the share of the run's queries with one of their answers in the text of one of their
    top k documents, as FlagEmbedding's MKQA evaluator computes it: documents by score (ties in run order),
    texts and answers as :func:`answer_tokens`, and k capped at the length of the first query's list."""
    k_values = check_k_values(k_values)
    query_ids = [q for q in run if q in answers]
    if not query_ids:
        raise InputError("the run shares no query with the answers")
    depth = max(k_values)
    tokens: dict[str, list[str]] = {}  # each document tokenized once, whichever queries retrieve it
    first_hits: list[int | None] = []
    listed = None
    for query_id in query_ids:
        ranking = [d for d, _ in sorted(run[query_id].items(), key=lambda item: item[1], reverse=True)][:depth]
        listed = len(ranking) if listed is None else listed
        wanted = [answer_tokens(a) for a in answers[query_id]]
        first = None
        for rank, doc_id in enumerate(ranking):
            if doc_id not in tokens:
                tokens[doc_id] = answer_tokens(texts[doc_id])
            if has_answer(wanted, tokens[doc_id]):
                first = rank
                break
        first_hits.append(first)
    return {
        f"qa_recall_at_{k}": sum(1 for h in first_hits if h is not None and h < min(k, listed)) / len(query_ids)
        for k in k_values
    }


# -- TREC run files ---------------------------------------------------------------------------
def write_trec_run(path: str | Path, run: Mapping[str, Mapping[str, float]], tag: str = "bgekit") -> Path:
    """Write ``qid Q0 docid rank score tag`` lines (trec_eval's run format), best first, atomically."""
    if not tag or any(c.isspace() for c in tag):
        raise InputError(f"a run tag must be one word, got {tag!r}")
    for query_id, docs in run.items():
        for doc_id in (query_id, *docs):
            if not str(doc_id) or any(c.isspace() for c in str(doc_id)):
                raise InputError(f"TREC run files need ids without spaces, got {str(doc_id)!r}")

    def write(tmp: Path) -> None:
        with tmp.open("w", encoding="utf-8") as handle:
            for query_id, docs in run.items():
                for rank, (doc_id, score) in enumerate(ranked(docs), start=1):
                    handle.write(f"{query_id} Q0 {doc_id} {rank} {float(score):.8g} {tag}\n")

    io.write_with(path, write)
    return Path(path)


def read_trec_run(path: str | Path) -> Run:
    """Read a TREC run file (``qid Q0 docid rank score tag``)."""
    path = Path(path)
    if not path.exists():
        raise InputError(f"run file {path} does not exist")
    run: Run = {}
    with path.open("r", encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            parts = line.split()
            if len(parts) != 6:
                raise DataFormatError(
                    path, number, f"expected 6 columns (qid Q0 docid rank score tag), found {len(parts)}"
                )
            try:
                score = float(parts[4])
            except ValueError:
                raise DataFormatError(path, number, f"score {parts[4]!r} is not a number") from None
            docs = run.setdefault(parts[0], {})
            if parts[2] in docs:
                raise DataFormatError(path, number, f"document {parts[2]!r} appears twice for query {parts[0]!r}")
            docs[parts[2]] = score
    if not run:
        raise InputError(f"run file {path} is empty")
    return run


def write_trec_qrels(path: str | Path, qrels: Mapping[str, Mapping[str, int]]) -> Path:
    """Write ``qid 0 docid relevance`` lines (trec_eval's qrels format), atomically."""

    def write(tmp: Path) -> None:
        with tmp.open("w", encoding="utf-8") as handle:
            for query_id, docs in qrels.items():
                for doc_id, rel in docs.items():
                    handle.write(f"{query_id} 0 {doc_id} {int(rel)}\n")

    io.write_with(path, write)
    return Path(path)


def metric_table(metrics: Mapping[str, float], k_values: Sequence[int], digits: int = 5) -> str:
    """A Markdown table: one row per metric family, one column per k."""
    labels = {"ndcg": "nDCG", "map": "MAP", "recall": "Recall", "precision": "Precision", "mrr": "MRR"}
    labels["qa_recall"] = "QA recall"
    lines = ["| metric | " + " | ".join(f"@{k}" for k in k_values) + " |"]
    lines.append("|---|" + "---:|" * len(k_values))
    for family in (*METRICS, "qa_recall"):
        cells = [metrics.get(f"{family}_at_{k}") for k in k_values]
        if all(c is None for c in cells):
            continue
        lines.append(
            f"| {labels[family]} | " + " | ".join("" if c is None else f"{c:.{digits}f}" for c in cells) + " |"
        )
    return "\n".join(lines)
