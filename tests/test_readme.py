"""The README's Python examples run as written."""

import importlib.util
import pathlib
import re

import pytest

README = pathlib.Path(__file__).resolve().parent.parent / "README.md"
BLOCKS = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)


def test_readme_has_examples():
    assert len(BLOCKS) >= 2


@pytest.mark.parametrize("block", BLOCKS, ids=[f"block{i}" for i in range(len(BLOCKS))])
def test_readme_example_runs(block):
    # Examples of optional extras (fastrec[dask]) need them installed; the rest always run.
    for extra in ("dask",):
        if re.search(rf"^\s*(import|from) {extra}\b", block, re.M) and \
                importlib.util.find_spec(extra) is None:
            pytest.skip(f"this example needs the optional {extra!r} (pip install 'fastrec[{extra}]')")
    exec(compile(block, str(README), "exec"), {})
