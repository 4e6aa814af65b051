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
    m3 = losses.distillation_m3(student.detach(), teacher, temperature=0.02)
    entropy = -(F.softmax(teacher, -1) * F.log_softmax(teacher, -1)).sum()
    assert m3.item() == pytest.approx(entropy.item(), rel=1e-5)


def test_matryoshka_and_reranker_ce():
    q, p = vectors(2, 8, 4), vectors(4, 8, 5)
    full = losses.info_nce(q, p, 2)
    assert losses.matryoshka_info_nce(q, p, 2, dims=[8]).item() == pytest.approx(full.item(), rel=1e-5)
    scores = torch.tensor([3.0, 0.0, 0.0, 0.0, 3.0, 0.0])
    expected = F.cross_entropy(scores.view(2, 3), torch.zeros(2, dtype=torch.long))
    assert losses.reranker_ce(scores, 3).item() == pytest.approx(expected.item())
