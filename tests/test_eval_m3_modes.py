"""``evaluate_retrieval(m3_modes=...)`` / ``bgekit eval retrieval --m3-modes``: BGE-M3's sparse and hybrid
retrieval on the tiny golden M3 model and a BEIR folder written here (6 documents, 3 queries).

Each mode's run is checked against a brute-force computation from BGEM3FlagModel's own outputs
(dense dot products, ``compute_lexical_matching_score``, ``colbert_score``, the weighted sums), so the
index, the cache and the fusion are what is under test.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from bgekit import BGEM3FlagModel, Embedder, InputError
from bgekit.eval.retrieval import evaluate_retrieval

from .cli import run
from .test_eval_retrieval import ForwardCounter

DOCS = {
    "d1": ("BGE", "BGE is an embedding model for dense retrieval."),
    "d2": ("", "Paris is the capital and largest city of France."),
    "d3": ("Beijing", "北京是中国的首都。"),
    "d4": ("", "Sparse lexical weights match the words a query shares with a document."),
    "d5": ("Colbert", "Late interaction scores every query token against every document token."),
    "d6": ("", "short"),
}
QUERIES = {"q1": "what is BGE?", "q2": "capital of France", "q3": "lexical matching of words"}
QRELS = [("q1", "d1"), ("q2", "d2"), ("q3", "d4"), ("q3", "d5")]
WEIGHTS = (1.0, 0.3, 1.0)


@pytest.fixture(scope="module")
def beir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("m3-beir")
    with (folder / "corpus.jsonl").open("w", encoding="utf-8") as handle:
        for doc_id, (title, text) in DOCS.items():
            handle.write(json.dumps({"_id": doc_id, "title": title, "text": text}, ensure_ascii=False) + "\n")
    with (folder / "queries.jsonl").open("w", encoding="utf-8") as handle:
        for query_id, text in QUERIES.items():
            handle.write(json.dumps({"_id": query_id, "text": text}) + "\n")
    (folder / "qrels").mkdir()
    lines = ["query-id\tcorpus-id\tscore"] + [f"{q}\t{d}\t1" for q, d in QRELS]
    (folder / "qrels" / "test.tsv").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return folder


@pytest.fixture(scope="module")
def m3_dir(golden_dir):
    return golden_dir / "models" / "xlmr-m3"


@pytest.fixture(scope="module")
def m3(m3_dir):
    return BGEM3FlagModel(str(m3_dir), use_fp16=False, devices="cpu", batch_size=4)


@pytest.fixture(scope="module")
def brute(m3):
    """Every (query, document) score of each mode, from the model's own outputs."""
    texts = [f"{title} {text}".strip() for title, text in DOCS.values()]
    p = m3.encode_corpus(texts, return_sparse=True)
    q = m3.encode_queries(list(QUERIES.values()), return_sparse=True)
    dense = q["dense_vecs"] @ p["dense_vecs"].T
    sparse = np.asarray(m3.compute_lexical_matching_score(q["lexical_weights"], p["lexical_weights"]), dtype=np.float32)
    pairs = [(query, text) for query in QUERIES.values() for text in texts]
    scored = m3.compute_score(pairs, weights_for_different_modes=list(WEIGHTS))
    # compute_score's parts checked against colbert_score itself, then the weighted mean by hand
    qc = m3.encode(list(QUERIES.values()), return_dense=False, return_colbert_vecs=True)["colbert_vecs"]
    pc = m3.encode(texts, return_dense=False, return_colbert_vecs=True)["colbert_vecs"]
    colbert = np.array([[float(m3.colbert_score(a, b)) for b in pc] for a in qc], dtype=np.float32)
    np.testing.assert_allclose(np.reshape(scored["colbert"], colbert.shape), colbert, atol=1e-5)
    parts = {m: np.reshape(scored[m], dense.shape) for m in ("dense", "sparse", "colbert")}
    w_dense, w_sparse, w_colbert = WEIGHTS
    return {
        "dense": dense,
        "sparse": sparse,
        "dense+sparse": w_dense * dense + w_sparse * sparse,
        "all": (w_dense * parts["dense"] + w_sparse * parts["sparse"] + w_colbert * parts["colbert"]) / sum(WEIGHTS),
    }


def as_matrix(run_: dict[str, dict[str, float]]) -> np.ndarray:
    return np.array([[run_[q][d] for d in DOCS] for q in QUERIES], dtype=np.float32)


@pytest.mark.parametrize("mode", ["dense", "sparse", "dense+sparse", "all"])
def test_each_mode_scores_as_the_model_does(m3, beir, brute, mode, tmp_path):
    # top_k and rerank_top_k cover the corpus: every document is scored, so the run is the whole matrix
    result = evaluate_retrieval(
        m3, beir, k_values=[1, 3], top_k=6, rerank_top_k=6, m3_modes=mode, cache_dir=tmp_path, output=tmp_path / "r"
    )
    np.testing.assert_allclose(as_matrix(result.run), brute[mode], rtol=1e-5, atol=1e-5)
    assert all(list(docs.values()) == sorted(docs.values(), reverse=True) for docs in result.run.values())
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["settings"]["m3_modes"] == mode and report["settings"]["m3_weights"] == list(WEIGHTS)
    assert f"M3 {mode}" in (tmp_path / "r.md").read_text()
    if mode == "all":  # the first stage is dense+sparse, kept as the retrieval run
        np.testing.assert_allclose(as_matrix(result.retrieval_run), brute["dense+sparse"], rtol=1e-5, atol=1e-5)
        assert report["retrieval_metrics"] is not None and (tmp_path / "r.retrieval.trec").exists()
    else:
        assert result.retrieval_run is None


def test_weights_are_overridable(m3, beir, brute):
    result = evaluate_retrieval(m3, beir, top_k=6, k_values=[3], m3_modes="dense+sparse", m3_weights=[0.5, 2, 0])
    expected = 0.5 * brute["dense"] + 2 * brute["sparse"]
    np.testing.assert_allclose(as_matrix(result.run), expected, rtol=1e-5, atol=1e-5)


def test_dense_mode_is_plain_dense_retrieval(m3, beir):
    plain = evaluate_retrieval(m3, beir, top_k=6, k_values=[3], use_cache=False)
    dense = evaluate_retrieval(m3, beir, top_k=6, k_values=[3], use_cache=False, m3_modes="dense")
    assert plain.run == dense.run and plain.metrics == dense.metrics


def count_rows(m3, **options):
    counter = ForwardCounter(m3.model.encoder)
    try:
        return evaluate_retrieval(m3, **options), counter.rows
    finally:
        counter.close()


def test_lexical_weights_are_cached_under_a_key_of_their_own(m3, beir, brute, tmp_path):
    first, rows = count_rows(m3, dataset=beir, top_k=6, k_values=[3], m3_modes="dense+sparse", cache_dir=tmp_path)
    assert rows == len(DOCS) + 2 * len(QUERIES)  # one pass over the corpus gives both outputs
    np.testing.assert_allclose(as_matrix(first.run), brute["dense+sparse"], rtol=1e-5, atol=1e-5)
    assert first.cache["status"] == "miss" and first.cache["lexical_weights"]["status"] == "miss"
    assert first.cache["key"] != first.cache["lexical_weights"]["key"]
    dense_only = evaluate_retrieval(m3, beir, top_k=6, k_values=[3], cache_dir=tmp_path)
    assert dense_only.cache["key"] == first.cache["key"] and dense_only.cache["status"] == "hit"
    again, rows = count_rows(m3, dataset=beir, top_k=6, k_values=[3], m3_modes="sparse", cache_dir=tmp_path)
    assert again.cache["status"] == "hit" and again.cache["output"] == "lexical_weights"
    assert rows == len(QUERIES)  # the queries only: no document went through the model
    # dense vectors cached, lexical weights not: the corpus goes through the model once, for the weights
    dense_first = tmp_path / "dense-first"
    evaluate_retrieval(m3, beir, top_k=6, k_values=[3], cache_dir=dense_first)
    hybrid, rows = count_rows(m3, dataset=beir, top_k=6, k_values=[3], m3_modes="dense+sparse", cache_dir=dense_first)
    assert hybrid.cache["status"] == "hit" and hybrid.cache["lexical_weights"]["status"] == "miss"
    np.testing.assert_allclose(as_matrix(hybrid.run), brute["dense+sparse"], rtol=1e-5, atol=1e-5)
    assert rows == len(DOCS) + 2 * len(QUERIES)
    assert "Corpus lexical weights: from the cache" in again.to_markdown()


def test_cli_names_the_mode(m3_dir, beir, tmp_path):
    out = tmp_path / "cli.json"
    result = run(
        "eval", "retrieval", "-d", str(beir), "-m", str(m3_dir), "--m3-modes", "dense+sparse", "--m3-weights",
        "1,0.5,1", "--top-k", "6", "--k", "1,3", "--cache-dir", str(tmp_path), "--no-fp16", "-o", str(out),
    )  # fmt: skip
    assert "M3 dense+sparse (1 * dense + 0.5 * sparse)" in result.stdout
    assert json.loads(out.read_text())["settings"]["m3_weights"] == [1.0, 0.5, 1.0]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--m3-modes", "colbert"], "Invalid value for '--m3-modes'"),
        (["--m3-modes", "all", "--m3-weights", "1,2"], "expected three numbers dense,sparse,colbert"),
        (["--m3-modes", "all", "--m3-weights", "1,nan,1"], "m3_weights (--m3-weights) must hold finite numbers"),
        (["--m3-weights", "1,1,1"], "m3_weights (--m3-weights) only applies with m3_modes"),
        (["--m3-modes", "all", "--reranker", "x"], "cannot be combined with a reranker"),
    ],
)
def test_bad_options_one_line(m3_dir, beir, tmp_path, args, message):
    result = run("eval", "retrieval", "-d", str(beir), "-m", str(m3_dir), "--no-cache", *args, check=False)
    assert result.returncode != 0 and message in result.stderr and "Traceback" not in result.stderr


def test_refused_for_a_model_without_sparse_weights(tiny_bert, beir, tmp_path):
    result = run("eval", "retrieval", "-d", str(beir), "-m", str(tiny_bert), "--m3-modes", "sparse", check=False)
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert "--m3-modes) needs a BGE-M3 model" in result.stderr
    with pytest.raises(InputError, match="needs a BGE-M3 model"):
        evaluate_retrieval(Embedder.from_pretrained(str(tiny_bert)), beir, m3_modes="all", use_cache=False)


# -- SearchIndex ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def m3_index(m3):
    from bgekit import SearchIndex

    return SearchIndex.build(m3, [{"id": d, "title": t, "text": x} for d, (t, x) in DOCS.items()], m3_sparse=True)


def hit_matrix(hits) -> np.ndarray:
    return np.array([[{h.id: h.score for h in row}[d] for d in DOCS] for row in hits], dtype=np.float32)


@pytest.mark.parametrize("mode", ["dense", "sparse", "dense+sparse", "all"])
def test_search_index_modes_score_as_the_model_does(m3_index, brute, mode):
    hits = m3_index.search(list(QUERIES.values()), k=6, rerank_top_k=6, m3_modes=mode)
    np.testing.assert_allclose(hit_matrix(hits), brute[mode], rtol=1e-5, atol=1e-5)
    for row in hits:
        assert [h.rank for h in row] == list(range(1, 7))
        assert [h.score for h in row] == sorted((h.score for h in row), reverse=True)
        assert all(h.text.endswith(DOCS[h.id][1]) for h in row)


def test_search_index_keeps_lexical_weights_through_add_save_and_load(m3, m3_index, brute, tmp_path):
    from bgekit import SearchIndex

    records = [{"id": d, "title": t, "text": x} for d, (t, x) in DOCS.items()]
    grown = SearchIndex.build(m3, records[:4], m3_sparse=True).add(records[4:])
    grown.save(tmp_path / "idx")
    assert (tmp_path / "idx" / "lexical_weights.npz").is_file()
    loaded = SearchIndex.load(tmp_path / "idx", m3)
    for index in (grown, loaded):
        hits = index.search(list(QUERIES.values()), k=6, m3_modes="dense+sparse", m3_weights=[1, 0.3, 0])
        np.testing.assert_allclose(hit_matrix(hits), brute["dense+sparse"], rtol=1e-5, atol=1e-5)
    (tmp_path / "idx" / "lexical_weights.npz").unlink()
    with pytest.raises(InputError, match=r"missing lexical_weights\.npz"):
        SearchIndex.load(tmp_path / "idx", m3)


def test_search_index_bad_m3_input(m3, m3_index, tiny_bert):
    from bgekit import SearchIndex

    dense_only = SearchIndex.build(m3, ["a", "b"])
    with pytest.raises(InputError, match="build the index with m3_sparse=True"):
        dense_only.search("a", m3_modes="sparse")
    assert len(dense_only.search("a", k=2, m3_modes="dense")) == 2
    with pytest.raises(InputError, match="must be one of dense, sparse, dense\\+sparse, all"):
        m3_index.search("a", m3_modes="colbert")
    with pytest.raises(InputError, match="m3_sparse needs a BGE-M3 model"):
        SearchIndex.build(Embedder.from_pretrained(str(tiny_bert)), ["a"], m3_sparse=True)


def test_cli_index_build_and_search_with_m3_modes(m3_dir, beir, brute, tmp_path):
    out = tmp_path / "idx"
    run(
        "index",
        "build",
        "-c",
        str(beir / "corpus.jsonl"),
        "-o",
        str(out),
        "-m",
        str(m3_dir),
        "--m3-sparse",
        "--no-fp16",
    )
    assert (out / "lexical_weights.npz").is_file()
    result = run(
        "search", "-i", str(out), "-q", QUERIES["q3"], "--top-k", "6", "--json", "--no-fp16",
        "--m3-modes", "dense+sparse", "--m3-weights", "1,0.3,1",
    )  # fmt: skip
    hits = {h["id"]: h["score"] for h in map(json.loads, result.stdout.splitlines())}
    np.testing.assert_allclose([hits[d] for d in DOCS], brute["dense+sparse"][2], rtol=1e-5, atol=1e-5)
    refused = run("search", "-i", str(out), "-q", "x", "--m3-modes", "all", "-r", "y", check=False)
    assert refused.returncode != 0 and "cannot be combined with a reranker" in refused.stderr
    assert "Traceback" not in refused.stderr


def test_cqadupstack_forums_pass_the_modes_on(m3, beir, brute, tmp_path):
    import shutil

    for forum in ("android", "english"):  # two forums (a warning says the mean is not the published one)
        shutil.copytree(beir, tmp_path / "cqadupstack" / forum)
    result = evaluate_retrieval(m3, tmp_path / "cqadupstack", top_k=6, k_values=[3], m3_modes="sparse", use_cache=False)
    for forum in result.per_forum.values():
        np.testing.assert_allclose(as_matrix(forum.run), brute["sparse"], rtol=1e-5, atol=1e-5)
    assert "search: M3 sparse (lexical weights)" in result.to_markdown()
