"""Reading text inputs and writing outputs safely.

Inputs are plain text (one item a line) or JSONL (``text`` plus optional ``title``, joined
as ``(title + " " + text).strip()`` like BEIR / MTEB), optionally gzipped. Outputs are
written to a temporary name and renamed when complete, so an interrupted run never
leaves a half-written file where a good one was.
"""

from __future__ import annotations

import errno
import gzip
import itertools
import json
import os
import tempfile
import zlib
from collections.abc import Callable, Iterable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

from .errors import DataFormatError, InputError, OutputError


@dataclass
class TextRecord:
    """One input item: its id (from ``_id`` / ``id``, else the line number) and text."""

    id: str
    text: str


def numbered_lines(path: Path) -> Iterator[tuple[int, str]]:
    """``(line_number, line)`` of a UTF-8 text file (gzipped if it ends in ``.gz``), read once from
    start to end, so a pipe or ``/dev/stdin`` works too; a leading byte-order mark is dropped. Bytes
    that are not UTF-8 and a broken gzip file are errors that name the file (and the line)."""
    for number, raw in numbered_raw_lines(path):
        yield number, line_text(path, number, raw)


def numbered_raw_lines(path: Path) -> Iterator[tuple[int, bytes]]:
    """:func:`numbered_lines` as bytes, not yet decoded (nor the byte-order mark dropped): for readers
    that look at only some lines (a sample of a training file) and decode those alone."""
    number = 0
    try:
        with gzip.open(path, "rb") if path.suffix == ".gz" else path.open("rb") as handle:
            for number, raw in enumerate(handle, start=1):
                yield number, raw
    except (gzip.BadGzipFile, EOFError, zlib.error) as exc:
        where = f", after line {number}" if number else ""
        raise InputError(f"{path} is not a readable gzip file ({exc}{where})") from None


def _first_non_blank(lines: Iterator[tuple[int, str]]) -> tuple[list[tuple[int, str]], str | None]:
    """The lines up to and including the first non-blank one, and that line (None if all blank)."""
    head = []
    for item in lines:
        head.append(item)
        if item[1].strip():
            return head, item[1]
    return head, None


def has_jsonl_suffix(path: Path) -> bool:
    """``.jsonl``, ``.json`` or ``.ndjson``, also before ``.gz``."""
    return any(s.lower() in (".jsonl", ".json", ".ndjson") for s in path.suffixes)


def read_jsonl(path: str | Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """Yield ``(line_number, object)``; blank lines are skipped, bad lines name file and line."""
    path = Path(path)
    if not path.exists():
        raise InputError(f"input file {path} does not exist")
    yield from _parse_jsonl(path, numbered_lines(path))


def decode_line(path: str | Path, number: int, raw: bytes) -> str:
    """One line's bytes as UTF-8 text; a :class:`DataFormatError` naming file, line and byte otherwise."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        problem = f"not UTF-8 text (byte {raw[exc.start]:#04x} at byte {exc.start + 1} of the line)"
        raise DataFormatError(path, number, problem) from None


def line_text(path: str | Path, number: int, raw: bytes) -> str:
    """:func:`decode_line`, without the byte-order mark a first line may start with. Every reader of
    input lines (plain and ``--ray`` shards) goes through it, so they agree on rows and ids."""
    line = decode_line(path, number, raw)
    return line.removeprefix("\ufeff") if number == 1 else line


def parse_json_line(path: str | Path, number: int, line: str) -> dict[str, Any]:
    """One JSONL line's object; a :class:`DataFormatError` naming file and line otherwise."""
    try:
        obj = json.loads(line.rstrip("\r\n"))
    except json.JSONDecodeError as exc:
        # the offset in the line: colno counts from the last newline json saw, and a line's own trailing
        # newline made a record cut short 'column 1' of a line that is not there
        raise DataFormatError(path, number, f"not valid JSON ({exc.msg} at column {exc.pos + 1})") from None
    if not isinstance(obj, dict):
        raise DataFormatError(path, number, f"expected a JSON object, got {type(obj).__name__}")
    return obj


def _parse_jsonl(path: Path, lines: Iterable[tuple[int, str]]) -> Iterator[tuple[int, dict[str, Any]]]:
    for number, line in lines:
        if line.strip():
            yield number, parse_json_line(path, number, line)


def record_id(obj: dict[str, Any], line: int) -> str:
    """A JSONL record's id: ``_id``, else ``id``, else its line number (a null id counts as none)."""
    for key in ("_id", "id"):
        if obj.get(key) is not None:
            return str(obj[key])
    return str(line)


def document_text(title: str, text: str) -> str:
    """A document as every embedder reads it: ``(title + " " + text).strip()``, or the text alone without a
    title (FlagEmbedding's corpus rule)."""
    return f"{title} {text}".strip() if title else text


def record_text(obj: dict[str, Any], path: Path, line: int, field: str = "text") -> str:
    """``(title + " " + text).strip()`` of one JSONL object (the field alone when it is ``title``), checked."""
    if field not in obj:
        raise DataFormatError(path, line, f"missing the {field!r} field (keys: {sorted(obj)})")
    text, title = obj[field], "" if field == "title" else obj.get("title") or ""
    if not isinstance(text, str) or not isinstance(title, str):
        raise DataFormatError(path, line, f"{field!r} and 'title' must be strings")
    return document_text(title, text)


def read_texts(path: str | Path, field: str | None = None) -> list[TextRecord]:
    """Read plain-text or JSONL input into records, in file order, in one pass (a pipe works).

    Blank lines are skipped in both; a text line's id is its line number, as in ``--ray`` shards.
    ``field`` is the JSONL field holding the text (``"text"`` when None); given for a plain-text
    file, which has no fields, it is an :class:`InputError` rather than silently unused."""
    path = Path(path)
    if not path.exists():
        raise InputError(f"input file {path} does not exist")
    if path.is_dir():
        raise InputError(f"{path} is a folder; pass a text or JSONL file")
    records: list[TextRecord] = []
    head, first = _first_non_blank(lines := numbered_lines(path))
    everything = itertools.chain(head, lines)
    if has_jsonl_suffix(path) or (first is not None and first.lstrip().startswith("{")):
        for line, obj in _parse_jsonl(path, everything):
            records.append(TextRecord(record_id(obj, line), record_text(obj, path, line, field or "text")))
    else:
        if field is not None:
            raise plain_text_field_error(path, field)
        records = [TextRecord(str(line), text.rstrip("\r\n")) for line, text in everything if text.strip()]
    if not records:
        raise InputError(f"{path} holds no texts")
    return records


def plain_text_field_error(path: str | Path, field: str) -> InputError:
    """The error for a text field named for plain-text input (one text a line, no fields to pick from)."""
    return InputError(
        f"text field {field!r} (--text-field) picks a field of JSONL records, but {path} is plain text "
        "(one text a line, no fields): leave it out, or pass JSONL"
    )


def read_examples(path: str | Path) -> list[dict[str, Any]]:
    """In-context examples from a JSON array file or a JSONL file (one example a line)."""
    path = Path(path)
    if not path.exists():
        raise InputError(f"examples file {path} does not exist")
    lines = list(numbered_lines(path))
    _, first = _first_non_blank(iter(lines))
    if first is not None and first.lstrip().startswith("["):
        try:
            examples = json.loads("".join(line for _, line in lines))
        except json.JSONDecodeError as exc:
            raise DataFormatError(path, exc.lineno, f"not valid JSON ({exc.msg} at column {exc.colno})") from None
    else:
        examples = [obj for _, obj in _parse_jsonl(path, lines)]
    if not examples:
        raise InputError(f"examples file {path} holds no examples")
    return examples


def check_output_path(target: str | Path) -> Path:
    """An :class:`InputError` now, before any work, if ``target`` cannot become a file: it is a folder,
    a parent is a file, or the folder it goes in is not writable."""
    target = Path(target)
    if target.is_dir():
        raise InputError(f"output {target} is a folder; pass a file path")
    check_creatable_under(target.parent, f"output {target}")
    return target


def check_output_folder(target: str | Path) -> Path:
    """As :func:`check_output_path`, for an output that is a folder (a training run's): a file there,
    or under a file or a read-only folder, is an :class:`InputError` before any model loads."""
    target = Path(target)
    if target.exists() and not target.is_dir():
        raise InputError(f"output folder {target} is a file; pass a folder path")
    check_creatable_under(target, f"output folder {target}")
    return target


def check_creatable_under(start: Path, what: str) -> None:
    """``start``, or the nearest folder above it that exists, must be a folder this process may
    write in; ``what`` names the output in the error."""
    existing = start
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise InputError(f"{what} cannot be created: {existing} is a file, not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise InputError(f"{what} cannot be created: {existing} is not writable")


def check_outputs(*targets: str | Path | None, inputs: Iterable[str | Path | None] = ()) -> None:
    """:func:`check_output_path` for each target given, none of them one of ``inputs`` (writing
    there would replace the data being read) nor two of them one path: a command calls this before
    it loads a model."""
    read = {Path(p).resolve() for p in inputs if p is not None and Path(p).is_file()}
    written: dict[Path, str | Path] = {}
    for target in targets:
        if target is None:
            continue
        check_output_path(target)
        resolved = Path(target).resolve()
        if resolved in read:
            raise InputError(f"output {target} is also an input: writing it would replace the data; pick another path")
        if resolved in written:  # the later write would replace the earlier output
            raise InputError(f"two outputs go to {target} ({written[resolved]} too): give each its own path")
        written[resolved] = target


#: what the file system says when an output cannot be written, whoever's fault: one line, not a traceback
WRITE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EACCES, errno.EPERM})


@contextmanager
def atomic_path(target: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``target``; rename it onto ``target`` only on success. The file
    gets the mode ``target`` had, or the one the umask gives a new file (not mkstemp's 0600). A full
    disk (or quota, size limit, read-only folder) is an :class:`OutputError` naming ``target``, and
    ``target`` keeps what it held."""
    target = check_output_path(target)
    tmp_path = None
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp" + target.suffix, dir=target.parent)
        os.close(fd)
        tmp_path = Path(tmp)
        os.chmod(tmp_path, target.stat().st_mode & 0o7777 if target.exists() else 0o666 & ~_umask())
        yield tmp_path
        os.replace(tmp_path, target)
    except OSError as exc:
        if exc.errno not in WRITE_ERRNOS:
            raise
        raise OutputError(f"could not write {target}: {exc.strerror}; it keeps what it held") from exc
    finally:
        if tmp_path is not None:
            tmp_path.unlink(missing_ok=True)


@cache
def _umask() -> int:
    """The process umask (read once: reading it means setting it)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def jsonl_writer(target: str | Path, rows: Iterable[dict[str, Any]]) -> Callable[[Path], None]:
    """A writer (for :func:`write_with` / :func:`write_together`) of JSON objects one a line, gzipped
    when ``target`` ends in ``.gz``."""
    gzipped = Path(target).suffix.lower() == ".gz"

    def write(tmp: Path) -> None:
        with gzip.open(tmp, "wt", encoding="utf-8") if gzipped else tmp.open("w", encoding="utf-8") as handle:
            for row in rows:
                handle.write(json.dumps(row, ensure_ascii=False) + "\n")

    return write


def write_jsonl(target: str | Path, rows: Iterable[dict[str, Any]]) -> None:
    """Write JSON objects one a line, atomically (gzipped when ``target`` ends in ``.gz``)."""
    write_with(target, jsonl_writer(target, rows))


def write_with(target: str | Path, writer: Callable[[Path], None]) -> None:
    """Run ``writer(tmp_path)`` and move the result onto ``target`` atomically."""
    write_together([(target, writer)])


def write_together(writes: Iterable[tuple[str | Path, Callable[[Path], None]]]) -> None:
    """One command's outputs land together or not at all: each ``writer(tmp_path)`` runs first, the
    renames onto the targets only once every one has been written (a disk that fills while the
    dense vectors are written leaves no new sparse file beside the old dense one)."""
    with ExitStack() as stack:
        for target, writer in writes:
            writer(stack.enter_context(atomic_path(target)))
