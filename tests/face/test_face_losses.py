"""Face KD losses against independent NumPy loops; zeros, invariances, gradient flow, Distiller use."""

import math

import numpy as np
import pytest
import torch

from kd_tasks.face.losses import EmbeddingKDLoss, MarginRKDLoss
from kd_tasks.shared.distiller import Distiller
from kd_tasks.shared.errors import KDConfigError, ShapeMismatchError
from kd_tasks.shared.registry import LOSSES


def pair(b=7, ds=6, dt=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, ds, generator=g, dtype=torch.float64), torch.randn(b, dt, generator=g, dtype=torch.float64)


def huber(a, b, delta=1.0):
    d = abs(a - b)
    return 0.5 * d * d / delta if d < delta else d - 0.5 * delta


def np_angle(a, b):
    c = float(np.dot(a, b) / (np.linalg.norm(a) * np.linalg.norm(b)))
    return math.acos(min(max(c, -1 + 1e-6), 1 - 1e-6))


def test_embedding_losses_match_formulas():
    s, t = pair()
    S, T = s.numpy(), t.numpy()
    cos = [np.dot(a, b) / (np.linalg.norm(a) * np.linalg.norm(b)) for a, b in zip(S, T)]
    assert LOSSES.build("embedding_cosine")(s, t).item() == pytest.approx(np.mean([1 - c for c in cos]))
    l2 = [np.sum((a / np.linalg.norm(a) - b / np.linalg.norm(b)) ** 2) for a, b in zip(S, T)]
    assert LOSSES.build("embedding_l2")(s, t).item() == pytest.approx(np.mean(l2))
    raw = [np.sum((a - b) ** 2) for a, b in zip(S, T)]
    assert LOSSES.build({"type": "embedding_l2", "normalize": False})(s, t).item() == pytest.approx(np.mean(raw))
    # identical directions give 0; the value does not depend on the batch size
    assert EmbeddingKDLoss("cosine")(s, 3 * s).item() == pytest.approx(0, abs=1e-12)
    assert EmbeddingKDLoss("l2")(torch.cat([s, s]), torch.cat([t, t])).item() == pytest.approx(np.mean(l2))
    with pytest.raises(ShapeMismatchError, match="linear"):
        EmbeddingKDLoss()(torch.randn(3, 4), torch.randn(3, 5))


def reference_margin_rkd(S, T, y, wi, wc):
    def term(A, B):
        n = len(A)
        vals = [huber(np_angle(A[i], A[j]), np_angle(B[i], B[j])) for i in range(n) for j in range(n) if i != j]
        return np.mean(vals) if vals else 0.0

    def centres(X):
        out = []
        for k in sorted(set(y)):
            c = sum(X[i] / np.linalg.norm(X[i]) for i in range(len(X)) if y[i] == k)
            out.append(c / np.linalg.norm(c))
        return np.array(out)

    return wi * term(S, T) + wc * term(centres(S), centres(T))


@pytest.mark.parametrize("ds,dt", [(6, 6), (4, 9)])
def test_margin_rkd_matches_loops(ds, dt):
    s, t = pair(8, ds, dt, seed=3)
    y = [0, 1, 2, 0, 1, 2, 3, 3]
    loss = MarginRKDLoss(instance_weight=0.7, centre_weight=1.3)(s, t, target=torch.tensor(y))
    assert loss.item() == pytest.approx(reference_margin_rkd(s.numpy(), t.numpy(), y, 0.7, 1.3), rel=1e-6)


def test_margin_rkd_cosine_metric_and_properties():
    s, t = pair(5, 4, 4, seed=5)
    y = torch.tensor([0, 0, 1, 1, 2])
    S, T = torch.nn.functional.normalize(s, dim=1), torch.nn.functional.normalize(t, dim=1)
    exp = np.mean([huber(float(S[i] @ S[j]), float(T[i] @ T[j])) for i in range(5) for j in range(5) if i != j])
    assert MarginRKDLoss(centre_weight=0, metric="cosine")(s, t).item() == pytest.approx(exp, rel=1e-6)
    # zero for the same geometry, invariant to scaling either side
    assert MarginRKDLoss()(s, 5 * s, target=y).item() == pytest.approx(0, abs=1e-9)
    assert MarginRKDLoss()(2 * s, t, target=y).item() == pytest.approx(MarginRKDLoss()(s, t, target=y).item())
    with pytest.raises(KDConfigError, match="target"):
        MarginRKDLoss()(s, t)
    assert MarginRKDLoss(centre_weight=0).needs_target is False and MarginRKDLoss().needs_target is True
    # one identity: no centre pair, only the instance term
    one = torch.zeros(5, dtype=torch.long)
    assert MarginRKDLoss()(s, t, target=one).item() == pytest.approx(MarginRKDLoss(centre_weight=0)(s, t).item())


@pytest.mark.parametrize("cfg", ["embedding_cosine", "embedding_l2", "margin_rkd"])
def test_gradients_reach_the_student_never_the_teacher(cfg):
    s, t = pair(6, 5, 5, seed=1)
    s.requires_grad_(True)
    t.requires_grad_(True)
    loss = LOSSES.build(cfg)
    kwargs = {"target": torch.tensor([0, 1, 2, 0, 1, 2])} if getattr(loss, "needs_target", False) else {}
    loss(s, t, **kwargs).backward()
    assert t.grad is None
    assert s.grad is not None and s.grad.abs().sum() > 0


def test_distiller_passes_labels_to_margin_rkd():
    torch.manual_seed(0)
    student, teacher = torch.nn.Linear(5, 4), torch.nn.Linear(5, 6)
    d = Distiller(student, teacher, terms=[{"name": "mr", "loss": "margin_rkd"}])
    x, y = torch.randn(6, 5), torch.tensor([0, 0, 1, 1, 2, 2])
    out = d(x, target=y)
    assert out["mr"].item() == pytest.approx(MarginRKDLoss()(student(x), teacher(x), target=y).item())
    out["loss"].backward()
    assert teacher.weight.grad is None and student.weight.grad is not None
