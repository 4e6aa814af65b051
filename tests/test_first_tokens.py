"""The last layer on the first rows only (``cls_rows_only``) gives the full forward's results.

Each test runs the same model both ways and also counts the rows the last layer's feed-forward
took, so a path that silently fell back to the full layer fails here instead of passing as equal.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from bgekit import BGEM3FlagModel, FlagModel, FlagReranker
from bgekit.runtime import first_tokens

TOL = 1e-5  # float32, the same math on fewer rows (observed ~1e-6)
HALF_TOL = 5e-3  # the documented fp16 tolerance (benchmarks/RESULTS.md)

TEXTS = [
    "one",
    "a longer sentence about retrieval, embeddings and rerankers " * 40,  # beyond max_length
    "short text",
    "the quick brown fox jumps over the lazy dog",
    "embedding models map text to vectors",
    "x",
]
PAIRS = [
    ("what is bge?", "BGE is an embedding model from BAAI."),
    ("capital of france", "Paris is the capital and largest city of France. " * 30),
    ("q", "p"),
    ("long question " * 20, "short passage"),
]


class FeedForwardRows:
    """Counts the rows each forward's last-layer feed-forward receives."""

    def __init__(self, encoder: torch.nn.Module):
        self.rows: list[int] = []
        dense = encoder.encoder.layer[-1].intermediate.dense
        self.handle = dense.register_forward_hook(lambda _m, args, _out: self.rows.append(args[0][..., 0].numel()))

    def close(self) -> None:
        self.handle.remove()


def _both_ways(model, run, encoder=None):
    """``run()`` with the last layer on the first rows, then on every row: (fast, full, rows fed)."""
    counter = FeedForwardRows(encoder or getattr(model.model, "base_model", model.model))
    try:
        fast = run()
        fast_rows = sum(counter.rows)
        counter.rows.clear()
        model.cls_rows_only = False
        full = run()
        full_rows = sum(counter.rows)
    finally:
        counter.close()
        model.cls_rows_only = True
    return fast, full, fast_rows, full_rows


@pytest.mark.parametrize("fixture", ["tiny_bert", "tiny_xlmr"])
@pytest.mark.parametrize("packed", [False, True])
def test_embedder_first_rows_match_the_full_last_layer(request, fixture, packed):
    model = FlagModel(str(request.getfixturevalue(fixture)), devices="cpu", packed=packed, batch_size=4)
    fast, full, fast_rows, full_rows = _both_ways(model, lambda: model.encode(TEXTS, max_length=64))
    np.testing.assert_allclose(fast, full, atol=TOL)
    assert fast_rows == len(TEXTS)  # one row per text reached the feed-forward
    assert full_rows > 4 * len(TEXTS)


@pytest.mark.parametrize("fixture", ["tiny_bert_reranker", "tiny_xlmr_reranker"])
@pytest.mark.parametrize("packed", [False, True])
def test_reranker_first_rows_match_the_full_last_layer(request, fixture, packed):
    model = FlagReranker(str(request.getfixturevalue(fixture)), devices="cpu", packed=packed, max_length=64)
    fast, full, fast_rows, full_rows = _both_ways(model, lambda: model.compute_score(PAIRS))
    np.testing.assert_allclose(fast, full, atol=TOL)
    assert fast_rows == len(PAIRS)
    assert full_rows > 4 * len(PAIRS)


@pytest.mark.parametrize("packed", [False, True])
def test_m3_dense_alone_uses_first_rows_and_other_outputs_every_row(golden_dir, packed):
    model = BGEM3FlagModel(str(golden_dir / "models" / "xlmr-m3"), devices="cpu", packed=packed, batch_size=4)
    encoder = model.model.encoder
    fast, full, fast_rows, full_rows = _both_ways(model, lambda: model.encode(TEXTS)["dense_vecs"], encoder)
    np.testing.assert_allclose(fast, full, atol=TOL)
    assert fast_rows == len(TEXTS) and full_rows > 4 * len(TEXTS)
    both, _, both_rows, _ = _both_ways(model, lambda: model.encode(TEXTS, return_sparse=True)["dense_vecs"], encoder)
    np.testing.assert_allclose(both, full, atol=TOL)
    assert both_rows == full_rows  # the lexical weights need every token's last state


def test_minilm_with_cls_pooling_matches_the_full_last_layer(minilm_dir):
    model = FlagModel(str(minilm_dir), devices="cpu", pooling_method="cls", batch_size=4)
    fast, full, fast_rows, _ = _both_ways(model, lambda: model.encode(TEXTS))
    np.testing.assert_allclose(fast, full, atol=TOL)
    assert fast_rows == len(TEXTS)


def test_mean_pooling_keeps_the_full_last_layer(tiny_bert):
    model = FlagModel(str(tiny_bert), devices="cpu", pooling_method="mean")
    counter = FeedForwardRows(model.model)
    try:
        model.encode(TEXTS[:3], max_length=64)
    finally:
        counter.close()
    assert sum(counter.rows) > 3 * 3  # every token of the padded batch, not one row per text


def test_trunk_shares_the_model_parameters(tiny_bert):
    model = FlagModel(str(tiny_bert), devices="cpu")
    encoder = model.model
    model.encode(TEXTS[:2])
    trunk = first_tokens._trunk(encoder)
    assert len(trunk.encoder.layer) == len(encoder.encoder.layer) - 1
    assert trunk.pooler is None and encoder.pooler is not None  # the model itself is untouched
    shared = {id(p) for p in encoder.parameters()}
    assert all(id(p) in shared for p in trunk.parameters())


def test_supports_only_encoders_it_can_run(tiny_bert):
    model = FlagModel(str(tiny_bert), devices="cpu")
    encoder = model.model
    assert first_tokens.supports(encoder)
    encoder.train()
    try:
        assert not first_tokens.supports(encoder)  # dropout would differ: the full forward runs
    finally:
        encoder.eval()
    for watched in (encoder, encoder.encoder.layer[-1]):
        handle = watched.register_forward_hook(lambda *_: None)
        try:
            assert not first_tokens.supports(encoder)  # the hook would see the trunk's states, or not fire
        finally:
            handle.remove()
    encoder.forward = encoder.forward  # as torch.compile'd or graphed forwards are installed
    try:
        assert not first_tokens.supports(encoder)
    finally:
        del encoder.forward
    assert first_tokens.supports(encoder)
    assert not first_tokens.supports(torch.nn.Linear(2, 2))
    assert not first_tokens.supports(None)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("packed", [False, True])
def test_cuda_half_first_rows_match_the_full_last_layer(tiny_bert, tiny_xlmr_reranker, golden_dir, packed):
    embedder = FlagModel(str(tiny_bert), devices="cuda:0", use_fp16=True, packed=packed)
    fast, full, fast_rows, _ = _both_ways(embedder, lambda: embedder.encode(TEXTS, max_length=64))
    np.testing.assert_allclose(fast, full, atol=HALF_TOL)
    assert fast_rows == len(TEXTS)
    reranker = FlagReranker(str(tiny_xlmr_reranker), devices="cuda:0", use_fp16=True, packed=packed, max_length=64)
    fast, full, fast_rows, _ = _both_ways(reranker, lambda: reranker.compute_score(PAIRS))
    np.testing.assert_allclose(fast, full, atol=HALF_TOL * 10)  # raw logits, not unit vectors
    assert fast_rows == len(PAIRS)
    m3 = BGEM3FlagModel(str(golden_dir / "models" / "xlmr-m3"), devices="cuda:0", use_fp16=True, packed=packed)
    fast, full, fast_rows, _ = _both_ways(m3, lambda: m3.encode(TEXTS)["dense_vecs"], m3.model.encoder)
    np.testing.assert_allclose(fast, full, atol=HALF_TOL)
    assert fast_rows == len(TEXTS)
