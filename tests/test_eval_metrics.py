"""Check 3: bgekit's metrics equal pytrec_eval's on the same run file, and its run files load in
other evaluation tools (pytrec_eval's own TREC parser, ranx). Also hand-checked values and MTEB's
tie rule for MRR@k.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import pytrec_eval

from bgekit.errors import DataFormatError, InputError
from bgekit.eval.datasets import load_retrieval_dataset
from bgekit.eval.metrics import evaluate_run, read_trec_run, write_trec_qrels, write_trec_run

from .test_eval_reference import slow_requested

ROOT = Path(__file__).resolve().parents[1]
MINI = ROOT / "examples" / "data" / "scifact-mini"
K = (1, 3, 5, 10, 100)


@pytest.fixture(scope="module")
def mini_run(minilm_dir):
    """A real run: all-MiniLM-L6-v2 cosine scores of every fixture document for every query."""
    from bgekit import Embedder

    dataset = load_retrieval_dataset(MINI, "test")
    model = Embedder.from_pretrained(str(minilm_dir))
    queries = list(dataset.queries)
    scores = model.encode_queries([dataset.queries[q] for q in queries]) @ model.encode_corpus(dataset.corpus_texts).T
    run = {
        q: dict(zip(dataset.corpus_ids, map(float, row), strict=True)) for q, row in zip(queries, scores, strict=True)
    }
    return dataset, run


def test_hand_computed_values():
    qrels = {"q1": {"d1": 1, "d4": 1}, "q2": {"d9": 2}}
    run = {"q1": {"d2": 0.9, "d1": 0.8, "d3": 0.7, "d4": 0.1}, "q2": {"d9": 0.5, "d8": 0.4}}
    m = evaluate_run(qrels, run, (1, 2, 10))
    # q1: relevant at ranks 2 and 4; q2: relevant at rank 1
    ndcg10_q1 = (1 / math.log2(3) + 1 / math.log2(5)) / (1 + 1 / math.log2(3))
    assert m["ndcg_at_10"] == pytest.approx((ndcg10_q1 + 1.0) / 2)
    assert m["mrr_at_1"] == pytest.approx(0.5) and m["mrr_at_10"] == pytest.approx((0.5 + 1) / 2)
    assert m["recall_at_2"] == pytest.approx((0.5 + 1) / 2)
    assert m["precision_at_2"] == pytest.approx((0.5 + 0.5) / 2)
    assert m["map_at_10"] == pytest.approx(((1 / 2 + 2 / 4) / 2 + 1) / 2)


def test_mrr_at_k_breaks_ties_like_trec_eval_and_mteb():
    # d1 and d2 tie; trec_eval ranks the larger id first, so the relevant d1 is 2nd
    qrels = {"q": {"d1": 1}}
    run = {"q": {"d1": 0.5, "d2": 0.5}}
    m = evaluate_run(qrels, run, (1, 10))
    assert m["mrr_at_1"] == 0.0 and m["mrr_at_10"] == 0.5
    assert pytrec_eval.RelevanceEvaluator(qrels, {"recip_rank"}).evaluate(run)["q"]["recip_rank"] == 0.5


def test_ignore_identical_ids():
    qrels = {"a": {"b": 1}}
    run = {"a": {"a": 0.99, "b": 0.5}}
    assert evaluate_run(qrels, run, (1,))["ndcg_at_1"] == 0.0
    assert evaluate_run(qrels, run, (1,), ignore_identical_ids=True)["ndcg_at_1"] == 1.0


def test_judged_query_without_results_counts_zero():
    qrels = {"q1": {"d1": 1}, "q2": {"d2": 1}}
    assert evaluate_run(qrels, {"q1": {"d1": 1.0}}, (10,))["ndcg_at_10"] == 0.5


def test_metrics_equal_pytrec_eval_on_the_written_run_file(tmp_path, mini_run):
    dataset, run = mini_run
    run_path = write_trec_run(tmp_path / "run.trec", run)
    qrels_path = write_trec_qrels(tmp_path / "qrels.txt", dataset.qrels)
    with run_path.open() as handle:
        parsed_run = pytrec_eval.parse_run(handle)
    with qrels_path.open() as handle:
        parsed_qrels = pytrec_eval.parse_qrel(handle)
    assert parsed_qrels == dataset.qrels
    ours = evaluate_run(dataset.qrels, read_trec_run(run_path), K)
    cut = ",".join(map(str, K))
    measures = {f"ndcg_cut.{cut}", f"map_cut.{cut}", f"recall.{cut}", f"P.{cut}", "recip_rank"}
    theirs = pytrec_eval.RelevanceEvaluator(parsed_qrels, measures).evaluate(parsed_run)
    mean = {key: np.mean([v[key] for v in theirs.values()]) for key in next(iter(theirs.values()))}
    for k in K:
        assert ours[f"ndcg_at_{k}"] == pytest.approx(mean[f"ndcg_cut_{k}"], abs=1e-12)
        assert ours[f"map_at_{k}"] == pytest.approx(mean[f"map_cut_{k}"], abs=1e-12)
        assert ours[f"recall_at_{k}"] == pytest.approx(mean[f"recall_{k}"], abs=1e-12)
        assert ours[f"precision_at_{k}"] == pytest.approx(mean[f"P_{k}"], abs=1e-12)
    full_depth = evaluate_run(dataset.qrels, read_trec_run(run_path), (len(dataset.corpus_ids),))
    assert full_depth[f"mrr_at_{len(dataset.corpus_ids)}"] == pytest.approx(mean["recip_rank"], abs=1e-12)
    assert 0.3 < ours["ndcg_at_10"] < 1.0  # a real, imperfect ranking


@pytest.mark.slow
def test_run_file_loads_in_ranx(request, tmp_path, mini_run):
    """ranx compiles its metrics with numba on first use: about a minute per fresh environment on
    2 cores, so this runs with the slow checks (BGEKIT_SLOW=1 or -m slow). pytrec_eval's own TREC
    parser reads the same file in the fast suite (test above)."""
    if not slow_requested(request.config):
        pytest.skip("ranx's first use compiles for about a minute: run with BGEKIT_SLOW=1 or -m slow")
    from ranx import Qrels, Run
    from ranx import evaluate as ranx_evaluate

    dataset, run = mini_run
    run_path = write_trec_run(tmp_path / "run.trec", run, tag="minilm")
    qrels_path = write_trec_qrels(tmp_path / "qrels.txt", dataset.qrels)
    ranx_run = Run.from_file(str(run_path), kind="trec")
    ranx_qrels = Qrels.from_file(str(qrels_path), kind="trec")
    assert ranx_run.name == "minilm"
    assert set(ranx_run.keys()) == set(run)
    theirs = ranx_evaluate(ranx_qrels, ranx_run, ["ndcg@10", "recall@100", "precision@10", "mrr@10"])
    ours = evaluate_run(dataset.qrels, run, K)
    assert ours["ndcg_at_10"] == pytest.approx(theirs["ndcg@10"], abs=1e-6)
    assert ours["recall_at_100"] == pytest.approx(theirs["recall@100"], abs=1e-6)
    assert ours["precision_at_10"] == pytest.approx(theirs["precision@10"], abs=1e-6)
    assert ours["mrr_at_10"] == pytest.approx(theirs["mrr@10"], abs=1e-6)


def test_run_file_format(tmp_path):
    path = write_trec_run(tmp_path / "r.trec", {"q1": {"b": 0.1, "a": 0.9, "c": 0.5}})
    lines = [line.split() for line in path.read_text().splitlines()]
    assert lines == [
        ["q1", "Q0", "a", "1", "0.9", "bgekit"],
        ["q1", "Q0", "c", "2", "0.5", "bgekit"],
        ["q1", "Q0", "b", "3", "0.1", "bgekit"],
    ]
    assert read_trec_run(path) == {"q1": {"a": 0.9, "c": 0.5, "b": 0.1}}
    with pytest.raises(InputError, match="ids without spaces"):
        write_trec_run(tmp_path / "x.trec", {"q 1": {"a": 1.0}})
    bad = tmp_path / "bad.trec"
    bad.write_text("q1 Q0 a 1 0.5 tag\nq1 Q0 b 2\n")
    with pytest.raises(DataFormatError, match=r"bad\.trec, line 2: expected 6 columns"):
        read_trec_run(bad)


def test_bad_k_values():
    with pytest.raises(InputError, match="k values must be positive"):
        evaluate_run({"q": {"d": 1}}, {"q": {"d": 1.0}}, (0, 10))
