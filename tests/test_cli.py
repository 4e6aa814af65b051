"""Check 6 (and the CLI half of check 4): ``bgekit embed`` / ``rerank`` / ``models`` end to end.

The commands run on the real all-MiniLM-L6-v2 model (offline) and on a tiny cross-encoder, in the
test process (:func:`tests.cli.run`); the first test and the pipe test run the installed ``bgekit``
entry point as a real subprocess.
"""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import numpy as np
import pytest

from bgekit import Embedder

from .cli import run, run_process

PASSAGES = [
    {"_id": "d1", "title": "Pandas", "text": "The giant panda is a bear native to China that eats bamboo."},
    {"_id": "d2", "title": "", "text": "Paris is the capital of France."},
    {"_id": "d3", "text": "Dense retrieval ranks passages by the similarity of their vectors to the query."},
]


@pytest.fixture()
def passages_file(tmp_path) -> Path:
    path = tmp_path / "passages.jsonl"
    path.write_text("".join(json.dumps(p) + "\n" for p in PASSAGES))
    return path


def test_embed_jsonl_to_npy_matches_library(tmp_path, passages_file, minilm_dir):
    out = tmp_path / "out" / "vectors.npy"
    result = run_process("embed", "--model", str(minilm_dir), "--input", str(passages_file), "--output", str(out))
    assert "3 x 384" in result.stderr
    vectors = np.load(out)
    texts = [(p.get("title", "") + " " + p["text"]).strip() for p in PASSAGES]
    expected = Embedder.from_pretrained(str(minilm_dir)).encode_corpus(texts)
    np.testing.assert_allclose(vectors, expected, atol=1e-6)
    assert not list(out.parent.glob(".*tmp*")), "temporary files left behind"


def test_embed_default_model_offline_plain_text_queries_and_jsonl_output(tmp_path, minilm_dir):
    source = tmp_path / "queries.txt"
    source.write_text("what is a panda?\nwhere is paris\n")
    out = tmp_path / "queries.jsonl"
    result = run("embed", "--input", str(source), "--output", str(out), "--queries")
    assert "all-MiniLM-L6-v2" in result.stderr
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["id"] for r in rows] == ["1", "2"]
    expected = Embedder.from_pretrained(str(minilm_dir)).encode_queries(["what is a panda?", "where is paris"])
    np.testing.assert_allclose(np.array([r["embedding"] for r in rows]), expected, atol=1e-6)


def test_embed_reads_gzipped_jsonl(tmp_path, minilm_dir):
    source = tmp_path / "corpus.jsonl.gz"
    with gzip.open(source, "wt") as handle:
        handle.writelines(json.dumps(p) + "\n" for p in PASSAGES)
    out = tmp_path / "v.npy"
    run("embed", "-m", str(minilm_dir), "-i", str(source), "-o", str(out))
    assert np.load(out).shape == (3, 384)
    packed = tmp_path / "v.npy.gz"  # a .gz name is gzipped, as .jsonl.gz is (was a plain .npy)
    run("embed", "-m", str(minilm_dir), "-i", str(source), "-o", str(packed))
    with gzip.open(packed) as handle:
        np.testing.assert_array_equal(np.load(handle), np.load(out))


def test_rerank_with_a_cross_encoder(tmp_path, passages_file, tiny_xlmr_reranker):
    from bgekit import FlagReranker

    out = tmp_path / "scores.jsonl"
    query = "which animal eats bamboo?"
    result = run(
        "rerank",
        "--model",
        str(tiny_xlmr_reranker),
        "--query",
        query,
        "--input",
        str(passages_file),
        "--output",
        str(out),
    )
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["id"] for r in rows] == ["d1", "d2", "d3"]
    texts = [(p.get("title", "") + " " + p["text"]).strip() for p in PASSAGES]
    expected = FlagReranker(str(tiny_xlmr_reranker)).compute_score([(query, t) for t in texts])
    np.testing.assert_allclose([r["score"] for r in rows], expected, atol=1e-5)
    assert sorted(r["rank"] for r in rows) == [1, 2, 3]
    printed = [line.split("\t") for line in result.stdout.strip().splitlines()]
    assert [int(p[0]) for p in printed] == [1, 2, 3]
    assert [float(p[1]) for p in printed] == sorted((float(p[1]) for p in printed), reverse=True)


def test_rerank_normalize_orders_by_the_logits(tmp_path, tiny_xlmr_reranker):
    """Logits above ~37 all have a sigmoid of 1.0: --normalize prints them in the logits' order (as
    Reranker.rank and the server), not in input order, and writes the sigmoids."""
    import shutil

    import torch
    from transformers import AutoModelForSequenceClassification

    from bgekit import FlagReranker

    saturated = tmp_path / "saturated"
    shutil.copytree(tiny_xlmr_reranker, saturated)
    model = AutoModelForSequenceClassification.from_pretrained(str(tiny_xlmr_reranker))
    with torch.no_grad():
        model.classifier.out_proj.bias += 100.0  # every logit near 100
    model.save_pretrained(saturated)
    texts = ["bamboo forests", "the moon", "pandas eat bamboo", "Paris", "a red bus", "giant pandas"]
    source = tmp_path / "p.txt"
    source.write_text("\n".join(texts) + "\n")
    logits = FlagReranker(str(saturated)).compute_score([("bamboo", t) for t in texts])
    assert min(logits) > 40 and len(set(logits)) == len(texts)
    by_logit = sorted(range(len(texts)), key=lambda i: -logits[i])
    assert by_logit != list(range(len(texts)))  # the test can tell the logits' order from input order
    out = tmp_path / "scores.jsonl"
    printed = run("rerank", "-m", str(saturated), "-q", "bamboo", "-i", str(source), "--normalize", "-o", str(out))
    rows = [line.split("\t") for line in printed.stdout.strip().splitlines()]
    assert [r[3] for r in rows] == [texts[i] for i in by_logit]
    assert {r[1] for r in rows} == {"1.000000"}
    written = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["score"] for r in written] == [1.0] * len(texts)
    assert [r["rank"] for r in written] == [by_logit.index(i) + 1 for i in range(len(texts))]


@pytest.mark.parametrize("packed", ["on", "off"])
def test_embed_packed_option_reaches_the_model(tmp_path, passages_file, minilm_dir, packed):
    """``--packed on`` packs even on the CPU (the padded-grid attention), ``off`` pads; both give the
    library's vectors. The verbose log shows which one ran."""
    out = tmp_path / "v.npy"
    result = run("-v", "embed", "-m", str(minilm_dir), "-i", str(passages_file), "-o", str(out), "--packed", packed)
    assert ("packed (padding-free) batches for BertModel" in result.stderr) is (packed == "on")
    texts = [(p.get("title", "") + " " + p["text"]).strip() for p in PASSAGES]
    expected = Embedder.from_pretrained(str(minilm_dir)).encode_corpus(texts)
    np.testing.assert_allclose(np.load(out), expected, atol=1e-5)


def leaves(command, path=()):
    """``(name, click command)`` of every command under ``command``, groups walked through."""
    subcommands = getattr(command, "commands", None)
    if subcommands is None:
        yield " ".join(path), command
    for name, sub in (subcommands or {}).items():
        yield from leaves(sub, (*path, name))


def test_each_command_summary_is_one_line():
    """typer lists a command with the first paragraph of its help as written, line breaks and all; one
    broken mid-sentence read as two entries in ``bgekit --help``."""
    import typer

    from bgekit.cli import app

    for name, command in leaves(typer.main.get_command(app)):
        assert "\n" not in (command.help or "").strip().split("\n\n")[0], name


def test_verbose_may_follow_the_command(tmp_path, passages_file, minilm_dir):
    """``bgekit embed ... -v`` logs as ``bgekit -v embed ...`` does (it was 'No such option: -v'), and every
    command, in every group, lists the flag in its help."""
    import typer

    from bgekit.cli import app

    out = tmp_path / "v.npy"
    result = run("embed", "-m", str(minilm_dir), "-i", str(passages_file), "-o", str(out), "--packed", "on", "-v")
    assert "INFO bgekit.models.base: packed (padding-free) batches for BertModel" in result.stderr
    quiet = run("embed", "-m", str(minilm_dir), "-i", str(passages_file), "-o", str(out), "--packed", "on")
    assert "INFO" not in quiet.stderr

    commands = dict(leaves(typer.main.get_command(app)))
    assert {"embed", "models", "score", "mine", "merge", "serve", "finetune embedder", "eval sts"} <= set(commands)
    for name, command in commands.items():
        assert any("-v" in p.opts and "--verbose" in p.opts for p in command.params), name


def test_verbose_may_sit_between_a_group_and_its_command(tmp_path, minilm_dir):
    """``bgekit finetune -v embedder ...`` was 'No such option: -v' from the finetune group; every group
    takes the flag there too, and it logs as after the command."""
    import typer

    from bgekit.cli import app

    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"_id": str(i), "text": f"document {i}"}) + "\n" for i in range(5)))
    built = run("index", "-v", "build", "-m", str(minilm_dir), "-c", str(corpus), "-o", str(tmp_path / "index"))
    assert "INFO bgekit.eval.index: built" in built.stderr
    assert "Usage: bgekit finetune embedder" in run("finetune", "-v", "embedder", "--help").stdout
    groups = {name: g for name, g in typer.main.get_command(app).commands.items() if hasattr(g, "commands")}
    assert {"eval", "index", "finetune", "data"} <= set(groups)
    for name, group in groups.items():
        assert any("-v" in p.opts and "--verbose" in p.opts for p in group.params), name


def test_text_field_on_plain_text_input_is_an_error(tmp_path):
    """embed, rerank and index build read ``--text-field`` from JSONL only; on a plain-text file it was
    silently unused. It is now one error line, before any model loads."""
    plain = tmp_path / "lines.txt"
    plain.write_text("first line\nsecond line\n")
    for args in (
        ("embed", "-i", str(plain), "-o", str(tmp_path / "v.npy")),
        ("rerank", "-q", "query", "-i", str(plain)),
        ("index", "build", "-c", str(plain), "-o", str(tmp_path / "index")),
    ):
        result = run(*args, "-m", "no/such-model", "--text-field", "body", check=False)
        assert result.returncode == 2, (args, result.stderr)
        assert result.stderr.startswith("error: text field 'body' (--text-field) picks a field of JSONL"), args
        assert "lines.txt is plain text" in result.stderr


def test_embed_bf16_runs_bfloat16_on_the_cpu(tmp_path, passages_file, minilm_dir):
    """``--bf16`` is the library's ``use_bf16=True``, which the CPU honours (``--fp16`` it ignores)."""
    out = tmp_path / "v.npy"
    run("embed", "-m", str(minilm_dir), "-i", str(passages_file), "-o", str(out), "--bf16")
    texts = [(p.get("title", "") + " " + p["text"]).strip() for p in PASSAGES]
    bf16 = Embedder.from_pretrained(str(minilm_dir), use_bf16=True, devices="cpu").encode_corpus(texts)
    fp32 = Embedder.from_pretrained(str(minilm_dir), devices="cpu").encode_corpus(texts)
    np.testing.assert_allclose(np.load(out), bf16, atol=1e-6)
    assert np.abs(np.load(out) - fp32).max() > 1e-5


def test_bf16_with_an_onnx_backend_is_one_clear_line(tmp_path, passages_file, minilm_dir):
    pytest.importorskip("onnxruntime")
    out = tmp_path / "v.npy"
    result = run(
        "embed", "-m", str(minilm_dir), "-i", str(passages_file), "-o", str(out), "--bf16", "--backend", "onnx",
        check=False,
    )  # fmt: skip
    assert result.returncode == 2, result.stderr
    assert "use_bf16" in result.stderr and "Traceback" not in result.stderr and not out.exists()


def test_rerank_packed_on_for_a_model_that_cannot_pack_is_one_clear_line(golden_dir, passages_file):
    result = run(
        "rerank", "-m", str(golden_dir / "models" / "minicpm-layerwise"), "-q", "bamboo", "-i", str(passages_file),
        "--packed", "on", check=False,
    )  # fmt: skip
    assert result.returncode == 2, result.stderr
    assert "packed=True is not supported" in result.stderr and "Traceback" not in result.stderr


def test_rerank_with_the_real_minilm_ranks_the_right_passage_first(passages_file, minilm_dir):
    result = run(
        "rerank", "-m", str(minilm_dir), "-q", "which animal eats bamboo?", "-i", str(passages_file), "--top-k", "1"
    )
    lines = result.stdout.strip().splitlines()
    assert len(lines) == 1 and lines[0].split("\t")[2] == "d1"


def test_models_lists_the_registry():
    result = run("models", "--json")
    names = {row["model"] for row in json.loads(result.stdout)}
    assert {"BAAI/bge-base-en-v1.5", "BAAI/bge-reranker-v2-m3", "sentence-transformers/all-MiniLM-L6-v2"} <= names


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ('{"text": "ok"}\n{"text": "fine"}\n{"text": broken\n', r"bad\.jsonl, line 3: not valid JSON"),
        ('{"text": "ok"}\n\n{"body": "no text field"}\n', r"bad\.jsonl, line 3: missing the 'text' field"),
        ('{"text": "ok"}\n[1, 2]\n', r"bad\.jsonl, line 2: expected a JSON object"),
        ('{"text": 5}\n', r"bad\.jsonl, line 1: 'text' and 'title' must be strings"),
    ],
)
def test_malformed_jsonl_names_file_and_line(tmp_path, minilm_dir, content, message):
    import re

    source = tmp_path / "bad.jsonl"
    source.write_text(content)
    out = tmp_path / "v.npy"
    out.write_bytes(b"precious")
    result = run("embed", "-m", str(minilm_dir), "-i", str(source), "-o", str(out), check=False)
    assert result.returncode == 2
    assert re.search(message, result.stderr), result.stderr
    assert "Traceback" not in result.stderr
    assert out.read_bytes() == b"precious", "an existing output must survive a failed run"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["embed", "-i", "{missing}", "-o", "{out}"], "does not exist"),
        (["embed", "-m", "nobody/unknown-model", "-i", "{good}", "-o", "{out}"], "does not know the embedder"),
        (["embed", "-m", "{tmp}/no-folder", "-i", "{good}", "-o", "{out}"], "does not exist"),
        (["embed", "-i", "{empty}", "-o", "{out}"], "holds no texts"),
        (["rerank", "-q", "x", "-i", "{good}", "-m", "nobody/unknown"], "does not know the reranker"),
        (["embed", "-i", "{blank}", "-o", "{out}"], "holds no texts"),  # blank lines are skipped
        (["embed", "-i", "{latin1}", "-o", "{out}"], "latin1.txt, line 2: not UTF-8 text (byte 0xe9"),
        # output problems are found before the model loads (the unknown model would fail later)
        (["embed", "-m", "nobody/unknown-model", "-i", "{good}", "-o", "{tmp}"], "is a folder; pass a file path"),
        (["embed", "-m", "nobody/unknown-model", "-i", "{good}", "-o", "{good}/v.npy"], "is a file, not a folder"),
        (["embed", "-m", "nobody/unknown-model", "-i", "{good}", "-o", "{good}"], "is also an input"),
        (["embed", "-m", "nobody/x", "-i", "{good}", "-o", "{out}", "--sparse", "{out}"], "two outputs go to"),
        (["index", "build", "-m", "nobody/unknown-model", "-c", "{good}", "-o", "{good}"], "is a file, not a folder"),
        # instructions and examples shape queries only: without --queries they were silently unused
        (["embed", "-i", "{good}", "-o", "{out}", "--query-instruction", "Q: "], "--query-instruction shape queries"),
        (["embed", "-i", "{good}", "-o", "{out}", "--examples", "{good}"], "--examples shape queries"),
    ],
)
def test_cli_errors_are_one_clear_line(tmp_path, args, message):
    good = tmp_path / "good.txt"
    good.write_text("hello\n")
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    blank = tmp_path / "blank.txt"
    blank.write_text("\n  \n\n")
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes(b"ok\ncaf\xe9\n")
    values = {
        "missing": tmp_path / "missing.txt",
        "out": tmp_path / "o.npy",
        "good": good,
        "empty": empty,
        "blank": blank,
        "latin1": latin1,
        "tmp": tmp_path,
    }
    result = run(*[a.format(**values) for a in args], check=False)
    assert result.returncode == 2, result.stderr
    assert message in result.stderr and "Traceback" not in result.stderr


def test_embed_reads_a_pipe_once_and_writes_gzipped_jsonl(tmp_path, minilm_dir):
    """``-i /dev/stdin``: every line, ids by line number, blank lines skipped; ``-o x.jsonl.gz`` is JSONL."""
    lines = [f"sentence number {i}" for i in range(1, 1501)]
    lines[9] = ""  # a blank line 10
    out = tmp_path / "piped.jsonl.gz"
    run_process("embed", "-m", str(minilm_dir), "-i", "/dev/stdin", "-o", str(out), input="\n".join(lines) + "\n")
    with gzip.open(out, "rt") as handle:
        rows = [json.loads(line) for line in handle]
    assert [r["id"] for r in rows] == [str(i) for i in range(1, 1501) if i != 10]
    expected = Embedder.from_pretrained(str(minilm_dir)).encode_corpus([lines[0], lines[-1]])
    np.testing.assert_allclose(np.array([rows[0]["embedding"], rows[-1]["embedding"]]), expected, atol=1e-5)


def test_text_field_title_is_not_doubled(tmp_path, tiny_xlmr_reranker):
    source = tmp_path / "titled.jsonl"
    source.write_text(json.dumps(PASSAGES[0]) + "\n")
    result = run("rerank", "-m", str(tiny_xlmr_reranker), "-q", "panda", "-i", str(source), "--text-field", "title")
    assert "\tPandas" in result.stdout and "Pandas Pandas" not in result.stdout, result.stdout
