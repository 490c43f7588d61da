"""The README's Python examples run as written (blocks fenced as ```python; ```python notest needs downloads)."""

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
BLOCKS = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_readme_python_example_runs(index):
    assert BLOCKS, "the README lost its Python examples"
    exec(compile(BLOCKS[index], f"README.md block {index}", "exec"), {})
