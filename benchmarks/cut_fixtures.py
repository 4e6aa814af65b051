"""Cut the small committed evaluation fixtures from the full datasets in ../shared/data.

    .venv/bin/python benchmarks/cut_fixtures.py [--shared ../shared]

scifact-mini: the first 40 SciFact test queries (file order of qrels/test.tsv), every document they
judge relevant, and for each query the 3 non-relevant documents that share the most distinct words of
4+ letters with it (a model-free choice of distractors, so ranking is not trivial). Lines are copied
verbatim from the original files (same JSON, same order as in the originals).
stsb-test-mini.tsv: every 7th pair of the STSBenchmark test split (197 pairs), header kept.
"""

from __future__ import annotations

import argparse
import gzip
import json
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WORD = re.compile(r"[a-z0-9]+")


def words(text: str) -> set[str]:
    return {w for w in WORD.findall(text.lower()) if len(w) > 3}


def cut_scifact(source: Path, target: Path, n_queries: int = 40, negatives: int = 3) -> None:
    qrel_lines = (source / "qrels" / "test.tsv").read_text(encoding="utf-8").splitlines()
    header, rows = qrel_lines[0], [line.split("\t") for line in qrel_lines[1:] if line.strip()]
    chosen: list[str] = []
    for query_id, _, _ in rows:
        if query_id not in chosen:
            chosen.append(query_id)
        if len(chosen) == n_queries:
            break
    keep_rows = [r for r in rows if r[0] in chosen]
    relevant = {r[1] for r in keep_rows}
    with gzip.open(source / "corpus.jsonl.gz", "rt", encoding="utf-8") as handle:
        corpus_lines = handle.read().splitlines()
    docs = {json.loads(line)["_id"]: line for line in corpus_lines}
    doc_words = {}
    for doc_id, line in docs.items():
        obj = json.loads(line)
        doc_words[doc_id] = words(obj["title"] + " " + obj["text"])
    query_lines = {json.loads(line)["_id"]: line for line in (source / "queries.jsonl").read_text("utf-8").splitlines()}
    picked = set(relevant)
    for query_id in chosen:
        q_words = words(json.loads(query_lines[query_id])["text"])
        ranked = sorted((d for d in docs if d not in relevant), key=lambda d: (-len(q_words & doc_words[d]), int(d)))
        picked.update(ranked[:negatives])
    target.mkdir(parents=True, exist_ok=True)
    (target / "qrels").mkdir(exist_ok=True)
    kept = [line for doc_id, line in docs.items() if doc_id in picked]
    (target / "corpus.jsonl").write_text("\n".join(kept) + "\n", encoding="utf-8")
    queries = [line for query_id, line in query_lines.items() if query_id in chosen]
    (target / "queries.jsonl").write_text("\n".join(queries) + "\n", encoding="utf-8")
    (target / "qrels" / "test.tsv").write_text(
        header + "\n" + "".join("\t".join(r) + "\n" for r in keep_rows), encoding="utf-8"
    )
    print(f"{target}: {len(kept)} documents, {len(queries)} queries, {len(keep_rows)} judgments")


def cut_sts(source: Path, target: Path, every: int = 7) -> None:
    lines = source.read_text(encoding="utf-8").splitlines()
    kept = [lines[0], *lines[1::every]]
    target.write_text("\n".join(kept) + "\n", encoding="utf-8")
    print(f"{target}: {len(kept) - 1} pairs")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shared", type=Path, default=ROOT.parent / "shared")
    args = parser.parse_args()
    out = ROOT / "examples" / "data"
    cut_scifact(args.shared / "data" / "scifact", out / "scifact-mini")
    cut_sts(args.shared / "data" / "stsbenchmark" / "test.tsv", out / "stsb-test-mini.tsv")


if __name__ == "__main__":
    main()
