"""Relational losses (RKD, SP, PKT, CC, IRG, CRD) against independent formulas written with loops."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch

from kd_tasks.shared.errors import KDConfigError, ShapeMismatchError
from kd_tasks.shared.losses.relational import CCLoss, CRDLoss, IRGLoss, PKTLoss, RKDLoss, SPLoss
from kd_tasks.shared.registry import LOSSES
from loss_refs import assert_grad_reaches_student_only, huber, rand


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


# ----------------------------------------------------------------------------- RKD


def unit(v):
    n = np.linalg.norm(v)
    return v / n if n > 0 else np.zeros_like(v)


def rkd_reference(s, t, reduction, w_d=25.0, w_a=50.0):
    """RKD from explicit loops over pairs and triplets (angle at the middle index, paper notation)."""
    b = len(s)

    def distances(x):
        pairs = [(i, j) for i in range(b) for j in range(b) if i != j]
        mu = np.mean([np.linalg.norm(x[i] - x[j]) for i, j in pairs])
        return {(i, j): np.linalg.norm(x[i] - x[j]) / mu for i in range(b) for j in range(b)}

    def angle(x, i, j, k):
        return float(unit(x[i] - x[j]) @ unit(x[k] - x[j]))

    ds, dt = distances(s), distances(t)
    if reduction == "paper":
        pairs = list(itertools.permutations(range(b), 2))
        triplets = list(itertools.permutations(range(b), 3))
    else:
        pairs = list(itertools.product(range(b), repeat=2))
        triplets = list(itertools.product(range(b), repeat=3))
    dist_term = np.mean([huber(ds[p] - dt[p]) for p in pairs])
    angle_term = np.mean([huber(angle(s, *tr) - angle(t, *tr)) for tr in triplets]) if triplets else 0.0
    return w_d * dist_term + w_a * angle_term


@pytest.mark.parametrize("reduction", ["paper", "code"])
def test_rkd_matches_loops(reduction):
    s, t = rand(6, 5) * 3, rand(6, 8) + 2.0
    expected = rkd_reference(s.numpy(), t.numpy(), reduction)
    assert RKDLoss(reduction=reduction)(s, t).item() == pytest.approx(expected, rel=1e-8)


def test_rkd_terms_separately_and_flattening():
    s, t = rand(5, 2, 3), rand(5, 4)
    sf = s.reshape(5, -1).numpy()
    distance_only = rkd_reference(sf, t.numpy(), "paper", w_a=0)
    angle_only = rkd_reference(sf, t.numpy(), "paper", w_d=0)
    assert RKDLoss(angle_weight=0)(s, t).item() == pytest.approx(distance_only, rel=1e-8)
    assert RKDLoss(distance_weight=0)(s, t).item() == pytest.approx(angle_only, rel=1e-8)


def test_rkd_far_from_origin_keeps_precision():
    s, t = rand(5, 4).float() * 0.01 + 100.0, rand(5, 4).float()
    expected = rkd_reference(s.double().numpy(), t.double().numpy(), "paper")
    assert RKDLoss()(s, t).item() == pytest.approx(expected, rel=1e-3)


def test_rkd_invariant_to_scaling_and_translating_the_student():
    s, t = rand(7, 6), rand(7, 6)
    base = RKDLoss()(s, t).item()
    assert RKDLoss(angle_weight=0)(s * 13.7, t).item() == pytest.approx(RKDLoss(angle_weight=0)(s, t).item(), rel=1e-9)
    assert RKDLoss()(s * 0.01 + 5.0, t).item() == pytest.approx(base, rel=1e-7)


def test_rkd_identical_is_zero_and_tiny_batches_are_finite():
    x = rand(6, 4)
    assert RKDLoss()(x, x.clone()).item() == pytest.approx(0.0, abs=1e-12)
    for reduction in ("paper", "code"):
        for b in (1, 2):
            s = rand(b, 4).requires_grad_(True)
            loss = RKDLoss(reduction=reduction)(s, rand(b, 4))
            assert torch.isfinite(loss)
            loss.backward()
            assert torch.isfinite(s.grad).all()
        one = RKDLoss(reduction=reduction)(rand(1, 4), rand(1, 4))
        assert one.item() == 0.0


def test_rkd_b2_has_only_the_distance_term():
    s, t = rand(2, 3), rand(2, 3)
    assert RKDLoss()(s, t).item() == pytest.approx(RKDLoss(angle_weight=0)(s, t).item())


def test_rkd_gradients_finite_with_duplicate_samples_and_never_teacher():
    s = rand(5, 4)
    s[1] = s[0]
    s.requires_grad_(True)
    RKDLoss()(s, rand(5, 4)).backward()
    assert torch.isfinite(s.grad).all()
    assert_grad_reaches_student_only(RKDLoss(), rand(6, 4), rand(6, 9))


# ----------------------------------------------------------------------------- SP


def sp_reference(s, t):
    b = len(s)

    def g(a):
        m = np.array([[a[i] @ a[j] for j in range(b)] for i in range(b)])
        return np.array([row / np.linalg.norm(row) for row in m])

    return np.sum((g(s) - g(t)) ** 2) / b**2


def test_sp_matches_loops_and_row_l2_normalisation():
    s, t = rand(5, 2, 3, 3), rand(5, 7)
    expected = sp_reference(s.reshape(5, -1).numpy(), t.numpy())
    assert SPLoss()(s, t).item() == pytest.approx(expected, rel=1e-10)


def test_sp_identical_zero_scale_invariant_and_gradients():
    s, t = rand(6, 5), rand(6, 3)
    assert SPLoss()(s, s.clone()).item() == pytest.approx(0.0, abs=1e-14)
    assert SPLoss()(s * 9.5, t).item() == pytest.approx(SPLoss()(s, t).item(), rel=1e-10)
    assert_grad_reaches_student_only(SPLoss(), s, t)


# ----------------------------------------------------------------------------- PKT


def pkt_reference(s, t, reduction, eps=1e-7):
    b = len(s)

    def probs(x):
        k = np.array([[(unit(x[i]) @ unit(x[j]) + 1) / 2 for j in range(b)] for i in range(b)])
        if reduction == "paper":
            np.fill_diagonal(k, 0.0)
        return k / k.sum(axis=1, keepdims=True)

    ps, pt = probs(s), probs(t)
    terms = pt * np.log((pt + eps) / (ps + eps))
    return terms.sum(axis=1).mean() if reduction == "paper" else terms.mean()


@pytest.mark.parametrize("reduction", ["paper", "code"])
def test_pkt_matches_loops(reduction):
    s, t = rand(6, 4), rand(6, 9)
    expected = pkt_reference(s.numpy(), t.numpy(), reduction)
    assert PKTLoss(reduction=reduction)(s, t).item() == pytest.approx(expected, rel=1e-5)


def test_pkt_identical_zero_per_sample_scale_invariant_b1_and_gradients():
    s, t = rand(6, 4), rand(6, 5)
    assert PKTLoss()(s, s.clone()).item() == pytest.approx(0.0, abs=1e-12)
    scales = torch.rand(6, 1, dtype=torch.float64) * 10 + 0.1
    assert PKTLoss()(s * scales, t).item() == pytest.approx(PKTLoss()(s, t).item(), rel=1e-5)
    assert PKTLoss()(rand(1, 4), rand(1, 4)).item() == 0.0
    assert_grad_reaches_student_only(PKTLoss(), s, t)


# ----------------------------------------------------------------------------- CC


def gaussian_taylor(a, b, gamma, order):
    return sum(math.exp(-2 * gamma) * (2 * gamma) ** p / math.factorial(p) * (a @ b) ** p for p in range(order + 1))


def cc_reference(s, t, kernel_fn):
    b = len(s)
    cs = np.array([[kernel_fn(s[i], s[j]) for j in range(b)] for i in range(b)])
    ct = np.array([[kernel_fn(t[i], t[j]) for j in range(b)] for i in range(b)])
    return np.sum((cs - ct) ** 2) / b**2


def test_cc_matches_loops_for_both_kernels():
    s, t = rand(5, 6), rand(5, 3)
    sn = np.array([unit(v) for v in s.numpy()])
    tn = np.array([unit(v) for v in t.numpy()])
    expected = cc_reference(sn, tn, lambda a, b: gaussian_taylor(a, b, 0.4, 2))
    assert CCLoss()(s, t).item() == pytest.approx(expected, rel=1e-10)
    expected_bilinear = cc_reference(sn, tn, lambda a, b: a @ b)
    assert CCLoss(kernel="bilinear")(s, t).item() == pytest.approx(expected_bilinear, rel=1e-10)
    raw = cc_reference(s.numpy(), t.numpy(), lambda a, b: a @ b)
    assert CCLoss(kernel="bilinear", normalize=False)(s, t).item() == pytest.approx(raw, rel=1e-10)


def test_cc_high_order_expansion_approaches_the_exact_gaussian():
    s, t = rand(5, 6), rand(5, 6)
    gamma = 0.4
    sn = np.array([unit(v) for v in s.numpy()])
    tn = np.array([unit(v) for v in t.numpy()])
    exact = cc_reference(sn, tn, lambda a, b: math.exp(-gamma * np.sum((a - b) ** 2)))
    assert CCLoss(gamma=gamma, order=20)(s, t).item() == pytest.approx(exact, rel=1e-8)


def test_cc_identical_zero_and_gradients():
    s, t = rand(5, 6), rand(5, 3)
    assert CCLoss()(s, s.clone()).item() == pytest.approx(0.0, abs=1e-14)
    assert_grad_reaches_student_only(CCLoss(), s, t)


# ----------------------------------------------------------------------------- IRG


def irg_reference(s, t, squared=True, normalization="max", w_v=1.0, w_e=1.0):
    b = len(s)

    def edges(x):
        d = np.array([[np.sum((x[i] - x[j]) ** 2) for j in range(b)] for i in range(b)])
        if not squared:
            d = np.sqrt(d)
        scale = d.max() if normalization == "max" else d[~np.eye(b, dtype=bool)].mean()
        return d / scale

    vertex = np.mean((s - t) ** 2) if w_v else 0.0
    return w_v * vertex + w_e * np.mean((edges(s.reshape(b, -1)) - edges(t.reshape(b, -1))) ** 2)


@pytest.mark.parametrize("squared", [True, False])
@pytest.mark.parametrize("normalization", ["max", "mean"])
def test_irg_matches_loops(squared, normalization):
    s, t = rand(6, 5), rand(6, 5) * 2
    loss = IRGLoss(vertex_weight=0.5, edge_weight=3.0, squared=squared, normalization=normalization)
    expected = irg_reference(s.numpy(), t.numpy(), squared, normalization, 0.5, 3.0)
    assert loss(s, t).item() == pytest.approx(expected, rel=1e-9)


def test_irg_vertex_needs_same_shape_edge_alone_does_not():
    s, t = rand(4, 5), rand(4, 9)
    with pytest.raises(ShapeMismatchError) as err:
        IRGLoss()(s, t)
    assert "(4, 5)" in str(err.value) and "(4, 9)" in str(err.value) and "linear" in str(err.value)
    expected = irg_reference(s.numpy(), t.numpy(), w_v=0.0)
    assert IRGLoss(vertex_weight=0)(s, t).item() == pytest.approx(expected, rel=1e-9)


def test_irg_identical_zero_and_gradients():
    s, t = rand(5, 4), rand(5, 4)
    assert IRGLoss()(s, s.clone()).item() == pytest.approx(0.0, abs=1e-14)
    assert_grad_reaches_student_only(IRGLoss(), s, t)


# ----------------------------------------------------------------------------- batch-size scale


@pytest.mark.parametrize("loss_fn", [RKDLoss(), PKTLoss(), CCLoss(), IRGLoss(vertex_weight=0)])
def test_relational_values_do_not_grow_with_the_batch(loss_fn):
    # averages over pairs / triplets / rows: the scale stays put (SP's paper normalisation 1/B² of
    # row-normalised matrices shrinks with B by design, so it is not included)
    def average(b):
        return np.mean([loss_fn(rand(b, 16), rand(b, 16)).item() for _ in range(4)])

    ratio = average(48) / average(8)
    assert 1 / 3 < ratio < 3


def test_relational_shape_errors_name_both_shapes():
    for loss_fn in (RKDLoss(), SPLoss(), PKTLoss(), CCLoss()):
        with pytest.raises(ShapeMismatchError, match=r"\(4, 3\).*\(5, 3\)"):
            loss_fn(rand(4, 3), rand(5, 3))


# ----------------------------------------------------------------------------- CRD


def toy_crd(**kw):
    return CRDLoss(num_data=20, student_dim=6, teacher_dim=5, embed_dim=4, num_negatives=7, **kw)


def head(linear, x):
    """Normalised embedding from the head's weights, computed with numpy."""
    e = x.detach().double().numpy() @ linear.weight.detach().double().numpy().T + linear.bias.detach().double().numpy()
    return e / np.linalg.norm(e, axis=1, keepdims=True)


def test_crd_sampler_excludes_the_positive_and_covers_the_rest():
    crd = CRDLoss(num_data=6, student_dim=2, teacher_dim=2, num_negatives=3000)
    index = torch.tensor([0, 3, 5])
    neg = crd.sample_negatives(index)
    assert neg.shape == (3, 3000)
    for row, i in enumerate(index.tolist()):
        assert set(neg[row].tolist()) == set(range(6)) - {i}


@pytest.mark.parametrize("objective", ["nce", "softmax"])
def test_crd_value_matches_formula_and_memory_updates(objective):
    crd = toy_crd(objective=objective)
    s, t = torch.randn(3, 6), torch.randn(3, 5)
    index = torch.tensor([2, 7, 11])
    negatives = torch.tensor([[0, 1, 3], [4, 5, 6], [12, 13, 19]])
    mem_s = crd.memory_student.vectors.clone().double().numpy()
    mem_t = crd.memory_teacher.vectors.clone().double().numpy()
    v_s, v_t = head(crd.embed_student, s), head(crd.embed_teacher, t)
    value = crd(s, t, index=index, contrast_index=negatives)

    candidates = np.concatenate([index.numpy()[:, None], negatives.numpy()], axis=1)
    n, k, tau = 20, 3, 0.07
    expected = 0.0
    for anchors, bank in ((v_s, mem_t), (v_t, mem_s)):
        logits = np.array([[anchors[b] @ bank[c] / tau for c in candidates[b]] for b in range(3)])
        if objective == "softmax":
            expected += np.mean([-(logits[b, 0] - np.log(np.sum(np.exp(logits[b])))) for b in range(3)])
        else:
            z = np.exp(logits).mean() * n  # estimated on this first batch
            p = np.exp(logits) / z
            total = 0.0
            for b in range(3):
                total += np.log(p[b, 0] / (p[b, 0] + k / n + 1e-7))
                total += sum(np.log((k / n) / (p[b, j] + k / n + 1e-7)) for j in range(1, k + 1))
            expected += -total / 3
    assert value.item() == pytest.approx(expected, rel=1e-4)

    # momentum update of the rows at `index` only, back to unit length
    for bank, old, v in ((crd.memory_student, mem_s, v_s), (crd.memory_teacher, mem_t, v_t)):
        new = bank.vectors.double().numpy()
        for row, i in enumerate(index.tolist()):
            mixed = 0.5 * old[i] + 0.5 * v[row]
            np.testing.assert_allclose(new[i], mixed / np.linalg.norm(mixed), rtol=1e-5, atol=1e-6)
        others = [i for i in range(20) if i not in index.tolist()]
        np.testing.assert_array_equal(new[others], old[others])


def test_crd_z_is_fixed_after_the_first_batch_and_eval_leaves_memory():
    crd = toy_crd()
    s, t, index = torch.randn(4, 6), torch.randn(4, 5), torch.tensor([0, 1, 2, 3])
    crd.eval()  # a dry run (e.g. the distiller's prepare) sets nothing
    assert torch.isfinite(crd(s, t, index=index))
    assert crd.memory_student.z.item() == -1.0 and crd.memory_teacher.z.item() == -1.0
    crd.train()
    crd(s, t, index=index)
    z = crd.memory_student.z.item()
    assert z > 0 and crd.memory_teacher.z.item() > 0
    crd(torch.randn(4, 6), torch.randn(4, 5), index=torch.tensor([4, 5, 6, 7]))
    assert crd.memory_student.z.item() == z
    assert "memory_student.z" in crd.state_dict()
    crd.eval()
    before = crd.memory_student.vectors.clone()
    crd(s, t, index=index)
    assert torch.equal(before, crd.memory_student.vectors)


def test_crd_gradients_reach_student_and_heads_never_teacher():
    crd = LOSSES.build({"type": "crd", "num_data": 20, "embed_dim": 4, "num_negatives": 5})  # lazy heads
    assert CRDLoss.needs_index is True
    s = torch.randn(4, 6, requires_grad=True)
    t = torch.randn(4, 2, 3, requires_grad=True)
    loss = crd(s, t, index=torch.tensor([3, 4, 5, 6]))
    assert torch.isfinite(loss)
    loss.backward()
    assert s.grad is not None and s.grad.abs().sum() > 0
    assert t.grad is None
    assert crd.embed_teacher.weight.shape == (4, 6)
    assert all(p.grad is not None for p in crd.parameters())


def test_crd_index_errors():
    crd = toy_crd()
    with pytest.raises(KDConfigError, match="index"):
        crd(torch.randn(2, 6), torch.randn(2, 5))
    with pytest.raises(KDConfigError, match=r"\[0, 20\)"):
        crd(torch.randn(2, 6), torch.randn(2, 5), index=torch.tensor([3, 20]))
    with pytest.raises(ShapeMismatchError):
        crd(torch.randn(2, 6), torch.randn(2, 5), index=torch.tensor([1, 2, 3]))


@pytest.mark.parametrize("objective", ["nce", "softmax"])
def test_crd_loss_decreases_on_a_toy_problem(objective):
    n = 32
    inputs = torch.randn(n, 8)
    teacher_features = torch.tanh(inputs @ torch.randn(8, 12))  # a fixed "teacher"
    student = torch.nn.Linear(8, 10)
    crd = CRDLoss(num_data=n, student_dim=10, teacher_dim=12, embed_dim=16, num_negatives=16, objective=objective)
    opt = torch.optim.Adam([*student.parameters(), *crd.parameters()], lr=0.05)
    losses = []
    for step in range(40):
        index = torch.randperm(n)[:16]
        loss = crd(student(inputs[index]), teacher_features[index], index=index)
        assert torch.isfinite(loss)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert np.mean(losses[-5:]) < 0.8 * np.mean(losses[:5])


def test_registered_names():
    for name in ["rkd", "sp", "similarity_preserving", "pkt", "cc", "correlation_congruence", "irg", "crd"]:
        assert name in LOSSES
    assert LOSSES.build({"type": "rkd", "reduction": "code"}).reduction == "code"


@pytest.mark.parametrize("loss_fn", [RKDLoss(), SPLoss(), PKTLoss(), CCLoss(), IRGLoss()])
def test_low_precision_teacher_is_compared_in_the_students_dtype(loss_fn):
    s, t = torch.randn(6, 5), torch.randn(6, 5).bfloat16()
    value = loss_fn(s, t)
    assert value.dtype == torch.float32
    assert value.item() == loss_fn(s, t.float()).item()


def test_crd_accepts_a_low_precision_teacher():
    s, t = torch.randn(3, 6), torch.randn(3, 5).bfloat16()
    index, negatives = torch.tensor([0, 1, 2]), torch.tensor([[3, 4, 5, 6, 7, 8, 9]] * 3)
    crd = toy_crd().eval()
    assert crd(s, t, index=index, contrast_index=negatives).item() == pytest.approx(
        crd(s, t.float(), index=index, contrast_index=negatives).item()
    )
