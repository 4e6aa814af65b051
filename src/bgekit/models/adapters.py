"""LoRA adapter folders (``peft_path``) merged into a loaded model: every model class that takes
``peft_path`` (LLM embedders and rerankers, cross-encoders) loads adapters here, so the checks and the
vocabulary growth for added special tokens are the same for all. Needs the ``lora`` extra (peft).
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..errors import InputError, ModelNotFoundError


def adapter_folder(peft_path: str | Path) -> Path:
    """``peft_path`` checked to be a LoRA adapter folder."""
    folder = Path(peft_path).expanduser()
    if not (folder / "adapter_config.json").exists():
        raise ModelNotFoundError(f"peft_path {folder} has no adapter_config.json: it is not a LoRA adapter folder")
    return folder


def check_adapter_backend(peft_path: str | Path | None, backend: str, resolved_backend: str) -> None:
    """An adapter merges into a torch module only: with an ONNX backend, say to load the merged model."""
    if peft_path and resolved_backend != "torch":
        raise InputError(
            f"peft_path is merged into the torch model; for backend={backend!r} load the merged model "
            "(bgekit finetune --lora saves it in OUT) instead of base + adapter"
        )


def tokenizer_folder(model_folder: Path, peft_path: str | Path | None) -> Path:
    """Where the tokenizer comes from: the adapter folder when it carries one (bgekit's LoRA
    training saves it there, with any added special tokens), else the model folder."""
    if peft_path and (adapter_folder(peft_path) / "tokenizer_config.json").exists():
        return adapter_folder(peft_path)
    return model_folder


def merge_lora(module: torch.nn.Module, peft_path: str | Path, vocab_size: int | None = None) -> torch.nn.Module:
    """Merge a LoRA adapter folder into ``module``; a clear error when it does not fit.

    ``vocab_size`` (the adapter's tokenizer length) grows the embeddings first when training
    added special tokens; the adapter then carries the trained embedding rows.
    """
    folder = adapter_folder(peft_path)
    try:
        from peft import PeftModel
    except ImportError:
        raise InputError("peft_path needs the peft package: pip install 'bgekit[lora]'") from None
    resizable = hasattr(module, "get_input_embeddings")  # bgekit's own layerwise module has a fixed vocabulary
    if resizable and vocab_size is not None and vocab_size > module.get_input_embeddings().weight.shape[0]:
        module.resize_token_embeddings(vocab_size)
    try:
        return PeftModel.from_pretrained(module, str(folder)).merge_and_unload()
    except Exception as exc:  # peft raises many kinds on a mismatched adapter
        raise ModelNotFoundError(
            f"the LoRA adapter in {folder} does not fit this model ({type(exc).__name__}: {exc})"
        ) from exc
