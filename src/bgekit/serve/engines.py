"""Library models as the batcher's three stages: tokenize, forward, post-process.

Nothing here re-implements the encode path. Tokenization is the model's own
``tokenize`` / ``tokenize_pairs`` (prompt rules, instructions, truncation exactly as
``encode_queries`` / ``compute_score``), the forward is ``embed_tokenized`` /
``encode_tokenized`` / ``score_tokenized`` (the same pooling and heads, through the same
:class:`~bgekit.models.base.ModelHost` with its OOM back-off), and post-processing is the
model's ``postprocess`` (``dimensions`` as ``truncate_dim``, then normalization) or
:func:`~bgekit.models.scoring.sigmoid`. So a served vector equals the library's vector for
the same text, up to float rounding from a different batch padding.

Rerankers without a tokenized scoring path (layerwise / lightweight LLM rerankers, and
embedders used as rerankers) are tokenized for usage and length checks, then scored with
``compute_score`` on each batch.
"""

from __future__ import annotations

import base64
import json
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..errors import InputError
from ..models.scoring import (
    NON_FINITE_HINT,
    check_one_layer,
    non_finite_message,
    non_finite_rows,
    ranking,
    score_list,
    sigmoid,
)
from ..models.tokenization import Tokenized
from ..runtime.batching import length_sorted_batches
from .batcher import Beat, Work

WARM_UP_TEXT = "warm up"


class InputTooLong(InputError):
    """Inputs longer than the model's limit while truncation is off (HTTP 413)."""


class NonFiniteOutput(RuntimeError):
    """The model gave NaN or infinite values for some inputs of a request: JSON has no such numbers, and
    a client's parser would fail on them (or, base64- or bit-packed, take them as real values). HTTP 500
    with code ``model_error``, as a forward that raises."""

    def __init__(self, model: str, bad: Sequence[int], total: int, what: str):
        self.model = model
        super().__init__(
            f"model {model!r} gave NaN or infinite values for {non_finite_message(sorted(bad), total, what)}; "
            f"{NON_FINITE_HINT}"
        )


def check_finite(model: str, bad: Sequence[int] | set[int], total: int, what: str = "inputs") -> None:
    """A :class:`NonFiniteOutput` when ``bad`` (positions of results with NaN or infinite values) is not empty."""
    if bad:
        raise NonFiniteOutput(model, sorted(bad), total, what)


CUT_THEM = "send truncate=true (or start the server with --truncate, env BGEKIT_TRUNCATE=true) to cut them"
# /v2 (Cohere's schema): embed takes truncate END | START | NONE; rerank has no per-request switch
CUT_THEM_V2_EMBED = 'send "truncate": "END" (cut the end) or "START" (cut the start) to cut them'
CUT_THEM_V2_RERANK = "start the server with --truncate (env BGEKIT_TRUNCATE=true) to cut them"
# Cohere's embedding_types this server computes (binary / ubinary: sign bits packed 8 to a byte)
EMBEDDING_TYPES = ("float", "binary", "ubinary")


def cohere_meta(n_tokens: int) -> dict:
    """Cohere's ``meta``: the API version and the tokens the model read (nothing is billed here)."""
    return {
        "api_version": {"version": "2"},
        "billed_units": {"input_tokens": n_tokens},
        "tokens": {"input_tokens": n_tokens},
    }


def packed_signs(vectors: np.ndarray, signed: bool) -> np.ndarray:
    """Cohere's (and sentence-transformers') binary embeddings: one bit per dimension, 1 where the value
    is positive, packed 8 to a byte, first dimension in the high bit; a vector whose size is not a
    multiple of 8 is padded with 0 bits. ``ubinary``: the bytes (0..255); ``binary``: the bytes less 128
    (-128..127)."""
    packed = np.packbits(vectors > 0, axis=-1)
    return packed.astype(np.int16) - 128 if signed else packed


def length_source(limit: int, ceiling: int | None, option: int | None) -> str:
    """Where a 413's token limit comes from, and how far the server's --max-length moves it: the client
    reading it can tell a setting the operator can raise from the model's hard limit."""
    if ceiling is not None and limit >= ceiling:
        return (
            f"{limit} is the size of the model's position table, the most it reads: --max-length / "
            "BGEKIT_MAX_LENGTH cannot raise it"
        )
    if option is None:
        origin = f"{limit} is the model's default; the server's --max-length (env BGEKIT_MAX_LENGTH) sets it"
    else:
        origin = f"{limit} is the server's --max-length {option} (env BGEKIT_MAX_LENGTH)"
    return origin if ceiling is None else f"{origin}, up to the model's {ceiling} positions"


def run_chunks(lengths: Sequence[int], max_tokens: int, run: Callable[[list[int]], Sequence[Any]], beat: Beat) -> list:
    """Run items in length-sorted chunks of at most ``max_tokens`` padded tokens; one result per
    item in input order. ``run(indices)`` returns one result per index; ``beat()`` follows each chunk."""
    out: list[Any] = [None] * len(lengths)
    _, chunks = length_sorted_batches(lengths, max(len(lengths), 1), max_tokens=max_tokens)
    for chunk in chunks:
        indices = chunk.tolist()
        results = run(indices)
        if len(results) != len(indices):
            raise RuntimeError(f"the model returned {len(results)} results for {len(indices)} inputs")
        for index, result in zip(indices, results, strict=True):
            out[index] = result
        beat()
    return out


def subset(tokenized: Tokenized, indices: list[int]) -> Tokenized:
    return Tokenized(
        [tokenized.ids[i] for i in indices],
        None if tokenized.type_ids is None else [tokenized.type_ids[i] for i in indices],
    )


def merge(parts: Sequence[Tokenized]) -> Tokenized:
    """One :class:`Tokenized` holding every part's rows, in order."""
    ids = [row for part in parts for row in part.ids]
    has_types = all(part.type_ids is not None for part in parts)
    type_ids = [row for part in parts for row in part.type_ids] if has_types else None  # type: ignore[union-attr]
    return Tokenized(ids, type_ids, sum(part.truncated for part in parts))


def split(rows: list[Any], works: Sequence[Work]) -> list[list[Any]]:
    """Rows of a merged batch back into one list per work."""
    out, start = [], 0
    for work in works:
        out.append(rows[start : start + work.n_items])
        start += work.n_items
    return out


def encode_vector(vector: np.ndarray, encoding_format: str) -> list[float] | str:
    if encoding_format == "base64":
        return base64.b64encode(np.ascontiguousarray(vector, dtype="<f4").tobytes()).decode("ascii")
    return vector.tolist()


def to_json(body: dict) -> bytes:
    return json.dumps(body, ensure_ascii=False, separators=(",", ":"), allow_nan=False).encode("utf-8")


def _devices(model: Any) -> list[str]:
    devices = getattr(model, "target_devices", None) or getattr(
        getattr(model, "embedder", None), "target_devices", None
    )
    return list(devices or ["cpu"])


@dataclass
class EmbedOptions:
    """What one embeddings request asks the forward stage for (M3 outputs)."""

    dense: bool = True
    sparse: bool = False
    colbert: bool = False


class EmbeddingEngine:
    """An :class:`~bgekit.models.embedder.Embedder` behind ``/v1/embeddings``."""

    task = "embeddings"

    def __init__(
        self, name: str, source: str, model: Any, max_batch_tokens: int, *, max_length_option: int | None = None
    ):
        self.name, self.source, self.model = name, source, model
        self.max_batch_tokens = max_batch_tokens
        self.max_length_option = max_length_option  # the server's --max-length, for the 413 message
        self.is_m3 = hasattr(model, "encode_tokenized")
        # settle the limits once (clamped to the position table), not on every request
        model.query_max_length = model.host.clamp_length(None, model.query_max_length)
        model.passage_max_length = model.host.clamp_length(None, model.passage_max_length)
        self.created = int(time.time())
        self.dimensions: int | None = None
        self.devices = _devices(model)

    @property
    def outputs(self) -> list[str]:
        return ["dense", "sparse", "colbert"] if self.is_m3 else ["dense"]

    def max_length(self, input_type: str | None = None) -> int:
        default = self.model.query_max_length if input_type == "query" else self.model.passage_max_length
        return self.model.host.clamp_length(None, default)

    def card(self) -> dict:
        return {
            "id": self.name,
            "created": self.created,
            "task": self.task,
            "source": self.source,
            "model_class": type(self.model).__name__,
            "dimensions": self.dimensions,
            "max_length": self.max_length(),
            "outputs": self.outputs,
        }

    # stage 1: tokenize (tokenizer pool)
    def prepare(
        self,
        texts: list[str],
        input_type: str | None,
        truncate: bool,
        options: EmbedOptions,
        *,
        truncation_side: str | None = None,
        max_tokens: int | None = None,
        cut_hint: str = CUT_THEM,
    ) -> Work:
        """Tokenized ``texts``. A text past the model's limit loses its end (the library's cut), or its
        start with ``truncation_side="left"``; with ``truncate=False`` it is a 413 instead. ``max_tokens``
        (Cohere's) first cuts each text to that many tokens of its own, on the same side."""
        if max_tokens is not None:
            texts, over = self.model.tokenizer.clip_texts(texts, max_tokens, from_start=truncation_side == "left")
            if over and not truncate:
                raise InputTooLong(
                    f"{over} of {len(texts)} inputs are longer than max_tokens={max_tokens} tokens; shorten "
                    f"them, or {cut_hint}"
                )
        tokenized = self.model.tokenize(texts, input_type, truncation_side=truncation_side)
        if tokenized.truncated and not truncate:
            limit = self.max_length(input_type)
            source = length_source(limit, self.model.host.max_positions, self.max_length_option)
            raise InputTooLong(
                f"{tokenized.truncated} of {len(texts)} inputs are longer than model {self.name!r} reads: {limit} "
                f"tokens{' a query' if input_type == 'query' else ''}, special tokens included ({source}); shorten "
                f"them, or {cut_hint}"
            )
        lengths = [len(row) for row in tokenized.ids]
        return Work(lengths, (tokenized, options), sum(lengths), tokenized.truncated)

    # stage 2: forward (the model's thread)
    def forward(self, works: list[Work], beat: Beat) -> list[Any]:
        merged = merge([w.payload[0] for w in works])
        lengths = [len(row) for row in merged.ids]
        if not self.is_m3:

            def run(indices: list[int]):
                return list(self.model.embed_tokenized(subset(merged, indices), batch_size=len(indices)))

            rows = run_chunks(lengths, self.max_batch_tokens, run, beat)
            return [self._stack(part) for part in split(rows, works)]
        wanted = EmbedOptions(
            # always: the pooled row a text costs next to nothing and shows whether the model's outputs
            # are finite (NaN sparse weights would be dropped as weights <= 0, not seen: _check_finite)
            dense=True,
            sparse=any(w.payload[1].sparse for w in works),
            colbert=any(w.payload[1].colbert for w in works),
        )

        def run_m3(indices: list[int]):
            out = self.model.encode_tokenized(
                subset(merged, indices),
                batch_size=len(indices),
                return_dense=wanted.dense,
                return_sparse=wanted.sparse,
                return_colbert_vecs=wanted.colbert,
                convert_to_numpy=True,
            )
            n = len(indices)
            dense = out["dense_vecs"] if wanted.dense else [None] * n
            lexical = out["lexical_weights"] if wanted.sparse else [None] * n
            colbert = out["colbert_vecs"] if wanted.colbert else [None] * n
            return list(zip(dense, lexical, colbert, strict=True))

        return split(run_chunks(lengths, self.max_batch_tokens, run_m3, beat), works)

    @staticmethod
    def _stack(rows: list[Any]):
        import torch

        return torch.stack(rows)

    def warm_up(self) -> None:
        """One forward before serving: loads kernels, checks the pipeline, learns the vector size."""
        work = self.prepare([WARM_UP_TEXT], None, True, EmbedOptions())
        (result,) = self.forward([work], lambda: None)
        self.dimensions = int(self._dense(result, None).shape[-1])

    # stage 3: post-process (the app's render pool)
    def _dense(self, result: Any, dimensions: int | None) -> np.ndarray:
        """Finished dense vectors: ``dimensions`` works as ``truncate_dim`` (slice, then normalize)."""
        if not self.is_m3:
            raw = result if dimensions is None else result[:, :dimensions]
            return self.model.postprocess(raw, False, convert_to_numpy=True)
        dense = np.stack([row[0] for row in result])  # already finished by encode_tokenized
        if dimensions is not None:
            dense = dense[:, :dimensions]
            if self.model.normalize_embeddings:
                dense = dense / np.maximum(np.linalg.norm(dense, axis=-1, keepdims=True), 1e-12)
        return dense.astype(np.float32, copy=False)

    def render(self, work: Work, result: Any, *, encoding_format: str, dimensions: int | None) -> bytes:
        options: EmbedOptions = work.payload[1]
        dense = self._dense(result, dimensions) if options.dense else None
        self._check_finite(result, dense, options, work.n_items)
        data = []
        for index in range(work.n_items):
            item: dict[str, Any] = {
                "object": "embedding",
                "index": index,
                "embedding": encode_vector(dense[index], encoding_format)
                if dense is not None
                else ("" if encoding_format == "base64" else []),
            }
            if options.sparse:
                item["lexical_weights"] = {key: float(value) for key, value in result[index][1].items()}
            if options.colbert:
                vectors = result[index][2]
                item["colbert_vecs"] = (
                    [encode_vector(row, "base64") for row in vectors]
                    if encoding_format == "base64"
                    else vectors.tolist()
                )
            data.append(item)
        usage = {"prompt_tokens": work.n_tokens, "total_tokens": work.n_tokens}
        return to_json({"object": "list", "data": data, "model": self.name, "usage": usage})

    def _check_finite(self, result: Any, dense: np.ndarray | None, options: EmbedOptions, n_items: int) -> None:
        """A :class:`NonFiniteOutput` naming the inputs whose returned outputs hold NaN or infinity (checked
        on the host copy, whatever the encoding: a base64 or bit-packed NaN is as wrong as a JSON one)."""
        bad = set() if dense is None else set(non_finite_rows(dense))
        if self.is_m3:
            # an M3 forward always pools the dense row: a NaN there flags the text whatever it asked for
            bad.update(non_finite_rows(np.stack([row[0] for row in result])))
            for index in range(n_items):
                _, lexical, colbert = result[index]
                if options.sparse and non_finite_rows(np.fromiter(lexical.values(), np.float32, len(lexical))[None]):
                    bad.add(index)
                if options.colbert and non_finite_rows(np.asarray(colbert).reshape(1, -1)):
                    bad.add(index)
        check_finite(self.name, bad, n_items)

    def render_cohere(
        self, work: Work, result: Any, *, texts: list[str], embedding_types: Sequence[str], dimensions: int | None
    ) -> bytes:
        """Cohere's v2 embed response: one list of vectors per requested type (``EMBEDDING_TYPES``)."""
        dense = self._dense(result, dimensions)
        self._check_finite(result, dense, EmbedOptions(), work.n_items)
        embeddings: dict[str, list] = {}
        for kind in embedding_types:
            if kind == "float":
                embeddings[kind] = dense.tolist()
            else:
                embeddings[kind] = packed_signs(dense, signed=kind == "binary").tolist()
        return to_json(
            {
                "id": str(uuid.uuid4()),
                "embeddings": embeddings,
                "texts": texts,
                "meta": cohere_meta(work.n_tokens),
                "response_type": "embeddings_by_type",
            }
        )


def _scores_tokenized(model: Any) -> bool:
    """True when the class that defines the model's scoring also defines ``score_tokenized``."""
    owner = next((cls for cls in type(model).__mro__ if "_score" in cls.__dict__), None)
    return owner is not None and "score_tokenized" in owner.__dict__


class RerankEngine:
    """A :class:`~bgekit.models.reranker.Reranker` behind ``/v1/rerank``."""

    task = "rerank"
    outputs = ("scores",)
    dimensions = None

    def __init__(
        self, name: str, source: str, model: Any, max_batch_tokens: int, *, max_length_option: int | None = None
    ):
        check_one_layer(model)  # a ranking needs one score a document
        self.name, self.source, self.model = name, source, model
        self.max_batch_tokens = max_batch_tokens
        self.max_length_option = max_length_option  # the server's --max-length, for the 413 message
        self.tokenized_scoring = _scores_tokenized(model)
        self.host = getattr(model, "host", None) or model.embedder.host
        model.max_length = self.host.clamp_length(None, model.max_length)
        self.created = int(time.time())
        self.devices = _devices(model)

    def max_length(self) -> int:
        """A pair's limit in tokens; a document's for an embedder used as a reranker, which reads the
        query and each document on their own."""
        if self._pairs:
            return self.host.clamp_length(None, self.model.max_length)
        return self.host.clamp_length(None, min(self.model.max_length, self.model.embedder.passage_max_length))

    def query_max_length(self) -> int:
        """The query's own limit: ``query_max_length``, by default 3/4 of a pair's (FlagEmbedding's rule)."""
        if self._pairs:
            wanted = self.model.query_max_length
            wanted = self.model.max_length * 3 // 4 if wanted is None else wanted
            return self.host.clamp_length(wanted, self.max_length())
        wanted = min(self.model.query_max_length or self.model.max_length, self.model.embedder.query_max_length)
        return self.host.clamp_length(None, wanted)

    @property
    def _pairs(self) -> bool:
        """The model reads (query, document) pairs together (not an embedder used as a reranker)."""
        return hasattr(self.model, "tokenize_pairs")

    def card(self) -> dict:
        return {
            "id": self.name,
            "created": self.created,
            "task": self.task,
            "source": self.source,
            "model_class": type(self.model).__name__,
            "dimensions": None,
            "max_length": self.max_length(),
            "outputs": list(self.outputs),
        }

    # stage 1: tokenize
    def _tokenize(self, query: str, documents: list[str]) -> tuple[Tokenized, int]:
        """``(tokenized pairs, tokens the model reads)``."""
        if self._pairs:
            tokenized = self.model.tokenize_pairs([(query, d) for d in documents])
            return tokenized, sum(len(row) for row in tokenized.ids)
        # an embedder used as a reranker reads the query once and each passage on its own
        embedder = self.model.embedder
        q = embedder.tokenize([query], "query", max_length=self.query_max_length())
        p = embedder.tokenize(documents, "passage", max_length=self.max_length())
        cut = len(p.ids) if q.truncated else p.truncated  # a cut query cuts every pair
        pairs = Tokenized([q.ids[0] + row for row in p.ids], None, cut)
        return pairs, len(q.ids[0]) + sum(len(row) for row in p.ids)

    def pair_limits(self) -> tuple[int, int, int]:
        """What a pair model reads of the texts a client sends (each with its rerank instruction, as
        plain tokens): ``(query at most, document at most, both together at most)``. A cross-encoder's
        special tokens take part of ``max_length``; an LLM reranker's separator and prompt come on top
        of it (FlagEmbedding's layout: the pair is cut to ``max_length + len(separator + prompt)``)."""
        length, query = self.max_length(), self.query_max_length()
        if hasattr(self.model, "pair_inputs"):  # LLM rerankers: bos + query, separator + document, then the tail
            empty, tail = self.model.pair_inputs([("", "")], query, length, self.model.prompt)
            head = len(empty.ids[0]) - tail  # bos and the separator
            return query, length, length + tail - head
        return query, length, length - self.model.tokenizer.n_special_pair

    def _side_lengths(self, query: str, documents: list[str]) -> tuple[int, list[int]]:
        """Tokens of the query and of each document as the model reads them, its rerank instructions
        included, special tokens not (the units of :meth:`pair_limits`)."""
        if self._pairs:
            pairs = self.model.detailed_pairs([(query, d) for d in documents])
            tokenizer, query, documents = self.model.tokenizer, pairs[0][0], [d for _, d in pairs]
        else:
            embedder = self.model.embedder
            tokenizer, (query,), documents = (
                embedder.tokenizer,
                embedder.prompted([query], "query"),
                embedder.prompted(documents, "passage"),
            )
        (query_ids,), _ = tokenizer.plain_ids([query])
        document_ids, _ = tokenizer.plain_ids(documents)
        return len(query_ids), [len(ids) for ids in document_ids]

    def _too_long(self, query: str, documents: list[str], cut: int) -> str:
        """The 413 message: which pair first breaks which limit, in numbers a client can act on."""
        if self._pairs:
            max_query, max_document, together = self.pair_limits()
        else:  # an embedder reads the query and each document on its own: no limit on both together
            embedder = self.model.embedder
            max_query = embedder.text_budget("query", self.query_max_length())
            max_document, together = embedder.text_budget("passage", self.max_length()), None
        q, lengths = self._side_lengths(query, documents)

        def too_long(d: int) -> bool:
            if q > max_query or d > max_document:
                return True
            return together is not None and min(q, max_query) + min(d, max_document) > together

        first = next((i for i, d in enumerate(lengths) if too_long(d)), None)
        found = ":" if first is None else f": documents[{first}] has {lengths[first]} tokens, the query {q};"
        limits = [f"a query of at most {max_query} tokens"]
        if together is None or max_document < together:
            limits.append(f"a document of at most {max_document}")
        if together is not None:
            limits.append(f"both together at most {together}")
        each = "" if together is not None else ", each on its own"
        source = length_source(self.max_length(), self.host.max_positions, self.max_length_option)
        query_rule = "the query's limit is 3/4 of it" if self._pairs and self.model.query_max_length is None else ""
        return (
            f"{cut} of {len(documents)} (query, document) pairs are too long for model {self.name!r}{found} it "
            f"reads {', '.join(limits[:-1])} and {limits[-1]}{each} (tokens of the texts sent, the model's rerank "
            f"instructions included). These follow from its max length: {source}"
            + (f"; {query_rule}" if query_rule else "")
        )

    def prepare(
        self,
        query: str,
        documents: list[str],
        truncate: bool,
        *,
        max_tokens_per_doc: int | None = None,
        cut_hint: str = CUT_THEM,
    ) -> Work:
        """Tokenized pairs; a pair past the model's limits is cut as ``compute_score`` cuts it, or with
        ``truncate=False`` a 413. ``max_tokens_per_doc`` (Cohere's) first cuts each document to its first
        that many tokens (of the document as sent, the model's own tokens), as text; at or above
        :meth:`max_length` it cannot change what the model reads and nothing is done."""
        if max_tokens_per_doc is not None and max_tokens_per_doc < self.max_length():
            tokenizer = self.model.tokenizer if self._pairs else self.model.embedder.tokenizer
            documents, _ = tokenizer.clip_texts(documents, max_tokens_per_doc)
        tokenized, n_tokens = self._tokenize(query, documents)
        if tokenized.truncated and not truncate:
            raise InputTooLong(f"{self._too_long(query, documents, tokenized.truncated)}. Shorten them, or {cut_hint}")
        payload = tokenized if self.tokenized_scoring else [(query, d) for d in documents]
        return Work([len(row) for row in tokenized.ids], payload, n_tokens, tokenized.truncated)

    # stage 2: forward
    def forward(self, works: list[Work], beat: Beat) -> list[list[float]]:
        lengths = [n for w in works for n in w.lengths]
        if self.tokenized_scoring:
            merged = merge([w.payload for w in works])

            def run(indices: list[int]) -> list[float]:
                return self.model.score_tokenized(subset(merged, indices), batch_size=len(indices))

        else:
            pairs = [pair for w in works for pair in w.payload]

            def run(indices: list[int]) -> list[float]:
                scores = self.model.compute_score([pairs[i] for i in indices], batch_size=len(indices), normalize=False)
                return score_list(scores, len(indices))  # one layer: `bgekit serve` refuses several

        return split(run_chunks(lengths, self.max_batch_tokens, run, beat), works)

    def warm_up(self) -> None:
        work = self.prepare(WARM_UP_TEXT, [WARM_UP_TEXT], True)
        self.forward([work], lambda: None)

    # stage 3: post-process
    def render(
        self,
        work: Work,
        scores: list[float],
        *,
        documents: list[str],
        top_n: int | None,
        return_documents: bool,
        raw_scores: bool,
    ) -> bytes:
        check_finite(self.name, non_finite_rows(np.asarray(scores, dtype=np.float64)), len(scores), "documents")
        results = self._results(
            scores, documents=documents, top_n=top_n, return_documents=return_documents, raw_scores=raw_scores
        )
        usage = {"prompt_tokens": work.n_tokens, "total_tokens": work.n_tokens}
        return to_json(
            {
                "object": "rerank",
                "id": f"rerank-{uuid.uuid4().hex}",
                "model": self.name,
                "results": results,
                "usage": usage,
            }
        )

    def render_cohere(
        self, work: Work, scores: list[float], *, documents: list[str], top_n: int | None, return_documents: bool
    ) -> bytes:
        """Cohere's v2 rerank response: ``id``, ``results`` best first (sigmoid scores), ``meta``."""
        check_finite(self.name, non_finite_rows(np.asarray(scores, dtype=np.float64)), len(scores), "documents")
        results = self._results(
            scores, documents=documents, top_n=top_n, return_documents=return_documents, raw_scores=False
        )
        return to_json({"id": str(uuid.uuid4()), "results": results, "meta": cohere_meta(work.n_tokens)})

    @staticmethod
    def _results(
        scores: list[float], *, documents: list[str], top_n: int | None, return_documents: bool, raw_scores: bool
    ) -> list[dict[str, Any]]:
        """``[{index, relevance_score[, document]}]`` best first, at most ``top_n``."""
        values = [float(s) for s in scores] if raw_scores else sigmoid(scores)
        results = []
        for index, _ in ranking(scores, top_n):  # by the raw score, as Reranker.rank and `bgekit rerank`
            result: dict[str, Any] = {"index": index, "relevance_score": values[index]}
            if return_documents:
                result["document"] = {"text": documents[index]}
            results.append(result)
        return results
