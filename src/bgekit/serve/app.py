"""The FastAPI app: routes, OpenAI-shaped errors, the API key and request metrics.

Build it with :func:`create_app` from loaded engines (the ``bgekit serve`` command does),
then run it with uvicorn. Every route answers at ``/v1/...`` and without the prefix.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hmac
import logging
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

from fastapi import APIRouter, FastAPI, Request, Security
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, Response
from fastapi.security import HTTPBearer
from starlette.exceptions import HTTPException as StarletteHTTPException

from .. import __version__
from ..errors import InputError
from .batcher import Batcher, ModelFailure, Overloaded, WorkerUnavailable
from .engines import (
    CUT_THEM_V2_EMBED,
    CUT_THEM_V2_RERANK,
    EMBEDDING_TYPES,
    EmbeddingEngine,
    EmbedOptions,
    InputTooLong,
    NonFiniteOutput,
    RerankEngine,
)
from .metrics import ServeMetrics
from .schemas import (
    CohereEmbedRequest,
    CohereEmbedResponse,
    CohereRerankRequest,
    CohereRerankResponse,
    EmbeddingRequest,
    EmbeddingResponse,
    ErrorResponse,
    HealthResponse,
    ModelCard,
    ModelList,
    RerankDocument,
    RerankRequest,
    RerankResponse,
)

logger = logging.getLogger(__name__)

# no API key needed: probes, scrapers and the docs
OPEN_PATHS = frozenset(
    ["/health", "/v1/health", "/metrics", "/v1/metrics", "/docs", "/docs/oauth2-redirect", "/redoc", "/openapi.json"]
)
ROUTES = {"/embeddings", "/rerank", "/models", "/health", "/metrics", "/v2/rerank", "/v2/embed"}
# Cohere's v2 input types -> the prompt rule (encode_queries, encode_corpus, or encode: no instruction)
COHERE_INPUT_TYPES = {"search_query": "query", "search_document": "passage", "classification": None, "clustering": None}
COHERE_SCHEMAS = {"/v2/rerank": CohereRerankRequest, "/v2/embed": CohereEmbedRequest}
# pydantic names the member of a union field it tried (input: str | list[str]); not part of the path
_UNION_TAGS = {"str", "list[str]", "RerankDocument"}


@dataclass
class ServeConfig:
    """Server behaviour that is not about one model (the CLI fills it from flags or env vars)."""

    api_key: str | None = None
    truncate: bool = True
    max_queue: int = 512
    max_client_batch_size: int = 2048
    max_request_bytes: int = 32 * 2**20
    stuck_timeout: float = 60.0
    failing_after: int = 3
    batch_wait_ms: float = 0.0
    tokenizer_threads: int = 2
    render_threads: int = 2
    cors_origins: tuple[str, ...] = ()


class ApiError(Exception):
    """An error response in OpenAI's shape."""

    def __init__(
        self,
        status: int,
        message: str,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers

    def response(self) -> JSONResponse:
        body = {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}
        return JSONResponse(body, status_code=self.status, headers=self.headers)


ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorResponse, "description": text}
    for status, text in {
        400: "Unknown model, or an option the model does not support",
        401: "Missing or wrong API key",
        413: "Too many inputs, or an input too long while truncation is off",
        422: "The request does not fit the schema",
        429: "The queue is full; retry after the Retry-After header's seconds",
        500: "The model failed on this request",
        503: "The model worker is stuck",
    }.items()
}


class _MetricsMiddleware:
    """Pure ASGI middleware, outermost: records every request's route, status and latency for
    Prometheus, a CORS preflight and a refused API key included."""

    def __init__(self, app, metrics: ServeMetrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        route = scope["path"].removeprefix("/v1") or "/"
        route = "/models" if route.startswith("/models/") else route if route in ROUTES else "other"
        started = time.perf_counter()
        status = 500

        async def send_with_status(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_with_status)
        finally:
            self.metrics.observe_request(route, status, time.perf_counter() - started)


class _GuardMiddleware:
    """Pure ASGI middleware: checks the API key and the body's size before anything reads the body
    (a huge JSON body is parsed on the event loop, stalling every other request)."""

    def __init__(self, app, api_key: str | None, max_body: int = ServeConfig.max_request_bytes):
        self.app, self.api_key, self.max_body = app, api_key, max_body
        self._expected = api_key.encode() if api_key else None

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        if self._expected is not None and scope["path"] not in OPEN_PATHS and not self._authorized(scope):
            response = ApiError(
                401,
                "missing or incorrect API key: send the header 'Authorization: Bearer <key>' with the key the "
                "server was started with (--api-key / BGEKIT_API_KEY)",
                code="invalid_api_key",
                headers={"WWW-Authenticate": "Bearer"},
            ).response()
            return await response(scope, receive, send)
        declared = dict(scope.get("headers", ())).get(b"content-length", b"")
        if declared.isdigit() and int(declared) > self.max_body:
            return await self._too_large().response()(scope, receive, send)
        return await self.app(scope, self._counting(receive), send)

    def _too_large(self) -> ApiError:
        return ApiError(
            413,
            f"the request body is over {self.max_body} bytes (--max-request-bytes); send fewer or shorter inputs",
            code="request_too_large",
        )

    def _counting(self, receive):
        """``receive`` that stops a body without a (truthful) length once it passes the limit."""
        seen = 0

        async def counted():
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.max_body:  # an HTTPException: FastAPI's body reading passes it on as it is
                raise StarletteHTTPException(413, str(self._too_large()))
            return message

        return counted

    def _authorized(self, scope) -> bool:
        for name, value in scope.get("headers", ()):
            if name == b"authorization":
                scheme, _, key = value.strip().partition(b" ")
                # the scheme is case-insensitive (RFC 9110): "bearer KEY" is as good as "Bearer KEY"
                return scheme.lower() == b"bearer" and hmac.compare_digest(key.strip(), self._expected)
        return False


def create_app(
    embedders: Sequence[EmbeddingEngine] = (),
    rerankers: Sequence[RerankEngine] = (),
    config: ServeConfig | None = None,
) -> FastAPI:
    """The server app for already loaded (and warmed-up) engines."""
    config = config or ServeConfig()
    engines: dict[str, EmbeddingEngine | RerankEngine] = {}
    for engine in (*embedders, *rerankers):
        if engine.name in engines:
            raise InputError(f"two models are served as {engine.name!r}; give them different --served-model-name")
        engines[engine.name] = engine
    if not engines:
        raise InputError("nothing to serve: pass at least one --model or --reranker")
    tokenize_pool = ThreadPoolExecutor(config.tokenizer_threads, thread_name_prefix="bgekit-tokenize")
    render_pool = ThreadPoolExecutor(config.render_threads, thread_name_prefix="bgekit-render")
    batchers: dict[str, Batcher] = {}
    metrics = ServeMetrics(lambda: batchers.values())
    for name, engine in engines.items():
        batchers[name] = Batcher(
            name,
            engine.forward,
            tokenize_pool=tokenize_pool,
            max_batch_tokens=engine.max_batch_tokens,
            max_queue=config.max_queue,
            stuck_after=config.stuck_timeout,
            failing_after=config.failing_after,
            batch_wait=config.batch_wait_ms / 1000,
            on_batch=metrics.on_batch,
        )

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        for batcher in batchers.values():
            batcher.start()
        logger.info("serving %s", ", ".join(f"{n} ({e.task})" for n, e in engines.items()))
        try:
            yield
        finally:
            for batcher in batchers.values():
                await batcher.stop()
            tokenize_pool.shutdown(wait=False, cancel_futures=True)
            render_pool.shutdown(wait=False, cancel_futures=True)

    def begin_shutdown(grace: float) -> None:
        """Shutdown began (SIGTERM / Ctrl-C): refuse new requests, let admitted ones finish, and when
        ``grace`` seconds are nearly up answer those still unfinished with a 503, before the server
        cancels their handlers (which would send a bare 500)."""
        for batcher in batchers.values():
            batcher.drain()

        def give_up() -> None:
            reason = f"the server is shutting down: the request did not finish within {grace:g} s"
            for batcher in batchers.values():
                if batcher.fail_unfinished(reason):
                    logger.warning("%s: answered unfinished requests with 503 at shutdown", batcher.name)

        asyncio.get_running_loop().call_later(max(0.0, grace - min(1.0, grace / 2)), give_up)

    app = FastAPI(
        title="bgekit server",
        version=__version__,
        description=(
            "OpenAI-compatible embeddings and Cohere / Jina-style rerank for BGE-style models, with dynamic "
            "batching. Every route also answers without the /v1 prefix. Fields marked *Extension* are bgekit's."
        ),
        lifespan=lifespan,
    )
    app.state.begin_shutdown = begin_shutdown
    app.state.engines, app.state.batchers, app.state.metrics, app.state.config = engines, batchers, metrics, config
    # the middleware added last is outermost: metrics see every request, then CORS answers a browser's
    # preflight (no API key) before the key check
    app.add_middleware(_GuardMiddleware, api_key=config.api_key, max_body=config.max_request_bytes)
    if config.cors_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=list(config.cors_origins),
            allow_methods=["GET", "HEAD", "POST"],
            allow_headers=["*"],  # Authorization and Content-Type above all
            expose_headers=["Retry-After"],  # 429 / 503: when to retry
        )
    app.add_middleware(_MetricsMiddleware, metrics=metrics)
    _install_error_handlers(app)
    bearer = HTTPBearer(auto_error=False, description="The server's --api-key, if it was started with one.")

    def pick(requested: str | None, task: str, api: str = "v1") -> EmbeddingEngine | RerankEngine:
        """The engine serving ``requested`` (default: the first of ``task``); a wrong-task 400 names the
        route for it in the same API (``v1``: OpenAI / Cohere v1, ``v2``: Cohere v2)."""
        if requested is None:
            engine = next((e for e in engines.values() if e.task == task), None)
            if engine is None:
                raise ApiError(400, f"this server has no {task} model", param="model", code="model_not_found")
            return engine
        engine = engines.get(requested)
        if engine is None:
            raise ApiError(
                400,
                f"model {requested!r} is not served here; served models: {sorted(engines)}",
                param="model",
                code="model_not_found",
            )
        if engine.task != task:
            route = {
                ("v1", "rerank"): "/v1/rerank",
                ("v1", "embeddings"): "/v1/embeddings",
                ("v2", "rerank"): "/v2/rerank",
                ("v2", "embeddings"): "/v2/embed",
            }[api, engine.task]
            raise ApiError(
                400,
                f"model {requested!r} is {'an embedding' if engine.task == 'embeddings' else 'a rerank'} model: "
                f"use {route}",
                param="model",
                code="wrong_task",
            )
        return engine

    def check_count(n: int, param: str) -> None:
        if n > config.max_client_batch_size:
            raise ApiError(
                413,
                f"{n} {'texts' if param == 'input' else param} in one request; the limit is "
                f"{config.max_client_batch_size} "
                "(--max-client-batch-size): split the request",
                param=param,
                code="too_many_inputs",
            )

    async def run(engine, prepare_args: tuple, param: str, http: Request, **prepare_options) -> tuple[Any, Any]:
        """Tokenize, queue and run one request; errors become OpenAI-shaped responses. If the
        client goes away first, its work is dropped from the queue (or its result discarded)."""
        batcher = batchers[engine.name]
        prepare = functools.partial(engine.prepare, **prepare_options) if prepare_options else engine.prepare
        submitted = asyncio.ensure_future(batcher.submit(prepare, *prepare_args))
        watcher = asyncio.ensure_future(_disconnected(http))
        try:
            await asyncio.wait({submitted, watcher}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            watcher.cancel()
            if not submitted.done():
                submitted.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await submitted
        if submitted.cancelled():
            raise ApiError(499, "the client closed the request", code="client_closed_request")
        try:
            work, result = submitted.result()
        except InputTooLong as exc:
            metrics.rejected.labels(engine.name, "too_long").inc()
            raise ApiError(413, str(exc), param=param, code="input_too_long") from None
        except InputError as exc:
            raise ApiError(400, str(exc), code="invalid_input") from None
        except Overloaded as exc:
            metrics.rejected.labels(engine.name, "queue_full").inc()
            raise ApiError(
                429, str(exc), type="rate_limit_error", code="queue_full", headers={"Retry-After": str(exc.retry_after)}
            ) from None
        except WorkerUnavailable as exc:
            metrics.rejected.labels(engine.name, "worker_unavailable").inc()
            raise ApiError(
                503,
                str(exc),
                type="server_error",
                code="worker_unavailable",
                headers={"Retry-After": str(exc.retry_after)},
            ) from None
        except ModelFailure as exc:
            metrics.model_errors.labels(engine.name).inc()
            raise ApiError(
                500, f"the model failed on this request: {exc}", type="server_error", code="model_error"
            ) from None
        metrics.input_tokens.labels(engine.name).inc(work.n_tokens)
        if work.truncated:
            metrics.truncated.labels(engine.name).inc(work.truncated)
        return work, result

    async def render(fn, *args, **kwargs) -> Response:
        """The response body, built off the event loop. Results holding NaN or infinity (JSON has no such
        numbers) fail the request as a model failure does: 500, ``model_error``, the inputs named."""
        try:
            body = await asyncio.get_running_loop().run_in_executor(render_pool, lambda: fn(*args, **kwargs))
        except NonFiniteOutput as exc:
            metrics.model_errors.labels(exc.model).inc()
            logger.warning("%s", exc)
            raise ApiError(
                500, f"the model failed on this request: {exc}", type="server_error", code="model_error"
            ) from None
        return Response(body, media_type="application/json")

    async def embed(
        engine: EmbeddingEngine,
        texts: list[str],
        input_type: str | None,
        truncate: bool,
        http: Request,
        *,
        param: str,
        options: EmbedOptions | None = None,
        dimensions: int | None = None,
        dimensions_param: str = "dimensions",
        **prepare_options,
    ) -> tuple[Any, Any]:
        """What /v1/embeddings and /v2/embed share: the request's size, ``dimensions`` against the
        model's, then tokenize, batch and run. Returns ``(work, result)``."""
        if not texts:
            raise ApiError(422, f"{param} is an empty list; send at least one text", param=param, code="invalid_schema")
        check_count(len(texts), param)
        if dimensions is not None and engine.dimensions is not None and dimensions > engine.dimensions:
            raise ApiError(
                400,
                f"{dimensions_param}={dimensions} is more than model {engine.name!r} has ({engine.dimensions})",
                param=dimensions_param,
                code="invalid_dimensions",
            )
        options = options or EmbedOptions()
        return await run(engine, (texts, input_type, truncate, options), param, http, **prepare_options)

    async def rerank_documents(
        engine: RerankEngine, query: str, documents: list[str], truncate: bool, http: Request, **prepare_options
    ) -> tuple[Any, Any]:
        """What /v1/rerank and /v2/rerank share: the request's size, then tokenize, batch and score.
        Returns ``(work, raw scores)``."""
        check_count(len(documents), "documents")
        return await run(engine, (query, documents, truncate), "documents", http, **prepare_options)

    router = APIRouter()

    @router.post(
        "/embeddings",
        response_model=EmbeddingResponse,
        responses=ERROR_RESPONSES,
        summary="Create embeddings (OpenAI schema)",
        dependencies=[Security(bearer)],
    )
    async def embeddings(request: EmbeddingRequest, http: Request) -> Response:
        """Embed one text or a list of texts. ``usage`` counts the model's real tokens.

        M3 models (BAAI/bge-m3) also return sparse ``lexical_weights`` and ``colbert_vecs`` on request.
        """
        engine = pick(request.model, "embeddings")
        texts = [request.input] if isinstance(request.input, str) else request.input
        options = EmbedOptions(request.return_dense, request.return_sparse, request.return_colbert_vecs)
        if (options.sparse or options.colbert or not options.dense) and not engine.is_m3:
            raise ApiError(
                400,
                f"return_sparse / return_colbert_vecs / return_dense=false need an M3 model (BAAI/bge-m3); "
                f"{engine.name!r} gives dense vectors only",
                param="return_sparse"
                if options.sparse
                else "return_colbert_vecs"
                if options.colbert
                else "return_dense",
                code="unsupported_output",
            )
        if not (options.dense or options.sparse or options.colbert):
            raise ApiError(400, "nothing to return: every return_* option is false", param="return_dense")
        # dimensions shapes the dense embedding only (sparse weights and ColBERT vectors are never cut):
        # checked, and applied, when one is returned; with return_dense=false there is nothing to shape
        dimensions = request.dimensions if options.dense else None
        truncate = config.truncate if request.truncate is None else request.truncate
        work, result = await embed(
            engine,
            texts,
            request.input_type,
            truncate,
            http,
            param="input",
            options=options,
            dimensions=dimensions,
        )
        encoding_format = request.encoding_format or "float"  # null: float, as OpenAI's default
        return await render(engine.render, work, result, encoding_format=encoding_format, dimensions=dimensions)

    @router.post(
        "/rerank",
        response_model=RerankResponse,
        response_model_exclude_none=True,
        responses=ERROR_RESPONSES,
        summary="Rerank documents for a query (Cohere / Jina schema)",
        dependencies=[Security(bearer)],
    )
    async def rerank(request: RerankRequest, http: Request) -> Response:
        """Score every document against the query; results come best first.

        Scores are the library's ``compute_score``: sigmoid-normalized unless ``raw_scores``.
        Cross-encoders and LLM rerankers (bge-reranker-v2-gemma, layerwise, lightweight) are all served.
        """
        documents = [d.text if isinstance(d, RerankDocument) else d for d in request.documents]
        truncate = config.truncate if request.truncate is None else request.truncate
        engine = pick(request.model, "rerank")
        work, scores = await rerank_documents(engine, request.query, documents, truncate, http)
        return await render(
            engine.render,
            work,
            scores,
            documents=documents,
            top_n=request.top_n,
            return_documents=request.return_documents,
            raw_scores=request.raw_scores,
        )

    @router.get(
        "/models",
        response_model=ModelList,
        responses={401: ERROR_RESPONSES[401]},
        summary="List served models",
        dependencies=[Security(bearer)],
    )
    async def models() -> dict:
        return {"object": "list", "data": [e.card() for e in engines.values()]}

    @router.get(
        "/models/{model_id:path}",
        response_model=ModelCard,
        responses={401: ERROR_RESPONSES[401], 404: {"model": ErrorResponse, "description": "Not served here"}},
        summary="One served model (the openai client's models.retrieve)",
        dependencies=[Security(bearer)],
    )
    async def model(model_id: str) -> dict:
        engine = engines.get(model_id)
        if engine is None:
            message = f"model {model_id!r} is not served here; served models: {sorted(engines)}"
            raise ApiError(404, message, param="model", code="model_not_found")
        return engine.card()

    @router.get(
        "/health",
        response_model=HealthResponse,
        responses={503: {"model": HealthResponse, "description": "A model worker is stuck, failing or stopped"}},
        summary="Health: 200 while every model worker makes progress, 503 otherwise",
    )
    async def health() -> JSONResponse:
        report = {
            name: {
                "status": b.status(),
                "queued": b.queued,
                "busy_seconds": round(b.busy_seconds(), 3),
                "consecutive_failures": b.consecutive_failures,
                "last_error": b.last_error,
            }
            for name, b in batchers.items()
        }
        ok = all(b.healthy() for b in batchers.values())
        return JSONResponse({"status": "ok" if ok else "unhealthy", "models": report}, status_code=200 if ok else 503)

    @router.get("/metrics", summary="Prometheus metrics", response_class=Response)
    async def prometheus(http: Request) -> Response:
        body, content_type = metrics.render(http.headers.get("accept"))
        return Response(body, headers={"Content-Type": content_type})

    # HEAD too: load balancers and uptime probes send it (RFC 9110 section 9.1). Routes of their own, out of
    # the schema: one route with both methods gives the OpenAPI schema one operation id twice.
    router.add_api_route("/health", health, methods=["HEAD"], include_in_schema=False)
    router.add_api_route("/metrics", prometheus, methods=["HEAD"], include_in_schema=False)

    cohere = APIRouter(prefix="/v2")

    @cohere.post(
        "/rerank",
        response_model=CohereRerankResponse,
        response_model_exclude_none=True,
        responses=ERROR_RESPONSES,
        summary="Rerank documents for a query (Cohere v2 schema)",
        dependencies=[Security(bearer)],
    )
    async def rerank_v2(request: CohereRerankRequest, http: Request) -> Response:
        """Cohere's v2 rerank (``cohere.ClientV2().rerank``): results best first, scores in (0, 1) as the
        library's ``compute_score(..., normalize=True)``.

        ``max_tokens_per_doc`` cuts each document to its first N tokens before it is paired with the query;
        pairs past the model's limit are cut as ``compute_score`` cuts them (the server's ``--truncate``)."""
        engine = pick(request.model, "rerank", "v2")
        work, scores = await rerank_documents(
            engine,
            request.query,
            request.documents,
            config.truncate,
            http,
            max_tokens_per_doc=request.max_tokens_per_doc,
            cut_hint=CUT_THEM_V2_RERANK,
        )
        return await render(
            engine.render_cohere,
            work,
            scores,
            documents=request.documents,
            top_n=request.top_n,
            return_documents=request.return_documents,
        )

    @cohere.post(
        "/embed",
        response_model=CohereEmbedResponse,
        response_model_exclude_none=True,
        responses=ERROR_RESPONSES,
        summary="Create embeddings (Cohere v2 schema)",
        dependencies=[Security(bearer)],
    )
    async def embed_v2(request: CohereEmbedRequest, http: Request) -> Response:
        """Cohere's v2 embed (``cohere.ClientV2().embed``): ``search_query`` texts get the model's query
        instruction (``encode_queries``), ``search_document`` its passage rule (``encode_corpus``),
        ``classification`` and ``clustering`` none (``encode``). ``embedding_types``: float, binary, ubinary."""
        embedding_types = list(dict.fromkeys(request.embedding_types or ["float"]))
        unsupported = [kind for kind in embedding_types if kind not in EMBEDDING_TYPES]
        if unsupported:
            raise ApiError(
                400,
                f"embedding_types {unsupported} are not supported here; this server returns {list(EMBEDDING_TYPES)} "
                "(int8 / uint8 need a calibration range per dimension the model does not come with: computed from the "
                "request, a text's codes would change with the other texts sent; base64: use /v1/embeddings' "
                "encoding_format=base64)",
                param="embedding_types",
                code="unsupported_embedding_type",
            )
        input_type = COHERE_INPUT_TYPES[request.input_type]
        engine = pick(request.model, "embeddings", "v2")
        truncate = request.truncate or ("END" if config.truncate else "NONE")
        side = {"START": "left", "END": "right", "NONE": None}[truncate]
        if side == "left" and (problem := engine.model.start_cut_problem(input_type)):
            raise ApiError(
                400,
                f"truncate=START cuts the start of each text, but for model {engine.name!r} {problem}; send truncate "
                "END (cut the end) or NONE (413 on a text too long)",
                param="truncate",
                code="unsupported_truncate",
            )
        work, result = await embed(
            engine,
            request.texts,
            input_type,
            truncate != "NONE",
            http,
            param="texts",
            dimensions=request.output_dimension,
            dimensions_param="output_dimension",
            truncation_side=side,
            max_tokens=request.max_tokens,
            cut_hint=CUT_THEM_V2_EMBED,
        )
        return await render(
            engine.render_cohere,
            work,
            result,
            texts=request.texts,
            embedding_types=embedding_types,
            dimensions=request.output_dimension,
        )

    app.include_router(router, prefix="/v1")
    app.include_router(router, include_in_schema=False)
    app.include_router(cohere)
    return app


async def _disconnected(request: Request) -> None:
    """Return when the client closes the connection (the body has been read by then)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = exc.errors() or [{"loc": (), "msg": "invalid request"}]
        broken = next((e for e in errors if e.get("type") == "json_invalid"), None)
        if broken is not None:  # its loc holds a character offset, not a field
            at = broken.get("loc", ())[-1:]
            where = f" at character {at[0]}" if at and isinstance(at[0], int) else ""
            detail = (broken.get("ctx") or {}).get("error") or broken.get("msg", "JSON decode error")
            message = f"the request body is not valid JSON ({detail}{where})"
            return ApiError(400, message, code="invalid_json").response()
        # the most specific problem: a union field reports one error per member, the deepest names the item
        first = max(errors, key=lambda e: len(e.get("loc", ())))
        loc = [part for part in first.get("loc", ()) if part != "body"]
        if not loc:  # the body itself: not JSON, not an object, or no JSON content type
            message = (
                "the request body must be a JSON object sent with 'Content-Type: application/json' "
                f"({first.get('msg', 'invalid body')})"
            )
            return ApiError(422, message, code="invalid_schema").response()
        path = str(loc[0]) + "".join(
            f"[{part}]" if isinstance(part, int) else f".{part}" for part in loc[1:] if part not in _UNION_TAGS
        )
        fields = sorted({str(e["loc"][1]) for e in errors if len(e.get("loc", ())) > 1} - {str(loc[0])})
        more = f" (also check: {', '.join(fields)})" if fields else ""
        problem = first.get("msg", "invalid value")
        schema = COHERE_SCHEMAS.get(request.url.path)
        if first.get("type") == "extra_forbidden" and schema is not None:
            problem = f"{request.url.path} has no such field (it takes {', '.join(schema.model_fields)})"
        message = f"{path}: {problem}{more}"
        return ApiError(422, message, param=str(loc[0]), code="invalid_schema").response()

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        bad = exc.__cause__  # FastAPI's "error parsing the body" hides why: bytes that are not UTF-8
        if isinstance(bad, UnicodeDecodeError):
            message = f"the request body is not UTF-8 JSON (byte {bad.object[bad.start]:#04x} at offset {bad.start})"
            return ApiError(400, message, code="invalid_json").response()
        kind = "invalid_request_error" if exc.status_code < 500 else "server_error"
        code = {404: "not_found", 405: "method_not_allowed", 413: "request_too_large"}.get(exc.status_code)
        return ApiError(exc.status_code, str(exc.detail), type=kind, code=code, headers=exc.headers).response()

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception) -> JSONResponse:
        logger.exception("unexpected error on %s", request.url.path)
        return ApiError(500, f"internal error: {type(exc).__name__}: {exc}", type="server_error").response()


def serve_until_stopped(
    app: FastAPI, *, host: str, port: int, log_level: str, access_log: bool, graceful_timeout: float
) -> None:
    """Run ``app`` on uvicorn until SIGTERM or Ctrl-C. Shutdown drains: no new connections or requests,
    admitted requests get ``graceful_timeout`` seconds to finish, then a 503 (``begin_shutdown``)."""
    import uvicorn

    class DrainingServer(uvicorn.Server):
        async def shutdown(self, sockets: Any = None) -> None:
            app.state.begin_shutdown(graceful_timeout)
            await super().shutdown(sockets)

    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        log_level=log_level,
        access_log=access_log,
        timeout_graceful_shutdown=graceful_timeout,
    )
    DrainingServer(config).run()
