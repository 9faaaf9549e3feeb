"""Relational losses: what is transferred is how the samples of a batch relate to each other.

Inputs are embeddings ``(B, D)``; higher-dimensional tensors ``(B, ...)`` are flattened per sample.
Student and teacher may have different widths (except where noted: IRG's vertex term, which
compares the embeddings themselves). The teacher argument is a target: it is detached.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import KDConfigError, ShapeMismatchError
from ..registry import LOSSES
from .feature import as_target, safe_sqrt, shape_mismatch
from .logit import check_choice

__all__ = [
    "RKDLoss",
    "SPLoss",
    "PKTLoss",
    "CCLoss",
    "IRGLoss",
    "CRDLoss",
    "embeddings",
    "pairwise_distances",
    "similarity_matrix",
    "cosine_kernel",
    "correlation_matrix",
]


# ----------------------------------------------------------------------------- helpers


def embeddings(student: Tensor, teacher: Tensor, owner: str) -> tuple[Tensor, Tensor]:
    """Flatten both to ``(B, D)``, make the teacher a target (:func:`as_target`), check the batch sizes."""
    if student.dim() < 2 or teacher.dim() < 2:
        raise ShapeMismatchError(
            f"{owner}: expects per-sample features (B, D) or (B, ...); got student {tuple(student.shape)}, "
            f"teacher {tuple(teacher.shape)}"
        )
    if student.shape[0] != teacher.shape[0]:
        raise shape_mismatch(owner, student.shape, teacher.shape)
    return student.flatten(1), as_target(teacher, student).flatten(1)


def zero_like_graph(x: Tensor) -> Tensor:
    """A scalar 0 that is still connected to ``x`` (so ``backward()`` works on it)."""
    return x.sum() * 0.0


def gram_and_squared_distances(x: Tensor) -> tuple[Tensor, Tensor]:
    """Gram matrix of the batch-centred ``(B, D)`` embeddings and the squared distance matrix.

    Distances and angles do not change when every sample is shifted by the same vector; centring
    first keeps ``‖a‖² + ‖b‖² - 2aᵀb`` from cancelling catastrophically for embeddings far from the
    origin. The diagonal of the distance matrix is exactly 0.
    """
    x = x - x.mean(dim=0, keepdim=True)
    gram = x @ x.t()
    sq = gram.diagonal()
    d2 = (sq[:, None] + sq[None, :] - 2.0 * gram).clamp(min=0.0)
    off_diagonal = 1.0 - torch.eye(x.shape[0], device=x.device, dtype=x.dtype)
    return gram, d2 * off_diagonal


def pairwise_distances(x: Tensor, squared: bool = False) -> Tensor:
    """``(B, D) -> (B, B)`` Euclidean distances (squared if asked); zero-distance gradients are 0."""
    _, d2 = gram_and_squared_distances(x)
    return d2 if squared else safe_sqrt(d2)


def off_diagonal_mask(b: int, device: torch.device) -> Tensor:
    return ~torch.eye(b, dtype=torch.bool, device=device)


# ----------------------------------------------------------------------------- RKD


def rkd_angles(x: Tensor) -> Tensor:
    """``(B, D) -> (B, B, B)``: ``A[i, j, k] = cos∠(x_j, x_i, x_k) = <e_ij, e_ik>``, ``e_ij`` the unit
    vector from ``x_i`` to ``x_j`` (vertex at ``i``); 0 where ``x_j = x_i`` or ``x_k = x_i``.

    Computed from the Gram matrix ``G``: ``<x_j - x_i, x_k - x_i> = G_jk - G_ij - G_ik + G_ii``,
    divided by ``d_ij · d_ik`` -- ``O(B²·D + B³)`` time and ``O(B³)`` memory, instead of the
    authors' ``O(B³·D)`` batched product of normalised difference vectors.
    """
    gram, d2 = gram_and_squared_distances(x)
    dist = safe_sqrt(d2)
    diag = gram.diagonal()
    dots = gram[None, :, :] - gram[:, :, None] - gram[:, None, :] + diag[:, None, None]
    denominator = dist[:, :, None] * dist[:, None, :]
    return torch.where(denominator > 1e-12, dots / denominator.clamp(min=1e-12), torch.zeros_like(dots))


@LOSSES.register("rkd")
class RKDLoss(nn.Module):
    """Park, Kim, Lu & Cho (CVPR 2019), "Relational Knowledge Distillation".

    Distance-wise potential ``ψ_D(t_i, t_j) = ‖t_i - t_j‖₂ / μ``, with ``μ`` the mean distance over the
    distinct pairs of the batch; angle-wise potential ``ψ_A(t_i, t_j, t_k) = <e_ij, e_kj>``, the
    cosine of the angle at ``t_j`` (``e_ij = (t_i - t_j) / ‖t_i - t_j‖``). Both networks' potentials
    are compared with the Huber loss ``l_δ`` (``δ = 1``: smooth L1)::

        L = w_d · avg_{i≠j} l_δ(ψ_D(s_i, s_j), ψ_D(t_i, t_j))
          + w_a · avg_{i,j,k distinct} l_δ(ψ_A(s_i, s_j, s_k), ψ_A(t_i, t_j, t_k))

    with the paper's ``w_d = 25``, ``w_a = 50``. ``reduction``:

    - ``"paper"`` (default): the pairs / triplets the paper sums over (distinct indices only),
      averaged over their number (``B(B-1)`` and ``B(B-1)(B-2)``) so the value does not grow with
      the batch size (the paper's weights were tuned with the authors' averaging code);
    - ``"code"``: the authors' code: mean over all ``B²`` distance entries and all ``B³`` angle
      entries, including the degenerate ones (``i = j``: distance 0, cosine 0; ``j = k``: cosine 1).

    Batches too small for a term have no pair / triplet: with ``B = 1`` the loss is 0 (connected to
    the graph, so ``backward()`` works), where the authors' code and torchdistill return NaN; with
    ``B = 2`` only the distance term counts. Both terms are invariant to scaling and translating
    either embedding.

    Cost: the angle term is ``O(B³)`` in time and memory per network (``B = 128``: 2.1 M entries,
    about 8 MB in float32 per intermediate), computed with batched tensor ops from the Gram matrix
    (``O(B²·D + B³)``, see :func:`rkd_angles`); at large batches it dominates a small student's
    step. Set ``angle_weight=0`` to skip it.
    """

    REDUCTIONS = ("paper", "code")

    def __init__(self, distance_weight: float = 25.0, angle_weight: float = 50.0, reduction: str = "paper"):
        super().__init__()
        self.distance_weight = float(distance_weight)
        self.angle_weight = float(angle_weight)
        self.reduction = check_choice(reduction, self.REDUCTIONS, "rkd", "reduction")

    def forward(self, student: Tensor, teacher: Tensor) -> Tensor:
        s, t = embeddings(student, teacher, "rkd")
        if s.shape[0] < 2:
            return zero_like_graph(s)
        loss = zero_like_graph(s)
        if self.distance_weight:
            loss = loss + self.distance_weight * self.distance_term(s, t)
        if self.angle_weight:
            loss = loss + self.angle_weight * self.angle_term(s, t)
        return loss

    def distance_term(self, s: Tensor, t: Tensor) -> Tensor:
        off = off_diagonal_mask(s.shape[0], s.device)
        d_s, d_t = pairwise_distances(s), pairwise_distances(t)
        d_s = d_s / d_s[off].mean().clamp(min=1e-12)
        d_t = d_t / d_t[off].mean().clamp(min=1e-12)
        huber = F.smooth_l1_loss(d_s, d_t, reduction="none", beta=1.0)
        return huber.mean() if self.reduction == "code" else huber[off].mean()

    def angle_term(self, s: Tensor, t: Tensor) -> Tensor:
        b = s.shape[0]
        huber = F.smooth_l1_loss(rkd_angles(s), rkd_angles(t), reduction="none", beta=1.0)
        if self.reduction == "code":
            return huber.mean()
        if b < 3:
            return zero_like_graph(s)
        off = off_diagonal_mask(b, s.device)
        distinct = off[:, :, None] & off[:, None, :] & off[None, :, :]
        return huber[distinct].mean()

    def extra_repr(self) -> str:
        return f"distance_weight={self.distance_weight}, angle_weight={self.angle_weight}, reduction={self.reduction!r}"


# ----------------------------------------------------------------------------- SP


def similarity_matrix(x: Tensor) -> Tensor:
    """``G = A Aᵀ`` of ``(B, D)`` activations, each row L2-normalised: ``(B, B)``."""
    return F.normalize(x @ x.t(), p=2.0, dim=1)


@LOSSES.register("sp", "similarity_preserving")
class SPLoss(nn.Module):
    """Tung & Mori (ICCV 2019), "Similarity-Preserving Knowledge Distillation".

    With ``A`` the ``(B, D)`` activations (flattened per sample), ``G = A Aᵀ`` row-wise
    L2-normalised (``G̃_[i,:] = G_[i,:] / ‖G_[i,:]‖₂``)::

        L = ‖G̃_s - G̃_t‖²_F / B²

    The paper (and RepDistiller) normalise rows in L2; torchdistill 1.1.5 calls
    ``F.normalize(G, 1)``, whose second argument is the norm order ``p``, so it normalises rows in L1
    -- a bug, not followed here. The paper sums the term over layer pairs with weight ``γ``: add
    one ``sp`` term per pair. Invariant to scaling either network's activations by a constant; the
    widths of student and teacher may differ.
    """

    def forward(self, student: Tensor, teacher: Tensor) -> Tensor:
        s, t = embeddings(student, teacher, "sp")
        b = s.shape[0]
        return (similarity_matrix(s) - similarity_matrix(t)).pow(2).sum() / (b * b)


# ----------------------------------------------------------------------------- PKT


def cosine_kernel(x: Tensor, eps: float) -> Tensor:
    """``K_ij = (cos(x_i, x_j) + 1) / 2`` in ``[0, 1]``, ``(B, D) -> (B, B)``."""
    unit = x / (x.norm(dim=1, keepdim=True) + eps)
    return (unit @ unit.t() + 1.0) / 2.0


@LOSSES.register("pkt")
class PKTLoss(nn.Module):
    """Passalis & Tefas (ECCV 2018), "Learning Deep Representations with Probabilistic Knowledge
    Transfer".

    Cosine-similarity kernel shifted to ``[0, 1]``: ``K_ij = (cos(x_i, x_j) + 1) / 2``; each row
    normalised to conditional probabilities ``p_j|i = K_ij / sum_{k≠i} K_ik`` (``j ≠ i``); the
    student's distributions follow the teacher's::

        L = mean_i sum_{j≠i} p^t_j|i · log((p^t_j|i + ε) / (p^s_j|i + ε))      (reduction="paper")

    ``reduction="code"`` is the authors' code: the diagonal is kept in the kernel and the
    normalisation, and the result is the mean over all ``B²`` entries (``1/B`` of the row-sum
    scale). ``B = 1`` has no pair and gives 0. Embedding widths may differ.
    """

    REDUCTIONS = ("paper", "code")

    def __init__(self, eps: float = 1e-7, reduction: str = "paper"):
        super().__init__()
        self.eps = float(eps)
        self.reduction = check_choice(reduction, self.REDUCTIONS, "pkt", "reduction")

    def forward(self, student: Tensor, teacher: Tensor) -> Tensor:
        s, t = embeddings(student, teacher, "pkt")
        if self.reduction == "paper" and s.shape[0] < 2:
            return zero_like_graph(s)
        p_s, p_t = self.conditional(s), self.conditional(t)
        terms = p_t * torch.log((p_t + self.eps) / (p_s + self.eps))
        return terms.mean() if self.reduction == "code" else terms.sum(dim=1).mean()

    def conditional(self, x: Tensor) -> Tensor:
        """Row-normalised kernel ``(B, B)``; with ``reduction="paper"`` the diagonal is 0."""
        kernel = cosine_kernel(x, self.eps)
        if self.reduction == "paper":
            kernel = kernel * off_diagonal_mask(x.shape[0], x.device)
        return kernel / kernel.sum(dim=1, keepdim=True).clamp(min=self.eps)

    def extra_repr(self) -> str:
        return f"eps={self.eps}, reduction={self.reduction!r}"


# ----------------------------------------------------------------------------- CC


def correlation_matrix(x: Tensor, kernel: str, gamma: float, order: int) -> Tensor:
    """Correlation ``(B, B)`` between the rows of ``x``.

    ``"gaussian"``: ``k(a, b) = exp(-γ‖a - b‖²)`` approximated by its order-``P`` Taylor expansion,
    ``sum_{p=0}^{P} exp(-2γ) (2γ)^p / p! · (aᵀb)^p``, which is exact in the limit only for unit
    vectors (``‖a - b‖² = 2 - 2aᵀb``); ``"bilinear"``: ``aᵀb``.
    """
    sim = x @ x.t()
    if kernel == "bilinear":
        return sim
    corr = torch.zeros_like(sim)
    for p in range(order + 1):
        corr = corr + math.exp(-2.0 * gamma) * (2.0 * gamma) ** p / math.factorial(p) * sim.pow(p)
    return corr


@LOSSES.register("cc", "correlation_congruence")
class CCLoss(nn.Module):
    """Peng, Jin, Liu, Li, Wu, Liu, Zhou & Zhang (ICCV 2019), "Correlation Congruence for Knowledge
    Distillation".

    Correlation matrix ``C_ij = k(f_i, f_j)`` of the batch's embeddings, compared as::

        L_CC = ‖C_s - C_t‖²_F / B²

    ``kernel="gaussian"`` (default): a Gaussian RBF ``exp(-γ‖f_i - f_j‖²)`` approximated by its
    ``order``-``P`` Taylor expansion (paper defaults ``γ = 0.4``, ``P = 2`` as in common
    reimplementations); ``kernel="bilinear"``: ``f_iᵀ f_j``. ``normalize=True`` (default) L2-normalises
    the embeddings first, as the expansion assumes unit vectors. torchdistill 1.1.5 uses the
    unsquared norm and expands on unnormalised features; RepDistiller's ``F.mse_loss`` equals the
    squared form used here. Embedding widths may differ.
    """

    KERNELS = ("gaussian", "bilinear")

    def __init__(self, kernel: str = "gaussian", gamma: float = 0.4, order: int = 2, normalize: bool = True):
        super().__init__()
        self.kernel = check_choice(kernel, self.KERNELS, "cc", "kernel")
        self.gamma = float(gamma)
        self.order = int(order)
        if self.order < 0:
            raise KDConfigError(f"cc: order must be >= 0, got {order}")
        self.normalize = bool(normalize)

    def forward(self, student: Tensor, teacher: Tensor) -> Tensor:
        s, t = embeddings(student, teacher, "cc")
        if self.normalize:
            s, t = F.normalize(s, dim=1), F.normalize(t, dim=1)
        c_s = correlation_matrix(s, self.kernel, self.gamma, self.order)
        c_t = correlation_matrix(t, self.kernel, self.gamma, self.order)
        b = s.shape[0]
        return (c_s - c_t).pow(2).sum() / (b * b)

    def extra_repr(self) -> str:
        return f"kernel={self.kernel!r}, gamma={self.gamma}, order={self.order}, normalize={self.normalize}"


# ----------------------------------------------------------------------------- IRG


@LOSSES.register("irg")
class IRGLoss(nn.Module):
    """Liu, Cao, Li, Yuan, Hu, Li & Duan (CVPR 2019), "Knowledge Distillation via Instance
    Relationship Graph".

    The graph of one layer: vertices are the instances' features, edges their pairwise Euclidean
    distances ``A_ij = ‖f_i - f_j‖²`` (``squared=True``, default) or ``‖f_i - f_j‖``, each
    network's matrix divided by its own maximum (``normalization="max"``, default) or by the mean
    over distinct pairs (``"mean"``)::

        L = vertex_weight · mean((f_s - f_t)²) + edge_weight · mean_{i,j}((A_s,ij - A_t,ij)²)

    (means over all elements / all ``B²`` entries). Squared distances over the maximum are what the
    public PyTorch reimplementations of the authors' Caffe code use. The vertex term compares the
    features themselves and needs equal shapes (use a ``"linear"`` connector, or logits of the same
    classes as in the paper); with ``vertex_weight=0`` only the edge term is used and widths may
    differ.

    Not included: the paper's IRG transformation term across two layers (it needs both layers'
    features brought to one size, which the paper does with architecture-specific pooling); add one
    ``irg`` term per layer to distil several layers' graphs.
    """

    NORMALIZATIONS = ("max", "mean")

    def __init__(
        self, vertex_weight: float = 1.0, edge_weight: float = 1.0, squared: bool = True, normalization: str = "max"
    ):
        super().__init__()
        self.vertex_weight = float(vertex_weight)
        self.edge_weight = float(edge_weight)
        self.squared = bool(squared)
        self.normalization = check_choice(normalization, self.NORMALIZATIONS, "irg", "normalization")

    def forward(self, student: Tensor, teacher: Tensor) -> Tensor:
        loss = zero_like_graph(student)
        if self.vertex_weight:
            if student.shape != teacher.shape:
                detail = "the vertex term compares the features; set vertex_weight=0 to use the edge term alone"
                raise shape_mismatch("irg", student.shape, teacher.shape, detail)
            loss = loss + self.vertex_weight * (student - as_target(teacher, student)).pow(2).mean()
        if self.edge_weight:
            s, t = embeddings(student, teacher, "irg")
            loss = loss + self.edge_weight * (self.edges(s) - self.edges(t)).pow(2).mean()
        return loss

    def edges(self, x: Tensor) -> Tensor:
        """Normalised ``(B, B)`` distance matrix of ``(B, D)`` embeddings."""
        dist = pairwise_distances(x, squared=self.squared)
        if self.normalization == "max":
            scale = dist.max()
        else:
            b = x.shape[0]
            scale = dist.sum() / max(b * (b - 1), 1)
        return dist / scale.clamp(min=1e-12)

    def extra_repr(self) -> str:
        return (
            f"vertex_weight={self.vertex_weight}, edge_weight={self.edge_weight}, squared={self.squared}, "
            f"normalization={self.normalization!r}"
        )


# ----------------------------------------------------------------------------- CRD


class _MemoryBank(nn.Module):
    """``N x dim`` unit vectors, one per training sample, updated by momentum; a buffer, not trained."""

    def __init__(self, num_data: int, dim: int):
        super().__init__()
        bound = 1.0 / math.sqrt(dim / 3.0)  # the authors' initialisation
        self.register_buffer("vectors", torch.rand(num_data, dim).mul_(2 * bound).sub_(bound))
        # NCE normalisation constant Z, estimated on the first batch (-1: not yet)
        self.register_buffer("z", torch.tensor(-1.0))

    @torch.no_grad()
    def update(self, index: Tensor, values: Tensor, momentum: float) -> None:
        mixed = self.vectors[index] * momentum + values.to(self.vectors.dtype) * (1.0 - momentum)
        self.vectors.index_copy_(0, index, F.normalize(mixed, dim=1))


@LOSSES.register("crd")
class CRDLoss(nn.Module):
    """Tian, Krishnan & Isola (ICLR 2020), "Contrastive Representation Distillation".

    Linear heads ``g_s``, ``g_t`` map the student's and teacher's ``(B, ...)`` features to a common
    ``embed_dim`` (default 128), L2-normalised. Memory banks hold one unit vector per training sample
    for each network. For sample ``i`` of the batch (dataset index ``index[i]``), its positive is
    the other network's bank entry at ``index[i]`` and its ``K = num_negatives`` negatives are bank
    entries at other indices, drawn uniformly over the ``N - 1`` other samples (the authors' uniform
    sampler may draw the positive itself as a negative; torchdistill's sampler crashes). Both
    directions are used: student anchors against the teacher bank and teacher anchors against the
    student bank, ``L = L_s + L_t``.

    ``objective="nce"`` (default, the authors' code): ``P(v, m) = exp(vᵀm / τ) / Z`` with the
    constant ``Z = N · mean(exp(vᵀm / τ))`` estimated on the first training batch (then fixed, and
    saved in ``state_dict``), noise probability ``1/N``, and the NCE loss per anchor::

        -log(P_pos / (P_pos + K/N)) - sum_k log((K/N) / (P_k + K/N))

    summed over the anchors and divided by ``B``. ``objective="softmax"``: the InfoNCE variant,
    cross-entropy of the ``K + 1`` logits ``vᵀm / τ`` with the positive first (the softmax form
    of the same authors' CMC code), batch mean.

    After each forward in training mode, the bank entries at ``index`` move towards the current
    embeddings: ``m ← normalize(momentum · m + (1 - momentum) · v)`` (default ``momentum=0.5``).
    Evaluation-mode forwards leave the banks (and an unset ``Z``) untouched, so a dry run such as
    the distiller's ``prepare`` changes no state.

    Needs the dataset indices of the batch: ``forward(student, teacher, index=...)`` (``needs_index``
    is set so the distiller passes them). ``contrast_index=`` ``(B, K)`` may supply the negatives
    (e.g. same-class exclusion) instead of the uniform sampler.

    Memory: the banks are ``2 · N · embed_dim`` floats (CIFAR's 50 000 samples at 128: 51 MB;
    ImageNet's 1.28 M: 1.3 GB), moved with the module's device. Each step gathers
    ``2 · B · (K + 1) · embed_dim`` floats (``B = 64``, ``K = 4096``: 268 MB). The paper's CIFAR-100
    setting is ``K = 16384``, ``τ = 0.07``, ``momentum = 0.5``; the default ``K`` here is 4096 to
    keep that gather small on CPU.

    ``student_dim`` / ``teacher_dim`` may be left out: the heads are then lazy and take their input
    widths from the first batch, and the optimiser must be built after that first forward (as for
    connectors; the distiller's ``prepare`` does it). The heads train with the student; the teacher's
    features receive no gradient.
    """

    needs_index = True
    OBJECTIVES = ("nce", "softmax")

    def __init__(
        self,
        num_data: int,
        student_dim: int | None = None,
        teacher_dim: int | None = None,
        embed_dim: int = 128,
        num_negatives: int = 4096,
        temperature: float = 0.07,
        momentum: float = 0.5,
        objective: str = "nce",
    ):
        super().__init__()
        if int(num_data) < 2:
            raise KDConfigError(f"crd: num_data (the training set size) must be >= 2, got {num_data}")
        if int(num_negatives) < 1:
            raise KDConfigError(f"crd: num_negatives must be >= 1, got {num_negatives}")
        if not float(temperature) > 0:
            raise KDConfigError(f"crd: temperature must be > 0, got {temperature}")
        if not 0.0 <= float(momentum) < 1.0:
            raise KDConfigError(f"crd: momentum must be in [0, 1), got {momentum}")
        self.num_data = int(num_data)
        self.num_negatives = int(num_negatives)
        self.temperature = float(temperature)
        self.momentum = float(momentum)
        self.objective = check_choice(objective, self.OBJECTIVES, "crd", "objective")
        self.embed_student = nn.Linear(student_dim, embed_dim) if student_dim else nn.LazyLinear(embed_dim)
        self.embed_teacher = nn.Linear(teacher_dim, embed_dim) if teacher_dim else nn.LazyLinear(embed_dim)
        self.memory_student = _MemoryBank(self.num_data, embed_dim)
        self.memory_teacher = _MemoryBank(self.num_data, embed_dim)

    def forward(
        self, student: Tensor, teacher: Tensor, index: Tensor | None = None, contrast_index: Tensor | None = None
    ) -> Tensor:
        s, t = embeddings(student, teacher, "crd")
        index = self._check_index(index, s.shape[0])
        v_s = F.normalize(self.embed_student(s.to(self.embed_student.weight.dtype)), dim=1)
        v_t = F.normalize(self.embed_teacher(t.to(self.embed_teacher.weight.dtype)), dim=1)
        negatives = self.sample_negatives(index) if contrast_index is None else contrast_index.to(index.device).long()
        candidates = torch.cat([index[:, None], negatives], dim=1)  # (B, K + 1), positive first
        logits_s = self._logits(v_s, self.memory_teacher, candidates)
        logits_t = self._logits(v_t, self.memory_student, candidates)
        loss = self._contrast(logits_s, self.memory_teacher) + self._contrast(logits_t, self.memory_student)
        if self.training:
            self.memory_student.update(index, v_s.detach(), self.momentum)
            self.memory_teacher.update(index, v_t.detach(), self.momentum)
        return loss

    def sample_negatives(self, index: Tensor) -> Tensor:
        """``(B, K)`` indices drawn uniformly from ``[0, N)`` without the row's own ``index``."""
        draws = torch.randint(0, self.num_data - 1, (index.shape[0], self.num_negatives), device=index.device)
        return draws + (draws >= index[:, None]).long()

    def _check_index(self, index: Tensor | None, batch: int) -> Tensor:
        if index is None:
            raise KDConfigError(
                "crd: needs the dataset index of every sample: forward(student, teacher, index=...) with a "
                "(B,) tensor of indices in [0, num_data); make the dataset return them"
            )
        index = torch.as_tensor(index, device=self.memory_student.vectors.device).long().reshape(-1)
        if index.shape[0] != batch:
            raise ShapeMismatchError(f"crd: index has {index.shape[0]} entries for a batch of {batch}")
        if batch and (int(index.min()) < 0 or int(index.max()) >= self.num_data):
            raise KDConfigError(
                f"crd: index values must lie in [0, {self.num_data}) (num_data), got range "
                f"[{int(index.min())}, {int(index.max())}]"
            )
        return index

    def _logits(self, anchors: Tensor, bank: _MemoryBank, candidates: Tensor) -> Tensor:
        """``(B, K + 1)`` scores ``vᵀm / τ`` of each anchor against its candidates' bank entries."""
        entries = bank.vectors[candidates].detach()  # (B, K + 1, dim)
        return torch.einsum("bkd,bd->bk", entries, anchors.to(entries.dtype)).float() / self.temperature

    def _contrast(self, logits: Tensor, bank: _MemoryBank) -> Tensor:
        if self.objective == "softmax":
            return F.cross_entropy(logits, torch.zeros(logits.shape[0], dtype=torch.long, device=logits.device))
        scores = logits.exp()
        z = bank.z
        if z < 0:  # not set yet: estimate the normalisation constant on this batch
            z = scores.detach().mean() * self.num_data
            if self.training:  # kept from the first training batch on
                bank.z.fill_(float(z))
        probs = scores / z
        noise = (logits.shape[1] - 1) / self.num_data  # K · P_n, P_n = 1/N
        eps = 1e-7
        log_pos = torch.log(probs[:, 0] / (probs[:, 0] + noise + eps))
        log_neg = torch.log(noise / (probs[:, 1:] + noise + eps))
        return -(log_pos.sum() + log_neg.sum()) / logits.shape[0]

    def extra_repr(self) -> str:
        return (
            f"num_data={self.num_data}, num_negatives={self.num_negatives}, temperature={self.temperature}, "
            f"momentum={self.momentum}, objective={self.objective!r}"
        )
