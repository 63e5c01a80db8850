"""The repository README's Python example is examples/quickstart.py (the code
after its docstring) verbatim, so the example the README shows is the one
tests/test_qemu.py runs against a real guest."""

from __future__ import annotations

import ast
import re

from conftest import REPO

EXAMPLE = REPO / "sdk/python/examples/quickstart.py"


def example_code() -> str:
    src = EXAMPLE.read_text()
    doc = ast.parse(src).body[0]
    assert isinstance(doc, ast.Expr), "quickstart.py starts with its docstring"
    return "\n".join(src.splitlines()[doc.end_lineno :]).strip()


def test_the_readme_shows_the_tested_example() -> None:
    readme = (REPO / "README.md").read_text()
    blocks = [
        b.strip()
        for b in re.findall(r"```python\n(.*?)```", readme, re.S)
        if "from hyperfleet import" in b
    ]
    # Until the README has a Python example there is nothing to keep equal.
    for block in blocks:
        assert block == example_code(), (
            "README.md's Python example differs from sdk/python/examples/quickstart.py; "
            "paste the example's code (after its docstring) into the README"
        )


def test_the_example_is_valid_python() -> None:
    compile(example_code(), str(EXAMPLE), "exec")
