"""Tiny random-weight models with the real architectures, built once per test session.

They reuse the golden folders' tokenizers (BERT WordPiece, XLM-R style BPE) so texts
tokenize realistically, and save through ``save_pretrained`` like a real checkpoint.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt")


def _copy_tokenizer(source: Path, target: Path) -> None:
    for name in TOKENIZER_FILES:
        if (source / name).exists():
            shutil.copy(source / name, target / name)


def build_bert(
    target: Path,
    tokenizer_source: Path,
    *,
    reranker: bool = False,
    max_positions: int = 128,
    num_labels: int = 1,
    seed: int = 7,
) -> Path:
    """A 2-layer BERT (hidden 32) embedder or 1-label sequence classifier; another ``seed`` gives other
    weights in files of the same names and sizes."""
    from transformers import BertConfig, BertForSequenceClassification, BertModel

    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=30522,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=max_positions,
        num_labels=num_labels,
    )
    model = (BertForSequenceClassification if reranker else BertModel)(config)
    target.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(target)
    _copy_tokenizer(tokenizer_source, target)
    return target


def build_xlmr(target: Path, tokenizer_source: Path, *, reranker: bool = False) -> Path:
    """A 2-layer XLM-RoBERTa (hidden 32) embedder or 1-label sequence classifier."""
    from transformers import XLMRobertaConfig, XLMRobertaForSequenceClassification, XLMRobertaModel

    torch.manual_seed(11)
    vocab = len(__import__("json").loads((tokenizer_source / "tokenizer.json").read_text())["model"]["vocab"])
    config = XLMRobertaConfig(
        vocab_size=vocab + 8,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=66,
        num_labels=1,
        pad_token_id=1,
        bos_token_id=0,
        eos_token_id=2,
    )
    model = (XLMRobertaForSequenceClassification if reranker else XLMRobertaModel)(config)
    target.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(target)
    _copy_tokenizer(tokenizer_source, target)
    return target


def poison_token(target: Path, source: Path, word: str, value: float = float("inf")) -> Path:
    """Copy the model folder ``source`` to ``target`` with the input embedding of ``word``'s tokens set to
    ``value`` (infinity by default): every text holding the word gives NaN outputs (the first layer norm
    reads inf - inf), other texts the model's usual values. A stand-in for fp16 overflow on a long input."""
    from safetensors.torch import load_file, save_file
    from tokenizers import Tokenizer

    shutil.copytree(source, target)
    for path in (target, *target.iterdir()):  # copies of read-only golden files
        path.chmod(path.stat().st_mode | 0o200)
    tokenizer = Tokenizer.from_file(str(target / "tokenizer.json"))
    tokenizer.no_padding()
    ids = tokenizer.encode(word, add_special_tokens=False).ids
    weights = load_file(target / "model.safetensors")
    (name,) = [key for key in weights if key.endswith("word_embeddings.weight")]
    weights[name][ids] = value
    save_file(weights, target / "model.safetensors", metadata={"format": "pt"})
    return target
