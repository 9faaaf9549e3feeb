"""What every training scheme offers the training loop.

A scheme is an ``nn.Module`` with the same contract as the offline
:class:`~kd_tasks.shared.distiller.Distiller`::

    out = scheme(inputs, target=None, index=None)
    out["loss"]            # scalar carrying the gradient: the weighted sum of the terms
    out["<term>"]          # each term, unweighted and detached, for logging
    out["student_output"]  # the raw output of the model that is exported

and these methods, which :mod:`kd_tasks.shared.training` calls:

``prepare(inputs, target=None)``
    one dry forward (eval mode, no gradient) that builds lazy layers; build the optimiser after it.
``trainable_parameters()``
    what the main optimiser updates.
``auxiliary_parameters()``
    ``{name: [parameters]}`` for extra optimisation steps (the discriminator of the adversarial
    scheme); each gets its own optimiser, stepped after the main step with the loss returned by
    ``auxiliary_loss(name)``, computed from what the last forward stashed. These parameters are
    never part of the main loss' gradient.
``export_model()`` / ``export_connectors()``
    what is kept after training.
``set_step(step)`` / ``on_epoch_end(epoch)``
    the loop's clock: weight schedules read the step; per-epoch state is rolled over.

Frozen models (teachers) are held outside the module tree, as the Distiller does: they are never
trained, never saved in the scheme's ``state_dict`` and never handed to DDP; ``.to()`` still moves
them, and ``train()`` leaves them in ``eval()``.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, Mapping

import torch
from torch import nn

from ..config import resolve_task_loss
from ..distiller import call_model, default_logits, freeze
from ..errors import KDConfigError, NonFiniteLossError
from ..schedules import Schedule, build_schedule
from ..taps import unwrap_model

Weight = float | Mapping[str, Any] | Schedule


class Scheme(nn.Module):
    """Base class: frozen-model bookkeeping, weighted terms, the dry run and the default hooks.

    Args:
        task_loss: ``f(logits, target)``, a name (``"cross_entropy"``, ``"mse"``, ...) or ``None``.
            Skipped when the batch has no target.
        logits_fn: how to find the logits in a model output (default: the tensor itself,
            ``.logits``, ``["logits"]`` or element 0).
        check_finite: raise :class:`NonFiniteLossError` naming the term when a term is NaN/inf.
    """

    def __init__(
        self,
        task_loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | str | None = "cross_entropy",
        logits_fn: Callable[[Any], torch.Tensor] = default_logits,
        check_finite: bool = True,
    ):
        super().__init__()
        self.task_loss = resolve_task_loss(task_loss)
        self.logits_fn = logits_fn
        self.check_finite = check_finite
        self.step = 0
        self._frozen: dict[str, nn.Module] = {}

    # -- frozen models --------------------------------------------------------------------------
    def add_frozen(self, name: str, model: nn.Module) -> nn.Module:
        """Keep ``model`` frozen (no grad, eval) and outside the module tree; returns it."""
        if not isinstance(model, nn.Module):
            raise KDConfigError(f"{type(self).__name__}: {name} must be an nn.Module, got {type(model).__name__}")
        self._frozen[name] = freeze(model)
        return model

    def frozen_models(self) -> dict[str, nn.Module]:
        """The models this scheme never trains (teachers), by name."""
        return dict(self._frozen)

    def train(self, mode: bool = True) -> "Scheme":
        super().train(mode)
        for model in self._frozen.values():
            model.eval()
        return self

    def _apply(self, fn, *args, **kwargs):
        super()._apply(fn, *args, **kwargs)
        for model in self._frozen.values():
            model._apply(fn, *args, **kwargs)
        return self

    def run_frozen(self, model: nn.Module, inputs: Any, index: torch.Tensor | None = None) -> torch.Tensor:
        """Logits of a frozen model under ``no_grad`` (a cached teacher is looked up by ``index``)."""
        with torch.no_grad():
            if getattr(model, "needs_index", False):
                if index is None:
                    raise KDConfigError(
                        f"{type(self).__name__}: a cached teacher needs the sample indices; give the batch's "
                        "index= (the training loop does when the dataset is map-style)"
                    )
                return self.logits_fn(model(inputs, index=index)).detach()
            return self.logits_fn(call_model(model, inputs)).detach()

    # -- the loop's hooks -----------------------------------------------------------------------
    def set_step(self, step: int) -> None:
        """Set the global step that weight schedules read (the training loop calls this)."""
        self.step = int(step)

    def on_epoch_end(self, epoch: int) -> None:
        """Called by the loop after each epoch (per-epoch state rolls over here)."""

    def auxiliary_parameters(self) -> dict[str, list[nn.Parameter]]:
        """``{name: parameters}`` stepped by extra optimisers (none by default)."""
        return {}

    def auxiliary_loss(self, name: str) -> dict[str, torch.Tensor]:
        raise KDConfigError(f"{type(self).__name__} has no auxiliary step {name!r}")

    def trainable_parameters(self) -> list[nn.Parameter]:
        """Every parameter that requires grad, except the auxiliary ones."""
        aux = {id(p) for params in self.auxiliary_parameters().values() for p in params}
        return [p for p in self.parameters() if p.requires_grad and id(p) not in aux]

    def export_model(self) -> nn.Module:  # pragma: no cover - interface
        raise NotImplementedError

    def export_connectors(self) -> nn.Module | None:
        """Connectors to save next to the exported model, if the scheme has any."""
        return None

    @torch.no_grad()
    def prepare(self, inputs: Any, target: torch.Tensor | None = None, **kwargs: Any) -> "Scheme":
        """One forward in eval mode without gradient, to build lazy layers (heads, gates, critics)."""
        was_training = self.training
        self.eval()
        try:
            self(inputs, target, **kwargs)
        finally:
            self.train(was_training)
        return self

    # -- helpers for subclasses -----------------------------------------------------------------
    def model_logits(self, model: nn.Module, inputs: Any) -> tuple[Any, torch.Tensor]:
        """``(raw output, logits)`` of a trained model."""
        raw = call_model(model, inputs)
        return raw, self.logits_fn(raw)

    def task_term(self, logits: torch.Tensor, target: torch.Tensor | None) -> torch.Tensor | None:
        """The task loss on ``logits``, or ``None`` without a target or a task loss."""
        if self.task_loss is None or target is None:
            return None
        return self.task_loss(logits, target)

    def add_term(self, result: dict, total, name: str, value: torch.Tensor | None, weight: float = 1.0):
        """Record ``value`` (detached) under ``name`` and return ``total + weight * value``."""
        if value is None:
            return total
        if self.check_finite and not bool(torch.isfinite(value.detach()).all()):
            raise NonFiniteLossError(
                f"{type(self).__name__}: loss term {name!r} is {value.detach().float().mean().item()} at step "
                f"{self.step}; lower the learning rate, clip gradients (max_grad_norm), or check the inputs"
            )
        result[name] = value.detach()
        if weight == 0.0:
            return total
        weighted = value * weight
        return weighted if total is None else total + weighted


def weight_schedule(value: Weight) -> Schedule:
    """A weight given as a number or a schedule config (see :mod:`kd_tasks.shared.schedules`)."""
    return build_schedule(value)


def export_of(model: nn.Module) -> nn.Module:
    """The model itself, unwrapped from DDP/compile wrappers."""
    return unwrap_model(model)


def as_module_list(models: Iterable[nn.Module] | nn.Module, what: str, minimum: int = 1) -> list[nn.Module]:
    """A list of modules, checked for type and count."""
    models = [models] if isinstance(models, nn.Module) else list(models)
    for i, m in enumerate(models):
        if not isinstance(m, nn.Module):
            raise KDConfigError(f"{what} #{i} must be an nn.Module, got {type(m).__name__}")
    if len(models) < minimum:
        raise KDConfigError(f"{what}: need at least {minimum}, got {len(models)}")
    return models


def plus(a: torch.Tensor | None, b: torch.Tensor | None) -> torch.Tensor | None:
    """``a + b`` where either may be ``None`` (absent)."""
    if b is None:
        return a
    return b if a is None else a + b


__all__ = ["Scheme", "Weight", "weight_schedule", "export_of", "as_module_list", "plus"]
