"""CrossKD: the student's head features run through the rest of the teacher's head.

Wang, Chen, Zheng, Li, Cheng & Hou (CVPR 2024), "CrossKD: Cross-Head Knowledge Distillation for Object
Detection" (authors' code: github.com/jbwang1997/CrossKD). Prediction mimicking on dense detectors pulls
the student's head towards the teacher's predictions and towards the ground truth at once, and the two
targets disagree. CrossKD sends the student's intermediate head feature through the *teacher's* remaining
head layers instead, and makes that cross-head prediction mimic the teacher's own prediction; the
student's head keeps only the ground-truth losses, and the distillation gradient reaches it through the
frozen teacher layers.

For one FPN level and one branch (``cls`` or ``reg``) of a head whose towers are ``cls_convs`` /
``reg_convs`` (ModuleLists) followed by a final conv, with ``k = reused_index``::

    f_s    = student tower output after its own convs 0..k-1   (the FPN level itself when k = 0)
    cross  = post(final_T(convs_T[k:](f_s)))                     (teacher layers, frozen; gradient reaches f_s)
    L      = loss(cross, prediction_T)                           (the teacher's own prediction, detached)

``post`` is what the head does to the final conv's output for that level: nothing for class scores
and for RetinaHead boxes; the learnable ``Scale`` of the level for GFLHead / ATSSHead boxes (then
``.float()``); for FCOSHead boxes the ``Scale``, then ``clamp(min=0)`` (times the level's stride while
the teacher head is in eval mode, as it is when distilling) with ``norm_on_bbox``, or ``exp``
without. Supported heads, and subclasses of them:

============  ===============  ================  =============================================
head          cls final conv   reg final conv    default ``reg`` loss
============  ===============  ================  =============================================
RetinaHead    ``retina_cls``   ``retina_reg``    ``l1`` on the box deltas
GFLHead       ``gfl_cls``      ``gfl_reg``       ``ld`` (KL over the ``reg_max + 1`` bins), T = 1
ATSSHead      ``atss_cls``     ``atss_reg``      ``l1`` on the box deltas
FCOSHead      ``conv_cls``     ``conv_reg``      ``l1`` on the distances
============  ===============  ================  =============================================

The default ``cls`` loss is ``sigmoid_kd`` with T = 1. Row-wise losses (``sigmoid_kd``, ``kd``, ``l1``,
...) receive ``(B, H·W·A, D)`` rows, one per position and anchor (``D`` = classes, 4 box values, or
``reg_max + 1`` bins per side); the dense-prediction losses (``ld``, ``dense_kd``) receive the maps.
Centerness (FCOS, ATSS) is not distilled: like the authors' FCOS code, only the class and box outputs
of the cross head are compared.

One term per branch and level; the taps (``#k`` = k-th call of a module the head runs once per level)::

    dict(name="crosskd_cls_p3", loss=dict(type="crosskd", branch="cls", reused_index=3),
         student="bbox_head.cls_convs.2#0", teacher="bbox_head:0.0")
    dict(name="crosskd_reg_p3", loss=dict(type="crosskd", branch="reg", reused_index=3, level=0),
         student="bbox_head.reg_convs.2#0", teacher="bbox_head:1.0")

The distiller calls :meth:`CrossKDLoss.bind_teacher` once with the teacher detector. The teacher's
layers are held outside the module tree (in ``__dict__``): they are not trained, not saved in the
loss's ``state_dict`` and not seen by DDP, and they move with the teacher.

When the student's head is narrower than the teacher's, set ``connector="conv1x1"`` **on this loss**:
it maps the student feature to the channels the teacher's layer takes. A term-level ``connector`` cannot
do this (it is built for the teacher tap's shape, here the prediction map).

Differences from the authors' code (``mmdet/models/detectors/crosskd_*.py``):

* the authors take the student and teacher features *before* the activation of conv ``k-1``, rescale the
  student's to the teacher's per-channel mean and std over batch and positions (``align_scale``), then
  apply the ReLU; here the student's tower output (after its activation) enters the teacher's layers as
  it is. mmcv's ``ConvModule`` applies its ReLU in place, so a tapped pre-activation tensor would already
  hold the activated values by the time a loss reads it.
* the class loss defaults to the project's ``sigmoid_kd`` (binary cross-entropy to the teacher's sigmoid
  scores, mean over positions and classes of the level) instead of KD-QFL (the same cross-entropy times
  ``|σ(cross) - σ(teacher)|^β``, summed over all positions of all levels and divided by the number of
  positive anchors);
* the box loss is a plain mean over the level's positions and sides (``ld``: over the cells on a
  ground-truth box with ``region="boxes"``); the authors weight each position by the teacher's highest
  class score and divide by the sum of those weights over all levels, and for RetinaNet, ATSS and FCOS
  they compare decoded boxes with a (G)IoU loss instead of the raw outputs compared here;
* per-level terms: the authors sum over all levels before normalising, so recipes weight each level's
  term by its share of the positions to match (see ``configs/detection/crosskd_gfl.py``).
"""

from __future__ import annotations

import importlib
import inspect
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

from torch import Tensor, nn

from kd_tasks.shared.connectors import LazyConnector
from kd_tasks.shared.errors import KDConfigError, ShapeMismatchError
from kd_tasks.shared.registry import LOSSES
from kd_tasks.shared.taps import unwrap_model

__all__ = ["CrossKDLoss", "HEAD_FINAL_CONVS", "BRANCHES"]

BRANCHES = ("cls", "reg")
OUTPUT_INDEX = {"cls": 0, "reg": 1}  # the branch's prediction list in the head's output tuple

# Final convolution of each branch, by head class (subclasses inherit through the MRO).
HEAD_FINAL_CONVS: dict[str, dict[str, str]] = {
    "RetinaHead": {"cls": "retina_cls", "reg": "retina_reg"},
    "GFLHead": {"cls": "gfl_cls", "reg": "gfl_reg"},
    "ATSSHead": {"cls": "atss_cls", "reg": "atss_reg"},
    "FCOSHead": {"cls": "conv_cls", "reg": "conv_reg"},
}
SUPPORTED = ", ".join(HEAD_FINAL_CONVS)


def _family(head: nn.Module) -> str | None:
    """The supported head class that ``head`` is (or derives from), by name."""
    for cls in type(head).__mro__:
        if cls.__name__ in HEAD_FINAL_CONVS:
            return cls.__name__
    return None


def _in_channels(module: nn.Module) -> int | None:
    """Input channels of the first convolution in ``module`` (a ConvModule or a bare conv)."""
    for m in module.modules():
        if isinstance(m, nn.modules.conv._ConvNd):
            return int(m.in_channels)
    return None


@dataclass
class _Bound:
    """The teacher layers one term runs (kept out of the module tree)."""

    head_type: str
    family: str
    convs: tuple[nn.Module, ...]
    final: nn.Module
    in_channels: int
    row_size: int
    scale: nn.Module | None = None
    fcos: bool = False
    norm_on_bbox: bool = False
    stride: float = 1.0
    head: nn.Module | None = None


def _registered(name: str) -> bool:
    """Whether loss ``name`` is registered, after importing the shared families (and ``dense``, for LD)."""
    importlib.import_module("kd_tasks.shared.losses")
    if name.lower() not in LOSSES:
        try:
            importlib.import_module("kd_tasks.shared.losses.dense")
        except ModuleNotFoundError as e:
            if e.name != "kd_tasks.shared.losses.dense":
                raise
    return name.lower() in LOSSES


def _init_params(obj: Any) -> set[str]:
    try:
        return set(inspect.signature(obj.__init__ if inspect.isclass(obj) else obj).parameters)
    except (TypeError, ValueError):
        return set()


def _forward_params(module: nn.Module) -> set[str]:
    try:
        return set(inspect.signature(module.forward).parameters)
    except (TypeError, ValueError):
        return set()


LAYOUTS = ("auto", "rows", "map")
MAP_LOSS_MODULE = "kd_tasks.shared.losses.dense"  # its losses take (N, C, H, W) maps of one level


@LOSSES.register("crosskd", "cross_head")
class CrossKDLoss(nn.Module):
    """CrossKD on one FPN level and one branch of a dense head (see the module docstring).

    Args:
        branch: ``"cls"`` (class scores) or ``"reg"`` (box outputs).
        reused_index: ``k``: the student's tower output after its own convs ``0..k-1`` enters the
            teacher's convs ``k..`` and final conv (``k = 0``: the FPN level itself; ``k = len(convs)``:
            only the teacher's final conv). Default 3, as in the authors' GFL, ATSS and RetinaNet
            configs (``reused_teacher_head_idx=3`` with 4 stacked convs; their FCOS config uses 2). The
            student tap is ``<head>.<branch>_convs.<k-1>#<level>`` (``neck:<level>`` when ``k = 0``).
        head: dotted name of the head module in the detector.
        loss: how the cross prediction is compared with the teacher's: a ``LOSSES`` name or config.
            Default ``sigmoid_kd`` for ``cls``; for ``reg`` ``ld`` on GFL heads and ``l1`` on the others.
            Built when the teacher is bound, with what the head tells filled in when the config leaves
            it out: ``temperature`` (from this loss), ``reg_max`` (``ld``), ``num_classes``
            (``dense_kd``).
        temperature: the inner loss's ``temperature`` (``None``: 1.0 for the default ``sigmoid_kd`` and
            ``ld``, as CrossKD's GFL config; the inner loss's own default otherwise).
        level: FPN level index (0 = first level) of this term; needed for ``reg`` on heads with a
            learnable ``Scale`` per level (GFLHead, ATSSHead, FCOSHead) so the teacher's scale (and
            FCOS stride) of that level is applied.
        connector: ``"conv1x1"`` (or any connector config) mapping the student feature to the channels
            the teacher's layer takes, when the heads differ in width; ``None``: no connector.
        layout: what the inner loss receives. ``"map"``: the ``(B, A·D, H, W)`` maps as the head
            outputs them; ``"rows"``: ``(B, H·W·A, D)`` rows, ``D`` = ``cls_out_channels`` for ``cls``,
            ``reg_max + 1`` bins (GFL) or 4 for ``reg``, in mmdet's flattening order; ``"auto"``: maps
            for the dense-prediction losses (``ld``, ``dense_kd``, ...), rows for the others.
    """

    def __init__(
        self,
        branch: str = "cls",
        reused_index: int = 3,
        head: str = "bbox_head",
        loss: str | Mapping[str, Any] | None = None,
        temperature: float | None = None,
        level: int | None = None,
        connector: str | Mapping[str, Any] | None = None,
        layout: str = "auto",
    ):
        super().__init__()
        if branch not in BRANCHES:
            raise KDConfigError(f"crosskd: branch must be 'cls' or 'reg', got {branch!r}")
        if isinstance(reused_index, bool) or not isinstance(reused_index, int) or reused_index < 0:
            raise KDConfigError(f"crosskd: reused_index must be an integer >= 0, got {reused_index!r}")
        if level is not None and (isinstance(level, bool) or not isinstance(level, int) or level < 0):
            raise KDConfigError(f"crosskd: level must be an FPN level index >= 0 (0 = first level), got {level!r}")
        if temperature is not None and not float(temperature) > 0:
            raise KDConfigError(f"crosskd: temperature must be > 0, got {temperature}")
        if not isinstance(head, str) or not head:
            raise KDConfigError(f"crosskd: head must be the dotted name of the head module, got {head!r}")
        if layout not in LAYOUTS:
            raise KDConfigError(f"crosskd: layout must be one of {', '.join(map(repr, LAYOUTS))}; got {layout!r}")
        self.branch = branch
        self.reused_index = int(reused_index)
        self.head = head
        self.level = level
        self.temperature = None if temperature is None else float(temperature)
        self.layout = layout
        self.loss_cfg = None if loss is None else self._check_loss_cfg(loss)
        self.connector = None if connector is None else LazyConnector(connector)
        self.loss_fn: nn.Module | None = None  # built by bind_teacher
        self.__dict__["_bound"] = None

    # -- the inner loss -------------------------------------------------------------------------
    @staticmethod
    def _check_loss_cfg(cfg: str | Mapping[str, Any]) -> dict[str, Any]:
        cfg = {"type": cfg} if isinstance(cfg, str) else dict(cfg) if isinstance(cfg, Mapping) else None
        if cfg is None or not isinstance(cfg.get("type"), str):
            raise KDConfigError("crosskd: loss must be a loss name or a config with a 'type', e.g. 'sigmoid_kd' or "
                                "{'type': 'ld', 'temperature': 1}")
        name = cfg["type"]
        if name.lower() in ("crosskd", "cross_head"):
            raise KDConfigError("crosskd: the inner loss cannot be crosskd itself; use e.g. 'sigmoid_kd' or 'ld'")
        if not _registered(name):
            hint = " (it lives in kd_tasks/shared/losses/dense.py)" if name.lower() in ("ld", "dense_kd") else ""
            raise KDConfigError(f"crosskd: inner loss {name!r} is not registered{hint}; "
                                f"known: {', '.join(LOSSES.names())}")
        return cfg

    def _loss_config(self, head: nn.Module, family: str) -> dict[str, Any]:
        """The inner loss's config: the given one or the branch's default, completed from the head."""
        if self.loss_cfg is not None:
            cfg = dict(self.loss_cfg)
        elif self.branch == "cls":
            cfg = {"type": "sigmoid_kd", "temperature": 1.0}
        elif family == "GFLHead":
            cfg = {"type": "ld", "temperature": 1.0}
        else:
            cfg = {"type": "l1"}
        accepted = _init_params(LOSSES.get(cfg["type"]))
        if self.temperature is not None and "temperature" not in (self.loss_cfg or {}):
            if "temperature" not in accepted:
                raise KDConfigError(f"crosskd: inner loss {cfg['type']!r} takes no temperature; remove temperature= "
                                    "or choose a loss that has one")
            cfg["temperature"] = self.temperature
        if "reg_max" in accepted and "reg_max" not in cfg and hasattr(head, "reg_max"):
            cfg["reg_max"] = int(head.reg_max)
        if "num_classes" in accepted and "num_classes" not in cfg and hasattr(head, "cls_out_channels"):
            cfg["num_classes"] = int(head.cls_out_channels)
        return cfg

    # -- the teacher ----------------------------------------------------------------------------
    def bind_teacher(self, teacher: nn.Module) -> None:
        """Resolve ``teacher.<head>`` and keep (outside the module tree) the layers this term runs.

        The teacher's layers used here are frozen (``requires_grad=False``), and the inner loss is
        built. Call once after the teacher is built (before the first forward); calling again rebinds.
        """
        base = unwrap_model(teacher)
        modules = dict(base.named_modules())
        if self.head not in modules:
            heads = [n for n, m in modules.items() if n and hasattr(m, "cls_convs")]
            raise KDConfigError(f"crosskd: the teacher {type(base).__name__} has no module {self.head!r}; "
                                f"set head= to one of {heads or ['(no head with cls_convs)']}")
        head = modules[self.head]
        head_type = type(head).__name__
        family = _family(head)
        if family is None:
            raise KDConfigError(f"crosskd: teacher head {head_type} ('{self.head}') is not supported; "
                                f"CrossKD needs cls_convs/reg_convs towers and a known final conv: {SUPPORTED}")
        tower_name = f"{self.branch}_convs"
        tower = getattr(head, tower_name, None)
        if not isinstance(tower, (nn.ModuleList, nn.Sequential)):
            raise KDConfigError(f"crosskd: teacher head {head_type} ('{self.head}') has no {tower_name} "
                                f"(a ModuleList of the {self.branch} tower's convs)")
        final_name = HEAD_FINAL_CONVS[family][self.branch]
        final = getattr(head, final_name, None)
        if not isinstance(final, nn.Module):
            raise KDConfigError(f"crosskd: teacher head {head_type} ('{self.head}') has no final "
                                f"{self.branch} conv {final_name!r}")
        n = len(tower)
        if self.reused_index > n:
            raise KDConfigError(f"crosskd: reused_index={self.reused_index} but {head_type}.{tower_name} has "
                                f"{n} convs; use 0..{n} (the authors use 3 of 4)")
        convs = tuple(tower[self.reused_index:])
        in_channels = _in_channels(convs[0] if convs else final)
        if in_channels is None:
            raise KDConfigError(f"crosskd: found no convolution in {head_type}.{tower_name}[{self.reused_index}:] "
                                f"or {final_name} to read the input channels from")
        if self.branch == "cls" and not hasattr(head, "cls_out_channels"):
            raise KDConfigError(f"crosskd: teacher head {head_type} has no cls_out_channels")

        bound = _Bound(head_type=head_type, family=family, convs=convs, final=final, in_channels=in_channels,
                       row_size=(int(head.cls_out_channels) if self.branch == "cls"
                                 else int(head.reg_max) + 1 if family == "GFLHead" else 4),
                       head=head)
        if self.branch == "reg":
            self._bind_box_output(bound, head, head_type, family)

        loss_fn = LOSSES.build(self._loss_config(head, family))
        for part in (*convs, final, *([bound.scale] if bound.scale is not None else [])):
            part.requires_grad_(False)
        self.loss_fn = loss_fn
        self.__dict__["_bound"] = bound
        self.__dict__["_maps"] = (self.layout == "map" or
                                  (self.layout == "auto" and type(loss_fn).__module__ == MAP_LOSS_MODULE))
        self.__dict__["_loss_kwargs"] = _forward_params(loss_fn) & {"gt_boxes", "input_shape"}

    def _bind_box_output(self, bound: _Bound, head: nn.Module, head_type: str, family: str) -> None:
        """What the head does to its final reg conv's output on this term's level."""
        scales = getattr(head, "scales", None)
        if scales is not None:
            if self.level is None:
                raise KDConfigError(f"crosskd: {head_type} scales its box output per FPN level; set level=<index "
                                    f"of this term's level> (0..{len(scales) - 1}) on the reg loss")
            if self.level >= len(scales):
                raise KDConfigError(f"crosskd: level={self.level} but {head_type} has {len(scales)} levels "
                                    f"(0..{len(scales) - 1})")
            bound.scale = scales[self.level]
        if family == "FCOSHead":
            bound.fcos = True
            bound.norm_on_bbox = bool(getattr(head, "norm_on_bbox", False))
            strides = getattr(head, "strides", None)
            if bound.norm_on_bbox:
                if strides is None or self.level is None or self.level >= len(strides):
                    raise KDConfigError(f"crosskd: {head_type} with norm_on_bbox needs its strides and level= to "
                                        "rescale box distances as its eval forward does")
                stride = strides[self.level]
                bound.stride = float(stride[0] if isinstance(stride, (tuple, list)) else stride)

    @property
    def bound(self) -> bool:
        """Whether :meth:`bind_teacher` has been called."""
        return self.__dict__.get("_bound") is not None

    # -- forward --------------------------------------------------------------------------------
    def cross_prediction(self, student: Tensor) -> Tensor:
        """The teacher head's prediction from the student's feature, with gradient to ``student``."""
        bound: _Bound | None = self.__dict__.get("_bound")
        if bound is None:
            raise KDConfigError("crosskd: call bind_teacher(teacher) before the first forward "
                                "(the distiller does this for every term loss that has it)")
        if not isinstance(student, Tensor) or student.dim() != 4:
            shape = tuple(student.shape) if isinstance(student, Tensor) else type(student).__name__
            raise ShapeMismatchError(f"crosskd: the student tap must be one (B, C, H, W) head feature map, got "
                                     f"{shape}; tap '{self.head}.{self.branch}_convs.{self.reused_index - 1}#<level>'")
        if self.connector is not None:
            student = self.connector(student, (student.shape[0], bound.in_channels, *student.shape[2:]))
        if student.shape[1] != bound.in_channels:
            where = (f"{bound.head_type}.{self.branch}_convs[{self.reused_index}]" if bound.convs
                     else f"{bound.head_type}.{HEAD_FINAL_CONVS[bound.family][self.branch]}")
            raise ShapeMismatchError(
                f"crosskd: the student feature has {student.shape[1]} channels but the teacher's {where} takes "
                f"{bound.in_channels}; add connector='conv1x1' to this crosskd loss (not to the term)")
        x = student
        for conv in bound.convs:
            x = conv(x)
        out = bound.final(x)
        if self.branch == "reg":
            if bound.scale is not None:
                out = bound.scale(out).float()
            if bound.fcos:
                if bound.norm_on_bbox:
                    out = out.clamp(min=0)
                    if not bound.head.training:
                        out = out * bound.stride
                else:
                    out = out.exp()
        return out

    def rows(self, prediction: Tensor) -> Tensor:
        """``(B, A·D, H, W)`` head map -> ``(B, H·W·A, D)`` rows (mmdet's own flattening order)."""
        size = self.__dict__["_bound"].row_size
        b, c = prediction.shape[:2]
        if c % size:
            raise ShapeMismatchError(f"crosskd: a {self.branch} map of {c} channels does not split into rows of {size}")
        return prediction.permute(0, 2, 3, 1).reshape(b, -1, size)

    def forward(self, student: Tensor, teacher: Tensor, gt_boxes: Sequence[Tensor] | None = None,
                input_shape: Sequence[int] | None = None) -> Tensor:
        """``loss(cross_prediction(student), teacher)``; ``gt_boxes`` / ``input_shape`` reach an inner loss
        that takes them (e.g. ``ld`` with ``region="boxes"``)."""
        cross = self.cross_prediction(student)
        if not isinstance(teacher, Tensor):
            raise ShapeMismatchError(f"crosskd: the teacher tap must be one prediction map, got "
                                     f"{type(teacher).__name__}; tap '{self.head}:{OUTPUT_INDEX[self.branch]}.<level>'")
        target = teacher.detach().to(cross.dtype)
        if cross.shape != target.shape:
            raise ShapeMismatchError(
                f"crosskd: cross-head {self.branch} prediction {tuple(cross.shape)} != teacher tap "
                f"{tuple(target.shape)}; the teacher tap must be the same level's "
                f"{'class scores' if self.branch == 'cls' else 'box output'} "
                f"('{self.head}:{OUTPUT_INDEX[self.branch]}.<level>') and the student tap the same level")
        kwargs = {k: v for k, v in (("gt_boxes", gt_boxes), ("input_shape", input_shape))
                  if v is not None and k in self.__dict__["_loss_kwargs"]}
        if self.__dict__["_maps"]:
            return self.loss_fn(cross, target, **kwargs)
        return self.loss_fn(self.rows(cross), self.rows(target), **kwargs)

    def extra_repr(self) -> str:
        return (f"branch={self.branch!r}, reused_index={self.reused_index}, head={self.head!r}, level={self.level}, "
                f"temperature={self.temperature}, layout={self.layout!r}, bound={self.bound}")
