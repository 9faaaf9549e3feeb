"""The README's core example runs as written (with a two-batch loader)."""

import re
from pathlib import Path

import torch

README = Path(__file__).parents[1] / "README.md"


def test_readme_resnet_example_runs(tmp_path, monkeypatch):
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert blocks, "README has no python example"
    code = blocks[0]
    monkeypatch.chdir(tmp_path)
    loader = [(torch.randn(2, 3, 32, 32), torch.randint(0, 10, (2,))) for _ in range(2)]
    ns = {"loader": loader}
    exec(compile(code, str(README), "exec"), ns)
    saved = torch.load(tmp_path / "student.pt", weights_only=True)
    assert set(saved) == set(ns["student"].state_dict())
    assert all(p.grad is None for p in ns["teacher"].parameters())
