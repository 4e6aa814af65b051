"""The Embedder base: ``encode``, ``encode_queries`` and ``encode_corpus`` for every family.

One encode path serves all embedders (``texts -> prompt -> tokenize -> sorted batches ->
forward -> pool -> normalize -> input order``); a family supplies its prompt rule and
its pooling. Behaviour follows FlagEmbedding 1.4.2 so its users get the same numbers:
one string in gives one 1-D vector out, a list gives a 2-D array in input order,
queries get the instruction, passages only when a passage instruction is set.
"""

from __future__ import annotations

import dataclasses
import importlib
import logging
import re
import warnings
from collections.abc import Sequence
from typing import Any

import torch

from .. import hub, registry
from ..errors import InputError, UnknownModelError
from .flag_pool import EmbedderPoolMethods
from .inputs import as_text_list
from .onnx_backend import refuse_backend
from .scoring import SimilarityMethods, non_finite_rows, warn_non_finite

logger = logging.getLogger(__name__)


class Embedder(SimilarityMethods, EmbedderPoolMethods):
    """Base class of bgekit's embedders. Build one with :meth:`from_pretrained`.

    Example:
        >>> from bgekit import Embedder
        >>> model = Embedder.from_pretrained("BAAI/bge-small-en-v1.5")  # doctest: +SKIP
        >>> model.encode_queries(["what is BGE?"]).shape                  # doctest: +SKIP
        (1, 384)
    """

    def __init__(
        self,
        model_name_or_path: str,
        normalize_embeddings: bool = True,
        use_fp16: bool = True,
        query_instruction_for_retrieval: str | None = None,
        query_instruction_format: str = "{}{}",
        devices: str | int | Sequence[str | int] | None = None,
        batch_size: int = 256,
        query_max_length: int = 512,
        passage_max_length: int = 512,
        convert_to_numpy: bool = True,
        use_bf16: bool = False,
        passage_instruction_for_retrieval: str | None = None,
        passage_instruction_format: str = "{}{}",
        truncate_dim: int | None = None,
        **kwargs: Any,
    ):
        self.model_name_or_path = hub.model_name(model_name_or_path)  # as the CLI and every class name it
        self.normalize_embeddings = normalize_embeddings
        self.use_fp16 = use_fp16
        self.use_bf16 = use_bf16
        self.query_instruction_for_retrieval = query_instruction_for_retrieval
        self.query_instruction_format = unescape_format(query_instruction_format, what="query_instruction_format")
        self.passage_instruction_for_retrieval = passage_instruction_for_retrieval
        self.passage_instruction_format = unescape_format(passage_instruction_format, what="passage_instruction_format")
        self.batch_size = batch_size
        self.query_max_length = query_max_length
        self.passage_max_length = passage_max_length
        self.convert_to_numpy = convert_to_numpy
        if truncate_dim is not None and (
            isinstance(truncate_dim, bool) or not isinstance(truncate_dim, int) or truncate_dim < 1
        ):
            raise InputError(f"truncate_dim must be a positive int or None, got {truncate_dim!r}")
        self.truncate_dim = truncate_dim
        self._devices_arg = devices
        refuse_backend(type(self).__name__, kwargs.pop("backend", None))  # FlagModel takes it by name
        if kwargs:
            warnings.warn(f"{type(self).__name__} ignores unknown options: {sorted(kwargs)}", stacklevel=3)
        self.kwargs = kwargs

    # -- construction ---------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, model_name_or_path: str, model_class: str | None = None, **options: Any) -> Embedder:
        """Load any embedder by hub id or folder; the family comes from the registry or the folder.

        ``model_class`` (``"encoder-only-base"``, ``"encoder-only-m3"``, ``"decoder-only-base"``,
        ``"decoder-only-icl"``) and ``pooling_method`` override what bgekit would choose.
        Known models get their recommended query instruction unless you pass one
        (``query_instruction_for_retrieval=None`` keeps it; ``""`` turns it off).
        """
        adapter = None if options.get("peft_path") else hub.adapter_embedder(model_name_or_path)
        if adapter is not None:  # bgekit's OUT/adapter: its base, with the adapter merged, as it trained
            base, folder, spec = adapter
            name, _ = hub.resolve_adapter_base(base, folder, registry.EMBEDDERS, model_class or spec.kind)
            spec = spec if model_class is None else dataclasses.replace(spec, kind=model_class)
            options = {**options, "peft_path": str(folder)}
        else:
            name, spec = hub.resolve(model_name_or_path, registry.EMBEDDERS, model_class)
        skipped = spec.extra.get("modules_not_run")
        if skipped:  # its vectors would silently differ from sentence-transformers'
            raise UnknownModelError(
                f"{name} is a sentence-transformers model with modules bgekit does not run ({', '.join(skipped)}): "
                "its vectors would differ from sentence-transformers'. Use sentence-transformers for it, or "
                "FlagModel(path, pooling_method=...) for the transformer's pooled output alone."
            )
        defaults = spec_options(spec)
        defaults.update({k: v for k, v in options.items() if v is not None})
        if defaults.get("query_instruction_for_retrieval") == "":
            defaults["query_instruction_for_retrieval"] = None
        return embedder_class(spec.kind)(name, **defaults)

    # -- public encode API ----------------------------------------------------------------
    def encode_queries(
        self,
        queries: str | list[str],
        batch_size: int | None = None,
        max_length: int | None = None,
        convert_to_numpy: bool | None = None,
        **kwargs: Any,
    ):
        """Embed queries with the query instruction (if any). Shapes as :meth:`encode`.

        ``instruction=`` / ``instruction_format=`` replace the configured ones for this call
        (``instruction=None``: no instruction).
        """
        instruction = call_instruction(kwargs, self.query_instruction_for_retrieval, self.query_instruction_format)
        return self.encode(
            queries,
            batch_size=batch_size,
            max_length=self.query_max_length if max_length is None else max_length,
            convert_to_numpy=convert_to_numpy,
            **instruction,
            **kwargs,
        )

    def encode_corpus(
        self,
        corpus: str | list[str],
        batch_size: int | None = None,
        max_length: int | None = None,
        convert_to_numpy: bool | None = None,
        **kwargs: Any,
    ):
        """Embed passages; a passage instruction is added only if one was configured (or is given
        for this call as ``instruction=`` / ``instruction_format=``)."""
        instruction = call_instruction(kwargs, self.passage_instruction_for_retrieval, self.passage_instruction_format)
        return self.encode(
            corpus,
            batch_size=batch_size,
            max_length=self.passage_max_length if max_length is None else max_length,
            convert_to_numpy=convert_to_numpy,
            **instruction,
            **kwargs,
        )

    def encode(
        self,
        sentences: str | list[str],
        batch_size: int | None = None,
        max_length: int | None = None,
        convert_to_numpy: bool | None = None,
        instruction: str | None = None,
        instruction_format: str | None = None,
        *,
        normalize_embeddings: bool | None = None,
        show_progress_bar: bool | None = None,
        **kwargs: Any,
    ):
        """Embed texts as they are (plus ``instruction`` if given).

        Returns a float32 ``np.ndarray`` of shape ``(n, dim)`` for a list and ``(dim,)``
        for a single string; a CPU ``torch.Tensor`` with ``convert_to_numpy=False``.
        Texts longer than ``max_length`` tokens (default ``passage_max_length``) are
        truncated; the count is logged at INFO level.
        """
        if kwargs:
            raise InputError(f"encode() got unexpected options {sorted(kwargs)}")
        texts, single = as_text_list(sentences, "sentences")
        texts = with_instruction(texts, instruction, instruction_format)
        embeddings = self._embed(
            texts,
            batch_size=self.batch_size if batch_size is None else batch_size,
            max_length=self.passage_max_length if max_length is None else max_length,
            show_progress_bar=show_progress_bar,
        )
        result = self.postprocess(embeddings, single, convert_to_numpy, normalize_embeddings, in_place=True)
        bad = non_finite_rows(result[None] if single else result)
        warn_non_finite(logger, bad, len(texts), self.model_name_or_path)
        return result

    def postprocess(
        self,
        embeddings: torch.Tensor,
        single: bool,
        convert_to_numpy: bool | None = None,
        normalize_embeddings: bool | None = None,
        *,
        in_place: bool = False,
    ):
        """Pooled vectors -> what the caller asked for: ``truncate_dim`` slice, then L2
        normalization, one row for a single string, numpy or torch. ``in_place=True`` (for a tensor
        nobody else holds, as ``encode``'s own) normalizes into ``embeddings`` instead of a copy, so a
        large call holds one copy of its vectors, not two."""
        if self.truncate_dim is not None:
            embeddings = embeddings[:, : self.truncate_dim]
            in_place = False  # a view of the wider rows: a copy gives the caller contiguous vectors
        normalize = self.normalize_embeddings if normalize_embeddings is None else normalize_embeddings
        if normalize:
            out = embeddings if in_place else None
            embeddings = torch.nn.functional.normalize(embeddings, dim=-1, out=out)
        if single:
            embeddings = embeddings[0]
        to_numpy = self.convert_to_numpy if convert_to_numpy is None else convert_to_numpy
        return embeddings.numpy() if to_numpy else embeddings

    def tokenize(
        self,
        texts: str | list[str],
        input_type: str | None = None,
        max_length: int | None = None,
        truncation_side: str | None = None,
    ):
        """Token ids of ``texts`` exactly as the model reads them, for callers that run the
        stages themselves (the server tokenizes off its event loop, then batches).

        ``input_type`` picks the prompt rule: ``"query"`` as :meth:`encode_queries`, ``"passage"``
        as :meth:`encode_corpus`, ``None`` as :meth:`encode` (no instruction). ``max_length``
        defaults to the matching ``query_max_length`` / ``passage_max_length``. A text past it loses
        its end, as in the library's encode calls (the tokenizer's side), or with
        ``truncation_side="left"`` its start: an :class:`InputError` where the model's prompt comes
        before the text (:meth:`start_cut_problem`). Returns a
        :class:`~bgekit.models.tokenization.Tokenized` (``truncated`` counts inputs cut);
        ``embed_tokenized`` turns it into pooled vectors.
        """
        texts, _ = as_text_list(texts, "texts")
        if truncation_side == "left" and (problem := self.start_cut_problem(input_type)):
            raise InputError(f"cannot cut the start of these texts: {problem}")
        texts = self.prompted(texts, input_type)
        default = self.query_max_length if input_type == "query" else self.passage_max_length
        # every concrete embedder sets ``tokenizer`` (TextTokenizer) and ``host`` (ModelHost)
        max_length = self.host.clamp_length(max_length, default)
        return self.tokenizer.encode(texts, max_length, truncation_side=truncation_side)

    def start_cut_problem(self, input_type: str | None) -> str | None:
        """Why cutting a long text's start (``tokenize(..., truncation_side="left")``) would cut more than
        the text for ``input_type``: the model's instruction comes before it and would go first. None when
        only the text's own start is cut."""
        probe = "\x1f"  # a character no instruction holds
        (prompted,) = self.prompted([probe], input_type)
        if prompted.startswith(probe):
            return None
        kind = "query" if input_type == "query" else "passage" if input_type == "passage" else "encode"
        before = prompted[: prompted.find(probe)] if probe in prompted else prompted
        return f"the model's {kind} instruction {before!r} comes before the text and would be cut first"

    def prompted(self, texts: list[str], input_type: str | None) -> list[str]:
        """``texts`` as :meth:`tokenize` reads them for ``input_type``: with the query or passage
        instruction, or as they are for ``None``."""
        if input_type == "query":
            return with_instruction(texts, self.query_instruction_for_retrieval, self.query_instruction_format)
        if input_type == "passage":
            return with_instruction(texts, self.passage_instruction_for_retrieval, self.passage_instruction_format)
        if input_type is None:
            return texts
        raise InputError(f"input_type must be 'query', 'passage' or None, got {input_type!r}")

    def text_budget(self, input_type: str | None, max_length: int) -> int:
        """How many tokens of a :meth:`prompted` text (no special tokens) :meth:`tokenize` keeps
        within ``max_length``: the rest is the tokens the model adds around it. For messages that
        state a limit in tokens of the text a client sent."""
        return max_length - self.tokenizer.n_special_single

    def _embed(
        self, texts: list[str], batch_size: int, max_length: int, show_progress_bar: bool | None
    ) -> torch.Tensor:
        """Pooled float32 vectors (before truncation and normalization), in input order."""
        raise NotImplementedError

    def close(self) -> None:
        """Release worker threads of a multi-device pool (the model stays usable)."""

    def stop_self_pool(self) -> None:
        """FlagEmbedding's name for :meth:`close` (the model keeps its device memory until deleted)."""
        self.close()

    @staticmethod
    def get_detailed_instruct(instruction_format: str, instruction: str, sentence: str) -> str:
        """FlagEmbedding's prompt helper: ``instruction_format`` (``\\n`` read as a newline) filled
        with ``instruction`` and ``sentence``."""
        return unescape_format(instruction_format).format(instruction, sentence)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.model_name_or_path!r})"


def call_instruction(kwargs: dict[str, Any], instruction: str | None, instruction_format: str) -> dict[str, Any]:
    """The instruction one ``encode_queries`` / ``encode_corpus`` call uses: ``instruction=`` and
    ``instruction_format=`` taken out of ``kwargs`` override the configured ones (FlagEmbedding 1.4.2
    raised a TypeError for them: it passed its own and the caller's)."""
    fmt = kwargs.pop("instruction_format", None)
    return {"instruction": kwargs.pop("instruction", instruction), "instruction_format": fmt or instruction_format}


def with_instruction(texts: list[str], instruction: str | None, instruction_format: str | None) -> list[str]:
    """``instruction_format.format(instruction, text)`` for every text (FlagEmbedding's prompt rule);
    the texts unchanged when there is no instruction."""
    if instruction is None:
        return texts
    fmt = unescape_format(instruction_format or "{}{}")
    return [fmt.format(instruction, text) for text in texts]


SLOT_NAMES = {2: "instruction, text", 3: "instruction, query, response"}


def unescape_format(fmt: str, slots: int = 2, what: str = "instruction format") -> str:
    """FlagEmbedding turns a literal backslash-n in a format into a newline; the format must
    fill exactly ``slots`` positional ``{}`` fields (``{0}``/``{1}`` spellings too), so a
    format that would drop the text (``"{}"``) or fail inside ``str.format`` (``"{}{}{}"``,
    ``"{query}"``, an unpaired brace) is an :class:`InputError` here, naming the format."""
    names = SLOT_NAMES.get(slots, f"{slots} values")
    if not isinstance(fmt, str):
        raise InputError(f"{what} must be a string with {slots} {{}} slots ({names}), got {fmt!r}")
    fmt = fmt.replace("\\n", "\n")
    problem = format_problem(fmt, slots)
    if problem:
        raise InputError(f"{what} must have {slots} {{}} slots ({names}) and no other braces: {problem} in {fmt!r}")
    return fmt


def format_problem(fmt: str, slots: int) -> str | None:
    """What is wrong with ``fmt`` as a ``str.format`` template of ``slots`` positional values."""
    import string

    try:
        fields = [name for _, name, _, _ in string.Formatter().parse(fmt) if name is not None]
    except ValueError as exc:  # "Single '}' encountered in format string"
        return str(exc)
    used: set[int] = set()
    auto = 0
    for name in fields:
        head = re.match(r"[^.\[]*", name).group()
        if head == "":
            used.add(auto)
            auto += 1
        elif head.isdigit():
            used.add(int(head))
        else:
            return f"a named field {{{name}}} (write {{}} instead; use {{{{ }}}} for a literal brace)"
    if used != set(range(slots)):
        return f"{len(fields)} field(s)"
    try:
        fmt.format(*("x",) * slots)
    except (IndexError, KeyError, ValueError, AttributeError, TypeError) as exc:
        return f"{type(exc).__name__}: {exc}"
    return None


def spec_options(spec: registry.ModelSpec) -> dict[str, Any]:
    """Constructor options a registry entry implies."""
    options: dict[str, Any] = {}
    if spec.pooling_method:
        options["pooling_method"] = spec.pooling_method
    if spec.query_instruction:
        options["query_instruction_for_retrieval"] = spec.query_instruction
    if spec.query_instruction_format != "{}{}":
        options["query_instruction_format"] = spec.query_instruction_format
    if spec.passage_instruction:
        options["passage_instruction_for_retrieval"] = spec.passage_instruction
    if spec.trust_remote_code:
        options["trust_remote_code"] = True
    if spec.max_length:
        options["query_max_length"] = options["passage_max_length"] = spec.max_length
    if spec.normalize_embeddings is not None:
        options["normalize_embeddings"] = spec.normalize_embeddings
    return options


# embedder kind -> (module, class), imported only when a model of that kind is built
EMBEDDER_CLASSES = {
    registry.ENCODER: ("bgekit.models.encoder", "FlagModel"),
    registry.M3: ("bgekit.models.m3", "BGEM3FlagModel"),
    registry.DECODER: ("bgekit.models.llm", "FlagLLMModel"),
    registry.ICL: ("bgekit.models.llm", "FlagICLModel"),
    registry.PSEUDO_MOE: ("bgekit.models.pseudo_moe", "FlagPseudoMoEModel"),
}


def embedder_class(kind: str) -> type[Embedder]:
    """The bgekit class that runs an embedder kind."""
    if kind not in EMBEDDER_CLASSES:
        raise InputError(f"unknown embedder class {kind!r}; use one of {sorted(EMBEDDER_CLASSES)}")
    module, name = EMBEDDER_CLASSES[kind]
    return getattr(importlib.import_module(module), name)
