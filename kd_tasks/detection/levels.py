"""FPN levels by stride, not by position: ``neck@P3`` taps and the stride check of every term.

Detectors number their feature levels differently: a Faster R-CNN FPN returns P2-P6 (strides 4-64), a
RetinaNet or FCOS FPN P3-P7 (strides 8-128). ``neck:0`` is P2 for the first and P3 for the second, so
pairing levels by position compares maps of different strides -- and a resize connector would hide it.
Two things here prevent that:

* **Level taps.** ``<tap>@P<n>`` names the map of stride ``2**n`` on each side. :func:`resolve_level_taps`
  measures, with one blank image, the stride of every output of the tapped module (``neck@P3``: the FPN
  output of stride 8; ``bbox_head:0@P3``: the class scores of stride 8) or of every call of a module that
  runs once per level (``bbox_head.cls_convs.1@P3``: its call on the stride-8 level), and rewrites the
  tap to the index or call number found (``neck:1``, ``bbox_head.cls_convs.1#0``).
* **Stride check.** :func:`check_strides` refuses a term whose student and teacher maps have different
  strides, naming the pairing it would have used and the taps that would pair them correctly.

The stride of a map is measured as ``image side / map side`` on the blank image, whose side is a
multiple of every stride (128 by default, the largest stride of a P7 level).
"""

from __future__ import annotations

import math
import re
from dataclasses import replace
from typing import Any, Callable, Mapping, Sequence

import torch
from torch import nn

from kd_tasks.shared.errors import KDConfigError
from kd_tasks.shared.taps import FeatureTaps, TapSpec

__all__ = ["LEVEL_SUFFIX", "split_level", "has_level_taps", "resolve_level_taps", "check_strides", "level_name"]

LEVEL_SUFFIX = re.compile(r"^(?P<base>.+)@P(?P<level>\d+)$")


def split_level(spec: str) -> tuple[str, int | None]:
    """``"neck@P3"`` -> ``("neck", 3)``; a tap without a level -> ``(spec, None)``."""
    match = LEVEL_SUFFIX.match(spec) if isinstance(spec, str) else None
    if not match:
        return spec, None
    return match["base"], int(match["level"])


def level_name(stride: float) -> str:
    """``8`` -> ``"P3"``; a stride that is not a power of two -> ``"stride 12"``."""
    log = math.log2(stride) if stride > 0 else -1
    return f"P{int(round(log))}" if log >= 0 and abs(log - round(log)) < 1e-9 else f"stride {stride:g}"


def _specs(term: Mapping[str, Any], side: str) -> list[str]:
    value = term.get(side, term.get("student", "logits") if side == "teacher" else "logits")
    return [value] if isinstance(value, str) else list(value)


def has_level_taps(terms: Sequence[Any]) -> bool:
    return any(isinstance(t, Mapping) and any(split_level(s)[1] is not None for side in ("student", "teacher")
                                              for s in _specs(t, side)) for t in terms)


def _strides_of(value: Any, size: int) -> list[float] | None:
    """Strides of a 4-D map or of a list/tuple of them; ``None`` for anything else."""
    if isinstance(value, torch.Tensor) and value.dim() == 4:
        return [size / value.shape[-2]]
    if isinstance(value, (list, tuple)) and value and all(isinstance(v, torch.Tensor) and v.dim() == 4 for v in value):
        return [size / v.shape[-2] for v in value]
    return None


@torch.no_grad()
def _probe(model: nn.Module, bases: set[str], run: Callable[[], Any]) -> dict[str, list[Any]]:
    """Every call's output (after the tap's index path) of each base tap, over one forward."""
    specs = {}
    for base in bases:
        spec = TapSpec.parse(base)
        if spec.call is not None:
            raise KDConfigError(f"tap {base}@P..: give either a call number '#k' or a level '@P<n>', not both")
        specs[base] = TapSpec(spec.module, spec.path, spec.use_input, call="*")
    taps = FeatureTaps(model, specs, detach=True)
    was_training = model.training
    model.eval()
    try:
        taps.run(run)
    finally:
        model.train(was_training)
    missing = taps.missing()
    if missing:
        raise KDConfigError(f"taps {missing} did not fire during a forward of the {type(model).__name__}")
    return dict(taps.outputs)


def _resolve(base: str, level: int, calls: list[Any], size: int, side: str) -> str:
    spec = TapSpec.parse(base)
    stride = 2**level
    found: list[str] = []
    if len(calls) == 1:
        strides = _strides_of(calls[0], size)
        if isinstance(calls[0], (list, tuple)):  # one output per level (an FPN): pick the element
            for i, s in enumerate(strides or []):
                found.append(level_name(s))
                if s == stride:
                    return str(replace(spec, path=spec.path + (str(i),)))
        elif strides is not None:
            found.append(level_name(strides[0]))
            if strides[0] == stride:
                return base
    else:
        for k, value in enumerate(calls):
            strides = _strides_of(value, size)
            if strides is None or len(strides) != 1 or isinstance(value, (list, tuple)):
                raise KDConfigError(
                    f"{side} tap {base}@P{level}: {spec.module!r} runs {len(calls)} times and its output is not one "
                    "feature map per call; tap a module (or an index) that gives one map per level"
                )
            found.append(level_name(strides[0]))
            if strides[0] == stride:
                return str(replace(spec, call=k))
    if not found:
        raise KDConfigError(f"{side} tap {base}@P{level}: its output is not a feature map (or a list of them), "
                            "so it has no level; tap the neck, a head output or a head convolution")
    raise KDConfigError(
        f"{side} tap {base}@P{level}: the {side} has no level of stride {stride} there; it offers "
        f"{', '.join(found)}. Pair the levels both detectors have (e.g. P3-P6 for an FPN of P2-P6 with one of P3-P7)"
    )


def resolve_level_taps(terms: Sequence[Any], models: Mapping[str, nn.Module],
                       runs: Mapping[str, Callable[[], Any]], size: int) -> list[Any]:
    """``terms`` with every ``<tap>@P<n>`` replaced by the index or call number of stride ``2**n``.

    ``models`` / ``runs``: ``{"student": model, "teacher": model}`` and a zero-argument forward of each on
    a blank ``size`` x ``size`` image. Terms given as objects (not dicts) are returned unchanged.
    """
    wanted: dict[str, set[str]] = {"student": set(), "teacher": set()}
    for term in terms:
        if isinstance(term, Mapping):
            for side in wanted:
                for s in _specs(term, side):
                    base, level = split_level(s)
                    if level is not None:
                        wanted[side].add(base)
    if not any(wanted.values()):
        return list(terms)
    probed = {side: _probe(models[side], bases, runs[side]) if bases else {} for side, bases in wanted.items()}
    out = []
    for term in terms:
        if not isinstance(term, Mapping):
            out.append(term)
            continue
        term = dict(term)
        for side in ("teacher", "student"):  # the teacher defaults to the student's taps
            if side == "teacher" and "teacher" not in term:
                term["teacher"] = _specs(term, "teacher")
            new = []
            for s in _specs(term, side):
                base, level = split_level(s)
                new.append(s if level is None else _resolve(base, level, probed[side][base], size, side))
            term[side] = new[0] if len(new) == 1 else new
        out.append(term)
    return out


def check_strides(shapes: Mapping[str, tuple[Any, Any]], terms: Sequence[Any], size: int) -> None:
    """Refuse a term whose student and teacher feature maps have different strides.

    ``shapes``: ``{term name: (student shape, teacher shape)}`` from a blank ``size`` x ``size`` image
    (before any connector). Terms on anything other than two 4-D maps are not checked.
    """
    by_name = {(t.get("name") if isinstance(t, Mapping) else getattr(t, "name", None)): t for t in terms}
    for name, (s_shape, t_shape) in shapes.items():
        if not (isinstance(s_shape, tuple) and isinstance(t_shape, tuple) and len(s_shape) == 4 == len(t_shape)
                and all(isinstance(v, int) for v in s_shape + t_shape)):
            continue
        s_stride, t_stride = size / s_shape[-2], size / t_shape[-2]
        if s_stride == t_stride:
            continue
        term = by_name.get(name)
        s_tap = ",".join(_specs(term, "student")) if isinstance(term, Mapping) else "?"
        t_tap = ",".join(_specs(term, "teacher")) if isinstance(term, Mapping) else "?"
        raise KDConfigError(
            f"term {name!r} pairs the student's {s_tap!r} ({level_name(s_stride)}, stride {s_stride:g}) with the "
            f"teacher's {t_tap!r} ({level_name(t_stride)}, stride {t_stride:g}): the detectors number their FPN "
            f"levels differently. Name levels by stride on both sides, e.g. student '<tap>@{level_name(s_stride)}' "
            f"and teacher '<tap>@{level_name(s_stride)}' (neck@P3 = the FPN output of stride 8); to compare maps of "
            "different strides on purpose, set allow_stride_mismatch=True"
        )
