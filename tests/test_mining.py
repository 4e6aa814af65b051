"""Hard-negative mining as FlagEmbedding 1.4.2's ``scripts/hn_mine.py``: ranks are a slice of the
raw search result, a short list is topped up with random pool passages, plus bgekit's guards.

all-MiniLM-L6-v2 embeds (a tiny random model scores every passage within 1e-5), real faiss
searches; the expected ranking is computed here with numpy from the same vectors."""

from __future__ import annotations

import json

import numpy as np
import pytest

from bgekit import Embedder
from bgekit.eval.index import gpu_count
from bgekit.train.data import TrainRecord
from bgekit.train.mining import MiningOptions, mine_hard_negatives

from .cli import run

POOL = [f"passage {i} about topic {i % 7} with words {'x ' * (i % 5)}and more {i * 13 % 17}" for i in range(40)]
QUERY = "which passage talks about topic 3?"


@pytest.fixture(scope="module")
def embedder(minilm_dir):
    return Embedder.from_pretrained(str(minilm_dir), devices="cpu", use_fp16=False)


def ranking(embedder, pool, query):
    scores = embedder.encode_corpus(pool) @ embedder.encode_queries(query)
    return [int(i) for i in np.argsort(-scores, kind="stable")], scores


def test_range_is_a_slice_of_the_raw_search_ranks(embedder):
    pool = [*POOL, QUERY]  # the query itself sits in the pool
    order, scores = ranking(embedder, pool, QUERY)
    assert len(set(np.round(scores, 6))) == len(pool), "no ties, so the ranking is well defined"
    positive = pool[order[3]]  # inside the window: it takes a rank there, as in FlagEmbedding
    window = [pool[i] for i in order[2:10]]  # "2-10": ranks 2..9, 0-based
    expected = {t for t in window if t not in (positive, QUERY)}
    record = TrainRecord(QUERY, [positive], [])
    options = MiningOptions((2, 10), len(expected), margin=None)
    (mined,), stats = mine_hard_negatives([record], embedder, pool, options)
    assert set(mined.neg) == expected  # not ranks 2..9 of what is left once the positive is gone
    assert len(mined.neg) == len(expected) and stats["topped_up"] == 0
    assert stats["positive"] == 1 and stats["query"] == (1 if QUERY in window else 0)


def test_a_short_list_is_topped_up_with_random_pool_passages(embedder):
    pool = [*POOL, QUERY]
    order, scores = ranking(embedder, pool, QUERY)
    positive = pool[order[1]]
    record = TrainRecord(QUERY, [positive], [])
    (mined,), stats = mine_hard_negatives([record], embedder, pool, MiningOptions((0, 4), 12, margin=None, seed=3))
    assert len(mined.neg) == 12 and len(set(mined.neg)) == 12
    assert positive not in mined.neg and QUERY not in mined.neg
    assert {pool[i] for i in order[:4]} - {positive, QUERY} <= set(mined.neg), "the window's passages come first"
    assert stats["topped_up"] == 1 and stats["short"] == 0
    assert any(pool.index(t) in order[10:] for t in mined.neg), "top-ups are drawn from the whole pool"

    # top-ups pass the same guards and never come from above the range
    floor = 0.999 * scores[pool.index(positive)]
    (guarded,), _ = mine_hard_negatives([record], embedder, pool, MiningOptions((2, 4), 12, margin=0.999, seed=3))
    assert all(scores[pool.index(t)] <= floor + 1e-6 for t in guarded.neg)
    assert not {pool[i] for i in order[:2]} & set(guarded.neg)


def test_a_pool_too_small_gives_what_qualifies_without_repeats(embedder):
    pool = POOL[:6]
    record = TrainRecord(QUERY, [pool[0]], [])
    (mined,), stats = mine_hard_negatives([record], embedder, pool, MiningOptions((0, 3), 10, margin=None))
    assert sorted(mined.neg) == sorted(pool[1:])  # every passage but the positive, once
    assert stats["topped_up"] == 1 and stats["short"] == 1


def test_records_without_a_pool_mine_from_their_own_passages(embedder, caplog):
    records = [TrainRecord(f"query {i}", [POOL[i]], [POOL[i + 10]]) for i in range(8)]
    mined, _ = mine_hard_negatives(records, embedder, None, MiningOptions((0, 16), 3, margin=None))
    on_gpu, _ = mine_hard_negatives(
        records, embedder, None, MiningOptions((0, 16), 3, margin=None, use_gpu_for_searching=True)
    )
    assert [r.neg for r in on_gpu] == [r.neg for r in mined]
    if gpu_count() == 0:
        assert "faiss sees no GPU" in caplog.text, "a GPU asked for and missing is said, not silent"
    own = {p for r in records for p in r.pos + r.neg}
    for record, out in zip(records, mined, strict=True):
        assert len(out.neg) == 3 and set(out.neg) <= own and not set(out.neg) & set(record.pos)
        assert out.pos_scores is None and out.neg_scores is None


def test_mine_cli_takes_hn_mine_options(tmp_path, minilm_dir, embedder):
    train = tmp_path / "train.jsonl"
    train.write_text(
        "".join(json.dumps({"query": f"topic {i}?", "pos": [POOL[i]], "neg": []}) + "\n" for i in range(5))
    )
    pool = tmp_path / "pool.jsonl"
    pool.write_text("".join(json.dumps({"text": t}) + "\n" for t in POOL))
    outputs = []
    for extra in ([], ["--search-batch-size", "1", "--use-gpu-for-searching"]):
        out = tmp_path / f"mined{len(extra)}.jsonl"
        run(
            "mine", "--model", str(minilm_dir), "--input", str(train), "--candidate-pool", str(pool),
            "--output", str(out), "--range-for-sampling", "2-6", "--negative-number", "6", "--margin", "0",
            "--no-fp16", *extra,
        )  # fmt: skip
        outputs.append([json.loads(line) for line in out.read_text().splitlines()])
    assert outputs[0] == outputs[1], "search batching and the GPU flag (no GPU here) change nothing"
    records = [TrainRecord(r["query"], r["pos"], []) for r in outputs[0]]
    expected, _ = mine_hard_negatives(records, embedder, POOL, MiningOptions((2, 6), 6, margin=None))
    assert [r["neg"] for r in outputs[0]] == [r.neg for r in expected]
    assert all(len(r["neg"]) == 6 and not set(r["neg"]) & set(r["pos"]) for r in outputs[0])
    result = run(
        "mine", "--model", str(minilm_dir), "--input", str(train), "--output", str(tmp_path / "x.jsonl"),
        "--query-instruction-for-retrieval", "Find: ", "--query-instruction-format", "{}", check=False,
    )  # fmt: skip
    assert result.returncode == 2 and "query_instruction_format must have 2 {} slots" in result.stderr
    assert "Traceback" not in result.stderr


def test_m3_embedders_mine_with_their_dense_vectors(golden_dir):
    from bgekit import BGEM3FlagModel

    m3 = BGEM3FlagModel(str(golden_dir / "models" / "xlmr-m3"), devices="cpu")  # encode_* give dicts
    record = TrainRecord("which passage talks about topic 3?", [POOL[3]], [])
    (mined,), _ = mine_hard_negatives([record], m3, POOL[:12], MiningOptions((0, 5), 3, margin=None))
    dense = m3.encode_corpus(POOL[:12])["dense_vecs"] @ m3.encode_queries(record.query)["dense_vecs"]
    top = {POOL[i] for i in np.argsort(-dense)[:5]} - {POOL[3]}
    assert len(mined.neg) == 3 and set(mined.neg) <= top, "sampled from the top of the dense ranking"


def test_mine_cli_runs_icl_embedders_with_examples_and_lengths(tmp_path, golden_dir):
    from bgekit import FlagICLModel

    folder = str(golden_dir / "models" / "mistral-icl")
    examples = [{"instruct": "Find the passage.", "query": "topic 1?", "response": POOL[1]}]
    (tmp_path / "examples.json").write_text(json.dumps(examples))
    train = tmp_path / "train.jsonl"
    train.write_text(
        "".join(json.dumps({"query": f"topic {i}?", "pos": [POOL[i]], "neg": []}) + "\n" for i in range(4))
    )
    out = tmp_path / "mined.jsonl"
    (tmp_path / "pool.txt").write_text("\n".join(POOL[:20]) + "\n")
    run(
        "mine", "--model", folder, "--model-class", "decoder-only-icl", "--examples", str(tmp_path / "examples.json"),
        "--query-instruction-for-retrieval", "Find the passage.", "--query-max-length", "24",
        "--passage-max-length", "16", "--input", str(train), "--candidate-pool", str(tmp_path / "pool.txt"),
        "--output", str(out), "--range-for-sampling", "0-8", "--negative-number", "3", "--margin", "0", "--no-fp16",
    )  # fmt: skip
    icl = FlagICLModel(
        folder, devices="cpu", examples_for_task=examples, query_instruction_for_retrieval="Find the passage.",
        query_max_length=24, passage_max_length=16,
    )  # fmt: skip
    records = [TrainRecord(f"topic {i}?", [POOL[i]], []) for i in range(4)]
    expected, _ = mine_hard_negatives(records, icl, POOL[:20], MiningOptions((0, 8), 3, margin=None))
    assert [json.loads(line)["neg"] for line in out.read_text().splitlines()] == [r.neg for r in expected]
    plain = FlagICLModel(folder, devices="cpu", query_instruction_for_retrieval="Find the passage.")
    other, _ = mine_hard_negatives(records, plain, POOL[:20], MiningOptions((0, 8), 3, margin=None))
    assert [r.neg for r in other] != [r.neg for r in expected], "examples and lengths reached the embedder"


def test_mine_keeps_every_field_of_the_record(tmp_path, minilm_dir):
    """As hn_mine.py, which rewrites the JSON object it read: ``id``, ``prompt``, ``type`` and any metadata
    stay, in their place; ``neg`` is replaced. Teacher scores, which no longer match ``neg``, are dropped
    (hn_mine.py keeps them stale)."""
    rows = [
        {"id": f"r{i}", "query": f"topic {i}?", "pos": [POOL[i]], "neg": [POOL[i + 1]], "prompt": "Find: ",
         "type": "qa", "meta": {"source": "wiki", "n": i}}
        for i in range(4)
    ]  # fmt: skip
    for row in rows[::2]:  # only some records scored (two sources merged): the scores go, so that is no error
        row.update(pos_scores=[1.0], neg_scores=[0.5])
    train, out = tmp_path / "train.jsonl", tmp_path / "mined.jsonl"
    train.write_text("".join(json.dumps(r) + "\n" for r in rows))
    run(
        "mine", "-m", str(minilm_dir), "-i", str(train), "-o", str(out), "--range-for-sampling", "0-5",
        "--negative-number", "2", "--margin", "0", "--no-fp16",
    )  # fmt: skip
    mined = [json.loads(line) for line in out.read_text().splitlines()]
    for want, got in zip(rows, mined, strict=True):
        assert list(got) == [k for k in want if not k.endswith("_scores")]
        assert {k: v for k, v in got.items() if k != "neg"} == {
            k: v for k, v in want.items() if k not in ("neg", "pos_scores", "neg_scores")
        }
        assert len(got["neg"]) == 2


def test_bad_mining_options_are_refused_before_the_model_loads(tmp_path):
    """--margin 2 was found only once the model had loaded (after the pool was read); here the unknown model
    would be the error if the options were checked later."""
    train = tmp_path / "train.jsonl"
    train.write_text(json.dumps({"query": "q", "pos": ["p"]}) + "\n")
    out = tmp_path / "o.jsonl"
    result = run("mine", "-m", "nobody/unknown", "-i", str(train), "-o", str(out), "--margin", "2", check=False)
    assert result.returncode == 2 and "margin must lie in (0, 1], got 2.0" in result.stderr, result.stderr
    assert "unknown" not in result.stderr and not out.exists()
