"""CQADupStack as a whole: each forum evaluated in its own corpus, the dataset's score their mean.

BEIR's ``cqadupstack`` archive holds twelve forums, each a dataset with its own corpus; BEIR and
MTEB search each forum's queries in that forum's corpus alone and publish the unweighted mean of
the twelve forums' metrics (MTEB's ``CQADupstackRetrieval``, its ``merge_cqadupstack`` script).
:func:`evaluate_forums` does that with one loaded model; each forum has its own corpus cache entry.
"""

from __future__ import annotations

import json
import logging
import statistics
import time
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .. import __version__, io
from ..errors import InputError
from . import metrics as metrics_mod
from .datasets import CQADUPSTACK_FORUMS, available_splits, required_files
from .retrieval import (
    RetrievalResult,
    evaluate_retrieval,
    load_embedder,
    load_reranker,
    remove_other_runs,
    report_stem,
)

logger = logging.getLogger(__name__)

#: what the top-level ``metrics`` of an :class:`AveragedRetrievalResult` are
MEAN_NOTE = (
    "unweighted mean over the forums of each forum's metrics (each forum searched in its own corpus), "
    "as BEIR and MTEB report CQADupStack"
)


@dataclass
class AveragedRetrievalResult:
    """What :func:`evaluate_forums` found. ``metrics`` (and ``retrieval_metrics`` when reranked) are
    the mean over ``forums`` of each forum's; ``per_forum`` holds each forum's own result."""

    model: str
    name: str
    path: str
    split: str
    metrics: dict[str, float]
    k_values: list[int]
    timings: dict[str, float]
    per_forum: dict[str, RetrievalResult] = field(repr=False)
    retrieval_metrics: dict[str, float] | None = None
    reranker: str | None = None
    rerank_top_k: int | None = None
    files: dict[str, str] = field(default_factory=dict)

    @property
    def forums(self) -> list[str]:
        return list(self.per_forum)

    @property
    def missing_forums(self) -> list[str]:
        return [f for f in CQADUPSTACK_FORUMS if f not in self.per_forum]

    @property
    def totals(self) -> dict[str, int]:
        """Documents, queries and judgments of all the forums together."""
        return {k: sum(r.dataset[k] for r in self.per_forum.values()) for k in ("documents", "queries", "judgments")}

    @property
    def cache(self) -> dict[str, Any]:
        """How many forums' corpus vectors were a cache hit, a miss, resumed or not cached."""
        counts = Counter(r.cache.get("status", "off") for r in self.per_forum.values())
        return {"forums_by_status": dict(sorted(counts.items()))}

    def to_json(self) -> dict[str, Any]:
        """The report: ``metrics`` and ``main_score`` are the mean over the forums (``aggregate``
        says so); each forum's own report is under ``per_forum``."""
        first = next(iter(self.per_forum.values()))
        return {
            "model": self.model,
            "dataset": self.name,
            "split": self.split,
            "aggregate": {
                "method": "mean",
                "over": self.forums,
                "missing": self.missing_forums,
                "note": MEAN_NOTE,
            },
            "metrics": self.metrics,
            "main_score": self.metrics.get("ndcg_at_10"),
            "k_values": self.k_values,
            "reranker": self.reranker,
            "rerank_top_k": self.rerank_top_k,
            "retrieval_metrics": self.retrieval_metrics,
            "timings": self.timings,
            "dataset_info": {
                "name": self.name,
                "path": self.path,
                "forums": len(self.per_forum),
                **self.totals,
            },
            "cache": self.cache,
            "settings": first.settings,
            "per_forum": {forum: _forum_json(result) for forum, result in self.per_forum.items()},
            "files": self.files,
            "bgekit_version": __version__,
        }

    def to_markdown(self) -> str:
        """The mean's metric table (the dataset's score), then one row a forum."""
        n = len(self.per_forum)
        info = self.totals
        lines = [
            f"## Retrieval: {self.model} on {self.name} ({self.split}), mean over {n} forums",
            "",
            f"{n} forums, each searched in its own corpus; {info['queries']} queries, {info['documents']} "
            f"documents, {info['judgments']} judgments in all"
            + (f"; reranked top {self.rerank_top_k} with {self.reranker}" if self.reranker else "")
            + self._m3_words()
            + ".",
        ]
        if self.missing_forums:
            lines += [
                "",
                f"Missing forums: {', '.join(self.missing_forums)}: this mean is not comparable with published "
                "CQADupStack scores (the mean over all twelve).",
            ]
        lines += ["", f"Mean over the {n} forums (the dataset's score):", "", self._table(self.metrics)]
        if self.retrieval_metrics is not None:
            first_stage = self._table(self.retrieval_metrics)
            lines += ["", "First stage (before reranking), mean over the forums:", "", first_stage]
        header = "| forum | queries | documents | " + " | ".join(f"nDCG@{k}" for k in self.k_values) + " |"
        lines += ["", "Per forum:", "", header, "|---|---:|---:|" + "---:|" * len(self.k_values)]
        for forum, result in self.per_forum.items():
            cells = " | ".join(f"{result.metrics[f'ndcg_at_{k}']:.5f}" for k in self.k_values)
            lines.append(f"| {forum} | {result.dataset['queries']} | {result.dataset['documents']} | {cells} |")
        cells = " | ".join(f"{self.metrics[f'ndcg_at_{k}']:.5f}" for k in self.k_values)
        lines.append(f"| **mean** |  |  | {cells} |")
        cache = ", ".join(f"{count} {status}" for status, count in self.cache["forums_by_status"].items())
        lines += ["", f"Total time {self.timings['total_s']:.1f}s. Corpus embeddings by forum: {cache}."]
        return "\n".join(lines) + "\n"

    def _m3_words(self) -> str:
        """``"; search: M3 MODE (...)"`` when the forums were searched with BGE-M3's ``m3_modes``."""
        first = next(iter(self.per_forum.values()), None)
        if first is None or first.settings.get("m3_modes") is None:
            return ""
        return f"; search: {first._search_words()}"

    def _table(self, metrics: Mapping[str, float]) -> str:
        return metrics_mod.metric_table(metrics, self.k_values)

    def save(self, output: str | Path) -> dict[str, str]:
        """Write ``OUT.json``, ``OUT.md`` and each forum's TREC run file ``OUT.FORUM.trec`` (with a
        reranker also ``OUT.FORUM.retrieval.trec``), each atomically. Returns the paths."""
        stem = report_stem(output)
        json_path = stem.with_name(stem.name + ".json")
        files = {"json": str(json_path), "markdown": str(stem.with_name(stem.name + ".md"))}
        for forum, result in self.per_forum.items():
            files.update(result.save_runs(stem.with_name(f"{stem.name}.{forum}"), prefix=f"{forum}."))
        remove_other_runs(stem, files.values())  # an earlier run's forums that this one did not evaluate
        self.files = files
        io.write_with(files["markdown"], lambda tmp: tmp.write_text(self.to_markdown(), encoding="utf-8"))
        text = json.dumps(self.to_json(), indent=1, ensure_ascii=False) + "\n"
        io.write_with(json_path, lambda tmp: tmp.write_text(text, encoding="utf-8"))
        return files


def evaluate_forums(
    model: Any,
    folders: list[Path],
    split: str = "test",
    *,
    reranker: Any = None,
    query_instruction: str | None = None,
    model_options: Mapping[str, Any] | None = None,
    reranker_options: Mapping[str, Any] | None = None,
    output: str | Path | None = None,
    **options: Any,
) -> AveragedRetrievalResult:
    """Evaluate each forum folder (its own corpus, index and cache entry) with one loaded model and
    average the forums' metrics; ``options`` are :func:`evaluate_retrieval`'s."""
    started = time.perf_counter()
    root = folders[0].parent
    missing = [f for f in CQADUPSTACK_FORUMS if f not in {folder.name for folder in folders}]
    if missing:
        logger.warning(
            "%s holds %d of the %d CQADupStack forums (missing: %s): their mean is not comparable with published "
            "CQADupStack scores",
            root, len(folders), len(CQADUPSTACK_FORUMS), ", ".join(missing),
        )  # fmt: skip
    for folder in folders:  # before any forum is embedded: the last one's missing split was found at the end
        splits = available_splits(folder)
        if split not in splits:
            raise InputError(
                f"forum {folder} has no judgments for split {split!r} (splits found: {', '.join(splits) or 'none'})"
            )
        required_files(folder, split)  # a forum without its queries file, likewise
    tick = time.perf_counter()
    embedder = load_embedder(model, query_instruction, model_options)
    rerank_model = load_reranker(reranker, reranker_options) if reranker is not None else None
    load_models_s = time.perf_counter() - tick
    per_forum: dict[str, RetrievalResult] = {}
    for number, folder in enumerate(folders, start=1):
        logger.info("forum %d/%d: %s", number, len(folders), folder.name)
        per_forum[folder.name] = evaluate_retrieval(
            embedder,
            folder,  # a forum's folder: one dataset, loaded (and timed) there
            split,
            reranker=rerank_model,
            query_instruction=query_instruction,
            **options,
        )
    first = next(iter(per_forum.values()))
    reranked = first.retrieval_metrics is not None
    timings = {key: round(sum(r.timings.get(key, 0.0) for r in per_forum.values()), 3) for key in first.timings}
    timings["load_models_s"] = round(load_models_s, 3)
    timings["total_s"] = round(time.perf_counter() - started, 3)
    result = AveragedRetrievalResult(
        model=first.model,
        name=root.resolve().name,  # "." run inside the archive folder is named by the folder
        path=str(root),
        split=first.split,
        metrics=mean_metrics([r.metrics for r in per_forum.values()]),
        k_values=first.k_values,
        timings=timings,
        per_forum=per_forum,
        retrieval_metrics=mean_metrics([r.retrieval_metrics for r in per_forum.values()]) if reranked else None,
        reranker=first.reranker,
        rerank_top_k=first.rerank_top_k,
    )
    if output is not None:
        result.save(output)
    return result


def mean_metrics(results: list[Mapping[str, float]]) -> dict[str, float]:
    """Each metric's unweighted mean over ``results`` (MTEB's merge of the CQADupStack forums)."""
    return {key: statistics.fmean(r[key] for r in results) for key in results[0]}


def _forum_json(result: RetrievalResult) -> dict[str, Any]:
    """A forum's report without what the whole report already says."""
    report = result.to_json()
    for key in ("model", "split", "k_values", "reranker", "rerank_top_k", "settings", "files", "bgekit_version"):
        report.pop(key, None)
    return report
