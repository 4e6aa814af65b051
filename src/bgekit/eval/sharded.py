"""Search over sharded embeddings (the Parquet shards ``bgekit embed --ray`` writes).

Two ways, by corpus size:

- :class:`ShardedIndex`: one :class:`~bgekit.eval.index.DenseIndex` per shard, every shard
  searched for the top ``k`` and the lists merged. With flat shards the merged top ``k`` is the
  exact top ``k`` of one flat index over all vectors (ties go to the lower global row). Shards
  can live in one process or be saved and loaded one folder each.
- :func:`build_ivf_from_shards`: one IVF index (PQ, SQ8 or float codes) trained on a sample
  drawn from every shard and then filled shard by shard, so only one shard of float vectors is
  in memory at a time; the index itself costs ``m`` bytes (PQ) or ``dim`` bytes (SQ8) per vector.

docs/distributed.md gives the memory per million vectors of each option.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .. import io
from ..errors import InputError
from .index import DenseIndex, _as_matrix, _check_ids, _faiss, rank_rows

logger = logging.getLogger(__name__)

_FORMAT = "bgekit-sharded-index/1"
IVF_CODECS = ("pq", "sq8", "flat")
ShardSource = str | Path | Sequence[tuple[Sequence[str], Any]]


def _shards(source: ShardSource) -> Iterable[tuple[list[str], np.ndarray]]:
    """``(ids, vectors)`` per shard from an embeddings folder or a list of pairs."""
    if isinstance(source, (str, Path)):
        from ..distributed.shards import iter_shards

        return iter_shards(source)
    if not isinstance(source, Sequence) or not source:
        raise InputError("shards must be an embeddings folder or a non-empty list of (ids, vectors) pairs")
    return ((list(map(str, ids)), _as_matrix(vectors)) for ids, vectors in source)


def merge_top_k(
    scores: Sequence[np.ndarray], indices: Sequence[np.ndarray], offsets: Sequence[int], k: int
) -> tuple[np.ndarray, np.ndarray]:
    """Merge per-shard ``(scores, local indices)`` into the global top ``k``: score descending,
    lower global row first on ties; faiss's ``-1`` (no result) rows go last and stay ``-1``."""
    all_scores = np.concatenate([s.astype(np.float32, copy=False) for s in scores], axis=1)
    rows = np.concatenate(
        [np.where(i >= 0, i + offset, -1) for i, offset in zip(indices, offsets, strict=True)], axis=1
    ).astype(np.int64)
    return rank_rows(all_scores, rows, k)


class ShardedIndex:
    """Several :class:`DenseIndex` shards searched as one; row ``i`` is ``ids[i]`` in shard order.

    Example:
        >>> from bgekit.eval.sharded import ShardedIndex
        >>> index = ShardedIndex.build("out/corpus")              # doctest: +SKIP
        >>> scores, rows = index.search(query_vectors, k=10)      # doctest: +SKIP
        >>> [index.ids[r] for r in rows[0]]                       # doctest: +SKIP
    """

    def __init__(self, shards: Sequence[DenseIndex]):
        if not shards:
            raise InputError("a sharded index needs at least one shard")
        dims = {s.dim for s in shards}
        if len(dims) != 1:
            raise InputError(f"shards have different dimensions: {sorted(dims)}")
        self.shards = list(shards)
        self.dim = dims.pop()
        self.offsets = np.cumsum([0] + [len(s) for s in self.shards[:-1]]).tolist()
        self.ids = [i for s in self.shards for i in s.ids]
        if len(set(self.ids)) != len(self.ids):
            raise InputError("document ids must be unique across shards")

    def __len__(self) -> int:
        return len(self.ids)

    def __repr__(self) -> str:
        return f"ShardedIndex({len(self.shards)} shards, {len(self)} x {self.dim})"

    @classmethod
    def build(cls, source: ShardSource, **index_options: Any) -> ShardedIndex:
        """One index per shard of ``source`` (an embeddings folder or ``[(ids, vectors), ...]``);
        ``index_options`` go to :meth:`DenseIndex.build` (default: exact flat inner product)."""
        return cls([DenseIndex.build(vectors, ids, **index_options) for ids, vectors in _shards(source)])

    def search(self, queries: Any, k: int, batch_size: int = 4096) -> tuple[np.ndarray, np.ndarray]:
        """Top ``k`` over all shards: ``(scores float32, global rows int64)`` of shape ``(nq, min(k, n))``."""
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise InputError(f"k must be a positive integer, got {k!r}")
        matrix = _as_matrix(queries, "queries")
        results = [shard.search(matrix, k, batch_size) for shard in self.shards]
        return merge_top_k([r[0] for r in results], [r[1] for r in results], self.offsets, min(k, len(self)))

    def save(self, folder: str | Path) -> Path:
        """One :meth:`DenseIndex.save` folder per shard, then ``sharded.json`` (last)."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "sharded.json").unlink(missing_ok=True)
        names = [f"shard-{k:05d}" for k in range(len(self.shards))]
        for name, shard in zip(names, self.shards, strict=True):
            shard.save(folder / name)
        meta = {"format": _FORMAT, "shards": names, "count": len(self), "dim": self.dim}
        io.write_with(folder / "sharded.json", lambda tmp: tmp.write_text(json.dumps(meta, indent=1) + "\n"))
        return folder

    @classmethod
    def load(cls, folder: str | Path, use_gpu: bool | None = None) -> ShardedIndex:
        folder = Path(folder)
        path = folder / "sharded.json"
        if not path.exists():
            raise InputError(f"{folder} has no sharded.json: not a sharded bgekit index, or its save did not finish")
        try:
            meta = json.loads(path.read_text(encoding="utf-8"))
        except ValueError as exc:
            raise InputError(f"{path} is not valid JSON ({exc})") from None
        if not isinstance(meta, dict) or meta.get("format") != _FORMAT:
            raise InputError(f"{path} is not a sharded bgekit index description")
        shards = meta.get("shards")
        if not isinstance(shards, list) or not shards or not all(isinstance(name, str) for name in shards):
            raise InputError(f"{path} must list its shard folders under 'shards'")
        return cls([DenseIndex.load(folder / name, use_gpu=use_gpu) for name in shards])


def build_ivf_from_shards(
    source: ShardSource,
    *,
    nlist: int,
    codec: str = "pq",
    pq_m: int | None = None,
    pq_bits: int = 8,
    train_size: int | None = None,
    nprobe: int = 16,
    seed: int = 0,
) -> DenseIndex:
    """An IVF index over all shards without holding all float vectors: train on a random
    sample of every shard (``train_size`` vectors in all, default ``max(40 * nlist, 10_000)``),
    then add the shards one at a time. ``codec``: ``"pq"`` (``pq_m`` bytes a vector at 8 bits,
    default ``dim // 8``), ``"sq8"`` (``dim`` bytes) or ``"flat"`` (``4 * dim`` bytes).
    Returns a :class:`DenseIndex` (``kind="ivf"``) to search, save and load as usual.

    Example:
        >>> from bgekit.eval.sharded import build_ivf_from_shards
        >>> index = build_ivf_from_shards("out/corpus", nlist=4096, codec="pq", pq_m=48)  # doctest: +SKIP
        >>> index.save("out/corpus-ivfpq")                                               # doctest: +SKIP
    """
    faiss = _faiss()
    if codec not in IVF_CODECS:
        raise InputError(f"codec must be one of {IVF_CODECS}, got {codec!r}")
    if isinstance(nlist, bool) or not isinstance(nlist, int) or nlist < 1:
        raise InputError(f"nlist must be a positive int, got {nlist!r}")
    sizes = _shard_sizes(source)
    total = sum(sizes)
    if nlist > total:
        raise InputError(f"nlist={nlist} is more than the {total} vectors")
    wanted = min(total, train_size or max(40 * nlist, 10_000))
    rng = np.random.default_rng(seed)
    # the same share of every shard, so the sample follows the whole corpus
    picks = [np.sort(rng.choice(n, size=min(n, round(wanted * n / total)), replace=False)) for n in sizes]
    sample = np.concatenate([v[p] for (_, v), p in zip(_shards(source), picks, strict=True)])
    dim = sample.shape[1]
    if codec == "pq":
        pq_m = pq_m or max(1, dim // 8)
        if dim % pq_m:
            raise InputError(f"pq_m={pq_m} must divide the dimension {dim}")
        description, quantization = f"IVF{nlist},PQ{pq_m}x{pq_bits}", "pq"
    else:
        description, quantization = (
            f"IVF{nlist},{'SQ8' if codec == 'sq8' else 'Flat'}",
            ("int8" if codec == "sq8" else "none"),
        )
    index = faiss.index_factory(dim, description, faiss.METRIC_INNER_PRODUCT)
    if codec == "pq":
        index.do_polysemous_training = False  # slow, and only serves Hamming pre-filtering
    logger.info("training %s on %d of %d vectors", description, len(sample), total)
    index.train(sample)
    del sample
    ids: list[str] = []
    for shard_ids, vectors in _shards(source):
        if vectors.shape[1] != dim:
            raise InputError(f"shards have different dimensions: {dim} and {vectors.shape[1]}")
        index.add(vectors)
        ids.extend(shard_ids)
    options = {"nlist": nlist, "nprobe": min(nprobe, nlist), "codec": codec, "pq_m": pq_m, "pq_bits": pq_bits}
    built = DenseIndex(index, _check_ids(ids, index.ntotal), dim, "ivf", quantization, {"options": options})
    built._apply_search_options()
    return built


def _shard_sizes(source: ShardSource) -> list[int]:
    if isinstance(source, (str, Path)):
        from ..distributed.shards import read_manifest

        manifest = read_manifest(source)
        rows, size = int(manifest["input"]["rows"]), int(manifest["shard_size"])
        return [min(size, rows - start) for start in range(0, rows, size)]
    return [len(ids) for ids, _ in source]
