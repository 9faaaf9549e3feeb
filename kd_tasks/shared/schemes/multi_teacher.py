"""Multi-teacher distillation: an ensemble of frozen teachers is the student's target.

Survey form: ``L = L(z, y) + L_KD(z, E(z_1, ..., z_n))``. Here::

    L = w_task·CE(z, y) + w_kd·T²·KL(p_E ‖ softmax(z / T))

with the ensemble ``E`` formed per sample from teacher weights ``w_k(x)`` (summing to 1):

``space="probability"`` (default): ``p_E = Σ_k w_k · softmax(z_k / T)`` -- averaging the teachers'
soft predictions, as Hinton et al. (2015) do for an ensemble. Passed to the KD loss as the logits
``T·log p_E`` (whose softmax at temperature T is ``p_E``).

``space="logit"``: ``p_E = softmax(Σ_k w_k · z_k / T)``.

Weights (``weighting``):

- ``"mean"``: ``w_k = 1/n``;
- ``"fixed"``: the given ``weights``, normalised to sum 1;
- ``"confidence"``: per sample, from each teacher's cross-entropy against the label -- Zhang, Chen &
  Wang (ICASSP 2022), "Confidence-Aware Multi-Teacher Knowledge Distillation" (CA-MKD)::

      w_k(x) = 1/(n-1) · (1 - exp(CE_k(x)) / Σ_j exp(CE_j(x)))

  a teacher that is more confident in the true class weighs more. Needs the target. CA-MKD applies
  these weights to per-teacher KL terms; here they weight the ensemble target, as the survey's
  ``E(z_1, ..., z_n)`` states it.

Teachers may have different architectures; they must predict the same classes. A teacher may be a
:class:`~kd_tasks.shared.cache.CachedTeacher` (looked up by sample index).

Trainable: the student. Exported: the student.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import KDConfigError, ShapeMismatchError
from ..losses.logit import KDLoss
from ..registry import SCHEMES
from .base import Scheme, Weight, as_module_list, export_of, weight_schedule

WEIGHTINGS = ("mean", "fixed", "confidence")
SPACES = ("probability", "logit")


def teacher_weights(
    teacher_logits: Sequence[torch.Tensor],
    weighting: str = "mean",
    weights: Sequence[float] | None = None,
    target: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per-sample teacher weights ``(B, n)`` summing to 1 over ``n`` (see the module docstring)."""
    n, batch = len(teacher_logits), teacher_logits[0].shape[0]
    ref = teacher_logits[0]
    if weighting == "mean":
        return ref.new_full((batch, n), 1.0 / n)
    if weighting == "fixed":
        if weights is None or len(weights) != n:
            raise KDConfigError(f"multi_teacher: weighting 'fixed' needs {n} weights, got {weights!r}")
        w = torch.as_tensor(weights, dtype=ref.dtype, device=ref.device)
        if bool((w < 0).any()) or float(w.sum()) <= 0:
            raise KDConfigError(f"multi_teacher: weights must be non-negative with a positive sum, got {list(weights)}")
        return (w / w.sum()).expand(batch, n)
    if weighting == "confidence":
        if target is None:
            raise KDConfigError("multi_teacher: weighting 'confidence' needs the labels (target) of the batch")
        if n == 1:
            return ref.new_ones(batch, 1)
        ce = torch.stack([F.cross_entropy(z.float(), target, reduction="none") for z in teacher_logits], dim=1)
        return ((1.0 - torch.softmax(ce, dim=1)) / (n - 1)).to(ref.dtype)
    raise KDConfigError(f"multi_teacher: weighting must be one of {', '.join(WEIGHTINGS)}; got {weighting!r}")


def ensemble_logits(
    teacher_logits: Sequence[torch.Tensor], weights: torch.Tensor, temperature: float, space: str = "probability"
) -> torch.Tensor:
    """Logits whose softmax at ``temperature`` is the ensemble distribution ``p_E``."""
    stacked = torch.stack(list(teacher_logits), dim=-1)  # (B, C, n)
    w = weights.unsqueeze(1)  # (B, 1, n)
    if space == "logit":
        return (stacked * w).sum(-1)
    if space == "probability":
        probs = (torch.softmax(stacked.float() / temperature, dim=1) * w.float()).sum(-1)
        return (temperature * probs.clamp_min(torch.finfo(probs.dtype).tiny).log()).to(stacked.dtype)
    raise KDConfigError(f"multi_teacher: space must be one of {', '.join(SPACES)}; got {space!r}")


@SCHEMES.register("multi_teacher", "multi-teacher", "ensemble")
class MultiTeacher(Scheme):
    """A student distilled from an ensemble of frozen teachers (see module docstring).

    Args:
        student: the model trained and exported.
        teachers: frozen models (or cached teachers) predicting the same classes.
        temperature: T of the soft targets and the KD term.
        weighting: ``"mean"``, ``"fixed"`` (with ``weights``) or ``"confidence"``.
        space: ``"probability"`` (average soft predictions) or ``"logit"`` (average logits).
        task_weight, kd_weight: numbers or weight schedules.
    """

    def __init__(
        self,
        student: nn.Module,
        teachers: Sequence[nn.Module],
        temperature: float = 4.0,
        weighting: str = "mean",
        weights: Sequence[float] | None = None,
        space: str = "probability",
        task_weight: Weight = 1.0,
        kd_weight: Weight = 1.0,
        task_loss: Any = "cross_entropy",
        check_finite: bool = True,
    ):
        super().__init__(task_loss=task_loss, check_finite=check_finite)
        if weighting not in WEIGHTINGS:
            raise KDConfigError(f"multi_teacher: weighting must be one of {', '.join(WEIGHTINGS)}; got {weighting!r}")
        if space not in SPACES:
            raise KDConfigError(f"multi_teacher: space must be one of {', '.join(SPACES)}; got {space!r}")
        self.student = student
        self.num_teachers = len(as_module_list(teachers, "multi_teacher: teacher"))
        for i, t in enumerate(teachers):
            self.add_frozen(f"teacher{i}", t)
        self.temperature = float(temperature)
        self.weighting, self.weights, self.space = weighting, weights, space
        if weighting == "fixed":
            teacher_weights([torch.zeros(1, 1)] * self.num_teachers, weighting, weights)  # validate now
        self.kd = KDLoss(temperature=temperature)
        self.task_weight = weight_schedule(task_weight)
        self.kd_weight = weight_schedule(kd_weight)

    @property
    def teachers(self) -> list[nn.Module]:
        return [self._frozen[f"teacher{i}"] for i in range(self.num_teachers)]

    def export_model(self) -> nn.Module:
        return export_of(self.student)

    def forward(self, inputs: Any, target: torch.Tensor | None = None, index: torch.Tensor | None = None) -> dict:
        raw, logits = self.model_logits(self.student, inputs)
        result: dict[str, Any] = {"student_output": raw}
        t_logits = [self.run_frozen(t, inputs, index) for t in self.teachers]
        for i, z in enumerate(t_logits):
            if z.shape != logits.shape:
                raise ShapeMismatchError(
                    f"multi_teacher: teacher #{i} predicts shape {tuple(z.shape)} but the student {tuple(logits.shape)}; "
                    "every teacher must predict the student's classes"
                )
        with torch.no_grad():
            w = teacher_weights(t_logits, self.weighting, self.weights, target)
            target_logits = ensemble_logits(t_logits, w, self.temperature, self.space)
        total = self.add_term(result, None, "task", self.task_term(logits, target), self.task_weight(self.step))
        total = self.add_term(result, total, "kd", self.kd(logits, target_logits), self.kd_weight(self.step))
        result["loss"] = total
        return result


__all__ = ["MultiTeacher", "teacher_weights", "ensemble_logits", "WEIGHTINGS", "SPACES"]
