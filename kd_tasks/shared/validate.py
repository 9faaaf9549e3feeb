"""Up-front checks of numeric settings, naming the flag or key that is wrong.

Each check takes the value and the name the user wrote (``--lr``, ``train.lr``, ``lr`` in recipe
``r.yaml``) and returns the value converted (``int`` / ``float``) or raises :class:`KDConfigError`::

    number(args.lr, "--lr", low=0, low_open=True)          # > 0
    integer(args.batch_size, "--batch-size", low=1)        # >= 1

Booleans are never numbers here (YAML's ``yes`` is not 1), strings are never numbers (``lr: fast``
and ``lr: "0.1"`` are both refused with the value shown), NaN and infinity are refused.
:func:`check_rules` applies a table of such checks to a mapping (parsed options, a recipe section);
:func:`check_recipe_numbers` walks a distillation recipe for temperatures and weights.
"""

from __future__ import annotations

import math
import numbers
from typing import Any, Mapping

from .errors import KDConfigError


def _describe(value: Any) -> str:
    return f"{value!r} ({type(value).__name__})" if isinstance(value, str) else repr(value)


def _bound_text(low: float | None, high: float | None, low_open: bool, high_open: bool) -> str:
    parts = []
    if low is not None:
        parts.append(f"{'>' if low_open else '>='} {low:g}")
    if high is not None:
        parts.append(f"{'<' if high_open else '<='} {high:g}")
    return " and ".join(parts)


def number(value: Any, name: str, *, low: float | None = None, high: float | None = None, low_open: bool = False,
           high_open: bool = False, integer: bool = False, allow_none: bool = False, hint: str | None = None) -> Any:
    """``value`` as a finite number within the bounds, or :class:`KDConfigError` naming ``name``."""
    if value is None and allow_none:
        return None
    kind = "a whole number" if integer else "a number"
    bounds = _bound_text(low, high, low_open, high_open)
    want = f"{kind}{' ' + bounds if bounds else ''}"
    fix = hint or f"give {name} {want}"
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise KDConfigError(f"{name} must be {want}, got {_describe(value)}", hint=fix)
    if integer and not float(value).is_integer():
        raise KDConfigError(f"{name} must be {want}, got {value!r}", hint=fix)
    if not math.isfinite(float(value)):
        raise KDConfigError(f"{name} must be {want}, got {value!r}", hint=fix)
    v = int(value) if integer else float(value)
    if low is not None and (v <= low if low_open else v < low):
        raise KDConfigError(f"{name} must be {want}, got {value!r}", hint=fix)
    if high is not None and (v >= high if high_open else v > high):
        raise KDConfigError(f"{name} must be {want}, got {value!r}", hint=fix)
    return v


def integer(value: Any, name: str, **kw: Any) -> Any:
    return number(value, name, integer=True, **kw)


# rule kinds for check_rules: (kind, low, high)
POSITIVE = ("number", 0, None, True)          # > 0
NON_NEGATIVE = ("number", 0, None, False)     # >= 0
FRACTION = ("fraction", 0, 1, False)          # 0 <= x <= 1
POS_INT = ("int", 1, None, False)             # >= 1
NON_NEG_INT = ("int", 0, None, False)         # >= 0
AT_LEAST_2 = ("int", 2, None, False)          # >= 2 (class counts, identities)


def check_rules(values: Mapping[str, Any], rules: Mapping[str, tuple], flag: str = "--{}", *,
                source: str | None = None) -> None:
    """Apply ``rules`` ``{key: rule}`` to ``values`` (``None`` values are skipped: not given).

    ``flag`` formats a key as the user wrote it (``"--{}"`` turns ``batch_size`` into
    ``--batch-size``; ``"train.{}"`` keeps the key); ``source`` (a recipe path) is added to the name.
    """
    for key, rule in rules.items():
        if key not in values or values[key] is None:
            continue
        kind, low, high, low_open = rule
        name = flag.format(key.replace("_", "-") if flag.startswith("--") else key)
        if source:
            name = f"{name} (in {source})"
        number(values[key], name, low=low, high=high, low_open=low_open, integer=kind == "int")


TEMPERATURE_KEYS = ("temperature", "tau", "T")
WEIGHT_KEYS = ("weight", "task_weight", "alpha", "beta", "gamma", "adv_weight", "previous_weight")


def check_recipe_numbers(recipe: Any, source: str, path: str = "") -> None:
    """Walk a recipe: every temperature must be a number > 0, every weight a number >= 0 or a schedule
    (a mapping whose ``start``/``end``/``steps``... are numbers), any other number finite."""
    if isinstance(recipe, Mapping):
        for key, value in recipe.items():
            where = f"{path}.{key}" if path else str(key)
            name = f"{where} in recipe {source}"
            is_weight = key in WEIGHT_KEYS or str(key).endswith("_weight")
            if key in TEMPERATURE_KEYS and not isinstance(value, Mapping):
                number(value, name, low=0, low_open=True)
            elif is_weight and not isinstance(value, Mapping):
                number(value, name, low=0)
            elif is_weight:  # a schedule
                for k, v in value.items():
                    sub = f"{where}.{k} in recipe {source}"
                    if k in ("start", "end", "value"):
                        number(v, sub, low=0)
                    elif k in ("steps", "delay"):
                        number(v, sub, low=0, integer=True)
                    elif k in ("values", "milestones") and isinstance(v, (list, tuple)):
                        for i, item in enumerate(v):
                            number(item, f"{where}.{k}[{i}] in recipe {source}", low=0, integer=k == "milestones")
                    else:
                        check_recipe_numbers(v, source, f"{where}.{k}")
            else:
                check_recipe_numbers(value, source, where)
    elif isinstance(recipe, (list, tuple)):
        for i, value in enumerate(recipe):
            check_recipe_numbers(value, source, f"{path}[{i}]")
    elif isinstance(recipe, float) and not math.isfinite(recipe):
        raise KDConfigError(f"{path} in recipe {source} is {recipe!r}", hint="give a finite number")


__all__ = ["number", "integer", "check_rules", "check_recipe_numbers", "POSITIVE", "NON_NEGATIVE", "FRACTION",
           "POS_INT", "NON_NEG_INT", "AT_LEAST_2"]
