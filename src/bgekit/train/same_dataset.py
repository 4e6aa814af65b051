"""Batches that each come from one training file: FlagEmbedding 1.4.2's ``same_dataset_within_batch``.

Mixing tasks in one batch lets a model tell in-batch negatives apart by their task alone (an STS pair
against a retrieval passage), which teaches it nothing. In this mode every batch holds records of one
training set (a file; or a folder's small files merged, see ``small_threshold``), and each set has its
own batch size and rules:

- batch size: the records' own ``batch_size`` field (the first record's); else half the batch size
  for a set whose (first) record ``type`` contains ``symmetric``; else ``per_device_train_batch_size``;
- no in-batch (nor cross-device) negatives for a file whose name ends with ``no_in_batch_neg``
  (``train_no_in_batch_neg.jsonl``), or for every file in a folder whose name does: each query is
  scored against its own group only;
- group size: 2 for ``only_1neg`` records; for ``symmetric_class`` records, the batch's first
  record's negatives + 1, at most ``train_group_size``; else ``train_group_size``.

Each epoch the sets' records are shuffled, cut into full batches (the last, short one is left out, as
FlagEmbedding does: a set with fewer records than one batch gives none), and the batches shuffled.
With several processes a batch holds ``batch size x processes`` records of one set and every process
takes its share, so cross-device negatives come from the same set too. The plan depends only on the
seed and the epoch: every process draws the same one, and a resumed run the same batches.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..errors import DataFormatError, InputError
from .data import Group, GroupSampler, TrainRecord
from .trainer import GroupDataset

logger = logging.getLogger(__name__)

NO_IN_BATCH_NEG = "no_in_batch_neg"
#: record types with their own group size in this mode (FlagEmbedding 1.4.2)
ONLY_1NEG, SYMMETRIC_CLASS = "only_1neg", "symmetric_class"


@dataclass
class TrainingSet:
    """Records that batch together: one file, or a folder's small files merged."""

    name: str
    indices: list[int]
    batch_size: int
    in_batch: bool
    type: str | None


@dataclass
class SameSetBatch:
    """One process's share of one batch: its groups and how the loss treats them."""

    groups: list[Group]
    group_size: int
    in_batch: bool


def _stem(path: Path) -> str:
    name = path.name
    for suffix in (".jsonl.gz", ".jsonl", ".json"):
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return path.stem


def _line(record: TrainRecord) -> int:
    return int(record.source.rsplit(":", 1)[1]) if ":" in record.source else 0


def _batch_size(records: list[TrainRecord], path: Path, default: int) -> int:
    """The set's batch size: its first record's ``batch_size``, else half for ``symmetric`` types."""
    first = records[0]
    value = (first.raw or {}).get("batch_size")
    if value is not None:
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise DataFormatError(path, _line(first), f"'batch_size' must be a positive integer, got {value!r}")
        return value
    if first.type is not None and "symmetric" in first.type:
        return max(1, default // 2)
    return default


def _one_type(records: list[TrainRecord], name: str) -> str | None:
    """The set's record ``type``: a batch mixes no types (FlagEmbedding asserts it batch by batch)."""
    kind = records[0].type
    for record in records:
        if record.type != kind:
            path = Path(record.source.rsplit(":", 1)[0])
            raise DataFormatError(
                path,
                _line(record),
                f"'type' is {record.type!r}, but {name} begins with type {kind!r}: with same_dataset_within_batch a "
                "batch holds records of one type; put each type in its own file",
            )
    return kind


def training_sets(
    files: list[tuple[Path, Path | None, list[TrainRecord]]],
    batch_size: int,
    *,
    small_threshold: int = 0,
    drop_threshold: int = 0,
) -> list[TrainingSet]:
    """The sets batches are drawn from, record indices counted over ``files`` in order. A file with
    fewer than ``small_threshold`` records is left out when named itself, and merged with its folder's
    other small files when found in a folder (batch size: the smallest of theirs); that merged set is
    left out when it has fewer than ``drop_threshold`` records (FlagEmbedding's rules)."""
    sets: list[TrainingSet] = []
    small: dict[Path, list[tuple[Path, list[int], list[TrainRecord]]]] = {}
    start = 0
    for path, folder, records in files:
        indices = list(range(start, start + len(records)))
        start += len(records)
        if len(records) < small_threshold:
            if folder is None:
                logger.warning(
                    "%s: %d records, under small_threshold=%d: left out", path, len(records), small_threshold
                )
            else:
                small.setdefault(folder, []).append((path, indices, records))
            continue
        no_neg = _stem(path).endswith(NO_IN_BATCH_NEG) or (folder is not None and folder.name.endswith(NO_IN_BATCH_NEG))
        kind = _one_type(records, str(path))
        sets.append(TrainingSet(str(path), indices, _batch_size(records, path, batch_size), not no_neg, kind))
    for folder, parts in small.items():
        total = sum(len(indices) for _, indices, _ in parts)
        name = f"{folder}'s small files"
        if total < drop_threshold:
            logger.warning("%s: %d records, under drop_threshold=%d: left out", name, total, drop_threshold)
            continue
        records = [r for _, _, rs in parts for r in rs]
        sets.append(
            TrainingSet(
                name,
                [i for _, indices, _ in parts for i in indices],
                min(_batch_size(rs, path, batch_size) for path, _, rs in parts),
                not folder.name.endswith(NO_IN_BATCH_NEG),
                _one_type(records, name),
            )
        )
    return sets


class SameSetDataset(torch.utils.data.Dataset):
    """Item ``k * processes + r`` is process ``r``'s share of batch ``k`` of this epoch's plan.

    The Trainer reads it one item a step, in order (see ``EmbedderTrainer._get_train_sampler``);
    with several processes the data loader hands process ``r`` items ``r, r + processes, ...``,
    so every process trains on its share of the same batch at the same step."""

    def __init__(self, sampler: GroupSampler, sets: list[TrainingSet], seed: int, processes: int = 1):
        self.sampler = sampler
        self.sets = sets
        self.seed = seed
        self.processes = processes
        self.epoch = 0
        self._plan: tuple[int, list[tuple[int, list[int]]]] | None = None  # the last epoch's, kept
        self._batches = len(self.plan(0))  # the same number every epoch
        if not self._batches:
            sizes = "; ".join(f"{s.name}: {len(s.indices)} records, batch {s.batch_size * processes}" for s in sets[:4])
            sizes += "; ..." if len(sets) > 4 else ""
            raise InputError(
                "same_dataset_within_batch: no training file has one full batch of records "
                f"({sizes or 'no files left'}); lower --per-device-train-batch-size, or merge a folder's "
                "small files with --small-threshold"
            )
        short = [s.name for s in sets if len(s.indices) < s.batch_size * processes]
        if short:
            logger.warning(
                "same_dataset_within_batch: %s hold fewer records than one batch: no batch comes from them",
                ", ".join(short[:8]) + (f" and {len(short) - 8} more" if len(short) > 8 else ""),
            )

    def plan(self, epoch: int) -> list[tuple[int, list[int]]]:
        """``(set, record indices)`` of each batch of ``epoch``, in training order."""
        if self._plan is None or self._plan[0] != epoch:
            rng = np.random.default_rng([self.seed, epoch])
            batches = []
            for which in rng.permutation(len(self.sets)):
                chosen = self.sets[which]
                order = [chosen.indices[i] for i in rng.permutation(len(chosen.indices))]
                size = chosen.batch_size * self.processes
                batches += [(int(which), order[at : at + size]) for at in range(0, len(order) - size + 1, size)]
            self._plan = (epoch, [batches[i] for i in rng.permutation(len(batches))])
        return self._plan[1]

    def __len__(self) -> int:
        return self._batches * self.processes

    def __getitem__(self, item: int) -> SameSetBatch:
        which, indices = self.plan(self.epoch)[item // self.processes]
        chosen = self.sets[which]
        group_size = self.group_size(chosen, self.sampler.records[indices[0]])
        share = len(indices) // self.processes
        mine = indices[(item % self.processes) * share :][:share]
        groups = [self.make_group(i, group_size) for i in mine]
        return SameSetBatch(groups, group_size, chosen.in_batch)

    def make_group(self, index: int, group_size: int) -> Group:
        """Record ``index``'s group for this epoch (the ICL dataset adds its examples here)."""
        return self.sampler.group(index, self.epoch, group_size)

    def group_size(self, chosen: TrainingSet, first: TrainRecord) -> int:
        """The batch's passages per query: from its first record (of the whole batch, so every process
        draws the same number and cross-device gathers line up)."""
        if chosen.type == ONLY_1NEG:
            return 2
        if chosen.type == SYMMETRIC_CLASS:
            return min(len(first.neg) + 1, self.sampler.group_size)
        return self.sampler.group_size


def same_set_dataset(
    files: list[tuple[Path, Path | None, list[TrainRecord]]],
    sampler: GroupSampler,
    options,
    args,
    dataset_class: type[SameSetDataset] = SameSetDataset,
    /,
    **kwargs,
) -> SameSetDataset:
    """The plan for ``options`` (batch size, thresholds, seed) over ``files``, checked before any model
    loads; sets ``args.per_device_train_batch_size`` to 1, as one item is a whole batch."""
    sets = training_sets(
        files,
        options.per_device_train_batch_size,
        small_threshold=options.small_threshold,
        drop_threshold=options.drop_threshold,
    )
    if args.n_gpu > 1:  # DataParallel would stack several items (batches of several files) into one
        raise InputError("same_dataset_within_batch runs one process per device: start it with torchrun")
    dataset = dataset_class(sampler, sets, options.seed, processes=args.world_size, **kwargs)
    args.per_device_train_batch_size = 1
    return dataset


def group_dataset(
    records: list[TrainRecord], files: list[tuple[Path, Path | None, list[TrainRecord]]], options, args
) -> torch.utils.data.Dataset:
    """An embedder's training items: one record's group each, or with ``same_dataset_within_batch`` one
    file's whole batch each (:func:`same_set_dataset`, its plan checked before any model loads)."""
    sampler = GroupSampler.from_options(records, options)
    if options.same_dataset_within_batch:
        return same_set_dataset(files, sampler, options, args)
    return GroupDataset(sampler)


class SameSetCollator:
    """Wraps the embedder collator: one item (a whole batch) in, its tensors plus ``group_size`` and
    ``in_batch`` (whether other queries' passages are negatives) out."""

    def __init__(self, collator):
        self.collator = collator

    def __call__(self, items: list[SameSetBatch]) -> dict:
        (item,) = items
        batch = self.collator(item.groups)
        batch["group_size"] = item.group_size
        batch["in_batch"] = item.in_batch
        return batch
