"""Exporting a student for deployment: ONNX (checked with onnxruntime) and int8 dynamic quantisation.

Every adapter can reuse these (torch only; ``onnx``/``onnxruntime`` imported inside the functions)::

    path = export_onnx(student, example_batch, "out/student.onnx")          # dynamic batch dimension
    export_onnx(hf_model, {"input_ids": ids, "attention_mask": mask}, "out/model.onnx",   # keyword inputs
                dynamic_axes={"input_ids": {0: "batch", 1: "sequence"}, ...})
    check_onnx(student, example_batch, path)                               # max |onnx - torch|, raises if off
    q = quantize_dynamic_int8(student)                                     # Linear/LSTM/GRU weights in int8

:func:`export_onnx` uses ``torch.onnx.export``: the ``torch.export``-based exporter when
``onnxscript`` is installed, else the TorchScript-based one (``dynamo=False``), which needs nothing
beyond torch. The graph is written in eval mode with the first input dimension named ``batch`` and
marked dynamic, so one file serves batch 1 and large batches (``dynamic_axes=`` names other dynamic
dimensions, e.g. a text model's sequence length).

:func:`quantize_dynamic_int8` is ``torch.ao.quantization.quantize_dynamic``: weights of ``nn.Linear``
(and recurrent) layers stored in int8, activations quantised on the fly; convolutions stay in float
(dynamic quantisation has no convolution kernels). It runs on the CPU.
"""

from __future__ import annotations

import copy
import warnings
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from torch import nn

from .errors import KDConfigError


def _as_tuple(example: Any) -> tuple:
    if isinstance(example, tuple):
        return example
    if isinstance(example, list):
        return tuple(example)
    return (example,)


def _forward_order(model: nn.Module, example: Mapping) -> dict:
    """The mapping's entries in the order of ``model.forward``'s parameters (the graph's input order)."""
    import inspect

    try:
        params = list(inspect.signature(model.forward).parameters)
    except (TypeError, ValueError):
        return dict(example)
    known = [k for k in params if k in example]
    return {k: example[k] for k in known + [k for k in example if k not in known]}


def export_onnx(model: nn.Module, example: Any, path: str | Path, *, input_names: Sequence[str] | None = None,
                output_names: Sequence[str] = ("logits",), opset: int = 17, dynamic_batch: bool = True,
                dynamic_axes: Mapping[str, Mapping[int, str]] | None = None) -> Path:
    """Write ``model`` (in eval mode, on the CPU, a copy: the model is not changed) as ONNX to ``path``.

    ``example``: a tensor or tuple of tensors (a real batch). Mapping inputs (Hugging Face models) are
    passed as keyword arguments, in the order of ``model.forward``'s parameters, with their keys as input
    names. ``dynamic_axes`` (input or output name -> {dimension: name}, e.g. ``{0: "batch", 1: "sequence"}``)
    replaces the default of a dynamic first dimension on every input and output.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    m = copy.deepcopy(model).cpu().eval()
    kwargs = None
    if isinstance(example, Mapping):
        kwargs = {k: v.cpu() for k, v in _forward_order(m, example).items()}
        args: tuple = ()
        names = list(input_names or kwargs)
    else:
        args = tuple(t.cpu() for t in _as_tuple(example))
        names = list(input_names or (["input"] if len(args) == 1 else [f"input{i}" for i in range(len(args))]))
    if dynamic_axes is not None:
        unknown = sorted(set(dynamic_axes) - {*names, *output_names})
        if unknown:
            raise KDConfigError(f"dynamic_axes names {unknown} are neither inputs {names} nor outputs {list(output_names)}")
        axes = {n: dict(a) for n, a in dynamic_axes.items()}
    else:
        axes = {n: {0: "batch"} for n in [*names, *output_names]} if dynamic_batch else None
    try:
        import onnxscript  # noqa: F401  -- the torch.export-based exporter needs it

        dynamo = True
    except ImportError:
        dynamo = False
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notice
        try:
            if dynamo:
                torch.onnx.export(m, args, str(path), kwargs=kwargs, input_names=names, output_names=list(output_names),
                                  opset_version=opset, dynamo=True, dynamic_axes=axes, external_data=False)
            else:
                torch.onnx.export(m, args + ((kwargs,) if kwargs else ()), str(path), input_names=names,
                                  output_names=list(output_names), opset_version=opset, dynamo=False, dynamic_axes=axes)
        except Exception as e:  # noqa: BLE001 -- one clear line naming the model and the exporter's reason
            raise KDConfigError(f"cannot export {type(model).__name__} to ONNX: {type(e).__name__}: "
                                f"{str(e).splitlines()[0] if str(e) else ''}") from e
    return path


def onnx_session(path: str | Path):
    """An onnxruntime CPU ``InferenceSession`` of ``path`` (one line if onnxruntime is missing)."""
    try:
        import onnxruntime as ort
    except ImportError as e:
        raise KDConfigError("checking an ONNX export needs onnxruntime, which is not installed",
                            hint="pip install onnxruntime") from e
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def run_onnx(path: str | Path, example: Any, session: Any = None) -> list:
    """Outputs (numpy arrays) of the ONNX model at ``path`` on ``example``."""
    sess = session or onnx_session(path)
    names = [i.name for i in sess.get_inputs()]
    if isinstance(example, Mapping):
        feeds = {k: v.cpu().numpy() for k, v in example.items() if k in names}
    else:
        feeds = {n: t.detach().cpu().numpy() for n, t in zip(names, _as_tuple(example))}
    return sess.run(None, feeds)


def compare_outputs(got: Sequence[Any], ref: Sequence[Any], names: Sequence[str], atol: float,
                    rtol: float) -> tuple[float, str | None]:
    """onnxruntime outputs ``got`` against the PyTorch outputs ``ref`` (tensors or arrays), output by output:
    the largest absolute difference over all of them, and the first problem (a count or shape that differs,
    or an output outside ``np.allclose(atol, rtol)``), or ``None`` when they agree."""
    import numpy as np

    if len(got) != len(ref):
        return float("inf"), f"{len(got)} outputs instead of {len(ref)}"
    worst, bad = 0.0, None
    for name, g, r in zip(names, got, ref):
        r = r.detach().cpu().numpy() if isinstance(r, torch.Tensor) else np.asarray(r)
        if g.shape != r.shape:
            return float("inf"), f"{name}: shape {tuple(g.shape)} instead of {tuple(r.shape)}"
        diff = float(np.max(np.abs(g - r))) if r.size else 0.0
        worst = max(worst, diff)
        if bad is None and not np.allclose(g, r, atol=atol, rtol=rtol):
            bad = f"{name} differs from PyTorch by up to {diff:.3g}"
    return worst, bad


def check_onnx(model: nn.Module, example: Any, path: str | Path, *, atol: float = 1e-4, rtol: float = 1e-3) -> float:
    """Run the export with onnxruntime and the model with PyTorch on ``example``; return the largest absolute
    difference of the first output, or raise :class:`KDConfigError` if they differ beyond the tolerances."""
    import numpy as np

    from .distiller import call_model, default_logits

    m = copy.deepcopy(model).cpu().eval()
    with torch.no_grad():
        ref = default_logits(call_model(m, {k: v.cpu() for k, v in example.items()} if isinstance(example, Mapping)
                                        else tuple(t.cpu() for t in _as_tuple(example)))).numpy()
    got = run_onnx(path, example)[0]
    if got.shape != ref.shape:
        raise KDConfigError(f"ONNX export {str(path)!r} gives shape {got.shape}, PyTorch {ref.shape}")
    diff = float(np.max(np.abs(got - ref))) if ref.size else 0.0
    if not np.allclose(got, ref, atol=atol, rtol=rtol):
        raise KDConfigError(f"ONNX export {str(path)!r} differs from PyTorch by up to {diff:.3g} (atol {atol:g})")
    return diff


def quantize_dynamic_int8(model: nn.Module) -> nn.Module:
    """An int8 dynamically quantised CPU copy (``torch.ao.quantization.quantize_dynamic`` on Linear, LSTM,
    GRU layers); the model is not changed."""
    from torch.ao.quantization import quantize_dynamic

    m = copy.deepcopy(model).cpu().eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.ao.quantization's deprecation notice
        return quantize_dynamic(m, {nn.Linear, nn.LSTM, nn.GRU}, dtype=torch.qint8)


def has_quantizable_layers(model: nn.Module) -> bool:
    return any(isinstance(m, (nn.Linear, nn.LSTM, nn.GRU)) for m in model.modules())


__all__ = ["export_onnx", "check_onnx", "compare_outputs", "run_onnx", "onnx_session", "quantize_dynamic_int8", "has_quantizable_layers"]
