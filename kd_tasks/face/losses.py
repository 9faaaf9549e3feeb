"""Face-embedding distillation losses, registered in ``LOSSES``.

- ``embedding_cosine`` / ``embedding_l2`` (:class:`EmbeddingKDLoss`): match each face's embedding
  to the teacher's (the direction, which is all a cosine verifier reads);
- ``margin_rkd`` (:class:`MarginRKDLoss`): match the *angles* between the faces of a batch and
  between the identity centres of the batch -- the geometry margin-based softmax losses shape;
- ``embedding_conditioned`` (:class:`ConditionedEmbeddingLoss`): cosine KD against the teacher's
  embeddings centred (or whitened) with training-set statistics (:mod:`.space`), so the teacher's
  mean direction is no free win;
- ``ekd`` (:class:`EKDLoss`): evaluation-oriented KD (Huang et al., CVPR 2022), a rank loss on the
  pair similarities around the FAR thresholds;
- ``adadistill`` (:class:`AdaDistillLoss`): a margin head whose class centres follow the teacher's
  embeddings by an agreement-weighted EMA (Boutros et al., ECCV 2024);
- ``margin_distillation`` (:class:`MarginDistillationLoss`): an ArcFace head at the teacher's class
  centres with a per-sample margin from the teacher's cosine to its centre (Svitov & Alyamkin 2020).

The generic relational losses (``rkd``, ``sp``, ``pkt``, ``cc``, ``irg``, ``crd``) of
:mod:`kd_tasks.shared.losses.relational` apply to embeddings unchanged and are not repeated here.
Teacher inputs are targets: detached inside the losses.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kd_tasks.shared.errors import KDConfigError
from kd_tasks.shared.losses.feature import shape_mismatch
from kd_tasks.shared.losses.logit import check_choice
from kd_tasks.shared.losses.relational import embeddings, off_diagonal_mask, zero_like_graph
from kd_tasks.shared.registry import LOSSES

__all__ = ["EmbeddingKDLoss", "EmbeddingCosineLoss", "EmbeddingL2Loss", "MarginRKDLoss", "angle_matrix",
           "identity_centres", "ConditionedEmbeddingLoss", "EKDLoss", "AdaDistillLoss", "MarginDistillationLoss"]


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


# ----------------------------------------------------------------------------- conditioned embedding KD


def _space(mode: str, out_dim: int | None = None):
    from .space import TeacherSpace

    return TeacherSpace(mode, out_dim=out_dim)


@LOSSES.register("embedding_conditioned", "conditioned_cosine")
class ConditionedEmbeddingLoss(nn.Module):
    """Cosine embedding KD against a *conditioned* teacher space (:class:`~kd_tasks.face.space.TeacherSpace`).

    With ``φ`` the teacher-space map fitted on the training set's teacher embeddings (``centre``:
    ``t̂ - μ``; ``whiten``: ``(t̂ - μ) U Λ^{-1/2}``)::

        L = 1/B · Σ_i (1 - cos(s_i, φ(t_i)))

    Unlike :class:`EmbeddingCosineLoss` on raw embeddings, a constant student output (e.g. the
    teacher's mean direction) scores an expected loss of 1 here: only what tells faces apart is
    rewarded. Fit the space before training: ``loss.space.fit(train_teacher_embeddings)``
    (``kd-tasks face`` does this from the teacher cache). The student's width must equal
    ``space.output_dim`` (add a ``linear`` connector otherwise -- a learned projection).
    """

    def __init__(self, mode: str = "centre", out_dim: int | None = None):
        super().__init__()
        self.space = _space(mode, out_dim)

    def forward(self, student: Tensor, teacher: Tensor) -> Tensor:
        s, t = embeddings(student, teacher, "embedding_conditioned")
        target = self.space(t)
        if s.shape != target.shape:
            raise shape_mismatch("embedding_conditioned", s.shape, target.shape)
        return (1.0 - F.cosine_similarity(s, target, dim=1, eps=1e-8)).mean()


# ----------------------------------------------------------------------------- EKD


@LOSSES.register("ekd")
class EKDLoss(nn.Module):
    """Evaluation-oriented KD: Huang, Wu, Xu & Ding (CVPR 2022), "Evaluation-oriented Knowledge
    Distillation for Deep Face Recognition" (authors' code: Tencent/TFace, ``tasks/ekd``).

    Pairwise cosine similarities ``S_ij`` of the batch (``i < j``) are split into positive
    (same identity) and negative pairs. The FAR operating points are thresholds on the negative
    scores: with the negatives sorted in decreasing order and ``n`` of them, anchor ``a`` (FAR
    ``1/a``) is the score at index ``⌊n / a⌋``; the thresholds ``τ^s_a``, ``τ^t_a`` of student and
    teacher are EMAs (``momentum``) of the per-batch values, updated before the loss. For a pair
    score ``x`` its soft rank is the number of thresholds below it,
    ``r(x) = Σ_a σ((x - τ_a) / T)``. The loss asks the student's ranks to equal the teacher's::

        L = w_p · mean_{pos} (r_s(S^s_ij) - r_t(S^t_ij))²
          + w_n · mean_{top-k neg} (r_s(S^s_ij) - r_t(S^t_ij))²

    over all positive pairs and the ``topk`` negatives with the highest *student* score (the pairs
    that decide the student's FAR). Defaults are the authors': ``T = 0.01``, ``momentum = 0.01``,
    ``w_p = 0.02``, ``w_n = 0.01``, ``topk = 2000``, anchors 10 ... 10⁶ (anchors beyond the
    number of negatives of a batch fall on its top negative). ``space`` conditions the teacher
    embeddings first (``none`` by default, the paper's). Needs identity labels.
    """

    needs_target = True

    def __init__(self, anchors: Sequence[int] = (10, 100, 1000, 10000, 100000, 1000000), temperature: float = 0.01,
                 momentum: float = 0.01, pos_weight: float = 0.02, neg_weight: float = 0.01, topk: int = 2000,
                 space: str = "none"):
        super().__init__()
        self.anchors = tuple(int(a) for a in anchors)
        if not self.anchors or min(self.anchors) < 1:
            raise KDConfigError(f"ekd: anchors must be integers >= 1 (FAR = 1/anchor), got {list(anchors)}")
        if not temperature > 0 or not 0 < momentum <= 1 or int(topk) < 1:
            raise KDConfigError("ekd: temperature > 0, 0 < momentum <= 1 and topk >= 1 are required")
        self.temperature, self.momentum = float(temperature), float(momentum)
        self.pos_weight, self.neg_weight, self.topk = float(pos_weight), float(neg_weight), int(topk)
        self.space = _space(space)
        self.register_buffer("s_anchor", torch.zeros(len(self.anchors)))
        self.register_buffer("t_anchor", torch.zeros(len(self.anchors)))

    def soft_rank(self, x: Tensor, anchors: Tensor) -> Tensor:
        z = ((x.unsqueeze(1) - anchors.unsqueeze(0)) / self.temperature).clamp(-50, 50)
        return torch.sigmoid(z).sum(dim=1)

    def forward(self, student: Tensor, teacher: Tensor, target: Tensor) -> Tensor:
        s, t = embeddings(student, teacher, "ekd")
        t = self.space(t)
        s, t = F.normalize(s, dim=1), F.normalize(t, dim=1)
        y = target.reshape(-1)
        i, j = torch.triu_indices(len(y), len(y), offset=1, device=s.device)
        same = y[i] == y[j]
        sim_s = (s @ s.t())[i, j]
        sim_t = (t @ t.t())[i, j]
        neg_s, neg_t = sim_s[~same], sim_t[~same]
        if neg_s.numel() == 0:
            return zero_like_graph(s)
        order = torch.argsort(neg_s.detach(), descending=True)
        with torch.no_grad():
            n = neg_s.numel()
            idx = torch.tensor([n // a for a in self.anchors], device=s.device).clamp(max=n - 1)
            s_thr = neg_s.detach()[order][idx]
            t_thr = torch.sort(neg_t, descending=True).values[idx]
            self.s_anchor.mul_(1 - self.momentum).add_(self.momentum * s_thr)
            self.t_anchor.mul_(1 - self.momentum).add_(self.momentum * t_thr)
        loss = zero_like_graph(s)
        if same.any():
            diff = self.soft_rank(sim_s[same], self.s_anchor) - self.soft_rank(sim_t[same], self.t_anchor)
            loss = loss + self.pos_weight * diff.pow(2).mean()
        top = order[: self.topk]
        diff = self.soft_rank(neg_s[top], self.s_anchor) - self.soft_rank(neg_t[top], self.t_anchor)
        return loss + self.neg_weight * diff.pow(2).mean()

    def extra_repr(self) -> str:
        return f"anchors={self.anchors}, temperature={self.temperature}, momentum={self.momentum}, topk={self.topk}"


# ----------------------------------------------------------------------------- margin-aware KD heads


def _margin_logits(cos: Tensor, target: Tensor, kind: str, margin: Tensor | float, scale: float) -> Tensor:
    """``s · cos θ_j`` with ``s · cos(θ_y + m)`` (arcface) or ``s · (cos θ_y - m)`` (cosface) in the target column;
    ``m`` may be per sample ``(B,)``."""
    target = target.long().reshape(-1, 1)
    c = cos.gather(1, target).squeeze(1)
    m = torch.as_tensor(margin, dtype=cos.dtype, device=cos.device)
    if kind == "arcface":
        psi = c * torch.cos(m) - (1.0 - c.pow(2)).clamp(min=0.0).sqrt() * torch.sin(m)
    else:
        psi = c - m
    return scale * cos.scatter(1, target, psi.unsqueeze(1))


@LOSSES.register("adadistill")
class AdaDistillLoss(nn.Module):
    """AdaDistill: Boutros, Štruc & Damer (ECCV 2024), "AdaDistill: Adaptive Knowledge Distillation for
    Deep Face Recognition" (authors' code: fdbtrs/AdaDistill, ``AdaptiveAArcFace`` / ``AdaptiveACosFace``).

    The student's margin head has class centres ``W`` (C, D) that are **not** trained by gradient:
    before each loss they move towards the teacher's embeddings, the faster the less the student
    agrees with the teacher. For each sample ``i`` of the batch, with unit ``ŝ_i``, ``t̂_i``::

        α_i = clip( cos(ŝ_i, t̂_i) · clip(cos(W_{y_i}, t̂_i), 1e-6, 1), 1e-6, 1 )
        W_{y_i} ← α_i · W_{y_i} + (1 - α_i) · t̂_i          (no gradient)
        L = CE( s · ψ(cos θ_{i,y_i}), s · cos θ_{i,j≠y_i} ),   cos θ_ij = ŝ_i · Ŵ_j (after the update)

    with ``ψ(c) = cos(arccos c + m)`` (``margin="arcface"``) or ``c - m`` (``"cosface"``). All
    ``α_i`` use the centres before the update; a class seen twice in a batch is updated in batch
    order (for distinct classes this is the authors' single indexed assignment). Defaults as in the
    authors' configuration: ``scale = 64``, ``m = 0.45``. ``W`` starts as ``N(0, 0.01²)`` drawn from a
    generator of its own (seed ``seed``, default from :func:`~kd_tasks.shared.distiller.distillation_seed`),
    or from given centres (:meth:`init_centres`). ``space`` conditions the teacher embeddings
    first (``none`` = the paper). The student width must equal the (conditioned) teacher width.
    """

    needs_target = True
    KINDS = ("arcface", "cosface")

    def __init__(self, num_classes: int, embedding_dim: int, margin: str = "arcface", scale: float = 64.0,
                 m: float = 0.45, space: str = "none", seed: int | None = None):
        super().__init__()
        self.kind = check_choice(margin, self.KINDS, "adadistill", "margin")
        if int(num_classes) < 2 or int(embedding_dim) < 1 or not float(scale) > 0:
            raise KDConfigError("adadistill: num_classes >= 2, embedding_dim >= 1 and scale > 0 are required")
        self.scale, self.m = float(scale), float(m)
        self.space = _space(space)
        if seed is None:
            from kd_tasks.shared.distiller import distillation_seed

            seed = distillation_seed(17)
        gen = torch.Generator().manual_seed(int(seed))
        self.register_buffer("centres", torch.randn(int(num_classes), int(embedding_dim), generator=gen) * 0.01)
        self.last_alpha = float("nan")

    @torch.no_grad()
    def init_centres(self, centres: Tensor) -> "AdaDistillLoss":
        if tuple(centres.shape) != tuple(self.centres.shape):
            raise KDConfigError(f"adadistill: centres {tuple(centres.shape)} for a head of {tuple(self.centres.shape)}")
        self.centres.copy_(centres)
        return self

    @torch.no_grad()
    def update_centres(self, s: Tensor, t: Tensor, target: Tensor) -> Tensor:
        """The EMA step above on unit ``s``, ``t``; returns ``α`` (B,)."""
        w = self.centres[target]
        lam = F.cosine_similarity(w, t, dim=1).clamp(1e-6, 1.0)
        alpha = (F.cosine_similarity(s, t, dim=1).clamp(-1, 1) * lam).clamp(1e-6, 1.0)
        for k in range(len(target)):
            y = int(target[k])
            self.centres[y] = alpha[k] * self.centres[y] + (1 - alpha[k]) * t[k]
        return alpha

    def forward(self, student: Tensor, teacher: Tensor, target: Tensor) -> Tensor:
        s, t = embeddings(student, teacher, "adadistill")
        t = F.normalize(self.space(t), dim=1)
        if s.shape[1] != self.centres.shape[1] or t.shape[1] != self.centres.shape[1]:
            raise shape_mismatch("adadistill", s.shape, (s.shape[0], self.centres.shape[1]))
        target = target.long().reshape(-1)
        s_unit = F.normalize(s, dim=1)
        alpha = self.update_centres(s_unit.detach(), t, target)
        self.last_alpha = float(alpha.mean())
        cos = (s_unit @ F.normalize(self.centres, dim=1).t()).clamp(-1, 1)
        return F.cross_entropy(_margin_logits(cos, target, self.kind, self.m, self.scale), target)

    def extra_repr(self) -> str:
        return f"classes={self.centres.shape[0]}, dim={self.centres.shape[1]}, margin={self.kind!r}, " \
               f"scale={self.scale}, m={self.m}"


@LOSSES.register("margin_distillation")
class MarginDistillationLoss(nn.Module):
    """MarginDistillation: Svitov & Alyamkin (2020), "MarginDistillation: distillation for margin-based
    softmax" (arXiv:2003.02586; authors' code: david-svitov/margindistillation).

    The student's ArcFace head uses the teacher's class centres ``W`` (C, D), frozen, and each
    sample gets its own angular margin from how close the *teacher* puts it to its centre::

        d_i = cos(t̂_i, Ŵ_{y_i})
        m_i = m_min + (m_max - m_min) · d_i / max_j d_j               (batch maximum)
        L   = CE( s · cos(θ_{i,y_i} + m_i), s · cos θ_{i,j≠y_i} ),     cos θ_ij = ŝ_i · Ŵ_j

    Faces the teacher finds typical of their identity get a large margin, hard ones a small one.
    Authors' values: ``s = 64``, ``m_min = 0.2``, ``m_max = 0.5``. When every ``d_i <= 0`` the margin
    is ``m_min``. Set the centres with :meth:`init_centres` (e.g. :func:`~kd_tasks.face.space.class_centres`
    of the training set's teacher embeddings: ``kd-tasks face`` does this); ``space`` conditions
    the teacher embeddings (and should be the space the centres were computed in).
    """

    needs_target = True

    def __init__(self, num_classes: int, embedding_dim: int, scale: float = 64.0, m_min: float = 0.2,
                 m_max: float = 0.5, space: str = "none"):
        super().__init__()
        if not 0 <= float(m_min) <= float(m_max) < math.pi / 2:
            raise KDConfigError(f"margin_distillation: need 0 <= m_min <= m_max < π/2, got {m_min}, {m_max}")
        self.scale, self.m_min, self.m_max = float(scale), float(m_min), float(m_max)
        self.space = _space(space)
        self.register_buffer("centres", torch.zeros(int(num_classes), int(embedding_dim)))
        self.register_buffer("ready", torch.tensor(False))

    @torch.no_grad()
    def init_centres(self, centres: Tensor) -> "MarginDistillationLoss":
        if tuple(centres.shape) != tuple(self.centres.shape):
            raise KDConfigError(f"margin_distillation: centres {tuple(centres.shape)} for a head of "
                                f"{tuple(self.centres.shape)}")
        self.centres.copy_(F.normalize(centres.float(), dim=1))
        self.ready = torch.tensor(True)
        return self

    def margins(self, t: Tensor, target: Tensor) -> Tensor:
        """``m_i`` (B,) from unit teacher embeddings."""
        d = (t * self.centres[target]).sum(1)
        dmax = d.max()
        if not dmax > 0:
            return torch.full_like(d, self.m_min)
        return self.m_min + (self.m_max - self.m_min) * d / dmax

    def forward(self, student: Tensor, teacher: Tensor, target: Tensor) -> Tensor:
        if not bool(self.ready):
            raise KDConfigError("margin_distillation: set the teacher's class centres first (init_centres)")
        s, t = embeddings(student, teacher, "margin_distillation")
        t = F.normalize(self.space(t), dim=1)
        target = target.long().reshape(-1)
        with torch.no_grad():
            m = self.margins(t, target)
        cos = (F.normalize(s, dim=1) @ self.centres.t()).clamp(-1, 1)
        return F.cross_entropy(_margin_logits(cos, target, "arcface", m, self.scale), target)

    def extra_repr(self) -> str:
        return f"classes={self.centres.shape[0]}, scale={self.scale}, m_min={self.m_min}, m_max={self.m_max}"
