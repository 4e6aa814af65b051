"""Hard-negative mining with guards against false negatives (FlagEmbedding's ``hn_mine.py``).

For each query: search the candidate pool with the embedder and take the hits ranked
``range_for_sampling`` (``"2-200"`` = ranks 2 to 199, 0-based, a slice of the raw search
result as FlagEmbedding takes it); drop from them the query's positives, the query itself,
candidates that score too close to the positive (``margin`` x the lowest positive score,
NV-Retriever's "TopK-PercPos") or above an absolute ``max_score``; sample
``negative_number`` of what is left. A query left with fewer is topped up, as FlagEmbedding
does, with random passages of the pool, never a positive, the query, a passage already
taken, one ranked above the range or one the guards would drop.
"""

from __future__ import annotations

import functools
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
    search_batch_size: int = 64
    use_gpu_for_searching: bool = False

    def check(self) -> None:
        """An :class:`InputError` for a value mining cannot use (the CLI asks before the model loads)."""
        if self.negative_number < 1:
            raise InputError("negative_number must be >= 1")
        if self.search_batch_size < 1:
            raise InputError(f"search_batch_size must be >= 1, got {self.search_batch_size}")
        if self.margin is not None and not 0 < self.margin <= 1:
            raise InputError(f"margin must lie in (0, 1], got {self.margin}")


def parse_range(text: str) -> tuple[int, int]:
    """``"2-200"`` -> ``(2, 200)`` (FlagEmbedding's ``range_for_sampling`` spelling)."""
    try:
        start, end = (int(x) for x in str(text).split("-"))
    except ValueError:
        raise InputError(f"range_for_sampling must look like '2-200', got {text!r}") from None
    if not 0 <= start < end:
        raise InputError(f"range_for_sampling needs 0 <= start < end, got {text!r}")
    return start, end


def dense(vectors):
    """M3 embedders return a dict; mining searches its dense vectors (as FlagEmbedding)."""
    return vectors["dense_vecs"] if isinstance(vectors, dict) else vectors


def mine_hard_negatives(
    records: list[TrainRecord], embedder, corpus: Sequence[str] | None = None, options: MiningOptions | None = None
) -> tuple[list[TrainRecord], dict[str, int]]:
    """New records whose ``neg`` are mined negatives; also counts of what the guards dropped.

    ``corpus`` is the candidate pool (default: every passage in ``records``, negatives included).
    Counts: ``positive``, ``query``, ``margin``, ``max_score`` (hits in the range dropped),
    ``topped_up`` (queries given random passages) and ``short`` (queries still below
    ``negative_number`` because the pool has no more passages that qualify).
    """
    from ..eval.index import DenseIndex, gpu_count, require_faiss

    require_faiss()  # before the pool is encoded
    options = options or MiningOptions()
    start, end = options.range_for_sampling
    options.check()
    pool = list(dict.fromkeys(corpus if corpus is not None else [p for r in records for p in r.pos + r.neg]))
    if not pool:
        raise InputError("the candidate pool is empty")
    if options.use_gpu_for_searching and gpu_count() == 0:
        logger.warning("use_gpu_for_searching: faiss sees no GPU (faiss-cpu, or no driver); searching on the CPU")
    pool_vectors = np.asarray(dense(embedder.encode_corpus(pool, batch_size=options.batch_size)), dtype=np.float32)
    index = DenseIndex.build(
        pool_vectors, ids=[str(i) for i in range(len(pool))], use_gpu=options.use_gpu_for_searching
    )
    queries = dense(embedder.encode_queries([r.query for r in records], batch_size=options.batch_size))
    positives = dense(embedder.encode_corpus([p for r in records for p in r.pos], batch_size=options.batch_size))
    scores, rows = index.search(queries, min(end, len(pool)), batch_size=options.search_batch_size)
    rng = random.Random(options.seed)
    stats = {"positive": 0, "query": 0, "margin": 0, "max_score": 0, "topped_up": 0, "short": 0}
    mined, offset = [], 0
    for i, record in enumerate(records):
        pos_vectors = positives[offset : offset + len(record.pos)]
        offset += len(record.pos)
        floor = (
            None
            if options.margin is None or not record.pos
            else options.margin * float(np.min(pos_vectors @ queries[i]))
        )
        guard = functools.partial(
            rejection, own=set(record.pos), query=record.query, floor=floor, cap=options.max_score
        )
        candidates = []
        for score, row in zip(scores[i][start:end], rows[i][start:end], strict=True):
            if row < 0:  # faiss pads with -1 past the pool's end
                break
            reason = guard(pool[row], float(score))
            if reason is None:
                candidates.append(int(row))
            else:
                stats[reason] += 1
        if len(candidates) > options.negative_number:
            candidates = rng.sample(candidates, options.negative_number)
        if len(candidates) < options.negative_number:
            stats["topped_up"] += 1
            skip = set(candidates) | {int(r) for r in rows[i][:start]}
            candidates += top_up(
                pool_vectors, queries[i], pool, skip, guard, options.negative_number - len(candidates), rng
            )
            if len(candidates) < options.negative_number:
                stats["short"] += 1
        mined.append(replace(record, neg=[pool[row] for row in candidates], neg_scores=None, pos_scores=None))
    logger.info("mining dropped or added: %s", stats)
    return mined, stats


def rejection(text: str, score: float, own: set[str], query: str, floor: float | None, cap: float | None) -> str | None:
    """Why a pool passage cannot be a negative of this query (None: it can)."""
    if text in own:
        return "positive"
    if text == query:
        return "query"
    if floor is not None and score > floor:
        return "margin"
    if cap is not None and score > cap:
        return "max_score"
    return None


def top_up(pool_vectors, query_vector, pool, skip: set[int], guard, need: int, rng: random.Random) -> list[int]:
    """``need`` random pool rows not in ``skip`` that pass ``guard`` (fewer if the pool has no more).

    Random draws first (cheap on a large pool); a shuffled scan of the whole pool when they miss."""
    chosen: list[int] = []
    taken = set(skip)

    def take(row: int) -> None:
        taken.add(row)
        if guard(pool[row], float(pool_vectors[row] @ query_vector)) is None:
            chosen.append(row)

    for _ in range(20 * need + 100):
        if len(chosen) == need:
            return chosen
        row = rng.randrange(len(pool))
        if row not in taken:
            take(row)
    rest = [row for row in range(len(pool)) if row not in taken]
    rng.shuffle(rest)
    for row in rest:
        if len(chosen) == need:
            break
        take(row)
    return chosen
