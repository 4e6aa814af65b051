"""The output folder of a sharded encode: ``manifest.json`` plus one Parquet file per shard.

Each shard file ``part-00000.parquet`` has two columns, ``id`` (string) and ``embedding``
(``list<float32>``), rows in input order. The manifest records the model, the options that
change the vectors, the input and the shard size; a job that finds a manifest with other
settings refuses to resume, so one folder never mixes vectors of two configurations (one with
no finished shard yet, as a run that failed at start-up leaves it, takes the new settings).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import InputError
from .storage import Folder

logger = logging.getLogger(__name__)

FORMAT = "bgekit-embeddings/1"
MANIFEST = "manifest.json"


def shard_name(index: int) -> str:
    return f"part-{index:05d}.parquet"


def check_manifest(folder: Folder, manifest: dict[str, Any]) -> bool:
    """Write ``manifest`` into a new folder, or check it equals the one there; True when resuming."""
    if not folder.exists(MANIFEST):
        if any(n.startswith("part-") for n in folder.names()):
            raise InputError(f"{folder.path} holds shard files but no {MANIFEST}; use an empty output folder")
        folder.make()
        _write_manifest(folder, manifest)
        return False
    old = read_manifest(folder)
    differ = sorted(k for k in set(old) | set(manifest) if old.get(k) != manifest.get(k))
    if differ and not any(n.startswith("part-") for n in folder.names()):  # nothing finished to keep
        logger.info("%s holds no finished shard: starting over with the new settings", folder.path)
        _write_manifest(folder, manifest)
        return False
    if differ:
        details = "; ".join(f"{k}: {old.get(k)!r} there, {manifest.get(k)!r} now" for k in differ)
        raise InputError(
            f"{folder.path} was written with other settings ({details}); "
            "rerun with the same settings to resume, or use a new output folder"
        )
    return True


def _write_manifest(folder: Folder, manifest: dict[str, Any]) -> None:
    folder.write_text(MANIFEST, json.dumps(manifest, indent=1, sort_keys=True) + "\n")


def read_manifest(folder: Folder | str | Path) -> dict[str, Any]:
    folder = folder if isinstance(folder, Folder) else Folder(folder)
    if not folder.exists(MANIFEST):
        raise InputError(f"{folder.path} has no {MANIFEST}: not a bgekit embeddings folder")
    try:
        manifest = json.loads(folder.read_text(MANIFEST))
    except ValueError as exc:
        raise InputError(f"{folder.path}/{MANIFEST} is not valid JSON ({exc})") from None
    if manifest.get("format") != FORMAT:
        raise InputError(f"{folder.path}/{MANIFEST} is not a bgekit embeddings manifest")
    return manifest


def complete_shards(folder: Folder, num_shards: int) -> set[int]:
    """Indexes of the shards already written (a shard file exists only once complete)."""
    present = set(folder.names())
    return {k for k in range(num_shards) if shard_name(k) in present}


def write_shard(folder: Folder, index: int, ids: Sequence[str], vectors: np.ndarray) -> None:
    """One shard as Parquet ``id`` / ``embedding`` (list<float32>), atomically."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    n, dim = vectors.shape
    offsets = pa.array(np.arange(0, (n + 1) * dim, dim, dtype=np.int32))
    embedding = pa.ListArray.from_arrays(offsets, pa.array(vectors.reshape(-1)), type=pa.list_(pa.float32()))
    table = pa.table({"id": pa.array(list(ids), type=pa.string()), "embedding": embedding})
    folder.write(shard_name(index), lambda fs, path: pq.write_table(table, path, filesystem=fs))


def read_shard_file(folder: Folder, index: int) -> tuple[list[str], np.ndarray]:
    """``(ids, (n, dim) float32)`` of one shard file."""
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    table = pq.read_table(folder.child(shard_name(index)), filesystem=folder.fs)
    column = table.column("embedding").combine_chunks()
    lengths = pc.list_value_length(column).to_numpy(zero_copy_only=False)
    dim = int(lengths[0]) if len(lengths) else 0
    if len(lengths) and (lengths != dim).any():
        raise InputError(f"{folder.path}/{shard_name(index)}: embeddings of different lengths")
    vectors = column.flatten().to_numpy(zero_copy_only=False).astype(np.float32, copy=False).reshape(-1, dim)
    return [str(i) for i in table.column("id").to_pylist()], vectors


def iter_shards(output_dir: str | Path) -> Iterator[tuple[list[str], np.ndarray]]:
    """``(ids, vectors)`` of every shard in order, one shard in memory at a time.

    Example:
        >>> for ids, vectors in iter_shards("out/corpus"):   # doctest: +SKIP
        ...     print(len(ids), vectors.shape)
    """
    folder = Folder(output_dir)
    num_shards = int(read_manifest(folder)["num_shards"])
    missing = sorted(set(range(num_shards)) - complete_shards(folder, num_shards))
    if missing:
        raise InputError(
            f"{folder.path} is incomplete: {len(missing)} of {num_shards} shards missing "
            f"(first {shard_name(missing[0])}); rerun the same command to finish it"
        )
    for index in range(num_shards):
        yield read_shard_file(folder, index)


def read_embeddings(output_dir: str | Path) -> tuple[list[str], np.ndarray]:
    """All ids and vectors of a finished sharded encode, in input order.

    Example:
        >>> ids, vectors = read_embeddings("out/corpus")     # doctest: +SKIP
        >>> vectors.shape                                     # doctest: +SKIP
        (5183, 384)
    """
    ids: list[str] = []
    parts: list[np.ndarray] = []
    for shard_ids, vectors in iter_shards(output_dir):
        ids.extend(shard_ids)
        parts.append(vectors)
    return ids, np.concatenate(parts)
