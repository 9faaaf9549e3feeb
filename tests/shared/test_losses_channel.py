"""Channel-wise distillation (CWD) against an explicit numpy loop, hand-made cases and properties."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from kd_tasks.shared.errors import KDConfigError, ShapeMismatchError
from kd_tasks.shared.losses.channel import CWDLoss
from kd_tasks.shared.registry import LOSSES


def maps(*shape, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=dtype) * 2


def ref_cwd(s, t, temperature, spatial=False):
    """Loop over images and channels: KL between spatial softmaxes, T² / (N·C) [/ (H·W)]."""
    s, t = s.numpy(), t.numpy()
    n, c = s.shape[:2]
    positions = int(np.prod(s.shape[2:]))
    total = 0.0
    for i in range(n):
        for k in range(c):
            zs, zt = s[i, k].ravel() / temperature, t[i, k].ravel() / temperature
            ps = [math.exp(v) for v in zs]
            pt = [math.exp(v) for v in zt]
            ps = [v / sum(ps) for v in ps]
            pt = [v / sum(pt) for v in pt]
            total += sum(pt[j] * math.log(pt[j] / ps[j]) for j in range(positions))
    loss = total * temperature**2 / (n * c)
    return loss / positions if spatial else loss


@pytest.mark.parametrize("temperature", [1.0, 4.0])
@pytest.mark.parametrize("normalize", ["channel", "spatial"])
def test_cwd_matches_loop(temperature, normalize):
    s, t = maps(2, 3, 4, 5, seed=1), maps(2, 3, 4, 5, seed=2)
    got = CWDLoss(temperature=temperature, normalize=normalize)(s, t)
    assert got.item() == pytest.approx(ref_cwd(s, t, temperature, normalize == "spatial"), rel=1e-10)


def test_cwd_matches_mmrazor_style_formula():
    # sum(p_t log p_t - p_t log p_s) * T² / (C N), written on (N·C, H·W) rows.
    s, t = maps(3, 4, 5, 5, seed=3), maps(3, 4, 5, 5, seed=4)
    tau = 2.0
    rows_s, rows_t = s.view(-1, 25) / tau, t.view(-1, 25) / tau
    p_t = torch.softmax(rows_t, dim=1)
    expected = torch.sum(p_t * torch.log_softmax(rows_t, 1) - p_t * torch.log_softmax(rows_s, 1)) * tau**2 / (4 * 3)
    assert CWDLoss(temperature=tau)(s, t).item() == pytest.approx(expected.item(), rel=1e-10)


def test_cwd_any_spatial_rank():
    s, t = maps(2, 3, 7, seed=5), maps(2, 3, 7, seed=6)
    assert CWDLoss(temperature=2.0)(s, t).item() == pytest.approx(ref_cwd(s, t, 2.0), rel=1e-10)


def test_cwd_identical_inputs_give_zero():
    s = maps(2, 4, 3, 3, seed=7)
    assert CWDLoss(temperature=4.0)(s, s.clone()).item() == pytest.approx(0.0, abs=1e-12)


def test_cwd_softmax_runs_over_positions_not_channels():
    s, t = maps(2, 3, 4, 4, seed=8), maps(2, 3, 4, 4, seed=9)
    loss = CWDLoss()
    base = loss(s, t).item()
    per_channel_shift = torch.tensor([5.0, -3.0, 1.0], dtype=s.dtype).view(1, 3, 1, 1)
    assert loss(s + per_channel_shift, t).item() == pytest.approx(base, rel=1e-10)
    per_position_shift = torch.linspace(-3, 3, 16, dtype=s.dtype).view(1, 1, 4, 4)
    assert abs(loss(s + per_position_shift, t).item() - base) > 1e-3


def test_cwd_teacher_is_the_target():
    s, t = maps(2, 2, 3, 3, seed=10), maps(2, 2, 3, 3, seed=11) * 3
    loss = CWDLoss()
    assert loss(s, t).item() == pytest.approx(ref_cwd(s, t, 1.0), rel=1e-10)
    assert abs(loss(s, t).item() - loss(t, s).item()) > 1e-2


def test_cwd_batch_size_independent():
    s, t = maps(2, 3, 4, 4, seed=12), maps(2, 3, 4, 4, seed=13)
    for normalize in ("channel", "spatial"):
        loss = CWDLoss(temperature=3.0, normalize=normalize)
        doubled = loss(torch.cat([s, s]), torch.cat([t, t]))
        assert doubled.item() == pytest.approx(loss(s, t).item(), rel=1e-12)


def test_cwd_gradient_reaches_student_not_teacher():
    s = maps(2, 3, 4, 4, seed=14, dtype=torch.float32).requires_grad_(True)
    t = maps(2, 3, 4, 4, seed=15, dtype=torch.float32).requires_grad_(True)
    CWDLoss(temperature=4.0)(s, t).backward()
    assert s.grad is not None and s.grad.abs().sum() > 0
    assert t.grad is None or torch.all(t.grad == 0)


def test_cwd_shape_mismatch_suggests_connectors():
    loss = CWDLoss()
    with pytest.raises(ShapeMismatchError, match=r"conv1x1.*8 -> 16"):
        loss(torch.zeros(2, 8, 4, 4), torch.zeros(2, 16, 4, 4))
    with pytest.raises(ShapeMismatchError, match="resize"):
        loss(torch.zeros(2, 8, 4, 4), torch.zeros(2, 8, 8, 8))
    with pytest.raises(ShapeMismatchError, match="batch"):
        loss(torch.zeros(2, 8, 4, 4), torch.zeros(3, 8, 4, 4))
    with pytest.raises(ShapeMismatchError, match=r"\(N, C, H, W\)"):
        loss(torch.zeros(2, 8), torch.zeros(2, 8))


def test_cwd_options_and_registry():
    loss = LOSSES.build({"type": "cwd", "temperature": 4, "normalize": "spatial"})
    assert isinstance(loss, CWDLoss) and loss.temperature == 4.0 and loss.normalize == "spatial"
    assert isinstance(LOSSES.build({"type": "channel_wise"}), CWDLoss)
    with pytest.raises(KDConfigError, match="normalize"):
        CWDLoss(normalize="pixel")
    with pytest.raises(KDConfigError, match="temperature"):
        CWDLoss(temperature=-1)
    with pytest.raises(KDConfigError, match="temperature"):
        LOSSES.build({"type": "cwd", "tau": 4})
