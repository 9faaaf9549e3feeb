"""``DetectionDistiller``: an MMEngine model that trains an MMDetection student with a frozen teacher.

Registered in MMDetection's ``MODELS`` registry, so an MMEngine config builds it::

    model = dict(
        type="DetectionDistiller",
        student=student_cfg.model,                 # any MMDetection detector config
        teacher=teacher_cfg.model,
        teacher_ckpt="work_dirs/retinanet_r50/epoch_12.pth",
        distill=dict(terms=[
            dict(name="cwd_p3", loss=dict(type="cwd", temperature=1.0), student="neck@P3", teacher="neck@P3",
                 weight=10.0),
        ]),
    )

How one training step runs (``loss``):

1. the student computes its own detection losses (``mode="loss"``); forward hooks on the tapped
   modules capture its features on the way: ``neck@P3`` = the FPN output of stride 8 (whatever its
   position: P2-P6 and P3-P7 FPNs pair correctly, see :mod:`kd_tasks.detection.levels`),
   ``bbox_head:0@P3`` = class scores of that level, ``bbox_head.cls_convs.1@P3`` = a head convolution's
   call on that level (heads run once per level), ``neck:0`` / ``module#k`` = by position / call number;
   a term whose two maps have different strides is refused;
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
blank image, so DDP and the optimiser find their parameters from the first step; a term at weight 0
keeps them in the graph with a zero ``loss_idle_terms``, so DDP needs no ``find_unused_parameters``.
Everything built after the student (teacher, connectors, loss parts, dry run) draws from a random
generator of its own: the student's initialisation and data order equal a plain MMDetection run with
the same seed, which makes "student alone vs student + KD" comparisons paired.
"""

from __future__ import annotations

import copy
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

from kd_tasks.shared.checkpoint import digest, preserved_rng, state_digest
from kd_tasks.shared.config import check_keys, resolve_dtype
from kd_tasks.shared.distiller import Distiller, distillation_seed
from kd_tasks.shared.errors import KDConfigError
from kd_tasks.shared.schedules import build_schedule

from .checkpoint import LoadReport, load_weights
from .levels import check_strides, resolve_level_taps

DISTILL_KEYS = ("scheme", "terms", "task_weight", "teacher_dtype", "check_finite")
RESERVED_TAPS = ("logits", "output")
# The teacher runs in "predict" mode and stops after its last tapped module (before any post-processing).
# Not "tensor": MMDetection's tensor mode calls ``bbox_head.forward`` directly, so head taps would not fire.
TEACHER_MODE = "predict"


class _WeightedTermsDistiller(Distiller):
    """The shared :class:`Distiller` (whose ``result["weighted"][name]`` keeps each term's gradient,
    so each term becomes its own ``loss_<name>`` entry for MMEngine), initialised like a detector."""

    student_ckpt: str | None = None

    def init_weights(self) -> None:
        """The student's ``init_cfg`` initialisation, reached by MMEngine's recursive ``init_weights``
        (the teacher is not a submodule: it keeps its checkpoint), then the student's own ``load_from``
        checkpoint when the student config names one (as plain MMEngine would load it after init)."""
        if hasattr(self.student, "init_weights") and not getattr(self.student, "is_init", False):
            self.student.init_weights()
        if self.student_ckpt:
            report = load_weights(self.student, self.student_ckpt, strict=False)
            level = logging.INFO if report.ok else logging.WARNING
            print_log(f"DetectionDistiller: student load_from: {report.summary()}", logger="current", level=level)


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
            specs = term.get(side, term.get("student", "logits"))
            for spec in [specs] if isinstance(specs, str) else list(specs):
                if isinstance(spec, str) and spec.split(":")[0] in RESERVED_TAPS:
                    raise KDConfigError(
                        f"term #{i} ({term.get('name', '?')}): {side} tap {spec!r} does not apply to detectors "
                        "(their training output is a dict of losses). Tap modules instead: 'neck@P3' (the FPN level of "
                        "stride 8), 'bbox_head:0@P3' (its class scores), 'bbox_head:1@P3' (its box predictions), "
                        "'bbox_head.cls_convs.0@P3' (a head conv on that level), 'backbone:<stage>'."
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
        student_ckpt: weights the student starts from (the student config's ``load_from``; ``kd-tasks
            detect`` moves it here), loaded after the student's own initialisation, non-strictly like
            MMEngine's ``load_from``, with the missing/unexpected keys logged.
        allow_stride_mismatch: let a term compare student and teacher maps of different strides (refused
            by default: see :mod:`kd_tasks.detection.levels`).
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
        student_ckpt: str | None = None,
        allow_stride_mismatch: bool = False,
        dry_run_size: int = 128,
        data_preprocessor: Mapping[str, Any] | nn.Module | None = None,
        init_cfg: Mapping[str, Any] | None = None,
    ):
        # The student is built first, exactly as plain MMDetection builds it; everything after it (teacher,
        # connectors, learnable loss parts, the dry run) draws from a generator of its own, so the student's
        # initialisation and the data order equal a plain run with the same seed.
        student_model = build_detector(student, "student")
        super().__init__(data_preprocessor=data_preprocessor or student_model.data_preprocessor, init_cfg=init_cfg)
        self.teacher_config = copy.deepcopy(dict(teacher)) if isinstance(teacher, Mapping) else None
        section = dict(distill or {})
        check_keys(section, DISTILL_KEYS, "distill section")
        if section.pop("scheme", "offline") != "offline":
            raise KDConfigError("DetectionDistiller runs the offline scheme (a frozen teacher); set scheme: offline")
        terms = section.get("terms")
        if not terms:
            raise KDConfigError(
                "distill section has no 'terms'; e.g. terms: [{name: cwd_p3, loss: {type: cwd}, "
                "student: 'neck@P3', teacher: 'neck@P3', weight: 10}]"
            )
        _check_terms(terms)
        self.task_weight = build_schedule(section.get("task_weight", 1.0))
        size = int(dry_run_size)
        with preserved_rng():
            torch.manual_seed(distillation_seed())
            teacher_model = build_detector(teacher, "teacher")
            self.teacher_load_report = self._load_teacher(teacher_model, teacher_ckpt, teacher_strict)
            self._teacher_affine = self._input_conversion(student_model, teacher_model)
            terms = self._resolve_levels(terms, student_model, teacher_model, size)
            self.distiller = _WeightedTermsDistiller(
                student_model,
                teacher_model,
                terms=terms,
                task_loss=None,
                logits_fn=_zero_logits,
                teacher_dtype=resolve_dtype(section.get("teacher_dtype")),
                check_finite=section.get("check_finite", True),
            )
            self.distiller.student_ckpt = student_ckpt
            self.resolved_terms = terms
            self._dry_run(size)
        if not allow_stride_mismatch:
            check_strides(self.distiller.prepared_shapes, terms, size)
        self.run_identity = {  # recorded in every checkpoint; a resume with other parts is refused
            "student_architecture": state_digest(student_model.state_dict(), with_values=False),
            "teacher": state_digest(teacher_model.state_dict()),
            "recipe": digest({"terms": [str(t) for t in terms], "task_weight": str(section.get("task_weight", 1.0)),
                              "teacher_dtype": str(section.get("teacher_dtype"))}),
        }

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
        extra = {"gt_boxes": boxes, "input_shape": tuple(inputs.shape[-2:])}
        head = getattr(self.student, "bbox_head", None)
        if isinstance(getattr(head, "cls_out_channels", None), int):  # classes per anchor of a dense head
            extra["num_classes"] = head.cls_out_channels
        return extra

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
        idle = self._idle_parameters(out.get("weighted", {}))
        if idle:  # a term at weight 0 this step: keep its parameters in the graph (gradient 0) for DDP
            losses["loss_idle_terms"] = sum(p.sum() for p in idle) * 0.0
        return losses

    def _idle_parameters(self, active: Mapping[str, Any]) -> list[nn.Parameter]:
        """Trainable connector / loss parameters of the terms that did not run this step."""
        params = []
        for term in self.distiller.terms:
            if term.name in active:
                continue
            for part in (self.distiller.connectors, self.distiller.losses):
                if term.name in part:
                    params += [p for p in part[term.name].parameters() if p.requires_grad]
        return params

    @staticmethod
    def _blank(model: nn.Module, size: int, count: int = 2) -> tuple[torch.Tensor, list]:
        """``count`` blank ``size`` x ``size`` images and their data samples (no boxes). Two, not one: a
        GroupNorm with one channel per group fails on a single image's 1x1 top level."""
        device = next(model.parameters()).device
        image = torch.zeros(count, 3, size, size, device=device)
        meta = dict(img_shape=(size, size), ori_shape=(size, size), pad_shape=(size, size),
                    batch_input_shape=(size, size), scale_factor=(1.0, 1.0))
        samples = []
        for _ in range(count):
            sample = DetDataSample(metainfo=meta)
            sample.gt_instances = InstanceData(bboxes=torch.zeros(0, 4, device=device),
                                               labels=torch.zeros(0, dtype=torch.long, device=device))
            samples.append(sample)
        return image, samples

    def _resolve_levels(self, terms: Sequence[Any], student: nn.Module, teacher: nn.Module, size: int) -> list:
        """Rewrite ``<tap>@P<n>`` taps to the index / call number of stride ``2**n`` on each side."""
        image, samples = self._blank(student, size)
        runs = {"student": lambda: student(image, samples, mode="predict"),
                "teacher": lambda: teacher(self.teacher_inputs(image), samples, mode=TEACHER_MODE)}
        return resolve_level_taps(terms, {"student": student, "teacher": teacher}, runs, size)

    @torch.no_grad()
    def _dry_run(self, size: int) -> None:
        """One blank image through student and teacher: builds lazy connectors, checks every tap."""
        image, samples = self._blank(self.student, size)
        self.distiller.prepare(
            {"inputs": image, "data_samples": samples, "mode": "predict"},
            teacher_inputs={"inputs": self.teacher_inputs(image), "data_samples": samples, "mode": TEACHER_MODE},
            **self._extra(image, samples),
        )

    def untrained_teacher(self) -> nn.Module:
        """A copy of the teacher with fresh random weights (no pretrained parts), in eval mode: the
        reference the teacher check compares the loaded teacher with. Built from the teacher's config
        when there is one; global random generators are left untouched."""
        with preserved_rng():
            torch.manual_seed(distillation_seed(1))
            if self.teacher_config is not None:
                model = build_detector(_without_pretrained(self.teacher_config), "teacher")
                if hasattr(model, "init_weights"):
                    model.init_weights()
            else:
                model = copy.deepcopy(self.teacher)  # a module given as teacher: re-initialise its copy
                for module in model.modules():
                    if hasattr(module, "reset_parameters"):
                        module.reset_parameters()
                    if hasattr(module, "is_init"):
                        module.is_init = False
                    if _is_pretrained(getattr(module, "init_cfg", None)):
                        module.init_cfg = None  # random weights, not a download
                if hasattr(model, "init_weights"):  # the detector's own init (e.g. the focal-loss prior bias)
                    model.init_weights()
        device = next(self.teacher.parameters()).device
        return model.to(device).requires_grad_(False).eval()


def _without_pretrained(cfg: Any) -> Any:
    """A model config with every ``init_cfg=dict(type='Pretrained', ...)`` removed (recursively)."""
    if isinstance(cfg, Mapping):
        out = {}
        for key, value in cfg.items():
            if key == "init_cfg" and _is_pretrained(value):
                out[key] = None
            else:
                out[key] = _without_pretrained(value)
        return out
    if isinstance(cfg, list):
        return [_without_pretrained(v) for v in cfg]
    return cfg


def _is_pretrained(init_cfg: Any) -> bool:
    items = init_cfg if isinstance(init_cfg, (list, tuple)) else [init_cfg]
    return any(isinstance(i, Mapping) and i.get("type") == "Pretrained" for i in items)


def _scale(value: Any, weight: float) -> Any:
    if isinstance(value, torch.Tensor):
        return value * weight
    return [v * weight for v in value]


__all__ = ["DetectionDistiller", "build_detector"]
