"""Pooling of token states into one vector per text (FlagEmbedding's definitions)."""

from __future__ import annotations

from typing import Any

import torch

from ..errors import InputError
from ..runtime import packed

POOLING_METHODS = ("cls", "mean", "last_token")


def check_pooling(method: str) -> str:
    if method not in POOLING_METHODS:
        raise InputError(f"pooling_method must be one of {POOLING_METHODS}, got {method!r}")
    return method


def pool(hidden: torch.Tensor, attention_mask: torch.Tensor, method: str) -> torch.Tensor:
    """``cls``: first token; ``mean``: masked mean (special tokens included), summed and returned in
    float32 whatever ``hidden``'s dtype (as FlagEmbedding's float mask does: an fp16 sum of a long
    text overflows, a bf16 one keeps 8 bits); ``last_token``: the last real token, right for both
    left and right padding."""
    if method == "cls":
        return hidden[:, 0]
    if method == "mean":
        mask = attention_mask.unsqueeze(-1).to(torch.float32)
        return (hidden.float() * mask).sum(dim=1) / attention_mask.sum(dim=1, keepdim=True).to(torch.float32)
    if method == "last_token":
        return hidden[torch.arange(hidden.shape[0], device=hidden.device), last_positions(attention_mask)]
    raise InputError(f"pooling_method must be one of {POOLING_METHODS}, got {method!r}")


def last_positions(attention_mask: torch.Tensor) -> torch.Tensor:
    """Each row's last real position (the last 1 of its mask), for left, right or no padding alike,
    computed on the mask's device: no host sync to ask which side was padded."""
    return attention_mask.shape[1] - 1 - attention_mask.flip(1).argmax(dim=1)


def pool_packed(hidden: torch.Tensor, batch: dict[str, Any], method: str) -> torch.Tensor:
    """:func:`pool` for a packed batch: ``hidden`` is ``[total_tokens, H]`` (every token real), the
    sequence boundaries are the batch's (:func:`bgekit.runtime.packed.pack`); returns ``[B, H]``."""
    if method == "cls":
        return packed.first_tokens(hidden, batch)
    if method == "mean":
        return packed.mean_tokens(hidden, batch)
    if method == "last_token":
        return packed.last_tokens(hidden, batch)
    raise InputError(f"pooling_method must be one of {POOLING_METHODS}, got {method!r}")
