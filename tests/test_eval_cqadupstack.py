"""CQADupStack as a whole: BEIR's ``cqadupstack`` folder (twelve forum folders, each its own corpus)
evaluates every forum in its own corpus and reports the mean over the forums as the dataset's score,
as BEIR and MTEB publish it; it was refused as "holds 12 datasets, not one".

The forums are real BEIR folders written here from the committed SciFact fixture: each forum gets
every twelfth query, the documents judged for them and some others, so each forum scores differently.
"""

from __future__ import annotations

import json
import logging
import statistics
from pathlib import Path

import pytest

from bgekit.errors import InputError
from bgekit.eval.datasets import CQADUPSTACK_FORUMS, load_retrieval_dataset
from bgekit.eval.retrieval import RetrievalResult, evaluate_retrieval

from .cli import run
from .test_eval_retrieval import ForwardCounter

ROOT = Path(__file__).resolve().parents[1]
MINI = ROOT / "examples" / "data" / "scifact-mini"


def write_forums(root: Path, forums=CQADUPSTACK_FORUMS) -> Path:
    """BEIR's cqadupstack layout under ``root``: one BEIR dataset folder a forum."""
    docs = {}
    for line in (MINI / "corpus.jsonl").read_text().splitlines():
        doc = json.loads(line)
        docs[doc["_id"]] = doc
    queries = [json.loads(line) for line in (MINI / "queries.jsonl").read_text().splitlines()]
    judged: dict[str, list[str]] = {}
    for line in (MINI / "qrels" / "test.tsv").read_text().splitlines()[1:]:
        query_id, doc_id, _ = line.split("\t")
        judged.setdefault(query_id, []).append(doc_id)
    queries = [q for q in queries if q["_id"] in judged]
    unjudged = [d for d in docs if not any(d in ids for ids in judged.values())]
    for number, forum in enumerate(forums):
        mine = queries[number :: len(forums)]
        ids = [d for q in mine for d in judged[q["_id"]]] + unjudged[number :: len(forums)]
        folder = root / forum
        (folder / "qrels").mkdir(parents=True)
        (folder / "corpus.jsonl").write_text("".join(json.dumps(docs[d]) + "\n" for d in dict.fromkeys(ids)))
        (folder / "queries.jsonl").write_text("".join(json.dumps(q) + "\n" for q in mine))
        lines = [f"{q['_id']}\t{d}\t1\n" for q in mine for d in judged[q["_id"]]]
        (folder / "qrels" / "test.tsv").write_text("query-id\tcorpus-id\tscore\n" + "".join(lines))
    return root


@pytest.fixture(scope="module")
def tiny(tiny_bert):
    from bgekit import Embedder

    return Embedder.from_pretrained(str(tiny_bert), devices="cpu")


@pytest.fixture(scope="module")
def cqadupstack(tmp_path_factory) -> Path:
    return write_forums(tmp_path_factory.mktemp("beir") / "cqadupstack")


def test_the_whole_archive_is_the_mean_of_its_forums(tiny, cqadupstack, tmp_path):
    result = evaluate_retrieval(tiny, cqadupstack, cache_dir=tmp_path / "cache", output=tmp_path / "cqa.json")
    assert result.forums == list(CQADUPSTACK_FORUMS) and result.missing_forums == []
    for key, value in result.metrics.items():  # every metric is the plain mean of the twelve forums'
        assert value == pytest.approx(statistics.fmean(r.metrics[key] for r in result.per_forum.values()), abs=1e-12)
    assert len({r.metrics["ndcg_at_10"] for r in result.per_forum.values()}) > 1  # a mean of differing scores
    # each forum is searched in its own corpus alone: as that forum evaluated on its own
    alone = evaluate_retrieval(tiny, cqadupstack / "gis", use_cache=False)
    assert isinstance(alone, RetrievalResult) and result.per_forum["gis"].metrics == alone.metrics
    assert result.per_forum["gis"].dataset["documents"] == len(load_retrieval_dataset(cqadupstack / "gis").corpus_ids)

    report = json.loads((tmp_path / "cqa.json").read_text())
    assert report["dataset"] == "cqadupstack" and report["aggregate"]["method"] == "mean"
    assert report["aggregate"]["over"] == list(CQADUPSTACK_FORUMS) and report["aggregate"]["missing"] == []
    assert report["metrics"] == pytest.approx(result.metrics) and report["main_score"] == result.metrics["ndcg_at_10"]
    assert sorted(report["per_forum"]) == sorted(CQADUPSTACK_FORUMS)
    assert report["per_forum"]["gis"]["metrics"] == pytest.approx(alone.metrics)
    assert report["dataset_info"]["queries"] == 40  # every fixture query, each in one forum
    for forum in CQADUPSTACK_FORUMS:  # ids are a forum's own: one run file a forum
        assert (tmp_path / f"cqa.{forum}.trec").exists()
    markdown = (tmp_path / "cqa.md").read_text()
    assert "mean over 12 forums" in markdown and "Mean over the 12 forums (the dataset's score):" in markdown
    assert f"| **mean** |  |  | {result.metrics['ndcg_at_1']:.5f} |" in markdown


def test_each_forum_has_its_own_corpus_cache_entry(tiny, cqadupstack, tmp_path):
    counter = ForwardCounter(tiny.model)
    try:
        first = evaluate_retrieval(tiny, cqadupstack, cache_dir=tmp_path)
        counter.rows = 0
        second = evaluate_retrieval(tiny, cqadupstack, cache_dir=tmp_path)
    finally:
        counter.close()
    assert first.cache == {"forums_by_status": {"miss": 12}} and second.cache == {"forums_by_status": {"hit": 12}}
    assert counter.rows == 40, "the second run embeds the queries only"
    assert len({r.cache["path"] for r in first.per_forum.values()}) == 12
    assert second.metrics == first.metrics


def test_a_reranked_archive_averages_both_stages(tiny, tiny_bert_reranker, tmp_path):
    folder = write_forums(tmp_path / "cqadupstack", ("android", "gis"))
    result = evaluate_retrieval(tiny, folder, reranker=str(tiny_bert_reranker), rerank_top_k=5, use_cache=False)
    for stage in ("metrics", "retrieval_metrics"):
        mean = statistics.fmean(getattr(r, stage)["ndcg_at_10"] for r in result.per_forum.values())
        assert getattr(result, stage)["ndcg_at_10"] == pytest.approx(mean)
    assert result.metrics != result.retrieval_metrics


def test_some_forums_are_averaged_with_a_warning(tiny, tmp_path, caplog, monkeypatch):
    folder = write_forums(tmp_path / "cqadupstack", ("android", "gis", "tex"))
    with caplog.at_level(logging.WARNING, logger="bgekit.eval.averaged"):
        result = evaluate_retrieval(tiny, folder, use_cache=False)
    assert result.forums == ["android", "gis", "tex"] and len(result.missing_forums) == 9
    assert "holds 3 of the 12 CQADupStack forums" in caplog.text and "not comparable" in caplog.text
    assert "Missing forums: english, gaming" in result.to_markdown()
    monkeypatch.chdir(folder)
    here = evaluate_retrieval(tiny, ".", use_cache=False)
    assert here.name == "cqadupstack" and here.metrics == result.metrics


def test_a_forum_without_the_split_is_named_before_any_is_embedded(tmp_path):
    folder = write_forums(tmp_path / "cqadupstack", ("android", "gis"))
    (folder / "gis" / "qrels" / "test.tsv").rename(folder / "gis" / "qrels" / "dev.tsv")
    with pytest.raises(InputError, match=r"forum .*gis has no judgments for split 'test' \(splits found: dev\)"):
        evaluate_retrieval("no/such-model", folder)  # the model is not even loaded


def test_a_forum_without_its_queries_is_named_before_any_is_embedded(tmp_path):
    """A forum folder missing queries.jsonl was found only when its turn came, after the forums before it
    were embedded; every forum's files are now checked before the model loads."""
    folder = write_forums(tmp_path / "cqadupstack", ("android", "gis"))
    (folder / "gis" / "queries.jsonl").unlink()
    with pytest.raises(InputError, match=r"dataset folder .*gis is missing queries\.jsonl"):
        evaluate_retrieval("no/such-model", folder)  # the model is not even loaded


def test_the_name_cqadupstack_is_the_downloaded_archive(tiny, tmp_path):
    """Online, ``cqadupstack`` is BEIR's archive (downloaded once into the cache): all its forums."""
    write_forums(tmp_path / "cache" / "datasets" / "cqadupstack", ("android", "gis"))
    result = evaluate_retrieval(tiny, "cqadupstack", cache_dir=tmp_path / "cache")
    assert result.forums == ["android", "gis"] and result.name == "cqadupstack"
    one = evaluate_retrieval(tiny, "cqadupstack/gis", cache_dir=tmp_path / "cache")
    assert one.cache["status"] == "hit" and one.metrics == result.per_forum["gis"].metrics


def test_loading_the_archive_as_one_dataset_names_both_ways(cqadupstack):
    with pytest.raises(InputError, match=r"holds 12 datasets, not one .*evaluate_retrieval .* reports their mean"):
        load_retrieval_dataset(cqadupstack)


def test_cli_reports_the_mean_and_each_forum(tiny_bert, cqadupstack, tmp_path):
    out = tmp_path / "cqa.json"
    result = run(
        "eval", "retrieval", "-m", str(tiny_bert), "-d", str(cqadupstack), "--k", "1,10",
        "--cache-dir", str(tmp_path / "cache"), "-o", str(out),
    )  # fmt: skip
    report = json.loads(out.read_text())
    per_forum = [report["per_forum"][f]["metrics"]["ndcg_at_10"] for f in CQADUPSTACK_FORUMS]
    assert report["metrics"]["ndcg_at_10"] == pytest.approx(statistics.fmean(per_forum))
    assert "on cqadupstack (test), mean over 12 forums" in result.stdout
    assert "| wordpress | " in result.stdout and "Corpus embeddings by forum: 12 miss." in result.stdout


def test_a_later_run_over_fewer_forums_leaves_no_earlier_forum_files(tiny, tmp_path):
    """OUT.FORUM.trec of a forum the new run did not evaluate passed for part of it; the output set is now
    the new run's alone, and files that are not a CQADupStack run of OUT stay."""
    all_three = write_forums(tmp_path / "three" / "cqadupstack", ("android", "gis", "tex"))
    two = write_forums(tmp_path / "two" / "cqadupstack", ("android", "gis"))
    out = tmp_path / "out"
    evaluate_retrieval(tiny, all_three, use_cache=False, output=out / "cqa.json")
    assert (out / "cqa.tex.trec").exists()
    unrelated = [out / "cqa.tex.notes.txt", out / "cqa.nosuchforum.trec", out / "other.tex.trec"]
    for path in unrelated:
        path.write_text("mine\n")
    (out / "cqa.wordpress.json").write_text("{}\n")  # a report of its own (-o cqa.wordpress.json): its run stays
    (out / "cqa.wordpress.trec").write_text("mine\n")
    result = evaluate_retrieval(tiny, two, use_cache=False, output=out / "cqa.json")
    trec = sorted(p.name for p in out.glob("cqa.*trec"))
    assert trec == ["cqa.android.trec", "cqa.gis.trec", "cqa.nosuchforum.trec", "cqa.wordpress.trec"]
    assert sorted(Path(p).name for p in result.files.values()) == [
        "cqa.android.trec", "cqa.gis.trec", "cqa.json", "cqa.md",
    ]  # fmt: skip
    assert all(path.read_text() == "mine\n" for path in unrelated)
    # one dataset's report over the same OUT: no forum's run file of the earlier report is left beside it
    evaluate_retrieval(tiny, two / "gis", use_cache=False, output=out / "cqa.json")
    assert sorted(p.name for p in out.glob("cqa.*trec")) == ["cqa.nosuchforum.trec", "cqa.trec", "cqa.wordpress.trec"]
    evaluate_retrieval(tiny, two, use_cache=False, output=out / "cqa.json")  # and the other way round
    assert not (out / "cqa.trec").exists()
