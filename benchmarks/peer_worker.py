"""A peer that cannot share bgekit's process, run as a worker that benchmarks/speed.py drives.

FlagEmbedding 1.4.2 imports only under transformers 4.x and bgekit needs transformers 5, so
speed.py starts this script with another PYTHONPATH (``--flag-path``: a folder holding
transformers 4.57.3, FlagEmbedding and what they need) and sends it JSON lines on stdin:

    {"cmd": "load", "kind": "embedder" | "reranker" | "icl", "path": ..., "options": {...}}
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


def load(kind: str, path: str, options: dict):
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


def main() -> None:
    import torch

    run, data = None, {}
    for line in sys.stdin:
        message = json.loads(line)
        try:
            if message["cmd"] == "quit":
                reply(ok=True)
                return
            if message["cmd"] == "load":
                run = load(message["kind"], message["path"], message["options"])
                from importlib.metadata import version

                reply(ok=True, versions={name: version(name) for name in ("transformers", "FlagEmbedding")})
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
