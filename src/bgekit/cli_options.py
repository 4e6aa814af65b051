"""Option values more than one command group takes (``bgekit embed``, ``rerank``, ``serve``).

Here, not in :mod:`bgekit.cli`, so a command module can import them at load time (typer reads
its annotations from the module) without importing the main command line; nothing heavy loads.
"""

from __future__ import annotations

from enum import StrEnum


class Packing(StrEnum):
    """``--packed``: how forward batches are laid out (:mod:`bgekit.runtime.packed`)."""

    auto = "auto"
    on = "on"
    off = "off"


def packing_options(packed: Packing) -> dict[str, bool]:
    """``--packed`` as the library's ``packed`` keyword (auto: left to each class, which packs on
    CUDA in fp16/bf16)."""
    return {Packing.auto: {}, Packing.on: {"packed": True}, Packing.off: {"packed": False}}[packed]
