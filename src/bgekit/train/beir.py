"""Training records from a retrieval dataset's judgements (``bgekit data beir-to-train``)."""

from __future__ import annotations

from .data import TrainRecord


def beir_to_records(dataset) -> list[TrainRecord]:
    """One record per judged query: its relevant documents (score > 0) as ``pos``, no negatives yet."""
    if getattr(dataset, "answers", None) and not dataset.qrels:
        from ..errors import InputError

        raise InputError(
            f"{dataset.name} ({dataset.split}) is judged by answer strings (MKQA), not by documents: it names no "
            "positive passages to train on"
        )
    texts = dict(zip(dataset.corpus_ids, dataset.corpus_texts, strict=True))
    records = []
    for query_id, judged in dataset.qrels.items():
        positives = [texts[d] for d, score in judged.items() if score > 0 and d in texts]
        if positives and query_id in dataset.queries:
            records.append(TrainRecord(dataset.queries[query_id], positives, []))
    return records
