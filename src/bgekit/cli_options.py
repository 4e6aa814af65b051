"""Option values more than one command group takes (``bgekit embed``, ``rerank``, ``serve``).

Here, not in :mod:`bgekit.cli`, so a command module can import them at load time (typer reads
its annotations from the module) without importing the main command line; nothing heavy loads.
"""

from __future__ import annotations

from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any

import typer

Fp16Opt = Annotated[
    bool, typer.Option("--fp16/--no-fp16", help="float16 on GPUs; the CPU runs float32 whatever this says.")
]
Bf16Opt = Annotated[
    bool,
    typer.Option(
        "--bf16",
        help="bfloat16 instead, on GPUs and on the CPU too (about 2x float32 on CPUs with AVX512-BF16 or AMX; "
        "vectors within bfloat16 rounding of float32's).",
    ),
]


def path_value(text: str) -> Path:
    """A file or folder option's value (typer's ``parser=``). An empty value is refused, naming the option:
    ``Path("")`` is the current folder, so ``-d "$UNSET"`` read (or wrote, or trained into) whatever folder the
    command ran in; ``.`` still names it."""
    return Path(path_text(text))


def path_text(text: str) -> str:
    """:func:`path_value` for options that take a path or a name (``--dataset scifact``,
    ``--resume-from-checkpoint auto``): the text itself, an empty one refused."""
    if text == "":
        raise typer.BadParameter("empty: name a file or folder ('.' for the current folder)")
    return text


def model_text(text: str) -> str:
    """A model option's value (``-m``, ``-r``, ``--models``: a hub id or folder; typer's ``parser=``). An empty
    (or blank) value is refused, naming the option: ``-m "$UNSET"`` ran the default model, or the index's,
    or no reranker at all, without a word."""
    if not text.strip():
        raise typer.BadParameter("empty: name a model (a hub id or folder), or leave the option out")
    return text


def text_value(text: str) -> str:
    """Any other text option's value where an empty one would silently mean something else (the default
    field, device, layers or modules; no API key; every network interface): refused, naming the option.
    Options where ``''`` means "none" (``--query-instruction ''``) do not use this and say so in their help."""
    if text == "":
        raise typer.BadParameter("empty: give a value, or leave the option out")
    return text


def precision_options(fp16: bool, bf16: bool) -> dict[str, bool]:
    """``--fp16`` / ``--bf16`` as the library's ``use_fp16`` / ``use_bf16`` (bf16 wins where both are on)."""
    return {"use_fp16": fp16, "use_bf16": bf16}


class Packing(StrEnum):
    """``--packed``: how forward batches are laid out (:mod:`bgekit.runtime.packed`)."""

    auto = "auto"
    on = "on"
    off = "off"


def packing_options(packed: Packing) -> dict[str, bool]:
    """``--packed`` as the library's ``packed`` keyword (auto: left to each class, which packs on
    CUDA in fp16/bf16)."""
    return {Packing.auto: {}, Packing.on: {"packed": True}, Packing.off: {"packed": False}}[packed]


class Backend(StrEnum):
    """``--backend``: what runs the forward pass (:mod:`bgekit.models.onnx_backend`)."""

    torch = "torch"
    onnx = "onnx"
    onnx_int8 = "onnx-int8"


BACKEND_HELP = (
    "Forward pass on: torch, onnx (ONNX Runtime, CPU, the torch results to float32 rounding) or onnx-int8 "
    "(faster CPU path, mean cosine 0.99 to torch on MiniLM). BERT / XLM-R style models and BGE-M3; needs bgekit[onnx]."
)


def backend_options(
    backend: Backend | str, name: str, *, reranker: bool = False, model_class: str | None = None
) -> dict[str, str]:
    """``--backend`` as the library's ``backend`` keyword. ONNX Runtime runs BERT / XLM-R style
    embedders (BGE-M3 too) and cross-encoders only, so another family is refused by name before
    anything loads."""
    if backend == Backend.torch:
        return {}
    from . import hub, registry
    from .errors import InputError

    if reranker:
        table, exported, what = registry.RERANKERS, {registry.CROSS_ENCODER}, "cross-encoders"
    else:
        table, exported, what = registry.EMBEDDERS, {registry.ENCODER, registry.M3}, "encoder models and BGE-M3"
    spec = hub.resolve(name, table, model_class, for_reranker=reranker)[1]
    if spec is not None and spec.kind not in exported:
        raise InputError(f"--backend {backend} runs {what} (BERT / XLM-R style) only, not {name} ({spec.kind})")
    return {"backend": str(backend)}


def family_options(
    name: str,
    model_class: str | None = None,
    pooling_method: str | None = None,
    query_instruction: str | None = None,
    examples: str | Path | None = None,
) -> tuple[str, dict[str, Any]]:
    """``--model-class``, ``--pooling-method``, ``--query-instruction`` and ``--examples`` as embedder
    options, checked before any model loads (``embed``, ``embed --ray`` and ``serve`` read them alike).
    Returns the kind that will run and the options; a decoder given examples runs as an ICL model."""
    from . import hub, io, registry
    from .errors import InputError

    # serve's NAME= (or BGEKIT_EXAMPLES='') reaches here empty: the folder it ran in, and the family the registry's
    for flag, value in (("--model-class", model_class), ("--examples", examples)):
        if isinstance(value, str) and value == "":
            raise InputError(f"{flag} is empty: give a value, or leave it out")
    kind = hub.resolve(name, registry.EMBEDDERS, model_class)[1].kind
    options: dict[str, Any] = {} if model_class is None else {"model_class": model_class}
    if query_instruction is not None:
        options["query_instruction_for_retrieval"] = query_instruction
    if pooling_method is not None:
        if pooling_method not in registry.POOLING_METHODS:
            raise InputError(f"pooling_method must be one of {registry.POOLING_METHODS}, got {pooling_method!r}")
        if kind in (registry.DECODER, registry.ICL) and pooling_method != "last_token":  # found at load before
            raise InputError(
                f"--pooling-method {pooling_method}: {name} is a decoder-only embedder, which pools the last token"
            )
        options["pooling_method"] = pooling_method
    if examples is not None:
        if kind not in (registry.ICL, registry.DECODER):
            raise InputError(f"--examples needs an in-context-learning model such as BAAI/bge-en-icl, not {name}")
        kind = options["model_class"] = registry.ICL
        options["examples_for_task"] = io.read_examples(examples)
    return kind, options


def int_list(text: str | None, option: str) -> list[int] | None:
    """``"384,256,128"`` -> ``[384, 256, 128]``; a part that is not a whole number is a usage error (the
    ranges are the model's or trainer's to check)."""
    if not text:
        return None
    parts = [part.strip() for part in text.split(",")]
    if not all(part.isdigit() for part in parts):
        raise typer.BadParameter(f"expected whole numbers separated by commas, got {text!r}", param_hint=option)
    return [int(part) for part in parts]
