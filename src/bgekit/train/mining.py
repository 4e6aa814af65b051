"""Hard-negative mining with guards against false negatives.

For each query: search the candidate pool with the embedder, drop its positives and the
query itself, drop candidates that score too close to the positive (``margin`` x the
lowest positive score, NV-Retriever's "TopK-PercPos") or above an absolute ``max_score``,
then sample ``negative_number`` negatives from ranks ``range_for_sampling`` of what is left.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np

from ..errors import InputError
from .data import TrainRecord

logger = logging.getLogger(__name__)


@dataclass
class MiningOptions:
    range_for_sampling: tuple[int, int] = (2, 200)
    negative_number: int = 15
    margin: float | None = 0.95
    max_score: float | None = None
    batch_size: int = 256
    seed: int = 42


def parse_range(text: str) -> tuple[int, int]:
    """``"2-200"`` -> ``(2, 200)`` (FlagEmbedding's ``range_for_sampling`` spelling)."""
    try:
        start, end = (int(x) for x in str(text).split("-"))
    except ValueError:
        raise InputError(f"range_for_sampling must look like '2-200', got {text!r}") from None
    if not 0 <= start < end:
        raise InputError(f"range_for_sampling needs 0 <= start < end, got {text!r}")
    return start, end


def mine_hard_negatives(
    records: list[TrainRecord], embedder, corpus: Sequence[str] | None = None, options: MiningOptions | None = None
) -> tuple[list[TrainRecord], dict[str, int]]:
    """New records whose ``neg`` are mined negatives; also counts of what the guards dropped.

    ``corpus`` is the candidate pool (default: every passage in ``records``).
    """
    from ..eval.index import DenseIndex

    options = options or MiningOptions()
    start, end = options.range_for_sampling
    if options.negative_number < 1:
        raise InputError("negative_number must be >= 1")
    if options.margin is not None and not 0 < options.margin <= 1:
        raise InputError(f"margin must lie in (0, 1], got {options.margin}")
    pool = list(dict.fromkeys(corpus if corpus is not None else [p for r in records for p in r.pos + r.neg]))
    if not pool:
        raise InputError("the candidate pool is empty")
    index = DenseIndex.build(
        embedder.encode_corpus(pool, batch_size=options.batch_size),
        ids=[str(i) for i in range(len(pool))],
        use_gpu=False,
    )
    queries = embedder.encode_queries([r.query for r in records], batch_size=options.batch_size)
    positives = embedder.encode_corpus([p for r in records for p in r.pos], batch_size=options.batch_size)
    # search deeper than ``end``: positives, the query and guarded candidates are removed first
    scores, rows = index.search(queries, min(2 * end + 16, len(pool)))
    rng = random.Random(options.seed)
    stats = {"positive": 0, "query": 0, "margin": 0, "max_score": 0, "short": 0}
    mined, offset = [], 0
    for i, record in enumerate(records):
        pos_vectors = positives[offset : offset + len(record.pos)]
        offset += len(record.pos)
        pos_floor = float(np.min(pos_vectors @ queries[i]))
        own = set(record.pos)
        candidates = []
        for score, row in zip(scores[i], rows[i], strict=True):
            text = pool[row]
            if text in own:
                stats["positive"] += 1
            elif text == record.query:
                stats["query"] += 1
            elif options.margin is not None and score > options.margin * pos_floor:
                stats["margin"] += 1
            elif options.max_score is not None and score > options.max_score:
                stats["max_score"] += 1
            else:
                candidates.append(text)
        window = candidates[start:end]
        if len(window) < options.negative_number:
            stats["short"] += 1
        negatives = rng.sample(window, min(options.negative_number, len(window)))
        mined.append(replace(record, neg=negatives, neg_scores=None, pos_scores=None))
    logger.info("mining dropped: %s", stats)
    return mined, stats
