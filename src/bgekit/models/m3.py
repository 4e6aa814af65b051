"""BGE-M3: one encoder pass gives a dense vector, sparse lexical weights and ColBERT vectors.

:class:`BGEM3FlagModel` keeps FlagEmbedding 1.4.2's name, arguments, defaults and return
types (``encode*`` returns ``{"dense_vecs", "lexical_weights", "colbert_vecs"}``), so it is a
drop-in replacement. Unlike FlagEmbedding it does not import training code: the encoder and
its two linear heads live in one small module that moves to each device as a whole.
"""

from __future__ import annotations

import logging
import numbers
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypedDict

import numpy as np
import torch

from .. import hub
from ..errors import InputError, ModelNotFoundError
from ..runtime import first_tokens, lean_encoder
from ..runtime import packed as packing
from .base import ItemForward, ModelHost, load_module
from .embedder import Embedder, with_instruction
from .inputs import as_pair_list, as_text_list
from .onnx_backend import check_backend, load_onnx_module
from .pooling import check_pooling, pool, pool_packed
from .scoring import non_finite_rows, warn_non_finite
from .tokenization import TextTokenizer, Tokenized, load_hf_tokenizer

logger = logging.getLogger(__name__)

SCORE_MODES = ("colbert", "sparse", "dense", "sparse+dense", "colbert+sparse+dense")


class M3Output(TypedDict):
    """What ``encode*`` returns; an entry that was not asked for is ``None``.

    ``dense_vecs``: float32 ``(n, dim)`` (``(dim,)`` for one string); ``lexical_weights``: one
    ``{token_id_str: np.float32}`` per text; ``colbert_vecs``: one float32 ``(n_tokens - 1, dim)``
    array per text.
    """

    dense_vecs: Any
    lexical_weights: Any
    colbert_vecs: Any


@dataclass
class _Item:
    """One text's raw outputs, on the CPU, padding removed."""

    dense: torch.Tensor | None
    token_ids: np.ndarray | None
    token_weights: np.ndarray | None
    colbert: torch.Tensor | None


class M3Module(torch.nn.Module):
    """The encoder and both heads as one module, so a device or dtype move takes all three."""

    def __init__(self, encoder: torch.nn.Module, colbert_linear: torch.nn.Linear, sparse_linear: torch.nn.Linear):
        super().__init__()
        self.encoder = encoder
        self.colbert_linear = colbert_linear
        self.sparse_linear = sparse_linear

    @property
    def config(self):
        """The encoder's config (ModelHost reads the position limit from it)."""
        return self.encoder.config

    @property
    def packing_core(self) -> torch.nn.Module:
        """The transformers module whose attention packing switches (the heads are per token)."""
        return self.encoder

    def forward(self, **inputs: torch.Tensor) -> torch.Tensor:
        """Last hidden states of the encoder: ``[B, L, H]`` for a padded batch, ``[T, H]`` for a packed one."""
        return lean_encoder.states(self.encoder, inputs)


def load_head(path: Path, out_features: int | None = None) -> torch.nn.Linear:
    """A ``torch.nn.Linear`` from a saved state dict, shaped by the weights in the file."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        out_dim, in_dim = state["weight"].shape
    except Exception as exc:  # missing, truncated or not a Linear state dict
        raise ModelNotFoundError(f"could not read the M3 head {path}: {type(exc).__name__}: {exc}") from exc
    if out_features is not None and out_features != out_dim:
        raise InputError(f"colbert_dim={out_features} does not match {path.name}, which has {out_dim} outputs")
    head = torch.nn.Linear(in_dim, out_dim, bias="bias" in state)
    head.load_state_dict(state)
    return head.float()


class BGEM3FlagModel(Embedder):
    """BGE-M3 embedder: dense, sparse (lexical) and multi-vector (ColBERT) outputs, and hybrid scores.

    ``packed`` (default ``None``: on CUDA in fp16/bf16) lays each batch's texts end to end
    instead of padding them, so the encoder and both per-token heads compute on real tokens only.

    ``backend="onnx"`` / ``"onnx-int8"`` runs the encoder on ONNX Runtime on the CPU (as
    :class:`~bgekit.FlagModel`'s); the sparse and ColBERT heads stay torch, on its output.

    Example:
        >>> from bgekit import BGEM3FlagModel
        >>> model = BGEM3FlagModel("BAAI/bge-m3")                          # doctest: +SKIP
        >>> out = model.encode(["what is BGE?"], return_sparse=True)      # doctest: +SKIP
        >>> out["dense_vecs"].shape, out["lexical_weights"][0]            # doctest: +SKIP
        ((1, 1024), {'2367': 0.17, ...})
        >>> model.compute_score([("what is BGE?", "BGE is an embedding model.")])  # doctest: +SKIP
        {'colbert': [...], 'sparse': [...], 'dense': [...], 'sparse+dense': [...], 'colbert+sparse+dense': [...]}
    """

    #: dense vectors alone (the default outputs): run the last layer on each text's first row only,
    #: as :class:`~bgekit.FlagModel` does (:mod:`bgekit.runtime.first_tokens`); False runs the whole layer
    cls_rows_only: bool = True
    #: FlagEmbedding's class attribute: the pooling ``FlagAutoModel`` gives this class by ``model_class``
    DEFAULT_POOLING_METHOD = "cls"

    def __init__(
        self,
        model_name_or_path: str,
        normalize_embeddings: bool = True,
        use_fp16: bool = True,
        use_bf16: bool = False,
        query_instruction_for_retrieval: str | None = None,
        query_instruction_format: str = "{}{}",
        devices: str | int | Sequence[str | int] | None = None,
        pooling_method: str = "cls",
        trust_remote_code: bool = False,
        cache_dir: str | None = None,
        colbert_dim: int = -1,
        batch_size: int = 256,
        query_max_length: int = 512,
        passage_max_length: int = 512,
        return_dense: bool = True,
        return_sparse: bool = False,
        return_colbert_vecs: bool = False,
        truncate_dim: int | None = None,
        packed: bool | None = None,
        backend: str = "torch",
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
            batch_size=batch_size,
            query_max_length=query_max_length,
            passage_max_length=passage_max_length,
            truncate_dim=truncate_dim,
            **kwargs,
        )
        self.pooling_method = check_pooling(pooling_method)
        self.return_dense = return_dense
        self.return_sparse = return_sparse
        self.return_colbert_vecs = return_colbert_vecs
        self.backend = check_backend(backend, devices, self.use_bf16)
        folder = hub.model_folder(model_name_or_path, cache_dir=cache_dir)
        self.tokenizer = TextTokenizer(load_hf_tokenizer(folder, trust_remote_code)).pad_right()
        module = self._load_module(folder, trust_remote_code, colbert_dim, self.backend, self.tokenizer.uses_type_ids)
        self.host = ModelHost(module, self.tokenizer, devices, self.use_fp16, self.use_bf16, packed=packed)
        self.target_devices = self.host.devices
        hf = self.tokenizer.hf
        # ids that never get a lexical weight (FlagEmbedding's list)
        self.unused_token_ids = {
            i for i in (hf.cls_token_id, hf.eos_token_id, hf.pad_token_id, hf.unk_token_id) if i is not None
        }

    @staticmethod
    def _load_module(
        folder: Path, trust_remote_code: bool, colbert_dim: int, backend: str = "torch", type_ids: bool = False
    ) -> M3Module:
        from transformers import AutoModel

        heads = [folder / "colbert_linear.pt", folder / "sparse_linear.pt"]
        missing = [p.name for p in heads if not p.exists()]
        if missing:
            raise ModelNotFoundError(
                f"{folder} has no {' or '.join(missing)}: it is not a BGE-M3 model folder (for a plain "
                "encoder use FlagModel)"
            )
        if backend == "torch":
            encoder = load_module(AutoModel, folder, trust_remote_code)
        else:  # every token's state, for the per-token heads (no first-rows graph: one export per model)
            encoder = load_onnx_module(AutoModel, folder, trust_remote_code, backend, "last_hidden_state", type_ids)
        colbert = load_head(heads[0], colbert_dim if colbert_dim > 0 else None)
        sparse = load_head(heads[1])
        return M3Module(encoder, colbert, sparse)

    @property
    def model(self) -> M3Module:
        """Encoder plus heads (on the first device)."""
        return self.host.module

    # -- encode ---------------------------------------------------------------------------
    def encode_queries(
        self,
        queries: str | list[str],
        batch_size: int | None = None,
        max_length: int | None = None,
        return_dense: bool | None = None,
        return_sparse: bool | None = None,
        return_colbert_vecs: bool | None = None,
        **kwargs: Any,
    ) -> M3Output:
        """Encode queries with the query instruction (if any); outputs as :meth:`encode`."""
        return super().encode_queries(
            queries,
            batch_size=batch_size,
            max_length=max_length,
            return_dense=return_dense,
            return_sparse=return_sparse,
            return_colbert_vecs=return_colbert_vecs,
            **kwargs,
        )

    def encode_corpus(
        self,
        corpus: str | list[str],
        batch_size: int | None = None,
        max_length: int | None = None,
        return_dense: bool | None = None,
        return_sparse: bool | None = None,
        return_colbert_vecs: bool | None = None,
        **kwargs: Any,
    ) -> M3Output:
        """Encode passages (a passage instruction only if one was configured); outputs as :meth:`encode`."""
        return super().encode_corpus(
            corpus,
            batch_size=batch_size,
            max_length=max_length,
            return_dense=return_dense,
            return_sparse=return_sparse,
            return_colbert_vecs=return_colbert_vecs,
            **kwargs,
        )

    def encode(
        self,
        sentences: str | list[str],
        batch_size: int | None = None,
        max_length: int | None = None,
        return_dense: bool | None = None,
        return_sparse: bool | None = None,
        return_colbert_vecs: bool | None = None,
        *,
        convert_to_numpy: bool | None = None,
        instruction: str | None = None,
        instruction_format: str | None = None,
        normalize_embeddings: bool | None = None,
        show_progress_bar: bool | None = None,
        **kwargs: Any,
    ) -> M3Output:
        """Encode texts as they are (plus ``instruction`` if given).

        Returns ``{"dense_vecs", "lexical_weights", "colbert_vecs"}`` with ``None`` for what was not
        asked for (the constructor's ``return_*`` flags are the defaults: dense only):
        ``dense_vecs`` float32 ``(n, dim)``, ``lexical_weights`` a list of ``{token_id_str: np.float32}``
        (first-occurrence order, special tokens left out), ``colbert_vecs`` a list of float32
        ``(n_tokens - 1, dim)`` arrays. A single string gives a ``(dim,)`` vector, one dict and one
        array. ``convert_to_numpy=False`` gives CPU tensors instead of arrays.
        """
        if kwargs:
            raise InputError(f"encode() got unexpected options {sorted(kwargs)}")
        flags = self._flags(return_dense, return_sparse, return_colbert_vecs)
        texts, single = as_text_list(sentences, "sentences")
        texts = with_instruction(texts, instruction, instruction_format)
        normalize = self.normalize_embeddings if normalize_embeddings is None else normalize_embeddings
        items = self._run(texts, batch_size, max_length, self.passage_max_length, flags, normalize, show_progress_bar)
        to_numpy = self.convert_to_numpy if convert_to_numpy is None else convert_to_numpy
        out: M3Output = {"dense_vecs": None, "lexical_weights": None, "colbert_vecs": None}
        if flags[0]:
            dense = self._dense(items, normalize)
            out["dense_vecs"] = dense.numpy() if to_numpy else dense
        if flags[1]:
            out["lexical_weights"] = [self._lexical(item) for item in items]
        if flags[2]:
            out["colbert_vecs"] = [item.colbert.numpy() if to_numpy else item.colbert for item in items]
        warn_non_finite(logger, self._non_finite(items, out), len(items), self.model_name_or_path)
        if single:
            out = {key: None if value is None else value[0] for key, value in out.items()}  # type: ignore[assignment]
        return out

    @staticmethod
    def _non_finite(items: list[_Item], out: M3Output) -> set[int]:
        """Positions of the inputs whose returned outputs hold NaN or infinite values."""
        bad: set[int] = set()
        if out["dense_vecs"] is not None:
            bad.update(non_finite_rows(out["dense_vecs"]))
        for i, item in enumerate(items):
            if out["lexical_weights"] is not None and non_finite_rows(item.token_weights[None]):
                bad.add(i)
            if out["colbert_vecs"] is not None and non_finite_rows(item.colbert.reshape(1, -1)):
                bad.add(i)
        return bad

    def encode_single_device(
        self,
        sentences: str | list[str],
        batch_size: int = 256,
        max_length: int = 512,
        return_dense: bool = True,
        return_sparse: bool = False,
        return_colbert_vecs: bool = False,
        device: str | int | None = None,
        **kwargs: Any,
    ) -> M3Output:
        """FlagEmbedding's M3 ``encode_single_device``: :meth:`encode` on one device (default: all)."""
        with self.on_device(device):
            return self.encode(
                sentences, batch_size, max_length, return_dense, return_sparse, return_colbert_vecs, **kwargs
            )

    def _embed(
        self, texts: list[str], batch_size: int, max_length: int, show_progress_bar: bool | None
    ) -> torch.Tensor:
        """Dense vectors only, unnormalized: what generic :class:`Embedder` code asks for."""
        dense_only = (True, False, False)
        items = self._run(texts, batch_size, max_length, self.passage_max_length, dense_only, False, show_progress_bar)
        return torch.stack([item.dense for item in items])

    def encode_tokenized(
        self,
        tokenized: Tokenized,
        batch_size: int | None = None,
        return_dense: bool | None = None,
        return_sparse: bool | None = None,
        return_colbert_vecs: bool | None = None,
        *,
        normalize_embeddings: bool | None = None,
        convert_to_numpy: bool | None = None,
    ) -> M3Output:
        """:meth:`encode`'s outputs for inputs from :meth:`tokenize` (always the list shapes:
        ``dense_vecs`` 2-D, one dict and one array per text), for callers that tokenize themselves."""
        flags = self._flags(return_dense, return_sparse, return_colbert_vecs)
        normalize = self.normalize_embeddings if normalize_embeddings is None else normalize_embeddings
        items = self.host.run_items(
            tokenized,
            self._forward(*flags, normalize_colbert=normalize, colbert_dim=self.truncate_dim),
            self.batch_size if batch_size is None else batch_size,
            desc="Embedding",
            show_progress_bar=False,
        )
        to_numpy = self.convert_to_numpy if convert_to_numpy is None else convert_to_numpy
        dense = self._dense(items, normalize) if flags[0] else None
        return {
            "dense_vecs": None if dense is None else dense.numpy() if to_numpy else dense,
            "lexical_weights": [self._lexical(item) for item in items] if flags[1] else None,
            "colbert_vecs": [item.colbert.numpy() if to_numpy else item.colbert for item in items]
            if flags[2]
            else None,
        }

    def embed_tokenized(self, tokenized: Tokenized, batch_size: int | None = None) -> torch.Tensor:
        """Dense vectors ``(n, dim)`` of inputs from :meth:`tokenize`, before ``truncate_dim`` and
        normalization (as ``FlagModel.embed_tokenized``; :meth:`postprocess` finishes them)."""
        items = self.host.run_items(
            tokenized,
            self._forward(True, False, False, normalize_colbert=False),
            self.batch_size if batch_size is None else batch_size,
            desc="Embedding",
            show_progress_bar=False,
        )
        return torch.stack([item.dense for item in items])

    def _flags(self, dense: bool | None, sparse: bool | None, colbert: bool | None) -> tuple[bool, bool, bool]:
        """Per-call ``return_*`` flags, defaulting to the constructor's; at least one must be on."""
        flags = (
            self.return_dense if dense is None else dense,
            self.return_sparse if sparse is None else sparse,
            self.return_colbert_vecs if colbert is None else colbert,
        )
        if not any(flags):
            raise InputError("nothing to return: set at least one of return_dense, return_sparse, return_colbert_vecs")
        return bool(flags[0]), bool(flags[1]), bool(flags[2])

    def _run(
        self,
        texts: list[str],
        batch_size: int | None,
        max_length: int | None,
        default_length: int,
        flags: tuple[bool, bool, bool],
        normalize: bool,
        show_progress_bar: bool | None,
        truncate: bool = True,
    ) -> list[_Item]:
        """Tokenize and run texts through the model; one :class:`_Item` per text, in input order.
        ``truncate=False`` keeps ColBERT vectors whole under ``truncate_dim`` (as scoring does)."""
        max_length = self.host.clamp_length(max_length, default_length)
        tokenized = self.tokenizer.encode(texts, max_length)
        self.host.log_truncation(tokenized, max_length, "texts")
        return self.host.run_items(
            tokenized,
            self._forward(*flags, normalize_colbert=normalize, colbert_dim=self.truncate_dim if truncate else None),
            self.batch_size if batch_size is None else batch_size,
            desc="Embedding",
            show_progress_bar=show_progress_bar,
        )

    def _forward(
        self, dense: bool, sparse: bool, colbert: bool, *, normalize_colbert: bool, colbert_dim: int | None = None
    ) -> ItemForward:
        """A batch forward computing only the requested outputs, split per text with padding removed.
        ``colbert_dim`` keeps the first columns of ColBERT vectors, before their normalization
        (FlagEmbedding's ``truncate_dim``)."""

        def forward(module: torch.nn.Module, inputs: dict[str, torch.Tensor]) -> list[_Item]:
            if dense and not (sparse or colbert) and self._first_rows(module):
                vectors = first_tokens.first_token_states(module.encoder, inputs).float().cpu()
                return [_Item(dense=row, token_ids=None, token_weights=None, colbert=None) for row in vectors]
            if packing.is_packed(inputs):
                return packed_forward(module, inputs)
            hidden = module(**inputs)
            mask = inputs["attention_mask"]
            vectors = pool(hidden, mask, self.pooling_method).float().cpu() if dense else None
            weights = torch.relu(module.sparse_linear(hidden)).squeeze(-1).float().cpu() if sparse else None
            multi = None
            if colbert:
                multi = module.colbert_linear(hidden[:, 1:]).float()[..., :colbert_dim] * mask[:, 1:, None]
                if normalize_colbert:
                    multi = torch.nn.functional.normalize(multi, dim=-1)
                multi = multi.cpu()
            keep = mask.bool().cpu()
            ids = inputs["input_ids"].cpu()
            return [
                _Item(
                    dense=None if vectors is None else vectors[row],
                    token_ids=None if weights is None else ids[row][keep[row]].numpy(),
                    token_weights=None if weights is None else weights[row][keep[row]].numpy(),
                    colbert=None if multi is None else multi[row][keep[row, 1:]],
                )
                for row in range(len(ids))
            ]

        def packed_forward(module: torch.nn.Module, inputs: dict[str, torch.Tensor]) -> list[_Item]:
            """The same outputs from packed rows: every token is real, so the heads run on no padding."""
            hidden = module(**inputs)  # [T, H]
            lengths = inputs[packing.LENGTHS].tolist()
            vectors = pool_packed(hidden, inputs, self.pooling_method).float().cpu() if dense else None
            ids = weights = multi = None
            if sparse:
                ids = inputs["input_ids"][0].cpu().split(lengths)
                weights = torch.relu(module.sparse_linear(hidden)).squeeze(-1).float().cpu().split(lengths)
            if colbert:
                multi = module.colbert_linear(hidden).float()[..., :colbert_dim]
                if normalize_colbert:
                    multi = torch.nn.functional.normalize(multi, dim=-1)
                multi = [row[1:] for row in multi.cpu().split(lengths)]  # every token but the first
            return [
                _Item(
                    dense=None if vectors is None else vectors[row],
                    token_ids=None if ids is None else ids[row].numpy(),
                    token_weights=None if weights is None else weights[row].numpy(),
                    colbert=None if multi is None else multi[row],
                )
                for row in range(len(lengths))
            ]

        return forward

    def _first_rows(self, module: torch.nn.Module) -> bool:
        """Dense vectors alone by ``cls`` pooling: the last layer can run on the first rows only."""
        return self.pooling_method == "cls" and self.cls_rows_only and first_tokens.supports(module.encoder)

    def _dense(self, items: list[_Item], normalize: bool, truncate: bool = True) -> torch.Tensor:
        """Stack dense vectors, then ``truncate_dim`` (unless ``truncate=False``: scoring) and
        normalization as every embedder does."""
        dense = torch.stack([item.dense for item in items])
        if truncate and self.truncate_dim is not None:
            dense = dense[:, : self.truncate_dim]
        return torch.nn.functional.normalize(dense, dim=-1) if normalize else dense

    def _lexical(self, item: _Item) -> dict[str, np.float32]:
        return token_weight_dict(item.token_ids, item.token_weights, self.unused_token_ids)

    # -- scores ---------------------------------------------------------------------------
    def compute_lexical_matching_score(
        self,
        lexical_weights_1: dict[str, float] | list[dict[str, float]],
        lexical_weights_2: dict[str, float] | list[dict[str, float]],
    ):
        """Sum over shared token ids of ``w1 * w2``.

        Two dicts give one number (``np.float32`` for M3 weights; int ``0`` when nothing is
        shared); two lists give an ``np.ndarray`` of shape ``(len(list1), len(list2))``.
        """
        if isinstance(lexical_weights_1, dict) and isinstance(lexical_weights_2, dict):
            return lexical_score(lexical_weights_1, lexical_weights_2)
        if isinstance(lexical_weights_1, list) and isinstance(lexical_weights_2, list):
            for name, weights in (("lexical_weights_1", lexical_weights_1), ("lexical_weights_2", lexical_weights_2)):
                bad = next((i for i, w in enumerate(weights) if not isinstance(w, dict)), None)
                if bad is not None:
                    raise InputError(f"{name}[{bad}] is {type(weights[bad]).__name__}, not a dict of token weights")
            return np.array([[lexical_score(a, b) for b in lexical_weights_2] for a in lexical_weights_1])
        raise InputError(
            "compute_lexical_matching_score takes two dicts of token weights or two lists of them, got "
            f"{type(lexical_weights_1).__name__} and {type(lexical_weights_2).__name__}"
        )

    def colbert_score(self, q_reps, p_reps) -> torch.Tensor:
        """Late-interaction score: mean over query vectors of their best dot product with a
        passage vector. Returns a 0-d tensor (float32 for M3's vectors)."""
        return colbert_score(_as_matrix(q_reps, "q_reps"), _as_matrix(p_reps, "p_reps"))

    def convert_id_to_token(self, lexical_weights: dict | list[dict]):
        """Token-id keys -> token strings (``tokenizer.decode([id])``); when two ids decode to the
        same string the later weight wins. One dict (or a list of one) gives a dict back."""
        batch = [lexical_weights] if isinstance(lexical_weights, dict) else lexical_weights
        if not isinstance(batch, list) or not all(isinstance(w, dict) for w in batch):
            raise InputError("convert_id_to_token takes a dict of token weights or a list of them")
        converted = [{self.tokenizer.decode([int(key)]): weight for key, weight in item.items()} for item in batch]
        return converted[0] if len(converted) == 1 else converted

    def compute_score(
        self,
        sentence_pairs: list[tuple[str, str]] | tuple[str, str],
        batch_size: int | None = None,
        max_query_length: int | None = None,
        max_passage_length: int | None = None,
        weights_for_different_modes: Sequence[float] | None = None,
        **kwargs: Any,
    ) -> dict[str, list[float] | float]:
        """Dense, sparse, ColBERT and combined scores of (query, passage) pairs.

        ``weights_for_different_modes`` is ``[dense, sparse, colbert]`` (default ``[1, 1, 1]``):
        ``"sparse+dense"`` = (w1·sparse + w0·dense) / (w0 + w1) and ``"colbert+sparse+dense"`` the
        weighted mean of all three. Returns ``{mode: [score per pair]}``; one pair gives floats.
        No instruction is added to the queries (as in FlagEmbedding).
        """
        if kwargs:
            raise InputError(f"compute_score() got unexpected options {sorted(kwargs)}")
        weights = _mode_weights(weights_for_different_modes)
        pairs, single = as_pair_list(sentence_pairs)
        queries = self._encode_for_scoring([q for q, _ in pairs], batch_size, max_query_length, self.query_max_length)
        passages = self._encode_for_scoring(
            [p for _, p in pairs], batch_size, max_passage_length, self.passage_max_length
        )
        scores = self._pair_scores(queries, passages, weights)
        return {mode: values[0] for mode, values in scores.items()} if single else scores

    def compute_score_single_device(
        self,
        sentence_pairs: list[tuple[str, str]] | tuple[str, str],
        batch_size: int = 256,
        max_query_length: int = 512,
        max_passage_length: int = 512,
        weights_for_different_modes: Sequence[float] | None = None,
        device: str | int | None = None,
        **kwargs: Any,
    ) -> dict[str, list[float] | float]:
        """FlagEmbedding's name: :meth:`compute_score` on one device (default: all of the model's)."""
        with self.on_device(device):
            return self.compute_score(
                sentence_pairs, batch_size, max_query_length, max_passage_length, weights_for_different_modes, **kwargs
            )

    def _encode_for_scoring(
        self, texts: list[str], batch_size: int | None, max_length: int | None, default: int
    ) -> list[_Item]:
        # FlagEmbedding scores with whole vectors: truncate_dim applies to encode only
        return self._run(
            texts, batch_size, max_length, default, (True, True, True), self.normalize_embeddings, None, truncate=False
        )

    def _pair_scores(
        self, queries: list[_Item], passages: list[_Item], weights: tuple[float, float, float]
    ) -> dict[str, list[float]]:
        """Every mode's score per pair, in float32 as FlagEmbedding computes them."""
        q_dense, p_dense = (
            self._dense(queries, self.normalize_embeddings, truncate=False),
            self._dense(passages, self.normalize_embeddings, truncate=False),
        )
        dense = (q_dense * p_dense).sum(-1).numpy()
        sparse = np.array(
            [lexical_score(self._lexical(q), self._lexical(p)) for q, p in zip(queries, passages, strict=True)],
            dtype=np.float32,
        )
        multi = np.array(
            [float(colbert_score(q.colbert, p.colbert)) for q, p in zip(queries, passages, strict=True)],
            dtype=np.float32,
        )
        w_dense, w_sparse, w_colbert = (np.float32(w) for w in weights)
        with np.errstate(divide="ignore", invalid="ignore"):  # zero weights give nan, as in FlagEmbedding
            sparse_dense = (sparse * w_sparse + dense * w_dense) / (w_sparse + w_dense)
            hybrid = (multi * w_colbert + sparse * w_sparse + dense * w_dense) / (w_dense + w_sparse + w_colbert)
        return {
            "colbert": multi.tolist(),
            "sparse": sparse.tolist(),
            "dense": dense.tolist(),
            "sparse+dense": sparse_dense.tolist(),
            "colbert+sparse+dense": hybrid.tolist(),
        }

    # -- sparse matrices ------------------------------------------------------------------
    def lexical_weights_to_csr(self, lexical_weights: dict | list[dict]):
        """Lexical weights as a ``scipy.sparse.csr_matrix`` of shape ``(n, vocab_size)`` (float32),
        one row per text, for sparse indexes and fast matrix products."""
        vocab = max(int(getattr(self.host.module.config, "vocab_size", 0) or 0), len(self.tokenizer.hf))
        return lexical_weights_to_csr(lexical_weights, vocab)

    def close(self) -> None:
        self.host.close()


# -- pure helpers (no model needed) -------------------------------------------------------
def token_weight_dict(token_ids: np.ndarray, weights: np.ndarray, unused_ids: set[int]) -> dict[str, np.float32]:
    """``{str(token_id): max weight}`` over a text's tokens, positive weights only, special ids
    left out, keys in order of each id's first positive occurrence: FlagEmbedding's
    ``defaultdict(int)``, so a token the text lacks reads as 0."""
    keep = (weights > 0) & ~np.isin(token_ids, list(unused_ids))
    ids, values = token_ids[keep], weights[keep].astype(np.float32, copy=False)
    if not len(ids):
        return defaultdict(int)
    unique, first, inverse = np.unique(ids, return_index=True, return_inverse=True)
    best = np.zeros(len(unique), dtype=np.float32)
    np.maximum.at(best, inverse, values)
    order = np.argsort(first, kind="stable")
    return defaultdict(int, zip((str(i) for i in unique[order].tolist()), best[order], strict=True))


def lexical_score(weights_1: dict, weights_2: dict):
    """Sum of ``w1 * w2`` over the keys both dicts share; int ``0`` when they share none."""
    score = 0
    for token, weight in weights_1.items():
        if token in weights_2:
            score += weight * weights_2[token]
    return score


def colbert_score(q_reps: torch.Tensor, p_reps: torch.Tensor) -> torch.Tensor:
    """Σ_i max_j q_i·p_j / len(q) as a 0-d tensor."""
    return (q_reps @ p_reps.T).max(dim=-1).values.sum() / q_reps.shape[0]


def lexical_weights_to_csr(lexical_weights: dict | list[dict], n_columns: int):
    """Token-id-keyed weight dicts -> ``scipy.sparse.csr_matrix`` ``(n, n_columns)``, float32."""
    from scipy.sparse import csr_matrix

    rows = [lexical_weights] if isinstance(lexical_weights, dict) else lexical_weights
    if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
        raise InputError("lexical_weights must be a dict of token weights or a list of them")
    indptr = np.zeros(len(rows) + 1, dtype=np.int64)
    indptr[1:] = np.cumsum([len(r) for r in rows])
    indices = np.fromiter((int(k) for r in rows for k in r), dtype=np.int64, count=int(indptr[-1]))
    data = np.fromiter((float(v) for r in rows for v in r.values()), dtype=np.float32, count=int(indptr[-1]))
    if len(indices) and (indices.min() < 0 or indices.max() >= n_columns):
        raise InputError(f"token ids must lie in [0, {n_columns}); got {indices.min()}..{indices.max()}")
    return csr_matrix((data, indices, indptr), shape=(len(rows), n_columns))


def _as_matrix(value, name: str) -> torch.Tensor:
    """A 2-D tensor from a numpy array or tensor (FlagEmbedding takes numpy arrays)."""
    if isinstance(value, np.ndarray):
        value = torch.from_numpy(value)
    if not isinstance(value, torch.Tensor) or value.dim() != 2 or value.shape[0] == 0:
        raise InputError(f"{name} must be a non-empty 2-D array of token vectors (n_tokens, dim)")
    return value


def _mode_weights(weights: Sequence[float] | None) -> tuple[float, float, float]:
    """Validate ``weights_for_different_modes``: three numbers ``[dense, sparse, colbert]``."""
    if weights is None:
        return (1.0, 1.0, 1.0)
    if isinstance(weights, np.ndarray):
        weights = weights.tolist()
    if isinstance(weights, (str, bytes)) or not isinstance(weights, Sequence) or len(weights) != 3:
        raise InputError(f"weights_for_different_modes must be three numbers [dense, sparse, colbert], got {weights!r}")
    for value in weights:
        if isinstance(value, bool) or not isinstance(value, numbers.Real) or not np.isfinite(value):
            raise InputError(f"weights_for_different_modes must hold finite numbers, got {weights!r}")
    return tuple(float(w) for w in weights)  # type: ignore[return-value]
