"""Request and response models of the HTTP API: the single source of truth for the routes,
their validation (a request that does not fit gets a 422) and the OpenAPI docs.

``/v1/embeddings`` follows OpenAI's schema, ``/v1/rerank`` Cohere's v1 and Jina's, ``/v2/rerank`` and
``/v2/embed`` Cohere's v2; fields marked *extension* are bgekit's own and every OpenAI / Cohere client
simply ignores them. The /v1 requests ignore fields they do not know (any client's extras pass); the
/v2 ones take Cohere's fields only and answer 422 to others.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator
from pydantic_core import PydanticCustomError


class _Request(BaseModel):
    # unknown fields are ignored, as OpenAI-style servers do, so any client's extras pass
    model_config = ConfigDict(extra="ignore")


# -- errors ---------------------------------------------------------------------------------
class ErrorDetail(BaseModel):
    message: str = Field(description="What went wrong and what to do about it.")
    type: str = Field(
        description="invalid_request_error (4xx), rate_limit_error (429) or server_error (5xx)",
        examples=["invalid_request_error"],
    )
    param: str | None = Field(None, description="The request field at fault, if one is.")
    code: str | None = Field(None, description="A stable machine-readable code.", examples=["model_not_found"])


class ErrorResponse(BaseModel):
    """Every error, in OpenAI's shape."""

    error: ErrorDetail


# -- embeddings -----------------------------------------------------------------------------
TOKEN_IDS_REFUSED = (
    "token ids (integers) are not accepted; this server embeds text, and ids from a client's tokenizer (tiktoken) are "
    "not this model's tokens: send the texts as strings (LangChain's OpenAIEmbeddings sends token ids unless "
    "check_embedding_ctx_length=False)"
)


def _is_token_ids(value: object) -> bool:
    """OpenAI's token-array inputs: a list of ints, or a list of lists of ints."""
    if not isinstance(value, list) or not value:
        return False
    items = [x for row in value for x in row] if all(isinstance(row, list) for row in value) else value
    return bool(items) and all(isinstance(x, int) and not isinstance(x, bool) for x in items)


# other APIs' names for the two prompt rules: Voyage's and mteb's, Cohere's
INPUT_TYPE_ALIASES = {"document": "passage", "search_query": "query", "search_document": "passage"}


class EmbeddingRequest(_Request):
    input: str | list[str] = Field(
        description="One text or a list of texts (at most --max-client-batch-size). Token arrays (OpenAI's lists "
        "of ints) are refused with 422: ids from a client's tokenizer are not the served model's.",
        examples=["The giant panda is a bear native to China."],
    )
    model: str | None = Field(
        None, description="A served model name (GET /v1/models); default: the first embedding model."
    )
    encoding_format: Literal["float", "base64"] | None = Field(
        "float",
        description="float: a list of numbers; base64: little-endian float32 bytes, base64-encoded. null is float "
        "(LiteLLM sends null to keep the openai client from asking for base64).",
    )
    dimensions: int | None = Field(
        None,
        ge=1,
        strict=True,
        description="Keep the first N dimensions of the dense embedding (Matryoshka), then re-normalize as the "
        "model does; at most the model's size. Sparse weights and ColBERT vectors are never cut, and with "
        "return_dense=false (M3) it is ignored.",
    )
    user: str | None = Field(None, description="Accepted for OpenAI compatibility and ignored.")

    @field_validator("input", mode="before")
    @classmethod
    def _refuse_token_ids(cls, value: object) -> object:
        if _is_token_ids(value):
            raise PydanticCustomError("token_ids", TOKEN_IDS_REFUSED)
        return value

    input_type: Literal["query", "passage"] | None = Field(
        None,
        description="Extension. query (or search_query, Cohere's name): add the model's query instruction "
        "(encode_queries); passage (or document, as Voyage and mteb name it, or search_document, Cohere's): the "
        "passage rule (encode_corpus); omitted: the texts as they are (encode).",
    )

    @field_validator("input_type", mode="before")
    @classmethod
    def _input_type_aliases(cls, value: object) -> object:
        if value is None or value in ("query", "passage"):
            return value
        if isinstance(value, str) and value in INPUT_TYPE_ALIASES:
            return INPUT_TYPE_ALIASES[value]
        raise PydanticCustomError(
            "input_type",
            "must be query or passage (also accepted: {aliases}), got {value}",
            {"aliases": ", ".join(f"{k} for {v}" for k, v in INPUT_TYPE_ALIASES.items()), "value": repr(value)},
        )

    truncate: bool | None = Field(
        None,
        strict=True,
        description="Extension. Cut inputs longer than the model's max_length (true) or reject them with 413 "
        "(false); default: the server's --truncate setting.",
    )
    return_dense: bool = Field(True, strict=True, description="Extension (M3 models): include the dense `embedding`.")
    return_sparse: bool = Field(
        False, strict=True, description="Extension (M3 models): include `lexical_weights`, {token_id: weight}."
    )
    return_colbert_vecs: bool = Field(
        False, strict=True, description="Extension (M3 models): include `colbert_vecs`, one vector per token."
    )


class Usage(BaseModel):
    prompt_tokens: int = Field(description="Tokens the model read (after truncation, special tokens included).")
    total_tokens: int


class EmbeddingObject(BaseModel):
    object: Literal["embedding"] = "embedding"
    index: int
    embedding: list[float] | str = Field(
        description="The vector, or its base64 float32 bytes; empty when return_dense is false."
    )
    lexical_weights: dict[str, float] | None = Field(
        None, description="Extension (return_sparse): token id -> weight, as BGEM3FlagModel returns."
    )
    colbert_vecs: list[list[float]] | list[str] | None = Field(
        None, description="Extension (return_colbert_vecs): one vector per token (base64: one string per vector)."
    )


class EmbeddingResponse(BaseModel):
    object: Literal["list"] = "list"
    data: list[EmbeddingObject]
    model: str
    usage: Usage


# -- rerank ---------------------------------------------------------------------------------
class RerankDocument(BaseModel):
    text: str


class RerankRequest(_Request):
    query: str = Field(examples=["what do pandas eat?"])
    documents: list[str | RerankDocument] = Field(
        min_length=1,
        description="Texts to score against the query (strings or {'text': ...}); at most --max-client-batch-size.",
        examples=[["Pandas eat bamboo.", "Paris is in France."]],
    )
    model: str | None = Field(None, description="A served reranker name; default: the first reranker.")
    top_n: int | None = Field(None, ge=1, strict=True, description="Return only the best N results.")
    return_documents: bool = Field(False, strict=True, description="Include each document's text in its result.")
    raw_scores: bool = Field(
        False,
        strict=True,
        description="true: the model's raw logits; false: sigmoid scores in (0, 1) (normalize=True).",
    )
    truncate: bool | None = Field(
        None, strict=True, description="Extension. As in /v1/embeddings: cut long pairs or reject them with 413."
    )


class RerankResult(BaseModel):
    index: int = Field(description="Position of the document in the request.")
    relevance_score: float
    document: RerankDocument | None = Field(None, description="Only with return_documents.")


class RerankResponse(BaseModel):
    object: Literal["rerank"] = "rerank"
    id: str
    model: str
    results: list[RerankResult] = Field(description="Best first.")
    usage: Usage


# -- Cohere v2: /v2/rerank and /v2/embed -----------------------------------------------------
class _CohereRequest(BaseModel):
    # Cohere's schema exactly: a field it does not have is a 422 naming it, not silently dropped
    model_config = ConfigDict(extra="forbid")


class CohereMeta(BaseModel):
    api_version: dict[str, str] = Field(examples=[{"version": "2"}])
    billed_units: dict[str, int] = Field(description="input_tokens: tokens the model read (nothing is billed).")
    tokens: dict[str, int] = Field(description="input_tokens: tokens the model read, special tokens included.")


class CohereRerankRequest(_CohereRequest):
    model: str | None = Field(None, description="A served reranker name; default: the first reranker.")
    query: str = Field(examples=["what do pandas eat?"])
    documents: list[str] = Field(
        min_length=1,
        description="Texts to score against the query; at most --max-client-batch-size.",
        examples=[["Pandas eat bamboo.", "Paris is in France."]],
    )
    top_n: int | None = Field(None, ge=1, strict=True, description="Return only the best N results.")
    max_tokens_per_doc: int | None = Field(
        None,
        ge=1,
        strict=True,
        description="Cut each document to its first N tokens (the model's tokens of the document as sent) before "
        "it is paired with the query. The model still cuts each pair to its own limit (its max_length); at or "
        "above that limit this changes nothing. Cohere's default, 4096, is above every BGE reranker's limit.",
    )
    return_documents: bool = Field(
        False, strict=True, description="Include each document's text (older Cohere v2 clients send it)."
    )


class CohereRerankResult(BaseModel):
    index: int = Field(description="Position of the document in the request.")
    relevance_score: float = Field(description="The library's compute_score(..., normalize=True), in (0, 1).")
    document: RerankDocument | None = Field(None, description="Only with return_documents.")


class CohereRerankResponse(BaseModel):
    id: str
    results: list[CohereRerankResult] = Field(description="Best first.")
    meta: CohereMeta


class CohereEmbedRequest(_CohereRequest):
    model: str | None = Field(None, description="A served embedding model name; default: the first one.")
    texts: list[str] = Field(
        min_length=1,
        description="Texts to embed (at most --max-client-batch-size).",
        examples=[["The giant panda eats bamboo."]],
    )
    input_type: Literal["search_query", "search_document", "classification", "clustering"] = Field(
        description="search_query: the model's query instruction (encode_queries); search_document: its passage "
        "rule (encode_corpus); classification, clustering: the texts as they are (encode)."
    )
    embedding_types: list[Literal["float", "int8", "uint8", "binary", "ubinary", "base64"]] | None = Field(
        None,
        min_length=1,
        description="float (default), binary, ubinary (sign bits, 8 to a byte). int8, uint8 and base64 get a 400.",
    )
    truncate: Literal["NONE", "START", "END"] | None = Field(
        None,
        description="Inputs past the model's limit: END cuts their end (as the library does), START their start "
        "(400 where the model's instruction comes before the text), NONE answers 413. Default: END, as Cohere's "
        "(NONE on a server started with --no-truncate).",
    )
    max_tokens: int | None = Field(
        None,
        ge=1,
        strict=True,
        description="Cut each text to N tokens of its own (END: its first, START: its last; NONE: 413 if longer) "
        "before the model reads it.",
    )
    output_dimension: int | None = Field(
        None, ge=1, strict=True, description="Keep the first N dimensions, then re-normalize (as dimensions)."
    )


class CohereEmbeddings(BaseModel):
    float_: list[list[float]] | None = Field(None, alias="float")
    binary: list[list[int]] | None = Field(None, description="Packed sign bits less 128: -128..127.")
    ubinary: list[list[int]] | None = Field(None, description="Packed sign bits: 0..255.")


class CohereEmbedResponse(BaseModel):
    id: str
    embeddings: CohereEmbeddings
    texts: list[str]
    meta: CohereMeta
    response_type: Literal["embeddings_by_type"] = "embeddings_by_type"


# -- models and health ----------------------------------------------------------------------
class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "bgekit"
    task: Literal["embeddings", "rerank"] = Field(description="Extension: which route serves it.")
    source: str = Field(description="Extension: the hub id or folder it was loaded from.")
    model_class: str = Field(description="Extension: the bgekit class running it.")
    dimensions: int | None = Field(None, description="Extension: dense vector size (embedding models).")
    max_length: int | None = Field(None, description="Extension: longest input in tokens before truncation.")
    outputs: list[str] = Field(description="Extension: dense, sparse, colbert (embeddings) or scores (rerank).")


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class WorkerHealth(BaseModel):
    status: Literal["ok", "busy", "stuck", "failing", "stopping", "stopped"] = Field(
        description="stuck: the batch in flight made no progress for --stuck-timeout seconds; failing: the last "
        "batches all failed; stopping: shutdown began, admitted requests still run, new ones get 503."
    )
    queued: int = Field(description="Requests waiting for the model.")
    busy_seconds: float = Field(description="Seconds since the batch in flight last made progress (0 when idle).")
    consecutive_failures: int
    last_error: str | None = None


class HealthResponse(BaseModel):
    status: Literal["ok", "unhealthy"]
    models: dict[str, WorkerHealth]
