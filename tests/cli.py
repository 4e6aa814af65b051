"""Running the ``bgekit`` command in tests.

:func:`run` calls the real command (``bgekit.cli.app``, every option parsed by typer) inside the test
process: a fresh ``bgekit`` process spends seconds importing torch and transformers, and the suite runs
hundreds of commands. What only a process shows (the installed entry point, a pipe on stdin, a kill,
exit on a signal) is tested with :func:`run_process`, a real subprocess of the installed entry point.
Both return a :class:`subprocess.CompletedProcess` with text stdout and stderr.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
import traceback
from pathlib import Path

BGEKIT = shutil.which("bgekit", path=str(Path(sys.executable).parent)) or "bgekit"


def run(*args: str, check: bool = True, input: str | None = None) -> subprocess.CompletedProcess:
    """``bgekit ARGS`` in this process: exit status, stdout and stderr as the process would give them.

    An exception the command lets out is written to stderr as its traceback with exit status 1, as
    Python would, so a test that checks for one clear line still fails on it. The root logger's
    handlers (pytest's) are set aside while the command runs, so its ``logging.basicConfig`` writes
    its log to the command's stderr as it does in a process. The levels a command sets (the root's,
    ``bgekit``'s: ``serve --log-level``) end with it, as they would with its process.
    """
    from typer.testing import CliRunner

    from bgekit.cli import app

    _library_logs_to_current_stderr()
    root, ours = logging.getLogger(), logging.getLogger("bgekit")
    handlers, level, our_level = root.handlers[:], root.level, ours.level
    root.handlers = []
    try:
        result = CliRunner().invoke(app, list(args), input=input, prog_name="bgekit", env={"HF_HUB_OFFLINE": "1"})
    finally:
        root.handlers = handlers
        root.setLevel(level)
        ours.setLevel(our_level)
    stderr = result.stderr
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        stderr += "".join(traceback.format_exception(*result.exc_info))
    completed = subprocess.CompletedProcess(["bgekit", *args], result.exit_code, result.stdout, stderr)
    if check:
        assert completed.returncode == 0, completed.stderr
    return completed


class _CurrentStderr:
    """A stream that is whatever ``sys.stderr`` is at each write (the running command's, as in a process)."""

    def write(self, text: str) -> int:
        return sys.stderr.write(text)

    def flush(self) -> None:
        sys.stderr.flush()


def _library_logs_to_current_stderr() -> None:
    """transformers logs through a handler of its own, made with the ``sys.stderr`` of the moment it was
    first used: inside :func:`run` that is one command's captured stderr, closed when it ends, and every
    later command's log (transformers 5's load report) became a "--- Logging error ---" traceback there."""
    try:
        from transformers.utils import logging as hf_logging
    except ImportError:
        return
    hf_logging.get_logger()  # makes the handler if no command has yet
    handler = getattr(hf_logging, "_default_handler", None)
    if isinstance(handler, logging.StreamHandler) and not isinstance(handler.stream, _CurrentStderr):
        handler.setStream(_CurrentStderr())


def run_process(
    *args: str, check: bool = True, input: str | None = None, env: dict | None = None, timeout: float = 300
) -> subprocess.CompletedProcess:
    """``bgekit ARGS`` as a real subprocess of the installed entry point."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})}
    result = subprocess.run([BGEKIT, *args], capture_output=True, text=True, env=env, input=input, timeout=timeout)
    if check:
        assert result.returncode == 0, result.stderr
    return result
