"""NaN and infinity out of a model (fp16 overflow on a long input is the real-world case): the library
returns them as they are, as FlagEmbedding does, and logs one warning naming how many inputs gave them.

The models are tiny real checkpoints whose input embedding of one word is infinity
(:func:`tests.tiny_models.poison_token`): texts holding the word give NaN, others the usual values.
"""

from __future__ import annotations

import logging

import numpy as np
import pytest

from bgekit import BGEM3FlagModel, Embedder, Reranker
from bgekit.models.scoring import non_finite_rows

from .tiny_models import poison_token

GOOD = "the panda eats bamboo"


@pytest.fixture(scope="module")
def embedder(tmp_path_factory, tiny_bert):
    return Embedder.from_pretrained(str(poison_token(tmp_path_factory.mktemp("nan") / "emb", tiny_bert, "poison")))


@pytest.fixture(scope="module")
def reranker(tmp_path_factory, tiny_bert_reranker):
    folder = poison_token(tmp_path_factory.mktemp("nan") / "rr", tiny_bert_reranker, "poison")
    return Reranker.from_pretrained(str(folder))


@pytest.fixture(scope="module")
def m3(tmp_path_factory, golden_dir):
    folder = poison_token(tmp_path_factory.mktemp("nan") / "m3", golden_dir / "models" / "xlmr-m3", "kk")
    return BGEM3FlagModel(str(folder))


def warnings_of(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and "NaN or infinite" in r.message]


def test_non_finite_rows():
    assert non_finite_rows(np.array([[1.0, 2.0], [np.nan, 0.0], [0.0, -np.inf]], dtype=np.float32)) == [1, 2]
    # finite values whose sum overflows are finite
    assert non_finite_rows(np.array([[3e38, 3e38]], dtype=np.float32)) == []
    assert non_finite_rows([0.5, float("inf"), -1.0]) == [1]
    assert non_finite_rows(np.zeros((0, 4))) == []


def test_encode_warns_and_returns_the_values(embedder, caplog):
    with caplog.at_level(logging.WARNING, logger="bgekit"):
        vectors = embedder.encode([GOOD, "poison apple", GOOD, "more poison"])
    assert np.isnan(vectors[[1, 3]]).all() and np.isfinite(vectors[[0, 2]]).all()  # nothing raised or changed
    (message,) = warnings_of(caplog)
    assert "2 of 4 inputs (positions [1, 3])" in message and "float32" in message
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="bgekit"):
        assert np.isnan(embedder.encode_queries("poison")).all()  # a single text: one (dim,) vector
        embedder.encode([GOOD, "apple"])
    (message,) = warnings_of(caplog)
    assert "1 of 1 inputs (positions [0])" in message


def test_compute_score_warns(reranker, caplog):
    with caplog.at_level(logging.WARNING, logger="bgekit"):
        scores = reranker.compute_score([("q", GOOD), ("q", "poison"), ("q", "apple")], normalize=True)
    assert np.isnan(scores[1]) and np.isfinite([scores[0], scores[2]]).all()
    (message,) = warnings_of(caplog)
    assert "1 of 3 pairs (positions [1])" in message


def test_m3_encode_warns_for_sparse_weights_too(m3, caplog):
    with caplog.at_level(logging.WARNING, logger="bgekit"):
        out = m3.encode([GOOD, "kk kk"], return_dense=False, return_sparse=True)
    assert out["lexical_weights"][0]  # NaN weights are dropped as weights <= 0 (FlagEmbedding's rule): not seen
    (message,) = warnings_of(caplog)
    assert "1 of 2 inputs (positions [1])" in message
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="bgekit"):
        m3.encode([GOOD], return_dense=True, return_sparse=True, return_colbert_vecs=True)
    assert warnings_of(caplog) == []
