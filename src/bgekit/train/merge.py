"""Weight merging, LM-Cocktail style: the weighted average of the parameters of models that share
one architecture, with the weights given or worked out from each model's loss on a few examples.

Merging reads and writes weight files directly (``model.safetensors``, sharded safetensors or
``pytorch_model.bin``, and BGE-M3's ``colbert_linear.pt`` / ``sparse_linear.pt``), so any
transformers model merges without being instantiated. Everything else in the folder (config,
tokenizer, sentence-transformers modules) is copied from the first model. A ``bgekit pretrain``
(RetroMAE) output merges with plain encoders of its architecture: its encoder weights are renamed to
theirs (``bert.encoder...`` to ``encoder...``), its MLM head and decoder dropped, and the merge takes the
first plain encoder's layout, as LM-Cocktail (which loads each with ``AutoModel``) merges them. Pretrain
outputs merged only with each other stay one: their RetroMAE decoders are averaged too. The average is computed
and saved in float32 whatever dtypes the models were saved in, as LM-Cocktail's ``mix_models``
(every model loaded in float32, the mix saved so); ``config.json`` then says float32.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from .. import hub, io, registry
from ..errors import InputError, ModelNotFoundError
from .data import GroupSampler, load_train_data
from .lora import ADAPTER_DIR
from .pretrain import DECODER_FILE

logger = logging.getLogger(__name__)

HEAD_FILES = ("colbert_linear.pt", "sparse_linear.pt")
WEIGHTS_JSON = "merge_weights.json"
# never copied from the first model: its weights (replaced by the average) and training leftovers
_SKIP = ("model", "pytorch_model", "optimizer", "scheduler", "rng_state", "training_args", "trainer_state")


@dataclass
class MergeResult:
    """Where the merged model went, the weight of each model, and each model's example loss (if any)."""

    output_dir: Path
    weights: list[float]
    losses: list[float] | None = None


def read_state_dict(folder: Path) -> dict[str, torch.Tensor]:
    """All tensors of a model folder's main weights (single or sharded safetensors, or ``.bin``),
    with legacy LayerNorm names (``gamma`` / ``beta``, which transformers 5.0 still writes for
    some models) as ``weight`` / ``bias``, so folders saved by different versions merge."""
    from safetensors.torch import load_file

    if (folder / "model.safetensors").exists():
        state = load_file(str(folder / "model.safetensors"))
    elif (folder / "model.safetensors.index.json").exists():
        index = json.loads((folder / "model.safetensors.index.json").read_text())
        shards = sorted(set(index["weight_map"].values()))
        state = {k: v for shard in shards for k, v in load_file(str(folder / shard)).items()}
    elif (folder / "pytorch_model.bin").exists():
        state = torch.load(folder / "pytorch_model.bin", map_location="cpu", weights_only=True)
    else:
        raise ModelNotFoundError(f"{folder} has no model.safetensors or pytorch_model.bin to merge")
    return {_modern_name(k): v for k, v in state.items()}


def _modern_name(key: str) -> str:
    module, _, leaf = key.rpartition(".")
    if "norm" in module.rsplit(".", 1)[-1].lower() and leaf in ("gamma", "beta"):
        return f"{module}.{'weight' if leaf == 'gamma' else 'bias'}"
    return key


def _architecture(folder: Path) -> tuple[str, tuple[str, ...]]:
    config = json.loads((folder / "config.json").read_text())
    return config.get("model_type", ""), tuple(config.get("architectures") or ())


def check_same_architecture(
    folders: Sequence[Path],
    states: Sequence[dict[str, torch.Tensor]],
    *,
    reference: int = 0,
    mapped: Collection[int] = (),
) -> None:
    """Same config type, same tensor names and shapes in every model as in model ``reference``, or an
    InputError naming the difference. ``mapped`` models are pretrain outputs whose encoder weights were
    renamed to the reference's names (:func:`encoder_weights`): their config type must match, and they may
    lack the reference's pooler (a masked-LM encoder has none)."""
    first = _architecture(folders[reference])
    for index, (folder, state) in enumerate(zip(folders, states, strict=True)):
        if index == reference:
            continue
        other = _architecture(folder)
        if (other[0] != first[0]) if index in mapped else (other != first):
            raise InputError(
                f"cannot merge {folders[reference]} ({first[0]}, {list(first[1])}) with {folder} ({other[0]}, "
                f"{list(other[1])}): models must share one architecture"
            )
        missing, extra = sorted(set(states[reference]) - set(state)), sorted(set(state) - set(states[reference]))
        if index in mapped:
            missing = [name for name in missing if not name.startswith(_OPTIONAL)]
        if missing or extra:
            raise InputError(
                f"cannot merge {folder} with {folders[reference]}: parameter names differ "
                f"(missing {missing[:3]}, unexpected {extra[:3]})"
            )
        for name, tensor in states[reference].items():
            if name in state and state[name].shape != tensor.shape:
                raise InputError(
                    f"cannot merge {folder} with {folders[reference]}: {name} has shape {tuple(state[name].shape)} "
                    f"vs {tuple(tensor.shape)}"
                )


#: what a plain encoder has and a pretrain output's masked-LM encoder lacks
_OPTIONAL = ("pooler.",)


def is_pretrain_output(folder: Path) -> bool:
    """A ``bgekit pretrain`` (RetroMAE) folder: a masked-LM encoder plus the RetroMAE decoder file."""
    return (folder / DECODER_FILE).exists()


def encoder_weights(state: dict[str, torch.Tensor], names: Collection[str], folder: Path) -> dict[str, torch.Tensor]:
    """A pretrain output's encoder weights under a plain encoder's ``names``: its masked-LM model keeps the
    encoder under the base-model prefix (``bert.encoder...``), the plain encoder without (``encoder...``).
    The MLM head (``cls.*``) and the RetroMAE decoder are not encoder weights and are dropped, as
    LM-Cocktail's ``AutoModel`` loading drops them."""
    wanted = set(names)
    for prefix in sorted({key.split(".", 1)[0] for key in state if "." in key}):
        inner = {key[len(prefix) + 1 :]: v for key, v in state.items() if key.startswith(prefix + ".")}
        if set(inner) <= wanted and not {n for n in wanted - set(inner) if not n.startswith(_OPTIONAL)}:
            return inner
    raise InputError(
        f"cannot merge {folder}: its weights are not the encoder's under a base-model prefix "
        f"(e.g. {sorted(state)[:2]} vs {sorted(wanted)[:2]})"
    )


def average_states(
    states: Sequence[dict[str, torch.Tensor]], weights: Sequence[float], *, reference: int = 0
) -> dict[str, torch.Tensor]:
    """``sum(w_i * state_i)`` per float tensor, computed and returned in float32 whatever dtypes the
    models were saved in (LM-Cocktail loads every model in float32 and saves the mix so; casting to
    the first model's dtype silently rounded a bf16 + fp32 mix to bf16); integer buffers are taken
    from model ``reference``. A tensor only some models have (a plain encoder's pooler, merged with a
    pretrain output) is the average of those, their weights scaled to sum to 1."""
    merged = {}
    for name, tensor in states[reference].items():
        if not tensor.is_floating_point():
            merged[name] = tensor.clone()
            continue
        present = [(state[name], float(w)) for state, w in zip(states, weights, strict=True) if name in state]
        scale = sum(w for _, w in present)
        if abs(scale) < 1e-12:  # only zero-weight models have it: theirs as it is
            present, scale = [(tensor, 1.0)], 1.0
        total = torch.zeros(tensor.shape, dtype=torch.float32)
        for value, weight in present:
            total += (weight / scale) * value.float()
        merged[name] = total.contiguous()
    return merged


def check_weights(weights: Sequence[float], n_models: int) -> list[float]:
    """One finite weight per model, scaled to sum to 1 (``1 1`` is an even average)."""
    if len(weights) != n_models:
        raise InputError(f"got {len(weights)} weights for {n_models} models; give one weight per model")
    if not all(isinstance(w, (int, float)) and math.isfinite(w) for w in weights):
        raise InputError(f"weights must be finite numbers, got {list(weights)}")
    total = sum(weights)
    if abs(total) < 1e-12:
        raise InputError(f"weights sum to 0 ({list(weights)}): the merged model would have all-zero weights")
    scaled = [float(w) / total for w in weights]  # a weighted average: LM-Cocktail's weights sum to 1
    if abs(total - 1) > 1e-6:
        logger.info("weights %s do not sum to 1: merging with %s", list(weights), [round(w, 6) for w in scaled])
    return scaled


def copy_extras(source: Path, target: Path) -> None:
    """Config, tokenizer and module files of ``source`` (not its weights or training leftovers; not its LoRA
    ``adapter/`` either, which would load as that one model, not as the merge)."""
    for item in source.iterdir():
        averaged = item.name in HEAD_FILES or item.name == DECODER_FILE  # written from every model's, not copied
        leftover = item.name.startswith("checkpoint-") or (item.is_dir() and item.name == ADAPTER_DIR)
        if item.name.startswith(_SKIP) or averaged or leftover:
            continue
        if item.is_dir():
            shutil.copytree(item, target / item.name, dirs_exist_ok=True)
        else:
            shutil.copy(item, target / item.name)


def mark_float32(folder: Path) -> None:
    """Say in ``config.json`` that the weights are float32 (the first model's says its own dtype),
    so a loader that follows the config's dtype (transformers' ``dtype="auto"``) keeps them so."""
    path = folder / "config.json"
    if not path.exists():
        return
    config = json.loads(path.read_text())
    keys = [key for key in ("dtype", "torch_dtype") if config.get(key) is not None]
    if keys:
        path.write_text(json.dumps({**config, **dict.fromkeys(keys, "float32")}, indent=2) + "\n")


#: example-loss kinds: InfoNCE of an embedder, group cross-entropy of a cross-encoder's logits or of an
#: LLM reranker's "Yes" logits
EXAMPLE_KINDS = ("embedder", "reranker", "llm-reranker")


def model_kind(folder: Path, model_type: str = "auto") -> str:
    """How ``folder`` scores the example data: ``embedder``, ``reranker`` (a cross-encoder) or
    ``llm-reranker`` (a causal LM's "Yes" logit, as FlagLLMReranker). ``auto`` reads the folder as
    ``Embedder`` / ``Reranker.from_pretrained`` do (a causal LM that is not a known or bgekit-saved
    embedder is an LLM reranker); ``reranker`` picks the cross-encoder or LLM form by the folder."""
    if model_type == "embedder":
        return "embedder"
    if model_type == "auto" and hub.embedder_metadata(folder) is not None:
        return "embedder"
    spec = hub.describe_folder(folder, registry.RERANKERS, for_reranker=True)
    kind = spec.kind if spec else registry.CROSS_ENCODER
    if kind in (registry.LAYERWISE_RERANKER, registry.LIGHTWEIGHT_RERANKER):
        raise InputError(f"{folder} is a {kind} reranker: example losses are not computed for it; give weights")
    causal = "ForCausalLM" in " ".join(_architecture(folder)[1])
    if kind == registry.LLM_RERANKER or (model_type == "reranker" and causal):
        return "llm-reranker"
    return "embedder" if kind == registry.BI_ENCODER and model_type == "auto" else "reranker"


def example_loss(
    folder: Path,
    records,
    kind: str,
    *,
    group_size: int = 4,
    batch_size: int = 8,
    loss_temperature: float = 0.05,
    query_max_len: int = 64,
    passage_max_len: int = 256,
    seed: int = 42,
    examples: list[dict[str, str]] | None = None,
) -> float:
    """Mean loss of one model on the example records: InfoNCE with the model's pooling for an
    embedder, group cross-entropy for a reranker (``kind`` one of :data:`EXAMPLE_KINDS`; the losses
    its fine-tuning uses, on the pairs its inference builds). An ICL embedder's queries are its
    inference prompts, behind ``examples`` (its few-shot examples, as ``FlagICLModel(examples_for_task=...)``)."""
    if kind not in EXAMPLE_KINDS:
        raise InputError(f"example-loss kind must be one of {list(EXAMPLE_KINDS)}, got {kind!r}")
    from ..models.pooling import pool
    from ..models.tokenization import TextTokenizer, load_hf_tokenizer
    from . import losses

    tokenizer = TextTokenizer(load_hf_tokenizer(folder))
    sampler = GroupSampler(records, group_size, seed)
    groups = [sampler.group(i) for i in range(len(sampler))]
    total, count = 0.0, 0
    if kind == "llm-reranker":
        from transformers import AutoModelForCausalLM

        from ..models.llm_reranker import yes_logits, yes_token_id
        from .llm_reranker import LLMRerankerCollator
        from .reranker import RerankerOptions
        from .trainer import training_tokenizer

        model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32)
        tokenizer = training_tokenizer(tokenizer.hf)
        yes = yes_token_id(tokenizer, str(folder))
        collate = LLMRerankerCollator(
            tokenizer, RerankerOptions(output_dir="", query_max_len=query_max_len, max_len=passage_max_len)
        )
    elif kind == "reranker":
        from transformers import AutoModelForSequenceClassification

        from .reranker import RerankerCollator, RerankerOptions

        model = AutoModelForSequenceClassification.from_pretrained(str(folder), num_labels=1, dtype=torch.float32)
        collate = RerankerCollator(
            tokenizer, RerankerOptions(output_dir="", query_max_len=query_max_len, max_len=passage_max_len)
        )
    else:
        from transformers import AutoModel

        from .embedder import EmbedderCollator, EmbedderOptions
        from .icl import ICLInferenceCollator

        _, spec = hub.resolve(str(folder), registry.EMBEDDERS)
        pooling = (spec.pooling_method if spec else None) or "cls"
        model = AutoModel.from_pretrained(str(folder), dtype=torch.float32)
        icl = spec is not None and spec.kind == registry.ICL
        collate = (ICLInferenceCollator if icl else EmbedderCollator)(
            tokenizer,
            EmbedderOptions(
                output_dir="",
                query_max_len=query_max_len,
                passage_max_len=passage_max_len,
                # the prompts the model sees at inference (its family's format, passage instruction too)
                query_instruction_for_retrieval=spec.query_instruction if spec else None,
                query_instruction_format=spec.query_instruction_format if spec else "{}{}",
                passage_instruction_for_retrieval=spec.passage_instruction if spec else None,
            ),
        )
        if examples is not None and not icl:
            raise InputError(f"{folder} is not an ICL embedder: in-context examples are for ICL embedders only")
        if icl:  # the queries FlagICLModel(folder, examples_for_task=examples) embeds
            collate.use_model_prompts(folder, examples)
    model.eval()
    with torch.inference_mode():
        for start in range(0, len(groups), batch_size):
            batch = collate(groups[start : start + batch_size])
            if kind == "llm-reranker":
                loss = losses.reranker_ce(yes_logits(model, batch["pairs"], yes).float(), group_size)
            elif kind == "reranker":
                scores = model(**batch["pairs"], return_dict=True).logits.view(-1).float()
                loss = losses.reranker_ce(scores, group_size)
            else:
                hidden = {key: model(**batch[key], return_dict=True).last_hidden_state for key in ("query", "passage")}
                q, p = (
                    torch.nn.functional.normalize(pool(hidden[k], batch[k]["attention_mask"], pooling).float(), dim=-1)
                    for k in ("query", "passage")
                )
                loss = losses.info_nce(q, p, group_size, loss_temperature)
            n = len(groups[start : start + batch_size])
            total, count = total + float(loss) * n, count + n
    return total / count


def weights_from_losses(model_losses: Sequence[float], temperature: float) -> list[float]:
    """LM-Cocktail's rule: ``softmax(-loss / temperature)``; sums to 1, lower loss weighs more."""
    if temperature <= 0:
        raise InputError(f"temperature must be > 0, got {temperature}")
    return torch.softmax(-torch.tensor(model_losses, dtype=torch.float64) / temperature, dim=0).tolist()


def merge_models(
    models: Sequence[str],
    weights: Sequence[float] | None = None,
    *,
    output_dir: str | Path,
    example_data: str | Path | Sequence[str | Path] | None = None,
    model_type: str = "auto",
    temperature: float = 5.0,
    max_examples: int = 32,
    group_size: int = 4,
    batch_size: int = 8,
    loss_temperature: float = 0.05,
    query_max_len: int = 64,
    passage_max_len: int = 256,
    examples: str | Path | list[dict[str, str]] | None = None,
) -> MergeResult:
    """Average same-architecture models with ``weights``, or with weights from ``example_data``.

    With ``example_data`` (training JSONL records; the first ``max_examples`` are used) each model's
    loss on them sets its weight, ``softmax(-loss / temperature)`` (LM-Cocktail). The weights (and
    losses) are also written to ``merge_weights.json`` in ``output_dir``. ICL embedders score the
    records' queries behind ``examples`` (their few-shot examples: a list of ``{"instruct"?, "query",
    "response"}`` dicts or a JSON / JSONL file of them, as ``FlagICLModel(examples_for_task=...)``).

    Example:
        >>> from bgekit.train.merge import merge_models
        >>> merge_models(["ft-model", "BAAI/bge-base-en-v1.5"], [0.7, 0.3], output_dir="merged")  # doctest: +SKIP
        MergeResult(output_dir=PosixPath('merged'), weights=[0.7, 0.3], losses=None)
        >>> merge_models(["ft-a", "ft-b"], example_data="few.jsonl", output_dir="mix").weights  # doctest: +SKIP
        [0.62, 0.38]
    """
    if len(models) < 2:
        raise InputError(f"merging needs at least two models, got {len(models)}")
    if weights is None and example_data is None:
        raise InputError("give weights (one per model) or example_data to work them out")
    if weights is not None and example_data is not None:
        raise InputError("give either weights (one per model) or example_data to work them out, not both")
    if examples is not None and example_data is None:
        raise InputError("examples (an ICL embedder's few-shot examples) are for scoring example_data; give both")
    if model_type not in ("auto", "embedder", "reranker"):
        raise InputError(f"model_type must be auto, embedder or reranker, got {model_type!r}")
    folders = [hub.model_folder(str(m)) for m in models]
    if Path(output_dir).resolve() in {f.resolve() for f in folders}:
        raise InputError(f"output_dir {output_dir} is one of the models being merged; write the merge elsewhere")
    io.check_output_folder(output_dir)  # before the weights are read and averaged
    states = [read_state_dict(f) for f in folders]
    # a pretrain output merges with its plain encoder: its encoder weights under the encoder's names,
    # written in the plain encoder's layout (config, tokenizer), as LM-Cocktail merges them
    pretrained = [i for i, f in enumerate(folders) if is_pretrain_output(f)]
    reference = next((i for i in range(len(folders)) if i not in pretrained), 0)
    mapped = pretrained if len(pretrained) < len(folders) else []
    for i in mapped:
        states[i] = encoder_weights(states[i], states[reference].keys(), folders[i])
    if mapped:
        logger.info(
            "merging the encoder weights of pretrain output(s) %s into %s's layout (their MLM head and "
            "RetroMAE decoder are dropped)",
            [str(folders[i]) for i in mapped],
            folders[reference],
        )
    check_same_architecture(folders, states, reference=reference, mapped=mapped)
    heads: dict[str, list[dict[str, torch.Tensor]]] = {}
    for name in HEAD_FILES:
        present = [(f / name).exists() for f in folders]
        if any(present) and not all(present):
            raise InputError(f"cannot merge: only some models have {name} (an M3 model with a plain one?)")
        if all(present):
            heads[name] = [torch.load(f / name, map_location="cpu", weights_only=True) for f in folders]
            check_same_architecture(folders, heads[name])
    decoders = None
    if pretrained and not mapped:  # pretrain outputs only: the merge is one too, its decoder their average
        from safetensors.torch import load_file

        decoders = [load_file(str(f / DECODER_FILE)) for f in folders]
        check_same_architecture(folders, decoders)
    model_losses = None
    if example_data is not None:
        if max_examples < 1 or group_size < 1:
            raise InputError("max_examples and group_size must be >= 1")
        records = load_train_data(example_data if not isinstance(example_data, (str, Path)) else [example_data])
        records = records[:max_examples]
        if isinstance(examples, (str, Path)):
            examples = io.read_examples(examples)
        kind = model_kind(folders[reference], model_type)
        model_losses = [
            example_loss(
                f,
                records,
                kind,
                group_size=group_size,
                batch_size=batch_size,
                loss_temperature=loss_temperature,
                query_max_len=query_max_len,
                passage_max_len=passage_max_len,
                examples=examples,
            )
            for f in folders
        ]
        weights = weights_from_losses(model_losses, temperature)
        logger.info("example losses %s -> weights %s", model_losses, weights)
    weights = check_weights(weights, len(folders))
    output = Path(output_dir)
    output.mkdir(parents=True, exist_ok=True)
    copy_extras(folders[reference], output)
    mark_float32(output)
    from safetensors.torch import save_file

    merged = average_states(states, weights, reference=reference)
    save_file(merged, str(output / "model.safetensors"), metadata={"format": "pt"})
    for name, head_states in heads.items():
        torch.save(average_states(head_states, weights), output / name)
    if decoders is not None:
        save_file(average_states(decoders, weights), str(output / DECODER_FILE), metadata={"format": "pt"})
    record = {"models": [str(m) for m in models], "weights": weights, "losses": model_losses}
    (output / WEIGHTS_JSON).write_text(json.dumps({**record, "temperature": temperature}, indent=2))
    return MergeResult(output, weights, model_losses)
