"""Export a trained face student for deployment: ONNX (insightface's input convention) and TorchScript.

The exported graphs take what insightface's recognition models take: ``(N, 3, S, S)`` float32, RGB,
``(x - 127.5) / 127.5`` (``S`` the student's input size, 112 for insightface-style students), batch
dynamic, and return the (unnormalised) ``(N, D)`` embedding. The ONNX graph has no leading
``Sub``/``Mul`` nodes, so ``insightface.model_zoo.ArcFaceONNX`` picks its 127.5 / 127.5 scaling for
it, as for its own packs. :func:`export_student` writes ``model.onnx``, ``model.torchscript.pt`` and
``input.json`` (the convention in words) next to the ``model.safetensors`` of a run.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from torch import nn

__all__ = ["export_onnx", "export_torchscript", "export_student", "INPUT_CONVENTION"]

INPUT_CONVENTION = {"layout": "NCHW", "channels": "RGB", "scaling": "(x - 127.5) / 127.5", "dtype": "float32"}


def _input_size(model: nn.Module, input_size: int | None) -> int:
    size = input_size or getattr(model, "spec", {}).get("input_size")
    if not size:
        raise ValueError("give input_size: the model has no spec with its input size")
    return int(size)


def export_onnx(model: nn.Module, path: str | os.PathLike, input_size: int | None = None, opset: int = 17) -> Path:
    """ONNX with input ``input.1`` ``(N, 3, S, S)`` (batch dynamic) and output ``embedding`` ``(N, D)``."""
    size = _input_size(model, input_size)
    was_training = model.training
    model.eval()
    try:
        torch.onnx.export(model, (torch.zeros(2, 3, size, size),), str(path), dynamo=False, opset_version=opset,
                          input_names=["input.1"], output_names=["embedding"],
                          dynamic_axes={"input.1": {0: "batch"}, "embedding": {0: "batch"}})
    finally:
        model.train(was_training)
    return Path(path)


def export_torchscript(model: nn.Module, path: str | os.PathLike, input_size: int | None = None) -> Path:
    """A traced TorchScript module (``torch.jit.load`` it; eval mode)."""
    size = _input_size(model, input_size)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            traced = torch.jit.trace(model, torch.zeros(2, 3, size, size))
        traced.save(str(path))
    finally:
        model.train(was_training)
    return Path(path)


def export_student(model: nn.Module, directory: str | os.PathLike, input_size: int | None = None) -> dict[str, str]:
    """Write ``model.onnx``, ``model.torchscript.pt`` and ``input.json`` into ``directory``."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    size = _input_size(model, input_size)
    out = {"onnx": str(export_onnx(model, directory / "model.onnx", size)),
           "torchscript": str(export_torchscript(model, directory / "model.torchscript.pt", size))}
    (directory / "input.json").write_text(json.dumps({**INPUT_CONVENTION, "size": [size, size]}, indent=1))
    return out
