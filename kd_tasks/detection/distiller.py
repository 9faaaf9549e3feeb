"""``DetectionDistiller``: an MMEngine model that trains an MMDetection student with a frozen teacher.

Registered in MMDetection's ``MODELS`` registry, so an MMEngine config builds it::

    model = dict(
        type="DetectionDistiller",
        student=student_cfg.model,                 # any MMDetection detector config
        teacher=teacher_cfg.model,
        teacher_ckpt="work_dirs/retinanet_r50/epoch_12.pth",
        distill=dict(terms=[
            dict(name="cwd_p3", loss=dict(type="cwd", temperature=1.0), student="neck:0", teacher="neck:0",
                 weight=10.0),
        ]),
    )

How one training step runs (``loss``):

1. the student computes its own detection losses (``mode="loss"``); forward hooks on the tapped
   modules (``neck:0`` = element 0 of the FPN's output tuple, ``bbox_head:0.2`` = class scores of
   level 2, ``backbone.layer3``, ...) capture its features on the way;
2. the teacher runs on the same batch under ``no_grad`` in eval mode (``mode="predict"``) and stops
   after its last tapped module: the head is skipped when only neck features are distilled, and
   box post-processing (NMS) never runs;
3. each term of the recipe (a :class:`kd_tasks.shared.Distiller` term: loss from the shared
   ``LOSSES`` registry, optional connector, weight or weight schedule) compares the two.

``loss()`` returns the student's loss dict (scaled by ``task_weight`` when not 1) plus one
``loss_<term>`` entry per distillation term, already weighted, so MMEngine sums them into the total
and logs each one. ``predict`` and ``tensor`` modes are the student's, and so is the data
preprocessor.

The teacher is not a submodule: MMEngine's DDP wrapper, ``init_weights``, the optimiser and the
checkpoints never see it (it is rebuilt from its config and checkpoint). ``model.to(device)`` moves it
along. Connectors and learnable loss parts are built at construction by one dry forward of a small
blank image, so DDP and the optimiser find their parameters from the first step.
"""

from __future__ import annotations

import logging
from typing import Any, Mapping, Sequence

import torch
from mmengine.config import ConfigDict
from mmengine.logging import print_log
from mmengine.model import BaseModel
from mmengine.structures import InstanceData
from torch import nn

from mmdet.registry import MODELS
from mmdet.structures import DetDataSample

from kd_tasks.shared.config import check_keys, resolve_dtype
from kd_tasks.shared.distiller import Distiller
from kd_tasks.shared.errors import KDConfigError
from kd_tasks.shared.schedules import build_schedule

from .checkpoint import LoadReport, load_weights

DISTILL_KEYS = ("scheme", "terms", "task_weight", "teacher_dtype", "check_finite")
RESERVED_TAPS = ("logits", "output")
# The teacher runs in "predict" mode and stops after its last tapped module (before any post-processing).
# Not "tensor": MMDetection's tensor mode calls ``bbox_head.forward`` directly, so head taps would not fire.
TEACHER_MODE = "predict"


class _WeightedTermsDistiller(Distiller):
    """The shared :class:`Distiller` (whose ``result["weighted"][name]`` keeps each term's gradient,
    so each term becomes its own ``loss_<name>`` entry for MMEngine), initialised like a detector."""

    def init_weights(self) -> None:
        """The student's ``init_cfg`` initialisation, reached by MMEngine's recursive ``init_weights``
        (the teacher is not a submodule: it keeps its checkpoint)."""
        if hasattr(self.student, "init_weights") and not getattr(self.student, "is_init", False):
            self.student.init_weights()


def _zero_logits(output: Any) -> torch.Tensor:
    """Used by the core only when no term is active (all weights 0): a detector has no logits."""
    return torch.zeros(())


def build_detector(model: nn.Module | Mapping[str, Any], role: str) -> nn.Module:
    """An MMDetection detector from a config dict (or the module itself)."""
    if isinstance(model, nn.Module):
        return model
    if not isinstance(model, Mapping) or "type" not in model:
        raise KDConfigError(f"{role} must be an MMDetection model config (a dict with 'type') or a module; got {model!r}")
    try:
        return MODELS.build(ConfigDict(model))
    except KeyError as e:
        raise KDConfigError(f"cannot build the {role} from its config: {e}") from None


def _check_terms(terms: Sequence[Any]) -> None:
    """Reject taps a detector cannot offer: in training the student's output is its loss dict."""
    for i, term in enumerate(terms):
        if not isinstance(term, Mapping):
            continue
        for side in ("student", "teacher"):
            specs = term.get(side, "logits")
            for spec in [specs] if isinstance(specs, str) else list(specs):
                if isinstance(spec, str) and spec.split(":")[0] in RESERVED_TAPS:
                    raise KDConfigError(
                        f"term #{i} ({term.get('name', '?')}): {side} tap {spec!r} does not apply to detectors "
                        "(their training output is a dict of losses). Tap modules instead: 'neck:0'..'neck:4' "
                        "(FPN levels), 'bbox_head:0.<level>' (class scores), 'bbox_head:1.<level>' (box deltas), "
                        "'backbone:<stage>'."
                    )


def _normalization(preprocessor: nn.Module) -> tuple[bool, torch.Tensor | None, torch.Tensor | None]:
    """(channel flip, mean, std) of an MMEngine image data preprocessor."""
    flip = bool(getattr(preprocessor, "_channel_conversion", False))
    if getattr(preprocessor, "_enable_normalize", False):
        return flip, preprocessor.mean.detach().clone(), preprocessor.std.detach().clone()
    return flip, None, None


@MODELS.register_module()
class DetectionDistiller(BaseModel):
    """Distil an MMDetection teacher into an MMDetection student (see the module docstring).

    Args:
        student: the student's model config (``cfg.model`` of an MMDetection config) or a detector.
        teacher: the teacher's model config or a detector.
        teacher_ckpt: the teacher's checkpoint file (an MMDetection / MMEngine ``.pth``, a plain state
            dict, or a kd-tasks distillation checkpoint whose student becomes the teacher). ``None``
            keeps a randomly initialised teacher and says so loudly (for smoke tests only).
        teacher_strict: raise when the checkpoint's keys do not match the teacher config (default);
            ``False`` loads what matches and warns.
        distill: the recipe's ``distill`` section: ``terms`` (list of term dicts with ``name, loss,
            student, teacher, weight, connector``), ``task_weight`` (scale or schedule for the student's
            own detection losses, default 1), ``teacher_dtype`` (``bf16``/``fp16`` autocast for the
            teacher), ``check_finite``.
        dry_run_size: side of the blank image used at construction to build connectors.
        data_preprocessor: ignored unless given explicitly; the student's preprocessor is used.
    """

    def __init__(
        self,
        student: Mapping[str, Any] | nn.Module,
        teacher: Mapping[str, Any] | nn.Module,
        teacher_ckpt: str | None = None,
        distill: Mapping[str, Any] | None = None,
        teacher_strict: bool = True,
        dry_run_size: int = 128,
        data_preprocessor: Mapping[str, Any] | nn.Module | None = None,
        init_cfg: Mapping[str, Any] | None = None,
    ):
        student_model = build_detector(student, "student")
        super().__init__(data_preprocessor=data_preprocessor or student_model.data_preprocessor, init_cfg=init_cfg)
        teacher_model = build_detector(teacher, "teacher")
        self.teacher_load_report = self._load_teacher(teacher_model, teacher_ckpt, teacher_strict)

        section = dict(distill or {})
        check_keys(section, DISTILL_KEYS, "distill section")
        if section.pop("scheme", "offline") != "offline":
            raise KDConfigError("DetectionDistiller runs the offline scheme (a frozen teacher); set scheme: offline")
        terms = section.get("terms")
        if not terms:
            raise KDConfigError(
                "distill section has no 'terms'; e.g. terms: [{name: cwd_p3, loss: {type: cwd}, "
                "student: 'neck:0', teacher: 'neck:0', weight: 10}]"
            )
        _check_terms(terms)
        self.task_weight = build_schedule(section.get("task_weight", 1.0))
        self.distiller = _WeightedTermsDistiller(
            student_model,
            teacher_model,
            terms=terms,
            task_loss=None,
            logits_fn=_zero_logits,
            teacher_dtype=resolve_dtype(section.get("teacher_dtype")),
            check_finite=section.get("check_finite", True),
        )
        self._teacher_affine = self._input_conversion(student_model, teacher_model)
        self._dry_run(int(dry_run_size))

    # -- parts ----------------------------------------------------------------------------------
    @property
    def student(self) -> nn.Module:
        return self.distiller.student

    @property
    def teacher(self) -> nn.Module:
        return self.distiller.teacher

    @property
    def step(self) -> int:
        return self.distiller.step

    def set_step(self, step: int) -> None:
        """Set the iteration that weight schedules read (``DistillStepHook`` calls this every iteration)."""
        self.distiller.set_step(step)

    def weights(self) -> dict[str, float]:
        """Current weight of every term, and ``task`` for the student's own losses."""
        return dict(self.distiller.weights(), task=self.task_weight(self.step))

    @staticmethod
    def _load_teacher(teacher: nn.Module, ckpt: str | None, strict: bool) -> LoadReport | None:
        if ckpt is None:
            print_log(
                "DetectionDistiller: NO TEACHER CHECKPOINT given; the teacher keeps random weights and "
                "distillation will teach noise. Pass teacher_ckpt= (kd-tasks detect --teacher-checkpoint).",
                logger="current", level=logging.WARNING,
            )
            return None
        report = load_weights(teacher, ckpt, strict=strict)
        level = logging.INFO if report.ok else logging.WARNING
        prefix = "" if report.ok else "TEACHER CHECKPOINT DOES NOT MATCH ITS CONFIG: "
        print_log(f"DetectionDistiller: {prefix}{report.summary()}", logger="current", level=level)
        return report

    # -- teacher inputs -------------------------------------------------------------------------
    @staticmethod
    def _input_conversion(student: nn.Module, teacher: nn.Module):
        """Per-channel ``(flip, scale, shift)`` that turns the student's normalised images into the
        teacher's normalisation, or ``None`` when both preprocessors normalise alike."""
        s_pre, t_pre = getattr(student, "data_preprocessor", None), getattr(teacher, "data_preprocessor", None)
        if s_pre is None or t_pre is None:
            return None
        s_flip, s_mean, s_std = _normalization(s_pre)
        t_flip, t_mean, t_std = _normalization(t_pre)
        ones, zeros = torch.ones(3, 1, 1), torch.zeros(3, 1, 1)
        s_mean, s_std = (zeros, ones) if s_mean is None else (s_mean, s_std)
        t_mean, t_std = (zeros, ones) if t_mean is None else (t_mean, t_std)
        flip = s_flip != t_flip
        if not flip and torch.equal(s_mean, t_mean) and torch.equal(s_std, t_std):
            return None
        # raw (in the student's channel order) = x * s_std + s_mean; teacher: (flip(raw) - t_mean) / t_std
        if flip:
            s_mean, s_std = s_mean.flip(0), s_std.flip(0)
        return flip, s_std / t_std, (s_mean - t_mean) / t_std

    def teacher_inputs(self, inputs: torch.Tensor) -> torch.Tensor:
        """The batch as the teacher's own data preprocessor would have normalised it."""
        if self._teacher_affine is None:
            return inputs
        flip, scale, shift = self._teacher_affine
        if flip:
            inputs = inputs.flip(1)
        return inputs * scale.to(inputs) + shift.to(inputs)

    # -- forward --------------------------------------------------------------------------------
    def forward(self, inputs: torch.Tensor, data_samples: list | None = None, mode: str = "tensor"):
        if mode == "loss":
            return self.loss(inputs, data_samples)
        if mode in ("predict", "tensor"):
            return self.student(inputs, data_samples, mode=mode)
        raise RuntimeError(f'Invalid mode "{mode}"; use "loss", "predict" or "tensor"')

    def predict(self, inputs: torch.Tensor, data_samples: list | None = None):
        return self.student(inputs, data_samples, mode="predict")

    def _forward(self, inputs: torch.Tensor, data_samples: list | None = None):
        return self.student(inputs, data_samples, mode="tensor")

    def _extra(self, inputs: torch.Tensor, data_samples: list | None) -> dict[str, Any]:
        """Keyword arguments offered to every loss (a loss receives those its ``forward`` takes)."""
        boxes = [ds.gt_instances.bboxes for ds in data_samples] if data_samples else []
        return {"gt_boxes": boxes, "input_shape": tuple(inputs.shape[-2:])}

    def loss(self, inputs: torch.Tensor, data_samples: list) -> dict[str, Any]:
        """Student detection losses + one weighted ``loss_<term>`` per distillation term."""
        out = self.distiller(
            {"inputs": inputs, "data_samples": data_samples, "mode": "loss"},
            teacher_inputs={"inputs": self.teacher_inputs(inputs), "data_samples": data_samples, "mode": TEACHER_MODE},
            **self._extra(inputs, data_samples),
        )
        losses = dict(out["student_output"])
        task_weight = self.task_weight(self.step)
        if task_weight != 1.0:
            losses = {k: _scale(v, task_weight) if "loss" in k else v for k, v in losses.items()}
        for name, value in out.get("weighted", {}).items():
            key = f"loss_{name}"
            if key in losses:
                raise KDConfigError(f"distillation term {name!r} clashes with the student's loss {key!r}; rename the term")
            losses[key] = value
        return losses

    @torch.no_grad()
    def _dry_run(self, size: int) -> None:
        """One blank image through student and teacher: builds lazy connectors, checks every tap."""
        device = next(self.student.parameters()).device
        image = torch.zeros(1, 3, size, size, device=device)
        meta = dict(img_shape=(size, size), ori_shape=(size, size), pad_shape=(size, size),
                    batch_input_shape=(size, size), scale_factor=(1.0, 1.0))
        sample = DetDataSample(metainfo=meta)
        sample.gt_instances = InstanceData(bboxes=torch.zeros(0, 4, device=device),
                                           labels=torch.zeros(0, dtype=torch.long, device=device))
        self.distiller.prepare(
            {"inputs": image, "data_samples": [sample], "mode": "predict"},
            teacher_inputs={"inputs": self.teacher_inputs(image), "data_samples": [sample], "mode": TEACHER_MODE},
            **self._extra(image, [sample]),
        )


def _scale(value: Any, weight: float) -> Any:
    if isinstance(value, torch.Tensor):
        return value * weight
    return [v * weight for v in value]


__all__ = ["DetectionDistiller", "build_detector"]
