"""Checkpoint files for detection distillation without unpickling arbitrary objects.

Two problems with MMEngine 0.10.7 checkpoints on torch >= 2.6, where ``torch.load`` defaults to
``weights_only=True``:

* a checkpoint written by MMEngine's ``Runner`` holds its ``MessageHub`` state: ``HistoryBuffer``
  objects (pickled with ``builtins.getattr`` on the class) and NumPy arrays. ``weights_only=True``
  refuses them, so ``Runner.resume`` fails; allowing ``getattr`` would defeat the safe loader.
* teacher checkpoints come from anywhere; loading them with ``weights_only=False`` runs whatever
  code the file names.

The answers here:

* :func:`make_weights_only` / :func:`restore_weights_only` turn the MessageHub state into plain
  lists and numbers before saving and back after loading (the
  :class:`~kd_tasks.detection.hooks.SafeCheckpointHook` calls them), so a distillation checkpoint loads
  with plain ``torch.load(weights_only=True)`` -- MMEngine's own resume path -- with no allow-list;
* :func:`load_checkpoint_file` reads *any* ``torch.save`` file through an unpickler that builds only
  tensors, parameters, dtypes, ``torch.Size`` and ordered dicts. Every other object the file names
  (``HistoryBuffer``, NumPy arrays, ``getattr``, ...) becomes an inert :class:`Placeholder` that
  keeps its arguments and cannot run code. The state dict comes back whole; the bookkeeping next to
  it does not, which is all a teacher needs.
"""

from __future__ import annotations

import os
import pickle
import re
import types
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

from kd_tasks.shared.errors import KDConfigError

# ---------------------------------------------------------------------------------- safe reading


class Placeholder:
    """Stands for an object a checkpoint names but the safe loader does not build.

    It records what it was called with (``args``, ``state``) and does nothing else.
    """

    qualname = "?"

    def __init__(self, *args: Any, **kwargs: Any):
        self.args, self.kwargs, self.state = args, kwargs, None

    def __setstate__(self, state: Any) -> None:
        self.state = state

    def __call__(self, *args: Any, **kwargs: Any) -> "Placeholder":
        return _placeholder_class(f"{self.qualname}(...)")(*args, **kwargs)

    def __repr__(self) -> str:
        return f"<not loaded: {self.qualname}>"


_PLACEHOLDERS: dict[str, type] = {}


def _placeholder_class(qualname: str) -> type:
    if qualname not in _PLACEHOLDERS:
        _PLACEHOLDERS[qualname] = type("Placeholder", (Placeholder,), {"qualname": qualname})
    return _PLACEHOLDERS[qualname]


def _allowed(module: str, name: str) -> Any:
    """The real object for the few globals a state dict needs, else ``None``."""
    if module == "collections" and name == "OrderedDict":
        return OrderedDict
    if module == "torch._utils" and name.startswith("_rebuild_"):
        return getattr(torch._utils, name, None)
    if module == "torch":
        obj = getattr(torch, name, None)
        if isinstance(obj, torch.dtype) or obj is torch.Size or (isinstance(obj, type) and name.endswith("Storage")):
            return obj
    if module == "torch.nn.parameter" and name == "Parameter":
        return nn.Parameter
    if module == "torch.storage" and name == "UntypedStorage":
        return torch.UntypedStorage
    return None


class _RestrictedUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        obj = _allowed(module, name)
        return obj if obj is not None else _placeholder_class(f"{module}.{name}")


_restricted_pickle = types.SimpleNamespace(
    Unpickler=_RestrictedUnpickler, load=lambda f, **kw: _RestrictedUnpickler(f, **kw).load(),
    __name__="kd_tasks_restricted_pickle",
)


def load_checkpoint_file(path: str | os.PathLike, map_location: Any = "cpu") -> Any:
    """Read a ``torch.save`` file, building tensors and containers only (see the module docstring).

    Tries ``torch.load(weights_only=True)`` first; when the file names other objects (an MMEngine
    training checkpoint does), reads it again with the restricted unpickler.
    """
    path = Path(path)
    if not path.is_file():
        raise KDConfigError(f"checkpoint file {str(path)!r} does not exist")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError:
        pass
    try:
        return torch.load(path, map_location=map_location, weights_only=False, pickle_module=_restricted_pickle)
    except Exception as e:  # a corrupt or non-torch file
        raise KDConfigError(f"cannot read checkpoint {str(path)!r}: {type(e).__name__}: {e}") from e


# ---------------------------------------------------------------------------------- state dicts

STATE_DICT_KEYS = ("state_dict", "model", "module")


def extract_state_dict(checkpoint: Any, prefix: str = "") -> dict[str, torch.Tensor]:
    """The model weights of a checkpoint: its ``state_dict`` (or ``model``) entry, or the mapping
    itself; a ``module.`` (DDP) prefix is dropped, and with ``prefix`` only the keys under it are
    kept, without it (e.g. ``"distiller.student."`` takes a student out of a distillation checkpoint).
    """
    if isinstance(checkpoint, Mapping):
        for key in STATE_DICT_KEYS:
            if isinstance(checkpoint.get(key), Mapping):
                checkpoint = checkpoint[key]
                break
    if not isinstance(checkpoint, Mapping):
        raise KDConfigError(f"a checkpoint must hold a state dict, got {type(checkpoint).__name__}")
    out = {}
    for key, value in checkpoint.items():
        key = re.sub(r"^module\.", "", str(key))
        if prefix:
            if not key.startswith(prefix):
                continue
            key = key[len(prefix):]
        if isinstance(value, torch.Tensor):
            out[key] = value
    if not out:
        where = f" under {prefix!r}" if prefix else ""
        raise KDConfigError(f"the checkpoint holds no tensors{where}; is it a model checkpoint?")
    return out


@dataclass
class LoadReport:
    """What happened when weights were loaded into a model."""

    path: str
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    loaded: int = 0

    @property
    def ok(self) -> bool:
        return not self.missing and not self.unexpected

    def summary(self, limit: int = 8) -> str:
        def few(keys: list[str]) -> str:
            return ", ".join(keys[:limit]) + (f", ... ({len(keys)} in all)" if len(keys) > limit else "")

        parts = [f"{self.loaded} tensors loaded from {self.path}"]
        if self.missing:
            parts.append(f"{len(self.missing)} weights of the model are NOT in the checkpoint: {few(self.missing)}")
        if self.unexpected:
            parts.append(f"{len(self.unexpected)} checkpoint weights match nothing in the model: {few(self.unexpected)}")
        return "; ".join(parts)


DISTILLER_STUDENT_PREFIX = "distiller.student."


def load_weights(model: nn.Module, path: str | os.PathLike, strict: bool = True) -> LoadReport:
    """Load a checkpoint file into ``model`` and report missing / unexpected keys.

    A kd-tasks distillation checkpoint is accepted too: its student becomes the model (so a distilled
    student can teach the next round). ``strict=True`` raises :class:`KDConfigError` on any mismatch
    (the report names the keys); a size mismatch always raises.
    """
    checkpoint = load_checkpoint_file(path)
    state = extract_state_dict(checkpoint)
    if state and all(k.startswith("distiller.") for k in state):
        state = extract_state_dict(state, prefix=DISTILLER_STUDENT_PREFIX)
    try:
        result = model.load_state_dict(state, strict=False)
    except RuntimeError as e:
        raise KDConfigError(
            f"checkpoint {str(path)!r} does not fit the model built from its config: {e}. "
            "Check that the config is the one the checkpoint was trained with."
        ) from None
    report = LoadReport(str(path), list(result.missing_keys), list(result.unexpected_keys),
                        loaded=len(state) - len(result.unexpected_keys))
    if strict and not report.ok:
        raise KDConfigError(
            f"checkpoint does not match the model config: {report.summary()}. Check the config and checkpoint "
            "pair; to go on with a partly loaded model anyway, set strict loading off (teacher_strict=False)."
        )
    return report


# ---------------------------------------------------------------------------------- MMEngine state

_BUFFER_TAG = "__kd_tasks_history_buffer__"


def _plain(value: Any) -> Any:
    """NumPy arrays and scalars -> lists and Python numbers, recursively through containers."""
    import numpy as np

    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, Mapping):
        out = {k: _plain(v) for k, v in value.items()}
        return OrderedDict(out) if isinstance(value, OrderedDict) else out
    if isinstance(value, tuple):
        return tuple(_plain(v) for v in value)
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value


def make_weights_only(checkpoint: dict) -> dict:
    """Make an MMEngine checkpoint dict loadable by ``torch.load(weights_only=True)``, in place.

    ``HistoryBuffer`` objects in ``message_hub.log_scalars`` become tagged dicts of lists; NumPy values
    in ``message_hub`` and ``meta`` become lists and numbers. The live MessageHub is not touched.
    """
    from mmengine.logging import HistoryBuffer

    hub = checkpoint.get("message_hub")
    if isinstance(hub, Mapping):
        hub = dict(hub)
        scalars = {}
        for key, buf in dict(hub.get("log_scalars", {})).items():
            if isinstance(buf, HistoryBuffer):
                log, count = buf.data
                buf = {_BUFFER_TAG: True, "log_history": _plain(log), "count_history": _plain(count),
                       "max_length": int(buf.max_length)}
            scalars[key] = buf
        hub["log_scalars"] = scalars
        hub["runtime_info"] = _plain(dict(hub.get("runtime_info", {})))
        checkpoint["message_hub"] = hub
    if isinstance(checkpoint.get("meta"), Mapping):
        checkpoint["meta"] = _plain(dict(checkpoint["meta"]))
    return checkpoint


def restore_weights_only(checkpoint: dict) -> dict:
    """Undo :func:`make_weights_only` on a loaded checkpoint dict (in place)."""
    from mmengine.logging import HistoryBuffer

    hub = checkpoint.get("message_hub")
    if isinstance(hub, Mapping) and isinstance(hub.get("log_scalars"), Mapping):
        for key, buf in list(hub["log_scalars"].items()):
            if isinstance(buf, Mapping) and buf.get(_BUFFER_TAG):
                hub["log_scalars"][key] = HistoryBuffer(buf["log_history"], buf["count_history"], buf["max_length"])
    return checkpoint


__all__ = [
    "Placeholder", "load_checkpoint_file", "extract_state_dict", "LoadReport", "load_weights",
    "make_weights_only", "restore_weights_only", "DISTILLER_STUDENT_PREFIX",
]
