"""Teacher scores (``bgekit score``) as FlagEmbedding 1.4.2's ``scripts/add_reranker_score.py``: one score per
pair, a record's positives then its negatives, with the reranker options that script takes."""

from __future__ import annotations

import json

import pytest

from bgekit import FlagReranker, InputError, LayerWiseFlagLLMReranker
from bgekit.train.data import TrainRecord
from bgekit.train.teacher import score_records

from .cli import run

RECORDS = [
    {"query": "what is a panda?", "pos": ["The giant panda is a bear. " * 60], "neg": ["Paris is in France.", "x"]},
    {"query": "capital of France", "pos": ["Paris.", "Paris is the capital."], "neg": []},
]


@pytest.fixture()
def train(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in RECORDS))
    return path


def pairs():
    return [(r["query"], p) for r in RECORDS for p in r["pos"] + r["neg"]]


def read(path):
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    return [s for r in rows for s in r["pos_scores"] + r["neg_scores"]]


def test_score_cli_takes_the_reranker_options(tmp_path, train, golden_dir):
    folder = str(golden_dir / "models" / "xlmr-reranker")
    out = tmp_path / "scored.jsonl"
    run(
        "score", "-r", folder, "-i", str(train), "-o", str(out), "--max-length", "16", "--query-max-length", "4",
        "--normalize", "--query-instruction-for-rerank", "Q: ", "--passage-instruction-for-rerank", "P: ",
        "--batch-size", "2", "--no-fp16",
    )  # fmt: skip
    want = FlagReranker(
        folder, devices="cpu", max_length=16, query_max_length=4, normalize=True,
        query_instruction_for_rerank="Q: ", passage_instruction_for_rerank="P: ",
    ).compute_score(pairs())  # fmt: skip
    assert read(out) == pytest.approx(want, abs=1e-6)
    assert all(0 < s < 1 for s in read(out))
    default = FlagReranker(folder, devices="cpu").compute_score(pairs())
    assert max(abs(a - b) for a, b in zip(read(out), default, strict=True)) > 1e-3, "the options were used"


def test_layerwise_teachers_score_with_one_cutoff_layer(tmp_path, train, golden_dir):
    folder = str(golden_dir / "models" / "minicpm-layerwise")
    out = tmp_path / "scored.jsonl"
    run("score", "-r", folder, "-i", str(train), "-o", str(out), "--cutoff-layers", "1", "--no-fp16")
    want = LayerWiseFlagLLMReranker(folder, devices="cpu", cutoff_layers=[1]).compute_score(pairs())
    assert read(out) == pytest.approx(want, abs=1e-5)
    result = run("score", "-r", folder, "-i", str(train), "-o", str(out), "--cutoff-layers", "1,2", check=False)
    assert result.returncode == 2 and "one layer" in result.stderr and "Traceback" not in result.stderr
    two = LayerWiseFlagLLMReranker(folder, devices="cpu", cutoff_layers=[1, 2])
    records = [TrainRecord(r["query"], r["pos"], r["neg"]) for r in RECORDS]
    with pytest.raises(InputError, match="single cutoff layer"):
        score_records(records, two)


def test_score_keeps_every_field_of_the_record(tmp_path, golden_dir):
    """As add_reranker_score.py, which rewrites the JSON object it read: ``id``, ``prompt``, ``type`` and
    any metadata stay, in their place; only pos_scores / neg_scores are added (or replaced)."""
    rows = [
        {"id": "a1", "query": "a panda?", "pos": ["A bear."], "neg": ["Paris."], "type": "qa", "meta": {"n": 1}},
        {"query": "capital?", "lang": "en", "pos": ["Paris."], "neg": [], "prompt": None},
    ]
    train, out = tmp_path / "train.jsonl", tmp_path / "scored.jsonl"
    train.write_text("".join(json.dumps(r) + "\n" for r in rows))
    run("score", "-r", str(golden_dir / "models" / "xlmr-reranker"), "-i", str(train), "-o", str(out), "--no-fp16")
    scored = [json.loads(line) for line in out.read_text().splitlines()]
    assert list(scored[0]) == [*rows[0], "pos_scores", "neg_scores"]
    assert list(scored[1]) == ["query", "lang", "pos", "neg", "pos_scores", "neg_scores"], "a null prompt is no prompt"
    assert {k: v for k, v in scored[0].items() if not k.endswith("_scores")} == rows[0]


def test_score_replaces_the_scores_of_partly_scored_data(tmp_path, golden_dir):
    """add_reranker_score.py overwrites whatever scores a record had; a file where only some records carry
    them (data merged from two sources) was refused as training data is, and stale scores (of negatives
    edited since: 1 score for 2 negatives) were checked and refused though they are replaced."""
    rows = [{**RECORDS[0], "pos_scores": [9.0], "neg_scores": [1.0]}, RECORDS[1]]
    train, out = tmp_path / "train.jsonl", tmp_path / "scored.jsonl"
    train.write_text("".join(json.dumps(r) + "\n" for r in rows))
    folder = str(golden_dir / "models" / "xlmr-reranker")
    run("score", "-r", folder, "-i", str(train), "-o", str(out), "--no-fp16")
    assert read(out) == pytest.approx(FlagReranker(folder, devices="cpu").compute_score(pairs()), abs=1e-5)
    assert list(json.loads(out.read_text().splitlines()[0])) == [*RECORDS[0], "pos_scores", "neg_scores"]


def test_flags_the_reranker_does_not_read_are_refused(tmp_path, train, golden_dir):
    """--cutoff-layers and --prompt on a cross-encoder were a Python UserWarning (source line and all) and then
    ignored; they are a one-line error before the model loads, as ``bgekit serve`` has them."""
    folder = str(golden_dir / "models" / "xlmr-reranker")
    out = tmp_path / "scored.jsonl"
    out.write_text("kept\n")
    for flag, value in (("--cutoff-layers", "1"), ("--prompt", "Relevant?")):
        result = run("score", "-r", folder, "-i", str(train), "-o", str(out), flag, value, check=False)
        assert result.returncode == 2 and "Traceback" not in result.stderr and "Warning" not in result.stderr
        assert f"error: {flag}: the reranker {folder} (encoder-only-base) reads no such option" in result.stderr
    assert out.read_text() == "kept\n"
