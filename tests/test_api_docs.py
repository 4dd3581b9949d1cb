"""The examples of docs/api.md run as written against a real agent, so the API documentation cannot rot."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from conftest import CONF, Lab

DOC = Path(__file__).resolve().parent.parent / "docs" / "api.md"


@pytest.mark.parametrize("marker", ["api-example-sync", "api-example-async"])
def test_documented_example_runs(lab: Lab, marker: str, capsys: pytest.CaptureFixture[str]) -> None:
    match = re.search(rf"<!-- {marker} -->\s*```python\n(.*?)\n```", DOC.read_text(), re.S)
    assert match, f"docs/api.md has no python block after <!-- {marker} -->"
    _, addr = lab.agent(CONF / "demo.yaml")
    code = match.group(1).replace('"localhost:1024"', repr(addr))
    exec(compile(code, f"docs/api.md ({marker})", "exec"), {"__name__": "__main__"})
    assert "Hello from dummy status module" in capsys.readouterr().out
