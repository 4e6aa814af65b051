"""Teacher scores for distillation: a reranker scores every passage of every record."""

from __future__ import annotations

import numbers
from dataclasses import replace

from ..errors import InputError
from .data import TrainRecord


def score_records(records: list[TrainRecord], reranker, batch_size: int = 128) -> list[TrainRecord]:
    """Records with ``pos_scores`` and ``neg_scores`` from ``reranker.compute_score`` (raw logits
    unless the reranker normalizes), in FlagEmbedding's order: a record's positives, then its negatives."""
    pairs = [(r.query, p) for r in records for p in r.pos + r.neg]
    if not pairs:
        raise InputError("the records hold no passages to score")
    scores = reranker.compute_score(pairs, batch_size=batch_size)
    if len(scores) != len(pairs) or not all(isinstance(s, numbers.Real) for s in scores):
        raise InputError(
            "teacher scores need one number per pair; this reranker returned one list per cutoff layer: "
            "give it a single cutoff layer"
        )
    out, at = [], 0
    for r in records:
        pos = scores[at : at + len(r.pos)]
        at += len(r.pos)
        neg = scores[at : at + len(r.neg)]
        at += len(r.neg)
        out.append(replace(r, pos_scores=[float(s) for s in pos], neg_scores=[float(s) for s in neg]))
    return out
