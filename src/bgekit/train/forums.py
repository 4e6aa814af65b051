"""CQADupStack's forums as training data: one training file a forum, each forum mined in its own corpus.

BEIR's ``cqadupstack`` folder is twelve datasets, one a forum with its own corpus, and evaluation
searches each forum's queries in that forum's corpus alone (:mod:`bgekit.eval.averaged`). Training
data made from it keeps the forums apart the same way: ``bgekit data beir-to-train`` writes
``OUT/FORUM.jsonl`` (``finetune --train-data OUT`` reads them all, ``--same-dataset-within-batch``
keeps each batch within one forum) and ``bgekit mine --corpus DIR/cqadupstack`` mines each forum's
queries among that forum's documents: the hard negatives of a duplicate-question search, where
another forum's posts would be easy ones and not what the evaluation searches.
"""

from __future__ import annotations

import logging
from pathlib import Path

from .. import io
from ..errors import InputError
from ..eval.datasets import CQADUPSTACK_FORUMS, available_splits, load_local_dataset, read_corpus, required_files
from .beir import beir_to_records
from .data import TrainRecord, record_rows, training_files

logger = logging.getLogger(__name__)


def forum_records(forums: list[Path], split: str) -> dict[str, list[TrainRecord]]:
    """Each forum's training records (:func:`beir_to_records`), by forum name; a forum without ``split``
    is an :class:`InputError` before any forum is read."""
    for folder in forums:
        splits = available_splits(folder)
        if split not in splits:
            raise InputError(
                f"forum {folder} has no judgments for split {split!r} (splits found: {', '.join(splits) or 'none'})"
            )
        required_files(folder, split)
    return {folder.name: beir_to_records(load_local_dataset(folder, split)) for folder in forums}


def forum_corpus(forum: Path) -> list[str]:
    """A forum's documents as :func:`beir_to_records` writes its positives (``title text``)."""
    path = next((forum / name for name in ("corpus.jsonl", "corpus.jsonl.gz") if (forum / name).is_file()), None)
    if path is None:
        raise InputError(f"forum {forum} has no corpus.jsonl")
    return read_corpus(path)[1]


def forum_training_files(folder: Path, forums: list[Path]) -> dict[str, Path]:
    """Each forum's training file in ``folder`` (``FORUM.jsonl``, as ``beir-to-train`` writes them), by
    forum name; a file named after no forum of ``forums`` is an :class:`InputError`."""
    root = forums[0].parent
    if not folder.is_dir():
        raise InputError(
            f"--corpus {root} is CQADupStack's forums, each mined in its own corpus: --input must be a folder of "
            f"FORUM.jsonl training files (bgekit data beir-to-train --dataset {root} writes one), not {folder}"
        )
    known = {forum.name for forum in forums}
    found: dict[str, Path] = {}
    for path, _ in training_files(folder):
        name = path.name.removesuffix(".gz").removesuffix(".jsonl").removesuffix(".json")
        if name not in known:
            raise InputError(
                f"{path} is named after no forum of {root} ({', '.join(sorted(known))}): each training file "
                "FORUM.jsonl is mined in its forum's corpus"
            )
        if name in found:
            raise InputError(f"{found[name]} and {path} are both forum {name}'s training file: keep one")
        found[name] = path
    return dict(sorted(found.items()))


def check_forum_output(output: Path, *, inputs: tuple[Path, ...] = ()) -> None:
    """``output`` must be able to become the folder of the forums' files (not a file, not an input folder)."""
    if not output.is_dir() and output.name.endswith((".jsonl", ".json", ".gz")):
        raise InputError(
            f"CQADupStack gives one training file a forum: --output is the folder for them (OUT/FORUM.jsonl, "
            f"which finetune --train-data reads whole), not a file such as {output}"
        )
    io.check_output_folder(output)
    for folder in inputs:
        if output.resolve() == folder.resolve():
            raise InputError(f"output {output} is also the input folder: writing it would replace the data")


def write_forum_files(folder: Path, records: dict[str, list[TrainRecord]]) -> list[Path]:
    """Write ``FOLDER/FORUM.jsonl`` for each forum with records, together (atomically), and remove the
    ``FORUM.jsonl`` of other forums that an earlier run left there, so the folder (read whole by
    ``finetune --train-data``) holds this run's forums; other files stay. Returns the paths written."""
    empty = [forum for forum, forum_records in records.items() if not forum_records]
    if empty:
        logger.warning("no training records (no judged query with a document) in forum(s) %s", ", ".join(empty))
    paths = {forum: folder / f"{forum}.jsonl" for forum, forum_records in records.items() if forum_records}
    if not paths:
        raise InputError("no forum has a judged query with a relevant document: nothing to write")
    io.write_together((path, io.jsonl_writer(path, record_rows(records[forum]))) for forum, path in paths.items())
    for forum in CQADUPSTACK_FORUMS:
        if forum not in paths:
            (folder / f"{forum}.jsonl").unlink(missing_ok=True)
    return list(paths.values())
