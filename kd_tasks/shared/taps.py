"""Feature taps: capture intermediate outputs by dotted module name with forward hooks.

No model code is edited (the torchdistill way). A tap spec names a module and, optionally, which
part of its output to keep::

    "layer3"                 the module's output
    "neck:0"                 element 0 of a tuple/list output (MMDetection necks return tuples)
    "bert.encoder:hidden_states.4"
                             a key of a dict / Hugging Face ``ModelOutput``, then element 4
    "head.cls@input"         the module's first positional *input* instead of its output
    "head.cls_convs.2#0"     call 0 of a module that runs several times per forward (a detection head
                             runs its convolutions once per FPN level: call k = level k)
    "head.cls_convs.2#*"     every call, as a list in call order
    {"module": "neck", "index": 0}   the same as a dict (``"call": 0`` for ``#0``)

A module that fires more than once in a forward must name its call: an unnamed tap on it is
refused (:meth:`FeatureTaps.ambiguous`) rather than silently keeping one of the calls, since the
student and an early-stopped teacher would keep different ones.

Models wrapped by ``DistributedDataParallel``, ``DataParallel``, Accelerate or ``torch.compile`` are
unwrapped first, and names written with the wrapper's ``module.`` / ``_orig_mod.`` prefix also
resolve. An unknown name raises :class:`UnknownTapError` listing the closest existing names.

    with FeatureTaps(model, {"feat": "layer3", "logits": "fc"}) as taps:
        model(x)
    taps.outputs["feat"]
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Callable, Mapping

import torch
from torch import nn

from .errors import KDConfigError, UnknownTapError, suggest

_WRAPPER_ATTRS = ("module", "_orig_mod")


def unwrap_model(model: nn.Module) -> nn.Module:
    """Strip DDP / DataParallel / FSDP-style ``.module`` and ``torch.compile``'s ``._orig_mod``."""
    seen = set()
    while id(model) not in seen:
        seen.add(id(model))
        inner = None
        for attr in _WRAPPER_ATTRS:
            cand = getattr(model, attr, None)
            if isinstance(cand, nn.Module) and _is_wrapper(model, attr):
                inner = cand
                break
        if inner is None:
            break
        model = inner
    return model


def _is_wrapper(model: nn.Module, attr: str) -> bool:
    """A wrapper holds the real model as its only child under ``attr`` (DDP, DataParallel, compile)."""
    if attr == "_orig_mod":
        return True
    children = dict(model.named_children())
    return list(children) == [attr]


@dataclass(frozen=True)
class TapSpec:
    """Which module to hook and which part of its output (or input) to keep."""

    module: str
    path: tuple[str, ...] = ()
    use_input: bool = False
    call: int | str | None = None  # None: the module must fire once; k: its k-th call; "*": every call

    @classmethod
    def parse(cls, spec: str | Mapping[str, Any] | "TapSpec") -> "TapSpec":
        if isinstance(spec, TapSpec):
            return spec
        if isinstance(spec, Mapping):
            unknown = set(spec) - {"module", "index", "input", "call"}
            if unknown or "module" not in spec:
                raise KDConfigError(
                    f"tap {dict(spec)!r}: a tap dict has keys 'module' (required), 'index', 'input', 'call'; "
                    f"got {sorted(spec)}"
                )
            index = spec.get("index")
            path = tuple(str(index).split(".")) if index is not None and index != "" else ()
            call = spec.get("call")
            return cls(str(spec["module"]), path, bool(spec.get("input", False)),
                       None if call is None else _parse_call(str(call), str(spec["module"])))
        if not isinstance(spec, str) or not spec:
            raise KDConfigError(f"tap spec must be a non-empty string or dict, got {spec!r}")
        use_input = False
        if spec.endswith("@input"):
            spec, use_input = spec[: -len("@input")], True
        name, _, index = spec.partition(":")
        path = tuple(index.split(".")) if index else ()
        name, sep, call = name.partition("#")
        return cls(name, path, use_input, _parse_call(call, spec) if sep else None)

    def __str__(self) -> str:
        s = self.module + (f"#{self.call}" if self.call is not None else "")
        s += ":" + ".".join(self.path) if self.path else ""
        return s + ("@input" if self.use_input else "")


def _parse_call(call: str, spec: str) -> int | str:
    if call == "*":
        return "*"
    if call.isdigit():
        return int(call)
    raise KDConfigError(f"tap {spec!r}: the call after '#' is a number (0 = first call) or '*' (every call), got {call!r}")


def select(value: Any, path: tuple[str, ...], where: str = "") -> Any:
    """Follow ``path`` into nested tuples/lists (integer keys), dicts/ModelOutputs (keys) or attributes."""
    for i, key in enumerate(path):
        here = f"{where}:{'.'.join(path[: i + 1])}"
        if isinstance(value, (tuple, list)):
            try:
                value = value[int(key)]
            except (ValueError, IndexError):
                raise KDConfigError(
                    f"tap {here}: output is a {type(value).__name__} of length {len(value)}; "
                    f"use an integer index 0..{len(value) - 1}"
                ) from None
        elif isinstance(value, Mapping):
            if key not in value:
                raise KDConfigError(f"tap {here}: {suggest(key, [str(k) for k in value], 'output key')}")
            value = value[key]
        elif hasattr(value, key):
            value = getattr(value, key)
        else:
            raise KDConfigError(
                f"tap {here}: cannot index a {type(value).__name__} with {key!r}; "
                "an index applies to tuple/list/dict outputs"
            )
    return value


class _StopForward(Exception):
    """Raised by the last hook when the rest of the forward is not needed."""


def resolve_module(model: nn.Module, name: str) -> nn.Module:
    """The submodule called ``name`` in ``model`` (unwrapped); ``""`` is the model itself."""
    base = unwrap_model(model)
    modules = dict(base.named_modules())
    candidates = [name]
    for prefix in ("module.", "_orig_mod."):
        stripped = name
        while stripped.startswith(prefix):
            stripped = stripped[len(prefix):]
        candidates.append(stripped)
    for cand in candidates:
        if cand in modules:
            return modules[cand]
    raise UnknownTapError(suggest(name, [n for n in modules if n], f"module name in {type(base).__name__}"))


class FeatureTaps:
    """Forward hooks that record named intermediate outputs of one model.

    Args:
        model: the module to tap (wrapped models are unwrapped).
        specs: ``{alias: spec}`` (see module docstring) or a list of specs (aliases = specs).
        detach: detach captured tensors (use for a teacher outside ``no_grad``).
        stop_after_last: abort the forward once every tap has fired (``run`` catches it). Saves
            the teacher's remaining layers when only intermediate features are needed.

    Hooks are installed by ``attach()`` (or ``with``) and removed by ``remove()`` / on exit.
    ``outputs`` is cleared by ``clear()``; a module called several times in one forward keeps
    its last call.
    """

    def __init__(
        self,
        model: nn.Module,
        specs: Mapping[str, Any] | list | tuple,
        detach: bool = False,
        stop_after_last: bool = False,
    ):
        if isinstance(specs, (list, tuple)):
            specs = {str(s): s for s in specs}
        self.model = model
        self.specs = {alias: TapSpec.parse(s) for alias, s in specs.items()}
        self.detach = detach
        self.stop_after_last = stop_after_last
        self.outputs: dict[str, Any] = {}
        self.calls: dict[str, int] = {}  # alias -> times its module fired in the last forward
        self._full_calls: dict[str, int] | None = None  # call counts of the last forward that ran to the end
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        # Resolve now so a wrong name fails before any training starts.
        self._modules = {alias: resolve_module(model, spec.module) for alias, spec in self.specs.items()}

    # -- hook management ------------------------------------------------------------------------
    def attach(self) -> "FeatureTaps":
        if self._handles:
            return self
        by_module: dict[int, list[str]] = {}
        for alias, mod in self._modules.items():
            by_module.setdefault(id(mod), []).append(alias)
        for aliases in by_module.values():
            mod = self._modules[aliases[0]]
            self._handles.append(mod.register_forward_hook(self._make_hook(aliases), with_kwargs=True))
        return self

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def clear(self) -> None:
        self.outputs = {}
        self.calls = {}

    def __enter__(self) -> "FeatureTaps":
        return self.attach()

    def __exit__(self, *exc) -> None:
        self.remove()

    def __del__(self):  # pragma: no cover - best effort
        try:
            self.remove()
        except Exception:
            pass

    @property
    def attached(self) -> bool:
        return bool(self._handles)

    # -- capture --------------------------------------------------------------------------------
    def _make_hook(self, aliases: list[str]) -> Callable:
        def hook(module, args, kwargs, output):
            for alias in aliases:
                spec = self.specs[alias]
                call = self.calls.get(alias, 0)
                self.calls[alias] = call + 1
                if isinstance(spec.call, int) and spec.call != call:
                    continue
                if spec.use_input:
                    source: Any = args[0] if args else next(iter(kwargs.values()), None)
                else:
                    source = output
                value = select(source, spec.path, spec.module)
                if self.detach and isinstance(value, torch.Tensor):
                    value = value.detach()
                if spec.call == "*":
                    self.outputs.setdefault(alias, []).append(value)
                else:
                    self.outputs[alias] = value
            if self.stop_after_last and self._complete():
                raise _StopForward

        return hook

    def _complete(self) -> bool:
        """Every tap has all it needs: early stop is safe. Needs the call counts of one full forward
        (the first forward always runs to the end), so a module that fires again later is never cut short."""
        if self._full_calls is None or len(self.outputs) < len(self.specs):
            return False
        for alias, spec in self.specs.items():
            if spec.call is None or spec.call == "*":
                if self.calls.get(alias, 0) < self._full_calls.get(alias, 0):
                    return False
        return True

    def run(self, fn: Callable[[], Any]) -> Any:
        """Call ``fn()`` (a forward) with hooks attached; returns its result, or ``None`` if stopped early."""
        self.clear()
        was_attached = self.attached
        self.attach()
        try:
            result = fn()
            self._full_calls = dict(self.calls)
            return result
        except _StopForward:
            return None
        finally:
            if not was_attached:
                self.remove()
        # (missing and ambiguous captures are reported by the caller, which knows which taps it needs)

    def missing(self) -> list[str]:
        """Aliases that did not fire (or whose numbered call did not happen) during the last forward."""
        return [a for a in self.specs if a not in self.outputs]

    def ambiguous(self) -> dict[str, int]:
        """``{alias: calls}`` for taps without a call number on modules that fired more than once."""
        return {a: self.calls[a] for a, spec in self.specs.items() if spec.call is None and self.calls.get(a, 0) > 1}

    def ambiguity_error(self, side: str) -> KDConfigError | None:
        """A clear error for :meth:`ambiguous` taps, or ``None``."""
        found = self.ambiguous()
        if not found:
            return None
        alias, n = next(iter(found.items()))
        spec = self.specs[alias]
        first, last, every = (str(replace(spec, call=c)) for c in (0, n - 1, "*"))
        return KDConfigError(
            f"{side} tap {alias!r}: module {spec.module!r} runs {n} times in one forward (e.g. a head shared by "
            f"the FPN levels), so one call cannot be chosen silently; name it: '{first}' .. '{last}' (call k = "
            f"level k for detection heads), or '{every}' for a list of all"
        )


__all__ = ["FeatureTaps", "TapSpec", "unwrap_model", "resolve_module", "select"]
