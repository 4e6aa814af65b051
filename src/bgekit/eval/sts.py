"""Semantic textual similarity: cosine of the two sentences' vectors against gold scores.

As MTEB: each sentence is embedded as it is (no instruction), the score of a pair is the
cosine similarity of its two vectors, and the result is the Spearman (main score) and
Pearson correlation with the gold scores over all pairs (scipy).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .. import __version__, io
from ..errors import InputError
from .datasets import StsDataset, load_sts


@dataclass
class StsResult:
    model: str
    dataset: str
    metrics: dict[str, float]
    pairs: int
    timings: dict[str, float] = field(default_factory=dict)
    path: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "dataset": self.dataset,
            "data": self.path,
            "pairs": self.pairs,
            "metrics": self.metrics,
            "main_score": self.metrics["cosine_spearman"],
            "timings": self.timings,
            "bgekit_version": __version__,
        }

    def to_markdown(self) -> str:
        return (
            f"## STS: {self.model} on {self.dataset} ({self.pairs} pairs)\n\n"
            "| metric | value |\n|---|---:|\n"
            + "".join(f"| {name} | {value:.5f} |\n" for name, value in self.metrics.items())
        )

    def save(self, output: str | Path) -> dict[str, str]:
        output = Path(output)
        stem = output.with_suffix("") if output.suffix.lower() == ".json" else output
        files = {"json": str(stem.with_name(stem.name + ".json")), "markdown": str(stem.with_name(stem.name + ".md"))}
        io.write_with(files["markdown"], lambda tmp: tmp.write_text(self.to_markdown(), encoding="utf-8"))
        text = json.dumps(self.to_json(), indent=1, ensure_ascii=False) + "\n"
        io.write_with(files["json"], lambda tmp: tmp.write_text(text, encoding="utf-8"))
        self.files = files
        return files


def cosine_pairs(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-wise cosine similarity of two ``(n, dim)`` arrays, in float64."""
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    norms = np.maximum(np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1), 1e-12)
    return (a * b).sum(axis=1) / norms


def sts_correlations(predicted: np.ndarray, gold: np.ndarray) -> dict[str, float]:
    """Spearman and Pearson correlation of predicted and gold similarities."""
    from scipy.stats import pearsonr, spearmanr

    predicted = np.asarray(predicted, dtype=np.float64)
    gold = np.asarray(gold, dtype=np.float64)
    if len(predicted) != len(gold) or len(gold) < 2:
        raise InputError(f"need at least 2 scored pairs, got {len(gold)}")
    if np.ptp(gold) == 0:
        raise InputError("every gold score is the same: correlation is undefined")
    return {
        "cosine_spearman": float(spearmanr(predicted, gold).statistic),
        "cosine_pearson": float(pearsonr(predicted, gold).statistic),
    }


def evaluate_sts(
    model: Any,
    data: str | Path | StsDataset,
    *,
    batch_size: int | None = None,
    max_length: int | None = None,
    model_options: dict[str, Any] | None = None,
    output: str | Path | None = None,
    show_progress_bar: bool | None = None,
) -> StsResult:
    """Cosine Spearman / Pearson of ``model`` on an STS file (``sentence1<TAB>sentence2<TAB>score``)."""
    started = time.perf_counter()
    dataset = data if isinstance(data, StsDataset) else load_sts(data)
    if isinstance(model, (str, Path)):
        from ..models.embedder import Embedder

        model = Embedder.from_pretrained(str(model), **dict(model_options or {}))
    loaded = time.perf_counter()
    unique = list(dict.fromkeys(dataset.sentences1 + dataset.sentences2))
    vectors = model.encode(unique, batch_size=batch_size, max_length=max_length, show_progress_bar=show_progress_bar)
    if isinstance(vectors, dict):  # M3
        vectors = vectors["dense_vecs"]
    vectors = np.asarray(vectors, dtype=np.float32)
    row = {text: i for i, text in enumerate(unique)}
    a = vectors[[row[s] for s in dataset.sentences1]]
    b = vectors[[row[s] for s in dataset.sentences2]]
    encoded = time.perf_counter()
    metrics = sts_correlations(cosine_pairs(a, b), np.asarray(dataset.scores))
    result = StsResult(
        model=str(getattr(model, "model_name_or_path", type(model).__name__)),
        dataset=dataset.name,
        metrics=metrics,
        pairs=len(dataset),
        timings={
            "load_model_s": round(loaded - started, 3),
            "encode_s": round(encoded - loaded, 3),
            "total_s": round(time.perf_counter() - started, 3),
        },
        path=str(dataset.path) if dataset.path else None,
    )
    if output is not None:
        result.save(output)
    return result
