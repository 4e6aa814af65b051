"""Fixed shard boundaries over one input file, and reading one shard's records back.

Shard ``k`` holds input rows ``[k * shard_size, (k + 1) * shard_size)``; a row is a non-blank
line of a JSONL or text file, or a Parquet row. The boundaries depend only on the input and
``shard_size``, so a restarted job finds the same shards and can skip the finished ones.
Ids follow :func:`bgekit.io.read_texts`: ``_id`` or ``id``, else the 1-based line number (the
row number for Parquet), so they are global and stable however the work is split.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import Any

from .. import io as bio
from ..errors import DataFormatError, InputError
from . import storage

FORMATS = ("jsonl", "text", "parquet")


@dataclass(frozen=True)
class Shard:
    """Where one shard's rows start in the input: row index, byte offset and line number."""

    index: int
    start_row: int
    num_rows: int
    byte_offset: int = 0
    first_line: int = 1

    def to_dict(self) -> dict[str, int]:
        return asdict(self)


@dataclass(frozen=True)
class InputPlan:
    """One input file cut into shards."""

    path: str
    format: str
    size: int
    rows: int
    shard_size: int
    shards: tuple[Shard, ...]
    #: SHA-256 of the content (of the decompressed lines of a gzipped text or JSONL file)
    sha256: str = ""

    def describe(self) -> dict[str, Any]:
        """What a manifest records about the input (a resumed job must see the same: an input edited
        since, even to the same size and row count, is another ``sha256``)."""
        return {"path": self.path, "format": self.format, "size": self.size, "rows": self.rows, "sha256": self.sha256}


def input_format(path: str) -> str:
    """``parquet``, ``jsonl`` or ``text`` from the name (JSONL also by a first line that starts with ``{``)."""
    name = path.lower().removesuffix(".gz")
    if name.endswith(".parquet"):
        return "parquet"
    if name.endswith((".jsonl", ".json", ".ndjson")):
        return "jsonl"
    with _reading(path), storage.open_binary(path) as handle:
        for number, raw in enumerate(handle, start=1):
            line = bio.line_text(path, number, raw)
            if line.strip():  # blank as bgekit.io.read_texts sees it (Unicode whitespace too)
                return "jsonl" if line.lstrip().startswith("{") else "text"
    return "text"


def plan(path: str, shard_size: int) -> InputPlan:
    """Count the rows of ``path`` and cut them into shards of ``shard_size`` rows.

    Parquet needs only the file footer; JSONL and text files are read once (line starts are
    recorded so every worker can jump straight to its shard).
    """
    if isinstance(shard_size, bool) or not isinstance(shard_size, int) or shard_size < 1:
        raise InputError(f"shard_size must be a positive int, got {shard_size!r}")
    fs, inner = storage.filesystem(path)
    from pyarrow import fs as pafs

    info = fs.get_file_info(inner)
    if info.type == pafs.FileType.Directory:
        raise InputError(f"{path} is a folder; pass one JSONL, text or Parquet file")
    if info.type != pafs.FileType.File:
        raise InputError(f"input file {path} does not exist")
    fmt = input_format(path)
    if fmt == "parquet":
        import pyarrow.parquet as pq

        rows = pq.ParquetFile(inner, filesystem=fs).metadata.num_rows
        shards = tuple(
            Shard(k, start, min(shard_size, rows - start)) for k, start in enumerate(range(0, rows, shard_size))
        )
        digest = _file_digest(fs, inner, path)
    else:
        shards, rows, digest = _plan_lines(path, shard_size)
    if rows == 0:
        raise InputError(f"{path} holds no texts")
    return InputPlan(str(path), fmt, int(info.size), rows, shard_size, shards, digest)


def _file_digest(fs: Any, inner: str, path: str) -> str:
    """SHA-256 of a file's bytes, read in 16 MiB blocks."""
    digest = hashlib.sha256()
    with _reading(path), fs.open_input_stream(inner) as handle:
        while block := handle.read(1 << 24):
            digest.update(block)
    return digest.hexdigest()


def _plan_lines(path: str, shard_size: int) -> tuple[tuple[Shard, ...], int, str]:
    """The shards of a text or JSONL file, its row count and the SHA-256 of its (decompressed) content."""
    starts: list[tuple[int, int]] = []  # (byte offset, line number) of every shard's first row
    rows = offset = 0
    digest = hashlib.sha256()
    with _reading(path), storage.open_binary(path) as handle:
        for number, raw in enumerate(handle, start=1):
            digest.update(raw)
            if bio.line_text(path, number, raw).strip():
                if rows % shard_size == 0:
                    starts.append((offset, number))
                rows += 1
            offset += len(raw)
    shards = tuple(
        Shard(k, k * shard_size, min(shard_size, rows - k * shard_size), byte, line)
        for k, (byte, line) in enumerate(starts)
    )
    return shards, rows, digest.hexdigest()


def read_shard(path: str, fmt: str, shard: Shard, field: str = "text") -> tuple[list[str], list[str]]:
    """``(ids, texts)`` of one shard, built exactly as :func:`bgekit.io.read_texts` builds them."""
    if fmt == "parquet":
        return _read_parquet_rows(path, shard, field)
    ids: list[str] = []
    texts: list[str] = []
    with _reading(path), storage.open_binary(path, shard.byte_offset) as handle:
        for number, raw in enumerate(handle, start=shard.first_line):
            if len(ids) == shard.num_rows:
                break
            line = bio.line_text(path, number, raw)
            if not line.strip():
                continue
            if fmt == "text":
                ids.append(str(number))
                texts.append(line.rstrip("\r\n"))
                continue
            obj = bio.parse_json_line(path, number, line)
            ids.append(bio.record_id(obj, number))
            texts.append(bio.record_text(obj, path, number, field))  # type: ignore[arg-type]
    if len(ids) != shard.num_rows:
        raise InputError(f"{path} changed while it was being encoded (shard {shard.index} is short); start again")
    return ids, texts


@contextmanager
def _reading(path: str) -> Iterator[None]:
    """A file that cannot be read to the end (a truncated gzip stream) as one clear error."""
    try:
        yield
    except OSError as exc:
        raise InputError(f"could not read {path}: {exc}") from None


def _read_parquet_rows(path: str, shard: Shard, field: str) -> tuple[list[str], list[str]]:
    import pyarrow.parquet as pq

    fs, inner = storage.filesystem(path)
    parquet = pq.ParquetFile(inner, filesystem=fs)
    names = set(parquet.schema_arrow.names)
    if field not in names:
        raise DataFormatError(path, None, f"no {field!r} column (columns: {sorted(names)})")
    id_column = next((c for c in ("_id", "id") if c in names), None)
    columns = [c for c in (field, "title", id_column) if c and c in names]
    groups, first, seen = [], None, 0
    end = shard.start_row + shard.num_rows
    for g in range(parquet.metadata.num_row_groups):
        n = parquet.metadata.row_group(g).num_rows
        if seen + n > shard.start_row and seen < end:
            groups.append(g)
            first = seen if first is None else first
        seen += n
    table = parquet.read_row_groups(groups, columns=columns).slice(shard.start_row - (first or 0), shard.num_rows)
    data = table.to_pydict()
    ids, texts = [], []
    for i in range(table.num_rows):
        row = shard.start_row + i + 1
        obj = {c: data[c][i] for c in columns}
        ident = obj.get(id_column) if id_column else None
        ids.append(str(row if ident is None else ident))
        texts.append(bio.record_text(obj, path, row, field))  # type: ignore[arg-type]
    return ids, texts
