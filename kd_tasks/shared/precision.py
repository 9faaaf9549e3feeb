"""Losses compute in float32 whatever dtype their inputs arrive in.

Under mixed precision (CUDA or CPU autocast, a bf16/fp16 teacher via ``Distiller(teacher_dtype=...)``,
a half-precision model) a loss receives float16 or bfloat16 tensors. Softmaxes, logs, norms, divisions
and the small epsilons and clamps of distillation losses are not safe there: ``clamp(min=1e-12)`` is 0 in
float16 (0/0 in a discarded ``where`` branch still poisons the gradient), a memory bank's normaliser of
1e5 overflows float16, and a teacher's softmax taken in bfloat16 moves the KD value by several per cent.

:func:`full_precision_forward` wraps a loss class's ``forward``: floating tensors narrower than float32
(in the arguments, also inside lists, tuples and dicts) are cast to float32, wider ones (float64) are
kept, autocast is switched off on the inputs' device for the duration of the loss, and a tensor result
comes back in that compute dtype. Casting is differentiable, so gradients reach the student in its own
dtype. The ``LOSSES`` registry applies it to every loss class it registers, so every task's losses
(shared, detection, face) follow one rule; a class that must see its inputs' own dtype sets
``keeps_input_dtype = True``.
"""

from __future__ import annotations

import contextlib
import functools
from typing import Any, Callable

import torch

__all__ = ["full_precision_forward", "to_compute_dtype", "autocast_off"]

_NARROW = (torch.float16, torch.bfloat16)


def to_compute_dtype(value: Any) -> Any:
    """float16/bfloat16 tensors (also inside lists, tuples and dicts) cast to float32; anything else as is."""
    if isinstance(value, torch.Tensor):
        return value.float() if value.dtype in _NARROW else value
    if isinstance(value, (list, tuple)):
        converted = [to_compute_dtype(v) for v in value]
        return type(value)(converted) if isinstance(value, list) or type(value) is tuple else value
    if isinstance(value, dict):
        return {k: to_compute_dtype(v) for k, v in value.items()}
    return value


def _first_device(values) -> torch.device | None:
    for v in values:
        if isinstance(v, torch.Tensor):
            return v.device
        if isinstance(v, (list, tuple)):
            found = _first_device(v)
            if found is not None:
                return found
    return None


def autocast_off(device: torch.device | None):
    """A context with autocast disabled on ``device`` (CPU or CUDA); a no-op elsewhere."""
    if device is not None and device.type in ("cpu", "cuda"):
        return torch.autocast(device_type=device.type, enabled=False)
    return contextlib.nullcontext()


def full_precision_forward(cls: type) -> type:
    """Wrap ``cls.forward`` as described in the module docstring (once per class; idempotent)."""
    if getattr(cls, "keeps_input_dtype", False) or "forward" not in cls.__dict__:
        return cls
    forward: Callable[..., Any] = cls.__dict__["forward"]
    if getattr(forward, "_kd_full_precision", False):
        return cls

    @functools.wraps(forward)
    def wrapped(self, *args: Any, **kwargs: Any) -> Any:
        args = tuple(to_compute_dtype(a) for a in args)
        kwargs = {k: to_compute_dtype(v) for k, v in kwargs.items()}
        with autocast_off(_first_device(list(args) + list(kwargs.values()))):
            out = forward(self, *args, **kwargs)
        if isinstance(out, torch.Tensor) and out.dtype in _NARROW:
            out = out.float()
        return out

    wrapped._kd_full_precision = True  # type: ignore[attr-defined]
    cls.forward = wrapped
    return cls
