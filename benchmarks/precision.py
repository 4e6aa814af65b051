"""fp16 / bf16 against fp32 for every model family, on the golden tiny models (GPU machine).

Usage (the device tool carries the working tree; copy ../shared/golden into an ignored
folder of the repo first, e.g. `.golden`, and name it in `carry`):

    python benchmarks/precision.py --golden .golden --out precision.json

For each FlagEmbedding-named class it runs the first golden case of that class in fp32 on
the CPU (the reference) and with use_fp16 / use_bf16 on each CUDA device, and prints the
largest absolute difference of embeddings / scores. On a machine without CUDA it says so
and exits 0.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

import bgekit


def flatten(value, keys: list[list[str]] | None = None) -> np.ndarray:
    """Numbers of any output (array, tensor, list, list of lists, M3 dict) as one float64 vector.
    M3 lexical weights are read at ``keys`` (per text, the tokens of both outputs; 0 where a
    token is missing), since a weight that rounds to 0 in half precision drops its token."""
    if isinstance(value, dict):
        parts = [flatten(value[k]) for k in ("dense_vecs", "colbert_vecs") if value.get(k) is not None]
        if value.get("lexical_weights") is not None:
            weights = value["lexical_weights"]
            keys = keys or [sorted(w) for w in weights]
            parts.append(np.array([float(w.get(k, 0.0)) for w, ks in zip(weights, keys, strict=True) for k in ks]))
        return np.concatenate(parts)
    if isinstance(value, torch.Tensor):
        return value.double().cpu().numpy().ravel()
    if isinstance(value, list) and value and not isinstance(value[0], (int, float)):
        return np.concatenate([flatten(v) for v in value])
    return np.asarray(value, dtype=np.float64).ravel()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--golden", type=Path, required=True, help="folder with cases.json, inputs.json, models/")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--device", default="cuda:0", help="'cpu' runs a bf16-only smoke pass of this script")
    args = parser.parse_args()
    cuda = args.device.startswith("cuda")
    if cuda and not torch.cuda.is_available():
        print("no CUDA device: nothing to compare")
        return 0
    cases = json.loads((args.golden / "cases.json").read_text())["cases"]
    inputs = json.loads((args.golden / "inputs.json").read_text())
    pairs = [(inputs["queries"][q], inputs["passages"][p]) for q, p in inputs["pair_indices"]]
    seen, rows = set(), []
    for name, case in cases.items():
        if case["class"] in seen or case["call_kwargs"] or "index" in case["args"][0]:
            continue
        arg = case["args"][0]
        if "input" not in arg:
            continue
        seen.add(case["class"])
        data = pairs if arg["input"] == "pairs" else inputs[arg["input"]]
        cls = getattr(bgekit, case["class"])
        init = {k: v for k, v in case["init_kwargs"].items() if k not in ("use_fp16", "devices")}
        folder = str(args.golden / case["model"])
        extra = {"return_sparse": True, "return_colbert_vecs": True} if case["class"] == "BGEM3FlagModel" else {}
        reference_output = getattr(cls(folder, devices="cpu", use_fp16=False, **init), case["method"])(data, **extra)
        for dtype in ("fp16", "bf16") if cuda else ("bf16",):
            flags = {"use_fp16": dtype == "fp16", "use_bf16": dtype == "bf16"}
            try:
                output = getattr(cls(folder, devices=args.device, **flags, **init), case["method"])(data, **extra)
            except Exception as exc:  # one family's failure must not hide the others' numbers
                rows.append({"class": case["class"], "case": name, "dtype": dtype, "error": repr(exc)[:300]})
                print(f"{case['class']:<28} {dtype}  FAILED: {exc!r}"[:300])
                continue
            keys = None
            if isinstance(output, dict) and output.get("lexical_weights") is not None:
                pairs_of_weights = zip(output["lexical_weights"], reference_output["lexical_weights"], strict=True)
                keys = [sorted(set(a) | set(b)) for a, b in pairs_of_weights]
            got, reference = flatten(output, keys), flatten(reference_output, keys)
            diff = float(np.abs(got - reference).max())
            scale = float(np.abs(reference).max())
            rows.append(
                {"class": case["class"], "case": name, "dtype": dtype, "max_abs_diff": diff, "max_abs_fp32": scale}
            )
            print(f"{case['class']:<28} {dtype}  max |diff| vs fp32 = {diff:.2e}  (max |fp32 value| {scale:.2e})")
    if args.out:
        device = torch.cuda.get_device_name(0) if cuda else "cpu"
        args.out.write_text(json.dumps({"device": device, "torch": torch.__version__, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
