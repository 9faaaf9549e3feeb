"""Registries: configs name components (losses, connectors, schemes) instead of importing them.

    @LOSSES.register("kd")
    class KDLoss(nn.Module): ...

    LOSSES.build({"type": "kd", "temperature": 4.0})
"""

from __future__ import annotations

import importlib
import inspect
from typing import Any, Callable, Mapping

from .errors import KDConfigError, suggest
from .precision import full_precision_forward


class Registry:
    """Maps names to classes (or factories) of one kind."""

    def __init__(self, kind: str, on_register: Callable[[Any], Any] | None = None, builtins: str | None = None):
        self.kind = kind
        self._items: dict[str, Callable[..., Any]] = {}
        self._on_register = on_register
        self._builtins = builtins  # module that registers the built-in entries, imported at first lookup

    def _load_builtins(self) -> None:
        if self._builtins is not None:
            module, self._builtins = self._builtins, None
            importlib.import_module(module)

    def register(self, name: str | None = None, *aliases: str):
        def deco(obj):
            if self._on_register is not None:
                obj = self._on_register(obj)
            for key in (name or obj.__name__, *aliases):
                key = key.lower()
                if key in self._items and self._items[key] is not obj:
                    raise KDConfigError(f"{self.kind} {key!r} is registered twice")
                self._items[key] = obj
            return obj

        return deco

    def names(self) -> list[str]:
        self._load_builtins()
        return sorted(self._items)

    def __contains__(self, name: str) -> bool:
        self._load_builtins()
        return name.lower() in self._items

    def get(self, name: str) -> Callable[..., Any]:
        self._load_builtins()
        try:
            return self._items[name.lower()]
        except KeyError:
            raise KDConfigError(suggest(name, self._items, self.kind)) from None

    def build(self, cfg: Mapping[str, Any] | str, **defaults: Any) -> Any:
        """Build from ``{"type": name, **kwargs}`` (or a bare name); keyword errors name the key."""
        if isinstance(cfg, str):
            cfg = {"type": cfg}
        if "type" not in cfg:
            raise KDConfigError(
                f"{self.kind} config {dict(cfg)!r} has no 'type'; add one of: {', '.join(self.names())}"
            )
        kwargs = {**defaults, **{k: v for k, v in cfg.items() if k != "type"}}
        obj = self.get(cfg["type"])
        check_kwargs(obj, kwargs, f"{self.kind} {cfg['type']!r}")
        return obj(**kwargs)


def check_kwargs(obj: Callable[..., Any], kwargs: Mapping[str, Any], what: str) -> None:
    """Raise :class:`KDConfigError` naming any key ``obj`` does not accept, with close matches."""
    target = obj.__init__ if inspect.isclass(obj) else obj
    try:
        sig = inspect.signature(target)
    except (TypeError, ValueError):
        return
    params = sig.parameters
    if any(p.kind is p.VAR_KEYWORD for p in params.values()):
        return
    accepted = [n for n, p in params.items() if n != "self" and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    for key in kwargs:
        if not isinstance(key, str):
            raise KDConfigError(
                f"{what}: key {key!r} is not a string (YAML reads bare on/off/yes/no as booleans: quote the key)"
            )
        if key not in accepted:
            raise KDConfigError(
                f"{what}: {suggest(key, accepted, 'option')} "
                f"Fix the key in the config."
            )


LOSSES = Registry("loss", on_register=full_precision_forward, builtins="kd_tasks.shared.losses")  # every loss computes in float32 (or wider)
CONNECTORS = Registry("connector")
SCHEMES = Registry("scheme")
