"""sentence-transformers' convenience methods on bgekit's models: ``rank`` on every reranker (as
``CrossEncoder.rank``) and ``similarity`` on every embedder (as ``SentenceTransformer.similarity``).

Both are thin: ``rank`` is :meth:`compute_score` on ``(query, document)`` pairs, sorted; ``similarity``
is a matrix product of vectors ``encode`` already returned.

Example:
    >>> reranker = Reranker.from_pretrained("BAAI/bge-reranker-base")                   # doctest: +SKIP
    >>> reranker.rank("what do pandas eat?", ["Paris is in France.", "Pandas eat bamboo."])  # doctest: +SKIP
    [{'corpus_id': 1, 'score': 7.1}, {'corpus_id': 0, 'score': -10.9}]
    >>> model = Embedder.from_pretrained("BAAI/bge-small-en-v1.5")                      # doctest: +SKIP
    >>> model.similarity(model.encode(["a", "b"]), model.encode(["c"])).shape          # doctest: +SKIP
    (2, 1)
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from ..errors import InputError
from .inputs import as_text_list

SIMILARITY_FUNCTIONS = ("cosine", "dot")


def check_top_k(top_k: Any, name: str = "top_k") -> None:
    """An :class:`InputError` unless ``top_k`` is ``None`` or a positive int."""
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
        raise InputError(f"{name} must be a positive integer or None, got {top_k!r}")


def sigmoid(scores: Sequence[float]) -> list[float]:
    """``1 / (1 + exp(-x))`` in float64, as FlagEmbedding's ``normalize=True``."""
    values = np.asarray(scores, dtype=np.float64)
    return (1.0 / (1.0 + np.exp(-values))).tolist()


def non_finite_rows(values: Any) -> list[int]:
    """Positions of the items of ``values`` that hold a NaN or an infinity: a 2-D array's (or CPU
    tensor's) rows, a 1-D array's or a list's entries. A row sum comes first, so the usual all-finite
    result costs one pass over host memory and no copy; only a non-finite sum is looked at element by
    element (a sum of finite values that overflows is not reported)."""
    if hasattr(values, "detach"):  # a CPU torch tensor (the library's own results are on the host already)
        values = values.detach().float().numpy()
    array = np.asarray(values)
    if array.size == 0 or array.dtype.kind not in "fc":
        return []
    rows = array.reshape(len(array), -1) if array.ndim else array.reshape(1, 1)
    with np.errstate(over="ignore", invalid="ignore"):
        if np.isfinite(rows.sum(axis=1)).all():
            return []
    return np.flatnonzero(~np.isfinite(rows).all(axis=1)).tolist()


def non_finite_message(bad: Sequence[int], total: int, what: str = "inputs") -> str:
    """``"3 of 10 inputs (positions [0, 4, 7])"``: the positions listed, at most 10 of them."""
    shown = ", ".join(str(i) for i in bad[:10]) + (", ..." if len(bad) > 10 else "")
    return f"{len(bad)} of {total} {what} (positions [{shown}])"


#: what a non-finite result usually means, and what to do about it
NON_FINITE_HINT = (
    "in float16 a long input can overflow; load the model in float32 (use_fp16=False, `--dtype float32`) "
    "or bfloat16, or check its weights"
)


def warn_non_finite(logger: Any, bad: Sequence[int], total: int, model: str, what: str = "inputs") -> None:
    """One warning when some of ``total`` results (``bad``: their positions, from :func:`non_finite_rows`)
    hold NaN or infinite values; nothing raised, as FlagEmbedding returns such values as they are."""
    if bad:
        logger.warning(
            "model %s gave NaN or infinite values for %s: %s",
            model,
            non_finite_message(sorted(bad), total, what),
            NON_FINITE_HINT,
        )


def _several_layers(count: int, layers: Any = None) -> InputError:
    asked = f" (cutoff_layers={list(layers)})" if layers is not None else ""
    return InputError(
        f"the reranker gives scores for {count} layers{asked}; ranking needs one score a document: "
        "use one cutoff layer (cutoff_layers=[N], when building the reranker or in the call)"
    )


def check_one_layer(reranker: Any, options: Mapping[str, Any] | None = None) -> None:
    """An :class:`InputError` when ``reranker`` (a layerwise or lightweight LLM reranker) is set to score
    several cutoff layers, by ``options["cutoff_layers"]`` or its own ``cutoff_layers``: a ranking needs one
    score a document. Checked before any scoring, so a long job fails at once, not after the forward."""
    layers = (options or {}).get("cutoff_layers")
    if layers is None:
        layers = getattr(reranker, "cutoff_layers", None)
    if isinstance(layers, Sequence) and not isinstance(layers, str) and len(layers) > 1:
        raise _several_layers(len(layers), layers)


def score_list(scores: Any, count: int) -> list[float]:
    """What a reranker's ``compute_score`` returned for ``count`` pairs, as ``count`` floats: a list, a numpy
    array, a tensor or (a custom model's, for one pair) a bare number. Scores for several layers (a layerwise
    reranker asked for several ``cutoff_layers``) are refused: a ranking needs one score a document."""
    if hasattr(scores, "detach"):  # torch tensor
        scores = scores.detach().float().cpu().numpy()
    if hasattr(scores, "tolist"):
        scores = scores.tolist()
    if isinstance(scores, (int, float)):
        scores = [scores]
    scores = list(scores)
    if scores and isinstance(scores[0], (list, tuple)):
        raise _several_layers(len(scores))
    if len(scores) != count:
        raise InputError(f"the reranker returned {len(scores)} scores for {count} documents")
    return [float(s) for s in scores]


def ranking(scores: Sequence[float], top_k: int | None = None) -> list[tuple[int, float]]:
    """``(position, score)`` pairs of ``scores``, best first, at most ``top_k``: score descending, ties in
    input order (as sentence-transformers' ``rank``), a NaN score last. The one ordering rule of
    :meth:`~RankMethods.rank`, :meth:`~bgekit.SearchIndex.search`, ``bgekit rerank`` and the server's rerank
    routes. Rank raw scores (logits): a sigmoid turns every logit above ~37 into 1.0 and would tie them."""
    values = [float(s) for s in scores]
    order = sorted(range(len(values)), key=lambda i: (math.isnan(values[i]), -values[i]))
    return [(i, values[i]) for i in order[:top_k]]


def raw_and_shown(reranker: Any, pairs: list[tuple[str, str]], **options: Any) -> tuple[list[float], list[float]]:
    """``(raw, shown)`` scores of ``pairs``: the raw scores to rank by and the scores to show, which are their
    sigmoid when ``normalize`` (the option, else the reranker's own setting) asks for it, as
    ``compute_score(normalize=True)`` gives them."""
    check_one_layer(reranker, options)
    asked = options.pop("normalize", None)
    normalize = bool(getattr(reranker, "normalize", False)) if asked is None else bool(asked)
    if asked is not None or hasattr(reranker, "normalize"):  # a custom compute_score may take no normalize
        options["normalize"] = False
    raw = score_list(reranker.compute_score(pairs, **options), len(pairs)) if pairs else []
    return raw, sigmoid(raw) if normalize else raw


def rank_documents(
    reranker: Any,
    query: str,
    documents: Sequence[str],
    top_k: int | None = None,
    return_documents: bool = False,
    **score_options: Any,
) -> list[dict[str, Any]]:
    """:meth:`RankMethods.rank` for any object with a ``compute_score(pairs, **options)``."""
    if not isinstance(query, str):
        what = "None" if query is None else type(query).__name__
        raise InputError(f"query is {what}; pass one query string (rank() ranks documents for one query)")
    texts, single = as_text_list(documents, "documents")
    if single:
        raise InputError("documents is a single string; pass a list of documents")
    check_top_k(top_k)
    if not isinstance(return_documents, bool):
        raise InputError(f"return_documents must be True or False, got {return_documents!r}")
    raw, shown = raw_and_shown(reranker, [(query, text) for text in texts], **score_options)
    results = []
    for i, _ in ranking(raw, top_k):
        result: dict[str, Any] = {"corpus_id": i, "score": shown[i]}
        if return_documents:
            result["text"] = texts[i]
        results.append(result)
    return results


class RankMethods:
    """``rank`` for rerankers (mixed into :class:`~bgekit.Reranker` and :class:`~bgekit.AbsReranker`)."""

    def rank(
        self,
        query: str,
        documents: Sequence[str],
        top_k: int | None = None,
        return_documents: bool = False,
        batch_size: int | None = None,
        *,
        show_progress_bar: bool | None = None,
        **score_options: Any,
    ) -> list[dict[str, Any]]:
        """Rank ``documents`` for one ``query``, best first, as sentence-transformers' ``CrossEncoder.rank``.

        Returns a list of ``{"corpus_id": int, "score": float}`` (plus ``"text"``: the document, with
        ``return_documents=True``), sorted by score descending (ties in input order), cut to ``top_k``
        (``None``: every document). ``corpus_id`` is the document's position in ``documents``. The scores are
        :meth:`compute_score`'s for the ``(query, document)`` pairs, so the query and passage instructions apply
        and ``normalize=True``, ``max_length=`` and the other ``compute_score`` options pass through.

        Example:
            >>> reranker = Reranker.from_pretrained("BAAI/bge-reranker-base")                      # doctest: +SKIP
            >>> reranker.rank("what do pandas eat?", ["Paris is in France.", "Pandas eat bamboo."],
            ...               top_k=1, return_documents=True)                                      # doctest: +SKIP
            [{'corpus_id': 1, 'score': 7.1, 'text': 'Pandas eat bamboo.'}]
        """
        if batch_size is not None:
            score_options["batch_size"] = batch_size
        if show_progress_bar is not None:
            score_options["show_progress_bar"] = show_progress_bar
        return rank_documents(self, query, documents, top_k, return_documents, **score_options)


def _as_vectors(value: Any, name: str):
    """``(matrix, is_torch)``: a 2-D float array (a 1-D vector is one row) from numpy, torch or lists."""
    if value is None:
        raise InputError(f"{name} is None; pass vectors from encode()")
    if isinstance(value, str) or (isinstance(value, (list, tuple)) and value and isinstance(value[0], str)):
        raise InputError(f"{name} holds text; similarity() compares vectors: pass model.encode(...) of the texts")
    if hasattr(value, "detach"):  # torch tensor
        value = value.detach().float().cpu()
        is_torch = True
    elif isinstance(value, (list, tuple)) and value and hasattr(value[0], "detach"):  # a list of tensors
        value = [v.detach().float().cpu().numpy() for v in value]
        is_torch = True
    else:
        is_torch = False
    try:
        matrix = np.asarray(value, dtype=np.float32)
    except (TypeError, ValueError):
        raise InputError(
            f"{name} must be vectors (a numpy array or a torch tensor), not {type(value).__name__}"
        ) from None
    if matrix.ndim == 1:
        matrix = matrix[None, :]
    if matrix.ndim != 2 or matrix.shape[0] == 0 or matrix.shape[1] == 0:
        raise InputError(f"{name} must be vectors of shape (n, dim) or (dim,), got shape {matrix.shape}")
    return matrix, is_torch


def similarity_matrix(a: Any, b: Any, function: str = "cosine"):
    """``(n1, n2)`` scores of every row of ``a`` against every row of ``b``: cosine or dot product."""
    if function not in SIMILARITY_FUNCTIONS:
        raise InputError(f"similarity function must be one of {SIMILARITY_FUNCTIONS}, got {function!r}")
    left, left_torch = _as_vectors(a, "embeddings1")
    right, right_torch = _as_vectors(b, "embeddings2")
    if left.shape[1] != right.shape[1]:
        raise InputError(f"embeddings1 has dimension {left.shape[1]}, embeddings2 {right.shape[1]}")
    if function == "cosine":
        left = left / np.maximum(np.linalg.norm(left, axis=1, keepdims=True), 1e-12)
        right = right / np.maximum(np.linalg.norm(right, axis=1, keepdims=True), 1e-12)
    scores = (left @ right.T).astype(np.float32, copy=False)
    if left_torch or right_torch:
        import torch

        return torch.from_numpy(scores)
    return scores


class SimilarityMethods:
    """``similarity`` for embedders (mixed into :class:`~bgekit.Embedder` and :class:`~bgekit.AbsEmbedder`)."""

    _similarity_fn_name: str = "cosine"

    @property
    def similarity_fn_name(self) -> str:
        """``"cosine"`` (the default, as sentence-transformers') or ``"dot"``: what :meth:`similarity` computes."""
        return self._similarity_fn_name

    @similarity_fn_name.setter
    def similarity_fn_name(self, value: str) -> None:
        value = getattr(value, "value", value)  # an enum member
        if value not in SIMILARITY_FUNCTIONS:
            raise InputError(f"similarity_fn_name must be one of {SIMILARITY_FUNCTIONS}, got {value!r}")
        self._similarity_fn_name = value

    def similarity(self, embeddings1: Any, embeddings2: Any):
        """Similarity of every vector of ``embeddings1`` with every vector of ``embeddings2``, as
        sentence-transformers' ``SentenceTransformer.similarity``: an ``(n1, n2)`` float32 matrix.

        ``similarity_fn_name`` picks the function: ``"cosine"`` (default) or ``"dot"``. bgekit's embedders
        L2-normalize by default, so for their vectors both equal ``embeddings1 @ embeddings2.T``, FlagEmbedding's
        scores. Inputs are what ``encode`` returns: ``(n, dim)`` or ``(dim,)`` numpy arrays or torch tensors. The
        result is a numpy array, or a CPU torch tensor when either input is a tensor.

        Example:
            >>> model = Embedder.from_pretrained("BAAI/bge-small-en-v1.5")                        # doctest: +SKIP
            >>> q = model.encode_queries(["what do pandas eat?"])                                 # doctest: +SKIP
            >>> p = model.encode_corpus(["Pandas eat bamboo.", "Paris is in France."])           # doctest: +SKIP
            >>> model.similarity(q, p)                                                            # doctest: +SKIP
            array([[0.71, 0.32]], dtype=float32)
        """
        return similarity_matrix(embeddings1, embeddings2, self.similarity_fn_name)
