"""Every registered loss in reduced precision: float16 / bfloat16 inputs and CPU autocast give a finite
value and finite gradients equal to the float32 computation on the same (rounded) inputs; a bf16 teacher
changes KD only by the rounding of its logits; persistent buffers stay float32."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import kd_tasks.shared.losses  # noqa: F401  registers the shared losses
from kd_tasks.shared.errors import KDError
from kd_tasks.shared.registry import LOSSES

try:  # losses registered by the adapters join the matrix when their adapter is installed
    import kd_tasks.detection  # noqa: F401
except ImportError:
    pass
try:
    import kd_tasks.face  # noqa: F401
except ImportError:
    pass


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def rand(*shape, seed=0, scale=1.0):
    return torch.randn(*shape, generator=_gen(seed)) * scale


def logits(b):
    return rand(b, 10, seed=1, scale=3), rand(b, 10, seed=2, scale=3), {}


def maps(b, c=8, hw=4):
    return rand(b, c, hw, hw, seed=3), rand(b, c, hw, hw, seed=4), {}


def embeddings(b, d=16):
    return rand(b, d, seed=5), rand(b, d, seed=6), {}


def boxes(b, size=32):
    return {"gt_boxes": [torch.tensor([[2.0, 3.0, 17.0, 20.0]]) for _ in range(b)], "input_shape": (size, size)}


def with_target(make):
    def inner(b):
        s, t, kw = make(b)
        return s, t, dict(kw, target=torch.arange(b) % 10)
    return inner


def with_labels(make, classes=3):
    def inner(b):
        s, t, kw = make(b)
        return s, t, dict(kw, target=torch.arange(b) % classes)
    return inner


def attention_maps(b):
    return rand(b, 2, 5, 5, seed=7), rand(b, 2, 5, 5, seed=8), {}


def tokens(b):
    return rand(b, 5, 8, seed=9), rand(b, 5, 8, seed=10), {}


def fsp_pair(b):
    s = (rand(b, 4, 4, 4, seed=11), rand(b, 6, 4, 4, seed=12))
    t = (rand(b, 4, 4, 4, seed=13), rand(b, 6, 4, 4, seed=14))
    return s, t, {}


def crd_inputs(b):
    s, t, _ = embeddings(b)
    return s, t, {"index": torch.arange(b)}


def dense_maps(channels):
    def inner(b):
        return rand(b, channels, 4, 4, seed=15, scale=2), rand(b, channels, 4, 4, seed=16, scale=2), {}
    return inner


def boxed_maps(b):
    s, t, _ = maps(b, hw=8)
    return s, t, boxes(b)


# registry name -> (constructor kwargs, inputs for a batch of b)
CASES = {
    "kd": ({}, logits), "dkd": ({}, with_target(logits)), "dist": ({}, logits), "logit_mse": ({}, logits),
    "sigmoid_kd": ({}, logits),
    "feature": ({}, maps), "fitnet": ({}, maps), "at": ({}, maps), "fsp": ({}, fsp_pair), "cwd": ({}, maps),
    "rkd": ({}, embeddings), "sp": ({}, embeddings), "pkt": ({}, embeddings), "cc": ({}, embeddings),
    "irg": ({}, embeddings), "crd": ({"num_data": 16, "num_negatives": 8}, crd_inputs),
    "attention_mse": ({}, attention_maps), "attention_kl": ({}, attention_maps),
    "attention_relation": ({"relation_heads": 2}, tokens),
    "pkd": ({}, maps), "mgd": ({}, maps), "fgd": ({}, boxed_maps), "dense_kd": ({"num_classes": 4}, dense_maps(8)),
    "ld": ({"reg_max": 3}, dense_maps(16)), "fg_feature": ({"bg_weight": 1.0}, boxed_maps),
    "embedding_cosine": ({}, embeddings), "embedding_l2": ({}, embeddings), "embedding_kd": ({}, embeddings),
    "angular_rkd": ({}, with_labels(embeddings)),
    "mse": ({}, maps), "l1": ({}, maps), "smooth_l1": ({}, maps), "cosine": ({}, maps),
    "adadistill": ({"num_classes": 3, "embedding_dim": 16, "seed": 0}, with_labels(embeddings)),
    "margin_distillation": ({"num_classes": 3, "embedding_dim": 16}, with_labels(embeddings)),
    "ekd": ({"topk": 4}, with_labels(embeddings)),
    "embedding_conditioned": ({}, embeddings),
}
# state a loss needs before its first call (fitted statistics, class centres), set from fixed float32 values
PREPARE = {
    "embedding_conditioned": lambda loss: loss.space.fit(rand(32, 16, seed=20)),
    "margin_distillation": lambda loss: loss.init_centres(rand(3, 16, seed=21)),
}
# losses that need more than tensors (a bound teacher module), checked in their adapter's tests
NEEDS_MODULES = {"crosskd"}


def unique_losses() -> dict[str, type]:
    seen, out = set(), {}
    for name in LOSSES.names():
        cls = LOSSES.get(name)
        if not getattr(cls, "__module__", "").startswith("kd_tasks."):
            continue  # registered by a test to check the registry itself
        if cls not in seen:
            seen.add(cls)
            out[name] = cls
    return out


def case_for(cls) -> tuple[str, tuple] | None:
    for name, case in CASES.items():
        if name in LOSSES and LOSSES.get(name) is cls:
            return name, case
    return None


def test_every_registered_loss_is_in_the_matrix():
    missing = [n for n, cls in unique_losses().items()
               if case_for(cls) is None and not any(LOSSES.get(m) is cls for m in NEEDS_MODULES if m in LOSSES)]
    assert missing == [], f"add these losses to CASES: {missing}"


CUDA = pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(),
                                                                     reason="needs a CUDA device")])


def to_device(value, device):
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, (list, tuple)):
        return type(value)(to_device(v, device) for v in value)
    if isinstance(value, dict):
        return {k: to_device(v, device) for k, v in value.items()}
    return value


def run_loss(name, kwargs, make, b, mode, device="cpu"):
    """(value, student gradient(s)) with inputs cast to the mode's dtype (or fp32 under autocast)."""
    torch.manual_seed(0)
    loss = LOSSES.build(dict(kwargs, type=name))
    if name in PREPARE:
        PREPARE[name](loss)
    loss = loss.to(device)
    s, t, extra = to_device(make(b), device)
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
             "autocast": torch.float32}[mode]

    def cast(x):
        return tuple(v.to(dtype) for v in x) if isinstance(x, tuple) else x.to(dtype)

    s, t = cast(s), cast(t)
    leaves = s if isinstance(s, tuple) else (s,)
    leaves = tuple(v.detach().requires_grad_(True) for v in leaves)
    s = leaves if isinstance(s, tuple) else leaves[0]
    t_leaves = t if isinstance(t, tuple) else (t,)
    t_leaves = tuple(v.detach().requires_grad_(True) for v in t_leaves)  # a teacher must never get gradient
    t = t_leaves if isinstance(t, tuple) else t_leaves[0]
    if mode == "autocast":
        with torch.autocast(device, dtype=torch.bfloat16 if device == "cpu" else torch.float16):
            value = loss(s, t, **extra)
    else:
        value = loss(s, t, **extra)
    value.backward()
    assert all(v.grad is None for v in t_leaves), f"{name}: gradient reached the teacher"
    return value, [v.grad for v in leaves], loss


def reference(name, kwargs, make, b, mode, device="cpu"):
    """The float32 computation on the same rounded inputs."""
    dtype = {"bfloat16": torch.bfloat16, "float16": torch.float16}.get(mode)

    def rounded(bb):
        s, t, extra = make(bb)
        if dtype is None:
            return s, t, extra
        r = (lambda x: tuple(v.to(dtype).float() for v in x) if isinstance(x, tuple) else x.to(dtype).float())
        return r(s), r(t), extra

    return run_loss(name, kwargs, rounded, b, "float32", device)


MODES = ["bfloat16", "float16", "autocast"]
NAMES = sorted(CASES)


@pytest.mark.parametrize("device", ["cpu", CUDA])
@pytest.mark.parametrize("b", [1, 6])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", NAMES)
def test_reduced_precision_equals_float32_on_the_same_inputs(name, mode, b, device):
    if name not in LOSSES:
        pytest.skip(f"{name} belongs to an adapter that is not installed")
    kwargs, make = CASES[name]
    try:
        ref_value, ref_grads, _ = reference(name, kwargs, make, b, mode, device)
    except KDError as e:  # a batch of 1 is refused with a clear error by losses that need pairs
        assert b == 1, e
        with pytest.raises(KDError):
            run_loss(name, kwargs, make, b, mode, device)
        return
    value, grads, _ = run_loss(name, kwargs, make, b, mode, device)
    assert value.dtype == torch.float32, f"{name}: loss returned {value.dtype}"
    assert torch.isfinite(value), f"{name}: value {value} in {mode}"
    assert value.item() == pytest.approx(ref_value.item(), rel=1e-5, abs=1e-7)
    tol = {"bfloat16": 1e-2, "float16": 2e-3, "autocast": 1e-5}[mode]
    for g, r in zip(grads, ref_grads):
        if r is None:
            assert g is None
            continue
        assert g is not None and torch.isfinite(g).all(), f"{name}: non-finite gradient in {mode}"
        # float16 gradients below 6e-5 are subnormal (coarse steps of 6e-8): allow two of those steps
        floor = 2 * 2.0**-24 if g.dtype == torch.float16 else 0.0
        atol = max(tol * r.abs().max().item(), floor)
        assert torch.allclose(g.float(), r, rtol=tol, atol=atol), name


def test_bf16_teacher_changes_kd_only_by_the_rounding_of_its_logits():
    from kd_tasks.shared import Distiller

    g = _gen(0)
    teacher, student = nn.Linear(8, 10), nn.Linear(8, 10)
    with torch.no_grad():
        teacher.weight.copy_(torch.randn(10, 8, generator=g) * 2)
    x = torch.randn(16, 8, generator=g)
    d = Distiller(student, teacher, terms=[{"name": "kd", "loss": {"type": "kd", "temperature": 4}}],
                  teacher_dtype=torch.bfloat16)
    value = d(x)["kd"]
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        rounded = teacher(x)  # the teacher's bf16 logits
    expected = LOSSES.build({"type": "kd", "temperature": 4})(student(x), rounded.float())
    assert rounded.dtype == torch.bfloat16
    assert value.item() == pytest.approx(expected.item(), rel=1e-5)


def test_crd_memory_bank_stays_float32_over_fp16_steps():
    loss = LOSSES.build({"type": "crd", "num_data": 64, "num_negatives": 32})
    loss.train()
    values = []
    for step in range(5):
        s, t, _ = embeddings(8)
        index = torch.arange(8) + 8 * step
        value = loss(s.half().requires_grad_(), t.half(), index=index)
        values.append(value.item())
    assert all(math.isfinite(v) for v in values), values
    assert all(buf.dtype == torch.float32 for buf in loss.buffers() if buf.is_floating_point())
