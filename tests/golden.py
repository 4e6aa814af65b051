"""Read FlagEmbedding 1.4.2 golden cases (../shared/golden) and compare outputs."""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path

import numpy as np
import torch

ATOL = 1e-5


@cache
def manifest(golden: Path) -> dict:
    return json.loads((golden / "cases.json").read_text())


@cache
def inputs(golden: Path) -> dict:
    return json.loads((golden / "inputs.json").read_text())


def case_ids(golden: Path, classes: set[str]) -> list[str]:
    return [name for name, case in manifest(golden)["cases"].items() if case["class"] in classes]


def resolve_arg(golden: Path, arg: dict):
    data = inputs(golden)
    if "input" in arg:
        if arg["input"] == "pairs":
            pairs = [(data["queries"][q], data["passages"][p]) for q, p in data["pair_indices"]]
            if "index" in arg:
                return tuple(pairs[arg["index"]]) if arg.get("as") == "tuple" else list(pairs[arg["index"]])
            return pairs
        values = data[arg["input"]]
        return values[arg["index"]] if "index" in arg else values
    raise NotImplementedError(f"argument kind {arg} is handled by the family's own tests")


def expected(golden: Path, case: dict, field: str):
    spec = case["outputs"][field]
    path = golden / spec["file"]
    if path.suffix == ".npz":
        return np.load(path)[spec["key"]]
    return json.loads(path.read_text())[spec["key"]]


def golden_model_inputs(golden: Path, case: dict) -> list[tuple[int, ...]]:
    """Unpadded id sequences the transformer received, sorted (batch layout ignored)."""
    z = np.load(golden / case["model_inputs"]["file"])
    rows = []
    for b in range(case["model_inputs"]["batches"]):
        ids, mask = z[f"batch{b}/input_ids"], z[f"batch{b}/attention_mask"]
        rows += [tuple(int(t) for t, m in zip(r, mk, strict=True) if m) for r, mk in zip(ids, mask, strict=True)]
    return sorted(rows)


def check_returns(case: dict, got) -> None:
    spec = case["returns"]
    kind = spec["type"]
    if kind == "numpy.ndarray":
        assert isinstance(got, np.ndarray), type(got)
        assert str(got.dtype) == spec["dtype"] and list(got.shape) == spec["shape"]
    elif kind == "torch.Tensor":
        assert isinstance(got, torch.Tensor), type(got)
        assert str(got.dtype).removeprefix("torch.") == spec["dtype"] and list(got.shape) == spec["shape"]
    elif kind == "list":
        assert isinstance(got, list) and len(got) == spec["len"]
    else:
        raise AssertionError(f"unhandled return type {kind}")
