"""``bgekit serve`` end to end: a real uvicorn process on 127.0.0.1, real models, real clients.

One server per module (started once, always stopped) serves the packaged all-MiniLM-L6-v2, the
tiny M3 model, a tiny BERT (for the load test), a tiny cross-encoder and a tiny LLM reranker.
Every answer is checked against the library on the same model. Nothing is mocked.

Checks of the serving issue proven here: 1 (openai client, float and base64), 2 (rerank),
3 (401 / 400 / 422 / 413; 429 is in test_serve_faults.py), 4 (500 requests from 50 concurrent
clients, batching visible in /metrics), 6 (a real process).
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")
openai = pytest.importorskip("openai")

from bgekit import BGEM3FlagModel, Embedder, Reranker  # noqa: E402

from .serving import running_server  # noqa: E402

KEY = "sk-bgekit-test"
AUTH = {"Authorization": f"Bearer {KEY}"}
MAX_REQUEST_BYTES = 200_000
MAX_CLIENT_BATCH = 64
CORS_ORIGIN = "https://app.example"
TEXTS = [
    "The giant panda is a bear native to China that eats bamboo.",
    "Paris is the capital of France.",
    "Dense retrieval ranks passages by the similarity of their vectors to the query.",
]
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny_prompted(tmp_path_factory, tiny_bert) -> Path:
    """The tiny BERT as a sentence-transformers folder with query and passage prompts (as e5 has)."""
    folder = tmp_path_factory.mktemp("prompted") / "tiny"
    shutil.copytree(tiny_bert, folder)
    (folder / "1_Pooling").mkdir()
    (folder / "1_Pooling" / "config.json").write_text(json.dumps({"pooling_mode_cls_token": True}))
    prompts = {"prompts": {"query": "query: ", "passage": "passage: "}}
    (folder / "config_sentence_transformers.json").write_text(json.dumps(prompts))
    return folder


@pytest.fixture(scope="module")
def server(tmp_path_factory, minilm_dir, golden_dir, tiny_prompted, tiny_xlmr_reranker):
    models = golden_dir / "models"
    args = [
        *("--model", str(minilm_dir), "--model", str(models / "xlmr-m3"), "--model", str(tiny_prompted)),
        *("--reranker", str(tiny_xlmr_reranker), "--reranker", str(models / "gemma-llm-reranker")),
        *("--reranker", str(models / "minicpm-layerwise"), "--reranker", str(minilm_dir)),
        *("--served-model-name", "minilm", "--served-model-name", "m3", "--served-model-name", "tiny"),
        *("--served-model-name", "rr", "--served-model-name", "llm-rr", "--served-model-name", "layerwise"),
        *("--served-model-name", "bi-encoder"),
        *("--api-key", KEY, "--max-client-batch-size", str(MAX_CLIENT_BATCH)),
        *("--max-request-bytes", str(MAX_REQUEST_BYTES)),
        *("--cors-origin", CORS_ORIGIN, "--cors-origin", "http://localhost:3000"),
    ]
    with running_server(args, tmp_path_factory.mktemp("serve") / "server.log") as srv:
        yield srv


@pytest.fixture(scope="module")
def minilm(minilm_dir):
    return Embedder.from_pretrained(str(minilm_dir))


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=KEY, max_retries=0, timeout=60)


def post(server, path: str, body: dict, headers: dict | None = None) -> httpx.Response:
    return httpx.post(f"{server.url}{path}", json=body, headers=AUTH if headers is None else headers, timeout=60)


def error_of(response: httpx.Response) -> dict:
    body = response.json()
    assert set(body) == {"error"}, body
    assert set(body["error"]) == {"message", "type", "param", "code"}, body
    assert body["error"]["message"], body
    return body["error"]


# -- check 1: the openai client gets the library's vectors ---------------------------------------
def test_openai_client_float_vectors_equal_the_library(client, minilm):
    response = client.embeddings.create(model="minilm", input=TEXTS, encoding_format="float")
    got = np.array([d.embedding for d in response.data], dtype=np.float32)
    np.testing.assert_allclose(got, minilm.encode(TEXTS), atol=1e-5)
    assert [d.index for d in response.data] == [0, 1, 2]
    assert response.model == "minilm"
    tokens = sum(len(ids) for ids in minilm.tokenize(TEXTS).ids)
    assert response.usage.prompt_tokens == response.usage.total_tokens == tokens  # real tokens, not characters


def test_openai_client_base64_vectors_equal_the_library(client, minilm):
    response = client.embeddings.create(model="minilm", input=TEXTS, encoding_format="base64")
    got = np.stack([np.frombuffer(base64.b64decode(d.embedding), dtype="<f4") for d in response.data])
    np.testing.assert_allclose(got, minilm.encode(TEXTS), atol=1e-5)
    # without encoding_format the client asks for base64 and decodes it itself
    default = client.embeddings.create(model="minilm", input=TEXTS[0])
    np.testing.assert_allclose(np.array(default.data[0].embedding), minilm.encode(TEXTS[0]), atol=1e-5)


def test_input_type_applies_the_prompt_rules(server, tiny_prompted):
    library = Embedder.from_pretrained(str(tiny_prompted))
    assert library.query_instruction_for_retrieval == "query: "
    got = {}
    for input_type in ("query", "passage", None):
        body = {"model": "tiny", "input": TEXTS, **({"input_type": input_type} if input_type else {})}
        response = post(server, "/v1/embeddings", body)
        assert response.status_code == 200, response.text
        got[input_type] = np.array([d["embedding"] for d in response.json()["data"]])
        tokens = sum(len(ids) for ids in library.tokenize(TEXTS, input_type).ids)
        assert response.json()["usage"]["prompt_tokens"] == tokens
    np.testing.assert_allclose(got["query"], library.encode_queries(TEXTS), atol=1e-5)
    np.testing.assert_allclose(got["passage"], library.encode_corpus(TEXTS), atol=1e-5)
    np.testing.assert_allclose(got[None], library.encode(TEXTS), atol=1e-5)
    assert not np.allclose(got["query"], got[None])
    # "document" (Voyage's and mteb's name) is the passage rule; it was a 422
    document = post(server, "/v1/embeddings", {"model": "tiny", "input": TEXTS, "input_type": "document"})
    assert document.status_code == 200, document.text
    np.testing.assert_allclose([d["embedding"] for d in document.json()["data"]], got["passage"], atol=1e-6)


def test_dimensions_and_routes_without_v1(server, minilm, minilm_dir):
    truncated = post(server, "/v1/embeddings", {"model": "minilm", "input": TEXTS, "dimensions": 64}).json()
    expected = Embedder.from_pretrained(str(minilm_dir), truncate_dim=64).encode(TEXTS)
    np.testing.assert_allclose(np.array([d["embedding"] for d in truncated["data"]]), expected, atol=1e-5)
    # the same routes answer without /v1, and model defaults to the first embedding model
    plain = post(server, "/embeddings", {"input": TEXTS[1]})
    assert plain.status_code == 200 and plain.json()["model"] == "minilm"
    np.testing.assert_allclose(plain.json()["data"][0]["embedding"], minilm.encode(TEXTS[1]), atol=1e-5)
    unprefixed = openai.OpenAI(base_url=server.url, api_key=KEY, max_retries=0)
    assert len(unprefixed.embeddings.create(model="minilm", input="hi", encoding_format="float").data) == 1
    assert httpx.get(f"{server.url}/models", headers=AUTH, timeout=10).status_code == 200
    assert httpx.get(f"{server.url}/v1/health", timeout=10).status_code == 200


def test_m3_sparse_and_colbert_extension(server, golden_dir):
    library = BGEM3FlagModel(str(golden_dir / "models" / "xlmr-m3"))
    expected = library.encode(TEXTS, return_sparse=True, return_colbert_vecs=True)
    body = {"model": "m3", "input": TEXTS, "return_sparse": True, "return_colbert_vecs": True}
    data = post(server, "/v1/embeddings", body).json()["data"]
    np.testing.assert_allclose([d["embedding"] for d in data], expected["dense_vecs"], atol=1e-5)
    for item, weights, vectors in zip(data, expected["lexical_weights"], expected["colbert_vecs"], strict=True):
        assert list(item["lexical_weights"]) == list(weights)  # same token ids, same order
        np.testing.assert_allclose(list(item["lexical_weights"].values()), list(weights.values()), atol=1e-5)
        np.testing.assert_allclose(item["colbert_vecs"], vectors, atol=1e-5)
    # base64: one string per token vector; sparse only: an empty dense embedding
    body.update(encoding_format="base64", return_dense=False, return_colbert_vecs=True)
    data = post(server, "/v1/embeddings", body).json()["data"]
    assert data[0]["embedding"] == ""
    decoded = np.stack([np.frombuffer(base64.b64decode(v), dtype="<f4") for v in data[0]["colbert_vecs"]])
    np.testing.assert_allclose(decoded, expected["colbert_vecs"][0], atol=1e-5)
    # a plain model refuses the extension with a 400 that says why
    refused = post(server, "/v1/embeddings", {"model": "minilm", "input": "x", "return_sparse": True})
    assert refused.status_code == 400 and error_of(refused)["param"] == "return_sparse"


def test_dimensions_shapes_the_dense_embedding_only(server, golden_dir):
    """``dimensions`` past the model's size was a 400 even with ``return_dense: false``, while any smaller value
    was ignored there: it is checked and applied only when a dense embedding is returned."""
    library = BGEM3FlagModel(str(golden_dir / "models" / "xlmr-m3"))
    expected = library.encode(TEXTS, return_dense=False, return_sparse=True, return_colbert_vecs=True)
    body = {"model": "m3", "input": TEXTS, "return_dense": False, "return_sparse": True, "return_colbert_vecs": True}
    for dimensions in (8, 4096):
        response = post(server, "/v1/embeddings", {**body, "dimensions": dimensions})
        assert response.status_code == 200, response.text
        data = response.json()["data"]
        assert all(item["embedding"] == [] for item in data)
        for item, vectors in zip(data, expected["colbert_vecs"], strict=True):  # ColBERT vectors are never cut
            np.testing.assert_allclose(item["colbert_vecs"], vectors, atol=1e-5)
    dense = post(server, "/v1/embeddings", {"model": "m3", "input": TEXTS, "return_sparse": True, "dimensions": 4096})
    assert dense.status_code == 400 and error_of(dense)["code"] == "invalid_dimensions"
    assert "4096" in error_of(dense)["message"]
    # a plain model has no output but the dense one: return_dense=false is the error, not dimensions
    plain = post(server, "/v1/embeddings", {"model": "minilm", "input": "x", "return_dense": False, "dimensions": 4096})
    assert plain.status_code == 400 and error_of(plain)["code"] == "unsupported_output"


# -- check 2: rerank returns the library's scores, sorted, top_n, return_documents ---------------
@pytest.mark.parametrize("name", ["rr", "llm-rr", "layerwise", "bi-encoder"])
def test_rerank_matches_the_library(server, name, tiny_xlmr_reranker, golden_dir, minilm_dir):
    """Cross-encoder, Yes-logit LLM reranker, layerwise LLM reranker, and an embedder used as a reranker."""
    source = {
        "rr": tiny_xlmr_reranker,
        "llm-rr": golden_dir / "models" / "gemma-llm-reranker",
        "layerwise": golden_dir / "models" / "minicpm-layerwise",
        "bi-encoder": minilm_dir,
    }[name]
    library = Reranker.from_pretrained(str(source))
    query = "which animal eats bamboo?"
    pairs = [(query, t) for t in TEXTS]
    expected = library.compute_score(pairs, normalize=True)
    response = post(server, "/v1/rerank", {"model": name, "query": query, "documents": TEXTS})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["object"] == "rerank" and body["model"] == name
    results = body["results"]
    assert [r["index"] for r in results] == sorted(range(3), key=lambda i: -expected[i])
    np.testing.assert_allclose([r["relevance_score"] for r in results], sorted(expected, reverse=True), atol=1e-5)
    assert all("document" not in r for r in results)
    if hasattr(library, "tokenize_pairs"):  # a bi-encoder reads the query once and each passage alone
        assert body["usage"]["total_tokens"] == sum(len(ids) for ids in library.tokenize_pairs(pairs).ids)
    assert body["usage"]["total_tokens"] > 0

    raw = post(
        server,
        "/rerank",
        {
            "model": name,
            "query": query,
            "documents": [{"text": t} for t in TEXTS],
            "top_n": 2,
            "return_documents": True,
            "raw_scores": True,
        },
    ).json()["results"]
    raw_expected = library.compute_score(pairs)
    best = sorted(range(3), key=lambda i: -raw_expected[i])[:2]
    assert [r["index"] for r in raw] == best
    np.testing.assert_allclose([r["relevance_score"] for r in raw], [raw_expected[i] for i in best], atol=1e-5)
    assert [r["document"]["text"] for r in raw] == [TEXTS[i] for i in best]


# -- check 3: auth, 400, 422, 413 against the real server ---------------------------------------
def test_missing_or_wrong_key_is_401(server):
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}):
        response = post(server, "/v1/embeddings", {"model": "minilm", "input": "x"}, headers=headers)
        assert response.status_code == 401
        assert error_of(response)["code"] == "invalid_api_key"
        assert response.headers["www-authenticate"] == "Bearer"
    assert httpx.get(f"{server.url}/v1/models", timeout=10).status_code == 401
    # even a malformed body gets 401 first: nothing is read before the key is checked
    assert httpx.post(f"{server.url}/v1/embeddings", content=b"{oops", timeout=10).status_code == 401
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{server.url}/v1", api_key="wrong", max_retries=0).embeddings.create(
            model="minilm", input="x"
        )
    # health, metrics and docs stay open for probes and scrapers
    for path in ("/health", "/metrics", "/docs", "/openapi.json"):
        assert httpx.get(f"{server.url}{path}", timeout=10).status_code == 200, path
    for path in ("/health", "/v1/health", "/metrics"):  # probes that send HEAD (it was 405)
        head = httpx.head(f"{server.url}{path}", timeout=10)
        assert head.status_code == 200 and head.content == b"", path
    # the scheme's case does not matter
    lower = post(
        server, "/v1/embeddings", {"model": "minilm", "input": "x"}, headers={"Authorization": f"bearer {KEY}"}
    )
    assert lower.status_code == 200


def test_cors_origins_get_preflight_and_response_headers(server):
    """--cors-origin lets a web page on that origin call the API: the browser's preflight (OPTIONS, no API key)
    is answered before the key check, and answers, errors included, carry Access-Control-Allow-Origin."""
    preflight = {
        "Origin": CORS_ORIGIN,
        "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization, content-type",
    }
    response = httpx.options(f"{server.url}/v1/embeddings", headers=preflight, timeout=10)
    assert response.status_code == 200, response.text
    assert response.headers["access-control-allow-origin"] == CORS_ORIGIN
    assert "POST" in response.headers["access-control-allow-methods"]
    assert {"authorization", "content-type"} <= {
        h.strip().lower() for h in response.headers["access-control-allow-headers"].split(",")
    }
    called = post(server, "/v1/embeddings", {"model": "tiny", "input": "x"}, headers={**AUTH, "Origin": CORS_ORIGIN})
    assert called.status_code == 200 and called.headers["access-control-allow-origin"] == CORS_ORIGIN
    assert "retry-after" in called.headers["access-control-expose-headers"].lower()
    refused = post(server, "/v1/embeddings", {"model": "tiny", "input": "x"}, headers={"Origin": CORS_ORIGIN})
    assert refused.status_code == 401 and refused.headers["access-control-allow-origin"] == CORS_ORIGIN
    # an origin not listed gets no CORS headers, so the browser blocks the page's call
    other = httpx.options(f"{server.url}/v1/embeddings", headers={**preflight, "Origin": "https://evil.example"})
    assert other.status_code == 400 and "access-control-allow-origin" not in other.headers


def test_cors_preflights_are_counted_in_metrics(server):
    """The CORS middleware sat outside the one that counts requests: a preflight, answered or refused,
    never showed in bgekit_requests_total. It counts under its route and status as any request."""
    preflight = {"Origin": CORS_ORIGIN, "Access-Control-Request-Method": "POST"}
    counts = {
        ("/rerank", "200"): lambda: httpx.options(f"{server.url}/v1/rerank", headers=preflight, timeout=10),
        ("/rerank", "400"): lambda: httpx.options(
            f"{server.url}/rerank", headers={**preflight, "Origin": "https://evil.example"}, timeout=10
        ),
    }
    for (route, status), send in counts.items():
        labels = {"route": route, "status": status}
        before = metric_value(server, "bgekit_requests_total", labels)
        assert send().status_code == int(status)
        assert metric_value(server, "bgekit_requests_total", labels) == before + 1, (route, status)


def test_unknown_model_and_wrong_task_are_400(server, client):
    with pytest.raises(openai.BadRequestError) as caught:
        client.embeddings.create(model="no-such-model", input="x")
    assert caught.value.body["code"] == "model_not_found" and caught.value.body["param"] == "model"
    wrong_task = post(server, "/v1/embeddings", {"model": "rr", "input": "x"})
    assert wrong_task.status_code == 400 and error_of(wrong_task)["code"] == "wrong_task"
    rerank_unknown = post(server, "/v1/rerank", {"model": "minilm", "query": "q", "documents": ["d"]})
    assert rerank_unknown.status_code == 400
    too_wide = post(server, "/v1/embeddings", {"model": "minilm", "input": "x", "dimensions": 4096})
    assert too_wide.status_code == 400 and error_of(too_wide)["param"] == "dimensions"


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"model": "minilm"}, "input"),
        ({"model": "minilm", "input": 5}, "input"),
        ({"model": "minilm", "input": []}, "input"),
        ({"model": "minilm", "input": "x", "encoding_format": "int8"}, "encoding_format"),
        ({"model": "minilm", "input": "x", "dimensions": 0}, "dimensions"),
        ({"model": "minilm", "input": "x", "input_type": "doc"}, "input_type"),
        ({"model": "minilm", "input": "x", "dimensions": True}, "dimensions"),  # no lax coercions
        ({"model": "minilm", "input": "x", "truncate": "yes"}, "truncate"),
        ({"model": "m3", "input": "x", "return_sparse": "true"}, "return_sparse"),
    ],
)
def test_bad_schema_is_422_in_openai_shape(server, body, param):
    response = post(server, "/v1/embeddings", body)
    assert response.status_code == 422, response.text
    error = error_of(response)
    assert error["type"] == "invalid_request_error" and error["param"] == param and error["code"] == "invalid_schema"


def test_token_id_inputs_are_refused_naming_why_and_a_null_encoding_format_is_float(server, client, minilm):
    """OpenAI takes token arrays (LangChain's OpenAIEmbeddings sends tiktoken ids by default); they got
    'input[0]: Input should be a valid string'. They are refused saying why and what to send. LiteLLM sends
    encoding_format null (so the openai client does not ask for base64): that was a 422, it is float."""
    for tokens in ([1, 2, 3], [[1, 2], [3]]):
        response = post(server, "/v1/embeddings", {"model": "minilm", "input": tokens})
        assert response.status_code == 422, response.text
        error = error_of(response)
        assert error["param"] == "input" and error["code"] == "invalid_schema"
        assert error["message"].startswith("input: token ids (integers) are not accepted; this server embeds text")
    with pytest.raises(openai.UnprocessableEntityError, match="check_embedding_ctx_length=False"):
        client.embeddings.create(model="minilm", input=[[101, 2023]])
    mixed = error_of(post(server, "/v1/embeddings", {"model": "minilm", "input": ["a", 3]}))
    assert mixed["message"].startswith("input[1]: Input should be a valid string")  # a stray number: as before
    null = post(server, "/v1/embeddings", {"model": "minilm", "input": TEXTS, "encoding_format": None})
    assert null.status_code == 200, null.text
    got = np.array([d["embedding"] for d in null.json()["data"]], dtype=np.float32)
    np.testing.assert_allclose(got, minilm.encode(TEXTS), atol=1e-5)


def test_rerank_top_n_past_the_documents_and_empty_documents(server, tiny_xlmr_reranker):
    """Cohere / Jina clients send top_n larger than the document count and empty strings among documents
    (already right; kept so): all results, and the library's scores for the empty ones."""
    body = {"model": "rr", "query": "q", "documents": ["", "pandas eat bamboo", ""], "top_n": 10}
    response = post(server, "/v1/rerank", body)
    assert response.status_code == 200, response.text
    results = response.json()["results"]
    assert sorted(r["index"] for r in results) == [0, 1, 2]
    library = Reranker.from_pretrained(str(tiny_xlmr_reranker))
    expected = library.compute_score([("q", d) for d in body["documents"]], normalize=True)
    np.testing.assert_allclose([r["relevance_score"] for r in sorted(results, key=lambda r: r["index"])], expected)


def test_bad_rerank_schema_and_non_json_body_are_422(server):
    assert post(server, "/v1/rerank", {"model": "rr", "query": "q", "documents": []}).status_code == 422
    assert post(server, "/v1/rerank", {"model": "rr", "documents": ["d"]}).status_code == 422
    assert post(server, "/v1/rerank", {"model": "rr", "query": "q", "documents": ["d"], "top_n": 0}).status_code == 422
    not_json = httpx.post(f"{server.url}/v1/embeddings", content=b"input=hello", headers=AUTH, timeout=10)
    assert not_json.status_code == 422 and "application/json" in error_of(not_json)["message"]


def test_too_long_input_is_truncated_or_413(server, minilm):
    long_text = "pandas eat bamboo " * 400  # far beyond MiniLM's 256 tokens
    cut = post(server, "/v1/embeddings", {"model": "minilm", "input": long_text})
    assert cut.status_code == 200  # the server's default: truncate, as the library does
    np.testing.assert_allclose(cut.json()["data"][0]["embedding"], minilm.encode(long_text), atol=1e-5)
    assert cut.json()["usage"]["prompt_tokens"] == 256
    assert metric_value(server, "bgekit_truncated_inputs_total", {"model": "minilm"}) >= 1
    refused = post(server, "/v1/embeddings", {"model": "minilm", "input": ["ok", long_text], "truncate": False})
    assert refused.status_code == 413
    error = error_of(refused)
    assert error["code"] == "input_too_long" and "256 tokens" in error["message"]
    refused_pairs = post(
        server, "/v1/rerank", {"model": "rr", "query": "q", "documents": [long_text], "truncate": False}
    )
    assert refused_pairs.status_code == 413 and error_of(refused_pairs)["param"] == "documents"


def test_an_llm_reranker_413_gives_the_pair_budget_it_really_has(server, golden_dir, tiny_xlmr_reranker):
    """An LLM reranker cuts (bos + query, separator + document) to max_length + len(separator + prompt): the
    413 named max_length (512) as the pair's limit, a number that was neither the query's, nor the document's,
    nor the pair's. It gives the three real limits and the tokens of the first pair past one of them."""
    from bgekit.models.llm_reranker import DEFAULT_PROMPT

    library = Reranker.from_pretrained(str(golden_dir / "models" / "gemma-llm-reranker"))
    tokenizer = library.tokenizer

    def tokens(text: str) -> int:  # as the model reads a side: instruction included, no special tokens
        return len(tokenizer.plain_ids([text])[0][0])

    together = 512 + tokens(DEFAULT_PROMPT) - 1  # the prompt comes on top of max_length; bos takes one
    query = "a " * 200
    q = tokens(library.detailed_pairs([(query, "")])[0][0])
    words = next(k for k in range(1, 600) if tokens(library.detailed_pairs([("", "a " * k)])[0][1]) == together - q)
    body = {"model": "llm-rr", "query": query, "documents": ["a", "a " * words], "truncate": False}
    assert post(server, "/v1/rerank", body).status_code == 200  # exactly the budget: whole
    refused = post(server, "/v1/rerank", {**body, "documents": ["a", "a " * (words + 1)]})
    assert refused.status_code == 413
    message = error_of(refused)["message"]
    assert f"documents[1] has {together - q + 1} tokens, the query {q}" in message, message
    assert "a query of at most 384 tokens, a document of at most 512 and both together at most " in message
    assert f"together at most {together} " in message
    # a cross-encoder's special tokens take part of max_length instead
    long_text = "pandas eat bamboo " * 400
    cross = post(server, "/v1/rerank", {"model": "rr", "query": "q", "documents": [long_text], "truncate": False})
    assert cross.status_code == 413
    length = httpx.get(f"{server.url}/v1/models/rr", headers=AUTH, timeout=10).json()["max_length"]
    limit = length - Reranker.from_pretrained(str(tiny_xlmr_reranker)).tokenizer.n_special_pair  # <s>q</s></s>d</s>
    message = error_of(cross)["message"]
    assert f"a query of at most {length * 3 // 4} tokens and both together at most {limit} " in message, message


def test_broken_json_and_lone_surrogates_are_400_naming_the_problem(server):
    headers = {**AUTH, "Content-Type": "application/json"}
    broken = httpx.post(f"{server.url}/v1/embeddings", content=b'{"input": "a",}', headers=headers, timeout=10)
    assert broken.status_code == 400, broken.text
    error = error_of(broken)
    assert error["code"] == "invalid_json" and error["param"] is None and "character 14" in error["message"]
    latin1 = httpx.post(f"{server.url}/v1/embeddings", content=b'{"input": "caf\xe9"}', headers=headers, timeout=10)
    assert latin1.status_code == 400 and error_of(latin1)["code"] == "invalid_json"  # was code null, no reason
    assert "not UTF-8 JSON (byte 0xe9 at offset 14)" in error_of(latin1)["message"]
    for path, body in (
        ("/v1/embeddings", b'{"model": "minilm", "input": ["ok", "bad \\ud800"]}'),
        ("/v1/rerank", b'{"model": "rr", "query": "\\ud800", "documents": ["a"]}'),
        ("/v1/rerank", b'{"model": "bi-encoder", "query": "q", "documents": ["a", "\\udfff"]}'),
    ):
        response = httpx.post(f"{server.url}{path}", content=body, headers=headers, timeout=10)
        assert response.status_code == 400, (path, response.text)
        assert "not valid Unicode" in error_of(response)["message"]


def test_an_embedder_reranker_states_its_own_limits(server):
    """An embedder used as a reranker cuts the query and each document at its own lengths (MiniLM: 256, of
    which [CLS] and [SEP] take two). Its 413 said 'longer than this model's limit of 256 tokens a document':
    it names the first pair too long and the limits in tokens of the texts sent, as a cross-encoder's does."""
    cards = {m["id"]: m for m in httpx.get(f"{server.url}/v1/models", headers=AUTH, timeout=10).json()["data"]}
    assert cards["bi-encoder"]["max_length"] == 256
    limits = "it reads a query of at most 254 tokens and a document of at most 254, each on its own (tokens of"
    body = {"model": "bi-encoder", "query": "q", "documents": ["a", "word " * 254], "truncate": False}
    assert post(server, "/v1/rerank", body).status_code == 200  # 254 tokens + [CLS] + [SEP]: whole
    one = post(server, "/v1/rerank", {**body, "documents": ["a", "word " * 255]})
    assert one.status_code == 413 and error_of(one)["param"] == "documents"
    message = error_of(one)["message"]
    assert message.startswith("1 of 2 (query, document) pairs are too long for model 'bi-encoder': documents[1] "
                              f"has 255 tokens, the query 1; {limits}"), message  # fmt: skip
    every = post(server, "/v1/rerank", {**body, "query": "word " * 255, "documents": ["a", "b"]})
    assert every.status_code == 413  # a cut query cuts every pair
    assert error_of(every)["message"].startswith("2 of 2 (query, document) pairs are too long for model 'bi-encoder': "
                                                 f"documents[0] has 1 tokens, the query 255; {limits}")  # fmt: skip


def test_413_names_the_max_length_option_and_the_models_own_limit(server, tmp_path, tiny_bert, tiny_xlmr_reranker):
    """The 413 said 'the server's --max-length sets them' whatever set the limit. It names the option and its
    env var, says whether the limit is the model's default, the server's --max-length or the most the model
    reads (its position table), and how far --max-length can move it."""
    long_text = "pandas eat bamboo " * 400
    off = {"truncate": False}
    minilm = error_of(post(server, "/v1/embeddings", {"model": "minilm", "input": long_text, **off}))["message"]
    assert (
        "longer than model 'minilm' reads: 256 tokens, special tokens included (256 is the model's default; the "
        in minilm
    )
    assert "--max-length (env BGEKIT_MAX_LENGTH) sets it, up to the model's 512 positions)" in minilm, minilm
    assert "truncate=true (or start the server with --truncate, env BGEKIT_TRUNCATE=true)" in minilm
    tiny = error_of(post(server, "/v1/embeddings", {"model": "tiny", "input": long_text, **off}))["message"]
    ceiling = "128 is the size of the model's position table, the most it reads: --max-length / BGEKIT_MAX_LENGTH "
    ceiling += "cannot raise it)"
    assert ceiling in tiny, tiny
    query = error_of(
        post(server, "/v1/embeddings", {"model": "tiny", "input": long_text, "input_type": "query", **off})
    )
    assert "reads: 128 tokens a query," in query["message"]
    rerank = error_of(post(server, "/v1/rerank", {"model": "rr", "query": "q", "documents": [long_text], **off}))
    assert (
        "These follow from its max length: 64 is the size of the model's position table, the most" in rerank["message"]
    )
    assert rerank["message"].endswith("; the query's limit is 3/4 of it. Shorten them, or send truncate=true (or start "
                                      "the server with --truncate, env BGEKIT_TRUNCATE=true) to cut them")  # fmt: skip
    bi = error_of(post(server, "/v1/rerank", {"model": "bi-encoder", "query": "q", "documents": [long_text], **off}))
    assert (
        "from its max length: 256 is the model's default; the server's --max-length (env BGEKIT_MAX_LENGTH)"
        in bi["message"]
    )
    args = ["--model", str(tiny_bert), "--reranker", str(tiny_xlmr_reranker), "--max-length", "16"]
    with running_server(args, tmp_path / "server.log", env={"BGEKIT_SERVED_MODEL_NAME": "e\nr"}) as small:
        embedded = post(small, "/v1/embeddings", {"input": long_text, **off}, headers={})
        message = error_of(embedded)["message"]
        assert (
            embedded.status_code == 413 and "model 'e' reads: 16 tokens, special tokens included (16 is the " in message
        )
        assert "server's --max-length 16 (env BGEKIT_MAX_LENGTH), up to the model's 128 positions)" in message, message
        reranked = error_of(post(small, "/v1/rerank", {"query": "q", "documents": [long_text], **off}, headers={}))
        assert (
            "16 is the server's --max-length 16 (env BGEKIT_MAX_LENGTH), up to the model's 64 positions; the "
            in (reranked["message"])
        )


def test_too_many_inputs_is_413(server):
    response = post(server, "/v1/embeddings", {"model": "tiny", "input": ["x"] * (MAX_CLIENT_BATCH + 1)})
    assert response.status_code == 413 and error_of(response)["code"] == "too_many_inputs"
    assert post(server, "/v1/embeddings", {"model": "tiny", "input": ["x"] * MAX_CLIENT_BATCH}).status_code == 200


def test_a_body_over_the_limit_is_413_before_it_is_parsed(server):
    big = json.dumps({"model": "tiny", "input": "word " * (MAX_REQUEST_BYTES // 5)}).encode()
    declared = httpx.post(f"{server.url}/v1/embeddings", content=big, headers=AUTH, timeout=60)
    assert declared.status_code == 413 and error_of(declared)["code"] == "request_too_large"
    chunked = httpx.post(  # no Content-Length: counted as it arrives
        f"{server.url}/v1/embeddings", content=iter([big[i : i + 65536] for i in range(0, len(big), 65536)]),
        headers=AUTH, timeout=60,
    )  # fmt: skip
    assert chunked.status_code == 413 and error_of(chunked)["code"] == "request_too_large"
    fits = {"model": "tiny", "input": "word " * (MAX_REQUEST_BYTES // 10)}
    assert post(server, "/v1/embeddings", fits).status_code == 200


def test_unknown_route_is_404_in_openai_shape(server):
    response = httpx.get(f"{server.url}/v1/nothing", headers=AUTH, timeout=10)
    assert response.status_code == 404 and error_of(response)["code"] == "not_found"


# -- models, docs, metrics ----------------------------------------------------------------------
def test_models_list_and_openapi_docs(server, client):
    cards = {m.id: m for m in client.models.list().data}
    assert set(cards) == {"minilm", "m3", "tiny", "rr", "llm-rr", "layerwise", "bi-encoder"}
    assert cards["minilm"].model_extra["task"] == "embeddings"
    assert cards["minilm"].model_extra["dimensions"] == 384
    assert cards["m3"].model_extra["outputs"] == ["dense", "sparse", "colbert"]
    assert cards["llm-rr"].model_extra["model_class"] == "FlagLLMReranker"
    one = client.models.retrieve("m3")
    assert one.id == "m3" and one.model_extra["outputs"] == ["dense", "sparse", "colbert"]
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("no-such-model")
    schema = httpx.get(f"{server.url}/openapi.json", timeout=10).json()
    assert {"/v1/embeddings", "/v1/rerank", "/v1/models", "/v1/health", "/v1/metrics"} <= set(schema["paths"])
    request_schema = schema["components"]["schemas"]["EmbeddingRequest"]["properties"]
    assert {"input", "model", "encoding_format", "dimensions", "input_type", "return_sparse"} <= set(request_schema)


def metric_value(server, name: str, labels: dict[str, str]) -> float:
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(f"{server.url}/metrics", timeout=10).text
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return sample.value
    return 0.0


def test_metrics_have_the_prometheus_content_types(server):
    """/metrics answered the plain text format under prometheus-client's CONTENT_TYPE_LATEST, which recent
    releases make ``version=1.0.0``: a format the body was not. It answers as prometheus-client's own exporters
    do: the 0.0.4 text format by default, OpenMetrics to a scraper that asks for it (Prometheus does)."""
    from prometheus_client.openmetrics.parser import text_string_to_metric_families as openmetrics_families
    from prometheus_client.parser import text_string_to_metric_families

    plain = httpx.get(f"{server.url}/metrics", timeout=10)
    assert plain.status_code == 200
    assert plain.headers["content-type"] == "text/plain; version=0.0.4; charset=utf-8"
    assert "bgekit_requests" in {family.name for family in text_string_to_metric_families(plain.text)}
    accept = "application/openmetrics-text;version=1.0.0;q=0.6,text/plain;version=0.0.4;q=0.3,*/*;q=0.2"
    scraped = httpx.get(f"{server.url}/metrics", headers={"Accept": accept}, timeout=10)
    assert scraped.headers["content-type"].startswith("application/openmetrics-text; version=1.0.0; charset=utf-8")
    assert scraped.text.endswith("# EOF\n")
    assert "bgekit_requests" in {family.name for family in openmetrics_families(scraped.text)}
    assert httpx.head(f"{server.url}/metrics", timeout=10).headers["content-type"] == plain.headers["content-type"]


# -- check 4: 500 requests from 50 concurrent clients, all correct, batching visible -----------------
def test_500_requests_from_50_concurrent_clients(server, tiny_prompted):
    n_clients, per_client = 50, 10
    texts = [f"request {i}: " + "the panda eats bamboo " * (1 + i % 7) for i in range(n_clients * per_client)]
    expected = Embedder.from_pretrained(str(tiny_prompted)).encode(texts)
    batches_before = metric_value(server, "bgekit_batch_requests_count", {"model": "tiny"})
    requests_before = metric_value(server, "bgekit_batch_requests_sum", {"model": "tiny"})

    async def one_client(index: int) -> list[tuple[int, int, list[float]]]:
        out = []
        async with httpx.AsyncClient(base_url=server.url, headers=AUTH, timeout=60) as http:
            for k in range(per_client):
                i = index * per_client + k
                response = await http.post("/v1/embeddings", json={"model": "tiny", "input": texts[i]})
                out.append((i, response.status_code, response.json()["data"][0]["embedding"]))
        return out

    async def all_clients():
        return await asyncio.wait_for(asyncio.gather(*(one_client(c) for c in range(n_clients))), timeout=180)

    started = time.monotonic()
    results = [r for client_results in asyncio.run(all_clients()) for r in client_results]
    elapsed = time.monotonic() - started
    assert len(results) == 500 and all(status == 200 for _, status, _ in results)
    got = np.array([vector for _, _, vector in sorted(results, key=lambda r: r[0])], dtype=np.float32)
    np.testing.assert_allclose(got, expected, atol=1e-5)
    batches = metric_value(server, "bgekit_batch_requests_count", {"model": "tiny"}) - batches_before
    batched = metric_value(server, "bgekit_batch_requests_sum", {"model": "tiny"}) - requests_before
    assert batched == 500
    assert batched / batches > 1, f"no dynamic batching: {batches} batches for 500 requests in {elapsed:.1f} s"
    assert metric_value(server, "bgekit_requests_total", {"route": "/embeddings", "status": "200"}) >= 500
    assert metric_value(server, "bgekit_input_tokens_total", {"model": "tiny"}) > 0


def test_load_test_script_reports_throughput_and_latency(server):
    script = ROOT / "benchmarks" / "load_test.py"
    result = subprocess.run(
        [
            sys.executable,
            str(script),
            *("--url", server.url, "--model", "tiny", "--api-key", KEY),
            *("--concurrency", "1", "8", "--requests", "40", "--duration", "20"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert "p50" in result.stdout and "p99" in result.stdout and "req/s" in result.stdout
    refused = subprocess.run(
        [sys.executable, str(script), "--url", "http://example.com:80", "--model", "tiny"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert refused.returncode != 0 and "loopback" in refused.stderr


def test_an_idle_server_runs_a_lone_request_at_once(server):
    """No batching window: with nothing else queued, a request goes straight to the model."""
    series = {"model": "m3"}
    waits_before = metric_value(server, "bgekit_queue_wait_seconds_count", series)
    fast_before = metric_value(server, "bgekit_queue_wait_seconds_bucket", {**series, "le": "0.05"})
    for text in TEXTS:
        assert post(server, "/v1/embeddings", {"model": "m3", "input": text}).status_code == 200
    assert metric_value(server, "bgekit_queue_wait_seconds_count", series) - waits_before == len(TEXTS)
    fast = metric_value(server, "bgekit_queue_wait_seconds_bucket", {**series, "le": "0.05"}) - fast_before
    assert fast == len(TEXTS)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ([], "nothing to serve"),
        (["--model", "/no/such/folder"], "does not exist"),
        (["--model", "x", "--served-model-name", "a", "--served-model-name", "b"], "--served-model-name"),
        (["--reranker", "/no/such/folder", "--examples", "x.json"], "are for --model"),
        (["--model", "/no/such/folder", "--cutoff-layers", "28"], "but no --reranker is served"),
        (["--model", "x", "--cors-origin", "https://app.example/"], "is not an origin"),
        # a family flag is about one model: with several, a value that names none is refused (it set them all)
        (["--model", "a", "--model", "b", "--pooling-method", "last_token"], "does not say which model it is for"),
        (["--model", "a", "--reranker", "r", "--query-instruction", "r=Find: "], "'r' is a --reranker"),
        (["--model", "a", "--pooling-method", "a=cls", "--pooling-method", "mean"], "given twice for 'a'"),
    ],
)
def test_serve_command_errors_are_one_line(args, message):
    from .serving import BGEKIT

    env = {k: v for k, v in os.environ.items() if not k.startswith("BGEKIT_")}
    result = subprocess.run([BGEKIT, "serve", *args], capture_output=True, text=True, timeout=120, env=env)
    assert result.returncode == 2, result.stderr
    assert message in result.stderr and "Traceback" not in result.stderr


def test_a_port_in_use_is_refused_before_the_models_load(minilm_dir):
    """Found by uvicorn once every model had loaded, a busy port was a log line and exit status 3; it is
    one clear line and status 2 before anything loads."""
    import socket

    from .serving import BGEKIT

    env = {k: v for k, v in os.environ.items() if not k.startswith("BGEKIT_")}
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        args = [BGEKIT, "serve", "--model", str(minilm_dir), "--host", "127.0.0.1", "--port", str(port)]
        result = subprocess.run(args, capture_output=True, text=True, timeout=120, env=env)
    assert result.returncode == 2, result.stderr
    assert f"error: cannot listen on 127.0.0.1:{port}" in result.stderr and "Traceback" not in result.stderr
    assert "loaded" not in result.stderr


def test_an_empty_query_instruction_variable_means_no_instruction(tmp_path, tiny_prompted):
    """``BGEKIT_QUERY_INSTRUCTION=`` (as ``--query-instruction ''``) turns the model's query prompt off; click
    reads an empty variable as unset, so the model's "query: " was served."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("BGEKIT_")} | {"BGEKIT_QUERY_INSTRUCTION": ""}
    args = ["--model", str(tiny_prompted), "--served-model-name", "tiny"]
    with running_server(args, tmp_path / "server.log", env=env) as srv:
        body = {"model": "tiny", "input": TEXTS, "input_type": "query"}
        response = httpx.post(f"{srv.url}/v1/embeddings", json=body, timeout=60)
    assert response.status_code == 200, response.text
    got = np.array([d["embedding"] for d in response.json()["data"]])
    np.testing.assert_allclose(got, Embedder.from_pretrained(str(tiny_prompted)).encode(TEXTS), atol=1e-5)


def test_family_flags_name_the_model_they_are_for(tmp_path, tiny_prompted):
    """With several --model, --query-instruction / --pooling-method (and --model-class, --examples) take
    NAME=VALUE for one served model; the others keep their own. A flag used to set every model alike:
    last-token pooling for a BERT beside a decoder, one model's instruction on another."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("BGEKIT_")}
    env["BGEKIT_QUERY_INSTRUCTION"] = "a=Find the passage: "  # one value a line: an instruction has spaces
    args = ["--model", str(tiny_prompted), "--model", str(tiny_prompted), "--served-model-name", "a"]
    args += ["--served-model-name", "b", "--pooling-method", "b=mean"]
    got = {}
    with running_server(args, tmp_path / "server.log", env=env) as srv:
        for name in ("a", "b"):
            body = {"model": name, "input": TEXTS, "input_type": "query"}
            response = httpx.post(f"{srv.url}/v1/embeddings", json=body, timeout=60)
            assert response.status_code == 200, response.text
            got[name] = np.array([d["embedding"] for d in response.json()["data"]])
    a = Embedder.from_pretrained(str(tiny_prompted), query_instruction_for_retrieval="Find the passage: ")
    b = Embedder.from_pretrained(str(tiny_prompted), pooling_method="mean")
    assert a.pooling_method == "cls" and b.query_instruction_for_retrieval == "query: "  # each keeps the rest
    np.testing.assert_allclose(got["a"], a.encode_queries(TEXTS), atol=1e-5)
    np.testing.assert_allclose(got["b"], b.encode_queries(TEXTS), atol=1e-5)


def test_a_family_flag_a_model_cannot_take_is_refused_before_any_model_loads(minilm_dir, golden_dir):
    """cls pooling named for a decoder was refused by the decoder's class once the models before it had loaded
    and warmed up; it is refused before the first one loads."""
    from .serving import BGEKIT

    env = {k: v for k, v in os.environ.items() if not k.startswith("BGEKIT_")}
    args = ["--model", str(minilm_dir), "--model", str(golden_dir / "models" / "mistral-llm")]
    args += ["--served-model-name", "minilm", "--served-model-name", "llm", "--pooling-method", "llm=cls"]
    result = subprocess.run([BGEKIT, "serve", *args], capture_output=True, text=True, timeout=120, env=env)
    assert result.returncode == 2, result.stderr
    assert "--pooling-method cls" in result.stderr and "pools the last token" in result.stderr
    assert "loaded" not in result.stderr and "Traceback" not in result.stderr


def test_serve_packed_setting_reaches_the_models(golden_dir):
    """``BGEKIT_PACKED=on`` (``--packed on``) asks every model for packed batches: a layerwise reranker,
    which cannot take them, stops the server before it binds, with one clear line."""
    from .serving import BGEKIT

    env = {k: v for k, v in os.environ.items() if not k.startswith("BGEKIT_")} | {"BGEKIT_PACKED": "on"}
    folder = golden_dir / "models" / "minicpm-layerwise"
    result = subprocess.run(
        [BGEKIT, "serve", "--reranker", str(folder)], capture_output=True, text=True, timeout=120, env=env
    )
    assert result.returncode == 2, result.stderr
    assert "packed=True is not supported" in result.stderr and "Traceback" not in result.stderr


def test_serve_backend_onnx_serves_the_library_results(tmp_path, tiny_bert, tiny_xlmr_reranker, golden_dir):
    """``BGEKIT_BACKEND=onnx`` (``--backend onnx``) runs every model on ONNX Runtime: the served vectors and
    scores are the torch library's to float32 rounding; a family with no export stops the server first."""
    pytest.importorskip("onnxruntime")
    from .serving import BGEKIT

    env = {k: v for k, v in os.environ.items() if not k.startswith("BGEKIT_")}
    env |= {"BGEKIT_BACKEND": "onnx", "BGEKIT_CACHE": str(tmp_path / "cache")}
    args = ["--model", str(tiny_bert), "--reranker", str(tiny_xlmr_reranker)]
    args += ["--served-model-name", "tiny", "--served-model-name", "rr"]
    query = "Where do pandas live?"
    with running_server(args, tmp_path / "server.log", env=env) as srv:
        embedded = httpx.post(f"{srv.url}/v1/embeddings", json={"model": "tiny", "input": TEXTS}, timeout=60)
        body = {"model": "rr", "query": query, "documents": TEXTS, "raw_scores": True}
        ranked = httpx.post(f"{srv.url}/v1/rerank", json=body, timeout=60)
    assert embedded.status_code == ranked.status_code == 200, (embedded.text, ranked.text)
    assert any(path.name == "model.onnx" for path in (tmp_path / "cache").rglob("*"))  # it really ran the export
    got = np.array([d["embedding"] for d in embedded.json()["data"]], dtype=np.float32)
    np.testing.assert_allclose(got, Embedder.from_pretrained(str(tiny_bert), devices="cpu").encode(TEXTS), atol=1e-4)
    scores = {r["index"]: r["relevance_score"] for r in ranked.json()["results"]}
    want = Reranker.from_pretrained(str(tiny_xlmr_reranker), devices="cpu").compute_score([(query, t) for t in TEXTS])
    np.testing.assert_allclose([scores[i] for i in range(len(TEXTS))], want, atol=1e-4)
    decoder = golden_dir / "models" / "mistral-llm"
    refused = subprocess.run(
        [BGEKIT, "serve", "--model", str(decoder)], capture_output=True, text=True, timeout=120, env=env
    )
    assert refused.returncode == 2 and "runs encoder models" in refused.stderr and "Traceback" not in refused.stderr


def test_serve_family_and_layer_options_reach_the_models(tmp_path, golden_dir):
    """--examples / --query-instruction / --model-class for embedders (bge-en-icl was served zero-shot),
    --cutoff-layers / --compress-* for layerwise and lightweight rerankers (always the last layer before)."""
    from bgekit import FlagICLModel, LightWeightFlagLLMReranker

    from .serving import BGEKIT

    models = golden_dir / "models"
    examples = [{"instruct": "Find the answer.", "query": "what is BGE", "response": "An embedding model."}]
    (tmp_path / "examples.json").write_text(json.dumps(examples))
    env = {k: v for k, v in os.environ.items() if not k.startswith("BGEKIT_")}
    args = ["--model", str(models / "mistral-icl"), "--model-class", "decoder-only-icl"]
    args += ["--examples", str(tmp_path / "examples.json"), "--query-instruction", "Find the passage."]
    args += ["--reranker", str(models / "gemma2-lightweight"), "--served-model-name", "icl"]
    args += ["--served-model-name", "lw"]
    args += ["--cutoff-layers", "1", "--compress-ratio", "2", "--compress-layers", "1", "--dtype", "float32"]
    query = "Where do pandas live?"
    with running_server(args, tmp_path / "server.log", env=env) as srv:
        body = {"model": "icl", "input": TEXTS, "input_type": "query"}
        embedded = httpx.post(f"{srv.url}/v1/embeddings", json=body, timeout=60)
        body = {"model": "lw", "query": query, "documents": TEXTS, "raw_scores": True}
        ranked = httpx.post(f"{srv.url}/v1/rerank", json=body, timeout=60)
    assert embedded.status_code == ranked.status_code == 200, (embedded.text, ranked.text)
    icl = FlagICLModel(
        str(models / "mistral-icl"), query_instruction_for_retrieval="Find the passage.", examples_for_task=examples,
        use_fp16=False, devices="cpu",
    )  # fmt: skip
    got = np.array([d["embedding"] for d in embedded.json()["data"]], dtype=np.float32)
    np.testing.assert_allclose(got, icl.encode_queries(TEXTS), atol=1e-5)
    lightweight = LightWeightFlagLLMReranker(str(models / "gemma2-lightweight"), use_fp16=False, devices="cpu")
    want = lightweight.compute_score(
        [(query, t) for t in TEXTS], cutoff_layers=[1], compress_ratio=2, compress_layers=[1]
    )
    scores = {r["index"]: r["relevance_score"] for r in ranked.json()["results"]}
    np.testing.assert_allclose([scores[i] for i in range(len(TEXTS))], want, atol=1e-5)
    defaults = lightweight.compute_score([(query, t) for t in TEXTS])
    assert np.abs(np.array(defaults) - np.array(want)).max() > 1e-3  # the options changed the scores
    refused = subprocess.run(
        [BGEKIT, "serve", "--reranker", str(models / "minicpm-layerwise"), "--compress-ratio", "2"],
        capture_output=True, text=True, timeout=120, env=env,
    )  # fmt: skip
    assert refused.returncode == 2 and "--compress-ratio" in refused.stderr and "Traceback" not in refused.stderr


def test_rerank_order_follows_the_raw_scores(tiny_xlmr_reranker):
    """Logits above ~37 all turn into a sigmoid of 1.0: their order must come from the logits."""
    from bgekit.serve.engines import RerankEngine, Work

    engine = RerankEngine("rr", str(tiny_xlmr_reranker), Reranker.from_pretrained(str(tiny_xlmr_reranker)), 1)
    body = engine.render(
        Work([3, 3, 3], None, 9, 0), [40.0, 55.0, 38.0], documents=["a", "b", "c"], top_n=None,
        return_documents=False, raw_scores=False,
    )  # fmt: skip
    results = json.loads(body)["results"]
    assert [r["index"] for r in results] == [1, 0, 2] and {r["relevance_score"] for r in results} == {1.0}


def test_rerank_serves_one_layer_several_cutoff_layers_are_refused(golden_dir):
    """A served reranker gives one score a document: --cutoff-layers 1,2 is refused before anything loads (it
    served the last layer without a word), as is an engine around a model set to several layers."""
    from bgekit import InputError, LayerWiseFlagLLMReranker
    from bgekit.serve.engines import RerankEngine

    from .serving import BGEKIT

    folder = str(golden_dir / "models" / "minicpm-layerwise")
    env = {k: v for k, v in os.environ.items() if not k.startswith("BGEKIT_")}
    # a subprocess with a time limit: a server that starts instead of refusing fails the test, not hangs it
    args = [BGEKIT, "serve", "--reranker", folder, "--cutoff-layers", "1,2"]
    refused = subprocess.run(args, capture_output=True, text=True, timeout=120, env=env)
    assert refused.returncode == 2, refused.stderr
    assert "--cutoff-layers 1,2: a served reranker gives one score a document" in refused.stderr
    assert "Traceback" not in refused.stderr
    several = LayerWiseFlagLLMReranker(folder, devices="cpu", cutoff_layers=[1, 2])
    with pytest.raises(InputError, match=r"scores for 2 layers \(cutoff_layers=\[1, 2\]\)"):
        RerankEngine("lw", folder, several, 1024)


def test_an_embedder_reranker_413_counts_its_rerank_instruction(minilm_dir):
    """The query's tokens in the 413 are those the model reads: the rerank instruction included."""
    from bgekit.serve.engines import InputTooLong, RerankEngine

    model = Reranker.from_pretrained(str(minilm_dir), query_instruction_for_rerank="word word ", max_length=16)
    engine = RerankEngine("bi", str(minilm_dir), model, 1)
    engine.prepare("word " * 12, ["a"], False)  # 2 + 12 tokens + [CLS] + [SEP] = 16: whole
    with pytest.raises(InputTooLong, match=r"documents\[0\] has 1 tokens, the query 15; it reads a query of at most "
                                           r"14 tokens and a document of at most 14, each on its own"):  # fmt: skip
        engine.prepare("word " * 13, ["a"], False)


# -- Cohere v2: /v2/rerank, /v2/embed, and Cohere's input_type names on /v1/embeddings ----------
@pytest.mark.parametrize("name", ["rr", "llm-rr"])
def test_cohere_v2_rerank_matches_the_library(server, name, tiny_xlmr_reranker, golden_dir):
    """cohere.ClientV2 (and LangChain / LlamaIndex on it) posts /v2/rerank: it was a 404. The scores are the
    library's compute_score(normalize=True) on the same pairs, best first, in Cohere's v2 shape."""
    source = tiny_xlmr_reranker if name == "rr" else golden_dir / "models" / "gemma-llm-reranker"
    library = Reranker.from_pretrained(str(source))
    query = "which animal eats bamboo?"
    pairs = [(query, t) for t in TEXTS]
    expected = library.compute_score(pairs, normalize=True)
    response = post(server, "/v2/rerank", {"model": name, "query": query, "documents": TEXTS})
    assert response.status_code == 200, response.text
    body = response.json()
    assert set(body) == {"id", "results", "meta"} and body["id"]
    assert [r["index"] for r in body["results"]] == sorted(range(3), key=lambda i: -expected[i])
    np.testing.assert_allclose(
        [r["relevance_score"] for r in body["results"]], sorted(expected, reverse=True), atol=1e-5
    )
    assert all(set(r) == {"index", "relevance_score"} for r in body["results"])
    tokens = sum(len(ids) for ids in library.tokenize_pairs(pairs).ids)
    assert body["meta"]["api_version"]["version"] == "2" and body["meta"]["tokens"]["input_tokens"] == tokens
    top = post(server, "/v2/rerank", {"model": name, "query": query, "documents": TEXTS, "top_n": 2}).json()
    assert [r["index"] for r in top["results"]] == [r["index"] for r in body["results"][:2]]
    with_text = post(
        server, "/v2/rerank", {"model": name, "query": query, "documents": TEXTS, "return_documents": True}
    )
    assert [r["document"]["text"] for r in with_text.json()["results"]] == [TEXTS[r["index"]] for r in body["results"]]


def test_cohere_v2_rerank_max_tokens_per_doc_cuts_each_document(server, minilm_dir):
    """max_tokens_per_doc cuts each document to its first N tokens (the model's tokens of the document as sent)
    before it meets the query; Cohere's default 4096 is past the model's own limit and changes nothing."""
    library = Reranker.from_pretrained(str(minilm_dir))  # served as "bi-encoder"
    head = "Paris is the"
    n = len(library.embedder.tokenizer.plain_ids([head])[0][0])
    documents = [head + " capital of France, on the Seine.", "bamboo"]  # the second is short: whole
    body = {"model": "bi-encoder", "query": "where is Paris?", "documents": documents}
    want_cut = library.compute_score([("where is Paris?", head), ("where is Paris?", documents[1])], normalize=True)
    want_whole = library.compute_score([("where is Paris?", d) for d in documents], normalize=True)
    assert abs(want_cut[0] - want_whole[0]) > 1e-4  # the cut matters to this model
    for max_tokens_per_doc, want in ((n, want_cut), (4096, want_whole)):
        response = post(server, "/v2/rerank", {**body, "max_tokens_per_doc": max_tokens_per_doc})
        assert response.status_code == 200, response.text
        got = sorted(response.json()["results"], key=lambda r: r["index"])
        np.testing.assert_allclose([r["relevance_score"] for r in got], want, atol=1e-5)


@pytest.mark.parametrize(
    ("body", "param", "says"),
    [
        ({"query": "q", "documents": []}, "documents", "at least 1"),
        ({"documents": ["d"]}, "query", "required"),
        ({"query": "q", "documents": [{"text": "d"}]}, "documents", "valid string"),  # v2 takes strings only
        ({"query": "q", "documents": ["d"], "top_n": 0}, "top_n", "greater than or equal to 1"),
        ({"query": "q", "documents": ["d"], "max_tokens_per_doc": "5"}, "max_tokens_per_doc", "valid integer"),
        ({"query": "q", "documents": ["d"], "rank_fields": ["text"]}, "rank_fields", "/v2/rerank has no such field"),
    ],
)
def test_cohere_v2_rerank_bad_input_is_422_naming_the_field(server, body, param, says):
    response = post(server, "/v2/rerank", {"model": "rr", **body})
    assert response.status_code == 422, response.text
    error = error_of(response)
    assert error["param"] == param and error["code"] == "invalid_schema" and says in error["message"], error


def test_cohere_v2_embed_applies_the_input_types_as_the_library(server, tiny_prompted):
    """search_query is encode_queries (the model's query prompt), search_document encode_corpus,
    classification and clustering encode (no prompt); in Cohere's v2 shape."""
    library = Embedder.from_pretrained(str(tiny_prompted))
    expected = {
        "search_query": library.encode_queries(TEXTS),
        "search_document": library.encode_corpus(TEXTS),
        "classification": library.encode(TEXTS),
        "clustering": library.encode(TEXTS),
    }
    for input_type, want in expected.items():
        response = post(server, "/v2/embed", {"model": "tiny", "texts": TEXTS, "input_type": input_type})
        assert response.status_code == 200, response.text
        body = response.json()
        assert set(body) == {"id", "embeddings", "texts", "meta", "response_type"}
        assert body["response_type"] == "embeddings_by_type" and body["texts"] == TEXTS
        assert set(body["embeddings"]) == {"float"}
        np.testing.assert_allclose(body["embeddings"]["float"], want, atol=1e-5)
        rule = {"search_query": "query", "search_document": "passage"}.get(input_type)
        tokens = sum(len(ids) for ids in library.tokenize(TEXTS, rule).ids)
        assert body["meta"]["tokens"]["input_tokens"] == tokens
    assert not np.allclose(expected["search_query"], expected["search_document"])


def test_cohere_v2_embed_binary_types_and_output_dimension(server, minilm, minilm_dir):
    body = {"model": "minilm", "texts": TEXTS, "input_type": "search_document"}
    response = post(server, "/v2/embed", {**body, "embedding_types": ["ubinary", "float", "binary"]})
    assert response.status_code == 200, response.text
    embeddings = response.json()["embeddings"]
    vectors = minilm.encode_corpus(TEXTS)
    np.testing.assert_allclose(embeddings["float"], vectors, atol=1e-5)
    bits = (vectors > 0).astype(np.uint8)  # sign bits, first dimension in the high bit of the first byte
    ubinary = [[int("".join(map(str, row[i : i + 8])), 2) for i in range(0, 384, 8)] for row in bits]
    assert embeddings["ubinary"] == ubinary and len(ubinary[0]) == 384 // 8
    assert embeddings["binary"] == [[b - 128 for b in row] for row in ubinary]
    narrow = post(server, "/v2/embed", {**body, "output_dimension": 64}).json()["embeddings"]["float"]
    np.testing.assert_allclose(
        narrow, Embedder.from_pretrained(str(minilm_dir), truncate_dim=64).encode(TEXTS), atol=1e-5
    )
    for kinds in (["int8"], ["float", "uint8"], ["base64"]):
        refused = post(server, "/v2/embed", {**body, "embedding_types": kinds})
        assert refused.status_code == 400, refused.text
        error = error_of(refused)
        assert error["param"] == "embedding_types" and error["code"] == "unsupported_embedding_type"
        assert str([k for k in kinds if k != "float"]) in error["message"]
    too_wide = post(server, "/v2/embed", {**body, "output_dimension": 4096})
    assert too_wide.status_code == 400 and error_of(too_wide)["param"] == "output_dimension"


def test_cohere_v2_embed_serves_m3_dense_vectors(server, golden_dir):
    library = BGEM3FlagModel(str(golden_dir / "models" / "xlmr-m3"))
    response = post(server, "/v2/embed", {"model": "m3", "texts": TEXTS, "input_type": "search_document"})
    assert response.status_code == 200, response.text
    np.testing.assert_allclose(response.json()["embeddings"]["float"], library.encode(TEXTS)["dense_vecs"], atol=1e-5)


def test_cohere_v2_embed_truncate_modes(server, minilm_dir):
    """END cuts a long text's end (the library's cut), START its start, NONE answers 413; max_tokens cuts each
    text to its own first (END) or last (START) N tokens. START where the model's instruction comes first
    (the prompted model's "query: ") is a 400: it would cut the instruction."""
    library = Embedder.from_pretrained(str(minilm_dir))
    long_text = "the cat sat on the mat " * 10 + "the dog ate food " * 200  # one token a word
    body = {"model": "minilm", "texts": [long_text, TEXTS[0]], "input_type": "search_document"}
    got = {}
    for mode in ("END", "START"):
        response = post(server, "/v2/embed", {**body, "truncate": mode})
        assert response.status_code == 200, response.text
        got[mode] = np.array(response.json()["embeddings"]["float"])
        assert response.json()["meta"]["tokens"]["input_tokens"] == 256 + len(library.tokenize([TEXTS[0]]).ids[0])
    np.testing.assert_allclose(got["END"], library.encode_corpus([long_text, TEXTS[0]]), atol=1e-5)
    library.tokenizer.truncation_side = "left"  # the library cutting the start instead
    np.testing.assert_allclose(got["START"], library.encode_corpus([long_text, TEXTS[0]]), atol=1e-5)
    library.tokenizer.truncation_side = "right"
    assert not np.allclose(got["START"][0], got["END"][0])
    np.testing.assert_allclose(got["START"][1], got["END"][1], atol=1e-6)  # a short text is not cut
    refused = post(server, "/v2/embed", {**body, "truncate": "NONE"})
    assert refused.status_code == 413 and error_of(refused)["code"] == "input_too_long"
    assert '"truncate": "END"' in error_of(refused)["message"]
    assert post(server, "/v2/embed", {**body, "texts": [TEXTS[0]], "truncate": "NONE"}).status_code == 200
    for mode, expected in (("END", "the cat sat"), ("START", "dog ate food")):
        clipped = post(server, "/v2/embed", {**body, "truncate": mode, "max_tokens": 3, "texts": [long_text, "a b"]})
        np.testing.assert_allclose(
            clipped.json()["embeddings"]["float"], library.encode_corpus([expected, "a b"]), atol=1e-5
        )
    over = post(server, "/v2/embed", {**body, "texts": ["the cat sat on"], "truncate": "NONE", "max_tokens": 3})
    assert over.status_code == 413 and "max_tokens=3" in error_of(over)["message"]
    start = post(
        server, "/v2/embed", {"model": "tiny", "texts": ["x"], "input_type": "search_query", "truncate": "START"}
    )
    assert start.status_code == 400, start.text
    error = error_of(start)
    assert error["param"] == "truncate" and "'query: ' comes before the text" in error["message"]


@pytest.mark.parametrize(
    ("body", "param", "says"),
    [
        ({"texts": ["x"]}, "input_type", "required"),
        ({"texts": ["x"], "input_type": "image"}, "input_type", "'search_query', 'search_document'"),
        ({"texts": "x", "input_type": "search_query"}, "texts", "valid list"),
        ({"texts": [], "input_type": "search_query"}, "texts", "at least 1"),
        ({"texts": ["x"], "input_type": "search_query", "truncate": "end"}, "truncate", "'NONE', 'START' or 'END'"),
        ({"texts": ["x"], "input_type": "search_query", "embedding_types": ["bits"]}, "embedding_types", "'float'"),
        ({"texts": ["x"], "input_type": "search_query", "images": ["data:,"]}, "images", "no such field"),
    ],
)
def test_cohere_v2_embed_bad_input_is_422_naming_the_field(server, body, param, says):
    response = post(server, "/v2/embed", {"model": "minilm", **body})
    assert response.status_code == 422, response.text
    error = error_of(response)
    assert error["param"] == param and error["code"] == "invalid_schema" and says in error["message"], error


def test_v1_embeddings_takes_cohere_input_type_names(server, tiny_prompted):
    """search_query / search_document (Cohere's names) are query / passage on /v1/embeddings; an unknown value
    is a 422 that lists what is accepted."""
    library = Embedder.from_pretrained(str(tiny_prompted))
    for alias, want in (
        ("search_query", library.encode_queries(TEXTS)),
        ("search_document", library.encode_corpus(TEXTS)),
    ):
        response = post(server, "/v1/embeddings", {"model": "tiny", "input": TEXTS, "input_type": alias})
        assert response.status_code == 200, response.text
        np.testing.assert_allclose([d["embedding"] for d in response.json()["data"]], want, atol=1e-5)
    refused = post(server, "/v1/embeddings", {"model": "tiny", "input": "x", "input_type": "classification"})
    assert refused.status_code == 422
    message = error_of(refused)["message"]
    assert message.startswith("input_type: must be query or passage (also accepted: document for passage, ")
    assert "search_query for query" in message and "got 'classification'" in message


def test_cohere_v2_routes_are_documented_and_counted(server):
    schema = httpx.get(f"{server.url}/openapi.json", timeout=10).json()
    assert {"/v2/rerank", "/v2/embed"} <= set(schema["paths"])
    labels = {"route": "/v2/rerank", "status": "200"}
    before = metric_value(server, "bgekit_requests_total", labels)
    assert post(server, "/v2/rerank", {"model": "rr", "query": "q", "documents": ["d"]}).status_code == 200
    assert metric_value(server, "bgekit_requests_total", labels) == before + 1
    assert post(server, "/v2/rerank", {"query": "q", "documents": ["d"]}, headers={}).status_code == 401
    wrong = post(server, "/v2/embed", {"model": "rr", "texts": ["x"], "input_type": "search_query"})
    assert wrong.status_code == 400 and error_of(wrong)["message"] == "model 'rr' is a rerank model: use /v2/rerank"
