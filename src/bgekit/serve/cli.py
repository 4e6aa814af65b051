"""The ``bgekit serve`` command. Only typer is imported here; the server's own dependencies
(fastapi, uvicorn, prometheus-client) load when the command runs, so ``bgekit --help``
stays fast. Every option can also come from an environment variable (``BGEKIT_<NAME>``).
"""

from __future__ import annotations

import logging
from enum import StrEnum
from typing import Annotated

import typer

from ..cli_options import (
    BACKEND_HELP,
    Backend,
    Packing,
    backend_options,
    family_options,
    int_list,
    model_text,
    packing_options,
    text_value,
)

logger = logging.getLogger("bgekit.serve")

LOOPBACK = {"127.0.0.1", "localhost", "::1"}


def check_can_listen(host: str, port: int) -> None:
    """An :class:`InputError` before any model loads when uvicorn could not listen on ``host:port`` (a
    host name that does not resolve, a port in use or not ours to take); found once the models had
    loaded, it was a uvicorn log line and exit status 3. The probe binds every address the host
    resolves to, as asyncio's ``create_server`` under uvicorn does (SO_REUSEADDR, IPv6 only on v6)."""
    import socket

    from ..errors import InputError

    try:
        addresses = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise InputError(f"cannot listen on {host}:{port}: {exc.strerror}") from None
    for family, kind, proto, _, address in dict.fromkeys(addresses):
        with socket.socket(family, kind, proto) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                probe.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            try:
                probe.bind(address)
            except OSError as exc:
                raise InputError(f"cannot listen on {host}:{port}: {exc.strerror}") from None


class DType(StrEnum):
    auto = "auto"
    float32 = "float32"
    float16 = "float16"
    bfloat16 = "bfloat16"


class LogLevel(StrEnum):
    debug = "debug"
    info = "info"
    warning = "warning"
    error = "error"


def precision_options(dtype: DType) -> dict[str, bool]:
    """``--dtype`` as the library's use_fp16 / use_bf16 (auto: each class's own default)."""
    return {
        DType.auto: {},
        DType.float32: {"use_fp16": False, "use_bf16": False},
        DType.float16: {"use_fp16": True, "use_bf16": False},
        DType.bfloat16: {"use_fp16": False, "use_bf16": True},
    }[dtype]


def served_names(models: list[str], rerankers: list[str], names: list[str]) -> list[str]:
    """One name per model: ``--served-model-name`` values in order (embedders, then rerankers),
    the model argument itself for the rest."""
    from ..errors import InputError

    sources = [*models, *rerankers]
    if len(names) > len(sources):
        raise InputError(
            f"{len(names)} --served-model-name values for {len(sources)} models; give at most one per model "
            "(in order: every --model, then every --reranker)"
        )
    out = [*names, *sources[len(names) :]]
    duplicates = sorted({n for n in out if out.count(n) > 1})
    if duplicates:
        raise InputError(f"two models would be served as {duplicates}; name them with --served-model-name")
    return out


#: embedder options that depend on the model's family: flag -> environment variable
FAMILY_FLAGS = {
    "--model-class": "BGEKIT_MODEL_CLASS",
    "--pooling-method": "BGEKIT_POOLING_METHOD",
    "--query-instruction": "BGEKIT_QUERY_INSTRUCTION",
    "--examples": "BGEKIT_EXAMPLES",
}


def flag_values(given: list[str] | None, flag: str) -> list[str]:
    """A family flag's values: the command line's, else its variable's, one value a line (an instruction
    holds spaces, so the variable is not split on them as other lists are; set empty it is one ``""``)."""
    import os

    if given:
        return list(given)
    value = os.environ.get(FAMILY_FLAGS[flag])
    return [] if value is None else value.split("\n")


def per_model(flag: str, values: list[str], embedders: list[str], rerankers: list[str]) -> list[str | None]:
    """One value of a family flag per ``--model`` (``None``: the model's own), from ``NAME=VALUE`` values
    (NAME: a served name) or one plain VALUE when one ``--model`` is served. A family flag is about one
    model (bge-en's instruction is not e5's; last-token pooling is wrong for BERT), so with several models
    a value that names none is an error, not a setting for all of them."""
    from ..errors import InputError

    out: list[str | None] = [None] * len(embedders)
    plain = []
    for value in values:
        name, has_name, rest = value.partition("=")
        if has_name and name in embedders:
            index = embedders.index(name)
        elif has_name and name in rerankers:
            raise InputError(f"{flag} {value!r}: {name!r} is a --reranker; {flag} is for --model")
        else:
            plain.append(value)
            continue
        if out[index] is not None:
            raise InputError(f"{flag} is given twice for {name!r}; give it once per model")
        out[index] = rest
    if not plain:
        return out
    if len(embedders) > 1 or len(plain) > 1:
        raise InputError(
            f"{flag} {plain[0]!r} does not say which model it is for, and {len(embedders)} --model are served "
            f"({', '.join(embedders)}): give it as {flag} NAME=VALUE, NAME a served name, once for each model "
            "it is for (the others keep their own)"
        )
    if out[0] is not None:
        raise InputError(f"{flag} is given twice for {embedders[0]!r}; give it once per model")
    out[0] = plain[0]
    return out


def cors_origins(origins: list[str]) -> tuple[str, ...]:
    """``--cors-origin`` values, checked: a browser sends its page's origin as ``scheme://host[:port]``, so a
    value with a path (or only a trailing slash) would match nothing and every cross-origin call would fail."""
    from urllib.parse import urlsplit

    from ..errors import InputError

    for origin in origins:
        parts = urlsplit(origin)
        if origin != "*" and not (parts.scheme and parts.netloc and not (parts.path or parts.query or parts.fragment)):
            raise InputError(
                f"--cors-origin {origin!r} is not an origin: give scheme://host[:port] with no path or trailing "
                "slash (e.g. https://app.example.com or http://localhost:3000), or '*' for any"
            )
    return tuple(origins)


def reranker_layer_options(rerankers: list[str], **given: object) -> dict[str, object]:
    """``--cutoff-layers`` / ``--compress-*`` as reranker options, refused for a served reranker of a
    family that has no such layers, and several cutoff layers refused (a ranking needs one score a
    document), before any model loads."""
    from .. import hub, registry
    from ..errors import InputError

    chosen = {key: value for key, value in given.items() if value is not None}
    layers = chosen.get("cutoff_layers")
    if isinstance(layers, list) and len(layers) > 1:
        raise InputError(
            f"--cutoff-layers {','.join(map(str, layers))}: a served reranker gives one score a document; "
            f"give one layer (e.g. --cutoff-layers {layers[-1]})"
        )
    if chosen and not rerankers:
        flags = ", ".join("--" + key.replace("_", "-") for key in sorted(chosen))
        raise InputError(f"{flags} set the served reranker's layers, but no --reranker is served")
    for source in rerankers if chosen else []:
        kind = hub.resolve(source, registry.RERANKERS, for_reranker=True)[1].kind
        takes = {"cutoff_layers"} if kind == registry.LAYERWISE_RERANKER else set()
        if kind == registry.LIGHTWEIGHT_RERANKER:
            takes = {"cutoff_layers", "compress_ratio", "compress_layers"}
        refused = sorted(set(chosen) - takes)
        if refused:
            flags = ", ".join("--" + key.replace("_", "-") for key in refused)
            raise InputError(f"{flags}: {source} is a {kind} reranker, which has no such option")
    return chosen


def register(app: typer.Typer) -> None:
    """Add ``serve`` to the ``bgekit`` command line."""
    from ..cli import friendly_errors

    @app.command()
    @friendly_errors
    def serve(
        model: Annotated[
            list[str] | None,
            typer.Option(
                "--model",
                "-m",
                envvar="BGEKIT_MODEL",
                help="Embedding model (hub id or folder) for /v1/embeddings; repeat for several "
                "(env: space-separated).",
                parser=model_text,
            ),
        ] = None,
        reranker: Annotated[
            list[str] | None,
            typer.Option(
                "--reranker",
                "-r",
                envvar="BGEKIT_RERANKER",
                help="Reranker (cross-encoder or LLM reranker) for /v1/rerank; repeat for several.",
                parser=model_text,
            ),
        ] = None,
        model_class: Annotated[
            list[str] | None,
            typer.Option(
                help="Embedders: family override, as for `bgekit embed`. With several --model, NAME=VALUE "
                "(NAME: a served name), once per model it is for (env BGEKIT_MODEL_CLASS: one value a line).",
                parser=text_value,
            ),
        ] = None,
        pooling_method: Annotated[
            list[str] | None,
            typer.Option(
                help="Embedders: pooling override (cls, mean, last_token); NAME=VALUE as for --model-class "
                "(env BGEKIT_POOLING_METHOD).",
                parser=text_value,
            ),
        ] = None,
        query_instruction: Annotated[
            list[str] | None,
            typer.Option(
                help="Embedders: instruction for input_type=query (default: the model's; '' for none); "
                "NAME=VALUE as for --model-class (env BGEKIT_QUERY_INSTRUCTION).",
            ),
        ] = None,
        examples: Annotated[
            list[str] | None,
            typer.Option(
                help="In-context examples for ICL embedders (bge-en-icl), a JSON list or JSONL file, put before "
                "every query; NAME=FILE as for --model-class (env BGEKIT_EXAMPLES).",
                parser=text_value,
            ),
        ] = None,
        cutoff_layers: Annotated[
            str | None,
            typer.Option(
                envvar="BGEKIT_CUTOFF_LAYERS",
                help="Layerwise / lightweight rerankers: the layer whose score is served (e.g. 28; default the last).",
                parser=text_value,
            ),
        ] = None,
        compress_ratio: Annotated[
            int | None,
            typer.Option(envvar="BGEKIT_COMPRESS_RATIO", min=1, help="Lightweight rerankers: token compression ratio."),
        ] = None,
        compress_layers: Annotated[
            str | None,
            typer.Option(
                envvar="BGEKIT_COMPRESS_LAYERS",
                help="Lightweight rerankers: compressing layers (24,40).",
                parser=text_value,
            ),
        ] = None,
        served_model_name: Annotated[
            list[str] | None,
            typer.Option(
                envvar="BGEKIT_SERVED_MODEL_NAME",
                help="Name clients use in 'model', one per model in order (every --model, then every "
                "--reranker); default: the model argument.",
                parser=text_value,
            ),
        ] = None,
        host: Annotated[
            str,
            typer.Option(
                envvar="BGEKIT_HOST", help="Address to bind (0.0.0.0: every IPv4 interface).", parser=text_value
            ),
        ] = "127.0.0.1",
        port: Annotated[int, typer.Option(envvar="BGEKIT_PORT", min=1, max=65535)] = 8000,
        api_key: Annotated[
            str | None,
            typer.Option(
                envvar="BGEKIT_API_KEY",
                help="Require 'Authorization: Bearer KEY' on the API routes.",
                parser=text_value,
            ),
        ] = None,
        cors_origin: Annotated[
            list[str] | None,
            typer.Option(
                "--cors-origin",
                envvar="BGEKIT_CORS_ORIGIN",
                help="Let web pages from this origin (scheme://host[:port], or '*' for any) call the API from a "
                "browser; repeat for several (env: space-separated). Default: no CORS headers.",
                parser=text_value,
            ),
        ] = None,
        max_batch_tokens: Annotated[
            int | None,
            typer.Option(
                envvar="BGEKIT_MAX_BATCH_TOKENS",
                min=1,
                help="Padded tokens (items x longest) per forward batch; default 16384 on GPU, 4096 on CPU.",
            ),
        ] = None,
        max_queue: Annotated[
            int,
            typer.Option(envvar="BGEKIT_MAX_QUEUE", min=1, help="Requests waiting per model before 429."),
        ] = 512,
        max_client_batch_size: Annotated[
            int,
            typer.Option(
                envvar="BGEKIT_MAX_CLIENT_BATCH_SIZE", min=1, help="Most texts (or documents) in one request (413)."
            ),
        ] = 2048,
        max_request_bytes: Annotated[
            int,
            typer.Option(
                envvar="BGEKIT_MAX_REQUEST_BYTES",
                min=1024,
                help="Largest request body in bytes (413 before it is read or parsed).",
            ),
        ] = 32 * 2**20,
        truncate: Annotated[
            bool,
            typer.Option(
                "--truncate/--no-truncate",
                envvar="BGEKIT_TRUNCATE",
                help="Cut inputs longer than the model's max length (default), or reject them with 413.",
            ),
        ] = True,
        max_length: Annotated[
            int | None,
            typer.Option(envvar="BGEKIT_MAX_LENGTH", min=2, help="Token limit per input (default: the model's)."),
        ] = None,
        dtype: Annotated[
            DType, typer.Option(envvar="BGEKIT_DTYPE", help="Precision (on the CPU: bfloat16, else float32).")
        ] = DType.auto,
        device: Annotated[
            list[str] | None,
            typer.Option(
                "--device",
                envvar="BGEKIT_DEVICE",
                help="Device, e.g. cpu or cuda:0 (default: auto).",
                parser=text_value,
            ),
        ] = None,
        packed: Annotated[
            Packing,
            typer.Option(
                envvar="BGEKIT_PACKED",
                help="Packed (padding-free) forward batches: auto (on for CUDA fp16/bf16), on, off.",
            ),
        ] = Packing.auto,
        backend: Annotated[Backend, typer.Option(envvar="BGEKIT_BACKEND", help=BACKEND_HELP)] = Backend.torch,
        trust_remote_code: Annotated[
            bool,
            typer.Option(envvar="BGEKIT_TRUST_REMOTE_CODE", help="Run modeling code shipped in the model folder."),
        ] = False,
        stuck_timeout: Annotated[
            float,
            typer.Option(
                envvar="BGEKIT_STUCK_TIMEOUT",
                min=0.1,
                help="Seconds a batch may run without progress before /health turns red and requests get 503.",
            ),
        ] = 60.0,
        batch_wait_ms: Annotated[
            float,
            typer.Option(
                envvar="BGEKIT_BATCH_WAIT_MS",
                min=0,
                help="Wait this long for more requests before a batch (0: never wait; lowest latency).",
            ),
        ] = 0.0,
        tokenizer_threads: Annotated[
            int, typer.Option(envvar="BGEKIT_TOKENIZER_THREADS", min=1, help="Threads that tokenize requests.")
        ] = 2,
        graceful_timeout: Annotated[
            float,
            typer.Option(
                envvar="BGEKIT_GRACEFUL_TIMEOUT",
                min=0,
                help="On SIGTERM / Ctrl-C: seconds admitted requests get to finish (new ones get 503); "
                "those still running then get a 503 too.",
            ),
        ] = 10.0,
        log_level: Annotated[LogLevel, typer.Option(envvar="BGEKIT_LOG_LEVEL")] = LogLevel.info,
        access_log: Annotated[bool, typer.Option(envvar="BGEKIT_ACCESS_LOG", help="Log one line per request.")] = False,
    ) -> None:
        """Serve embedding and rerank models over HTTP (OpenAI /v1/embeddings, Cohere-style /v1/rerank).

        Example: bgekit serve --model BAAI/bge-small-en-v1.5 --reranker BAAI/bge-reranker-base --port 8000
        """
        from ..errors import InputError

        models, rerankers = list(model or []), list(reranker or [])
        if not models and not rerankers:
            raise InputError("nothing to serve: pass --model (embeddings) and/or --reranker (or set BGEKIT_MODEL)")
        names = served_names(models, rerankers, list(served_model_name or []))
        origins = cors_origins(list(cors_origin or []))
        try:
            import uvicorn  # noqa: F401  (the extra's presence, checked before models load)

            from .app import ServeConfig, create_app, serve_until_stopped
            from .engines import EmbeddingEngine, RerankEngine
        except ImportError as exc:
            raise InputError(
                f"bgekit serve needs the serve extra ({exc.name} is missing): pip install 'bgekit[serve]'"
            ) from None
        from ..models.embedder import Embedder
        from ..models.reranker import Reranker

        check_can_listen(host, port)
        logging.getLogger("bgekit").setLevel(log_level.value.upper())
        if host not in LOOPBACK and not api_key:
            logger.warning("binding %s without --api-key: anyone who can reach this port can use the server", host)
        options: dict = {**precision_options(dtype), **packing_options(packed), "devices": device or None}
        if trust_remote_code:
            options["trust_remote_code"] = True
        embed_options = {**options, "query_max_length": max_length, "passage_max_length": max_length}

        def budget(engine_devices: list[str]) -> int:
            if max_batch_tokens is not None:
                return max_batch_tokens
            return 16384 if any(d.startswith("cuda") for d in engine_devices) else 4096

        # every model's family (and the family flags) is checked before the first one loads
        layer_options = reranker_layer_options(
            rerankers,
            cutoff_layers=int_list(cutoff_layers, "--cutoff-layers"),
            compress_ratio=compress_ratio,
            compress_layers=int_list(compress_layers, "--compress-layers"),
        )
        # BGEKIT_QUERY_INSTRUCTION= (empty) is --query-instruction '': no instruction
        given = {
            flag: flag_values(values, flag)
            for flag, values in zip(
                FAMILY_FLAGS, (model_class, pooling_method, query_instruction, examples), strict=True
            )
        }
        if not models and any(given.values()):
            raise InputError("--model-class, --pooling-method, --query-instruction and --examples are for --model")
        settings = [
            per_model(flag, values, names[: len(models)], names[len(models) :]) for flag, values in given.items()
        ]
        families = [family_options(m, *(values[i] for values in settings))[1] for i, m in enumerate(models)]
        sources = [*models, *rerankers]
        backends = [backend_options(backend, source, reranker=i >= len(models)) for i, source in enumerate(sources)]
        embedders, scorers = [], []
        for name, source, runs_on in zip(names, sources, backends, strict=True):
            if len(embedders) < len(models):
                loaded = Embedder.from_pretrained(source, **embed_options, **families[len(embedders)], **runs_on)
                engine = EmbeddingEngine(name, source, loaded, 1, max_length_option=max_length)
                embedders.append(engine)
            else:
                loaded = Reranker.from_pretrained(source, **options, **runs_on, **layer_options, max_length=max_length)
                engine = RerankEngine(name, source, loaded, 1, max_length_option=max_length)
                scorers.append(engine)
            engine.max_batch_tokens = budget(engine.devices)
            engine.warm_up()
            typer.echo(f"loaded {name!r} ({type(loaded).__name__}) from {source}", err=True)
        config = ServeConfig(
            api_key=api_key,
            truncate=truncate,
            max_queue=max_queue,
            max_client_batch_size=max_client_batch_size,
            max_request_bytes=max_request_bytes,
            stuck_timeout=stuck_timeout,
            batch_wait_ms=batch_wait_ms,
            tokenizer_threads=tokenizer_threads,
            cors_origins=origins,
        )
        server_app = create_app(embedders, scorers, config)
        serve_until_stopped(
            server_app,
            host=host,
            port=port,
            log_level=log_level.value,
            access_log=access_log,
            graceful_timeout=graceful_timeout,
        )
