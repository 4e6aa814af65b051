"""The runtime's fast paths give the plain path's results, in input order.

Plain path: every input tokenized at once, batches of ``batch_size``, ``.cpu()`` per batch
(``ModelHost.run`` on one ``Tokenized``). Fast paths checked against it: tokenization
overlapped with the forward (``run_texts`` in chunks), token-budget batches, and the
ONNX Runtime backend (fp32: max abs 1e-4 on normalized vectors; int8: cosine bound).
Device-side pooling plus the one-sync copy back are exercised here on the CPU; their CUDA
half runs only where a GPU is present.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from bgekit import Embedder, FlagReranker
from bgekit.errors import InputError

TORCH_TOL = 1e-5
ONNX_TOL = 1e-4  # fp32 ONNX Runtime vs torch: different kernels, same math (observed ~2e-7)
# dynamic int8 weights: on all 2,552 STSB test sentences MiniLM's cosine to fp32 is 0.992 on average, 0.961
# at worst (benchmarks/RESULTS.md); the bounds leave room for other CPUs' int8 kernels
INT8_MIN_COSINE = 0.95
INT8_MEAN_COSINE = 0.985

EDGE_TEXTS = [
    "one",
    "",
    "a longer sentence about retrieval, embeddings and rerankers " * 40,  # beyond max_length
    "short text",
    "the quick brown fox jumps over the lazy dog",
    "x " * 3,
    "embedding models map text to vectors",
]


def texts(n: int) -> list[str]:
    words = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta", "iota", "kappa", "lambda", "mu"]
    return [" ".join(words[(i * 7 + j) % len(words)] for j in range(1 + (i * 13) % 37)) for i in range(n)] + EDGE_TEXTS


def plain(model: Embedder, items: list[str], batch_size: int, max_length: int) -> np.ndarray:
    """The reference: one tokenization, fixed-count batches, normalized on the CPU."""
    tokenized = model.tokenizer.encode(items, model.host.clamp_length(max_length, max_length))
    pooled = model.host.run(tokenized, model._forward, batch_size, desc="plain", show_progress_bar=False)
    return torch.nn.functional.normalize(pooled, dim=-1).numpy()


@pytest.fixture(scope="module", params=["tiny_bert", "tiny_xlmr"])
def tiny_embedder(request) -> Embedder:
    return Embedder.from_pretrained(
        str(request.getfixturevalue(request.param)), devices="cpu", pooling_method="mean", passage_max_length=48
    )


# -- overlapped tokenization -------------------------------------------------------------------
@pytest.mark.parametrize("chunk_size", [1, 3, 16, 4096])
def test_overlapped_tokenization_matches_plain(tiny_embedder, chunk_size):
    items = texts(41)
    reference = plain(tiny_embedder, items, 8, 48)
    pooled, truncated = tiny_embedder.host.run_texts(
        items,
        lambda chunk: tiny_embedder.tokenizer.encode(chunk, 48),
        tiny_embedder._forward,
        8,
        desc="test",
        chunk_size=chunk_size,
    )
    got = torch.nn.functional.normalize(pooled, dim=-1).numpy()
    assert got.shape == reference.shape
    np.testing.assert_allclose(got, reference, atol=TORCH_TOL)
    # every cut input counted once whatever the chunking
    assert truncated == tiny_embedder.tokenizer.encode(items, 48).truncated > 0


def test_encode_uses_chunks_and_keeps_order(tiny_embedder, monkeypatch):
    """encode() over several chunks equals the plain path row for row (chunk boundary mid-batch)."""
    import bgekit.models.base as base

    items = texts(50)
    reference = plain(tiny_embedder, items, 7, 48)
    monkeypatch.setattr(base, "OVERLAP_CHUNK", 9)
    got = tiny_embedder.encode(items, batch_size=7, max_length=48)
    np.testing.assert_allclose(got, reference, atol=TORCH_TOL)
    # each row is the vector of its own text
    for i in (0, 17, len(items) - 1):
        np.testing.assert_allclose(tiny_embedder.encode(items[i], max_length=48), reference[i], atol=TORCH_TOL)


def test_one_text_and_empty_string(tiny_embedder):
    for items in (["only one"], [""]):
        np.testing.assert_allclose(tiny_embedder.encode(items), plain(tiny_embedder, items, 4, 48), atol=TORCH_TOL)


def test_bad_chunk_size_is_an_input_error(tiny_embedder):
    with pytest.raises(InputError, match="chunk_size"):
        tiny_embedder.host.run_texts(
            ["a"], tiny_embedder.tokenizer.encode, tiny_embedder._forward, 4, desc="x", chunk_size=0
        )


def test_packed_chunks_are_prepared_ahead_and_match_plain(tiny_bert, monkeypatch):
    """Packed batches: equal chunks of one batch, each chunk's batches built by the worker thread
    (``Prepared``), results equal to the plain path row for row."""
    import threading

    import bgekit.models.base as base

    model = Embedder.from_pretrained(
        str(tiny_bert), devices="cpu", pooling_method="mean", passage_max_length=48, packed=True
    )
    items = texts(45)
    reference = plain(model, items, 6, 48)
    monkeypatch.setattr(base, "PACKED_CHUNK_MIN", 1)
    assert model.host.build_ahead is None  # auto: not on the CPU
    model.host.build_ahead = True  # as on a GPU
    built_in: list[str] = []
    prepare = model.host.prepare

    def recording(*args, **kwargs):
        built_in.append(threading.current_thread().name)
        prepared = prepare(*args, **kwargs)
        assert all(inputs is not None for inputs in prepared.inputs)
        return prepared

    monkeypatch.setattr(model.host, "prepare", recording)
    np.testing.assert_allclose(model.encode(items, batch_size=6, max_length=48), reference, atol=TORCH_TOL)
    assert len(built_in) == -(-len(items) // 6)  # chunks of one batch of 6
    assert all(name.startswith("bgekit-tokenize") for name in built_in)


def test_oom_split_of_a_prepared_batch_rebuilds_its_halves(tiny_bert, monkeypatch):
    """A batch built ahead that runs out of device memory is split and each half built anew."""
    import bgekit.models.base as base

    model = Embedder.from_pretrained(
        str(tiny_bert), devices="cpu", pooling_method="cls", passage_max_length=48, packed=True
    )
    items = texts(30)
    reference = plain(model, items, 8, 48)
    monkeypatch.setattr(base, "PACKED_CHUNK_MIN", 1)
    model.host.build_ahead = True
    sizes: list[int] = []

    def small_device(module, inputs):
        rows = len(inputs["lengths"])
        sizes.append(rows)
        if rows > 3:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return model._forward(module, inputs)

    pooled, _ = model.host.run_texts(
        items, lambda chunk: model.tokenizer.encode(chunk, 48), small_device, 8, desc="x", show_progress_bar=False
    )
    got = torch.nn.functional.normalize(pooled, dim=-1).numpy()
    np.testing.assert_allclose(got, reference, atol=TORCH_TOL)
    assert max(sizes) == 8 and 4 in sizes and 2 in sizes  # the built batch, then rebuilt halves


# -- token-budget batches ----------------------------------------------------------------------
@pytest.mark.parametrize("budget", [1, 40, 200, 10_000])
def test_token_budget_batches_match_plain(tiny_bert, budget):
    items = texts(30)
    fast = Embedder.from_pretrained(
        str(tiny_bert), devices="cpu", pooling_method="cls", passage_max_length=48, max_tokens_per_batch=budget
    )
    slow = Embedder.from_pretrained(str(tiny_bert), devices="cpu", pooling_method="cls", passage_max_length=48)
    reference = plain(slow, items, 8, 48)
    np.testing.assert_allclose(fast.encode(items, batch_size=8), reference, atol=TORCH_TOL)


def test_token_budget_really_bounds_batches(tiny_bert):
    """The budget shapes the batches the model sees (a test that can fail if it is ignored)."""
    model = Embedder.from_pretrained(
        str(tiny_bert), devices="cpu", pooling_method="cls", passage_max_length=48, max_tokens_per_batch=64
    )
    seen: list[tuple[int, int]] = []

    def forward(module, inputs):
        seen.append(tuple(inputs["input_ids"].shape))
        return model._forward(module, inputs)

    model.host.run(model.tokenizer.encode(texts(30), 48), forward, 32, desc="x", show_progress_bar=False)
    assert all(rows * width <= 64 or rows == 1 for rows, width in seen)
    assert len(seen) > 1


@pytest.mark.parametrize("bad", [0, -5, 2.5, True])
def test_bad_token_budget_is_an_input_error(tiny_bert, bad):
    with pytest.raises(InputError, match="max_tokens_per_batch"):
        Embedder.from_pretrained(str(tiny_bert), devices="cpu", max_tokens_per_batch=bad)


def test_reranker_fast_paths_match_plain(tiny_bert_reranker, monkeypatch):
    import bgekit.models.base as base

    pairs = [(q, p) for q, p in zip(texts(23), reversed(texts(23)), strict=True)]
    plain_model = FlagReranker(str(tiny_bert_reranker), devices="cpu", max_length=64)
    tokenized = plain_model.tokenize_pairs(pairs, max_length=64)
    reference = plain_model.host.run(tokenized, plain_model._forward, 8, desc="x").numpy()
    monkeypatch.setattr(base, "OVERLAP_CHUNK", 5)
    fast = FlagReranker(str(tiny_bert_reranker), devices="cpu", max_length=64, max_tokens_per_batch=100)
    np.testing.assert_allclose(fast.compute_score(pairs, batch_size=8), reference, atol=TORCH_TOL)


# -- device-side pooling and the single sync ---------------------------------------------------
def test_run_returns_cpu_float32_in_input_order(tiny_bert):
    model = Embedder.from_pretrained(str(tiny_bert), devices="cpu", pooling_method="cls")
    tokenized = model.tokenizer.encode(texts(12), 48)
    out = model.host.run(tokenized, model._forward, 5, desc="x")
    assert out.device.type == "cpu" and out.dtype == torch.float32
    one_by_one = torch.cat(
        [model.host.run(model.tokenizer.encode([t], 48), model._forward, 1, desc="x") for t in texts(12)]
    )
    torch.testing.assert_close(out, one_by_one, atol=TORCH_TOL, rtol=0)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_pinned_async_path_matches_cpu(tiny_bert):
    items = texts(40)
    cpu = Embedder.from_pretrained(str(tiny_bert), devices="cpu", pooling_method="mean")
    gpu = Embedder.from_pretrained(str(tiny_bert), devices="cuda:0", pooling_method="mean", use_fp16=False)
    plain_gpu = gpu.encode(items, batch_size=6)
    gpu.host.async_copies = True
    fast_gpu = gpu.encode(items, batch_size=6)
    np.testing.assert_allclose(fast_gpu, plain_gpu, atol=TORCH_TOL)
    np.testing.assert_allclose(fast_gpu, cpu.encode(items, batch_size=6), atol=1e-4)


# -- ONNX Runtime backend ----------------------------------------------------------------------
@pytest.fixture(scope="module")
def onnx_cache(tmp_path_factory):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx")
    mp = pytest.MonkeyPatch()
    mp.setenv("BGEKIT_CACHE", str(tmp_path_factory.mktemp("bgekit-cache")))
    yield
    mp.undo()


@pytest.mark.parametrize("fixture", ["tiny_bert", "tiny_xlmr"])
def test_onnx_matches_torch_on_tiny_models(onnx_cache, request, fixture):
    folder = str(request.getfixturevalue(fixture))
    items = texts(20)
    ref = Embedder.from_pretrained(folder, devices="cpu", pooling_method="mean", passage_max_length=48)
    fast = Embedder.from_pretrained(folder, devices="cpu", pooling_method="mean", passage_max_length=48, backend="onnx")
    got, want = fast.encode(items, batch_size=6), ref.encode(items, batch_size=6)
    assert got.shape == want.shape and got.dtype == np.float32
    np.testing.assert_allclose(got, want, atol=ONNX_TOL)
    np.testing.assert_allclose(fast.encode(""), ref.encode(""), atol=ONNX_TOL)
    int8 = Embedder.from_pretrained(
        folder, devices="cpu", pooling_method="mean", passage_max_length=48, backend="onnx-int8"
    )
    cosine = (int8.encode(items, batch_size=6) * want).sum(axis=1)
    assert cosine.min() > 0.9  # random tiny weights quantize worse than trained ones; MiniLM is checked below


def last_feed_forward_rank(path) -> int:
    """The rank of the last GELU's input in an exported graph: 2 where the last layer's feed-forward
    runs on the first rows alone (``[B, I]``), 3 where it runs on every token (``[B, L, I]``)."""
    import onnx

    graph = onnx.shape_inference.infer_shapes(onnx.load(str(path))).graph
    ranks = {info.name: len(info.type.tensor_type.shape.dim) for info in graph.value_info}
    gelus = [node for node in graph.node if node.op_type == "Erf"]
    return ranks[gelus[-1].input[0]]


@pytest.mark.parametrize("fixture", ["tiny_bert", "tiny_xlmr"])
def test_onnx_cls_pooling_exports_the_first_rows_forward(onnx_cache, request, fixture, monkeypatch):
    from bgekit import FlagModel

    folder = str(request.getfixturevalue(fixture))
    items = texts(20)
    ref = Embedder.from_pretrained(folder, devices="cpu", pooling_method="cls", passage_max_length=48)
    ref.cls_rows_only = False  # the torch reference runs the whole last layer
    want = ref.encode(items, batch_size=6)
    fast = Embedder.from_pretrained(folder, devices="cpu", pooling_method="cls", passage_max_length=48, backend="onnx")
    assert fast.model.output == "first_token_state" and last_feed_forward_rank(fast.model.path) == 2
    np.testing.assert_allclose(fast.encode(items, batch_size=6), want, atol=ONNX_TOL)
    int8 = Embedder.from_pretrained(
        folder, devices="cpu", pooling_method="cls", passage_max_length=48, backend="onnx-int8"
    )
    assert int8.model.output == "first_token_state" and last_feed_forward_rank(int8.model.path) == 2
    assert (int8.encode(items, batch_size=6) * want).sum(axis=1).min() > 0.9
    monkeypatch.setattr(FlagModel, "cls_rows_only", False)  # read at load time: a graph of the whole forward
    full = Embedder.from_pretrained(folder, devices="cpu", pooling_method="cls", passage_max_length=48, backend="onnx")
    assert full.model.output == "last_hidden_state" and full.model.path != fast.model.path
    assert last_feed_forward_rank(full.model.path) == 3
    np.testing.assert_allclose(full.encode(items, batch_size=6), want, atol=ONNX_TOL)
    fast.pooling_method = "mean"  # the first-rows graph cannot pool another way
    with pytest.raises(InputError, match="CLS state only"):
        fast.encode(items)


def test_an_export_with_its_weights_beside_the_graph_is_published_whole(onnx_cache, tiny_bert, tmp_path):
    """Over 2 GB (bge-m3, bge-reranker-large / v2-m3) the exporter writes the weights as files beside the
    graph; publishing the export into the cache moves them with it, so the cached graph loads."""
    import onnx

    from bgekit.models.onnx_backend import OnnxModule, publish

    exported = Embedder.from_pretrained(str(tiny_bert), devices="cpu", backend="onnx").model
    staging = tmp_path / "staging"
    staging.mkdir()
    graph = onnx.load(str(exported.path))
    onnx.save_model(graph, str(staging / "model.onnx"), save_as_external_data=True, size_threshold=0)
    assert len(list(staging.iterdir())) == 2  # the graph and its weights file
    target = tmp_path / "cache" / "model.onnx"
    target.parent.mkdir()
    publish(staging, target)
    assert not list(staging.iterdir())
    ids = torch.tensor([[2, 40, 41, 42, 3], [2, 43, 3, 0, 0]])
    mask = (ids > 0).long()
    got = OnnxModule(target, exported.config)(ids, mask).first_token_state
    torch.testing.assert_close(got, exported(ids, mask).first_token_state)


def test_onnx_export_is_cached(onnx_cache, tiny_bert):
    from bgekit.models.onnx_backend import cache_root

    Embedder.from_pretrained(str(tiny_bert), devices="cpu", backend="onnx")
    files = sorted(cache_root().glob("*/model.onnx"))
    stamps = [f.stat().st_mtime_ns for f in files]
    Embedder.from_pretrained(str(tiny_bert), devices="cpu", backend="onnx")
    assert files and [f.stat().st_mtime_ns for f in files] == stamps


def test_an_export_that_does_not_give_torchs_outputs_is_refused(onnx_cache, tiny_bert, monkeypatch, tmp_path):
    """The export is run on other shapes than the traced one and compared with the module's own
    forward: a graph that differs (here one traced with a skewed output) is an error, and not cached."""
    from bgekit.errors import BgekitError
    from bgekit.models import onnx_backend

    monkeypatch.setenv("BGEKIT_CACHE", str(tmp_path))  # no earlier test's export of this model
    traced = onnx_backend._Traceable.forward
    monkeypatch.setattr(onnx_backend._Traceable, "forward", lambda self, *args: traced(self, *args) * 1.01)
    before = set(onnx_backend.cache_root().rglob("model.onnx"))
    with pytest.raises(BgekitError, match="does not reproduce torch's last_hidden_state"):
        Embedder.from_pretrained(str(tiny_bert), devices="cpu", pooling_method="mean", backend="onnx")
    with pytest.raises(BgekitError, match="does not reproduce torch's first_token_state"):
        Embedder.from_pretrained(str(tiny_bert), devices="cpu", pooling_method="cls", backend="onnx-int8")
    assert set(onnx_backend.cache_root().rglob("model.onnx")) == before == set()


def test_export_samples_differ_from_the_traced_shape(tiny_xlmr):
    """The check runs a lone row and rows of three lengths, inside the model's position table."""
    from transformers import AutoConfig

    from bgekit.models.onnx_backend import sample_inputs

    config = AutoConfig.from_pretrained(str(tiny_xlmr))
    samples = sample_inputs(config, type_ids=False)
    assert [tuple(s["input_ids"].shape) for s in samples] == [(1, 3), (3, 13)]
    for sample in samples:
        real = sample["input_ids"][sample["attention_mask"].bool()]
        assert config.pad_token_id not in real.tolist() and int(real.max()) < config.vocab_size
    config.max_position_embeddings = 6  # a short position table: every row keeps a real token, none past it
    for sample in sample_inputs(config, type_ids=False):
        lengths = sample["attention_mask"].sum(dim=1)
        assert int(lengths.min()) >= 1 and sample["input_ids"].shape[1] <= 6 - config.pad_token_id - 1


@pytest.mark.parametrize("shards", [False, True])
def test_a_replaced_checkpoint_is_exported_again(onnx_cache, tiny_bert, tmp_path, shards):
    """A checkpoint replaced in place by one of the same size and modification time (``cp -p``), or one
    shard of a sharded checkpoint replaced, gets a new export: the vectors are the new weights' ones."""
    import os
    import shutil

    from safetensors import safe_open
    from safetensors.torch import load_file, save_file
    from transformers import BertModel

    folder = tmp_path / "model"
    shutil.copytree(tiny_bert, folder)
    if shards:
        for old in folder.glob("model*.safetensors"):
            old.unlink()
        BertModel.from_pretrained(str(tiny_bert)).save_pretrained(folder, max_shard_size="100KB")
        assert len(list(folder.glob("model-*.safetensors"))) > 1
    items = texts(8)
    first = Embedder.from_pretrained(str(folder), devices="cpu", pooling_method="mean", backend="onnx").encode(items)
    target = sorted(folder.glob("model*.safetensors"))[-1]  # one shard; the index stays as it was
    with safe_open(str(target), "pt") as handle:
        metadata = handle.metadata()
    tensors = {name: tensor * 1.5 for name, tensor in load_file(str(target)).items()}
    stamp = target.stat()
    save_file(tensors, str(target), metadata=metadata)  # same names and shapes: the same size
    os.utime(target, ns=(stamp.st_atime_ns, stamp.st_mtime_ns))  # and the old modification time
    assert target.stat().st_size == stamp.st_size
    want = Embedder.from_pretrained(str(folder), devices="cpu", pooling_method="mean").encode(items)
    assert not np.allclose(want, first, atol=1e-3)
    got = Embedder.from_pretrained(str(folder), devices="cpu", pooling_method="mean", backend="onnx").encode(items)
    np.testing.assert_allclose(got, want, atol=ONNX_TOL)


@pytest.mark.parametrize("fixture", ["tiny_bert_reranker", "tiny_xlmr_reranker"])
def test_onnx_reranker_matches_torch(onnx_cache, request, fixture, monkeypatch):
    folder = str(request.getfixturevalue(fixture))
    pairs = [(q, p) for q, p in zip(texts(9), texts(9)[::-1], strict=True)]
    torch_model = FlagReranker(folder, devices="cpu", max_length=60)
    torch_model.cls_rows_only = False  # the reference runs the whole last layer
    ref = torch_model.compute_score(pairs, batch_size=4)
    fast = FlagReranker(folder, devices="cpu", max_length=60, backend="onnx")
    assert last_feed_forward_rank(fast.model.path) == 2  # the head reads the first rows: only they are computed
    np.testing.assert_allclose(fast.compute_score(pairs, batch_size=4), ref, atol=ONNX_TOL)
    monkeypatch.setattr(FlagReranker, "cls_rows_only", False)
    full = FlagReranker(folder, devices="cpu", max_length=60, backend="onnx")
    assert last_feed_forward_rank(full.model.path) == 3
    np.testing.assert_allclose(full.compute_score(pairs, batch_size=4), ref, atol=ONNX_TOL)


def test_bad_backend_is_an_input_error(tiny_bert):
    with pytest.raises(InputError, match="backend must be one of"):
        Embedder.from_pretrained(str(tiny_bert), devices="cpu", backend="tensorrt")


def test_onnx_backend_refuses_an_accelerator(tiny_bert):
    with pytest.raises(InputError, match="CPU only"):
        Embedder.from_pretrained(str(tiny_bert), devices="cuda:0", backend="onnx")
    with pytest.raises(InputError, match="CPU only"):
        Embedder.from_pretrained(str(tiny_bert), devices=["cpu", 0], backend="onnx")
    with pytest.raises(InputError, match="devices must be"):
        Embedder.from_pretrained(str(tiny_bert), devices=object(), backend="onnx")


@pytest.mark.parametrize("devices", ["cpu:0", torch.device("cpu"), ["cpu:0"], [torch.device("cpu")]])
def test_onnx_backend_takes_the_cpu_as_torch_spells_it(onnx_cache, tiny_bert, devices):
    """``cpu:0`` was refused as 'not the CPU', and ``torch.device("cpu")`` was a TypeError."""
    model = Embedder.from_pretrained(str(tiny_bert), devices=devices, backend="onnx")
    assert model.host.devices == ["cpu"]
    want = Embedder.from_pretrained(str(tiny_bert), devices="cpu").encode(texts(4))
    np.testing.assert_allclose(model.encode(texts(4)), want, atol=ONNX_TOL)


# -- MiniLM (the real model) -------------------------------------------------------------------
@pytest.fixture(scope="module")
def sts_texts() -> list[str]:
    from .conftest import require_shared

    lines = require_shared("data", "stsbenchmark", "test.tsv").read_text(encoding="utf-8").splitlines()[1:]
    return [text for line in lines[:40] for text in line.split("\t")[:2]] + EDGE_TEXTS


def test_minilm_fast_torch_paths_match_plain(minilm_dir, sts_texts, monkeypatch):
    import bgekit.models.base as base

    model = Embedder.from_pretrained(str(minilm_dir), devices="cpu", max_tokens_per_batch=600)
    reference = plain(model, sts_texts, 32, 256)
    monkeypatch.setattr(base, "OVERLAP_CHUNK", 50)
    np.testing.assert_allclose(model.encode(sts_texts, batch_size=32), reference, atol=TORCH_TOL)


def test_minilm_onnx_fp32_and_int8(onnx_cache, minilm_dir, sts_texts):
    ref = Embedder.from_pretrained(str(minilm_dir), devices="cpu").encode(sts_texts, batch_size=32)
    fp32 = Embedder.from_pretrained(str(minilm_dir), devices="cpu", backend="onnx").encode(sts_texts, batch_size=32)
    np.testing.assert_allclose(fp32, ref, atol=ONNX_TOL)
    int8 = Embedder.from_pretrained(str(minilm_dir), devices="cpu", backend="onnx-int8").encode(
        sts_texts, batch_size=32
    )
    cosine = (int8 * ref).sum(axis=1)
    assert cosine.min() >= INT8_MIN_COSINE and cosine.mean() >= INT8_MEAN_COSINE, (cosine.min(), cosine.mean())
    assert not np.allclose(int8, ref, atol=1e-4)  # it really is the quantized model


def test_cli_embed_backend_onnx(onnx_cache, tiny_bert, tmp_path):
    import os
    import shutil
    import subprocess
    import sys
    from pathlib import Path

    source = tmp_path / "texts.txt"
    items = [t for t in texts(5) if t.strip()]
    source.write_text("\n".join(items) + "\n")
    out = tmp_path / "vectors.npy"
    bgekit = shutil.which("bgekit", path=str(Path(sys.executable).parent)) or "bgekit"
    args = ["embed", "--model", str(tiny_bert), "--input", str(source), "--output", str(out), "--device", "cpu"]
    result = subprocess.run(
        [bgekit, *args, "--backend", "onnx"], capture_output=True, text=True, timeout=300, env=dict(os.environ)
    )
    assert result.returncode == 0, result.stderr
    want = Embedder.from_pretrained(str(tiny_bert), devices="cpu").encode_corpus(items)
    np.testing.assert_allclose(np.load(out), want, atol=ONNX_TOL)
    bad = subprocess.run([bgekit, *args, "--backend", "tvm"], capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "'tvm' is not one of" in bad.stderr and "Traceback" not in bad.stderr


def test_cli_rerank_backend_onnx(onnx_cache, tiny_xlmr_reranker, golden_dir, tmp_path):
    import json
    import os
    import subprocess

    from .serving import BGEKIT

    passages = [t for t in texts(6) if t.strip()]
    source = tmp_path / "passages.txt"
    source.write_text("\n".join(passages) + "\n")
    out = tmp_path / "scores.jsonl"
    args = ["rerank", "--query", "alpha beta", "--input", str(source), "--device", "cpu", "--backend", "onnx"]
    env = dict(os.environ)
    result = subprocess.run(
        [BGEKIT, *args, "--model", str(tiny_xlmr_reranker), "--output", str(out)],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert result.returncode == 0, result.stderr
    got = [json.loads(line)["score"] for line in out.read_text().splitlines()]
    want = FlagReranker(str(tiny_xlmr_reranker), devices="cpu").compute_score([("alpha beta", p) for p in passages])
    np.testing.assert_allclose(got, want, atol=ONNX_TOL)
    llm = golden_dir / "models" / "gemma-llm-reranker"  # no ONNX export for LLM rerankers: refused before loading
    refused = subprocess.run([BGEKIT, *args, "--model", str(llm)], capture_output=True, text=True, timeout=300, env=env)
    assert refused.returncode == 2 and "runs cross-encoders" in refused.stderr and "Traceback" not in refused.stderr


def test_onnx_m3_matches_torch(onnx_cache, golden_dir):
    """BGE-M3's encoder on ONNX Runtime, its heads in torch: dense, lexical and ColBERT outputs as torch's."""
    from bgekit import BGEM3FlagModel

    folder = str(golden_dir / "models" / "xlmr-m3")
    items = texts(12)
    every = {"return_dense": True, "return_sparse": True, "return_colbert_vecs": True}
    ref = BGEM3FlagModel(folder, devices="cpu")
    fast = BGEM3FlagModel(folder, devices="cpu", backend="onnx")
    assert type(fast.model.encoder).__name__ == "OnnxModule"
    want, got = ref.encode(items, batch_size=5, **every), fast.encode(items, batch_size=5, **every)
    np.testing.assert_allclose(got["dense_vecs"], want["dense_vecs"], atol=ONNX_TOL)
    assert sum(map(len, want["lexical_weights"])) > len(items)  # something to compare
    for mine, theirs in zip(got["lexical_weights"], want["lexical_weights"], strict=True):
        tokens = sorted(set(mine) | set(theirs))  # a weight at the ReLU's edge may be in one dict only
        np.testing.assert_allclose([mine.get(t, 0) for t in tokens], [theirs.get(t, 0) for t in tokens], atol=ONNX_TOL)
    for mine, theirs in zip(got["colbert_vecs"], want["colbert_vecs"], strict=True):
        np.testing.assert_allclose(mine, theirs, atol=ONNX_TOL)
    np.testing.assert_allclose(fast.encode(items)["dense_vecs"], want["dense_vecs"], atol=ONNX_TOL)  # dense alone
    int8 = BGEM3FlagModel(folder, devices="cpu", backend="onnx-int8").encode(items)["dense_vecs"]
    assert (int8 * want["dense_vecs"]).sum(axis=1).min() > 0.9
    with pytest.raises(InputError, match="packed=True is not supported"):
        BGEM3FlagModel(folder, devices="cpu", backend="onnx", packed=True)


@pytest.mark.parametrize(
    ("family", "name"),
    [
        ("FlagLLMModel", "mistral-llm"),
        ("FlagICLModel", "mistral-icl"),
        ("FlagLLMReranker", "gemma-llm-reranker"),
        ("LayerWiseFlagLLMReranker", "minicpm-layerwise"),
    ],
)
def test_families_without_an_onnx_export_refuse_the_backend(golden_dir, family, name):
    """A decoder's export would lose its causal mask (wrong vectors), and the others would run torch
    anyway: both are a clear error instead."""
    import bgekit

    folder = str(golden_dir / "models" / name)
    with pytest.raises(InputError, match=f"{family} runs on backend='torch' only"):
        getattr(bgekit, family)(folder, devices="cpu", backend="onnx")
    assert getattr(bgekit, family)(folder, devices="cpu", backend="torch")  # the default, accepted by every family


# -- no key/value cache in inference ---------------------------------------------------------------
@pytest.mark.parametrize(
    ("family", "name"), [("FlagLLMModel", "mistral-llm"), ("FlagLLMReranker", "gemma-llm-reranker")]
)
def test_decoders_run_without_a_key_value_cache(golden_dir, family, name):
    """A batch is one pass: no layer's keys and values are cached (and held) during it, and the results
    are the ones the module gives with its cache on."""
    import bgekit

    model = getattr(bgekit, family)(str(golden_dir / "models" / name), devices="cpu", use_fp16=False)
    module = model.host.module
    caches = []
    forward = module.forward

    def spy(*args, **kwargs):
        out = forward(*args, **kwargs)
        caches.append(getattr(out, "past_key_values", None))
        return out

    module.forward = spy
    if family == "FlagLLMModel":
        run = lambda: model.encode_corpus(texts(20), batch_size=8)  # noqa: E731
    else:
        run = lambda: np.asarray(model.compute_score([(t, t[::-1]) for t in texts(20)], batch_size=8))  # noqa: E731
    without = run()
    assert caches and all(cache is None for cache in caches)
    module.config.use_cache = True  # what the module did before bgekit turned its cache off
    caches.clear()
    with_cache = run()
    assert caches and all(cache is not None for cache in caches)
    np.testing.assert_allclose(without, with_cache, atol=TORCH_TOL)


# -- normalization in place ------------------------------------------------------------------------
def test_encode_normalizes_its_own_vectors_in_place_and_postprocess_copies(tiny_bert):
    """encode() normalizes the tensor it made (one copy of the vectors, not two); postprocess() on a
    caller's tensor leaves it alone; truncate_dim still returns contiguous rows of the cut width."""
    model = Embedder.from_pretrained(str(tiny_bert), devices="cpu", pooling_method="mean")
    items = texts(12)
    raw = model.embed_tokenized(model.tokenize(items))
    kept = raw.clone()
    want = torch.nn.functional.normalize(raw, dim=-1).numpy()
    np.testing.assert_allclose(model.postprocess(raw, False), want, atol=TORCH_TOL)
    assert torch.equal(raw, kept), "postprocess must not write into the caller's tensor"
    np.testing.assert_allclose(model.encode(items), want, atol=TORCH_TOL)
    model.truncate_dim = 8
    cut = model.encode(items)
    assert cut.shape == (len(items), 8) and cut.flags["C_CONTIGUOUS"]
    np.testing.assert_allclose(cut, torch.nn.functional.normalize(raw[:, :8], dim=-1).numpy(), atol=TORCH_TOL)
