"""Evaluation: retrieval (BEIR layout) and STS, with MTEB's exact metrics.

Nothing heavy is imported here; each name loads its module on first use, so
``import bgekit.eval`` stays as light as ``import bgekit``.

Example:
    >>> from bgekit.eval import evaluate_retrieval                      # doctest: +SKIP
    >>> result = evaluate_retrieval("sentence-transformers/all-MiniLM-L6-v2",
    ...                             "examples/data/scifact-mini", split="test")   # doctest: +SKIP
    >>> result.metrics["ndcg_at_10"]                                    # doctest: +SKIP
"""

from __future__ import annotations

import importlib

# public name -> module that defines it (imported on first access)
_LAZY = {
    "AveragedRetrievalResult": "bgekit.eval.averaged",
    "RetrievalDataset": "bgekit.eval.datasets",
    "StsDataset": "bgekit.eval.datasets",
    "load_retrieval_dataset": "bgekit.eval.datasets",
    "load_sts": "bgekit.eval.datasets",
    "DenseIndex": "bgekit.eval.index",
    "SparseIndex": "bgekit.eval.index",
    "fuse_runs": "bgekit.eval.index",
    "evaluate_run": "bgekit.eval.metrics",
    "read_trec_run": "bgekit.eval.metrics",
    "write_trec_run": "bgekit.eval.metrics",
    "RetrievalResult": "bgekit.eval.retrieval",
    "evaluate_retrieval": "bgekit.eval.retrieval",
    "StsResult": "bgekit.eval.sts",
    "evaluate_sts": "bgekit.eval.sts",
    "MtebEncoder": "bgekit.eval.mteb",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'bgekit.eval' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
