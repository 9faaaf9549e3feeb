"""The compression report at the end of ``kd-tasks face``: teacher and student through the shared report.

:func:`kd_tasks.shared.report.build_report` measures both models on a few validation faces, each in its own
view (the teacher's input size and aspect-kept crop, the student's), with the verification AUC on the
validation pairs as the metric. A teacher run outside torch -- dlib, onnxruntime -- is invisible to torch's
parameter, FLOP and memory counters; :func:`outside_torch_figures` gives what can be measured of it
instead (its files' size, an ONNX graph's parameter count) and leaves the rest unknown, and the report
then counts speed-ups by measured latency.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

NAN = float("nan")


def outside_torch_figures(teacher: nn.Module) -> dict[str, float] | None:
    """Figures of a teacher torch cannot see, or ``None`` for a PyTorch teacher (measured as usual).

    dlib: ``size_bytes`` = the model file (+ the shape predictor it aligns with), parameters unknown;
    ONNX: ``size_bytes`` = the graph file, ``params`` = the elements of its initializers. FLOPs and peak
    memory are unknown (NaN) for both."""
    from .teachers import DlibTeacher, ONNXTeacher

    if isinstance(teacher, DlibTeacher):
        files = [p for p in (teacher.model_path, teacher.shape_predictor_path) if p]
        return {"params": NAN, "size_bytes": float(sum(os.path.getsize(p) for p in files)), "flops": NAN,
                "peak_bytes": NAN}
    if isinstance(teacher, ONNXTeacher):
        return {"params": float(onnx_parameters(teacher.path)), "size_bytes": float(os.path.getsize(teacher.path)),
                "flops": NAN, "peak_bytes": NAN}
    return None


def onnx_parameters(path: str | os.PathLike) -> int:
    """Elements of an ONNX graph's initializers (its weights)."""
    import numpy as np
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    return int(sum(int(np.prod(t.dims)) if len(t.dims) else 1 for t in model.graph.initializer))


def first_images(dataset: Any, n: int) -> torch.Tensor:
    """The first ``n`` images of an ``(image, label)`` dataset as one batch."""
    return torch.stack([dataset[i][0] for i in range(min(n, len(dataset)))])


def face_compression_report(teacher: nn.Module, student: nn.Module, teacher_view: Any, student_view: Any,
                            teacher_auc: float, student_auc: float, output_dir: str | Path, *, pairs: int,
                            batch_size: int = 16, warmup: int = 1, repeats: int = 5):
    """Measure teacher and student on the first ``batch_size`` validation faces (each in its own view) and write
    ``report.md/.json/.png`` to ``output_dir``; the metric is the verification AUC on ``pairs`` validation pairs.
    Returns ``(report, paths)``. Few repeats by default: a dlib teacher takes tens of ms per face."""
    from kd_tasks.shared.report import ModelEntry, build_report

    t_example, s_example = first_images(teacher_view, batch_size), first_images(student_view, batch_size)
    student = student.eval()
    entries = [ModelEntry("teacher", teacher, "teacher", metric=teacher_auc, example=t_example,
                          measured=outside_torch_figures(teacher)),
               ModelEntry("student", student, "student", metric=student_auc)]
    notes = [f"Metric: verification AUC on {pairs} validation pairs. Teacher measured on its own view "
             f"({tuple(t_example.shape[-2:])} px), the student on its input ({tuple(s_example.shape[-2:])} px)."]
    if entries[0].measured is not None:
        notes.append(f"The teacher ({type(teacher).__name__}) runs outside torch: its size is its file(s), its "
                     "FLOPs and peak memory are not counted (n/a).")
    report = build_report(entries, s_example, metric_name="verification AUC", batch_size=batch_size, warmup=warmup,
                          repeats=repeats, notes=notes)
    return report, report.write(output_dir)
