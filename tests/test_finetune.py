"""Fine-tuning smoke tests on tiny models: the saved folders load everywhere, bad data fails
before training, a killed run resumes to the same step count, mining guards hold."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from bgekit import Embedder, FlagReranker, Reranker

from .cli import BGEKIT, run


@pytest.fixture(scope="module")
def train_file(tmp_path_factory):
    records = [
        {
            "query": f"what does item {i} do?",
            "pos": [f"item {i} opens doors number {i}"],
            "neg": [f"item {(i + 1) % 24} closes windows", f"unrelated text {i}", f"more noise {i}"],
        }
        for i in range(24)
    ]
    path = tmp_path_factory.mktemp("data") / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_finetune_embedder_saves_a_loadable_model(tmp_path, tiny_bert, train_file):
    out = tmp_path / "emb"
    run(
        "finetune",
        "embedder",
        "--model",
        str(tiny_bert),
        "--train-data",
        str(train_file),
        "--output-dir",
        str(out),
        "--max-steps",
        "4",
        "--per-device-train-batch-size",
        "4",
        "--learning-rate",
        "1e-3",
        "--sentence-pooling-method",
        "mean",
        "--query-instruction-for-retrieval",
        "query: ",
        "--logging-steps",
        "1",
    )
    model = Embedder.from_pretrained(str(out), devices="cpu")
    assert model.pooling_method == "mean" and model.query_instruction_for_retrieval == "query: "
    assert not (out / "bgekit.json").exists(), "an encoder's sentence-transformers files say it all"
    st = pytest.importorskip("sentence_transformers").SentenceTransformer(str(out), device="cpu")
    np.testing.assert_allclose(st.encode(["hello there"]), model.encode(["hello there"]), atol=1e-5)
    before = Embedder.from_pretrained(str(tiny_bert), pooling_method="mean").encode(["hello there"])
    assert np.abs(before - model.encode(["hello there"])).max() > 1e-4, "training changed the weights"


def test_unnormalized_training_reloads_unnormalized(tmp_path, tiny_bert, train_file):
    from bgekit.train.embedder import EmbedderOptions, finetune_embedder

    options = EmbedderOptions(
        output_dir=str(tmp_path / "raw"),
        model_name_or_path=str(tiny_bert),
        train_data=[str(train_file)],
        max_steps=1,
        per_device_train_batch_size=4,
        normalize_embeddings=False,
    )
    out = finetune_embedder(options)
    model = Embedder.from_pretrained(str(out), devices="cpu")
    assert model.normalize_embeddings is False
    st = pytest.importorskip("sentence_transformers").SentenceTransformer(str(out), device="cpu")
    np.testing.assert_allclose(st.encode(["hello there"]), model.encode(["hello there"]), atol=1e-5)
    assert abs(np.linalg.norm(model.encode("hello there")) - 1) > 1e-3


def test_finetune_reranker_saves_a_loadable_model(tmp_path, tiny_bert, train_file):
    out = tmp_path / "rr"
    run(
        "finetune",
        "reranker",
        "--model",
        str(tiny_bert),
        "--train-data",
        str(train_file),
        "--output-dir",
        str(out),
        "--max-steps",
        "3",
        "--per-device-train-batch-size",
        "2",
        "--train-group-size",
        "3",
        "--query-instruction-for-rerank",
        "query: ",
    )
    reranker = Reranker.from_pretrained(str(out), devices="cpu")
    assert isinstance(reranker, FlagReranker)
    pairs = [("q", "p"), ("q", "r")]
    scores = reranker.compute_score(pairs)
    assert len(scores) == 2
    # it scores with the instruction it trained with (recorded in bgekit.json), unless given another
    assert (reranker.query_instruction_for_rerank, reranker.passage_instruction_for_rerank) == ("query: ", None)
    np.testing.assert_allclose(scores, FlagReranker(str(out)).compute_score([("query: q", "p"), ("query: q", "r")]))
    other = Reranker.from_pretrained(str(out), devices="cpu", query_instruction_for_rerank="q: ")
    assert other.query_instruction_for_rerank == "q: "


def test_teacher_scores_in_bf16_are_the_library_bf16_scores(tmp_path, tiny_xlmr_reranker, train_file):
    scored = tmp_path / "scored.jsonl"
    run("score", "-r", str(tiny_xlmr_reranker), "-i", str(train_file), "-o", str(scored), "--bf16")
    rows = [json.loads(line) for line in scored.read_text().splitlines()]
    pairs = [(r["query"], p) for r in rows for p in r["pos"]]
    got = np.array([s for r in rows for s in r["pos_scores"]])
    bf16 = FlagReranker(str(tiny_xlmr_reranker), use_bf16=True, devices="cpu").compute_score(pairs)
    fp32 = FlagReranker(str(tiny_xlmr_reranker), devices="cpu").compute_score(pairs)
    np.testing.assert_allclose(got, bf16, atol=5e-3)  # bfloat16 rounding may follow the batch's shape
    assert np.abs(got - np.array(fp32)).max() > 1e-4  # and it did run in bfloat16


def test_teacher_scores_and_distillation(tmp_path, tiny_bert, tiny_xlmr_reranker, train_file):
    scored = tmp_path / "scored.jsonl"
    run("score", "--reranker", str(tiny_xlmr_reranker), "--input", str(train_file), "--output", str(scored))
    rows = [json.loads(line) for line in scored.read_text().splitlines()]
    assert all(len(r["pos_scores"]) == len(r["pos"]) and len(r["neg_scores"]) == len(r["neg"]) for r in rows)
    expected = FlagReranker(str(tiny_xlmr_reranker)).compute_score([(rows[0]["query"], rows[0]["pos"][0])])[0]
    assert rows[0]["pos_scores"][0] == pytest.approx(expected, abs=1e-5)
    run(
        "finetune",
        "embedder",
        "--model",
        str(tiny_bert),
        "--train-data",
        str(scored),
        "--output-dir",
        str(tmp_path / "kd"),
        "--max-steps",
        "2",
        "--per-device-train-batch-size",
        "4",
    )
    assert (tmp_path / "kd" / "model.safetensors").exists()
    run(  # rerankers distil from the same scores (FlagEmbedding's reranker loss)
        "finetune", "reranker", "--model", str(tiny_xlmr_reranker), "--train-data", str(scored),
        "--output-dir", str(tmp_path / "kd-rr"), "--max-steps", "2", "--per-device-train-batch-size", "4",
    )  # fmt: skip
    assert (tmp_path / "kd-rr" / "model.safetensors").exists()


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ('{"query": "q", "neg": ["n"]}', "line 3: missing 'pos'"),
        ('{"query": "q", "pos": ["p"], "neg": "n"}', "line 3: 'neg' must be a list"),
        ('{"query": "q", "pos": ["p"], "pos_scores": [1, 2]}', "line 3: 'pos_scores' has 2 scores"),
    ],
)
def test_bad_training_data_fails_before_training(tmp_path, tiny_bert, train_file, line, message):
    good = train_file.read_text().splitlines()
    bad = tmp_path / "bad.jsonl"
    bad.write_text("\n".join([good[0], good[1], line, good[2]]) + "\n")
    out = tmp_path / "never"
    result = run(
        "finetune",
        "embedder",
        "--model",
        str(tiny_bert),
        "--train-data",
        str(bad),
        "--output-dir",
        str(out),
        check=False,
    )
    assert result.returncode == 2 and message in result.stderr and str(bad) in result.stderr
    assert not out.exists(), "nothing may be written when the data is bad"
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    result = run(
        "finetune",
        "reranker",
        "--model",
        str(tiny_bert),
        "--train-data",
        str(empty),
        "--output-dir",
        str(out),
        check=False,
    )
    assert result.returncode == 2 and "holds no records" in result.stderr


def test_killed_run_resumes_to_the_same_step_count(tmp_path, tiny_bert, train_file):
    out = tmp_path / "resume"
    args = [
        BGEKIT,
        "finetune",
        "embedder",
        "--model",
        str(tiny_bert),
        "--train-data",
        str(train_file),
        "--output-dir",
        str(out),
        "--max-steps",
        "60",
        "--save-steps",
        "5",
        "--per-device-train-batch-size",
        "8",
        "--passage-max-len",
        "64",
    ]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    deadline = time.time() + 240
    while not (out / "checkpoint-5" / "trainer_state.json").exists() and time.time() < deadline:
        assert process.poll() is None, "training ended before the first checkpoint"
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not (out / "model.safetensors").exists(), "the run must have been killed before the end"
    steps_done = max(int(p.name.split("-")[1]) for p in out.glob("checkpoint-*"))
    assert steps_done < 60
    result = subprocess.run(
        [*args, "--resume-from-checkpoint", "auto"], capture_output=True, text=True, env=env, timeout=600
    )
    assert result.returncode == 0, result.stderr[-2000:]
    state = json.loads((out / "checkpoint-60" / "trainer_state.json").read_text())
    assert state["global_step"] == 60 and state["max_steps"] == 60
    assert any("tokens_per_second" in entry for entry in state["log_history"]), "throughput reaches checkpoints"
    assert (out / "model.safetensors").exists()


def test_an_earlier_run_in_the_output_dir_is_kept_unless_asked(tmp_path, tiny_bert, train_file):
    """A new run into a folder holding one is refused before the model loads (the Trainer's checkpoint
    rotation would delete the earlier checkpoints); resuming or --overwrite-output-dir go ahead."""
    out = tmp_path / "run"
    (out / "checkpoint-40").mkdir(parents=True)
    (out / "checkpoint-40" / "trainer_state.json").write_text("{}")
    base = ["finetune", "embedder", "-m", str(tiny_bert), "--train-data", str(train_file), "--output-dir", str(out)]
    refused = run(*base, "--max-steps", "1", check=False)
    assert refused.returncode == 2 and "already holds a run (checkpoint-40)" in refused.stderr, refused.stderr
    assert "Traceback" not in refused.stderr
    run(*base, "--max-steps", "1", "--per-device-train-batch-size", "4", "--overwrite-output-dir")
    assert (out / "checkpoint-40").exists() and (out / "model.safetensors").exists()


@pytest.mark.parametrize("where", ["a-file", "a-file/run"])
def test_an_output_dir_that_cannot_be_a_folder_is_refused_before_the_model_loads(tmp_path, train_file, where):
    """A file where the run folder goes, or a file above it: the Trainer failed with FileExistsError /
    NotADirectoryError after the model had loaded."""
    (tmp_path / "a-file").write_text("not a folder")
    out = tmp_path / where
    args = ["finetune", "embedder", "-m", str(tmp_path / "no-such-model"), "--train-data", str(train_file)]
    refused = run(*args, "--output-dir", str(out), check=False)
    assert refused.returncode == 2 and "Traceback" not in refused.stderr, refused.stderr
    assert f"output folder {out}" in refused.stderr and "a-file" in refused.stderr, refused.stderr
    assert (tmp_path / "a-file").read_text() == "not a folder"


def test_resume_auto_takes_the_newest_complete_checkpoint(tmp_path):
    from bgekit.errors import InputError
    from bgekit.train.trainer import resolve_resume

    for name, complete in (("checkpoint-5", True), ("checkpoint-10", True), ("checkpoint-15", False)):
        (tmp_path / name).mkdir()
        if complete:
            (tmp_path / name / "trainer_state.json").write_text("{}")
    (tmp_path / "checkpoint-best").mkdir()  # not the Trainer's name
    assert resolve_resume("auto", str(tmp_path)) == str(tmp_path / "checkpoint-10")
    assert resolve_resume("auto", str(tmp_path / "empty")) is None
    with pytest.raises(InputError, match="not a complete checkpoint"):
        resolve_resume(str(tmp_path / "checkpoint-15"), str(tmp_path))


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["embedder", "--matryoshka-dims", "16,abc"], "expected whole numbers"),  # typer's usage box
        (["reranker", "--cutoff-layers", "1,x"], "expected whole numbers"),
        (["embedder", "--matryoshka-dims", "16,64"], "matryoshka_dims [16, 64] go past the model's 32 dimensions"),
        (["embedder", "--query-instruction-format", "{}: {}{}"], "query_instruction_format must have 2 {} slots"),
    ],
)
def test_bad_options_are_one_clear_line(tmp_path, tiny_bert, train_file, args, message):
    command, *rest = args
    result = run(
        "finetune", command, "-m", str(tiny_bert), "--train-data", str(train_file), "--output-dir",
        str(tmp_path / "o"), "--max-steps", "1", *rest, check=False,
    )  # fmt: skip
    assert result.returncode == 2 and message in result.stderr.replace("\n", " "), result.stderr
    assert "Traceback" not in result.stderr


def test_mining_guards(tmp_path, minilm_dir):
    from bgekit.train.data import TrainRecord
    from bgekit.train.mining import MiningOptions, mine_hard_negatives

    corpus = [
        "The giant panda eats bamboo in the mountains of China.",
        "Giant pandas feed almost entirely on bamboo shoots and leaves.",  # a near-duplicate positive
        "what do giant pandas eat?",  # the query itself sits in the corpus
        "Red pandas also eat bamboo but are not bears.",
        "Paris is the capital of France.",
        "The stock market fell sharply on Monday.",
        "Bamboo is a fast-growing grass.",
        "Koalas eat eucalyptus leaves.",
    ]
    record = TrainRecord("what do giant pandas eat?", [corpus[0]], [])
    embedder = Embedder.from_pretrained(str(minilm_dir))
    loose, _ = mine_hard_negatives([record], embedder, corpus, MiningOptions((0, 8), 7, margin=None))
    assert corpus[0] not in loose[0].neg and record.query not in loose[0].neg
    assert corpus[1] in loose[0].neg, "without the guard the near-duplicate is taken as a negative"
    guarded, stats = mine_hard_negatives([record], embedder, corpus, MiningOptions((0, 8), 7, margin=0.9))
    assert corpus[1] not in guarded[0].neg and stats["margin"] >= 1
    assert corpus[0] not in guarded[0].neg and record.query not in guarded[0].neg
    pos_score = float(embedder.encode_queries(record.query) @ embedder.encode_corpus(corpus[0]))
    kept = embedder.encode_queries([record.query]) @ embedder.encode_corpus(guarded[0].neg).T
    assert (kept <= 0.9 * pos_score + 1e-6).all()
    capped, stats = mine_hard_negatives(
        [record], embedder, corpus, MiningOptions((0, 8), 7, margin=None, max_score=0.3)
    )
    scores = embedder.encode_queries([record.query]) @ embedder.encode_corpus(capped[0].neg).T
    assert (scores <= 0.3 + 1e-6).all() and stats["max_score"] >= 1


def test_mine_cli(tmp_path, minilm_dir, train_file):
    out = tmp_path / "mined.jsonl"
    run(
        "mine",
        "--model",
        str(minilm_dir),
        "--input",
        str(train_file),
        "--output",
        str(out),
        "--range-for-sampling",
        "0-10",
        "--negative-number",
        "2",
    )
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 24 and all(len(r["neg"]) <= 2 for r in rows)
    assert all(not set(r["neg"]) & set(r["pos"]) and r["query"] not in r["neg"] for r in rows)
    result = run(
        "mine",
        "--model",
        str(minilm_dir),
        "--input",
        str(train_file),
        "--output",
        str(out),
        "--range-for-sampling",
        "10-5",
        check=False,
    )
    assert result.returncode == 2 and "range_for_sampling" in result.stderr


def test_python_module_entry_point():
    result = subprocess.run(
        [sys.executable, "-m", "bgekit.train", "finetune", "--help"], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0 and "embedder" in result.stdout


def test_a_resumed_run_ends_with_the_uninterrupted_runs_weights(tmp_path, tiny_bert, train_file):
    """Resuming mid-epoch (the second epoch, whose negatives are drawn afresh) from a checkpoint gives
    the very weights of the run that never stopped: model, optimizer, schedule, RNG and data order all
    come back. (transformers 5.0.0 saves LayerNorms as gamma/beta; its Trainer loaded them back as
    missing keys, leaving the starting LayerNorms.)"""
    import shutil

    from safetensors.torch import load_file

    from bgekit.train.embedder import EmbedderOptions, finetune_embedder

    def train(out, resume=None):
        finetune_embedder(
            EmbedderOptions(
                output_dir=str(out),
                model_name_or_path=str(tiny_bert),
                train_data=[str(train_file)],
                num_train_epochs=2,
                per_device_train_batch_size=8,
                train_group_size=3,
                learning_rate=1e-3,
                passage_max_len=32,
                save_steps=2,
                save_total_limit=None,
                resume_from_checkpoint=resume,
            )
        )
        return load_file(str(out / "model.safetensors"))

    whole = train(tmp_path / "whole")  # 24 records, 8 a step: steps 1-3 are epoch 1, 4-6 epoch 2
    resumed_dir = tmp_path / "resumed"
    shutil.copytree(tmp_path / "whole" / "checkpoint-4", resumed_dir / "checkpoint-4")
    resumed = train(resumed_dir, "auto")
    assert set(resumed) == set(whole)
    start = load_file(str(tmp_path / "whole" / "checkpoint-4" / "model.safetensors"))
    assert any(not torch.equal(start[k], whole[k]) for k in whole), "the last steps changed the weights"
    for key in whole:
        assert torch.equal(resumed[key], whole[key]), key


def test_a_record_prompt_replaces_the_instruction_only_when_there_is_one(tiny_bert):
    """FlagEmbedding 1.4.2's rule: without a query instruction the saved model asks plain queries, so
    training uses none either (a record's prompt was prepended all the same); with one, the record's
    prompt takes its place."""
    from bgekit.models.tokenization import TextTokenizer, load_hf_tokenizer
    from bgekit.train.data import Group
    from bgekit.train.embedder import EmbedderCollator, EmbedderOptions

    tokenizer = TextTokenizer(load_hf_tokenizer(tiny_bert))
    groups = [Group("what is a door", ["a door opens"], None, "Find a passage: "), Group("q", ["p"], None, None)]
    plain = EmbedderCollator(tokenizer, EmbedderOptions(output_dir="unused"))
    assert [plain.query_text(g) for g in groups] == ["what is a door", "q"]
    instructed = EmbedderCollator(
        tokenizer, EmbedderOptions(output_dir="unused", query_instruction_for_retrieval="Q: ")
    )
    assert [instructed.query_text(g) for g in groups] == ["Find a passage: what is a door", "Q: q"]


def test_cross_encoder_training_pairs_carry_the_rerank_instructions(tmp_path, tiny_bert, train_file):
    """--query/passage-instruction-for-rerank reach a cross-encoder's training pairs (they were ignored),
    as FlagReranker lays them out at inference; a record's prompt takes the query instruction's place
    (FlagEmbedding's rule), and --prompt, which only LLM rerankers read, is refused."""
    from bgekit import InputError
    from bgekit.models.tokenization import TextTokenizer, load_hf_tokenizer
    from bgekit.train.data import Group
    from bgekit.train.reranker import RerankerCollator, RerankerOptions, finetune_reranker

    options = RerankerOptions(
        output_dir="unused",
        query_instruction_for_rerank="query: ",
        passage_instruction_for_rerank="passage: ",
        query_max_len=16,
        max_len=40,
    )
    collate = RerankerCollator(TextTokenizer(load_hf_tokenizer(tiny_bert)), options)
    groups = [Group("what opens doors", ["a key opens doors", "a cat"], None, None)]
    batch = collate([*groups, Group("where is it", ["here", "there"], None, "find: ")])
    inference = FlagReranker(
        str(tiny_bert), query_instruction_for_rerank="query: ", passage_instruction_for_rerank="passage: "
    )
    expected = inference.tokenize_pairs(
        [("what opens doors", "a key opens doors"), ("what opens doors", "a cat")], 16, 40
    )
    ids, mask = batch["pairs"]["input_ids"], batch["pairs"]["attention_mask"].bool()
    assert [row[keep].tolist() for row, keep in zip(ids[:2], mask[:2], strict=True)] == expected.ids
    prompted = TextTokenizer(load_hf_tokenizer(tiny_bert)).encode_pairs(
        ["find: where is it"], ["passage: here"], 16, 40
    )
    assert ids[2][mask[2]].tolist() == prompted.ids[0]
    with pytest.raises(InputError, match="cross-encoder has none"):
        finetune_reranker(
            RerankerOptions(
                output_dir=str(tmp_path / "out"),
                model_name_or_path=str(tiny_bert),
                train_data=[str(train_file)],
                prompt="?",
            )
        )


def test_lengths_past_the_position_table_train_at_the_table_length(tmp_path, golden_dir, caplog):
    """A length option past the model's positions is cut to them with a warning, as inference cuts
    max_length (training stopped at the first long batch with a tensor-size error inside the model)."""
    from bgekit.train.embedder import EmbedderOptions, finetune_embedder
    from bgekit.train.m3 import M3Options, finetune_m3
    from bgekit.train.pretrain import PretrainOptions, pretrain
    from bgekit.train.reranker import RerankerOptions, finetune_reranker

    from .tiny_models import build_bert

    base = build_bert(tmp_path / "short", golden_dir / "models" / "bert-cls", max_positions=24)
    long = " ".join(f"word{i}" for i in range(80))
    data = tmp_path / "long.jsonl"
    data.write_text(
        "".join(json.dumps({"query": f"{i} {long}", "pos": [long], "neg": [long]}) + "\n" for i in range(4))
    )
    (tmp_path / "long.txt").write_text(f"{long}\n" * 4)
    common = {"model_name_or_path": str(base), "max_steps": 1, "per_device_train_batch_size": 2, "save_steps": 100}
    runs = [
        (finetune_embedder, EmbedderOptions, {"query_max_len": 40, "passage_max_len": 64, "train_group_size": 2}),
        (finetune_reranker, RerankerOptions, {"query_max_len": 40, "max_len": 64, "train_group_size": 2}),
        (finetune_m3, M3Options, {"query_max_len": 40, "passage_max_len": 64, "train_group_size": 2}),
        (pretrain, PretrainOptions, {"max_seq_length": 64}),
    ]
    for train, make, lengths in runs:
        source = tmp_path / ("long.txt" if train is pretrain else "long.jsonl")
        options = make(output_dir=str(tmp_path / train.__name__), train_data=[str(source)], **common, **lengths)
        caplog.clear()
        with caplog.at_level("WARNING", logger="bgekit.train.trainer"):
            train(options)
        for name in lengths:
            if name != "train_group_size":
                assert getattr(options, name) == 24, (train.__name__, name)
                assert f"{name}={lengths[name]} is beyond the model's 24 positions" in caplog.text


def test_symmetric_records_encode_their_passages_as_queries(tiny_bert):
    """FlagEmbedding 1.4.2's ``symmetric_sts`` / ``symmetric_clustering`` records compare texts of one kind:
    their passages take the query's instruction (the record's prompt), not the passage instruction; other
    records' passages are as before. They were all given the passage instruction."""
    from bgekit.models.tokenization import TextTokenizer, load_hf_tokenizer
    from bgekit.train.data import Group
    from bgekit.train.embedder import EmbedderCollator, EmbedderOptions

    tokenizer = TextTokenizer(load_hf_tokenizer(tiny_bert))
    options = EmbedderOptions(
        output_dir="unused", query_instruction_for_retrieval="Q: ", passage_instruction_for_retrieval="P: "
    )
    collator = EmbedderCollator(tokenizer, options)
    groups = [
        Group("a cat sits", ["a cat is sitting", "a dog runs"], None, "Same meaning: ", type="symmetric_sts"),
        Group("apples", ["pears", "cars"], None, None, type="symmetric_clustering"),
        Group("what is a door", ["a door opens", "a window"], None, None, type="retrieval"),
    ]
    assert [collator.passage_texts(g) for g in groups] == [
        ["Same meaning: a cat is sitting", "Same meaning: a dog runs"],
        ["Q: pears", "Q: cars"],
        ["P: a door opens", "P: a window"],
    ]
    batch = collator(groups)
    want = tokenizer.encode([t for g in groups for t in collator.passage_texts(g)], options.passage_max_len)
    mask = batch["passage"]["attention_mask"].bool()
    assert [batch["passage"]["input_ids"][i][mask[i]].tolist() for i in range(6)] == want.ids


def test_fix_position_embedding_keeps_the_position_table(tmp_path, tiny_bert, train_file):
    """--fix-position-embedding (FlagEmbedding's option) freezes the position embeddings; the rest trains."""
    from transformers import AutoModel

    out = tmp_path / "fixed-positions"
    run(
        "finetune",
        "embedder",
        "--model",
        str(tiny_bert),
        "--train-data",
        str(train_file),
        "--output-dir",
        str(out),
        "--max-steps",
        "2",
        "--per-device-train-batch-size",
        "4",
        "--learning-rate",
        "1e-3",
        "--fix-position-embedding",
    )
    # loaded, not read from the files: transformers 5.0 saves LayerNorm weights as gamma / beta
    start = AutoModel.from_pretrained(str(tiny_bert)).state_dict()
    end = AutoModel.from_pretrained(str(out)).state_dict()
    positions = [k for k in start if "position_embeddings" in k]
    assert positions, "the tiny BERT has a position table"
    assert all(torch.equal(start[k], end[k]) for k in positions), "the position table must not move"
    assert not torch.equal(start["embeddings.word_embeddings.weight"], end["embeddings.word_embeddings.weight"])


def test_knowledge_distillation_switch(tmp_path, tiny_bert, train_file):
    """``knowledge_distillation`` as FlagEmbedding's: False trains on scored records exactly as on the same
    records without scores; unset (bgekit's default) distils when they are there; True needs them."""
    from safetensors.torch import load_file

    from bgekit.errors import InputError
    from bgekit.train.embedder import EmbedderOptions, finetune_embedder
    from bgekit.train.reranker import RerankerOptions, finetune_reranker

    rows = [json.loads(line) for line in train_file.read_text().splitlines()]
    scored = tmp_path / "scored.jsonl"
    scored.write_text(
        "".join(
            json.dumps({**r, "pos_scores": [3.0], "neg_scores": [2.5 - i % 3 for i in range(len(r["neg"]))]}) + "\n"
            for r in rows
        )
    )

    def weights(data, name, **options):
        out = finetune_embedder(
            EmbedderOptions(
                output_dir=str(tmp_path / name),
                model_name_or_path=str(tiny_bert),
                train_data=[str(data)],
                max_steps=2,
                per_device_train_batch_size=4,
                learning_rate=1e-3,
                **options,
            )
        )
        return load_file(str(out / "model.safetensors"))

    plain = weights(train_file, "plain")
    ignored = weights(scored, "ignored", knowledge_distillation=False)
    distilled = weights(scored, "distilled")
    assert all(torch.equal(plain[k], ignored[k]) for k in plain), "scores switched off are not used"
    assert any(not torch.equal(plain[k], distilled[k]) for k in plain), "by default the scores are distilled"
    with pytest.raises(InputError, match=r"train\.jsonl:1 has none"):
        weights(train_file, "needs-scores", knowledge_distillation=True)
    with pytest.raises(InputError, match="knowledge_distillation needs teacher scores"):
        finetune_reranker(
            RerankerOptions(
                output_dir=str(tmp_path / "rr"),
                model_name_or_path=str(tiny_bert),
                train_data=[str(train_file)],
                knowledge_distillation=True,
            )
        )
    result = run(
        "finetune", "reranker", "-m", str(tiny_bert), "--train-data", str(train_file), "--output-dir",
        str(tmp_path / "o"), "--knowledge-distillation", check=False,
    )  # fmt: skip
    assert result.returncode == 2 and "has none" in result.stderr and "Traceback" not in result.stderr
