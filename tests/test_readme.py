"""The README's Python examples run as written, and its two set-up commands are the ones CI uses."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text(encoding="utf-8")


def test_python_examples_run() -> None:
    blocks = re.findall(r"```python\n(.*?)```", README, flags=re.S)
    assert blocks, "README has no python example"
    for block in blocks:
        exec(compile(block, "README.md", "exec"), {})


def test_ci_runs_the_readme_test_command() -> None:
    ci = (ROOT / ".ci" / "run").read_text()
    readme_cmd = re.search(r"pip install -e \"\.\[test\]\" && (python -m pytest[^\n`]*)", README)
    assert readme_cmd, "README lacks the test command"
    assert readme_cmd.group(1).strip() in ci
    assert "emdloss demo" in README and "torch==2.13.0" in ci
