"""MKQA by name (``mkqa/LANG``) and its answer-based metric, as FlagEmbedding 1.4.2's MKQA runner has them.

No network here: the tests write BEIR's NQ corpus (``BeIR/nq``'s ``corpus.jsonl.gz``: ``_id``, ``title``,
``text``) and FlagEmbedding's query zip (``Shitao/bge-m3-data``'s ``MKQA_test-data.zip``: ``LANG.jsonl`` with
``id``, ``question``, ``answers``) where bgekit's download puts them, and check the loaded corpus, queries and
answers against FlagEmbedding's loader worked out by hand (its ``normalize_text`` then ``.lower()`` on title and
text, read back as ``f"{title} {text}".strip()``), and ``qa_recall_at_k`` against its evaluator's rule (DPR's
simple tokens after NFD, lower-cased; the first answer-bearing document among the top k; k capped at the length
of the first query's list).
"""

from __future__ import annotations

import gzip
import json
import zipfile
from pathlib import Path

from bgekit.eval.datasets import is_dataset_name, load_retrieval_dataset
from bgekit.eval.metrics import answer_tokens, evaluate_answers, main_score

from .cli import run


def write_mkqa(root: Path) -> None:
    nq = root / ".downloads" / "BeIR" / "nq" / "corpus.jsonl.gz"
    nq.parent.mkdir(parents=True, exist_ok=True)
    rows = [
        {"_id": "doc0", "title": "Paris", "text": "Paris is the capital of France \u2013 a city of 2 million.",
         "metadata": {}},
        {"_id": "doc1", "title": "",
         "text": "  The \u201cEiffel\u201d Tower\u2026 was built in 1889 . . . and painted. "},
        {"_id": "doc2", "title": "Berlin",
         "text": "Berlin\u00adhauptstadt: 3\u20444 of \u2033big\u2033 \u00b4Spree\u00b4"},
        {"_id": "doc3", "title": "Tokyo", "text": "Tokyo\u2019s population is 14 million.\u000b"},
    ]  # fmt: skip
    with gzip.open(nq, "wt", encoding="utf-8") as handle:
        handle.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
    archive = root / ".downloads" / "Shitao" / "bge-m3-data" / "MKQA_test-data.zip"
    archive.parent.mkdir(parents=True, exist_ok=True)
    languages = {
        "en": [
            {"id": 101, "question": "What is the capital of France?", "answers": ["Paris"]},
            {"id": 102, "question": "When was the Eiffel Tower built?", "answers": ["1889", "eighteen eighty-nine"]},
            {"id": 103, "question": "How many people live in Tokyo?", "answers": ["14 million"]},
        ],
        "zh_cn": [{"id": 101, "question": "法国的首都是什么？", "answers": ["巴黎", "Paris"]}],
    }
    with zipfile.ZipFile(archive, "w") as bundle:
        for lang, lines in languages.items():
            bundle.writestr(f"{lang}.jsonl", "".join(json.dumps(x, ensure_ascii=False) + "\n" for x in lines))


CORPUS_TEXTS = [  # normalize_text, .lower(), then f"{title} {text}".strip()
    "paris paris is the capital of france - a city of 2 million.",
    'the "eiffel" tower... was built in 1889 ... and painted.',
    "berlin berlinhauptstadt: 3/4 of ''big'' 'spree'",
    "tokyo tokyo's population is 14 million.",
]


def test_mkqa_loads_as_flagembedding_and_shares_the_corpus(tmp_path, offline):
    root = tmp_path / "datasets"
    write_mkqa(root)
    dataset = load_retrieval_dataset("mkqa/en", "test", cache_dir=root)
    assert dataset.name == "mkqa/en" and dataset.qrels == {}
    assert dataset.corpus_ids == ["doc0", "doc1", "doc2", "doc3"] and dataset.corpus_texts == CORPUS_TEXTS
    assert dataset.queries == {
        "101": "What is the capital of France?",
        "102": "When was the Eiffel Tower built?",
        "103": "How many people live in Tokyo?",
    }
    assert dataset.answers == {"101": ["Paris"], "102": ["1889", "eighteen eighty-nine"], "103": ["14 million"]}
    qrels = [json.loads(line) for line in (root / "mkqa" / "en" / "test_qrels.jsonl").read_text().splitlines()]
    assert qrels[0] == {"qid": "101", "answers": ["Paris"]}  # FlagEmbedding's MKQA qrels layout
    shared = root / "mkqa" / "corpus.jsonl"
    stamp = shared.stat().st_mtime_ns
    zh = load_retrieval_dataset("mkqa/zh_cn", "test", cache_dir=root)  # the zip is kept for the other languages
    assert zh.queries == {"101": "法国的首都是什么？"} and zh.answers == {"101": ["巴黎", "Paris"]}
    assert zh.corpus_texts == CORPUS_TEXTS and zh.fingerprint() == dataset.fingerprint()  # one corpus cache entry
    assert shared.stat().st_mtime_ns == stamp  # converted once
    assert (root / "mkqa" / "zh_cn" / "corpus.jsonl").samefile(shared)  # a link, not a copy
    assert not (root / ".downloads" / "BeIR").exists() or not list((root / ".downloads" / "BeIR").rglob("*.gz"))


def test_answer_tokens_and_qa_recall_follow_flagembedding():
    assert answer_tokens("U.S. Route 66’s end—Santa Monica") == [
        "u", ".", "s", ".", "route", "66", "’", "s", "end", "—", "santa", "monica"
    ]  # fmt: skip
    texts = {
        "a": "The U.S. capital is Washington, D.C.",
        "b": "Nothing here.",
        "c": "Route 66 ends in Santa Monica.",
        "d": "washingtonian food",  # not the token "washington"
    }
    answers = {"q1": ["Washington"], "q2": ["santa monica"], "q3": ["washington"], "q4": ["nowhere"]}
    run_ = {
        "q1": {"b": 0.9, "a": 0.8},  # the first query lists 2: every k is capped at 2
        "q2": {"b": 0.9, "d": 0.8, "c": 0.7},  # its answer at rank 3: beyond the cap
        "q3": {"d": 0.5, "a": 0.5},  # a tie: run order, so "a" is second
        "q4": {"a": 0.9, "c": 0.8},
    }
    assert evaluate_answers(answers, run_, texts, [1, 2, 3]) == {
        "qa_recall_at_1": 0.0,
        "qa_recall_at_2": 2 / 4,  # q1, q3
        "qa_recall_at_3": 2 / 4,  # q2's rank-3 answer never counts (FlagEmbedding's top_k_hits list is 2 long)
    }
    assert main_score({"qa_recall_at_20": 0.4, "qa_recall_at_100": 0.7}) == 0.7
    assert main_score({"qa_recall_at_5": 0.1, "qa_recall_at_20": 0.4}) == 0.4
    assert main_score({"ndcg_at_10": 0.3, "recall_at_100": 0.9}) == 0.3


def test_cli_evaluates_mkqa_by_answers(tiny_bert, tmp_path):
    cache = tmp_path / "cache"
    write_mkqa(cache / "datasets")
    out = tmp_path / "mkqa.json"
    result = run(
        "eval", "retrieval", "-m", str(tiny_bert), "-d", "mkqa/en", "--k", "1,2,4",
        "--cache-dir", str(cache), "-o", str(out),
    )  # fmt: skip
    report = json.loads(out.read_text())
    assert report["dataset"] == "mkqa/en" and report["split"] == "test"
    assert report["dataset_info"]["answers"] == 4 and report["dataset_info"]["queries"] == 3
    assert "mkqa/en (test)" in result.stdout and "| QA recall |" in result.stdout
    ranked: dict[str, list[str]] = {}
    for line in out.with_suffix(".trec").read_text().splitlines():
        query_id, _, doc_id, *_ = line.split()
        ranked.setdefault(query_id, []).append(doc_id)
    bearer = {"101": "doc0", "102": "doc1", "103": "doc3"}  # the only document holding each answer
    expected = {f"qa_recall_at_{k}": sum(ranked[q].index(d) < k for q, d in bearer.items()) / 3 for k in (1, 2, 4)}
    assert report["metrics"] == expected and report["main_score"] == expected["qa_recall_at_4"]
    assert expected["qa_recall_at_4"] == 1.0  # the whole corpus is listed: every answer is found


def test_bad_names_splits_and_offline_are_one_line(tmp_path, monkeypatch):
    monkeypatch.setenv("BGEKIT_CACHE", str(tmp_path / "cache"))
    assert is_dataset_name("mkqa/zh_tw")

    def error(*args: str) -> str:
        result = run("eval", "retrieval", "-m", "nobody/unknown", *args, check=False)
        lines = result.stderr.strip().splitlines()
        assert result.returncode == 2 and len(lines) == 1, result.stderr
        return lines[0]

    assert error("-d", "mkqa/zh").startswith(
        "error: mkqa has no language 'zh': mkqa/LANG names one, LANG one of en, ar, fi, ja,"
    )
    assert error("-d", "mkqa/en", "--split", "dev") == (
        "error: mkqa/en has no split 'dev'; its splits: test (FlagEmbedding evaluates mkqa on test: --split test)"
    )
    looked = tmp_path / "cache" / "datasets" / "mkqa" / "en"
    assert error("-d", "mkqa/en") == (
        f"error: dataset 'mkqa/en' (split test) is not in {looked}, and HF_HUB_OFFLINE is set: no download from "
        "https://huggingface.co/datasets/BeIR/nq/resolve/main/corpus.jsonl.gz; pass the dataset's folder "
        "(corpus.jsonl, test_queries.jsonl, test_qrels.jsonl: FlagEmbedding's layout) instead of its name"
    )
    write_mkqa(tmp_path / "cache" / "datasets")  # in place: training data from it is still refused, in one line
    out = str(tmp_path / "t.jsonl")
    train = run("data", "beir-to-train", "--dataset", "mkqa/en", "--split", "test", "-o", out, check=False)
    assert train.returncode == 2 and train.stderr.strip().splitlines() == [
        "error: mkqa/en (test) is judged by answer strings (MKQA), not by documents: it names no positive passages "
        "to train on"
    ]
