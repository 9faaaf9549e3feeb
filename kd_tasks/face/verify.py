"""Face verification: cosine scores on pairs, ROC / AUC, TAR at fixed FAR, k-fold accuracy.

Protocol (as for LFW, Huang, Ramesh, Berg & Learned-Miller 2007): a pair is declared "same" when
the cosine similarity of its two embeddings is ``>= threshold``. The accuracy is estimated with
``k``-fold cross-validation over the pairs: for each fold the threshold maximising the accuracy on
the other ``k - 1`` folds is applied to the held-out fold; the report gives the mean and standard
deviation over folds. ROC, AUC and TAR@FAR use all pairs (scikit-learn's ``roc_curve`` / ``auc``):
``TAR@FAR=f`` is the highest true-accept rate at a false-accept rate ``<= f``.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch
from torch import nn

from kd_tasks.shared.errors import KDConfigError

__all__ = ["embed", "pair_scores", "best_threshold", "verification_metrics", "evaluate_embeddings",
           "FAR_TARGETS"]

FAR_TARGETS = (1e-3, 1e-2, 1e-1)


@torch.no_grad()
def embed(model: nn.Module, data: Any, batch_size: int = 64, device: str | torch.device | None = None) -> np.ndarray:
    """L2-normalised embeddings ``(N, D)`` of a dataset of ``(image, label)`` samples or an image tensor."""
    was_training = model.training
    model.eval()
    if device is None:
        device = next(iter(model.parameters()), torch.empty(0)).device
    chunks = []
    try:
        if isinstance(data, torch.Tensor):
            batches = data.split(batch_size)
        else:
            loader = torch.utils.data.DataLoader(data, batch_size=batch_size, shuffle=False)
            batches = (b[0] if isinstance(b, (tuple, list)) else b for b in loader)
        for x in batches:
            out = model(x.to(device))
            chunks.append(torch.nn.functional.normalize(out.float(), dim=1).cpu())
    finally:
        model.train(was_training)
    return torch.cat(chunks).numpy()


def pair_scores(embeddings: np.ndarray, pairs: np.ndarray) -> np.ndarray:
    """Cosine similarity of each pair ``(i, j, ...)`` (embeddings are normalised here)."""
    e = np.asarray(embeddings, dtype=np.float64)
    e = e / np.maximum(np.linalg.norm(e, axis=1, keepdims=True), 1e-12)
    pairs = np.asarray(pairs)
    return np.einsum("pd,pd->p", e[pairs[:, 0]], e[pairs[:, 1]])


def best_threshold(scores: np.ndarray, same: np.ndarray) -> tuple[float, float]:
    """``(threshold, accuracy)`` maximising the accuracy of ``score >= threshold`` on these pairs.

    Of the equally accurate thresholds between two consecutive scores, the midpoint is returned, so
    a held-out score just below the lowest accepted one is still judged by the widest gap.
    """
    from sklearn.metrics import roc_curve

    same = np.asarray(same).astype(bool)
    if same.all() or not same.any():
        raise KDConfigError("a threshold needs both same and different pairs")
    fpr, tpr, thresholds = roc_curve(same, scores, drop_intermediate=False)
    n_pos, n_neg = same.sum(), (~same).sum()
    acc = (tpr * n_pos + (1.0 - fpr) * n_neg) / (n_pos + n_neg)
    k = int(np.argmax(acc))
    if k == 0:  # reject everything
        return float(np.max(scores) + 1e-6), float(acc[k])
    # midway between the lowest accepted score and the next lower one (the widest margin)
    lower = thresholds[k + 1] if k + 1 < len(thresholds) else thresholds[k] - 1e-6
    return float((thresholds[k] + lower) / 2), float(acc[k])


def verification_metrics(scores: np.ndarray, same: np.ndarray, folds: int = 10,
                         far_targets: Sequence[float] = FAR_TARGETS, seed: int = 0) -> dict[str, float]:
    """``auc``, ``accuracy`` / ``accuracy_std`` (k-fold), ``threshold`` (mean over folds),
    ``tar@far=<f>`` for each target, and ``pairs``."""
    from sklearn.metrics import auc, roc_curve
    from sklearn.model_selection import StratifiedKFold

    scores = np.asarray(scores, dtype=np.float64)
    same = np.asarray(same).astype(bool)
    if scores.shape != same.shape:
        raise KDConfigError(f"{scores.shape[0]} scores for {same.shape[0]} pair labels")
    fpr, tpr, _ = roc_curve(same, scores)
    out: dict[str, float] = {"auc": float(auc(fpr, tpr)), "pairs": float(len(scores))}
    k = int(min(folds, same.sum(), (~same).sum()))
    accs, ths = [], []
    if k >= 2:
        for train, test in StratifiedKFold(n_splits=k, shuffle=True, random_state=seed).split(scores, same):
            th, _ = best_threshold(scores[train], same[train])
            accs.append(float(((scores[test] >= th) == same[test]).mean()))
            ths.append(th)
    else:  # too few pairs to cross-validate: the threshold is chosen on the pairs themselves
        th, acc = best_threshold(scores, same)
        accs, ths = [acc], [th]
    out["accuracy"] = float(np.mean(accs))
    out["accuracy_std"] = float(np.std(accs))
    out["threshold"] = float(np.mean(ths))
    for f in far_targets:
        ok = fpr <= f
        out[f"tar@far={f:g}"] = float(tpr[ok].max()) if ok.any() else 0.0
    return out


def evaluate_embeddings(embeddings: np.ndarray, pairs: np.ndarray, **kwargs: Any) -> dict[str, float]:
    """:func:`verification_metrics` of the cosine scores of ``pairs`` (rows ``(i, j, same)``)."""
    pairs = np.asarray(pairs)
    return verification_metrics(pair_scores(embeddings, pairs), pairs[:, 2], **kwargs)
