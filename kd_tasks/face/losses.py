"""Face-embedding distillation losses, registered in ``LOSSES``.

- ``embedding_cosine`` / ``embedding_l2`` (:class:`EmbeddingKDLoss`): match each face's embedding
  to the teacher's (the direction, which is all a cosine verifier reads);
- ``margin_rkd`` (:class:`MarginRKDLoss`): match the *angles* between the faces of a batch and
  between the identity centres of the batch -- the geometry margin-based softmax losses shape.

The generic relational losses (``rkd``, ``sp``, ``pkt``, ``cc``, ``irg``, ``crd``) of
:mod:`kd_tasks.shared.losses.relational` apply to embeddings unchanged and are not repeated here.
Teacher inputs are targets: detached inside the losses.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kd_tasks.shared.errors import KDConfigError
from kd_tasks.shared.losses.feature import shape_mismatch
from kd_tasks.shared.losses.logit import check_choice
from kd_tasks.shared.losses.relational import embeddings, off_diagonal_mask, zero_like_graph
from kd_tasks.shared.registry import LOSSES

__all__ = ["EmbeddingKDLoss", "EmbeddingCosineLoss", "EmbeddingL2Loss", "MarginRKDLoss", "angle_matrix",
           "identity_centres"]


@LOSSES.register("embedding_kd")
class EmbeddingKDLoss(nn.Module):
    """Embedding distillation: the student's embedding of a face follows the teacher's.

    With ``ŝ = s/‖s‖``, ``t̂ = t/‖t‖`` and ``B`` faces::

        cosine:  L = 1/B · Σ_i (1 - ŝ_i · t̂_i)
        l2:      L = 1/B · Σ_i ‖ŝ_i - t̂_i‖²       (= 2 × cosine on unit vectors)
        l2, normalize=False:  L = 1/B · Σ_i ‖s_i - t_i‖²

    The cosine form matches what a cosine-similarity verifier compares and ignores the embedding
    norm; the unnormalised L2 form is the "embedding distillation" of e.g. ShrinkTeaNet (Duong,
    Quach, Luu, Le & Ricanek, 2019) and also transfers the norm. Student and teacher must have the
    same width: add a ``linear`` connector to the term otherwise.
    """

    METRICS = ("cosine", "l2")

    def __init__(self, metric: str = "cosine", normalize: bool = True):
        super().__init__()
        self.metric = check_choice(metric, self.METRICS, "embedding_kd", "metric")
        self.normalize = bool(normalize)

    def forward(self, student: Tensor, teacher: Tensor) -> Tensor:
        s, t = embeddings(student, teacher, f"embedding_{self.metric}")
        if s.shape != t.shape:
            raise shape_mismatch(f"embedding_{self.metric}", s.shape, t.shape)
        if self.metric == "cosine":
            return (1.0 - F.cosine_similarity(s, t, dim=1, eps=1e-8)).mean()
        if self.normalize:
            s, t = F.normalize(s, dim=1), F.normalize(t, dim=1)
        return (s - t).pow(2).sum(dim=1).mean()

    def extra_repr(self) -> str:
        return f"metric={self.metric!r}, normalize={self.normalize}"


@LOSSES.register("embedding_cosine")
class EmbeddingCosineLoss(EmbeddingKDLoss):
    """:class:`EmbeddingKDLoss` with ``metric="cosine"``: ``1/B · Σ_i (1 - cos(s_i, t_i))``."""

    def __init__(self):
        super().__init__(metric="cosine")


@LOSSES.register("embedding_l2")
class EmbeddingL2Loss(EmbeddingKDLoss):
    """:class:`EmbeddingKDLoss` with ``metric="l2"``: ``1/B · Σ_i ‖ŝ_i - t̂_i‖²`` (unit vectors by default)."""

    def __init__(self, normalize: bool = True):
        super().__init__(metric="l2", normalize=normalize)


def angle_matrix(x: Tensor, eps: float = 1e-6) -> Tensor:
    """``(B, D) -> (B, B)``: ``θ_ij = arccos(x̂_i · x̂_j)`` in radians, the cosine clamped to
    ``[-1 + eps, 1 - eps]`` so the gradient of ``arccos`` stays finite."""
    unit = F.normalize(x, dim=1)
    return torch.acos((unit @ unit.t()).clamp(-1.0 + eps, 1.0 - eps))


def identity_centres(x: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
    """Unit centres of the identities present in a batch: ``c_k = normalize(Σ_{y_i = k} x̂_i)``.

    Returns ``(centres (K, D), identities (K,))``, identities in increasing order.
    """
    ids, inverse = torch.unique(target.long(), return_inverse=True)
    one_hot = F.one_hot(inverse, num_classes=ids.shape[0]).to(x.dtype)  # (B, K)
    return F.normalize(one_hot.t() @ F.normalize(x, dim=1), dim=1), ids


@LOSSES.register("margin_rkd", "angular_rkd")
class MarginRKDLoss(nn.Module):
    """Angular relational distillation for margin-trained face embeddings.

    Relational KD in the sense of Park, Kim, Lu & Cho (CVPR 2019), "Relational Knowledge
    Distillation", measured in the angular space in which margin-based softmax losses (ArcFace,
    Deng et al. 2019; CosFace, Wang et al. 2018) place their decision boundaries: the margin between
    two identities is an angle between their centres, so the student is asked to reproduce the
    teacher's angles rather than its Euclidean distances. This combination is defined here; it is not
    the loss of one paper.

    With ``θ_ij = arccos(x̂_i · x̂_j)`` (:func:`angle_matrix`), ``l_δ`` the Huber loss
    (``smooth_l1`` with ``beta = δ``)::

        L = w_i · mean_{i≠j} l_δ(θ^s_ij, θ^t_ij)                 faces of the batch
          + w_c · mean_{k≠l} l_δ(φ^s_kl, φ^t_kl)                 identity centres of the batch

    where ``φ_kl`` is the angle between the batch centres of identities ``k`` and ``l``
    (:func:`identity_centres`, built from each network's own embeddings). ``metric="cosine"``
    compares the cosines ``x̂_i · x̂_j`` instead of the angles. The centre term needs the identity
    labels (``target=``) and at least two identities in the batch (else it is 0); with
    ``centre_weight=0`` no labels are needed. Widths of student and teacher may differ. Invariant to
    the scale of either embedding.
    """

    METRICS = ("angle", "cosine")

    def __init__(self, instance_weight: float = 1.0, centre_weight: float = 1.0, metric: str = "angle",
                 delta: float = 1.0, eps: float = 1e-6):
        super().__init__()
        self.instance_weight = float(instance_weight)
        self.centre_weight = float(centre_weight)
        self.metric = check_choice(metric, self.METRICS, "margin_rkd", "metric")
        self.delta = float(delta)
        self.eps = float(eps)
        self.needs_target = self.centre_weight != 0.0

    def relation(self, x: Tensor) -> Tensor:
        if self.metric == "angle":
            return angle_matrix(x, self.eps)
        unit = F.normalize(x, dim=1)
        return unit @ unit.t()

    def _term(self, s: Tensor, t: Tensor) -> Tensor:
        if s.shape[0] < 2:
            return zero_like_graph(s)
        off = off_diagonal_mask(s.shape[0], s.device)
        huber = F.smooth_l1_loss(self.relation(s), self.relation(t), reduction="none", beta=self.delta)
        return huber[off].mean()

    def forward(self, student: Tensor, teacher: Tensor, target: Tensor | None = None) -> Tensor:
        s, t = embeddings(student, teacher, "margin_rkd")
        loss = zero_like_graph(s)
        if self.instance_weight:
            loss = loss + self.instance_weight * self._term(s, t)
        if self.centre_weight:
            if target is None:
                raise KDConfigError("margin_rkd: the centre term needs identity labels (target=); "
                                    "or set centre_weight: 0")
            centres_s, _ = identity_centres(s, target)
            centres_t, _ = identity_centres(t, target)
            loss = loss + self.centre_weight * self._term(centres_s, centres_t)
        return loss

    def extra_repr(self) -> str:
        return (f"instance_weight={self.instance_weight}, centre_weight={self.centre_weight}, "
                f"metric={self.metric!r}, delta={self.delta}")
