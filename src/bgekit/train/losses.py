"""Training losses as small functions: contrastive (InfoNCE), distillation, reranker CE.

Shapes: ``q`` is ``(B, D)`` query vectors, ``p`` is ``(B * G, D)`` passage vectors where each
query's group of ``G`` passages starts with its positive. Scores are dot products (the
vectors are normalized by the caller when cosine similarity is wanted).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


class _GatherWithGrad(torch.autograd.Function):
    """All-gather whose backward sums every rank's gradient and keeps this rank's slice."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        world, rank = torch.distributed.get_world_size(), torch.distributed.get_rank()
        parts = [torch.empty_like(x) for _ in range(world)]
        torch.distributed.all_gather(parts, x.contiguous())
        ctx.rank, ctx.rows = rank, x.shape[0]
        return torch.cat(parts, dim=0)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous()
        torch.distributed.all_reduce(grad)
        return grad[ctx.rank * ctx.rows : (ctx.rank + 1) * ctx.rows]


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """Concatenate ``x`` from every rank, keeping gradients; the tensor itself in a single process.

    Cross-device negatives therefore need no launcher: without ``torch.distributed`` (or
    with one process) they are simply the in-batch negatives. Every rank must pass the same
    number of rows (the trainer drops the last uneven batch).
    """
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return x
    if torch.distributed.get_world_size() == 1:
        return x
    return _GatherWithGrad.apply(x)


def rank_offset(local_queries: int) -> int:
    """Index of this rank's first query in the gathered batch."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank() * local_queries
    return 0


def contrastive_scores(
    q: torch.Tensor, p: torch.Tensor, group_size: int, *, in_batch: bool = True, cross_device: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Score matrix and target column of each query's positive.

    ``in_batch``: every passage in the batch is a candidate; otherwise only the query's own group.
    ``cross_device``: passages from every rank are candidates (all-gather keeping gradients).
    """
    if not in_batch:
        groups = p.view(q.shape[0], group_size, -1)
        scores = torch.einsum("bd,bgd->bg", q, groups)
        return scores, torch.zeros(q.shape[0], dtype=torch.long, device=q.device)
    if cross_device:
        p = gather_with_grad(p)
        offset = rank_offset(q.shape[0])
    else:
        offset = 0
    scores = q @ p.T
    target = (torch.arange(q.shape[0], device=q.device) + offset) * group_size
    return scores, target


def info_nce(
    q: torch.Tensor,
    p: torch.Tensor,
    group_size: int,
    temperature: float = 0.02,
    *,
    in_batch: bool = True,
    cross_device: bool = False,
) -> torch.Tensor:
    """InfoNCE: cross-entropy of each query's positive among its candidates, scores / temperature."""
    scores, target = contrastive_scores(q, p, group_size, in_batch=in_batch, cross_device=cross_device)
    return F.cross_entropy(scores / temperature, target)


def distillation_kl(student: torch.Tensor, teacher: torch.Tensor, temperature: float = 0.02) -> torch.Tensor:
    """KL(teacher || student) over each group, teacher scores softmaxed as given (FlagEmbedding's ``kl_div``)."""
    target = F.softmax(teacher, dim=-1)
    return F.kl_div(F.log_softmax(student / temperature, dim=-1), target, reduction="batchmean")


def soft_cross_entropy(student: torch.Tensor, teacher: torch.Tensor, temperature: float = 0.02) -> torch.Tensor:
    """Cross-entropy of the student's scores / temperature against the teacher's softmaxed scores, row by
    row (FlagEmbedding's ``distill_loss("kl_div", ...)``: self-distillation, layerwise rerankers)."""
    target = F.softmax(teacher, dim=-1)
    return -(target * F.log_softmax(student / temperature, dim=-1)).sum(dim=-1).mean()


def m3_kd_loss(logits: torch.Tensor, first: torch.Tensor, teacher: torch.Tensor, group_size: int) -> torch.Tensor:
    """FlagEmbedding's ``m3_kd_loss``: for each group member i, the cross-entropy of column ``first + i``
    among the row's candidates, weighted by the teacher's probability of member i; members before i are
    left out of i's candidates. ``logits`` are scores / temperature, ``(B, N)``; ``first`` each row's
    first group column; ``teacher`` raw ``(B, G)`` scores (``-inf``: no weight)."""
    target = F.softmax(teacher, dim=-1)
    mask = torch.zeros_like(logits)
    loss = logits.new_zeros(())
    for i in range(group_size):
        column = first + i
        loss = loss + (target[:, i] * F.cross_entropy(logits + mask, column, reduction="none")).mean()
        mask = mask.scatter(-1, column.unsqueeze(-1), torch.finfo(logits.dtype).min)
    return loss


def scores_loss(
    scores: torch.Tensor,
    first: torch.Tensor,
    group_size: int,
    temperature: float,
    teacher: torch.Tensor | None = None,
    kd_loss_type: str = "kl_div",
) -> torch.Tensor:
    """One score matrix's loss, as FlagEmbedding computes it: InfoNCE of each row's positive (column
    ``first``); with teacher scores, ``kl_div`` adds KL(teacher || student) over the row's own group and
    ``m3_kd_loss`` replaces InfoNCE by :func:`m3_kd_loss`. ``scores``: ``(B, B * G)`` in-batch (or wider,
    across devices) or ``(B, G)`` own group."""
    logits = scores / temperature
    if teacher is None:
        return F.cross_entropy(logits, first)
    teacher = teacher.to(logits.device)
    if kd_loss_type == "m3_kd_loss":
        return m3_kd_loss(logits, first, teacher, group_size)
    own = logits.gather(1, first.unsqueeze(1) + torch.arange(group_size, device=logits.device))
    return F.cross_entropy(logits, first) + distillation_kl(own, teacher, temperature=1.0)


def embedding_loss(
    q: torch.Tensor,
    p: torch.Tensor,
    group_size: int,
    temperature: float = 0.02,
    teacher: torch.Tensor | None = None,
    kd_loss_type: str = "kl_div",
    *,
    in_batch: bool = True,
    cross_device: bool = False,
    matryoshka_dims: list[int] | None = None,
) -> torch.Tensor:
    """An embedder's training loss from query and passage vectors: :func:`scores_loss` on their
    :func:`contrastive_scores`; with ``matryoshka_dims`` the mean of it over the vectors' leading
    dims (each slice re-normalized), teacher terms included, as FlagEmbedding's MRL."""

    def one(q: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
        scores, first = contrastive_scores(q, p, group_size, in_batch=in_batch, cross_device=cross_device)
        return scores_loss(scores, first, group_size, temperature, teacher, kd_loss_type)

    if not matryoshka_dims:
        return one(q, p)
    sliced = [one(F.normalize(q[:, :d], dim=-1), F.normalize(p[:, :d], dim=-1)) for d in matryoshka_dims]
    return torch.stack(sliced).mean()


def reranker_ce(scores: torch.Tensor, group_size: int) -> torch.Tensor:
    """Cross-encoder loss: each group's positive (first) against its negatives."""
    grouped = scores.view(-1, group_size)
    return F.cross_entropy(grouped, torch.zeros(grouped.shape[0], dtype=torch.long, device=scores.device))


def reranker_loss(scores: torch.Tensor, group_size: int, teacher: torch.Tensor | None = None) -> torch.Tensor:
    """:func:`reranker_ce`, plus FlagEmbedding's distillation when teacher scores come: the soft
    cross-entropy of each group's scores against the teacher's softmax (no temperature)."""
    loss = reranker_ce(scores, group_size)
    if teacher is None:
        return loss
    target = teacher.to(scores.device).view(-1, group_size)
    return loss + soft_cross_entropy(scores.view(-1, group_size), target, temperature=1.0)


# -- BGE-M3 unified fine-tuning: score matrices of the sparse and ColBERT heads ---------------
M3_ENSEMBLE_WEIGHTS = {"dense": 1.0, "sparse": 0.3, "colbert": 1.0}


def m3_sparse_scores(
    q_ids: torch.Tensor, q_weights: torch.Tensor, p_ids: torch.Tensor, p_weights: torch.Tensor
) -> torch.Tensor:
    """``(Bq, Bp)`` lexical scores: sum over shared token ids of the max weight of each id per text.

    ``*_ids`` ``(B, L)`` token ids, ``*_weights`` ``(B, L)`` relu weights with 0 at padding and
    special tokens (what ``BGEM3FlagModel`` drops). Ids are remapped to those present in the
    batch, so the vocabulary-sized vectors FlagEmbedding builds (``B x vocab``) are never made.
    """
    ids = torch.cat([q_ids.reshape(-1), p_ids.reshape(-1)])
    present, inverse = torch.unique(ids, return_inverse=True)
    q_index, p_index = inverse[: q_ids.numel()].view_as(q_ids), inverse[q_ids.numel() :].view_as(p_ids)

    def bag(index: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        out = weights.new_zeros(weights.shape[0], len(present))
        return out.scatter_reduce(1, index, weights, reduce="amax", include_self=True)

    return bag(q_index, q_weights) @ bag(p_index, p_weights).T


def m3_colbert_scores(q: torch.Tensor, q_mask: torch.Tensor, p: torch.Tensor, p_mask: torch.Tensor) -> torch.Tensor:
    """``(Bq, Bp)`` late-interaction scores: mean over real query vectors of the best dot product
    with a real passage vector (``q``/``p`` ``(B, L, D)``, masks ``(B, L)``; padding never wins)."""
    token = torch.einsum("qid,pjd->qipj", q, p)
    token = token.masked_fill(~p_mask.bool()[None, None], torch.finfo(token.dtype).min)
    best = token.max(dim=-1).values * q_mask[:, :, None].to(token.dtype)
    return best.sum(dim=1) / q_mask.sum(dim=1, keepdim=True).clamp(min=1).to(token.dtype)


def own_group(scores: torch.Tensor, group_size: int) -> torch.Tensor:
    """``(B, G)`` columns of each query's own group from an in-batch ``(B, B * G)`` score matrix."""
    rows = torch.arange(scores.shape[0], device=scores.device)
    return scores.view(scores.shape[0], -1, group_size)[rows, rows]


def m3_ensemble(scores: dict[str, torch.Tensor], weights: dict[str, float] | None = None) -> torch.Tensor:
    """Weighted sum of the heads' score matrices (FlagEmbedding: dense 1, sparse 0.3, colbert 1)."""
    weights = M3_ENSEMBLE_WEIGHTS if weights is None else weights
    return sum(weights[name] * value for name, value in scores.items())


def first_columns(scores: torch.Tensor, group_size: int, in_batch: bool) -> torch.Tensor:
    """Each row's positive column in a ``(B, B * G)`` in-batch or ``(B, G)`` own-group score matrix."""
    rows = torch.arange(scores.shape[0], device=scores.device)
    return rows * group_size if in_batch else torch.zeros_like(rows)
