"""Margin-based softmax heads for face recognition: ArcFace, CosFace, SphereFace-style and plain
normalised softmax.

All heads share one structure. Embeddings ``x`` (B, D) and class centres ``W`` (C, D) are
L2-normalised, ``cos θ_j = x̂ · Ŵ_j`` (B, C); the target logit gets a margin, the others stay
``s · cos θ_j``; the loss is the cross-entropy of these logits::

    L = -1/B · Σ_i log( e^{s·ψ(θ_{y_i})} / (e^{s·ψ(θ_{y_i})} + Σ_{j≠y_i} e^{s·cos θ_j}) )

The heads differ only in the target-class function ``ψ`` (see each class). ``s`` is the scale
(``scale``, 64 in the papers; smaller values train faster on small data). At evaluation time
(``target=None``) every logit is ``s · cos θ_j``.

Numerics. ``θ`` is never computed with ``arccos`` in ArcFace: ``cos(θ + m)`` is expanded as
``cos θ cos m - sin θ sin m`` with ``sin θ = sqrt(max(1 - cos² θ, 0))``, whose gradient stays
finite at ``cos θ = ±1`` where ``d arccos/dx`` is infinite. SphereFace needs ``θ`` itself for
``k = ⌊mθ/π⌋``; its ``cos θ`` is clamped to ``[-1 + ε, 1 - ε]`` before ``arccos``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kd_tasks.shared.errors import KDConfigError, ShapeMismatchError, suggest

__all__ = [
    "MarginHead",
    "NormSoftmax",
    "ArcFace",
    "CosFace",
    "SphereFace",
    "MarginSoftmaxLoss",
    "MARGINS",
    "build_margin_head",
    "init_head_from_teacher",
]

ARC_BOUNDARIES = ("insightface", "easy", "none")


class MarginHead(nn.Module):
    """Normalised class centres and cosine logits; subclasses set the target-class function ``ψ``.

    Args:
        embedding_dim: ``D``.
        num_classes: ``C`` (training identities).
        scale: ``s``.
    """

    def __init__(self, embedding_dim: int, num_classes: int, scale: float = 64.0):
        super().__init__()
        if int(num_classes) < 2:
            raise KDConfigError(f"a margin head needs at least 2 classes (identities), got {num_classes}")
        if not float(scale) > 0:
            raise KDConfigError(f"margin head: scale must be > 0, got {scale}")
        self.embedding_dim = int(embedding_dim)
        self.num_classes = int(num_classes)
        self.scale = float(scale)
        self.weight = nn.Parameter(torch.empty(self.num_classes, self.embedding_dim))
        nn.init.normal_(self.weight, std=0.01)

    def cosine(self, embeddings: Tensor) -> Tensor:
        """``cos θ`` (B, C) between the normalised embeddings and the normalised class centres."""
        if embeddings.dim() != 2 or embeddings.shape[1] != self.embedding_dim:
            raise ShapeMismatchError(
                f"{type(self).__name__}: expects embeddings (B, {self.embedding_dim}), got {tuple(embeddings.shape)}"
            )
        return F.normalize(embeddings.float(), dim=1) @ F.normalize(self.weight.float(), dim=1).t()

    def target_logit(self, cos_target: Tensor) -> Tensor:
        """``ψ(θ_y)`` from ``cos θ_y`` (B,); identity for plain normalised softmax."""
        return cos_target

    def forward(self, embeddings: Tensor, target: Tensor | None = None) -> Tensor:
        """Logits ``s · cos θ_j``, with ``s · ψ(θ_y)`` in the target column when ``target`` is given."""
        cos = self.cosine(embeddings)
        if target is None:
            return self.scale * cos
        target = target.long().reshape(-1, 1)
        if target.shape[0] != cos.shape[0]:
            raise ShapeMismatchError(f"{type(self).__name__}: {target.shape[0]} targets for a batch of {cos.shape[0]}")
        psi = self.target_logit(cos.gather(1, target).squeeze(1))
        return self.scale * cos.scatter(1, target, psi.unsqueeze(1))

    def extra_repr(self) -> str:
        return f"embedding_dim={self.embedding_dim}, num_classes={self.num_classes}, scale={self.scale}"


class NormSoftmax(MarginHead):
    """Normalised softmax without margin (``ψ(θ) = cos θ``), e.g. NormFace (Wang et al., 2017)."""


class ArcFace(MarginHead):
    """Deng, Guo, Xue & Zafeiriou (CVPR 2019), "ArcFace: Additive Angular Margin Loss for Deep Face
    Recognition".

    Additive angular margin on the target class: ``ψ(θ) = cos(θ + m)`` (paper: ``m = 0.5``,
    ``s = 64``), computed as ``cos θ cos m - sin θ sin m``.

    ``cos(θ + m)`` stops decreasing once ``θ + m > π``, so a sample far from its centre would be
    pushed *further away*. ``boundary`` chooses what happens there:

    - ``"insightface"`` (default, the authors' code): for ``θ > π - m`` (``cos θ < cos(π - m)``)
      use ``cos θ - m · sin m``, a linear continuation below the margin region (CosFace-like) that
      keeps ``ψ`` monotonic in ``θ``;
    - ``"easy"`` (the code's ``easy_margin``): apply the margin only where ``cos θ > 0``
      (``θ < π/2``), else ``ψ = cos θ``;
    - ``"none"``: the paper's formula everywhere (non-monotonic beyond ``π - m``).
    """

    def __init__(self, embedding_dim: int, num_classes: int, scale: float = 64.0, margin: float = 0.5,
                 boundary: str = "insightface"):
        super().__init__(embedding_dim, num_classes, scale)
        if not 0.0 <= float(margin) < math.pi / 2:
            raise KDConfigError(f"arcface: margin must be in [0, π/2) radians, got {margin}")
        if boundary not in ARC_BOUNDARIES:
            raise KDConfigError(f"arcface: {suggest(boundary, ARC_BOUNDARIES, 'boundary')}")
        self.margin = float(margin)
        self.boundary = boundary

    def target_logit(self, cos_target: Tensor) -> Tensor:
        m = self.margin
        sin_target = (1.0 - cos_target.pow(2)).clamp(min=0.0).sqrt()
        phi = cos_target * math.cos(m) - sin_target * math.sin(m)
        if self.boundary == "easy":
            return torch.where(cos_target > 0, phi, cos_target)
        if self.boundary == "insightface":
            return torch.where(cos_target > math.cos(math.pi - m), phi, cos_target - m * math.sin(m))
        return phi

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, margin={self.margin}, boundary={self.boundary!r}"


class CosFace(MarginHead):
    """Wang, Wang, Zhou, Ji, Gong, Zhou, Li & Liu (CVPR 2018), "CosFace: Large Margin Cosine Loss for
    Deep Face Recognition" (also AM-Softmax, Wang, Cheng, Liu & Liu 2018).

    Additive cosine margin on the target class: ``ψ(θ) = cos θ - m`` (paper: ``m = 0.35``,
    ``s = 64``). Monotonic everywhere; no special region.
    """

    def __init__(self, embedding_dim: int, num_classes: int, scale: float = 64.0, margin: float = 0.35):
        super().__init__(embedding_dim, num_classes, scale)
        if not 0.0 <= float(margin) < 1.0:
            raise KDConfigError(f"cosface: margin must be in [0, 1), got {margin}")
        self.margin = float(margin)

    def target_logit(self, cos_target: Tensor) -> Tensor:
        return cos_target - self.margin

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, margin={self.margin}"


class SphereFace(MarginHead):
    """SphereFace-style multiplicative angular margin, after Liu, Wen, Yu, Li, Raj & Song (CVPR 2017),
    "SphereFace: Deep Hypersphere Embedding for Face Recognition".

    ``ψ(θ) = (-1)^k cos(mθ) - 2k`` for ``θ ∈ [kπ/m, (k+1)π/m]``, ``k = ⌊mθ/π⌋ ∈ {0, ..., m-1}``,
    ``m`` an integer (paper: 4), which is monotonically decreasing on ``[0, π]``.

    Differences from the paper, on purpose: the logits use a fixed scale ``s`` on normalised
    embeddings (as in NormFace / ArcFace's framework) rather than the feature norm ``‖x‖``, and the
    paper's annealing ``(λ cos θ + ψ(θ)) / (1 + λ)`` is offered through ``lambda_`` as a constant
    (``0`` = pure ``ψ``, the default).
    """

    def __init__(self, embedding_dim: int, num_classes: int, scale: float = 30.0, margin: int = 4,
                 lambda_: float = 0.0, eps: float = 1e-7):
        super().__init__(embedding_dim, num_classes, scale)
        if int(margin) != margin or int(margin) < 1:
            raise KDConfigError(f"sphereface: margin must be a positive integer, got {margin}")
        self.margin = int(margin)
        self.lambda_ = float(lambda_)
        self.eps = float(eps)

    def target_logit(self, cos_target: Tensor) -> Tensor:
        m = self.margin
        theta = torch.acos(cos_target.clamp(-1.0 + self.eps, 1.0 - self.eps))
        k = torch.floor(m * theta / math.pi).clamp(max=m - 1)
        sign = 1.0 - 2.0 * torch.remainder(k, 2.0)
        psi = sign * torch.cos(m * theta) - 2.0 * k
        return (self.lambda_ * cos_target + psi) / (1.0 + self.lambda_)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, margin={self.margin}, lambda_={self.lambda_}"


MARGINS: dict[str, type[MarginHead]] = {
    "arcface": ArcFace,
    "cosface": CosFace,
    "sphereface": SphereFace,
    "softmax": NormSoftmax,
}


def build_margin_head(kind: str, embedding_dim: int, num_classes: int, **kwargs) -> MarginHead:
    """``MARGINS[kind](embedding_dim, num_classes, **kwargs)`` (``scale``, ``margin``, ...)."""
    if kind not in MARGINS:
        raise KDConfigError(suggest(kind, MARGINS, "margin head"))
    return MARGINS[kind](embedding_dim, num_classes, **kwargs)


class MarginSoftmaxLoss(nn.Module):
    """Cross-entropy of a margin head's logits: ``loss(embeddings, target)``.

    Usable as the distiller's ``task_loss`` (it receives the student's embeddings as its
    "logits"); the head's class centres are then parameters of the distiller and train with the
    student, while only the student is exported.
    """

    def __init__(self, head: MarginHead):
        super().__init__()
        self.head = head

    def forward(self, embeddings: Tensor, target: Tensor) -> Tensor:
        if target is None:
            raise KDConfigError("a margin loss needs identity labels (target)")
        return F.cross_entropy(self.head(embeddings, target), target.long())


@torch.no_grad()
def init_head_from_teacher(head: MarginHead, centres: Tensor, freeze: bool = False) -> MarginHead:
    """Start (or fix) a margin head's class centres at the teacher's: ``W ← centres`` (C, D).

    ``centres`` are e.g. :func:`kd_tasks.face.space.class_centres` of the training set's teacher
    embeddings (in a conditioned teacher space). With ``freeze=True`` the centres get no gradient:
    the student must place its embeddings where the teacher puts each identity (as in ProxylessKD,
    Shi et al. 2020, and MarginDistillation's frozen head).
    """
    if tuple(centres.shape) != tuple(head.weight.shape):
        raise ShapeMismatchError(
            f"{type(head).__name__}: teacher centres {tuple(centres.shape)} for a head of {tuple(head.weight.shape)} "
            "(the student's embedding width must equal the (conditioned) teacher width)"
        )
    head.weight.copy_(F.normalize(centres.float(), dim=1))
    head.weight.requires_grad_(not freeze)
    return head
