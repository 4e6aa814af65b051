"""``bgekit embed`` with the other families: M3 sparse / ColBERT outputs and ICL examples from a file."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from bgekit import BGEM3FlagModel, FlagICLModel

from .cli import run

TEXTS = ["hello world", "BGE M3 gives dense, sparse and multi-vector outputs", "Zürich café 北京"]


@pytest.fixture()
def texts_file(tmp_path):
    path = tmp_path / "texts.txt"
    path.write_text("\n".join(TEXTS) + "\n")
    return path


def test_m3_dense_sparse_and_colbert_outputs(tmp_path, texts_file, golden_dir):
    folder = str(golden_dir / "models" / "xlmr-m3")
    dense, sparse, colbert = tmp_path / "d.npy", tmp_path / "s.jsonl", tmp_path / "c.npz"
    run(
        "embed",
        "-m",
        folder,
        "-i",
        str(texts_file),
        "-o",
        str(dense),
        "--sparse",
        str(sparse),
        "--colbert",
        str(colbert),
        "--no-fp16",
    )
    expected = BGEM3FlagModel(folder, devices="cpu").encode_corpus(TEXTS, return_sparse=True, return_colbert_vecs=True)
    np.testing.assert_allclose(np.load(dense), expected["dense_vecs"], atol=1e-6)
    rows = [json.loads(line) for line in sparse.read_text().splitlines()]
    assert [r["id"] for r in rows] == ["1", "2", "3"]
    for row, want in zip(rows, expected["lexical_weights"], strict=True):
        assert list(row["lexical_weights"]) == list(want)
        np.testing.assert_allclose(list(row["lexical_weights"].values()), [float(v) for v in want.values()], atol=1e-7)
    packed = np.load(colbert)
    assert list(packed["ids"]) == ["1", "2", "3"]
    for i, want in enumerate(expected["colbert_vecs"]):
        got = packed["vectors"][packed["offsets"][i] : packed["offsets"][i + 1]]
        np.testing.assert_allclose(got, want, atol=1e-6)


def test_sparse_needs_an_m3_model(tmp_path, texts_file, minilm_dir):
    result = run(
        "embed",
        "-m",
        str(minilm_dir),
        "-i",
        str(texts_file),
        "-o",
        str(tmp_path / "d.npy"),
        "--sparse",
        str(tmp_path / "s.jsonl"),
        check=False,
    )
    assert result.returncode == 2 and "need an M3 model" in result.stderr


def test_icl_examples_from_a_file(tmp_path, texts_file, golden_dir):
    folder = str(golden_dir / "models" / "mistral-icl")
    examples = [{"instruct": "Find the answer.", "query": "what is BGE", "response": "An embedding model."}]
    examples_file = tmp_path / "examples.jsonl"
    examples_file.write_text("".join(json.dumps(e) + "\n" for e in examples))
    out = tmp_path / "q.npy"
    run(
        "embed",
        "-m",
        folder,
        "-i",
        str(texts_file),
        "-o",
        str(out),
        "--queries",
        "--examples",
        str(examples_file),
        "--query-instruction",
        "Find the answer.",
        "--no-fp16",
    )
    model = FlagICLModel(
        folder, devices="cpu", examples_for_task=examples, query_instruction_for_retrieval="Find the answer."
    )
    np.testing.assert_allclose(np.load(out), model.encode_queries(TEXTS), atol=1e-6)


def test_examples_need_an_icl_model_and_valid_examples(tmp_path, texts_file, golden_dir, minilm_dir):
    examples_file = tmp_path / "examples.json"
    examples_file.write_text(json.dumps([{"query": "q"}]))
    result = run(
        "embed",
        "-m",
        str(minilm_dir),
        "-i",
        str(texts_file),
        "-o",
        str(tmp_path / "q.npy"),
        "--queries",
        "--examples",
        str(examples_file),
        check=False,
    )
    assert result.returncode == 2 and "in-context-learning model" in result.stderr
    result = run(
        "embed",
        "-m",
        str(golden_dir / "models" / "mistral-icl"),
        "-i",
        str(texts_file),
        "-o",
        str(tmp_path / "q.npy"),
        "--queries",
        "--examples",
        str(examples_file),
        check=False,
    )
    assert result.returncode == 2 and "missing ['response']" in result.stderr


def test_a_full_disk_is_one_line_and_every_old_output_stays(tmp_path, golden_dir):
    """A write that fails (here a file-size limit, EFBIG, as a full disk gives ENOSPC) is one line, exit 2, and
    no output is replaced: the sparse file landed and then the dense write died with a traceback, leaving new
    lexical weights beside old vectors."""
    import resource
    import signal
    import subprocess

    from .cli import BGEKIT

    folder = str(golden_dir / "models" / "xlmr-m3")
    texts = tmp_path / "texts.txt"
    texts.write_text("\n".join(f"text {i}" for i in range(40)) + "\n")
    dense, sparse = tmp_path / "d.jsonl", tmp_path / "s.jsonl"
    args = ["embed", "-m", folder, "-i", str(texts), "-o", str(dense), "--sparse", str(sparse), "--no-fp16"]
    run(*args)
    before = {path: path.read_bytes() for path in (dense, sparse)}
    assert len(before[sparse]) < 8_000 < len(before[dense])
    texts.write_text("\n".join(f"other {i}" for i in range(40)) + "\n")

    def small_files() -> None:  # in the child: files over 8 kB cannot grow (EFBIG, not a signal)
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (8_000, 8_000))

    result = subprocess.run(
        [BGEKIT, *args], capture_output=True, text=True, timeout=300, preexec_fn=small_files,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )  # fmt: skip
    assert result.returncode == 2, result.stderr
    assert f"could not write {dense}: File too large" in result.stderr and "Traceback" not in result.stderr
    assert {path: path.read_bytes() for path in (dense, sparse)} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d.jsonl", "s.jsonl", "texts.txt"]  # no temp files left
