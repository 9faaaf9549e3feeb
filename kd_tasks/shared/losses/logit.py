"""Losses on output logits: Hinton KD (forward/reverse KL, JSD, total variation; optional logit
standardisation), decoupled KD, DIST, logit MSE and sigmoid KD.

Shapes: logits are ``(B, C)`` or ``(B, ..., C)`` with the class dimension last (token logits
``(B, L, V)`` included); every position ``(b, ...)`` is one prediction. An optional boolean ``mask``
of shape ``(B, ...)`` keeps the positions where it is ``True`` (padding tokens are dropped this way).
The teacher argument is a target: it is detached, so no gradient reaches the teacher.
"""

from __future__ import annotations

import numbers

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import KDConfigError, ShapeMismatchError
from ..registry import LOSSES

__all__ = [
    "KDLoss",
    "DKDLoss",
    "DISTLoss",
    "LogitMSELoss",
    "SigmoidKDLoss",
    "soft_kl",
    "soft_divergence",
    "standardize_logits",
    "DIVERGENCES",
    "pearson_rows",
    "check_same_shape",
    "check_temperature",
]

POSITION_REDUCTIONS = ("batchmean", "sum", "none")


# ----------------------------------------------------------------------------- helpers


def check_temperature(temperature: float, owner: str) -> float:
    """Return ``temperature`` as a float, or raise :class:`KDConfigError` if it is not a positive number."""
    if isinstance(temperature, bool) or not isinstance(temperature, numbers.Real) and not (
            isinstance(temperature, torch.Tensor) and temperature.numel() == 1):
        raise KDConfigError(f"{owner}: temperature must be a number > 0, got {temperature!r}")
    temperature = float(temperature)
    if not temperature > 0 or temperature != temperature or temperature == float("inf"):
        raise KDConfigError(f"{owner}: temperature must be > 0, got {temperature}")
    return temperature


def check_choice(value: str, choices: tuple[str, ...], owner: str, what: str) -> str:
    """Return ``value`` if it is one of ``choices``, else raise :class:`KDConfigError`."""
    if value not in choices:
        raise KDConfigError(f"{owner}: {what} must be one of {', '.join(map(repr, choices))}; got {value!r}")
    return value


def check_same_shape(student: Tensor, teacher: Tensor, owner: str, connector: str = "linear") -> None:
    """Raise :class:`ShapeMismatchError` naming both shapes and a connector if they differ."""
    if student.shape != teacher.shape:
        raise ShapeMismatchError(
            f"{owner}: student shape {tuple(student.shape)} != teacher shape {tuple(teacher.shape)}. "
            f"Map the student to the teacher's shape with a {connector!r} connector, or make both heads "
            f"predict the same classes (for token logits: the same vocabulary, padded rows trimmed)."
        )


def position_mask(mask: Tensor | None, logits: Tensor, owner: str) -> Tensor | None:
    """Check that ``mask`` has the shape ``logits.shape[:-1]`` and return it as a bool tensor."""
    if mask is None:
        return None
    if mask.shape != logits.shape[:-1]:
        raise ShapeMismatchError(
            f"{owner}: mask shape {tuple(mask.shape)} must equal the logits' shape without the class "
            f"dimension, {tuple(logits.shape[:-1])}"
        )
    return mask.to(device=logits.device, dtype=torch.bool)


def reduce_positions(values: Tensor, mask: Tensor | None, reduction: str) -> Tensor:
    """Reduce per-position losses ``(B, ...)``: masked positions count as absent.

    ``batchmean``: sum over kept positions / number of kept positions (0 if none is kept);
    ``sum``: sum over kept positions; ``none``: the per-position tensor, masked positions set to 0.
    """
    if mask is not None:
        values = torch.where(mask, values, values.new_zeros(()))
    if reduction == "none":
        return values
    total = values.sum()
    if reduction == "sum":
        return total
    count = mask.sum().clamp(min=1) if mask is not None else max(values.numel(), 1)
    return total / count


def soft_kl(student_logits: Tensor, teacher_logits: Tensor, temperature: float = 1.0) -> Tensor:
    """KL(p_t ‖ p_s) over the last dimension, one value per row, with ``p = softmax(z / T)``.

    ``sum_c p_t,c (log p_t,c - log p_s,c)``; classes with ``p_t,c = 0`` contribute 0 (so teacher
    logits of ``-inf``, e.g. masked vocabulary rows, are allowed). No ``T²`` factor here.
    """
    log_p_s = F.log_softmax(student_logits / temperature, dim=-1)
    log_p_t = F.log_softmax(teacher_logits / temperature, dim=-1)
    p_t = log_p_t.exp()
    terms = torch.where(p_t > 0, p_t * (log_p_t - log_p_s), log_p_s.new_zeros(()))
    return terms.sum(dim=-1)


def pearson_rows(a: Tensor, b: Tensor, eps: float = 1e-8) -> Tensor:
    """Pearson correlation between matching rows of ``a`` and ``b`` (shape ``(N, D)`` -> ``(N,)``).

    ``cos(a - mean(a), b - mean(b))``; the product of the norms is clamped below at ``eps`` so a
    constant row gives correlation 0 instead of NaN.
    """
    a = a - a.mean(dim=1, keepdim=True)
    b = b - b.mean(dim=1, keepdim=True)
    return (a * b).sum(dim=1) / (a.norm(dim=1) * b.norm(dim=1)).clamp(min=eps)


def kept_rows(student: Tensor, teacher: Tensor, mask: Tensor | None) -> tuple[Tensor, Tensor]:
    """Flatten ``(B, ..., C)`` logits to ``(N, C)`` rows, keeping only unmasked positions."""
    classes = student.shape[-1]
    if mask is not None:
        return student[mask], teacher[mask]
    return student.reshape(-1, classes), teacher.reshape(-1, classes)


# ----------------------------------------------------------------------------- losses


DIVERGENCES = ("kl", "reverse_kl", "jsd", "tv")


def standardize_logits(logits: Tensor, eps: float = 1e-7) -> Tensor:
    """Sun et al. (CVPR 2024), "Logit Standardization in Knowledge Distillation": the Z-score of each
    position's logits, ``(z - mean(z)) / (eps + std(z))`` over the class dimension (``std`` with Bessel's
    correction, as in the authors' code). Teacher and student are standardised separately, so the
    student matches the teacher's logit *relations*, not their range. With 2 classes the Z-scores are
    always ``±1/√2``: only the argmax survives, so use it with many classes."""
    if not bool(torch.isfinite(logits).all()):
        raise KDConfigError("logit standardisation needs finite logits (masked classes of -inf have no Z-score); "
                            "turn standardize off for masked vocabularies")
    mean = logits.mean(dim=-1, keepdim=True)
    std = logits.std(dim=-1, keepdim=True)
    return (logits - mean) / (eps + std)


def soft_divergence(student_logits: Tensor, teacher_logits: Tensor, temperature: float = 1.0,
                    divergence: str = "kl", beta: float = 0.5) -> Tensor:
    """One value per row between ``p_t = softmax(z_t / T)`` and ``p_s = softmax(z_s / T)``:

    - ``kl`` (forward): ``KL(p_t ‖ p_s)`` (Hinton et al. 2015; mean-covering);
    - ``reverse_kl``: ``KL(p_s ‖ p_t)`` (mode-seeking; MiniLLM, Gu et al. 2024);
    - ``jsd``: generalised Jensen-Shannon with ``m = β p_t + (1-β) p_s``:
      ``β KL(p_t ‖ m) + (1-β) KL(p_s ‖ m)`` (GKD, Agarwal et al. 2024; ``β = 0.5`` is the symmetric JSD,
      bounded by ``log 2``);
    - ``tv``: total variation ``½ Σ_c |p_t,c - p_s,c|`` (in [0, 1]).

    No ``T²`` factor here.
    """
    if divergence == "kl":
        return soft_kl(student_logits, teacher_logits, temperature)
    log_p_s = F.log_softmax(student_logits / temperature, dim=-1)
    log_p_t = F.log_softmax(teacher_logits / temperature, dim=-1)
    p_s, p_t = log_p_s.exp(), log_p_t.exp()
    if divergence == "reverse_kl":
        terms = torch.where(p_s > 0, p_s * (log_p_s - log_p_t), p_s.new_zeros(()))
        return terms.sum(dim=-1)
    if divergence == "tv":
        return 0.5 * (p_t - p_s).abs().sum(dim=-1)
    if divergence == "jsd":
        if not 0 < beta < 1:
            raise KDConfigError(f"jsd: beta must lie in (0, 1), got {beta}")
        log_m = torch.logsumexp(torch.stack([log_p_t + torch.log(torch.tensor(beta, dtype=log_p_t.dtype)),
                                             log_p_s + torch.log(torch.tensor(1 - beta, dtype=log_p_s.dtype))]), dim=0)
        kl_t = torch.where(p_t > 0, p_t * (log_p_t - log_m), p_t.new_zeros(())).sum(dim=-1)
        kl_s = torch.where(p_s > 0, p_s * (log_p_s - log_m), p_s.new_zeros(())).sum(dim=-1)
        return beta * kl_t + (1 - beta) * kl_s
    raise KDConfigError(f"kd: divergence must be one of {', '.join(DIVERGENCES)}; got {divergence!r}")


@LOSSES.register("kd", "hinton")
class KDLoss(nn.Module):
    """Hinton, Vinyals & Dean (2015), "Distilling the Knowledge in a Neural Network".

    ``L = T² · D(p_t, p_s)``, ``p = softmax(z / T)`` over the last (class) dimension; the teacher's
    distribution is the target. ``D`` is ``divergence``: ``"kl"`` (default, ``KL(p_t ‖ p_s)``),
    ``"reverse_kl"``, ``"jsd"`` (with ``beta``) or ``"tv"`` (:func:`soft_divergence`). ``standardize=True``
    Z-scores both logits first (:func:`standardize_logits`, Sun et al. CVPR 2024), then divides by ``T``.
    ``reduction``:

    - ``"batchmean"`` (default): sum over classes, mean over positions (``B`` for ``(B, C)`` logits,
      the kept positions for ``(B, ..., C)`` logits with ``mask``); independent of the batch size;
    - ``"sum"``: sum over classes and kept positions (normalise yourself, e.g. by the number of
      tokens across gradient-accumulation steps);
    - ``"none"``: per-position values of shape ``(B, ...)``, masked positions set to 0.

    The ``T²`` factor keeps gradient magnitudes comparable across temperatures (for large ``T`` the
    gradient tends to ``(z_s - z_t) / (C · B)`` minus its class mean, independent of ``T``). It is
    always applied, whatever the divergence. torchdistill 1.1.5 differs: it returns the bare KL without
    ``T²`` when its CE weight ``alpha`` is 0/None or no targets are given. Combine with cross-entropy in
    the distiller.
    """

    def __init__(self, temperature: float = 4.0, reduction: str = "batchmean", divergence: str = "kl",
                 beta: float = 0.5, standardize: bool = False):
        super().__init__()
        self.temperature = check_temperature(temperature, "kd")
        self.reduction = check_choice(reduction, POSITION_REDUCTIONS, "kd", "reduction")
        self.divergence = check_choice(divergence, DIVERGENCES, "kd", "divergence")
        self.beta = float(beta)
        if divergence == "jsd" and not 0 < self.beta < 1:
            raise KDConfigError(f"kd: jsd beta must lie in (0, 1), got {beta}")
        self.standardize = bool(standardize)

    def forward(self, student: Tensor, teacher: Tensor, mask: Tensor | None = None) -> Tensor:
        teacher = teacher.detach()
        check_same_shape(student, teacher, "kd")
        mask = position_mask(mask, student, "kd")
        if self.standardize:
            student, teacher = standardize_logits(student), standardize_logits(teacher)
        value = soft_divergence(student, teacher, self.temperature, self.divergence, self.beta)
        return reduce_positions(value * self.temperature**2, mask, self.reduction)

    def extra_repr(self) -> str:
        extra = f", divergence={self.divergence!r}" if self.divergence != "kl" else ""
        extra += f", beta={self.beta}" if self.divergence == "jsd" else ""
        extra += ", standardize=True" if self.standardize else ""
        return f"temperature={self.temperature}, reduction={self.reduction!r}{extra}"


@LOSSES.register("dkd")
class DKDLoss(nn.Module):
    """Zhao, Cui, Song, Qiu & Liang (CVPR 2022), "Decoupled Knowledge Distillation".

    With ``p = softmax(z / T)`` and ground-truth class ``y`` at each position:

    - binary target / non-target probabilities ``b = [p_y, 1 - p_y]``;
      ``TCKD = KL(b_t ‖ b_s)``;
    - non-target distribution ``p̂_c = p_c / (1 - p_y)`` for ``c ≠ y`` (a softmax over the other
      classes); ``NCKD = KL(p̂_t ‖ p̂_s)``;
    - ``L = T² · (alpha · TCKD + beta · NCKD)``, averaged over (kept) positions.

    Classic KD decomposes as ``KL(p_t‖p_s) = TCKD + (1 - p_t,y) · NCKD``; DKD frees the NCKD weight.
    As in the authors' code, ``p̂`` is a softmax of the scaled logits with the target logit pushed far
    below every other logit (they subtract 1000; here it is set 1000 below the row's minimum, which
    stays correct for very large logits), so the target's probability underflows to exactly 0.
    ``b`` is computed in log space (``log(1 - p_y)`` as a log-sum-exp over the non-target logits),
    where the authors take ``log`` of a softmax and can hit ``log(0)``.

    ``standardize=True`` Z-scores both logits before the temperature (Sun et al., CVPR 2024; see
    :func:`standardize_logits`). Defaults ``alpha=1, beta=8, T=4`` are the authors' CIFAR-100 setting (ImageNet: ``beta=0.5,
    T=1``). Their linear warm-up of the DKD weight is a schedule, not part of this loss. Needs
    ``target=`` (class indices of shape ``(B, ...)``); positions whose target is ``ignore_index`` or
    whose ``mask`` is ``False`` are dropped.
    """

    needs_target = True

    def __init__(
        self,
        alpha: float = 1.0,
        beta: float = 8.0,
        temperature: float = 4.0,
        reduction: str = "batchmean",
        ignore_index: int = -100,
        standardize: bool = False,
    ):
        super().__init__()
        self.standardize = bool(standardize)
        self.alpha = float(alpha)
        self.beta = float(beta)
        self.temperature = check_temperature(temperature, "dkd")
        self.reduction = check_choice(reduction, POSITION_REDUCTIONS, "dkd", "reduction")
        self.ignore_index = int(ignore_index)

    def forward(
        self,
        student: Tensor,
        teacher: Tensor,
        target: Tensor | None = None,
        mask: Tensor | None = None,
    ) -> Tensor:
        if target is None:
            raise KDConfigError(
                "dkd needs the ground-truth labels: call it as loss(student, teacher, target=labels) "
                "(in a distiller, pass the batch's labels as target)"
            )
        teacher = teacher.detach()
        check_same_shape(student, teacher, "dkd")
        mask = self._kept(target, mask, student)
        safe_target = torch.where(mask, target, torch.zeros_like(target)).long()
        classes = student.shape[-1]
        if bool(((safe_target < 0) | (safe_target >= classes)).any()):
            raise KDConfigError(f"dkd: target values must lie in [0, {classes}) or equal ignore_index")
        is_target = F.one_hot(safe_target, classes).bool()

        t = self.temperature
        if self.standardize:  # Sun et al. (CVPR 2024) on DKD: Z-scored logits, then the temperature
            student, teacher = standardize_logits(student), standardize_logits(teacher)
        s_scaled, t_scaled = student / t, teacher / t
        tckd = self._binary_kl(s_scaled, t_scaled, is_target)
        nckd = soft_kl(self._drop_target(s_scaled, is_target), self._drop_target(t_scaled, is_target))
        loss = (self.alpha * tckd + self.beta * nckd) * t**2
        return reduce_positions(loss, mask, self.reduction)

    def _kept(self, target: Tensor, mask: Tensor | None, student: Tensor) -> Tensor:
        if target.shape != student.shape[:-1]:
            raise ShapeMismatchError(
                f"dkd: target shape {tuple(target.shape)} must equal the logits' shape without the class "
                f"dimension, {tuple(student.shape[:-1])} (class indices, not one-hot)"
            )
        if target.is_floating_point():
            raise KDConfigError("dkd: target must hold integer class indices")
        target = target.to(student.device)
        kept = target != self.ignore_index
        mask = position_mask(mask, student, "dkd")
        return kept if mask is None else kept & mask

    @staticmethod
    def _binary_kl(s: Tensor, t: Tensor, is_target: Tensor) -> Tensor:
        """KL(b_t ‖ b_s) with b = [p_y, 1 - p_y], from scaled logits, in log space."""

        def log_binary(z: Tensor) -> Tensor:
            log_all = torch.logsumexp(z, dim=-1)
            log_gt = z.masked_fill(~is_target, float("-inf")).logsumexp(dim=-1)
            log_other = z.masked_fill(is_target, float("-inf")).logsumexp(dim=-1)
            return torch.stack([log_gt - log_all, log_other - log_all], dim=-1)

        return soft_kl(log_binary(s), log_binary(t))

    @staticmethod
    def _drop_target(z: Tensor, is_target: Tensor) -> Tensor:
        """Set the target logit 1000 below the row's minimum so its softmax weight is 0."""
        far_below = z.detach().amin(dim=-1, keepdim=True) - 1000.0
        return torch.where(is_target, far_below, z)

    def extra_repr(self) -> str:
        extra = ", standardize=True" if self.standardize else ""
        return f"alpha={self.alpha}, beta={self.beta}, temperature={self.temperature}{extra}"


@LOSSES.register("dist")
class DISTLoss(nn.Module):
    """Huang, You, Wang, Qian & Xu (NeurIPS 2022), "Knowledge Distillation from A Stronger Teacher".

    With ``Y = softmax(Z / τ)`` (rows = samples, columns = classes) for student and teacher and
    ``ρ`` the Pearson correlation:

    - inter-class relation ``L_inter = 1 - mean_i ρ(Y_s[i, :], Y_t[i, :])`` (each sample's class
      probabilities);
    - intra-class relation ``L_intra = 1 - mean_c ρ(Y_s[:, c], Y_t[:, c])`` (each class across the
      batch);
    - ``L = τ² · (beta · L_inter + gamma · L_intra)``.

    Defaults ``beta = gamma = 1`` and ``τ = temperature = 1`` are the paper's ImageNet setting and
    the authors' code defaults; the ``τ²`` factor follows the authors' code with a temperature (it is
    1 at the default). ``(B, ..., C)`` logits are flattened to one row per kept position, so the
    intra-class term then correlates over all positions of the batch; it needs at least two rows
    (one row gives ``L_intra = 1`` with no gradient). The authors add ``1e-8`` to the norm product;
    here the product is clamped at ``1e-8`` (identical inputs give exactly 0).
    """

    def __init__(self, beta: float = 1.0, gamma: float = 1.0, temperature: float = 1.0):
        super().__init__()
        self.beta = float(beta)
        self.gamma = float(gamma)
        self.temperature = check_temperature(temperature, "dist")

    def forward(self, student: Tensor, teacher: Tensor, mask: Tensor | None = None) -> Tensor:
        teacher = teacher.detach()
        check_same_shape(student, teacher, "dist")
        mask = position_mask(mask, student, "dist")
        s_rows, t_rows = kept_rows(student, teacher, mask)
        y_s = F.softmax(s_rows / self.temperature, dim=-1)
        y_t = F.softmax(t_rows / self.temperature, dim=-1)
        inter = 1 - pearson_rows(y_s, y_t).mean()
        intra = 1 - pearson_rows(y_s.t(), y_t.t()).mean()
        return self.temperature**2 * (self.beta * inter + self.gamma * intra)

    def extra_repr(self) -> str:
        return f"beta={self.beta}, gamma={self.gamma}, temperature={self.temperature}"


@LOSSES.register("logit_mse")
class LogitMSELoss(nn.Module):
    """Ba & Caruana (2014), "Do Deep Nets Really Need to be Deep?": regress the teacher's logits.

    ``reduction``:

    - ``"mean"`` (default): ``mean_{positions, c} (z_s - z_t)²``, the usual mean squared error;
    - ``"batchmean"``: ``mean_positions sum_c (z_s - z_t)²``. The paper's objective
      ``1/(2N) · sum_n ‖z_s,n - z_t,n‖²`` is ``0.5 ×`` this (a constant factor, i.e. a loss weight);
    - ``"sum"``: sum over classes and kept positions.

    The default differs from the paper by the factor ``C / 2`` so the scale does not grow with the
    number of classes. Masked positions (``mask=False``) are dropped.
    """

    REDUCTIONS = ("mean", "batchmean", "sum")

    def __init__(self, reduction: str = "mean"):
        super().__init__()
        self.reduction = check_choice(reduction, self.REDUCTIONS, "logit_mse", "reduction")

    def forward(self, student: Tensor, teacher: Tensor, mask: Tensor | None = None) -> Tensor:
        teacher = teacher.detach()
        check_same_shape(student, teacher, "logit_mse")
        mask = position_mask(mask, student, "logit_mse")
        squared = (student - teacher).pow(2)
        if self.reduction == "mean":
            return reduce_positions(squared.mean(dim=-1), mask, "batchmean")
        return reduce_positions(squared.sum(dim=-1), mask, self.reduction)

    def extra_repr(self) -> str:
        return f"reduction={self.reduction!r}"


@LOSSES.register("sigmoid_kd", "bce_kd")
class SigmoidKDLoss(nn.Module):
    """Hinton-style KD for multi-label (independent sigmoid) heads.

    Each label is a binary distribution: ``q = sigmoid(z / T)``. The teacher's ``q_t`` is the soft
    target of a binary cross-entropy::

        L = T² · mean_{positions, labels} -[q_t log q_s + (1 - q_t) log(1 - q_s)]

    This is Hinton et al. (2015)'s soft-target loss with the softmax replaced by per-label sigmoids,
    as used for multi-label and dense detection heads. Unlike a KL divergence, it does not vanish for
    identical inputs: its minimum is the teacher's binary entropy, but its gradient
    ``T · (q_s - q_t) / (#labels · #positions)`` does vanish there. Masked positions are dropped.
    """

    def __init__(self, temperature: float = 1.0):
        super().__init__()
        self.temperature = check_temperature(temperature, "sigmoid_kd")

    def forward(self, student: Tensor, teacher: Tensor, mask: Tensor | None = None) -> Tensor:
        teacher = teacher.detach()
        check_same_shape(student, teacher, "sigmoid_kd")
        mask = position_mask(mask, student, "sigmoid_kd")
        t = self.temperature
        bce = F.binary_cross_entropy_with_logits(student / t, torch.sigmoid(teacher / t), reduction="none")
        return reduce_positions(bce.mean(dim=-1), mask, "batchmean") * t**2

    def extra_repr(self) -> str:
        return f"temperature={self.temperature}"
