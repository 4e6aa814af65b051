"""A model that gives NaN or infinity (fp16 overflow on a long input is the real-world case) against a
real ``bgekit serve`` process: every route answers 500 ``model_error`` naming the model and the inputs,
as for a forward that raises; JSON has no NaN, and a base64 or bit-packed NaN would pass for a value.

The served models are tiny real checkpoints whose input embedding of one word is infinity
(:func:`tests.tiny_models.poison_token`): texts holding it give NaN, other texts the usual values, so
one server shows both the failure and that the rest of the traffic is untouched.
"""

from __future__ import annotations

import math

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")

from .serving import running_server  # noqa: E402
from .tiny_models import poison_token  # noqa: E402

GOOD = "the panda eats bamboo"


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_bert, tiny_bert_reranker, golden_dir):
    root = tmp_path_factory.mktemp("non-finite")
    args = [
        *("--model", str(poison_token(root / "emb", tiny_bert, "poison"))),
        *("--model", str(poison_token(root / "m3", golden_dir / "models" / "xlmr-m3", "kk"))),
        *("--reranker", str(poison_token(root / "rr", tiny_bert_reranker, "poison"))),
        *("--served-model-name", "emb", "--served-model-name", "m3", "--served-model-name", "rr"),
    ]
    with running_server(args, root / "server.log") as srv:
        yield srv


def post(server, route: str, body: dict) -> httpx.Response:
    return httpx.post(f"{server.url}{route}", json=body, timeout=60)


def model_errors(server, model: str) -> float:
    for line in httpx.get(f"{server.url}/metrics", timeout=10).text.splitlines():
        if line.startswith(f'bgekit_model_errors_total{{model="{model}"}} '):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def assert_model_error(response: httpx.Response, model: str, positions: str) -> None:
    assert response.status_code == 500, response.text
    error = response.json()["error"]  # valid JSON: no NaN token in the body
    assert error["type"] == "server_error" and error["code"] == "model_error"
    assert f"model {model!r} gave NaN or infinite values for {positions}" in error["message"]
    assert "float32" in error["message"]


@pytest.mark.parametrize("encoding_format", ["float", "base64"])
def test_embeddings(server, encoding_format):
    before = model_errors(server, "emb")
    body = {"model": "emb", "input": [GOOD, "poison apple", "more poison"], "encoding_format": encoding_format}
    assert_model_error(post(server, "/v1/embeddings", body), "emb", "2 of 3 inputs (positions [1, 2])")
    assert model_errors(server, "emb") == before + 1
    ok = post(server, "/v1/embeddings", {**body, "input": [GOOD, "apple"]})
    assert ok.status_code == 200 and len(ok.json()["data"]) == 2


def test_m3_sparse_weights(server):
    # NaN sparse weights would be dropped (weights <= 0), leaving a valid but wrong response
    body = {"model": "m3", "input": [GOOD, "kk"], "return_dense": False, "return_sparse": True}
    assert_model_error(post(server, "/v1/embeddings", body), "m3", "1 of 2 inputs (positions [1])")
    ok = post(server, "/v1/embeddings", {**body, "input": [GOOD], "return_colbert_vecs": True})
    assert ok.status_code == 200 and ok.json()["data"][0]["lexical_weights"]


@pytest.mark.parametrize("kind", ["float", "binary"])
def test_v2_embed(server, kind):
    body = {"model": "emb", "texts": ["poison", GOOD], "input_type": "search_document", "embedding_types": [kind]}
    assert_model_error(post(server, "/v2/embed", body), "emb", "1 of 2 inputs (positions [0])")
    assert post(server, "/v2/embed", {**body, "texts": [GOOD]}).status_code == 200


@pytest.mark.parametrize("raw_scores", [False, True])
def test_rerank(server, raw_scores):
    body = {"model": "rr", "query": "what do pandas eat?", "documents": [GOOD, "apple", "poison"]}
    response = post(server, "/v1/rerank", {**body, "raw_scores": raw_scores, "top_n": 1})
    assert_model_error(response, "rr", "1 of 3 documents (positions [2])")
    ok = post(server, "/v1/rerank", {**body, "documents": [GOOD, "apple"], "raw_scores": raw_scores})
    assert ok.status_code == 200 and all(math.isfinite(r["relevance_score"]) for r in ok.json()["results"])


def test_v2_rerank(server):
    body = {"model": "rr", "query": "poison", "documents": [GOOD, "apple"]}  # a poisoned query: every pair
    assert_model_error(post(server, "/v2/rerank", body), "rr", "2 of 2 documents (positions [0, 1])")
    assert post(server, "/v2/rerank", {**body, "query": "what do pandas eat?"}).status_code == 200
