"""Load test for ``bgekit serve``: throughput and p50 / p99 latency at several concurrencies.

Loopback only and bounded: it talks to 127.0.0.1 / localhost / ::1 and nothing else, and each
concurrency level stops after ``--requests`` requests or ``--duration`` seconds, whichever
comes first. It reports requests/s, texts/s, p50 / p99 latency, errors, and the server's mean
dynamic batch size over the level (from /metrics).

Against a running server:

    python benchmarks/load_test.py --url http://127.0.0.1:8000 --model minilm --concurrency 1 8 32

Or let it start (and stop) one for you:

    python benchmarks/load_test.py --serve sentence-transformers/all-MiniLM-L6-v2 --concurrency 1 8 32
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from urllib.parse import urlparse

import httpx

LOOPBACK = {"127.0.0.1", "localhost", "::1"}
VOCABULARY = (
    "the giant panda is a bear native to china that eats bamboo dense retrieval ranks passages by the "
    "similarity of their vectors to a query paris is the capital of france and embeddings power search"
)
WORDS = VOCABULARY.split()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    target = parser.add_mutually_exclusive_group(required=True)
    target.add_argument("--url", help="A running server on loopback, e.g. http://127.0.0.1:8000")
    target.add_argument("--serve", metavar="MODEL", help="Start `bgekit serve --model MODEL` on a free loopback port")
    parser.add_argument("--model", default=None, help="Served model name (default: the --serve model)")
    parser.add_argument("--route", choices=["embeddings", "rerank"], default="embeddings")
    parser.add_argument("--api-key", default=os.environ.get("BGEKIT_API_KEY"))
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32], help="Client counts to try")
    parser.add_argument("--requests", type=int, default=200, help="Most requests per concurrency level")
    parser.add_argument("--duration", type=float, default=30.0, help="Most seconds per concurrency level")
    parser.add_argument("--texts-per-request", type=int, default=1, help="Inputs (or documents) per request")
    parser.add_argument("--words", type=int, nargs=2, default=[8, 48], metavar=("MIN", "MAX"), help="Text length")
    parser.add_argument("--serve-args", default="", help="Extra arguments for --serve, e.g. '--max-batch-tokens 8192'")
    parser.add_argument("--json", type=Path, default=None, help="Also write the results here")
    args = parser.parse_args(argv)
    if args.requests < 1 or args.duration <= 0 or min(args.concurrency) < 1 or args.texts_per_request < 1:
        parser.error("--requests, --duration, --concurrency and --texts-per-request must be positive")
    if args.url is not None and urlparse(args.url).hostname not in LOOPBACK:
        parser.error(f"refusing {args.url}: this load test only talks to loopback (127.0.0.1, localhost, ::1)")
    if args.model is None:
        if args.serve is None:
            parser.error("--model is required with --url")
        args.model = "bench"
    return args


def make_texts(count: int, words: tuple[int, int], seed: int) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(*words))) for _ in range(count)]


def batch_metrics(client: httpx.Client, model: str) -> tuple[float, float]:
    """(batches, requests batched) so far for ``model``, from /metrics."""
    batches = joined = 0.0
    for line in client.get("/metrics").text.splitlines():
        if f'model="{model}"' not in line:
            continue
        if line.startswith("bgekit_batch_requests_count"):
            batches = float(line.rsplit(" ", 1)[1])
        elif line.startswith("bgekit_batch_requests_sum"):
            joined = float(line.rsplit(" ", 1)[1])
    return batches, joined


class Connection:
    """A minimal HTTP/1.1 keep-alive client on asyncio streams: much lighter than a full client
    library, so on a small machine the load generator takes little CPU from the server."""

    def __init__(self, url: str, headers: dict[str, str]):
        parsed = urlparse(url)
        self.host, self.port = parsed.hostname, parsed.port or 80
        self.head = "".join(f"{k}: {v}\r\n" for k, v in {"Host": f"{self.host}:{self.port}", **headers}.items())
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def post(self, path: str, body: dict) -> tuple[int, bytes]:
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        payload = json.dumps(body).encode()
        self.writer.write(
            f"POST {path} HTTP/1.1\r\n{self.head}Content-Type: application/json\r\n"
            f"Content-Length: {len(payload)}\r\n\r\n".encode()
            + payload
        )
        await self.writer.drain()
        status_line = await self.reader.readline()
        if not status_line:
            raise ConnectionError("the server closed the connection")
        length, close = 0, False
        while (line := await self.reader.readline()) not in (b"\r\n", b""):
            name, _, value = line.decode("latin-1").partition(":")
            if name.lower() == "content-length":
                length = int(value)
            elif name.lower() == "connection" and value.strip().lower() == "close":
                close = True
        content = await self.reader.readexactly(length)
        if close:
            await self.close()
        return int(status_line.split()[1]), content

    async def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            with contextlib.suppress(OSError):
                await self.writer.wait_closed()
        self.reader = self.writer = None


async def run_level(args: argparse.Namespace, url: str, concurrency: int) -> dict:
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    texts = make_texts(args.requests * args.texts_per_request, tuple(args.words), seed=concurrency)
    latencies: list[float] = []
    errors: dict[str, int] = {}
    issued = 0
    deadline = time.monotonic() + args.duration
    path = f"/v1/{args.route}"

    def body(i: int) -> dict:
        chunk = texts[i * args.texts_per_request : (i + 1) * args.texts_per_request]
        if args.route == "rerank":
            return {"model": args.model, "query": "what do pandas eat?", "documents": chunk}
        return {"model": args.model, "input": chunk}

    async def worker(connection: Connection) -> None:
        nonlocal issued
        while issued < args.requests and time.monotonic() < deadline:
            i = issued
            issued += 1
            started = time.perf_counter()
            try:
                status, _ = await connection.post(path, body(i))
            except (OSError, asyncio.IncompleteReadError, ValueError) as exc:
                status = type(exc).__name__
                await connection.close()
            if status == 200:
                latencies.append(time.perf_counter() - started)
            else:
                errors[str(status)] = errors.get(str(status), 0) + 1

    connections = [Connection(url, headers) for _ in range(concurrency)]
    try:
        await asyncio.gather(*(c.post(path, body(0)) for c in connections))  # connect, warm the model
        started = time.perf_counter()
        await asyncio.wait_for(asyncio.gather(*(worker(c) for c in connections)), timeout=args.duration + 60)
        wall = time.perf_counter() - started
    finally:
        await asyncio.gather(*(c.close() for c in connections))
    done = len(latencies)
    ordered = sorted(latencies) or [float("nan")]
    return {
        "concurrency": concurrency,
        "requests": done,
        "errors": errors,
        "seconds": round(wall, 3),
        "req_per_s": round(done / wall, 1),
        "texts_per_s": round(done * args.texts_per_request / wall, 1),
        "p50_ms": round(1000 * statistics.median(ordered), 1),
        "p99_ms": round(1000 * ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))], 1),
    }


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_server(args: argparse.Namespace) -> tuple[subprocess.Popen, str]:
    bgekit = shutil.which("bgekit", path=str(Path(sys.executable).parent)) or "bgekit"
    port = free_port()
    command = [bgekit, "serve", "--host", "127.0.0.1", "--port", str(port), "--model", args.serve]
    command += ["--served-model-name", args.model, *args.serve_args.split()]
    if args.api_key:
        command += ["--api-key", args.api_key]
    print("starting:", " ".join(command), file=sys.stderr)
    log = tempfile.NamedTemporaryFile(prefix="bgekit-serve-", suffix=".log", delete=False)  # noqa: SIM115
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
    log.close()
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if process.poll() is not None:
            tail = Path(log.name).read_text(errors="replace")[-2000:]
            raise SystemExit(f"bgekit serve exited with {process.returncode} (log {log.name}):\n{tail}")
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return process, url
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    process.kill()
    raise SystemExit("bgekit serve did not become healthy in 300 s")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    process = None
    url = args.url
    if args.serve is not None:
        process, url = start_server(args)
    try:
        rows = []
        with httpx.Client(base_url=url, timeout=30) as probe:
            for concurrency in args.concurrency:
                before = batch_metrics(probe, args.model)
                row = asyncio.run(run_level(args, url, concurrency))
                after = batch_metrics(probe, args.model)
                batches = after[0] - before[0]
                row["mean_batch"] = round((after[1] - before[1]) / batches, 2) if batches else None
                rows.append(row)
                print(f"concurrency {concurrency}: {row}", file=sys.stderr)
    finally:
        if process is not None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                process.kill()
    per = f"{args.texts_per_request} text(s)" if args.route == "embeddings" else f"{args.texts_per_request} doc(s)"
    print(f"model {args.model}, /v1/{args.route}, {per} per request, {args.words[0]}-{args.words[1]} words each\n")
    print("| clients | requests | req/s | texts/s | p50 ms | p99 ms | mean batch | errors |")
    print("| ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |")
    for r in rows:
        errors = ", ".join(f"{k}: {v}" for k, v in r["errors"].items()) or "0"
        print(
            f"| {r['concurrency']} | {r['requests']} | {r['req_per_s']} | {r['texts_per_s']} | {r['p50_ms']} "
            f"| {r['p99_ms']} | {r['mean_batch']} | {errors} |"
        )
    if args.json is not None:
        args.json.write_text(json.dumps(rows, indent=1))
    return 1 if any(r["errors"] for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
