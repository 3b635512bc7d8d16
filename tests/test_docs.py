"""Every Python code block in the README and docs runs, so the docs cannot drift from the code."""

import pathlib
import re

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
BLOCKS = [(path, i, block) for path in DOCS
          for i, block in enumerate(re.findall(r"```python\n(.*?)```", path.read_text(), flags=re.S))]


def test_docs_have_code_blocks():
    assert len(BLOCKS) >= 2


@pytest.mark.parametrize("path,index,code", BLOCKS, ids=[f"{p.name}-{i}" for p, i, _ in BLOCKS])
def test_code_block_runs(path, index, code, capsys):
    exec(compile(code, f"{path.name}[{index}]", "exec"), {})


@pytest.mark.parametrize("module", ["opinionpool", "opinionpool.symbolic"])
def test_module_docstring_examples(module):
    import doctest
    import importlib

    result = doctest.testmod(importlib.import_module(module), verbose=False)
    assert result.attempted > 0 and result.failed == 0
