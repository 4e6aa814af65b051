"""Files on a local disk or an object store (``s3://``, ``gs://``, ...) through ``pyarrow.fs``.

Local writes go to a temporary name and are renamed when complete. Object stores have no
rename, but a single PUT only becomes visible when complete, so there the object is written
directly; either way a reader never sees half a shard.
"""

from __future__ import annotations

import io
import os
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

from ..errors import InputError

EXTRA = "pip install 'bgekit[distributed]'"


def require(ray: bool = False) -> None:
    """An :class:`InputError` naming the ``distributed`` extra where pyarrow (Parquet shards, file
    systems), or with ``ray=True`` Ray Data, cannot be imported: before any input is read."""
    try:
        import pyarrow
        import pyarrow.fs
        import pyarrow.parquet  # noqa: F401
    except ImportError as exc:
        raise InputError(
            f"bgekit.distributed reads and writes Parquet shards with pyarrow, which could not be imported "
            f"({exc}): {EXTRA}"
        ) from None
    if ray:
        try:
            import ray as _ray  # noqa: F401
            import ray.data
        except ImportError as exc:
            raise InputError(f"encoding on Ray needs Ray Data, which could not be imported ({exc}): {EXTRA}") from None


def is_uri(path: str | Path) -> bool:
    """``scheme://...`` (``s3://``, ``gs://``, ``hdfs://``; ``file://`` too) rather than a local path."""
    return "://" in str(path)


def filesystem(path: str | Path) -> tuple[Any, str]:
    """``(pyarrow FileSystem, path inside it)`` for a local path or a URI."""
    require()
    from pyarrow import fs

    if not is_uri(path):
        return fs.LocalFileSystem(), str(Path(path).expanduser().absolute())
    try:
        return fs.FileSystem.from_uri(str(path))
    except Exception as exc:  # unknown scheme, missing credentials, pyarrow built without S3
        raise InputError(f"cannot open {path}: {exc}") from None


class _RawStream(io.RawIOBase):
    """A pyarrow input stream as a Python raw stream, so ``io.BufferedReader`` can read lines."""

    def __init__(self, stream: Any):
        self._stream = stream

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        data = self._stream.read(len(buffer))
        buffer[: len(data)] = data
        return len(data)

    def close(self) -> None:
        self._stream.close()
        super().close()


def open_binary(path: str, offset: int = 0) -> IO[bytes]:
    """A buffered binary reader of ``path`` (gzip decompressed) positioned at byte ``offset``
    of the (decompressed) content. Gzip cannot seek, so there the reader skips to ``offset``."""
    fs, inner = filesystem(path)
    gz = inner.endswith(".gz")
    if gz:
        reader = io.BufferedReader(_RawStream(fs.open_input_stream(inner, compression="gzip")), 1 << 20)
        remaining = offset
        while remaining:
            chunk = reader.read(min(remaining, 1 << 24))
            if not chunk:
                break
            remaining -= len(chunk)
        return reader
    handle = fs.open_input_file(inner)
    handle.seek(offset)
    return io.BufferedReader(_RawStream(handle), 1 << 20)


class Folder:
    """An output folder, local or in an object store."""

    def __init__(self, path: str | Path):
        self.path = str(path)
        self.fs, self.root = filesystem(path)
        self.local = not is_uri(path) or self.path.startswith("file://")

    def child(self, name: str) -> str:
        return f"{self.root.rstrip('/')}/{name}"

    def make(self) -> None:
        self.fs.create_dir(self.root, recursive=True)

    def exists(self, name: str) -> bool:
        from pyarrow import fs

        return self.fs.get_file_info(self.child(name)).type == fs.FileType.File

    def names(self) -> list[str]:
        """File names directly inside the folder (none when it does not exist yet)."""
        from pyarrow import fs

        if self.fs.get_file_info(self.root).type != fs.FileType.Directory:
            return []
        infos = self.fs.get_file_info(fs.FileSelector(self.root, recursive=False))
        return sorted(i.base_name for i in infos if i.type == fs.FileType.File)

    def read_text(self, name: str) -> str:
        with self.fs.open_input_stream(self.child(name)) as handle:
            return handle.read().decode("utf-8")

    def write(self, name: str, writer: Callable[[Any, str], None]) -> None:
        """``writer(filesystem, path)`` into a temporary name, then renamed onto ``name`` (locally);
        straight onto ``name`` in an object store, where an upload is all-or-nothing."""
        if not self.local:
            writer(self.fs, self.child(name))
            return
        tmp = self.child(f".{name}.{uuid.uuid4().hex}.tmp")
        try:
            writer(self.fs, tmp)
            os.replace(tmp, self.child(name))
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)

    def write_text(self, name: str, text: str) -> None:
        def put(fs: Any, path: str) -> None:
            with fs.open_output_stream(path) as handle:
                handle.write(text.encode("utf-8"))

        self.write(name, put)

    def remove_stale_temporaries(self) -> int:
        """Delete temporary files a killed run left behind; how many there were."""
        stale = [n for n in self.names() if n.startswith(".") and n.endswith(".tmp")]
        for name in stale:
            self.fs.delete_file(self.child(name))
        return len(stale)
