"""The distilled detector after training: ONNX export of its tensor forward, and the compression report.

MMDetection 3.x has no ONNX exporter of its own (that lives in mmdeploy). What is exported here is the
detector's *tensor forward* (``detector._forward(inputs)``, MMDetection's ``mode="tensor"``): the raw head
outputs, e.g. for RetinaNet the classification logits and box regression deltas of every FPN level.
It is **not** an end-to-end detector graph: prior (anchor) generation, box decoding, score thresholding
and NMS are not in it; they stay in MMDetection (``bbox_head.predict_by_feat``) or in mmdeploy. The
graph is written by :func:`kd_tasks.shared.export.export_onnx` (``torch.onnx.export``, the
TorchScript-based exporter when ``onnxscript`` is not installed) and every output is compared with
PyTorch through onnxruntime (:func:`kd_tasks.shared.export.run_onnx`); a difference beyond the
tolerance is refused. An op ONNX (or onnxruntime) cannot express ends as one line naming the op.

::

    size, source = config_input_size(cfg, pad_size_divisor=32)          # (800, 1344) for a 1333x800 test resize
    example = example_input(student, size, val_dataloader)            # (1, 3, H, W), preprocessed
    info = export_detector_onnx(student, example, "work/student.onnx")  # + work/student_onnx.json

:func:`detection_report` measures teacher and student with the shared compression report
(:mod:`kd_tasks.shared.report`) on the tensor forward at the test input size, with their validation
mAP as the task metric. The two hooks that drive both after ``kd-tasks detect`` trains
(``OnnxExportHook``, ``CompressionReportHook``) are in :mod:`kd_tasks.detection.hooks`.
"""

from __future__ import annotations

import copy
import json
import math
import re
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import torch
from torch import nn

from kd_tasks.shared.errors import KDConfigError

__all__ = ["TensorForward", "config_input_size", "example_input", "export_detector_onnx", "evaluate_detector",
           "pick_metric", "detection_report", "NOT_END_TO_END"]

NOT_END_TO_END = (
    "raw head tensors of the detector's tensor forward (MMDetection mode='tensor'); NOT an end-to-end detector "
    "graph: prior/anchor generation, box decoding, score thresholding and NMS are not in it and stay in "
    "MMDetection (bbox_head.predict_by_feat) or mmdeploy"
)
STANDARD_DOMAINS = ("", "ai.onnx", "ai.onnx.ml")
MMDEPLOY_HINT = "export this detector with mmdeploy (it carries the custom ops and rewrites MMDetection needs)"


# ----------------------------------------------------------------------------- the exported module


def _flatten(output: Any, where: str = "output") -> list[torch.Tensor]:
    """The tensors of a (nested) tuple / list / dict output, in order (dicts by sorted key)."""
    if isinstance(output, torch.Tensor):
        return [output]
    if isinstance(output, Mapping):
        return [t for k in sorted(output) for t in _flatten(output[k], f"{where}[{k!r}]")]
    if isinstance(output, (tuple, list)):
        return [t for i, v in enumerate(output) for t in _flatten(v, f"{where}[{i}]")]
    raise KDConfigError(f"the detector's tensor forward returns {type(output).__name__} at {where}, not tensors",
                        hint=MMDEPLOY_HINT)


class TensorForward(nn.Module):
    """``detector._forward(inputs)`` (MMDetection's ``mode="tensor"``) with its nested outputs flattened to a
    tuple of tensors: the module that is exported. ``inputs``: images already normalised and padded as the
    detector's data preprocessor does."""

    def __init__(self, detector: nn.Module):
        super().__init__()
        self.detector = detector

    def forward(self, inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return tuple(_flatten(self.detector._forward(inputs)))


def _group_names(detector: nn.Module, count: int) -> list[str]:
    """Names of the head's output groups: the leading tensor parameters of ``bbox_head.predict_by_feat``
    (``cls_scores``, ``bbox_preds``, ``score_factors``) in the singular, else ``output0``, ``output1``, ..."""
    import inspect

    head = getattr(detector, "bbox_head", None)
    try:
        params = [p for p in inspect.signature(head.predict_by_feat).parameters if p != "self"]
    except (AttributeError, TypeError, ValueError):
        params = []
    tensor_params = []
    for p in params:
        if p in ("batch_img_metas", "cfg", "rescale", "with_nms"):
            break
        tensor_params.append(p[:-1] if p.endswith("s") else p)
    return tensor_params[:count] if len(tensor_params) >= count else [f"output{i}" for i in range(count)]


def output_layout(detector: nn.Module, raw: Any) -> list[dict[str, Any]]:
    """One entry per flattened output: ``name`` (``cls_score_p3``: group and FPN level of stride 2**3 when
    the output is a tuple of per-level lists matching the head's strides, else ``output_<i>``) and
    ``stride`` (``None`` when unknown)."""
    strides = getattr(getattr(getattr(detector, "bbox_head", None), "prior_generator", None), "strides", None)
    strides = [int(s[0] if isinstance(s, (tuple, list)) else s) for s in strides] if strides else []
    groups = raw if isinstance(raw, (tuple, list)) else None
    if (groups and strides and all(isinstance(g, (tuple, list)) and len(g) == len(strides) for g in groups)
            and all(isinstance(t, torch.Tensor) for g in groups for t in g)
            and all(s > 0 and s & (s - 1) == 0 for s in strides)):
        names = _group_names(detector, len(groups))
        return [{"name": f"{name}_p{int(math.log2(s))}", "stride": s} for name in names for s in strides]
    return [{"name": f"output_{i}", "stride": None} for i in range(len(_flatten(raw)))]


def _cpu_eval_copy(detector: nn.Module) -> nn.Module:
    """A CPU, eval-mode copy of ``detector`` with SyncBatchNorm reverted to BatchNorm (as for testing)."""
    from mmengine.model import revert_sync_batchnorm

    return revert_sync_batchnorm(copy.deepcopy(detector)).cpu().eval()


def _tensor_forward(detector: nn.Module, inputs: torch.Tensor) -> Any:
    """``detector._forward(inputs)`` without gradients. A detector whose tensor forward needs more than the
    images (two-stage and query-based detectors take per-image metadata and run proposal generation / NMS
    inside it) is refused in one line, as is one that fails on this input."""
    name = type(detector).__name__
    needs_metadata = (f"the tensor forward of {name} needs per-image metadata besides the images: two-stage and "
                      "query-based detectors run proposal generation / NMS or build masks inside it, which is not "
                      "a fixed ONNX graph")
    if getattr(detector, "roi_head", None) is not None:
        raise KDConfigError(needs_metadata, hint=MMDEPLOY_HINT)
    try:
        with torch.no_grad():
            return detector._forward(inputs)
    except Exception as e:  # noqa: BLE001 -- named in one line with the fix
        reason = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        if isinstance(e, (TypeError, AttributeError)) and ("data_samples" in reason or "NoneType" in reason):
            raise KDConfigError(f"{needs_metadata} ({reason})", hint=MMDEPLOY_HINT) from e
        raise KDConfigError(f"the tensor forward of {name} fails on an input of shape {tuple(inputs.shape)} "
                            f"({reason})", hint="export at another size (the hook's input_size=(height, width)), "
                                                "or " + MMDEPLOY_HINT) from e


# ----------------------------------------------------------------------------- input size and example


def _pipeline(dataset: Any) -> list:
    """The transforms of a dataset config, looking inside dataset wrappers (``dataset=``, ``datasets=[...]``)."""
    while isinstance(dataset, Mapping):
        if dataset.get("pipeline"):
            return list(dataset["pipeline"])
        inner = dataset.get("dataset") or (dataset.get("datasets") or [None])[0]
        dataset = inner
    return []


def _resize_of(transforms: Iterable) -> tuple[int, int] | None:
    """``(height, width)`` of the first resize transform with a fixed scale (``TestTimeAug``: its first choice).
    MMCV scales are ``(width, height)``; an int is a square."""
    for t in transforms:
        if not isinstance(t, Mapping):
            continue
        kind = str(t.get("type", "")).split(".")[-1]
        if kind == "TestTimeAug":
            for choice in t.get("transforms") or []:
                found = _resize_of(choice if isinstance(choice, (list, tuple)) else [choice])
                if found:
                    return found
        if not kind.endswith("Resize"):
            continue
        if t.get("width") and t.get("height"):  # FixShapeResize
            return int(t["height"]), int(t["width"])
        scale = t.get("scale")
        if isinstance(scale, int):
            return scale, scale
        if isinstance(scale, (tuple, list)) and len(scale) == 2 and all(isinstance(v, int) for v in scale):
            return int(scale[1]), int(scale[0])
    return None


def config_input_size(cfg: Any, pad_size_divisor: int = 1) -> tuple[tuple[int, int], str] | None:
    """``((height, width), source)`` of the detector's input at test time: the fixed scale of the resize in
    the test (else validation) pipeline, rounded up to ``pad_size_divisor`` as the data preprocessor pads.
    ``None`` when the pipelines have no fixed-scale resize."""
    for key in ("test_dataloader", "val_dataloader"):
        loader = cfg.get(key) if cfg is not None else None
        if not isinstance(loader, Mapping):
            continue
        size = _resize_of(_pipeline(loader.get("dataset")))
        if size:
            d = max(1, int(pad_size_divisor or 1))
            padded = tuple(int(math.ceil(v / d) * d) for v in size)
            return padded, f"{key} resize scale {size[1]}x{size[0]} (w x h), padded to a multiple of {d}"
    return None


def example_input(detector: nn.Module, size: tuple[int, int] | None, dataloader: Any = None,
                  seed: int = 0) -> torch.Tensor:
    """One preprocessed image ``(1, 3, H, W)`` of ``size``: the first image of ``dataloader`` through the
    detector's data preprocessor, padded with zeros (the preprocessor's own padding) or cropped to ``size``;
    without a dataloader a seeded standard-normal image. ``size=None`` keeps the loader's own shape."""
    image = None
    if dataloader is not None:
        batch = next(iter(dataloader))
        preprocessor = getattr(detector, "data_preprocessor", None)
        with torch.no_grad():
            data = preprocessor(batch, False) if preprocessor is not None else batch
        inputs = data["inputs"]
        image = (inputs[:1] if isinstance(inputs, torch.Tensor) else inputs[0][None]).float().cpu()
    if image is None:
        if size is None:
            raise KDConfigError("the detector's test input size is unknown: no fixed-scale resize in the test "
                                "pipeline and no validation data", hint="give input_size=(height, width) to the hook")
        return torch.randn(1, 3, *size, generator=torch.Generator().manual_seed(seed))
    if size is None:
        return image.contiguous()
    h, w = size
    image = image[..., :h, :w]
    return torch.nn.functional.pad(image, (0, w - image.shape[-1], 0, h - image.shape[-2])).contiguous()


# ----------------------------------------------------------------------------- ONNX


def _unsupported_op(error: BaseException) -> str | None:
    """The op named by a ``torch.onnx`` export error (``'aten::fft_fft2'``), if any."""
    for e in (error, error.__cause__):
        if e is None:
            continue
        text = str(e)
        match = re.search(r"operator '([^']+)'", text) or re.search(r"\b((?:aten|prim|mmcv|torchvision)::\w+)", text)
        if match:
            return match.group(1)
    return None


def _custom_ops(path: Path) -> list[str]:
    """``domain::op`` of every node outside the standard ONNX domains (e.g. ``mmcv::MMCVDeformConv2d``):
    onnxruntime runs none of them without the library that defines them."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    return sorted({f"{n.domain}::{n.op_type}" for n in model.graph.node if n.domain not in STANDARD_DOMAINS})


def export_detector_onnx(detector: nn.Module, example: torch.Tensor, path: str | Path, *, atol: float = 1e-3,
                         rtol: float = 1e-3, opset: int = 17, meta: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Export ``detector``'s tensor forward (:class:`TensorForward`) to ``path`` and check it.

    The graph takes ``input`` (``(batch, 3, height, width)``, images normalised and padded as the detector's
    data preprocessor does) and returns the flattened head outputs (names from :func:`output_layout`).
    Batch, height and width are dynamic when the graph reproduces PyTorch at a second shape (batch 2, half
    the size); otherwise the graph is written again with the example's fixed shape. Every output is compared
    with PyTorch through onnxruntime at the example: beyond ``atol`` + ``rtol`` x |reference| the file is
    removed and :class:`KDConfigError` raised. An op ONNX cannot express, or a custom-domain op onnxruntime
    cannot run, is named in one line. Writes ``<stem>_onnx.json`` next to the file (inputs, outputs, what the
    graph is and is not, the measured difference, ``meta``); returns that record.
    """
    from kd_tasks.shared.export import compare_outputs, export_onnx, run_onnx

    path = Path(path)
    example = example.detach().float().cpu()
    if example.dim() != 4:
        raise KDConfigError(f"a detector's ONNX example is a (batch, 3, height, width) tensor, got "
                            f"{tuple(example.shape)}")
    detector = _cpu_eval_copy(detector)
    raw = _tensor_forward(detector, example)
    reference = _flatten(raw)
    layout = output_layout(detector, raw)
    names = [o["name"] for o in layout]
    module = TensorForward(detector).eval()

    def write(dynamic: bool) -> None:
        axes = {"input": {0: "batch", 2: "height", 3: "width"}} if dynamic else {}
        if dynamic:
            axes.update({n: {0: "batch", **{d: f"{n}_dim{d}" for d in range(2, t.dim())}}
                         for n, t in zip(names, reference)})
        try:
            export_onnx(module, example, path, input_names=["input"], output_names=names, opset=opset,
                        dynamic_axes=axes)
        except KDConfigError as e:
            op = _unsupported_op(e)
            if op is None:
                raise KDConfigError(f"cannot export the tensor forward of {type(detector).__name__} to ONNX: {e}",
                                    hint=MMDEPLOY_HINT) from e
            raise KDConfigError(f"cannot export {type(detector).__name__} to ONNX: the op {op} has no ONNX form "
                                f"(opset {opset})", hint=MMDEPLOY_HINT) from e
        custom = _custom_ops(path)
        if custom:
            path.unlink()
            raise KDConfigError(f"cannot export {type(detector).__name__} to plain ONNX: the op(s) {', '.join(custom)} "
                                "are custom ops onnxruntime cannot run", hint=MMDEPLOY_HINT)

    write(dynamic=True)
    dynamic, why_static = True, None
    second = _second_shape(example)
    try:
        ref2 = _flatten(_tensor_forward(detector, second))
        _, bad2 = compare_outputs(run_onnx(path, second), ref2, names, atol, rtol)
    except Exception as e:  # noqa: BLE001 -- a graph that bakes in its shapes: written again with fixed ones
        bad2 = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    if bad2 is not None:
        dynamic, why_static = False, f"at shape {tuple(second.shape)} the dynamic graph gave {bad2}"
        write(dynamic=False)
    worst, bad = compare_outputs(run_onnx(path, example), reference, names, atol, rtol)
    if bad is not None:
        path.unlink()
        raise KDConfigError(f"the ONNX export of {type(detector).__name__} differs from PyTorch beyond the tolerance "
                            f"(atol {atol:g}, rtol {rtol:g}): {bad}; largest difference {worst:.3g}; "
                            f"{path.name} removed",
                            hint="raise the hook's atol/rtol if this difference is acceptable, or export with mmdeploy")
    return _write_record(path, detector, example, reference, layout, worst, atol, rtol, opset, dynamic,
                         why_static, meta)


def _second_shape(example: torch.Tensor) -> torch.Tensor:
    """A batch of 2 at about half the example's height and width (multiples of 32, at least 32)."""
    h, w = (max(32, (s // 2) // 32 * 32) for s in example.shape[-2:])
    return example.repeat(2, 1, 1, 1)[..., :h, :w].contiguous()


def _preprocessing(detector: nn.Module) -> dict[str, Any]:
    """What the graph's input must already be: the detector's data preprocessor settings."""
    pre = getattr(detector, "data_preprocessor", None)
    out: dict[str, Any] = {"type": type(pre).__name__ if pre is not None else None}
    for key, attr in (("mean", "mean"), ("std", "std")):
        value = getattr(pre, attr, None)
        if isinstance(value, torch.Tensor):
            out[key] = [round(float(v), 6) for v in value.flatten()]
    out["bgr_to_rgb"] = bool(getattr(pre, "_channel_conversion", False))
    out["pad_size_divisor"] = int(getattr(pre, "pad_size_divisor", 1) or 1)
    out["pad_value"] = float(getattr(pre, "pad_value", 0) or 0)
    return out


def _write_record(path: Path, detector: nn.Module, example: torch.Tensor, reference: Sequence[torch.Tensor],
                  layout: Sequence[dict], worst: float, atol: float, rtol: float, opset: int, dynamic: bool,
                  why_static: str | None, meta: Mapping[str, Any] | None) -> dict[str, Any]:
    import onnxruntime

    record = {
        "file": path.name,
        "graph": NOT_END_TO_END,
        "detector": type(detector).__name__,
        "input": {"name": "input", "shape": list(example.shape), "dtype": "float32",
                  "dynamic_axes": ["batch", "height", "width"] if dynamic else [],
                  "expects": "images already normalised (and padded) as the data preprocessor below does",
                  "preprocessing": _preprocessing(detector)},
        "outputs": [dict(o, shape=list(t.shape)) for o, t in zip(layout, reference)],
        "check": {"max_abs_diff": worst, "atol": atol, "rtol": rtol,
                  "runtime": f"onnxruntime {onnxruntime.__version__}"},
        "opset": opset,
        "exporter": f"torch.onnx.export (torch {torch.__version__})",
        **({"static_because": why_static} if why_static else {}),
        **({"meta": dict(meta)} if meta else {}),
    }
    record_path = path.with_name(f"{path.stem}_onnx.json")
    record_path.write_text(json.dumps(record, indent=2, default=str) + "\n")
    return record


# ----------------------------------------------------------------------------- evaluation and report


@torch.no_grad()
def evaluate_detector(detector: nn.Module, dataloader: Any, evaluator: Any) -> dict[str, float]:
    """One validation pass of ``detector`` (its own data preprocessor, ``val_step``) through an MMEngine
    ``Evaluator``, as MMEngine's ``ValLoop`` does; under ``torch.distributed`` every process must call it
    (the evaluator gathers the results of all of them)."""
    was = detector.training
    detector.eval()
    try:
        for batch in dataloader:
            evaluator.process(data_samples=detector.val_step(batch), data_batch=batch)
        return dict(evaluator.evaluate(len(dataloader.dataset)))
    finally:
        detector.train(was)


METRIC_SUFFIXES = ("bbox_mAP", "/mAP", "mAP")


def pick_metric(metrics: Mapping[str, Any], key: str | None = None) -> tuple[str | None, float | None]:
    """``(key, value)`` of the detection metric in a validation result: ``key`` if given, else the first of
    ``*bbox_mAP`` (COCO), ``*/mAP`` (VOC), ``*mAP``. An empty result (MMDetection's COCO metric returns none
    when the model made no detection above its score threshold, or with ``format_only``) gives
    ``(key, None)``: no value is made up. A result without the metric is refused in one line."""
    if not metrics:
        return key, None
    if key is not None:
        if key not in metrics:
            raise KDConfigError(f"metric {key!r} is not among the validation results {sorted(metrics)}",
                                hint="give one of those as the report's metric_key")
        return key, float(metrics[key])
    for suffix in METRIC_SUFFIXES:
        for k, v in metrics.items():
            if k.endswith(suffix) and isinstance(v, (int, float)):
                return k, float(v)
    raise KDConfigError(f"no mAP among the validation results {sorted(metrics)}",
                        hint="give the metric's name as the report's metric_key")


def detection_report(student: nn.Module, teacher: nn.Module, example: torch.Tensor, out_dir: str | Path, *,
                     student_metric: float | None, teacher_metric: float | None, metric_name: str = "bbox mAP",
                     notes: Sequence[str] = (), batch_size: int = 2, warmup: int = 2, repeats: int = 10,
                     stem: str = "report"):
    """Teacher and student rows of the shared compression report (:func:`kd_tasks.shared.report.build_report`),
    measured on their tensor forward (``model(inputs)`` is ``mode="tensor"``) at ``example``'s size, on the
    models' device: params, FLOPs per image, size on disk, latency, throughput and peak memory at
    ``batch_size``. A metric of ``None`` is left empty (NaN, and so the share kept and the figure of merit
    that depend on it); ``notes`` say why. Writes ``<stem>.md/.json/.png`` in ``out_dir`` (no plot when
    neither metric is known); returns ``(report, paths)``."""
    from kd_tasks.shared.report import ModelEntry, build_report

    def value(metric: float | None) -> float:
        return float("nan") if metric is None else float(metric)

    entries = [ModelEntry("teacher", teacher, "teacher", metric=value(teacher_metric)),
               ModelEntry("student (distilled)", student, "student", metric=value(student_metric))]
    h, w = example.shape[-2:]
    lines = [f"Measured on the tensor forward (backbone, neck and head up to the raw head outputs; box decoding "
             f"and NMS not included) at the test input size {h}x{w} (height x width)."]
    plot = any(math.isfinite(e.metric) for e in entries)  # the plot is metric against cost: nothing to draw
    if not plot:
        lines.append(f"No {stem}.png: neither model has a metric.")
    rep = build_report(entries, example, metric_name=metric_name, batch_size=batch_size, warmup=warmup,
                       repeats=repeats, notes=[*lines, *notes])
    return rep, rep.write(out_dir, stem, plot=plot)
