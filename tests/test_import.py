"""Check 5: ``import bgekit`` (and the CLI's help) load no torch, transformers or extras."""

from __future__ import annotations

import json
import subprocess
import sys

HEAVY = [
    "torch",
    "transformers",
    "tokenizers",
    "numpy",
    "sentence_transformers",
    "huggingface_hub",
    "faiss",
    "fastapi",
    "uvicorn",
    "peft",
    "scipy",
    "pytrec_eval",
    "ranx",
    "mteb",
    "datasets",
    "prometheus_client",
    "starlette",
    "openai",
]


def loaded_after(code: str) -> list[str]:
    probe = f"import sys, json\n{code}\nprint(json.dumps(sorted(m for m in {HEAVY!r} if m in sys.modules)))"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_import_bgekit_is_light():
    assert loaded_after("import bgekit; bgekit.__version__; bgekit.InputError") == []


def test_search_names_are_light():
    """``bgekit.SearchIndex`` and ``bgekit.Hit`` resolve without torch or faiss (they load when an index is built)."""
    assert loaded_after("import bgekit; bgekit.SearchIndex; bgekit.Hit") == []


def test_cli_help_and_models_are_light():
    code = (
        "from typer.testing import CliRunner\nfrom bgekit.cli import app\n"
        "r = CliRunner().invoke(app, ['models'])\nassert r.exit_code == 0, r.output\n"
        "assert 'BAAI/bge-m3' in r.output\n"
    )
    assert loaded_after(code) == []


def test_import_bgekit_eval_and_its_cli_help_are_light():
    code = (
        "import bgekit.eval\nbgekit.eval.__all__\n"
        "from typer.testing import CliRunner\nfrom bgekit.cli import app\n"
        "for args in (['eval', '--help'], ['eval', 'retrieval', '--help'], ['eval', 'mteb', '--help'], "
        "['index', 'build', '--help'], ['search', '--help']):\n"
        "    r = CliRunner().invoke(app, args)\n    assert r.exit_code == 0, r.output\n"
    )
    assert loaded_after(code) == []


def test_import_bgekit_serve_and_serve_help_are_light():
    code = (
        "import bgekit.serve, bgekit.serve.cli\n"
        "from typer.testing import CliRunner\nfrom bgekit.cli import app\n"
        "r = CliRunner().invoke(app, ['serve', '--help'])\nassert r.exit_code == 0, r.output\n"
        "assert 'BGEKIT_MODEL' in r.output, r.output\n"
    )
    assert loaded_after(code) == []


def test_lazy_names_resolve():
    import bgekit

    assert bgekit.FlagModel.__name__ == "FlagModel"
    assert set(bgekit.__all__) >= {"FlagModel", "FlagReranker", "FlagAutoModel", "FlagAutoReranker", "Embedder"}


def test_core_install_can_train():
    """`bgekit finetune` runs on transformers' Trainer, which refuses to start without accelerate: a plain
    `pip install bgekit` must bring it (it came only through peft, in the lora/dev extras), at a version the
    installed transformers accepts."""
    import tomllib
    from pathlib import Path

    from packaging.requirements import Requirement
    from transformers.dependency_versions_table import deps

    pyproject = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())
    core = {Requirement(spec).name: Requirement(spec) for spec in pyproject["project"]["dependencies"]}
    assert "accelerate" in core, "accelerate is missing from the core dependencies"
    needed = Requirement(deps["accelerate"]).specifier
    floor = next(s.version for s in core["accelerate"].specifier if s.operator == ">=")
    assert needed.contains(floor), f"bgekit allows accelerate {floor}, transformers needs {needed}"


def test_core_floors_are_the_oldest_transformers_own():
    """Where bgekit and transformers share a dependency, bgekit's floor is not below the one its oldest
    supported transformers needs (huggingface_hub>=0.30 and tokenizers>=0.21 were declared, which no
    transformers 5 installs with). Checked where that oldest transformers is installed (make test-oldest)."""
    import tomllib
    from pathlib import Path

    import pytest
    import transformers
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name
    from packaging.version import Version
    from transformers.dependency_versions_table import deps

    pyproject = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())
    core = {canonicalize_name(Requirement(s).name): Requirement(s) for s in pyproject["project"]["dependencies"]}
    oldest = next(s.version for s in core["transformers"].specifier if s.operator == ">=")
    if Version(transformers.__version__) != Version(oldest):
        pytest.skip(f"needs transformers {oldest} (the oldest bgekit supports), found {transformers.__version__}")
    theirs = {canonicalize_name(Requirement(s).name): Requirement(s) for s in deps.values()}
    for name in ("huggingface-hub", "tokenizers", "safetensors", "accelerate"):
        floor = next(s.version for s in core[name].specifier if s.operator == ">=")
        assert theirs[name].specifier.contains(floor), (
            f"bgekit allows {name} {floor}, transformers {oldest} needs {theirs[name]}"
        )
