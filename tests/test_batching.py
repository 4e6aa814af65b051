"""Check 3: batching edge cases on tiny BERT and XLM-R models; results do not depend on batch size."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from bgekit import FlagModel, FlagReranker
from bgekit.runtime.batching import length_sorted_batches, run_with_oom_backoff

TEXTS = [
    "short",
    "a somewhat longer sentence about dense retrieval and vector search",
    "Zürich café naïve résumé",
    "北京今天的天气怎么样？",
    "emoji 🍕🔥 and symbols ±∞",
    "short",  # duplicate
    " ".join(["long"] * 400),  # longer than any max_length used here
    "",
    "another short one",
    "a somewhat longer sentence about dense retrieval and vector search",  # duplicate
]


@pytest.fixture(scope="module", params=["bert", "xlmr"])
def embedder(request, tiny_bert, tiny_xlmr):
    folder = tiny_bert if request.param == "bert" else tiny_xlmr
    return FlagModel(str(folder), devices="cpu", use_fp16=False, pooling_method="mean", passage_max_length=64)


@pytest.mark.parametrize("batch_size", [1, 3, 4, 256])
def test_results_independent_of_batch_size(embedder, batch_size):
    reference = embedder.encode(TEXTS, batch_size=len(TEXTS))
    got = embedder.encode(TEXTS, batch_size=batch_size)
    assert got.shape == reference.shape == (len(TEXTS), 32)
    np.testing.assert_allclose(got, reference, atol=1e-5, rtol=0)


def test_order_duplicates_and_single(embedder):
    many = embedder.encode(TEXTS, batch_size=2)
    # not bit-equal: a CPU GEMM may round two equal rows of one batch differently (3e-8 on an AMD EPYC)
    np.testing.assert_allclose(many[0], many[5], atol=1e-6, rtol=0)
    np.testing.assert_allclose(many[1], many[9], atol=1e-6)
    for index in (0, 3, 6):
        single = embedder.encode(TEXTS[index])
        assert single.shape == (32,)
        np.testing.assert_allclose(single, many[index], atol=1e-5)
    assert not np.allclose(many[0], many[1])


def test_long_inputs_truncate_at_max_length(embedder, caplog):
    long_text = TEXTS[6]
    ids = embedder.tokenizer.encode([long_text], 16).ids[0]
    assert len(ids) == 16
    with caplog.at_level("INFO", logger="bgekit"):
        cut = embedder.encode([long_text], max_length=16)
    assert "truncated" in caplog.text
    same_prefix = embedder.encode([" ".join(["long"] * 200)], max_length=16)
    np.testing.assert_allclose(cut, same_prefix, atol=1e-6)


def test_max_length_beyond_model_positions_is_clamped(tiny_xlmr):
    model = FlagModel(str(tiny_xlmr), devices="cpu", use_fp16=False, passage_max_length=4096)
    vector = model.encode(" ".join(["word"] * 500))
    assert np.isfinite(vector).all()


def test_mpnet_positions_start_after_padding_too(tmp_path, golden_dir):
    """all-mpnet-base-v2 numbers positions from pad + 1, as RoBERTa: 514 slots, 512 tokens."""
    import shutil

    from transformers import MPNetConfig, MPNetModel

    config = MPNetConfig(
        vocab_size=30527,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=34,
        pad_token_id=1,
    )
    MPNetModel(config).save_pretrained(str(tmp_path / "mpnet"))
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt"):
        shutil.copy(golden_dir / "models" / "bert-cls" / name, tmp_path / "mpnet" / name)
    model = FlagModel(str(tmp_path / "mpnet"), devices="cpu", pooling_method="mean")
    assert model.host.max_positions == 32
    vector = model.encode(" ".join(["word"] * 100), max_length=100)  # was an IndexError in the embeddings
    np.testing.assert_allclose(vector, model.encode(" ".join(["word"] * 100), max_length=32), atol=1e-6)


def test_multi_device_pool_matches_single(tiny_bert):
    single = FlagModel(str(tiny_bert), devices="cpu", use_fp16=False)
    pooled = FlagModel(str(tiny_bert), devices=["cpu", "cpu"], use_fp16=False)
    try:
        np.testing.assert_allclose(pooled.encode(TEXTS, batch_size=2), single.encode(TEXTS, batch_size=2), atol=1e-6)
    finally:
        pooled.close()


@pytest.mark.parametrize("folder_fixture", ["tiny_bert_reranker", "tiny_xlmr_reranker"])
def test_reranker_batch_size_and_single_pair(request, folder_fixture):
    reranker = FlagReranker(str(request.getfixturevalue(folder_fixture)), devices="cpu", max_length=64)
    pairs = [(TEXTS[i], TEXTS[-1 - i]) for i in range(len(TEXTS))]
    reference = reranker.compute_score(pairs, batch_size=len(pairs))
    for batch_size in (1, 3):
        np.testing.assert_allclose(reranker.compute_score(pairs, batch_size=batch_size), reference, atol=1e-5)
    one = reranker.compute_score(pairs[2])
    assert isinstance(one, list) and len(one) == 1
    assert one[0] == pytest.approx(reference[2], abs=1e-5)
    probs = reranker.compute_score(pairs, normalize=True)
    assert all(0 < p < 1 for p in probs)


def test_bert_cross_encoder_uses_segment_ids(tiny_bert_reranker):
    reranker = FlagReranker(str(tiny_bert_reranker), devices="cpu")
    tokenized = reranker.tokenizer.encode_pairs(["query words"], ["passage words here"], 16, 32)
    assert tokenized.type_ids is not None and set(tokenized.type_ids[0]) == {0, 1}


def test_length_sorted_batches_token_budget():
    order, batches = length_sorted_batches([5, 50, 7, 50, 1], batch_size=4, max_tokens=100)
    assert list(order) == [1, 3, 2, 0, 4]
    assert [list(b) for b in batches] == [[1, 3], [2, 0, 4]]


def test_oom_backoff_splits_and_has_a_floor():
    calls = []

    def forward(rows):
        calls.append(len(rows))
        if len(rows) > 2:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return torch.as_tensor(rows, dtype=torch.float32)

    out = run_with_oom_backoff(forward, np.arange(7))
    assert out.tolist() == list(range(7))
    assert max(c for c in calls if c <= 2) == 2

    def always_oom(rows):
        raise torch.OutOfMemoryError("CUDA out of memory (simulated)")

    from bgekit import DeviceOutOfMemoryError

    with pytest.raises(DeviceOutOfMemoryError, match="even with a batch of 1"):
        run_with_oom_backoff(always_oom, np.arange(4))

    def other_error(rows):
        raise RuntimeError("shape mismatch")

    with pytest.raises(RuntimeError, match="shape mismatch"):
        run_with_oom_backoff(other_error, np.arange(4))


def test_multi_device_pool_exits_cleanly(tiny_bert):
    """A pool left open at interpreter exit must not print errors (FlagEmbedding's does)."""
    import subprocess
    import sys

    code = (
        "from bgekit import FlagModel\n"
        f"m = FlagModel({str(tiny_bert)!r}, devices=['cpu', 'cpu'], use_fp16=False)\n"
        "print(m.encode(['a', 'b', 'c', 'd'], batch_size=1).shape)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "(4, 32)"
    assert "Error" not in result.stderr and "Traceback" not in result.stderr


def test_overlap_chunks_start_small_and_cover_every_item_once():
    from bgekit.runtime.batching import overlap_chunks

    assert [len(c) for c in overlap_chunks(4000, 1024)] == [256, 512, 1024, 1024, 1024, 160]
    assert overlap_chunks(1024, 1024) == [range(1024)]  # one chunk: exactly run() on the whole input
    assert overlap_chunks(0, 16) == [range(0)]
    assert [len(c) for c in overlap_chunks(1000, 256, ramp=False)] == [256, 256, 256, 232]
    for count, size in ((41, 1), (41, 3), (41, 16), (5, 4), (17, 2)):
        for ramp in (True, False):
            chunks = overlap_chunks(count, size, ramp)
            assert [i for c in chunks for i in c] == list(range(count))
            assert all(len(c) >= 1 for c in chunks) and max(map(len, chunks)) <= size


def test_models_pickle_and_deepcopy(tiny_bert, tiny_xlmr_reranker):
    """multiprocessing, joblib and Ray pickle what they are given; copy.deepcopy copies a model."""
    import copy
    import pickle

    model = FlagModel(str(tiny_bert), devices=["cpu", "cpu"], use_fp16=False)
    expected = model.encode(TEXTS, batch_size=2)
    for clone in (pickle.loads(pickle.dumps(model)), copy.deepcopy(model)):
        np.testing.assert_allclose(clone.encode(TEXTS, batch_size=2), expected, atol=1e-6)
        clone.close()
    model.close()
    reranker = FlagReranker(str(tiny_xlmr_reranker), devices="cpu")
    pairs = [("what is a panda?", "A bear."), ("bamboo", "A grass.")]
    np.testing.assert_allclose(
        pickle.loads(pickle.dumps(reranker)).compute_score(pairs), reranker.compute_score(pairs), atol=1e-6
    )
