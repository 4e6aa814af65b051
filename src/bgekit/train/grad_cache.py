"""Sub-batching for contrastive training (the gradient-cache method of Gao et al., 2021).

A contrastive loss needs every vector of the batch at once, so a big batch normally needs the
activations of every sequence in memory at once. Gradient caching splits the step in three:

1. embed the batch in sub-batches without building graphs (little memory);
2. compute the loss on those vectors and its gradient with respect to each vector;
3. embed each sub-batch again, this time with a graph, and back-propagate
   ``sum(vector * its cached gradient)``, which gives every weight the same gradient as the
   whole-batch loss would.

Dropout draws are replayed (the random state is saved before step 1 for each sub-batch and
restored for step 3), so the result equals the whole-batch step, not an approximation of it.
The price is a second forward pass per step.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext

import torch

Batch = dict[str, torch.Tensor]


class RandomState:
    """The CPU and (when the batch is on CUDA) device random state at one moment."""

    def __init__(self, device: torch.device):
        self.device = device
        self.cpu = torch.get_rng_state()
        self.cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None

    @contextmanager
    def replay(self) -> Iterator[None]:
        """Run the block with the saved state, then put the current state back."""
        devices = [self.device] if self.cuda is not None else []
        with torch.random.fork_rng(devices=devices):
            torch.set_rng_state(self.cpu)
            if self.cuda is not None:
                torch.cuda.set_rng_state(self.cuda, self.device)
            yield


def split_batch(batch: Batch, size: int) -> list[Batch]:
    """Row slices of a padded batch, ``size`` rows each (the last may be shorter)."""
    rows = next(iter(batch.values())).shape[0]
    return [{k: v[start : start + size] for k, v in batch.items()} for start in range(0, rows, size)]


def embed_without_graph(
    embed: Callable[[Batch], torch.Tensor], chunks: list[Batch]
) -> tuple[torch.Tensor, list[RandomState]]:
    """Step 1: vectors of every chunk (no graph) and the random state each chunk started from."""
    states, vectors = [], []
    with torch.no_grad():
        for chunk in chunks:
            states.append(RandomState(next(iter(chunk.values())).device))
            vectors.append(embed(chunk))
    return torch.cat(vectors), states


def backward_through_chunks(
    embed: Callable[[Batch], torch.Tensor],
    chunks: list[Batch],
    states: list[RandomState],
    gradient: torch.Tensor,
    no_sync: Callable[[], object],
    last_syncs: bool,
) -> None:
    """Step 3: re-embed each chunk with its saved random state and push its cached gradient in.

    ``no_sync`` is the DDP context that skips the gradient all-reduce; only the last backward
    of the whole step (``last_syncs``) lets it happen.
    """
    offset = 0
    for index, (chunk, state) in enumerate(zip(chunks, states, strict=True)):
        syncs = last_syncs and index == len(chunks) - 1
        # DDP decides in the forward whether the next backward all-reduces, so both sit inside
        with nullcontext() if syncs else no_sync(), state.replay():
            vectors = embed(chunk)
            part = gradient[offset : offset + vectors.shape[0]]
            torch.autograd.backward(vectors, grad_tensors=part.to(vectors.dtype))
        offset += vectors.shape[0]
