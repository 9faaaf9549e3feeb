"""Losses on transformer self-attention: attention maps and self-attention relations.

Shapes: query/key/value projections are ``(B, L, D)`` (batch, tokens, width);
attention maps are ``(B, H, L, L)`` (batch, heads, query, key). An optional ``mask`` of shape
``(B, L)`` marks the real (non-padding) tokens: padded tokens are dropped as queries and as keys.
Every loss here averages over the kept tokens of the whole batch (a padded token never counts), so
``reduction="sum"`` divided by the number of kept tokens gives the ``"mean"`` value; that is how a
trainer normalises them across gradient-accumulation steps. The teacher argument is a target: it is
detached inside, so no gradient reaches the teacher.

Which loss for which method:

* DistilBERT (Sanh et al. 2019): the cosine embedding loss on the last hidden states is the generic
  ``feature`` loss with ``metric="cosine"`` and a token ``mask`` (``kd_tasks.shared.losses.feature``).
* TinyBERT (Jiao et al. 2020): hidden states with the ``feature`` loss, ``metric="mse"`` (+ a
  ``linear`` connector when widths differ), and :class:`AttentionMSELoss` on the unnormalised
  attention scores.
* MiniLM (Wang et al. 2020): :class:`AttentionKLLoss` on the last layer's attention distributions
  and :class:`RelationKLLoss` on its values with ``relation_heads`` = the number of attention heads
  (the value relation).
* MiniLMv2 (Wang et al. 2021): :class:`RelationKLLoss` on queries, keys and values (Q-Q, K-K, V-V),
  with a number of relation heads that need not equal either model's attention heads.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from ..errors import KDConfigError, ShapeMismatchError
from ..registry import LOSSES
from .logit import check_choice, soft_kl

__all__ = [
    "AttentionMSELoss",
    "AttentionKLLoss",
    "RelationKLLoss",
    "split_heads",
    "attention_scores",
    "relation_scores",
]

REDUCTIONS = ("mean", "sum")


# ----------------------------------------------------------------------------- helpers


def split_heads(x: Tensor, heads: int, owner: str = "split_heads") -> Tensor:
    """``(B, L, D)`` -> ``(B, heads, L, D / heads)``: the usual multi-head split of the last dimension."""
    if x.dim() != 3:
        raise ShapeMismatchError(f"{owner}: expected (batch, tokens, width) input, got shape {tuple(x.shape)}")
    b, length, width = x.shape
    if heads < 1 or width % heads:
        raise KDConfigError(f"{owner}: width {width} cannot be split into {heads} heads; choose a divisor of {width}")
    return x.reshape(b, length, heads, width // heads).transpose(1, 2)


def attention_scores(query: Tensor, key: Tensor, heads: int) -> Tensor:
    """Unnormalised attention ``Q_h K_hᵀ / sqrt(d_h)`` per head: ``(B, L, D)`` x2 -> ``(B, H, L, L)``.

    This is the map ``A`` of TinyBERT's Eq. (4) and, after a softmax over keys, the attention
    distribution of MiniLM, computed from the query/key projections (no padding mask applied).
    """
    q, k = split_heads(query, heads, "attention_scores"), split_heads(key, heads, "attention_scores")
    return q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])


def relation_scores(x: Tensor, heads: int) -> Tensor:
    """Self-relation ``X_a X_aᵀ / sqrt(d_r)`` per relation head: ``(B, L, D)`` -> ``(B, heads, L, L)``."""
    return attention_scores(x, x, heads)


def token_mask(mask: Tensor | None, batch: int, length: int, owner: str, device: torch.device) -> Tensor | None:
    """Check a ``(B, L)`` token mask and return it as bool on ``device``."""
    if mask is None:
        return None
    if tuple(mask.shape) != (batch, length):
        raise ShapeMismatchError(f"{owner}: mask shape {tuple(mask.shape)} must be (batch, tokens) = {(batch, length)}")
    return mask.to(device=device, dtype=torch.bool)


def reduce_tokens(values: Tensor, mask: Tensor | None, reduction: str) -> Tensor:
    """Reduce per-(head, query token) values ``(B, H, L)``.

    ``mean``: average over heads and the kept tokens of the batch; ``sum``: the sum divided by the
    number of heads, i.e. ``mean ×`` the number of kept tokens.
    """
    heads = values.shape[1]
    if mask is not None:
        values = torch.where(mask[:, None, :], values, values.new_zeros(()))
        count = mask.sum().clamp(min=1)
    else:
        count = max(values.shape[0] * values.shape[-1], 1)
    total = values.sum() / heads
    if reduction == "sum":
        return total
    return total / count


def check_pair(student: Tensor, teacher: Tensor, dims: int, owner: str, what: str) -> None:
    if student.dim() != dims or teacher.dim() != dims:
        raise ShapeMismatchError(
            f"{owner}: expected {what}, got student {tuple(student.shape)} and teacher {tuple(teacher.shape)}"
        )


def check_same_tokens(student: Tensor, teacher: Tensor, owner: str) -> None:
    if student.shape[:2] != teacher.shape[:2]:
        raise ShapeMismatchError(
            f"{owner}: student {tuple(student.shape)} and teacher {tuple(teacher.shape)} differ in batch or "
            "token count; both models must see the same tokenisation of the same batch"
        )


def masked_logits(scores: Tensor, mask: Tensor | None) -> Tensor:
    """Set the scores of padded keys to the dtype's lowest value so a softmax gives them weight 0."""
    if mask is None:
        return scores
    return scores.masked_fill(~mask[:, None, None, :], torch.finfo(scores.dtype).min)


def rowwise_kl(student_scores: Tensor, teacher_scores: Tensor, mask: Tensor | None, reduction: str) -> Tensor:
    """``KL(softmax(teacher row) ‖ softmax(student row))`` over keys, reduced over heads and query tokens."""
    kl = soft_kl(masked_logits(student_scores, mask), masked_logits(teacher_scores, mask))  # (B, H, L)
    return reduce_tokens(kl, mask, reduction)


# ----------------------------------------------------------------------------- attention maps


def check_maps(student: Tensor, teacher: Tensor, owner: str) -> None:
    check_pair(student, teacher, 4, owner, "(batch, heads, tokens, tokens) attention maps")
    if student.shape != teacher.shape:
        raise ShapeMismatchError(
            f"{owner}: student maps {tuple(student.shape)} != teacher maps {tuple(teacher.shape)}. Attention "
            "maps are compared head by head, so both models need the same number of heads and tokens; for "
            "different head counts use the 'attention_relation' loss (MiniLMv2) on queries/keys/values"
        )


@LOSSES.register("attention_mse", "tinybert_attention")
class AttentionMSELoss(nn.Module):
    """Attention-based distillation of TinyBERT: Jiao et al. (2020), Eq. (3).

    ``L = 1/h · sum_i MSE(A_i^S, A_i^T)`` with ``A_i`` the ``(L, L)`` map of head ``i``. The paper
    fits the *unnormalised* scores ``A = QKᵀ/sqrt(d_k)`` (see :func:`attention_scores`); passing
    softmax probabilities instead is allowed and gives the variant the paper compares against.

    With a ``mask``, each kept query row is averaged over the kept keys only, then rows are averaged
    over heads and kept tokens; without padding this is exactly the paper's mean over all entries.
    The authors' code instead zeroes entries below -100 (masked scores) and keeps them in the mean,
    which makes the value depend on the padding length; that is not offered.
    """

    def __init__(self, reduction: str = "mean"):
        super().__init__()
        self.reduction = check_choice(reduction, REDUCTIONS, "attention_mse", "reduction")

    def forward(self, student: Tensor, teacher: Tensor, mask: Tensor | None = None) -> Tensor:
        teacher = teacher.detach()
        check_maps(student, teacher, "attention_mse")
        b, _, length, _ = student.shape
        mask = token_mask(mask, b, length, "attention_mse", student.device)
        squared = (student - teacher).pow(2)
        if mask is None:
            per_row = squared.mean(dim=-1)
        else:
            keys = mask[:, None, None, :]
            squared = torch.where(keys, squared, squared.new_zeros(()))
            per_row = squared.sum(dim=-1) / mask.sum(dim=-1).clamp(min=1)[:, None, None]
        return reduce_tokens(per_row, mask, self.reduction)


@LOSSES.register("attention_kl", "minilm_attention")
class AttentionKLLoss(nn.Module):
    """Self-attention distribution transfer of MiniLM: Wang, Wei, Dong, Bao, Yang & Zhou (2020),
    "MiniLM: Deep Self-Attention Distillation for Task-Agnostic Compression of Pre-Trained
    Transformers", Eq. (6).

    ``L = 1/(A_h |x|) · sum_a sum_t KL(A^T_{a,t} ‖ A^S_{a,t})``, each ``A_{a,t}`` the attention
    distribution of head ``a`` for query token ``t``. ``inputs="scores"`` (default) takes
    unnormalised scores (:func:`attention_scores`) and applies the softmax here, masking padded keys;
    ``inputs="probs"`` takes probabilities (``output_attentions``), whose logarithm is taken with
    a floor of ``eps``. Averaged over heads and kept query tokens of the batch.
    """

    INPUTS = ("scores", "probs")

    def __init__(self, inputs: str = "scores", reduction: str = "mean", eps: float = 1e-12):
        super().__init__()
        self.inputs = check_choice(inputs, self.INPUTS, "attention_kl", "inputs")
        self.reduction = check_choice(reduction, REDUCTIONS, "attention_kl", "reduction")
        self.eps = float(eps)

    def forward(self, student: Tensor, teacher: Tensor, mask: Tensor | None = None) -> Tensor:
        teacher = teacher.detach()
        check_maps(student, teacher, "attention_kl")
        b, _, length, _ = student.shape
        mask = token_mask(mask, b, length, "attention_kl", student.device)
        if self.inputs == "probs":
            student, teacher = student.clamp(min=self.eps).log(), teacher.clamp(min=self.eps).log()
        return rowwise_kl(student, teacher, mask, self.reduction)

    def extra_repr(self) -> str:
        return f"inputs={self.inputs!r}"


@LOSSES.register("attention_relation", "minilm_relation", "minilmv2")
class RelationKLLoss(nn.Module):
    """Self-attention relation transfer: MiniLMv2, Wang, Bao, Huang, Dong & Wei (2021), "MiniLMv2:
    Multi-Head Self-Attention Relation Distillation for Compressing Pretrained Transformers", Eq. (3)-(4).

    The queries (or keys, or values) ``X`` of shape ``(B, L, D)`` of one layer are concatenated over
    the model's heads and re-split into ``relation_heads`` heads of width ``d_r = D / relation_heads``;
    each head gives the relation ``R_a = softmax(X_a X_aᵀ / sqrt(d_r))`` and::

        L = 1/(A_r |x|) · sum_a sum_t KL(R^T_{a,t} ‖ R^S_{a,t})

    Teacher and student use the same ``relation_heads`` but their own ``d_r``, so their widths and
    attention-head counts may differ. MiniLMv2 sums this loss over Q-Q, K-K and V-V (one call each).
    MiniLM's value-relation transfer (Wang et al. 2020, Eq. (7)-(8)) is the V-V case with
    ``relation_heads`` equal to the (shared) number of attention heads.
    """

    def __init__(self, relation_heads: int = 12, reduction: str = "mean"):
        super().__init__()
        if int(relation_heads) < 1:
            raise KDConfigError(f"attention_relation: relation_heads must be >= 1, got {relation_heads}")
        self.relation_heads = int(relation_heads)
        self.reduction = check_choice(reduction, REDUCTIONS, "attention_relation", "reduction")

    def forward(self, student: Tensor, teacher: Tensor, mask: Tensor | None = None) -> Tensor:
        teacher = teacher.detach()
        check_pair(student, teacher, 3, "attention_relation", "(batch, tokens, width) queries/keys/values")
        check_same_tokens(student, teacher, "attention_relation")
        mask = token_mask(mask, student.shape[0], student.shape[1], "attention_relation", student.device)
        s_rel = relation_scores(student, self.relation_heads)
        t_rel = relation_scores(teacher, self.relation_heads)
        return rowwise_kl(s_rel, t_rel, mask, self.reduction)

    def extra_repr(self) -> str:
        return f"relation_heads={self.relation_heads}"
