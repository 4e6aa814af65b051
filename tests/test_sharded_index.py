"""Check 3 of the distributed-encoding issue: sharded search equals one exact index.

Also: shards read back from an encode folder, ties broken by the lower global row, and IVF
indexes trained on a sample and filled shard by shard.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest

pytest.importorskip("faiss")

from bgekit.errors import InputError
from bgekit.eval.index import DenseIndex
from bgekit.eval.sharded import ShardedIndex, build_ivf_from_shards, merge_top_k


@pytest.fixture(autouse=True)
def one_faiss_thread():
    """faiss's OpenMP threads spin against each other on a busy shared CPU; one is plenty here."""
    import faiss

    before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    yield
    faiss.omp_set_num_threads(before)


def unit_vectors(n: int, dim: int, seed: int) -> np.ndarray:
    vectors = np.random.default_rng(seed).standard_normal((n, dim)).astype(np.float32)
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


def split(vectors: np.ndarray, ids: list[str], sizes: list[int]) -> list[tuple[list[str], np.ndarray]]:
    bounds = np.cumsum([0, *sizes])
    return [(ids[a:b], vectors[a:b]) for a, b in itertools.pairwise(bounds)]


def test_sharded_search_equals_one_flat_index():
    docs, queries = unit_vectors(3000, 64, 0), unit_vectors(50, 64, 1)
    ids = [f"doc{i}" for i in range(len(docs))]
    one = DenseIndex.build(docs, ids)
    sharded = ShardedIndex.build(split(docs, ids, [700, 1000, 1, 1299]))
    assert sharded.ids == ids
    for k in (1, 10, 100):
        expected_scores, expected_rows = one.search(queries, k)
        scores, rows = sharded.search(queries, k)
        np.testing.assert_array_equal(rows, expected_rows)
        np.testing.assert_allclose(scores, expected_scores, rtol=0, atol=1e-6)
    # k beyond the corpus gives every row once
    scores, rows = sharded.search(queries[:2], 5000)
    assert rows.shape == (2, 3000) and sorted(rows[0].tolist()) == list(range(3000))


def test_ties_go_to_the_lower_global_row():
    # small integers: every dot product is exact, so equal vectors give exactly equal scores
    docs = np.repeat(np.random.default_rng(2).integers(-3, 4, (4, 8)).astype(np.float32), 5, axis=0)
    ids = [str(i) for i in range(len(docs))]
    sharded = ShardedIndex.build(split(docs, ids, [3, 7, 4, 6]))
    _, rows = sharded.search(docs[[0, 5, 19]] * 10, 5)
    assert rows.tolist() == [[0, 1, 2, 3, 4], [5, 6, 7, 8, 9], [15, 16, 17, 18, 19]]
    # the merge equals a full sort of the whole score matrix by (score descending, row)
    queries = np.random.default_rng(3).integers(-3, 4, (7, 8)).astype(np.float32)
    full = queries @ docs.T
    expected_rows = np.stack([np.lexsort((np.arange(len(docs)), -row))[:6] for row in full])
    scores, rows = sharded.search(queries, 6)
    np.testing.assert_array_equal(rows, expected_rows)
    np.testing.assert_array_equal(scores, np.take_along_axis(full, expected_rows, axis=1))


def test_merge_keeps_faiss_missing_rows_last():
    scores = [np.array([[0.5, -3.4e38]], dtype=np.float32), np.array([[0.7, 0.1]], dtype=np.float32)]
    rows = [np.array([[1, -1]]), np.array([[0, 1]])]
    merged_scores, merged_rows = merge_top_k(scores, rows, [0, 10], 4)
    assert merged_rows.tolist() == [[10, 1, 11, -1]]
    assert merged_scores[0, :3].tolist() == pytest.approx([0.7, 0.5, 0.1])


def test_save_and_load_round_trip(tmp_path):
    docs, queries = unit_vectors(500, 32, 4), unit_vectors(5, 32, 5)
    ids = [f"d{i}" for i in range(500)]
    sharded = ShardedIndex.build(split(docs, ids, [200, 300]))
    loaded = ShardedIndex.load(sharded.save(tmp_path / "idx"))
    assert loaded.ids == ids and repr(loaded) == "ShardedIndex(2 shards, 500 x 32)"
    for a, b in zip(sharded.search(queries, 7), loaded.search(queries, 7), strict=True):
        np.testing.assert_array_equal(a, b)
    with pytest.raises(InputError, match=r"sharded\.json"):
        ShardedIndex.load(tmp_path)
    # a damaged sharded.json: a JSONDecodeError, AttributeError or KeyError came out of load
    meta = tmp_path / "idx" / "sharded.json"
    for text, message in [
        ("{", r"sharded\.json is not valid JSON"),
        ("[]", r"sharded\.json is not a sharded bgekit index description"),
        ('{"format": "bgekit-sharded-index/1"}', r"must list its shard folders under 'shards'"),
    ]:
        meta.write_text(text)
        with pytest.raises(InputError, match=message):
            ShardedIndex.load(tmp_path / "idx")


def test_bad_shards_are_refused():
    with pytest.raises(InputError, match="unique"):
        ShardedIndex.build([(["a", "b"], unit_vectors(2, 8, 0)), (["b"], unit_vectors(1, 8, 1))])
    with pytest.raises(InputError, match="dimensions"):
        ShardedIndex.build([(["a"], unit_vectors(1, 8, 0)), (["b"], unit_vectors(1, 16, 1))])
    with pytest.raises(InputError, match="non-empty"):
        ShardedIndex.build([])
    with pytest.raises(InputError, match="codec"):
        build_ivf_from_shards([(["a"], unit_vectors(1, 8, 0))], nlist=1, codec="opq")


def clustered(n: int, dim: int, seed: int) -> np.ndarray:
    """Vectors near an 8-dimensional subspace, like real embeddings (random noise has no neighbours)."""
    rng = np.random.default_rng(seed)
    vectors = rng.standard_normal((n, 8)) @ rng.standard_normal((8, dim)) + 0.1 * rng.standard_normal((n, dim))
    return (vectors / np.linalg.norm(vectors, axis=1, keepdims=True)).astype(np.float32)


@pytest.mark.parametrize(("codec", "min_recall"), [("sq8", 0.95), ("pq", 0.6), ("flat", 0.99)])
def test_ivf_from_shards_finds_the_exact_neighbours(tmp_path, codec, min_recall):
    data = clustered(4200, 64, 6)
    docs, queries = data[:4000], data[4000:]
    ids = [f"doc{i}" for i in range(4000)]
    index = build_ivf_from_shards(
        split(docs, ids, [1000] * 4), nlist=16, codec=codec, pq_m=16, pq_bits=6, train_size=3000, nprobe=16
    )
    assert len(index) == 4000 and index.ids == ids and index.kind == "ivf"
    _, exact = DenseIndex.build(docs, ids).search(queries, 10)
    _, found = index.search(queries, 10)
    recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(exact.tolist(), found.tolist(), strict=True)])
    assert recall >= min_recall, recall
    loaded = DenseIndex.load(index.save(tmp_path / codec))
    np.testing.assert_array_equal(loaded.search(queries, 10)[1], found)


def test_shards_from_an_encode_folder(tmp_path, tiny_bert):
    """Parquet shards written by encode_dataset load into both index kinds, ids in input order."""
    pytest.importorskip("pyarrow")
    import json

    from bgekit.distributed import encode_dataset, read_embeddings

    corpus = tmp_path / "docs.jsonl"
    corpus.write_text(
        "".join(json.dumps({"_id": f"x{i}", "text": f"document number {i} " * (i % 7 + 1)}) + "\n" for i in range(250))
    )
    encode_dataset(str(tiny_bert), corpus, tmp_path / "emb", use_ray=False, shard_size=60)
    ids, vectors = read_embeddings(tmp_path / "emb")
    assert ids == [f"x{i}" for i in range(250)]
    sharded = ShardedIndex.build(tmp_path / "emb")
    assert len(sharded.shards) == 5 and sharded.ids == ids
    queries = vectors[:20]
    expected = DenseIndex.build(vectors, ids).search(queries, 10)
    assert_same_top_k(sharded.search(queries, 10), expected, queries @ vectors.T)
    ivf = build_ivf_from_shards(tmp_path / "emb", nlist=4, codec="flat", nprobe=4)
    assert_same_top_k(ivf.search(queries, 10), expected, queries @ vectors.T)


def assert_same_top_k(found, expected, full_scores: np.ndarray, atol: float = 1e-5) -> None:
    """Same scores, and the same rows except where two documents' true scores differ by float
    rounding only (the random tiny model makes near-identical vectors, and BLAS blocks differ
    with the number of rows, so such near-ties may come out in either order)."""
    np.testing.assert_allclose(found[0], expected[0], rtol=0, atol=atol)
    for q, (a_row, b_row) in enumerate(zip(found[1], expected[1], strict=True)):
        for a, b in zip(a_row, b_row, strict=True):
            assert a == b or abs(full_scores[q, a] - full_scores[q, b]) <= atol, (q, a, b)
