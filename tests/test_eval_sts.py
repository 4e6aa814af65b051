"""STS evaluation: cosine Spearman / Pearson as MTEB computes them (check 2 on the full split)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from scipy.stats import pearsonr, spearmanr

from bgekit.errors import InputError
from bgekit.eval.datasets import StsDataset, load_sts
from bgekit.eval.sts import evaluate_sts, sts_correlations

from .conftest import require_shared

ROOT = Path(__file__).resolve().parents[1]
STS_MINI = ROOT / "examples" / "data" / "stsb-test-mini.tsv"
PUBLISHED_STSB_SPEARMAN = 0.8203247283076371  # MTEB results, all-MiniLM-L6-v2, STSBenchmark test
PUBLISHED_STSB_PEARSON = 0.8274064239694425


def test_sts_equals_scipy_on_independent_cosines(minilm_dir, tmp_path):
    from bgekit import Embedder

    result = evaluate_sts(str(minilm_dir), STS_MINI, output=tmp_path / "sts.json")
    data = load_sts(STS_MINI)
    model = Embedder.from_pretrained(str(minilm_dir), normalize_embeddings=False)
    a, b = model.encode(data.sentences1), model.encode(data.sentences2)
    cosine = (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
    assert result.metrics["cosine_spearman"] == pytest.approx(spearmanr(cosine, data.scores).statistic, abs=1e-6)
    assert result.metrics["cosine_pearson"] == pytest.approx(pearsonr(cosine, data.scores).statistic, abs=1e-6)
    assert result.pairs == 197 and 0.6 < result.metrics["cosine_spearman"] < 0.95
    assert (tmp_path / "sts.md").read_text().startswith("## STS:")


def test_correlation_checks():
    with pytest.raises(InputError, match="every gold score is the same"):
        sts_correlations(np.array([0.1, 0.2, 0.3]), np.array([1.0, 1.0, 1.0]))
    with pytest.raises(InputError, match="at least 2"):
        sts_correlations(np.array([0.1]), np.array([1.0]))
    perfect = sts_correlations(np.array([0.1, 0.5, 0.9]), np.array([0.0, 2.0, 5.0]))
    assert perfect["cosine_spearman"] == pytest.approx(1.0)


def test_in_memory_dataset(minilm_dir):
    data = StsDataset(["a cat sits", "a dog runs", "stocks fell"], ["a cat is sitting", "a dog is running", "a cat"],
                      [5.0, 4.5, 0.0])  # fmt: skip
    result = evaluate_sts(str(minilm_dir), data)
    assert result.pairs == 3 and result.metrics["cosine_spearman"] == pytest.approx(1.0)


@pytest.mark.slow
def test_stsbenchmark_reproduces_mteb(minilm_dir):
    """Check 2: the full STSBenchmark test split (1,379 pairs, ~10 s on 2 CPU cores)."""
    path = require_shared("data", "stsbenchmark", "test.tsv")
    result = evaluate_sts(str(minilm_dir), path)
    assert result.pairs == 1379
    assert result.metrics["cosine_spearman"] == pytest.approx(PUBLISHED_STSB_SPEARMAN, abs=0.002)
    assert result.metrics["cosine_pearson"] == pytest.approx(PUBLISHED_STSB_PEARSON, abs=0.002)
