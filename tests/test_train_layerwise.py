"""Layerwise LLM reranker training on the tiny golden MiniCPM layerwise model: batches are the
inference class's own pairs, the loss falls at every trained cutoff layer, and the saved folder
scores in LayerWiseFlagLLMReranker."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from bgekit import InputError, LayerWiseFlagLLMReranker, Reranker
from bgekit.train.data import Group
from bgekit.train.layerwise import LayerwiseCollator, LayerwiseOptions, finetune_layerwise, layerwise_loss
from bgekit.train.reranker import RerankerOptions, finetune_reranker

from .cli import run

GROUP = 3


def records(n: int = 16) -> list[dict]:
    return [
        {
            "query": f"what does item {i} do?",
            "pos": [f"item {i} opens doors number {i}"],
            "neg": [f"item {(i + 1) % n} closes windows", f"unrelated text {i} " * (1 + i % 3)],
        }
        for i in range(n)
    ]


@pytest.fixture(scope="module")
def layerwise_dir(golden_dir):
    return golden_dir / "models" / "minicpm-layerwise"


@pytest.fixture(scope="module")
def train_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records()))
    return path


def group_ce(reranker: LayerWiseFlagLLMReranker, rows: list[dict], layers: list[int]) -> list[float]:
    """Group cross-entropy (positive first) of the inference scores at each layer."""
    pairs = [(r["query"], p) for r in rows for p in r["pos"][:1] + r["neg"][: GROUP - 1]]
    scores = reranker.compute_score(pairs, cutoff_layers=layers)
    return [
        float(F.cross_entropy(torch.tensor(s).view(-1, GROUP), torch.zeros(len(rows), dtype=torch.long)))
        for s in scores
    ]


def test_training_batch_is_the_inference_input(layerwise_dir):
    """The collated pairs are tokenize_pairs' ids, and the trained module scores them as compute_score does."""
    reranker = LayerWiseFlagLLMReranker(str(layerwise_dir), devices="cpu")
    options = LayerwiseOptions(output_dir="unused", query_max_len=8, max_len=16)
    groups = [Group("what is panda? " * 5, ["The giant panda is a bear. " * 9, "Paris"], None, None)]
    batch = LayerwiseCollator(reranker, options)(groups)["pairs"]
    pairs = [(groups[0].query, p) for p in groups[0].passages]
    want = reranker.tokenize_pairs(pairs, 8, 16).ids
    mask = batch["attention_mask"].bool()
    assert [batch["input_ids"][i][mask[i]].tolist() for i in range(2)] == want
    assert batch["input_ids"].shape[1] % 8 == 0
    with torch.no_grad():
        trained = reranker.model(batch["input_ids"], batch["attention_mask"], cutoff_layers=[1, 2])
    expected = reranker.compute_score(pairs, query_max_length=8, max_length=16, cutoff_layers=[1, 2])
    np.testing.assert_allclose(trained.T.numpy(), np.array(expected), atol=1e-5)


def test_layerwise_loss_combines_layers_as_flagembedding():
    torch.manual_seed(0)
    scores = torch.randn(2 * GROUP, 2, requires_grad=True)
    ce = [F.cross_entropy(scores[:, i].view(2, GROUP), torch.zeros(2, dtype=torch.long)) for i in range(2)]
    deepest = F.softmax(scores[:, 1].detach().view(2, GROUP), dim=-1)
    self_kd = -(deepest * F.log_softmax(scores[:, 0].view(2, GROUP), dim=-1)).sum(-1).mean()
    assert torch.allclose(layerwise_loss(scores, GROUP), ce[0] + ce[1] + self_kd)
    teacher = torch.randn(2, GROUP)
    target = F.softmax(teacher, dim=-1)
    kd = [-(target * F.log_softmax(scores[:, i].view(2, GROUP), dim=-1)).sum(-1).mean() for i in range(2)]
    assert torch.allclose(layerwise_loss(scores, GROUP, teacher), ce[0] + ce[1] + kd[0] + kd[1])
    layerwise_loss(scores, GROUP).backward()
    assert scores.grad[:, 0].abs().sum() > 0 and scores.grad[:, 1].abs().sum() > 0


def test_finetune_layerwise_cli_lowers_the_loss_at_each_layer(tmp_path, layerwise_dir, train_file):
    out = tmp_path / "out"
    run(
        "finetune",
        "reranker",
        "--model",
        str(layerwise_dir),
        "--train-data",
        str(train_file),
        "--output-dir",
        str(out),
        "--cutoff-layers",
        "1,2",
        "--max-steps",
        "10",
        "--per-device-train-batch-size",
        "4",
        "--train-group-size",
        str(GROUP),
        "--learning-rate",
        "5e-3",
        "--max-len",
        "32",
        "--query-max-len",
        "16",
        "--save-steps",
        "5",
    )
    trained = Reranker.from_pretrained(str(out), devices="cpu")
    assert isinstance(trained, LayerWiseFlagLLMReranker)
    scores = trained.compute_score([("q", "p"), ("q", "r")], cutoff_layers=[1, 2])
    assert len(scores) == 2 and all(len(s) == 2 for s in scores)
    rows = records()
    before = group_ce(LayerWiseFlagLLMReranker(str(layerwise_dir), devices="cpu"), rows, [1, 2])
    after = group_ce(trained, rows, [1, 2])
    assert all(a < b - 0.2 for a, b in zip(after, before, strict=True)), (before, after)
    checkpoint = Reranker.from_pretrained(str(out / "checkpoint-5"), devices="cpu")
    assert len(checkpoint.compute_score([("q", "p")], cutoff_layers=[1, 2])) == 2, "checkpoints load too"


def test_resume_from_checkpoint_reaches_the_same_step(tmp_path, layerwise_dir, train_file):
    options = RerankerOptions(
        output_dir=str(tmp_path / "out"),
        model_name_or_path=str(layerwise_dir),
        train_data=[str(train_file)],
        max_steps=2,
        per_device_train_batch_size=2,
        train_group_size=GROUP,
        max_len=24,
        query_max_len=12,
        save_steps=1,
    )
    finetune_reranker(options)
    options.max_steps = 3
    options.resume_from_checkpoint = "auto"
    finetune_reranker(options)
    state = json.loads((tmp_path / "out" / "checkpoint-3" / "trainer_state.json").read_text())
    assert state["global_step"] == 3
    LayerWiseFlagLLMReranker(str(tmp_path / "out"), devices="cpu").compute_score([("q", "p")])


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"cutoff_layers": [0, 2]}, r"cutoff_layers \[0\] have no score head"),
        ({"start_layer": 3}, "start_layer must be an int in"),
        ({"start_layer": 1, "cutoff_layers": [2]}, "not both"),
        ({"additional_special_tokens": ["<x>"]}, "additional_special_tokens is not supported"),
        ({"use_lora": True, "lora_rank": 0}, "lora_rank must be"),
        ({"gradient_checkpointing": True}, "gradient_checkpointing is not supported"),
    ],
)
def test_bad_layerwise_options_fail_before_training(tmp_path, layerwise_dir, train_file, options, message):
    with pytest.raises(InputError, match=message):
        finetune_layerwise(
            LayerwiseOptions(
                output_dir=str(tmp_path / "out"),
                model_name_or_path=str(layerwise_dir),
                train_data=[str(train_file)],
                **options,
            )
        )
    assert not (tmp_path / "out").exists()


def test_finetune_layerwise_with_lora_saves_a_merged_model_and_its_adapter(tmp_path, layerwise_dir, train_file):
    """--lora (FlagEmbedding's default for layerwise rerankers) trains an adapter: OUT is the merged model,
    OUT/adapter loads over the base as peft_path with the same scores, checkpoints hold adapters, and a
    run resumes from one."""
    pytest.importorskip("peft")
    out = tmp_path / "out"
    args = [
        "finetune",
        "reranker",
        "--model",
        str(layerwise_dir),
        "--train-data",
        str(train_file),
        "--output-dir",
        str(out),
        "--cutoff-layers",
        "1,2",
        "--per-device-train-batch-size",
        "4",
        "--train-group-size",
        str(GROUP),
        "--learning-rate",
        "5e-3",
        "--max-len",
        "32",
        "--query-max-len",
        "16",
        "--save-steps",
        "5",
        "--lora",
        "--lora-rank",
        "8",
        "--lora-dropout",
        "0",
    ]
    run(*args, "--max-steps", "5")
    run(*args, "--max-steps", "10", "--resume-from-checkpoint", "auto")
    state = json.loads((out / "checkpoint-10" / "trainer_state.json").read_text())
    assert state["global_step"] == 10
    assert (out / "checkpoint-5" / "adapter" / "adapter_config.json").exists()
    merged = Reranker.from_pretrained(str(out), devices="cpu")
    assert isinstance(merged, LayerWiseFlagLLMReranker)
    adapter = LayerWiseFlagLLMReranker(str(layerwise_dir), peft_path=str(out / "adapter"), devices="cpu")
    pairs = [(r["query"], p) for r in records()[:4] for p in r["pos"] + r["neg"]]
    np.testing.assert_allclose(
        merged.compute_score(pairs, cutoff_layers=[1, 2]), adapter.compute_score(pairs, cutoff_layers=[1, 2]), atol=1e-5
    )
    alone = Reranker.from_pretrained(str(out / "adapter"), devices="cpu")  # its base with it, as it trained
    assert isinstance(alone, LayerWiseFlagLLMReranker)
    np.testing.assert_allclose(
        merged.compute_score(pairs, cutoff_layers=[1, 2]), alone.compute_score(pairs, cutoff_layers=[1, 2]), atol=1e-5
    )
    rows = records()
    before = group_ce(LayerWiseFlagLLMReranker(str(layerwise_dir), devices="cpu"), rows, [1, 2])
    after = group_ce(merged, rows, [1, 2])
    # the score heads stay frozen (FlagEmbedding's LoRA default): layer 1 has one adapted layer below it
    assert all(a < b for a, b in zip(after, before, strict=True)) and after[-1] < before[-1] - 0.2, (before, after)
