"""Logit losses against independent numpy/scipy computations, hand-made cases and properties."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.special import expit, rel_entr, softmax
from scipy.stats import pearsonr

from kd_tasks.shared.errors import KDConfigError, ShapeMismatchError
from kd_tasks.shared.losses.logit import DISTLoss, DKDLoss, KDLoss, LogitMSELoss, SigmoidKDLoss
from kd_tasks.shared.registry import LOSSES


def logits(*shape, seed=0, scale=2.0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=dtype) * scale


def labels(*shape, classes, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, classes, shape, generator=g)


# ----------------------------------------------------------------------------- references (numpy)


def ref_kl(p, q):
    """KL(p ‖ q) of two probability vectors."""
    return float(np.sum(rel_entr(p, q)))


def ref_kd(s, t, temperature, mask=None):
    """T² KL(softmax(t/T) ‖ softmax(s/T)) averaged over the kept rows, looping over positions."""
    s, t = s.numpy().reshape(-1, s.shape[-1]), t.numpy().reshape(-1, t.shape[-1])
    keep = np.ones(len(s), bool) if mask is None else mask.numpy().reshape(-1)
    values = [
        temperature**2 * ref_kl(softmax(t[i] / temperature), softmax(s[i] / temperature))
        for i in range(len(s))
        if keep[i]
    ]
    return float(np.mean(values))


def ref_dkd(s, t, y, alpha, beta, temperature):
    total = 0.0
    for i in range(len(s)):
        p_s, p_t = softmax(s[i].numpy() / temperature), softmax(t[i].numpy() / temperature)
        gt = int(y[i])
        b_s, b_t = np.array([p_s[gt], 1 - p_s[gt]]), np.array([p_t[gt], 1 - p_t[gt]])
        others = [c for c in range(len(p_s)) if c != gt]
        # p_c / (1 - p_y) over c != y, i.e. a softmax over the non-target logits alone.
        hat_s, hat_t = softmax(s[i, others].numpy() / temperature), softmax(t[i, others].numpy() / temperature)
        tckd = ref_kl(b_t, b_s) if alpha else 0.0
        total += alpha * tckd + beta * ref_kl(hat_t, hat_s)
    return temperature**2 * total / len(s)


def ref_dist(s, t, beta, gamma, tau):
    y_s, y_t = softmax(s.numpy() / tau, axis=1), softmax(t.numpy() / tau, axis=1)
    inter = 1 - np.mean([pearsonr(y_s[i], y_t[i])[0] for i in range(len(y_s))])
    intra = 1 - np.mean([pearsonr(y_s[:, c], y_t[:, c])[0] for c in range(y_s.shape[1])])
    return tau**2 * (beta * inter + gamma * intra)


# ----------------------------------------------------------------------------- KD


@pytest.mark.parametrize("temperature", [1.0, 4.0])
def test_kd_matches_reference(temperature):
    s, t = logits(6, 10, seed=1), logits(6, 10, seed=2)
    got = KDLoss(temperature=temperature)(s, t)
    assert got.item() == pytest.approx(ref_kd(s, t, temperature), rel=1e-10)


def test_kd_token_logits_mean_over_all_positions():
    s, t = logits(3, 5, 7, seed=3), logits(3, 5, 7, seed=4)
    assert KDLoss(temperature=2.0)(s, t).item() == pytest.approx(ref_kd(s, t, 2.0), rel=1e-10)


def test_kd_identical_inputs_give_zero():
    s = logits(4, 9, seed=5)
    assert KDLoss()(s, s.clone()).item() == pytest.approx(0.0, abs=1e-12)


def test_kd_teacher_is_the_target_distribution():
    # A peaked teacher and a flat student: the two KL directions differ clearly.
    t = torch.tensor([[6.0, 0.0, 0.0, -2.0], [0.0, 5.0, -1.0, 0.0]], dtype=torch.float64)
    s = torch.tensor([[0.5, 0.2, 0.0, 0.1], [0.0, 0.3, 0.2, 0.1]], dtype=torch.float64)
    loss = KDLoss(temperature=1.0)
    forward_kl = np.mean([ref_kl(softmax(t[i].numpy()), softmax(s[i].numpy())) for i in range(2)])
    reverse_kl = np.mean([ref_kl(softmax(s[i].numpy()), softmax(t[i].numpy())) for i in range(2)])
    assert abs(forward_kl - reverse_kl) > 0.1
    assert loss(s, t).item() == pytest.approx(forward_kl, rel=1e-10)
    assert loss(t, s).item() == pytest.approx(reverse_kl, rel=1e-10)
    assert loss(s, t).item() != pytest.approx(loss(t, s).item(), rel=1e-2)


def gradient_norm(loss, s, t):
    s = s.clone().requires_grad_(True)
    loss(s, t).backward()
    return s.grad.norm().item(), s.grad


def test_kd_t_squared_keeps_gradient_scale_across_temperatures():
    s, t = logits(8, 10, seed=6), logits(8, 10, seed=7)
    temperatures = [2.0, 4.0, 8.0, 16.0]
    scaled = [gradient_norm(KDLoss(temperature=T), s, t)[0] for T in temperatures]
    assert max(scaled) / min(scaled) < 2.5
    # Large T: gradient -> (z_s - z_t - class mean) / (C * B), independent of T.
    _, grad = gradient_norm(KDLoss(temperature=16.0), s, t)
    diff = s - t
    limit = (diff - diff.mean(dim=1, keepdim=True)) / (10 * 8)
    assert torch.allclose(grad, limit, rtol=0.15, atol=2e-3)
    # Without T² the gradient shrinks like 1/T (what the factor is there to prevent).
    bare = [n / T**2 for n, T in zip(scaled, temperatures)]
    assert bare[0] / bare[-1] > 30


def test_kd_batch_size_independent():
    s, t = logits(5, 8, seed=8), logits(5, 8, seed=9)
    loss = KDLoss(temperature=3.0)
    doubled = loss(torch.cat([s, s]), torch.cat([t, t]))
    assert doubled.item() == pytest.approx(loss(s, t).item(), rel=1e-12)


def test_kd_mask_drops_positions():
    s, t = logits(3, 6, 11, seed=10), logits(3, 6, 11, seed=11)
    mask = torch.rand(3, 6, generator=torch.Generator().manual_seed(0)) > 0.4
    loss = KDLoss(temperature=2.0)
    got = loss(s, t, mask=mask)
    assert got.item() == pytest.approx(loss(s[mask], t[mask]).item(), rel=1e-12)
    assert got.item() == pytest.approx(ref_kd(s, t, 2.0, mask), rel=1e-10)
    # Whatever sits at the masked positions does not matter.
    s2, t2 = s.clone(), t.clone()
    s2[~mask], t2[~mask] = 1e3, -1e3
    assert loss(s2, t2, mask=mask).item() == pytest.approx(got.item(), rel=1e-12)


def test_kd_reductions():
    s, t = logits(4, 3, 5, seed=12), logits(4, 3, 5, seed=13)
    mask = torch.ones(4, 3, dtype=torch.bool)
    mask[0, 1:] = False
    per_position = KDLoss(temperature=2.0, reduction="none")(s, t, mask=mask)
    assert per_position.shape == (4, 3)
    assert torch.all(per_position[~mask] == 0)
    ref = 4.0 * np.array(
        [ref_kl(softmax(t[i, j].numpy() / 2), softmax(s[i, j].numpy() / 2)) for i in range(4) for j in range(3)]
    )
    assert np.allclose(per_position[mask].numpy(), ref.reshape(4, 3)[mask.numpy()], rtol=1e-10)
    total = KDLoss(temperature=2.0, reduction="sum")(s, t, mask=mask)
    mean = KDLoss(temperature=2.0)(s, t, mask=mask)
    assert total.item() == pytest.approx(mean.item() * int(mask.sum()), rel=1e-12)


def test_kd_gradient_reaches_student_not_teacher():
    s = logits(4, 6, seed=14).requires_grad_(True)
    t = logits(4, 6, seed=15).requires_grad_(True)
    KDLoss()(s, t).backward()
    assert s.grad is not None and s.grad.abs().sum() > 0
    assert t.grad is None or torch.all(t.grad == 0)


def test_kd_shape_mismatch_names_shapes_and_connector():
    with pytest.raises(ShapeMismatchError, match=r"\(2, 5\).*\(2, 7\).*connector"):
        KDLoss()(torch.zeros(2, 5), torch.zeros(2, 7))
    with pytest.raises(ShapeMismatchError, match="mask"):
        KDLoss()(torch.zeros(2, 3, 5), torch.zeros(2, 3, 5), mask=torch.ones(2, 5, dtype=torch.bool))


def test_kd_bad_options():
    with pytest.raises(KDConfigError, match="temperature"):
        KDLoss(temperature=0)
    with pytest.raises(KDConfigError, match="reduction"):
        KDLoss(reduction="mean")


def test_kd_registry_build_and_wrong_key():
    loss = LOSSES.build({"type": "kd", "temperature": 4})
    assert isinstance(loss, KDLoss) and loss.temperature == 4.0
    assert isinstance(LOSSES.build({"type": "hinton"}), KDLoss)
    with pytest.raises(KDConfigError, match="temperature"):
        LOSSES.build({"type": "kd", "temprature": 4})


def test_kd_allows_minus_inf_teacher_logits():
    # Masked vocabulary rows of a teacher: probability 0, contribute nothing.
    s, t = logits(2, 6, seed=16), logits(2, 6, seed=17)
    t_masked = t.clone()
    t_masked[:, -2:] = float("-inf")
    got = KDLoss(temperature=1.0)(s, t_masked)
    p_t = softmax(t[:, :-2].numpy(), axis=1)
    p_t = np.concatenate([p_t, np.zeros((2, 2))], axis=1)
    ref = np.mean([ref_kl(p_t[i], softmax(s[i].numpy())) for i in range(2)])
    assert torch.isfinite(got) and got.item() == pytest.approx(ref, rel=1e-10)


# ----------------------------------------------------------------------------- DKD


@pytest.mark.parametrize("alpha,beta,temperature", [(1.0, 8.0, 4.0), (0.5, 2.0, 1.0)])
def test_dkd_matches_reference(alpha, beta, temperature):
    s, t = logits(6, 9, seed=20), logits(6, 9, seed=21)
    y = labels(6, classes=9, seed=22)
    got = DKDLoss(alpha=alpha, beta=beta, temperature=temperature)(s, t, target=y)
    assert got.item() == pytest.approx(ref_dkd(s, t, y, alpha, beta, temperature), rel=1e-9)


def test_dkd_decomposes_classic_kd():
    # KL(p_t‖p_s) = TCKD + (1 - p_t,y) NCKD (Zhao et al., eq. 7), one sample at a time.
    s, t = logits(4, 7, seed=23), logits(4, 7, seed=24)
    y = labels(4, classes=7, seed=25)
    for i in range(4):
        p_ty = softmax(t[i].numpy() / 2.0)[int(y[i])]
        dkd = DKDLoss(alpha=1.0, beta=1 - p_ty, temperature=2.0)(s[i : i + 1], t[i : i + 1], target=y[i : i + 1])
        kd = KDLoss(temperature=2.0)(s[i : i + 1], t[i : i + 1])
        assert dkd.item() == pytest.approx(kd.item(), rel=1e-9)


def test_dkd_stays_right_for_huge_logits():
    # The authors' fixed -1000 offset would leave the target in the "non-target" softmax here.
    s, t = logits(3, 5, seed=26), logits(3, 5, seed=27)
    y = torch.tensor([0, 2, 4])
    s[torch.arange(3), y] += 5000.0
    t[torch.arange(3), y] += 4000.0
    got = DKDLoss(alpha=0.0, beta=1.0, temperature=1.0)(s, t, target=y)
    assert got.item() == pytest.approx(ref_dkd(s, t, y, 0.0, 1.0, 1.0), rel=1e-9)


def test_dkd_identical_inputs_give_zero():
    s = logits(5, 6, seed=28)
    assert DKDLoss()(s, s.clone(), target=labels(5, classes=6)).item() == pytest.approx(0.0, abs=1e-12)


def test_dkd_needs_target():
    assert DKDLoss.needs_target is True
    with pytest.raises(KDConfigError, match="target"):
        DKDLoss()(logits(2, 4), logits(2, 4, seed=1))


def test_dkd_batch_size_independent_and_ignore_index():
    s, t = logits(5, 8, seed=29), logits(5, 8, seed=30)
    y = labels(5, classes=8, seed=31)
    loss = DKDLoss()
    base = loss(s, t, target=y)
    doubled = loss(torch.cat([s, s]), torch.cat([t, t]), target=torch.cat([y, y]))
    assert doubled.item() == pytest.approx(base.item(), rel=1e-12)
    y_ignored = y.clone()
    y_ignored[[1, 3]] = -100
    keep = torch.tensor([True, False, True, False, True])
    subset = loss(s[keep], t[keep], target=y[keep])
    assert loss(s, t, target=y_ignored).item() == pytest.approx(subset.item(), rel=1e-12)


def test_dkd_token_logits_with_mask():
    s, t = logits(2, 4, 6, seed=32), logits(2, 4, 6, seed=33)
    y = labels(2, 4, classes=6, seed=34)
    mask = torch.tensor([[True, True, False, True], [False, True, True, True]])
    got = DKDLoss(temperature=2.0)(s, t, target=y, mask=mask)
    assert got.item() == pytest.approx(ref_dkd(s[mask], t[mask], y[mask], 1.0, 8.0, 2.0), rel=1e-9)


def test_dkd_gradient_reaches_student_not_teacher():
    s = logits(4, 6, seed=35).requires_grad_(True)
    t = logits(4, 6, seed=36).requires_grad_(True)
    DKDLoss()(s, t, target=labels(4, classes=6)).backward()
    assert torch.isfinite(s.grad).all() and s.grad.abs().sum() > 0
    assert t.grad is None or torch.all(t.grad == 0)


def test_dkd_bad_target():
    with pytest.raises(ShapeMismatchError, match="target"):
        DKDLoss()(logits(3, 4), logits(3, 4, seed=1), target=torch.zeros(3, 4, dtype=torch.long))
    with pytest.raises(KDConfigError, match=r"\[0, 4\)"):
        DKDLoss()(logits(3, 4), logits(3, 4, seed=1), target=torch.tensor([0, 4, 1]))


def test_dkd_registry():
    loss = LOSSES.build({"type": "dkd", "alpha": 2, "beta": 4, "temperature": 1})
    assert isinstance(loss, DKDLoss) and (loss.alpha, loss.beta, loss.temperature) == (2.0, 4.0, 1.0)


# ----------------------------------------------------------------------------- DIST


@pytest.mark.parametrize("beta,gamma,tau", [(1.0, 1.0, 1.0), (2.0, 0.5, 4.0)])
def test_dist_matches_scipy_pearson(beta, gamma, tau):
    s, t = logits(7, 10, seed=40), logits(7, 10, seed=41)
    got = DISTLoss(beta=beta, gamma=gamma, temperature=tau)(s, t)
    assert got.item() == pytest.approx(ref_dist(s, t, beta, gamma, tau), rel=1e-9)


def test_dist_identical_inputs_give_zero():
    s = logits(6, 8, seed=42)
    assert DISTLoss(temperature=2.0)(s, s.clone()).item() == pytest.approx(0.0, abs=1e-12)


def test_dist_depends_on_probabilities_only():
    # A teacher whose logits are the student's plus a per-sample constant has the same
    # probabilities, hence loss 0; an unrelated teacher does not.
    s = logits(5, 6, seed=43)
    shifted = s + torch.arange(5, dtype=s.dtype).unsqueeze(1) * 3
    assert DISTLoss()(s, shifted).item() == pytest.approx(0.0, abs=1e-12)
    assert DISTLoss()(s, logits(5, 6, seed=44)).item() > 0.1


def test_dist_batch_size_independent_and_mask():
    s, t = logits(5, 6, seed=45), logits(5, 6, seed=46)
    loss = DISTLoss(temperature=2.0)
    assert loss(torch.cat([s, s]), torch.cat([t, t])).item() == pytest.approx(loss(s, t).item(), rel=1e-10)
    s3, t3 = logits(2, 4, 6, seed=47), logits(2, 4, 6, seed=48)
    mask = torch.tensor([[True, False, True, True], [True, True, False, True]])
    assert loss(s3, t3, mask=mask).item() == pytest.approx(ref_dist(s3[mask], t3[mask], 1.0, 1.0, 2.0), rel=1e-9)


def test_dist_gradient_reaches_student_not_teacher():
    s = logits(4, 6, seed=49).requires_grad_(True)
    t = logits(4, 6, seed=50).requires_grad_(True)
    DISTLoss()(s, t).backward()
    assert s.grad.abs().sum() > 0
    assert t.grad is None or torch.all(t.grad == 0)


def test_dist_single_row_is_finite():
    s = logits(1, 5, seed=51).requires_grad_(True)
    loss = DISTLoss()(s, logits(1, 5, seed=52))
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(s.grad).all()


def test_dist_registry():
    assert isinstance(LOSSES.build({"type": "dist", "beta": 2, "gamma": 2, "temperature": 4}), DISTLoss)


# ----------------------------------------------------------------------------- logit MSE


def test_logit_mse_matches_reference_and_reductions():
    s, t = logits(4, 3, 6, seed=60), logits(4, 3, 6, seed=61)
    mask = torch.tensor([[True, False, True], [True, True, True], [False, False, True], [True, True, False]])
    sn, tn, keep = s.numpy(), t.numpy(), mask.numpy()
    rows = [(sn[i, j] - tn[i, j]) for i in range(4) for j in range(3) if keep[i, j]]
    sums = [float(np.dot(r, r)) for r in rows]
    assert LogitMSELoss()(s, t, mask=mask).item() == pytest.approx(np.mean(sums) / 6, rel=1e-12)
    assert LogitMSELoss("batchmean")(s, t, mask=mask).item() == pytest.approx(np.mean(sums), rel=1e-12)
    assert LogitMSELoss("sum")(s, t, mask=mask).item() == pytest.approx(np.sum(sums), rel=1e-12)
    assert LogitMSELoss()(s, t).item() == pytest.approx(float(np.mean((sn - tn) ** 2)), rel=1e-12)


def test_logit_mse_zero_batch_and_gradients():
    s, t = logits(3, 5, seed=62), logits(3, 5, seed=63)
    loss = LogitMSELoss()
    assert loss(s, s.clone()).item() == 0.0
    assert loss(torch.cat([s, s]), torch.cat([t, t])).item() == pytest.approx(loss(s, t).item(), rel=1e-12)
    s.requires_grad_(True)
    t.requires_grad_(True)
    loss(s, t).backward()
    assert torch.allclose(s.grad, 2 * (s - t).detach() / s.numel())
    assert t.grad is None or torch.all(t.grad == 0)


def test_logit_mse_registry():
    assert isinstance(LOSSES.build({"type": "logit_mse", "reduction": "batchmean"}), LogitMSELoss)
    with pytest.raises(KDConfigError, match="reduction"):
        LogitMSELoss("batch")


# ----------------------------------------------------------------------------- sigmoid KD


@pytest.mark.parametrize("temperature", [1.0, 3.0])
def test_sigmoid_kd_matches_reference(temperature):
    s, t = logits(5, 4, seed=70), logits(5, 4, seed=71)
    q_s, q_t = expit(s.numpy() / temperature), expit(t.numpy() / temperature)
    bce = -(q_t * np.log(q_s) + (1 - q_t) * np.log(1 - q_s))
    got = SigmoidKDLoss(temperature=temperature)(s, t)
    assert got.item() == pytest.approx(temperature**2 * bce.mean(), rel=1e-10)


def test_sigmoid_kd_identical_inputs_minimum_is_teacher_entropy():
    t = logits(3, 4, seed=72)
    s = t.clone().requires_grad_(True)
    loss = SigmoidKDLoss(temperature=2.0)(s, t)
    q = expit(t.numpy() / 2.0)
    entropy = -(q * np.log(q) + (1 - q) * np.log(1 - q))
    assert loss.item() == pytest.approx(4.0 * entropy.mean(), rel=1e-10)
    loss.backward()
    assert s.grad.abs().max().item() < 1e-12


def test_sigmoid_kd_batch_mask_gradient_registry():
    s, t = logits(2, 3, 4, seed=73), logits(2, 3, 4, seed=74)
    loss = LOSSES.build({"type": "bce_kd", "temperature": 2})
    assert isinstance(loss, SigmoidKDLoss) and isinstance(LOSSES.build("sigmoid_kd"), SigmoidKDLoss)
    assert loss(torch.cat([s, s]), torch.cat([t, t])).item() == pytest.approx(loss(s, t).item(), rel=1e-12)
    mask = torch.tensor([[True, False, True], [False, True, True]])
    assert loss(s, t, mask=mask).item() == pytest.approx(loss(s[mask], t[mask]).item(), rel=1e-12)
    s.requires_grad_(True)
    t.requires_grad_(True)
    loss(s, t).backward()
    assert s.grad.abs().sum() > 0 and (t.grad is None or torch.all(t.grad == 0))


def test_every_logit_loss_rejects_shape_mismatch():
    for loss, extra in [
        (KDLoss(), {}),
        (DKDLoss(), {"target": torch.zeros(2, dtype=torch.long)}),
        (DISTLoss(), {}),
        (LogitMSELoss(), {}),
        (SigmoidKDLoss(), {}),
    ]:
        with pytest.raises(ShapeMismatchError, match="connector"):
            loss(torch.zeros(2, 5), torch.zeros(2, 6), **extra)


# ----------------------------------------------------------------------------- KD divergences and logit standardisation


def ref_divergence(p_t, p_s, divergence, beta=0.5):
    """Each divergence written from its definition with scipy's rel_entr (independent of the torch code)."""
    if divergence == "kl":
        return ref_kl(p_t, p_s)
    if divergence == "reverse_kl":
        return ref_kl(p_s, p_t)
    if divergence == "tv":
        return 0.5 * float(np.abs(p_t - p_s).sum())
    m = beta * p_t + (1 - beta) * p_s
    return beta * ref_kl(p_t, m) + (1 - beta) * ref_kl(p_s, m)


def ref_standardize(z):
    """The authors' normalize(): (z - mean) / (1e-7 + std), std with Bessel's correction (torch.std)."""
    return (z - z.mean(-1, keepdims=True)) / (1e-7 + z.std(-1, ddof=1, keepdims=True))


@pytest.mark.parametrize("divergence,beta", [("kl", 0.5), ("reverse_kl", 0.5), ("jsd", 0.5), ("jsd", 0.1), ("tv", 0.5)])
@pytest.mark.parametrize("standardize", [False, True])
def test_kd_divergences_match_their_formulas(divergence, beta, standardize):
    s, t = logits(5, 7, seed=21), logits(5, 7, seed=22)
    temperature = 2.0
    got = KDLoss(temperature=temperature, divergence=divergence, beta=beta, standardize=standardize)(s, t)
    s_np, t_np = s.numpy(), t.numpy()
    if standardize:
        s_np, t_np = ref_standardize(s_np), ref_standardize(t_np)
    want = np.mean([temperature**2 * ref_divergence(softmax(t_np[i] / temperature), softmax(s_np[i] / temperature),
                                                     divergence, beta) for i in range(len(s_np))])
    assert got.item() == pytest.approx(want, rel=1e-9)


def test_divergence_properties_and_gradients():
    s, t = logits(4, 6, seed=31), logits(4, 6, seed=32)
    for divergence in ("kl", "reverse_kl", "jsd", "tv"):
        loss = KDLoss(temperature=1.0, divergence=divergence)
        assert loss(t.clone(), t).item() == pytest.approx(0.0, abs=1e-12)  # zero at the target
        student = s.clone().requires_grad_(True)
        teacher = t.clone().requires_grad_(True)
        loss(student, teacher).backward()
        assert student.grad is not None and float(student.grad.abs().sum()) > 0
        assert teacher.grad is None  # the teacher is a target
    # symmetric JSD is symmetric and bounded by log 2; TV is in [0, 1]; reverse KL swaps the arguments
    jsd = KDLoss(temperature=1.0, divergence="jsd", beta=0.5)
    assert jsd(s, t).item() == pytest.approx(jsd(t, s).item(), rel=1e-12)
    assert 0 < jsd(s * 20, t * 20).item() <= np.log(2) + 1e-12
    assert 0 < KDLoss(temperature=1.0, divergence="tv")(s * 20, t * 20).item() <= 1
    assert KDLoss(temperature=1.0, divergence="reverse_kl")(s, t).item() == pytest.approx(
        KDLoss(temperature=1.0)(t, s).item(), rel=1e-12)


def test_standardisation_is_invariant_to_shift_and_scale_of_either_model():
    s, t = logits(6, 10, seed=41), logits(6, 10, seed=42)
    loss = KDLoss(temperature=2.0, standardize=True)
    assert loss(3 * s + 5, 0.5 * t - 2).item() == pytest.approx(loss(s, t).item(), rel=1e-6)  # up to the 1e-7 eps
    assert KDLoss(temperature=2.0)(3 * s + 5, t).item() != pytest.approx(KDLoss(temperature=2.0)(s, t).item())


def test_dkd_with_standardisation_is_dkd_on_z_scores():
    s, t, y = logits(6, 5, seed=51), logits(6, 5, seed=52), labels(6, classes=5, seed=53)
    got = DKDLoss(alpha=1.0, beta=2.0, temperature=2.0, standardize=True)(s, t, target=y)
    want = ref_dkd(torch.from_numpy(ref_standardize(s.numpy())), torch.from_numpy(ref_standardize(t.numpy())), y,
                   1.0, 2.0, 2.0)
    assert got.item() == pytest.approx(want, rel=1e-9)


def test_bad_divergence_options_are_named():
    with pytest.raises(KDConfigError, match="divergence"):
        KDLoss(divergence="hellinger")
    with pytest.raises(KDConfigError, match="beta"):
        KDLoss(divergence="jsd", beta=1.0)
    with pytest.raises(KDConfigError, match="finite"):
        KDLoss(standardize=True)(logits(2, 3), torch.tensor([[0.0, float("-inf"), 1.0]] * 2, dtype=torch.float64))
    assert LOSSES.build({"type": "kd", "divergence": "tv", "temperature": 1.0}).divergence == "tv"
