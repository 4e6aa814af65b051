"""Run shard jobs on Ray Data: shard descriptions flow through an actor pool, one model per actor.

Each actor is a :class:`~bgekit.distributed.work.ShardWorker` (the model loads once per actor);
it gets one GPU when the cluster has GPUs, else ``cpus_per_worker`` CPU cores. Ray Data
streams the shard descriptions to idle actors, restarts lost actors and reruns their shards.
"""

from __future__ import annotations

import base64
import logging
import pickle
from collections.abc import Callable, Sequence
from dataclasses import asdict, fields
from typing import Any

import numpy as np

from ..errors import BgekitError
from . import storage
from .plan import Shard
from .work import EncodeJob, ShardWorker

logger = logging.getLogger(__name__)
_SHARD_FIELDS = [f.name for f in fields(Shard)]
_RESULT_FIELDS = ("shard", "rows", "dim", "seconds", "finished")


def _ray():
    storage.require(ray=True)
    import ray
    import ray.data

    return ray


class RayShardEncoder:
    """The Ray Data callable class: built once per actor, called with batches of shard rows."""

    def __init__(self, job: dict[str, Any], devices: str | None, threads: int | None):
        if threads:
            import torch

            torch.set_num_threads(threads)
        self.worker = ShardWorker(EncodeJob(**job), devices)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        results = []
        for i in range(len(batch["index"])):
            shard = Shard(**{k: int(batch[k][i]) for k in _SHARD_FIELDS})
            try:
                results.append({**self.worker.run(shard), "error": ""})
            except BgekitError as exc:  # sent back as data: Ray's wrappers do not keep the exception object
                results.append({**dict.fromkeys(_RESULT_FIELDS, 0), "shard": shard.index, "error": _encode_error(exc)})
        return {k: np.array([r[k] for r in results]) for k in (*_RESULT_FIELDS, "error")}


def _encode_error(exc: BgekitError) -> str:
    """The worker's error, pickled (class and fields: a DataFormatError keeps its path and line)."""
    return base64.b64encode(pickle.dumps(exc)).decode("ascii")


def _decode_error(text: str) -> BgekitError:
    """The worker's bgekit error again, to raise in this process (from bgekit's own workers only)."""
    exc = pickle.loads(base64.b64decode(text))  # written by _encode_error in this job's own workers
    return exc if isinstance(exc, BgekitError) else BgekitError(str(exc))


def run(
    job: EncodeJob,
    todo: Sequence[Shard],
    on_done: Callable[[dict[str, Any]], None],
    *,
    address: str | None = None,
    num_workers: int | None = None,
    cpus_per_worker: int = 1,
    gpus_per_worker: float | None = None,
) -> None:
    """Encode the ``todo`` shards on Ray: the cluster at ``address``, the one this process already
    joined, or else a local one started here (and shut down at the end)."""
    ray = _ray()
    started = False
    if not ray.is_initialized():
        init: dict[str, Any] = {"logging_level": logging.WARNING, "log_to_driver": True}
        if address:
            ray.init(address=address, **init)
        else:  # address="local": always a new cluster of this machine, never a stranger's
            if num_workers:
                init["num_cpus"] = num_workers * cpus_per_worker
            ray.init(address="local", include_dashboard=False, **init)
        started = True
    try:
        _run_pool(ray, job, todo, on_done, num_workers, cpus_per_worker, gpus_per_worker)
    finally:
        if started:
            ray.shutdown()


def _run_pool(ray, job, todo, on_done, num_workers, cpus_per_worker, gpus_per_worker) -> None:
    resources = ray.cluster_resources()
    gpus = int(resources.get("GPU", 0))
    use_gpu = gpus > 0 if gpus_per_worker is None else gpus_per_worker > 0
    if use_gpu:
        per_gpu = 1.0 if gpus_per_worker is None else float(gpus_per_worker)
        workers = num_workers or max(1, int(gpus / per_gpu))
        remote = {"num_gpus": per_gpu, "num_cpus": cpus_per_worker}
        devices, threads = "cuda", None  # Ray sets CUDA_VISIBLE_DEVICES per actor
    else:
        workers = num_workers or max(1, int(resources.get("CPU", 1)) // cpus_per_worker)
        remote = {"num_cpus": cpus_per_worker}
        devices, threads = "cpu", cpus_per_worker
    workers = max(1, min(workers, len(todo)))
    logger.info("Ray: %d shards on %d %s workers", len(todo), workers, "GPU" if use_gpu else "CPU")
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False
    dataset = ray.data.from_items([s.to_dict() for s in todo], override_num_blocks=len(todo))
    encoded = dataset.map_batches(
        RayShardEncoder,
        fn_constructor_kwargs={"job": asdict(job), "devices": devices, "threads": threads},
        batch_size=1,
        compute=ray.data.ActorPoolStrategy(size=workers),
        **remote,
    )
    for row in encoded.iter_rows():
        if row["error"]:
            raise _decode_error(str(row["error"]))
        on_done({k: row[k].item() if hasattr(row[k], "item") else row[k] for k in _RESULT_FIELDS})
