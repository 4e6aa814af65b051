"""BRIGHT by name: ``bright/TASK`` and ``bright-long/TASK``, as FlagEmbedding 1.4.2's BRIGHT runner reads them.

No network here: each test writes a few rows of parquet in exactly the layout of the ``xlangai/BRIGHT`` hub
dataset (``documents/TASK-00000-of-00001.parquet`` with ``id``, ``content``; ``long_documents/...``;
``examples/TASK-...parquet`` and ``gpt4_reason/...`` with ``id``, ``query``, ``gold_ids``, ``gold_ids_long``,
``excluded_ids``) where bgekit's download puts them (``<cache>/datasets/.downloads/xlangai/BRIGHT/...``), and
checks what is loaded against FlagEmbedding's loader and searcher logic worked out by hand: query ids
``SPLIT-ID``, gold ids judged 1, ``excluded_ids`` but ``N/A`` judged 0 and dropped from the search results,
corpus texts read back with title "" (``f" {text}".strip()``), the per-task query instruction of its
``prompts.py`` set on the embedder (``--use_special_instructions True``, its default).
"""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from bgekit.errors import DataFormatError, InputError
from bgekit.eval.datasets import is_dataset_name, load_retrieval_dataset, resolve_dataset

from .cli import run

HUB = Path(".downloads") / "xlangai" / "BRIGHT"
LEETCODE = "Given a Coding problem, retrieve relevant examples that help answer the problem."


def parquet(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), path)


def example(qid: str, query: str, gold: list[str], excluded: list[str], gold_long: list[str] | None = None) -> dict:
    """One row of BRIGHT's examples (and MODEL_reason) configs, all its columns."""
    return {
        "query": query, "reasoning": "...", "id": qid, "excluded_ids": excluded,
        "gold_ids_long": gold_long or [], "gold_ids": gold, "gold_answer": "N/A",
    }  # fmt: skip


def write_leetcode(root: Path) -> None:
    """leetcode: the documents in two shards (read in name order); query 1 excludes a document that is its own
    query text with the task's instruction in front (``{}{}``): unexcluded, it would rank first."""
    hub = root / HUB
    parquet(hub / "documents" / "leetcode-00000-of-00002.parquet", [
        {"id": "leetcode/two-sum.txt", "content": "Two Sum: return indices of two numbers adding up to target.\n"},
        {"id": "leetcode/3sum.txt", "content": "  Three numbers that sum to zero. "},
    ])  # fmt: skip
    parquet(hub / "documents" / "leetcode-00001-of-00002.parquet", [
        {"id": "leetcode/same.txt", "content": LEETCODE + "Find the longest palindromic substring."},
        {"id": "leetcode/palindrome.txt", "content": "Expand around each centre to find palindromes."},
        {"id": "leetcode/graph.txt", "content": "Breadth-first search on a grid."},
    ])  # fmt: skip
    parquet(hub / "examples" / "leetcode-00000-of-00001.parquet", [
        example("0", "Given an array, find two numbers adding up to a target. ", ["leetcode/two-sum.txt"], ["N/A"]),
        example("1", "Find the longest palindromic substring.", ["leetcode/palindrome.txt"],
                ["leetcode/same.txt", "N/A", "leetcode/same.txt"]),  # listed twice: one judgment
        example("2", "Nobody judged this one.", [], []),
    ])  # fmt: skip


LEETCODE_EXPECTED = {
    "corpus_ids": [f"leetcode/{name}.txt" for name in ("two-sum", "3sum", "same", "palindrome", "graph")],
    "corpus_texts": [
        "Two Sum: return indices of two numbers adding up to target.",
        "Three numbers that sum to zero.",
        LEETCODE + "Find the longest palindromic substring.",
        "Expand around each centre to find palindromes.",
        "Breadth-first search on a grid.",
    ],
    "queries": {  # only the judged ones are evaluated
        "examples-0": "Given an array, find two numbers adding up to a target. ",
        "examples-1": "Find the longest palindromic substring.",
    },
    "qrels": {
        "examples-0": {"leetcode/two-sum.txt": 1},
        "examples-1": {"leetcode/palindrome.txt": 1, "leetcode/same.txt": 0},
    },
    "excluded": {"examples-1": {"leetcode/same.txt"}},
}


def loaded(dataset) -> dict:
    return {
        "corpus_ids": dataset.corpus_ids,
        "corpus_texts": dataset.corpus_texts,
        "queries": dataset.queries,
        "qrels": dataset.qrels,
        "excluded": dataset.excluded,
    }


def test_bright_loads_as_flagembedding_with_exclusions(tmp_path, offline):
    root = tmp_path / "datasets"
    write_leetcode(root)
    dataset = load_retrieval_dataset("bright/leetcode", "examples", cache_dir=root)
    assert loaded(dataset) == LEETCODE_EXPECTED
    assert dataset.name == "bright/leetcode" and dataset.query_instruction == LEETCODE
    folder = root / "bright" / "leetcode"
    assert sorted(p.name for p in folder.iterdir()) == [
        "corpus.jsonl", "examples_excluded.jsonl", "examples_qrels.jsonl", "examples_queries.jsonl",
    ]  # fmt: skip
    assert not list((root / ".downloads").rglob("*.parquet"))  # removed once converted
    # FlagEmbedding's own layout: the excluded documents judged 0 in the qrels file too
    qrels = [json.loads(line) for line in (folder / "examples_qrels.jsonl").read_text().splitlines()]
    assert {"qid": "examples-1", "docid": "leetcode/same.txt", "relevance": 0} in qrels
    again = load_retrieval_dataset(str(folder), "examples")  # the folder by its path keeps the exclusions
    assert again.excluded == LEETCODE_EXPECTED["excluded"] and again.query_instruction is None


def test_bright_long_and_reasoning_split(tmp_path, offline):
    """``bright-long/pony``: ``long_documents`` and ``gold_ids_long``; ``gpt4_reason``: that split's queries."""
    root = tmp_path / "datasets"
    parquet(root / HUB / "long_documents" / "pony-00000-of-00001.parquet", [
        {"id": "pony/actors.md", "content": "# Actors\nActors run concurrently.\n"},
        {"id": "pony/capabilities.md", "content": "iso, val, ref, box, trn, tag"},
    ])  # fmt: skip
    parquet(root / HUB / "gpt4_reason" / "pony-00000-of-00001.parquet", [
        example("4", "How do I share data? Reasoning: use val.", ["pony/capabilities.md_3"], ["N/A"],
                gold_long=["pony/capabilities.md"]),
    ])  # fmt: skip
    dataset = load_retrieval_dataset("bright-long/pony", "gpt4_reason", cache_dir=root)
    assert loaded(dataset) == {
        "corpus_ids": ["pony/actors.md", "pony/capabilities.md"],
        "corpus_texts": ["# Actors\nActors run concurrently.", "iso, val, ref, box, trn, tag"],
        "queries": {"gpt4_reason-4": "How do I share data? Reasoning: use val."},
        "qrels": {"gpt4_reason-4": {"pony/capabilities.md": 1}},
        "excluded": {},
    }
    # the long runner's instruction: "documents", and no full stop for pony (FlagEmbedding's prompts.py)
    assert dataset.query_instruction == (
        "Given a Pony question, retrieve relevant documents that help answer the question"
    )
    assert (root / "bright-long" / "pony" / "gpt4_reason_qrels.jsonl").is_file()
    assert not (root / "bright-long" / "pony" / "gpt4_reason_excluded.jsonl").exists()  # nothing excluded


def test_cli_drops_excluded_documents_and_uses_the_task_instruction(tiny_bert, tmp_path):
    """``bgekit eval retrieval -d bright/leetcode --split examples``: the excluded document, the query's own
    text, never appears in its ranking, which still holds --top-k others; the instruction is leetcode's."""
    cache = tmp_path / "cache"
    write_leetcode(cache / "datasets")
    out = tmp_path / "bright.json"
    result = run(
        "eval", "retrieval", "-m", str(tiny_bert), "-d", "bright/leetcode", "--split", "examples",
        "--k", "1,3", "--top-k", "4", "--cache-dir", str(cache), "-o", str(out),
    )  # fmt: skip
    report = json.loads(out.read_text())
    assert report["dataset"] == "bright/leetcode" and report["split"] == "examples"
    assert report["settings"]["query_instruction"] == LEETCODE and report["settings"]["excluded_documents"]
    assert report["dataset_info"]["queries"] == 2 and report["dataset_info"]["excluded"] == 1
    assert "bright/leetcode (examples)" in result.stdout
    ranked: dict[str, list[str]] = {}
    for line in out.with_suffix(".trec").read_text().splitlines():
        query_id, _, doc_id, *_ = line.split()
        ranked.setdefault(query_id, []).append(doc_id)
    assert "leetcode/same.txt" not in ranked["examples-1"] and len(ranked["examples-1"]) == 4
    assert "leetcode/same.txt" in ranked["examples-0"]  # excluded for query 1 only

    # without the exclusion file the same document is that query's first hit (what the check above guards)
    (cache / "datasets" / "bright" / "leetcode" / "examples_excluded.jsonl").unlink()
    folder_out = tmp_path / "folder.json"
    run(
        "eval", "retrieval", "-m", str(tiny_bert), "-d", str(cache / "datasets" / "bright" / "leetcode"),
        "--split", "examples", "--k", "1,3", "--top-k", "4", "--query-instruction", LEETCODE,
        "--cache-dir", str(cache), "-o", str(folder_out),
    )  # fmt: skip
    lines = folder_out.with_suffix(".trec").read_text().splitlines()
    assert next(line.split()[2] for line in lines if line.startswith("examples-1 ")) == "leetcode/same.txt"


def test_bad_names_splits_and_offline_are_one_line(tmp_path, monkeypatch):
    monkeypatch.setenv("BGEKIT_CACHE", str(tmp_path / "cache"))

    def error(*args: str) -> str:
        result = run("eval", "retrieval", "-m", "nobody/unknown", *args, check=False)
        lines = result.stderr.strip().splitlines()
        assert result.returncode == 2 and len(lines) == 1, result.stderr
        return lines[0]

    assert error("-d", "bright/physics", "--split", "examples") == (
        "error: bright has no task 'physics': bright/TASK names one, TASK one of biology, earth_science, economics, "
        "psychology, robotics, stackoverflow, sustainable_living, leetcode, pony, aops, theoremqa_questions, "
        "theoremqa_theorems"
    )
    assert error("-d", "bright-long/aops", "--split", "examples").startswith(
        "error: bright-long has no task 'aops' (aops has no long documents: bright/aops is its passages): "
        "bright-long/TASK names one, TASK one of biology,"
    )
    assert error("-d", "bright/pony") == (  # --split test
        "error: bright/pony has no split 'test'; its splits: examples, Gemini-1.0_reason, claude-3-opus_reason, "
        "gpt4_reason, grit_reason, llama3-70b_reason (FlagEmbedding evaluates bright on examples: --split examples)"
    )
    looked = tmp_path / "cache" / "datasets" / "bright" / "pony"
    assert error("-d", "bright/pony", "--split", "examples") == (
        f"error: dataset 'bright/pony' (split examples) is not in {looked}, and HF_HUB_OFFLINE is set: no download "
        "from https://huggingface.co/datasets/xlangai/BRIGHT/resolve/main/documents/pony-*.parquet; pass the "
        "dataset's folder (corpus.jsonl, examples_queries.jsonl, examples_qrels.jsonl: FlagEmbedding's layout) "
        "instead of its name"
    )
    assert not looked.exists()


def test_names_and_bad_files(tmp_path, offline):
    assert all(is_dataset_name(n) for n in ("bright/pony", "bright-long/pony", "BRIGHT/aops"))
    root = tmp_path / "datasets"
    write_leetcode(root)
    (root / HUB / "examples" / "leetcode-00000-of-00001.parquet").write_bytes(b"not parquet")
    with pytest.raises(DataFormatError, match=r"leetcode-00000-of-00001\.parquet: not a readable parquet file"):
        load_retrieval_dataset("bright/leetcode", "examples", cache_dir=root)
    parquet(root / HUB / "examples" / "leetcode-00000-of-00001.parquet", [
        example("7", "q", ["leetcode/3sum.txt"], ["leetcode/3sum.txt"]),
    ])  # fmt: skip
    with pytest.raises(DataFormatError, match=r"line 1: query 'examples-7' excludes its own gold document"):
        load_retrieval_dataset("bright/leetcode", "examples", cache_dir=root)
    with pytest.raises(InputError, match="bright is 12 datasets, one a task"):
        resolve_dataset("bright/", cache_dir=root)
