"""Other ways to build the CPU graphs than the ones bgekit ships, measured on MiniLM (STSB test).

bgekit's ``onnx-int8`` is ``quantize_dynamic(weight_type=QInt8, per_channel=True)`` on the exported
graph. This script times that against the alternatives ONNX Runtime offers, each run through bgekit's
own encode (tokenizer, batches and pooling unchanged; only the session is swapped), and scores each on
STSB: 7-bit weights (``reduce_range``, advised for CPUs without VNNI), unsigned weights, and keeping
the FFN output projections or the last layer in float32. ``--fusion`` also runs ONNX Runtime's
transformer optimizer (``onnxruntime.transformers.optimizer``, model_type bert) on the fp32 graph
and reports which fused operators it found and the speed of the result.

    python benchmarks/onnx_variants.py [--fusion] [--rounds 3] [--n 1000]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
from speed import SHARED, minilm_folder

#: name -> quantize_dynamic keywords (``exclude`` picks the MatMul nodes left in float32)
VARIANTS = {
    "QInt8 per channel (shipped)": {},
    "QInt8 per channel, reduce_range": {"reduce_range": True},
    "QUInt8 per channel": {"unsigned": True},
    "QInt8 per channel, FFN output in fp32": {
        "exclude": lambda name: "/output/dense/" in name and "attention" not in name
    },
    "QInt8 per channel, last layer in fp32": {"exclude": lambda name: "layer.5/" in name},
}


def quantize(source: Path, target: Path, spec: dict) -> None:
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    exclude = spec.get("exclude")
    names = [n.name for n in onnx.load(str(source)).graph.node if n.op_type == "MatMul"]
    quantize_dynamic(
        str(source),
        str(target),
        weight_type=QuantType.QUInt8 if spec.get("unsigned") else QuantType.QInt8,
        per_channel=True,
        reduce_range=spec.get("reduce_range", False),
        nodes_to_exclude=[n for n in names if exclude(n)] if exclude else None,
        extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT},  # for graphs with fused operators
    )


def fused(source: Path, target: Path) -> str:
    """ONNX Runtime's transformer optimizer on the fp32 graph; returns the fused operators it found."""
    from onnxruntime.transformers.optimizer import optimize_model

    model = optimize_model(str(source), model_type="bert", num_heads=12, hidden_size=384, opt_level=0)
    model.save_model_to_file(str(target))
    found = {k: v for k, v in model.get_fused_operator_statistics().items() if v}
    return ", ".join(f"{k} {v}" for k, v in found.items()) or "none"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=1000, help="STSB sentences timed per round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="ONNX Runtime threads (default: the cores)")
    parser.add_argument("--fusion", action="store_true", help="also ONNX Runtime's transformer optimizer")
    args = parser.parse_args()

    from bgekit import Embedder
    from bgekit.eval.datasets import load_sts
    from bgekit.eval.sts import cosine_pairs, sts_correlations
    from bgekit.models.onnx_backend import OnnxModule, available_cores

    threads = args.threads or available_cores()
    data = load_sts(SHARED / "data" / "stsbenchmark" / "test.tsv")
    texts = list(dict.fromkeys(data.sentences1 + data.sentences2))
    row = {text: i for i, text in enumerate(texts)}
    folder = str(minilm_folder())
    reference = Embedder.from_pretrained(folder, devices="cpu", backend="onnx")
    source = reference.model.path
    fp32 = reference.encode(texts, batch_size=32)
    model = Embedder.from_pretrained(folder, devices="cpu", backend="onnx-int8")  # its session gets swapped

    def session(path: Path):  # bgekit's own session settings, on another graph
        return OnnxModule(path, model.model.config, threads).session

    sessions = {"fp32 (onnx, shipped)": session(source)}
    notes = {}
    with tempfile.TemporaryDirectory() as tmp:
        for i, (name, spec) in enumerate(VARIANTS.items()):
            target = Path(tmp) / f"v{i}.onnx"
            quantize(source, target, spec)
            sessions[name] = session(target)
        if args.fusion:
            target = Path(tmp) / "fused.onnx"
            notes["fp32, ORT transformer optimizer"] = fused(source, target)
            sessions["fp32, ORT transformer optimizer"] = session(target)
            quantize(target, Path(tmp) / "fused-int8.onnx", {})
            sessions["QInt8 per channel, after the optimizer"] = session(Path(tmp) / "fused-int8.onnx")
        sub = texts[: args.n]
        best = dict.fromkeys(sessions, float("inf"))
        for _ in range(args.rounds):  # interleaved, best round each
            for name, graph in sessions.items():
                model.model.session = graph
                start = time.perf_counter()
                model.encode(sub, batch_size=32)
                best[name] = min(best[name], time.perf_counter() - start)
        print(f"all-MiniLM-L6-v2, STSB test ({len(data)} pairs), {threads} threads, best of {args.rounds}")
        print("| graph | texts/s | x fp32 | STSB Spearman | min / mean cosine to fp32 |\n|---|---:|---:|---:|---:|")
        base = best["fp32 (onnx, shipped)"]
        for name, graph in sessions.items():
            model.model.session = graph
            vectors = model.encode(texts, batch_size=32)
            a = vectors[[row[t] for t in data.sentences1]]
            b = vectors[[row[t] for t in data.sentences2]]
            spearman = sts_correlations(cosine_pairs(a, b), np.asarray(data.scores))["cosine_spearman"]
            cosine = (vectors * fp32).sum(axis=1)
            print(
                f"| {name} | {args.n / best[name]:,.1f} | {base / best[name]:.2f}x | {spearman:.5f} | "
                f"{cosine.min():.4f} / {cosine.mean():.4f} |"
            )
        for name, note in notes.items():
            print(f"{name}: fused operators found: {note}")


if __name__ == "__main__":
    main()
