"""Vector indexes on real faiss and scipy: exact search equals brute force, approximate kinds find
nearly the same neighbours, indexes survive a save / load, sparse search equals M3's lexical score,
and fusion follows its definition."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from bgekit.errors import InputError
from bgekit.eval.index import DenseIndex, SparseIndex, fuse_runs, gpu_count, to_run, top_k
from bgekit.models.m3 import lexical_score


@pytest.fixture(scope="module")
def vectors():
    rng = np.random.default_rng(0)
    docs = rng.normal(size=(600, 64)).astype(np.float32)
    docs /= np.linalg.norm(docs, axis=1, keepdims=True)
    queries = docs[:40] + 0.05 * rng.normal(size=(40, 64)).astype(np.float32)
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    return docs, queries


def brute_force(docs, queries, k):
    scores = queries @ docs.T
    return top_k(scores, k)


def test_flat_index_is_exact(vectors):
    docs, queries = vectors
    index = DenseIndex.build(docs, [f"d{i}" for i in range(len(docs))])
    scores, rows = index.search(queries, 10)
    want_scores, want_rows = brute_force(docs, queries, 10)
    np.testing.assert_array_equal(rows, want_rows)
    np.testing.assert_allclose(scores, want_scores, atol=1e-5)
    run = to_run([f"q{i}" for i in range(len(queries))], scores, rows, index.ids)
    assert next(iter(run["q0"])) == "d0" and len(run["q0"]) == 10


def test_top_k_breaks_ties_by_lower_index():
    scores, rows = top_k(np.array([[0.5, 0.9, 0.5, 0.5]], dtype=np.float32), 3)
    assert rows.tolist() == [[1, 0, 2]] and scores[0].tolist() == pytest.approx([0.9, 0.5, 0.5])


@pytest.mark.parametrize("quantization", [None, "int8"])
def test_flat_index_ties_come_lowest_row_first(quantization):
    """Duplicate documents tie exactly; faiss's flat search returned them highest row first. Small
    integers keep every dot product exact; 40 queries take faiss's blocked (BLAS) path."""
    rng = np.random.default_rng(4)
    docs = np.repeat(rng.integers(-3, 4, (6, 8)).astype(np.float32), 7, axis=0)[rng.permutation(42)]
    index = DenseIndex.build(docs, [str(i) for i in range(len(docs))], quantization=quantization)
    queries = rng.integers(-3, 4, (40, 8)).astype(np.float32)
    full = queries @ docs.T
    for k in (1, 3, 7, 10, 42):  # cuts inside and at the end of a run of ties
        expected = np.stack([np.lexsort((np.arange(len(docs)), -row))[:k] for row in full])
        scores, rows = index.search(queries, k)
        if quantization is None:
            np.testing.assert_array_equal(rows, expected)
        else:  # int8 codes change the scores, not their ties: each run of equal scores is in row order
            for score_row, row in zip(scores, rows, strict=True):
                for value in np.unique(score_row):
                    tied = row[score_row == value]
                    assert tied.tolist() == sorted(tied.tolist())
    # a query tied with the whole corpus (a zero vector) is not chased past a bounded depth, still ordered
    scores, rows = index.search(np.zeros((1, 8), dtype=np.float32), 5)
    assert scores.tolist() == [[0.0] * 5] and rows[0].tolist() == sorted(rows[0].tolist())


def test_top_k_ties_at_the_cut_keep_the_lowest_indices():
    """Sparse scores tie a lot (every unmatched document scores 0): the rows kept at the k-th score
    must be the lowest-indexed ones, as a stable full sort would keep them."""
    rng = np.random.default_rng(0)
    scores = rng.integers(0, 4, size=(50, 300)).astype(np.float32)  # heavy ties everywhere
    for k in (1, 7, 64, 299, 300, 500):
        got_scores, got = top_k(scores, k)
        want = np.argsort(-scores, axis=1, kind="stable")[:, : min(k, 300)]
        np.testing.assert_array_equal(got, want)
        np.testing.assert_array_equal(got_scores, np.take_along_axis(scores, want, axis=1))


@pytest.mark.parametrize(
    ("kind", "quantization", "min_recall"),
    [("ivf", None, 0.6), ("hnsw", None, 0.9), ("flat", "int8", 0.95), ("ivf", "int8", 0.6), ("hnsw", "int8", 0.85)],
)
def test_approximate_indexes_find_most_true_neighbours(vectors, kind, quantization, min_recall):
    docs, queries = vectors
    index = DenseIndex.build(docs, kind=kind, quantization=quantization, nprobe=8)
    _, rows = index.search(queries, 10)
    _, exact = brute_force(docs, queries, 10)
    recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(rows.tolist(), exact.tolist(), strict=True)])
    assert recall >= min_recall, recall
    assert (rows[:, 0] == np.arange(len(queries))).mean() > 0.9  # each query's source document comes first


def test_binary_index_scores_are_sign_agreement(vectors):
    docs, queries = vectors
    index = DenseIndex.build(docs, quantization="binary")
    scores, rows = index.search(queries, 5)
    signs_d, signs_q = docs > 0, queries > 0
    agreement = (signs_q[:, None, :] == signs_d[None, :, :]).mean(axis=2)
    expected = 2 * agreement - 1
    for q in range(len(queries)):
        np.testing.assert_allclose(scores[q], expected[q, rows[q]], atol=1e-6)
        assert scores[q, 0] == pytest.approx(expected[q].max(), abs=1e-6)
    with pytest.raises(InputError, match="multiple of 8"):
        DenseIndex.build(docs[:, :60], quantization="binary")


@pytest.mark.parametrize(
    ("kind", "quantization"), [("flat", None), ("ivf", "int8"), ("hnsw", None), ("flat", "binary")]
)
def test_save_and_load_give_the_same_results(tmp_path, vectors, kind, quantization):
    docs, queries = vectors
    ids = [f"doc-{i}" for i in range(len(docs))]
    index = DenseIndex.build(docs, ids, kind=kind, quantization=quantization)
    before = index.search(queries, 7)
    index.save(tmp_path / "idx", extra={"model": "some/model"})
    loaded = DenseIndex.load(tmp_path / "idx")
    after = loaded.search(queries, 7)
    np.testing.assert_array_equal(before[1], after[1])
    np.testing.assert_allclose(before[0], after[0])
    assert loaded.ids == ids and loaded.meta["model"] == "some/model"
    assert json.loads((tmp_path / "idx" / "index.json").read_text())["count"] == len(docs)
    assert not list((tmp_path / "idx").glob(".*tmp*"))


@pytest.mark.parametrize("quantization", [None, "binary"])  # (int8 codes depend on the vectors it was trained on)
def test_add_appends_as_one_build(tmp_path, vectors, quantization):
    """Vectors added to a flat index search as if built at once; ids continue (default) or are checked new."""
    docs, queries = vectors
    whole = DenseIndex.build(docs, quantization=quantization)
    grown = DenseIndex.build(docs[:400], quantization=quantization).add(docs[400:])
    assert grown.ids == whole.ids and grown.index.ntotal == len(docs)
    np.testing.assert_array_equal(grown.search(queries, 7)[1], whole.search(queries, 7)[1])
    with pytest.raises(InputError, match="document id '3' is already in the index"):
        grown.add(docs[:2], ids=["new", "3"])
    with pytest.raises(InputError, match="the vectors have dimension 60, the index 64"):
        grown.add(docs[:2, :60])
    assert len(grown) == grown.index.ntotal == len(docs)  # a refused add adds nothing
    loaded = DenseIndex.load(grown.save(tmp_path / "idx"))
    assert loaded.ids == whole.ids and loaded.index.ntotal == len(docs)


def test_index_errors(tmp_path, vectors):
    docs, queries = vectors
    with pytest.raises(InputError, match="index kind must be one of"):
        DenseIndex.build(docs, kind="lsh")
    with pytest.raises(InputError, match="got 2 ids for 600 vectors"):
        DenseIndex.build(docs, ["a", "b"])
    with pytest.raises(InputError, match="ids must be unique"):
        DenseIndex.build(docs[:2], ["a", "a"])
    index = DenseIndex.build(docs)
    with pytest.raises(InputError, match="dimension 32, the index 64"):
        index.search(queries[:, :32], 3)
    with pytest.raises(InputError, match="NaN"):
        index.search(np.full((1, 64), np.nan, dtype=np.float32), 3)
    with pytest.raises(InputError, match="does not exist; build one"):
        DenseIndex.load(tmp_path / "none")
    (tmp_path / "corpus.jsonl").write_text("{}\n")  # a file given for the folder was said not to exist
    with pytest.raises(InputError, match=r"corpus\.jsonl is a file, not an index folder"):
        DenseIndex.load(tmp_path / "corpus.jsonl")
    (tmp_path / "half").mkdir()
    with pytest.raises(InputError, match=r"has no index\.json"):
        DenseIndex.load(tmp_path / "half")
    assert index.search(queries[:1], 10_000)[1].shape == (1, 600)  # k beyond the corpus: everything


@pytest.mark.gpu
@pytest.mark.skipif(gpu_count() == 0, reason="faiss sees no GPU (faiss-cpu or no device)")
def test_gpu_index_matches_cpu(vectors):
    docs, queries = vectors
    cpu = DenseIndex.build(docs, use_gpu=False).search(queries, 10)
    gpu_index = DenseIndex.build(docs, use_gpu=True)
    assert gpu_index.on_gpu
    gpu = gpu_index.search(queries, 10)
    np.testing.assert_array_equal(cpu[1], gpu[1])


def random_weights(rng, n, vocab=300, size=12):
    rows = []
    for _ in range(n):
        ids = rng.choice(vocab, size=size, replace=False)
        rows.append({str(i): np.float32(w) for i, w in zip(ids, rng.random(size), strict=True)})
    return rows


def test_sparse_search_equals_m3_lexical_score(tmp_path):
    rng = np.random.default_rng(1)
    docs, queries = random_weights(rng, 80), random_weights(rng, 6)
    queries.append({"999": np.float32(1.0)})  # a token no document has
    index = SparseIndex.build(docs, [f"d{i}" for i in range(80)])
    scores, rows = index.search(queries, 5)
    for q, weights in enumerate(queries):
        expected = np.array([float(lexical_score(weights, d)) for d in docs])
        _, want = top_k(expected[None, :].astype(np.float32), 5)
        np.testing.assert_array_equal(rows[q], want[0])
        np.testing.assert_allclose(scores[q], expected[rows[q]], rtol=1e-5, atol=1e-7)
    assert scores[-1].max() == 0.0
    index.save(tmp_path / "sparse")
    again = SparseIndex.load(tmp_path / "sparse").search(queries, 5)
    np.testing.assert_array_equal(again[1], rows)


def test_sparse_index_takes_m3_csr_matrices():
    from bgekit.models.m3 import lexical_weights_to_csr

    rng = np.random.default_rng(2)
    docs, queries = random_weights(rng, 30), random_weights(rng, 3)
    index = SparseIndex.build(lexical_weights_to_csr(docs, 300))
    from_csr = index.search(lexical_weights_to_csr(queries, 300), 4)
    from_dicts = index.search(queries, 4)
    np.testing.assert_array_equal(from_csr[1], from_dicts[1])
    # columns are token ids: a narrower query matrix is the same tokens, a wider one's extra ids score 0
    narrow = index.search(lexical_weights_to_csr(queries, 300)[:, :200], 4)
    cut = [{k: v for k, v in q.items() if int(k) < 200} for q in queries]
    np.testing.assert_allclose(narrow[0], index.search(cut, 4)[0], rtol=1e-6)
    from_dict_index = SparseIndex.build(docs)  # as wide as its largest token id, not the vocabulary
    vocab_wide = from_dict_index.search(lexical_weights_to_csr(queries, 300), 4)  # was a width error
    np.testing.assert_array_equal(vocab_wide[1], from_dicts[1])
    np.testing.assert_array_equal(from_dict_index.search(queries[0], 4)[1], from_dicts[1][:1])  # one dict
    with pytest.raises(InputError, match="must map token ids to weights, got keys like 'panda'"):
        index.search([{"panda": 0.5}], 4)


def test_fusion():
    dense = {"q": {"a": 0.9, "b": 0.8, "c": 0.1}}
    sparse = {"q": {"c": 10.0, "d": 5.0}}
    weighted = fuse_runs([dense, sparse], [1.0, 0.3])
    # a missing score counts as that list's lowest for the query: dense floor 0.1, sparse floor 5.0
    assert weighted["q"] == pytest.approx({"a": 0.9 + 1.5, "b": 0.8 + 1.5, "c": 0.1 + 3.0, "d": 0.1 + 1.5})
    assert list(weighted["q"]) == ["c", "a", "b", "d"]
    rrf = fuse_runs([dense, sparse], method="rrf", k=2)
    assert rrf["q"] == pytest.approx({"c": 1 / 63 + 1 / 61, "a": 1 / 61})
    with pytest.raises(InputError, match="2 weights for 1 runs"):
        fuse_runs([dense], [1, 2])


def test_m3_sparse_hybrid_and_dense_pipeline(golden_dir):
    """Real (tiny) M3 weights: sparse search equals M3's own lexical score for every pair, hybrid
    fusion adds the two, and the evaluation pipeline takes the M3 model's dense vectors."""
    from pathlib import Path

    from bgekit import BGEM3FlagModel
    from bgekit.eval.datasets import RetrievalDataset, load_retrieval_dataset
    from bgekit.eval.retrieval import evaluate_retrieval

    m3 = BGEM3FlagModel(str(golden_dir / "models" / "xlmr-m3"), use_fp16=False, devices="cpu")
    full = load_retrieval_dataset(Path(__file__).resolve().parents[1] / "examples" / "data" / "scifact-mini")
    ids, texts = full.corpus_ids[:30], full.corpus_texts[:30]
    query_ids = list(full.queries)[:5]
    queries = [full.queries[q] for q in query_ids]
    docs = m3.encode_corpus(texts, return_dense=True, return_sparse=True, max_length=128)
    qs = m3.encode_queries(queries, return_dense=True, return_sparse=True, max_length=64)
    sparse = SparseIndex.build(m3.lexical_weights_to_csr(docs["lexical_weights"]), ids)
    scores, rows = sparse.search(m3.lexical_weights_to_csr(qs["lexical_weights"]), 30)
    for q, weights in enumerate(qs["lexical_weights"]):
        expected = [float(m3.compute_lexical_matching_score(weights, d)) for d in docs["lexical_weights"]]
        np.testing.assert_allclose(scores[q], np.asarray(expected)[rows[q]], rtol=1e-5, atol=1e-6)
    dense = DenseIndex.build(docs["dense_vecs"], ids)
    dense_run = to_run(query_ids, *dense.search(qs["dense_vecs"], 30), ids)
    sparse_run = to_run(query_ids, scores, rows, ids)
    hybrid = fuse_runs([dense_run, sparse_run], [1.0, 0.3])
    doc = ids[0]
    assert hybrid[query_ids[0]][doc] == pytest.approx(
        dense_run[query_ids[0]][doc] + 0.3 * sparse_run[query_ids[0]][doc]
    )
    subset = RetrievalDataset.from_dicts(
        dict(zip(ids, texts, strict=True)),
        dict(zip(query_ids, queries, strict=True)),
        {q: {d: r for d, r in full.qrels[q].items() if d in set(ids)} or {ids[0]: 0} for q in query_ids},
    )
    result = evaluate_retrieval(m3, subset, use_cache=False, k_values=(10,), max_length=128)
    for q in query_ids:
        assert list(result.run[q]) == list(dense_run[q])[:10]


def test_a_damaged_index_folder_is_one_clear_error(tmp_path, vectors):
    """A cut-short index.faiss, an index.json without its fields or not an object, an ids.json that is not a
    list: faiss's C++ assertion, a KeyError or an AttributeError came out as a traceback of `bgekit search`."""
    import shutil

    from .cli import run

    docs, _ = vectors
    DenseIndex.build(docs[:5], [f"d{i}" for i in range(5)]).save(tmp_path / "good", extra={"model": "some/model"})

    def damaged(name: str, file: str, text: str | bytes | None = None, drop: str | None = None) -> Path:
        folder = shutil.copytree(tmp_path / "good", tmp_path / name)
        if drop is not None:
            meta = json.loads((folder / "index.json").read_text())
            del meta[drop]
            text = json.dumps(meta)
        if isinstance(text, bytes):
            (folder / file).write_bytes(text)
        else:
            (folder / file).write_text(text)
        return folder

    cases = {
        damaged("cut", "index.faiss", (tmp_path / "good" / "index.faiss").read_bytes()[:100]): (
            r"index\.faiss cannot be read by faiss: the file is damaged or incomplete"
        ),
        damaged("empty", "index.faiss", b""): r"index\.faiss cannot be read by faiss",
        damaged("nodim", "index.json", drop="dim"): r"index\.json lacks 'dim': rebuild the index",
        damaged("list", "index.json", "[]"): r"index\.json is not a bgekit index description",
        damaged("idsjson", "ids.json", "[1,"): r"ids\.json is not valid JSON",
        damaged("idsdict", "ids.json", '{"a": 1}'): r"ids\.json must hold a JSON list of document ids, got dict",
    }
    for folder, message in cases.items():
        with pytest.raises(InputError, match=message):
            DenseIndex.load(folder)
    result = run("search", "-i", str(tmp_path / "cut"), "-q", "hello", check=False)
    assert result.returncode == 2 and "cannot be read by faiss" in result.stderr and "Traceback" not in result.stderr
