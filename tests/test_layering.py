"""The house rules: imports point down; adapters never import each other; shared imports no adapter."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PKG = Path(__file__).parents[1] / "kd_tasks"
ADAPTERS = ("nlp", "face", "detection")
HEAVY = ("mmdet", "mmcv", "mmengine", "transformers", "insightface", "datasets")


def imported_modules(path: Path) -> set[str]:
    """Absolute names of every module ``path`` imports (relative imports resolved)."""
    tree = ast.parse(path.read_text())
    package = ".".join(path.relative_to(PKG.parent).with_suffix("").parts[:-1])
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                out.add(".".join(base + ([node.module] if node.module else [])))
            else:
                out.add(node.module or "")
    return out


@pytest.mark.parametrize("path", sorted((PKG / "shared").rglob("*.py")), ids=lambda p: str(p.relative_to(PKG)))
def test_shared_imports_no_adapter_and_no_heavy_framework(path):
    for name in imported_modules(path):
        top = name.split(".")
        assert not (top[0] == "kd_tasks" and len(top) > 1 and top[1] in ADAPTERS + ("cli", "demo")), (path, name)
        assert top[0] not in HEAVY, (path, name)


@pytest.mark.parametrize("adapter", ADAPTERS)
def test_adapters_do_not_import_each_other(adapter):
    others = [a for a in ADAPTERS if a != adapter]
    for path in sorted((PKG / adapter).rglob("*.py")):
        for name in imported_modules(path):
            parts = name.split(".")
            assert not (parts[0] == "kd_tasks" and len(parts) > 1 and parts[1] in others), (path, name)


@pytest.mark.parametrize("adapter", ADAPTERS)
def test_importing_an_adapter_loads_no_other_adapter(adapter):
    others = [f"kd_tasks.{a}" for a in ADAPTERS if a != adapter]
    code = f"import sys, kd_tasks.{adapter}; print([m for m in sys.modules if m.split('.')[:2] in {[o.split('.') for o in others]!r}])"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[]", r.stdout
