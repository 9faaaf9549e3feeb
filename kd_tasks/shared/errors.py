"""Errors that name the problem and the fix."""

from __future__ import annotations

import difflib
from typing import Iterable


class KDError(Exception):
    """Base class for kd-tasks errors."""


class KDConfigError(KDError, ValueError):
    """A recipe or argument is wrong: unknown name, unknown key, missing field."""


class ShapeMismatchError(KDError, ValueError):
    """Student and teacher tensors cannot be compared as given."""


class UnknownTapError(KDError, KeyError):
    """A tapped module name does not exist in the model."""

    def __str__(self) -> str:  # KeyError quotes its message; keep it readable
        return str(self.args[0]) if self.args else ""


class NonFiniteLossError(KDError, FloatingPointError):
    """A loss term became NaN or infinite."""


def close_matches(name: str, candidates: Iterable[str], n: int = 5) -> list[str]:
    """Closest names to ``name`` among ``candidates``: fuzzy matches first, then substring hits."""
    candidates = list(candidates)
    out = difflib.get_close_matches(name, candidates, n=n, cutoff=0.5)
    tail = name.split(".")[-1]
    for c in candidates:
        if len(out) >= n:
            break
        if c not in out and (tail and tail in c.split(".")[-1] or name in c):
            out.append(c)
    return out


def suggest(name: str, candidates: Iterable[str], what: str) -> str:
    """A sentence ``unknown <what> 'x'; did you mean ...? known: ...`` for error messages."""
    candidates = sorted(set(candidates))
    matches = close_matches(name, candidates)
    msg = f"unknown {what} {name!r}"
    if matches:
        msg += f"; did you mean {', '.join(repr(m) for m in matches)}?"
    if len(candidates) <= 40:
        msg += f" Known: {', '.join(candidates) if candidates else '(none)'}."
    else:
        msg += f" ({len(candidates)} known; print them with the model's named_modules())."
    return msg
