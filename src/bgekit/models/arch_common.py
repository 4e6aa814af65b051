"""Pieces shared by bgekit's own decoder architectures (the layerwise MiniCPM and cost-wise
Gemma-2 rerankers that transformers cannot load): config, weights, RoPE, attention, MLP.

Plain torch only, so a transformers upgrade cannot break them. Every module keeps the
parameter names of the checkpoints, so ``model.safetensors`` loads as is.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ModelNotFoundError

ACTIVATIONS = {
    "silu": F.silu,
    "gelu": F.gelu,
    "gelu_pytorch_tanh": functools.partial(F.gelu, approximate="tanh"),  # partials pickle; lambdas do not
    "gelu_new": functools.partial(F.gelu, approximate="tanh"),
    "relu": F.relu,
}


class ArchConfig(SimpleNamespace):
    """``config.json`` as attributes, with defaults for the keys a checkpoint may leave out."""

    @classmethod
    def from_folder(cls, folder: str | Path, defaults: dict[str, Any]) -> ArchConfig:
        path = Path(folder) / "config.json"
        try:
            values = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise ModelNotFoundError(f"could not read {path}: {exc}") from exc
        return cls(**{**defaults, **values})

    def get(self, name: str, default: Any = None) -> Any:
        return getattr(self, name, default)

    def to_dict(self) -> dict[str, Any]:
        return dict(vars(self))


def activation(name: str):
    if name not in ACTIVATIONS:
        raise ModelNotFoundError(f"activation {name!r} is not supported; bgekit knows {sorted(ACTIVATIONS)}")
    return ACTIVATIONS[name]


def load_weights(module: nn.Module, folder: str | Path) -> nn.Module:
    """Fill ``module`` (built on the meta device) with the folder's float32 weights; names must match."""
    from safetensors.torch import load_file

    folder = Path(folder)
    if (folder / "model.safetensors").exists():
        files = [folder / "model.safetensors"]
    elif (folder / "model.safetensors.index.json").exists():
        index = json.loads((folder / "model.safetensors.index.json").read_text(encoding="utf-8"))
        files = [folder / name for name in sorted(set(index["weight_map"].values()))]
    elif (folder / "pytorch_model.bin").exists():
        files = [folder / "pytorch_model.bin"]
    else:
        raise ModelNotFoundError(f"{folder} has no model.safetensors (or shards, or pytorch_model.bin)")
    state: dict[str, torch.Tensor] = {}
    for file in files:
        part = load_file(str(file)) if file.suffix == ".safetensors" else torch.load(file, weights_only=True)
        state.update({k: v.float() for k, v in part.items()})
    expected = set(module.state_dict())
    missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or unexpected:
        raise ModelNotFoundError(
            f"the weights in {folder} do not fit {type(module).__name__}: "
            f"missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
            f"unexpected {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}"
        )
    module.load_state_dict(state, strict=True, assign=True)
    return module.eval()


def rotary(positions: torch.Tensor, head_dim: int, theta: float, scale: float = 1.0) -> tuple[torch.Tensor, ...]:
    """cos and sin of rotary embeddings for ``positions`` (batch, seq), float32 (batch, 1, seq, head_dim)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=positions.device).float() / head_dim))
    freqs = (positions.float() / scale)[..., None] * inv_freq
    angles = torch.cat((freqs, freqs), dim=-1)[:, None]
    return angles.cos(), angles.sin()


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x`` (batch, heads, seq, head_dim) in float32; back in ``x``'s dtype."""
    half = x.shape[-1] // 2
    x32 = x.float()
    rotated = torch.cat((-x32[..., half:], x32[..., :half]), dim=-1)
    return (x32 * cos + rotated * sin).to(x.dtype)


def causal_mask(mask: torch.Tensor, window: int | None = None) -> torch.Tensor:
    """Boolean (batch, 1, seq, seq) mask: causal, real keys only, within ``window`` when given.

    Every query may also see itself, so padding rows never get an all-masked softmax (NaN);
    real rows are unaffected because they always see themselves.
    """
    seq = mask.shape[1]
    idx = torch.arange(seq, device=mask.device)
    allowed = (idx[None, :] <= idx[:, None])[None] & mask.bool()[:, None, :]
    if window is not None:
        allowed &= (idx[:, None] - idx[None, :] < window)[None]
    allowed |= torch.eye(seq, dtype=torch.bool, device=mask.device)[None]
    return allowed[:, None]


def last_token_index(mask: torch.Tensor) -> torch.Tensor:
    """Column of each row's last real token (left or right padding)."""
    return mask.shape[1] - 1 - mask.flip(1).argmax(dim=1)


class Attention(nn.Module):
    """Grouped-query self-attention with rotary positions, run by torch's SDPA."""

    def __init__(self, hidden: int, heads: int, kv_heads: int, head_dim: int, bias: bool, scale: float):
        super().__init__()
        self.heads, self.kv_heads, self.head_dim, self.scale = heads, kv_heads, head_dim, scale
        self.q_proj = nn.Linear(hidden, heads * head_dim, bias=bias)
        self.k_proj = nn.Linear(hidden, kv_heads * head_dim, bias=bias)
        self.v_proj = nn.Linear(hidden, kv_heads * head_dim, bias=bias)
        self.o_proj = nn.Linear(heads * head_dim, hidden, bias=bias)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        batch, seq, _ = x.shape
        q = self.q_proj(x).view(batch, seq, self.heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(batch, seq, self.kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(batch, seq, self.kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        groups = self.heads // self.kv_heads
        k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=self.scale)
        return self.o_proj(out.transpose(1, 2).reshape(batch, seq, self.heads * self.head_dim))


class MLP(nn.Module):
    """Gated feed-forward: ``down(act(gate(x)) * up(x))``."""

    def __init__(self, hidden: int, intermediate: int, act: str):
        super().__init__()
        self.gate_proj = nn.Linear(hidden, intermediate, bias=False)
        self.up_proj = nn.Linear(hidden, intermediate, bias=False)
        self.down_proj = nn.Linear(intermediate, hidden, bias=False)
        self.act = activation(act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))


class ScoreHead(nn.Module):
    """One relevance logit per token (``lm_head.<i>.linear_head`` in the checkpoints)."""

    def __init__(self, hidden: int):
        super().__init__()
        self.linear_head = nn.Linear(hidden, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_head(x).squeeze(-1)
