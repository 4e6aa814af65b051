"""CQADupStack as training data: ``bgekit data beir-to-train`` and ``bgekit mine`` take BEIR's cqadupstack
folder as ``bgekit eval retrieval`` does (it was refused as "holds 3 datasets, not one"): one training file
a forum (``OUT/FORUM.jsonl``), each forum's queries mined among its own forum's documents only.

The forums are real BEIR folders written from the committed SciFact fixture (as in
tests/test_eval_cqadupstack.py); a tiny random BERT embeds (which negatives it finds does not matter here,
where they come from does), real faiss searches."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bgekit.eval.datasets import load_retrieval_dataset, read_corpus
from bgekit.train.beir import beir_to_records
from bgekit.train.data import load_train_data, record_rows

from .cli import run
from .test_eval_cqadupstack import write_forums

FORUMS = ("android", "gis", "tex")
FAST = (
    "--range-for-sampling",
    "0-10",
    "--negative-number",
    "3",
    "--margin",
    "0",
    "--passage-max-length",
    "32",
    "--no-fp16",
)


@pytest.fixture
def cqadupstack(tmp_path) -> Path:
    return write_forums(tmp_path / "cqadupstack", FORUMS)


def rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_beir_to_train_writes_one_training_file_a_forum(cqadupstack, tmp_path):
    out = tmp_path / "train"
    result = run("data", "beir-to-train", "--dataset", str(cqadupstack), "--split", "test", "-o", str(out))
    assert sorted(p.name for p in out.iterdir()) == ["android.jsonl", "gis.jsonl", "tex.jsonl"]
    for forum in FORUMS:  # each forum's file is that forum's own records, as one forum's folder gives them
        expected = list(record_rows(beir_to_records(load_retrieval_dataset(cqadupstack / forum))))
        assert rows(out / f"{forum}.jsonl") == expected and expected
    assert "in 3 forum files" in result.stderr
    assert len(load_train_data(out)) == 40  # finetune --train-data OUT reads every forum's records

    # a later run over fewer forums leaves no earlier forum's file in the folder it reads whole
    (out / "notes.txt").write_text("mine\n")
    (out / "extra.jsonl").write_text(json.dumps({"query": "q", "pos": ["p"]}) + "\n")
    fewer = write_forums(tmp_path / "fewer" / "cqadupstack", ("android", "gis"))
    run("data", "beir-to-train", "--dataset", str(fewer), "--split", "test", "-o", str(out))
    assert sorted(p.name for p in out.iterdir()) == ["android.jsonl", "extra.jsonl", "gis.jsonl", "notes.txt"]


def test_beir_to_train_refusals_are_one_line(cqadupstack, tmp_path):
    result = run("data", "beir-to-train", "--dataset", str(cqadupstack), "-o", str(tmp_path / "t"), check=False)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "forum" in result.stderr and "has no judgments for split 'train' (splits found: test)" in result.stderr
    single = tmp_path / "train.jsonl"
    result = run(
        "data", "beir-to-train", "--dataset", str(cqadupstack), "--split", "test", "-o", str(single), check=False
    )
    assert result.returncode == 2 and "one training file a forum: --output is the folder" in result.stderr
    assert not single.exists() and not (tmp_path / "t").exists()


def test_mine_searches_each_forum_in_its_own_corpus(cqadupstack, tmp_path, tiny_bert):
    train, mined = tmp_path / "train", tmp_path / "mined"
    run("data", "beir-to-train", "--dataset", str(cqadupstack), "--split", "test", "-o", str(train))
    result = run(
        "mine", "-m", str(tiny_bert), "-i", str(train), "--corpus", str(cqadupstack), "-o", str(mined),
        *FAST,
    )  # fmt: skip
    assert sorted(p.name for p in mined.iterdir()) == ["android.jsonl", "gis.jsonl", "tex.jsonl"]
    assert "wrote" in result.stderr and "3 forum files" in result.stderr
    for forum in FORUMS:
        own = set(read_corpus(cqadupstack / forum / "corpus.jsonl")[1])
        before, after = rows(train / f"{forum}.jsonl"), rows(mined / f"{forum}.jsonl")
        assert [(r["query"], r["pos"]) for r in after] == [(r["query"], r["pos"]) for r in before]
        for record in after:
            assert len(record["neg"]) == 3 and set(record["neg"]) <= own - set(record["pos"])

    # one forum's folder (a BEIR dataset) is its corpus file, as `--corpus FOLDER/corpus.jsonl`
    one = []
    for corpus in (cqadupstack / "gis", cqadupstack / "gis" / "corpus.jsonl"):
        out = tmp_path / f"gis-{len(one)}.jsonl"
        run(
            "mine", "-m", str(tiny_bert), "-i", str(train / "gis.jsonl"), "--corpus", str(corpus), "-o", str(out),
            *FAST,
        )  # fmt: skip
        one.append(rows(out))
    assert one[0] == one[1] == rows(mined / "gis.jsonl")


def test_mine_resolves_a_dataset_name_as_eval_does(cqadupstack, tmp_path, tiny_bert, monkeypatch):
    """``--corpus cqadupstack`` was read as a file named so ("input file cqadupstack does not exist"), where
    ``eval retrieval --dataset cqadupstack`` takes the name; both now go through the same resolver: offline
    and not downloaded yet, one line naming the dataset, where it was looked for and what to pass instead."""
    train = tmp_path / "train"
    run("data", "beir-to-train", "--dataset", str(cqadupstack), "--split", "test", "-o", str(train))
    cache = tmp_path / "cache"
    monkeypatch.setenv("BGEKIT_CACHE", str(cache))  # run() sets HF_HUB_OFFLINE=1: no download is tried
    mined = tmp_path / "mined"
    args = ("-m", "nobody/unknown", "-i", str(train), "-o", str(mined))
    result = run("mine", *args, "--corpus", "cqadupstack", check=False)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1, result.stderr
    looked = cache / "datasets" / "cqadupstack"
    assert lines[0].startswith(f"error: BEIR dataset 'cqadupstack' is not in {looked}, and HF_HUB_OFFLINE is set")
    assert "pass the dataset's folder (the unpacked cqadupstack.zip) instead of its name" in lines[0]
    evaluated = run("eval", "retrieval", "-m", "nobody/unknown", "-d", "cqadupstack", check=False)
    assert evaluated.returncode == 2 and evaluated.stderr.strip().splitlines() == lines  # the same code
    assert not mined.exists()
    one = run("mine", *args, "--corpus", "cqadupstack/gis", check=False).stderr
    assert f"BEIR dataset 'cqadupstack' is not in {looked}" in one  # a forum is looked for in the same archive
    wrong = run("mine", *args, "--corpus", "cqadupstack/gsi", check=False).stderr
    assert "cqadupstack has no forum 'gsi': cqadupstack/FORUM names one, FORUM one of android," in wrong

    # once the archive is in the cache (downloaded once, online), the name mines as its folder does
    write_forums(looked, FORUMS)
    run("mine", "-m", str(tiny_bert), "-i", str(train), "--corpus", "cqadupstack", "-o", str(mined), *FAST)
    local = tmp_path / "local"
    run("mine", "-m", str(tiny_bert), "-i", str(train), "--corpus", str(cqadupstack), "-o", str(local), *FAST)
    assert sorted(p.name for p in mined.iterdir()) == ["android.jsonl", "gis.jsonl", "tex.jsonl"]
    for forum in FORUMS:
        assert rows(mined / f"{forum}.jsonl") == rows(local / f"{forum}.jsonl")
    gis = tmp_path / "gis.jsonl"
    run("mine", "-m", str(tiny_bert), "-i", str(train / "gis.jsonl"), "--corpus", "cqadupstack/gis", "-o", str(gis),
        *FAST)  # fmt: skip
    assert rows(gis) == rows(local / "gis.jsonl")


def test_mine_over_the_forums_refuses_what_it_cannot_pair(cqadupstack, tmp_path):
    """Each refusal is one line, before the model (unknown here) is loaded."""
    train = tmp_path / "train"
    run("data", "beir-to-train", "--dataset", str(cqadupstack), "--split", "test", "-o", str(train))

    def mine(*args: str) -> str:
        result = run("mine", "-m", "nobody/unknown", "--corpus", str(cqadupstack), *args, check=False)
        assert result.returncode == 2 and "Traceback" not in result.stderr and "unknown" not in result.stderr
        return result.stderr

    assert "--input must be a folder of FORUM.jsonl" in mine("-i", str(train / "gis.jsonl"), "-o", str(tmp_path / "m"))
    assert "also the input folder" in mine("-i", str(train), "-o", str(train))
    assert "not a file such as" in mine("-i", str(train), "-o", str(tmp_path / "mined.jsonl"))
    (train / "wordpress.jsonl").write_text((train / "gis.jsonl").read_text())
    assert "named after no forum of" in mine("-i", str(train), "-o", str(tmp_path / "m"))
    (train / "wordpress.jsonl").unlink()
    (train / "gis.json").write_text("[]")
    assert "both forum gis's training file" in mine("-i", str(train), "-o", str(tmp_path / "m"))
    (train / "gis.json").unlink()
    empty = tmp_path / "empty"
    empty.mkdir()
    stderr = run(
        "mine", "-m", "nobody/unknown", "-i", str(train), "--corpus", str(empty), "-o", str(tmp_path / "x"), check=False
    ).stderr
    assert "is a folder without corpus.jsonl" in stderr and not (tmp_path / "m").exists()
