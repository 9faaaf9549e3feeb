"""Progressive distillation through teacher assistants (TAKD), run as one chain.

Mirzadeh, Farajtabar, Li, Levine, Matsukawa & Ghasemzadeh (AAAI 2020), "Improved Knowledge
Distillation via Teacher Assistant": when the teacher-student gap is wide, distil
``teacher -> assistant_1 -> ... -> assistant_k -> student``; each stage is ordinary offline
distillation, and the student of stage ``s`` is the (frozen) teacher of stage ``s + 1``::

    stage s:   L = w_task·CE(z_s, y) + Σ_terms w·L_term(student_s, teacher_s),
               teacher_0 = teacher, teacher_{s+1} = trained student_s

The chain is a runner, not a module: :meth:`AssistantChain.run` builds each stage's offline
:class:`~kd_tasks.shared.distiller.Distiller` (same recipe for every stage) and hands it to a
``train_fn(scheme, stage_name)`` -- normally a :class:`~kd_tasks.shared.training.Trainer` fit with
one output directory per stage, so an interrupted chain resumes stage by stage. Exported: the
final student.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence

from torch import nn

from ..config import resolve_task_loss
from ..distiller import Distiller, freeze
from ..errors import KDConfigError
from ..registry import SCHEMES
from .base import as_module_list

DEFAULT_TERMS = ({"name": "kd", "loss": {"type": "kd", "temperature": 4.0}},)


@SCHEMES.register("assistant", "takd")
class AssistantChain:
    """``teacher -> assistants... -> student``, each stage distilled offline by the same recipe.

    Args:
        teacher: the frozen original teacher.
        assistants: mid-sized models, largest first (at least one).
        student: the final model.
        terms: Distiller term configs used at every stage (default: Hinton KD at T = 4).
        task_loss, task_weight: the task term of every stage.
        names: stage names (default ``assistant1, ..., student``), used as output sub-directories.
    """

    def __init__(
        self,
        teacher: nn.Module,
        assistants: Sequence[nn.Module],
        student: nn.Module,
        terms: Sequence[Mapping[str, Any]] = DEFAULT_TERMS,
        task_loss: Any = "cross_entropy",
        task_weight: Any = 1.0,
        names: Sequence[str] | None = None,
    ):
        self.teacher = teacher
        self.models = as_module_list(list(assistants), "assistant: assistant") + [student]
        if len(self.models) < 2:
            raise KDConfigError("assistant: give at least one assistant (without one, use the offline scheme)")
        self.names = list(names) if names is not None else [f"assistant{i + 1}" for i in range(len(self.models) - 1)] + ["student"]
        if len(self.names) != len(self.models) or len(set(self.names)) != len(self.names):
            raise KDConfigError(f"assistant: need {len(self.models)} distinct stage names, got {self.names}")
        self.terms = list(terms)
        self.task_loss = task_loss
        self.task_weight = task_weight
        self.results: dict[str, Any] = {}

    def stage_scheme(self, stage: int, teacher: nn.Module) -> Distiller:
        """The offline scheme of ``stage`` (0-based) with the given (already trained) teacher."""
        return Distiller(
            self.models[stage],
            teacher,
            terms=self.terms,
            task_loss=resolve_task_loss(self.task_loss),
            task_weight=self.task_weight,
        )

    def run(self, train_fn: Callable[[nn.Module, str], Any]) -> nn.Module:
        """Train every stage in order with ``train_fn(scheme, stage_name)``; returns the final student.

        ``train_fn``'s return value is kept in ``self.results[stage_name]``.
        """
        teacher = self.teacher
        for stage, name in enumerate(self.names):
            scheme = self.stage_scheme(stage, teacher)
            self.results[name] = train_fn(scheme, name)
            if stage + 1 < len(self.models):
                teacher = freeze(scheme.export_model())
        return self.export_model()

    def export_model(self) -> nn.Module:
        return self.models[-1]


__all__ = ["AssistantChain", "DEFAULT_TERMS"]
