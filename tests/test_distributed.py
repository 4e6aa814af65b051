"""Check 3 of the fine-tuning issue: torchrun with 2 CPU processes (gloo).

The cross-device loss (negatives gathered from both ranks, gradients kept) averaged over the
ranks equals the single-process loss on the concatenated batch, gradients included; and a
tiny model trains end to end under ``torchrun -m bgekit.train``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from bgekit.train import losses

SCRIPTS = Path(__file__).parent / "scripts"


def torchrun(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *args]
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=timeout)
    # every rank's error lines first: the launcher's own tail often shows only the survivor's
    ranks = "\n".join(line for line in result.stderr.splitlines() if "Error" in line and "[rank" in line)
    assert result.returncode == 0, ranks[-3000:] + "\n...\n" + result.stderr[-3000:]
    return result


def test_cross_device_loss_equals_single_process_loss(tmp_path):
    out = tmp_path / "loss.json"
    torchrun(str(SCRIPTS / "cross_device_loss.py"), str(out))
    distributed = json.loads(out.read_text())
    generator = torch.Generator().manual_seed(0)
    q = torch.randn(8, 16, generator=generator).requires_grad_(True)
    p = torch.randn(24, 16, generator=generator).requires_grad_(True)
    loss = losses.info_nce(F.normalize(q, dim=-1), F.normalize(p, dim=-1), 3, 0.05)
    loss.backward()
    assert distributed["loss"] == pytest.approx(loss.item(), rel=1e-6)
    # each rank's gradient is for the sum of both ranks' mean losses; DDP averages it over the 2 ranks
    torch.testing.assert_close(torch.tensor(distributed["q_grad"]) / 2, q.grad, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(torch.tensor(distributed["p_grad"]) / 2, p.grad, rtol=1e-5, atol=1e-7)


def test_torchrun_trains_a_tiny_embedder(tmp_path, tiny_bert):
    from bgekit import Embedder

    records = [{"query": f"question {i}", "pos": [f"answer {i}"], "neg": [f"other {i}"]} for i in range(16)]
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    out = tmp_path / "model"
    result = torchrun(
        "-m",
        "bgekit.train",
        "finetune",
        "embedder",
        "--model",
        str(tiny_bert),
        "--train-data",
        str(data),
        "--output-dir",
        str(out),
        "--per-device-train-batch-size",
        "2",
        "--train-group-size",
        "2",
        "--negatives-cross-device",
        "--logging-steps",
        "1",
    )
    # 16 records, 2 per device on 2 ranks: 4 steps per epoch under DDP (8 if each rank trained alone)
    assert json.loads((out / "checkpoint-4" / "trainer_state.json").read_text())["global_step"] == 4
    assert Embedder.from_pretrained(str(out)).encode(["hello"]).shape == (1, 32)
    # each line once, not once per rank: the result, and bgekit's own warnings (the tiny BERT has 128 positions)
    assert result.stderr.count(f"saved {out}") == 1, result.stderr[-3000:]
    assert result.stderr.count("passage_max_len=256 is beyond the model's 128 positions") == 1, result.stderr[-3000:]
