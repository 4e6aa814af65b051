"""The lean encoder loop gives transformers' forward results, runs where it says, and steps aside
for anything it does not recognise (hooks, LoRA-like layers, training, other inputs).

"Runs where it says" is checked by making the transformers layer class's own ``forward`` raise:
an encode that still works cannot have called it.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from bgekit import BGEM3FlagModel, FlagModel, FlagReranker
from bgekit.runtime import first_tokens, lean_encoder
from bgekit.runtime import packed as packing

TOL = 1e-5  # float32, the same operations in the same order (observed ~1e-6)
HALF_TOL = 5e-3  # the documented fp16 tolerance (benchmarks/RESULTS.md)
TEXTS = [
    "one",
    "a longer sentence about retrieval, embeddings and rerankers " * 10,
    "short text",
    "the quick brown fox jumps over the lazy dog",
    "x",
]
PAIRS = [("what is bge?", "BGE is an embedding model from BAAI."), ("q", "p"), ("capital of france", "Paris " * 30)]


def _batches(model: FlagModel) -> tuple[dict, dict]:
    """The same texts as a padded batch and as a packed one, as the runtime builds them."""
    tokenized = model.tokenizer.encode(TEXTS, 64)
    padded = model.tokenizer.collate(tokenized.ids, tokenized.type_ids, None)
    offset = packing.position_offset(model.model)
    return padded, packing.pack(tokenized.ids, tokenized.type_ids, offset)


def _layer_class(encoder: torch.nn.Module) -> type:
    return type(encoder.encoder.layer[0])


@pytest.fixture(params=["tiny_bert", "tiny_xlmr"])
def encoder_model(request) -> FlagModel:
    return FlagModel(str(request.getfixturevalue(request.param)), devices="cpu", pooling_method="mean")


def test_states_match_the_transformers_forward_padded_and_packed(encoder_model):
    encoder = encoder_model.model
    padded, packed = _batches(encoder_model)
    assert lean_encoder.usable(encoder, padded) and lean_encoder.usable(encoder, packed)
    with torch.inference_mode():
        expected = encoder(**padded).last_hidden_state
        real = padded["attention_mask"].bool()
        np.testing.assert_allclose(lean_encoder.run(encoder, padded)[real], expected[real], atol=TOL)
        packing.use_packed_attention(encoder)
        got = lean_encoder.run(encoder, packed)
        np.testing.assert_allclose(got, expected[real], atol=TOL)  # packed rows are the real rows, in order
        trunk = first_tokens._trunk(encoder)(**packing.model_inputs(packed)).last_hidden_state[0]
        np.testing.assert_allclose(lean_encoder.run(encoder, packed, depth=-1), trunk, atol=TOL)


@pytest.mark.parametrize("fixture", ["tiny_bert", "tiny_xlmr"])
@pytest.mark.parametrize("pooling", ["cls", "mean"])
@pytest.mark.parametrize("packed", [False, True])
def test_encode_runs_the_loop_not_the_layer_modules(request, monkeypatch, fixture, pooling, packed):
    model = FlagModel(
        str(request.getfixturevalue(fixture)), devices="cpu", pooling_method=pooling, packed=packed, batch_size=2
    )
    before = model.encode(TEXTS, max_length=64)
    model.model.encoder.layer[0].register_forward_hook(lambda *_: None).remove()  # hooks come and go
    monkeypatch.setattr(_layer_class(model.model), "forward", _refuse)
    np.testing.assert_allclose(model.encode(TEXTS, max_length=64), before, atol=TOL)


def _refuse(*_args, **_kwargs):
    raise AssertionError("the transformers layer ran; the lean loop should have")


@pytest.mark.parametrize("packed", [False, True])
def test_reranker_and_m3_run_the_loop(tiny_xlmr_reranker, golden_dir, monkeypatch, packed):
    reranker = FlagReranker(str(tiny_xlmr_reranker), devices="cpu", packed=packed, max_length=64)
    m3 = BGEM3FlagModel(str(golden_dir / "models" / "xlmr-m3"), devices="cpu", packed=packed, batch_size=2)
    scores = reranker.compute_score(PAIRS)
    every = m3.encode(TEXTS, return_dense=True, return_sparse=True, return_colbert_vecs=True)
    monkeypatch.setattr(_layer_class(reranker.model.base_model), "forward", _refuse)
    monkeypatch.setattr(_layer_class(m3.model.encoder), "forward", _refuse)
    np.testing.assert_allclose(reranker.compute_score(PAIRS), scores, atol=TOL)
    again = m3.encode(TEXTS, return_dense=True, return_sparse=True, return_colbert_vecs=True)
    np.testing.assert_allclose(again["dense_vecs"], every["dense_vecs"], atol=TOL)
    for new, old in zip(again["colbert_vecs"], every["colbert_vecs"], strict=True):
        np.testing.assert_allclose(new, old, atol=TOL)
    for new, old in zip(again["lexical_weights"], every["lexical_weights"], strict=True):
        assert new.keys() == old.keys()
        np.testing.assert_allclose(list(new.values()), list(old.values()), atol=TOL)


def test_a_hook_anywhere_sends_the_forward_through_transformers(encoder_model):
    encoder = encoder_model.model
    padded, _ = _batches(encoder_model)
    seen: list[int] = []
    handle = encoder.encoder.layer[0].attention.self.query.register_forward_hook(lambda *_: seen.append(1))
    try:
        assert not lean_encoder.usable(encoder, padded)
        encoder_model.encode(TEXTS[:2])
    finally:
        handle.remove()
    assert seen  # the user's hook fired
    assert lean_encoder.usable(encoder, padded)


class _Shifted(torch.nn.Linear):
    """A Linear subclass that changes its output, as a LoRA or quantized layer would."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x) + 1.0


def test_a_replaced_projection_is_honoured(encoder_model):
    encoder = encoder_model.model
    plain = encoder_model.encode(TEXTS)
    value = encoder.encoder.layer[0].attention.self.value
    shifted = _Shifted(value.in_features, value.out_features)
    shifted.load_state_dict(value.state_dict())
    encoder.encoder.layer[0].attention.self.value = shifted
    padded, packed = _batches(encoder_model)
    assert not lean_encoder.usable(encoder, padded) and not lean_encoder.usable(encoder, packed)
    assert np.abs(encoder_model.encode(TEXTS) - plain).max() > 1e-3  # the shift reached the vectors


def test_other_inputs_and_training_take_the_transformers_forward(encoder_model):
    encoder = encoder_model.model
    padded, packed = _batches(encoder_model)
    additive = dict(padded, attention_mask=(1.0 - padded["attention_mask"][:, None, None, :].float()) * -1e9)
    assert not lean_encoder.usable(encoder, additive)
    assert not lean_encoder.usable(encoder, dict(padded, inputs_embeds=None))
    assert not lean_encoder.usable(encoder, {k: v for k, v in padded.items() if k != "attention_mask"})
    encoder.train()
    try:
        assert not lean_encoder.usable(encoder, packed)
    finally:
        encoder.eval()
    assert not lean_encoder.usable(torch.nn.Linear(2, 2), padded)
    traced: list[bool] = []

    def probe(ids: torch.Tensor) -> torch.Tensor:
        traced.append(lean_encoder.usable(encoder, padded))
        return ids * 2

    torch.jit.trace(probe, torch.ones(2), check_trace=False)
    assert traced == [False]  # the ONNX export traces: it keeps transformers' graph


def test_states_falls_back_to_the_module_forward(encoder_model):
    encoder = encoder_model.model
    padded, _ = _batches(encoder_model)
    with torch.inference_mode():
        expected = encoder(**padded).last_hidden_state
        handle = encoder.register_forward_hook(lambda *_: None)
        try:
            assert not lean_encoder.usable(encoder, padded)
            np.testing.assert_array_equal(lean_encoder.states(encoder, padded), expected)
        finally:
            handle.remove()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("packed", [False, True])
def test_cuda_half_loop_matches_the_transformers_forward(tiny_bert, tiny_xlmr_reranker, packed):
    model = FlagModel(str(tiny_bert), devices="cuda:0", use_fp16=True, packed=packed, pooling_method="mean")
    fast = model.encode(TEXTS, max_length=64)
    handle = model.model.register_forward_hook(lambda *_: None)  # the transformers forward
    try:
        full = model.encode(TEXTS, max_length=64)
    finally:
        handle.remove()
    np.testing.assert_allclose(fast, full, atol=HALF_TOL)
    reranker = FlagReranker(str(tiny_xlmr_reranker), devices="cuda:0", use_fp16=True, packed=packed, max_length=64)
    fast = reranker.compute_score(PAIRS)
    handle = reranker.model.base_model.register_forward_hook(lambda *_: None)
    try:
        full = reranker.compute_score(PAIRS)
    finally:
        handle.remove()
    np.testing.assert_allclose(fast, full, atol=HALF_TOL * 10)  # raw logits, not unit vectors
