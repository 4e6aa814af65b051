"""``bgekit eval retrieval | sts``, ``bgekit index build`` and ``bgekit search`` end to end, the command run
in the test process (:func:`tests.cli.run`; one run from another working directory is a real subprocess),
on the real all-MiniLM-L6-v2 (offline) and the fixture."""

from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path

import numpy as np
import pytest

from .cli import BGEKIT, run

ROOT = Path(__file__).resolve().parents[1]
MINI = ROOT / "examples" / "data" / "scifact-mini"
STS_MINI = ROOT / "examples" / "data" / "stsb-test-mini.tsv"


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cli-cache")


def test_eval_retrieval_writes_the_report(tmp_path, minilm_dir, cache):
    out = tmp_path / "reports" / "mini.json"
    result = run(
        "eval", "retrieval", "--model", str(minilm_dir), "--dataset", str(MINI), "--split", "test",
        "--k", "1,3,5,10,100", "--cache-dir", str(cache), "--output", str(out),
    )  # fmt: skip
    report = json.loads(out.read_text())
    assert report["model"] == str(minilm_dir) and report["dataset"] == "scifact-mini" and report["split"] == "test"
    metrics = report["metrics"]
    assert {"ndcg_at_10", "map_at_10", "recall_at_100", "mrr_at_10", "precision_at_10"} <= set(metrics)
    assert 0.5 < metrics["ndcg_at_10"] < 1.0 and metrics["recall_at_100"] == 1.0  # 157 docs: all found by 100
    assert report["timings"]["total_s"] > 0 and report["cache"]["status"] in ("miss", "hit")
    printed = re.search(r"\| nDCG \| ([0-9.]+) \| ([0-9.]+) \| ([0-9.]+) \| ([0-9.]+) \|", result.stdout)
    assert printed and float(printed.group(4)) == pytest.approx(metrics["ndcg_at_10"], abs=1e-5)
    assert (tmp_path / "reports" / "mini.md").exists()
    run_lines = (tmp_path / "reports" / "mini.trec").read_text().splitlines()
    assert len(run_lines) == 40 * 100 and run_lines[0].split()[1:4:2] == ["Q0", "1"]


def test_eval_retrieval_with_a_reranker(tmp_path, minilm_dir, tiny_xlmr_reranker, cache):
    out = tmp_path / "rr.json"
    run(
        "eval", "retrieval", "-m", str(minilm_dir), "-d", str(MINI), "--reranker", str(tiny_xlmr_reranker),
        "--rerank-top-k", "10", "--k", "1,10", "--cache-dir", str(cache), "-o", str(out),
    )  # fmt: skip
    report = json.loads(out.read_text())
    assert report["reranker"] == str(tiny_xlmr_reranker) and report["rerank_top_k"] == 10
    assert set(report["metrics"]) == set(report["retrieval_metrics"])
    assert report["metrics"]["recall_at_10"] == pytest.approx(report["retrieval_metrics"]["recall_at_10"])
    assert (tmp_path / "rr.retrieval.trec").exists() and (tmp_path / "rr.trec").exists()


def test_eval_sts(tmp_path, minilm_dir):
    from scipy.stats import spearmanr

    from bgekit import Embedder
    from bgekit.eval.datasets import load_sts

    out = tmp_path / "sts.json"
    small = tmp_path / "small.tsv"
    small.write_text("\n".join(STS_MINI.read_text().splitlines()[:41]) + "\n")  # header + 40 pairs
    result = run("eval", "sts", "--model", str(minilm_dir), "--data", str(small), "--output", str(out))
    report = json.loads(out.read_text())
    data = load_sts(small)
    model = Embedder.from_pretrained(str(minilm_dir))
    a, b = model.encode(data.sentences1), model.encode(data.sentences2)
    expected = spearmanr((a * b).sum(axis=1), data.scores).statistic
    assert report["metrics"]["cosine_spearman"] == pytest.approx(expected, abs=1e-6)
    assert set(report["metrics"]) == {"cosine_spearman", "cosine_pearson"} and report["pairs"] == 40
    assert "cosine_spearman" in result.stdout


def test_index_build_and_search(tmp_path, minilm_dir, tiny_xlmr_reranker):
    index = tmp_path / "index"
    relative = os.path.relpath(minilm_dir)  # as typed; the index keeps the absolute folder for `search` elsewhere
    built = run("index", "build", "--model", relative, "--corpus", str(MINI / "corpus.jsonl"), "--out", str(index))
    assert "157 documents x 384" in built.stderr
    meta = json.loads((index / "index.json").read_text())
    assert meta["model"] == str(Path(minilm_dir).resolve()) and meta["count"] == 157
    query = "Vitamin D deficiency is associated with bone density"
    result = run("search", "--index", str(index), query, "--top-k", "3", "--json")
    hits = [json.loads(line) for line in result.stdout.splitlines()]
    assert [h["rank"] for h in hits] == [1, 2, 3]
    # the index holds the model's vectors of the corpus texts, and search is exact cosine over them
    from bgekit import Embedder
    from bgekit.eval.datasets import read_corpus
    from bgekit.eval.index import DenseIndex

    ids, texts = read_corpus(MINI / "corpus.jsonl")
    stored = DenseIndex.load(index).index.reconstruct_n(0, 157)
    model = Embedder.from_pretrained(str(minilm_dir))
    sample = [0, 50, 156]
    np.testing.assert_allclose(stored[sample], model.encode_corpus([texts[i] for i in sample]), atol=1e-5)
    scores = stored @ model.encode_queries(query)
    best = np.argsort(-scores)[:3]
    assert [h["id"] for h in hits] == [ids[i] for i in best]
    np.testing.assert_allclose([h["score"] for h in hits], scores[best], atol=1e-5)
    assert hits[0]["text"] == texts[best[0]]
    reranked = run("search", "--index", str(index), query, "--top-k", "3", "--reranker", str(tiny_xlmr_reranker))
    lines = [line.split("\t") for line in reranked.stdout.strip().splitlines()]
    assert len(lines) == 3 and [float(p[1]) for p in lines] == sorted((float(p[1]) for p in lines), reverse=True)
    fewer = run(
        "search", "--index", str(index), query, "--top-k", "3", "--reranker", str(tiny_xlmr_reranker),
        "--rerank-top-k", "2",
    )  # fmt: skip
    assert len(fewer.stdout.strip().splitlines()) == 2 and "2 results, the reranked candidates" in fewer.stderr
    # a reranker that cannot load is said first (it was found after the query was embedded and searched)
    args = ["search", "--index", str(index), query, "-m", "nobody/embedder", "-r", "nobody/reranker"]
    unknown = run(*args, check=False)
    assert unknown.returncode == 2 and "does not know the reranker 'nobody/reranker'" in unknown.stderr


def test_index_build_records_a_hub_id_as_the_loader_reads_it(tmp_path, minilm_dir):
    """``-m "org/name/"`` (a pasted or tab-completed hub id) loads as ``org/name``; the index and the
    message named it with its trailing slash where the loader did not normalise it first."""
    from bgekit.eval.cli import _absolute_if_local

    assert _absolute_if_local(" org/name/ ") == "org/name" == _absolute_if_local("org/name")
    assert _absolute_if_local(f"{minilm_dir}/") == str(Path(minilm_dir).resolve())
    index = tmp_path / "index"
    built = run("index", "build", "-m", " sentence-transformers/all-MiniLM-L6-v2/", "-c", str(MINI / "corpus.jsonl"),
                "-o", str(index))  # fmt: skip
    assert built.stderr.rstrip().endswith("from sentence-transformers/all-MiniLM-L6-v2")
    assert json.loads((index / "index.json").read_text())["model"] == "sentence-transformers/all-MiniLM-L6-v2"
    found = run("search", "-i", str(index), "-q", "bone density", "--top-k", "1")
    assert found.stdout.count("\n") == 1 and "warning" not in found.stderr


def test_search_takes_the_query_as_q_like_rerank(tmp_path, minilm_dir):
    """``bgekit rerank -q TEXT`` but ``bgekit search TEXT``: ``search -q TEXT`` was 'No such option: -q'.
    Both spellings now search alike; giving both, or neither, is refused."""
    corpus = tmp_path / "corpus.jsonl"
    texts = ["pandas eat bamboo", "Paris is in France", "the moon orbits the earth"]
    corpus.write_text("".join(json.dumps({"_id": str(i), "text": t}) + "\n" for i, t in enumerate(texts)))
    index = tmp_path / "index"
    run("index", "build", "-m", str(minilm_dir), "-c", str(corpus), "-o", str(index))
    positional = run("search", "-i", str(index), "what do pandas eat", "--json").stdout
    assert json.loads(positional.splitlines()[0])["id"] == "0"
    assert run("search", "-i", str(index), "-q", "what do pandas eat", "--json").stdout == positional
    assert run("search", "--query", "what do pandas eat", "-i", str(index), "--json").stdout == positional
    both = run("search", "-i", str(index), "-q", "pandas", "bamboo", check=False)
    assert both.returncode == 2 and "give the query once" in both.stderr
    neither = run("search", "-i", str(index), check=False)
    assert neither.returncode == 2 and "no query" in neither.stderr


def test_search_refuses_a_query_model_of_other_vectors(tmp_path, minilm_dir, tiny_bert):
    import shutil

    index = tmp_path / "index"
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"_id": str(i), "text": f"document {i}"}) + "\n" for i in range(5)))
    run("index", "build", "-m", str(minilm_dir), "-c", str(corpus), "-o", str(index))
    assert json.loads((index / "index.json").read_text())["vector_space"]["pooling"] == "mean"
    query = ["search", "--index", str(index), "document 3", "--json"]
    # the same files elsewhere (a copy keeping file times) are the same vectors: searched silently
    same = tmp_path / "same"
    shutil.copytree(minilm_dir, same)
    assert "warning" not in run(*query, "-m", str(same)).stderr  # (transformers 5.0 prints a load report)
    # CLS pooling over the same weights gives other vectors of the same size: refused, the cause named
    cls = tmp_path / "cls"
    shutil.copytree(minilm_dir, cls)
    pooling = json.loads((cls / "1_Pooling" / "config.json").read_text())
    pooling.update(pooling_mode_cls_token=True, pooling_mode_mean_tokens=False)
    (cls / "1_Pooling" / "config.json").write_text(json.dumps(pooling))
    refused = run(*query, "-m", str(cls), check=False)
    assert refused.returncode == 2 and f"({minilm_dir}): files, pooling differ" in refused.stderr
    assert "pass --other-model" in refused.stderr and refused.stdout == ""
    allowed = run(*query, "-m", str(cls), "--other-model")
    assert "searching anyway" in allowed.stderr and len(allowed.stdout.splitlines()) == 5
    # another size is refused even with --other-model, before faiss sees it
    other = run(*query, "-m", str(tiny_bert), "--other-model", check=False)
    assert other.returncode == 2 and "dimensional vectors; the index at" in other.stderr
    # a plain copy (new file times, the same bytes): the same vectors, searched silently
    touched = tmp_path / "touched"
    shutil.copytree(minilm_dir, touched, copy_function=shutil.copy)
    assert "warning" not in run(*query, "-m", str(touched)).stderr
    # an index of an older bgekit has no record: searched with a warning when --model names another model
    meta = json.loads((index / "index.json").read_text())
    del meta["vector_space"]
    (index / "index.json").write_text(json.dumps(meta))
    assert "records no model identity" in run(*query, "-m", str(cls)).stderr
    assert "warning" not in run(*query).stderr


def test_search_refuses_a_fine_tuned_model_of_the_same_architecture(tmp_path, tiny_bert):
    """A fine-tuned copy has weights files of the same names and sizes as the index's model: it searched
    with a 'maybe retrained' warning and ranked by noise. Its weights' bytes now tell it apart."""
    import shutil

    import torch
    from safetensors.torch import load_file, save_file

    index = tmp_path / "index"
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"_id": str(i), "text": f"document {i}"}) + "\n" for i in range(5)))
    run("index", "build", "-m", str(tiny_bert), "-c", str(corpus), "-o", str(index))
    tuned = shutil.copytree(tiny_bert, tmp_path / "tuned")
    weights = tuned / "model.safetensors"
    torch.manual_seed(0)
    tensors = {k: v + 0.1 * torch.randn_like(v) if v.is_floating_point() else v for k, v in load_file(weights).items()}
    save_file(tensors, str(weights), metadata={"format": "pt"})
    assert weights.stat().st_size == (tiny_bert / "model.safetensors").stat().st_size
    query = ["search", "--index", str(index), "document 3", "--json", "-m", str(tuned)]
    refused = run(*query, check=False)
    assert refused.returncode == 2 and "weights_sample differ" in refused.stderr and refused.stdout == ""
    # an index recorded before the sample was: the names and sizes alone, so the file-times warning
    meta = json.loads((index / "index.json").read_text())
    del meta["vector_space"]["weights_sample"]
    (index / "index.json").write_text(json.dumps(meta))
    assert "other modification times" in run(*query).stderr
    # an index with no record, searched with its own model named relatively: the same folder, no warning
    del meta["vector_space"]
    (index / "index.json").write_text(json.dumps(meta))
    relative = ["search", "--index", str(index), "document 3", "-m", f"./{tiny_bert.name}/"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    same = subprocess.run(
        [BGEKIT, *relative], capture_output=True, text=True, cwd=tiny_bert.parent, timeout=300, env=env
    )
    assert same.returncode == 0 and "warning" not in same.stderr, same.stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["eval", "retrieval", "-d", "{tmp}/nowhere", "-m", "{minilm}"], "is not a folder here"),
        (["eval", "retrieval", "-d", "{no_qrels}", "-m", "{minilm}"], r"no_qrels is missing qrels/test\.tsv"),
        (["eval", "retrieval", "-d", "{bad_line}", "-m", "{minilm}"], r"corpus\.jsonl, line 2: not valid JSON"),
        (["eval", "retrieval", "-d", "{mini}", "-m", "{minilm}", "--k", "ten"], "expected positive integers"),
        (["eval", "sts", "--data", "{tmp}/none.tsv", "-m", "{minilm}"], "does not exist"),
        (["search", "--index", "{tmp}/no-index", "hello"], "does not exist; build one"),
        (["index", "build", "-c", "{dup}", "-o", "{tmp}/i", "-m", "{minilm}"], "duplicate id 'a'"),
    ],
)
def test_eval_cli_errors_are_one_clear_line(tmp_path, minilm_dir, args, message):
    no_qrels = tmp_path / "no_qrels"
    no_qrels.mkdir()
    (no_qrels / "corpus.jsonl").write_text('{"_id": "a", "text": "x"}\n')
    (no_qrels / "queries.jsonl").write_text('{"_id": "q", "text": "x"}\n')
    bad_line = tmp_path / "bad_line"
    (bad_line / "qrels").mkdir(parents=True)
    (bad_line / "corpus.jsonl").write_text('{"_id": "a", "text": "x"}\n{"_id": "b", text}\n')
    (bad_line / "queries.jsonl").write_text('{"_id": "q", "text": "x"}\n')
    (bad_line / "qrels" / "test.tsv").write_text("q\ta\t1\n")
    dup = tmp_path / "dup.jsonl"
    dup.write_text('{"_id": "a", "text": "x"}\n{"_id": "a", "text": "y"}\n')
    values = {"tmp": tmp_path, "no_qrels": no_qrels, "bad_line": bad_line, "dup": dup, "mini": MINI}
    values["minilm"] = minilm_dir
    result = run(*[a.format(**values) for a in args], check=False)
    assert result.returncode == 2, result.stderr
    assert re.search(message, result.stderr), result.stderr
    assert "Traceback" not in result.stderr


def test_a_cache_dir_that_is_a_file_is_refused_before_the_model_loads(tmp_path):
    """--cache-dir naming a file was a NotADirectoryError traceback once the model had loaded; the unknown model
    here would be the error if the cache folder were checked later."""
    cache = tmp_path / "cache"
    cache.write_text("not a folder\n")
    result = run("eval", "retrieval", "-m", "nobody/unknown", "-d", str(MINI), "--cache-dir", str(cache), check=False)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert f"cache folder {cache} is a file" in result.stderr and "--no-cache" in result.stderr
    under = run(
        "eval", "retrieval", "-m", "nobody/unknown", "-d", str(MINI), "--cache-dir", str(cache / "sub"), check=False
    )  # fmt: skip
    assert under.returncode == 2 and "cannot be created" in under.stderr and "is a file" in under.stderr
    assert "nobody/unknown" not in result.stderr + under.stderr
