"""Peers that cannot share bgekit's process, run as a worker that benchmarks/speed.py drives.

FlagEmbedding 1.4.2 and infinity 0.0.78 import only under transformers 4.x (infinity calls the
tokenizers' ``batch_encode_plus``, gone in 5) and bgekit needs transformers 5, so speed.py starts
this script with another PYTHONPATH (``--flag-path``: a folder holding transformers 4.57.3,
FlagEmbedding and what they need; for infinity ``--infinity-path`` first, with infinity-emb and
sentence-transformers 3.4.1: under sentence-transformers 5 infinity's subclass is not recognised
as a sentence-transformers model and silently gets mean pooling) and sends it JSON lines on stdin:

    {"cmd": "load", "kind": "embedder" | "reranker" | "icl" | "infinity", "path": ..., "options": {...}}
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
PACKAGES = {"infinity": ("transformers", "infinity-emb")}


def load(kind: str, path: str, options: dict):
    """A run function ``(items, queries) -> vectors or scores`` for one peer system. speed.py also calls
    this in its own process when the peer imports there."""
    if kind == "infinity":
        return infinity_embedder(path, options)
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


def infinity_embedder(path: str, options: dict):
    """infinity's engine as its users embed a list: one running engine (its own queue and dynamic batches
    of up to ``batch_size``, for documents and queries alike) on one event loop across calls. A one-text
    call at load makes an engine that cannot run here fail now, not in the timed rounds."""
    import asyncio

    from infinity_emb import AsyncEmbeddingEngine, EngineArgs

    engine = AsyncEmbeddingEngine.from_args(
        EngineArgs(
            model_name_or_path=path,
            engine="torch",
            device="cuda" if options["device"].startswith("cuda") else "cpu",
            batch_size=options["batch_size"],
            dtype="float16" if options["fp16"] else "float32",
            bettertransformer=False,
            model_warmup=False,
        )
    )
    loop = asyncio.new_event_loop()
    loop.run_until_complete(engine.astart())

    def run(texts: list[str], queries: bool = False):
        vectors, _ = loop.run_until_complete(engine.embed(sentences=texts))
        return vectors

    run(["warm up"])
    run.close = lambda: loop.run_until_complete(engine.astop())  # type: ignore[attr-defined]
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
