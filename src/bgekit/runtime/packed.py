"""Packed (padding-free) batches: every sequence of a batch laid end to end in one row.

A padded batch of documents pays for its padding in every layer, and its attention runs a
masked kernel. A packed batch holds only real tokens, ``[1, total_tokens]``, with the
sequence boundaries in ``cu_seq_lens`` (cumulative lengths, as flash attention's variable-
length kernels take them). The transformers model runs unchanged: its linear layers, norms
and activations see the packed row, and its attention goes through :func:`packed_attention`,
registered with transformers' attention interface under :data:`ATTENTION_NAME`, which keeps
each sequence to itself (BERT-family encoders run the same kernels from
:mod:`bgekit.runtime.lean_encoder`'s layer loop, which calls :func:`flash_varlen` / :func:`in_grid`
directly):

- CUDA, fp16/bf16: the flash variable-length kernel (no mask, no padding);
- elsewhere (CPU, fp32, cards without flash): one scaled dot-product attention call over the
  sequences laid back into a padded grid (exact; the tests hold both to per-sequence attention).

Called without packing keys (a normal padded batch) it is transformers' own SDPA attention,
so a module switched to it behaves as before on padded input.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from functools import cache
from typing import Any

import numpy as np
import torch

from ..errors import InputError
from .batching import flatten

ATTENTION_NAME = "bgekit_packed"
#: the keyword names transformers' models pass through to their attention (FlashAttentionKwargs)
PACKING_KEYS = ("cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k")
#: the packed batch's own keys, which the model never sees
SEQUENCE_IDS = "sequence_ids"
LENGTHS = "lengths"


#: encoder model types whose positions are absolute and restart per sequence: the first position
#: is 0 (BERT) or the padding index + 1 (RoBERTa family)
_ENCODERS = {"bert": False, "xlm-roberta": True, "roberta": True, "camembert": True}
#: decoder model types with rotary positions from ``position_ids`` and no logit soft-capping
_DECODERS = {"mistral", "llama", "qwen2", "qwen3", "gemma"}


def position_offset(module: Any) -> int | None:
    """The first position id of a sequence when packing supports ``module``, else None.

    Supported: transformers' own classes (remote code may ignore the attention interface and
    would attend across sequences) of the model types above, with absolute or rotary positions.
    """
    module = packing_core(module)
    if not type(module).__module__.startswith("transformers."):
        return None
    config = getattr(module, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type in _DECODERS:
        return 0
    if model_type not in _ENCODERS or getattr(config, "position_embedding_type", "absolute") != "absolute":
        return None
    if not _ENCODERS[model_type]:
        return 0
    pad = getattr(config, "pad_token_id", None)
    return (1 if pad is None else pad) + 1


def packing_core(module: Any) -> Any:
    """The transformers module inside a wrapper that names one (``packing_core``, as M3's encoder
    plus heads does), else ``module`` itself."""
    return getattr(module, "packing_core", module)


def choose(requested: bool | None, module: Any, dtypes: Sequence[torch.dtype], devices: Sequence[str]) -> int | None:
    """Whether to pack ``module``'s batches: the position offset when yes, None when they stay padded.

    ``requested=None`` (auto) packs where it pays: a supported model on CUDA devices in fp16/bf16
    with flash attention built in. ``True`` packs anywhere the model is supported (on the CPU and
    in fp32 the attention runs over a padded grid: exact, no faster than padding); ``False`` never.
    """
    if requested is not None and not isinstance(requested, bool):
        raise InputError(f"packed must be True, False or None, got {requested!r}")
    if requested is False:
        return None
    offset = position_offset(module)
    if requested is None:
        fast = all(torch.device(d).type == "cuda" for d in devices) and all(
            d in (torch.float16, torch.bfloat16) for d in dtypes
        )
        return offset if fast and all(_flash_device(torch.device(d)) for d in devices) else None
    if offset is None:
        kinds = ", ".join(sorted(set(_ENCODERS) | _DECODERS))
        core = packing_core(module)
        model_type = getattr(getattr(core, "config", None), "model_type", None)
        raise InputError(
            f"packed=True is not supported for {type(core).__name__} (model type {model_type!r}; packing "
            f"takes transformers' own {kinds} models); use packed=False"
        )
    return offset


def pack(
    ids: Sequence[Sequence[int]],
    type_ids: Sequence[Sequence[int]] | None = None,
    position_offset: int = 0,
) -> dict[str, Any]:
    """Lay a batch's token id lists end to end, with what the model and the pooling need.

    Returns CPU tensors ``input_ids``, ``token_type_ids``, ``position_ids`` (each ``[1, T]``;
    positions restart at ``position_offset`` for every sequence, as a padded batch's would),
    ``cu_seq_lens_q``/``_k`` (int32, ``[B + 1]``), :data:`SEQUENCE_IDS` (``[T]``, the row each
    token belongs to), :data:`LENGTHS` (``[B]``) and the longest length as Python ints
    ``max_length_q``/``_k``. Token type ids are zeros when the tokenizer has none: a
    ``[1, T]`` row is longer than the models' buffered defaults.
    """
    lengths = np.fromiter(map(len, ids), dtype=np.int64, count=len(ids))
    if len(lengths) == 0:
        raise InputError("nothing to pack: the batch is empty")
    if lengths.min() < 1:
        raise InputError(
            f"input {int(lengths.argmin())} of a batch has no tokens (an empty text, with a tokenizer that adds "
            "no special tokens): drop empty texts, or use packed=False"
        )
    total = int(lengths.sum())
    cu = np.zeros(len(lengths) + 1, dtype=np.int32)
    np.cumsum(lengths, out=cu[1:])
    flat = flatten(ids, total)
    types = np.zeros(total, dtype=np.int64) if type_ids is None else flatten(type_ids, total)
    sequence_ids = np.repeat(np.arange(len(lengths), dtype=np.int64), lengths)
    positions = np.arange(total, dtype=np.int64) - np.repeat(cu[:-1].astype(np.int64), lengths) + position_offset
    longest = int(lengths.max())
    cu_tensor = torch.from_numpy(cu)
    return {
        "input_ids": torch.from_numpy(flat)[None],
        "token_type_ids": torch.from_numpy(types)[None],
        "position_ids": torch.from_numpy(positions)[None],
        "cu_seq_lens_q": cu_tensor,
        "cu_seq_lens_k": cu_tensor,
        "max_length_q": longest,
        "max_length_k": longest,
        SEQUENCE_IDS: torch.from_numpy(sequence_ids),
        LENGTHS: torch.from_numpy(lengths),
    }


def is_packed(inputs: dict[str, Any]) -> bool:
    """Whether a batch a forward receives is packed (:func:`pack`) rather than padded."""
    return LENGTHS in inputs


def model_inputs(batch: dict[str, Any]) -> dict[str, Any]:
    """The keys of a packed batch that go to the transformers model (all but the pooling's)."""
    return {k: v for k, v in batch.items() if k not in (SEQUENCE_IDS, LENGTHS)}


def first_tokens(hidden: torch.Tensor, batch: dict[str, Any]) -> torch.Tensor:
    """Each sequence's first token (``[CLS]``/``<s>``) from packed ``[T, H]`` states: ``[B, H]``."""
    return hidden.index_select(0, batch["cu_seq_lens_q"][:-1].long())


def last_tokens(hidden: torch.Tensor, batch: dict[str, Any]) -> torch.Tensor:
    """Each sequence's last token from packed ``[T, H]`` states: ``[B, H]``."""
    return hidden.index_select(0, batch["cu_seq_lens_q"][1:].long() - 1)


def mean_tokens(hidden: torch.Tensor, batch: dict[str, Any]) -> torch.Tensor:
    """Each sequence's mean token state from packed ``[T, H]`` states: ``[B, H]``.

    The states are laid back into a zero-padded ``[B, longest, H]`` grid and summed there in float32
    (the float32 means are returned, as :func:`bgekit.models.pooling.pool` does for a padded batch):
    the same order on every run (a scatter-add's atomics on CUDA would not be), at the memory a
    padded batch's states take anyway.
    """
    lengths = batch[LENGTHS]
    rows = batch[SEQUENCE_IDS]
    columns = _columns(batch["cu_seq_lens_q"], rows)
    grid = _lay_out(hidden, rows, columns, len(lengths), int(batch["max_length_q"]))
    return grid.float().sum(dim=1) / lengths.to(torch.float32).unsqueeze(-1)


def _columns(cu: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """Each packed token's position within its own sequence (``rows``: the sequence of each token)."""
    return torch.arange(len(rows), device=rows.device) - cu[:-1].long()[rows]


def _lay_out(
    packed_rows: torch.Tensor, rows: torch.Tensor, columns: torch.Tensor, count: int, longest: int
) -> torch.Tensor:
    """Packed ``[T, ...]`` rows of ``count`` sequences laid back into a zero-padded ``[count, longest, ...]`` grid."""
    cells = packed_rows.new_zeros(count, longest, *packed_rows.shape[1:])
    cells[rows, columns] = packed_rows
    return cells


# -- the attention ------------------------------------------------------------------------------
def packed_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """transformers' attention-interface signature: ``query`` ``[B, heads, L, D]`` in,
    ``[B, L, heads, D]`` out. Packed input (``cu_seq_lens_q`` given, ``B == 1``) attends within
    each sequence; anything else is transformers' SDPA attention unchanged."""
    cu = kwargs.get("cu_seq_lens_q")
    if cu is None:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
    if query.shape[0] != 1:
        raise ValueError(f"a packed batch is one row of sequences laid end to end, got {query.shape[0]} rows")
    if kwargs.get("softcap") is not None:
        raise NotImplementedError("packed attention has no logit soft-capping; run this model padded")
    causal = bool(kwargs.get("is_causal", getattr(module, "is_causal", False)))
    longest = int(kwargs["max_length_q"])
    # a sliding window (Mistral's) matters only for sequences longer than it: each token then sees
    # itself and the window - 1 tokens before it, as transformers' sliding-window mask has it
    window = kwargs.get("sliding_window")
    left = window - 1 if causal and window is not None and longest > window else None
    # [1, heads, T, D] -> [T, heads, D]
    q, k, v = (t[0].transpose(0, 1) for t in (query, key, value))
    if flash_applies(q):
        out = flash_varlen(q, k, v, cu, longest, scaling, causal, left)
    else:
        out = in_grid(q, k, v, cu, longest, scaling, causal, left)
    return out.unsqueeze(0), None


def flash_applies(q: torch.Tensor) -> bool:
    """The flash kernel takes CUDA fp16/bf16 with a head size it was built for, on a card it runs on."""
    return (
        q.is_cuda
        and q.dtype in (torch.float16, torch.bfloat16)
        and q.shape[-1] % 8 == 0
        and q.shape[-1] <= 256
        and _flash_device(q.device)
    )


@cache
def _flash_device(device: torch.device) -> bool:
    """Whether this torch has the flash kernel and ``device`` runs it (compute capability 8.0 and up:
    A100, L4, H100, ...; not a T4 or V100, where packed attention would take the padded-grid fallback)."""
    if device.type != "cuda" or not torch.backends.cuda.is_flash_attention_available():
        return False
    index = device.index if device.index is not None else torch.cuda.current_device()
    return torch.cuda.get_device_capability(index) >= (8, 0)


def flash_varlen(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu: torch.Tensor,
    longest: int,
    scale: float | None,
    causal: bool,
    left: int | None = None,
    *,
    cu_q: torch.Tensor | None = None,
    longest_q: int | None = None,
) -> torch.Tensor:
    """The flash variable-length kernel (``left``: how many earlier tokens a causal token sees).
    ``cu``/``longest`` bound the keys' sequences, and the queries' too unless ``cu_q``/``longest_q``
    give other ones (one query row per sequence, as :mod:`bgekit.runtime.first_tokens` runs)."""
    cu_q = cu if cu_q is None else cu_q
    longest_q = longest if longest_q is None else longest_q
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    if k.shape[1] != q.shape[1]:  # grouped-query attention: one key/value head serves several query heads
        repeat = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(repeat, dim=1), v.repeat_interleave(repeat, dim=1)
    public = _public_varlen()
    if public is not None:
        window = (-1 if left is None else left, 0) if causal else (-1, -1)
        return public(q, k, v, cu_q, cu, longest_q, longest, scale=scale, window_size=window)
    # torch before 2.10: the aten kernel the public function wraps
    options = {} if left is None else {"window_size_left": left, "window_size_right": 0}
    out = torch.ops.aten._flash_attention_forward(
        q, k, v, cu_q, cu, longest_q, longest, 0.0, causal, False, scale=scale, **options
    )
    return out[0]


@cache
def _public_varlen():
    """``torch.nn.attention.varlen.varlen_attn`` where this torch has the form with ``scale`` and
    ``window_size`` (2.10 and later; 2.9's first form had neither), else None."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    parameters = inspect.signature(varlen_attn).parameters
    return varlen_attn if "scale" in parameters and "window_size" in parameters else None


def in_grid(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu: torch.Tensor,
    longest: int,
    scale: float | None,
    causal: bool,
    left: int | None = None,
    *,
    cu_q: torch.Tensor | None = None,
    longest_q: int | None = None,
) -> torch.Tensor:
    """Exact fallback where the flash kernel does not run (CPU, fp32, older cards), with
    :func:`flash_varlen`'s arguments: the packed rows laid back into a zero-padded
    ``[B, heads, longest, D]`` grid, one SDPA call with each sequence's key mask (and the causal /
    sliding-window rule), and the real rows taken out again. Separate query bounds (``cu_q``,
    ``longest_q``) are for non-causal attention only."""
    if causal and cu_q is not None:
        raise ValueError("separate query bounds are for non-causal attention")
    lengths = (cu[1:] - cu[:-1]).long()
    keys_at = _places(cu)
    queries_at = keys_at if cu_q is None else _places(cu_q)

    def grid(t: torch.Tensor, places: tuple[torch.Tensor, torch.Tensor], width: int) -> torch.Tensor:
        return _lay_out(t, *places, len(lengths), width).transpose(1, 2)  # [B, heads, width, D]

    at = torch.arange(longest, device=q.device)
    seen = (at[None, :] < lengths[:, None])[:, None, None, :]  # [B, 1, 1, L]: the real keys
    if causal:
        rule = at[None, :] <= at[:, None]
        if left is not None:
            rule &= at[None, :] >= at[:, None] - left
        seen = seen & rule[None, None]
    keys, values = grid(k, keys_at, longest), grid(v, keys_at, longest)
    if keys.shape[1] != q.shape[1]:  # grouped-query attention
        repeat = q.shape[1] // keys.shape[1]
        keys, values = keys.repeat_interleave(repeat, dim=1), values.repeat_interleave(repeat, dim=1)
    queries = grid(q, queries_at, longest if longest_q is None else longest_q)
    out = torch.nn.functional.scaled_dot_product_attention(queries, keys, values, attn_mask=seen, scale=scale)
    return out.transpose(1, 2)[queries_at]


def _places(cu: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(sequence, position within it)`` of every packed row, for sequence bounds ``cu``."""
    rows = torch.repeat_interleave(torch.arange(len(cu) - 1, device=cu.device), (cu[1:] - cu[:-1]).long())
    return rows, _columns(cu, rows)


def _packed_mask(*args: Any, attention_mask: torch.Tensor | None = None, **kwargs: Any):
    """No mask for a packed batch (the attention keeps sequences apart); SDPA's mask otherwise."""
    if attention_mask is None:
        return None
    from transformers.masking_utils import sdpa_mask

    return sdpa_mask(*args, attention_mask=attention_mask, **kwargs)


@cache
def register() -> str:
    """Make :data:`ATTENTION_NAME` known to transformers (once per process); returns the name."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(ATTENTION_NAME, packed_attention)
    AttentionMaskInterface.register(ATTENTION_NAME, _packed_mask)
    return ATTENTION_NAME


def use_packed_attention(module: torch.nn.Module) -> None:
    """Switch a loaded transformers module's attention to :func:`packed_attention` (padded input
    still gets SDPA through it, so this is safe for every call the module will see)."""
    name = register()
    packing_core(module).set_attn_implementation(name)
