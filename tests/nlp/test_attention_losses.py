"""Transformer-internal losses (kd_tasks.shared.losses.attention) against independent loop/numpy formulas."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from kd_tasks.shared.errors import KDConfigError, ShapeMismatchError
from kd_tasks.shared.losses.attention import AttentionKLLoss, AttentionMSELoss, RelationKLLoss, attention_scores
from kd_tasks.shared.losses.feature import FeatureLoss
from kd_tasks.shared.registry import LOSSES

MASK = np.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 1, 0, 0, 0]], dtype=bool)


def np_softmax(x):
    e = np.exp(x - x.max())
    return e / e.sum()


def np_kl(p, q):
    return float(sum(pi * (math.log(pi) - math.log(qi)) for pi, qi in zip(p, q) if pi > 0))


def heads_of(x, heads):
    """(L, D) numpy -> list of (L, D/heads) column blocks, one per head."""
    d = x.shape[1] // heads
    return [x[:, a * d : (a + 1) * d] for a in range(heads)]


def loop_relation_kl(s, t, heads, mask):
    """MiniLMv2 relation KL by explicit loops over samples, heads and kept query tokens."""
    total, count = 0.0, 0
    for b in range(s.shape[0]):
        keep = np.flatnonzero(mask[b])
        sb, tb = s[b][keep], t[b][keep]
        for hs, ht in zip(heads_of(sb, heads), heads_of(tb, heads)):
            for i in range(len(keep)):
                p_t = np_softmax(np.array([ht[i] @ ht[j] for j in range(len(keep))]) / math.sqrt(ht.shape[1]))
                p_s = np_softmax(np.array([hs[i] @ hs[j] for j in range(len(keep))]) / math.sqrt(hs.shape[1]))
                total += np_kl(p_t, p_s)
        count += len(keep)
    return total / (count * heads)


def t64(x):
    return torch.tensor(x, dtype=torch.float64)


def test_relation_kl_matches_loops_with_different_widths_and_heads():
    rng = np.random.default_rng(0)
    s, t = rng.normal(size=(3, 5, 8)), rng.normal(size=(3, 5, 12))  # student 8 wide, teacher 12 wide
    for heads in (1, 2, 4):
        got = RelationKLLoss(relation_heads=heads)(t64(s), t64(t), mask=torch.tensor(MASK))
        assert got.item() == pytest.approx(loop_relation_kl(s, t, heads, MASK), rel=1e-9)
    full = np.ones_like(MASK)
    assert RelationKLLoss(2)(t64(s), t64(t)).item() == pytest.approx(loop_relation_kl(s, t, 2, full), rel=1e-9)


def test_attention_kl_scores_and_probs_match_loops():
    rng = np.random.default_rng(1)
    q_s, k_s, q_t, k_t = (rng.normal(size=(3, 5, 6)) for _ in range(4))
    heads = 2
    expected, count = 0.0, 0
    for b in range(3):
        keep = np.flatnonzero(MASK[b])
        for a in range(heads):
            sl = slice(a * 3, (a + 1) * 3)
            for i in keep:
                p_s = np_softmax(np.array([q_s[b, i, sl] @ k_s[b, j, sl] for j in keep]) / math.sqrt(3))
                p_t = np_softmax(np.array([q_t[b, i, sl] @ k_t[b, j, sl] for j in keep]) / math.sqrt(3))
                expected += np_kl(p_t, p_s)
        count += len(keep)
    expected /= count * heads
    s_scores = attention_scores(t64(q_s), t64(k_s), heads)
    t_scores = attention_scores(t64(q_t), t64(k_t), heads)
    mask = torch.tensor(MASK)
    assert AttentionKLLoss()(s_scores, t_scores, mask=mask).item() == pytest.approx(expected, rel=1e-9)
    # probabilities as HF returns them: softmax with padded keys at zero
    additive = torch.where(mask, 0.0, float("-inf"))[:, None, None, :].double()
    s_probs, t_probs = (s_scores + additive).softmax(-1), (t_scores + additive).softmax(-1)
    got = AttentionKLLoss(inputs="probs")(s_probs, t_probs, mask=mask)
    assert got.item() == pytest.approx(expected, rel=1e-7)


def test_attention_mse_matches_loops():
    rng = np.random.default_rng(2)
    s, t = rng.normal(size=(3, 2, 5, 5)), rng.normal(size=(3, 2, 5, 5))
    rows = []
    for b in range(3):
        keep = np.flatnonzero(MASK[b])
        for a in range(2):
            for i in keep:
                rows.append(np.mean([(s[b, a, i, j] - t[b, a, i, j]) ** 2 for j in keep]))
    # each sample contributes heads x kept rows; the mean over them all
    expected = float(np.mean(rows))
    got = AttentionMSELoss()(t64(s), t64(t), mask=torch.tensor(MASK))
    assert got.item() == pytest.approx(expected, rel=1e-9)
    # without a mask: the plain MSE over every entry (the paper's formula)
    assert AttentionMSELoss()(t64(s), t64(t)).item() == pytest.approx(float(((s - t) ** 2).mean()), rel=1e-9)


def test_hidden_state_terms_match_tinybert_and_distilbert_formulas():
    """The trainer's hidden-state terms use the generic feature loss with a token mask."""
    rng = np.random.default_rng(3)
    s, t = rng.normal(size=(3, 5, 4)), rng.normal(size=(3, 5, 4))
    kept_s, kept_t = s[MASK], t[MASK]  # (kept tokens, 4)
    mse = float(((kept_s - kept_t) ** 2).mean())
    cos = [1 - a @ b / (np.linalg.norm(a) * np.linalg.norm(b)) for a, b in zip(kept_s, kept_t)]
    mask = torch.tensor(MASK)
    assert FeatureLoss("mse")(t64(s), t64(t), mask=mask).item() == pytest.approx(mse, rel=1e-9)
    assert FeatureLoss("cosine")(t64(s), t64(t), mask=mask).item() == pytest.approx(float(np.mean(cos)), rel=1e-9)
    # same as torch's CosineEmbeddingLoss with target 1, as DistilBERT uses it
    ref = torch.nn.CosineEmbeddingLoss()(t64(kept_s), t64(kept_t), torch.ones(len(kept_s)))
    assert FeatureLoss("cosine")(t64(s), t64(t), mask=mask).item() == pytest.approx(ref.item(), rel=1e-9)


@pytest.mark.parametrize(
    "loss, shape",
    [
        (AttentionMSELoss(), (3, 2, 5, 5)),
        (AttentionKLLoss(), (3, 2, 5, 5)),
        (RelationKLLoss(2), (3, 5, 4)),
    ],
)
def test_identical_inputs_give_zero_and_padding_is_ignored(loss, shape):
    x = torch.randn(*shape, dtype=torch.float64)
    mask = torch.tensor(MASK)
    assert loss(x, x.clone(), mask=mask).item() == pytest.approx(0.0, abs=1e-12)
    # changing padded positions (as queries and as keys) changes nothing
    y = torch.randn(*shape, dtype=torch.float64)
    y2 = y.clone()
    if len(shape) == 3:
        y2[~mask] = 100.0
    else:
        y2[~mask[:, None, :, None].expand(shape)] = 100.0
        y2[~mask[:, None, None, :].expand(shape)] = -100.0
    assert loss(x, y, mask=mask).item() == pytest.approx(loss(x, y2, mask=mask).item(), rel=1e-12)


@pytest.mark.parametrize(
    "loss, shape",
    [
        (AttentionMSELoss(), (2, 3, 4, 4)),
        (AttentionKLLoss(), (2, 3, 4, 4)),
        (RelationKLLoss(3), (2, 4, 6)),
    ],
)
def test_batch_size_independent_and_gradients_reach_student_only(loss, shape):
    s = torch.randn(*shape, dtype=torch.float64, requires_grad=True)
    t = torch.randn(*shape, dtype=torch.float64, requires_grad=True)
    one = loss(s, t)
    doubled = loss(torch.cat([s, s]), torch.cat([t, t]))
    assert doubled.item() == pytest.approx(one.item(), rel=1e-12)
    one.backward()
    assert s.grad is not None and s.grad.abs().sum() > 0
    assert t.grad is None


def test_sum_reduction_is_mean_times_kept_tokens():
    s, t = torch.randn(3, 5, 4, dtype=torch.float64), torch.randn(3, 5, 4, dtype=torch.float64)
    mask = torch.tensor(MASK)
    kept = int(mask.sum())
    rel_sum = RelationKLLoss(2, reduction="sum")(s, t, mask)
    assert rel_sum.item() == pytest.approx(kept * RelationKLLoss(2)(s, t, mask).item())


def test_shape_errors_name_the_fix():
    with pytest.raises(ShapeMismatchError, match="attention_relation"):
        AttentionKLLoss()(torch.randn(2, 2, 3, 3), torch.randn(2, 4, 3, 3))
    with pytest.raises(KDConfigError, match="heads"):
        RelationKLLoss(3)(torch.randn(2, 3, 4), torch.randn(2, 3, 6))
    with pytest.raises(ShapeMismatchError, match="token"):
        RelationKLLoss(2)(torch.randn(2, 3, 4), torch.randn(2, 5, 4))


def test_registered_names_build():
    assert isinstance(LOSSES.build({"type": "minilmv2", "relation_heads": 4}), RelationKLLoss)
    assert isinstance(LOSSES.build("tinybert_attention"), AttentionMSELoss)
    assert isinstance(LOSSES.build("minilm_attention"), AttentionKLLoss)
    with pytest.raises(KDConfigError, match="relation_heads"):
        LOSSES.build({"type": "minilmv2", "relation_head": 4})
