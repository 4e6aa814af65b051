"""Helpers for the server tests: start and stop a real ``bgekit serve`` process on 127.0.0.1,
and build a deliberately faulty tiny model.

Servers are real subprocesses (the installed ``bgekit`` entry point, uvicorn inside), bound to
loopback on a free port, and always stopped: SIGTERM, then SIGKILL if they do not exit.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx

BGEKIT = shutil.which("bgekit", path=str(Path(sys.executable).parent)) or "bgekit"
START_TIMEOUT = 180.0


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class Server:
    url: str
    process: subprocess.Popen
    log: Path

    def log_tail(self, chars: int = 4000) -> str:
        try:
            return self.log.read_text(errors="replace")[-chars:]
        except OSError:
            return ""


def wait_for(condition: Callable[[], bool], timeout: float, interval: float = 0.02, what: str = "condition") -> None:
    """Poll ``condition`` until it holds; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.1f} s waiting for {what}")


@contextlib.contextmanager
def running_server(args: list[str], log: Path, env: dict[str, str] | None = None) -> Iterator[Server]:
    """``bgekit serve ARGS`` on a free loopback port (unless the env sets BGEKIT_PORT); yields when
    /health answers 200 and stops the process on exit."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", **(env or {})}
    if "BGEKIT_PORT" not in env and "--port" not in args:
        args = [*args, "--port", str(free_port())]
    port = env.get("BGEKIT_PORT") or args[args.index("--port") + 1]
    url = f"http://127.0.0.1:{port}"
    with log.open("wb") as sink:
        process = subprocess.Popen(
            [BGEKIT, "serve", "--host", "127.0.0.1", *args], stdout=sink, stderr=subprocess.STDOUT, env=env
        )
    server = Server(url, process, log)
    try:
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            if process.poll() is not None:
                raise AssertionError(f"bgekit serve exited with {process.returncode}:\n{server.log_tail()}")
            if time.monotonic() > deadline:
                raise AssertionError(f"bgekit serve did not become healthy:\n{server.log_tail()}")
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        yield server
    finally:
        stop(process)


def stop(process: subprocess.Popen, grace: float = 10.0) -> None:
    if process.poll() is not None:
        return
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout=grace)


# -- a tiny model that fails on purpose ------------------------------------------------------
FAULTY_MODELING = '''"""A tiny BERT that raises on one token and hangs on another: real model code that misbehaves
the way a broken checkpoint or a wedged device does, for testing a server's error paths."""

import time

from transformers import BertModel


class FaultyBertModel(BertModel):
    def forward(self, input_ids=None, *args, **kwargs):
        if input_ids is not None:
            if bool((input_ids == self.config.fail_token_id).any()):
                raise RuntimeError("faulty test model: the input holds the fail token")
            if bool((input_ids == self.config.stall_token_id).any()):
                time.sleep(self.config.stall_seconds)
        return super().forward(input_ids, *args, **kwargs)
'''
FAIL_WORD, STALL_WORD = "explode", "stall"


def build_faulty_bert(target: Path, tiny_bert: Path, stall_seconds: float) -> Path:
    """Copy the tiny BERT and turn it into a remote-code ``FaultyBertModel`` (needs
    ``--trust-remote-code``): inputs holding the word ``explode`` make its forward raise, inputs
    holding ``stall`` make it sleep ``stall_seconds`` (a forward that does not come back)."""
    from tokenizers import Tokenizer

    shutil.copytree(tiny_bert, target)
    tokenizer = Tokenizer.from_file(str(target / "tokenizer.json"))
    tokenizer.no_padding()
    fail_id, stall_id = (tokenizer.encode(w, add_special_tokens=False).ids for w in (FAIL_WORD, STALL_WORD))
    assert len(fail_id) == 1 and len(stall_id) == 1, "the trigger words must be single tokens"
    config = json.loads((target / "config.json").read_text())
    config.update(
        architectures=["FaultyBertModel"],
        auto_map={"AutoModel": "modeling_faulty.FaultyBertModel"},
        fail_token_id=fail_id[0],
        stall_token_id=stall_id[0],
        stall_seconds=stall_seconds,
    )
    (target / "config.json").write_text(json.dumps(config, indent=1))
    (target / "modeling_faulty.py").write_text(FAULTY_MODELING)
    return target
