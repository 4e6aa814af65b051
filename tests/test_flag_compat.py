"""FlagEmbedding 1.4.2 behaviours the goldens do not pin: constructor argument order, FlagAutoModel's
``model_class`` defaults and folder names, ``model.tokenizer``, pool helpers, M3's ``truncate_dim``
and lexical-weight dicts, array inputs. The expected signatures are copied from FlagEmbedding 1.4.2."""

from __future__ import annotations

import inspect

import numpy as np
import pytest
import torch

import bgekit
from bgekit import (
    BGEM3FlagModel,
    EmbedderModelClass,
    FlagAutoModel,
    FlagAutoReranker,
    FlagICLModel,
    FlagLLMModel,
    FlagModel,
    FlagReranker,
    InputError,
    RerankerModelClass,
    registry,
)

TEXTS = ["what is a panda?", "The giant panda is a bear native to China."]
#: FlagEmbedding 1.4.2's leading positional parameters of each embedder's __init__
FLAG_POSITIONAL = {
    FlagModel: ["use_bf16", "query_instruction_for_retrieval", "query_instruction_format", "devices"],
    BGEM3FlagModel: ["use_bf16", "query_instruction_for_retrieval", "query_instruction_format", "devices"],
    FlagLLMModel: ["use_bf16", "query_instruction_for_retrieval", "query_instruction_format", "devices"],
    FlagICLModel: ["use_bf16", "query_instruction_for_retrieval", "query_instruction_format", "suffix", "devices"],
}


def models(golden_dir, name: str) -> str:
    return str(golden_dir / "models" / name)


@pytest.mark.parametrize("cls", list(FLAG_POSITIONAL), ids=lambda c: c.__name__)
def test_constructor_arguments_keep_flagembeddings_positions(cls):
    names = list(inspect.signature(cls.__init__).parameters)[1:]
    assert names[:3] == ["model_name_or_path", "normalize_embeddings", "use_fp16"]
    assert names[3 : 3 + len(FLAG_POSITIONAL[cls])] == FLAG_POSITIONAL[cls]
    assert "truncate_dim" in names


def test_use_bf16_is_the_fourth_positional_argument(golden_dir):
    model = FlagModel(models(golden_dir, "bert-cls"), True, False, True, devices="cpu")
    assert next(model.host.module.parameters()).dtype is torch.bfloat16
    auto = list(inspect.signature(FlagAutoModel.from_finetuned).parameters)
    assert auto[:6] == [
        "model_name_or_path",
        "model_class",
        "normalize_embeddings",
        "use_fp16",
        "use_bf16",
        "query_instruction_for_retrieval",
    ]


def test_model_class_gives_flagembeddings_class_defaults(golden_dir):
    """With ``model_class`` FlagEmbedding pools as the class does and formats queries ``{}{}``."""
    folder = models(golden_dir, "mistral-llm")
    auto = FlagAutoModel.from_finetuned(
        folder, model_class="decoder-only-base", query_instruction_for_retrieval="Find passages. ", devices="cpu"
    )
    assert isinstance(auto, FlagLLMModel) and auto.query_instruction_format == "{}{}"
    plain = FlagLLMModel(
        folder, query_instruction_for_retrieval="Find passages. ", query_instruction_format="{}{}", devices="cpu"
    )
    np.testing.assert_allclose(auto.encode_queries(TEXTS), plain.encode_queries(TEXTS), rtol=0, atol=1e-6)
    icl = FlagAutoModel.from_finetuned(
        models(golden_dir, "mistral-icl"), model_class=EmbedderModelClass.DECODER_ONLY_ICL, devices="cpu"
    )
    assert isinstance(icl, FlagICLModel) and icl.pooling_method == "last_token"
    assert isinstance(
        FlagAutoReranker.from_finetuned(
            models(golden_dir, "xlmr-reranker"), model_class=RerankerModelClass.ENCODER_ONLY_BASE, devices="cpu"
        ),
        FlagReranker,
    )


def test_model_class_on_a_sentence_transformers_folder_pools_cls(minilm_dir):
    assert FlagAutoModel.from_finetuned(str(minilm_dir), devices="cpu").pooling_method == "mean"  # its own files
    forced = FlagAutoModel.from_finetuned(str(minilm_dir), model_class="encoder-only-base", devices="cpu")
    assert forced.pooling_method == "cls"  # FlagEmbedding's FlagModel default


@pytest.mark.parametrize(
    ("source", "name", "cls", "query_format"),
    [
        ("mistral-icl", "bge-en-icl", FlagICLModel, registry.BGE_LLM_FORMAT),
        ("mistral-llm", "bge-multilingual-gemma2", FlagLLMModel, registry.BGE_LLM_FORMAT),
        ("mistral-llm", "Qwen3-Embedding-0.6B", FlagLLMModel, "Instruct: {}\nQuery:{}"),
        ("mistral-llm", "some-llm", FlagLLMModel, registry.E5_INSTRUCT),  # no known name: its files say
    ],
)
def test_local_folders_named_like_a_known_model_are_that_model(tmp_path, golden_dir, source, name, cls, query_format):
    folder = tmp_path / name
    folder.symlink_to(golden_dir / "models" / source, target_is_directory=True)
    model = FlagAutoModel.from_finetuned(str(folder), devices="cpu")
    assert type(model) is cls and model.query_instruction_format == query_format
    run = tmp_path / "runs" / name
    (run / "checkpoint-20").parent.mkdir(parents=True)
    (run / "checkpoint-20").symlink_to(golden_dir / "models" / source, target_is_directory=True)
    assert type(FlagAutoModel.from_finetuned(str(run / "checkpoint-20"), devices="cpu")) is cls


def test_flagembeddings_newer_names_are_known():
    for name in ("bge-code-v1", "bge-reasoner-embed-qwen3-8b-0923"):
        assert registry.lookup(name, registry.EMBEDDERS)[1].kind == registry.DECODER, name
    for name in ("gte-multilingual-reranker-base", "jina-reranker-v1-turbo-en"):
        assert registry.lookup(name, registry.RERANKERS)[1].kind == registry.CROSS_ENCODER, name


def test_icl_suffix_and_example_keys(golden_dir):
    folder = models(golden_dir, "mistral-icl")
    example = {"instruct": "Find it.", "query": "a question", "response": "an answer"}
    default = FlagICLModel(folder, examples_for_task=[example], devices="cpu")
    custom = FlagICLModel(folder, examples_for_task=[example], suffix="\n<answer>", devices="cpu")
    assert custom.tokenizer.decode(custom.tokenize(["q"], "query").ids[0]).endswith("\n<answer></s>")
    assert not np.allclose(default.encode_queries(TEXTS), custom.encode_queries(TEXTS))
    tagged = FlagICLModel(folder, examples_for_task=[{**example, "id": 3}], devices="cpu")  # other keys: ignored
    np.testing.assert_array_equal(tagged.encode_queries(TEXTS), default.encode_queries(TEXTS))
    with pytest.raises(InputError, match="suffix must be a string"):
        FlagICLModel(folder, suffix=None, devices="cpu")


def test_model_tokenizer_answers_as_the_hugging_face_tokenizer(golden_dir):
    model = FlagModel(models(golden_dir, "bert-cls"), devices="cpu")
    hf = model.tokenizer.hf
    assert model.tokenizer(["hi there"])["input_ids"] == hf(["hi there"])["input_ids"]
    assert len(model.tokenizer) == len(hf)
    assert model.tokenizer.encode("hi there") == hf.encode("hi there")
    assert model.tokenizer.tokenize("hi there") == hf.tokenize("hi there")
    assert model.tokenizer.model_max_length == hf.model_max_length
    assert model.tokenizer.convert_ids_to_tokens([hf.cls_token_id]) == [hf.cls_token]
    assert model.tokenizer.encode(["hi there"], 8).ids == [hf.encode("hi there")]  # bgekit's batch form
    with pytest.raises(InputError, match="takes a list of texts and a length"):
        model.tokenizer.encode(["hi there"])
    with pytest.raises(AttributeError):
        model.tokenizer.no_such_attribute  # noqa: B018


def test_pool_helpers_of_flagembedding(golden_dir):
    model = FlagModel(models(golden_dir, "bert-cls"), devices="cpu")
    before = model.encode(TEXTS)
    model.stop_self_pool()
    np.testing.assert_array_equal(model.encode(TEXTS), before)  # still usable, as in FlagEmbedding
    assert model.get_detailed_instruct("Instruct: {}\\nQuery: {}", "Find.", "q") == "Instruct: Find.\nQuery: q"
    reranker = FlagReranker(models(golden_dir, "xlmr-reranker"), devices="cpu")
    reranker.stop_self_pool()
    assert reranker.get_detailed_instruct("{}{}", "a", "b") == "ab"
    FlagICLModel(models(golden_dir, "mistral-icl"), devices="cpu").stop_self_query_pool()


@pytest.fixture(scope="module")
def m3_models(golden_dir):
    folder = models(golden_dir, "xlmr-m3")
    return BGEM3FlagModel(folder, devices="cpu"), BGEM3FlagModel(folder, devices="cpu", truncate_dim=16)


def test_m3_truncate_dim_cuts_colbert_vectors_before_normalizing(golden_dir, m3_models):
    cut = m3_models[1]
    raw = BGEM3FlagModel(models(golden_dir, "xlmr-m3"), devices="cpu", normalize_embeddings=False)
    out = cut.encode(TEXTS, return_colbert_vecs=True)
    assert out["dense_vecs"].shape == (2, 16)
    for got, full in zip(out["colbert_vecs"], raw.encode(TEXTS, return_colbert_vecs=True)["colbert_vecs"], strict=True):
        assert got.shape == (full.shape[0], 16)
        want = torch.nn.functional.normalize(torch.from_numpy(full[:, :16]), dim=-1).numpy()
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)


def test_m3_compute_score_ignores_truncate_dim(m3_models):
    whole, cut = m3_models
    pairs = [(TEXTS[0], TEXTS[1]), (TEXTS[1], TEXTS[0])]
    for mode, values in whole.compute_score(pairs).items():
        np.testing.assert_allclose(cut.compute_score(pairs)[mode], values, rtol=0, atol=1e-6, err_msg=mode)


def test_m3_lexical_weights_read_missing_tokens_as_zero(m3_models):
    query, passage = m3_models[0].encode(TEXTS, return_sparse=True, return_dense=False)["lexical_weights"]
    assert sum(w * passage[t] for t, w in query.items()) == pytest.approx(
        m3_models[0].compute_lexical_matching_score(query, passage)
    )


def test_array_inputs(golden_dir, m3_models):
    reranker = FlagReranker(models(golden_dir, "xlmr-reranker"), devices="cpu")
    pairs = [[TEXTS[0], TEXTS[1]], [TEXTS[1], TEXTS[0]]]
    want = reranker.compute_score(pairs)
    assert reranker.compute_score(np.array(pairs, dtype=object)) == want  # a DataFrame's .values
    assert reranker.compute_score(np.array(pairs)) == want
    assert reranker.compute_score(np.array(pairs[0])) == pytest.approx(want[:1], abs=1e-6)  # one pair, one score
    weights = [0.4, 0.2, 0.4]
    m3 = m3_models[0]
    assert m3.compute_score(pairs, weights_for_different_modes=np.array(weights)) == m3.compute_score(
        pairs, weights_for_different_modes=weights
    )


def test_enums_are_exported_lazily():
    assert bgekit.EmbedderModelClass.ENCODER_ONLY_M3 == "encoder-only-m3"
    assert {m.value for m in RerankerModelClass} <= set(registry.RERANKER_KINDS)


@pytest.mark.parametrize("name", ["bert-cls", "xlmr-m3"])
def test_one_call_can_replace_the_instruction(golden_dir, name):
    """``encode_queries(..., instruction=, instruction_format=)`` overrides the configured instruction for
    that call (``None``: none); FlagEmbedding 1.4.2 raised a TypeError (its own value and the caller's)."""
    model = FlagAutoModel.from_finetuned(
        models(golden_dir, name), query_instruction_for_retrieval="Represent: ", devices="cpu"
    )
    dense = (lambda out: out["dense_vecs"]) if name == "xlmr-m3" else (lambda out: out)
    plain = dense(model.encode(TEXTS))
    np.testing.assert_allclose(dense(model.encode_queries(TEXTS, instruction=None)), plain, atol=1e-6)
    other = dense(model.encode(TEXTS, instruction="Other", instruction_format="{}: {}"))
    np.testing.assert_allclose(
        dense(model.encode_queries(TEXTS, instruction="Other", instruction_format="{}: {}")), other, atol=1e-6
    )
    configured = dense(model.encode(TEXTS, instruction="Represent: "))
    np.testing.assert_allclose(dense(model.encode_queries(TEXTS)), configured, atol=1e-6)
    np.testing.assert_allclose(dense(model.encode_corpus(TEXTS, instruction="Represent: ")), configured, atol=1e-6)
    assert model.query_instruction_for_retrieval == "Represent: "  # the call changed nothing
