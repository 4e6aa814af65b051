"""bfloat16 on the CPU: ``use_bf16=True`` runs every family's forward in bfloat16 there, within
bfloat16's rounding of FlagEmbedding's float32 goldens; float16 stays a GPU option."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

import bgekit
from bgekit import FlagModel, InputError
from bgekit.eval.retrieval import model_identity
from bgekit.runtime import devices
from bgekit.runtime.devices import cpu_has_native_bf16, resolve_dtype

from .conftest import SHARED, require_shared
from .golden import case_ids, check_returns, expected, manifest, resolve_arg

GOLDEN = SHARED / "golden"
#: every family's cases whose inputs are texts or pairs and whose outputs are arrays or scores
CLASSES = {
    "FlagModel",
    "FlagLLMModel",
    "FlagICLModel",
    "FlagReranker",
    "FlagLLMReranker",
    "LayerWiseFlagLLMReranker",
    "LightWeightFlagLLMReranker",
    "BGEM3FlagModel",
}
CASES = [
    name
    for name in (case_ids(GOLDEN, CLASSES) if (GOLDEN / "cases.json").exists() else [])
    if manifest(GOLDEN)["cases"][name]["method"] in ("encode", "encode_queries", "encode_corpus", "compute_score")
    and not (manifest(GOLDEN)["cases"][name]["class"] == "BGEM3FlagModel" and "compute_score" in name)
]
#: the golden README's bfloat16 tolerance against float32 (absolute, on these tiny random models)
BF16_ATOL = 5e-2
_models: dict = {}


def test_cpu_dtype_follows_use_bf16_not_use_fp16():
    assert resolve_dtype("cpu") is torch.float32
    assert resolve_dtype("cpu", use_fp16=True) is torch.float32  # FlagEmbedding's default, float32 on the CPU
    assert resolve_dtype("cpu", use_bf16=True) is torch.bfloat16
    assert resolve_dtype("cpu", use_fp16=True, use_bf16=True) is torch.bfloat16


@pytest.mark.parametrize(
    ("cpuinfo", "native"),
    [
        ("processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f avx512_bf16 avx512_vnni\n", True),  # AMD Zen 4
        ("flags\t\t: fpu sse2 avx2 avx512f amx_tile amx_bf16 amx_int8\n", True),  # Intel Sapphire Rapids
        ("Features\t: fp asimd sve bf16 i8mm\n", True),  # Arm Neoverse V1
        ("processor\t: 0\nflags\t\t: fpu sse2 avx2 fma\n", False),  # AVX2 only: bf16 is emulated
        ("", False),
    ],
)
def test_native_bf16_is_read_from_cpuinfo_flags(cpuinfo, native):
    assert cpu_has_native_bf16(cpuinfo) is native


def test_bf16_on_a_cpu_without_it_warns_once(monkeypatch, caplog):
    monkeypatch.setattr(devices, "_cpuinfo", lambda: "flags\t\t: fpu sse2 avx2 fma\n")
    devices._warn_emulated_bf16.cache_clear()
    with caplog.at_level(logging.WARNING, logger="bgekit.runtime.devices"):
        assert resolve_dtype("cpu", use_bf16=True) is torch.bfloat16  # asked for, so honoured
        resolve_dtype("cpu", use_bf16=True)
    assert [r.getMessage().count("slower than float32") for r in caplog.records] == [1]
    devices._warn_emulated_bf16.cache_clear()


@pytest.mark.parametrize("name", CASES)
def test_every_family_runs_bf16_on_the_cpu(golden_dir, name):
    case = manifest(golden_dir)["cases"][name]
    key = (case["class"], case["model"], repr(sorted(case["init_kwargs"].items())))
    if key not in _models:
        options = {**case["init_kwargs"], "use_bf16": True, "devices": "cpu"}
        _models[key] = getattr(bgekit, case["class"])(str(golden_dir / case["model"]), **options)
    model = _models[key]
    assert next(model.host.module.parameters()).dtype is torch.bfloat16
    got = getattr(model, case["method"])(*[resolve_arg(golden_dir, a) for a in case["args"]], **case["call_kwargs"])
    if case["class"] != "BGEM3FlagModel":
        check_returns(case, got)  # float32 out, as in float32
    for field in case["outputs"]:
        output, _, index = field.partition("/")
        value = got[output] if isinstance(got, dict) else got
        want = expected(golden_dir, case, field)
        if value is None:
            continue
        value = value[int(index)] if index else value
        if output == "lexical_weights":  # a dict, or one per input
            pairs = zip(value, want, strict=True) if isinstance(want, list) else [(value, want)]
            for got_one, want_one in pairs:
                check_lexical_weights_close(got_one, want_one)
            continue
        if not isinstance(value, list | float):  # arrays come back float32 (scores are Python floats)
            assert value.dtype in (np.float32, torch.float32)
        value = value.numpy() if isinstance(value, torch.Tensor) else np.asarray(value)
        np.testing.assert_allclose(value, np.asarray(want, dtype=np.float32), rtol=0, atol=BF16_ATOL)


def check_lexical_weights_close(got: dict, want: dict) -> None:
    """Shared tokens' weights within bfloat16's tolerance; a token only one side kept sits near the ReLU's
    zero, so bfloat16's rounding can move it in or out of the dict, and its weight is within that
    tolerance of zero."""
    for token in got.keys() & want.keys():
        assert abs(float(got[token]) - float(want[token])) <= BF16_ATOL, token
    for token in got.keys() ^ want.keys():
        weight = got[token] if token in got else want[token]
        assert 0 < float(weight) <= BF16_ATOL, (token, weight)
    assert got.keys() & want.keys() or not want  # not a dict of other tokens altogether


def test_minilm_bf16_vectors_stay_close_to_float32(minilm_dir):
    lines = require_shared("data", "stsbenchmark", "test.tsv").read_text(encoding="utf-8").splitlines()[1:201]
    sentences = [line.split("\t")[0] for line in lines]
    fp32 = FlagModel(str(minilm_dir), pooling_method="mean", devices="cpu")
    bf16 = FlagModel(str(minilm_dir), pooling_method="mean", devices="cpu", use_bf16=True)
    assert next(bf16.host.module.parameters()).dtype is torch.bfloat16
    a, b = fp32.encode(sentences), bf16.encode(sentences)
    assert b.dtype == np.float32
    cosine = (a * b).sum(axis=1)
    assert cosine.min() > 0.999  # bfloat16 keeps MiniLM's vectors (int8 ONNX: 0.96 worst)
    assert np.abs(a - b).max() > 1e-5  # and it really ran in bfloat16


def test_onnx_backends_refuse_bf16(tiny_bert):
    pytest.importorskip("onnxruntime")
    with pytest.raises(InputError, match="use_bf16"):
        FlagModel(str(tiny_bert), devices="cpu", backend="onnx", use_bf16=True)


def test_the_corpus_cache_keys_on_the_precision_the_cpu_runs_and_the_backend(tiny_bert, tmp_path, monkeypatch):
    fp32 = model_identity(FlagModel(str(tiny_bert), devices="cpu"))
    assert fp32["precision"] == "fp32" and "backend" not in fp32  # use_fp16 defaults on; torch keeps old keys
    bf16 = model_identity(FlagModel(str(tiny_bert), devices="cpu", use_bf16=True))
    assert bf16["precision"] == "bf16" and "backend" not in bf16
    pytest.importorskip("onnxruntime")
    monkeypatch.setenv("BGEKIT_CACHE", str(tmp_path))  # the export's cache
    int8 = model_identity(FlagModel(str(tiny_bert), devices="cpu", backend="onnx-int8"))
    assert int8["backend"] == "onnx-int8" and int8["precision"] == "fp32"  # not the torch vectors' cache
