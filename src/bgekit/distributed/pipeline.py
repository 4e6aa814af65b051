"""``encode_dataset``: a corpus file -> a folder of Parquet shards, resumable by shard."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .. import io as bio
from ..errors import InputError
from . import plan as planning
from . import shards, storage
from .work import EncodeJob, ShardWorker

logger = logging.getLogger(__name__)
DEFAULT_SHARD_SIZE = 10_000


@dataclass
class EncodeResult:
    """What a run did: shards skipped (already complete) and written, rows, dimension, time."""

    output_dir: str
    rows: int
    num_shards: int
    skipped: int
    written: int
    dim: int | None
    seconds: float


def _location(path: str | Path) -> str:
    """URIs as given; local paths absolute, so Ray workers with another working folder find them."""
    return str(path) if storage.is_uri(path) else str(Path(path).expanduser().absolute())


def encode_dataset(
    model: str | None,
    input: str | Path,
    output_dir: str | Path,
    *,
    use_ray: bool = True,
    address: str | None = None,
    num_workers: int | None = None,
    cpus_per_worker: int = 1,
    gpus_per_worker: float | None = None,
    devices: Any = None,
    shard_size: int = DEFAULT_SHARD_SIZE,
    batch_size: int = 256,
    max_length: int | None = None,
    queries: bool = False,
    text_field: str | None = None,
    on_shard: Callable[[dict[str, Any]], None] | None = None,
    **embedder_options: Any,
) -> EncodeResult:
    """Embed every row of ``input`` (JSONL, text or Parquet; a local path or a URI such as
    ``s3://bucket/corpus.jsonl``) into Parquet shards in ``output_dir`` (``id``, ``embedding``).

    Shard ``k`` holds input rows ``[k * shard_size, (k + 1) * shard_size)``. Rerunning the same
    call after a crash writes only the missing shards; other settings are refused. With
    ``use_ray=True`` shards run on Ray Data (``address`` of a cluster, else a local Ray with
    ``num_workers`` workers; one GPU per worker when there are GPUs); with ``use_ray=False``
    they run in this process on ``devices`` (several GPUs share the work batch by batch).
    ``text_field`` is the JSONL field or Parquet column holding the text (``"text"``; an error for
    plain-text input, which has none). ``embedder_options`` go to :meth:`Embedder.from_pretrained`
    (``normalize_embeddings``, ``pooling_method``, ``query_instruction_for_retrieval``, ...) and must be JSON values.
    The vectors equal ``Embedder.encode_corpus`` (``encode_queries`` with ``queries=True``).
    ``on_shard(result)`` is called in this process as each shard completes (``shard``, ``rows``,
    ``dim``, ``seconds``), e.g. for progress.

    Example:
        >>> from bgekit.distributed import encode_dataset, read_embeddings
        >>> encode_dataset("BAAI/bge-base-en-v1.5", "corpus.jsonl", "out/corpus",  # doctest: +SKIP
        ...                num_workers=4, shard_size=50_000)
        >>> ids, vectors = read_embeddings("out/corpus")                            # doctest: +SKIP
    """
    from .. import hub

    storage.require(ray=use_ray)  # a missing extra named before the input is read
    if use_ray and devices is not None:
        raise InputError("devices= is for use_ray=False; on Ray every worker gets its own device")
    if not use_ray and (address or num_workers):
        raise InputError("address= and num_workers= need use_ray=True")
    for name, value in (("batch_size", batch_size), ("num_workers", num_workers), ("cpus_per_worker", cpus_per_worker)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise InputError(f"{name} must be a positive int, got {value!r}")
    try:
        json.dumps(embedder_options)
    except TypeError as exc:
        raise InputError(f"embedder options must be JSON values (they go into the manifest): {exc}") from None
    started = time.perf_counter()
    input_plan = planning.plan(_location(input), shard_size)
    if text_field is not None and input_plan.format == "text":
        raise bio.plain_text_field_error(input_plan.path, text_field)
    job = EncodeJob(
        model=model or hub.default_model(),
        input_path=input_plan.path,
        input_format=input_plan.format,
        output_dir=_location(output_dir),
        embedder_options=embedder_options,
        input_type="query" if queries else "passage",
        text_field=text_field or "text",
        batch_size=batch_size,
        max_length=max_length,
    )
    folder = storage.Folder(job.output_dir)
    manifest = {
        "format": shards.FORMAT,
        **job.vector_settings(),
        "input": input_plan.describe(),
        "shard_size": shard_size,
        "num_shards": len(input_plan.shards),
    }
    resuming = shards.check_manifest(folder, manifest)
    if folder.local and (stale := folder.remove_stale_temporaries()):
        logger.info("removed %d unfinished temporary files of an earlier run", stale)
    done = shards.complete_shards(folder, len(input_plan.shards))
    todo = [s for s in input_plan.shards if s.index not in done]
    if resuming:
        logger.warning(
            "resuming %s: %d of %d shards already complete, encoding the other %d",
            job.output_dir,
            len(done),
            len(input_plan.shards),
            len(todo),
        )
    dims: list[int] = []

    def on_done(result: dict[str, Any]) -> None:
        dims.append(int(result["dim"]))
        logger.info("shard %d done: %d rows in %.1f s", result["shard"], result["rows"], result["seconds"])
        if on_shard is not None:
            on_shard(result)

    if todo:
        if use_ray:
            from . import ray_runner

            ray_runner.run(
                job,
                todo,
                on_done,
                address=address,
                num_workers=num_workers,
                cpus_per_worker=cpus_per_worker,
                gpus_per_worker=gpus_per_worker,
            )
        else:
            worker = ShardWorker(job, devices)
            try:
                for shard in todo:
                    on_done(worker.run(shard))
            finally:
                worker.close()
    missing = len(input_plan.shards) - len(shards.complete_shards(folder, len(input_plan.shards)))
    if missing:
        raise InputError(f"{missing} shards of {job.output_dir} were not written; rerun the same command to finish")
    return EncodeResult(
        output_dir=job.output_dir,
        rows=input_plan.rows,
        num_shards=len(input_plan.shards),
        skipped=len(done),
        written=len(todo),
        dim=dims[0] if dims else None,
        seconds=time.perf_counter() - started,
    )
