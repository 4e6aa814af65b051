"""LoRA adapter folders (``peft_path``) merged into a loaded model: every model class that takes
``peft_path`` (LLM embedders and rerankers, cross-encoders) loads adapters here, so the checks and the
vocabulary growth for added special tokens (a FlagEmbedding run's ``embedding/emb.pth`` too) are the same
for all, and training loads the same saved embeddings with :func:`load_saved_embeddings`. Needs the ``lora``
extra (peft).
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from ..errors import InputError, ModelNotFoundError

logger = logging.getLogger(__name__)


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


#: where FlagEmbedding's decoder-only fine-tuning saves token embeddings it resized, beside its adapter
SAVED_EMBEDDINGS = Path("embedding") / "emb.pth"


def load_saved_embeddings(model: torch.nn.Module, folder: str | Path) -> bool:
    """A FlagEmbedding run's ``embedding/emb.pth`` in ``folder`` (the whole input embedding module it saved
    with ``torch.save`` when it added tokens) as ``model``'s input embeddings, the model resized to its
    rows first; True if there was one. Read with ``weights_only`` (only an ``nn.Embedding``, a tensor or a
    state dict is accepted), so a file from elsewhere runs no code."""
    path = Path(folder) / SAVED_EMBEDDINGS
    if not path.is_file():
        return False
    torch.serialization.add_safe_globals([torch.nn.Embedding])
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # pickle and torch raise many kinds
        raise InputError(f"{path}: not a saved embedding module ({type(exc).__name__}: {exc})") from None
    weight = saved.weight if isinstance(saved, torch.nn.Embedding) else saved
    if isinstance(weight, dict):
        weight = weight.get("weight")
    current = model.get_input_embeddings().weight
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2 or weight.shape[1] != current.shape[1]:
        shape = tuple(weight.shape) if isinstance(weight, torch.Tensor) else type(weight).__name__
        raise InputError(f"{path}: embeddings of shape {shape} do not fit this model's width {current.shape[1]}")
    if weight.shape[0] != current.shape[0]:
        model.resize_token_embeddings(weight.shape[0])
    with torch.no_grad():
        model.get_input_embeddings().weight.copy_(weight)
    logger.info("loaded the token embeddings %s (%d rows)", path, weight.shape[0])
    return True


def merge_lora(module: torch.nn.Module, peft_path: str | Path, vocab_size: int | None = None) -> torch.nn.Module:
    """Merge a LoRA adapter folder into ``module``; a clear error when it does not fit.

    ``vocab_size`` (the adapter's tokenizer length) grows the embeddings first when training
    added special tokens; the adapter then carries the trained embedding rows. A FlagEmbedding run's
    folder carries them in ``embedding/emb.pth`` instead (:func:`load_saved_embeddings`): they become the
    input embeddings before the adapter merges, as FlagEmbedding's ``raw_peft`` and bgekit's training load
    them.
    """
    folder = adapter_folder(peft_path)
    try:
        from peft import PeftModel
    except ImportError:
        raise InputError("peft_path needs the peft package: pip install 'bgekit[lora]'") from None
    resizable = hasattr(module, "get_input_embeddings")  # bgekit's own layerwise module has a fixed vocabulary
    if resizable:
        load_saved_embeddings(module, folder)
    if resizable and vocab_size is not None and vocab_size > module.get_input_embeddings().weight.shape[0]:
        module.resize_token_embeddings(vocab_size)
    try:
        return PeftModel.from_pretrained(module, str(folder)).merge_and_unload()
    except Exception as exc:  # peft raises many kinds on a mismatched adapter
        raise ModelNotFoundError(
            f"the LoRA adapter in {folder} does not fit this model ({type(exc).__name__}: {exc})"
        ) from exc
