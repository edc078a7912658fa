"""The README's Python quick start runs as written."""

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_quick_start_runs():
    text = README.read_text()
    block = re.search(r"## Quick start in Python\n\n```python\n(.*?)```", text, re.S).group(1)
    ns: dict = {}
    exec(compile(block, "README quick start", "exec"), ns)
    deltas = __import__("adamhd_dist").layer_deltas(ns["opt"])
    assert "self_attn.out_proj.weight" in deltas and all(d > 0 for d in deltas.values())


def test_readme_names_exactly_two_setup_commands():
    text = README.read_text()
    setup = re.search(r"## Set up and run\n(.*?)\n## ", text, re.S).group(1)
    commands = re.findall(r"^make \w+", setup, re.M)
    assert commands == ["make run", "make test"]
