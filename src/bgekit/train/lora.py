"""LoRA fine-tuning: options, wrapping a transformers model with peft, and saving both forms.

Option names follow FlagEmbedding's (``use_lora``, ``lora_rank``, ``lora_alpha``,
``lora_dropout``, ``target_modules``, ``additional_special_tokens``, ``save_merged_lora_model``).
A LoRA run leaves this layout in ``output_dir``::

    OUT/            the merged full model (LoRA folded into the weights by merge_and_unload, in float32
                    when the base trained in bf16/fp16, so no part of the update is rounded away),
                    its tokenizer and, for embedders, sentence-transformers module files:
                    Embedder.from_pretrained(OUT) / Reranker.from_pretrained(OUT) load it as it is
    OUT/adapter/    the LoRA adapter (adapter_config.json, adapter_model.safetensors) and the
                    tokenizer: load it over the base model with ``peft_path=OUT/adapter``; it
                    also has its bgekit.json, so Embedder / Reranker.from_pretrained(OUT/adapter)
                    loads the base with the adapter as the family it trained as
    OUT/checkpoint-N/  the Trainer's checkpoints (adapters), for --resume-from-checkpoint

With ``save_merged_lora_model=False`` only ``OUT/adapter/`` (and the checkpoints) is written.
Added special tokens grow the embedding matrix; the adapter then carries the resized
embeddings, and ``peft_path`` loading resizes the base model to the adapter's tokenizer first.
peft is the optional ``lora`` extra and is imported only when LoRA is asked for.

``raw_peft`` (FlagEmbedding's option) merges LoRA adapters into the base before training starts,
with or without a new LoRA run on top; ``OUT/adapter`` of such a run applies over the base with
those adapters merged, so such a run always writes the merged model ``OUT`` as well. FlagEmbedding
saves the token embeddings it resized for added tokens as ``embedding/emb.pth`` beside its adapter;
``raw_peft`` and ``from_peft`` load that file when the folder has one (:func:`load_saved_embeddings`).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import InputError
from ..models.adapters import SAVED_EMBEDDINGS, load_saved_embeddings  # noqa: F401  (SAVED_EMBEDDINGS: re-exported)

logger = logging.getLogger(__name__)

ADAPTER_DIR = "adapter"
DECODER_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# model_type -> LoRA target modules; other types fall back to peft's own table
DEFAULT_TARGET_MODULES: dict[str, tuple[str, ...]] = {
    **{
        name: DECODER_TARGETS
        for name in (
            "llama",
            "mistral",
            "mixtral",
            "qwen2",
            "qwen2_moe",
            "qwen3",
            "qwen3_moe",
            "gemma",
            "gemma2",
            "gemma3_text",
            "minicpm",
            "phi3",
        )
    },
    **{name: ("query", "key", "value", "dense") for name in ("bert", "roberta", "xlm-roberta", "camembert")},
}


@dataclass(kw_only=True)
class LoraOptions:
    """LoRA fields mixed into the embedder and reranker options (FlagEmbedding's names).

    ``target_modules`` None picks the architecture's default (all attention and MLP
    projections of a decoder; query/key/value/dense of a BERT-style encoder).
    ``additional_special_tokens`` are added to the tokenizer (the embeddings grow) with or
    without LoRA.

    Example:
        >>> from bgekit.train.embedder import EmbedderOptions, finetune_embedder
        >>> out = finetune_embedder(EmbedderOptions(                                  # doctest: +SKIP
        ...     output_dir="OUT", model_name_or_path="Qwen/Qwen2.5-0.5B", train_data=["train.jsonl"],
        ...     query_instruction_for_retrieval="Given a web search query, retrieve relevant passages.",
        ...     query_instruction_format="<instruct>{}\n<query>{}", use_lora=True, lora_rank=32))
        >>> from bgekit import Embedder
        >>> Embedder.from_pretrained(out).encode_queries(["what is LoRA?"]).shape    # doctest: +SKIP
    """

    use_lora: bool = False
    lora_rank: int = 64
    lora_alpha: float = 16.0
    lora_dropout: float = 0.1
    target_modules: list[str] | None = None
    additional_special_tokens: list[str] | None = None
    save_merged_lora_model: bool = True
    #: an adapter folder to go on training (FlagEmbedding's ``from_peft``): loaded trainable over the base,
    #: its own rank, alpha, targets and saved modules rule (the options above are not used); implies use_lora
    from_peft: str | None = None
    #: modules trained whole and saved in the adapter beside the LoRA weights (peft's ``modules_to_save``,
    #: e.g. embed_tokens): for added tokens whose embedding rows must learn
    modules_to_save: list[str] | None = None
    #: LoRA adapter folders merged into the base, in order, before training (FlagEmbedding's ``raw_peft``;
    #: a FlagEmbedding run's ``embedding/emb.pth`` is loaded first when there is one)
    raw_peft: list[str] | None = None

    def check_lora(self) -> None:
        """Reject bad LoRA settings before any model loads."""
        if isinstance(self.raw_peft, (str, Path)):  # FlagEmbedding's embedder takes one folder
            self.raw_peft = [str(self.raw_peft)]
        if self.raw_peft:
            self.raw_peft = [str(adapter_folder(path, "raw_peft")) for path in self.raw_peft]
            require_peft()
        if self.from_peft is not None:
            self.from_peft = str(adapter_to_continue(self.from_peft))
            self.use_lora = True  # the run trains and saves an adapter, as a --lora run
        elif self.modules_to_save and not self.use_lora:
            raise InputError("modules_to_save is a LoRA setting: pass use_lora (--lora) with it")
        if not self.use_lora:
            return
        if isinstance(self.lora_rank, bool) or not isinstance(self.lora_rank, int) or self.lora_rank < 1:
            raise InputError(f"lora_rank must be an int >= 1, got {self.lora_rank!r}")
        if not self.lora_alpha > 0:
            raise InputError(f"lora_alpha must be > 0, got {self.lora_alpha!r}")
        if not 0 <= self.lora_dropout < 1:
            raise InputError(f"lora_dropout must be in [0, 1), got {self.lora_dropout!r}")
        if self.target_modules is not None and (
            not self.target_modules or not all(isinstance(t, str) and t.strip() for t in self.target_modules)
        ):
            raise InputError(f"target_modules must be a non-empty list of module names, got {self.target_modules!r}")
        if self.modules_to_save is not None and not all(isinstance(m, str) and m.strip() for m in self.modules_to_save):
            raise InputError(f"modules_to_save must be a list of module names, got {self.modules_to_save!r}")
        if self.raw_peft and not self.save_merged_lora_model:
            raise InputError(
                "raw_peft with LoRA: the new adapter applies over the base with the raw_peft adapters merged, "
                "which is not saved alone; keep save_merged_lora_model (--save-merged-model)"
            )
        require_peft()

    def base_dtype(self, bf16: bool) -> torch.dtype:
        """The dtype to load the base model in: bf16 when LoRA trains under bf16, since the frozen
        weights need no fp32 master copy (half the memory of a 7B model); peft keeps the adapter
        itself in fp32. Full fine-tuning keeps fp32 weights and lets the Trainer's autocast work."""
        return torch.bfloat16 if self.use_lora and bf16 else torch.float32


def require_peft():
    """The peft module, or a clear error naming the extra to install."""
    try:
        import peft
    except ImportError:
        raise InputError("LoRA fine-tuning needs the peft package: pip install 'bgekit[lora]'") from None
    return peft


def adapter_to_continue(path: str | Path) -> Path:
    """``from_peft`` checked to be a LoRA adapter folder; a bgekit run's ``OUT`` stands for its ``OUT/adapter``."""
    return adapter_folder(path, "from_peft")


def adapter_folder(path: str | Path, option: str) -> Path:
    """``path`` checked to be a LoRA adapter folder (``option`` names it in the error); a bgekit run's
    ``OUT`` stands for its ``OUT/adapter``."""
    folder = Path(path).expanduser()
    if not (folder / "adapter_config.json").exists() and (folder / ADAPTER_DIR / "adapter_config.json").exists():
        folder = folder / ADAPTER_DIR
    if not (folder / "adapter_config.json").exists():
        raise InputError(f"{option} {path}: no adapter_config.json there, so it is not a LoRA adapter folder")
    return folder.resolve()


def tokenizer_folder(model_folder: Path, options: LoraOptions) -> Path:
    """Where training's tokenizer comes from: a ``from_peft`` adapter's folder when it holds one (bgekit's
    adapters carry theirs, with the special tokens added when they trained; a FlagEmbedding run's folder
    too), else the last ``raw_peft`` folder that holds one, else the model's."""
    for folder in [options.from_peft, *reversed(options.raw_peft or [])]:
        if folder and (Path(folder) / "tokenizer_config.json").exists():
            return Path(folder)
    return model_folder


def prepare_base(model: torch.nn.Module, options: LoraOptions) -> tuple[torch.nn.Module, bool]:
    """The loaded base as training starts from it: each ``raw_peft`` adapter merged into it in order (its
    folder's ``embedding/emb.pth`` loaded first, as FlagEmbedding does; the model resized to the
    adapter's tokenizer when that is larger), and a ``from_peft`` folder's ``embedding/emb.pth``
    loaded. Returns the model and whether its token embeddings now differ from the base's (a new
    adapter must then carry them)."""
    changed = False
    for folder in options.raw_peft or []:
        changed |= load_saved_embeddings(model, folder) or _fit_adapter_vocabulary(model, folder)
        from peft import PeftModel

        trains = {name: p.requires_grad for name, p in model.named_parameters()}
        try:
            model = PeftModel.from_pretrained(model, folder).merge_and_unload()
        except Exception as exc:  # peft raises many kinds on a mismatched adapter
            raise InputError(f"raw_peft {folder} does not fit this model ({type(exc).__name__}: {exc})") from None
        for name, parameter in model.named_parameters():  # peft froze the base to load an adapter for inference
            parameter.requires_grad_(trains.get(name, True))
        logger.info("raw_peft: merged %s into the base", folder)
    if options.from_peft:
        changed |= load_saved_embeddings(model, options.from_peft)
    return model, changed


def _fit_adapter_vocabulary(model: torch.nn.Module, folder: str | Path) -> bool:
    """Grow ``model``'s embeddings to the adapter folder's tokenizer (an adapter trained with added tokens
    carries their rows); True if they grew."""
    if not (Path(folder) / "tokenizer_config.json").exists():
        return False
    from ..models.tokenization import load_hf_tokenizer

    size = len(load_hf_tokenizer(Path(folder)))
    if size <= model.get_input_embeddings().weight.shape[0]:
        return False
    model.resize_token_embeddings(size)
    return True


def add_special_tokens(
    hf_tokenizer, model: torch.nn.Module, tokens: list[str] | None, *, from_adapter: bool = False
) -> bool:
    """Add ``tokens`` as special tokens and grow the model's embeddings to match; True if it grew.
    ``from_adapter``: the tokenizer is a ``from_peft`` adapter's, whose added tokens grow the embeddings too
    (its saved embedding rows then load over them)."""
    if not tokens and not from_adapter:
        return False
    added = 0
    if tokens:
        added = hf_tokenizer.add_special_tokens(
            {"additional_special_tokens": list(tokens)}, replace_extra_special_tokens=False
        )
    rows = model.get_input_embeddings().weight.shape[0]
    if added == 0 and len(hf_tokenizer) <= rows:
        return False
    if len(hf_tokenizer) > rows:
        model.resize_token_embeddings(len(hf_tokenizer))
        logger.info("added %d special tokens; embeddings resized %d -> %d", added, rows, len(hf_tokenizer))
        return True
    return False


def target_modules_for(model: torch.nn.Module, wanted: list[str] | None) -> list[str]:
    """The modules LoRA wraps: ``wanted`` checked against the model, or the architecture's default."""
    linear = {
        name
        for name, module in model.named_modules()
        if isinstance(module, (torch.nn.Linear, torch.nn.Embedding, torch.nn.Conv1d))
        or type(module).__name__ == "Conv1D"
    }
    suffixes = sorted({name.rsplit(".", 1)[-1] for name in linear})
    model_type = getattr(model.config, "model_type", "")
    if wanted is None:
        wanted = list(DEFAULT_TARGET_MODULES.get(model_type, ()))
        if not wanted:
            from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as PEFT_DEFAULTS

            wanted = list(PEFT_DEFAULTS.get(model_type, ()))
        if not wanted:
            raise InputError(
                f"no default LoRA target modules for model type {model_type!r}; pass target_modules "
                f"(--target-modules), e.g. some of {suffixes}"
            )
        wanted = [t for t in wanted if t in suffixes] or wanted
    unknown = [t for t in wanted if not any(n == t or n.endswith("." + t) for n in linear)]
    if unknown:
        raise InputError(
            f"target_modules {unknown} are not linear layers of this {model_type or 'model'}; choose from {suffixes}"
        )
    return list(wanted)


def modules_to_save_for(model: torch.nn.Module, wanted: list[str] | None) -> list[str] | None:
    """``wanted`` (module names trained whole) checked against the model: peft would skip a name that
    matches nothing, and the run would train less than asked without a word."""
    if not wanted:
        return None
    names = [name for name, _ in model.named_modules()]
    unknown = [m for m in wanted if not any(n == m or n.endswith("." + m) for n in names)]
    if unknown:
        suffixes = sorted({n.rsplit(".", 1)[-1] for n in names if n and not n.rsplit(".", 1)[-1].isdigit()})
        raise InputError(f"modules_to_save {unknown} are not modules of this model; choose from {suffixes}")
    return list(wanted)


def wrap(model: torch.nn.Module, options: LoraOptions, *, gradient_checkpointing: bool, task_type: str | None = None):
    """``model`` as a peft LoRA model whose adapter (and nothing else, save a classifier head and
    ``modules_to_save``) trains; with ``from_peft`` that adapter, loaded trainable, goes on training."""
    peft = require_peft()
    if gradient_checkpointing:  # frozen embeddings give checkpointed blocks no input that needs grad
        model.enable_input_require_grads()
    if options.from_peft:
        wrapped = continue_adapter(model, options.from_peft)
    else:
        targets = target_modules_for(model, options.target_modules)
        config = peft.LoraConfig(
            r=options.lora_rank,
            lora_alpha=options.lora_alpha,
            lora_dropout=options.lora_dropout,
            target_modules=targets,
            modules_to_save=modules_to_save_for(model, options.modules_to_save),
            task_type=task_type,
            inference_mode=False,
        )
        wrapped = peft.get_peft_model(model, config)
    trainable, total = wrapped.get_nb_trainable_parameters()
    targets = sorted(wrapped.peft_config["default"].target_modules or [])
    logger.info("LoRA on %s: %d of %d parameters train (%.2f%%)", targets, trainable, total, 100 * trainable / total)
    return wrapped


def continue_adapter(model: torch.nn.Module, folder: str | Path):
    """The adapter in ``folder`` over ``model``, trainable (FlagEmbedding's ``from_peft``); a clear error
    when it was trained over another architecture."""
    from peft import PeftModel

    try:
        wrapped = PeftModel.from_pretrained(model, str(folder), is_trainable=True)
    except Exception as exc:  # peft raises many kinds on a mismatched adapter
        raise InputError(f"from_peft {folder} does not fit this model ({type(exc).__name__}: {exc})") from exc
    # the adapter now sits over this run's base: record that one, not the one it first trained over
    wrapped.peft_config["default"].base_model_name_or_path = getattr(model, "name_or_path", None) or None
    return wrapped


def name_base_model(adapter: Path, base: str | None) -> None:
    """``base_model_name_or_path`` in the adapter's config as a name that loads from anywhere: ``base``
    where peft left it null (a bgekit architecture such as the layerwise reranker's has no
    ``name_or_path``), and a local folder given relative to the working directory made absolute."""
    path = adapter / "adapter_config.json"
    config = json.loads(path.read_text(encoding="utf-8"))
    recorded = config.get("base_model_name_or_path") or base
    if recorded and not Path(recorded).is_absolute() and Path(recorded).expanduser().is_dir():
        recorded = str(Path(recorded).expanduser().resolve())
    if recorded and recorded != config.get("base_model_name_or_path"):
        path.write_text(json.dumps({**config, "base_model_name_or_path": recorded}, indent=2), encoding="utf-8")


def save(
    model: torch.nn.Module,
    hf_tokenizer,
    output_dir: str | Path,
    options: LoraOptions,
    *,
    resized: bool,
    write_extra: Callable[[Path], None] | None = None,
    describe_adapter: Callable[[Path], None] | None = None,
) -> Path:
    """Write ``OUT/adapter/`` (with ``describe_adapter``'s files: an embedder's ``bgekit.json``, so the
    folder loads as the model it came from) and, unless turned off, the merged model in ``OUT/``; returns
    the folder that loads as a plain model (``OUT``), or the adapter folder when nothing was merged."""
    output = Path(output_dir)
    adapter = output / ADAPTER_DIR
    model.save_pretrained(str(adapter), save_embedding_layers=resized)
    name_base_model(adapter, getattr(options, "model_name_or_path", None))
    hf_tokenizer.save_pretrained(str(adapter))
    if describe_adapter is not None:
        describe_adapter(adapter)
    if not options.save_merged_lora_model:
        return adapter
    if any(p.dtype in (torch.bfloat16, torch.float16) for p in model.parameters()):
        # a half-precision base (LoRA under --bf16) takes the update in float32, on the CPU (no second
        # copy on the accelerator): rounded back to bf16, every change smaller than half a step of the
        # weight it lands on was lost. FlagEmbedding too merges into a float32 base.
        model = model.to(device="cpu", dtype=torch.float32)
    merged = model.merge_and_unload()
    if hasattr(merged, "save_pretrained"):
        merged.save_pretrained(str(output))
    else:  # bgekit's own architectures (the layerwise reranker): their weights as one safetensors file
        from safetensors.torch import save_file

        output.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().cpu().contiguous() for k, v in merged.state_dict().items()}
        save_file(state, str(output / "model.safetensors"), metadata={"format": "pt"})
    hf_tokenizer.save_pretrained(str(output))
    if write_extra is not None:
        write_extra(output)
    return output


def save_trained(
    trainer,
    hf_tokenizer,
    output_dir: str | Path,
    options: LoraOptions,
    *,
    resized: bool,
    write_extra: Callable[[Path], None] | None = None,
    model: torch.nn.Module | None = None,
    describe_adapter: Callable[[Path], None] | None = None,
) -> Path:
    """The end of every training run: with LoRA, :func:`save` on rank 0 (adapter and merged model) of
    ``model`` (the peft model; default: the trainer's); otherwise the Trainer's own ``save_model``, then
    ``write_extra`` (module files, metadata) on rank 0. Returns the folder that loads as a plain model."""
    output = Path(output_dir)
    if options.use_lora:
        if trainer.is_world_process_zero():
            peft_model = trainer.model if model is None else model
            return save(
                peft_model,
                hf_tokenizer,
                output,
                options,
                resized=resized,
                write_extra=write_extra,
                describe_adapter=describe_adapter,
            )
        return output
    trainer.save_model(str(output))
    if write_extra is not None and trainer.is_world_process_zero():
        write_extra(output)
    return output
