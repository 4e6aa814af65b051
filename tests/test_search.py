"""bgekit.SearchIndex: search and rerank in Python, on real faiss, all-MiniLM-L6-v2 and the tiny cross-encoder;
the same index folders as ``bgekit index build`` / ``bgekit search``, each reading the other's."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from bgekit import Embedder, Hit, InputError, Reranker, SearchIndex

from .cli import run

ROOT = Path(__file__).resolve().parents[1]
MINI = ROOT / "examples" / "data" / "scifact-mini"
INSTRUCTION = "Represent this question for searching relevant passages: "


def _lines(path: Path, n: int) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()[:n]]


DOCS = [{k: d[k] for k in ("_id", "title", "text") if k in d} for d in _lines(MINI / "corpus.jsonl", 30)]
TEXTS = [f"{d.get('title', '')} {d['text']}".strip() for d in DOCS]
IDS = [d["_id"] for d in DOCS]
QUERIES = [q["text"] for q in _lines(MINI / "queries.jsonl", 3)]


@pytest.fixture(scope="module")
def embedder(minilm_dir):
    # an instruction, so the test sees queries get it (all-MiniLM-L6-v2 has none of its own)
    return Embedder.from_pretrained(str(minilm_dir), query_instruction_for_retrieval=INSTRUCTION)


@pytest.fixture(scope="module")
def index(embedder):
    return SearchIndex.build(embedder, DOCS)


@pytest.fixture(scope="module")
def reranker(tiny_xlmr_reranker):
    return Reranker.from_pretrained(str(tiny_xlmr_reranker))


def brute_force(embedder, queries, texts=TEXTS):
    """Every query's scores against every text, as encode_queries / encode_corpus and a dot product give them."""
    return embedder.encode_queries(queries) @ embedder.encode_corpus(texts).T


def order(scores):
    return np.lexsort((np.arange(len(scores)), -scores))  # score descending, the lower row first on ties


def test_search_equals_brute_force_with_the_query_instruction(embedder, index):
    results = index.search(QUERIES, k=5)
    scores = brute_force(embedder, QUERIES)
    plain = embedder.encode(QUERIES) @ embedder.encode_corpus(TEXTS).T
    assert not np.allclose(plain, scores, atol=1e-3)  # the instruction changes the scores: the test can tell
    assert len(results) == len(QUERIES)
    for hits, row in zip(results, scores, strict=True):
        best = order(row)[:5]
        assert [h.id for h in hits] == [IDS[i] for i in best]
        np.testing.assert_allclose([h.score for h in hits], row[best], atol=1e-5)
        assert [h.text for h in hits] == [TEXTS[i] for i in best] and [h.rank for h in hits] == [1, 2, 3, 4, 5]
    one = index.search(QUERIES[0], k=2)  # one query: one list of hits
    assert all(isinstance(h, Hit) for h in one) and [h.id for h in one] == [h.id for h in results[0][:2]]
    assert one[0].to_dict() == {"id": one[0].id, "score": one[0].score, "text": one[0].text, "rank": 1}
    assert len(index.search(QUERIES[0], k=100)) == len(DOCS)  # k past the corpus: every document


def test_rerank_orders_the_candidates_by_compute_score(index, reranker):
    hits = index.search(QUERIES[0], k=4, reranker=reranker, rerank_top_k=10)
    candidates = index.search(QUERIES[0], k=10)  # the first stage: what is reranked
    expected = np.asarray(reranker.compute_score([(QUERIES[0], h.text) for h in candidates]))
    best = order(expected)[:4]
    assert [h.id for h in hits] == [candidates[i].id for i in best]
    np.testing.assert_allclose([h.score for h in hits], expected[best], atol=1e-5)
    assert [h.rank for h in hits] == [1, 2, 3, 4] and hits[0].text == candidates[best[0]].text
    assert [h.id for h in hits] != [h.id for h in candidates[:4]]  # the reranker reordered them
    # several queries at once: each as alone; a reranker named by its folder loads
    together = index.search(QUERIES, k=4, reranker=reranker, rerank_top_k=10)
    assert [h.id for h in together[0]] == [h.id for h in hits]
    alone = index.search(QUERIES[2], k=4, reranker=str(reranker.model_name_or_path), rerank_top_k=10)
    assert [h.id for h in together[2]] == [h.id for h in alone]
    # fewer candidates than k: the reranked candidates, as `bgekit search --rerank-top-k`
    assert len(index.search(QUERIES[0], k=4, reranker=reranker, rerank_top_k=2)) == 2


def test_a_reranker_set_to_several_layers_is_refused(index, golden_dir):
    from bgekit import LayerWiseFlagLLMReranker

    folder = str(golden_dir / "models" / "minicpm-layerwise")
    several = LayerWiseFlagLLMReranker(folder, devices="cpu", cutoff_layers=[1, 2])
    with pytest.raises(InputError, match=r"scores for 2 layers \(cutoff_layers=\[1, 2\]\); ranking needs one"):
        index.search(QUERIES[0], k=2, reranker=several, rerank_top_k=3)
    one = LayerWiseFlagLLMReranker(folder, devices="cpu", cutoff_layers=[2])
    hits = index.search(QUERIES[0], k=2, reranker=one, rerank_top_k=3)
    expected = one.compute_score([(QUERIES[0], h.text) for h in hits])
    np.testing.assert_allclose([h.score for h in hits], expected, atol=1e-6)


def test_save_load_round_trip_and_the_cli_reads_it(tmp_path, embedder, index):
    folder = index.save(tmp_path / "lib-index")
    assert {p.name for p in folder.iterdir()} == {"index.faiss", "ids.json", "docs.jsonl", "index.json"}
    before = index.search(QUERIES, k=5)
    loaded = SearchIndex.load(folder)  # no embedder: the model the index records, and its query instruction
    assert loaded.embedder is not embedder and loaded.query_instruction == INSTRUCTION
    assert loaded.search(QUERIES, k=5) == before
    assert SearchIndex.load(folder, embedder, keep_texts=False).search(QUERIES, k=5) == before
    printed = run("search", "--index", str(folder), QUERIES[1], "--top-k", "5", "--json").stdout
    cli_hits = [json.loads(line) for line in printed.splitlines()]
    assert [h["id"] for h in cli_hits] == [h.id for h in before[1]]
    assert [h["text"] for h in cli_hits] == [h.text for h in before[1]]
    np.testing.assert_allclose([h["score"] for h in cli_hits], [h.score for h in before[1]], atol=1e-6)


def test_the_library_reads_a_cli_index(tmp_path, minilm_dir, embedder):
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps(d) + "\n" for d in DOCS))
    folder = tmp_path / "cli-index"
    run("index", "build", "-m", str(minilm_dir), "-c", str(corpus), "-o", str(folder))
    printed = run("search", "--index", str(folder), QUERIES[0], "--top-k", "3", "--json").stdout
    loaded = SearchIndex.load(folder)
    assert loaded.meta["corpus"] == str(corpus.resolve()) and loaded.ids == IDS and loaded.texts == TEXTS
    hits = loaded.search(QUERIES[0], k=3)
    assert [h.to_dict() for h in hits] == [json.loads(line) for line in printed.splitlines()]
    # all-MiniLM-L6-v2 records no instruction: queries as encode_queries gives them without one
    plain = Embedder.from_pretrained(str(minilm_dir))
    np.testing.assert_allclose(hits[0].score, brute_force(plain, QUERIES[:1]).max(), atol=1e-5)


def test_add_equals_one_build(tmp_path, embedder, index):
    grown = SearchIndex.build(embedder, DOCS[:20], kind="flat")
    grown.add(DOCS[20:])
    assert grown.ids == IDS and grown.texts == TEXTS
    assert [[h.id for h in q] for q in grown.search(QUERIES, k=5)] == [
        [h.id for h in q] for q in index.search(QUERIES, k=5)
    ]
    with pytest.raises(InputError, match=rf"document id '{IDS[3]}' is already in the index"):
        grown.add([{"_id": IDS[3], "text": "again"}])
    assert len(grown) == len(DOCS)  # nothing added
    positional = SearchIndex.build(embedder, ["a panda", "a bear"]).add(["a cat"])
    assert positional.ids == ["0", "1", "2"]
    loaded = SearchIndex.load(grown.save(tmp_path / "grown"), embedder)
    assert loaded.ids == IDS and loaded.texts == TEXTS


def test_approximate_kinds_and_recorded_options(embedder, index):
    named = [f"d{i}" for i in range(len(DOCS))]
    hnsw = SearchIndex.build(embedder, DOCS, named, kind="hnsw")  # ids given: they override the records'
    assert hnsw.index.kind == "hnsw" and hnsw.ids == named and hnsw.meta["score_function"] == "cosine"
    exact = index.search(QUERIES[0], k=1)[0]
    assert hnsw.search(QUERIES[0], k=1)[0].id == named[IDS.index(exact.id)]  # 30 documents: HNSW finds the best


def test_a_query_model_of_other_vectors_is_refused(tmp_path, index, tiny_bert):
    folder = index.save(tmp_path / "index")
    with pytest.raises(InputError, match=r"differ; rebuild the index with this model, or pass other_model=True"):
        SearchIndex.load(folder, str(tiny_bert))
    other = SearchIndex.load(folder, str(tiny_bert), other_model=True)
    with pytest.raises(InputError, match=r"gives 32-dimensional vectors; the index at .* holds 384"):
        other.search("anything")


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda e, i: SearchIndex.build("nobody/unknown-model", []), "documents is empty"),
        (lambda e, i: SearchIndex.build(e, None), "documents is None"),
        (lambda e, i: SearchIndex.build(e, "one text"), "documents is a single string"),
        (lambda e, i: SearchIndex.build(e, ["a", "b"], ids=["x", "x"]), "duplicate document id 'x'"),
        (
            lambda e, i: SearchIndex.build(e, [{"id": 1, "text": "a"}, {"_id": "1", "text": "b"}]),
            "duplicate document id '1'",
        ),
        (lambda e, i: SearchIndex.build(e, ["a", "b"], ids=["x"]), "got 1 ids for 2 documents"),
        (lambda e, i: SearchIndex.build(e, [{"title": "no text"}]), r"documents\[0\] has no 'text'"),
        (lambda e, i: SearchIndex.build(e, ["a", None]), r"documents\[1\] is NoneType"),
        (lambda e, i: SearchIndex.build(e, ["a"], kind="tree"), "index kind must be one of"),
        (lambda e, i: i.search("q", k=0), "k must be a positive integer, got 0"),
        (lambda e, i: i.search("q", k=None), "k must be a positive integer, got None"),
        (lambda e, i: i.search("q", rerank_top_k=0), "rerank_top_k must be a positive integer"),
        (lambda e, i: i.search(None), "queries is None"),
        (lambda e, i: i.search([]), "queries is empty"),
        (lambda e, i: i.search("  "), "the query is empty"),
        (lambda e, i: i.search(["fine", ""]), r"queries\[1\] is empty"),
        (lambda e, i: i.search("q", reranker=42), "reranker must be a bgekit Reranker"),
        (lambda e, i: SearchIndex.load(Path("/nonexistent/index")), "does not exist; build one"),
    ],
)
def test_bad_input_is_one_clear_line(embedder, index, call, message):
    with pytest.raises(InputError, match=message) as caught:
        call(embedder, index)
    assert "\n" not in str(caught.value)
