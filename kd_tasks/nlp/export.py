"""ONNX export of a distilled student (a Hugging Face encoder with its task head), checked with onnxruntime.

``kd-tasks nlp --export onnx`` writes ``<output-dir>/onnx/model.onnx``: keyword inputs ``input_ids``,
``attention_mask`` and ``token_type_ids`` (the last only when the model's ``forward`` takes it), every
input ``(batch, sequence)`` with both axes dynamic; outputs ``logits`` (classification, regression:
``(batch, labels)``; token classification: ``(batch, sequence, labels)``) or ``start_logits`` and
``end_logits`` (extractive QA: ``(batch, sequence)``). The graph is written by
:func:`kd_tasks.shared.export.export_onnx` and compared with PyTorch by onnxruntime on the example batch
and on a smaller batch of shorter sequences (so the dynamic axes are exercised); a difference beyond the
tolerances raises :class:`~kd_tasks.shared.errors.KDConfigError`.
"""

from __future__ import annotations

import copy
import inspect
import os
from typing import Any, Mapping

import torch
from torch import nn

from ..shared.errors import KDConfigError

INPUTS = ("input_ids", "attention_mask", "token_type_ids")


def output_names(task_type: str) -> tuple[str, ...]:
    return ("start_logits", "end_logits") if task_type == "qa" else ("logits",)


def onnx_inputs(model: nn.Module, batch: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The keyword inputs of the export: ``input_ids``, ``attention_mask``, and ``token_type_ids`` when the
    model takes them (zeros if the batch has none), in the order of ``model.forward``."""
    params = inspect.signature(model.forward).parameters
    if "input_ids" not in batch:
        raise KDConfigError(f"an ONNX export needs a tokenized batch with input_ids, got {sorted(batch)}")
    ids = batch["input_ids"]
    out = {}
    for name in (p for p in params if p in INPUTS):
        if name in batch:
            out[name] = batch[name]
        elif name == "attention_mask":
            out[name] = torch.ones_like(ids)
        else:
            out[name] = torch.zeros_like(ids)
    return {k: v.detach().cpu().long() for k, v in out.items()}


def _dynamic_axes(inputs: Mapping[str, Any], task_type: str) -> dict[str, dict[int, str]]:
    axes = {k: {0: "batch", 1: "sequence"} for k in inputs}
    per_token = task_type in ("token", "qa")
    for name in output_names(task_type):
        axes[name] = {0: "batch", 1: "sequence"} if per_token else {0: "batch"}
    return axes


def _smaller(inputs: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Another batch shape: at most 3 rows, sequences cut to 3/4 of their length (the last token kept as
    ``[SEP]``-like, mask set) -- a graph with a fixed batch or sequence would fail on it."""
    batch, length = inputs["input_ids"].shape
    rows, keep = max(1, min(3, batch - 1)), max(2, (3 * length) // 4)
    out = {k: v[:rows, :keep].clone() for k, v in inputs.items()}
    if keep < length:
        out["input_ids"][:, -1] = inputs["input_ids"][:rows, -1]
    return out


def _compare(model: nn.Module, path: str, inputs: Mapping[str, torch.Tensor], names: tuple[str, ...],
             session: Any, atol: float, rtol: float) -> float:
    from ..shared.export import compare_outputs, run_onnx

    with torch.no_grad():
        ref = model(**inputs)
    worst, bad = compare_outputs(run_onnx(path, inputs, session), [ref[name] for name in names], names, atol, rtol)
    if bad is not None:
        raise KDConfigError(f"ONNX export {path!r}: {bad} (atol {atol:g}, rtol {rtol:g}; inputs "
                            f"{tuple(inputs['input_ids'].shape)})")
    return worst


def export_student_onnx(model: nn.Module, batch: Mapping[str, torch.Tensor], output_dir: str, task_type: str,
                        *, opset: int = 17, atol: float = 1e-4, rtol: float = 1e-3) -> dict[str, Any]:
    """Write ``<output_dir>/onnx/model.onnx`` from ``model`` (not changed) and a tokenized example ``batch``;
    check it against PyTorch with onnxruntime. Returns what was written and the largest difference seen."""
    from ..shared.export import export_onnx, onnx_session

    m = copy.deepcopy(model).cpu().float().eval()
    inputs = onnx_inputs(m, batch)
    names = output_names(task_type)
    path = os.path.join(output_dir, "onnx", "model.onnx")
    export_onnx(m, inputs, path, output_names=names, opset=opset, dynamic_axes=_dynamic_axes(inputs, task_type))
    session = onnx_session(path)
    diff = max(_compare(m, path, inputs, names, session, atol, rtol),
               _compare(m, path, _smaller(inputs), names, session, atol, rtol))
    return {"path": os.path.abspath(path), "inputs": list(inputs), "outputs": list(names),
            "dynamic_axes": ["batch", "sequence"], "opset": opset, "max_abs_diff_vs_pytorch": diff}


__all__ = ["export_student_onnx", "onnx_inputs", "output_names"]
