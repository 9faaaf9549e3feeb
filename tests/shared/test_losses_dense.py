"""Dense-prediction losses (PKD, MGD, FGD, dense logit KD, LD) against explicit loops, plus properties."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from kd_tasks.shared.errors import KDConfigError, ShapeMismatchError
from kd_tasks.shared.losses.dense import (DenseKDLoss, FGDLoss, LDLoss, MGDLoss, PKDLoss, boxes_to_mask,
                                          fgd_masks)
from kd_tasks.shared.registry import LOSSES


def maps(*shape, seed=0, dtype=torch.float64, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=dtype) * scale


def softmax_list(values, temperature=1.0):
    top = max(values)
    e = [math.exp((v - top) / temperature) for v in values]
    return [x / sum(e) for x in e]


def sigmoid(z):
    return 1.0 / (1.0 + math.exp(-z))


# Boxes on a padded input of 32 x 40 pixels; a 4 x 5 map has stride 8.
INPUT_SHAPE = (32, 40)
BOXES = [
    torch.tensor([[3.0, 5.0, 17.0, 20.0], [0.0, 0.0, 8.0, 8.0]], dtype=torch.float64),
    torch.tensor([[20.0, 10.0, 40.0, 32.0]], dtype=torch.float64),  # touches the right and bottom edges
    torch.zeros(0, 4, dtype=torch.float64),
]


# ----------------------------------------------------------------------------- references


def ref_pkd(s, t, eps=1e-6):
    """Per channel: normalise its N·H·W values (unbiased std, std + eps), sum squared differences;
    divide by the number of elements and 2."""
    s, t = s.numpy(), t.numpy()
    n, c, h, w = s.shape

    def norm(values):
        m = len(values)
        mean = sum(values) / m
        std = math.sqrt(sum((v - mean) ** 2 for v in values) / (m - 1))
        return [(v - mean) / (std + eps) for v in values]

    total = 0.0
    for k in range(c):
        a, b = norm(list(s[:, k].ravel())), norm(list(t[:, k].ravel()))
        total += sum((x - y) ** 2 for x, y in zip(a, b))
    return total / (n * c * h * w) / 2


def ref_conv(x, weight, bias):
    """'same' convolution of one (C, H, W) image, odd kernel, by explicit windows."""
    cout, cin, k, _ = weight.shape
    pad = k // 2
    _, h, w = x.shape
    padded = np.zeros((cin, h + 2 * pad, w + 2 * pad))
    padded[:, pad:pad + h, pad:pad + w] = x
    out = np.zeros((cout, h, w))
    for o in range(cout):
        for i in range(h):
            for j in range(w):
                out[o, i, j] = bias[o] + np.sum(weight[o] * padded[:, i:i + k, j:j + k])
    return out


def ref_mgd(s, t, loss, seed, draws=1, alpha=2e-5, lam=0.65):
    """Loop over images: keep-mask from the documented generator (seed 2·seed+1), conv3x3-ReLU-conv3x3,
    squared error summed, / N, times alpha. ``draws`` selects which forward (1 = the first)."""
    s, t = s.numpy(), t.numpy()
    n, c, h, w = s.shape
    g = torch.Generator().manual_seed(2 * seed + 1)
    for _ in range(draws):
        u = torch.rand((n, 1, h, w), generator=g).double().numpy()
    w1, b1 = (p.detach().numpy() for p in (loss.generation[0].weight, loss.generation[0].bias))
    w2, b2 = (p.detach().numpy() for p in (loss.generation[2].weight, loss.generation[2].bias))
    total = 0.0
    for i in range(n):
        keep = np.where(u[i, 0] > 1 - lam, 0.0, 1.0)
        hidden = np.maximum(ref_conv(s[i] * keep[None], w1, b1), 0.0)
        total += np.sum((ref_conv(hidden, w2, b2) - t[i]) ** 2)
    return alpha * total / n


def ref_fgd_masks(boxes, h, w, input_shape):
    """The authors' loop: scale, floor/ceil, slice [min : max + 1], max of 1/area; background / count."""
    fg = np.zeros((len(boxes), h, w))
    bg = np.zeros((len(boxes), h, w))
    for i, img_boxes in enumerate(boxes):
        for x1, y1, x2, y2 in img_boxes.tolist():
            wmin, wmax = math.floor(x1 / input_shape[1] * w), math.ceil(x2 / input_shape[1] * w)
            hmin, hmax = math.floor(y1 / input_shape[0] * h), math.ceil(y2 / input_shape[0] * h)
            area = 1.0 / (hmax + 1 - hmin) / (wmax + 1 - wmin)
            region = fg[i, hmin:hmax + 1, wmin:wmax + 1]
            fg[i, hmin:hmax + 1, wmin:wmax + 1] = np.maximum(region, area)
        bg[i] = np.where(fg[i] > 0, 0.0, 1.0)
        if bg[i].sum():
            bg[i] /= bg[i].sum()
    return fg, bg


def ref_gcblock(x, conv_mask, add):
    """GcBlock on one (C, H, W) image: softmax-pooled context, 1x1 conv, LayerNorm, ReLU, 1x1 conv."""
    c, h, w = x.shape
    flat = x.reshape(c, h * w)
    wk, bk = conv_mask.weight.detach().numpy().reshape(c), conv_mask.bias.detach().numpy()[0]
    logits = [float(wk @ flat[:, p] + bk) for p in range(h * w)]
    weights = softmax_list(logits)
    context = sum(weights[p] * flat[:, p] for p in range(h * w))
    squeeze, norm, _, expand = add
    y = squeeze.weight.detach().numpy().reshape(-1, c) @ context + squeeze.bias.detach().numpy()
    mean, var = y.mean(), ((y - y.mean()) ** 2).mean()
    gain, offset = norm.weight.detach().numpy().ravel(), norm.bias.detach().numpy().ravel()
    y = (y - mean) / math.sqrt(var + norm.eps) * gain + offset
    y = np.maximum(y, 0.0)
    y = expand.weight.detach().numpy().reshape(c, -1) @ y + expand.bias.detach().numpy()
    return x + y[:, None, None]


def ref_fgd(s, t, boxes, input_shape, loss):
    s, t = s.numpy(), t.numpy()
    n, c, h, w = s.shape
    temp = loss.temperature

    def attention(x):
        value = np.abs(x)
        spatial, channel = np.zeros((n, h, w)), np.zeros((n, c))
        for i in range(n):
            spatial[i] = h * w * np.array(softmax_list(list(value[i].mean(axis=0).ravel()), temp)).reshape(h, w)
            channel[i] = c * np.array(softmax_list(list(value[i].mean(axis=(1, 2))), temp))
        return spatial, channel

    spatial_t, channel_t = attention(t)
    spatial_s, channel_s = attention(s)
    fg, bg = ref_fgd_masks(boxes, h, w, input_shape)
    fg_loss = bg_loss = 0.0
    for i in range(n):
        scale = np.sqrt(spatial_t[i])[None] * np.sqrt(channel_t[i])[:, None, None]
        fea_s, fea_t = s[i] * scale, t[i] * scale
        fg_loss += np.sum((fea_s * np.sqrt(fg[i]) - fea_t * np.sqrt(fg[i])) ** 2)
        bg_loss += np.sum((fea_s * np.sqrt(bg[i]) - fea_t * np.sqrt(bg[i])) ** 2)
    at_loss = np.abs(channel_s - channel_t).sum() / n + np.abs(spatial_s - spatial_t).sum() / n
    global_loss = 0.0
    for i in range(n):
        out_s = ref_gcblock(s[i], loss.conv_mask_s, loss.channel_add_conv_s)
        out_t = ref_gcblock(t[i], loss.conv_mask_t, loss.channel_add_conv_t)
        global_loss += np.sum((out_s - out_t) ** 2)
    return (loss.alpha_fgd * fg_loss / n + loss.beta_fgd * bg_loss / n + loss.gamma_fgd * at_loss
            + loss.lambda_fgd * global_loss / n)


def ref_dense_kd(s, t, num_classes, temperature, mode):
    """Loop over images, anchors, positions: channel a·K + k is class k of anchor a."""
    s, t = s.numpy(), t.numpy()
    n, ch, h, w = s.shape
    anchors, total, count = ch // num_classes, 0.0, 0
    for i in range(n):
        for a in range(anchors):
            for y in range(h):
                for x in range(w):
                    zs = [s[i, a * num_classes + k, y, x] / temperature for k in range(num_classes)]
                    zt = [t[i, a * num_classes + k, y, x] / temperature for k in range(num_classes)]
                    if mode == "softmax":
                        ps, pt = softmax_list(zs), softmax_list(zt)
                        total += sum(pt[k] * math.log(pt[k] / ps[k]) for k in range(num_classes))
                    else:
                        for k in range(num_classes):
                            qs, qt = sigmoid(zs[k]), sigmoid(zt[k])
                            total += qt * math.log(qt / qs) + (1 - qt) * math.log((1 - qt) / (1 - qs))
                    count += 1
    return total / count * temperature**2


def ref_cells_in_boxes(boxes, h, w, input_shape):
    """Cell (i, j) spans [j·sx, (j+1)·sx) x [i·sy, (i+1)·sy); kept if it overlaps a box by a positive area."""
    sy, sx = input_shape[0] / h, input_shape[1] / w
    keep = np.zeros((len(boxes), h, w))
    for b, img_boxes in enumerate(boxes):
        for x1, y1, x2, y2 in img_boxes.tolist():
            for i in range(h):
                for j in range(w):
                    if j * sx < x2 and (j + 1) * sx > x1 and i * sy < y2 and (i + 1) * sy > y1:
                        keep[b, i, j] = 1.0
    return keep


def ref_ld(s, t, reg_max, temperature, keep=None):
    """Loop over images, sides, positions: channel side·(n+1) + bin; KL over bins · T², mean over kept."""
    s, t = s.numpy(), t.numpy()
    n, _, h, w = s.shape
    bins = reg_max + 1
    total, count = 0.0, 0
    for i in range(n):
        for side in range(4):
            for y in range(h):
                for x in range(w):
                    if keep is not None and not keep[i, y, x]:
                        continue
                    ps = softmax_list([s[i, side * bins + b, y, x] for b in range(bins)], temperature)
                    pt = softmax_list([t[i, side * bins + b, y, x] for b in range(bins)], temperature)
                    total += sum(pt[b] * math.log(pt[b] / ps[b]) for b in range(bins)) * temperature**2
                    count += 1
    return total / max(count, 1)


def randomize(module, seed):
    """Random values for every parameter (so zero-initialised parts cannot hide a wrong formula)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.5)
    return module


# ----------------------------------------------------------------------------- PKD


def test_pkd_matches_loop():
    s, t = maps(2, 3, 4, 5, seed=1), maps(2, 3, 4, 5, seed=2, scale=3.0) + 1.0
    assert PKDLoss()(s, t).item() == pytest.approx(ref_pkd(s, t), rel=1e-12)


def test_pkd_is_one_minus_pearson_per_channel():
    s, t = maps(3, 4, 3, 3, seed=3), maps(3, 4, 3, 3, seed=4)
    m = 3 * 3 * 3
    expected = 0.0
    for k in range(4):
        r = np.corrcoef(s[:, k].numpy().ravel(), t[:, k].numpy().ravel())[0, 1]
        expected += (m - 1) / m * (1 - r) / 4
    assert PKDLoss()(s, t).item() == pytest.approx(expected, rel=1e-5)


def test_pkd_invariant_to_positive_channel_affine_of_teacher():
    s, t = maps(2, 3, 4, 4, seed=5), maps(2, 3, 4, 4, seed=6)
    loss = PKDLoss()
    scale = torch.tensor([0.5, 2.0, 7.0], dtype=s.dtype).view(1, 3, 1, 1)
    shift = torch.tensor([3.0, -1.0, 10.0], dtype=s.dtype).view(1, 3, 1, 1)
    assert loss(s, t * scale + shift).item() == pytest.approx(loss(s, t).item(), rel=1e-5)
    flipped = torch.tensor([1.0, -1.0, 1.0], dtype=s.dtype).view(1, 3, 1, 1)
    assert abs(loss(s, t * flipped).item() - loss(s, t).item()) > 1e-2


def test_pkd_statistics_span_the_batch_not_one_image():
    # Shifting one image's channel changes the batch statistics, so the value changes.
    s, t = maps(2, 2, 3, 3, seed=7), maps(2, 2, 3, 3, seed=8)
    shifted = t.clone()
    shifted[0] += 5.0
    assert abs(PKDLoss()(s, shifted).item() - PKDLoss()(s, t).item()) > 1e-2


def test_pkd_zero_for_identical_maps():
    s = maps(2, 3, 4, 4, seed=9)
    assert PKDLoss()(s, s.clone()).item() == pytest.approx(0.0, abs=1e-12)


def test_pkd_shape_errors():
    loss = PKDLoss()
    with pytest.raises(ShapeMismatchError, match=r"conv1x1.*8 -> 16"):
        loss(torch.zeros(2, 8, 4, 4), torch.zeros(2, 16, 4, 4))
    with pytest.raises(ShapeMismatchError, match="resize"):
        loss(torch.zeros(2, 8, 4, 4), torch.zeros(2, 8, 8, 8))
    with pytest.raises(ShapeMismatchError, match=r"\(N, C, H, W\)"):
        loss(torch.zeros(2, 8, 4), torch.zeros(2, 8, 4))
    with pytest.raises(ShapeMismatchError, match="at least 2 values"):
        loss(torch.zeros(1, 8, 1, 1), torch.zeros(1, 8, 1, 1))
    with pytest.raises(KDConfigError, match="eps"):
        PKDLoss(eps=-1)


# ----------------------------------------------------------------------------- MGD


def test_mgd_matches_loop_over_two_draws():
    s, t = maps(2, 3, 4, 5, seed=10), maps(2, 3, 4, 5, seed=11)
    loss = randomize(MGDLoss(channels=3, seed=5).double(), seed=12)
    assert loss(s, t).item() == pytest.approx(ref_mgd(s, t, loss, seed=5, draws=1), rel=1e-12)
    # the second forward draws the next mask of the same generator
    assert loss(s, t).item() == pytest.approx(ref_mgd(s, t, loss, seed=5, draws=2), rel=1e-12)


def test_mgd_options_reach_the_formula():
    s, t = maps(2, 3, 4, 5, seed=13), maps(2, 3, 4, 5, seed=14)
    loss = MGDLoss(alpha_mgd=0.5, lambda_mgd=0.3, channels=3, seed=2).double()
    assert loss(s, t).item() == pytest.approx(ref_mgd(s, t, loss, seed=2, alpha=0.5, lam=0.3), rel=1e-12)


def test_mgd_mask_drops_lambda_of_the_positions():
    mask = MGDLoss(lambda_mgd=0.65, seed=1).draw_mask(4, 32, 32)
    assert mask.shape == (4, 1, 32, 32)
    assert set(mask.unique().tolist()) <= {0.0, 1.0}
    assert (1 - mask.mean().item()) == pytest.approx(0.65, abs=0.03)
    assert MGDLoss(lambda_mgd=0.0).draw_mask(2, 8, 8).eq(1).all()
    assert MGDLoss(lambda_mgd=1.0).draw_mask(2, 8, 8).eq(0).all()


def test_mgd_leaves_the_global_rng_alone():
    s, t = maps(2, 3, 4, 4, seed=15, dtype=torch.float32), maps(2, 3, 4, 4, seed=16, dtype=torch.float32)
    before = torch.get_rng_state()
    lazy, eager = MGDLoss(seed=4), MGDLoss(channels=3, seed=4)
    assert torch.equal(torch.get_rng_state(), before)
    first_lazy = lazy(s, t)  # builds the generation block
    first_eager = eager(s, t)
    lazy(s, t)
    assert torch.equal(torch.get_rng_state(), before)
    # same seed: same initialisation and masks, whether built lazily or eagerly
    assert torch.equal(lazy.generation[0].weight, eager.generation[0].weight)
    assert first_lazy.item() == first_eager.item()


def test_mgd_same_seed_same_values_other_seed_differs():
    s, t = maps(2, 3, 4, 4, seed=17, dtype=torch.float32), maps(2, 3, 4, 4, seed=18, dtype=torch.float32)
    a, b, c = MGDLoss(seed=7), MGDLoss(seed=7), MGDLoss(seed=8)
    first = a(s, t)
    assert first.item() == b(s, t).item()
    assert first.item() != c(s, t).item()
    assert a(s, t).item() != first.item()  # the next draw


def test_mgd_is_lazy_then_trainable():
    loss = MGDLoss()
    assert list(loss.parameters()) == [] and not loss.built
    s = maps(2, 4, 5, 5, seed=19, dtype=torch.float32).requires_grad_(True)
    t = maps(2, 4, 5, 5, seed=20, dtype=torch.float32).requires_grad_(True)
    with torch.no_grad():  # a dry call builds the block
        loss(s, t)
    params = list(loss.parameters())
    assert [tuple(p.shape) for p in params] == [(4, 4, 3, 3), (4,), (4, 4, 3, 3), (4,)]
    torch.optim.SGD(params, lr=0.1)
    loss(s, t).backward()
    assert s.grad is not None and s.grad.abs().sum() > 0
    assert t.grad is None
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in params)


def test_mgd_state_dict_builds_and_resumes_the_mask_stream():
    s, t = maps(2, 3, 4, 4, seed=21, dtype=torch.float32), maps(2, 3, 4, 4, seed=22, dtype=torch.float32)
    original = MGDLoss(seed=3)
    original(s, t)
    state = original.state_dict()
    assert {"generation.0.weight", "generation.0.bias", "generation.2.weight", "generation.2.bias"} <= set(state)
    restored = MGDLoss(seed=99)
    restored.load_state_dict(state)
    assert restored.built
    assert restored(s, t).item() == original(s, t).item()


def test_mgd_errors():
    with pytest.raises(KDConfigError, match="lambda_mgd"):
        MGDLoss(lambda_mgd=1.5)
    with pytest.raises(KDConfigError, match="alpha_mgd"):
        MGDLoss(alpha_mgd=-1)
    with pytest.raises(KDConfigError, match="channels"):
        MGDLoss(channels=0)
    with pytest.raises(ShapeMismatchError, match="built for 4 channels, got 6"):
        MGDLoss(channels=4)(torch.zeros(1, 6, 3, 3), torch.zeros(1, 6, 3, 3))
    with pytest.raises(ShapeMismatchError, match="conv1x1"):
        MGDLoss()(torch.zeros(1, 4, 3, 3), torch.zeros(1, 6, 3, 3))


# ----------------------------------------------------------------------------- FGD


def test_fgd_masks_by_hand():
    # 4 x 5 cells of stride 8. Box (0, 0, 8, 8) -> cells x 0..1, y 0..1 (ceil(1.0) = 1 is included): 1/4.
    # Box (3, 5, 17, 20) -> x: floor(0.375)=0 .. ceil(2.125)=3, y: floor(0.625)=0 .. ceil(2.5)=3: 1/16.
    fg, bg = fgd_masks(BOXES[:1], (4, 5), INPUT_SHAPE)
    expected = np.zeros((4, 5))
    expected[0:4, 0:4] = 1 / 16
    expected[0:2, 0:2] = 1 / 4
    np.testing.assert_allclose(fg[0].numpy(), expected, rtol=0, atol=0)
    np.testing.assert_allclose(bg[0].numpy(), (expected == 0) / 4.0, rtol=0, atol=0)
    # A box reaching the edge: x 2.5 -> 2 .. 5 (beyond the last column 4), y 1.25 -> 1 .. 4: area 1/(4·4).
    fg, bg = fgd_masks(BOXES[1:2], (4, 5), INPUT_SHAPE)
    expected = np.zeros((4, 5))
    expected[1:, 2:] = 1 / 16
    np.testing.assert_allclose(fg[0].numpy(), expected, rtol=0, atol=0)
    # no boxes: all background, uniformly
    fg, bg = fgd_masks(BOXES[2:], (4, 5), INPUT_SHAPE)
    assert fg.sum() == 0 and torch.allclose(bg, torch.full_like(bg, 1 / 20))


def test_fgd_masks_match_the_authors_loop():
    fg, bg = fgd_masks(BOXES, (4, 5), INPUT_SHAPE)
    ref_fg, ref_bg = ref_fgd_masks(BOXES, 4, 5, INPUT_SHAPE)
    np.testing.assert_allclose(fg.numpy(), ref_fg, rtol=1e-15)
    np.testing.assert_allclose(bg.numpy(), ref_bg, rtol=1e-15)


@pytest.mark.parametrize("temperature", [0.5, 2.0])
def test_fgd_matches_loop(temperature):
    s, t = maps(3, 4, 4, 5, seed=23), maps(3, 4, 4, 5, seed=24, scale=2.0)
    loss = randomize(FGDLoss(temperature=temperature, alpha_fgd=0.3, beta_fgd=0.2, gamma_fgd=0.1, lambda_fgd=0.05,
                             channels=4).double(), seed=25)
    got = loss(s, t, gt_boxes=BOXES, input_shape=INPUT_SHAPE).item()
    assert got == pytest.approx(ref_fgd(s, t, BOXES, INPUT_SHAPE, loss), rel=1e-12)


def test_fgd_default_coefficients_and_init():
    loss = FGDLoss()
    assert (loss.temperature, loss.alpha_fgd, loss.beta_fgd, loss.gamma_fgd, loss.lambda_fgd) == (
        0.5, 0.001, 0.0005, 0.0005, 0.000005)
    s, t = maps(3, 4, 4, 5, seed=26), maps(3, 4, 4, 5, seed=27)
    loss = FGDLoss(channels=4).double()
    assert torch.all(loss.channel_add_conv_s[3].weight == 0) and torch.all(loss.conv_mask_s.bias == 0)
    # with the last convs at zero the GcBlocks are the identity: the global term is sum (s - t)² / N
    expected = ref_fgd(s, t, BOXES, INPUT_SHAPE, loss)
    assert loss(s, t, gt_boxes=BOXES, input_shape=INPUT_SHAPE).item() == pytest.approx(expected, rel=1e-12)
    no_global = FGDLoss(channels=4, lambda_fgd=0).double()
    kw = dict(gt_boxes=BOXES, input_shape=INPUT_SHAPE)
    gap = loss(s, t, **kw) - no_global(s, t, **kw)
    assert gap.item() == pytest.approx(0.000005 * ((s - t) ** 2).sum().item() / 3, rel=1e-10)


def test_fgd_gradients_reach_student_and_learnable_parts():
    s = maps(2, 8, 4, 5, seed=28, dtype=torch.float32).requires_grad_(True)
    t = maps(2, 8, 4, 5, seed=29, dtype=torch.float32).requires_grad_(True)
    boxes = [b.float() for b in BOXES[:2]]
    loss = FGDLoss()
    with torch.no_grad():
        loss(s, t, gt_boxes=boxes, input_shape=INPUT_SHAPE)  # dry call builds the GcBlocks
    params = dict(loss.named_parameters())
    assert len(params) == 16
    loss(s, t, gt_boxes=boxes, input_shape=INPUT_SHAPE).backward()
    assert s.grad is not None and s.grad.abs().sum() > 0
    assert t.grad is None
    # at the authors' initialisation only the zero-initialised last convs receive a gradient
    assert params["channel_add_conv_s.3.weight"].grad.abs().sum() > 0
    assert params["channel_add_conv_t.3.weight"].grad.abs().sum() > 0
    assert params["conv_mask_s.weight"].grad.abs().sum() == 0
    randomize(loss, seed=30)
    loss.zero_grad()
    loss(s, t, gt_boxes=boxes, input_shape=INPUT_SHAPE).backward()
    # the context conv's bias shifts all softmax logits alike: its gradient is 0 by construction
    trained = {k: p for k, p in params.items() if not k.startswith("conv_mask_") or k.endswith("weight")}
    assert len(trained) == 14
    assert all(p.grad.abs().sum() > 1e-6 for p in trained.values()), {k: p.grad.abs().sum() for k, p in trained.items()}


def test_fgd_leaves_the_global_rng_alone_and_is_seeded():
    s, t = maps(2, 4, 4, 5, seed=31, dtype=torch.float32), maps(2, 4, 4, 5, seed=32, dtype=torch.float32)
    boxes = [b.float() for b in BOXES[:2]]
    before = torch.get_rng_state()
    lazy, eager, other = FGDLoss(seed=2), FGDLoss(channels=4, seed=2), FGDLoss(channels=4, seed=3)
    lazy(s, t, gt_boxes=boxes, input_shape=INPUT_SHAPE)
    assert torch.equal(torch.get_rng_state(), before)
    assert torch.equal(lazy.conv_mask_s.weight, eager.conv_mask_s.weight)
    assert not torch.equal(eager.conv_mask_s.weight, other.conv_mask_s.weight)
    assert not torch.equal(eager.conv_mask_s.weight, eager.conv_mask_t.weight)


def test_fgd_state_dict_into_an_unbuilt_loss():
    original = randomize(FGDLoss(channels=4), seed=33)
    restored = FGDLoss()
    restored.load_state_dict(original.state_dict())
    s, t = maps(2, 4, 4, 5, seed=34, dtype=torch.float32), maps(2, 4, 4, 5, seed=35, dtype=torch.float32)
    boxes = [b.float() for b in BOXES[:2]]
    kw = dict(gt_boxes=boxes, input_shape=INPUT_SHAPE)
    assert restored(s, t, **kw).item() == original(s, t, **kw).item()


def test_fgd_errors():
    s = torch.zeros(2, 4, 4, 5)
    loss = FGDLoss()
    with pytest.raises(KDConfigError, match="gt_boxes"):
        loss(s, s)
    with pytest.raises(KDConfigError, match="1 box lists for a batch of 2"):
        loss(s, s, gt_boxes=[torch.zeros(0, 4)], input_shape=INPUT_SHAPE)
    with pytest.raises(ShapeMismatchError, match=r"\(n, 4\)"):
        loss(s, s, gt_boxes=[torch.zeros(1, 5), torch.zeros(0, 4)], input_shape=INPUT_SHAPE)
    with pytest.raises(KDConfigError, match="input_shape"):
        loss(s, s, gt_boxes=[torch.zeros(0, 4)] * 2, input_shape=(32,))
    with pytest.raises(ShapeMismatchError, match="at least 2 channels"):
        FGDLoss(channels=1)
    with pytest.raises(ShapeMismatchError, match="built for 4 channels, got 6"):
        FGDLoss(channels=4)(torch.zeros(2, 6, 4, 5), torch.zeros(2, 6, 4, 5), gt_boxes=[torch.zeros(0, 4)] * 2,
                            input_shape=INPUT_SHAPE)
    with pytest.raises(KDConfigError, match="temperature"):
        FGDLoss(temperature=0)
    with pytest.raises(KDConfigError, match="beta_fgd"):
        FGDLoss(beta_fgd=-1)


# ----------------------------------------------------------------------------- dense logit KD


@pytest.mark.parametrize("mode", ["sigmoid", "softmax"])
@pytest.mark.parametrize("temperature", [1.0, 3.0])
def test_dense_kd_matches_loop(mode, temperature):
    s, t = maps(2, 6, 3, 2, seed=36, scale=2.0), maps(2, 6, 3, 2, seed=37, scale=2.0)  # 2 anchors x 3 classes
    got = DenseKDLoss(num_classes=3, mode=mode, temperature=temperature)(s, t).item()
    assert got == pytest.approx(ref_dense_kd(s, t, 3, temperature, mode), rel=1e-12)


def test_dense_kd_sigmoid_is_bce_minus_teacher_entropy():
    s, t = maps(2, 4, 3, 3, seed=38), maps(2, 4, 3, 3, seed=39)
    temp = 2.0
    q_t = torch.sigmoid(t / temp)
    bce = F.binary_cross_entropy_with_logits(s / temp, q_t, reduction="none")
    entropy = F.binary_cross_entropy(q_t, q_t, reduction="none")
    expected = (bce - entropy).sum() / (2 * 1 * 3 * 3) * temp**2  # 1 anchor x 4 classes
    assert DenseKDLoss(num_classes=4, temperature=temp)(s, t).item() == pytest.approx(expected.item(), rel=1e-10)


def test_dense_kd_softmax_runs_over_the_classes_of_one_anchor():
    s, t = maps(1, 6, 2, 2, seed=40), maps(1, 6, 2, 2, seed=41)
    loss = DenseKDLoss(num_classes=3, mode="softmax")
    shift = torch.tensor([5.0, 5.0, 5.0, -2.0, -2.0, -2.0], dtype=s.dtype).view(1, 6, 1, 1)  # per anchor
    assert loss(s + shift, t).item() == pytest.approx(loss(s, t).item(), rel=1e-12)
    other = torch.tensor([5.0, 0.0, 0.0, 0.0, 0.0, 0.0], dtype=s.dtype).view(1, 6, 1, 1)
    assert abs(loss(s + other, t).item() - loss(s, t).item()) > 1e-2


@pytest.mark.parametrize("mode", ["sigmoid", "softmax"])
def test_dense_kd_zero_for_identical_logits(mode):
    s = maps(2, 8, 3, 3, seed=42, scale=4.0)
    assert DenseKDLoss(num_classes=4, mode=mode, temperature=2.0)(s, s.clone()).item() == pytest.approx(0.0, abs=1e-12)


def test_dense_kd_errors():
    with pytest.raises(KDConfigError, match="num_classes"):
        DenseKDLoss(num_classes=0)
    with pytest.raises(KDConfigError, match="set num_classes"):
        DenseKDLoss()(torch.zeros(1, 8, 2, 2), torch.zeros(1, 8, 2, 2))
    with pytest.raises(KDConfigError, match="the detector's head has 2 classes"):
        DenseKDLoss(num_classes=4)(torch.zeros(1, 8, 2, 2), torch.zeros(1, 8, 2, 2), num_classes=2)
    x, y = torch.randn(2, 8, 3, 3), torch.randn(2, 8, 3, 3)  # the class count can come from the detector
    assert DenseKDLoss()(x, y, num_classes=4).item() == DenseKDLoss(num_classes=4)(x, y).item()
    with pytest.raises(KDConfigError, match="not a multiple of num_classes=4"):
        DenseKDLoss(num_classes=4)(torch.zeros(1, 6, 2, 2), torch.zeros(1, 6, 2, 2))
    with pytest.raises(ShapeMismatchError, match="same anchors and classes"):
        DenseKDLoss(num_classes=4)(torch.zeros(1, 8, 2, 2), torch.zeros(1, 12, 2, 2))
    with pytest.raises(ShapeMismatchError, match="FPN level"):
        DenseKDLoss(num_classes=4)(torch.zeros(1, 8, 2, 2), torch.zeros(1, 8, 4, 4))
    with pytest.raises(KDConfigError, match="mode"):
        DenseKDLoss(num_classes=4, mode="focal")


# ----------------------------------------------------------------------------- LD


@pytest.mark.parametrize("temperature", [1.0, 10.0])
def test_ld_matches_loop(temperature):
    s, t = maps(2, 12, 3, 2, seed=43, scale=3.0), maps(2, 12, 3, 2, seed=44, scale=3.0)  # reg_max 2
    got = LDLoss(reg_max=2, temperature=temperature)(s, t).item()
    assert got == pytest.approx(ref_ld(s, t, 2, temperature), rel=1e-12)


def test_ld_boxes_region_matches_loop():
    s, t = maps(3, 8, 4, 5, seed=45, scale=3.0), maps(3, 8, 4, 5, seed=46, scale=3.0)  # reg_max 1
    keep = ref_cells_in_boxes(BOXES, 4, 5, INPUT_SHAPE)
    got = LDLoss(reg_max=1, region="boxes")(s, t, gt_boxes=BOXES, input_shape=INPUT_SHAPE).item()
    assert got == pytest.approx(ref_ld(s, t, 1, 10.0, keep), rel=1e-12)
    empty = [torch.zeros(0, 4)] * 3
    assert LDLoss(reg_max=1, region="boxes")(s, t, gt_boxes=empty, input_shape=INPUT_SHAPE).item() == 0.0


def test_ld_is_mmdet_kd_kl_times_bins():
    # mmdet's knowledge_distillation_kl_div_loss averages the KL over the n + 1 bins.
    s, t = maps(2, 4 * 17, 2, 3, seed=47), maps(2, 4 * 17, 2, 3, seed=48)
    rows_s = s.permute(0, 2, 3, 1).reshape(-1, 17)
    rows_t = t.permute(0, 2, 3, 1).reshape(-1, 17)
    mmdet = F.kl_div(F.log_softmax(rows_s / 10, dim=1), F.softmax(rows_t / 10, dim=1), reduction="none").mean(1) * 100
    assert LDLoss()(s, t).item() == pytest.approx(mmdet.mean().item() * 17, rel=1e-12)


def test_ld_zero_for_identical_maps_and_errors():
    s = maps(2, 68, 2, 2, seed=49, scale=3.0)
    assert LDLoss()(s, s.clone()).item() == pytest.approx(0.0, abs=1e-12)
    with pytest.raises(ShapeMismatchError, match=r"68 channels for reg_max=16, got 40.*fits reg_max=9"):
        LDLoss()(torch.zeros(1, 40, 2, 2), torch.zeros(1, 40, 2, 2))
    with pytest.raises(KDConfigError, match="gt_boxes"):
        LDLoss(region="boxes")(s, s)
    with pytest.raises(KDConfigError, match="region"):
        LDLoss(region="positives")
    with pytest.raises(KDConfigError, match="reg_max"):
        LDLoss(reg_max=0)


# ----------------------------------------------------------------------------- common properties


def _kwargs(name):
    if name not in ("fgd", "ld_boxes"):
        return {}
    return {"gt_boxes": [b.float() for b in BOXES[:2]], "input_shape": INPUT_SHAPE}


BUILDERS = {
    "pkd": lambda: PKDLoss(),
    "mgd": lambda: MGDLoss(seed=1),
    "fgd": lambda: FGDLoss(seed=1),
    "dense_kd": lambda: DenseKDLoss(num_classes=4),
    "dense_kd_softmax": lambda: DenseKDLoss(num_classes=2, mode="softmax", temperature=2.0),
    "ld": lambda: LDLoss(reg_max=1),
    "ld_boxes": lambda: LDLoss(reg_max=1, region="boxes"),
}


@pytest.mark.parametrize("name", sorted(BUILDERS))
def test_gradient_reaches_student_never_teacher(name):
    s = maps(2, 8, 4, 5, seed=50, dtype=torch.float32).requires_grad_(True)
    t = maps(2, 8, 4, 5, seed=51, dtype=torch.float32).requires_grad_(True)
    value = BUILDERS[name]()(s, t, **_kwargs(name))
    value.backward()
    assert s.grad is not None and s.grad.abs().sum() > 0
    assert t.grad is None


@pytest.mark.parametrize("name", sorted(BUILDERS))
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_inputs_give_a_float32_loss(name, dtype):
    s, t = maps(2, 8, 4, 5, seed=52, dtype=torch.float32), maps(2, 8, 4, 5, seed=53, dtype=torch.float32)
    s_low, t_low = s.to(dtype), t.to(dtype)
    value = BUILDERS[name]()(s_low, t_low, **_kwargs(name))
    assert value.dtype == torch.float32 and value.dim() == 0 and torch.isfinite(value)
    upcast = BUILDERS[name]()(s_low.float(), t_low.float(), **_kwargs(name))
    assert value.item() == pytest.approx(upcast.item(), rel=1e-6)
    full = BUILDERS[name]()(s, t, **_kwargs(name))
    assert value.item() == pytest.approx(full.item(), rel=5e-2)
    mixed = BUILDERS[name]()(s, t_low, **_kwargs(name))  # a half-precision (autocast) teacher
    assert mixed.dtype == torch.float32


def test_registry_names():
    expected = {"pkd": PKDLoss, "mgd": MGDLoss, "fgd": FGDLoss, "ld": LDLoss, "localization_distillation": LDLoss}
    for name, cls in expected.items():
        assert isinstance(LOSSES.build({"type": name}), cls)
    built = LOSSES.build({"type": "dense_kd", "num_classes": 80, "mode": "softmax", "temperature": 2})
    assert isinstance(built, DenseKDLoss) and built.num_classes == 80 and built.temperature == 2.0
    assert LOSSES.build({"type": "mgd", "alpha_mgd": 5e-7, "lambda_mgd": 0.45}).lambda_mgd == 0.45
    with pytest.raises(KDConfigError, match="temperature"):
        LOSSES.build({"type": "fgd", "temp": 0.5})


def test_boxes_to_mask_lives_here_and_is_re_exported_by_detection():
    mask = boxes_to_mask([torch.tensor([[0.0, 0.0, 8.0, 8.0]])], (1, 3, 4, 5), INPUT_SHAPE)
    assert mask.shape == (1, 1, 4, 5) and mask.sum() == 1 and mask[0, 0, 0, 0] == 1
    pytest.importorskip("mmdet")
    pytest.importorskip("mmengine")
    from kd_tasks.detection import boxes_to_mask as from_package
    from kd_tasks.detection.losses import boxes_to_mask as from_module

    assert from_package is boxes_to_mask and from_module is boxes_to_mask
