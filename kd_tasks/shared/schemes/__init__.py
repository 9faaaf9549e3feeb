"""Distillation schemes, selectable by name in a recipe (``SCHEMES`` registry).

=====================  ==========================================  ==============================
name (aliases)         class                                       trains / exports
=====================  ==========================================  ==============================
offline                :class:`~kd_tasks.shared.distiller.Distiller`  student (+connectors) / student
mutual (dml, online)   :class:`MutualLearning`                     all peers (+gate) / one peer
self (byot, ...)       :class:`SelfDistillation`                   model + heads / model
multi_teacher          :class:`MultiTeacher`                       student / student
assistant (takd)       :class:`AssistantChain` (a runner)          each stage in turn / student
adversarial (gan)      :class:`Adversarial`                        student (+connector), then the
                                                                   discriminator / student
=====================  ==========================================  ==============================

Every module scheme follows the contract described in :mod:`kd_tasks.shared.schemes.base`;
the loss of each is written out in its module's docstring.

    scheme = build_scheme({"type": "dml", "temperature": 3}, peers=[net_a, net_b])
    scheme = scheme_from_recipe(load_config("configs/shared/scheme_one.yaml"), make_student)
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence

from torch import nn

from ..config import check_keys, distiller_from_config
from ..errors import KDConfigError
from ..registry import SCHEMES
from .adversarial import Adversarial, Discriminator
from .assistant import AssistantChain
from .base import Scheme
from .multi_teacher import MultiTeacher, ensemble_logits, teacher_weights
from .mutual import MutualLearning
from .self_distillation import SelfDistillation, ShallowHead


def build_scheme(cfg: Mapping[str, Any] | str, **modules: Any) -> Any:
    """Build a registered scheme from ``{"type": name, **options}``; models come as keyword arguments.

    ``build_scheme({"type": "offline", "terms": [...]}, student=s, teacher=t)``,
    ``build_scheme("dml", peers=[a, b])``. Unknown options are rejected with the closest names.
    """
    return SCHEMES.build(cfg, **modules)


RECIPE_KEYS = ("scheme", "distill", "models", "train")


def scheme_from_recipe(
    recipe: Mapping[str, Any],
    make_student: Callable[[], nn.Module],
    teacher: nn.Module | None = None,
    teachers: Sequence[nn.Module] = (),
    assistants: Sequence[nn.Module] = (),
    num_samples: int | None = None,
) -> Any:
    """Build the scheme a recipe names, handing it the models it needs.

    ``recipe["scheme"]`` is ``{type: name, **options}`` (a ``distill`` section builds the offline
    Distiller instead); ``recipe["models"]["peers"]`` sets how many students a mutual scheme trains
    (default 2). ``make_student()`` returns a fresh student; ``teacher`` is the (first) teacher,
    ``teachers`` more teachers for multi-teacher, ``assistants`` the TAKD chain's middle models;
    ``num_samples`` (the training set's size) fills the self scheme's previous-epoch buffers.
    """
    check_keys(recipe, RECIPE_KEYS, "recipe")
    if "distill" in recipe:
        return distiller_from_config(recipe, make_student(), teacher)
    if "scheme" not in recipe:
        raise KDConfigError("recipe has neither a 'scheme' nor a 'distill' section")
    cfg = dict(recipe["scheme"]) if not isinstance(recipe["scheme"], str) else {"type": recipe["scheme"]}
    kind = SCHEMES.get(cfg.get("type", ""))
    models = dict(recipe.get("models") or {})
    check_keys(models, ("peers",), "recipe models section")
    if kind is MutualLearning:
        return build_scheme(cfg, peers=[make_student() for _ in range(int(models.get("peers", 2)))])
    if kind is SelfDistillation:
        if cfg.get("previous_weight") and "num_samples" not in cfg:
            cfg["num_samples"] = num_samples
        return build_scheme(cfg, model=make_student())
    if kind is MultiTeacher:
        return build_scheme(cfg, student=make_student(), teachers=[t for t in (teacher, *teachers) if t is not None])
    if kind is AssistantChain:
        return build_scheme(cfg, teacher=teacher, assistants=list(assistants), student=make_student())
    return build_scheme(cfg, student=make_student(), teacher=teacher)


__all__ = [
    "Scheme", "MutualLearning", "SelfDistillation", "ShallowHead", "MultiTeacher", "teacher_weights",
    "ensemble_logits", "AssistantChain", "Adversarial", "Discriminator", "build_scheme", "scheme_from_recipe",
    "SCHEMES",
]
