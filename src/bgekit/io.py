"""Reading text inputs and writing outputs safely.

Inputs are plain text (one item a line) or JSONL (``text`` plus optional ``title``, joined
as ``(title + " " + text).strip()`` like BEIR / MTEB), optionally gzipped. Outputs are
written to a temporary name and renamed when complete, so an interrupted run never
leaves a half-written file where a good one was.
"""

from __future__ import annotations

import gzip
import json
import os
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from .errors import DataFormatError, InputError


@dataclass
class TextRecord:
    """One input item: its id (from ``_id`` / ``id``, else the line number) and text."""

    id: str
    text: str


def _open_text(path: Path) -> IO[str]:
    if path.suffix == ".gz":
        return gzip.open(path, "rt", encoding="utf-8")
    return path.open("r", encoding="utf-8")


def is_jsonl(path: Path) -> bool:
    """JSONL by extension (``.jsonl``, ``.json``, also gzipped), else by a first line that starts with ``{``."""
    suffixes = [s.lower() for s in path.suffixes]
    if any(s in (".jsonl", ".json", ".ndjson") for s in suffixes):
        return True
    with _open_text(path) as handle:
        for line in handle:
            if line.strip():
                return line.lstrip().startswith("{")
    return False


def read_jsonl(path: str | Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """Yield ``(line_number, object)``; blank lines are skipped, bad lines name file and line."""
    path = Path(path)
    if not path.exists():
        raise InputError(f"input file {path} does not exist")
    with _open_text(path) as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataFormatError(path, number, f"not valid JSON ({exc.msg} at column {exc.colno})") from None
            if not isinstance(obj, dict):
                raise DataFormatError(path, number, f"expected a JSON object, got {type(obj).__name__}")
            yield number, obj


def record_text(obj: dict[str, Any], path: Path, line: int, field: str = "text") -> str:
    """``(title + " " + text).strip()`` of one JSONL object, checked."""
    if field not in obj:
        raise DataFormatError(path, line, f"missing the {field!r} field (keys: {sorted(obj)})")
    text, title = obj[field], obj.get("title") or ""
    if not isinstance(text, str) or not isinstance(title, str):
        raise DataFormatError(path, line, f"{field!r} and 'title' must be strings")
    return f"{title} {text}".strip() if title else text


def read_texts(path: str | Path, field: str = "text") -> list[TextRecord]:
    """Read plain-text or JSONL input into records, in file order."""
    path = Path(path)
    if not path.exists():
        raise InputError(f"input file {path} does not exist")
    if path.is_dir():
        raise InputError(f"{path} is a folder; pass a text or JSONL file")
    records: list[TextRecord] = []
    if is_jsonl(path):
        for line, obj in read_jsonl(path):
            ident = obj.get("_id", obj.get("id", line))
            records.append(TextRecord(str(ident), record_text(obj, path, line, field)))
    else:
        with _open_text(path) as handle:
            for line, text in enumerate(handle, start=1):
                records.append(TextRecord(str(line), text.rstrip("\r\n")))
    if not records:
        raise InputError(f"{path} holds no texts")
    return records


def read_examples(path: str | Path) -> list[dict[str, Any]]:
    """In-context examples from a JSON array file or a JSONL file (one example a line)."""
    path = Path(path)
    if not path.exists():
        raise InputError(f"examples file {path} does not exist")
    with _open_text(path) as handle:
        head = handle.read(4096).lstrip()
    if head.startswith("["):
        try:
            examples = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise DataFormatError(path, exc.lineno, f"not valid JSON ({exc.msg} at column {exc.colno})") from None
    else:
        examples = [obj for _, obj in read_jsonl(path)]
    if not examples:
        raise InputError(f"examples file {path} holds no examples")
    return examples


@contextmanager
def atomic_path(target: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``target``; rename it onto ``target`` only on success."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp" + target.suffix, dir=target.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.replace(tmp_path, target)
    finally:
        tmp_path.unlink(missing_ok=True)


def write_jsonl(target: str | Path, rows: Iterator[dict[str, Any]] | list[dict[str, Any]]) -> None:
    """Write JSON objects one a line, atomically."""
    with atomic_path(target) as tmp, tmp.open("w", encoding="utf-8") as handle:
        for row in rows:
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")


def write_with(target: str | Path, writer: Callable[[Path], None]) -> None:
    """Run ``writer(tmp_path)`` and move the result onto ``target`` atomically."""
    with atomic_path(target) as tmp:
        writer(tmp)
