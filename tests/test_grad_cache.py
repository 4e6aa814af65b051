"""Gradient cache (``sub_batch_size``): the same training result as the whole-batch step."""

from __future__ import annotations

import json

import pytest
import torch

from bgekit.errors import InputError
from bgekit.train import grad_cache
from bgekit.train.embedder import EmbedderOptions, finetune_embedder


@pytest.fixture(scope="module")
def train_file(tmp_path_factory):
    records = [
        {
            "query": f"what does item {i} do?",
            "pos": [f"item {i} opens doors number {i}"],
            "neg": [f"item {(i + 1) % 16} closes windows", f"unrelated text {i}"],
            "pos_scores": [3.0],
            "neg_scores": [0.5, -1.0],
        }
        for i in range(16)
    ]
    path = tmp_path_factory.mktemp("gc") / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


@pytest.fixture(scope="module")
def bert_without_dropout(tmp_path_factory, golden_dir):
    """Dropout off, so the whole-batch and sub-batched steps see identical forwards."""
    from .tiny_models import build_bert

    folder = build_bert(tmp_path_factory.mktemp("gc") / "bert", golden_dir / "models" / "bert-cls")
    config = json.loads((folder / "config.json").read_text())
    config.update(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def _train(model, data, out, sub_batch_size, **extra):
    options = EmbedderOptions(
        output_dir=str(out),
        model_name_or_path=str(model),
        train_data=[str(data)],
        max_steps=3,
        per_device_train_batch_size=8,
        train_group_size=3,
        learning_rate=1e-3,
        warmup_ratio=0.0,
        query_max_len=16,
        passage_max_len=16,
        sentence_pooling_method="mean",
        sub_batch_size=sub_batch_size,
        save_steps=1000,
        **extra,
    )
    return _weights(finetune_embedder(options))


def _weights(folder) -> dict[str, torch.Tensor]:
    """Loaded, not read from the file: transformers 5.0 writes some LayerNorm names differently."""
    from transformers import AutoModel

    return AutoModel.from_pretrained(str(folder)).state_dict()


@pytest.mark.parametrize("extra", [{}, {"matryoshka_dims": [32, 16]}], ids=["info_nce+kd", "matryoshka+kd"])
def test_sub_batches_train_like_the_whole_batch(tmp_path, bert_without_dropout, train_file, extra):
    whole = _train(bert_without_dropout, train_file, tmp_path / "whole", None, **extra)
    cached = _train(bert_without_dropout, train_file, tmp_path / "cached", 5, **extra)
    start = _weights(bert_without_dropout)
    moved = max((whole[k] - start[k]).abs().max().item() for k in start)
    assert moved > 1e-3, "training must change the weights for the comparison to mean anything"
    for name, tensor in whole.items():
        torch.testing.assert_close(cached[name], tensor, atol=2e-5, rtol=1e-4, msg=name)


def test_dropout_is_replayed_exactly(tiny_bert):
    """The graph pass must draw the same dropout masks as the no-graph pass."""
    from transformers import AutoModel

    model = AutoModel.from_pretrained(str(tiny_bert)).train()
    batch = {
        "input_ids": torch.randint(1000, 2000, (7, 12)),
        "attention_mask": torch.ones(7, 12, dtype=torch.long),
    }
    chunks = grad_cache.split_batch(batch, 3)
    assert [len(c["input_ids"]) for c in chunks] == [3, 3, 1]

    def embed(chunk):
        return model(**chunk).last_hidden_state[:, 0]

    first, states = grad_cache.embed_without_graph(embed, chunks)
    again = torch.cat([_replayed(embed, c, s) for c, s in zip(chunks, states, strict=True)])
    assert torch.equal(first, again)
    assert not torch.equal(first, embed(batch)), "dropout is on, so a fresh pass differs"


def _replayed(embed, chunk, state):
    with state.replay(), torch.no_grad():
        return embed(chunk)


@pytest.mark.parametrize(
    ("extra", "message"),
    [({"sub_batch_size": 0}, "sub_batch_size"), ({"sub_batch_size": 4, "deepspeed": "x.json"}, "DeepSpeed")],
)
def test_bad_sub_batch_options(tmp_path, tiny_bert, train_file, extra, message):
    options = EmbedderOptions(
        output_dir=str(tmp_path), model_name_or_path=str(tiny_bert), train_data=[str(train_file)], **extra
    )
    with pytest.raises(InputError, match=message):
        finetune_embedder(options)


def test_sub_batches_under_torchrun_match_the_whole_batch(tmp_path, bert_without_dropout):
    """Two ranks (gloo), cross-device negatives: DDP's all-reduce happens once per step, after the
    last sub-batch, and the averaged gradients equal the whole-batch ones."""
    from .test_distributed import torchrun

    records = [{"query": f"question {i}", "pos": [f"answer {i}"], "neg": [f"other {i}"]} for i in range(16)]
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    weights = {}
    for name, extra in (("whole", []), ("cached", ["--sub-batch-size", "1"])):
        out = tmp_path / name
        torchrun(
            "-m",
            "bgekit.train",
            "finetune",
            "embedder",
            "--model",
            str(bert_without_dropout),
            "--train-data",
            str(data),
            "--output-dir",
            str(out),
            "--per-device-train-batch-size",
            "2",
            "--train-group-size",
            "2",
            "--max-steps",
            "2",
            "--learning-rate",
            "1e-3",
            "--negatives-cross-device",
            *extra,
        )
        weights[name] = _weights(out)
    for key, tensor in weights["whole"].items():
        torch.testing.assert_close(weights["cached"][key], tensor, atol=2e-5, rtol=1e-4, msg=key)
