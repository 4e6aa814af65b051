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
