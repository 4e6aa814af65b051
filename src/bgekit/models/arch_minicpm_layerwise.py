"""The layerwise MiniCPM reranker (bge-reranker-v2-minicpm-layerwise), in plain torch.

A MiniCPM decoder (Llama-like: RMSNorm, rotary GQA attention, SiLU-gated MLP) with two
MiniCPM scalings: embeddings times ``scale_emb`` and every residual branch times
``scale_depth / sqrt(num_hidden_layers)``. Instead of a vocabulary head it has one
linear score head per layer from ``start_layer`` on (``head_type`` "simple"): the score
for cutoff layer ``k`` is ``lm_head[k - start_layer](norm(hidden after k layers))`` at the
last real token. Only the layers up to the deepest cutoff run.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from torch import nn

from ..errors import ModelNotFoundError
from .arch_common import MLP, ArchConfig, Attention, ScoreHead, causal_mask, last_token_index, load_weights, rotary

DEFAULTS = {
    "model_type": "minicpm",
    "pad_token_id": None,
    "max_position_embeddings": 4096,
    "attention_bias": False,
    "hidden_act": "silu",
    "rms_norm_eps": 1e-6,
    "rope_theta": 10000.0,
    "rope_scaling": None,
    "scale_emb": 1.0,
    "scale_depth": 1.0,
    "head_type": "simple",
    "head_multi": False,
    "start_layer": 8,
}


class RMSNorm(nn.Module):
    """MiniCPM's RMSNorm: ``x / rms(x) * weight``, the statistic in float32."""

    def __init__(self, size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        variance = x.float().pow(2).mean(dim=-1, keepdim=True)
        return (x * torch.rsqrt(variance + self.eps)).to(x.dtype) * self.weight


class DecoderLayer(nn.Module):
    def __init__(self, config: ArchConfig):
        super().__init__()
        hidden, heads = config.hidden_size, config.num_attention_heads
        head_dim = hidden // heads
        self.self_attn = Attention(
            hidden, heads, config.num_key_value_heads, head_dim, config.attention_bias, 1.0 / math.sqrt(head_dim)
        )
        self.mlp = MLP(hidden, config.intermediate_size, config.hidden_act)
        self.input_layernorm = RMSNorm(hidden, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(hidden, config.rms_norm_eps)
        self.residual_scale = config.scale_depth / math.sqrt(config.num_hidden_layers)

    def forward(self, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        h = h + self.self_attn(self.input_layernorm(h), cos, sin, mask) * self.residual_scale
        return h + self.mlp(self.post_attention_layernorm(h)) * self.residual_scale


class Body(nn.Module):
    def __init__(self, config: ArchConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config) for _ in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)


class LayerWiseMiniCPMReranker(nn.Module):
    """``forward(input_ids, attention_mask, cutoff_layers)`` -> scores (batch, len(cutoff_layers)).

    Cutoff layers must lie in ``[start_layer, num_hidden_layers]`` (checked by the caller).
    """

    def __init__(self, config: ArchConfig):
        super().__init__()
        if config.head_type != "simple":
            raise ModelNotFoundError(
                f"layerwise MiniCPM head_type {config.head_type!r} is not supported; bgekit runs 'simple' score heads"
            )
        rope = config.rope_scaling or {}
        if rope and rope.get("type", rope.get("rope_type")) != "linear":
            raise ModelNotFoundError(f"rope_scaling {rope!r} is not supported; bgekit supports none or 'linear'")
        self.config = config
        self.rope_scale = float(rope.get("factor", 1.0))
        self.model = Body(config)
        n_heads = config.num_hidden_layers + 1 - config.start_layer
        heads = [ScoreHead(config.hidden_size) for _ in range(n_heads if config.head_multi else 1)]
        self.lm_head = nn.ModuleList(heads) if config.head_multi else heads[0]

    @classmethod
    def from_folder(cls, folder: str | Path) -> LayerWiseMiniCPMReranker:
        config = ArchConfig.from_folder(folder, DEFAULTS)
        config.num_key_value_heads = config.get("num_key_value_heads") or config.num_attention_heads
        with torch.device("meta"):
            module = cls(config)
        return load_weights(module, folder)

    def head(self, layer: int) -> ScoreHead:
        return self.lm_head[layer - self.config.start_layer] if self.config.head_multi else self.lm_head

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, cutoff_layers: list[int] | None = None
    ) -> torch.Tensor:
        cutoffs = [self.config.num_hidden_layers] if cutoff_layers is None else list(cutoff_layers)
        rows = torch.arange(len(input_ids), device=input_ids.device)
        last = last_token_index(attention_mask)
        # position ids are 0..seq-1 even for left-padded rows, as FlagEmbedding runs them
        positions = torch.arange(input_ids.shape[1], device=input_ids.device).expand_as(input_ids)
        head_dim = self.config.hidden_size // self.config.num_attention_heads
        cos, sin = rotary(positions, head_dim, self.config.rope_theta, self.rope_scale)
        mask = causal_mask(attention_mask)
        h = self.model.embed_tokens(input_ids) * self.config.scale_emb
        states = {}
        for done in range(max(cutoffs) + 1):
            if done in cutoffs:
                states[done] = self.model.norm(h[rows, last])
            if done < max(cutoffs):
                h = self.model.layers[done](h, cos, sin, mask)
        return torch.stack([self.head(k)(states[k]) for k in cutoffs], dim=1).float()
