"""Margin heads against their formulas computed independently in NumPy (explicit arccos)."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from kd_tasks.face.margins import ArcFace, CosFace, MarginSoftmaxLoss, NormSoftmax, SphereFace, build_margin_head
from kd_tasks.shared.errors import KDConfigError

D, C, B = 8, 5, 12


def unit(a):
    return a / np.linalg.norm(a, axis=1, keepdims=True)


def inputs(head, seed=0):
    """Embeddings whose target angles cover [0, π]: some near their centre, some near the antipode."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        head.weight.copy_(torch.randn(C, D, generator=g))
    target = torch.arange(B) % C
    w = head.weight.detach()[target]
    mix = torch.linspace(-1, 1, B)[:, None]
    x = mix * w + 0.6 * torch.randn(B, D, generator=g)
    return x, target


def numpy_cos_theta(x, w, target):
    cos = unit(x.numpy().astype(np.float64)) @ unit(w.detach().numpy().astype(np.float64)).T
    theta = np.arccos(np.clip(cos[np.arange(B), target.numpy()], -1, 1))
    return cos, theta


def with_target(cos, target, values, s):
    out = s * cos.copy()
    for i, y in enumerate(target.numpy()):
        out[i, y] = s * values[i]
    return out


@pytest.mark.parametrize("boundary", ["none", "insightface", "easy"])
def test_arcface_logits_match_the_formula(boundary):
    m, s = 0.5, 16.0
    head = ArcFace(D, C, scale=s, margin=m, boundary=boundary)
    x, target = inputs(head)
    cos, theta = numpy_cos_theta(x, head.weight, target)
    assert (theta > math.pi - m).any() and (theta < math.pi / 2).any()  # both regions are exercised
    phi = np.cos(theta + m)
    if boundary == "insightface":
        phi = np.where(theta + m <= math.pi, phi, np.cos(theta) - m * math.sin(m))
    elif boundary == "easy":
        phi = np.where(theta < math.pi / 2, phi, np.cos(theta))
    expected = with_target(cos, target, phi, s)
    np.testing.assert_allclose(head(x, target).detach().numpy(), expected, atol=1e-4)
    # the loss is the cross-entropy of these logits
    lse = np.log(np.exp(expected - expected.max(1, keepdims=True)).sum(1)) + expected.max(1)
    ce = np.mean(lse - expected[np.arange(B), target.numpy()])
    assert MarginSoftmaxLoss(head)(x, target).item() == pytest.approx(ce, rel=1e-4)


def test_arcface_boundary_keeps_the_target_logit_monotonic():
    m = 0.5
    theta = torch.linspace(0, math.pi, 2001, dtype=torch.float64)
    for boundary, monotonic in (("insightface", True), ("none", False)):
        psi = ArcFace(D, C, margin=m, boundary=boundary).target_logit(torch.cos(theta))
        assert bool((psi[1:] <= psi[:-1] + 1e-12).all()) is monotonic
    # and the margin always lowers the target logit
    assert bool((ArcFace(D, C, margin=m).target_logit(torch.cos(theta)) <= torch.cos(theta) + 1e-12).all())


def test_cosface_and_normsoftmax_logits():
    m, s = 0.35, 10.0
    head = CosFace(D, C, scale=s, margin=m)
    x, target = inputs(head, 1)
    cos, theta = numpy_cos_theta(x, head.weight, target)
    np.testing.assert_allclose(head(x, target).detach().numpy(), with_target(cos, target, np.cos(theta) - m, s),
                               atol=1e-4)
    plain = NormSoftmax(D, C, scale=s)
    plain.weight.data.copy_(head.weight.data)
    np.testing.assert_allclose(plain(x, target).detach().numpy(), s * cos, atol=1e-4)
    np.testing.assert_allclose(head(x).detach().numpy(), s * cos, atol=1e-4)  # evaluation: no margin


def test_sphereface_piecewise_formula():
    m, s = 4, 8.0
    head = SphereFace(D, C, scale=s, margin=m)
    x, target = inputs(head, 2)
    cos, theta = numpy_cos_theta(x, head.weight, target)
    psi = []
    for t in theta:  # explicit piecewise definition
        k = 0
        while k < m - 1 and t >= (k + 1) * math.pi / m:
            k += 1
        psi.append((-1) ** k * math.cos(m * t) - 2 * k)
    np.testing.assert_allclose(head(x, target).detach().numpy(), with_target(cos, target, np.array(psi), s),
                               atol=2e-3)
    grid = torch.linspace(0.01, math.pi - 0.01, 500, dtype=torch.float64)
    values = head.target_logit(torch.cos(grid))
    assert bool((values[1:] <= values[:-1] + 1e-9).all())


def test_gradients_are_finite_at_the_centre_and_the_antipode():
    head = ArcFace(D, C, scale=16.0)
    target = torch.tensor([0, 1])
    x = torch.stack([head.weight.detach()[0], -head.weight.detach()[1]]).requires_grad_(True)
    loss = MarginSoftmaxLoss(head)(x, target)
    loss.backward()
    assert torch.isfinite(x.grad).all() and torch.isfinite(head.weight.grad).all()


def test_build_and_errors():
    assert isinstance(build_margin_head("cosface", D, C, margin=0.2), CosFace)
    with pytest.raises(KDConfigError, match="arcface"):
        build_margin_head("arcfce", D, C)
    with pytest.raises(KDConfigError):
        ArcFace(D, 1)
    with pytest.raises(Exception, match=r"\(B, 8\)"):
        ArcFace(D, C)(torch.randn(2, 7), torch.tensor([0, 1]))
