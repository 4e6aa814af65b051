"""Check 2: bgekit's all-MiniLM-L6-v2 embeddings equal sentence-transformers' (max abs 1e-5)."""

from __future__ import annotations

import json
import shutil

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


CASED = ["The Giant PANDA lives in China.", "ÉCOLE Normale in PARIS", "plain lower text", "Ünïcödé ǅ İstanbul"]


@pytest.mark.parametrize("name", ["xlmr-m3", "bert-cls"])  # a cased SentencePiece and an uncased WordPiece
def test_do_lower_case_lowercases_as_sentence_transformers(tmp_path, golden_dir, name):
    """``do_lower_case`` in sentence_bert_config.json: sentence-transformers' Transformer module runs
    ``str.lower()`` on every text before its tokenizer; bgekit read only the pooling and max length, so a
    cased tokenizer saw other ids."""
    source = golden_dir / "models" / name
    folder = tmp_path / name
    shutil.copytree(source, folder, ignore=shutil.ignore_patterns("*.pt"))  # a plain encoder, no M3 heads
    (folder / "1_Pooling").mkdir()
    (folder / "1_Pooling" / "config.json").write_text(json.dumps({"pooling_mode_mean_tokens": True}))
    (folder / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": 64, "do_lower_case": True}))
    options = {"devices": "cpu", "normalize_embeddings": False}
    plain = Embedder.from_pretrained(
        str(source), model_class="encoder-only-base", pooling_method="mean", passage_max_length=64, **options
    )
    got = Embedder.from_pretrained(str(folder), **options).encode(CASED)
    np.testing.assert_allclose(got, plain.encode([text.lower() for text in CASED]), atol=1e-6)
    if name == "xlmr-m3":
        assert not np.allclose(got, plain.encode(CASED), atol=1e-3)  # case matters to this tokenizer


def test_a_pooling_that_leaves_out_the_prompt_is_refused(tmp_path, minilm_dir):
    """``include_prompt: false`` pools without the prompt's tokens, which bgekit's pooling does not do."""
    from bgekit import UnknownModelError

    st = pytest.importorskip("sentence_transformers")
    from sentence_transformers import models

    base = st.SentenceTransformer(str(minilm_dir), device="cpu")
    pooling = models.Pooling(384, pooling_mode="mean", include_prompt=False)
    st.SentenceTransformer(modules=[base[0], pooling], device="cpu").save(str(tmp_path / "no-prompt"))
    with pytest.raises(UnknownModelError, match=r"does not run \(Pooling \(include_prompt=false\)\)"):
        Embedder.from_pretrained(str(tmp_path / "no-prompt"))
