"""Reproduce MTEB's published all-MiniLM-L6-v2 numbers with bgekit, offline.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/eval_reference.py [--shared ../shared] [--out out/reference]

Runs the same code as ``bgekit eval retrieval`` / ``bgekit eval sts`` on the full SciFact test split
(5,183 documents, 300 queries) and the STSBenchmark test split (1,379 pairs), prints measured vs
published values, writes the reports under --out, and exits 1 if a value is outside MTEB's expected
tolerance (0.005 retrieval, 0.002 STS). Published values: ../shared/data/REFERENCE_SCORES.md.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MODEL = "sentence-transformers/all-MiniLM-L6-v2"
RETRIEVAL = {  # SciFact, test split
    "ndcg_at_10": 0.64508,
    "map_at_10": 0.59593,
    "mrr_at_10": 0.60472,
    "recall_at_10": 0.78333,
    "recall_at_100": 0.925,
    "ndcg_at_1": 0.50333,
}
STS = {"cosine_spearman": 0.8203247283076371, "cosine_pearson": 0.8274064239694425}  # STSBenchmark, test


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shared", type=Path, default=ROOT.parent / "shared")
    parser.add_argument("--out", type=Path, default=ROOT / "out" / "reference")
    parser.add_argument("--cache-dir", type=Path, default=None, help="default: a fresh temporary folder (no reuse)")
    args = parser.parse_args()

    from bgekit.eval.retrieval import evaluate_retrieval
    from bgekit.eval.sts import evaluate_sts

    rows, ok = [], True
    with tempfile.TemporaryDirectory() as tmp:
        started = time.perf_counter()
        result = evaluate_retrieval(
            MODEL,
            args.shared / "data" / "scifact",
            "test",
            k_values=(1, 3, 5, 10, 20, 100, 1000),
            cache_dir=args.cache_dir or Path(tmp),
            output=args.out / "scifact-test.json",
        )
        scifact_s = time.perf_counter() - started
    for name, published in RETRIEVAL.items():
        measured = result.metrics[name]
        good = abs(measured - published) <= 0.005
        ok &= good
        rows.append(("SciFact test", name, measured, published, good))
    started = time.perf_counter()
    sts = evaluate_sts(MODEL, args.shared / "data" / "stsbenchmark" / "test.tsv", output=args.out / "stsb-test.json")
    sts_s = time.perf_counter() - started
    for name, published in STS.items():
        measured = sts.metrics[name]
        good = abs(measured - published) <= 0.002
        ok &= good
        rows.append(("STSBenchmark test", name, measured, published, good))

    print(
        "| dataset | metric | bgekit | MTEB published | difference | within tolerance |\n|---|---|---:|---:|---:|---|"
    )
    for dataset, name, measured, published, good in rows:
        print(
            f"| {dataset} | {name} | {measured:.5f} | {published:.5f} | {measured - published:+.5f} "
            f"| {'yes' if good else 'NO'} |"
        )
    print(f"\nSciFact: {scifact_s:.0f} s ({result.timings}); STSBenchmark: {sts_s:.0f} s ({sts.timings})")
    print(f"reports in {args.out}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
