"""RetroMAE pre-training: the masking follows the recipe, the losses fall on a real corpus
(Cranfield), and the saved folder is an encoder that ``bgekit finetune embedder`` starts from."""

from __future__ import annotations

import json

import pytest
import torch

from bgekit import Embedder
from bgekit.errors import InputError

from .cli import run
from .conftest import require_shared


@pytest.fixture(scope="module")
def corpus():
    return require_shared("data", "cranfield", "corpus.jsonl")


def test_collator_masks_as_retromae(tiny_bert, corpus):
    from bgekit.models.tokenization import TextTokenizer, load_hf_tokenizer
    from bgekit.train.pretrain import PretrainCollator, PretrainOptions, read_corpus

    hf = load_hf_tokenizer(tiny_bert)
    options = PretrainOptions(output_dir="unused", max_seq_length=48)
    collate = PretrainCollator(TextTokenizer(hf), options, hf.mask_token_id, list(hf.all_special_ids))
    texts = read_corpus([str(corpus)])
    assert len(texts) == 1398 and texts[0].startswith("experimental investigation")  # 2 empty documents skipped
    batch = collate([*texts[:64], "short"])
    ids, labels = batch["decoder_input_ids"], batch["encoder_labels"]
    content = batch["decoder_labels"] != -100
    real = batch["encoder"]["attention_mask"].bool()
    assert not content[:, 0].any() and not (content & ~real).any(), "CLS, SEP and padding are never predicted"
    masked = labels != -100
    assert (masked <= content).all() and 0.25 < masked.sum() / content.sum() < 0.35
    assert (labels[masked] == ids[masked]).all()
    assert (batch["encoder"]["input_ids"][masked] == hf.mask_token_id).float().mean() > 0.7
    assert (batch["encoder"]["input_ids"][~masked] == ids[~masked]).all()
    visible = batch["decoder_visible"]
    rows = torch.arange(ids.shape[1])
    assert visible[:, :, 0].all(), "every position sees the sentence embedding"
    assert not visible[:, rows[1:], rows[1:]].any(), "no position sees its own token"
    assert not (visible & ~content[:, None, :])[:, :, 1:].any(), "only content tokens are visible"
    share = visible[:, :, 1:].sum() / (content[:, None, :].expand_as(visible)[:, :, 1:]).sum()
    assert 0.4 < share < 0.6


def test_bad_pretrain_input(tmp_path, tiny_bert):
    from bgekit.train.pretrain import PretrainOptions, pretrain

    empty = tmp_path / "empty.jsonl"
    empty.write_text('{"text": "  "}\n')
    with pytest.raises(InputError, match="no non-empty texts"):
        pretrain(
            PretrainOptions(output_dir=str(tmp_path / "x"), model_name_or_path=str(tiny_bert), train_data=[str(empty)])
        )
    with pytest.raises(InputError, match="decoder_mlm_probability"):
        pretrain(
            PretrainOptions(
                output_dir=str(tmp_path / "x"),
                model_name_or_path=str(tiny_bert),
                train_data=[str(empty)],
                decoder_mlm_probability=1.0,
            )
        )
    assert not (tmp_path / "x").exists()


def test_pretrain_on_cranfield_then_finetune(tmp_path, tiny_bert, corpus):
    from safetensors.torch import load_file
    from transformers import AutoModel

    out = tmp_path / "retromae"
    run(
        "pretrain",
        "--model",
        str(tiny_bert),
        "--train-data",
        str(corpus),
        "--output-dir",
        str(out),
        "--max-steps",
        "12",
        "--per-device-train-batch-size",
        "4",
        "--max-seq-length",
        "32",
        "--learning-rate",
        "5e-3",
        "--logging-steps",
        "4",
    )
    history = [h for h in json.loads((out / "trainer_state.json").read_text())["log_history"] if "encoder_loss" in h]
    assert len(history) == 3
    for key in ("loss", "encoder_loss", "decoder_loss"):
        assert history[-1][key] < history[0][key], f"{key} did not fall: {[h[key] for h in history]}"
    assert (out / "retromae_decoder.safetensors").exists() and (out / "tokenizer.json").exists()
    encoder, start = AutoModel.from_pretrained(str(out)), AutoModel.from_pretrained(str(tiny_bert))
    changed = encoder.encoder.layer[0].attention.self.query.weight
    assert not torch.equal(changed, start.encoder.layer[0].attention.self.query.weight), "the encoder was trained"
    assert set(load_file(str(out / "retromae_decoder.safetensors"))) >= {"norm1.weight", "attention.in_proj_weight"}

    train = tmp_path / "train.jsonl"
    queries = ["wing slipstream lift", "boundary layer heat transfer", "supersonic flow over cones", "plate buckling"]
    train.write_text(
        "".join(json.dumps({"query": q, "pos": [q + " experiment"], "neg": ["unrelated"]}) + "\n" for q in queries)
    )
    tuned = tmp_path / "tuned"
    run(
        "finetune",
        "embedder",
        "--model",
        str(out),
        "--train-data",
        str(train),
        "--output-dir",
        str(tuned),
        "--max-steps",
        "2",
        "--per-device-train-batch-size",
        "2",
        "--passage-max-len",
        "32",
    )
    vectors = Embedder.from_pretrained(str(tuned), devices="cpu").encode(["lift of a wing", "heat transfer"])
    assert vectors.shape == (2, 32)


def test_a_beir_folder_is_read_by_its_corpus(tmp_path):
    from pathlib import Path

    from bgekit.train.pretrain import read_corpus

    beir = Path(__file__).resolve().parents[1] / "examples" / "data" / "scifact-mini"
    corpus = [json.loads(line) for line in (beir / "corpus.jsonl").read_text().splitlines() if line.strip()]
    texts = read_corpus([str(beir)])
    assert len(texts) == len(corpus) and texts[0] == f"{corpus[0]['title']} {corpus[0]['text']}".strip()
    with pytest.raises(InputError, match=r"without corpus\.jsonl"):
        read_corpus([str(tmp_path)])


def test_a_resumed_pretraining_ends_with_the_uninterrupted_runs_weights(tmp_path, tiny_bert):
    """Masks are drawn per batch from the seed, epoch and corpus positions, so a run resumed mid-epoch
    masks as the run that never stopped and ends with its very encoder and decoder (a generator seeded
    once restarted at the seed, and transformers 5.0.0's gamma/beta LayerNorm names were refused)."""
    import shutil

    from safetensors.torch import load_file

    from bgekit.train.pretrain import DECODER_FILE, PretrainOptions, pretrain

    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text(
        "".join(json.dumps({"text": f"wing {i} lift at speed {i * 7} and drag"}) + "\n" for i in range(16))
    )

    def train(out, resume=None):
        pretrain(
            PretrainOptions(
                output_dir=str(out),
                model_name_or_path=str(tiny_bert),
                train_data=[str(corpus)],
                num_train_epochs=2,
                per_device_train_batch_size=4,
                max_seq_length=32,
                learning_rate=1e-3,
                save_steps=3,
                save_total_limit=None,
                resume_from_checkpoint=resume,
            )
        )
        return {**load_file(str(out / "model.safetensors")), **load_file(str(out / DECODER_FILE))}

    whole = train(tmp_path / "whole")  # 4 steps an epoch: checkpoint-6 is halfway through the second
    resumed_dir = tmp_path / "resumed"
    shutil.copytree(tmp_path / "whole" / "checkpoint-6", resumed_dir / "checkpoint-6")
    resumed = train(resumed_dir, "auto")
    assert set(resumed) == set(whole)
    for key in whole:
        assert torch.equal(resumed[key], whole[key]), key
