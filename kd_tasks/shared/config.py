"""Recipes as data: load a plain dict, a YAML/JSON file or a Python config file.

A Python config is a file of assignments (as in MMEngine): every public top-level name that is a
plain value becomes a key. A recipe's ``distill`` section builds a
:class:`~kd_tasks.shared.distiller.Distiller`::

    distill:
      task_loss: cross_entropy
      task_weight: 0.1
      terms:
        - {name: kd, loss: {type: kd, temperature: 4}, weight: 0.9}
        - {name: at, loss: at, student: layer2, teacher: layer3}

Unknown keys are rejected with the closest valid names, so a typo never silently falls back to a default.
"""

from __future__ import annotations

import json
import os
import runpy
from pathlib import Path
from typing import Any, Iterable, Mapping

import torch
from torch import nn

from .errors import KDConfigError, suggest

TASK_LOSSES = {
    "cross_entropy": nn.CrossEntropyLoss,
    "ce": nn.CrossEntropyLoss,
    "mse": nn.MSELoss,
    "bce_with_logits": nn.BCEWithLogitsLoss,
    "none": None,
}

DTYPES = {"fp32": None, "float32": None, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
          "fp16": torch.float16, "float16": torch.float16}


def load_config(source: str | os.PathLike | Mapping[str, Any]) -> dict[str, Any]:
    """Read a recipe from a dict, ``.yaml``/``.yml``, ``.json`` or ``.py`` file."""
    if isinstance(source, Mapping):
        return dict(source)
    path = Path(source)
    if not path.is_file():
        raise KDConfigError(f"config file {str(path)!r} does not exist; give the path of a .yaml, .json or .py recipe")
    suffix = path.suffix.lower()
    if suffix in (".yaml", ".yml"):
        import yaml

        try:
            data = yaml.safe_load(path.read_text())
        except yaml.YAMLError as e:
            raise KDConfigError(f"config {str(path)!r} is not valid YAML: {e}") from e
    elif suffix == ".json":
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise KDConfigError(f"config {str(path)!r} is not valid JSON: {e}") from e
    elif suffix == ".py":
        ns = runpy.run_path(str(path))
        data = {k: v for k, v in ns.items() if not k.startswith("_") and _plain(v)}
    else:
        raise KDConfigError(f"config {str(path)!r}: unknown format {suffix!r}; use .yaml, .yml, .json or .py")
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise KDConfigError(f"config {str(path)!r} must hold a mapping at top level, got {type(data).__name__}")
    return data


def _plain(v: Any) -> bool:
    return isinstance(v, (dict, list, tuple, str, int, float, bool)) or v is None


def check_keys(cfg: Mapping[str, Any], allowed: Iterable[str], where: str) -> None:
    """Raise :class:`KDConfigError` for the first key of ``cfg`` not in ``allowed``."""
    allowed = list(allowed)
    for key in cfg:
        if key not in allowed:
            raise KDConfigError(f"{where}: {suggest(str(key), allowed, 'key')}")


def resolve_task_loss(spec: Any) -> Any:
    """``"cross_entropy"`` -> ``nn.CrossEntropyLoss()``; modules and callables pass through."""
    if spec is None or callable(spec):
        return spec
    if isinstance(spec, str):
        if spec not in TASK_LOSSES:
            raise KDConfigError(f"task_loss: {suggest(spec, TASK_LOSSES, 'task loss')}")
        cls = TASK_LOSSES[spec]
        return cls() if cls is not None else None
    raise KDConfigError(f"task_loss must be a name ({', '.join(TASK_LOSSES)}) or a callable, got {spec!r}")


def resolve_dtype(spec: Any) -> torch.dtype | None:
    if spec is None or isinstance(spec, torch.dtype):
        return spec
    if spec not in DTYPES:
        raise KDConfigError(f"teacher_dtype: {suggest(str(spec), DTYPES, 'dtype')}")
    return DTYPES[spec]


DISTILL_KEYS = ("scheme", "terms", "task_loss", "task_weight", "teacher_dtype", "check_finite")


def distiller_from_config(cfg: Mapping[str, Any], student: nn.Module, teacher: nn.Module | None):
    """Build the offline :class:`Distiller` from a recipe's ``distill`` section (or the whole recipe)."""
    from .distiller import Distiller

    section = dict(cfg.get("distill", cfg)) if isinstance(cfg, Mapping) else {}
    check_keys(section, DISTILL_KEYS, "distill section")
    scheme = section.pop("scheme", "offline")
    if scheme != "offline":
        raise KDConfigError(
            f"distiller_from_config builds the offline scheme; scheme {scheme!r} is built by "
            "kd_tasks.shared.schemes (SCHEMES registry)"
        )
    if "terms" not in section:
        raise KDConfigError("distill section has no 'terms'; e.g. terms: [{name: kd, loss: {type: kd, temperature: 4}}]")
    return Distiller(
        student,
        teacher,
        terms=section["terms"],
        task_loss=resolve_task_loss(section.get("task_loss", "cross_entropy")),
        task_weight=section.get("task_weight", 1.0),
        teacher_dtype=resolve_dtype(section.get("teacher_dtype")),
        check_finite=section.get("check_finite", True),
    )
