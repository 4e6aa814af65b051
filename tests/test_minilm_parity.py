"""Check 2: bgekit's all-MiniLM-L6-v2 embeddings equal sentence-transformers' (max abs 1e-5)."""

from __future__ import annotations

import numpy as np
import pytest

from bgekit import Embedder

from .conftest import require_shared

N_SENTENCES = 300


@pytest.fixture(scope="module")
def sts_sentences() -> list[str]:
    path = require_shared("data", "stsbenchmark", "test.tsv")
    lines = path.read_text(encoding="utf-8").splitlines()[1:]
    sentences = []
    for line in lines:
        first, second, _ = line.split("\t")
        sentences += [first, second]
    return sentences[:N_SENTENCES]


def test_minilm_matches_sentence_transformers(minilm_dir, sts_sentences):
    st = pytest.importorskip("sentence_transformers")
    reference = st.SentenceTransformer(str(minilm_dir), device="cpu").encode(
        sts_sentences, batch_size=32, convert_to_numpy=True
    )
    model = Embedder.from_pretrained(str(minilm_dir), devices="cpu")
    assert model.pooling_method == "mean" and model.passage_max_length == 256
    got = model.encode_corpus(sts_sentences, batch_size=32)
    assert got.shape == reference.shape == (N_SENTENCES, 384)
    assert np.abs(got - reference).max() < 1e-5


def test_minilm_by_hub_id_resolves_to_the_packaged_copy(minilm_dir):
    model = Embedder.from_pretrained("sentence-transformers/all-MiniLM-L6-v2", devices="cpu")
    np.testing.assert_allclose(
        model.encode("hello"), Embedder.from_pretrained(str(minilm_dir)).encode("hello"), atol=1e-6
    )
