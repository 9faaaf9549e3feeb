"""Weight schedules for loss terms: the balancing of terms kept apart from the terms themselves.

A weight is a number or a schedule config::

    0.5
    {"schedule": "linear", "start": 0.0, "end": 1.0, "steps": 1000}        # warm-up ramp
    {"schedule": "cosine", "start": 1.0, "end": 0.1, "steps": 5000}
    {"schedule": "step", "values": [1.0, 0.5, 0.1], "milestones": [1000, 3000]}

``Schedule(step) -> float``. Steps past ``steps`` keep the end value.
"""

from __future__ import annotations

import bisect
import math
from typing import Any, Mapping, Sequence

from .errors import KDConfigError
from .registry import check_kwargs


class Schedule:
    def __call__(self, step: int) -> float:  # pragma: no cover - interface
        raise NotImplementedError


class Constant(Schedule):
    def __init__(self, value: float):
        self.value = float(value)

    def __call__(self, step: int) -> float:
        return self.value

    def __repr__(self) -> str:
        return f"Constant({self.value})"


class Linear(Schedule):
    """``start + (end - start) * min(step / steps, 1)``."""

    def __init__(self, start: float, end: float, steps: int, delay: int = 0):
        if steps <= 0:
            raise KDConfigError(f"linear schedule needs steps > 0, got {steps}")
        self.start, self.end, self.steps, self.delay = float(start), float(end), int(steps), int(delay)

    def __call__(self, step: int) -> float:
        frac = min(max(step - self.delay, 0) / self.steps, 1.0)
        return self.start + (self.end - self.start) * frac


class Cosine(Schedule):
    """``end + (start - end) * (1 + cos(pi * min(step / steps, 1))) / 2``."""

    def __init__(self, start: float, end: float, steps: int):
        if steps <= 0:
            raise KDConfigError(f"cosine schedule needs steps > 0, got {steps}")
        self.start, self.end, self.steps = float(start), float(end), int(steps)

    def __call__(self, step: int) -> float:
        frac = min(max(step, 0) / self.steps, 1.0)
        return self.end + (self.start - self.end) * (1 + math.cos(math.pi * frac)) / 2


class Step(Schedule):
    """Piecewise constant: ``values[i]`` from ``milestones[i-1]`` (inclusive) on."""

    def __init__(self, values: Sequence[float], milestones: Sequence[int]):
        if len(values) != len(milestones) + 1:
            raise KDConfigError(
                f"step schedule needs len(values) == len(milestones) + 1, got {len(values)} and {len(milestones)}"
            )
        if list(milestones) != sorted(milestones):
            raise KDConfigError(f"step schedule milestones must increase, got {list(milestones)}")
        self.values, self.milestones = [float(v) for v in values], [int(m) for m in milestones]

    def __call__(self, step: int) -> float:
        return self.values[bisect.bisect_right(self.milestones, step)]


_SCHEDULES = {"constant": Constant, "linear": Linear, "cosine": Cosine, "step": Step}


def build_schedule(spec: float | int | Mapping[str, Any] | Schedule) -> Schedule:
    """A :class:`Schedule` from a number, a schedule, or ``{"schedule": name, ...}``."""
    if isinstance(spec, Schedule):
        return spec
    if isinstance(spec, (int, float)) and not isinstance(spec, bool):
        return Constant(spec)
    if isinstance(spec, Mapping):
        spec = dict(spec)
        name = spec.pop("schedule", None)
        if name not in _SCHEDULES:
            raise KDConfigError(
                f"weight schedule {name!r} is unknown; use a number or {{'schedule': one of {sorted(_SCHEDULES)}, ...}}"
            )
        check_kwargs(_SCHEDULES[name], spec, f"schedule {name!r}")
        return _SCHEDULES[name](**spec)
    raise KDConfigError(f"a weight must be a number or a schedule dict, got {spec!r}")
