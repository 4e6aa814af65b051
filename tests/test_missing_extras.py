"""An optional dependency that is not installed is one clear error naming the extra to install, given
before any input is read or corpus encoded: not a ModuleNotFoundError from deep inside, nor one after
minutes of encoding.

Each case runs in a real subprocess where ``sys.modules[name] = None`` makes ``import name`` fail as it
does where the package is missing (whether or not this environment has it)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest


def without(modules: list[str], code: str) -> subprocess.CompletedProcess:
    """Run ``code`` in a fresh interpreter in which ``modules`` cannot be imported."""
    blocked = "".join(f"sys.modules[{name!r}] = None\n" for name in modules)
    script = "import sys\n" + blocked + textwrap.dedent(code)
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, env=env)


def cli(modules: list[str], *args: str) -> subprocess.CompletedProcess:
    """``bgekit ARGS`` with ``modules`` missing."""
    return without(modules, f"from bgekit.cli import app\nsys.argv = ['bgekit', *{list(args)!r}]\napp()\n")


def assert_names_the_extra(result: subprocess.CompletedProcess, extra: str, what: str) -> None:
    assert result.returncode == 2, result.stderr[-3000:]
    assert f"pip install 'bgekit[{extra}]'" in result.stderr and what in result.stderr, result.stderr[-3000:]
    assert "Traceback" not in result.stderr and "ModuleNotFoundError" not in result.stderr


@pytest.mark.parametrize("missing", [["pyarrow"], ["ray"]])
def test_embed_ray_without_the_distributed_extra(tmp_path, missing):
    """Named before the model is looked up (a model that does not exist is not what the error says)
    and before the output folder is made."""
    source = tmp_path / "in.txt"
    source.write_text("hello\nworld\n")
    out = tmp_path / "out"
    result = cli(missing, "embed", "--ray", "-m", str(tmp_path / "no-model"), "-i", str(source), "-o", str(out))
    assert_names_the_extra(result, "distributed", missing[0])
    assert not out.exists()


def test_distributed_library_without_pyarrow(tmp_path):
    source = tmp_path / "in.txt"
    source.write_text("hello\n")
    code = f"""
        from bgekit.distributed import encode_dataset, read_embeddings
        from bgekit.errors import InputError
        for call in (lambda: encode_dataset("m", {str(source)!r}, {str(tmp_path / "out")!r}, use_ray=False),
                     lambda: read_embeddings({str(tmp_path / "out")!r})):
            try:
                call()
            except InputError as exc:
                print("refused:", exc)
    """
    result = without(["pyarrow"], code)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("pip install 'bgekit[distributed]'") == 2, result.stdout
    assert not (tmp_path / "out").exists()


@pytest.fixture()
def dataset(tmp_path):
    """A tiny BEIR-layout retrieval dataset."""
    folder = tmp_path / "data"
    (folder / "qrels").mkdir(parents=True)
    (folder / "corpus.jsonl").write_text(
        "".join(json.dumps({"_id": f"d{i}", "text": f"doc {i}"}) + "\n" for i in range(3))
    )
    (folder / "queries.jsonl").write_text(json.dumps({"_id": "q0", "text": "doc 1"}) + "\n")
    (folder / "qrels" / "test.tsv").write_text("query-id\tcorpus-id\tscore\nq0\td1\t1\n")
    return folder


@pytest.mark.parametrize(("missing", "what"), [("faiss", "faiss"), ("pytrec_eval", "pytrec_eval")])
def test_eval_retrieval_without_the_eval_extra_encodes_nothing(tmp_path, tiny_bert, dataset, missing, what):
    cache = tmp_path / "cache"
    result = cli(
        [missing],
        "eval", "retrieval", "-d", str(dataset), "-m", str(tiny_bert), "--device", "cpu", "--cache-dir", str(cache),
    )  # fmt: skip
    assert_names_the_extra(result, "eval", what)
    assert not cache.exists() or not any(path.is_file() for path in cache.rglob("*"))  # no corpus vectors cached


def test_index_build_without_faiss(tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("one\ntwo\n")
    out = tmp_path / "index"
    result = cli(["faiss"], "index", "build", "-c", str(corpus), "-o", str(out), "-m", str(tmp_path / "no-model"))
    assert_names_the_extra(result, "eval", "faiss")
    assert not out.exists()


def test_mine_without_faiss(tmp_path):
    data = tmp_path / "train.jsonl"
    data.write_text(json.dumps({"query": "q", "pos": ["p"], "neg": ["n"]}) + "\n")
    out = tmp_path / "mined.jsonl"
    result = cli(["faiss"], "mine", "-m", str(tmp_path / "no-model"), "-i", str(data), "-o", str(out))
    assert_names_the_extra(result, "eval", "faiss")
    assert not out.exists()
    library = without(
        ["faiss"],
        """
        from bgekit.errors import InputError
        from bgekit.train.data import TrainRecord
        from bgekit.train.mining import mine_hard_negatives
        try:
            mine_hard_negatives([TrainRecord(query="q", pos=["p"], neg=["n"])], embedder=None)
        except InputError as exc:
            print("refused:", exc)
        """,
    )
    assert "refused: vector search needs faiss: pip install 'bgekit[eval]'" in library.stdout, library.stderr[-3000:]


@pytest.mark.parametrize("missing", ["onnx", "onnxruntime"])
def test_embed_backend_onnx_without_the_onnx_extra(tmp_path, tiny_bert, monkeypatch, missing):
    """onnx writes the export (onnxruntime runs it): without it the export failed as 'could not export ...;
    use backend=torch', which hid the fix."""
    monkeypatch.setenv("BGEKIT_CACHE", str(tmp_path / "cache"))  # no export cached yet
    source = tmp_path / "in.txt"
    source.write_text("hello\n")
    out = tmp_path / "out.npy"
    result = cli(
        [missing], "embed", "-m", str(tiny_bert), "-i", str(source), "-o", str(out), "--device", "cpu",
        "--backend", "onnx",
    )  # fmt: skip
    assert_names_the_extra(result, "onnx", "onnx")
    assert not out.exists()


def test_eval_mteb_without_the_mteb_extra(tmp_path):
    """Named before the model is looked up and before the output folder is made."""
    out = tmp_path / "results"
    result = cli(["mteb"], "eval", "mteb", "-t", "SciFact", "-m", str(tmp_path / "no-model"), "-o", str(out))
    assert_names_the_extra(result, "mteb", "mteb")
    assert not out.exists()
    library = without(
        ["mteb"],
        """
        from bgekit.errors import InputError
        from bgekit.eval.mteb_run import evaluate_mteb
        try:
            evaluate_mteb("no-model", tasks=["SciFact"])
        except InputError as exc:
            print("refused:", exc)
        """,
    )
    refused = "refused: MTEB evaluation needs the mteb package: pip install 'bgekit[mteb]'"
    assert refused in library.stdout, library.stderr[-3000:]
