"""Run any bgekit embedder under the ``mteb`` package (``pip install mteb``), for the full benchmark.

:class:`MtebEncoder` implements mteb's encoder protocol, both generations of it:

- mteb 2.x (``mteb.models.EncoderProtocol``): ``encode(inputs, *, task_metadata, hf_split,
  hf_subset, prompt_type=None, **kwargs)`` where ``inputs`` is a DataLoader of batches
  (dicts with a ``"text"`` list; documents arrive as ``(title + " " + text).strip()``),
  plus ``similarity`` / ``similarity_pairwise`` (cosine) and ``mteb_model_meta``;
- mteb 1.x: ``encode(sentences, *, task_name, prompt_type=None, **kwargs)`` with a list of
  strings, and ``encode_queries`` / ``encode_corpus``.

``prompt_type="query"`` goes through the model's ``encode_queries`` (its query instruction),
``"document"`` through ``encode_corpus``. Calls without a prompt type are the symmetric tasks
(STS, classification, clustering, pair classification), whose texts are neither queries nor
documents. FlagEmbedding 1.4.2's MTEB evaluation embeds them as queries, but a retrieval-only
prefix (BGE's "Represent this sentence for searching relevant passages: ") does not belong on
them: BGE's own MTEB runs leave it off outside retrieval. So ``symmetric="auto"`` (the default)
embeds them as queries where the model's instruction is meant for every input it is not a
document: an instruction template (``"Instruct: {}\\nQuery: {}"``: e5-mistral, gte-Qwen, bge-en-icl
and other LLM embedders) or a query prefix paired with a passage prefix (e5's ``"query: "`` /
``"passage: "``, which e5 prescribes for symmetric tasks); otherwise as they are.
``symmetric="query"`` always embeds them as queries (FlagEmbedding 1.4.2's rule),
``symmetric="plain"`` never.

Per-task prompts: ``model_prompts`` maps mteb prompt names to instructions, looked up as mteb's own
wrappers do (``AbsEncoder.get_prompt_name``): ``"{task name}-{prompt type}"``, the task name,
``"{task type}-{prompt type}"``, the task type, then the prompt type (``"query"`` / ``"document"``).
The prompt found is that call's instruction, in place of the model's: queries and symmetric texts
get it in the model's query format, documents in its passage format (an empty prompt: no
instruction). Calls no key matches embed as described above.

Normalization: by default every call keeps the model's own ``normalize_embeddings`` (as mteb's own
wrappers and bgekit's evaluation do: BGE families normalize). FlagEmbedding 1.4.2's MTEB runner turns it
off for Classification tasks (``set_normalize_embeddings(False)``; BGE's published MTEB runs embedded every
task unnormalized, "normalize embedding will harm the performance of classification task"), where mteb fits a
logistic regression on the vectors themselves, so the two give different Classification scores.
``normalize_for_classification=False`` does what FlagEmbedding's runner does for those tasks (``True``
normalizes them whatever the model does); other task types keep the model's setting. A call's task type is
its ``task_metadata.type`` (mteb 2.x); mteb 1.x passes only ``task_name``, looked up with ``mteb.get_task``.

In-context-learning models (bge-en-icl) also take ``task_examples``: each task's few-shot examples, keyed and
looked up as ``model_prompts``. A task's queries are embedded as a ``FlagICLModel`` set up with that task's
prompt as its query instruction and its examples would embed them (FlagEmbedding's MTEB runner calls
``set_instruction`` and ``set_examples`` per task): an example without ``instruct`` takes the task's
instruction; without task examples the model's own examples stay. Documents never get examples.
mteb itself is not a dependency of bgekit: nothing here imports it except ``mteb_model_meta``.

Example:
    >>> import mteb                                                          # doctest: +SKIP
    >>> from bgekit.eval.mteb import MtebEncoder                             # doctest: +SKIP
    >>> model = MtebEncoder("BAAI/bge-small-en-v1.5")                        # doctest: +SKIP
    >>> mteb.evaluate(model, mteb.get_tasks(tasks=["SciFact", "STSBenchmark"]))  # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import InputError
from ..io import document_text

#: how texts of calls without a prompt type are embedded (see the module docstring)
SYMMETRIC_MODES = ("auto", "query", "plain")


def _prompt_kind(prompt_type: Any) -> str | None:
    """``"query"``, ``"document"`` or None from mteb's PromptType (a str enum) or a string."""
    if prompt_type is None:
        return None
    value = str(getattr(prompt_type, "value", prompt_type)).lower()
    if value in ("query", "queries"):
        return "query"
    if value in ("document", "passage", "corpus", "documents"):
        return "document"
    return None


def _prompt_type_value(prompt_type: Any) -> str | None:
    """The prompt type as mteb spells it in prompt names (``PromptType.query.value``: ``"query"``)."""
    return None if prompt_type is None else str(getattr(prompt_type, "value", prompt_type))


def _check_prompts(model_prompts: Any) -> dict[str, str] | None:
    if model_prompts is None:
        return None
    if not isinstance(model_prompts, Mapping) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in model_prompts.items()
    ):
        raise InputError(
            "model_prompts must map prompt names (a task name or type, '-query' / '-document' added or not, "
            f"or 'query' / 'document') to instruction strings, got {model_prompts!r}"
        )
    return dict(model_prompts)


def _check_task_examples(task_examples: Any) -> dict[str, list[dict[str, str]]] | None:
    if task_examples is None:
        return None
    from ..models.llm import check_examples

    if not isinstance(task_examples, Mapping) or not all(isinstance(k, str) for k in task_examples):
        raise InputError(
            "task_examples must map prompt names (as model_prompts: a task name or type, ...) to lists of "
            f"{{'instruct', 'query', 'response'}} examples, got {task_examples!r}"
        )
    checked = {}
    for key, examples in task_examples.items():
        try:
            checked[key] = check_examples(examples)
        except InputError as exc:
            raise InputError(f"task_examples[{key!r}]: {exc}") from None
    return checked


def _texts_from_inputs(inputs: Any) -> list[str]:
    """Strings from a list of strings, a list of corpus dicts, or an iterable of batches."""
    if isinstance(inputs, str):
        return [inputs]
    if isinstance(inputs, Mapping):  # one batch, or mteb 1.x corpus {"title": [...], "text": [...]}
        return _batch_texts(inputs)
    texts: list[str] = []
    for item in inputs:
        if isinstance(item, str):
            texts.append(item)
        elif isinstance(item, Mapping):
            if "text" in item and isinstance(item["text"], str):  # one corpus record
                texts.append(document_text(item.get("title") or "", item["text"]))
            else:
                texts.extend(_batch_texts(item))
        else:
            raise InputError(f"mteb passed an input bgekit cannot read: {type(item).__name__}")
    return texts


def _batch_texts(batch: Mapping[str, Any]) -> list[str]:
    if "text" not in batch:
        raise InputError(f"an mteb batch needs a 'text' column; got {sorted(batch)} (text-only models)")
    text = batch["text"]
    values = [text] if isinstance(text, str) else list(text)
    return [str(v) for v in values]


def _lookup(table: Mapping[str, Any] | None, task_metadata: Any, prompt_type: Any, task_name: str | None) -> str | None:
    """The key of ``table`` for a call, in mteb's prompt-name order (see ``MtebEncoder.get_prompt_name``)."""
    if not table:
        return None
    name = getattr(task_metadata, "name", None) or task_name
    task_type = getattr(task_metadata, "type", None)
    kind = _prompt_type_value(prompt_type)
    candidates = [
        f"{name}-{kind}" if name and kind else None,
        name,
        f"{task_type}-{kind}" if task_type and kind else None,
        task_type,
        kind,
    ]
    return next((key for key in candidates if key and key in table), None)


class MtebEncoder:
    """A bgekit :class:`~bgekit.Embedder` behind mteb's encoder protocol.

    Args:
        model: an Embedder, or a hub id / folder for ``Embedder.from_pretrained``; ``model_name=``
            is the same argument by mteb 2.x's keyword.
        revision: recorded in the model metadata (bgekit loads what ``model`` names).
        device: ``"cpu"``, ``"cuda:0"``...; passed to ``from_pretrained`` as ``devices``.
        batch_size: default batch size (mteb's ``batch_size`` keyword wins).
        symmetric: how calls without a prompt type (STS, classification, clustering) embed their
            texts: ``"auto"``, ``"query"`` or ``"plain"`` (see the module docstring).
        model_prompts: per-task instructions by mteb prompt name (see the module docstring).
        task_examples: in-context-learning models: per-task examples (lists of ``{"instruct", "query",
            "response"}`` dicts) by the same names, for that task's queries (see the module docstring).
        normalize_for_classification: L2-normalize the vectors of Classification tasks or not; None (the
            default) keeps the model's ``normalize_embeddings``, ``False`` is FlagEmbedding 1.4.2's MTEB runner.
        options: more ``Embedder.from_pretrained`` options.
    """

    def __init__(
        self,
        model: Any = None,
        revision: str | None = None,
        *,
        model_name: str | None = None,
        device: str | None = None,
        batch_size: int | None = None,
        symmetric: str = "auto",
        model_prompts: Mapping[str, str] | None = None,
        task_examples: Mapping[str, list[dict[str, str]]] | None = None,
        normalize_for_classification: bool | None = None,
        **options: Any,
    ):
        if (model is None) == (model_name is None):
            raise InputError(
                "MtebEncoder takes the model once: as its first argument (model=) or as model_name= (mteb 2.x), "
                f"got {'both' if model is not None else 'neither'}"
            )
        model = model if model is not None else model_name
        if symmetric not in SYMMETRIC_MODES:
            raise InputError(f"symmetric must be one of {', '.join(SYMMETRIC_MODES)}, got {symmetric!r}")
        if normalize_for_classification not in (None, True, False):
            raise InputError(
                "normalize_for_classification must be True, False or None (the model's own setting), "
                f"got {normalize_for_classification!r}"
            )
        self.model_prompts = _check_prompts(model_prompts)
        self.task_examples = _check_task_examples(task_examples)
        if isinstance(model, (str, Path)):
            from ..models.embedder import Embedder

            if device is not None:
                options.setdefault("devices", device)
            model = Embedder.from_pretrained(str(model), **options)
        elif options or device is not None:
            raise InputError("device and options apply only when MtebEncoder loads the model by name")
        if not hasattr(model, "encode_queries") or not hasattr(model, "encode_corpus"):
            raise InputError(f"MtebEncoder needs a bgekit Embedder, got {type(model).__name__}")
        if self.task_examples and not hasattr(model, "examples_for_task"):
            raise InputError(
                f"task_examples are for in-context-learning embedders (FlagICLModel, bge-en-icl); "
                f"{type(model).__name__} reads no examples"
            )
        self.model = model
        self.revision = revision
        self.batch_size = batch_size
        self.symmetric = symmetric
        self.normalize_for_classification = normalize_for_classification
        self._model_meta: Any = None

    @property
    def model_name(self) -> str:
        return str(self.model.model_name_or_path)

    def symmetric_kind(self) -> str | None:
        """``"query"`` when texts of a call without a prompt type get the query instruction, else None."""
        if self.symmetric != "auto":
            return "query" if self.symmetric == "query" else None
        model = self.model
        if not getattr(model, "query_instruction_for_retrieval", None):
            return None  # nothing to add either way
        template = (getattr(model, "query_instruction_format", None) or "{}{}") != "{}{}"
        paired = bool(getattr(model, "passage_instruction_for_retrieval", None))
        return "query" if template or paired else None

    def get_prompt_name(self, task_metadata: Any, prompt_type: Any, task_name: str | None = None) -> str | None:
        """The ``model_prompts`` key for a call, in mteb's order: task name + prompt type, task name,
        task type + prompt type, task type, prompt type; None when none is there. ``task_name``
        stands in for mteb 1.x calls, which pass no metadata."""
        return _lookup(self.model_prompts, task_metadata, prompt_type, task_name)

    def _run(
        self,
        texts: list[str],
        kind: str | None,
        batch_size: int | None,
        prompt: str | None = None,
        examples: list[dict[str, str]] | None = None,
        normalize: bool | None = None,
    ) -> np.ndarray:
        """Embed ``texts`` as ``kind``; a ``prompt`` (from ``model_prompts``) replaces the instruction,
        ``examples`` (from ``task_examples``) an in-context-learning model's examples and ``normalize`` (not
        None) the model's ``normalize_embeddings``, for this call."""
        if not texts:
            return np.zeros((0, 0), dtype=np.float32)
        batch_size = batch_size or self.batch_size
        options: dict[str, Any] = {} if prompt is None else {"instruction": prompt or None}
        with _normalizing(self.model, normalize, options):
            if kind == "document":
                output = self.model.encode_corpus(texts, batch_size=batch_size, **options)
            elif kind == "query" or prompt is not None or examples is not None:  # a symmetric task's prompt
                if examples is not None:
                    options["examples_for_task"] = examples
                output = self.model.encode_queries(texts, batch_size=batch_size, **options)
            else:
                output = self.model.encode(texts, batch_size=batch_size, **options)
        if isinstance(output, dict):  # M3: the dense vectors
            output = output["dense_vecs"]
        if hasattr(output, "detach"):
            output = output.detach().cpu().numpy()
        output = np.asarray(output, dtype=np.float32)
        return _unit(output) if normalize else output  # a custom model may not read the setting

    # -- the protocol -----------------------------------------------------------------------
    def encode(
        self,
        inputs: Iterable[Any],
        *,
        task_metadata: Any = None,
        hf_split: str | None = None,
        hf_subset: str | None = None,
        prompt_type: Any = None,
        task_name: str | None = None,
        batch_size: int | None = None,
        **kwargs: Any,
    ) -> np.ndarray:
        """Vectors ``(n, dim)`` float32 for the inputs, in order (see the module docstring)."""
        kind = _prompt_kind(prompt_type) if prompt_type is not None else self.symmetric_kind()
        return self._run(
            _texts_from_inputs(inputs),
            kind,
            batch_size,
            self._prompt(task_metadata, prompt_type, task_name),
            None if kind == "document" else self._examples(task_metadata, prompt_type, task_name),
            self._normalize(task_metadata, task_name),
        )

    def _normalize(self, task_metadata: Any, task_name: str | None) -> bool | None:
        """``normalize_for_classification`` for a Classification task's call, else None (the model's own)."""
        if self.normalize_for_classification is None:
            return None
        return self.normalize_for_classification if _task_type(task_metadata, task_name) == "Classification" else None

    def _prompt(self, task_metadata: Any, prompt_type: Any, task_name: str | None = None) -> str | None:
        key = self.get_prompt_name(task_metadata, prompt_type, task_name)
        return None if key is None else self.model_prompts[key]  # type: ignore[index]

    def _examples(self, task_metadata: Any, prompt_type: Any, task_name: str | None = None) -> list | None:
        key = _lookup(self.task_examples, task_metadata, prompt_type, task_name)
        return None if key is None else self.task_examples[key]  # type: ignore[index]

    def encode_queries(self, queries: Iterable[str], *, batch_size: int | None = None, **kwargs: Any) -> np.ndarray:
        """mteb 1.x / BEIR: queries with the query instruction (``model_prompts["query"]`` if given) and, for
        an in-context-learning model, ``task_examples["query"]`` if given."""
        return self._run(
            _texts_from_inputs(queries), "query", batch_size, self._prompt(None, "query"), self._examples(None, "query")
        )

    def encode_corpus(self, corpus: Any, *, batch_size: int | None = None, **kwargs: Any) -> np.ndarray:
        """mteb 1.x / BEIR: documents (dicts with ``title`` / ``text``, or strings); ``model_prompts["document"]``
        is their instruction if given."""
        if isinstance(corpus, Mapping) and "text" in corpus and not isinstance(corpus["text"], str):
            titles = corpus.get("title") or [""] * len(corpus["text"])
            texts = [f"{t} {x}".strip() if t else x for t, x in zip(titles, corpus["text"], strict=True)]
        else:
            texts = _texts_from_inputs(corpus)
        return self._run(texts, "document", batch_size, self._prompt(None, "document"))

    def similarity(self, embeddings1: Any, embeddings2: Any) -> np.ndarray:
        """Cosine similarity matrix ``(n1, n2)``."""
        a = _unit(embeddings1)
        b = _unit(embeddings2)
        return a @ b.T

    def similarity_pairwise(self, embeddings1: Any, embeddings2: Any) -> np.ndarray:
        """Cosine similarity of each row pair ``(n,)``."""
        a = _unit(embeddings1)
        b = _unit(embeddings2)
        if a.shape != b.shape:
            raise InputError(f"pairwise similarity needs equal shapes, got {a.shape} and {b.shape}")
        return (a * b).sum(axis=1)

    @property
    def mteb_model_meta(self):
        """mteb's ``ModelMeta`` for the results folder (needs mteb installed): the one mteb set, else
        one built from the model."""
        if self._model_meta is not None:
            return self._model_meta
        from mteb.models.model_meta import ModelMeta

        dim = None
        try:
            dim = int(self._run(["dimension probe"], None, 1).shape[1])
        except Exception:  # metadata only
            dim = None
        try:
            from mteb.models.model_meta import ScoringFunction

            cosine: Any = ScoringFunction.COSINE
        except ImportError:  # older mteb: a string
            cosine = "cosine"
        fields = {
            "name": _meta_name(self.model_name),
            "revision": self.revision,
            "embed_dim": dim,
            "max_tokens": getattr(self.model, "passage_max_length", None),
            "similarity_fn_name": cosine,
            "use_instructions": bool(getattr(self.model, "query_instruction_for_retrieval", None)),
            "framework": ["PyTorch"],
        }
        return ModelMeta.create_empty(fields) if hasattr(ModelMeta, "create_empty") else ModelMeta(**fields)

    @mteb_model_meta.setter
    def mteb_model_meta(self, meta: Any) -> None:
        # mteb 2.x's ModelMeta.load_model sets the meta it loaded the model by on the new model
        self._model_meta = meta

    def __repr__(self) -> str:
        return f"MtebEncoder({self.model!r})"


def _meta_name(model_name: str) -> str:
    """mteb's ``organization/model`` name for a model: a hub id as it is; a local folder by its last two path
    parts (``/ckpt/run3/checkpoint-500``: ``run3/checkpoint-500``), not its whole path, which became one long
    folder name of the results layout; a bare name as ``bgekit/NAME``."""
    path = Path(model_name).expanduser()
    if path.is_dir() or path.is_absolute():
        parts = path.resolve().parts[-2:]
        return "/".join(parts) if len(parts) == 2 and parts[0] != path.anchor else f"bgekit/{parts[-1]}"
    return model_name if "/" in model_name else f"bgekit/{model_name}"


def _task_type(task_metadata: Any, task_name: str | None) -> str | None:
    """mteb's task type of a call: its metadata's (mteb 2.x), else the named task's (mteb 1.x, which passes the
    name alone; None where mteb does not know it)."""
    task_type = getattr(task_metadata, "type", None)
    if task_type is not None or not task_name:
        return task_type
    return _named_task_type(task_name)


@functools.lru_cache(maxsize=256)
def _named_task_type(task_name: str) -> str | None:
    try:
        import mteb

        return mteb.get_task(task_name).metadata.type
    except Exception:  # mteb missing, or a name it does not know: the model's own setting
        return None


@contextlib.contextmanager
def _normalizing(model: Any, normalize: bool | None, options: dict[str, Any]):
    """One call with ``normalize_embeddings=normalize``: a bgekit :class:`~bgekit.Embedder` takes it as an
    option of the call; another model (an ``AbsEmbedder`` subclass, whose ``encode_single_device`` reads
    the attribute, as FlagEmbedding's runner sets it) has the attribute set for the call and put back."""
    from ..models.embedder import Embedder

    if normalize is None or getattr(model, "normalize_embeddings", None) == normalize:
        yield
        return
    if isinstance(model, Embedder):
        options["normalize_embeddings"] = normalize
        yield
        return
    had = "normalize_embeddings" in vars(model)
    before = getattr(model, "normalize_embeddings", None)
    model.normalize_embeddings = normalize
    try:
        yield
    finally:
        if had:
            model.normalize_embeddings = before
        else:
            del model.normalize_embeddings


def _unit(vectors: Any) -> np.ndarray:
    if hasattr(vectors, "detach"):
        vectors = vectors.detach().cpu().numpy()
    array = np.asarray(vectors, dtype=np.float32)
    if array.ndim == 1:
        array = array[None, :]
    return array / np.maximum(np.linalg.norm(array, axis=1, keepdims=True), 1e-12)
