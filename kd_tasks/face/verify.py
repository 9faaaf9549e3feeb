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
           "FAR_TARGETS", "plot_roc", "FARResolutionWarning", "embed_with_flip"]

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


@torch.no_grad()
def embed_with_flip(model: nn.Module, images: torch.Tensor, batch_size: int = 64) -> np.ndarray:
    """insightface's verification embedding: ``normalize(f(x) + f(flip(x)))`` for ``(N, 3, H, W)`` images."""
    was_training = model.training
    model.eval()
    device = next(iter(model.parameters()), torch.empty(0)).device
    try:
        out = [model(x.to(device)).float() + model(x.flip(-1).to(device)).float() for x in images.split(batch_size)]
    finally:
        model.train(was_training)
    return torch.nn.functional.normalize(torch.cat(out), dim=1).cpu().numpy()


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
                         far_targets: Sequence[float] = FAR_TARGETS, seed: int = 0,
                         shuffle: bool = True) -> dict[str, float]:
    """``auc``, ``accuracy`` / ``accuracy_std`` (k-fold), ``threshold`` (mean over folds),
    ``tar@far=<f>`` for each target, and ``pairs``. ``shuffle=False``: folds are consecutive runs of
    pairs (insightface's LFW-style protocol, ``KFold`` in pair order). A FAR below ``1 / impostor
    pairs`` raises a :class:`FARResolutionWarning`."""
    from sklearn.metrics import auc, roc_curve
    from sklearn.model_selection import KFold, StratifiedKFold

    scores = np.asarray(scores, dtype=np.float64)
    same = np.asarray(same).astype(bool)
    if scores.shape != same.shape:
        raise KDConfigError(f"{scores.shape[0]} scores for {same.shape[0]} pair labels")
    fpr, tpr, _ = roc_curve(same, scores)
    out: dict[str, float] = {"auc": float(auc(fpr, tpr)), "pairs": float(len(scores))}
    k = int(min(folds, same.sum(), (~same).sum()))
    accs, ths = [], []
    if k >= 2:
        splitter = (StratifiedKFold(n_splits=k, shuffle=True, random_state=seed) if shuffle
                    else KFold(n_splits=min(folds, len(scores))))
        for train, test in splitter.split(scores, same):
            if same[train].all() or not same[train].any():
                continue
            th, _ = best_threshold(scores[train], same[train])
            accs.append(float(((scores[test] >= th) == same[test]).mean()))
            ths.append(th)
    else:  # too few pairs to cross-validate: the threshold is chosen on the pairs themselves
        th, acc = best_threshold(scores, same)
        accs, ths = [acc], [th]
    out["accuracy"] = float(np.mean(accs))
    out["accuracy_std"] = float(np.std(accs))
    out["threshold"] = float(np.mean(ths))
    n_neg = int((~same).sum())
    for f in far_targets:
        ok = fpr <= f
        out[f"tar@far={f:g}"] = float(tpr[ok].max()) if ok.any() else 0.0
        if f * n_neg < 1:
            warn_far(f, n_neg)
    return out


def warn_far(far: float, impostor_pairs: int) -> None:
    """Warn that ``TAR@FAR=far`` is not measured: below ``1 / impostor_pairs`` it is TAR at FAR 0."""
    import warnings

    warnings.warn(
        f"TAR@FAR={far:g} cannot be measured with {impostor_pairs} impostor pairs (the smallest non-zero FAR is "
        f"1/{impostor_pairs} = {1 / max(impostor_pairs, 1):.2g}); it is reported as TAR at FAR 0. Use more impostor "
        "pairs (--max-pairs, more verification identities) or a larger FAR.",
        FARResolutionWarning, stacklevel=3,
    )


class FARResolutionWarning(UserWarning):
    """A requested FAR is below what the number of impostor pairs can measure."""


def plot_roc(curves: dict[str, tuple[np.ndarray, np.ndarray]], path: str, title: str = "verification ROC") -> str:
    """Write the ROC curves ``{name: (scores, same)}`` (e.g. teacher and student) to a PNG (matplotlib, Agg).

    FAR on a log axis from ``1 / impostor pairs``; each legend entry gives the AUC.
    """
    try:
        import matplotlib
    except ImportError as e:
        raise ImportError("the ROC plot needs matplotlib: pip install matplotlib") from e
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt
    from sklearn.metrics import auc, roc_curve

    fig, ax = plt.subplots(figsize=(5, 4), dpi=100)
    floor = 1.0
    for name, (scores, same) in curves.items():
        same = np.asarray(same).astype(bool)
        fpr, tpr, _ = roc_curve(same, np.asarray(scores, dtype=np.float64))
        floor = min(floor, 1.0 / max(int((~same).sum()), 1))
        ax.plot(np.maximum(fpr, floor / 2), tpr, label=f"{name} (AUC {auc(fpr, tpr):.4f})")
    ax.set_xscale("log")
    ax.set_xlim(floor / 2, 1.0)
    ax.set_ylim(0, 1.01)
    ax.set_xlabel("false accept rate (FAR)")
    ax.set_ylabel("true accept rate (TAR)")
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return str(path)


def evaluate_embeddings(embeddings: np.ndarray, pairs: np.ndarray, **kwargs: Any) -> dict[str, float]:
    """:func:`verification_metrics` of the cosine scores of ``pairs`` (rows ``(i, j, same)``)."""
    pairs = np.asarray(pairs)
    return verification_metrics(pair_scores(embeddings, pairs), pairs[:, 2], **kwargs)
