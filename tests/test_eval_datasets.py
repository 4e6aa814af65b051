"""Evaluation datasets: the BEIR and custom layouts, STS files, and check 6 (bad input gives clear errors).

Everything reads real files: the committed fixture (examples/data, cut from SciFact and STSBenchmark
by benchmarks/cut_fixtures.py) and small folders written here.
"""

from __future__ import annotations

import gzip
import json
import logging
import zipfile
from pathlib import Path

import pytest

from bgekit.errors import DataFormatError, InputError
from bgekit.eval.datasets import download_beir, load_retrieval_dataset, load_sts

ROOT = Path(__file__).resolve().parents[1]
MINI = ROOT / "examples" / "data" / "scifact-mini"
STS_MINI = ROOT / "examples" / "data" / "stsb-test-mini.tsv"


def write_beir(folder: Path, corpus: list, queries: list, qrels: str, split: str = "test") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "corpus.jsonl").write_text("".join(c if isinstance(c, str) else json.dumps(c) + "\n" for c in corpus))
    (folder / "queries.jsonl").write_text("".join(q if isinstance(q, str) else json.dumps(q) + "\n" for q in queries))
    (folder / "qrels").mkdir(exist_ok=True)
    (folder / "qrels" / f"{split}.tsv").write_text(qrels)
    return folder


DOCS = [
    {"_id": "d1", "title": "Pandas", "text": "The giant panda eats bamboo."},
    {"_id": "d2", "title": "", "text": "Paris is the capital of France."},
    {"_id": "d3", "text": "Dense retrieval ranks passages by vector similarity."},
]
QUERIES = [{"_id": "q1", "text": "what do pandas eat?"}, {"_id": "q2", "text": "capital of france"}]
QRELS = "query-id\tcorpus-id\tscore\nq1\td1\t1\nq2\td2\t2\n"


def test_fixture_loads_in_the_beir_layout():
    dataset = load_retrieval_dataset(MINI, "test")
    assert dataset.layout == "beir"
    assert (len(dataset.corpus_ids), len(dataset.queries), dataset.n_judgments) == (157, 40, 50)
    assert dataset.problems == {"qrels_unknown_queries": 0, "qrels_unknown_documents": 0}
    first = json.loads((MINI / "corpus.jsonl").read_text().splitlines()[0])
    assert dataset.corpus_texts[0] == (first["title"] + " " + first["text"]).strip()
    assert all(set(docs.values()) == {1} for docs in dataset.qrels.values())


def test_title_joined_like_mteb_and_only_judged_queries_kept(tmp_path):
    folder = write_beir(tmp_path / "ds", DOCS, [*QUERIES, {"_id": "q3", "text": "not judged"}], QRELS)
    dataset = load_retrieval_dataset(folder)
    assert dataset.corpus_texts == [
        "Pandas The giant panda eats bamboo.",
        "Paris is the capital of France.",
        "Dense retrieval ranks passages by vector similarity.",
    ]
    assert dataset.queries == {"q1": "what do pandas eat?", "q2": "capital of france"}
    assert dataset.qrels == {"q1": {"d1": 1}, "q2": {"d2": 2}}
    # a header after leading blank lines is still the header
    (folder / "qrels" / "test.tsv").write_text("\n\n" + QRELS)
    assert load_retrieval_dataset(folder).qrels == {"q1": {"d1": 1}, "q2": {"d2": 2}}


def test_gzipped_corpus_and_trec_qrels(tmp_path):
    folder = write_beir(tmp_path / "ds", [], QUERIES, "q1 0 d1 1\nq2 0 d2 1\n")
    (folder / "corpus.jsonl").unlink()
    with gzip.open(folder / "corpus.jsonl.gz", "wt") as handle:
        handle.writelines(json.dumps(d) + "\n" for d in DOCS)
    dataset = load_retrieval_dataset(folder)
    assert dataset.corpus_ids == ["d1", "d2", "d3"] and dataset.qrels == {"q1": {"d1": 1}, "q2": {"d2": 1}}


def test_custom_layout(tmp_path):
    folder = tmp_path / "custom"
    folder.mkdir()
    (folder / "corpus.jsonl").write_text("".join(json.dumps({"id": d["_id"], "text": d["text"]}) + "\n" for d in DOCS))
    (folder / "dev_queries.jsonl").write_text(json.dumps({"id": "q1", "text": "panda food"}) + "\n")
    (folder / "dev_qrels.jsonl").write_text(json.dumps({"qid": "q1", "docid": "d1", "relevance": 1}) + "\n")
    dataset = load_retrieval_dataset(folder, "dev")
    assert dataset.layout == "custom"
    assert dataset.queries == {"q1": "panda food"} and dataset.qrels == {"q1": {"d1": 1}}
    for name in ("dev_queries.jsonl", "dev_qrels.jsonl"):  # gzipped, the layout is still known
        with gzip.open(folder / f"{name}.gz", "wt") as handle:
            handle.write((folder / name).read_text())
        (folder / name).unlink()
    assert load_retrieval_dataset(folder, "dev").qrels == {"q1": {"d1": 1}}
    with pytest.raises(InputError, match=r"splits found: dev"):
        load_retrieval_dataset(folder, "test")


def test_beir_zip_download_code_path(tmp_path):
    """The online loader's real code, fed a local zip through a file:// URL (no network here)."""
    source = write_beir(tmp_path / "src" / "tiny", DOCS, QUERIES, QRELS)
    archive = tmp_path / "tiny.zip"
    with zipfile.ZipFile(archive, "w") as bundle:
        for path in source.rglob("*"):
            bundle.write(path, path.relative_to(source.parent))
    folder = download_beir("tiny", cache_dir=tmp_path / "cache", url=archive.as_uri())
    assert folder == tmp_path / "cache" / "tiny"
    assert load_retrieval_dataset(folder).qrels == {"q1": {"d1": 1}, "q2": {"d2": 2}}
    assert download_beir("tiny", cache_dir=tmp_path / "cache", url="file:///nowhere.zip") == folder  # cached
    with pytest.raises(InputError, match=r"BEIR dataset 'other' is not in .*cache/other and could not be downlo"):
        download_beir("other", cache_dir=tmp_path / "cache", url=(tmp_path / "missing.zip").as_uri())


# -- check 6: bad input -------------------------------------------------------------------------
def test_qrels_naming_unknown_documents_and_queries_warn_and_count(tmp_path, caplog):
    qrels = QRELS + "q1\tghost-doc\t1\nq9\td3\t1\nq9\td1\t1\n"
    folder = write_beir(tmp_path / "ds", DOCS, QUERIES, qrels)
    with caplog.at_level(logging.WARNING, logger="bgekit.eval.datasets"):
        dataset = load_retrieval_dataset(folder)
    assert dataset.problems == {"qrels_unknown_queries": 1, "qrels_unknown_documents": 1}
    messages = " ".join(r.getMessage() for r in caplog.records)
    assert "1 judged query id(s) are not in the queries file (e.g. 'q9')" in messages
    assert "1 judged document id(s) are not in the corpus (e.g. 'ghost-doc')" in messages
    assert "q9" not in dataset.queries and "q9" not in dataset.qrels
    assert dataset.qrels["q1"] == {"d1": 1, "ghost-doc": 1}  # still relevant, as trec_eval counts it


def test_cqadupstack_forums_are_datasets_of_their_own(tmp_path):
    """BEIR's cqadupstack zip holds one folder a forum: ``cqadupstack/android`` loads that forum."""
    source = tmp_path / "src" / "cqadupstack"
    write_beir(source / "android", DOCS, QUERIES, QRELS)
    write_beir(source / "gis", DOCS[:1], QUERIES[:1], "q1\td1\t1\n")
    archive = tmp_path / "cqadupstack.zip"
    with zipfile.ZipFile(archive, "w") as bundle:
        for path in source.rglob("*"):
            bundle.write(path, path.relative_to(source.parent))
    cache = tmp_path / "cache"
    folder = download_beir("cqadupstack", cache_dir=cache, url=archive.as_uri())
    assert sorted(p.name for p in folder.iterdir()) == ["android", "gis"]
    assert download_beir("cqadupstack", cache_dir=cache, url="file:///nowhere.zip") == folder  # cached
    android = load_retrieval_dataset("cqadupstack/android", cache_dir=cache)
    assert android.name == "android" and android.qrels == {"q1": {"d1": 1}, "q2": {"d2": 2}}
    assert load_retrieval_dataset("CQADupStack/gis", cache_dir=cache).corpus_ids == ["d1"]
    # one dataset: a forum; the whole archive is for evaluate_retrieval (tests/test_eval_cqadupstack.py)
    with pytest.raises(InputError, match=r"cqadupstack is 12 datasets, one a forum: load one as cqadupstack/FORUM"):
        load_retrieval_dataset("cqadupstack", cache_dir=cache)
    with pytest.raises(InputError, match=r"holds 2 datasets, not one \(android, gis\); pass one of their folders; eva"):
        load_retrieval_dataset(folder)


@pytest.mark.parametrize(
    ("corpus", "queries", "qrels", "error", "message"),
    [
        ([], QUERIES, QRELS, InputError, r"corpus\.jsonl holds no documents: the corpus is empty"),
        ([*DOCS, {"_id": "d2", "text": "again"}], QUERIES, QRELS, DataFormatError,
         r"corpus\.jsonl, line 4: duplicate document id 'd2' \(first on line 2\)"),
        (DOCS, [*QUERIES, {"_id": "q1", "text": "again"}], QRELS, DataFormatError,
         r"queries\.jsonl, line 3: duplicate query id 'q1' \(first on line 1\)"),
        ([json.dumps(DOCS[0]) + "\n", '{"_id": "d2", "text": broken\n'], QUERIES, QRELS, DataFormatError,
         r"corpus\.jsonl, line 2: not valid JSON"),
        ([{"_id": "d1", "body": "no text"}], QUERIES, QRELS, DataFormatError,
         r"corpus\.jsonl, line 1: missing the 'text' field"),
        ([{"text": "no id"}], QUERIES, QRELS, DataFormatError, r"corpus\.jsonl, line 1: missing the id field"),
        (DOCS, [{"_id": "q1"}], QRELS, DataFormatError, r"queries\.jsonl, line 1: a query needs a string 'text'"),
        (DOCS, QUERIES, "query-id\tcorpus-id\tscore\nq1\td1\t1\nq2\td2\n", DataFormatError,
         r"test\.tsv, line 3: expected 3 tab-separated columns"),
        (DOCS, QUERIES, "query-id\tcorpus-id\tscore\nq1\td1\thigh\n", DataFormatError,
         r"test\.tsv, line 2: relevance 'high' is not a number"),
        (DOCS, QUERIES, "q1\td1\t1\nq1\td1\t0\n", DataFormatError,
         r"test\.tsv, line 2: \('q1', 'd1'\) is judged 0 here but 1 on line 1"),
        (DOCS, QUERIES, "query-id\tcorpus-id\tscore\n", InputError, r"test\.tsv holds no judgments"),
        (DOCS, QUERIES, "query-id\tcorpus-id\tscore\nq1\td1\t1\nquery-id\tcorpus-id\tscore\nq2\td2\t1\n",
         DataFormatError, r"test\.tsv, line 3: a header line after the first judgments \(two qrels files joined"),
        (DOCS, QUERIES, "x\td1\t1\n", InputError,
         r"none of the 1 queries judged in .*test\.tsv is in the queries file"),
    ],
)  # fmt: skip
def test_bad_dataset_files_raise_clear_errors(tmp_path, corpus, queries, qrels, error, message):
    folder = write_beir(tmp_path / "ds", corpus, queries, qrels)
    with pytest.raises(error, match=message):
        load_retrieval_dataset(folder)


@pytest.mark.parametrize(
    ("remove", "message"),
    [
        ("corpus.jsonl", r"ds is missing corpus\.jsonl; a retrieval dataset needs corpus\.jsonl, queries\.jsonl"),
        ("queries.jsonl", r"ds is missing queries\.jsonl"),
        ("qrels/test.tsv", r"ds is missing qrels/test\.tsv"),
    ],
)
def test_a_dataset_folder_missing_a_file(tmp_path, remove, message):
    folder = write_beir(tmp_path / "ds", DOCS, QUERIES, QRELS)
    (folder / remove).unlink()
    with pytest.raises(InputError, match=message):
        load_retrieval_dataset(folder)


def test_a_missing_split_names_the_splits_there(tmp_path):
    folder = write_beir(tmp_path / "ds", DOCS, QUERIES, QRELS, split="train")
    with pytest.raises(InputError, match=r"missing qrels/test\.tsv \(splits found: train\)"):
        load_retrieval_dataset(folder, "test")


def test_unknown_dataset_name_offline():
    with pytest.raises(InputError, match="is not a folder here, a BEIR dataset name"):
        load_retrieval_dataset("no-such-dataset-anywhere")


# -- STS ------------------------------------------------------------------------------------------
def test_sts_fixture_and_unbalanced_quotes(tmp_path):
    data = load_sts(STS_MINI)
    assert len(data) == 197 and data.sentences1[0] == "A girl is styling her hair."
    path = tmp_path / "quotes.tsv"
    path.write_text('sentence1\tsentence2\tscore\n"Hello there.\tHi" she said.\t3.5\nplain\tplain too \t1\n')
    data = load_sts(path)
    assert data.sentences1 == ['"Hello there.', "plain"]
    assert data.sentences2 == ['Hi" she said.', "plain too "]  # kept verbatim, trailing space too
    assert data.scores == [3.5, 1.0]


def test_sts_columns_by_header_name(tmp_path):
    path = tmp_path / "named.tsv"
    path.write_text("score\tsentence2\tsentence1\n4.0\tb\ta\n")
    data = load_sts(path)
    assert (data.sentences1, data.sentences2, data.scores) == (["a"], ["b"], [4.0])


@pytest.mark.parametrize(
    ("content", "error", "message"),
    [
        ("sentence1\tsentence2\tscore\na\tb\t1\nonly two\tcolumns\n", DataFormatError,
         r"bad\.tsv, line 3: expected 3 tab-separated columns"),
        ("sentence1\tsentence2\tscore\na\tb\tfive\n", DataFormatError,
         r"bad\.tsv, line 2: score 'five' is not a number"),
        ("sentence1\tsentence2\tscore\na\tb\t1\na cat\ta dog\tNaN\n", DataFormatError,
         r"bad\.tsv, line 3: score 'NaN' is not a finite number"),
        ("sentence1\tsentence2\tscore\n", InputError, r"bad\.tsv holds no sentence pairs"),
        # the only row, with a bad score: it was taken for a header (other names) and the file said "no pairs"
        ("a cat\ta dog\tfive\n", DataFormatError, r"bad\.tsv, line 1: score 'five' is not a number \(the only line"),
        ("\n\nA man plays.\tA man is playing.\t4,5\n", DataFormatError, r"bad\.tsv, line 3: score '4,5' is not a numb"),
    ],
)  # fmt: skip
def test_bad_sts_files(tmp_path, content, error, message):
    path = tmp_path / "bad.tsv"
    path.write_text(content)
    with pytest.raises(error, match=message):
        load_sts(path)


def test_sts_missing_file(tmp_path):
    with pytest.raises(InputError, match="does not exist"):
        load_sts(tmp_path / "nope.tsv")


def test_shared_scifact_matches_its_provenance():
    from .conftest import require_shared

    folder = require_shared("data", "scifact")
    dataset = load_retrieval_dataset(folder, "test")
    assert (len(dataset.corpus_ids), len(dataset.queries), dataset.n_judgments) == (5183, 300, 339)
    assert sum(len(t) for t in dataset.corpus_texts) == 7_771_451  # MTEB's descriptive statistics
    train = load_retrieval_dataset(folder, "train")
    assert (len(train.queries), train.n_judgments) == (809, 919)


def test_a_mistyped_local_folder_is_not_sent_to_the_hub(tmp_path, monkeypatch):
    """`data/scifactt` has a hub id's shape; under an existing `data/` it is a typo, not a download."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data").mkdir()
    with pytest.raises(InputError, match="'data/scifactt' is not a folder here"):
        load_retrieval_dataset("data/scifactt")
