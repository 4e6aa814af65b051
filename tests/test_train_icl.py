"""ICL embedder training (bge-en-icl recipe) on the tiny golden Mistral: the training prompt is
the inference prompt token for token, examples come from other records of the task, the loss
falls, and the saved folder loads as the ICL family."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from bgekit import DataFormatError, Embedder, FlagICLModel, InputError
from bgekit.models.tokenization import TextTokenizer, load_hf_tokenizer
from bgekit.train.data import GroupSampler, load_train_data
from bgekit.train.embedder import EmbedderOptions, finetune_embedder
from bgekit.train.icl import ExamplePicker, ICLCollator, ICLDataset, ICLGroup, ICLOptions, check_icl_options

from .cli import run

INSTRUCTION = "Given a question about an item, find what it does."
LONG = " ".join(["doors"] * 200)


def records(n: int = 16, prompt: str | None = INSTRUCTION) -> list[dict]:
    rows = []
    for i in range(n):
        row = {
            "query": f"what does item {i} do?",
            "pos": [f"item {i} opens doors number {i}" + (" " + LONG if i == 1 else "")],
            "neg": [f"item {(i + 1) % n} closes windows", f"unrelated text {i}"],
        }
        if prompt is not None:
            row["prompt"] = prompt
        rows.append(row)
    return rows


def write(path, rows) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


@pytest.fixture(scope="module")
def icl_dir(golden_dir):
    return golden_dir / "models" / "mistral-icl"


@pytest.fixture(scope="module")
def tokenizer(icl_dir):
    return TextTokenizer(load_hf_tokenizer(icl_dir))


def icl_options(**kwargs) -> ICLOptions:
    return check_icl_options(ICLOptions(output_dir="unused", **kwargs), None)


@pytest.mark.parametrize("query_max_len", [12, 64])
def test_training_prompt_is_the_inference_prompt(icl_dir, tokenizer, query_max_len):
    """The key check: a training query with its examples is fed to the model exactly as
    FlagICLModel feeds the same query and examples, and embeds to the same vector."""
    options = icl_options(query_max_len=query_max_len, passage_max_len=32, query_instruction_for_retrieval="unused")
    examples = [
        {"instruct": INSTRUCTION, "query": "what does item 7 do?", "response": "item 7 opens doors number 7"},
        {"instruct": INSTRUCTION, "query": "Zürich café — 北京?", "response": "a long response " * 20},
    ]
    groups = [
        ICLGroup("what does item 3 do? " + LONG, ["p0", "p1"], None, INSTRUCTION, examples),
        ICLGroup("what does item 4 do?", ["p2", "p3"], None, INSTRUCTION, []),
    ]
    batch = ICLCollator(tokenizer, options)(groups)
    model = FlagICLModel(str(icl_dir), devices="cpu", query_instruction_for_retrieval=INSTRUCTION)
    want = [
        model.tokenize_queries([groups[0].query], query_max_len, model.examples_prefix(examples)).ids[0],
        model.tokenize_queries([groups[1].query], query_max_len, "").ids[0],
    ]
    mask = batch["query"]["attention_mask"].bool()
    got = [batch["query"]["input_ids"][i][mask[i]].tolist() for i in range(2)]
    assert got == want
    assert len(want[0]) > len(want[1]) + 20, "the examples are in the first prompt"
    passages = batch["passage"]["input_ids"][batch["passage"]["attention_mask"].bool()].tolist()
    assert passages == [t for ids in model.tokenize(["p0", "p1", "p2", "p3"], "passage", 32).ids for t in ids]

    # the vectors the trainer computes are the vectors inference computes
    net = model.model.float()
    with torch.no_grad():
        hidden = net(**batch["query"]).last_hidden_state
    trained = F.normalize(hidden[:, -1], dim=-1).numpy()  # left padding: the last column is the last token
    expected = np.stack(
        [
            model.encode_queries(groups[0].query, max_length=query_max_len, examples_for_task=examples),
            model.encode_queries(groups[1].query, max_length=query_max_len),  # built without examples: no prefix
        ]
    )
    np.testing.assert_allclose(trained, expected, atol=1e-5)


def test_examples_come_from_other_records_of_the_task(tmp_path, tokenizer):
    task_a = write(tmp_path / "a.jsonl", records(6))
    task_b = write(tmp_path / "b.jsonl", [dict(r, query=r["query"].replace("item", "tool")) for r in records(6)])
    loaded = load_train_data([task_a, task_b])
    options = icl_options(example_query_max_len=4, example_passage_max_len=5, max_examples=3)
    picker = ExamplePicker(loaded, tokenizer, options)
    dataset = ICLDataset(GroupSampler(loaded, 2, seed=1), picker, options)
    counts = set()
    for index in range(len(loaded)):
        group = dataset[index]
        counts.add(len(group.examples))
        word = "item" if index < 6 else "tool"
        for example in group.examples:
            assert example["instruct"] == INSTRUCTION
            assert word in example["query"], "examples come from the record's own task (file)"
            assert len(tokenizer.plain_ids([example["query"]])[0][0]) <= 4 + 1  # re-tokenizing a decoded cut
            assert len(tokenizer.plain_ids([example["response"]])[0][0]) <= 5 + 1
        own = picker.cut(index)
        assert own not in [(e["query"], e["response"]) for e in group.examples], "never the record itself"
    assert counts <= {0, 1, 2, 3} and len(counts) > 1
    assert picker.cut(1)[1] != loaded[1].pos[0], "a long positive is cut"
    roomy = ExamplePicker(loaded, tokenizer, icl_options(example_query_max_len=32, example_passage_max_len=32))
    assert roomy.cut(2) == (loaded[2].query, loaded[2].pos[0]), "texts that fit stay as they are"
    assert roomy.cut(1)[1] != loaded[1].pos[0]

    no_retrieval = icl_options(retrieval_use_examples=False)
    picker = ExamplePicker(loaded, tokenizer, no_retrieval)
    assert all(picker.pick(i, 0, INSTRUCTION) == [] for i in range(len(loaded)))
    loaded[0].type = "symmetric_sts"
    assert any(picker.pick(0, epoch, INSTRUCTION) for epoch in range(5)), "symmetric tasks keep their examples"


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"icl_suffix_str": "\nResponse:"}, "icl_suffix_str must be"),
        ({"sentence_pooling_method": "cls"}, "pool the last token"),
        ({"query_instruction_format": "{}"}, "query_instruction_format must have 2 {} slots"),
        ({"example_query_max_len": 0}, "example_query_max_len must be >= 1"),
    ],
)
def test_bad_icl_options_fail_before_training(tmp_path, icl_dir, options, message):
    data = write(tmp_path / "train.jsonl", records(4))
    with pytest.raises(InputError, match=message):
        finetune_embedder(
            ICLOptions(
                output_dir=str(tmp_path / "out"),
                model_name_or_path=str(icl_dir),
                train_data=[data],
                model_class="decoder-only-icl",
                **options,
            )
        )
    assert not (tmp_path / "out").exists()


def test_plain_embedder_options_dispatch_to_icl_training(tmp_path, icl_dir):
    data = write(tmp_path / "train.jsonl", records(4))
    options = EmbedderOptions(
        output_dir=str(tmp_path / "out"),
        model_name_or_path=str(icl_dir),
        train_data=[data],
        model_class="decoder-only-icl",
        sentence_pooling_method="mean",
    )
    with pytest.raises(InputError, match="ICL embedders pool the last token"):
        finetune_embedder(options)


def eval_loss(model: FlagICLModel, rows: list[dict]) -> float:
    """InfoNCE of each query (behind one example from another record) against every positive."""
    queries = [
        model.encode_queries(
            r["query"],
            examples_for_task=[{"query": rows[i - 1]["query"], "response": rows[i - 1]["pos"][0]}],
        )
        for i, r in enumerate(rows)
    ]
    passages = model.encode_corpus([r["pos"][0] for r in rows])
    scores = torch.from_numpy(np.stack(queries) @ passages.T) / 0.05
    return float(F.cross_entropy(scores, torch.arange(len(rows))))


def test_finetune_icl_cli_trains_and_saves_an_icl_model(tmp_path, icl_dir):
    rows = records(16)
    data = write(tmp_path / "train.jsonl", rows)
    out = tmp_path / "out"
    run(
        "finetune",
        "embedder",
        "--model",
        str(icl_dir),
        "--model-class",
        "decoder-only-icl",
        "--train-data",
        data,
        "--output-dir",
        str(out),
        "--max-steps",
        "6",
        "--per-device-train-batch-size",
        "4",
        "--learning-rate",
        "2e-3",
        "--query-max-len",
        "32",
        "--passage-max-len",
        "32",
        "--example-query-max-len",
        "16",
        "--example-passage-max-len",
        "16",
        "--save-steps",
        "3",
        "--logging-steps",
        "2",
    )
    meta = json.loads((out / "bgekit.json").read_text())
    assert meta["model_class"] == "decoder-only-icl" and meta["query_instruction_format"] == "<instruct>{}\n<query>{}"
    assert (out / "checkpoint-3" / "bgekit.json").exists(), "checkpoints load as ICL models too"
    history = json.loads((out / "checkpoint-6" / "trainer_state.json").read_text())["log_history"]
    assert any("loss" in h for h in history)

    trained = Embedder.from_pretrained(str(out), devices="cpu", query_instruction_for_retrieval=INSTRUCTION)
    assert isinstance(trained, FlagICLModel) and trained.pooling_method == "last_token"
    assert trained.query_instruction_format == "<instruct>{}\n<query>{}"
    before = FlagICLModel(str(icl_dir), devices="cpu", query_instruction_for_retrieval=INSTRUCTION)
    assert eval_loss(trained, rows) < eval_loss(before, rows) - 0.5, "training lowered the loss"


def test_icl_lora_merged_and_adapter_forms_agree(tmp_path, icl_dir):
    pytest.importorskip("peft")
    rows = records(8)
    out = tmp_path / "out"
    options = ICLOptions(
        output_dir=str(out),
        model_name_or_path=str(icl_dir),
        train_data=[write(tmp_path / "train.jsonl", rows)],
        model_class="decoder-only-icl",
        use_lora=True,
        lora_rank=4,
        lora_alpha=8.0,
        lora_dropout=0.0,
        max_steps=3,
        per_device_train_batch_size=4,
        learning_rate=5e-3,
        query_max_len=32,
        passage_max_len=32,
        example_query_max_len=16,
        example_passage_max_len=16,
        save_steps=100,
    )
    assert finetune_embedder(options) == out
    assert json.loads((out / "bgekit.json").read_text())["model_class"] == "decoder-only-icl"
    merged = Embedder.from_pretrained(
        str(out), devices="cpu", use_fp16=False, query_instruction_for_retrieval=INSTRUCTION
    )
    assert isinstance(merged, FlagICLModel)
    adapted = FlagICLModel(
        str(icl_dir), devices="cpu", use_fp16=False, query_instruction_for_retrieval=INSTRUCTION,
        peft_path=str(out / "adapter"),
    )  # fmt: skip
    base = FlagICLModel(str(icl_dir), devices="cpu", use_fp16=False, query_instruction_for_retrieval=INSTRUCTION)
    examples = [{"query": rows[0]["query"], "response": rows[0]["pos"][0]}]
    queries = [r["query"] for r in rows[1:4]]
    got = merged.encode_queries(queries, examples_for_task=examples)
    np.testing.assert_allclose(got, adapted.encode_queries(queries, examples_for_task=examples), atol=1e-5)
    assert np.abs(got - base.encode_queries(queries, examples_for_task=examples)).max() > 1e-4, "LoRA trained"
    from_adapter = Embedder.from_pretrained(  # OUT/adapter carries bgekit.json: the ICL family, merged over its base
        str(out / "adapter"), devices="cpu", use_fp16=False, query_instruction_for_retrieval=INSTRUCTION
    )
    assert isinstance(from_adapter, FlagICLModel)
    np.testing.assert_allclose(from_adapter.encode_queries(queries, examples_for_task=examples), got, atol=1e-5)


def test_symmetric_records_are_laid_out_as_icl_queries(tmp_path, icl_dir, tokenizer):
    """FlagEmbedding 1.4.2's ICL data: a ``symmetric_sts`` / ``symmetric_clustering`` record's passages are
    instructed and end with the ICL suffix, the prompt ``FlagICLModel.encode_queries`` gives a query without
    examples; a ``symmetric_clustering`` record answers as another query's example with its ``category``."""
    options = icl_options(passage_max_len=24, query_instruction_for_retrieval="unused")
    groups = [
        ICLGroup("a cat sits", ["a cat is sitting", "a dog runs " * 30], None, INSTRUCTION, [], type="symmetric_sts"),
        ICLGroup("what does item 4 do?", ["p2", "p3"], None, INSTRUCTION, []),
    ]
    batch = ICLCollator(tokenizer, options)(groups)
    model = FlagICLModel(str(icl_dir), devices="cpu", query_instruction_for_retrieval=INSTRUCTION)
    want = [model.tokenize_queries([p], 24, "").ids[0] for p in groups[0].passages]
    want += model.tokenize(["p2", "p3"], "passage", 24).ids
    mask = batch["passage"]["attention_mask"].bool()
    assert [batch["passage"]["input_ids"][i][mask[i]].tolist() for i in range(4)] == want

    rows = [dict(r, type="symmetric_clustering", category=f"topic {i}") for i, r in enumerate(records(4))]
    loaded = load_train_data(write(tmp_path / "clusters.jsonl", rows))
    picker = ExamplePicker(loaded, tokenizer, icl_options(example_passage_max_len=32))
    assert picker.cut(2) == (loaded[2].query, "topic 2")
    del rows[3]["category"]
    loaded = load_train_data(write(tmp_path / "clusters.jsonl", rows))
    with pytest.raises(DataFormatError, match=r"clusters.jsonl, line 4: .*'category'"):
        ExamplePicker(loaded, tokenizer, icl_options())
