"""sentence-transformers' ``CrossEncoder.rank`` and ``SentenceTransformer.similarity`` on bgekit's models:
``rank`` on every reranker family (cross-encoder, LLM, layerwise, a FlagEmbedding-style custom subclass) equals
``compute_score`` sorted; ``similarity`` equals the product of the vectors ``encode`` returns."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from bgekit import AbsReranker, Embedder, FlagLLMReranker, InputError, LayerWiseFlagLLMReranker, Reranker

QUERY = "what do giant pandas eat?"
DOCS = [
    "Paris is the capital of France.",
    "Giant pandas eat bamboo almost exclusively.",
    "The moon orbits the earth.",
    "Pandas are bears native to China.",
    "Bamboo grows fast.",
]


def expected_ranking(scores, top_k=None):
    scores = np.asarray(scores, dtype=np.float64)
    return np.lexsort((np.arange(len(scores)), -scores))[:top_k].tolist()  # score descending, ties in input order


def check_rank(model, **options):
    scores = model.compute_score([(QUERY, d) for d in DOCS], **options)
    ranked = model.rank(QUERY, DOCS, **options)
    assert [r["corpus_id"] for r in ranked] == expected_ranking(scores)
    np.testing.assert_allclose([r["score"] for r in ranked], np.asarray(scores)[expected_ranking(scores)], atol=1e-6)
    assert all(set(r) == {"corpus_id", "score"} for r in ranked)
    assert all(type(r["corpus_id"]) is int and type(r["score"]) is float for r in ranked)
    top = model.rank(QUERY, DOCS, top_k=2, return_documents=True, **options)
    assert [r["corpus_id"] for r in top] == expected_ranking(scores, 2)
    assert [r["text"] for r in top] == [DOCS[i] for i in expected_ranking(scores, 2)]
    return ranked


@pytest.fixture(scope="module")
def cross_encoder(tiny_xlmr_reranker):
    return Reranker.from_pretrained(str(tiny_xlmr_reranker))


def test_cross_encoder_rank_is_compute_score_sorted(cross_encoder):
    ranked = check_rank(cross_encoder)
    assert [r["corpus_id"] for r in ranked] != list(range(len(DOCS)))  # not input order: the test can tell
    normalized = cross_encoder.rank(QUERY, DOCS, normalize=True, batch_size=2)  # compute_score's options pass on
    assert all(0 < r["score"] < 1 for r in normalized)
    assert [r["corpus_id"] for r in normalized] == [r["corpus_id"] for r in ranked]


def test_llm_rerankers_rank(golden_dir):
    llm = FlagLLMReranker(str(golden_dir / "models" / "gemma-llm-reranker"), use_fp16=False, devices="cpu")
    check_rank(llm)
    layerwise = LayerWiseFlagLLMReranker(str(golden_dir / "models" / "minicpm-layerwise"), devices="cpu")
    check_rank(layerwise)  # one cutoff layer (the last, by default): one score a document
    check_rank(layerwise, cutoff_layers=[1])
    several = r"scores for 2 layers \(cutoff_layers=\[1, 2\]\); ranking needs one score a document"
    with pytest.raises(InputError, match=several):
        layerwise.rank(QUERY, DOCS, cutoff_layers=[1, 2])
    built = LayerWiseFlagLLMReranker(
        str(golden_dir / "models" / "minicpm-layerwise"), devices="cpu", cutoff_layers=[1, 2]
    )
    with pytest.raises(InputError, match=several):
        built.rank(QUERY, DOCS)
    check_rank(built, cutoff_layers=[2])  # one layer in the call: fine


class Overlap(AbsReranker):
    """A FlagEmbedding-style custom reranker: words shared by query and passage, as a numpy array."""

    def compute_score_single_gpu(self, sentence_pairs, batch_size=256, query_max_length=None, max_length=512,
                                 normalize=False, device=None, **kwargs):  # fmt: skip
        words = [len(set(q.lower().split()) & set(p.lower().rstrip(".").split())) for q, p in sentence_pairs]
        return np.asarray(words, dtype=np.float32)


def test_a_custom_abs_reranker_ranks():
    ranked = check_rank(Overlap("custom", devices="cpu"))
    assert ranked[0]["corpus_id"] == 1 and ranked[0]["score"] == 2.0  # giant, pandas
    assert [r["corpus_id"] for r in ranked] == [1, 3, 0, 2, 4]  # three tied at 0: in input order


class Fixed(AbsReranker):
    """A custom reranker with given logits, normalized as FlagEmbedding does (sigmoid in float64)."""

    def __init__(self, logits, **options):
        super().__init__("fixed", devices="cpu", **options)
        self.logits = logits

    def compute_score_single_gpu(self, sentence_pairs, batch_size=256, query_max_length=None, max_length=512,
                                 normalize=False, device=None, **kwargs):  # fmt: skip
        logits = np.asarray(self.logits[: len(sentence_pairs)], dtype=np.float64)
        return (1 / (1 + np.exp(-logits))).tolist() if normalize else logits.tolist()


def test_normalized_ranks_follow_the_logits_where_the_sigmoid_ties_them():
    """Every logit above ~37 is a sigmoid of 1.0: rank(normalize=True) orders them by the logits (as the
    server and ``bgekit rerank --normalize``), not in input order; the scores shown are the sigmoids."""
    logits = [40.0, 55.0, 38.0, -2.0, 55.0]
    model = Fixed(logits)
    assert model.compute_score([(QUERY, d) for d in DOCS], normalize=True)[:3] == [1.0, 1.0, 1.0]
    raw = model.rank(QUERY, DOCS)
    assert [r["corpus_id"] for r in raw] == [1, 4, 0, 2, 3]  # 55 and 55 tie: input order
    normalized = model.rank(QUERY, DOCS, normalize=True)
    assert [r["corpus_id"] for r in normalized] == [1, 4, 0, 2, 3]
    assert [r["score"] for r in normalized] == [1.0, 1.0, 1.0, 1.0, pytest.approx(1 / (1 + np.exp(2.0)))]
    # the reranker's own normalize=True setting, and normalize=False overriding it
    assert model.rank(QUERY, DOCS) == model.rank(QUERY, DOCS, normalize=False)
    own = Fixed(logits, normalize=True)
    assert own.rank(QUERY, DOCS) == normalized
    assert own.rank(QUERY, DOCS, normalize=False) == raw


def test_ranking_rule():
    from bgekit.models.scoring import ranking

    assert ranking([0.5, 2.0, 0.5, 3.0]) == [(3, 3.0), (1, 2.0), (0, 0.5), (2, 0.5)]  # ties in input order
    assert ranking([0.5, 2.0, 0.5, 3.0], top_k=2) == [(3, 3.0), (1, 2.0)]
    nan = float("nan")
    assert [i for i, _ in ranking([nan, 1.0, nan, -1.0, nan])] == [1, 3, 0, 2, 4]  # NaN last, in input order
    assert ranking([]) == [] and ranking(np.array([1, 3], dtype=np.float32), top_k=1) == [(1, 3.0)]


@pytest.mark.parametrize(
    ("args", "options", "message"),
    [
        ((None, DOCS), {}, "query is None"),
        ((["q1", "q2"], DOCS), {}, "query is list; pass one query string"),
        ((QUERY, "one document"), {}, "documents is a single string"),
        ((QUERY, []), {}, "documents is empty"),
        ((QUERY, None), {}, "documents is None"),
        ((QUERY, ["fine", 3]), {}, r"documents\[1\] is int"),
        ((QUERY, DOCS), {"top_k": 0}, "top_k must be a positive integer or None, got 0"),
        ((QUERY, DOCS), {"return_documents": "yes"}, "return_documents must be True or False"),
    ],
)
def test_rank_bad_input(cross_encoder, args, options, message):
    with pytest.raises(InputError, match=message) as caught:
        cross_encoder.rank(*args, **options)
    assert "\n" not in str(caught.value)


@pytest.fixture(scope="module")
def embedder(tiny_bert):
    return Embedder.from_pretrained(str(tiny_bert))


def test_similarity_is_the_product_of_encoded_vectors(embedder):
    a, b = embedder.encode(DOCS[:3]), embedder.encode(DOCS)
    assert embedder.similarity_fn_name == "cosine"
    scores = embedder.similarity(a, b)
    assert isinstance(scores, np.ndarray) and scores.shape == (3, 5) and scores.dtype == np.float32
    np.testing.assert_allclose(scores, a @ b.T, atol=1e-6)  # unit vectors: cosine is FlagEmbedding's q @ p.T
    np.testing.assert_allclose(embedder.similarity(a[0], b), (a @ b.T)[:1], atol=1e-6)  # a 1-D vector is one row
    tensor = embedder.similarity(torch.from_numpy(a), b)  # a tensor in: a tensor out, as sentence-transformers
    assert isinstance(tensor, torch.Tensor) and tensor.shape == (3, 5)
    np.testing.assert_allclose(tensor.numpy(), scores, atol=1e-6)


def test_similarity_dot_and_cosine_of_raw_vectors(tiny_bert):
    raw = Embedder.from_pretrained(str(tiny_bert), normalize_embeddings=False)
    a, b = raw.encode(DOCS[:2]), raw.encode(DOCS)
    assert not np.allclose(np.linalg.norm(a, axis=1), 1.0)  # raw pooled vectors: cosine and dot differ
    unit = lambda x: x / np.linalg.norm(x, axis=1, keepdims=True)  # noqa: E731
    np.testing.assert_allclose(raw.similarity(a, b), unit(a) @ unit(b).T, atol=1e-5)
    raw.similarity_fn_name = "dot"
    np.testing.assert_allclose(raw.similarity(a, b), a @ b.T, rtol=1e-5)
    with pytest.raises(InputError, match="similarity_fn_name must be one of"):
        raw.similarity_fn_name = "euclidean"


@pytest.mark.parametrize(
    ("a", "b", "message"),
    [
        (["some text"], np.ones((1, 4)), "embeddings1 holds text; similarity\\(\\) compares vectors"),
        (np.ones((1, 4)), None, "embeddings2 is None"),
        (np.ones((1, 4)), np.ones((2, 3)), "embeddings1 has dimension 4, embeddings2 3"),
        (np.ones((0, 4)), np.ones((2, 4)), r"got shape \(0, 4\)"),
    ],
)
def test_similarity_bad_input(embedder, a, b, message):
    with pytest.raises(InputError, match=message):
        embedder.similarity(a, b)
