"""A BERT-family encoder's layers run in one plain loop, without transformers' Python around them.

transformers' eager ``BertModel`` spends much of a small batch's host time in Python around its
kernels: a dozen module calls a layer, the attention-interface lookup, keyword plumbing, output
recording and mask building. On this project's 2-core CPU that was about 3 ms of a one-query MiniLM
``encode()`` (a fifth of it; benchmarks/lean_probe.py); on a GPU it is host time spent ahead of
every batch's kernels. :func:`states` runs the same operations, in the same order, on the module's own
parameters (no copies): the embeddings module, then per layer the query/key/value projections,
attention (SDPA with each row's key mask for padded batches; :mod:`bgekit.runtime.packed`'s
kernels for packed ones), the output projection with its residual and LayerNorm, and the
feed-forward with its. The results equal the transformers forward within float rounding
(tests/test_lean_encoder.py, and the golden tests, which run through it).

Anything it does not recognise exactly takes the transformers forward, unchanged: remote code,
non-BERT layouts, LoRA or quantized layers (anything not a plain ``Linear``/``LayerNorm``), a
forward hook or replaced ``forward`` anywhere in the model (a user watching a layer sees it run),
training mode, and tracing (the ONNX export keeps transformers' graph).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from . import packed

#: encoder model types whose layers are BERT's (``attention.self.query/key/value``,
#: ``attention.output``, ``intermediate``, ``output``)
_BERT_LAYOUT = {"bert", "xlm-roberta", "roberta", "camembert"}
_PROJECTIONS = ("query", "key", "value")
#: attention implementations whose math is plain scaled dot-product attention
_PLAIN_ATTENTION = {"eager", "sdpa", "flash_attention_2", packed.ATTENTION_NAME}
#: a padded batch's keys the loop reads; any other key (``inputs_embeds``, a 4-D mask's
#: companions, ...) takes the transformers forward
_PADDED_KEYS = {"input_ids", "attention_mask", "token_type_ids", "position_ids"}
#: attention on ``[..., heads, D]`` queries, keys and values with a scale: ``[..., heads, D]`` out
Mix = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, float], torch.Tensor]


def bert_layout(encoder: Any) -> bool:
    """Whether ``encoder`` is a transformers BERT-layout bidirectional base model (not a head class)
    with absolute positions and plain attention, not training, with no forward hooks or replaced
    ``forward`` on it, its layer stack or its last layer: the layer structure
    :mod:`bgekit.runtime.first_tokens` calls into."""
    if not isinstance(encoder, torch.nn.Module) or not type(encoder).__module__.startswith("transformers."):
        return False
    config = getattr(encoder, "config", None)
    layers = getattr(getattr(encoder, "encoder", None), "layer", None)
    return (
        getattr(config, "model_type", None) in _BERT_LAYOUT
        and not getattr(config, "is_decoder", False)
        and not getattr(config, "add_cross_attention", False)
        and getattr(config, "position_embedding_type", "absolute") == "absolute"
        and getattr(config, "_attn_implementation", None) in _PLAIN_ATTENTION
        and isinstance(layers, torch.nn.ModuleList)
        and len(layers) > 0
        and all(hasattr(getattr(getattr(layers[-1], "attention", None), "self", None), name) for name in _PROJECTIONS)
        and not encoder.training
        and not any(map(altered, (encoder, encoder.encoder, layers[-1])))
    )


def altered(module: torch.nn.Module) -> bool:
    """Whether someone watches or replaces ``module``'s forward (hooks, or a ``forward`` set on the
    instance, as a compiled or graphed forward is)."""
    return bool(module._forward_hooks or module._forward_pre_hooks or "forward" in vars(module))


def usable(encoder: Any, inputs: dict[str, Any]) -> bool:
    """Whether :func:`run` may take ``encoder`` on ``inputs``: a :func:`bert_layout` model whose every
    module is unaltered and whose projections and norms are plain ``torch.nn`` ones, outside
    tracing, on a packed batch or a padded one with a 2-D 0/1 ``attention_mask``."""
    if torch.jit.is_tracing() or torch.compiler.is_compiling() or not bert_layout(encoder):
        return False
    if torch.nn.modules.module._global_forward_hooks or torch.nn.modules.module._global_forward_pre_hooks:
        return False
    if not packed.is_packed(inputs):
        mask = inputs.get("attention_mask")
        if not set(inputs) <= _PADDED_KEYS or mask is None or mask.dim() != 2 or mask.is_floating_point():
            return False
    return _unaltered(encoder.encoder) and all(_plain(layer) for layer in encoder.encoder.layer)


def _unaltered(root: torch.nn.Module) -> bool:
    """:func:`altered` for ``root`` and every module under it, read from the modules' own
    dictionaries (through ``modules()`` and attribute lookups the check cost 4x as much)."""
    stack = [root]
    while stack:
        state = vars(stack.pop())
        if state["_forward_hooks"] or state["_forward_pre_hooks"] or "forward" in state:
            return False
        stack.extend(state["_modules"].values())
    return True


#: where the loop reads a layer's parameters straight from a module, and the exact type it must be
_SLOTS = (
    *((("attention", "self", name), torch.nn.Linear) for name in _PROJECTIONS),
    (("attention", "output", "dense"), torch.nn.Linear),
    (("attention", "output", "LayerNorm"), torch.nn.LayerNorm),
    (("intermediate", "dense"), torch.nn.Linear),
    (("output", "dense"), torch.nn.Linear),
    (("output", "LayerNorm"), torch.nn.LayerNorm),
)


def _plain(layer: torch.nn.Module) -> bool:
    """Whether the layer's projections and norms are exactly ``torch.nn``'s (not LoRA, quantized, ...)."""
    for path, kind in _SLOTS:
        module = layer
        for name in path:
            module = vars(module)["_modules"].get(name)
            if module is None:
                return False
        if type(module) is not kind:
            return False
    return True


def states(encoder: torch.nn.Module, inputs: dict[str, Any]) -> torch.Tensor:
    """The last hidden states of ``encoder`` (any transformers base model): ``[T, H]`` for a packed
    batch, ``[B, L, H]`` for a padded one; by :func:`run` where :func:`usable`, else by the
    module's own forward."""
    return run(encoder, inputs) if usable(encoder, inputs) else module_states(encoder, inputs)


def module_states(module: torch.nn.Module, inputs: dict[str, Any]) -> torch.Tensor:
    """:func:`states` by ``module``'s own forward (``[T, H]`` packed, ``[B, L, H]`` padded)."""
    if packed.is_packed(inputs):
        return module(**packed.model_inputs(inputs), return_dict=True).last_hidden_state[0]
    return module(**inputs, return_dict=True).last_hidden_state


def run(encoder: torch.nn.Module, inputs: dict[str, Any], depth: int | None = None) -> torch.Tensor:
    """The states after the first ``depth`` layers (all by default) of a model :func:`usable` accepts:
    ``[T, H]`` packed, ``[B, L, H]`` padded."""
    is_packed = packed.is_packed(inputs)
    source = packed.model_inputs(inputs) if is_packed else inputs
    hidden = encoder.embeddings(
        input_ids=source["input_ids"],
        token_type_ids=source.get("token_type_ids"),
        position_ids=source.get("position_ids"),
    )
    if is_packed:
        hidden = hidden[0]  # [T, H]
        cu, longest = inputs["cu_seq_lens_q"], int(inputs["max_length_q"])

        def mix(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
            attend = packed.flash_varlen if packed.flash_applies(q) else packed.in_grid
            return attend(q, k, v, cu, longest, scale, False)  # [T, heads, D] each, and out

    else:
        seen = inputs["attention_mask"].bool()[:, None, None, :]  # [B, 1, 1, L]: each row's real keys

        def mix(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
            q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # [B, heads, L, D]
            out = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=seen, scale=scale)
            return out.transpose(1, 2)

    for layer in list(encoder.encoder.layer)[:depth]:
        hidden = _layer(layer, hidden, mix)
    return hidden


def _layer(layer: torch.nn.Module, hidden: torch.Tensor, mix: Mix) -> torch.Tensor:
    """One BERT layer as transformers computes it, on ``[..., H]`` states (no dropout: not training)."""
    linear = torch.nn.functional.linear
    attention = layer.attention.self
    split = (*hidden.shape[:-1], attention.num_attention_heads, -1)
    q, k, v = (linear(hidden, p.weight, p.bias).view(split) for p in (attention.query, attention.key, attention.value))
    mixed = mix(q, k, v, attention.scaling).reshape(hidden.shape)
    out = layer.attention.output
    hidden = _norm(out.LayerNorm, linear(mixed, out.dense.weight, out.dense.bias) + hidden)
    inner = layer.intermediate
    wide = inner.intermediate_act_fn(linear(hidden, inner.dense.weight, inner.dense.bias))
    out = layer.output
    return _norm(out.LayerNorm, linear(wide, out.dense.weight, out.dense.bias) + hidden)


def _norm(module: torch.nn.LayerNorm, x: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.layer_norm(x, module.normalized_shape, module.weight, module.bias, module.eps)
