"""Feature losses (feature matching, FitNets, attention transfer, FSP) against independent formulas."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from kd_tasks.shared.errors import KDConfigError, ShapeMismatchError
from kd_tasks.shared.losses.feature import ATLoss, FeatureLoss, FitNetLoss, FSPLoss
from kd_tasks.shared.registry import LOSSES
from loss_refs import assert_grad_reaches_student_only, huber, rand


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


# ----------------------------------------------------------------------------- FeatureLoss


@pytest.mark.parametrize("metric", ["mse", "l1", "smooth_l1"])
def test_elementwise_metrics_match_numpy(metric):
    s, t = rand(3, 4, 5, 5) * 2, rand(3, 4, 5, 5) * 2
    diff = (s - t).numpy()
    expected = {"mse": np.mean(diff**2), "l1": np.mean(np.abs(diff)), "smooth_l1": np.mean(huber(diff))}[metric]
    assert FeatureLoss(metric)(s, t).item() == pytest.approx(expected, rel=1e-10)


def test_cosine_on_maps_compares_channel_vectors_per_position():
    s, t = rand(2, 3, 4, 5), rand(2, 3, 4, 5)
    sn, tn = s.numpy(), t.numpy()
    values = []
    for b in range(2):
        for h in range(4):
            for w in range(5):
                a, c = sn[b, :, h, w], tn[b, :, h, w]
                values.append(1 - a @ c / (np.linalg.norm(a) * np.linalg.norm(c)))
    assert FeatureLoss("cosine")(s, t).item() == pytest.approx(np.mean(values), rel=1e-10)


def test_cosine_on_tokens_uses_last_dim_and_mask_selects_positions():
    s, t = rand(2, 6, 8), rand(2, 6, 8)
    sn, tn = s.numpy(), t.numpy()
    mask = torch.tensor([[1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 0]], dtype=torch.bool)
    values = [
        1 - np.dot(sn[b, i], tn[b, i]) / (np.linalg.norm(sn[b, i]) * np.linalg.norm(tn[b, i]))
        for b in range(2)
        for i in range(6)
        if mask[b, i]
    ]
    assert FeatureLoss("cosine")(s, t, mask=mask).item() == pytest.approx(np.mean(values), rel=1e-10)


def test_mask_mean_runs_over_masked_elements_only():
    s, t = rand(2, 5, 4), rand(2, 5, 4)
    mask = torch.tensor([[1, 0, 1, 0, 0], [0, 0, 0, 1, 1]], dtype=torch.bool)
    kept = [((s[b, i] - t[b, i]) ** 2).numpy() for b in range(2) for i in range(5) if mask[b, i]]
    assert FeatureLoss("mse")(s, t, mask=mask).item() == pytest.approx(np.concatenate(kept).mean(), rel=1e-10)
    # masked-out positions may hold anything
    t2 = t.clone()
    t2[~mask] = 1e6
    assert FeatureLoss("mse")(s, t2, mask=mask).item() == pytest.approx(np.concatenate(kept).mean(), rel=1e-10)


def test_spatial_mask_on_maps():
    s, t = rand(2, 3, 4, 4), rand(2, 3, 4, 4)
    mask = torch.zeros(2, 1, 4, 4, dtype=torch.bool)
    mask[0, 0, :2, :2] = True
    expected = ((s[0, :, :2, :2] - t[0, :, :2, :2]) ** 2).mean().item()
    assert FeatureLoss("mse")(s, t, mask=mask).item() == pytest.approx(expected, rel=1e-10)


def test_bad_mask_shape_raises():
    with pytest.raises(ShapeMismatchError, match="mask shape"):
        FeatureLoss("mse")(rand(2, 3, 4, 4), rand(2, 3, 4, 4), mask=torch.ones(2, 4, 4, dtype=torch.bool))


def test_normalize_divides_each_sample_by_its_norm():
    s, t = rand(3, 10), rand(3, 10) * 5
    sn = s.numpy() / np.linalg.norm(s.numpy(), axis=1, keepdims=True)
    tn = t.numpy() / np.linalg.norm(t.numpy(), axis=1, keepdims=True)
    assert FeatureLoss("mse", normalize=True)(s, t).item() == pytest.approx(np.mean((sn - tn) ** 2), rel=1e-10)
    # invariant to scaling a sample
    assert FeatureLoss("mse", normalize=True)(s * 7.0, t).item() == pytest.approx(np.mean((sn - tn) ** 2), rel=1e-10)


@pytest.mark.parametrize("metric", FeatureLoss.METRICS)
def test_identical_inputs_give_zero(metric):
    x = rand(2, 3, 4, 4)
    assert FeatureLoss(metric)(x, x.clone()).item() == pytest.approx(0.0, abs=1e-12)


@pytest.mark.parametrize("metric", FeatureLoss.METRICS)
def test_feature_loss_is_batch_size_independent_and_gradients(metric):
    s, t = rand(3, 4, 6), rand(3, 4, 6)
    loss = FeatureLoss(metric)
    assert loss(torch.cat([s, s]), torch.cat([t, t])).item() == pytest.approx(loss(s, t).item(), rel=1e-10)
    assert_grad_reaches_student_only(loss, s, t)


@pytest.mark.parametrize("alias", ["mse", "l1", "smooth_l1", "cosine"])
def test_aliases_build_the_right_metric(alias):
    built = LOSSES.build({"type": alias})
    assert isinstance(built, FeatureLoss) and built.metric == alias
    s, t = rand(2, 5), rand(2, 5)
    assert built(s, t).item() == pytest.approx(FeatureLoss(alias)(s, t).item())
    with pytest.raises(KDConfigError):
        LOSSES.build({"type": alias, "metric": "l1"})
    assert LOSSES.build({"type": "feature", "metric": alias}).metric == alias


def test_unknown_metric_is_rejected():
    with pytest.raises(KDConfigError, match="metric"):
        FeatureLoss("huber")


@pytest.mark.parametrize(
    "s_shape, t_shape, hint",
    [
        ((2, 8, 4, 4), (2, 16, 4, 4), "conv1x1"),
        ((2, 8, 4, 4), (2, 8, 8, 8), "resize"),
        ((2, 5, 32), (2, 5, 64), "linear"),
        ((2, 32), (2, 64), "linear"),
        ((2, 32), (3, 32), "batch"),
    ],
)
def test_shape_mismatch_names_shapes_and_connector(s_shape, t_shape, hint):
    with pytest.raises(ShapeMismatchError) as err:
        FeatureLoss("mse")(rand(*s_shape), rand(*t_shape))
    text = str(err.value)
    assert str(tuple(s_shape)) in text and str(tuple(t_shape)) in text and hint in text


# ----------------------------------------------------------------------------- FitNet


def test_fitnet_matches_hint_formula_with_its_1x1_regressor():
    s, t = rand(3, 4, 5, 5).float(), rand(3, 6, 5, 5).float()
    loss_fn = FitNetLoss()
    value = loss_fn(s, t)
    params = dict(loss_fn.named_parameters())
    weight = next(p for n, p in params.items() if n.endswith("weight")).detach().numpy()[:, :, 0, 0]
    bias = next(p for n, p in params.items() if n.endswith("bias")).detach().numpy()
    mapped = np.einsum("oc,bchw->bohw", weight, s.numpy()) + bias[None, :, None, None]
    per_sample = 0.5 * ((mapped - t.numpy()) ** 2).reshape(3, -1).sum(axis=1)
    assert value.item() == pytest.approx(per_sample.mean(), rel=1e-5)
    mean_fn = FitNetLoss(reduction="mean")
    mean_fn.connector = loss_fn.connector  # the same regressor, the other reduction
    assert mean_fn(s, t).item() == pytest.approx(((mapped - t.numpy()) ** 2).mean(), rel=1e-5)


def test_fitnet_linear_regressor_for_vectors_and_identity_for_equal_shapes():
    fn = LOSSES.build({"type": "hint"})
    s, t = rand(4, 7).float(), rand(4, 3).float()
    fn(s, t)
    assert [tuple(p.shape) for p in fn.parameters()] == [(3, 7), (3,)]
    same = FitNetLoss()
    x = rand(2, 3, 4, 4).float()
    assert same(x, x.clone()).item() == 0.0
    assert list(same.parameters()) == []


def test_fitnet_gradients_reach_student_and_regressor_never_teacher():
    fn = FitNetLoss()
    s = rand(2, 4, 3, 3).float().requires_grad_(True)
    t = rand(2, 8, 3, 3).float().requires_grad_(True)
    fn(s, t).backward()
    assert s.grad is not None and s.grad.abs().sum() > 0
    assert t.grad is None
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in fn.parameters())


def test_fitnet_sgd_on_the_regressor_reduces_the_loss():
    s = rand(8, 4, 3, 3).float()
    true_map = rand(6, 4).float()
    t = torch.einsum("oc,bchw->bohw", true_map, s)  # reachable by a 1x1 conv
    fn = FitNetLoss(reduction="mean")
    first = fn(s, t)  # builds the regressor: optimiser after the first forward
    opt = torch.optim.SGD(fn.parameters(), lr=0.2)
    losses = [first.item()]
    for _ in range(30):
        opt.zero_grad()
        loss = fn(s, t)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.1 * losses[0]


def test_fitnet_shape_error_for_incompatible_ranks():
    with pytest.raises(ShapeMismatchError, match=r"\(2, 8\)"):
        FitNetLoss()(rand(2, 8).float(), rand(2, 4, 3, 3).float())


# ----------------------------------------------------------------------------- AT


def at_reference(s, t, beta, mode):
    """Attention maps and the AT value from explicit loops over samples and positions."""
    b, _, h, w = s.shape
    values = []
    for i in range(b):
        qs = np.array([[np.sum(s[i, :, y, x] ** 2) for x in range(w)] for y in range(h)]).ravel()
        qt = np.array([[np.sum(t[i, :, y, x] ** 2) for x in range(w)] for y in range(h)]).ravel()
        d = qs / np.linalg.norm(qs) - qt / np.linalg.norm(qt)
        values.append(np.sum(d**2) if mode == "code" else np.linalg.norm(d))
    return beta / (2 * h * w) * np.mean(values)


@pytest.mark.parametrize("mode", ["paper", "code"])
def test_at_matches_loops(mode):
    s, t = rand(3, 4, 5, 6), rand(3, 7, 5, 6)
    expected = at_reference(s.numpy(), t.numpy(), 1000.0, mode)
    assert ATLoss(mode=mode)(s, t).item() == pytest.approx(expected, rel=1e-10)
    assert ATLoss(beta=2.0, mode=mode)(s, t).item() == pytest.approx(expected * 2 / 1000, rel=1e-10)


def test_at_code_mode_with_beta_2_is_the_mean_squared_difference():
    s, t = rand(2, 3, 4, 4), rand(2, 3, 4, 4)
    qs = torch.nn.functional.normalize(s.pow(2).mean(1).flatten(1))  # the authors' `at` (channel mean)
    qt = torch.nn.functional.normalize(t.pow(2).mean(1).flatten(1))
    assert ATLoss(beta=2.0, mode="code")(s, t).item() == pytest.approx((qs - qt).pow(2).mean().item(), rel=1e-10)


def test_at_is_invariant_to_channel_count_and_zero_for_identical():
    s, t = rand(2, 4, 5, 5), rand(2, 6, 5, 5)
    loss = ATLoss()
    doubled_teacher = torch.cat([t, t], dim=1)  # same attention, twice the channels
    assert loss(s, doubled_teacher).item() == pytest.approx(loss(s, t).item(), rel=1e-10)
    assert loss(s, s.clone()).item() == 0.0


def test_at_gradients_finite_at_zero_distance_and_never_teacher():
    x = rand(2, 3, 4, 4)
    s = x.clone().requires_grad_(True)
    ATLoss()(s, x).backward()
    assert torch.isfinite(s.grad).all()
    assert_grad_reaches_student_only(ATLoss(), rand(2, 3, 4, 4), rand(2, 5, 4, 4))


def test_at_batch_size_independent():
    s, t = rand(3, 2, 4, 4), rand(3, 2, 4, 4)
    assert ATLoss()(torch.cat([s, s]), torch.cat([t, t])).item() == pytest.approx(ATLoss()(s, t).item())


def test_at_spatial_mismatch_suggests_resize():
    with pytest.raises(ShapeMismatchError, match="resize"):
        ATLoss()(rand(2, 3, 4, 4), rand(2, 3, 8, 8))


# ----------------------------------------------------------------------------- FSP


def fsp_reference(f1, f2):
    """G[b, i, j] = sum_{h,w} f1[b,i,h,w] f2[b,j,h,w] / (h w) with explicit loops."""
    b, c1, h, w = f1.shape
    c2 = f2.shape[1]
    g = np.zeros((b, c1, c2))
    for n in range(b):
        for i in range(c1):
            for j in range(c2):
                g[n, i, j] = sum(f1[n, i, y, x] * f2[n, j, y, x] for y in range(h) for x in range(w)) / (h * w)
    return g


def avg_pool_2x2(x):
    b, c, h, w = x.shape
    return x.reshape(b, c, h // 2, 2, w // 2, 2).mean(axis=(3, 5))


@pytest.mark.parametrize("squared", [True, False])
def test_fsp_matches_loops(squared):
    s1, s2 = rand(2, 3, 4, 4), rand(2, 5, 4, 4)
    t1, t2 = rand(2, 3, 6, 6), rand(2, 5, 6, 6)  # other spatial size than the student: allowed
    diff = fsp_reference(s1.numpy(), s2.numpy()) - fsp_reference(t1.numpy(), t2.numpy())
    per_sample = (diff**2).sum(axis=(1, 2))
    expected = (per_sample if squared else np.sqrt(per_sample)).mean()
    assert FSPLoss(squared=squared)((s1, s2), (t1, t2)).item() == pytest.approx(expected, rel=1e-10)


def test_fsp_pools_the_larger_layer_of_a_pair():
    s1, s2 = rand(2, 3, 8, 8), rand(2, 4, 4, 4)
    t1, t2 = rand(2, 3, 8, 8), rand(2, 4, 4, 4)
    gs = fsp_reference(avg_pool_2x2(s1.numpy()), s2.numpy())
    gt = fsp_reference(avg_pool_2x2(t1.numpy()), t2.numpy())
    expected = ((gs - gt) ** 2).sum(axis=(1, 2)).mean()
    assert FSPLoss()([s1, s2], [t1, t2]).item() == pytest.approx(expected, rel=1e-10)


def test_fsp_identical_zero_gradients_and_errors():
    a, b = rand(2, 3, 4, 4), rand(2, 5, 4, 4)
    assert FSPLoss()((a, b), (a.clone(), b.clone())).item() == 0.0
    s1 = a.clone().requires_grad_(True)
    t1 = rand(2, 3, 4, 4).requires_grad_(True)
    FSPLoss()((s1, b), (t1, b)).backward()
    assert s1.grad.abs().sum() > 0 and t1.grad is None
    with pytest.raises(ShapeMismatchError, match="conv1x1"):
        FSPLoss()((rand(2, 3, 4, 4), b), (rand(2, 6, 4, 4), b))
    with pytest.raises(KDConfigError, match="pair"):
        FSPLoss()(a, a)


def test_fsp_batch_size_independent():
    a, b, c, d = rand(2, 3, 4, 4), rand(2, 5, 4, 4), rand(2, 3, 4, 4), rand(2, 5, 4, 4)
    twice = FSPLoss()((torch.cat([a, a]), torch.cat([b, b])), (torch.cat([c, c]), torch.cat([d, d])))
    assert twice.item() == pytest.approx(FSPLoss()((a, b), (c, d)).item())


def test_registered_names():
    for name in ["feature", "mse", "l1", "smooth_l1", "cosine", "fitnet", "hint", "at", "attention_transfer", "fsp"]:
        assert name in LOSSES
    assert isinstance(LOSSES.build({"type": "attention_transfer", "mode": "code"}), ATLoss)


@pytest.mark.parametrize(
    "loss_fn, s_shape, t_shape",
    [
        (FeatureLoss("cosine"), (2, 3, 4, 4), (2, 3, 4, 4)),
        (FeatureLoss("mse"), (2, 5), (2, 5)),
        (ATLoss(), (2, 3, 4, 4), (2, 6, 4, 4)),
    ],
)
def test_low_precision_teacher_is_compared_in_the_students_dtype(loss_fn, s_shape, t_shape):
    s, t = torch.randn(*s_shape), torch.randn(*t_shape).bfloat16()
    value = loss_fn(s, t)
    assert value.dtype == torch.float32
    assert value.item() == loss_fn(s, t.float()).item()


def test_low_precision_teacher_pair_for_fsp():
    a, b = torch.randn(2, 3, 4, 4), torch.randn(2, 5, 4, 4)
    t1, t2 = torch.randn(2, 3, 4, 4).half(), torch.randn(2, 5, 4, 4).half()
    assert FSPLoss()((a, b), (t1, t2)).item() == FSPLoss()((a, b), (t1.float(), t2.float())).item()
