"""FlagEmbedding's named evaluation sets by name: ``miracl/LANG``, ``mldr/LANG``, ``msmarco-passage``.

No network here: each test writes a few documents and queries in exactly the layout of the files
FlagEmbedding 1.4.2's loaders read (the hub datasets ``miracl/miracl-corpus``, ``miracl/miracl``,
``Shitao/MLDR``, ``Tevatron/msmarco-passage-corpus``, ``BeIR/msmarco``, ``BeIR/msmarco-qrels``, and the
TREC DL files) where bgekit's download puts them (``<cache>/datasets/.downloads/REPO/PATH``), and checks
that the loaded corpus, queries and judgments are what FlagEmbedding's loader logic gives on the same
files (worked out by hand below: its ``f"{title} {text}".strip()``, its ``line.strip().split(...)``, its
dicts where a later judgment of a pair replaces an earlier one, MS MARCO's queries kept only when judged).
"""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest

from bgekit.errors import InputError
from bgekit.eval.datasets import is_dataset_name, load_retrieval_dataset, resolve_dataset

from .cli import run


def gz_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with gzip.open(path, "wt", encoding="utf-8") as handle:
        handle.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)


def text_file(path: Path, text: str, gzipped: bool = False) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if gzipped:
        with gzip.open(path, "wt", encoding="utf-8") as handle:
            handle.write(text)
    else:
        path.write_text(text, encoding="utf-8")


def write_mldr(root: Path, lang: str = "de") -> None:
    """``Shitao/MLDR``: ``mldr-v1.0-LANG/corpus.jsonl.gz`` and ``mldr-v1.0-LANG/SPLIT.jsonl.gz``."""
    hub = root / ".downloads" / "Shitao" / "MLDR" / f"mldr-v1.0-{lang}"
    gz_jsonl(hub / "corpus.jsonl.gz", [
        {"docid": "doc-de-0", "text": "Berlin ist die Hauptstadt Deutschlands.\n"},
        {"docid": "doc-de-1", "text": "  Der Rhein fließt in die Nordsee. "},
        {"docid": "doc-de-2", "text": "Die Zugspitze ist der höchste Berg."},
        {"docid": "doc-de-3", "text": "Hamburg hat einen großen Hafen."},
    ])  # fmt: skip
    gz_jsonl(hub / "test.jsonl.gz", [
        {"query_id": "q-de-0", "query": "Was ist die Hauptstadt? ",
         "positive_passages": [{"docid": "doc-de-0", "text": "..."}],
         "negative_passages": [{"docid": "doc-de-3", "text": "..."}]},
        {"query_id": "q-de-1", "query": "Wohin fließt der Rhein?",
         "positive_passages": [{"docid": "doc-de-1", "text": "..."}, {"docid": "doc-de-2", "text": "..."}],
         "negative_passages": [{"docid": "doc-de-2", "text": "..."}]},  # judged both: the later 0 stands
        {"query_id": "q-de-2", "query": "Welcher Berg ist am höchsten?",
         "positive_passages": [{"docid": "doc-de-2", "text": "..."}], "negative_passages": None},
    ])  # fmt: skip


MLDR_EXPECTED = {  # FlagEmbedding: corpus {"id", "text"} read back with title "" -> f" {text}".strip()
    "corpus_ids": ["doc-de-0", "doc-de-1", "doc-de-2", "doc-de-3"],
    "corpus_texts": [
        "Berlin ist die Hauptstadt Deutschlands.",
        "Der Rhein fließt in die Nordsee.",
        "Die Zugspitze ist der höchste Berg.",
        "Hamburg hat einen großen Hafen.",
    ],
    "queries": {
        "q-de-0": "Was ist die Hauptstadt? ",  # queries as they are
        "q-de-1": "Wohin fließt der Rhein?",
        "q-de-2": "Welcher Berg ist am höchsten?",
    },
    "qrels": {
        "q-de-0": {"doc-de-0": 1, "doc-de-3": 0},
        "q-de-1": {"doc-de-1": 1, "doc-de-2": 0},
        "q-de-2": {"doc-de-2": 1},
    },
}


def loaded(dataset) -> dict:
    return {
        "corpus_ids": dataset.corpus_ids,
        "corpus_texts": dataset.corpus_texts,
        "queries": dataset.queries,
        "qrels": dataset.qrels,
    }


def test_mldr_loads_as_flagembedding_and_converts_once(tmp_path, offline):
    root = tmp_path / "datasets"
    write_mldr(root)
    dataset = load_retrieval_dataset("mldr/de", "test", cache_dir=root)
    assert loaded(dataset) == MLDR_EXPECTED
    assert dataset.name == "mldr/de" and dataset.layout == "custom" and dataset.path == root / "mldr" / "de"
    files = sorted(p.name for p in (root / "mldr" / "de").iterdir())
    assert files == ["corpus.jsonl", "test_qrels.jsonl", "test_queries.jsonl"]  # FlagEmbedding's local layout
    assert not list((root / ".downloads").rglob("*.gz"))  # the fetched files are gone once converted
    stamps = {p.name: p.stat().st_mtime_ns for p in (root / "mldr" / "de").iterdir()}
    again = load_retrieval_dataset("MLDR/de/", "test", cache_dir=root)  # nothing to fetch or convert
    assert loaded(again) == MLDR_EXPECTED
    assert {p.name: p.stat().st_mtime_ns for p in (root / "mldr" / "de").iterdir()} == stamps
    # another split is fetched the first time it is named; the corpus is not converted again
    gz_jsonl(root / ".downloads" / "Shitao" / "MLDR" / "mldr-v1.0-de" / "dev.jsonl.gz", [
        {"query_id": "q-de-9", "query": "Hafen?", "positive_passages": [{"docid": "doc-de-3", "text": ""}]},
    ])  # fmt: skip
    dev = load_retrieval_dataset("mldr/de", "dev", cache_dir=root)
    assert dev.queries == {"q-de-9": "Hafen?"} and dev.qrels == {"q-de-9": {"doc-de-3": 1}}
    assert (root / "mldr" / "de" / "corpus.jsonl").stat().st_mtime_ns == stamps["corpus.jsonl"]


def test_miracl_loads_as_flagembedding(tmp_path, offline):
    """``miracl/miracl-corpus`` shards in order (docs-0, docs-1), topics and qrels TSVs of ``miracl/miracl``."""
    root = tmp_path / "datasets"
    corpus = root / ".downloads" / "miracl" / "miracl-corpus" / "miracl-corpus-v1.0-te"
    gz_jsonl(corpus / "docs-0.jsonl.gz", [
        {"docid": "7#0", "title": "హైదరాబాద్", "text": "హైదరాబాద్ తెలంగాణ రాజధాని."},
        {"docid": "7#1", "title": "హైదరాబాద్", "text": " చార్మినార్ ప్రసిద్ధి. "},
    ])  # fmt: skip
    gz_jsonl(corpus / "docs-1.jsonl.gz", [{"docid": "9#0", "title": "", "text": "  గోదావరి నది. "}])
    topics = root / ".downloads" / "miracl" / "miracl" / "miracl-v1.0-te"
    text_file(topics / "topics" / "topics.miracl-v1.0-te-dev.tsv", "1\tరాజధాని ఏది?\n2\t నది ఏది? \n3\tజవాబు లేని ప్రశ్న\n")
    text_file(
        topics / "qrels" / "qrels.miracl-v1.0-te-dev.tsv",
        "1\tQ0\t7#0\t1\n1\tQ0\t7#1\t0\n2\tQ0\t9#0\t1\n2\tQ0\t7#0\t0\n",
    )
    dataset = load_retrieval_dataset("miracl/te", "dev", cache_dir=root)
    assert loaded(dataset) == {
        "corpus_ids": ["7#0", "7#1", "9#0"],
        "corpus_texts": [  # f"{title} {text}".strip()
            "హైదరాబాద్ హైదరాబాద్ తెలంగాణ రాజధాని.",
            "హైదరాబాద్  చార్మినార్ ప్రసిద్ధి.",
            "గోదావరి నది.",
        ],
        "queries": {"1": "రాజధాని ఏది?", "2": " నది ఏది?"},  # the line stripped, then split at the tab
        "qrels": {"1": {"7#0": 1, "7#1": 0}, "2": {"9#0": 1, "7#0": 0}},
    }
    assert dataset.name == "miracl/te"


def test_msmarco_passage_dev_and_trec_dl(tmp_path, offline):
    root = tmp_path / "datasets"
    downloads = root / ".downloads"
    gz_jsonl(downloads / "Tevatron" / "msmarco-passage-corpus" / "corpus.jsonl.gz", [
        {"docid": "0", "title": "-", "text": "The Manhattan Project was a research effort."},
        {"docid": "1", "title": "", "text": "Photosynthesis turns light into chemical energy. "},
        {"docid": "2", "title": "Coffee", "text": "Coffee is brewed from roasted beans."},
    ])  # fmt: skip
    gz_jsonl(downloads / "BeIR" / "msmarco" / "queries.jsonl.gz", [
        {"_id": "1048578", "text": "what was the manhattan project", "metadata": {}},
        {"_id": "5", "text": "a training query nobody judged in dev", "metadata": {}},
        {"_id": "30", "text": "how is coffee made", "metadata": {}},
    ])  # fmt: skip
    text_file(downloads / "BeIR" / "msmarco-qrels" / "dev.tsv", "query-id\tcorpus-id\tscore\n1048578\t0\t1\n30\t2\t1\n")
    dev = load_retrieval_dataset("msmarco-passage", "dev", cache_dir=root)
    assert loaded(dev) == {
        "corpus_ids": ["0", "1", "2"],
        "corpus_texts": [
            "- The Manhattan Project was a research effort.",
            "Photosynthesis turns light into chemical energy.",
            "Coffee Coffee is brewed from roasted beans.",
        ],
        "queries": {"1048578": "what was the manhattan project", "30": "how is coffee made"},
        "qrels": {"1048578": {"0": 1}, "30": {"2": 1}},
    }
    assert dev.name == "msmarco-passage"
    queries = [json.loads(line) for line in (root / "msmarco-passage" / "dev_queries.jsonl").read_text().splitlines()]
    assert [q["id"] for q in queries] == ["1048578", "30"]  # only the judged queries are kept, as FlagEmbedding

    marco = downloads / "msmarco.z22.web.core.windows.net" / "msmarcoranking"
    text_file(marco / "msmarco-test2019-queries.tsv.gz", "1037798\twho is robert gray\n104861\tcost of coffee \n",
              gzipped=True)  # fmt: skip
    text_file(downloads / "trec.nist.gov" / "data" / "deep" / "2019qrels-pass.txt",
              "104861 0 2 3\n104861 0 1 0\n104861 0 0 1\n")  # fmt: skip
    dl19 = load_retrieval_dataset("msmarco/passage", "dl19", cache_dir=root)  # FlagEmbedding's eval/dataset name
    assert dl19.queries == {"104861": "cost of coffee"} and dl19.qrels == {"104861": {"2": 3, "1": 0, "0": 1}}
    assert dl19.corpus_ids == ["0", "1", "2"]


def test_cli_evaluates_mldr_by_name(tiny_bert, tmp_path):
    """``bgekit eval retrieval -d mldr/de``: run() is offline (HF_HUB_OFFLINE=1), the files are in place."""
    cache = tmp_path / "cache"
    write_mldr(cache / "datasets")
    out = tmp_path / "mldr.json"
    result = run(
        "eval", "retrieval", "-m", str(tiny_bert), "-d", "mldr/de", "--split", "test", "--k", "1,3",
        "--cache-dir", str(cache), "-o", str(out),
    )  # fmt: skip
    report = json.loads(out.read_text())
    assert report["dataset"] == "mldr/de" and report["split"] == "test"
    assert report["dataset_info"]["documents"] == 4 and report["dataset_info"]["queries"] == 3
    assert "mldr/de (test)" in result.stdout


def test_unknown_language_missing_split_and_offline_are_one_line(tmp_path, monkeypatch):
    monkeypatch.setenv("BGEKIT_CACHE", str(tmp_path / "cache"))
    unknown = run("eval", "retrieval", "-m", "nobody/unknown", "-d", "mldr/xx", "--split", "test", check=False)
    lines = unknown.stderr.strip().splitlines()
    assert unknown.returncode == 2 and lines == [
        "error: mldr has no language 'xx': mldr/LANG names one, LANG one of ar, de, en, es, fr, hi, it, ja, ko, pt, "
        "ru, th, zh"
    ]
    bare = run("eval", "retrieval", "-m", "nobody/unknown", "-d", "miracl", check=False).stderr.strip().splitlines()
    assert len(bare) == 1 and bare[0].startswith("error: miracl is 18 datasets, one a language: miracl/LANG names")
    split = run("eval", "retrieval", "-m", "nobody/unknown", "-d", "miracl/de", check=False)  # --split test
    assert split.stderr.strip().splitlines() == [
        "error: miracl/de has no split 'test'; its splits: dev (FlagEmbedding evaluates miracl on dev: --split dev)"
    ]
    offline = run("eval", "retrieval", "-m", "nobody/unknown", "-d", "mldr/de", "--split", "test", check=False)
    lines = offline.stderr.strip().splitlines()
    looked = tmp_path / "cache" / "datasets" / "mldr" / "de"
    assert offline.returncode == 2 and len(lines) == 1, offline.stderr
    assert lines[0] == (
        f"error: dataset 'mldr/de' (split test) is not in {looked}, and HF_HUB_OFFLINE is set: no download from "
        "https://huggingface.co/datasets/Shitao/MLDR/resolve/main/mldr-v1.0-de/corpus.jsonl.gz; pass the "
        "dataset's folder (corpus.jsonl, test_queries.jsonl, test_qrels.jsonl: FlagEmbedding's layout) instead "
        "of its name"
    )
    assert not looked.exists()
    document = run("eval", "retrieval", "-m", "nobody/unknown", "-d", "msmarco/document", check=False)
    assert document.returncode == 2 and "msmarco-passage" in document.stderr


def test_names_are_dataset_names_and_a_folder_wins(tmp_path, monkeypatch, offline):
    assert all(is_dataset_name(n) for n in ("miracl/ar", "mldr/en", "msmarco-passage", "msmarco/passage"))
    monkeypatch.chdir(tmp_path)
    (tmp_path / "mldr" / "de").mkdir(parents=True)  # a folder of that name here is that folder
    assert resolve_dataset("mldr/de") == Path("mldr/de")
    with pytest.raises(InputError, match=r"msmarco-passage has no split 'test'; its splits: dev, dl19, dl20"):
        resolve_dataset("msmarco-passage", cache_dir=tmp_path, split="test")


def test_mine_corpus_takes_the_name_and_converts_the_corpus_only(tmp_path, offline):
    """``bgekit mine --corpus mldr/de`` resolves without a split: the corpus alone is converted."""
    root = tmp_path / "datasets"
    write_mldr(root)
    folder = resolve_dataset("mldr/de", cache_dir=root)
    assert sorted(p.name for p in folder.iterdir()) == ["corpus.jsonl"]
    assert (root / ".downloads" / "Shitao" / "MLDR" / "mldr-v1.0-de" / "test.jsonl.gz").exists()  # not yet needed


def test_beir_to_train_and_mine_take_the_names(tiny_bert, tmp_path, monkeypatch):
    """``data beir-to-train --dataset mldr/de`` and ``mine --corpus mldr/de`` resolve the name as ``eval`` does;
    MLDR's negatives (judged 0) are not positives."""
    monkeypatch.setenv("BGEKIT_CACHE", str(tmp_path / "cache"))
    write_mldr(tmp_path / "cache" / "datasets")
    out = tmp_path / "train.jsonl"
    run("data", "beir-to-train", "--dataset", "mldr/de", "--split", "test", "-o", str(out))
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(r["query"], r["pos"]) for r in records] == [
        ("Was ist die Hauptstadt? ", ["Berlin ist die Hauptstadt Deutschlands."]),
        ("Wohin fließt der Rhein?", ["Der Rhein fließt in die Nordsee."]),
        ("Welcher Berg ist am höchsten?", ["Die Zugspitze ist der höchste Berg."]),
    ]
    mined = tmp_path / "mined.jsonl"
    run("mine", "-m", str(tiny_bert), "-i", str(out), "--corpus", "mldr/de", "-o", str(mined),
        "--range-for-sampling", "0-4", "--negative-number", "1", "--margin", "0")  # fmt: skip
    negatives = {n for line in mined.read_text().splitlines() for n in json.loads(line)["neg"]}
    assert negatives and negatives <= set(MLDR_EXPECTED["corpus_texts"])  # mined among MLDR's documents


def test_a_remote_file_is_fetched_whole_or_not_at_all(tmp_path):
    """The non-hub fetch (MS MARCO's and NIST's files): the file lands where ``Remote.local`` says, and a
    failed fetch is one InputError that leaves no partial file behind."""
    from bgekit.eval import named

    source = tmp_path / "queries.tsv"
    source.write_text("1\twhat is a test\n")
    root = tmp_path / "datasets"
    remote = named.Remote(None, source.as_uri())
    named._download(remote, root, "could not fetch it", "pass a folder")
    assert remote.local(root).read_text() == "1\twhat is a test\n"
    missing = named.Remote(None, (tmp_path / "gone.tsv").as_uri())
    with pytest.raises(InputError, match=r"^could not fetch it \(.*\); pass a folder$"):
        named._download(missing, root, "could not fetch it", "pass a folder")
    assert sorted(p.name for p in remote.local(root).parent.iterdir()) == ["queries.tsv"]
