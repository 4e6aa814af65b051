"""Run bgekit's MtebEncoder under the real mteb package, offline, on local data, and compare with
bgekit's own evaluation. mteb is not a bgekit dependency; install it first (it adds datasets, pyarrow
and polars):

    .venv/bin/python -m pip install mteb
    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/mteb_adapter_check.py [--shared ../shared]

Checks: STSBenchmark test (the full split from ../shared/data) and SciFact on the committed fixture
(examples/data/scifact-mini). mteb's tasks normally download their data; here the task objects get the
local data instead, so nothing leaves the machine.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MODEL = "sentence-transformers/all-MiniLM-L6-v2"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shared", type=Path, default=ROOT.parent / "shared")
    args = parser.parse_args()

    import mteb
    from datasets import Dataset

    from bgekit.eval.datasets import load_retrieval_dataset, load_sts
    from bgekit.eval.mteb import MtebEncoder
    from bgekit.eval.retrieval import evaluate_retrieval
    from bgekit.eval.sts import evaluate_sts

    model = MtebEncoder(MODEL)
    assert isinstance(model, mteb.models.EncoderProtocol)
    ok = True
    print(f"mteb {mteb.__version__}\n\n| task | metric | mteb + MtebEncoder | bgekit | same |\n|---|---|---:|---:|---|")

    sts_path = args.shared / "data" / "stsbenchmark" / "test.tsv"
    data = load_sts(sts_path)
    task = mteb.get_task("STSBenchmark")
    columns = {"sentence1": data.sentences1, "sentence2": data.sentences2, "score": data.scores}
    task.dataset = {"default": {"test": Dataset.from_dict(columns)}}
    task.data_loaded = True
    theirs = mteb.evaluate(model, [task], cache=None, overwrite_strategy="always").task_results[0].scores["test"][0]
    ours = evaluate_sts(model.model, data).metrics
    for name in ("cosine_spearman", "cosine_pearson"):
        same = abs(theirs[name] - ours[name]) < 1e-6
        ok &= same
        print(f"| STSBenchmark test | {name} | {theirs[name]:.7f} | {ours[name]:.7f} | {'yes' if same else 'NO'} |")

    folder = ROOT / "examples" / "data" / "scifact-mini"
    dataset = load_retrieval_dataset(folder, "test")
    rows = [json.loads(line) for line in (folder / "corpus.jsonl").read_text().splitlines()]
    corpus = Dataset.from_dict(
        {"id": [r["_id"] for r in rows], "title": [r["title"] for r in rows], "text": [r["text"] for r in rows]}
    )
    queries = Dataset.from_dict({"id": list(dataset.queries), "text": list(dataset.queries.values())})
    task = mteb.get_task("SciFact")
    split = {"corpus": corpus, "queries": queries, "relevant_docs": dataset.qrels, "top_ranked": None}
    task.dataset = {"default": {"test": split}}
    task.data_loaded = True
    theirs = mteb.evaluate(model, [task], cache=None, overwrite_strategy="always").task_results[0].scores["test"][0]
    ours = evaluate_retrieval(model.model, dataset, use_cache=False, k_values=(1, 3, 5, 10, 20, 100, 1000)).metrics
    for name in ("ndcg_at_10", "map_at_10", "mrr_at_10", "recall_at_100", "precision_at_10", "ndcg_at_1"):
        same = round(theirs[name], 5) == round(ours[name], 5)  # mteb rounds most metrics to 5 decimals
        ok &= same
        print(f"| scifact-mini test | {name} | {theirs[name]:.5f} | {ours[name]:.5f} | {'yes' if same else 'NO'} |")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
