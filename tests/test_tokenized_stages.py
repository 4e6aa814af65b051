"""The staged entry points the server uses (``tokenize`` -> ``embed_tokenized`` / ``encode_tokenized``
-> ``postprocess``; ``tokenize_pairs`` -> ``score_tokenized``) give exactly what the one-call API
gives, for every family. The server's vectors are the library's because of these."""

from __future__ import annotations

import numpy as np
import pytest

from bgekit import BGEM3FlagModel, FlagICLModel, FlagLLMModel, FlagLLMReranker, FlagModel, FlagReranker, InputError
from bgekit.models.tokenization import Tokenized

TEXTS = ["what do pandas eat?", "The giant panda is a bear native to China that eats bamboo. " * 3, "Paris"]
PAIRS = [("what do pandas eat?", t) for t in TEXTS]


def staged(model, texts, input_type):
    return model.postprocess(model.embed_tokenized(model.tokenize(texts, input_type)), False)


@pytest.mark.parametrize(
    ("cls", "folder", "options"),
    [
        (
            FlagModel,
            "bert-cls",
            {"query_instruction_for_retrieval": "query: ", "passage_instruction_for_retrieval": "p: "},
        ),
        (FlagModel, "bert-mean", {"pooling_method": "mean", "truncate_dim": 16, "passage_max_length": 8}),
        (FlagLLMModel, "mistral-llm", {"query_instruction_for_retrieval": "Given a query, find passages."}),
        (
            FlagICLModel,
            "mistral-icl",
            {
                "query_instruction_for_retrieval": "Given a query, find passages.",
                "examples_for_task": [{"instruct": "Find.", "query": "what is a bear", "response": "an animal"}],
            },
        ),
    ],
)
def test_staged_embedding_equals_encode(golden_dir, cls, folder, options):
    model = cls(str(golden_dir / "models" / folder), **options)
    np.testing.assert_array_equal(staged(model, TEXTS, "query"), model.encode_queries(TEXTS))
    np.testing.assert_array_equal(staged(model, TEXTS, "passage"), model.encode_corpus(TEXTS))
    np.testing.assert_array_equal(staged(model, TEXTS, None), model.encode(TEXTS))
    tokenized = model.tokenize(TEXTS, None, max_length=6)
    assert isinstance(tokenized, Tokenized) and max(map(len, tokenized.ids)) <= 6 and tokenized.truncated >= 1
    with pytest.raises(InputError, match="input_type"):
        model.tokenize(TEXTS, "document")


def test_staged_m3_equals_encode(golden_dir):
    model = BGEM3FlagModel(str(golden_dir / "models" / "xlmr-m3"))
    flags = {"return_dense": True, "return_sparse": True, "return_colbert_vecs": True}
    got = model.encode_tokenized(model.tokenize(TEXTS, "passage"), **flags)
    want = model.encode_corpus(TEXTS, **flags)
    np.testing.assert_array_equal(got["dense_vecs"], want["dense_vecs"])
    assert got["lexical_weights"] == want["lexical_weights"]
    for a, b in zip(got["colbert_vecs"], want["colbert_vecs"], strict=True):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(staged(model, TEXTS, None), model.encode(TEXTS)["dense_vecs"])


@pytest.mark.parametrize(("cls", "folder"), [(FlagReranker, "xlmr-reranker"), (FlagLLMReranker, "gemma-llm-reranker")])
def test_staged_rerank_equals_compute_score(golden_dir, cls, folder):
    model = cls(str(golden_dir / "models" / folder), query_instruction_for_rerank="Q: ", max_length=24)
    tokenized = model.tokenize_pairs(PAIRS)
    assert tokenized.truncated >= 1  # the long passage was cut to max_length
    assert model.score_tokenized(tokenized) == model.compute_score(PAIRS)


def test_layerwise_reranker_has_no_tokenized_scoring(golden_dir):
    from bgekit import LayerWiseFlagLLMReranker

    model = LayerWiseFlagLLMReranker(str(golden_dir / "models" / "minicpm-layerwise"))
    tokenized = model.tokenize_pairs(PAIRS)  # the layout is the base LLM reranker's
    with pytest.raises(NotImplementedError, match="compute_score"):
        model.score_tokenized(tokenized)


@pytest.mark.parametrize(
    ("cls", "folder", "options", "input_type", "problem"),
    [
        (FlagModel, "bert-cls", {"query_instruction_for_retrieval": "query: "}, "query", "instruction 'query: '"),
        (FlagModel, "bert-cls", {"query_instruction_for_retrieval": "query: "}, "passage", None),
        (FlagModel, "bert-cls", {"passage_instruction_for_retrieval": "p: "}, "passage", "instruction 'p: '"),
        (FlagLLMModel, "mistral-llm", {"query_instruction_for_retrieval": "Find it."}, "query", "Find it"),
        (FlagLLMModel, "mistral-llm", {"query_instruction_for_retrieval": "Find it."}, None, None),
        (FlagICLModel, "mistral-icl", {}, "query", "prompt template"),
        (FlagICLModel, "mistral-icl", {}, "passage", None),
    ],
)
def test_tokenize_cuts_the_start_only_where_that_cuts_only_the_text(golden_dir, cls, folder, options, input_type,
                                                                     problem):  # fmt: skip
    """``tokenize(..., truncation_side="left")`` keeps a long text's end; where the model's prompt comes before
    the text it would be cut first, so that is an InputError naming the prompt (the server's truncate=START)."""
    model = cls(str(golden_dir / "models" / folder), devices="cpu", **options)
    long_text = "pandas eat bamboo " * 100 + "the end"
    assert (model.start_cut_problem(input_type) is None) == (problem is None)
    if problem is not None:
        with pytest.raises(InputError, match=problem):
            model.tokenize([long_text], input_type, max_length=16, truncation_side="left")
        return
    left = model.tokenize([long_text], input_type, max_length=16, truncation_side="left")
    right = model.tokenize([long_text], input_type, max_length=16)
    assert left.truncated == right.truncated == 1 and len(left.ids[0]) == len(right.ids[0]) == 16
    end = model.tokenizer.plain_ids(["the end"])[0][0]
    tail = left.ids[0][-len(end) - model.tokenizer.n_special_single :]
    assert all(i in tail for i in end) and left.ids[0] != right.ids[0]
