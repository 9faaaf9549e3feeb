"""The knowledge-transfer core shared by every task (torch only).

Importing this package never imports mmdet, transformers or insightface.
"""

from .config import distiller_from_config, load_config
from .connectors import LazyConnector, build_connector
from .distiller import Distiller, Term
from .errors import KDConfigError, KDError, NonFiniteLossError, ShapeMismatchError, UnknownTapError
from .registry import CONNECTORS, LOSSES, SCHEMES
from .taps import FeatureTaps

__all__ = [
    "Distiller", "Term", "FeatureTaps", "LazyConnector", "build_connector", "load_config",
    "distiller_from_config", "LOSSES", "CONNECTORS", "SCHEMES", "KDError", "KDConfigError",
    "ShapeMismatchError", "UnknownTapError", "NonFiniteLossError",
]
