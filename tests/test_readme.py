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
