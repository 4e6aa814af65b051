"""Each sequence's first-token state from an encoder, without the last layer's work on the rest.

CLS pooling and a cross-encoder's head read one row per sequence from the last layer. That
layer's keys and values need every token, but its queries, attention, output projection and
feed-forward (five sixths of a BERT layer's multiplies) need only the first token's row. So the
model runs up to its last layer (by :mod:`bgekit.runtime.lean_encoder`'s loop where it can, by
transformers' forward otherwise), and the last layer runs its own modules on the first tokens' rows:
the same operations on fewer rows, a twelfth less work for a 12-layer model, equal to the full
forward's first rows within float rounding (tests/test_first_tokens.py).

Supported: transformers' own BERT and RoBERTa-family encoders (the layer layout these functions
call into); :func:`supports` says when, and callers keep the full forward otherwise.
"""

from __future__ import annotations

import copy
import weakref
from typing import Any

import torch

from . import lean_encoder, packed

_trunks: weakref.WeakKeyDictionary[torch.nn.Module, torch.nn.Module] = weakref.WeakKeyDictionary()


def supports(encoder: Any) -> bool:
    """Whether :func:`first_token_states` can run ``encoder`` (a transformers base model, not a
    head class) by its last layer's rows: :func:`bgekit.runtime.lean_encoder.bert_layout` (a
    BERT-layout bidirectional encoder with absolute positions and plain attention, not training,
    nothing altered on it, its layer stack or its last layer, whose module is never called whole)."""
    return lean_encoder.bert_layout(encoder)


def first_token_states(
    encoder: torch.nn.Module, inputs: dict[str, Any], key_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """``[B, H]``: the last layer's state of each sequence's first token, for a padded batch
    (``attention_mask`` ``[B, L]``) or a packed one (:func:`bgekit.runtime.packed.pack`), with
    ``encoder`` a model :func:`supports` accepts. ``key_mask`` is the padded batch's 0/1 ``[B, L]``
    mask where ``inputs`` hand the model a prepared additive mask instead (the ONNX export's tracing)."""
    last = encoder.encoder.layer[-1]
    if lean_encoder.usable(encoder, inputs):
        hidden = lean_encoder.run(encoder, inputs, depth=-1)  # [T, H] or [B, L, H]
    else:
        hidden = lean_encoder.module_states(_trunk(encoder), inputs)
    if packed.is_packed(inputs):
        return _packed_rows(last, hidden, inputs)
    return _padded_rows(last, hidden, inputs["attention_mask"] if key_mask is None else key_mask)


def _trunk(encoder: torch.nn.Module) -> torch.nn.Module:
    """``encoder`` without its last layer and its pooler: shallow copies that share every
    parameter (no memory), made once per module."""
    trunk = _trunks.get(encoder)
    if trunk is None:
        stack = copy.copy(encoder.encoder)
        stack._modules = dict(stack._modules)
        stack.layer = torch.nn.ModuleList(list(encoder.encoder.layer)[:-1])
        trunk = copy.copy(encoder)
        trunk._modules = dict(trunk._modules)
        trunk.encoder = stack
        if "pooler" in trunk._modules:
            trunk.pooler = None  # it would read a row of the second-to-last layer, unused
        _trunks[encoder] = trunk
    return trunk


def _packed_rows(layer: torch.nn.Module, hidden: torch.Tensor, inputs: dict[str, Any]) -> torch.Tensor:
    """The last layer for the first token of each packed sequence: keys and values from all ``[T, H]`` rows."""
    cu = inputs["cu_seq_lens_k"]
    longest = int(inputs["max_length_k"])
    count = len(cu) - 1
    first = hidden.index_select(0, cu[:-1].long())  # [B, H]
    attention = layer.attention.self
    query = _heads(attention, "query", first)  # [B, heads, D]
    key, value = _heads(attention, "key", hidden), _heads(attention, "value", hidden)  # [T, heads, D]
    one_each = torch.arange(count + 1, dtype=cu.dtype, device=cu.device)  # one query per sequence
    attend = packed.flash_varlen if packed.flash_applies(query) else packed.in_grid
    mixed = attend(query, key, value, cu, longest, attention.scaling, False, cu_q=one_each, longest_q=1)
    return _finish(layer, mixed, first)


def _padded_rows(layer: torch.nn.Module, hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """The last layer for column 0 of a padded ``[B, L, H]`` batch, over its real keys."""
    first = hidden[:, 0]
    attention = layer.attention.self
    query = _heads(attention, "query", first).unsqueeze(2)  # [B, heads, 1, D]
    keys, values = (_heads(attention, name, hidden).transpose(1, 2) for name in ("key", "value"))  # [B, heads, L, D]
    seen = attention_mask.bool()[:, None, None, :]  # [B, 1, 1, L]: the real keys
    attend = torch.nn.functional.scaled_dot_product_attention
    mixed = attend(query, keys, values, attn_mask=seen, scale=attention.scaling)
    return _finish(layer, mixed.squeeze(2), first)


def _heads(attention: torch.nn.Module, name: str, states: torch.Tensor) -> torch.Tensor:
    """``states`` ``[..., H]`` through the attention's ``query``/``key``/``value`` projection, split
    into heads: ``[..., heads, D]``."""
    return getattr(attention, name)(states).unflatten(-1, (attention.num_attention_heads, -1))


def _finish(layer: torch.nn.Module, mixed: torch.Tensor, first: torch.Tensor) -> torch.Tensor:
    """The rest of the layer on the first rows: output projection with the residual, then the feed-forward."""
    attended = layer.attention.output(mixed.flatten(-2), first)  # [B, heads, D] -> [B, H]
    return layer.feed_forward_chunk(attended)
