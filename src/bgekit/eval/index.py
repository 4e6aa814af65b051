"""Vector indexes: dense search on faiss, sparse (M3 lexical) search by a sparse matrix product,
and fusion of several result lists.

:class:`DenseIndex` defaults to exact inner-product search (``IndexFlatIP``; with normalized
vectors that is cosine similarity, as MTEB scores). For large corpora it also builds IVF or
HNSW indexes, with float, int8 (scalar-quantized) or binary (sign bits, Hamming distance)
codes. It uses the GPU through faiss when a GPU build of faiss and a GPU are present. Saved
indexes are a folder: ``index.faiss``, ``ids.json`` and ``index.json`` (written last, so a
folder without it is an interrupted save).

:class:`SparseIndex` holds a ``(documents x vocabulary)`` scipy CSR matrix of lexical weights
(``BGEM3FlagModel.lexical_weights_to_csr``) and scores queries with one sparse product, which
equals M3's ``compute_lexical_matching_score`` for every pair.

Search results are ``(scores, indices)`` arrays of shape ``(n_queries, k)``, best first;
:func:`to_run` turns them into pytrec_eval's ``{query_id: {doc_id: score}}``.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .. import io
from ..errors import InputError

logger = logging.getLogger(__name__)

INDEX_KINDS = ("flat", "ivf", "hnsw")
QUANTIZATIONS = ("none", "int8", "binary")
_FORMAT = "bgekit-index/1"


def require_faiss():
    """The ``faiss`` module, or an :class:`InputError` naming the ``eval`` extra: eval, index build
    and mine call it before a corpus is encoded, not when the index is built after."""
    return _faiss()


def _faiss():
    try:
        import faiss
    except ImportError:
        raise InputError("vector search needs faiss: pip install 'bgekit[eval]' (or faiss-gpu)") from None
    return faiss


def gpu_count() -> int:
    """GPUs faiss can use (0 with faiss-cpu)."""
    faiss = _faiss()
    try:
        return int(faiss.get_num_gpus()) if hasattr(faiss, "StandardGpuResources") else 0
    except Exception:  # a GPU build without a driver
        return 0


def _as_matrix(vectors: Any, name: str = "vectors") -> np.ndarray:
    if hasattr(vectors, "detach"):  # torch tensor
        vectors = vectors.detach().cpu().numpy()
    array = np.asarray(vectors, dtype=np.float32)
    if array.ndim == 1:
        array = array[None, :]
    if array.ndim != 2 or array.shape[1] == 0:
        raise InputError(f"{name} must be a 2-D array (n, dim), got shape {array.shape}")
    if not np.isfinite(array).all():
        raise InputError(f"{name} hold NaN or infinite values")
    return np.ascontiguousarray(array)


def rank_rows(scores: np.ndarray, rows: np.ndarray, k: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Order each query's results by score descending, the lower row first on ties (faiss's flat search
    gives tied rows highest first), faiss's ``-1`` (no result) last; keep the first ``k``."""
    missing = rows < 0
    keys_rows = np.where(missing, np.iinfo(np.int64).max, rows)
    keys_scores = np.where(missing, np.inf, -scores)
    order = np.lexsort((keys_rows, keys_scores), axis=1)[:, :k]
    return np.take_along_axis(scores, order, axis=1), np.take_along_axis(rows, order, axis=1)


def top_k(scores: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Best ``k`` of each row of a dense score matrix: score descending, lower index first on ties."""
    n = scores.shape[1]
    k = min(k, n)
    if k == n:
        order = np.lexsort((np.broadcast_to(np.arange(n), scores.shape), -scores), axis=1)
        return np.take_along_axis(scores, order, axis=1), order
    # argpartition alone may keep any of the rows tied with the k-th score: take every candidate at or
    # above it (k plus the ties), then the lexsort keeps the lower indices among the tied
    kth = -np.partition(-scores, k - 1, axis=1)[:, k - 1]
    indices = np.empty((len(scores), k), dtype=np.int64)
    for row, (values, threshold) in enumerate(zip(scores, kth, strict=True)):
        candidates = np.flatnonzero(values >= threshold)
        indices[row] = candidates[np.lexsort((candidates, -values[candidates]))[:k]]
    return np.take_along_axis(scores, indices, axis=1), indices


def _check_ids(ids: Sequence[str] | None, n: int) -> list[str]:
    if ids is None:
        return [str(i) for i in range(n)]
    ids = [str(i) for i in ids]
    if len(ids) != n:
        raise InputError(f"got {len(ids)} ids for {n} vectors")
    if len(set(ids)) != n:
        raise InputError("document ids must be unique")
    return ids


class DenseIndex:
    """A faiss index plus the document ids of its rows.

    Example:
        >>> index = DenseIndex.build(doc_vectors, ids=doc_ids)            # doctest: +SKIP
        >>> scores, rows = index.search(query_vectors, k=10)              # doctest: +SKIP
        >>> index.save("my-index"); DenseIndex.load("my-index")           # doctest: +SKIP
    """

    def __init__(self, index: Any, ids: list[str], dim: int, kind: str, quantization: str, meta: dict | None = None):
        self.index = index
        self.ids = ids
        self.dim = dim
        self.kind = kind
        self.quantization = quantization
        self.meta = dict(meta or {})
        self.on_gpu = False

    def __len__(self) -> int:
        return len(self.ids)

    def __repr__(self) -> str:
        return f"DenseIndex({len(self)} x {self.dim}, kind={self.kind!r}, quantization={self.quantization!r})"

    @classmethod
    def build(
        cls,
        vectors: Any,
        ids: Sequence[str] | None = None,
        *,
        kind: str = "flat",
        quantization: str | None = None,
        nlist: int | None = None,
        nprobe: int | None = None,
        hnsw_m: int = 32,
        ef_search: int = 128,
        use_gpu: bool | None = None,
        meta: dict | None = None,
    ) -> DenseIndex:
        """Index ``vectors`` (``(n, dim)`` float32) for inner-product search.

        ``kind``: ``"flat"`` (exact, the default), ``"ivf"`` (``nlist`` clusters, ``nprobe``
        searched; default ``4 * sqrt(n)`` and 16) or ``"hnsw"`` (``hnsw_m`` links, ``ef_search``).
        ``quantization``: ``None`` / ``"none"`` (float32), ``"int8"`` (scalar quantizer, 4x
        smaller) or ``"binary"`` (sign bits, 32x smaller, Hamming search; ``dim`` must be a
        multiple of 8; scores are ``1 - 2 * hamming / dim``, the fraction of agreeing signs
        mapped to [-1, 1]). ``use_gpu``: ``None`` = when faiss sees a GPU.
        """
        faiss = _faiss()
        quantization = quantization or "none"
        if kind not in INDEX_KINDS:
            raise InputError(f"index kind must be one of {INDEX_KINDS}, got {kind!r}")
        if quantization not in QUANTIZATIONS:
            raise InputError(f"quantization must be one of {QUANTIZATIONS}, got {quantization!r}")
        matrix = _as_matrix(vectors)
        n, dim = matrix.shape
        ids = _check_ids(ids, n)
        if n == 0:
            raise InputError("cannot index an empty corpus")
        if nlist is None:
            nlist = max(1, min(int(4 * math.sqrt(n)), n // 39 or 1))
        if kind == "ivf" and not 1 <= nlist <= n:
            raise InputError(f"nlist must lie in [1, {n}] (the number of vectors), got {nlist}")
        options = {"nlist": nlist, "nprobe": nprobe or min(nlist, 16), "hnsw_m": hnsw_m, "ef_search": ef_search}
        if quantization == "binary":
            if dim % 8:
                raise InputError(f"binary quantization needs a dimension that is a multiple of 8, got {dim}")
            description = {"flat": "BFlat", "ivf": f"BIVF{nlist}", "hnsw": f"BHNSW{hnsw_m}"}[kind]
            index = faiss.index_binary_factory(dim, description)
            codes = np.packbits(matrix > 0, axis=1)
            if kind == "ivf":
                index.train(codes)
            index.add(codes)
        else:
            codec = "Flat" if quantization == "none" else "SQ8"
            description = {"flat": codec, "ivf": f"IVF{nlist},{codec}", "hnsw": f"HNSW{hnsw_m},{codec}"}[kind]
            if kind == "hnsw" and codec == "Flat":
                description = f"HNSW{hnsw_m}"
            index = faiss.index_factory(dim, description, faiss.METRIC_INNER_PRODUCT)
            if not index.is_trained:
                index.train(matrix)
            index.add(matrix)
        built = cls(index, ids, dim, kind, quantization, {**(meta or {}), "options": options})
        built._apply_search_options()
        if use_gpu or (use_gpu is None and gpu_count() > 0):
            built.to_gpu()
        logger.info("built %r (faiss %s)", built, description)
        return built

    def add(self, vectors: Any, ids: Sequence[str] | None = None) -> DenseIndex:
        """Append ``vectors`` (``(n, dim)``) with their ``ids`` (default: their row numbers, ``len(self)``
        on); ids must be new. An IVF index keeps the clusters it was trained on (rebuild it after a large
        share of new vectors)."""
        matrix = _as_matrix(vectors)
        if matrix.shape[1] != self.dim:
            raise InputError(f"the vectors have dimension {matrix.shape[1]}, the index {self.dim}")
        n = len(matrix)
        ids = [str(len(self) + i) for i in range(n)] if ids is None else _check_ids(ids, n)
        existing = set(self.ids)
        clash = next((i for i in ids if i in existing), None)
        if clash is not None:
            raise InputError(f"document id {clash!r} is already in the index; every document needs its own id")
        self.index.add(np.packbits(matrix > 0, axis=1) if self.quantization == "binary" else matrix)
        self.ids.extend(ids)
        return self

    def _apply_search_options(self) -> None:
        faiss = _faiss()
        options = self.meta.get("options", {})
        if self.kind == "ivf":
            base = faiss.extract_index_ivf(self.index) if self.quantization != "binary" else self.index
            base.nprobe = int(options.get("nprobe", 16))
        elif self.kind == "hnsw":
            hnsw = self.index.hnsw
            hnsw.efSearch = int(options.get("ef_search", 128))

    def to_gpu(self) -> DenseIndex:
        """Move the index to every GPU faiss sees (float codes only; binary stays on the CPU)."""
        faiss = _faiss()
        if self.on_gpu or self.quantization == "binary" or self.kind == "hnsw" or gpu_count() == 0:
            if gpu_count() == 0:
                logger.info("faiss sees no GPU; searching on the CPU")
            return self
        self.index = faiss.index_cpu_to_all_gpus(self.index)
        self.on_gpu = True
        return self

    def search(self, queries: Any, k: int, batch_size: int = 4096) -> tuple[np.ndarray, np.ndarray]:
        """Top ``k`` rows for each query: ``(scores float32, indices int64)`` of shape ``(nq, min(k, n))``."""
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise InputError(f"k must be a positive integer, got {k!r}")
        matrix = _as_matrix(queries, "queries")
        if matrix.shape[1] != self.dim:
            raise InputError(f"query vectors have dimension {matrix.shape[1]}, the index {self.dim}")
        k = min(k, len(self))
        all_scores, all_indices = [], []
        for start in range(0, len(matrix), batch_size):
            scores, indices = self._search_keeping_ties(matrix[start : start + batch_size], k)
            all_scores.append(scores)
            all_indices.append(indices)
        return np.concatenate(all_scores), np.concatenate(all_indices)

    def _search_keeping_ties(self, chunk: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """faiss's top ``k``, ordered by :func:`rank_rows`. faiss keeps any of the rows tied at the cut,
        not the lowest (duplicate documents are common), so on an exact (flat, float) index the queries
        whose deepest row ties the k-th are searched again, deeper, up to ``max(4k, k + 1024)`` rows
        (a query tied with most of the corpus, e.g. a constant vector, stops there). Binary codes tie too
        often to chase; HNSW / IVF are approximate anyway: those are only reordered."""
        scores, indices = self._faiss_search(chunk, k)
        exact = self.kind == "flat" and self.quantization != "binary"
        depth, limit = k, min(len(self), max(4 * k, k + 1024))
        tied = np.flatnonzero(scores[:, -1] == scores[:, k - 1]) if exact else []
        while len(tied) and depth < limit:
            depth = min(limit, 2 * depth)
            deeper_scores, deeper = self._faiss_search(chunk[tied], depth)
            scores[tied], indices[tied] = rank_rows(deeper_scores, deeper, k)
            tied = tied[deeper_scores[:, -1] == deeper_scores[:, k - 1]]
        return rank_rows(scores, indices, k)

    def _faiss_search(self, chunk: np.ndarray, depth: int) -> tuple[np.ndarray, np.ndarray]:
        if self.quantization == "binary":
            distances, indices = self.index.search(np.packbits(chunk > 0, axis=1), depth)
            scores = 1.0 - 2.0 * distances.astype(np.float32) / self.dim
        else:
            scores, indices = self.index.search(chunk, depth)
        return scores.astype(np.float32, copy=False), indices.astype(np.int64, copy=False)

    # -- disk ------------------------------------------------------------------------------
    def save(self, folder: str | Path, extra: Mapping[str, Any] | None = None) -> Path:
        """Write ``index.faiss``, ``ids.json`` and ``index.json`` (last) into ``folder``."""
        faiss = _faiss()
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "index.json").unlink(missing_ok=True)
        index = faiss.index_gpu_to_cpu(self.index) if self.on_gpu else self.index

        def write_index(tmp: Path) -> None:
            if self.quantization == "binary":
                faiss.write_index_binary(index, str(tmp))
            else:
                faiss.write_index(index, str(tmp))

        io.write_with(folder / "index.faiss", write_index)
        io.write_with(folder / "ids.json", lambda tmp: tmp.write_text(json.dumps(self.ids), encoding="utf-8"))
        meta = {
            "format": _FORMAT,
            "count": len(self),
            "dim": self.dim,
            "kind": self.kind,
            "quantization": self.quantization,
            **self.meta,
            **dict(extra or {}),
        }
        self.meta = {k: v for k, v in meta.items() if k not in ("format", "count", "dim", "kind", "quantization")}
        io.write_with(
            folder / "index.json", lambda tmp: tmp.write_text(json.dumps(meta, indent=1) + "\n", encoding="utf-8")
        )
        return folder

    @classmethod
    def load(cls, folder: str | Path, use_gpu: bool | None = None) -> DenseIndex:
        """Read an index written by :meth:`save`."""
        faiss = _faiss()
        folder = Path(folder)
        meta = read_index_meta(folder)
        if meta.get("type", "dense") != "dense":
            raise InputError(f"{folder} holds a {meta.get('type')} index, not a dense one")
        path = folder / "index.faiss"
        if not path.exists():
            raise InputError(f"index folder {folder} is missing index.faiss")
        lacking = [key for key in ("dim", "kind", "quantization") if key not in meta]
        if lacking or not isinstance(meta.get("vector_space", {}), dict):
            what = f"lacks {', '.join(map(repr, lacking))}" if lacking else "has a 'vector_space' that is not an object"
            raise InputError(f"{folder / 'index.json'} {what}: rebuild the index with `bgekit index build`")
        reader = faiss.read_index_binary if meta["quantization"] == "binary" else faiss.read_index
        try:
            index = reader(str(path))
        except RuntimeError:  # faiss's C++ assertion text for a damaged or cut-short file says no more than this
            raise InputError(
                f"{path} cannot be read by faiss: the file is damaged or incomplete; rebuild the index with "
                "`bgekit index build`"
            ) from None
        ids = _read_ids(folder)
        if len(ids) != index.ntotal:
            raise InputError(f"{folder}: ids.json has {len(ids)} ids but the index {index.ntotal} vectors")
        extra = {k: v for k, v in meta.items() if k not in ("format", "count", "dim", "kind", "quantization")}
        loaded = cls(index, ids, int(meta["dim"]), meta["kind"], meta["quantization"], extra)
        loaded._apply_search_options()
        if use_gpu or (use_gpu is None and gpu_count() > 0):
            loaded.to_gpu()
        return loaded


def read_index_meta(folder: Path) -> dict[str, Any]:
    """The ``index.json`` of an index folder, checked."""
    if folder.exists() and not folder.is_dir():
        raise InputError(f"{folder} is a file, not an index folder; pass the folder `bgekit index build` wrote")
    if not folder.is_dir():
        raise InputError(f"index folder {folder} does not exist; build one with `bgekit index build`")
    path = folder / "index.json"
    if not path.exists():
        raise InputError(f"{folder} has no index.json: not a bgekit index, or its build did not finish")
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as exc:
        raise InputError(f"{path} is not valid JSON ({exc})") from None
    if not isinstance(meta, dict) or meta.get("format") != _FORMAT:
        meta = meta if isinstance(meta, dict) else {}
        raise InputError(f"{path} is not a bgekit index description (format {meta.get('format')!r})")
    return meta


def _read_ids(folder: Path) -> list[str]:
    path = folder / "ids.json"
    if not path.exists():
        raise InputError(f"index folder {folder} is missing ids.json")
    try:
        ids = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as exc:
        raise InputError(f"{path} is not valid JSON ({exc}); rebuild the index with `bgekit index build`") from None
    if not isinstance(ids, list):
        raise InputError(f"{path} must hold a JSON list of document ids, got {type(ids).__name__}")
    return [str(i) for i in ids]


class SparseIndex:
    """Lexical (sparse) search: ``scores = Q @ D.T`` over token-weight matrices.

    Example:
        >>> m3 = BGEM3FlagModel("BAAI/bge-m3")                                      # doctest: +SKIP
        >>> docs = m3.encode_corpus(texts, return_dense=False, return_sparse=True)   # doctest: +SKIP
        >>> index = SparseIndex.build(m3.lexical_weights_to_csr(docs["lexical_weights"]), ids)  # doctest: +SKIP
    """

    def __init__(self, matrix: Any, ids: list[str], meta: dict | None = None):
        self.matrix = matrix
        self.ids = ids
        self.meta = dict(meta or {})

    def __len__(self) -> int:
        return len(self.ids)

    def __repr__(self) -> str:
        return f"SparseIndex({len(self)} docs, {self.matrix.shape[1]} columns, {self.matrix.nnz} weights)"

    @staticmethod
    def _as_csr(weights: Any, n_columns: int | None, name: str):
        from scipy import sparse

        if isinstance(weights, Mapping):  # one text's weights
            weights = [weights]
        if sparse.issparse(weights):
            matrix = sparse.csr_matrix(weights, dtype=np.float32)
        elif isinstance(weights, list) and all(isinstance(w, Mapping) for w in weights):
            rows = [_token_weights(w, name) for w in weights]
            width = n_columns if n_columns is not None else 1 + max((max(r, default=-1) for r in rows), default=0)
            indptr = np.zeros(len(rows) + 1, dtype=np.int64)
            indices, data = [], []
            for i, row in enumerate(rows):
                kept = [(k, v) for k, v in row.items() if 0 <= k < width]  # tokens no document has score 0
                indices.extend(k for k, _ in kept)
                data.extend(v for _, v in kept)
                indptr[i + 1] = len(indices)
            matrix = sparse.csr_matrix(
                (np.asarray(data, dtype=np.float32), np.asarray(indices, dtype=np.int64), indptr),
                shape=(len(rows), max(width, 1)),
            )
        else:
            raise InputError(f"{name} must be a scipy sparse matrix or a list of {{token_id: weight}} dicts")
        if n_columns is not None and matrix.shape[1] != n_columns:
            # columns are token ids: an index built from dicts is as wide as its largest id, and a
            # query token no document has scores 0 (lexical_weights_to_csr is vocabulary-wide)
            matrix = matrix[:, :n_columns] if matrix.shape[1] > n_columns else matrix.copy()
            matrix.resize((matrix.shape[0], n_columns))
        return matrix

    @classmethod
    def build(cls, weights: Any, ids: Sequence[str] | None = None, meta: dict | None = None) -> SparseIndex:
        """``weights``: a CSR matrix ``(n_docs, vocab)`` or a list of ``{token_id: weight}`` dicts."""
        matrix = cls._as_csr(weights, None, "document weights")
        if matrix.shape[0] == 0:
            raise InputError("cannot index an empty corpus")
        return cls(matrix, _check_ids(ids, matrix.shape[0]), meta)

    def search(self, queries: Any, k: int, batch_size: int = 256) -> tuple[np.ndarray, np.ndarray]:
        """Top ``k`` documents per query by sparse dot product: ``(scores, indices)``."""
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise InputError(f"k must be a positive integer, got {k!r}")
        q = self._as_csr(queries, self.matrix.shape[1], "query weights")
        doc_t = self.matrix.T.tocsr()
        all_scores, all_indices = [], []
        for start in range(0, q.shape[0], batch_size):
            dense = np.asarray((q[start : start + batch_size] @ doc_t).todense(), dtype=np.float32)
            scores, indices = top_k(dense, k)
            all_scores.append(scores)
            all_indices.append(indices)
        return np.concatenate(all_scores), np.concatenate(all_indices)

    def save(self, folder: str | Path, extra: Mapping[str, Any] | None = None) -> Path:
        from scipy import sparse

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "index.json").unlink(missing_ok=True)

        def write_matrix(tmp: Path) -> None:
            with tmp.open("wb") as handle:
                sparse.save_npz(handle, self.matrix)

        io.write_with(folder / "sparse.npz", write_matrix)
        io.write_with(folder / "ids.json", lambda tmp: tmp.write_text(json.dumps(self.ids), encoding="utf-8"))
        meta = {"format": _FORMAT, "type": "sparse", "count": len(self), **self.meta, **dict(extra or {})}
        io.write_with(
            folder / "index.json", lambda tmp: tmp.write_text(json.dumps(meta, indent=1) + "\n", encoding="utf-8")
        )
        return folder

    @classmethod
    def load(cls, folder: str | Path) -> SparseIndex:
        from scipy import sparse

        folder = Path(folder)
        meta = read_index_meta(folder)
        if meta.get("type") != "sparse":
            raise InputError(f"{folder} holds a dense index, not a sparse one")
        if not (folder / "sparse.npz").is_file():
            raise InputError(f"index folder {folder} is missing sparse.npz")
        matrix = sparse.load_npz(folder / "sparse.npz").tocsr()
        ids = _read_ids(folder)
        if len(ids) != matrix.shape[0]:
            raise InputError(f"{folder}: ids.json has {len(ids)} ids but the matrix {matrix.shape[0]} rows")
        return cls(matrix, ids, {k: v for k, v in meta.items() if k not in ("format", "type", "count")})


def _token_weights(weights: Mapping[Any, Any], name: str) -> dict[int, float]:
    """``{token_id: weight}`` with int ids (M3's JSONL writes them as strings)."""
    try:
        return {int(key): float(value) for key, value in weights.items()}
    except (TypeError, ValueError):
        raise InputError(
            f"{name} must map token ids to weights, got keys like {next(iter(weights))!r} "
            "(tokens from convert_id_to_token cannot be indexed; keep the ids)"
        ) from None


def to_run(
    query_ids: Sequence[str], scores: np.ndarray, indices: np.ndarray, doc_ids: Sequence[str]
) -> dict[str, dict[str, float]]:
    """Search arrays -> ``{query_id: {doc_id: score}}`` (rows of -1, faiss's "no result", dropped)."""
    if len(query_ids) != len(scores):
        raise InputError(f"{len(query_ids)} query ids for {len(scores)} result rows")
    run: dict[str, dict[str, float]] = {}
    for query_id, row_scores, row_indices in zip(query_ids, scores, indices, strict=True):
        run[str(query_id)] = {
            doc_ids[i]: float(s) for s, i in zip(row_scores.tolist(), row_indices.tolist(), strict=True) if i >= 0
        }
    return run


def fuse_runs(
    runs: Sequence[Mapping[str, Mapping[str, float]]],
    weights: Sequence[float] | None = None,
    *,
    method: str = "weighted",
    k: int | None = None,
    rrf_k: int = 60,
) -> dict[str, dict[str, float]]:
    """Hybrid search: fuse result lists (e.g. dense and sparse) into one.

    ``method="weighted"``: ``sum(w_i * score_i)`` over the union of the candidates, a document
    missing from a list taking that list's lowest score for the query (a list that never
    retrieved it ranked it at most that high), as M3's ``dense + 0.3 * sparse``.
    ``method="rrf"``: reciprocal rank fusion, ``sum(w_i / (rrf_k + rank_i))``.
    ``k`` keeps each query's best ``k``.
    """
    if not runs:
        raise InputError("fuse_runs needs at least one run")
    weights = [1.0] * len(runs) if weights is None else [float(w) for w in weights]
    if len(weights) != len(runs):
        raise InputError(f"{len(weights)} weights for {len(runs)} runs")
    if method not in ("weighted", "rrf"):
        raise InputError(f"fusion method must be 'weighted' or 'rrf', got {method!r}")
    fused: dict[str, dict[str, float]] = {}
    query_ids = list(dict.fromkeys(q for run in runs for q in run))
    for query_id in query_ids:
        lists = [run.get(query_id, {}) for run in runs]
        candidates = list(dict.fromkeys(d for docs in lists for d in docs))
        totals = dict.fromkeys(candidates, 0.0)
        for weight, docs in zip(weights, lists, strict=True):
            if not docs:
                continue
            if method == "rrf":
                for rank, doc_id in enumerate(sorted(docs, key=lambda d: (-docs[d], d)), start=1):
                    totals[doc_id] += weight / (rrf_k + rank)
            else:
                floor = min(docs.values())
                for doc_id in candidates:
                    totals[doc_id] += weight * docs.get(doc_id, floor)
        best = sorted(totals.items(), key=lambda item: (-item[1], item[0]))
        fused[query_id] = dict(best[:k] if k else best)
    return fused
