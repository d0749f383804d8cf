"""The README's Quick start runs as printed: every ```python block of that section, in order, in
one namespace (the later blocks use the earlier ones' imports), on the installed fbfast."""

from __future__ import annotations

import pathlib
import re

import pytest

from testing import CPP

README = pathlib.Path(__file__).resolve().parent.parent / "README.md"


def _quick_start_blocks():
    text = README.read_text()
    start = text.index("## Quick start")
    end = text.index("\n## ", start + 1)
    return re.findall(r"```python\n(.*?)```", text[start:end], flags=re.S)


def test_quick_start_has_code():
    assert len(_quick_start_blocks()) >= 3


@pytest.mark.skipif(not CPP, reason="the README's figures and examples assume the compiled kernel")
def test_quick_start_runs_as_printed():
    namespace: dict = {}
    for i, block in enumerate(_quick_start_blocks()):
        exec(compile(block, f"README.md Quick start block {i + 1}", "exec"), namespace)
    # What the blocks promise in their comments.
    assert tuple(namespace["pred"].shape) == (20, 256, 17)
    assert tuple(namespace["Y"].shape) == (50, 64, 2)
    assert tuple(namespace["S"].shape) == (20, 256, 18)
    assert tuple(namespace["nxt"].shape) == (50, 64, 2)
    assert tuple(namespace["P"].shape) == (20, 7, 256, 18)
    assert tuple(namespace["Ys"].shape) == (7, 50, 32, 2)
