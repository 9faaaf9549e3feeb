"""The knowledge-transfer core shared by every task (torch only).

Importing this package never imports mmdet, transformers or insightface.
"""

from .config import distiller_from_config, load_config
from .connectors import LazyConnector, build_connector
from .distiller import Distiller, Term
from .errors import KDConfigError, KDError, NonFiniteLossError, ShapeMismatchError, UnknownTapError
from .registry import CONNECTORS, LOSSES, SCHEMES
from .taps import FeatureTaps

_LAZY = {  # heavier modules (accelerate, safetensors), imported on first use
    "Trainer": ".training", "TrainConfig": ".train_config", "TeacherCache": ".cache",
    "build_scheme": ".schemes", "scheme_from_recipe": ".schemes",
}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [*_LAZY, 
    "Distiller", "Term", "FeatureTaps", "LazyConnector", "build_connector", "load_config",
    "distiller_from_config", "LOSSES", "CONNECTORS", "SCHEMES", "KDError", "KDConfigError",
    "ShapeMismatchError", "UnknownTapError", "NonFiniteLossError",
]
