"""Margin-aware face KD methods and teacher-space conditioning, each against its formula written
independently here (numpy / loops in the authors' layout), plus gradient flow: student yes, teacher no."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from kd_tasks.face.losses import AdaDistillLoss, ConditionedEmbeddingLoss, EKDLoss, MarginDistillationLoss
from kd_tasks.face.margins import ArcFace, init_head_from_teacher
from kd_tasks.face.space import TeacherSpace, class_centres
from kd_tasks.shared.errors import KDConfigError, ShapeMismatchError
from kd_tasks.shared.registry import LOSSES


def cone(n, d, seed=0, spread=0.15):
    """Teacher-like embeddings in a narrow cone around one direction (mean pairwise cosine ~0.9)."""
    axis = torch.randn(d, generator=torch.Generator().manual_seed(1234))  # the same cone for every seed
    g = torch.Generator().manual_seed(seed)
    return (axis / axis.norm() + spread * torch.randn(n, d, generator=g)) * 0.6


def unit(a):
    return a / np.linalg.norm(a, axis=-1, keepdims=True)


def grads_reach_student_not_teacher(loss_fn, s, t):
    s = s.clone().requires_grad_(True)
    t = t.clone().requires_grad_(True)
    loss_fn(s, t).backward()
    assert s.grad is not None and s.grad.abs().sum() > 0
    assert t.grad is None


# ----------------------------------------------------------------------------- teacher space


def test_centring_removes_the_mean_direction_free_win():
    t_train = cone(200, 16)
    mean_dir = F.normalize(t_train, dim=1).mean(0)
    constant = mean_dir.expand(64, 16)  # a student that outputs the teacher's mean direction
    t = cone(64, 16, seed=1)
    raw = LOSSES.build("embedding_cosine")(constant, t)
    loss = ConditionedEmbeddingLoss("centre")
    loss.space.fit(t_train)
    centred = loss(constant, t)
    assert raw < 0.2  # the raw cosine loss rewards the constant (cosine ~0.85 to every face)
    assert abs(float(centred) - 1.0) < 0.2  # conditioned: no better than chance
    # formula: 1 - cos(s, t̂ - μ), μ the training mean of t̂ (numpy)
    s = torch.randn(64, 16)
    mu = unit(t_train.numpy()).mean(0)
    target = unit(t.numpy()) - mu
    expected = np.mean(1 - np.sum(unit(s.numpy()) * unit(target), axis=1))
    assert float(loss(s, t)) == pytest.approx(expected, abs=1e-5)
    grads_reach_student_not_teacher(loss, s, t)


def test_whitening_gives_identity_covariance_and_errors_when_unfitted():
    t_train = cone(500, 8, spread=0.3)
    space = TeacherSpace("whiten").fit(t_train)
    z = space(t_train).double()
    cov = torch.cov(z.t())
    assert torch.allclose(z.mean(0), torch.zeros(8, dtype=torch.float64), atol=1e-4)
    assert torch.allclose(cov, torch.eye(8, dtype=torch.float64), atol=2e-2)
    # numpy PCA whitening (same eigen-basis up to sign: compare the Gram matrix, which signs do not change)
    x = unit(t_train.numpy().astype(np.float64))
    xc = x - x.mean(0)
    evals, evecs = np.linalg.eigh(np.cov(xc.T))
    zn = xc @ evecs / np.sqrt(evals + 1e-4)
    assert np.allclose(z.numpy() @ z.numpy().T, zn @ zn.T, atol=1e-2 * np.abs(zn @ zn.T).max())
    with pytest.raises(KDConfigError, match="not fitted"):
        ConditionedEmbeddingLoss("whiten")(torch.randn(4, 8), torch.randn(4, 8))
    with pytest.raises(KDConfigError, match="mode"):
        TeacherSpace("sphere")


def test_class_centres_and_frozen_head_init():
    t = cone(30, 8)
    y = torch.arange(30) % 3
    space = TeacherSpace("centre").fit(t)
    c = class_centres(t, y, 3, space)
    z = unit(space(t).numpy())
    for k in range(3):
        assert np.allclose(c[k].numpy(), unit(z[y.numpy() == k].mean(0)), atol=1e-5)
    head = ArcFace(8, 3, scale=16)
    init_head_from_teacher(head, c, freeze=True)
    assert not head.weight.requires_grad and torch.allclose(head.weight, c)
    with pytest.raises(ShapeMismatchError, match="teacher centres"):
        init_head_from_teacher(ArcFace(4, 3), c)
    with pytest.raises(KDConfigError, match="no teacher embedding"):
        class_centres(t, y, 4)


# ----------------------------------------------------------------------------- EKD


def ekd_reference(s, t, y, s_anchor, t_anchor, anchors, temp=0.01, momentum=0.01, topk=2000, wp=0.02, wn=0.01):
    """EKD written with explicit pair loops in numpy (the authors' procedure)."""
    s, t = unit(s), unit(t)
    pos_s, pos_t, neg_s, neg_t = [], [], [], []
    for i in range(len(y)):
        for j in range(i + 1, len(y)):
            (pos_s if y[i] == y[j] else neg_s).append(s[i] @ s[j])
            (pos_t if y[i] == y[j] else neg_t).append(t[i] @ t[j])
    neg_s, neg_t = np.array(neg_s), np.array(neg_t)
    order = np.argsort(-neg_s, kind="stable")
    n = len(neg_s)
    sel = [min(n // a, n - 1) for a in anchors]
    s_anchor = momentum * np.sort(neg_s)[::-1][sel] + (1 - momentum) * s_anchor
    t_anchor = momentum * np.sort(neg_t)[::-1][sel] + (1 - momentum) * t_anchor

    def rank(x, a):
        return sum(1 / (1 + math.exp(-np.clip((x - ak) / temp, -50, 50))) for ak in a)

    def mse(xs, xt):
        return np.mean([(rank(a, s_anchor) - rank(b, t_anchor)) ** 2 for a, b in zip(xs, xt)])

    top = order[:topk]
    return wp * mse(pos_s, pos_t) + wn * mse(neg_s[top], neg_t[top]), s_anchor, t_anchor


def test_ekd_matches_reference_over_steps_and_grads():
    g = torch.Generator().manual_seed(3)
    loss = EKDLoss(anchors=(2, 5, 1000), temperature=0.05, momentum=0.5, topk=20)
    s_anchor = np.zeros(3)
    t_anchor = np.zeros(3)
    y = torch.tensor([0, 0, 1, 1, 2, 2, 3, 0, 1, 4])
    for _ in range(3):  # anchors carry over between steps (EMA)
        s, t = torch.randn(10, 6, generator=g), torch.randn(10, 6, generator=g)
        expected, s_anchor, t_anchor = ekd_reference(s.numpy().astype(np.float64), t.numpy().astype(np.float64),
                                                     y.numpy(), s_anchor, t_anchor, (2, 5, 1000), 0.05, 0.5, 20)
        got = loss(s, t, target=y)
        assert float(got) == pytest.approx(expected, rel=1e-4, abs=1e-7)
        assert np.allclose(loss.s_anchor.numpy(), s_anchor, atol=1e-5)
        assert np.allclose(loss.t_anchor.numpy(), t_anchor, atol=1e-5)
    grads_reach_student_not_teacher(lambda a, b: loss(a, b, target=y), s, t)
    assert LOSSES.get("ekd") is EKDLoss


# ----------------------------------------------------------------------------- AdaDistill


def adadistill_reference(kernel, s, t, label, scale, m, kind):
    """The authors' AdaptiveA{Arc,Cos}Face: kernel (D, C), arccos/cos form, one indexed assignment."""
    s, t = F.normalize(s, dim=1), F.normalize(t, dim=1)
    kernel = kernel.clone()
    with torch.no_grad():
        cos_st = F.cosine_similarity(s, t).clamp(-1, 1)
        lam = F.cosine_similarity(kernel[:, label].T, t).clamp(1e-6, 1).view(-1, 1)
        a = (cos_st.view(-1, 1) * lam).clamp(1e-6, 1.0).T
        kernel[:, label] = a * kernel[:, label] + (1.0 - a) * t.T
    cos = torch.mm(s, F.normalize(kernel, dim=0)).clamp(-1, 1)
    onehot = torch.zeros_like(cos).scatter_(1, label[:, None], m)
    logits = torch.cos(torch.acos(cos) + onehot) if kind == "arcface" else cos - onehot
    return F.cross_entropy(logits * scale, label), kernel


@pytest.mark.parametrize("kind", ["arcface", "cosface"])
def test_adadistill_matches_authors_formula(kind):
    g = torch.Generator().manual_seed(5)
    loss = AdaDistillLoss(num_classes=7, embedding_dim=6, margin=kind, scale=16.0, m=0.45, seed=0)
    kernel = loss.centres.t().clone()  # the authors' layout (D, C)
    for _ in range(3):
        label = torch.randperm(7, generator=g)[:5]  # distinct classes: the authors' single assignment
        s, t = torch.randn(5, 6, generator=g), torch.randn(5, 6, generator=g)
        t = t + 2 * s  # some agreement so that α varies
        expected, kernel = adadistill_reference(kernel, s, t, label, 16.0, 0.45, kind)
        got = loss(s, t, target=label)
        assert float(got) == pytest.approx(float(expected), rel=1e-4)
        assert torch.allclose(loss.centres.t(), kernel, atol=1e-5)
    grads_reach_student_not_teacher(lambda a, b: loss(a, b, target=label), s, t)
    assert not any(p.requires_grad for p in loss.parameters())  # centres move by EMA only


def test_adadistill_repeated_class_updates_in_batch_order_and_own_rng():
    loss = AdaDistillLoss(3, 4, seed=1)
    w0 = loss.centres.clone()
    t = F.normalize(torch.tensor([[1.0, 0, 0, 0], [0, 1.0, 0, 0]]), dim=1)
    s = t.clone()
    label = torch.tensor([2, 2])
    lam = F.cosine_similarity(w0[2:3].expand(2, 4), t).clamp(1e-6, 1)
    a = (1.0 * lam).clamp(1e-6, 1)
    expected = a[1] * (a[0] * w0[2] + (1 - a[0]) * t[0]) + (1 - a[1]) * t[1]
    loss(s, t, target=label)
    assert torch.allclose(loss.centres[2], expected, atol=1e-6)
    # construction draws from its own generator: the global stream is untouched
    torch.manual_seed(0)
    before = torch.rand(3)
    torch.manual_seed(0)
    AdaDistillLoss(3, 4)
    assert torch.equal(torch.rand(3), before)


# ----------------------------------------------------------------------------- MarginDistillation


def margin_distillation_reference(s, t, label, centres, scale, m_min, m_max):
    """The authors' MXNet graph in numpy: teacher cosine to its centre -> margin -> arccos/cos."""
    s, t, w = unit(s), unit(t), unit(centres)
    d = np.sum(t * w[label], axis=1)
    margin = (m_max - m_min) / d.max() * d + m_min
    logits = s @ w.T * scale
    zy = logits[np.arange(len(label)), label]
    logits[np.arange(len(label)), label] = np.cos(np.arccos(zy / scale) + margin) * scale
    logits -= logits.max(1, keepdims=True)
    logp = logits - np.log(np.exp(logits).sum(1, keepdims=True))
    return -np.mean(logp[np.arange(len(label)), label]), margin


def test_margin_distillation_matches_authors_formula():
    g = torch.Generator().manual_seed(9)
    centres = torch.randn(4, 6, generator=g)
    label = torch.tensor([0, 1, 2, 3, 1, 0])
    t = F.normalize(centres, dim=1)[label] + 0.5 * torch.randn(6, 6, generator=g)
    s = t + 0.3 * torch.randn(6, 6, generator=g)
    loss = MarginDistillationLoss(4, 6, scale=16.0, m_min=0.2, m_max=0.5).init_centres(centres)
    expected, margin = margin_distillation_reference(s.double().numpy(), t.double().numpy(), label.numpy(),
                                                     centres.double().numpy(), 16.0, 0.2, 0.5)
    assert float(loss(s, t, target=label)) == pytest.approx(expected, rel=1e-4)
    assert np.allclose(loss.margins(F.normalize(t, dim=1), label).numpy(), margin, atol=1e-5)
    assert float(margin.max()) == pytest.approx(0.5)
    grads_reach_student_not_teacher(lambda a, b: loss(a, b, target=label), s, t)
    with pytest.raises(KDConfigError, match="centres first"):
        MarginDistillationLoss(4, 6)(s, t, target=label)


def test_new_losses_are_registered_with_their_names():
    for name in ("embedding_conditioned", "ekd", "adadistill", "margin_distillation"):
        assert name in LOSSES
