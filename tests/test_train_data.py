"""Training data: validation with file and line, group sampling rules, BEIR conversion."""

from __future__ import annotations

import json
import math
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

from bgekit import DataFormatError, InputError
from bgekit.train import losses
from bgekit.train.data import GroupSampler, TrainRecord, load_train_data, write_records

GOOD = {"query": "q", "pos": ["p"], "neg": ["n1", "n2"]}


def write(tmp_path, *rows, name="train.jsonl"):
    path = tmp_path / name
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        ({"query": "q", "neg": ["n"]}, "line 2: missing 'pos'"),
        ({"query": "q", "pos": "p"}, "line 2: 'pos' must be a list of strings"),
        ({"query": "q", "pos": ["p"], "neg": "n"}, "line 2: 'neg' must be a list of strings, got str"),
        ({"query": "q", "pos": []}, "line 2: 'pos' is empty"),
        ({"query": "", "pos": ["p"]}, "line 2: 'query' must be a non-empty string"),
        ({"query": "q", "pos": ["p", 3]}, r"line 2: 'pos'\[1\] is int"),
        ({"query": "q", "pos": ["p"], "neg": ["n"], "pos_scores": [1, 2]}, "'pos_scores' has 2 scores but 'pos' has 1"),
        ({"query": "q", "pos": ["p"], "neg": ["n"], "pos_scores": [1], "neg_scores": []}, "'neg_scores' has 0 scores"),
        ({"query": "q", "pos": ["p"], "pos_scores": ["high"]}, "finite numbers"),
        ({"query": "q", "pos": ["p"], "neg": ["n"], "pos_scores": [1]}, "line 2: 'pos_scores' without 'neg_scores'"),
        ({"query": "q", "pos": ["p"], "neg": ["n"], "neg_scores": [1]}, "line 2: 'neg_scores' without 'pos_scores'"),
        # the column is where the line broke off (it said 'column 1': json counted from the line's own newline)
        ('{"query": "q", "pos": ["p"]', r"line 2: not valid JSON \(Expecting ',' delimiter at column 28\)"),
        ('{"query": "q" "pos": ["p"]}', r"line 2: not valid JSON \(Expecting ',' delimiter at column 15\)"),
    ],
)
def test_bad_records_name_file_and_line(tmp_path, bad, message):
    path = write(tmp_path, GOOD, bad, GOOD)
    with pytest.raises(DataFormatError, match=message) as info:
        load_train_data(path)
    assert str(path) in str(info.value)


def test_empty_file_and_mixed_scores(tmp_path):
    with pytest.raises(InputError, match="holds no records"):
        load_train_data(write(tmp_path, "", name="empty.jsonl"))
    scored = {**GOOD, "pos_scores": [1.0], "neg_scores": [0.1, 0.2]}
    with pytest.raises(InputError, match="score every record or none"):
        load_train_data(write(tmp_path, GOOD, scored))
    with pytest.raises(InputError, match="does not exist"):
        load_train_data(tmp_path / "missing.jsonl")


def test_round_trip_and_folder_input(tmp_path):
    records = load_train_data(write(tmp_path, GOOD, {**GOOD, "prompt": "Retrieve: ", "type": "qa"}))
    folder = tmp_path / "data"
    folder.mkdir()
    write_records(folder / "a.jsonl", records)
    assert load_train_data(folder) == records


def test_group_sampling():
    records = [
        TrainRecord("q0", ["p0"], ["n0", "n1", "n2", "n3"]),
        TrainRecord("q1", ["p1"], ["only"]),
        TrainRecord("q2", ["p2a", "p2b"], []),
    ]
    sampler = GroupSampler(records, group_size=4, seed=1)
    g0 = sampler.group(0)
    assert g0.passages[0] == "p0" and len(g0.passages) == 4 and len(set(g0.passages[1:])) == 3  # no replacement
    assert sampler.group(1).passages == ["p1", "only", "only", "only"]  # with replacement when short
    g2 = sampler.group(2)
    assert g2.passages[0] in ("p2a", "p2b")
    assert not set(g2.passages[1:]) & {"p2a", "p2b"}, "random negatives never include the record's positives"
    assert sampler.group(0, epoch=0) == sampler.group(0, epoch=0)
    assert any(sampler.group(0, epoch=e).passages != g0.passages for e in range(1, 6)), "re-drawn each epoch"
    with pytest.raises(InputError, match="train_group_size"):
        GroupSampler(records, group_size=0)


def test_teacher_scores_follow_the_sampled_passages():
    record = TrainRecord("q", ["p"], ["n0", "n1", "n2"], pos_scores=[9.0], neg_scores=[0.0, 1.0, 2.0])
    group = GroupSampler([record], group_size=3, seed=0).group(0)
    expected = {"p": 9.0, "n0": 0.0, "n1": 1.0, "n2": 2.0}
    assert group.scores == [expected[p] for p in group.passages]


def test_beir_to_records(golden_dir):
    from bgekit.eval.datasets import RetrievalDataset
    from bgekit.train.beir import beir_to_records

    dataset = RetrievalDataset.from_dicts(
        corpus={"d1": {"title": "T", "text": "one"}, "d2": {"text": "two"}},
        queries={"q1": "first", "q2": "second"},
        qrels={"q1": {"d1": 1, "d2": 0}, "q2": {"d2": 2}},
    )
    records = beir_to_records(dataset)
    assert [(r.query, r.pos, r.neg) for r in records] == [("first", ["T one"], []), ("second", ["two"], [])]


def test_beir_to_train_cli_never_writes_over_the_dataset(tmp_path):
    """``bgekit data beir-to-train -o DS/queries.jsonl`` replaced the queries it had just read; an output that
    is one of the dataset's files is now refused before anything is read, one written beside them is fine."""
    from bgekit.eval.datasets import RetrievalDataset, write_beir

    from .cli import run

    dataset = RetrievalDataset.from_dicts(
        corpus={"d1": {"title": "T", "text": "one"}, "d2": {"text": "two"}},
        queries={"q1": "first"},
        qrels={"q1": {"d1": 1}},
    )
    folder = write_beir(dataset, tmp_path / "ds")
    before = {p: p.read_bytes() for p in folder.rglob("*") if p.is_file()}
    for target in ("queries.jsonl", "corpus.jsonl", "qrels/test.tsv"):
        result = run(
            "data",
            "beir-to-train",
            "--dataset",
            str(folder),
            "--split",
            "test",
            "-o",
            str(folder / target),
            check=False,
        )
        assert result.returncode == 2 and "is also an input" in result.stderr and "Traceback" not in result.stderr
    assert {p: p.read_bytes() for p in folder.rglob("*") if p.is_file()} == before
    run("data", "beir-to-train", "--dataset", str(folder), "--split", "test", "-o", str(folder / "train.jsonl"))
    assert json.loads((folder / "train.jsonl").read_text()) == {"query": "first", "pos": ["T one"], "neg": []}


def test_beir_to_train_refuses_a_split_without_relevant_documents(tmp_path):
    """Judgments that are all 0 (or name documents the corpus lacks) wrote an empty training file, "wrote ...:
    0 records", which fine-tuning refused later; it is now an error naming the dataset and split."""
    from bgekit.eval.datasets import RetrievalDataset, write_beir

    from .cli import run

    dataset = RetrievalDataset.from_dicts(
        corpus={"d1": {"text": "one"}}, queries={"q1": "first"}, qrels={"q1": {"d1": 0}}
    )
    folder = write_beir(dataset, tmp_path / "ds")
    out = tmp_path / "train.jsonl"
    result = run("data", "beir-to-train", "--dataset", str(folder), "--split", "test", "-o", str(out), check=False)
    assert result.returncode == 2 and "no judged query of" in result.stderr and "(test) has a relevant" in result.stderr
    assert not out.exists() and "Traceback" not in result.stderr


def test_short_negative_lists_and_random_negatives_under_a_teacher(tmp_path):
    two = TrainRecord("q", ["p"], ["n0", "n1"])
    sampler = GroupSampler([two], group_size=4, seed=0)
    for epoch in range(20):  # FlagEmbedding draws from [n0, n1, n0, n1]: both always appear
        assert set(sampler.group(0, epoch).passages[1:]) == {"n0", "n1"}
    scored = [
        TrainRecord("q0", ["p0"], [], pos_scores=[8.0], neg_scores=[]),
        TrainRecord("q1", ["p1"], ["n"], pos_scores=[5.0], neg_scores=[1.0]),
    ]
    group = GroupSampler(scored, group_size=4, seed=0).group(0)
    assert group.scores == [8.0, -math.inf, -math.inf, -math.inf]  # the teacher gives random passages no weight
    teacher = torch.tensor([group.scores])
    q, p = F.normalize(torch.randn(1, 8), dim=-1), F.normalize(torch.randn(4, 8), dim=-1)
    for kind in ("kl_div", "m3_kd_loss"):
        assert math.isfinite(losses.embedding_loss(q, p, 4, 0.05, teacher, kind).item())
    # a scored record without negatives needs no neg_scores
    records = load_train_data(write(tmp_path, {"query": "q", "pos": ["p"], "pos_scores": [1.0]}))
    assert records[0].neg_scores == []


def test_write_records_keeps_fields_bgekit_does_not_read(tmp_path):
    row = {"id": 7, "query": "q", "pos": ["p"], "neg": ["n1"], "meta": {"a": [1, None]}, "note": None, "prompt": None}
    (record,) = load_train_data(write(tmp_path, row))
    out = tmp_path / "out.jsonl"
    write_records(out, [replace(record, pos_scores=[1.0], neg_scores=[0.5])])
    assert json.loads(out.read_text()) == {
        "id": 7, "query": "q", "pos": ["p"], "neg": ["n1"], "meta": {"a": [1, None]}, "note": None,
        "pos_scores": [1.0], "neg_scores": [0.5],
    }  # fmt: skip
    assert list(json.loads(out.read_text()))[:5] == ["id", "query", "pos", "neg", "meta"], "in their place"


def test_a_json_file_may_hold_one_array_of_records(tmp_path):
    """A ``.json`` file holding a JSON array of records (pretty-printed or not) trains as FlagEmbedding's
    ``datasets`` loader reads it (it was refused at line 1 as 'expected a JSON object, got list'); each
    record's errors name the line it starts on, and a ``.json`` file of JSON lines still reads as before."""
    pretty = tmp_path / "pretty.json"
    pretty.write_text(json.dumps([GOOD, {**GOOD, "query": "q2"}], indent=2))
    records = load_train_data(pretty)
    assert [r.query for r in records] == ["q", "q2"]
    assert [r.source for r in records] == [f"{pretty}:2", f"{pretty}:12"]
    (tmp_path / "folder").mkdir()
    (tmp_path / "folder" / "a.json").write_text(json.dumps([GOOD]))
    write(tmp_path / "folder", GOOD, GOOD, name="b.json")  # JSON lines under .json
    assert len(load_train_data(tmp_path / "folder")) == 3
    bad = tmp_path / "bad.json"
    bad.write_text('[\n  {"query": "q", "pos": ["p"]},\n  {"query": "q2", "neg": ["n"]}\n]\n')
    with pytest.raises(DataFormatError, match=r"bad\.json, line 3: missing 'pos'"):
        load_train_data(bad)
    bad.write_text('[\n  {"query": "q", "pos": ["p"]}\n  {"query": "q2", "pos": ["p"]}\n]\n')
    with pytest.raises(DataFormatError, match=r"bad\.json, line 3: not valid JSON"):
        load_train_data(bad)
    bad.write_text(f"[{json.dumps(GOOD)}, 3]")
    with pytest.raises(DataFormatError, match=r"line 1: expected a JSON object, got int"):
        load_train_data(bad)
    bad.write_text("[]")
    with pytest.raises(InputError, match="holds no records"):
        load_train_data(bad)
