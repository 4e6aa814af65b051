"""Checks 1 and 2 of the distributed-encoding issue, on a local Ray cluster with 2 CPU workers.

1. 2,000 real SciFact documents embedded by all-MiniLM-L6-v2 on Ray equal single-process
   bgekit's vectors (within 1e-6) with the ids in input order, line-number ids included; the
   sharded search over them equals one flat index.
2. ``bgekit embed --ray`` killed after a few shards and run again writes only the missing
   shards (the finished ones keep their inode and mtime) and says so.
"""

from __future__ import annotations

import contextlib
import gzip
import itertools
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("ray")
pytest.importorskip("pyarrow")

from bgekit import Embedder, io
from bgekit.distributed import encode_dataset, read_embeddings, read_manifest

from .conftest import require_shared
from .test_eval_reference import slow_requested

MODEL = "sentence-transformers/all-MiniLM-L6-v2"
MAX_LENGTH = 32  # keeps 2,000 documents to seconds per shard on 2 shared CPU cores
BGEKIT = shutil.which("bgekit", path=str(Path(sys.executable).parent)) or "bgekit"


@pytest.fixture(scope="module")
def corpus(request, tmp_path_factory, minilm_dir) -> Path:
    """2,000 SciFact documents; every 400th loses its ``_id`` (so its line number is the id) and a
    blank line sits near the start, so line numbers and row numbers differ.

    The Ray jobs on them take minutes on 2 cores, so they run with the slow checks (``make test``
    runs those once, in the newest environment)."""
    if not slow_requested(request.config):
        pytest.skip("Ray encoding of 2,000 documents: run with BGEKIT_SLOW=1 or -m slow")
    source = require_shared("data", "scifact", "corpus.jsonl.gz")
    lines = []
    with gzip.open(source, "rt", encoding="utf-8") as handle:
        for number, line in enumerate(itertools.islice(handle, 2000)):
            record = json.loads(line)
            if number % 400 == 7:
                del record["_id"]
            lines.append(json.dumps(record) + "\n")
    lines.insert(3, "\n")
    path = tmp_path_factory.mktemp("corpus") / "docs.jsonl"
    path.write_text("".join(lines), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def reference(corpus) -> tuple[list[str], np.ndarray]:
    """What single-process bgekit (the ``bgekit embed`` code path) gives for the same input."""
    records = io.read_texts(corpus)
    model = Embedder.from_pretrained(MODEL, devices="cpu")
    return [r.id for r in records], model.encode_corpus([r.text for r in records], max_length=MAX_LENGTH)


@pytest.fixture()
def local_ray():
    import ray

    ray.init(num_cpus=2, include_dashboard=False, logging_level="WARNING")
    yield ray
    ray.shutdown()


@pytest.mark.slow
def test_ray_vectors_equal_single_process(tmp_path, corpus, reference, local_ray):
    ids, expected = reference
    result = encode_dataset(MODEL, corpus, tmp_path / "emb", num_workers=2, shard_size=400, max_length=MAX_LENGTH)
    assert (result.rows, result.num_shards, result.written, result.skipped, result.dim) == (2000, 5, 5, 0, 384)
    got_ids, vectors = read_embeddings(tmp_path / "emb")
    assert got_ids == ids
    assert ids[7] == "9" and ids[407] == "409"  # line numbers, counted across the blank line and shards
    assert vectors.dtype == np.float32 and vectors.shape == expected.shape
    np.testing.assert_allclose(vectors, expected, rtol=0, atol=1e-6)
    manifest = read_manifest(tmp_path / "emb")
    assert manifest["input"]["rows"] == 2000 and manifest["shard_size"] == 400 and manifest["model"] == MODEL

    # check 3 on real vectors: the sharded flat search equals one flat index over the same vectors
    pytest.importorskip("faiss")
    from bgekit.eval.index import DenseIndex
    from bgekit.eval.sharded import ShardedIndex

    queries = Embedder.from_pretrained(MODEL, devices="cpu").encode_queries(
        ["how do cells divide?", "vitamin D and bone density", "antibiotic resistance in bacteria"]
    )
    sharded_scores, sharded_rows = ShardedIndex.build(tmp_path / "emb").search(queries, 20)
    flat_scores, flat_rows = DenseIndex.build(vectors, got_ids).search(queries, 20)
    np.testing.assert_array_equal(sharded_rows, flat_rows)
    np.testing.assert_allclose(sharded_scores, flat_scores, rtol=0, atol=1e-6)


def embed_command(corpus: Path, out: Path, *extra: str) -> list[str]:
    """``--packed off`` (the CPU's default anyway) takes the option through the Ray workers' options."""
    return [BGEKIT, "embed", "--ray", "--num-workers", "2", "--shard-size", "100", "--max-length", str(MAX_LENGTH),
            "--packed", "off", "--model", MODEL, "--input", str(corpus), "--output", str(out), *extra]  # fmt: skip


def shard_files(out: Path) -> dict[str, tuple[int, int]]:
    return {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in sorted(out.glob("part-*.parquet"))}


def descendants(pid: int) -> set[int]:
    """Every process below ``pid`` (Ray's raylet, GCS and workers run in process groups of their own)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = set(), [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found


def alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def kill_tree(job: subprocess.Popen) -> None:
    """SIGKILL the job and every process it started, and wait until all are gone."""
    pids = descendants(job.pid) | {job.pid}
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    job.wait()
    deadline = time.monotonic() + 30
    while any(alive(pid) for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.1)


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="finds the job's processes through /proc")
@pytest.mark.slow
def test_killed_job_resumes_with_only_the_missing_shards(tmp_path, corpus):
    # the first 1,000 documents, 10 shards of 100
    small = tmp_path / "docs.jsonl"
    small.write_text("".join(corpus.read_text(encoding="utf-8").splitlines(keepends=True)[:1001]), encoding="utf-8")
    out = tmp_path / "emb"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    job = subprocess.Popen(embed_command(small, out), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 240
        while len(shard_files(out)) < 2 and job.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        assert job.poll() is None, "the job finished (or failed) before it could be killed"
        assert len(shard_files(out)) >= 2, "no shards appeared in time"
    finally:
        kill_tree(job)
    before = shard_files(out)
    assert 2 <= len(before) < 10

    resumed = subprocess.run(embed_command(small, out), env=env, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"{len(before)} of 10 shards already complete, encoding the other {10 - len(before)}" in resumed.stderr
    assert f"({10 - len(before)} written, {len(before)} already complete)" in resumed.stderr
    after = shard_files(out)
    assert len(after) == 10
    assert {name: after[name] for name in before} == before  # finished shards untouched
    assert not list(out.glob(".*.tmp"))  # a killed worker's temporary file is cleaned up
    ids, vectors = read_embeddings(out)
    records = io.read_texts(small)
    assert ids == [r.id for r in records]
    # one shard from before the kill and the last one (check 1 compares every vector)
    rows = [*range(100), *range(900, 1000)]
    expected = Embedder.from_pretrained(MODEL, devices="cpu").encode_corpus(
        [records[i].text for i in rows], max_length=MAX_LENGTH
    )
    np.testing.assert_allclose(vectors[rows], expected, rtol=0, atol=1e-6)

    # other settings are refused instead of mixing two configurations in one folder
    refused = subprocess.run(
        [*embed_command(small, out), "--no-normalize"],
        env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert refused.returncode == 2 and "other settings" in refused.stderr and "normalize_embeddings" in refused.stderr
    assert shard_files(out) == after


def test_bad_input_is_a_clear_error(tmp_path, tiny_bert):
    from bgekit.errors import DataFormatError, InputError

    model = str(tiny_bert)
    with pytest.raises(InputError, match="does not exist"):
        encode_dataset(model, tmp_path / "missing.jsonl", tmp_path / "out", use_ray=False)
    with pytest.raises(InputError, match="is a folder"):
        encode_dataset(model, tmp_path, tmp_path / "out", use_ray=False)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"_id": "a", "text": "fine"}\n\n{"_id": "b", "text": 5}\n')
    with pytest.raises(InputError, match="shard_size"):
        encode_dataset(model, bad, tmp_path / "out", use_ray=False, shard_size=0)
    with pytest.raises(InputError, match="devices"):
        encode_dataset(model, bad, tmp_path / "out", devices=["cpu"])
    with pytest.raises(DataFormatError, match=r"bad\.jsonl, line 3: 'text' and 'title' must be strings"):
        encode_dataset(model, bad, tmp_path / "out", use_ray=False, shard_size=1)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["manifest.json", "part-00000.parquet"]


EDGE_FILES = {
    "bom.txt": "\ufeffhello\nworld\n",
    "bom.jsonl": '\ufeff{"text": "a"}\n{"text": "b"}\n',
    "bom_no_suffix.data": '\ufeff{"text": "a"}\n{"text": "b"}\n',  # JSON by its first line, BOM or not
    "unicode_blank.txt": "a\n\u00a0\nb\n\u3000\nc\n\x1c\nd\n",  # lines of Unicode whitespace are blank
    "crlf.txt": "a\r\nb\r\n\r\nc\r\n",
    "null_ids.jsonl": '{"_id": null, "text": "a"}\n{"id": 5, "text": "b"}\n{"_id": "x", "id": 6, "text": "c"}\n',
}


@pytest.mark.parametrize("name", list(EDGE_FILES))
def test_shards_read_the_rows_and_ids_plain_reading_does(tmp_path, name):
    """``--ray`` counted whitespace-only lines as rows, and stumbled on a byte-order mark."""
    from bgekit.distributed import plan

    path = tmp_path / name
    path.write_bytes(EDGE_FILES[name].encode("utf-8"))
    expected = [(r.id, r.text) for r in io.read_texts(path)]
    planned = plan.plan(str(path), 2)
    got = []
    for shard in planned.shards:
        ids, texts = plan.read_shard(planned.path, planned.format, shard)
        got += list(zip(ids, texts, strict=True))
    assert got == expected and planned.rows == len(expected)


def test_failed_start_does_not_block_the_rerun_and_worker_errors_keep_their_fields(tmp_path):
    import pickle

    from bgekit.distributed import ray_runner, shards
    from bgekit.distributed.storage import Folder
    from bgekit.errors import DataFormatError, InputError

    folder = Folder(str(tmp_path / "out"))
    assert shards.check_manifest(folder, {"format": shards.FORMAT, "model": "typo"}) is False
    # nothing finished under the old settings: the corrected run starts over instead of being refused
    assert shards.check_manifest(folder, {"format": shards.FORMAT, "model": "right"}) is False
    (tmp_path / "out" / shards.shard_name(0)).write_bytes(b"")
    with pytest.raises(InputError, match="was written with other settings"):
        shards.check_manifest(folder, {"format": shards.FORMAT, "model": "other"})

    error = DataFormatError("/data/in.jsonl", 2501, "not valid JSON")
    for again in (pickle.loads(pickle.dumps(error)), ray_runner._decode_error(ray_runner._encode_error(error))):
        assert type(again) is DataFormatError and (again.path, again.line, str(again)) == (
            "/data/in.jsonl",
            2501,
            str(error),
        )


def test_ray_cli_checks_model_and_output_before_starting(tmp_path):
    from .cli import run

    texts = tmp_path / "in.txt"
    texts.write_text("hello\n")
    typo = run("embed", "--ray", "-m", "nobody/unknown-model", "-i", str(texts), "-o", str(tmp_path / "o"), check=False)
    assert typo.returncode == 2 and "does not know the embedder" in typo.stderr and "Traceback" not in typo.stderr
    assert not (tmp_path / "o").exists()
    out = str(tmp_path / "o")
    bad_pooling = run("embed", "--ray", "-i", str(texts), "-o", out, "--pooling-method", "max", check=False)
    assert bad_pooling.returncode == 2 and "pooling_method must be one of" in bad_pooling.stderr
    (tmp_path / "file.npy").write_bytes(b"")
    as_file = run("embed", "--ray", "-i", str(texts), "-o", str(tmp_path / "file.npy"), check=False)
    assert as_file.returncode == 2 and "--ray writes a folder" in as_file.stderr


def test_a_resumed_run_over_a_changed_input_is_refused(tmp_path, tiny_bert):
    """The manifest records the input's SHA-256: an input edited since the first run, even to the same
    size and row count, is refused instead of mixing its vectors with the finished shards' ones."""
    import hashlib

    from bgekit.errors import InputError

    source = tmp_path / "in.jsonl"
    source.write_text('{"_id": "a", "text": "hello"}\n{"_id": "b", "text": "world"}\n{"_id": "c", "text": "!"}\n')
    out = tmp_path / "out"
    encode_dataset(str(tiny_bert), source, out, use_ray=False, shard_size=2)
    recorded = read_manifest(out)["input"]
    assert recorded["sha256"] == hashlib.sha256(source.read_bytes()).hexdigest()
    (out / "part-00001.parquet").unlink()  # as a killed run leaves it
    source.write_text(source.read_text().replace("hello", "jello"))  # same size, same rows
    with pytest.raises(InputError, match=r"other settings.*sha256"):
        encode_dataset(str(tiny_bert), source, out, use_ray=False, shard_size=2)
    assert sorted(p.name for p in out.iterdir()) == ["manifest.json", "part-00000.parquet"]
    packed = tmp_path / "in.jsonl.gz"  # a gzipped input: the digest of its lines, as read
    packed.write_bytes(gzip.compress(source.read_bytes()))
    gz_out = tmp_path / "gz"
    encode_dataset(str(tiny_bert), packed, gz_out, use_ray=False, shard_size=2)
    assert read_manifest(gz_out)["input"]["sha256"] == hashlib.sha256(source.read_bytes()).hexdigest()


def test_a_parquet_input_is_hashed_by_its_bytes(tmp_path):
    import hashlib

    import pyarrow as pa
    import pyarrow.parquet as pq

    from bgekit.distributed import plan

    path = tmp_path / "in.parquet"
    pq.write_table(pa.table({"_id": ["a", "b", "c"], "text": ["x", "y", "z"]}), path)
    planned = plan.plan(str(path), 2)
    assert planned.describe()["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert planned.rows == 3 and len(planned.shards) == 2
