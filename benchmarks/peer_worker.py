"""Peers that cannot share bgekit's process, run as a worker that benchmarks/speed.py drives.

FlagEmbedding 1.4.2 and infinity 0.0.78 import only under transformers 4.x (infinity calls the
tokenizers' ``batch_encode_plus``, gone in 5) and bgekit needs transformers 5, so speed.py starts
this script with another PYTHONPATH (``--flag-path``: a folder holding transformers 4.57.3,
FlagEmbedding and what they need; for infinity ``--infinity-path`` first, with infinity-emb and
sentence-transformers 3.4.1: under sentence-transformers 5 infinity's subclass is not recognised
as a sentence-transformers model and silently gets mean pooling) and sends it JSON lines on stdin:

    {"cmd": "load", "kind": "embedder" | "reranker" | "m3" | "icl" | "infinity" | "infinity-reranker",
     "path": ..., "options": {...}}
    {"cmd": "data", "key": "k", "file": "texts.json"}      # a list of texts or [q, d] pairs
    {"cmd": "run", "key": "k", "queries": false}            # encode / score that list once
    {"cmd": "quit"}

Each reply is one line ``@@peer {...}`` on stdout (other output is the libraries' own): ``run``
answers with the seconds it took (CUDA synchronised) and the peak CUDA memory above what was
allocated before the call, so the parent's table has the same columns for every system.
"""

from __future__ import annotations

import json
import sys
import time
import traceback

MARK = "@@peer "


def reply(**fields) -> None:
    sys.stdout.write(MARK + json.dumps(fields) + "\n")
    sys.stdout.flush()


#: the distributions whose versions a load reports, per kind
PACKAGES = {"infinity": ("transformers", "infinity-emb"), "infinity-reranker": ("transformers", "infinity-emb")}


def load(kind: str, path: str, options: dict):
    """A run function ``(items, queries) -> vectors or scores`` for one peer system. speed.py also calls
    this in its own process when the peer imports there."""
    if kind in ("infinity", "infinity-reranker"):
        return infinity_system(path, options, rerank=kind == "infinity-reranker")
    import FlagEmbedding

    device, fp16, batch = options["device"], options["fp16"], options["batch_size"]
    max_length = options["max_length"]
    if kind == "embedder":
        model = FlagEmbedding.FlagModel(path, use_fp16=fp16, devices=[device], pooling_method=options["pooling"])
        query_batch = options["query_batch_size"]
        return lambda texts, queries: (model.encode_queries if queries else model.encode_corpus)(
            texts, batch_size=query_batch if queries else batch, max_length=max_length
        )
    if kind == "reranker":
        model = FlagEmbedding.FlagReranker(path, use_fp16=fp16, devices=[device])
        return lambda pairs, _: model.compute_score(pairs, batch_size=batch, max_length=max_length)
    if kind == "m3":
        model = FlagEmbedding.BGEM3FlagModel(path, use_fp16=fp16, devices=[device])
        flags = options["outputs"]
        return lambda texts, _: model.encode(texts, batch_size=batch, max_length=max_length, **flags)
    if kind == "icl":
        model = FlagEmbedding.FlagICLModel(
            path,
            use_fp16=fp16,
            devices=[device],
            query_instruction_for_retrieval=options["instruction"],
            examples_for_task=None,
        )
        return lambda texts, _: model.encode_corpus(texts, batch_size=batch, max_length=max_length)
    raise ValueError(f"unknown kind {kind!r}")


def infinity_system(path: str, options: dict, rerank: bool):
    """infinity's engine as its users call it: a running engine (its own queue and dynamic batches of up
    to a batch size) on one event loop across calls. Embedding takes the list in one call, documents
    through an engine batching ``batch_size`` and queries through a second one batching
    ``query_batch_size``, as the other systems batch them (the same batch, for the memory comparison);
    reranking, whose API is one query with its documents, sends every (query, document) pair as its
    own request at once, so the engine batches them. A one-item call at load makes an engine that cannot
    run here fail now, not in the timed rounds; the query engine starts at the first (untimed) query call."""
    import asyncio

    from infinity_emb import AsyncEmbeddingEngine, EngineArgs

    loop = asyncio.new_event_loop()
    engines: dict[int, AsyncEmbeddingEngine] = {}

    def engine(batch_size: int) -> AsyncEmbeddingEngine:
        if batch_size not in engines:
            started = AsyncEmbeddingEngine.from_args(
                EngineArgs(
                    model_name_or_path=path,
                    engine="torch",
                    device="cuda" if options["device"].startswith("cuda") else "cpu",
                    batch_size=batch_size,
                    dtype="float16" if options["fp16"] else "float32",
                    bettertransformer=False,
                    model_warmup=False,
                )
            )
            loop.run_until_complete(started.astart())
            engines[batch_size] = started
        return engines[batch_size]

    async def scores(running: AsyncEmbeddingEngine, pairs: list[list[str]]) -> list:
        calls = [running.rerank(query=query, docs=[doc], raw_scores=True) for query, doc in pairs]
        return [results[0] for results, _ in await asyncio.gather(*calls)]

    async def vectors(running: AsyncEmbeddingEngine, texts: list[str]) -> list:
        return (await running.embed(sentences=texts))[0]

    def run(items: list, queries: bool = False):
        running = engine(options["query_batch_size"] if queries and not rerank else options["batch_size"])
        return loop.run_until_complete(scores(running, items) if rerank else vectors(running, items))

    def close() -> None:
        for running in engines.values():
            loop.run_until_complete(running.astop())

    run([["warm", "up"]] if rerank else ["warm up"])
    run.close = close  # type: ignore[attr-defined]
    return run


def main() -> None:
    import torch

    run, data = None, {}
    for line in sys.stdin:
        message = json.loads(line)
        try:
            if message["cmd"] == "quit":
                getattr(run, "close", lambda: None)()
                reply(ok=True)
                return
            if message["cmd"] == "load":
                run = load(message["kind"], message["path"], message["options"])
                from importlib.metadata import version

                names = PACKAGES.get(message["kind"], ("transformers", "FlagEmbedding"))
                reply(ok=True, versions={name: version(name) for name in names})
            elif message["cmd"] == "data":
                with open(message["file"], encoding="utf-8") as f:
                    data[message["key"]] = json.load(f)
                reply(ok=True)
            elif message["cmd"] == "run":
                cuda = torch.cuda.is_available()
                if cuda:
                    torch.cuda.synchronize()
                    torch.cuda.reset_peak_memory_stats()
                resident = torch.cuda.memory_allocated() if cuda else 0
                start = time.perf_counter()
                run(data[message["key"]], message.get("queries", False))
                if cuda:
                    torch.cuda.synchronize()
                seconds = time.perf_counter() - start
                peak = (torch.cuda.max_memory_allocated() - resident) if cuda else None
                reply(ok=True, seconds=seconds, peak_bytes=peak)
        except Exception as exc:
            reply(ok=False, error=f"{type(exc).__name__}: {exc}"[:300], trace=traceback.format_exc()[-2000:])


if __name__ == "__main__":
    main()
