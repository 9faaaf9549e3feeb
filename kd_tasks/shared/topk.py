"""Top-k teacher logits with the tail mass: a compact form of a teacher's output for large label spaces.

A teacher over ``C`` classes (a vocabulary, thousands of labels) produces ``C`` logits per sample; caching
them all costs ``C`` floats per row. The top-``k`` form keeps, per row, the ``k`` largest logits, their
class indices, and one number for the rest: the logit that spreads the remaining probability mass evenly
over the other ``C - k`` classes::

    p = softmax(z),   S = top-k indices,   tail = 1 - sum_{i in S} p_i
    tail_logit = logsumexp(z) + log(tail / (C - k))

:func:`expand_topk` rebuilds dense logits ``ẑ`` with ``ẑ_i = z_i`` on ``S`` and ``tail_logit`` elsewhere, so
``softmax(ẑ)`` equals the teacher's probabilities on the top ``k`` classes exactly and puts the teacher's
own tail mass on the rest, uniformly (the teacher's ordering inside the tail is what is lost). At a KD
temperature ``T != 1`` the softened top-k probabilities are exact relative to each other; the tail's share
is that of the uniform tail. With ``k = C`` the logits come back unchanged up to a constant.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .errors import KDConfigError

__all__ = ["compress_topk", "expand_topk"]


def compress_topk(logits: Tensor, k: int) -> tuple[Tensor, Tensor, Tensor]:
    """``(values (B, k), indices (B, k), tail_logit (B,))`` of ``(B, C)`` logits, computed in float64."""
    if logits.dim() != 2:
        raise KDConfigError(f"top-k logits: expected (batch, classes) logits, got shape {tuple(logits.shape)}")
    classes = logits.shape[1]
    if not 1 <= int(k) <= classes:
        raise KDConfigError(f"top-k logits: k must lie in 1..{classes} (the number of classes), got {k}")
    z = logits.detach().double()
    values, indices = z.topk(int(k), dim=1)
    lse = torch.logsumexp(z, dim=1)
    if k == classes:
        tail = torch.full_like(lse, -math.inf)
    else:
        top_mass = torch.exp(values - lse[:, None]).sum(dim=1)
        rest = (1.0 - top_mass).clamp(min=torch.finfo(torch.float64).tiny)
        tail = lse + torch.log(rest) - math.log(classes - k)
    return values.float(), indices, tail.float()


def expand_topk(values: Tensor, indices: Tensor, tail_logit: Tensor, classes: int) -> Tensor:
    """Dense ``(B, classes)`` float32 logits from :func:`compress_topk`'s three parts."""
    if values.shape != indices.shape or values.dim() != 2 or tail_logit.shape != values.shape[:1]:
        raise KDConfigError(f"top-k logits: parts do not fit: values {tuple(values.shape)}, indices "
                            f"{tuple(indices.shape)}, tail {tuple(tail_logit.shape)}")
    dense = tail_logit.float()[:, None].expand(values.shape[0], int(classes)).clone()
    return dense.scatter(1, indices.long(), values.float())
