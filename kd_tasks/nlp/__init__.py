"""BERT-family compression with Hugging Face ``transformers`` (install ``kd-tasks[nlp]``).

``transformers`` is imported only when one of these names is first used, so importing
``kd_tasks.nlp`` stays cheap:

* :class:`DistillationTrainer` (alias :class:`KDTrainer`; not trl's), :class:`KDArguments` (``kd_tasks.nlp.trainer``)
* :class:`DistillationArguments` (``TrainingArguments`` + the distillation options, ``kd_tasks.nlp.arguments``)
* :class:`WordReplacer` (TinyBERT augmentation, ``kd_tasks.nlp.augment``)
* :func:`extract_student`, :func:`narrow_student`, :func:`load_model` (``kd_tasks.nlp.extract``)
* :func:`build_layer_map` (``kd_tasks.nlp.layer_map``)
* :func:`load_raw`, :func:`task_spec`, :func:`tokenize`, :func:`check_tokenizers`, :class:`KDCollator`
  (``kd_tasks.nlp.data``)
* :func:`task_metrics`, :func:`build_report` (``kd_tasks.nlp.report``)
* :func:`main` (``kd_tasks.nlp.distill``, the ``kd-tasks nlp`` command)
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "DistillationTrainer": "trainer",
    "KDTrainer": "trainer",
    "KDArguments": "trainer",
    "DistillationArguments": "arguments",
    "WordReplacer": "augment",
    "extract_student": "extract",
    "narrow_student": "extract",
    "load_model": "extract",
    "STUDENT_SHAPES": "extract",
    "build_layer_map": "layer_map",
    "load_raw": "data",
    "task_spec": "data",
    "tokenize": "data",
    "check_tokenizers": "data",
    "KDCollator": "data",
    "TokenizerMismatchError": "data",
    "task_metrics": "report",
    "build_report": "report",
    "main": "distill",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
