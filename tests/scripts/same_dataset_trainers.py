"""Run under ``torchrun --nproc_per_node 2`` with argv: ICL model folder, M3 model folder, data folder,
output prefix. Trains the real ``finetune_icl`` and ``finetune_m3`` (``same_dataset_within_batch`` with
cross-device negatives) one after the other, and records what each rank's collator was handed at every
step: the queries, the in-context examples' queries (ICL), ``in_batch`` and ``group_size``. The
collator is the real one; the record is taken on its way in. Rank r writes ``<prefix>.<kind>.r``."""

import json
import sys

import torch.distributed as dist

from bgekit.train import same_dataset
from bgekit.train.embedder import finetune_embedder
from bgekit.train.icl import ICLOptions
from bgekit.train.m3 import M3Options, finetune_m3

icl_model, m3_model, data, prefix = sys.argv[1:5]
seen: list[dict] = []
collate = same_dataset.SameSetCollator.__call__


def recording(self, items):
    (item,) = items
    seen.append(
        {
            "queries": [g.query for g in item.groups],
            "examples": [e["query"] for g in item.groups for e in getattr(g, "examples", [])],
            "in_batch": item.in_batch,
            "group_size": item.group_size,
            "passages": [len(g.passages) for g in item.groups],
        }
    )
    return collate(self, items)


same_dataset.SameSetCollator.__call__ = recording
common = {
    "train_data": [data],
    "per_device_train_batch_size": 2,
    "train_group_size": 3,
    "passage_max_len": 16,
    "negatives_cross_device": True,
    "same_dataset_within_batch": True,
    "save_steps": 100,
    "logging_steps": 1,
}
runs = {
    "icl": lambda: finetune_embedder(
        ICLOptions(
            output_dir=prefix + ".icl.out",
            model_name_or_path=icl_model,
            model_class="decoder-only-icl",
            query_instruction_for_retrieval="Find it.",
            query_max_len=64,
            **common,
        )
    ),
    "m3": lambda: finetune_m3(M3Options(output_dir=prefix + ".m3.out", model_name_or_path=m3_model, **common)),
}
for kind, train in runs.items():
    seen.clear()
    train()
    with open(f"{prefix}.{kind}.{dist.get_rank()}", "w") as handle:
        json.dump(seen, handle)
