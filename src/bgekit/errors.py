"""Exceptions bgekit raises on bad input or missing models.

Every message says what was wrong and what to do, so a user never has to read a
traceback from deep inside torch or transformers.
"""

from __future__ import annotations

from pathlib import Path


class BgekitError(Exception):
    """Base class of every error bgekit raises on purpose."""


class InputError(BgekitError, ValueError):
    """The caller passed texts, pairs or options bgekit cannot use."""


class ModelNotFoundError(BgekitError, FileNotFoundError):
    """A model folder is missing or a hub download failed."""


class UnknownModelError(BgekitError, ValueError):
    """The registry does not know a model name and nothing says which family it is."""


class DataFormatError(BgekitError, ValueError):
    """A data file has a malformed record; the message names the file and line."""

    def __init__(self, path: str | Path, line: int | None, problem: str):
        self.path = str(path)
        self.line = line
        self.problem = problem
        where = f"{self.path}, line {line}" if line is not None else self.path
        super().__init__(f"{where}: {problem}")

    def __reduce__(self):  # pickled with its fields (worker processes send it back whole)
        return type(self), (self.path, self.line, self.problem)


class OutputError(BgekitError, OSError):
    """An output could not be written: the disk is full, a quota or file-size limit is reached, the
    folder is read-only. What was there before is left as it was."""


class DeviceOutOfMemoryError(BgekitError, RuntimeError):
    """The device ran out of memory even at the smallest batch size."""
