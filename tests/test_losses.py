"""Losses: InfoNCE against a hand computation, group-only negatives, distillation, reranker CE."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from bgekit.train import losses


def vectors(n, d, seed):
    return F.normalize(torch.randn(n, d, generator=torch.Generator().manual_seed(seed)), dim=-1)


def test_info_nce_matches_a_hand_computation():
    q, p = vectors(2, 8, 0), vectors(6, 8, 1)  # 2 queries, groups of 3
    loss = losses.info_nce(q, p, group_size=3, temperature=0.05)
    by_hand = 0.0
    for i in range(2):
        logits = [float(q[i] @ p[j]) / 0.05 for j in range(6)]
        by_hand += -logits[3 * i] + math.log(sum(math.exp(x) for x in logits))
    assert loss.item() == pytest.approx(by_hand / 2, rel=1e-5)


def test_without_in_batch_negatives_only_the_group_counts():
    q, p = vectors(2, 8, 0), vectors(6, 8, 1)
    loss = losses.info_nce(q, p, group_size=3, temperature=0.05, in_batch=False)
    manual = F.cross_entropy(torch.stack([p[0:3] @ q[0], p[3:6] @ q[1]]) / 0.05, torch.zeros(2, dtype=torch.long))
    assert loss.item() == pytest.approx(manual.item(), rel=1e-6)


def test_cross_device_is_in_batch_in_one_process():
    q, p = vectors(3, 8, 2), vectors(6, 8, 3)
    assert losses.info_nce(q, p, 2, cross_device=True).item() == pytest.approx(losses.info_nce(q, p, 2).item())


def test_distillation_is_zero_gradient_at_the_teacher_distribution():
    teacher = torch.tensor([[2.0, 0.5, -1.0]])
    student = (teacher * 0.02).clone().requires_grad_(True)  # student / temperature == teacher
    losses.distillation_kl(student, teacher, temperature=0.02).backward()
    assert student.grad.abs().max().item() < 1e-5
    assert losses.distillation_kl(torch.zeros(1, 3), teacher).item() > 0
    m3 = losses.soft_cross_entropy(student.detach(), teacher, temperature=0.02)
    entropy = -(F.softmax(teacher, -1) * F.log_softmax(teacher, -1)).sum()
    assert m3.item() == pytest.approx(entropy.item(), rel=1e-5)


def test_matryoshka_and_reranker_ce():
    q, p = vectors(2, 8, 4), vectors(4, 8, 5)
    full = losses.info_nce(q, p, 2)
    assert losses.embedding_loss(q, p, 2, matryoshka_dims=[8]).item() == pytest.approx(full.item(), rel=1e-5)
    scores = torch.tensor([3.0, 0.0, 0.0, 0.0, 3.0, 0.0])
    expected = F.cross_entropy(scores.view(2, 3), torch.zeros(2, dtype=torch.long))
    assert losses.reranker_ce(scores, 3).item() == pytest.approx(expected.item())


def m3_kd_by_hand(logits: list[list[float]], teacher: list[list[float]], group_size: int) -> float:
    """FlagEmbedding 1.4.2's ``distill_loss("m3_kd_loss", ...)`` on in-batch logits, written out:
    for member i of each row's group, the CE of its column among the row's columns minus the group's
    members before i, weighted by the teacher's softmax probability of i; means over rows, summed over i."""
    total = 0.0
    for i in range(group_size):
        per_row = []
        for row, values in enumerate(logits):
            probs = [math.exp(t) / sum(math.exp(u) for u in teacher[row]) for t in teacher[row]]
            first = row * group_size
            kept = [v for j, v in enumerate(values) if not first <= j < first + i]
            ce = -values[first + i] + math.log(sum(math.exp(v) for v in kept))
            per_row.append(probs[i] * ce)
        total += sum(per_row) / len(per_row)
    return total


def test_m3_kd_loss_is_flagembeddings():
    q, p = vectors(2, 8, 6), vectors(6, 8, 7)
    teacher = torch.tensor([[3.0, 1.0, -2.0], [0.5, 2.0, 0.0]])
    loss = losses.embedding_loss(q, p, 3, 0.05, teacher, "m3_kd_loss")
    logits = ((q @ p.T) / 0.05).tolist()
    assert loss.item() == pytest.approx(m3_kd_by_hand(logits, teacher.tolist(), 3), rel=1e-5)
    # it replaces InfoNCE: a one-hot teacher gives InfoNCE itself (FlagEmbedding: 7.849 == InfoNCE)
    one_hot = torch.tensor([[0.0, -math.inf, -math.inf]] * 2)
    assert losses.embedding_loss(q, p, 3, 0.05, one_hot, "m3_kd_loss").item() == pytest.approx(
        losses.info_nce(q, p, 3, 0.05).item(), rel=1e-6
    )
    # own-group only (no in-batch negatives): the same formula on the (B, G) matrix
    local = losses.embedding_loss(q, p, 3, 0.05, teacher, "m3_kd_loss", in_batch=False)
    groups = [[float(q[r] @ p[3 * r + j]) / 0.05 for j in range(3)] for r in range(2)]
    by_hand = (
        sum(m3_kd_by_hand([groups[r]], [teacher.tolist()[r]], 3) for r in range(2)) / 2
    )  # rows of one query each, averaged
    assert local.item() == pytest.approx(by_hand, rel=1e-5)


def test_kl_div_adds_group_kl_to_info_nce():
    q, p = vectors(2, 8, 8), vectors(6, 8, 9)
    teacher = torch.tensor([[3.0, 1.0, -2.0], [0.5, 2.0, 0.0]])
    groups = torch.stack([p[0:3] @ q[0], p[3:6] @ q[1]])
    expected = losses.info_nce(q, p, 3, 0.05) + losses.distillation_kl(groups, teacher, 0.05)
    assert losses.embedding_loss(q, p, 3, 0.05, teacher, "kl_div").item() == pytest.approx(expected.item(), rel=1e-5)
    # Matryoshka distils at every dimension, as FlagEmbedding's MRL
    dims = losses.embedding_loss(q, p, 3, 0.05, teacher, "kl_div", matryoshka_dims=[4, 8])
    four = losses.embedding_loss(F.normalize(q[:, :4], dim=-1), F.normalize(p[:, :4], dim=-1), 3, 0.05, teacher)
    assert dims.item() == pytest.approx(((four + expected) / 2).item(), rel=1e-5)


def test_reranker_distillation_is_flagembeddings():
    """FlagEmbedding's reranker loss with teacher scores: group CE + soft CE against softmax(teacher)."""
    scores = torch.tensor([2.0, 0.5, -1.0, 0.0, 1.0, 3.0])
    teacher = torch.tensor([[1.0, 2.0, 0.0], [0.0, 0.0, 5.0]])
    by_hand = 0.0
    for row in range(2):
        logits = scores[3 * row : 3 * row + 3].tolist()
        log_z = math.log(sum(math.exp(x) for x in logits))
        probs = [math.exp(t) / sum(math.exp(u) for u in teacher[row].tolist()) for t in teacher[row].tolist()]
        by_hand += (log_z - logits[0]) + sum(-p * (x - log_z) for p, x in zip(probs, logits, strict=True))
    assert losses.reranker_loss(scores, 3, teacher).item() == pytest.approx(by_hand / 2, rel=1e-5)
    assert losses.reranker_loss(scores, 3).item() == pytest.approx(losses.reranker_ce(scores, 3).item())
