"""The offline distiller: a frozen teacher, a student, taps, connectors and weighted loss terms.

Distillation is declared as data, in the spirit of ``{(student_layer, teacher_layer): loss}``::

    distiller = Distiller(
        student, teacher,
        terms=[
            {"name": "kd", "loss": {"type": "kd", "temperature": 4}, "weight": 0.9},
            {"name": "hint", "loss": "mse", "student": "layer3", "teacher": "layer3",
             "connector": "auto", "weight": {"schedule": "linear", "start": 0, "end": 1, "steps": 500}},
        ],
        task_loss=nn.CrossEntropyLoss(), task_weight=0.1,
    )
    distiller.prepare(first_batch_inputs)        # builds lazy connectors from real shapes
    out = distiller(inputs, target=labels)       # {"loss": ..., "task": ..., "kd": ..., "hint": ...}

Tap names: ``"logits"`` (the default) is the model's prediction (a tensor output, or ``.logits`` /
``["logits"]`` / element 0 of what the model returns); ``"output"`` is the raw output, and
``"output:key"`` selects from it; any other name is a module tapped by forward hook (see
:mod:`kd_tasks.shared.taps`). A list of names passes a tuple to the loss (FSP takes two layers).

The teacher is frozen: ``requires_grad=False``, kept in ``eval()`` whatever ``train()`` is called
with, and run under ``torch.no_grad()`` (optionally in bf16/fp16 autocast). Its outputs can instead be
supplied precomputed (``teacher_outputs=``, e.g. from the teacher-output cache), which skips the teacher
forward. When no term uses the teacher's logits, the teacher forward stops after its last tapped module.
"""

from __future__ import annotations

import contextlib
import inspect
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

import torch
from torch import nn

from .checkpoint import preserved_rng
from .connectors import LazyConnector
from .errors import KDConfigError, NonFiniteLossError, ShapeMismatchError
from .registry import LOSSES, SCHEMES, check_kwargs
from .schedules import Schedule, build_schedule
from .taps import FeatureTaps, select, unwrap_model

RESERVED_TAPS = ("logits", "output")
TERM_KEYS = ("name", "loss", "student", "teacher", "weight", "connector")


def default_logits(output: Any) -> torch.Tensor:
    """The prediction tensor of a model output: the tensor itself, ``.logits``, ``["logits"]`` or element 0."""
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, Mapping) and "logits" in output:
        return output["logits"]
    if hasattr(output, "logits"):
        return output.logits
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    raise KDConfigError(
        f"cannot find logits in a model output of type {type(output).__name__}; pass logits_fn= "
        "to the Distiller or tap the output explicitly ('output:<key>')"
    )


def call_model(model: nn.Module, inputs: Any) -> Any:
    """``model(**inputs)`` for a dict, ``model(*inputs)`` for a tuple/list, else ``model(inputs)``."""
    if isinstance(inputs, Mapping):
        return model(**inputs)
    if isinstance(inputs, (tuple, list)):
        return model(*inputs)
    return model(inputs)


@dataclass
class Term:
    """One distillation term: ``weight(step) * loss(connector(student_tap), teacher_tap)``."""

    name: str
    loss: nn.Module
    student: tuple[str, ...] = ("logits",)
    teacher: tuple[str, ...] = ("logits",)
    weight: Schedule = field(default_factory=lambda: build_schedule(1.0))
    connector: str | dict | None = None

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any] | "Term", index: int = 0) -> "Term":
        if isinstance(cfg, Term):
            return cfg
        if not isinstance(cfg, Mapping):
            raise KDConfigError(f"term #{index} must be a dict with keys {TERM_KEYS}, got {cfg!r}")
        check_kwargs(_term_signature, cfg, f"term #{index}")
        if "loss" not in cfg:
            raise KDConfigError(f"term #{index} {dict(cfg)!r} has no 'loss'; e.g. loss: {{type: kd, temperature: 4}}")
        loss = cfg["loss"]
        if not isinstance(loss, nn.Module):
            loss = LOSSES.build(loss)  # the registry imports the built-in loss families at first lookup
        name = cfg.get("name") or (loss.__class__.__name__ if isinstance(cfg["loss"], nn.Module) else _type_name(cfg["loss"]))
        return cls(
            name=str(name),
            loss=loss,
            student=_taps(cfg.get("student", "logits")),
            teacher=_taps(cfg.get("teacher", cfg.get("student", "logits"))),
            weight=build_schedule(cfg.get("weight", 1.0)),
            connector=cfg.get("connector"),
        )


def _term_signature(name=None, loss=None, student=None, teacher=None, weight=None, connector=None):  # noqa: D401
    """Accepted keys of a term config (used only for key checking)."""


def _type_name(loss_cfg: Any) -> str:
    return loss_cfg if isinstance(loss_cfg, str) else str(loss_cfg.get("type", "term"))


def _taps(spec: str | Sequence[str]) -> tuple[str, ...]:
    if isinstance(spec, str):
        return (spec,)
    if isinstance(spec, Mapping):
        raise KDConfigError("a term's student/teacher is a tap string like 'layer3' or 'neck:0', or a list of them")
    return tuple(spec)


def _accepts(loss: nn.Module, kw: str) -> bool:
    try:
        return kw in inspect.signature(loss.forward).parameters
    except (TypeError, ValueError):
        return False


@SCHEMES.register("offline")
class Distiller(nn.Module):
    """Offline teacher -> student distillation (the default scheme).

    Args:
        student: the model being trained.
        teacher: a frozen model, or ``None`` when every teacher output comes from ``teacher_outputs=``.
        terms: list of term configs (dicts with keys ``name, loss, student, teacher, weight,
            connector``) or :class:`Term` objects.
        task_loss: ``f(student_logits, target)`` (e.g. ``nn.CrossEntropyLoss()``) or ``None``.
        task_weight: number or schedule for the task loss.
        logits_fn: how to find logits in a model output (default :func:`default_logits`).
        teacher_dtype: ``torch.bfloat16`` / ``torch.float16`` runs the teacher under autocast.
        check_finite: raise :class:`NonFiniteLossError` naming the term when a loss is NaN/inf.
    """

    def __init__(
        self,
        student: nn.Module,
        teacher: nn.Module | None,
        terms: Sequence[Mapping[str, Any] | Term] = ({"name": "kd", "loss": "kd"},),
        task_loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
        task_weight: float | Mapping[str, Any] | Schedule = 1.0,
        logits_fn: Callable[[Any], torch.Tensor] = default_logits,
        teacher_dtype: torch.dtype | None = None,
        check_finite: bool = True,
    ):
        super().__init__()
        self.student = student
        self.terms = [Term.from_config(t, i) for i, t in enumerate(terms)]
        names = [t.name for t in self.terms]
        dup = {n for n in names if names.count(n) > 1}
        if dup or {"loss", "task"} & set(names):
            raise KDConfigError(f"term names must be unique and not 'loss'/'task'; got {names}")
        self.losses = nn.ModuleDict({t.name: t.loss for t in self.terms})
        self.connectors = nn.ModuleDict(
            {t.name: LazyConnector(t.connector) for t in self.terms if t.connector is not None}
        )
        self.task_loss = task_loss
        self.task_weight = build_schedule(task_weight)
        self.logits_fn = logits_fn
        self.teacher_dtype = teacher_dtype
        self.check_finite = check_finite
        self.step = 0
        # The teacher is kept out of the module tree: it is not trained, not saved with the
        # student and never handed to DDP; move it with `.to()` of this module (overridden).
        self.__dict__["_teacher"] = teacher  # bypass nn.Module registration
        if teacher is not None:
            freeze(teacher)
            for term in self.terms:  # losses that run teacher modules on student features (e.g. CrossKD)
                if hasattr(term.loss, "bind_teacher"):
                    term.loss.bind_teacher(teacher)
        self.prepared_shapes: dict[str, tuple[Any, Any]] = {}  # term -> (student, teacher) shapes seen by prepare()
        self._student_taps = FeatureTaps(student, self._module_taps("student"))
        self._teacher_taps = (
            FeatureTaps(teacher, self._module_taps("teacher"), detach=True, stop_after_last=not self._needs("teacher", "logits", "output"))
            if teacher is not None
            else None
        )

    # -- structure ------------------------------------------------------------------------------
    @property
    def teacher(self) -> nn.Module | None:
        return self._teacher

    def _module_taps(self, side: str) -> dict[str, str]:
        out = {}
        for t in self.terms:
            for spec in getattr(t, side):
                if spec.split(":")[0] not in RESERVED_TAPS:
                    out[spec] = spec
        return out

    def _needs(self, side: str, *names: str) -> bool:
        return any(spec.split(":")[0] in names for t in self.terms for spec in getattr(t, side))

    def train(self, mode: bool = True) -> "Distiller":
        super().train(mode)
        if self._teacher is not None:
            self._teacher.eval()
        return self

    def _apply(self, fn, *args, **kwargs):
        super()._apply(fn, *args, **kwargs)
        if self._teacher is not None:
            self._teacher._apply(fn, *args, **kwargs)
        return self

    def set_step(self, step: int) -> None:
        """Set the global step that weight schedules read (the training loop calls this)."""
        self.step = int(step)

    def weights(self) -> dict[str, float]:
        """Current weight of every term (and ``task``)."""
        w = {t.name: t.weight(self.step) for t in self.terms}
        if self.task_loss is not None:
            w["task"] = self.task_weight(self.step)
        return w

    def trainable_parameters(self):
        """Student, connector and loss parameters (e.g. CRD's embedding heads)."""
        return [p for p in self.parameters() if p.requires_grad]

    def export_model(self) -> nn.Module:
        """The student alone, unwrapped, for saving in its framework's own format."""
        return unwrap_model(self.student)

    @torch.no_grad()
    def prepare(self, inputs: Any, target: Any = None, teacher_inputs: Any = None, index: Any = None,
                teacher_outputs: Mapping[str, Any] | None = None, **extra: Any) -> "Distiller":
        """Run one batch in eval mode to build lazy connectors/losses; build the optimiser after this.

        Losses change no state in eval mode (CRD's memory bank included), so this step is side-effect free,
        and it leaves every global random generator as it found it: connectors and learnable loss parts are
        initialised from a generator of their own (seeded from ``torch.initial_seed()``), so building them
        shifts neither the student's initialisation nor the data order that follows.
        """
        was_training = self.training
        self.eval()
        try:
            with preserved_rng():
                torch.manual_seed(distillation_seed())
                if index is None and any(getattr(t.loss, "needs_index", False) for t in self.terms):
                    batch = self.logits_fn(call_model(self.student, inputs)).shape[0]
                    index = torch.zeros(batch, dtype=torch.long)
                self._compute(inputs, target, teacher_inputs=teacher_inputs, teacher_outputs=teacher_outputs,
                              index=index, extra=extra, force_all=True)
        finally:
            self.train(was_training)
        return self

    # -- forward --------------------------------------------------------------------------------
    def forward(
        self,
        inputs: Any,
        target: torch.Tensor | None = None,
        *,
        teacher_inputs: Any = None,
        teacher_outputs: Mapping[str, Any] | None = None,
        index: torch.Tensor | None = None,
        **extra: Any,
    ) -> dict[str, Any]:
        """Returns ``{"loss": total, "task": ..., <term>: ..., "weighted": {...}, "student_output": raw}``.

        Term values are unweighted and detached (for logging); ``loss`` carries the gradient, and so
        does each entry of ``weighted`` (``weight * term``, for frameworks that sum a dict of losses).
        ``extra`` keyword arguments (e.g. ``mask=``) reach the losses whose ``forward`` takes them.
        """
        out = self._compute(inputs, target, teacher_inputs=teacher_inputs, teacher_outputs=teacher_outputs,
                            index=index, extra=extra, force_all=False)
        if self.training:
            self.step += 1
        return out

    def _teacher_forward(self, inputs: Any) -> dict[str, Any]:
        if self._teacher is None:
            raise KDConfigError("this Distiller has no teacher: pass teacher_outputs= (e.g. from the teacher cache)")
        assert self._teacher_taps is not None
        device = next(iter(self._teacher.parameters()), torch.empty(0)).device
        autocast = (
            torch.autocast(device_type=device.type, dtype=self.teacher_dtype)
            if self.teacher_dtype is not None
            else contextlib.nullcontext()
        )
        with torch.no_grad(), autocast:
            raw = self._teacher_taps.run(lambda: call_model(self._teacher, inputs))
        outs = dict(self._teacher_taps.outputs)
        missing = self._teacher_taps.missing()
        if missing:
            raise KDConfigError(f"teacher taps {missing} did not fire during the forward; is the module used "
                                "(and, for a numbered call '#k', called that often)?")
        error = self._teacher_taps.ambiguity_error("teacher")
        if error is not None:
            raise error
        if raw is not None:
            outs["output"] = raw
        return outs

    def _compute(self, inputs, target, *, teacher_inputs, teacher_outputs, index, extra, force_all):
        weights = self.weights()
        active = [t for t in self.terms if force_all or weights[t.name] != 0.0]

        s_raw = self._student_taps.run(lambda: call_model(self.student, inputs))
        s_outs = dict(self._student_taps.outputs, output=s_raw)
        missing = self._student_taps.missing()
        if missing:
            raise KDConfigError(f"student taps {missing} did not fire during the forward; is the module used "
                                "(and, for a numbered call '#k', called that often)?")
        error = self._student_taps.ambiguity_error("student")
        if error is not None:
            raise error

        t_outs: dict[str, Any] = {}
        if active:
            if teacher_outputs is not None:
                t_outs = dict(teacher_outputs)
            else:
                t_outs = self._teacher_forward(inputs if teacher_inputs is None else teacher_inputs)

        result: dict[str, Any] = {"student_output": s_raw}
        total = None
        if self.task_loss is not None and target is not None and (force_all or weights["task"] != 0.0):
            value = self.task_loss(self.logits_fn(s_raw), target)
            total = self._add(total, value, weights["task"], "task", result)

        for term in active:
            s_val = self._gather(term, "student", s_outs)
            t_val = self._gather(term, "teacher", t_outs)
            if force_all:
                self.prepared_shapes[term.name] = (_shapes(s_val), _shapes(t_val))
            if term.name in self.connectors:
                s_val = self._connect(term, s_val, t_val)
            kwargs = {k: v for k, v in extra.items() if _accepts(term.loss, k)}
            if getattr(term.loss, "needs_target", False):
                if target is None and force_all and term.name not in self.connectors:
                    continue  # prepare() without labels: nothing to build for this term
                if target is None:
                    raise KDConfigError(f"term {term.name!r} ({type(term.loss).__name__}) needs target labels")
                kwargs["target"] = target
            if getattr(term.loss, "needs_index", False):
                if index is None:
                    raise KDConfigError(f"term {term.name!r} ({type(term.loss).__name__}) needs sample indices (index=)")
                kwargs["index"] = index
            try:
                value = term.loss(s_val, t_val, **kwargs)
            except ShapeMismatchError as e:
                raise ShapeMismatchError(f"term {term.name!r}: {e}") from e
            except RuntimeError as e:
                if "size" not in str(e) and "shape" not in str(e):
                    raise
                raise ShapeMismatchError(
                    f"term {term.name!r}: student {_shapes(s_val)} vs teacher {_shapes(t_val)} do not fit "
                    f"{type(term.loss).__name__}: {e}. Add connector: auto (or linear / conv1x1 / resize) to the term."
                ) from e
            total = self._add(total, value, weights[term.name], term.name, result)

        if total is None:
            total = self.logits_fn(s_raw).sum() * 0.0
        result["loss"] = total
        return result

    def _add(self, total, value, weight, name, result):
        if self.check_finite and not torch.isfinite(value.detach()).all():
            raise NonFiniteLossError(
                f"loss term {name!r} is {value.detach().item()} at step {self.step}; lower the learning rate, "
                "clip gradients, or check the inputs"
            )
        result[name] = value.detach()
        weighted = value * weight
        result.setdefault("weighted", {})[name] = weighted  # with gradient, for frameworks that sum a loss dict
        return weighted if total is None else total + weighted

    def _gather(self, term: Term, side: str, outs: Mapping[str, Any]):
        vals = []
        for spec in getattr(term, side):
            head, _, rest = spec.partition(":")
            if head == "logits" and not rest:
                if "output" not in outs:
                    raise KDConfigError(f"term {term.name!r} needs the {side}'s logits, which were not computed")
                vals.append(self.logits_fn(outs["output"]))
            elif head == "output":
                if "output" not in outs:
                    raise KDConfigError(f"term {term.name!r} needs the {side}'s output, which was not computed")
                vals.append(select(outs["output"], tuple(rest.split(".")) if rest else (), "output"))
            else:
                if spec not in outs:
                    raise KDConfigError(
                        f"term {term.name!r}: no {side} output {spec!r}; given {sorted(k for k in outs if k != 'output')}"
                    )
                vals.append(outs[spec])
        return vals[0] if len(vals) == 1 else tuple(vals)

    def _connect(self, term: Term, s_val, t_val):
        conn = self.connectors[term.name]
        if isinstance(s_val, tuple):
            raise KDConfigError(f"term {term.name!r}: a connector applies to a single student tap, not {len(s_val)}")
        return conn(s_val, tuple(t_val.shape))


def _shapes(v) -> Any:
    if isinstance(v, torch.Tensor):
        return tuple(v.shape)
    if isinstance(v, (tuple, list)):
        return type(v)(_shapes(x) for x in v)
    return type(v).__name__


def distillation_seed(offset: int = 0) -> int:
    """Seed for the generator that initialises distillation modules (connectors, learnable loss parts):
    derived from the global seed (``torch.initial_seed()``), so a run is reproducible, but drawn from a
    stream of its own, so building these modules never shifts the student's random numbers."""
    return (torch.initial_seed() * 1_000_003 + 0x5EED + int(offset)) % (2**63 - 1)


def freeze(model: nn.Module) -> nn.Module:
    """Teacher mode: no gradients, eval (BatchNorm uses running statistics, dropout off)."""
    model.requires_grad_(False)
    model.eval()
    return model
