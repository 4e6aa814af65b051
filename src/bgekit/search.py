"""Search and rerank in Python: embed documents into a faiss index, search it, rerank the candidates.

:class:`SearchIndex` is what ``bgekit index build`` and ``bgekit search`` run, as a library: the same
folder format (``index.faiss``, ``ids.json``, ``docs.jsonl``, ``index.json``), so an index built by either
is searched by the other. Queries get the model's query instruction, documents none (as
``encode_queries`` / ``encode_corpus``); vectors are L2-normalized, so scores are cosine similarities.
Needs faiss (``pip install 'bgekit[eval]'``).

Example:
    >>> from bgekit import Embedder, Reranker, SearchIndex
    >>> embedder = Embedder.from_pretrained("BAAI/bge-small-en-v1.5")                        # doctest: +SKIP
    >>> index = SearchIndex.build(embedder, ["Pandas eat bamboo.", "Paris is in France."])   # doctest: +SKIP
    >>> index.search("what do pandas eat?", k=1)                                             # doctest: +SKIP
    [Hit(id='0', score=0.71, text='Pandas eat bamboo.', rank=1)]
    >>> reranker = Reranker.from_pretrained("BAAI/bge-reranker-base")                        # doctest: +SKIP
    >>> index.search("what do pandas eat?", k=1, reranker=reranker)                          # doctest: +SKIP
    >>> index.save("my-index"); SearchIndex.load("my-index")                                 # doctest: +SKIP
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from . import io
from .errors import InputError
from .models.inputs import _refuse_unordered, as_text_list

logger = logging.getLogger(__name__)

DOCS_FILE = "docs.jsonl"
#: an M3 index's lexical weights (``SearchIndex.build(m3_sparse=True)``): a scipy CSR matrix, a row a document
LEXICAL_FILE = "lexical_weights.npz"


@dataclass(frozen=True)
class Hit:
    """One search result: the document's ``id``, its ``score`` (cosine similarity, or the reranker's score
    when reranked), its ``text`` (``""`` for an index saved without texts) and its ``rank`` (1 = best)."""

    id: str
    score: float
    text: str
    rank: int

    def to_dict(self) -> dict[str, Any]:
        """``{"id", "score", "text", "rank"}``."""
        return asdict(self)


def absolute_if_local(name: str) -> str:
    """A model folder that exists here as its absolute path; a hub id as the loader reads it (without
    the stray whitespace or trailing slash it accepts: ``"org/name/"`` is ``"org/name"``). What an
    index records, so it is searched from any directory."""
    from . import hub

    name = hub.model_name(name)  # the library's own normalisation, so the CLI and every class agree
    path = Path(name).expanduser()
    return str(path.resolve()) if path.is_dir() else name


def _check_positive(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise InputError(f"{name} must be a positive integer, got {value!r}")


def parse_documents(documents: Any, ids: Any = None, first_id: int = 0) -> tuple[list[str], list[str]]:
    """``(ids, texts)`` of documents given as strings or ``{"id" | "_id", "title", "text"}`` dicts (the
    CLI's corpus records: a text is ``(title + " " + text).strip()``). ``ids`` overrides the records' ids;
    a document without one gets its position (from ``first_id``). Ids must be unique."""
    if documents is None:
        raise InputError("documents is None; pass a list of strings or of {'id', 'title', 'text'} dicts")
    if isinstance(documents, (str, bytes, bytearray, Mapping)):
        what = "a single string" if isinstance(documents, str) else f"a {type(documents).__name__}"
        raise InputError(f"documents is {what}; pass a list of strings or of {{'id', 'title', 'text'}} dicts")
    if not hasattr(documents, "__iter__"):
        raise InputError(f"documents must be a list of strings or dicts, got {type(documents).__name__}")
    _refuse_unordered(documents, "documents", "a list of strings or dicts")
    items = list(documents)
    if not items:
        raise InputError("documents is empty; pass at least one document")
    texts: list[str] = []
    found: list[str | None] = []
    for i, doc in enumerate(items):
        if isinstance(doc, str):
            texts.append(doc)
            found.append(None)
        elif isinstance(doc, Mapping):
            if "text" not in doc:
                raise InputError(f"documents[{i}] has no 'text' (keys: {sorted(map(str, doc))})")
            text, title = doc["text"], doc.get("title") or ""
            if not isinstance(text, str) or not isinstance(title, str):
                raise InputError(f"documents[{i}]: 'text' and 'title' must be strings")
            texts.append(io.document_text(title, text))
            key = next((doc[k] for k in ("_id", "id") if doc.get(k) is not None), None)
            found.append(None if key is None else str(key))
        else:
            raise InputError(f"documents[{i}] is {type(doc).__name__} ({doc!r:.60}), not a string or a dict")
    if ids is None:
        doc_ids = [str(first_id + i) if key is None else key for i, key in enumerate(found)]
    else:
        if isinstance(ids, (str, bytes)) or not hasattr(ids, "__iter__"):
            raise InputError(f"ids must be a list of document ids, got {type(ids).__name__}")
        ids = list(ids)
        if len(ids) != len(texts):
            raise InputError(f"got {len(ids)} ids for {len(texts)} documents")
        if any(i is None for i in ids):
            raise InputError(f"ids[{next(n for n, i in enumerate(ids) if i is None)}] is None")
        doc_ids = [str(i) for i in ids]
    seen: set[str] = set()
    for doc_id in doc_ids:
        if doc_id in seen:
            raise InputError(f"duplicate document id {doc_id!r}; every document needs its own id")
        seen.add(doc_id)
    return doc_ids, texts


class SearchIndex:
    """Documents embedded into a faiss index, with their texts, searchable by query text.

    Build one with :meth:`build` (or :meth:`load` a folder ``bgekit index build`` or :meth:`save` wrote),
    then :meth:`search`. ``index`` is the :class:`~bgekit.eval.index.DenseIndex` underneath, ``embedder``
    the model that embeds the queries.

    Example:
        >>> index = SearchIndex.build(embedder, [{"id": "d1", "title": "Pandas", "text": "They eat bamboo."},
        ...                                      {"id": "d2", "text": "Paris is in France."}])   # doctest: +SKIP
        >>> [hit.id for hit in index.search("what do pandas eat?", k=2)]                        # doctest: +SKIP
        ['d1', 'd2']
    """

    def __init__(
        self,
        index: Any,
        embedder: Any,
        texts: list[str] | None = None,
        *,
        query_instruction: str | None = None,
        max_length: int | None = None,
        folder: str | Path | None = None,
        sparse: Any = None,
    ):
        self.index = index
        #: a BGE-M3 index's :class:`~bgekit.eval.index.SparseIndex` of lexical weights (``build(m3_sparse=True)``)
        self.sparse = sparse
        self.embedder = embedder
        self._texts = texts
        #: the instruction queries get (``None``: the embedder's own; ``""``: none)
        self.query_instruction = query_instruction
        #: the token limit documents were embedded with, used for queries and added documents too
        self.max_length = max_length
        #: the folder it was loaded from (its ``docs.jsonl`` is read on demand when the texts are not kept)
        self.folder = None if folder is None else Path(folder)

    def __len__(self) -> int:
        return len(self.index)

    def __repr__(self) -> str:
        model = getattr(self.embedder, "model_name_or_path", None)
        return f"SearchIndex({len(self)} documents x {self.dim}, kind={self.index.kind!r}, model={model!r})"

    @property
    def ids(self) -> list[str]:
        """The document ids, in index order."""
        return self.index.ids

    @property
    def dim(self) -> int:
        return self.index.dim

    @property
    def meta(self) -> dict[str, Any]:
        """What ``index.json`` records: model, vector space, query instruction, ``max_length``, options."""
        return self.index.meta

    # -- building -----------------------------------------------------------------------------
    @classmethod
    def build(
        cls,
        embedder: Any,
        documents: Sequence[str] | Sequence[Mapping[str, Any]],
        ids: Sequence[Any] | None = None,
        *,
        kind: str = "flat",
        quantization: str | None = None,
        batch_size: int | None = None,
        max_length: int | None = None,
        show_progress_bar: bool | None = None,
        meta: Mapping[str, Any] | None = None,
        m3_sparse: bool = False,
        **index_options: Any,
    ) -> SearchIndex:
        """Embed ``documents`` with ``embedder`` (an :class:`~bgekit.Embedder` or a model name / folder) and
        index them.

        ``documents``: strings, or ``{"id" | "_id", "title", "text"}`` dicts (embedded as
        ``(title + " " + text).strip()``, as BEIR and ``bgekit index build``). ``ids`` (default: the dicts'
        ids, else positions ``"0"``, ``"1"``...) must be unique. ``kind``: ``"flat"`` (exact, default),
        ``"ivf"`` or ``"hnsw"``; ``quantization``: ``None``, ``"int8"`` or ``"binary"``; other
        :meth:`DenseIndex.build <bgekit.eval.index.DenseIndex.build>` options (``nlist``, ``nprobe``,
        ``hnsw_m``, ``ef_search``, ``use_gpu``) pass through. ``max_length`` is the token limit of the
        documents (default: the model's) and later of the queries; ``meta`` adds fields to ``index.json``.
        ``m3_sparse=True`` (a :class:`~bgekit.BGEM3FlagModel` only) keeps the documents' lexical weights too
        (from the same forward pass), for :meth:`search`'s ``m3_modes`` ``"sparse"``, ``"dense+sparse"`` and
        ``"all"``; :meth:`save` writes them to ``lexical_weights.npz``.
        """
        from .eval.index import DenseIndex, require_faiss

        require_faiss()  # before anything is embedded
        doc_ids, texts = parse_documents(documents, ids)
        if max_length is not None:
            _check_positive("max_length", max_length)
        embedder = _embedder(embedder)
        if m3_sparse:
            from .eval.retrieval import check_m3_model

            check_m3_model(embedder, "m3_sparse")
        vectors, weights = _embed_documents(embedder, texts, batch_size, max_length, show_progress_bar, m3_sparse)
        from .eval.index import SparseIndex
        from .eval.retrieval import vector_space

        record = {
            "type": "dense",
            # a local folder by its absolute path: a search may run from another directory
            "model": absolute_if_local(embedder.model_name_or_path),
            "vector_space": vector_space(embedder),  # a query model of other vectors is refused
            "query_instruction": embedder.query_instruction_for_retrieval,
            "score_function": "cosine",
            "max_length": max_length,
            **({"m3_sparse": LEXICAL_FILE} if m3_sparse else {}),
            **dict(meta or {}),
        }
        dense = DenseIndex.build(vectors, doc_ids, kind=kind, quantization=quantization, meta=record, **index_options)
        sparse = SparseIndex(weights, dense.ids) if m3_sparse else None
        return cls(dense, embedder, texts, max_length=max_length, sparse=sparse)

    def add(
        self,
        documents: Sequence[str] | Sequence[Mapping[str, Any]],
        ids: Sequence[Any] | None = None,
        *,
        batch_size: int | None = None,
        show_progress_bar: bool | None = None,
    ) -> SearchIndex:
        """Embed and append more documents (as :meth:`build` takes them; default ids continue the
        positions). Their ids must be new. An IVF index keeps the clusters it was built with."""
        doc_ids, texts = parse_documents(documents, ids, first_id=len(self))
        existing = set(self.ids)
        clash = next((i for i in doc_ids if i in existing), None)
        if clash is not None:
            raise InputError(f"document id {clash!r} is already in the index; every document needs its own id")
        current = self._all_texts()  # before the index grows: the texts stay aligned with the rows
        keep = self.sparse is not None
        vectors, weights = _embed_documents(
            self._query_model(), texts, batch_size, self.max_length, show_progress_bar, keep
        )
        self.index.add(vectors, doc_ids)
        if keep:
            from scipy import sparse

            self.sparse.matrix = sparse.vstack([self.sparse.matrix, weights], format="csr")
            self.sparse.ids = self.index.ids
        self._texts = [*current, *texts]
        return self

    # -- searching ----------------------------------------------------------------------------
    def search(
        self,
        queries: str | Sequence[str],
        k: int = 10,
        *,
        reranker: Any = None,
        rerank_top_k: int = 100,
        batch_size: int | None = None,
        reranker_batch_size: int | None = None,
        show_progress_bar: bool | None = None,
        m3_modes: str | None = None,
        m3_weights: Sequence[float] | None = None,
    ) -> list[Hit] | list[list[Hit]]:
        """The best ``k`` documents for a query: a list of :class:`Hit`, best first (a list of such lists
        for a list of queries, in order).

        Queries get the model's query instruction (the one the index records, for an index loaded
        with its own model). With a ``reranker`` (a :class:`~bgekit.Reranker` or a name / folder), the
        first ``max(k, rerank_top_k)`` documents are retrieved, the first ``rerank_top_k`` of them scored
        by the reranker, and the best ``k`` of those returned with the reranker's scores (fewer than
        ``k`` when ``rerank_top_k < k``); ties keep the retrieval order. A reranker given by
        name loads on each call: load it once (``Reranker.from_pretrained``) for many searches. ``batch_size``
        is the queries' encode batch size, ``reranker_batch_size`` the reranker's.

        ``m3_modes`` (an index built with ``m3_sparse=True``), as ``bgekit eval retrieval --m3-modes``:
        ``"dense"`` (the default), ``"sparse"`` (lexical weights), ``"dense+sparse"``
        (``w_dense * dense + w_sparse * sparse`` over both lists, :func:`~bgekit.eval.index.fuse_runs`) or
        ``"all"`` (that list's first ``max(k, rerank_top_k)``, the first ``rerank_top_k`` rescored by
        ``compute_score``'s ``"colbert+sparse+dense"``); ``m3_weights`` ``[dense, sparse, colbert]``
        (default ``[1, 0.3, 1]``). Scores are then those of the mode.

        Example:
            >>> index.search("what do pandas eat?", k=3, reranker=reranker, rerank_top_k=50)   # doctest: +SKIP
            [Hit(id='d1', score=7.1, text='Pandas They eat bamboo.', rank=1), ...]
        """
        from .eval.index import fuse_runs, to_run
        from .eval.retrieval import (
            check_m3_model,
            check_m3_modes,
            encode_queries,
            encode_query_weights,
            load_reranker,
            normalize_rows,
        )
        from .models.scoring import ranking, raw_and_shown

        texts, single = as_text_list(queries, "queries")
        for i, text in enumerate(texts):
            if not text.strip():
                raise InputError("the query is empty" if single else f"queries[{i}] is empty")
        _check_positive("k", k)
        _check_positive("rerank_top_k", rerank_top_k)
        weights = check_m3_modes(m3_modes, m3_weights, reranker)
        if m3_modes not in (None, "dense") and self.sparse is None:
            raise InputError(
                f"m3_modes={m3_modes!r} needs the documents' lexical weights: build the index with m3_sparse=True "
                "(`bgekit index build --m3-sparse`)"
            )
        if reranker is not None:
            reranker = load_reranker(reranker, None)  # refuses one set to score several layers
        embedder = self._query_model()
        if m3_modes is not None:
            check_m3_model(embedder)
        rescore = reranker is not None or m3_modes == "all"
        depth = max(k, rerank_top_k) if rescore else k
        lists = []
        if m3_modes != "sparse":
            vectors = encode_queries(embedder, texts, self.query_instruction, batch_size, self.max_length)
            vectors = normalize_rows(vectors)
            if vectors.shape[1] != self.dim:
                where = f"the index at {self.folder}" if self.folder else "the index"
                raise InputError(
                    f"{embedder.model_name_or_path} gives {vectors.shape[1]}-dimensional vectors; {where} holds "
                    f"{self.dim}"
                )
            lists.append(self.index.search(vectors, depth))
        if m3_modes not in (None, "dense"):
            query_weights = encode_query_weights(embedder, texts, self.query_instruction, batch_size, self.max_length)
            lists.append(self.sparse.search(query_weights, min(depth, len(self))))
        if len(lists) == 1:
            scores, rows = lists[0]
            found = [[(int(r), float(s)) for s, r in zip(row_scores, row_rows, strict=True) if r >= 0]
                     for row_scores, row_rows in zip(scores.tolist(), rows.tolist(), strict=True)]  # fmt: skip
        else:  # rows as the runs' document ids: fused by score, ties by row
            runs = [to_run(range(len(texts)), s, r, range(len(self))) for s, r in lists]
            fused = fuse_runs(runs, weights[:2], k=depth)
            found = [list(fused[str(q)].items()) for q in range(len(texts))]
        if rescore:
            found = [hits[:rerank_top_k] for hits in found]
        doc_texts = self._texts_of({r for hits in found for r, _ in hits})
        if m3_modes == "all":  # the bge-m3 paper's All: dense, sparse and ColBERT scores of each candidate
            pairs = [(query, doc_texts[r]) for query, hits in zip(texts, found, strict=True) for r, _ in hits]
            combined = embedder.compute_score(
                pairs, batch_size=batch_size, max_query_length=self.max_length, max_passage_length=self.max_length,
                weights_for_different_modes=list(weights),
            )["colbert+sparse+dense"] if pairs else []  # fmt: skip
            rescored, start = [], 0
            for hits in found:
                own = combined[start : start + len(hits)]
                start += len(hits)
                order = sorted(range(len(hits)), key=lambda i, own=own: -own[i])  # stable: ties keep retrieval order
                rescored.append([(hits[i][0], float(own[i])) for i in order])
            found = rescored
        if reranker is not None:
            pairs = [(query, doc_texts[r]) for query, hits in zip(texts, found, strict=True) for r, _ in hits]
            options = {} if reranker_batch_size is None else {"batch_size": reranker_batch_size}
            if show_progress_bar is not None:
                options["show_progress_bar"] = show_progress_bar
            raw, shown = raw_and_shown(reranker, pairs, **options)
            reranked, start = [], 0
            for hits in found:
                own = range(start, start + len(hits))
                start += len(hits)
                reranked.append([(hits[i][0], shown[own[i]]) for i, _ in ranking(raw[own.start : own.stop])])
            found = reranked
        results = [
            [Hit(self.ids[r], s, doc_texts[r], rank) for rank, (r, s) in enumerate(hits[:k], start=1)] for hits in found
        ]
        return results[0] if single else results

    # -- texts --------------------------------------------------------------------------------
    def _docs_path(self) -> Path | None:
        path = None if self.folder is None else self.folder / DOCS_FILE
        return path if path is not None and path.exists() else None

    def _read_docs(self, wanted: set[str] | None) -> dict[str, str]:
        path = self._docs_path()
        texts: dict[str, str] = {}
        if path is None:
            return texts
        for _, obj in io.read_jsonl(path):
            doc_id = str(obj.get("id"))
            if wanted is None or doc_id in wanted:
                texts[doc_id] = obj.get("text", "")
        return texts

    def _all_texts(self) -> list[str]:
        """Every document's text, in index order (read from ``docs.jsonl`` once, then kept)."""
        if self._texts is None:
            texts = self._read_docs(None)
            self._texts = [texts.get(i, "") for i in self.ids]
        return self._texts

    def _texts_of(self, rows: set[int]) -> dict[int, str]:
        if self._texts is not None:
            return {r: self._texts[r] for r in rows}
        texts = self._read_docs({self.ids[r] for r in rows})  # one pass over the file, keeping only these
        return {r: texts.get(self.ids[r], "") for r in rows}

    @property
    def texts(self) -> list[str]:
        """The document texts, in index order (``""`` where an index was saved without them)."""
        return self._all_texts()

    def _query_model(self):
        if self.embedder is None:
            raise InputError("this SearchIndex has no embedder; load it with SearchIndex.load(folder, embedder)")
        return self.embedder

    # -- disk ---------------------------------------------------------------------------------
    def save(self, folder: str | Path) -> Path:
        """Write the index folder ``bgekit search`` reads: ``index.faiss``, ``ids.json``, ``docs.jsonl``
        (``{"id", "text"}`` a line) and ``index.json`` (last: a folder without it is an unfinished save)."""
        folder = Path(folder)
        io.check_outputs(folder / DOCS_FILE)
        texts = self._all_texts()
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "index.json").unlink(missing_ok=True)
        io.write_jsonl(folder / DOCS_FILE, ({"id": i, "text": t} for i, t in zip(self.ids, texts, strict=True)))
        if self.sparse is not None:
            from scipy import sparse

            def write_weights(tmp: Path) -> None:
                with tmp.open("wb") as handle:
                    sparse.save_npz(handle, self.sparse.matrix)

            io.write_with(folder / LEXICAL_FILE, write_weights)
        else:
            (folder / LEXICAL_FILE).unlink(missing_ok=True)
        self.index.save(folder)
        return folder

    @classmethod
    def load(
        cls,
        folder: str | Path,
        embedder: Any = None,
        *,
        query_instruction: str | None = None,
        other_model: bool = False,
        keep_texts: bool = True,
        model_options: Mapping[str, Any] | None = None,
    ) -> SearchIndex:
        """Read an index folder (``bgekit index build``'s or :meth:`save`'s).

        ``embedder``: the query model; ``None`` loads the model the index records (with
        ``model_options`` for ``Embedder.from_pretrained``, e.g. ``{"devices": "cuda:0"}``), and its queries
        then get the instruction recorded at build time. A model whose vectors differ from the index's
        (other weights, pooling, normalization) is refused unless ``other_model=True``: its scores would be
        meaningless. ``keep_texts=False`` leaves ``docs.jsonl`` on disk and reads each search's texts from it
        (for corpora too large to hold in memory).
        """

        def model_for(meta: Mapping[str, Any]):
            if embedder is None and not meta.get("model"):
                raise InputError(f"{Path(folder) / 'index.json'} names no model; pass the embedder to search it with")
            return _embedder(meta["model"] if embedder is None else embedder, model_options)

        return cls._open(
            folder, model_for, query_instruction=query_instruction, recorded_instruction=embedder is None,
            other_model=other_model, keep_texts=keep_texts,
        )  # fmt: skip

    @classmethod
    def _open(
        cls,
        folder: str | Path,
        model_for: Callable[[Mapping[str, Any]], Any],
        *,
        query_instruction: str | None,
        recorded_instruction: bool,
        other_model: bool,
        keep_texts: bool,
        option: str = "other_model=True",
        say: Callable[[str, str], None] | None = None,
    ) -> SearchIndex:
        """:meth:`load` with the query model made by ``model_for(meta)`` once the index is read, and
        :func:`check_query_model`'s ``option`` and ``say`` (``bgekit search`` names its flag, prints to stderr)."""
        from .eval.index import DenseIndex

        folder = Path(folder)
        dense = DenseIndex.load(folder)  # a missing or damaged index is said before a model loads
        model = model_for(dense.meta)
        if query_instruction is None and recorded_instruction:  # the index's own model: as it was built
            query_instruction = dense.meta.get("query_instruction") or ""
        check_query_model(model, dense.meta, folder, other_model=other_model, option=option, say=say or _warn)
        loaded = cls(dense, model, None, query_instruction=query_instruction, max_length=dense.meta.get("max_length"),
                     folder=folder, sparse=_load_lexical(folder, dense))  # fmt: skip
        if keep_texts:
            loaded._all_texts()
        return loaded


def _embedder(embedder: Any, options: Mapping[str, Any] | None = None):
    from .eval.retrieval import load_embedder

    return load_embedder(embedder, None, options)


def _embed_documents(embedder: Any, texts: list[str], batch_size, max_length, show_progress_bar, sparse=False):
    """``(normalized dense vectors, lexical weights as CSR or None)``: an M3 model's both from one pass."""
    from .eval.retrieval import _dense, normalize_rows

    options = {"return_dense": True, "return_sparse": True} if sparse else {}
    output = embedder.encode_corpus(texts, batch_size=batch_size, max_length=max_length,
                                    show_progress_bar=show_progress_bar, **options)  # fmt: skip
    weights = embedder.lexical_weights_to_csr(list(output["lexical_weights"])) if sparse else None
    return normalize_rows(_dense(output)), weights


def _load_lexical(folder: Path, dense: Any):
    """The :class:`~bgekit.eval.index.SparseIndex` an M3 index folder keeps (``None`` when it keeps none)."""
    name = dense.meta.get("m3_sparse")
    if not name:
        return None
    from scipy import sparse

    from .eval.index import SparseIndex

    path = folder / str(name)
    if not path.is_file():
        raise InputError(f"index folder {folder} is missing {name} (its lexical weights); rebuild the index")
    try:
        matrix = sparse.load_npz(path).tocsr()
    except (OSError, ValueError) as exc:
        raise InputError(f"{path} cannot be read ({exc}); rebuild the index") from None
    if matrix.shape[0] != len(dense):
        raise InputError(f"{path} has {matrix.shape[0]} rows but the index {len(dense)} documents; rebuild the index")
    return SparseIndex(matrix, dense.ids)


def _warn(level: str, message: str) -> None:
    if level == "warning":
        warnings.warn(message, stacklevel=4)
    else:
        logger.info(message)


def check_query_model(
    embedder: Any,
    meta: Mapping[str, Any],
    where: str | Path,
    *,
    other_model: bool = False,
    option: str = "other_model=True",
    say: Callable[[str, str], None] = _warn,
) -> None:
    """Refuse a query model whose vectors are not the index's (its scores would be silently wrong):
    an :class:`InputError` naming what differs, unless ``other_model``. ``say(level, message)`` gets the
    warnings (``"warning"``) and notes (``"note"``); ``option`` is how the message names the override."""
    from .eval.retrieval import space_differences, vector_space

    built = meta.get("vector_space")
    if built is None:  # an index of an older bgekit: only its model's name to go by
        same = absolute_if_local(embedder.model_name_or_path) == meta.get("model")  # as build records it
        if not same and not other_model:
            say(
                "warning",
                f"{where} records no model identity (built by an older bgekit); searching it with "
                f"{embedder.model_name_or_path}, which cannot be checked against {meta.get('model')}",
            )
        return
    differences = space_differences(built, vector_space(embedder))
    if not differences:
        return
    if differences == ["file_times"]:  # a copy, a new download, or weights retrained in place
        say(
            "warning",
            f"the files of {embedder.model_name_or_path} have the names and sizes of those {where} "
            "was built with but other modification times; if the model was retrained, rebuild the index",
        )
        return
    what = (
        f"{embedder.model_name_or_path} does not give the vectors of the model {where} was built with "
        f"({meta.get('model')}): {', '.join(differences)} differ"
    )
    if not other_model:
        raise InputError(f"{what}; rebuild the index with this model, or pass {option} to search anyway")
    say("note", f"{what}; searching anyway ({option})")
