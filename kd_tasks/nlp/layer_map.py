"""Which student layer learns from which teacher layer.

Layers are numbered as Hugging Face numbers ``hidden_states``: ``0`` is the embedding output and
``1..N`` are the transformer layers. A map is a tuple of ``(student_layer, teacher_layer)`` pairs.

Specs (a string on the command line, or a list in a recipe):

* ``"auto"`` (the command line's default): ``extraction`` for a student cut from the teacher, else
  ``uniform``; ``"extraction"``: :func:`extraction_map` (resolved by the caller, who knows the kept layers).
* ``"uniform"``: TinyBERT's ``g(m) = m · N / M`` (Jiao et al. 2020): student layer ``m`` learns
  from teacher layer ``m·N/M`` (rounded), for ``m = 1..M``, plus embeddings ``0 -> 0``.
* ``"last"`` / ``"last-k"``: the student's last ``k`` layers learn from the teacher's last ``k``
  (MiniLM distils the last layer only: ``"last"`` = ``"last-1"``).
* an explicit list: ``"1:2,2:4,3:6"`` or ``[[1, 2], [2, 4], [3, 6]]``; or teacher layers only,
  ``"2,4,6"`` / ``[2, 4, 6]``, meaning student layers ``1, 2, 3``.

Attention and query/key/value terms use only pairs with both layers ``>= 1`` (embeddings have none).
"""

from __future__ import annotations

import re
from typing import Sequence, Union

from ..shared.errors import KDConfigError

LayerPairs = tuple[tuple[int, int], ...]
LayerMapSpec = Union[str, Sequence[int], Sequence[Sequence[int]]]

SPEC_HELP = "'uniform', 'last', 'last-k', '1:2,2:4' (student:teacher pairs) or '2,4,6' (teacher layers)"


def uniform_map(student_layers: int, teacher_layers: int) -> LayerPairs:
    """``((0, 0), (1, g(1)), ..., (M, N))`` with ``g(m) = round(m · N / M)``."""
    return ((0, 0),) + tuple(
        (m, max(1, int(m * teacher_layers / student_layers + 0.5))) for m in range(1, student_layers + 1)
    )


def last_k_map(k: int, student_layers: int, teacher_layers: int) -> LayerPairs:
    """The student's last ``k`` layers against the teacher's last ``k``, aligned at the top."""
    if not 1 <= k <= min(student_layers, teacher_layers):
        raise KDConfigError(
            f"layer map 'last-{k}': k must be between 1 and {min(student_layers, teacher_layers)} "
            f"(student has {student_layers} layers, teacher {teacher_layers})"
        )
    return tuple((student_layers - i, teacher_layers - i) for i in reversed(range(k)))


def _parse_explicit(spec: LayerMapSpec) -> list[tuple[int, int]]:
    if isinstance(spec, str):
        items: list = [p.strip() for p in spec.split(",") if p.strip()]
        items = [tuple(int(x) for x in p.split(":")) if ":" in p else int(p) for p in items]
    else:
        items = [tuple(p) if isinstance(p, (list, tuple)) else p for p in spec]
    if all(isinstance(p, int) for p in items):  # teacher layers for student layers 1..len
        return [(m, t) for m, t in enumerate(items, start=1)]
    if all(isinstance(p, tuple) and len(p) == 2 for p in items):
        return [(int(s), int(t)) for s, t in items]
    raise KDConfigError(f"layer map {spec!r}: mix of pairs and single layers; write all as 'student:teacher'")


def build_layer_map(spec: LayerMapSpec, student_layers: int, teacher_layers: int) -> LayerPairs:
    """Resolve ``spec`` for a student of ``student_layers`` and a teacher of ``teacher_layers``."""
    if isinstance(spec, str):
        name = spec.strip().lower()
        if name == "uniform":
            return uniform_map(student_layers, teacher_layers)
        match = re.fullmatch(r"last(?:-(\d+))?", name)
        if match:
            return last_k_map(int(match.group(1) or 1), student_layers, teacher_layers)
        if not re.fullmatch(r"[\d\s:,]+", name):
            raise KDConfigError(f"unknown layer map {spec!r}; use {SPEC_HELP}")
    try:
        pairs = _parse_explicit(spec)
    except KDConfigError:
        raise
    except (TypeError, ValueError):
        raise KDConfigError(f"cannot read layer map {spec!r}; use {SPEC_HELP}") from None
    if not pairs:
        raise KDConfigError(f"layer map {spec!r} is empty; use {SPEC_HELP}")
    for s, t in pairs:
        if not (0 <= s <= student_layers and 0 <= t <= teacher_layers):
            raise KDConfigError(
                f"layer map pair {s}:{t} is out of range: student layers are 0..{student_layers}, "
                f"teacher layers 0..{teacher_layers} (0 = embeddings)"
            )
        if (s == 0) != (t == 0):
            raise KDConfigError(f"layer map pair {s}:{t} pairs embeddings (layer 0) with a transformer layer")
    return tuple(pairs)


def extraction_map(kept: Sequence[int], teacher_layers: int) -> LayerPairs:
    """The map of a student cut from the teacher: embeddings ``0 -> 0``, and student layer ``m`` (the copy
    of 0-based teacher layer ``kept[m-1]``) learns from teacher hidden state ``kept[m-1] + 1``, the output
    of the layer it was copied from. For 3 of 6 layers (0, 3, 5): ``0:0, 1:1, 2:4, 3:6``."""
    for k in kept:
        if not 0 <= int(k) < teacher_layers:
            raise KDConfigError(f"kept teacher layer {k} is out of range 0..{teacher_layers - 1}")
    return ((0, 0),) + tuple((m, int(k) + 1) for m, k in enumerate(kept, start=1))


def transformer_pairs(pairs: LayerPairs) -> LayerPairs:
    """The pairs without the embedding layer (for attention and query/key/value terms)."""
    return tuple((s, t) for s, t in pairs if s > 0 and t > 0)


def evenly_spaced_layers(keep: int, total: int) -> list[int]:
    """``keep`` of ``total`` teacher layers (0-based), evenly spaced and including the first and last.

    For 6 of 12 this gives ``[0, 2, 4, 7, 9, 11]``, the layers DistilBERT's initialisation copies.
    Keeping one layer keeps the first, the one trained on the embeddings' output.
    """
    if not 1 <= keep <= total:
        raise KDConfigError(f"cannot keep {keep} of {total} teacher layers; choose 1..{total}")
    if keep == 1:
        return [0]
    return [int(i * (total - 1) / (keep - 1) + 0.5) for i in range(keep)]
