"""FlagEmbedding 1.4.2's data options for every trainer that reads query / pos / neg records:
``max_example_num_per_dataset`` (at most N records of each file, drawn at random, the same ones on
every run of a seed) and ``shuffle_ratio`` (that share of long positives cut in three and shuffled,
drawn from the seed, epoch and record so a resumed run sees the same texts)."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from bgekit import InputError
from bgekit.train.data import GroupSampler, keep_per_file, load_train_files, shuffle_text

from .cli import run

LONG = "the {i} passage tells a long story about doors, windows and the keys that open them, one after another"


def write(path: Path, name: str, count: int, long: bool = False) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    rows = [
        {
            "query": f"{name}:{i}",
            "pos": [LONG.format(i=i) if long else f"{name} pos {i}"],
            "neg": [f"{name} neg {i} {j}" for j in range(3)],
        }
        for i in range(count)
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def queries(files) -> dict[str, list[str]]:
    return {path.name: [r.query for r in records] for path, _, records in files}


def test_max_example_num_keeps_a_seeded_random_sample_of_each_file(tmp_path):
    """FlagEmbedding's rule: a file with more records than the limit keeps that many, drawn at random (not
    its first ones); each file of a folder on its own; smaller files whole. bgekit draws from the seed
    and the file's name, so the same run keeps the same records (and a resumed run), in file order."""
    write(tmp_path / "data" / "a.jsonl", "a", 30)
    write(tmp_path / "data" / "b.jsonl", "b", 3)
    write(tmp_path / "data" / "c.jsonl", "c", 30)
    files = load_train_files([str(tmp_path / "data")])
    kept = queries(keep_per_file(files, 5, seed=42))
    assert [len(v) for v in kept.values()] == [5, 3, 5]
    assert kept["b.jsonl"] == ["b:0", "b:1", "b:2"]
    for name in ("a.jsonl", "c.jsonl"):
        numbers = [int(q.split(":")[1]) for q in kept[name]]
        assert numbers == sorted(numbers) and numbers != [0, 1, 2, 3, 4], "a random sample, in file order"
    assert [q.split(":")[1] for q in kept["a.jsonl"]] != [q.split(":")[1] for q in kept["c.jsonl"]]
    assert queries(keep_per_file(files, 5, seed=42)) == kept, "the same records every run of a seed"
    assert queries(keep_per_file(files, 5, seed=7)) != kept
    assert keep_per_file(files, None, seed=42) is files
    assert queries(keep_per_file(files, 30, seed=42)) == queries(files)
    for bad in (0, -3, 2.5, True):
        with pytest.raises(InputError, match="max_example_num_per_dataset must be a positive number of records"):
            keep_per_file(files, bad, seed=42)
    assert queries(load_train_files([str(tmp_path / "data")], max_per_file=5, seed=42)) == kept, "read capped"


def test_a_files_sample_does_not_change_when_another_file_joins_the_folder(tmp_path):
    """The draw depends on the seed and the file alone: a file added before ``b.jsonl`` in the folder (or
    after it) leaves ``b.jsonl``'s records as they were (FlagEmbedding's global generator would not)."""
    folder = tmp_path / "data"
    write(folder / "b.jsonl", "b", 40)
    before = queries(load_train_files([str(folder)], max_per_file=6, seed=3))["b.jsonl"]
    write(folder / "a.jsonl", "a", 40)
    write(folder / "c.jsonl", "c", 40)
    after = queries(load_train_files([str(folder)], max_per_file=6, seed=3))
    assert list(after) == ["a.jsonl", "b.jsonl", "c.jsonl"] and after["b.jsonl"] == before
    assert queries(keep_per_file(load_train_files([str(folder)]), 6, seed=3))["b.jsonl"] == before
    assert queries(load_train_files([str(folder / "b.jsonl")], max_per_file=6, seed=3))["b.jsonl"] == before


def test_only_the_sampled_records_are_parsed_and_checked(tmp_path):
    """With a cap the sample is drawn first and only its records are read: every line left out may be
    malformed (bad JSON, bad bytes, a bad record) and the file still loads, its kept records with their
    own line numbers (blank lines counted). A malformed line that is drawn is an error naming the line."""
    from bgekit import DataFormatError
    from bgekit.train.data import sample_positions

    path = tmp_path / "big.jsonl"
    chosen = set(sample_positions(30, 4, 42, path))
    malformed = [b"{not json", b'{"query": "q", "pos": "not a list"}', b"[1, 2]", b"\xff\xfe not utf-8"]
    lines, kept = [], []
    for position in range(30):
        lines.append(b"")  # a blank line before every record: line numbers are not positions
        if position in chosen:
            lines.append(json.dumps({"query": f"q{position}", "pos": ["p"], "neg": ["n"]}).encode())
            kept.append((f"q{position}", len(lines)))
        else:
            lines.append(malformed[position % len(malformed)])
    path.write_bytes(b"\n".join(lines) + b"\n")
    ((_, _, records),) = load_train_files([str(path)], max_per_file=4, seed=42)
    assert [(r.query, r.source) for r in records] == [(q, f"{path}:{line}") for q, line in kept]
    with pytest.raises(DataFormatError):
        load_train_files([str(path)])  # uncapped, every line is checked

    bad_position = min(chosen)
    bad_line = 2 * bad_position + 2
    lines[bad_line - 1] = b'{"query": "cut short", "pos": ['
    path.write_bytes(b"\n".join(lines) + b"\n")
    with pytest.raises(DataFormatError, match=f"{path.name}, line {bad_line}: not valid JSON"):
        load_train_files([str(path)], max_per_file=4, seed=42)


def test_shuffle_text_cuts_three_runs_of_words(tmp_path):
    """FlagEmbedding cuts the text at exact thirds of its characters (``"doo rs"``); bgekit between words:
    the pieces are three runs of whole words, in another order; a text without spaces keeps none."""
    text = LONG.format(i=7)
    rng = random.Random(0)
    outputs = {shuffle_text(text, rng) for _ in range(30)}
    assert len(outputs) == 6, "the 6 orders of 3 pieces"
    for out in outputs:
        assert sorted(out.split()) == sorted(text.split()), "whole words, none split or lost"
    assert text in outputs, "one order is the text itself (FlagEmbedding's too)"
    cjk = "门窗钥匙" * 30
    assert {len(shuffle_text(cjk, rng)) for _ in range(5)} == {len(cjk)}, "no spaces added"
    assert sorted(shuffle_text(cjk, rng)) == sorted(cjk)


def test_shuffle_ratio_shuffles_long_positives_only_and_draws_from_seed_epoch_and_record(tmp_path):
    files = load_train_files([str(write(tmp_path / "long.jsonl", "long", 40, long=True))])
    records = files[0][2]
    plain = GroupSampler(records, 3, seed=1)
    always = GroupSampler(records, 3, seed=1, shuffle_ratio=1.0)
    half = GroupSampler(records, 3, seed=1, shuffle_ratio=0.5)
    changed = 0
    for i in range(len(records)):
        base, shuffled = plain.group(i, 0), always.group(i, 0)
        assert shuffled.passages[1:] == base.passages[1:], "negatives are not shuffled, nor drawn otherwise"
        assert sorted(shuffled.passages[0].split()) == sorted(base.passages[0].split())
        assert always.group(i, 0) == shuffled, "the same draw for the same seed, epoch and record (a resumed run)"
        changed += half.group(i, 0).passages[0] != base.passages[0]
    assert 8 <= changed <= 32, "about half the positives (a shuffle may keep the order: 1 in 6)"
    assert any(always.group(i, 1) != always.group(i, 0) for i in range(len(records))), "drawn again each epoch"
    short = load_train_files([str(write(tmp_path / "short.jsonl", "short", 5))])[0][2]
    assert all(GroupSampler(short, 2, shuffle_ratio=1.0).group(i).passages[0] == f"short pos {i}" for i in range(5))
    for bad in (-0.1, 1.5, float("nan")):
        with pytest.raises(InputError, match="shuffle_ratio must be between 0 and 1"):
            GroupSampler(records, 2, shuffle_ratio=bad)


def steps(out: Path) -> int:
    return json.loads(next(out.glob("checkpoint-*/trainer_state.json")).read_text())["global_step"]


@pytest.mark.parametrize("same_dataset", [False, True])
def test_finetune_embedder_trains_on_the_capped_files(tmp_path, tiny_bert, same_dataset):
    """Two files of 10 records capped at 4: 8 records, 2 batches of 4 (not 5); with
    --same-dataset-within-batch the plan is built from the kept records (1 batch per file)."""
    data = tmp_path / "data"
    write(data / "a.jsonl", "a", 10, long=True)
    write(data / "b.jsonl", "b", 10)
    out = tmp_path / "out"
    extra = ["--same-dataset-within-batch"] if same_dataset else []
    run(
        "finetune",
        "embedder",
        "--model",
        str(tiny_bert),
        "--train-data",
        str(data),
        "--output-dir",
        str(out),
        "--per-device-train-batch-size",
        "4",
        "--passage-max-len",
        "32",
        "--max-example-num-per-dataset",
        "4",
        "--shuffle-ratio",
        "0.5",
        "--save-steps",
        "100",
        *extra,
    )
    assert steps(out) == 2


def test_finetune_m3_and_reranker_take_the_options(tmp_path, tiny_xlmr, tiny_bert_reranker):
    data = write(tmp_path / "train.jsonl", "t", 12, long=True)
    common = ["--train-data", str(data), "--max-example-num-per-dataset", "4", "--shuffle-ratio", "1"]
    common += ["--per-device-train-batch-size", "2", "--save-steps", "100"]
    run("finetune", "m3", "--model", str(tiny_xlmr), "--output-dir", str(tmp_path / "m3"), *common)
    assert steps(tmp_path / "m3") == 2
    run("finetune", "reranker", "--model", str(tiny_bert_reranker), "--output-dir", str(tmp_path / "rr"), *common)
    assert steps(tmp_path / "rr") == 2


@pytest.mark.parametrize(
    ("option", "value"),
    [("--max-example-num-per-dataset", "0"), ("--shuffle-ratio", "1.5"), ("--shuffle-ratio", "-0.2")],
)
def test_bad_values_are_refused_on_the_command_line(tmp_path, option, value):
    data = write(tmp_path / "train.jsonl", "t", 4)
    result = run(
        "finetune",
        "embedder",
        "--model",
        str(tmp_path / "never-loaded"),
        "--train-data",
        str(data),
        "--output-dir",
        str(tmp_path / "out"),
        option,
        value,
        check=False,
    )
    assert result.returncode == 2 and option in result.stderr and "Traceback" not in result.stderr


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"max_example_num_per_dataset": 0}, "max_example_num_per_dataset must be a positive number of records"),
        ({"shuffle_ratio": 2.0}, "shuffle_ratio must be between 0 and 1"),
    ],
)
def test_bad_values_fail_before_any_model_loads(tmp_path, options, message):
    from bgekit.train.embedder import EmbedderOptions, finetune_embedder
    from bgekit.train.m3 import M3Options, finetune_m3
    from bgekit.train.reranker import RerankerOptions, finetune_reranker

    data = [str(write(tmp_path / "train.jsonl", "t", 4))]
    never = str(tmp_path / "never-loaded")
    for kind, train in ((EmbedderOptions, finetune_embedder), (M3Options, finetune_m3)):
        with pytest.raises(InputError, match=message):
            train(kind(output_dir=str(tmp_path / "o"), model_name_or_path=never, train_data=data, **options))
    with pytest.raises(InputError, match=message):
        finetune_reranker(
            RerankerOptions(output_dir=str(tmp_path / "o"), model_name_or_path=never, train_data=data, **options)
        )


def test_a_json_array_file_checks_only_its_sampled_records(tmp_path):
    """A ``.json`` array is parsed whole (its JSON must be valid), but only the drawn records are checked."""
    from bgekit.train.data import sample_positions

    path = tmp_path / "big.json"
    chosen = sample_positions(12, 3, 42, path)
    rows = [
        {"query": f"q{i}", "pos": ["p"]} if i in chosen else {"query": f"q{i}", "pos": "not a list"} for i in range(12)
    ]
    path.write_text("[\n" + ",\n".join(json.dumps(r) for r in rows) + "\n]\n")
    ((_, _, records),) = load_train_files([str(path)], max_per_file=3, seed=42)
    assert [(r.query, r.source) for r in records] == [(f"q{i}", f"{path}:{i + 2}") for i in chosen]
