"""The README's offline Python example runs as written."""

from __future__ import annotations

import re

from .conftest import ROOT


def test_offline_example_runs():
    text = (ROOT / "README.md").read_text()
    block = text.split("This runs as-is offline", 1)[1]
    code = re.search(r"```python\n(.*?)```", block, re.S).group(1)
    scope: dict = {}
    exec(compile(code, "README.md", "exec"), scope)
    assert scope["vectors"].shape == (2, 384) and scope["one"].shape == (384,)
    assert tuple(scope["tensor"].shape) == (1, 384)


def test_search_example_runs(tmp_path, monkeypatch):
    """The "Search and rerank in Python" example, in a scratch folder (it saves ``my-index``)."""
    text = (ROOT / "README.md").read_text()
    block = text.split("Search and rerank in Python, offline", 1)[1]
    code = re.search(r"```python\n(.*?)```", block, re.S).group(1)
    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    exec(compile(code, "README.md", "exec"), scope)
    assert len(scope["hits"]) == 2 and scope["hits"][0].id == "panda" and scope["hits"][0].rank == 1
    assert (tmp_path / "my-index" / "docs.jsonl").exists() and scope["index"].ids == ["panda", "paris", "moon"]
    assert scope["reranked"][0].id == "panda" and len(scope["reranked"]) == 2
    assert [r["corpus_id"] for r in scope["ranked"]] == [1, 0] and scope["ranked"][0]["text"] == "Pandas eat bamboo."
    assert scope["scores"].shape == (1, 2) and scope["scores"][0, 0] > scope["scores"][0, 1]
