"""Adversarial (GAN-based) distillation: a discriminator tells teacher outputs from student outputs.

Survey form: student loss ``L(z, y) + L_KD(z_s, z_t, D)``; discriminator objective
``log D(h_t) + log(1 - D(h_s))`` (maximised). Here, with ``h`` the logits (``level="logits"``, as in
Xu, Hsu & Huang (ICLR-W 2018), "Training Shallow and Thin Networks for Acceleration via Knowledge
Distillation with Conditional Adversarial Networks") or a tapped feature (``level="features"``, as in
Chung, Park, Kim & Kwak (ICML 2020), "Feature-map-level Online Adversarial Knowledge
Distillation"), ``D(h) = sigmoid(d(h))``::

    student:        w_task·CE(z_s, y) + w_kd·T²·KL(p_t ‖ p_s) + w_adv·G(h_s)
                    G = -log D(h_s)          (generator_loss="non_saturating", default; Goodfellow 2014)
                    G =  log(1 - D(h_s))     (generator_loss="minimax", the survey's literal form)
    discriminator:  L_D = -[log D(h_t) + log(1 - D(h_s))]   (batch means; h_s detached)

Updates alternate: the training loop steps the student on its loss, then the discriminator on
``auxiliary_loss("discriminator")``, computed from the teacher and student outputs stashed by the
forward. The discriminator's parameters never receive the student loss' gradient (the student's
adversarial term runs the discriminator with detached weights). Xu et al. condition the
discriminator on the label; this one is unconditional. The default discriminator is an MLP on the
pooled input (``Linear -> LeakyReLU(0.2) -> Linear``); pass ``discriminator=`` for another.

Trainable by the main optimiser: the student and the feature connector. Auxiliary: the
discriminator. Exported: the student (and the connector if asked).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call
from torch.nn.parameter import UninitializedParameter

from ..connectors import LazyConnector
from ..distiller import call_model
from ..errors import KDConfigError
from ..losses.logit import KDLoss
from ..registry import SCHEMES
from ..taps import FeatureTaps
from .base import Scheme, Weight, export_of, weight_schedule
from .self_distillation import pool_features

GENERATOR_LOSSES = ("non_saturating", "minimax")


class Discriminator(nn.Module):
    """``d(h) = Linear(LeakyReLU(Linear(pool(h))))``: one logit per sample (input width read lazily)."""

    def __init__(self, hidden: int = 64):
        super().__init__()
        self.net = nn.Sequential(nn.LazyLinear(hidden), nn.LeakyReLU(0.2), nn.Linear(hidden, 1))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.net(pool_features(h).flatten(1)).squeeze(-1)


def discriminator_loss(d_teacher: torch.Tensor, d_student: torch.Tensor) -> torch.Tensor:
    """``-[log D(h_t) + log(1 - D(h_s))]`` from discriminator logits, batch means."""
    return -(F.logsigmoid(d_teacher).mean() + F.logsigmoid(-d_student).mean())


def generator_loss(d_student: torch.Tensor, kind: str = "non_saturating") -> torch.Tensor:
    """The student's adversarial term from discriminator logits on the student's outputs."""
    if kind == "non_saturating":
        return -F.logsigmoid(d_student).mean()
    return F.logsigmoid(-d_student).mean()


@SCHEMES.register("adversarial", "gan")
class Adversarial(Scheme):
    """Student + frozen teacher + discriminator, trained in alternation (see module docstring).

    Args:
        student, teacher: the trained model and the frozen teacher.
        level: ``"logits"`` or ``"features"`` (then ``student_tap`` / ``teacher_tap`` name modules).
        connector: connector kind mapping the student feature to the teacher's shape (``None``: the
            shapes must match already).
        discriminator: a module mapping ``h`` to one logit per sample; default :class:`Discriminator`.
        temperature: T of the KD term.
        task_weight, kd_weight, adv_weight: numbers or weight schedules (``kd_weight=0`` leaves the
            adversarial term as the only teacher signal).
        generator_loss: ``"non_saturating"`` or ``"minimax"``.
    """

    def __init__(
        self,
        student: nn.Module,
        teacher: nn.Module,
        level: str = "logits",
        student_tap: str | None = None,
        teacher_tap: str | None = None,
        connector: str | dict | None = "auto",
        discriminator: nn.Module | None = None,
        hidden: int = 64,
        temperature: float = 4.0,
        task_weight: Weight = 1.0,
        kd_weight: Weight = 1.0,
        adv_weight: Weight = 0.1,
        generator_loss: str = "non_saturating",
        task_loss: Any = "cross_entropy",
        check_finite: bool = True,
    ):
        super().__init__(task_loss=task_loss, check_finite=check_finite)
        if level not in ("logits", "features"):
            raise KDConfigError(f"adversarial: level must be 'logits' or 'features', got {level!r}")
        if generator_loss not in GENERATOR_LOSSES:
            raise KDConfigError(f"adversarial: generator_loss must be one of {GENERATOR_LOSSES}, got {generator_loss!r}")
        if level == "features" and not (student_tap and teacher_tap):
            raise KDConfigError("adversarial: level='features' needs student_tap and teacher_tap (module names)")
        self.student = student
        self.add_frozen("teacher", teacher)
        self.level = level
        self.discriminator = discriminator if discriminator is not None else Discriminator(hidden)
        self.connector = LazyConnector(connector) if level == "features" and connector is not None else None
        self._student_taps = FeatureTaps(student, {"h": student_tap}) if level == "features" else None
        self._teacher_taps = FeatureTaps(teacher, {"h": teacher_tap}, detach=True) if level == "features" else None
        self.kd = KDLoss(temperature=temperature)
        self.task_weight = weight_schedule(task_weight)
        self.kd_weight = weight_schedule(kd_weight)
        self.adv_weight = weight_schedule(adv_weight)
        self.generator_kind = generator_loss
        self._stash: tuple[torch.Tensor, torch.Tensor] | None = None

    @property
    def teacher(self) -> nn.Module:
        return self._frozen["teacher"]

    def export_model(self) -> nn.Module:
        return export_of(self.student)

    def export_connectors(self) -> nn.Module | None:
        return self.connector

    def auxiliary_parameters(self) -> dict[str, list[nn.Parameter]]:
        return {"discriminator": list(self.discriminator.parameters())}

    def auxiliary_loss(self, name: str) -> dict[str, torch.Tensor]:
        """The discriminator's loss on the last forward's (detached) teacher and student outputs."""
        if name != "discriminator":
            return super().auxiliary_loss(name)
        if self._stash is None:
            raise KDConfigError("adversarial: auxiliary_loss() needs a training forward first")
        dtype = next(self.discriminator.parameters()).dtype  # stashed under autocast, maybe bf16/fp16
        h_t, h_s = (h.to(dtype) for h in self._stash)
        d_t, d_s = self.discriminator(h_t), self.discriminator(h_s)
        loss = discriminator_loss(d_t, d_s)
        accuracy = ((d_t > 0).float().mean() + (d_s < 0).float().mean()) / 2
        return {"loss": loss, "d_loss": loss.detach(), "d_accuracy": accuracy.detach()}

    def forward(self, inputs: Any, target: torch.Tensor | None = None, index: torch.Tensor | None = None) -> dict:
        if self._student_taps is not None:
            raw = self._student_taps.run(lambda: call_model(self.student, inputs))
            h_s = self._student_taps.outputs["h"]
        else:
            raw, h_s = call_model(self.student, inputs), None
        logits = self.logits_fn(raw)
        t_logits, h_t = self._teacher(inputs, index)
        if self.level == "logits":
            h_s, h_t = logits, t_logits
        elif self.connector is not None:
            h_s = self.connector(h_s, tuple(h_t.shape))
        self._materialize(h_s)
        if self.training:
            self._stash = (h_t.detach(), h_s.detach())

        d_s = functional_call(self.discriminator, {n: p.detach() for n, p in self.discriminator.named_parameters()},
                              (h_s,))
        result: dict[str, Any] = {"student_output": raw}
        total = self.add_term(result, None, "task", self.task_term(logits, target), self.task_weight(self.step))
        total = self.add_term(result, total, "kd", self.kd(logits, t_logits), self.kd_weight(self.step))
        total = self.add_term(result, total, "adversarial", generator_loss(d_s, self.generator_kind),
                              self.adv_weight(self.step))
        result["loss"] = total
        return result

    def _teacher(self, inputs: Any, index: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        if self._teacher_taps is None:
            return self.run_frozen(self.teacher, inputs, index), None
        with torch.no_grad():
            raw = self._teacher_taps.run(lambda: call_model(self.teacher, inputs))
        return self.logits_fn(raw).detach(), self._teacher_taps.outputs["h"]

    def _materialize(self, h: torch.Tensor) -> None:
        if any(isinstance(p, UninitializedParameter) for p in self.discriminator.parameters()):
            with torch.no_grad():
                self.discriminator(h.detach())


__all__ = ["Adversarial", "Discriminator", "discriminator_loss", "generator_loss", "GENERATOR_LOSSES"]
