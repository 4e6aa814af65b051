"""BGEM3FlagModel behaviour the goldens do not pin: options, consistency between the scoring
paths, sparse matrices, device moves, and clear errors on bad input."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch

from bgekit import BGEM3FlagModel, Embedder, InputError, ModelNotFoundError

QUERIES = ["what is BGE?", "¿Cuál es la capital de Francia?", "北京", ""]
PASSAGES = [
    "BGE is an embedding model for dense retrieval.",
    "Paris is the capital and largest city of France. " * 4,
    "北京是中国的首都。",
    "short",
]
MODES = ["colbert", "sparse", "dense", "sparse+dense", "colbert+sparse+dense"]


@pytest.fixture(scope="module")
def m3_dir(golden_dir):
    return golden_dir / "models" / "xlmr-m3"


@pytest.fixture(scope="module")
def model(m3_dir):
    return BGEM3FlagModel(str(m3_dir), use_fp16=False, devices="cpu", batch_size=2)


@pytest.fixture(scope="module")
def encoded(model):
    q = model.encode_queries(QUERIES, return_sparse=True, return_colbert_vecs=True)
    p = model.encode_corpus(PASSAGES, return_sparse=True, return_colbert_vecs=True)
    return q, p


# -- encode ---------------------------------------------------------------------------------
def test_return_flags_per_call_and_from_constructor(model, m3_dir):
    out = model.encode(PASSAGES, return_dense=False, return_sparse=True)
    assert out["dense_vecs"] is None and out["colbert_vecs"] is None and len(out["lexical_weights"]) == 4
    sparse_default = BGEM3FlagModel(str(m3_dir), devices="cpu", return_dense=False, return_colbert_vecs=True)
    out = sparse_default.encode(PASSAGES)
    assert out["dense_vecs"] is None and out["lexical_weights"] is None and len(out["colbert_vecs"]) == 4


def test_outputs_do_not_depend_on_batching(model, encoded):
    _, p = encoded
    one_by_one = model.encode(PASSAGES, batch_size=1, return_sparse=True, return_colbert_vecs=True)
    np.testing.assert_allclose(one_by_one["dense_vecs"], p["dense_vecs"], rtol=0, atol=1e-5)
    for a, b in zip(one_by_one["colbert_vecs"], p["colbert_vecs"], strict=True):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-5)
    for a, b in zip(one_by_one["lexical_weights"], p["lexical_weights"], strict=True):
        assert list(a) == list(b)


def test_colbert_rows_and_lexical_keys_follow_the_tokens(model, encoded):
    q, _ = encoded
    ids = model.tokenizer.encode(QUERIES, 512).ids
    special = {str(i) for i in model.unused_token_ids}
    for tokens, vectors, weights in zip(ids, q["colbert_vecs"], q["lexical_weights"], strict=True):
        assert vectors.shape == (len(tokens) - 1, 32)
        np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1, atol=1e-5)
        assert set(weights) <= {str(t) for t in tokens} - special
        assert all(w > 0 for w in weights.values())


def test_encode_queries_adds_the_instruction(m3_dir):
    instructed = BGEM3FlagModel(str(m3_dir), devices="cpu", query_instruction_for_retrieval="Query: ")
    got = instructed.encode_queries(QUERIES[:2], return_colbert_vecs=True)
    plain = instructed.encode(["Query: " + q for q in QUERIES[:2]], return_colbert_vecs=True)
    np.testing.assert_allclose(got["dense_vecs"], plain["dense_vecs"], rtol=0, atol=1e-6)
    passages = instructed.encode_corpus(PASSAGES[:1])["dense_vecs"]
    np.testing.assert_allclose(passages, instructed.encode(PASSAGES[:1])["dense_vecs"], rtol=0, atol=1e-6)


def test_convert_to_numpy_false_and_raw_vectors(model, encoded):
    out = model.encode(PASSAGES, return_colbert_vecs=True, convert_to_numpy=False, normalize_embeddings=False)
    assert isinstance(out["dense_vecs"], torch.Tensor) and out["dense_vecs"].dtype == torch.float32
    assert all(isinstance(v, torch.Tensor) for v in out["colbert_vecs"])
    normalized = torch.nn.functional.normalize(out["dense_vecs"], dim=-1).numpy()
    np.testing.assert_allclose(normalized, encoded[1]["dense_vecs"], rtol=0, atol=1e-6)
    assert not np.allclose(torch.linalg.norm(out["colbert_vecs"][0], dim=-1).numpy(), 1)


def test_embedder_from_pretrained_picks_m3(m3_dir):
    model = Embedder.from_pretrained(str(m3_dir), devices="cpu")
    assert isinstance(model, BGEM3FlagModel)
    assert model.encode("hi")["dense_vecs"].shape == (32,)


@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("pooling_method", ["mean", "last_token"])
def test_pooling_method_is_honoured_as_flagembedding_does(m3_dir, pooling_method, packed):
    """FlagEmbedding 1.4.2's BGEM3FlagModel passes pooling_method to its dense head (cls, mean or the last
    real token; encoder_only/m3 modeling's _dense_embedding), so bgekit pools M3's dense vector by it too:
    each text's own tokens, whatever the padding of its batch."""
    from tokenizers import Tokenizer
    from transformers import AutoModel

    encoder, tokenizer = (
        AutoModel.from_pretrained(str(m3_dir)).eval(),
        Tokenizer.from_file(str(m3_dir / "tokenizer.json")),
    )
    expected = []
    for text in PASSAGES:  # one at a time: no padding to get wrong
        with torch.no_grad():
            hidden = encoder(torch.tensor([tokenizer.encode(text).ids])).last_hidden_state[0]
        expected.append(hidden.mean(0) if pooling_method == "mean" else hidden[-1])
    expected = torch.nn.functional.normalize(torch.stack(expected), dim=-1).numpy()
    model = BGEM3FlagModel(str(m3_dir), pooling_method=pooling_method, devices="cpu", packed=packed)
    np.testing.assert_allclose(model.encode(PASSAGES, batch_size=4)["dense_vecs"], expected, rtol=0, atol=1e-5)


def test_cli_pooling_method_reaches_m3(tmp_path, m3_dir):
    from .cli import run

    (tmp_path / "in.txt").write_text("\n".join(PASSAGES) + "\n")
    run("embed", "-i", str(tmp_path / "in.txt"), "-o", str(tmp_path / "out.npy"), "-m", str(m3_dir),
        "--pooling-method", "last_token")  # fmt: skip
    library = BGEM3FlagModel(str(m3_dir), pooling_method="last_token", devices="cpu").encode(PASSAGES)
    np.testing.assert_allclose(np.load(tmp_path / "out.npy"), library["dense_vecs"], rtol=0, atol=1e-5)


# -- scores ---------------------------------------------------------------------------------
def test_compute_score_matches_the_separate_scores(model, encoded):
    q, p = encoded
    pairs = list(zip(QUERIES, PASSAGES, strict=True))
    weights = [0.5, 0.25, 1.5]
    got = model.compute_score(pairs, weights_for_different_modes=weights)
    assert list(got) == MODES
    dense = (q["dense_vecs"] * p["dense_vecs"]).sum(-1)
    pairs_of = {key: list(zip(q[key], p[key], strict=True)) for key in ("lexical_weights", "colbert_vecs")}
    sparse = [float(model.compute_lexical_matching_score(a, b)) for a, b in pairs_of["lexical_weights"]]
    colbert = [model.colbert_score(a, b).item() for a, b in pairs_of["colbert_vecs"]]
    np.testing.assert_allclose(got["dense"], dense, atol=1e-6)
    np.testing.assert_allclose(got["sparse"], sparse, atol=1e-6)
    np.testing.assert_allclose(got["colbert"], colbert, atol=1e-6)
    d, s, c = np.array(dense), np.array(sparse), np.array(colbert)
    np.testing.assert_allclose(got["sparse+dense"], (0.25 * s + 0.5 * d) / 0.75, atol=1e-6)
    np.testing.assert_allclose(got["colbert+sparse+dense"], (1.5 * c + 0.25 * s + 0.5 * d) / 2.25, atol=1e-6)
    single = model.compute_score(pairs[1], weights_for_different_modes=weights)
    assert single == pytest.approx({mode: values[1] for mode, values in got.items()}, abs=1e-6)


def test_lexical_matching_types(model, encoded):
    q, p = encoded
    matrix = model.compute_lexical_matching_score(q["lexical_weights"], p["lexical_weights"])
    assert isinstance(matrix, np.ndarray) and matrix.shape == (4, 4)
    assert model.compute_lexical_matching_score({"5": np.float32(1)}, {"6": np.float32(1)}) == 0
    score = model.compute_lexical_matching_score({"5": np.float32(2), "7": np.float32(1)}, {"5": np.float32(3)})
    assert type(score) is np.float32 and score == 6


def test_lexical_weights_to_csr(model, encoded):
    q, p = encoded
    queries, passages = (
        model.lexical_weights_to_csr(q["lexical_weights"]),
        model.lexical_weights_to_csr(p["lexical_weights"]),
    )
    assert queries.shape == (4, model.model.config.vocab_size) and queries.dtype == np.float32
    assert queries.getrow(0).nnz == len(q["lexical_weights"][0])
    expected = model.compute_lexical_matching_score(q["lexical_weights"], p["lexical_weights"])
    np.testing.assert_allclose((queries @ passages.T).toarray(), expected, atol=1e-6)
    assert model.lexical_weights_to_csr(q["lexical_weights"][0]).shape[0] == 1


def test_convert_id_to_token(model, encoded):
    weights = encoded[0]["lexical_weights"]
    tokens = model.convert_id_to_token(weights[0])
    assert isinstance(tokens, dict) and "BGE" in tokens
    assert model.convert_id_to_token(weights[:1]) == tokens
    assert isinstance(model.convert_id_to_token(weights), list)


# -- devices --------------------------------------------------------------------------------
def test_heads_are_part_of_the_hosted_module(model):
    names = {name for name, _ in model.model.named_parameters()}
    assert {"colbert_linear.weight", "colbert_linear.bias", "sparse_linear.weight", "sparse_linear.bias"} <= names
    assert model.model.config.model_type == "xlm-roberta"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_fp16_on_gpu_matches_cpu(m3_dir, model, encoded):
    gpu = BGEM3FlagModel(str(m3_dir), devices="cuda:0", use_fp16=True)
    assert {p.device.type for p in gpu.model.parameters()} == {"cuda"}
    assert {p.dtype for p in gpu.model.parameters()} == {torch.float16}
    out = gpu.encode_corpus(PASSAGES, return_sparse=True, return_colbert_vecs=True)
    assert out["dense_vecs"].dtype == np.float32
    np.testing.assert_allclose(out["dense_vecs"], encoded[1]["dense_vecs"], atol=2e-2)
    for a, b in zip(out["colbert_vecs"], encoded[1]["colbert_vecs"], strict=True):
        np.testing.assert_allclose(a, b, atol=2e-2)
    pairs = list(zip(QUERIES, PASSAGES, strict=True))
    got, want = gpu.compute_score(pairs), model.compute_score(pairs)
    for mode in MODES:
        np.testing.assert_allclose(got[mode], want[mode], atol=2e-2)


# -- bad input ------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("value", "message"),
    [(None, "sentences is None"), ([], "sentences is empty"), (["ok", 3], r"sentences\[1\] is int")],
)
def test_encode_rejects_bad_texts(model, value, message):
    for method in (model.encode, model.encode_queries, model.encode_corpus):
        with pytest.raises(InputError, match=message):
            method(value)


def test_encode_rejects_bad_options(model):
    with pytest.raises(InputError, match="nothing to return"):
        model.encode(["x"], return_dense=False)
    with pytest.raises(InputError, match="unexpected options"):
        model.encode(["x"], return_sparce=True)
    with pytest.raises(InputError, match="batch_size must be a positive int"):
        model.encode(["x"], batch_size=0)


@pytest.mark.parametrize(
    ("weights", "message"),
    [
        ([1, 1], "three numbers"),
        ([1, 1, 1, 1], "three numbers"),
        ("abc", "three numbers"),
        (0.5, "three numbers"),
        ([1, "2", 3], "finite numbers"),
        ([1, True, 3], "finite numbers"),
        ([1, float("nan"), 3], "finite numbers"),
    ],
)
def test_compute_score_rejects_bad_weights(model, weights, message):
    with pytest.raises(InputError, match=message):
        model.compute_score([("q", "p")], weights_for_different_modes=weights)


@pytest.mark.parametrize(
    ("pairs", "message"),
    [
        (None, "is None"),
        ([], "is empty"),
        ("query", "single string"),
        ([("q",)], r"sentence_pairs\[0\] must be a \(query, passage\) pair"),
        ([("q", "p", "x")], r"must be a \(query, passage\) pair"),
        ([("q", 3)], "passage is int"),
    ],
)
def test_compute_score_rejects_bad_pairs(model, pairs, message):
    with pytest.raises(InputError, match=message):
        model.compute_score(pairs)


def test_scoring_helpers_reject_bad_input(model, encoded):
    weights = encoded[0]["lexical_weights"]
    with pytest.raises(InputError, match="two dicts of token weights or two lists"):
        model.compute_lexical_matching_score(weights[0], weights)
    with pytest.raises(InputError, match=r"lexical_weights_2\[1\] is str"):
        model.compute_lexical_matching_score(weights, [weights[0], "x"])
    with pytest.raises(InputError, match="2-D array"):
        model.colbert_score(np.zeros(4, dtype=np.float32), np.zeros((3, 4), dtype=np.float32))
    with pytest.raises(InputError, match="dict of token weights"):
        model.convert_id_to_token("7")
    with pytest.raises(InputError, match="token ids must lie in"):
        model.lexical_weights_to_csr({"999999": np.float32(1)})


def test_missing_heads_or_wrong_colbert_dim(tmp_path, m3_dir):
    with pytest.raises(InputError, match=r"colbert_dim=8 does not match colbert_linear\.pt"):
        BGEM3FlagModel(str(m3_dir), devices="cpu", colbert_dim=8)
    plain = tmp_path / "plain"
    shutil.copytree(m3_dir, plain)
    (plain / "sparse_linear.pt").unlink()
    with pytest.raises(ModelNotFoundError, match=r"no sparse_linear\.pt"):
        BGEM3FlagModel(str(plain), devices="cpu")
