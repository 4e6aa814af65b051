"""Run under ``torchrun --nproc_per_node 2`` with argv: model folder, data folder, output JSON. Each rank
reads the Trainer's own data loader of a ``same_dataset_within_batch`` run with cross-device negatives,
and writes per step: its queries, the batch's ``in_batch`` flag, the Trainer's loss, and two hand
computations (negatives gathered from every rank; the query's own group only). Rank r writes
``<output>.r``."""

import json
import sys

import torch
import torch.distributed as dist
import torch.nn.functional as F
from transformers import AutoModel

from bgekit.models.tokenization import load_hf_tokenizer
from bgekit.train.data import GroupSampler, load_train_files
from bgekit.train.embedder import EmbedderCollator, EmbedderOptions, EmbedderTrainer
from bgekit.train.same_dataset import SameSetCollator, SameSetDataset, training_sets
from bgekit.train.trainer import ThroughputCallback, training_tokenizer

model_dir, data, output = sys.argv[1:4]
options = EmbedderOptions(
    output_dir=output + ".run",
    train_group_size=2,
    per_device_train_batch_size=2,
    temperature=0.5,
    negatives_cross_device=True,
    same_dataset_within_batch=True,
)
args = options.training_arguments()
files = load_train_files([data])
records = [r for _, _, rs in files for r in rs]
dataset = SameSetDataset(GroupSampler(records, 2, 0), training_sets(files, 2), 0, processes=args.world_size)
args.per_device_train_batch_size = 1
hf_tokenizer = load_hf_tokenizer(model_dir)
tokenizer = training_tokenizer(hf_tokenizer)
trainer = EmbedderTrainer(
    model=AutoModel.from_pretrained(model_dir),
    args=args,
    train_dataset=dataset,
    data_collator=SameSetCollator(EmbedderCollator(tokenizer, options)),
    processing_class=hf_tokenizer,
    text_tokenizer=tokenizer,
    throughput=ThroughputCallback(),
    options=options,
    pooling_method="cls",
)
model = trainer.model.eval()
rank = dist.get_rank()
steps = []
for batch in trainer.get_train_dataloader():
    with torch.no_grad():
        loss = trainer.compute_loss(model, batch).item()
        q, p = trainer.embed(model, batch["query"]), trainer.embed(model, batch["passage"])
    parts = [torch.empty_like(p) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, p)
    everywhere = torch.cat(parts)
    target = (torch.arange(len(q)) + rank * len(q)) * 2
    gathered = F.cross_entropy(q @ everywhere.T / 0.5, target).item()
    own = F.cross_entropy(
        torch.einsum("bd,bgd->bg", q, p.view(len(q), 2, -1)) / 0.5, torch.zeros(len(q), dtype=torch.long)
    )
    queries = [
        t.replace(" ", "") for t in hf_tokenizer.batch_decode(batch["query"]["input_ids"], skip_special_tokens=True)
    ]
    steps.append(
        {"queries": queries, "in_batch": batch["in_batch"], "loss": loss, "gathered": gathered, "own": own.item()}
    )
with open(f"{output}.{rank}", "w") as handle:
    json.dump(steps, handle)
