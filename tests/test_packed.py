"""Packed batches (every sequence end to end, no padding) give the padded path's results.

On the CPU the packed attention runs sequence by sequence (``packed=True``); the CUDA flash
kernel is checked against the padded path on a GPU (``-m gpu``). The model itself is the
transformers module unchanged, so these tests also guard the assumptions packing makes about
it: per-sequence positions, token type ids, the first/last/mean token of each sequence.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from bgekit import (
    BGEM3FlagModel,
    FlagICLModel,
    FlagLLMModel,
    FlagLLMReranker,
    FlagModel,
    FlagReranker,
    LayerWiseFlagLLMReranker,
    LightWeightFlagLLMReranker,
)
from bgekit.errors import InputError
from bgekit.models.tokenization import load_hf_tokenizer
from bgekit.runtime import packed

TOL = 1e-5  # float32, the same math summed in another order (observed ~3e-7)
HALF_TOL = 5e-3  # the documented fp16 tolerance (benchmarks/RESULTS.md)

TEXTS = [
    "one",
    "",
    "a longer sentence about retrieval, embeddings and rerankers " * 40,  # beyond max_length
    "short text",
    "the quick brown fox jumps over the lazy dog",
    "embedding models map text to vectors",
] * 3 + [f"sentence number {i} " * (1 + i % 9) for i in range(20)]
PAIRS = [("what is a panda?", "The giant panda is a bear native to China. " * k) for k in range(1, 14)] + [
    ("query with no passage", ""),
    ("", "passage with no query"),
    ("a long query " * 60, "and a long passage " * 60),
]


def test_pack_lays_sequences_end_to_end():
    batch = packed.pack([[5, 6, 7], [8], [9, 10]], [[0, 0, 1], [0], [1, 1]], position_offset=2)
    assert batch["input_ids"].tolist() == [[5, 6, 7, 8, 9, 10]]
    assert batch["token_type_ids"].tolist() == [[0, 0, 1, 0, 1, 1]]
    assert batch["position_ids"].tolist() == [[2, 3, 4, 2, 2, 3]]
    assert batch["cu_seq_lens_q"].tolist() == [0, 3, 4, 6] and batch["cu_seq_lens_q"].dtype == torch.int32
    assert batch["max_length_q"] == batch["max_length_k"] == 3
    assert batch[packed.SEQUENCE_IDS].tolist() == [0, 0, 0, 1, 2, 2]
    assert batch[packed.LENGTHS].tolist() == [3, 1, 2]
    assert set(packed.model_inputs(batch)) == {"input_ids", "token_type_ids", "position_ids", *packed.PACKING_KEYS}
    # no type ids from the tokenizer: zeros (a [1, T] row is longer than the models' buffered defaults)
    assert packed.pack([[1, 2], [3]])["token_type_ids"].tolist() == [[0, 0, 0]]
    with pytest.raises(InputError, match="input 1 of a batch has no tokens"):
        packed.pack([[1], []])


def per_sequence_attention(q, k, v, cu, causal: bool, left: int | None = None) -> torch.Tensor:
    """The reference: each sequence's own scaled dot-product attention (``[T, heads, D]`` rows)."""
    out = torch.empty_like(q)
    bounds = cu.tolist()
    for start, end in itertools.pairwise(bounds):
        qs, ks, vs = (t[start:end].transpose(0, 1) for t in (q, k, v))
        if ks.shape[0] != qs.shape[0]:
            ks, vs = (t.repeat_interleave(qs.shape[0] // t.shape[0], dim=0) for t in (ks, vs))
        at = torch.arange(end - start, device=q.device)
        seen = at[None, :] <= at[:, None] if causal else torch.ones_like(at[None, :] <= at[:, None])
        if causal and left is not None:
            seen = seen & (at[None, :] >= at[:, None] - left)
        out[start:end] = torch.nn.functional.scaled_dot_product_attention(qs, ks, vs, attn_mask=seen).transpose(0, 1)
    return out


@pytest.mark.parametrize(
    ("causal", "left", "kv_heads"), [(False, None, 4), (True, None, 4), (True, 3, 4), (True, None, 2)]
)
def test_grid_fallback_attention_is_per_sequence_attention(causal, left, kv_heads):
    """The non-flash path (one SDPA call over a padded grid) equals attention sequence by sequence:
    bidirectional, causal, a sliding window, grouped key/value heads."""
    torch.manual_seed(0)
    lengths = [5, 1, 17, 9, 2]
    cu = torch.tensor(np.concatenate([[0], np.cumsum(lengths)]), dtype=torch.int32)
    q = torch.randn(sum(lengths), 4, 8)
    k, v = torch.randn(sum(lengths), kv_heads, 8), torch.randn(sum(lengths), kv_heads, 8)
    got = packed.in_grid(q, k, v, cu, max(lengths), None, causal, left)
    torch.testing.assert_close(got, per_sequence_attention(q, k, v, cu, causal, left), atol=1e-6, rtol=0)


def test_pooling_of_packed_states():
    hidden = torch.arange(12, dtype=torch.float32).view(6, 2)
    batch = packed.pack([[1, 1, 1], [1], [1, 1]])
    assert packed.first_tokens(hidden, batch).tolist() == [[0, 1], [6, 7], [8, 9]]
    assert packed.last_tokens(hidden, batch).tolist() == [[4, 5], [6, 7], [10, 11]]
    assert packed.mean_tokens(hidden, batch).tolist() == [[2, 3], [6, 7], [9, 10]]


def test_last_token_pooling_of_padded_states_on_either_side():
    """Left, right and no padding (the index comes from the mask itself, never from a host check)."""
    from bgekit.models.pooling import pool

    hidden = torch.arange(30, dtype=torch.float32).view(3, 5, 2)
    right = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]])
    left = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1], [0, 0, 0, 0, 1]])
    assert pool(hidden, right, "last_token").tolist() == [[4, 5], [18, 19], [20, 21]]
    assert pool(hidden, left, "last_token").tolist() == [[8, 9], [18, 19], [28, 29]]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_mean_pooling_of_half_states_sums_in_float32(dtype):
    """Mean pooling of fp16/bf16 states adds them up in float32 and returns float32 (FlagEmbedding's
    float mask promotes them): a long sequence's sum no longer overflows fp16 (inf) or rounds to 8 bits
    of bf16 before the division. Padded and packed give the float32 mean of the same half inputs."""
    from bgekit.models.pooling import pool, pool_packed

    torch.manual_seed(0)
    lengths = [4096, 3000, 7]
    hidden = (20 + torch.randn(len(lengths), max(lengths), 8)).to(dtype)  # sum of 4096 * ~20 > fp16's 65504
    mask = (torch.arange(max(lengths))[None, :] < torch.tensor(lengths)[:, None]).long()
    want = pool(hidden.float(), mask, "mean")
    got = pool(hidden, mask, "mean")
    assert got.dtype == torch.float32 and torch.isfinite(got).all()
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-5)
    batch = packed.pack([[1] * n for n in lengths])
    rows = torch.cat([hidden[i, :n] for i, n in enumerate(lengths)])
    got_packed = pool_packed(rows, batch, "mean")
    assert got_packed.dtype == torch.float32
    torch.testing.assert_close(got_packed, want, rtol=1e-6, atol=1e-5)


def test_choice_of_packing(tiny_bert):
    from transformers import AutoModel

    module = AutoModel.from_pretrained(str(tiny_bert))
    cpu, fp32 = ["cpu"], [torch.float32]
    assert packed.choose(None, module, fp32, cpu) is None  # auto: CUDA half precision only
    assert not packed._flash_device(torch.device("cpu"))
    assert packed.choose(False, module, fp32, cpu) is None
    assert packed.choose(True, module, fp32, cpu) == 0
    module.config.model_type, module.config.pad_token_id = "xlm-roberta", 1
    assert packed.choose(True, module, fp32, cpu) == 2  # RoBERTa positions start after padding
    module.config.model_type = "gemma2"  # logit soft-capping: the variable-length kernel has none
    with pytest.raises(InputError, match=r"gemma2.*packed=False"):
        packed.choose(True, module, fp32, cpu)
    with pytest.raises(InputError, match="packed must be True, False or None"):
        packed.choose("yes", module, fp32, cpu)

    class RemoteCode(torch.nn.Module):  # a model's own code may not use transformers' attention interface
        config = module.config

    module.config.model_type = "bert"
    assert packed.position_offset(module) == 0 and packed.position_offset(RemoteCode()) is None


def test_packed_refused_where_the_forward_cannot_take_it(tiny_bert):
    with pytest.raises(InputError, match="packed=True is not supported"):
        FlagModel(str(tiny_bert), devices="cpu", backend="onnx", packed=True)
    assert not FlagModel(str(tiny_bert), devices="cpu").host.packed  # auto stays padded on the CPU


@pytest.mark.parametrize(
    ("fixture", "pooling"), [("tiny_bert", "cls"), ("tiny_bert", "mean"), ("tiny_xlmr", "cls"), ("tiny_xlmr", "mean")]
)
def test_packed_embeddings_match_padded(request, fixture, pooling):
    folder = str(request.getfixturevalue(fixture))
    padded = FlagModel(folder, devices="cpu", pooling_method=pooling, passage_max_length=48, packed=False)
    fast = FlagModel(folder, devices="cpu", pooling_method=pooling, passage_max_length=48, packed=True)
    assert fast.host.packed and not padded.host.packed
    reference = padded.encode(TEXTS, batch_size=7)
    got = fast.encode(TEXTS, batch_size=7)
    assert got.shape == reference.shape
    np.testing.assert_allclose(got, reference, atol=TOL)
    # raw pooled vectors too (normalization can hide a scale error)
    raw = {"normalize_embeddings": False}
    np.testing.assert_allclose(fast.encode(TEXTS[:9], **raw), padded.encode(TEXTS[:9], **raw), atol=TOL)


def left_padded_copy(folder, target):
    """``folder`` copied with ``padding_side: left`` in its tokenizer config."""
    import json
    import shutil

    shutil.copytree(folder, target)
    config_path = target / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config_path.write_text(json.dumps({**config, "padding_side": "left"}))
    return target


@pytest.mark.parametrize(
    ("fixture", "pooling"), [("tiny_bert", "cls"), ("tiny_bert", "mean"), ("tiny_xlmr", "cls"), ("tiny_xlmr", "mean")]
)
def test_encoders_pad_right_whatever_the_tokenizer_config_says(request, tmp_path, fixture, pooling):
    """A tokenizer that pads on the left put a pad token in CLS pooling's row and shifted BERT's positions:
    a text's vector depended on the other texts of its batch. Encoders pad on the right: padded batches give
    each text's vector alone, and the packed path's."""
    folder = str(left_padded_copy(request.getfixturevalue(fixture), tmp_path / "left"))
    padded = FlagModel(folder, devices="cpu", pooling_method=pooling, passage_max_length=48, packed=False)
    assert padded.tokenizer.padding_side == "right" and padded.tokenizer.hf.padding_side == "right"
    together = padded.encode(TEXTS[:9], batch_size=9)
    alone = np.stack([padded.encode([text])[0] for text in TEXTS[:9]])
    np.testing.assert_allclose(together, alone, atol=TOL)
    fast = FlagModel(folder, devices="cpu", pooling_method=pooling, passage_max_length=48, packed=True)
    np.testing.assert_allclose(fast.encode(TEXTS[:9], batch_size=9), together, atol=TOL)


@pytest.mark.parametrize("fixture", ["tiny_bert_reranker", "tiny_xlmr_reranker"])
def test_cross_encoders_pad_right_whatever_the_tokenizer_config_says(request, tmp_path, fixture):
    folder = str(left_padded_copy(request.getfixturevalue(fixture), tmp_path / "left"))
    model = FlagReranker(folder, devices="cpu", max_length=64, packed=False)
    together = model.compute_score(PAIRS[:6], batch_size=6)
    alone = [model.compute_score([pair])[0] for pair in PAIRS[:6]]
    np.testing.assert_allclose(together, alone, atol=TOL)


@pytest.mark.parametrize("family", ["FlagLLMModel", "FlagICLModel"])
def test_decoders_keep_their_tokenizers_padding_side(golden_dir, family):
    """Only encoders pad right: decoders pad where their tokenizer does, as FlagEmbedding's (the golden
    bf16 vectors of a left-padding decoder moved beyond tolerance when it padded right)."""
    folder = golden_dir / "models" / ("mistral-icl" if family == "FlagICLModel" else "mistral-llm")
    model = {"FlagLLMModel": FlagLLMModel, "FlagICLModel": FlagICLModel}[family](str(folder), devices="cpu")
    assert model.tokenizer.padding_side == "left" and model.tokenizer.hf.padding_side == "left"


def test_m3_pads_right_whatever_the_tokenizer_config_says(golden_dir, tmp_path):
    folder = str(left_padded_copy(golden_dir / "models" / "xlmr-m3", tmp_path / "left"))
    model = BGEM3FlagModel(folder, devices="cpu", packed=False)
    together = model.encode(TEXTS[:6], batch_size=6)["dense_vecs"]
    alone = np.stack([model.encode([text])["dense_vecs"][0] for text in TEXTS[:6]])
    np.testing.assert_allclose(together, alone, atol=TOL)


def test_packed_minilm_matches_padded(minilm_dir):
    padded = FlagModel(str(minilm_dir), devices="cpu", pooling_method="mean", packed=False)
    fast = FlagModel(str(minilm_dir), devices="cpu", pooling_method="mean", packed=True)
    np.testing.assert_allclose(fast.encode(TEXTS, batch_size=8), padded.encode(TEXTS, batch_size=8), atol=TOL)


@pytest.mark.parametrize("fixture", ["tiny_bert_reranker", "tiny_xlmr_reranker"])
def test_packed_reranker_scores_match_padded(request, fixture):
    folder = str(request.getfixturevalue(fixture))
    padded = FlagReranker(folder, devices="cpu", max_length=64, packed=False)
    fast = FlagReranker(folder, devices="cpu", max_length=64, packed=True)
    assert fast.host.packed
    np.testing.assert_allclose(
        fast.compute_score(PAIRS, batch_size=5), padded.compute_score(PAIRS, batch_size=5), atol=TOL
    )


@pytest.mark.parametrize("name", ["mistral-llm", "mistral-icl"])
def test_packed_decoder_embeddings_match_padded(golden_dir, name):
    """Last-token pooling on packed rows: queries with instructions (and in-context examples for
    ICL) and passages, against the decoder's usual left-padded batches."""
    folder = str(golden_dir / "models" / name)
    options = {"devices": "cpu", "query_instruction_for_retrieval": "Given a question, retrieve passages"}
    if name == "mistral-icl":
        model_class = FlagICLModel
        options["examples_for_task"] = [{"instruct": "Find", "query": "what is bge", "response": "an embedder"}]
    else:
        model_class = FlagLLMModel
        options["query_instruction_format"] = "<instruct>{}\n<query>{}"
    padded, fast = model_class(folder, packed=False, **options), model_class(folder, packed=True, **options)
    assert fast.host.packed
    queries = [q for q, _ in PAIRS]
    passages = [p for _, p in PAIRS]
    np.testing.assert_allclose(
        fast.encode_queries(queries, batch_size=4), padded.encode_queries(queries, batch_size=4), atol=TOL
    )
    np.testing.assert_allclose(
        fast.encode_corpus(passages, batch_size=4), padded.encode_corpus(passages, batch_size=4), atol=TOL
    )


def test_switched_module_is_unchanged_on_padded_input(golden_dir):
    """A module switched to the packed attention gives SDPA's exact output on padded batches."""
    from transformers import AutoModel

    folder = golden_dir / "models" / "bert-cls"
    model = AutoModel.from_pretrained(str(folder), dtype=torch.float32).eval()
    tokenizer = load_hf_tokenizer(folder)
    inputs = tokenizer(["a b c d e f", "a", "b c"], padding=True, return_tensors="pt")
    with torch.inference_mode():
        before = model(**inputs).last_hidden_state
        packed.use_packed_attention(model)
        after = model(**inputs).last_hidden_state
    assert model.config._attn_implementation == packed.ATTENTION_NAME
    assert torch.equal(before, after)


@pytest.mark.parametrize(("name", "window"), [("mistral-llm", None), ("mistral-llm", 3), ("gemma-llm-reranker", None)])
def test_packed_causal_attention_matches_padded(golden_dir, name, window):
    """Decoders: causal attention kept inside each sequence, grouped key/value heads, rotary
    positions restarting per sequence, Mistral's sliding window (shorter than the texts here)."""
    from transformers import AutoModel

    folder = golden_dir / "models" / name
    model = AutoModel.from_pretrained(str(folder), dtype=torch.float32).eval()
    assert packed.position_offset(model) == 0
    if window is not None:
        model.config.sliding_window = window
    tokenizer = load_hf_tokenizer(folder)
    tokenizer.padding_side = "right"
    texts = ["hello world", "a much longer sentence about vectors and search engines", "x", "three more words"]
    inputs = tokenizer(texts, padding=True, return_tensors="pt")
    ids = [row[mask.bool()].tolist() for row, mask in zip(inputs["input_ids"], inputs["attention_mask"], strict=True)]
    packed.use_packed_attention(model)
    batch = packed.pack(ids)
    with torch.inference_mode():
        reference = model(**inputs).last_hidden_state
        flat = model(**packed.model_inputs(batch)).last_hidden_state[0]
    for row, start in enumerate(batch["cu_seq_lens_q"][:-1].tolist()):
        n = len(ids[row])
        torch.testing.assert_close(flat[start : start + n], reference[row, :n], atol=TOL, rtol=0)


# -- CUDA: the flash variable-length kernel ------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize(("fixture", "pooling"), [("tiny_bert", "cls"), ("tiny_xlmr", "mean"), ("minilm_dir", "mean")])
def test_cuda_packed_half_matches_padded(request, fixture, pooling):
    folder = str(request.getfixturevalue(fixture))
    options = {"devices": "cuda:0", "pooling_method": pooling, "use_fp16": True}
    fast = FlagModel(folder, **options)  # auto: packed on CUDA in fp16
    padded = FlagModel(folder, packed=False, **options)
    assert fast.host.packed and not padded.host.packed
    got, reference = fast.encode(TEXTS, batch_size=8), padded.encode(TEXTS, batch_size=8)
    np.testing.assert_allclose(got, reference, atol=HALF_TOL)
    cpu = FlagModel(folder, devices="cpu", pooling_method=pooling).encode(TEXTS, batch_size=8)
    np.testing.assert_allclose(got, cpu, atol=HALF_TOL)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_flash_kernel_matches_per_sequence_attention():
    torch.manual_seed(0)
    lengths = [5, 1, 17, 64, 3]
    cu = torch.tensor(np.concatenate([[0], np.cumsum(lengths)]), dtype=torch.int32, device="cuda")
    q, k, v = (torch.randn(sum(lengths), 4, 32, device="cuda", dtype=torch.float16) for _ in range(3))
    assert packed.flash_applies(q)
    for causal, left in ((False, None), (True, None), (True, 4)):  # left: a sliding window's reach
        fast = packed.flash_varlen(q, k, v, cu, max(lengths), None, causal, left)
        exact = per_sequence_attention(q.float(), k.float(), v.float(), cu, causal, left)
        torch.testing.assert_close(fast.float(), exact, atol=HALF_TOL, rtol=0)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_packed_reranker_matches_padded(tiny_xlmr_reranker):
    options = {"devices": "cuda:0", "use_fp16": True, "max_length": 64}
    fast, padded = (
        FlagReranker(str(tiny_xlmr_reranker), **options),
        FlagReranker(str(tiny_xlmr_reranker), packed=False, **options),
    )
    assert fast.host.packed
    np.testing.assert_allclose(
        fast.compute_score(PAIRS, batch_size=5), padded.compute_score(PAIRS, batch_size=5), atol=HALF_TOL
    )


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_packed_decoder_matches_padded(golden_dir):
    folder = str(golden_dir / "models" / "mistral-icl")
    options = {"devices": "cuda:0", "use_fp16": True, "query_instruction_for_retrieval": "Given a question"}
    fast, padded = FlagICLModel(folder, **options), FlagICLModel(folder, packed=False, **options)
    assert fast.host.packed
    queries = [q for q, _ in PAIRS]
    np.testing.assert_allclose(fast.encode_queries(queries), padded.encode_queries(queries), atol=HALF_TOL)


def test_packed_llm_reranker_matches_padded(golden_dir):
    """The Yes logit of each pair's last token, the head run on those tokens only."""
    folder = str(golden_dir / "models" / "gemma-llm-reranker")
    padded = FlagLLMReranker(folder, devices="cpu", packed=False)
    fast = FlagLLMReranker(folder, devices="cpu", packed=True)
    assert fast.host.packed
    np.testing.assert_allclose(
        fast.compute_score(PAIRS, batch_size=5), padded.compute_score(PAIRS, batch_size=5), atol=TOL
    )


@pytest.mark.parametrize(
    ("model_class", "name"),
    [(LayerWiseFlagLLMReranker, "minicpm-layerwise"), (LightWeightFlagLLMReranker, "gemma2-lightweight")],
)
def test_layerwise_rerankers_stay_padded(golden_dir, model_class, name):
    folder = str(golden_dir / "models" / name)
    assert not model_class(folder, devices="cpu").host.packed
    with pytest.raises(InputError, match="packed=True is not supported"):
        model_class(folder, devices="cpu", packed=True)


def test_packed_m3_matches_padded(golden_dir):
    """M3's three outputs from packed rows: dense (CLS), lexical weights and ColBERT vectors per token."""
    folder = str(golden_dir / "models" / "xlmr-m3")
    padded = BGEM3FlagModel(folder, devices="cpu", packed=False)
    fast = BGEM3FlagModel(folder, devices="cpu", packed=True)
    assert fast.host.packed
    texts = [t for pair in PAIRS for t in pair]
    flags = {"return_dense": True, "return_sparse": True, "return_colbert_vecs": True, "batch_size": 6}
    got, reference = fast.encode(texts, **flags), padded.encode(texts, **flags)
    np.testing.assert_allclose(got["dense_vecs"], reference["dense_vecs"], atol=TOL)
    for mine, theirs in zip(got["lexical_weights"], reference["lexical_weights"], strict=True):
        assert mine.keys() == theirs.keys()
        np.testing.assert_allclose([mine[k] for k in theirs], list(theirs.values()), atol=TOL)
    for mine, theirs in zip(got["colbert_vecs"], reference["colbert_vecs"], strict=True):
        assert mine.shape == theirs.shape
        np.testing.assert_allclose(mine, theirs, atol=TOL)
    scores = fast.compute_score(PAIRS[:4], batch_size=3)
    expected = padded.compute_score(PAIRS[:4], batch_size=3)
    for mode in expected:
        np.testing.assert_allclose(scores[mode], expected[mode], atol=TOL)


def test_model_refusing_packed_attention(tiny_bert, monkeypatch):
    """A model class that refuses a custom attention: a clear error when packing was asked for,
    padded batches when it was only the automatic choice."""
    from transformers import AutoModel

    from bgekit.models.base import ModelHost
    from bgekit.models.tokenization import TextTokenizer

    def refuse(self, name):
        raise ValueError(f"{type(self).__name__} does not support an attention backend")

    monkeypatch.setattr(type(AutoModel.from_pretrained(str(tiny_bert))), "set_attn_implementation", refuse)
    tokenizer = TextTokenizer(load_hf_tokenizer(tiny_bert))
    with pytest.raises(InputError, match="packed=True: BertModel refused packed attention"):
        ModelHost(AutoModel.from_pretrained(str(tiny_bert)), tokenizer, "cpu", False, False, packed=True)
    monkeypatch.setattr(packed, "choose", lambda *args: 0)  # as if on CUDA in fp16
    host = ModelHost(AutoModel.from_pretrained(str(tiny_bert)), tokenizer, "cpu", False, False, packed=None)
    assert not host.packed
