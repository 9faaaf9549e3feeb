"""Teacher-space conditioning: centre (and optionally whiten) a teacher's embeddings before distilling.

Many face-recognition teachers put every face in a narrow cone: dlib's ResNet model, for instance,
rates any two ORL faces at a mean cosine of 0.87 (about 0 once the mean is removed). Matching such
raw embeddings with a cosine loss rewards a student that outputs the teacher's *mean direction*:
it already scores ``1 - 0.93`` without telling any two people apart. Conditioning removes that
free win. With ``t̂ = t/‖t‖`` and statistics of the **training** set's teacher embeddings::

    none:    φ(t) = t̂
    centre:  φ(t) = t̂ - μ                       μ = mean_n t̂_n
    whiten:  φ(t) = (t̂ - μ) · U diag(λ + ε)^{-1/2}  (PCA whitening, λ, U the eigenpairs of the
                                                      covariance of t̂ - μ; ``dim`` keeps the top ones)

Every conditioned target has mean 0 over the training set, so a constant student output scores an
expected cosine of 0 with them. A cosine verifier of the *conditioned* teacher space is what the
student is asked to reproduce; the same map can be applied to class centres
(:func:`class_centres`) used by margin heads.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kd_tasks.shared.errors import KDConfigError

__all__ = ["TeacherSpace", "class_centres", "SPACE_MODES"]

SPACE_MODES = ("none", "centre", "whiten")


class TeacherSpace(nn.Module):
    """The map ``φ`` above, fitted with :meth:`fit` (buffers ``mean`` (D,) and ``transform`` (D, K)).

    Args:
        mode: ``"none"``, ``"centre"`` or ``"whiten"``.
        dim: teacher embedding width ``D`` (buffers are allocated; :meth:`fit` fills them).
        out_dim: ``K`` for ``whiten`` (top principal directions); default ``D``.
        eps: added to the eigenvalues before whitening.
    """

    def __init__(self, mode: str = "centre", dim: int | None = None, out_dim: int | None = None, eps: float = 1e-4):
        super().__init__()
        if mode not in SPACE_MODES:
            raise KDConfigError(f"teacher space mode must be one of {', '.join(SPACE_MODES)}, got {mode!r}")
        self.mode = mode
        self.eps = float(eps)
        self.out_dim = out_dim
        d = int(dim) if dim is not None else 0
        k = int(out_dim or d)
        self.register_buffer("mean", torch.zeros(d))
        self.register_buffer("transform", torch.eye(d, k) if d else torch.zeros(0, 0))
        self.register_buffer("fitted", torch.tensor(mode == "none"))

    @property
    def output_dim(self) -> int:
        return int(self.transform.shape[1]) if self.mode == "whiten" else int(self.mean.shape[0])

    @torch.no_grad()
    def fit(self, embeddings: Tensor | np.ndarray) -> "TeacherSpace":
        """Statistics of the training set's teacher embeddings ``(N, D)`` (normalised here)."""
        t = torch.from_numpy(np.array(embeddings, dtype=np.float64))  # a copy: cached arrays are read-only
        if t.dim() != 2 or t.shape[0] < 2:
            raise KDConfigError(f"teacher space: fit needs (N >= 2, D) embeddings, got {tuple(t.shape)}")
        t = F.normalize(t, dim=1)
        mean = t.mean(0)
        d = t.shape[1]
        if self.mode == "whiten":
            k = int(self.out_dim or d)
            if not 1 <= k <= d:
                raise KDConfigError(f"teacher space: out_dim must be in [1, {d}], got {k}")
            centred = t - mean
            cov = centred.t() @ centred / (t.shape[0] - 1)
            evals, evecs = torch.linalg.eigh(cov)  # ascending
            order = torch.argsort(evals, descending=True)[:k]
            transform = evecs[:, order] / (evals[order].clamp(min=0) + self.eps).sqrt()
        else:
            transform = torch.eye(d, dtype=torch.float64)
        self.mean = mean.float() if self.mode != "none" else torch.zeros(d)
        self.transform = transform.float()
        self.fitted = torch.tensor(True)
        return self

    def forward(self, t: Tensor) -> Tensor:
        """``φ(t)`` of teacher embeddings ``(B, D)``."""
        if not bool(self.fitted):
            raise KDConfigError(f"teacher space {self.mode!r} is not fitted: call .fit(training-set teacher embeddings)")
        t = F.normalize(t.float(), dim=1)
        if self.mode == "none":
            return t
        if t.shape[1] != self.mean.shape[0]:
            raise KDConfigError(f"teacher space fitted on {self.mean.shape[0]}-d embeddings, got {t.shape[1]}-d")
        centred = t - self.mean.to(t.device)
        return centred @ self.transform.to(t.device) if self.mode == "whiten" else centred

    def extra_repr(self) -> str:
        return f"mode={self.mode!r}, dim={self.mean.shape[0]}, out_dim={self.output_dim}"


@torch.no_grad()
def class_centres(embeddings: Tensor | np.ndarray, labels: Sequence[int] | Tensor, num_classes: int | None = None,
                  space: TeacherSpace | None = None) -> Tensor:
    """Unit class centres ``(C, K)``: ``c_k = normalize(mean_{y_n = k} φ(t_n))`` (``φ`` = ``space`` or ``t̂``).

    Every class ``0..C-1`` must have at least one embedding.
    """
    t = torch.from_numpy(np.array(embeddings, dtype=np.float32))  # a copy: cached arrays are read-only
    y = torch.as_tensor(np.asarray(labels)).long().reshape(-1)
    if t.shape[0] != y.shape[0]:
        raise KDConfigError(f"class centres: {t.shape[0]} embeddings for {y.shape[0]} labels")
    c = int(num_classes) if num_classes is not None else int(y.max()) + 1
    z = space(t) if space is not None else F.normalize(t, dim=1)
    sums = torch.zeros(c, z.shape[1]).index_add_(0, y, F.normalize(z, dim=1))
    counts = torch.bincount(y, minlength=c)
    if (counts == 0).any():
        missing = torch.nonzero(counts == 0).flatten().tolist()[:5]
        raise KDConfigError(f"class centres: classes {missing} have no teacher embedding")
    return F.normalize(sums, dim=1)
