"""bgekit: BGE-style embedders and rerankers, fast, with FlagEmbedding-compatible names.

Importing bgekit is cheap: torch and transformers load only when a model class is used.

Example:
    >>> import bgekit
    >>> model = bgekit.Embedder.from_pretrained("BAAI/bge-small-en-v1.5")   # doctest: +SKIP
    >>> model.encode(["hello world"]).shape                                 # doctest: +SKIP
    (1, 384)
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from .errors import (
    BgekitError,
    DataFormatError,
    DeviceOutOfMemoryError,
    InputError,
    ModelNotFoundError,
    UnknownModelError,
)

__version__ = "0.1.0"

# public name -> module that defines it (imported on first access)
_LAZY = {
    "AbsEmbedder": "bgekit.models.flag_abc",
    "AbsReranker": "bgekit.models.flag_abc",
    "Embedder": "bgekit.models.embedder",
    "Reranker": "bgekit.models.reranker",
    "FlagModel": "bgekit.models.encoder",
    "FlagReranker": "bgekit.models.reranker",
    "BGEM3FlagModel": "bgekit.models.m3",
    "FlagLLMModel": "bgekit.models.llm",
    "FlagICLModel": "bgekit.models.llm",
    "FlagPseudoMoEModel": "bgekit.models.pseudo_moe",
    "FlagLLMReranker": "bgekit.models.llm_reranker",
    "LayerWiseFlagLLMReranker": "bgekit.models.layerwise_reranker",
    "LightWeightFlagLLMReranker": "bgekit.models.layerwise_reranker",
    "FlagAutoModel": "bgekit.compat",
    "FlagAutoReranker": "bgekit.compat",
    "EmbedderModelClass": "bgekit.registry",
    "RerankerModelClass": "bgekit.registry",
    "SearchIndex": "bgekit.search",
    "Hit": "bgekit.search",
}

__all__ = [
    "AbsEmbedder",
    "AbsReranker",
    "BGEM3FlagModel",
    "BgekitError",
    "DataFormatError",
    "DeviceOutOfMemoryError",
    "Embedder",
    "EmbedderModelClass",
    "FlagAutoModel",
    "FlagAutoReranker",
    "FlagICLModel",
    "FlagLLMModel",
    "FlagLLMReranker",
    "FlagModel",
    "FlagPseudoMoEModel",
    "FlagReranker",
    "Hit",
    "InputError",
    "LayerWiseFlagLLMReranker",
    "LightWeightFlagLLMReranker",
    "ModelNotFoundError",
    "Reranker",
    "RerankerModelClass",
    "SearchIndex",
    "UnknownModelError",
    "__version__",
]

if TYPE_CHECKING:  # pragma: no cover
    from .compat import FlagAutoModel, FlagAutoReranker
    from .models.embedder import Embedder
    from .models.encoder import FlagModel
    from .models.reranker import FlagReranker, Reranker
    from .search import Hit, SearchIndex


def __getattr__(name: str):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'bgekit' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
