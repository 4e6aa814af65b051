"""FlagModel, FlagLLMModel, FlagICLModel and FlagReranker reproduce the FlagEmbedding 1.4.2 goldens.

(M3 and the LLM rerankers have golden tests of their own.)
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from bgekit import FlagICLModel, FlagLLMModel, FlagModel, FlagReranker

from .conftest import SHARED
from .golden import ATOL, case_ids, check_returns, expected, golden_model_inputs, resolve_arg

GOLDEN = SHARED / "golden"
CLASSES = {
    "FlagModel": FlagModel,
    "FlagLLMModel": FlagLLMModel,
    "FlagICLModel": FlagICLModel,
    "FlagReranker": FlagReranker,
}
CASES = case_ids(GOLDEN, set(CLASSES)) if (GOLDEN / "cases.json").exists() else []
_models: dict = {}


def build(golden_dir, case):
    key = (case["class"], case["model"], repr(sorted(case["init_kwargs"].items())))
    if key not in _models:
        _models[key] = CLASSES[case["class"]](str(golden_dir / case["model"]), **case["init_kwargs"])
    return _models[key]


def test_golden_cases_found(golden_dir):
    assert len(CASES) >= 36, "expected the encoder, decoder, ICL and cross-encoder golden cases"


@pytest.mark.parametrize("name", CASES)
def test_golden_case(golden_dir, name):
    from .golden import manifest

    case = manifest(golden_dir)["cases"][name]
    model = build(golden_dir, case)
    args = [resolve_arg(golden_dir, a) for a in case["args"]]
    got = getattr(model, case["method"])(*args, **case["call_kwargs"])
    check_returns(case, got)
    field = next(iter(case["outputs"]))
    want = expected(golden_dir, case, field)
    if isinstance(got, torch.Tensor):
        got = got.numpy()
    np.testing.assert_allclose(np.asarray(got, dtype=np.float64), np.asarray(want, dtype=np.float64), rtol=0, atol=ATOL)


@pytest.mark.parametrize("name", CASES)
def test_golden_token_ids(golden_dir, name):
    """The exact ids the transformer saw, per text (batch layout may differ)."""
    from .golden import manifest

    case = manifest(golden_dir)["cases"][name]
    model = build(golden_dir, case)
    kwargs = case["call_kwargs"]
    args = [resolve_arg(golden_dir, a) for a in case["args"]]
    if case["class"] == "FlagICLModel" and case["method"] == "encode_queries":
        texts = [args[0]] if isinstance(args[0], str) else list(args[0])
        ids = model.tokenize_queries(texts, kwargs.get("max_length", model.query_max_length)).ids
    elif case["class"] != "FlagReranker":
        texts = [args[0]] if isinstance(args[0], str) else list(args[0])
        if case["method"] == "encode_queries" and model.query_instruction_for_retrieval:
            texts = [model.query_instruction_format.format(model.query_instruction_for_retrieval, t) for t in texts]
        if case["method"] == "encode_corpus" and model.passage_instruction_for_retrieval:
            texts = [model.passage_instruction_format.format(model.passage_instruction_for_retrieval, t) for t in texts]
        default = model.query_max_length if case["method"] == "encode_queries" else model.passage_max_length
        ids = model.tokenizer.encode(texts, kwargs.get("max_length", default)).ids
    else:
        pairs = [tuple(args[0])] if isinstance(args[0], tuple) else [tuple(p) for p in args[0]]
        pairs = model.detailed_pairs(pairs)
        max_length = kwargs.get("max_length", model.max_length)
        query_max = model.query_max_length or max_length * 3 // 4
        ids = model.tokenizer.encode_pairs([q for q, _ in pairs], [p for _, p in pairs], query_max, max_length).ids
    assert sorted(tuple(x) for x in ids) == golden_model_inputs(golden_dir, case)
