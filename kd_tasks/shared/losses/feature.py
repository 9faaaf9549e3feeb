"""Feature-map losses: generic feature matching, FitNets hints, attention transfer and FSP matrices.

Shapes: feature maps are ``(B, C, H, W)`` (any ``(B, C, *spatial)`` where noted), token features
``(B, L, D)`` and pooled features ``(B, D)``. The teacher argument is a target: it is detached, so
no gradient reaches the teacher. Every reduction averages over the batch, so values do not grow with
the batch size.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..connectors import LazyConnector
from ..errors import KDConfigError, ShapeMismatchError
from ..registry import LOSSES
from .logit import check_choice

__all__ = [
    "FeatureLoss",
    "MSEFeatureLoss",
    "L1FeatureLoss",
    "SmoothL1FeatureLoss",
    "CosineFeatureLoss",
    "FitNetLoss",
    "ATLoss",
    "FSPLoss",
    "as_target",
    "attention_map",
    "fsp_matrix",
    "masked_mean",
    "safe_sqrt",
    "shape_mismatch",
]


# ----------------------------------------------------------------------------- helpers


def as_target(teacher: Tensor, student: Tensor) -> Tensor:
    """The teacher tensor as a target: detached, in the student's floating dtype (a teacher run in
    bf16/fp16 autocast is compared in the student's precision)."""
    teacher = teacher.detach()
    if teacher.is_floating_point() and student.is_floating_point() and teacher.dtype != student.dtype:
        teacher = teacher.to(student.dtype)
    return teacher


def shape_mismatch(
    owner: str, student_shape: Sequence[int], teacher_shape: Sequence[int], detail: str = ""
) -> ShapeMismatchError:
    """A :class:`ShapeMismatchError` naming both shapes and the connector that would fix them."""
    s, t = tuple(student_shape), tuple(teacher_shape)
    msg = f"{owner}: student shape {s} does not match teacher shape {t}"
    if detail:
        msg += f" ({detail})"
    if s[:1] != t[:1]:
        fix = "the batch sizes differ: feed the teacher the same inputs as the student"
    elif len(s) != len(t):
        fix = "the numbers of dimensions differ: tap another module, or pool/flatten one side first"
    elif len(s) == 4:
        parts = []
        if s[1] != t[1]:
            parts.append(f"a 'conv1x1' connector for the channels ({s[1]} -> {t[1]})")
        if s[2:] != t[2:]:
            parts.append(f"a 'resize' connector for the spatial size ({s[2:]} -> {t[2:]})")
        fix = f"use {' and '.join(parts)} (or connector 'auto')"
    elif len(s) in (2, 3) and s[:-1] == t[:-1]:
        fix = f"use a 'linear' connector for the feature width ({s[-1]} -> {t[-1]})"
    else:
        fix = "pool or flatten the features to (B, D) and use a 'linear' connector"
    return ShapeMismatchError(f"{msg}; {fix}")


def masked_mean(values: Tensor, mask: Tensor | None, owner: str) -> Tensor:
    """Mean of ``values`` over the elements selected by ``mask`` (all elements when ``mask`` is None).

    ``mask`` (bool or float weights) is aligned from the batch dimension: trailing singleton
    dimensions are appended until it has ``values.dim()`` dimensions, then it is broadcast to
    ``values.shape``. So a ``(B, L)`` token mask works for ``(B, L, D)`` features and a
    ``(B, 1, H, W)`` mask for ``(B, C, H, W)`` maps. The result is
    ``sum(mask * values) / sum(mask)`` over the broadcast mask, and 0 when nothing is selected.
    """
    if mask is None:
        return values.mean()
    weights = mask.to(device=values.device, dtype=values.dtype)
    if weights.dim() > values.dim():
        raise ShapeMismatchError(
            f"{owner}: mask shape {tuple(mask.shape)} has more dimensions than {tuple(values.shape)}"
        )
    weights = weights.reshape(*weights.shape, *([1] * (values.dim() - weights.dim())))
    try:
        weights = torch.broadcast_to(weights, values.shape)
    except RuntimeError:
        raise ShapeMismatchError(
            f"{owner}: mask shape {tuple(mask.shape)} cannot be broadcast to {tuple(values.shape)}; the mask is "
            "aligned from the batch dimension (e.g. (B, L) for (B, L, D) features, (B, 1, H, W) for maps)"
        ) from None
    return (values * weights).sum() / weights.sum().clamp(min=1e-12)


def safe_sqrt(x: Tensor, eps: float = 1e-12) -> Tensor:
    """``sqrt(x)`` that is exactly 0 (with zero gradient, not NaN) where ``x <= eps``."""
    return torch.where(x > eps, x.clamp(min=eps).sqrt(), torch.zeros_like(x))


def per_sample_l2_normalize(x: Tensor, eps: float = 1e-12) -> Tensor:
    """Divide every sample (all dimensions but the batch one together) by its L2 norm."""
    norms = x.flatten(1).norm(dim=1).clamp(min=eps)
    return x / norms.reshape(-1, *([1] * (x.dim() - 1)))


# ----------------------------------------------------------------------------- feature matching


@LOSSES.register("feature")
class FeatureLoss(nn.Module):
    """Direct feature matching between student and teacher tensors of the same shape.

    Per element (``mse``, ``l1``, ``smooth_l1``) or per position (``cosine``), then a mean:

    - ``mse``: ``(s - t)²``; ``l1``: ``|s - t|``; ``smooth_l1``: Huber with ``δ = 1``
      (``0.5 x²`` if ``|x| < 1`` else ``|x| - 0.5``);
    - ``cosine``: ``1 - cos(s, t)`` along ``dim`` (default: the channel dimension 1 of
      ``(B, C, H, W)`` maps, the last dimension otherwise), one value per position.

    ``mask=`` (forward keyword) selects elements: it is aligned from the batch dimension and
    broadcast (a ``(B, L)`` token mask for ``(B, L, D)`` features, ``(B, 1, H, W)`` for maps); the
    mean runs over the selected elements only. For ``cosine`` the mask selects positions (it is
    broadcast against the features with ``dim`` reduced to size 1).

    ``normalize=True`` divides each sample (flattened) by its L2 norm first, so only the direction
    of the whole feature is compared (irrelevant for ``cosine``).

    Also registered as ``"mse"``, ``"l1"``, ``"smooth_l1"`` and ``"cosine"`` with the metric fixed.
    Shapes must match: add a ``"linear"`` connector for ``(B, D)`` / ``(B, L, D)`` features or a
    ``"conv1x1"`` connector for ``(B, C, H, W)`` maps (or use :class:`FitNetLoss`, which learns one).
    """

    METRICS = ("mse", "l1", "smooth_l1", "cosine")

    def __init__(self, metric: str = "mse", normalize: bool = False, dim: int | None = None):
        super().__init__()
        self.metric = check_choice(metric, self.METRICS, "feature", "metric")
        self.normalize = bool(normalize)
        self.dim = dim

    def forward(self, student: Tensor, teacher: Tensor, mask: Tensor | None = None) -> Tensor:
        teacher = as_target(teacher, student)
        if student.shape != teacher.shape:
            raise shape_mismatch(self.metric, student.shape, teacher.shape)
        if self.normalize:
            student, teacher = per_sample_l2_normalize(student), per_sample_l2_normalize(teacher)
        return masked_mean(self.elementwise(student, teacher), mask, self.metric)

    def elementwise(self, student: Tensor, teacher: Tensor) -> Tensor:
        """Unreduced loss: same shape as the inputs (``cosine``: size 1 along ``dim``)."""
        if self.metric == "mse":
            return (student - teacher).pow(2)
        if self.metric == "l1":
            return (student - teacher).abs()
        if self.metric == "smooth_l1":
            return F.smooth_l1_loss(student, teacher, reduction="none", beta=1.0)
        dim = self.dim if self.dim is not None else (1 if student.dim() == 4 else -1)
        return 1.0 - F.cosine_similarity(student, teacher, dim=dim, eps=1e-8).unsqueeze(dim)

    def extra_repr(self) -> str:
        return f"metric={self.metric!r}, normalize={self.normalize}, dim={self.dim}"


def _fixed_metric(metric: str, class_name: str) -> type[FeatureLoss]:
    """A :class:`FeatureLoss` subclass whose metric is fixed (so a recipe cannot pass another)."""

    def __init__(self, normalize: bool = False, dim: int | None = None):
        FeatureLoss.__init__(self, metric=metric, normalize=normalize, dim=dim)

    doc = f"{FeatureLoss.__name__} with ``metric={metric!r}``; see :class:`FeatureLoss`."
    return type(class_name, (FeatureLoss,), {"__init__": __init__, "__doc__": doc, "__module__": __name__})


MSEFeatureLoss = LOSSES.register("mse")(_fixed_metric("mse", "MSEFeatureLoss"))
L1FeatureLoss = LOSSES.register("l1")(_fixed_metric("l1", "L1FeatureLoss"))
SmoothL1FeatureLoss = LOSSES.register("smooth_l1")(_fixed_metric("smooth_l1", "SmoothL1FeatureLoss"))
CosineFeatureLoss = LOSSES.register("cosine")(_fixed_metric("cosine", "CosineFeatureLoss"))


# ----------------------------------------------------------------------------- FitNets


@LOSSES.register("fitnet", "hint")
class FitNetLoss(nn.Module):
    """Romero, Ballas, Kahou, Chassang, Gatta & Bengio (ICLR 2015), "FitNets: Hints for Thin Deep Nets".

    The student's guided layer ``s`` is mapped by a learnable regressor ``r`` to the shape of the
    teacher's hint layer ``t``, and::

        L_HT = 1/2 · ‖r(s) - t‖²        (sum over the elements of one sample)

    ``reduction``:

    - ``"paper"`` (default): ``1/2 · mean_b ‖r(s)_b - t_b‖²`` -- the paper's hint loss, averaged over
      the batch; it grows with the size of the hint layer, so pick the term weight accordingly;
    - ``"mean"``: the mean of ``(r(s) - t)²`` over all elements (what most reimplementations,
      torchdistill's included, use: ``nn.MSELoss`` after the regressor).

    The regressor is a :class:`~kd_tasks.shared.connectors.LazyConnector` of kind ``connector``
    (default ``"auto"``: a 1x1 convolution for maps whose channels differ, plus a resize when the
    spatial sizes differ; a ``"linear"`` layer for ``(B, D)`` / ``(B, L, D)`` features). The paper's
    regressor is a convolution; ``"conv_bn_relu"`` is a stronger alternative. The regressor is built
    from the shapes of the first batch and its parameters are this loss module's parameters, so they
    train with the student. **Build the optimiser after the first forward** (the
    :class:`~kd_tasks.shared.distiller.Distiller`'s ``prepare`` runs that dry batch), otherwise the
    regressor's parameters are missing from it.
    """

    REDUCTIONS = ("paper", "mean")

    def __init__(self, connector: str | dict = "auto", reduction: str = "paper"):
        super().__init__()
        self.reduction = check_choice(reduction, self.REDUCTIONS, "fitnet", "reduction")
        self.connector = LazyConnector(connector)

    def forward(self, student: Tensor, teacher: Tensor) -> Tensor:
        teacher = as_target(teacher, student)
        if student.shape[0] != teacher.shape[0]:
            raise shape_mismatch("fitnet", student.shape, teacher.shape)
        mapped = self.connector(student, teacher.shape)
        if mapped.shape != teacher.shape:
            detail = f"the {self.connector.kind!r} regressor gives {tuple(mapped.shape)}"
            raise shape_mismatch("fitnet", student.shape, teacher.shape, detail)
        squared = (mapped - teacher).pow(2)
        if self.reduction == "mean":
            return squared.mean()
        return 0.5 * squared.flatten(1).sum(dim=1).mean()

    def extra_repr(self) -> str:
        return f"reduction={self.reduction!r}"


# ----------------------------------------------------------------------------- attention transfer


def attention_map(features: Tensor, p: float = 2.0) -> Tensor:
    """Spatial attention ``Q = sum_c |A_c|^p`` of ``(B, C, *spatial)`` maps, flattened to ``(B, N)``
    and L2-normalised per sample (``N`` = number of positions)."""
    q = features.abs().pow(p).sum(dim=1).flatten(1)
    return F.normalize(q, p=2.0, dim=1)


@LOSSES.register("at", "attention_transfer")
class ATLoss(nn.Module):
    """Zagoruyko & Komodakis (ICLR 2017), "Paying More Attention to Attention: Improving the
    Performance of Convolutional Neural Networks via Attention Transfer".

    Activation-based attention of a ``(B, C, H, W)`` map: ``Q = sum_c |A_c|^p`` (``p = 2``),
    flattened to ``N = H·W`` positions and L2-normalised, ``q = Q / ‖Q‖₂``. With ``β = beta``:

    - ``mode="paper"`` (default): ``β / (2N) · mean_b ‖q_s,b - q_t,b‖₂`` -- the paper's eq. 2
      (unsquared L2 distance, ``p = 2``) with its stated ``β = 10³`` "divided by the number of
      elements in the attention map and the batch size";
    - ``mode="code"``: ``β / (2N) · mean_b ‖q_s,b - q_t,b‖₂²`` = ``β/2 · mean over batch and positions
      of (q_s - q_t)²`` -- the authors' code (``(at(x) - at(y)).pow(2).mean()`` times ``β/2``).

    Both use the same scale ``β/(2N)``; they differ only in squaring the per-sample distance.
    torchdistill's two modes omit ``β/2`` (and the ``1/N`` in its paper mode): ``mode="code",
    beta=2`` reproduces its code mode. The paper sums the term over several layer pairs: add one
    ``at`` term per pair.

    Channel counts may differ (the attention map sums them away); the spatial sizes must match, else
    a ``"resize"`` connector is needed. Any ``(B, C, *spatial)`` map works.
    """

    MODES = ("paper", "code")

    def __init__(self, beta: float = 1000.0, p: float = 2.0, mode: str = "paper"):
        super().__init__()
        self.beta = float(beta)
        self.p = float(p)
        self.mode = check_choice(mode, self.MODES, "at", "mode")

    def forward(self, student: Tensor, teacher: Tensor) -> Tensor:
        teacher = as_target(teacher, student)
        if student.dim() < 3 or student.dim() != teacher.dim():
            raise ShapeMismatchError(
                f"at: expects feature maps (B, C, H, W) for both; got student {tuple(student.shape)}, "
                f"teacher {tuple(teacher.shape)}"
            )
        if student.shape[0] != teacher.shape[0] or student.shape[2:] != teacher.shape[2:]:
            raise ShapeMismatchError(
                f"at: student shape {tuple(student.shape)} and teacher shape {tuple(teacher.shape)} need the "
                f"same batch and spatial size (channels may differ); use a 'resize' connector to bring "
                f"{tuple(student.shape[2:])} to {tuple(teacher.shape[2:])}"
            )
        q_s, q_t = attention_map(student, self.p), attention_map(teacher, self.p)
        distance_sq = (q_s - q_t).pow(2).sum(dim=1)
        per_sample = distance_sq if self.mode == "code" else safe_sqrt(distance_sq)
        return self.beta / (2 * q_s.shape[1]) * per_sample.mean()

    def extra_repr(self) -> str:
        return f"beta={self.beta}, p={self.p}, mode={self.mode!r}"


# ----------------------------------------------------------------------------- FSP


def fsp_matrix(first: Tensor, second: Tensor) -> Tensor:
    """Flow of solution procedure ``G = F1ᵀ F2 / (h·w)`` of two ``(B, C, H, W)`` maps: ``(B, C1, C2)``.

    ``G_ij = sum_{h,w} F1[i, h, w] · F2[j, h, w] / (h·w)``. When the two maps differ in spatial
    size, each is adaptively average-pooled to the smaller size per dimension
    (``(min H, min W)``) first (as in RepDistiller; the paper pairs layers of equal size).
    """
    size = tuple(min(a, b) for a, b in zip(first.shape[2:], second.shape[2:]))
    if tuple(first.shape[2:]) != size:
        first = F.adaptive_avg_pool2d(first, size)
    if tuple(second.shape[2:]) != size:
        second = F.adaptive_avg_pool2d(second, size)
    f1, f2 = first.flatten(2), second.flatten(2)
    return torch.bmm(f1, f2.transpose(1, 2)) / f1.shape[2]


@LOSSES.register("fsp")
class FSPLoss(nn.Module):
    """Yim, Joo, Bae & Kim (CVPR 2017), "A Gift from Knowledge Distillation: Fast Optimization,
    Network Minimization and Transfer Learning".

    Inputs are pairs of maps from two layers of the same network: ``student=(s1, s2)``,
    ``teacher=(t1, t2)``, each ``(B, C, H, W)``. With ``G = fsp_matrix(F1, F2)`` (``F1ᵀF2 / (h·w)``)::

        L = mean_b ‖G_s,b - G_t,b‖²_F           (squared=True, default: the paper)
        L = mean_b ‖G_s,b - G_t,b‖_F            (squared=False)

    torchdistill 1.1.5 sums unsquared column norms instead; neither is its exact value. The paper
    weighs several layer pairs with ``λ_i``: add one ``fsp`` term per pair with its weight. The
    channel counts of the student's pair must equal the teacher's (``C1`` and ``C2``); spatial sizes
    may differ between networks (``G`` averages over positions) and within a pair (pooled, see
    :func:`fsp_matrix`).
    """

    def __init__(self, squared: bool = True):
        super().__init__()
        self.squared = bool(squared)

    def forward(self, student: Sequence[Tensor], teacher: Sequence[Tensor]) -> Tensor:
        s1, s2 = self._pair(student, "student")
        t1, t2 = (as_target(t, s1) for t in self._pair(teacher, "teacher"))
        for s, t, which in ((s1, t1, "first"), (s2, t2, "second")):
            if s.shape[:2] != t.shape[:2]:
                detail = f"{which} layer of the pair; batch and channels must match"
                raise shape_mismatch("fsp", s.shape, t.shape, detail)
        diff = (fsp_matrix(s1, s2) - fsp_matrix(t1, t2)).flatten(1)
        per_sample = diff.pow(2).sum(dim=1)
        if not self.squared:
            per_sample = safe_sqrt(per_sample)
        return per_sample.mean()

    @staticmethod
    def _pair(maps: Sequence[Tensor], who: str) -> tuple[Tensor, Tensor]:
        if isinstance(maps, Tensor) or len(maps) != 2:
            raise KDConfigError(
                f"fsp: the {who} input must be a pair (layer_1, layer_2) of (B, C, H, W) maps from two "
                "layers of the same network; tap two modules and pass them together"
            )
        first, second = maps
        if first.dim() != 4 or second.dim() != 4 or first.shape[0] != second.shape[0]:
            raise ShapeMismatchError(
                f"fsp: the {who} pair must be two (B, C, H, W) maps of one batch; got {tuple(first.shape)} "
                f"and {tuple(second.shape)}"
            )
        return first, second

    def extra_repr(self) -> str:
        return f"squared={self.squared}"
