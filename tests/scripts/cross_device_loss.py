"""Run under ``torchrun --nproc_per_node 2``: the cross-device InfoNCE loss on each rank's half,
averaged over ranks, and its gradients, written by rank 0 to the JSON file in argv[1]."""

import json
import sys

import torch
import torch.distributed as dist
import torch.nn.functional as F

from bgekit.train import losses

dist.init_process_group("gloo")
rank, world = dist.get_rank(), dist.get_world_size()
generator = torch.Generator().manual_seed(0)
q_all = torch.randn(4 * world, 16, generator=generator)
p_all = torch.randn(4 * world * 3, 16, generator=generator)
q = q_all[rank * 4 : (rank + 1) * 4].clone().requires_grad_(True)
p = p_all[rank * 12 : (rank + 1) * 12].clone().requires_grad_(True)
loss = losses.info_nce(F.normalize(q, dim=-1), F.normalize(p, dim=-1), 3, 0.05, cross_device=True)
loss.backward()
total = loss.detach().clone()
dist.all_reduce(total)
q_grads = [torch.zeros(4, 16) for _ in range(world)]
dist.all_gather(q_grads, q.grad)
p_grads = [torch.zeros(12, 16) for _ in range(world)]
dist.all_gather(p_grads, p.grad)
if rank == 0:
    with open(sys.argv[1], "w") as handle:
        result = {
            "loss": total.item() / world,
            "q_grad": torch.cat(q_grads).tolist(),
            "p_grad": torch.cat(p_grads).tolist(),
        }
        json.dump(result, handle)
dist.destroy_process_group()
