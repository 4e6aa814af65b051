"""Corpus encoding at scale: fixed shards of an input file, encoded on Ray Data (or in this
process), written as Parquet shards with ids, resumable by shard. Needs the ``distributed``
extra (``pip install 'bgekit[distributed]'``) for Ray and Parquet.

Example:
    >>> from bgekit.distributed import encode_dataset, read_embeddings
    >>> encode_dataset("BAAI/bge-small-en-v1.5", "corpus.jsonl", "out/corpus", num_workers=2)  # doctest: +SKIP
    >>> ids, vectors = read_embeddings("out/corpus")                                           # doctest: +SKIP
"""

from __future__ import annotations

from .pipeline import DEFAULT_SHARD_SIZE, EncodeResult, encode_dataset
from .shards import iter_shards, read_embeddings, read_manifest

__all__ = ["DEFAULT_SHARD_SIZE", "EncodeResult", "encode_dataset", "iter_shards", "read_embeddings", "read_manifest"]
