"""The README's Python blocks run as written (slow: they load the shipped model and sample 256 images)."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parent.parent / "README.md"


@pytest.mark.slow
def test_readme_python_blocks_run(capsys):
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
    assert blocks, "the README has no Python block"
    for code in blocks:
        exec(compile(code, str(README), "exec"), {})  # noqa: S102 - the README's own example
    out = capsys.readouterr().out.split()
    assert 0 < float(out[0]) < 0.05 and 0 < float(out[1]) <= 0.0625  # W8A8: small error, W8A8's BOPs
