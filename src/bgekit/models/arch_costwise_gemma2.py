"""The cost-wise Gemma-2 reranker (bge-reranker-v2.5-gemma2-lightweight), in plain torch.

A Gemma-2 decoder: embeddings times ``sqrt(hidden_size)``, RMSNorm with ``(1 + weight)``,
"sandwich" norms around attention and MLP, rotary GQA attention scaled by
``query_pre_attn_scalar ** -0.5`` with a sliding window on the sliding layers, and a
tanh-GELU gated MLP. Attention logits are *not* soft-capped: FlagEmbedding runs this model
through SDPA, which skips ``attn_logit_softcapping``, and the checkpoints' scores follow that.

Score heads sit on layers ``start_layer, start_layer + layer_sep, ..., num_hidden_layers``;
the score is ``tanh(head(norm(h)) / cap) * cap`` (``final_logit_softcapping``) at the last
real token. Token compression: before each compress layer the passage tokens (between
the query part and the prompt part of each row) are averaged in runs of
``compress_ratio`` and the rows are rebuilt with positions renumbered; a cutoff equal to a
compress layer reads the state before compression. Rows must be right-padded.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from ..errors import ModelNotFoundError
from .arch_common import MLP, ArchConfig, Attention, ScoreHead, causal_mask, last_token_index, load_weights, rotary

DEFAULTS = {
    "model_type": "cost_wise_gemma",
    "pad_token_id": 0,
    "max_position_embeddings": 8192,
    "attention_bias": False,
    "hidden_activation": "gelu_pytorch_tanh",
    "rms_norm_eps": 1e-6,
    "rope_theta": 10000.0,
    "head_dim": 256,
    "query_pre_attn_scalar": 256,
    "sliding_window": 4096,
    "layer_types": None,
    "final_logit_softcapping": 30.0,
    "start_layer": 28,
    "layer_sep": 28,
    "layer_wise": False,
}


class RMSNorm(nn.Module):
    """Gemma's RMSNorm: ``x / rms(x) * (1 + weight)``, computed in float32."""

    def __init__(self, size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        out = x32 * torch.rsqrt(x32.pow(2).mean(dim=-1, keepdim=True) + self.eps)
        return (out * (1.0 + self.weight.float())).type_as(x)


class DecoderLayer(nn.Module):
    def __init__(self, config: ArchConfig, index: int):
        super().__init__()
        hidden = config.hidden_size
        self.self_attn = Attention(
            hidden,
            config.num_attention_heads,
            config.num_key_value_heads,
            config.head_dim,
            config.attention_bias,
            config.query_pre_attn_scalar**-0.5,
        )
        self.mlp = MLP(hidden, config.intermediate_size, config.hidden_activation)
        for name in ("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm"):
            setattr(self, name, RMSNorm(hidden, config.rms_norm_eps))
        self.post_feedforward_layernorm = RMSNorm(hidden, config.rms_norm_eps)
        kinds = config.layer_types
        self.sliding = kinds[index] == "sliding_attention" if kinds else index % 2 == 0

    def forward(self, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        h = h + self.post_attention_layernorm(self.self_attn(self.input_layernorm(h), cos, sin, mask))
        return h + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(h)))


class Body(nn.Module):
    def __init__(self, config: ArchConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)


def compress_passages(
    h: torch.Tensor, mask: torch.Tensor, query_lengths: torch.Tensor, prompt_lengths: torch.Tensor, ratio: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Average each row's passage tokens in runs of ``ratio``; return new states and mask.

    A row is ``query part | passage | prompt part | padding``; the new row is
    ``query part | ceil(passage / ratio) averaged tokens | prompt part | padding``.
    """
    batch, _, width = h.shape
    passage = mask.sum(dim=1) - query_lengths - prompt_lengths
    groups = (passage + ratio - 1) // ratio
    new_lengths = query_lengths + groups + prompt_lengths
    rows = torch.arange(batch, device=h.device)[:, None]

    # averaged passage runs: (batch, max_groups, hidden); a last partial run averages its real tokens
    n_groups = int(groups.max())
    offsets = torch.arange(n_groups * ratio, device=h.device)[None]
    real = offsets < passage[:, None]
    source = (query_lengths[:, None] + offsets).clamp(max=h.shape[1] - 1)
    weights = real.to(h.dtype).view(batch, n_groups, ratio)
    weights = weights / weights.sum(dim=-1, keepdim=True).clamp(min=1)
    pooled = (h[rows, source].view(batch, n_groups, ratio, width) * weights[..., None]).sum(dim=2)

    # assemble: query tokens as they are, then the runs, then the prompt tokens
    cols = torch.arange(int(new_lengths.max()), device=h.device)[None]
    in_runs = (cols >= query_lengths[:, None]) & (cols < (query_lengths + groups)[:, None])
    from_h = torch.where(cols < query_lengths[:, None], cols, cols - groups[:, None] + passage[:, None])
    out = h[rows, from_h.clamp(min=0, max=h.shape[1] - 1)]
    if n_groups:
        run_index = (cols - query_lengths[:, None]).clamp(min=0, max=n_groups - 1)
        out = torch.where(in_runs[..., None], pooled[rows, run_index], out)
    new_mask = (cols < new_lengths[:, None]).to(mask.dtype)
    return out * new_mask[..., None].to(out.dtype), new_mask


class CostWiseGemmaReranker(nn.Module):
    """``forward(input_ids, attention_mask, cutoff_layers, ...)`` -> scores (batch, len(cutoff_layers)).

    ``compress_layers`` / ``compress_ratio`` / ``query_lengths`` / ``prompt_lengths`` drive
    token compression (``compress_ratio=1``: none). Cutoff layers must be score-head layers
    and compress layers in ``[1, num_hidden_layers - 1]`` (checked by the caller).
    """

    def __init__(self, config: ArchConfig):
        super().__init__()
        if not config.layer_wise:
            raise ModelNotFoundError(
                "this cost-wise Gemma checkpoint has no layerwise score heads (layer_wise is false); "
                "bgekit's lightweight reranker needs one with layer_wise true"
            )
        self.config = config
        self.model = Body(config)
        self.lm_head = nn.ModuleList(ScoreHead(config.hidden_size) for _ in self.head_layers)

    @property
    def head_layers(self) -> list[int]:
        """Layers a score can be read after."""
        c = self.config
        return list(range(c.start_layer, c.num_hidden_layers + 1, c.layer_sep))

    @classmethod
    def from_folder(cls, folder: str | Path) -> CostWiseGemmaReranker:
        config = ArchConfig.from_folder(folder, DEFAULTS)
        with torch.device("meta"):
            module = cls(config)
        return load_weights(module, folder)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        cutoff_layers: list[int] | None = None,
        compress_layers: list[int] = (),
        compress_ratio: int = 1,
        query_lengths: torch.Tensor | None = None,
        prompt_lengths: torch.Tensor | None = None,
    ) -> torch.Tensor:
        c = self.config
        cutoffs = [c.num_hidden_layers] if cutoff_layers is None else list(cutoff_layers)
        # FlagEmbedding reads the i-th requested layer (in layer order) with the i-th head
        head_of = {layer: i for i, layer in enumerate(sorted(set(cutoffs)))}
        compress = set(compress_layers) if compress_ratio > 1 else set()
        h = self.model.embed_tokens(input_ids)
        h = h * torch.tensor(c.hidden_size**0.5, dtype=h.dtype)
        mask = attention_mask
        states = {}
        for done in range(max(cutoffs) + 1):
            if done in cutoffs:
                rows = torch.arange(len(h), device=h.device)
                states[done] = self.model.norm(h[rows, last_token_index(mask)])
            if done == max(cutoffs):
                break
            if done == 0 or done in compress:
                if done in compress:
                    h, mask = compress_passages(h, mask, query_lengths, prompt_lengths, compress_ratio)
                positions = torch.arange(h.shape[1], device=h.device).expand(len(h), -1)
                cos, sin = rotary(positions, c.head_dim, c.rope_theta)
                masks = {False: causal_mask(mask), True: causal_mask(mask, c.sliding_window)}
            layer = self.model.layers[done]
            h = layer(h, cos, sin, masks[layer.sliding])
        scores = []
        for layer in cutoffs:
            logit = self.lm_head[head_of[layer]](states[layer])
            if c.final_logit_softcapping is not None:
                logit = torch.tanh(logit / c.final_logit_softcapping) * c.final_logit_softcapping
            scores.append(logit.float())
        return torch.stack(scores, dim=1)
