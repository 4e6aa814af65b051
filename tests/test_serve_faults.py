"""The server's failure paths against a real ``bgekit serve`` process: a model that raises, a
worker that stops making progress, a full queue, clients killed mid-request.

How the faults are made (nothing in the server is mocked or has a test switch): the served
model is a tiny BERT folder with its own modeling code (loaded with ``--trust-remote-code``,
like any remote-code model). Its forward raises on inputs holding the word ``explode`` (a model
error) and sleeps on inputs holding ``stall`` (a forward that does not come back, as on a
wedged GPU). The server runs exactly the code users run; the fault sits where real faults sit.

The server is configured through environment variables only (BGEKIT_*), which also checks that
every option reads its variable. Checks of the serving issue proven here: 3 (429) and 5.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")

from bgekit import Embedder  # noqa: E402

from .serving import build_faulty_bert, running_server, wait_for  # noqa: E402

KEY = "sk-faults"
AUTH = {"Authorization": f"Bearer {KEY}"}
STALL_SECONDS = 3.0
STUCK_TIMEOUT = 1.0
MAX_QUEUE = 2
GOOD = "the panda eats bamboo"


@pytest.fixture(scope="module")
def faulty_model(tmp_path_factory, tiny_bert):
    return build_faulty_bert(tmp_path_factory.mktemp("faulty") / "model", tiny_bert, STALL_SECONDS)


@pytest.fixture(scope="module")
def server(tmp_path_factory, faulty_model):
    env = {
        "BGEKIT_MODEL": str(faulty_model),
        "BGEKIT_SERVED_MODEL_NAME": "faulty",
        "BGEKIT_API_KEY": KEY,
        "BGEKIT_TRUST_REMOTE_CODE": "1",
        "BGEKIT_STUCK_TIMEOUT": str(STUCK_TIMEOUT),
        "BGEKIT_MAX_QUEUE": str(MAX_QUEUE),
        "BGEKIT_TRUNCATE": "false",
        "BGEKIT_MAX_LENGTH": "16",
        "HF_MODULES_CACHE": str(tmp_path_factory.mktemp("hf-modules")),
    }
    with running_server([], tmp_path_factory.mktemp("serve-faults") / "server.log", env=env) as srv:
        yield srv


@pytest.fixture(scope="module")
def library(faulty_model):
    return Embedder.from_pretrained(str(faulty_model), trust_remote_code=True, passage_max_length=16)


def embed(server, texts, timeout: float = 60) -> httpx.Response:
    return httpx.post(f"{server.url}/v1/embeddings", json={"input": texts}, headers=AUTH, timeout=timeout)


def health(server) -> httpx.Response:
    return httpx.get(f"{server.url}/health", timeout=10)


def worker(server) -> dict:
    return health(server).json()["models"]["faulty"]


def wait_until_idle_and_healthy(server) -> None:
    wait_for(lambda: health(server).status_code == 200 and worker(server)["status"] == "ok", 30, what="health")


def stall_in_background(pool: ThreadPoolExecutor, server):
    """Start a request whose forward sleeps STALL_SECONDS; return when the worker is running it."""
    future = pool.submit(embed, server, "stall")
    wait_for(lambda: worker(server)["status"] in ("busy", "stuck"), 10, what="the stalled batch to start")
    return future


def test_env_vars_configure_the_server(server):
    models = httpx.get(f"{server.url}/v1/models", headers=AUTH, timeout=10).json()["data"]
    assert [m["id"] for m in models] == ["faulty"] and models[0]["max_length"] == 16
    assert httpx.get(f"{server.url}/v1/models", timeout=10).status_code == 401
    # BGEKIT_TRUNCATE=false: a too-long input is refused with 413 unless the request asks to cut it
    long_text = "pandas eat bamboo " * 20
    assert embed(server, long_text).status_code == 413
    cut = httpx.post(
        f"{server.url}/v1/embeddings", json={"input": long_text, "truncate": True}, headers=AUTH, timeout=30
    )
    assert cut.status_code == 200 and cut.json()["usage"]["prompt_tokens"] == 16
    # /v2/embed without truncate follows the server too (NONE here); Cohere's END cuts on request
    cohere = {"texts": [long_text], "input_type": "search_document"}
    assert httpx.post(f"{server.url}/v2/embed", json=cohere, headers=AUTH, timeout=30).status_code == 413
    end = httpx.post(f"{server.url}/v2/embed", json={**cohere, "truncate": "END"}, headers=AUTH, timeout=30)
    assert end.status_code == 200 and end.json()["meta"]["tokens"]["input_tokens"] == 16
    # no BGEKIT_CORS_ORIGIN: no CORS headers, so browsers keep other sites' pages from calling the server
    preflight = {"Origin": "https://app.example", "Access-Control-Request-Method": "POST"}
    assert "access-control-allow-origin" not in httpx.options(f"{server.url}/v1/embeddings", headers=preflight).headers
    called = httpx.post(
        f"{server.url}/v1/embeddings", json={"input": GOOD}, headers={**AUTH, "Origin": "https://app.example"}
    )
    assert called.status_code == 200 and "access-control-allow-origin" not in called.headers


def test_model_error_fails_only_that_request(server, library):
    wait_until_idle_and_healthy(server)
    before = httpx.get(f"{server.url}/metrics", timeout=10).text
    with ThreadPoolExecutor(3) as pool:
        stalled = stall_in_background(pool, server)
        # both wait behind the stalled batch, so they run as one batch: the model raises on it,
        # the batcher retries them one by one, and only the bad request fails
        bad = pool.submit(embed, server, ["the", "explode"])
        good = pool.submit(embed, server, GOOD)
        wait_for(lambda: worker(server)["queued"] == 2, 10, what="two queued requests")
        assert stalled.result(timeout=30).status_code == 200
        bad_response, good_response = bad.result(timeout=30), good.result(timeout=30)
    assert bad_response.status_code == 500
    error = bad_response.json()["error"]
    assert error["type"] == "server_error" and error["code"] == "model_error"
    assert "fail token" in error["message"]
    assert good_response.status_code == 200
    np.testing.assert_allclose(good_response.json()["data"][0]["embedding"], library.encode(GOOD), atol=1e-5)
    after = httpx.get(f"{server.url}/metrics", timeout=10).text
    assert (
        _sample(after, 'bgekit_model_errors_total{model="faulty"}')
        == _sample(before, 'bgekit_model_errors_total{model="faulty"}') + 1
    )
    # a batch of two requests ran (the failed one) before the retries
    assert _sample(after, 'bgekit_batch_requests_bucket{le="1.0",model="faulty"}') < _sample(
        after, 'bgekit_batch_requests_count{model="faulty"}'
    )
    wait_until_idle_and_healthy(server)  # one bad request does not make the server unhealthy


def test_repeated_model_failures_turn_health_red_until_a_success(server, library):
    wait_until_idle_and_healthy(server)
    for _ in range(3):
        assert embed(server, "explode").status_code == 500
    response = health(server)
    assert response.status_code == 503
    state = response.json()["models"]["faulty"]
    assert state["status"] == "failing" and state["consecutive_failures"] == 3
    assert "fail token" in state["last_error"]
    assert "bgekit_worker_healthy" in (metrics := httpx.get(f"{server.url}/metrics", timeout=10).text)
    assert _sample(metrics, 'bgekit_worker_healthy{model="faulty"}') == 0.0
    ok = embed(server, GOOD)
    assert ok.status_code == 200
    np.testing.assert_allclose(ok.json()["data"][0]["embedding"], library.encode(GOOD), atol=1e-5)
    assert health(server).status_code == 200


def test_stuck_worker_turns_health_red_and_recovers(server, library):
    wait_until_idle_and_healthy(server)
    with ThreadPoolExecutor(1) as pool:
        started = time.monotonic()
        stalled = stall_in_background(pool, server)
        wait_for(lambda: health(server).status_code == 503, STALL_SECONDS, what="/health to turn red")
        assert time.monotonic() - started < STALL_SECONDS  # red while the batch is still in flight
        state = health(server).json()
        assert state["status"] == "unhealthy" and state["models"]["faulty"]["status"] == "stuck"
        assert state["models"]["faulty"]["busy_seconds"] > STUCK_TIMEOUT
        # while stuck, new requests are refused at once instead of piling up
        refused = embed(server, GOOD, timeout=10)
        assert refused.status_code == 503 and refused.json()["error"]["code"] == "worker_unavailable"
        assert int(refused.headers["retry-after"]) >= 1
        assert stalled.result(timeout=30).status_code == 200  # the model came back: so does the server
    wait_until_idle_and_healthy(server)
    np.testing.assert_allclose(embed(server, GOOD).json()["data"][0]["embedding"], library.encode(GOOD), atol=1e-5)


def test_full_queue_is_429_with_retry_after(server):
    wait_until_idle_and_healthy(server)
    with ThreadPoolExecutor(3) as pool:
        stalled = stall_in_background(pool, server)
        queued = [pool.submit(embed, server, GOOD) for _ in range(MAX_QUEUE)]
        wait_for(lambda: worker(server)["queued"] == MAX_QUEUE, 10, what="a full queue")
        refused = embed(server, GOOD, timeout=10)
        assert refused.status_code == 429
        error = refused.json()["error"]
        assert error["type"] == "rate_limit_error" and error["code"] == "queue_full"
        assert int(refused.headers["retry-after"]) >= 1
        assert stalled.result(timeout=30).status_code == 200
        assert [f.result(timeout=30).status_code for f in queued] == [200] * MAX_QUEUE  # nothing queued was lost
    assert 'reason="queue_full"' in httpx.get(f"{server.url}/metrics", timeout=10).text


CLIENT = f"""
import sys, httpx
if sys.argv[3:] == ["on-signal"]:
    sys.stdin.readline()  # started (Python and httpx imported) ahead of time; posts when told
httpx.post(sys.argv[1], json={{"input": sys.argv[2]}}, headers={{"Authorization": "Bearer {KEY}"}}, timeout=60)
"""


def test_killing_clients_mid_flight_does_not_break_the_server(server, library):
    wait_until_idle_and_healthy(server)
    batched_before = _sample(httpx.get(f"{server.url}/metrics", timeout=10).text, SERIES_BATCHED)
    url = f"{server.url}/v1/embeddings"
    # the second client starts first and posts on a signal: a process start on a loaded machine could
    # take longer than the stalled batch (STALL_SECONDS), and its request would then never queue
    waiting = subprocess.Popen([sys.executable, "-c", CLIENT, url, GOOD, "on-signal"], stdin=subprocess.PIPE)
    in_flight = subprocess.Popen([sys.executable, "-c", CLIENT, url, "stall"])
    try:
        wait_for(lambda: worker(server)["status"] in ("busy", "stuck"), 20, what="the client's batch to start")
        waiting.stdin.write(b"go\n")  # queued behind it
        waiting.stdin.flush()
        wait_for(lambda: worker(server)["queued"] == 1, 10, what="the second client to queue")
    finally:
        in_flight.kill()  # its request is in the model
        in_flight.wait(timeout=10)
        waiting.kill()  # its request waits in the queue: the server drops it without running it
        waiting.wait(timeout=10)
    wait_for(lambda: worker(server)["queued"] == 0, 5, what="the dead client's request to leave the queue")
    wait_until_idle_and_healthy(server)
    metrics = httpx.get(f"{server.url}/metrics", timeout=10).text
    assert _sample(metrics, SERIES_BATCHED) == batched_before + 1  # only the stalled request ran
    assert 'bgekit_requests_total{route="/embeddings",status="499"}' in metrics
    texts = [GOOD, "paris is in france", "a b c"]
    with ThreadPoolExecutor(MAX_QUEUE) as pool:  # more at once could meet the (tiny) queue limit
        responses = list(pool.map(lambda t: embed(server, t), texts))
    for text, response in zip(texts, responses, strict=True):
        assert response.status_code == 200
        np.testing.assert_allclose(response.json()["data"][0]["embedding"], library.encode(text), atol=1e-5)
    assert health(server).status_code == 200


SERIES_BATCHED = 'bgekit_batch_requests_sum{model="faulty"}'


def _sample(metrics_text: str, series: str) -> float:
    for line in metrics_text.splitlines():
        if line.startswith(series + " "):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def test_health_report_is_json(server):
    body = health(server).json()
    assert set(body) == {"status", "models"}
    assert set(body["models"]["faulty"]) == {"status", "queued", "busy_seconds", "consecutive_failures", "last_error"}
    json.dumps(body)


@pytest.mark.parametrize(("grace", "status"), [(10.0, 200), (1.0, 503)])
def test_shutdown_lets_admitted_requests_finish_or_answers_503(tmp_path, faulty_model, library, grace, status):
    """SIGTERM with a request in the model and one queued behind it: both finish within the graceful
    timeout (here longer than the stalled forward), or both get OpenAI-shaped 503s before it ends."""
    env = {
        "BGEKIT_MODEL": str(faulty_model),
        "BGEKIT_SERVED_MODEL_NAME": "faulty",
        "BGEKIT_API_KEY": KEY,
        "BGEKIT_TRUST_REMOTE_CODE": "1",
        "BGEKIT_MAX_LENGTH": "16",
        "BGEKIT_GRACEFUL_TIMEOUT": str(grace),
        "HF_MODULES_CACHE": str(tmp_path / "hf-modules"),
    }
    with running_server([], tmp_path / "server.log", env=env) as srv, ThreadPoolExecutor(2) as pool:
        stalled = stall_in_background(pool, srv)
        queued = pool.submit(embed, srv, GOOD)
        wait_for(lambda: worker(srv)["queued"] == 1, 10, what="the second request to queue")
        started = time.monotonic()
        srv.process.terminate()
        responses = [stalled.result(timeout=30), queued.result(timeout=30)]
        # uvicorn re-raises the signal once shut down, so the exit status says SIGTERM ended it
        assert srv.process.wait(timeout=30) in (0, -signal.SIGTERM), srv.log_tail()
        took = time.monotonic() - started
    assert [r.status_code for r in responses] == [status, status], [r.text for r in responses]
    if status == 200:
        np.testing.assert_allclose(responses[1].json()["data"][0]["embedding"], library.encode(GOOD), atol=1e-5)
    else:
        for response in responses:
            error = response.json()["error"]
            assert error["code"] == "worker_unavailable" and "shutting down" in error["message"], error
        assert took < STALL_SECONDS, took  # answered at the deadline, not when the stalled forward ended
