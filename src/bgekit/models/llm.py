"""Decoder-only embedders: last-token pooling with instruction prompts, and in-context examples.

:class:`FlagLLMModel` covers e5-mistral, bge-multilingual-gemma2, gte-Qwen and Qwen3-Embedding
style models (``query_instruction_format`` per family, e.g. ``"<instruct>{}\\n<query>{}"``).
:class:`FlagICLModel` is bge-en-icl: few-shot examples go in front of every query, exactly
as FlagEmbedding lays them out (see :func:`icl_query_tokens`, which ICL training calls too). Both run on
transformers' own ``AutoModel``; pad token, padding side and EOS come from the tokenizer.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from ..errors import InputError
from .embedder import unescape_format
from .encoder import FlagModel
from .inputs import as_text_list
from .onnx_backend import refuse_backend
from .tokenization import TextTokenizer, Tokenized

ICL_QUERY_FORMAT = "<instruct>{}\n<query>{}"
ICL_EXAMPLE_FORMAT = "<instruct>{}\n<query>{}\n<response>{}"
ICL_SUFFIX = "\n<response>"
_MODELS = object()  # "the model's own": an instruction argument left out (None means no instruction)


class FlagLLMModel(FlagModel):
    """Decoder-only embedder with last-token pooling (FlagEmbedding's ``FlagLLMModel``).

    Example:
        >>> from bgekit import FlagLLMModel
        >>> model = FlagLLMModel("BAAI/bge-multilingual-gemma2", use_bf16=True,            # doctest: +SKIP
        ...     query_instruction_for_retrieval="Given a web search query, retrieve relevant passages.",
        ...     query_instruction_format="<instruct>{}\\n<query>{}")
        >>> model.encode_queries(["how much protein should a female eat"]).shape  # doctest: +SKIP
        (1, 3584)

    ``peft_path`` names a LoRA adapter folder (``bgekit finetune embedder --lora`` writes one
    in ``OUT/adapter``) that is merged into the base model at load time:

        >>> tuned = FlagLLMModel("BASE", peft_path="OUT/adapter", use_fp16=False)  # doctest: +SKIP
    """

    DEFAULT_POOLING_METHOD = "last_token"
    #: a causal decoder pads on its tokenizer's side, as FlagEmbedding does (last-token pooling reads either)
    bidirectional = False

    def __init__(
        self,
        model_name_or_path: str,
        normalize_embeddings: bool = True,
        use_fp16: bool = True,
        use_bf16: bool = False,
        query_instruction_for_retrieval: str | None = None,
        query_instruction_format: str = "Instruct: {}\nQuery: {}",
        devices: str | int | Sequence[str | int] | None = None,
        trust_remote_code: bool = False,
        cache_dir: str | None = None,
        batch_size: int = 256,
        query_max_length: int = 512,
        passage_max_length: int = 512,
        convert_to_numpy: bool = True,
        truncate_dim: int | None = None,
        pooling_method: str = "last_token",
        peft_path: str | None = None,
        **kwargs: Any,
    ):
        if pooling_method != "last_token":
            raise InputError(
                f"decoder-only embedders pool the last token; pooling_method={pooling_method!r} is not supported"
            )
        refuse_backend(type(self).__name__, kwargs.pop("backend", None))  # an export would lose the causal mask
        super().__init__(
            model_name_or_path,
            normalize_embeddings=normalize_embeddings,
            use_fp16=use_fp16,
            use_bf16=use_bf16,
            query_instruction_for_retrieval=query_instruction_for_retrieval,
            query_instruction_format=query_instruction_format,
            devices=devices,
            pooling_method="last_token",
            trust_remote_code=trust_remote_code,
            cache_dir=cache_dir,
            batch_size=batch_size,
            query_max_length=query_max_length,
            passage_max_length=passage_max_length,
            convert_to_numpy=convert_to_numpy,
            truncate_dim=truncate_dim,
            peft_path=peft_path,
            **kwargs,
        )


def check_examples(examples: object) -> list[dict[str, str]] | None:
    """Validate in-context examples: a list of ``{"instruct"?, "query", "response"}`` dicts."""
    if examples is None:
        return None
    if isinstance(examples, (Mapping, str)) or not isinstance(examples, Sequence):
        raise InputError("examples_for_task must be a list of {'instruct', 'query', 'response'} dicts")
    checked = []
    for index, example in enumerate(examples):
        if not isinstance(example, Mapping):
            raise InputError(f"examples_for_task[{index}] must be a dict, got {type(example).__name__}")
        missing = [key for key in ("query", "response") if key not in example]
        if missing:
            raise InputError(
                f"examples_for_task[{index}] is missing {missing}; each example needs 'query' and 'response'"
            )
        # other keys (an id, a label) are left out, as FlagEmbedding reads only these three
        kept = {key: example[key] for key in ("instruct", "query", "response") if key in example}
        for key, value in kept.items():
            if not isinstance(value, str):
                raise InputError(f"examples_for_task[{index}][{key!r}] must be a string, got {type(value).__name__}")
        checked.append(kept)
    return checked


def icl_examples_prefix(
    examples: Sequence[Mapping[str, str]] | None,
    default_instruction: str | None,
    example_format: str = ICL_EXAMPLE_FORMAT,
) -> str:
    """The few-shot block in front of a query: ``"\\n\\n".join(formatted examples) + "\\n\\n"``.

    An example without ``instruct`` takes ``default_instruction`` (as FlagEmbedding does, even
    when that is None); no examples give ``""``. :class:`FlagICLModel` and ICL training
    (:mod:`bgekit.train.icl`) both build their prefixes here.

    Example:
        >>> icl_examples_prefix([{"query": "q", "response": "r"}], "Find passages.")
        '<instruct>Find passages.\\n<query>q\\n<response>r\\n\\n'
    """
    if not examples:
        return ""
    blocks = [
        example_format.format(example.get("instruct", default_instruction), example["query"], example["response"])
        for example in examples
    ]
    return "\n\n".join(blocks) + "\n\n"


def icl_query_budget(tokenizer: TextTokenizer, max_length: int, suffix: str = ICL_SUFFIX) -> int:
    """Tokens of an instructed ICL query kept within ``max_length``: the rest is ``<s>`` and ``suffix + "</s>"``."""
    (bos_ids, tail_ids), _ = tokenizer.plain_ids(["<s>", suffix + "</s>"])
    return max_length - len(bos_ids) - len(tail_ids)


def icl_query_tokens(
    tokenizer: TextTokenizer, queries: list[str], prefixes: Sequence[str], max_length: int, suffix: str = ICL_SUFFIX
) -> Tokenized:
    """Token ids of ICL query prompts, bge-en-icl's rule; one prefix (examples block) per query.

    Each (already instructed) query is cut, without special tokens, to ``max_length`` minus
    the room ``<s>`` and ``suffix + "</s>"`` take, decoded back to text and wrapped as
    ``prefix + query + suffix``; that is tokenized with special tokens and capped at
    ``(len(prefix) + len(suffix) + max_length + 8) // 8 * 8 + 8`` tokens. Inference
    (:meth:`FlagICLModel.tokenize_queries`) and training call this one function, so a model
    is trained on exactly the prompts it is later asked with.

    Example:
        >>> tokenized = icl_query_tokens(model.tokenizer, ["<instruct>Find.\\n<query>q"], [""], 512)  # doctest: +SKIP
    """
    if len(prefixes) != len(queries):
        raise InputError(f"got {len(prefixes)} example prefixes for {len(queries)} queries")
    budget = icl_query_budget(tokenizer, max_length, suffix)
    if budget < 1:
        raise InputError(f"max_length={max_length} leaves no room for the query after the ICL special tokens")
    ids, truncated = tokenizer.plain_ids(queries, budget)
    texts = tokenizer.hf.batch_decode(ids)
    (suffix_ids,), _ = tokenizer.plain_ids([suffix])
    distinct = sorted(set(prefixes))
    prefix_lens = dict(zip(distinct, (len(x) for x in tokenizer.plain_ids(distinct)[0]), strict=True))
    out: list[list[int]] = [[] for _ in queries]
    out_types: list[list[int]] | None = [[] for _ in queries]
    for prefix in distinct:  # one cap per prefix: inference has one prefix, training a few
        rows = [i for i, p in enumerate(prefixes) if p == prefix]
        cap = ((prefix_lens[prefix] if prefix else 0) + len(suffix_ids) + max_length + 8) // 8 * 8 + 8
        part = tokenizer.encode([prefix + texts[i] + suffix for i in rows], cap)
        truncated = max(truncated, part.truncated)
        types = part.type_ids
        if types is None:  # no segment ids, or all zeros: collate and packing give zeros
            out_types = None
        for j, i in enumerate(rows):
            out[i] = part.ids[j]
            if out_types is not None and types is not None:
                out_types[i] = types[j]
    return Tokenized(out, out_types, truncated)


class FlagICLModel(FlagLLMModel):
    """In-context-learning embedder (bge-en-icl): few-shot examples prefix every query.

    Passages are encoded plainly. Examples are set at construction, with
    :meth:`set_examples`, or per call (``encode_queries(..., examples_for_task=[...])``).

    Example:
        >>> from bgekit import FlagICLModel
        >>> examples = [{"instruct": "Given a web search query, retrieve relevant passages.",  # doctest: +SKIP
        ...              "query": "what is a virtual interface",
        ...              "response": "A virtual interface is a software-defined abstraction..."}]
        >>> model = FlagICLModel("BAAI/bge-en-icl", examples_for_task=examples,               # doctest: +SKIP
        ...     query_instruction_for_retrieval="Given a web search query, retrieve relevant passages.")
    """

    def __init__(
        self,
        model_name_or_path: str,
        normalize_embeddings: bool = True,
        use_fp16: bool = True,
        use_bf16: bool = False,
        query_instruction_for_retrieval: str | None = None,
        query_instruction_format: str = ICL_QUERY_FORMAT,
        suffix: str = ICL_SUFFIX,
        devices: str | int | Sequence[str | int] | None = None,
        examples_for_task: list[dict[str, str]] | None = None,
        examples_instruction_format: str = ICL_EXAMPLE_FORMAT,
        trust_remote_code: bool = False,
        cache_dir: str | None = None,
        batch_size: int = 256,
        query_max_length: int = 512,
        passage_max_length: int = 512,
        convert_to_numpy: bool = True,
        truncate_dim: int | None = None,
        **kwargs: Any,
    ):
        super().__init__(
            model_name_or_path,
            normalize_embeddings=normalize_embeddings,
            use_fp16=use_fp16,
            use_bf16=use_bf16,
            query_instruction_for_retrieval=query_instruction_for_retrieval,
            query_instruction_format=query_instruction_format,
            devices=devices,
            trust_remote_code=trust_remote_code,
            cache_dir=cache_dir,
            batch_size=batch_size,
            query_max_length=query_max_length,
            passage_max_length=passage_max_length,
            convert_to_numpy=convert_to_numpy,
            truncate_dim=truncate_dim,
            **kwargs,
        )
        self.examples_instruction_format = unescape_format(
            examples_instruction_format, slots=3, what="examples_instruction_format"
        )
        self.examples_for_task = check_examples(examples_for_task)
        if not isinstance(suffix, str):
            raise InputError(f"suffix must be a string, got {suffix!r}")
        self.suffix = suffix  # after each query, as written (FlagEmbedding does not unescape it)
        self.prefix = self.examples_prefix(self.examples_for_task)

    def examples_prefix(self, examples: list[dict[str, str]] | None, default_instruction: Any = _MODELS) -> str:
        """``"\\n\\n".join(formatted examples) + "\\n\\n"``; ``""`` for ``None``. An empty list gives
        ``"\\n\\n"``, as FlagEmbedding 1.4.2's ``set_examples`` does (it joins nothing, then adds the separator).
        An example without ``instruct`` takes ``default_instruction`` (by default the model's query instruction)."""
        if examples is not None and len(examples) == 0:
            return "\n\n"
        if default_instruction is _MODELS:
            default_instruction = self.query_instruction_for_retrieval
        return icl_examples_prefix(examples, default_instruction, self.examples_instruction_format)

    def stop_self_query_pool(self) -> None:
        """FlagEmbedding's name for :meth:`close` (queries and passages share one pool here)."""
        self.close()

    def set_examples(self, examples_for_task: list[dict[str, str]] | None = None) -> None:
        """Replace the in-context examples (``None`` keeps the current ones: the last given, else the constructor's)."""
        if examples_for_task is not None:
            self.examples_for_task = check_examples(examples_for_task)
        self.prefix = self.examples_prefix(self.examples_for_task)

    def tokenize_queries(
        self, queries: list[str], max_length: int, prefix: str | None = None, instruction: Any = _MODELS
    ) -> Tokenized:
        """Token ids of the query prompts (see :func:`icl_query_tokens`), special tokens included;
        ``instruction`` replaces the model's query instruction (None: none)."""
        prefix = self.prefix if prefix is None else prefix
        if instruction is _MODELS:
            queries = self.prompted(queries, "query")
        elif instruction is not None:
            queries = [self.query_instruction_format.format(instruction, q) for q in queries]
        return icl_query_tokens(self.tokenizer, queries, [prefix] * len(queries), max_length, self.suffix)

    def prompted(self, texts: list[str], input_type: str | None) -> list[str]:
        """As :meth:`Embedder.prompted`; a query's instruction goes in as written (the examples prefix
        and the suffix are not part of it)."""
        if input_type != "query" or self.query_instruction_for_retrieval is None:
            return super().prompted(texts, input_type)
        return [self.query_instruction_format.format(self.query_instruction_for_retrieval, q) for q in texts]

    def text_budget(self, input_type: str | None, max_length: int) -> int:
        """As :meth:`Embedder.text_budget`; a query keeps what ``<s>`` and the suffix leave."""
        if input_type != "query":
            return super().text_budget(input_type, max_length)
        return icl_query_budget(self.tokenizer, max_length, self.suffix)

    def start_cut_problem(self, input_type: str | None) -> str | None:
        """As :meth:`Embedder.start_cut_problem`; a query is read through its prompt template (examples,
        instruction), which would be cut first."""
        if input_type == "query":
            return "the model reads queries through its prompt template (instruction, examples), which comes first"
        return super().start_cut_problem(input_type)

    def tokenize(
        self,
        texts: str | list[str],
        input_type: str | None = None,
        max_length: int | None = None,
        truncation_side: str | None = None,
    ):
        """As :meth:`Embedder.tokenize`; queries get the in-context examples, as :meth:`encode_queries`."""
        if input_type != "query":
            return super().tokenize(texts, input_type, max_length, truncation_side)
        if truncation_side == "left":
            raise InputError(f"cannot cut the start of these texts: {self.start_cut_problem(input_type)}")
        texts, _ = as_text_list(texts, "queries")
        return self.tokenize_queries(texts, self.host.clamp_length(max_length, self.query_max_length))

    def encode_queries_single_device(
        self,
        queries: str | list[str],
        batch_size: int = 256,
        max_length: int = 512,
        convert_to_numpy: bool = True,
        device: str | int | None = None,
        **kwargs: Any,
    ):
        """FlagEmbedding's name: :meth:`encode_queries` (examples and instruction) on one device."""
        with self.on_device(device):
            return self.encode_queries(queries, batch_size, max_length, convert_to_numpy, **kwargs)

    def encode_queries(
        self,
        queries: str | list[str],
        batch_size: int | None = None,
        max_length: int | None = None,
        convert_to_numpy: bool | None = None,
        *,
        examples_for_task: list[dict[str, str]] | None = None,
        instruction: Any = _MODELS,
        normalize_embeddings: bool | None = None,
        show_progress_bar: bool | None = None,
        **kwargs: Any,
    ):
        """Embed queries behind the in-context examples. For this call, ``examples_for_task`` replaces the
        examples and ``instruction`` the query instruction (None: none); examples without ``instruct`` take
        the call's instruction, as they take the instruction set before FlagEmbedding's ``set_examples``."""
        if kwargs:
            raise InputError(f"encode_queries() got unexpected options {sorted(kwargs)}")
        if instruction is not _MODELS and instruction is not None and not isinstance(instruction, str):
            raise InputError(f"instruction must be a string or None, got {instruction!r}")
        texts, single = as_text_list(queries, "queries")
        max_length = self.host.clamp_length(max_length, self.query_max_length)
        if examples_for_task is not None:
            prefix = self.examples_prefix(check_examples(examples_for_task), instruction)
        elif instruction is not _MODELS and self.examples_for_task is not None:
            prefix = self.examples_prefix(self.examples_for_task, instruction)
        else:
            prefix = self.prefix
        tokenized = self.tokenize_queries(texts, max_length, prefix, instruction)
        self.host.log_truncation(tokenized, max_length, "queries")
        pooled = self.host.run(
            tokenized,
            self._forward,
            self.batch_size if batch_size is None else batch_size,
            desc="Embedding queries",
            show_progress_bar=show_progress_bar,
        )
        return self.postprocess(pooled, single, convert_to_numpy, normalize_embeddings, in_place=True)
