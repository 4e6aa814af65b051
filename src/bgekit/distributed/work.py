"""The per-shard job every runner shares: read the shard's rows, encode them, write the shard.

The in-process runner (one model spread over ``devices=[...]`` by the library's replica pool)
and the Ray runner (one model per actor, one device each) both call :class:`ShardWorker`, and
it encodes through :meth:`Embedder.encode_corpus` / ``encode_queries``, the code path of
``bgekit embed``, so all three write the same vectors.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from . import plan, shards
from .storage import Folder

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class EncodeJob:
    """Everything a worker needs besides the shard: plain data, so it pickles to Ray actors."""

    model: str
    input_path: str
    input_format: str
    output_dir: str
    embedder_options: dict[str, Any] = field(default_factory=dict)
    input_type: str = "passage"
    text_field: str = "text"
    batch_size: int = 256
    max_length: int | None = None

    def vector_settings(self) -> dict[str, Any]:
        """The settings that change the vectors (recorded in the manifest)."""
        return {
            "model": self.model,
            "embedder_options": self.embedder_options,
            "input_type": self.input_type,
            "text_field": self.text_field,
            "max_length": self.max_length,
        }


def load_embedder(job: EncodeJob, devices: Any = None):
    """The job's embedder on ``devices`` (``None``: what the library picks)."""
    from ..models.embedder import Embedder

    options = dict(job.embedder_options)
    if devices is not None:
        options["devices"] = devices
    return Embedder.from_pretrained(job.model, **options)


def encode_texts(embedder: Any, texts: list[str], job: EncodeJob) -> np.ndarray:
    """``(n, dim)`` float32 vectors of ``texts``, exactly as ``bgekit embed`` computes them."""
    encode = embedder.encode_queries if job.input_type == "query" else embedder.encode_corpus
    vectors = encode(texts, batch_size=job.batch_size, max_length=job.max_length, show_progress_bar=False)
    if isinstance(vectors, dict):  # M3 returns its outputs by name
        vectors = vectors["dense_vecs"]
    return np.asarray(vectors, dtype=np.float32)


class ShardWorker:
    """Loads the model once, then turns shard descriptions into shard files."""

    def __init__(self, job: EncodeJob, devices: Any = None):
        self.job = job
        self.embedder = load_embedder(job, devices)
        self.folder = Folder(job.output_dir)

    def run(self, shard: plan.Shard) -> dict[str, Any]:
        """Encode and write one shard; returns its index, row count, seconds taken and the wall-clock
        time it finished (``finished``, epoch seconds: when it was written, whenever the caller hears)."""
        start = time.perf_counter()
        ids, texts = plan.read_shard(self.job.input_path, self.job.input_format, shard, self.job.text_field)
        vectors = encode_texts(self.embedder, texts, self.job)
        shards.write_shard(self.folder, shard.index, ids, vectors)
        seconds = time.perf_counter() - start
        logger.info(
            "wrote shard %d (rows %d-%d) in %.1f s",
            shard.index,
            shard.start_row,
            shard.start_row + shard.num_rows - 1,
            seconds,
        )
        return {
            "shard": shard.index,
            "rows": shard.num_rows,
            "dim": int(vectors.shape[1]),
            "seconds": seconds,
            "finished": time.time(),
        }

    def close(self) -> None:
        self.embedder.close()
