"""BGEM3FlagModel reproduces FlagEmbedding 1.4.2's BGE-M3 goldens (xlmr-m3.* cases).

Each case is run with bgekit and compared field by field: dense and ColBERT vectors and scores
within ``atol=1e-5``, lexical weights with exactly the golden keys in the golden order, and the
exact return types and shapes. Cases that take another case's output (scores, token names) get
it by running that case with bgekit, and separately from the golden files.
"""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path

import numpy as np
import pytest
import torch

from bgekit import BGEM3FlagModel

from .conftest import SHARED
from .golden import ATOL, case_ids, golden_model_inputs, inputs, manifest, resolve_arg

GOLDEN = SHARED / "golden"
CASES = case_ids(GOLDEN, {"BGEM3FlagModel"}) if (GOLDEN / "cases.json").exists() else []
FROM_OTHER_CASES = (
    [n for n in CASES if any("output" in a for a in manifest(GOLDEN)["cases"][n]["args"])] if CASES else []
)
M3_FIELDS = {"dense_vecs", "lexical_weights", "colbert_vecs"}
MODES = ["colbert", "sparse", "dense", "sparse+dense", "colbert+sparse+dense"]


# -- running cases --------------------------------------------------------------------------
@cache
def build(golden: Path, model: str, init_kwargs: str) -> BGEM3FlagModel:
    return BGEM3FlagModel(str(golden / model), **json.loads(init_kwargs))


def model_for(golden: Path, case: dict) -> BGEM3FlagModel:
    return build(golden, case["model"], json.dumps(case["init_kwargs"], sort_keys=True))


@cache
def run_case(golden: Path, name: str, source: str = "bgekit"):
    """What bgekit returns for a case; ``source`` says where another case's outputs come from."""
    case = manifest(golden)["cases"][name]
    args = [resolve(golden, arg, source) for arg in case["args"]]
    return getattr(model_for(golden, case), case["method"])(*args, **case["call_kwargs"])


def resolve(golden: Path, arg: dict, source: str):
    if "output" not in arg:
        return resolve_arg(golden, arg)
    if source == "bgekit":
        value = run_case(golden, arg["output"])[arg["field"]]
        return value[arg["index"]] if "index" in arg else value
    return golden_output(golden, arg["output"], arg["field"], arg.get("index"))


def golden_output(golden: Path, name: str, field: str, index: int | None):
    """Another case's golden output as FlagEmbedding held it in memory (np.float32, float32 arrays)."""
    case = manifest(golden)["cases"][name]
    if field == "lexical_weights":
        spec = case["outputs"][field]
        weights = json.loads((golden / spec["file"]).read_text())[spec["key"]]
        weights = [{k: np.float32(v) for k, v in item.items()} for item in weights]
        return weights if index is None else weights[index]
    indices = range(len(inputs(golden)["queries"])) if index is None else [index]
    arrays = [np.load(golden / case["outputs"][f"{field}/{i}"]["file"])[f"{field}/{i}"] for i in indices]
    return arrays if index is None else arrays[0]


def want(golden: Path, spec: dict):
    path = golden / spec["file"]
    return np.load(path)[spec["key"]] if path.suffix == ".npz" else json.loads(path.read_text())[spec["key"]]


# -- comparisons ----------------------------------------------------------------------------
def assert_array(got, spec: dict, expected) -> None:
    assert isinstance(got, np.ndarray), type(got)
    assert str(got.dtype) == spec["dtype"] and list(got.shape) == spec["shape"], (got.dtype, got.shape)
    np.testing.assert_allclose(got, expected, rtol=0, atol=ATOL)


def assert_lexical(got, expected: dict) -> None:
    """Same token ids in the same (first-occurrence) order; np.float32 values within ATOL."""
    assert isinstance(got, dict), type(got)
    assert list(got) == list(expected)
    assert all(type(v) is np.float32 for v in got.values())
    np.testing.assert_allclose(
        np.array(list(got.values()), dtype=np.float64), np.array(list(expected.values())), rtol=0, atol=ATOL
    )


def assert_scores(got, expected) -> None:
    assert isinstance(got, dict) and list(got) == MODES
    for mode in MODES:
        if isinstance(expected[mode], list):
            assert isinstance(got[mode], list) and all(type(x) is float for x in got[mode])
        else:
            assert type(got[mode]) is float
        np.testing.assert_allclose(got[mode], expected[mode], rtol=0, atol=ATOL)


def check_encode(golden: Path, case: dict, got) -> None:
    assert isinstance(got, dict) and set(got) == M3_FIELDS and len(got) == case["returns"]["len"]
    colbert = [k for k in case["outputs"] if k.startswith("colbert_vecs/")]
    if colbert:
        assert isinstance(got["colbert_vecs"], list) and len(got["colbert_vecs"]) == len(colbert)
    for field, spec in case["outputs"].items():
        expected = want(golden, spec)
        if spec.get("kind") == "null":
            assert got[field] is None, field
        elif field.startswith("colbert_vecs/"):
            assert_array(got["colbert_vecs"][int(field.split("/")[1])], spec, expected)
        elif field == "lexical_weights" and isinstance(expected, list):
            assert isinstance(got[field], list) and len(got[field]) == len(expected)
            for item, reference in zip(got[field], expected, strict=True):
                assert_lexical(item, reference)
        elif field == "lexical_weights":
            assert_lexical(got[field], expected)
        else:  # dense_vecs, or colbert_vecs of a single string
            assert_array(got[field], spec, expected)


def check_case(golden: Path, case: dict, got) -> None:
    returns, method = case["returns"], case["method"]
    spec = next(iter(case["outputs"].values()))
    if method.startswith("encode"):
        check_encode(golden, case, got)
    elif method == "compute_score":
        assert_scores(got, want(golden, spec))
    elif method == "convert_id_to_token":
        expected = want(golden, spec)
        assert isinstance(got, list) and len(got) == returns["len"] == len(expected)
        for item, reference in zip(got, expected, strict=True):
            assert_lexical(item, reference)
    elif returns["type"] == "numpy.ndarray":
        assert_array(got, returns, want(golden, spec))
    elif returns["type"] == "numpy.float32":
        assert type(got) is np.float32, type(got)
        np.testing.assert_allclose(float(got), want(golden, spec), rtol=0, atol=ATOL)
    elif returns["type"] == "torch.Tensor":
        assert isinstance(got, torch.Tensor) and got.dtype == torch.float32 and list(got.shape) == returns["shape"]
        np.testing.assert_allclose(got.item(), want(golden, spec), rtol=0, atol=ATOL)
    else:
        raise AssertionError(f"{case['method']}: unhandled return type {returns}")


# -- tests ----------------------------------------------------------------------------------
def test_golden_cases_found(golden_dir):
    assert len(CASES) >= 15, "expected the xlmr-m3 golden cases"
    assert {manifest(golden_dir)["cases"][n]["method"] for n in CASES} >= {
        "encode",
        "encode_queries",
        "compute_lexical_matching_score",
        "colbert_score",
        "compute_score",
        "convert_id_to_token",
    }


@pytest.mark.parametrize("name", CASES)
def test_golden_case(golden_dir, name):
    check_case(golden_dir, manifest(golden_dir)["cases"][name], run_case(golden_dir, name))


@pytest.mark.parametrize("name", FROM_OTHER_CASES)
def test_golden_case_on_golden_inputs(golden_dir, name):
    """The scoring helpers give the golden result on FlagEmbedding's own encode outputs too."""
    check_case(golden_dir, manifest(golden_dir)["cases"][name], run_case(golden_dir, name, "golden"))


@pytest.mark.parametrize("name", [n for n in CASES if "model_inputs" in manifest(GOLDEN)["cases"][n]] if CASES else [])
def test_golden_token_ids(golden_dir, name):
    """The exact ids the transformer saw, per text (batch layout may differ)."""
    case = manifest(golden_dir)["cases"][name]
    model = model_for(golden_dir, case)
    args, kwargs = [resolve_arg(golden_dir, a) for a in case["args"]], case["call_kwargs"]
    if case["method"] == "compute_score":
        pairs = [args[0]] if isinstance(args[0], tuple) else args[0]
        batches = [
            ([q for q, _ in pairs], kwargs.get("max_query_length"), model.query_max_length),
            ([p for _, p in pairs], kwargs.get("max_passage_length"), model.passage_max_length),
        ]
    else:
        texts = [args[0]] if isinstance(args[0], str) else args[0]
        if case["method"] == "encode_queries" and model.query_instruction_for_retrieval:
            texts = [model.query_instruction_format.format(model.query_instruction_for_retrieval, t) for t in texts]
        default = model.query_max_length if case["method"] == "encode_queries" else model.passage_max_length
        batches = [(texts, kwargs.get("max_length"), default)]
    ids = []
    for texts, max_length, default in batches:
        ids += model.tokenizer.encode(texts, model.host.clamp_length(max_length, default)).ids
    assert sorted(tuple(x) for x in ids) == golden_model_inputs(golden_dir, case)
