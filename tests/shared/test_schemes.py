"""Each scheme's loss against its formula written out independently (NumPy, explicit loops), its
gradient routing, and a few real training steps through the shared loop."""

from pathlib import Path

import dataclasses

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from kd_tasks.shared.config import load_config
from kd_tasks.shared.errors import KDConfigError, NonFiniteLossError, ShapeMismatchError
from kd_tasks.shared.registry import SCHEMES
from kd_tasks.shared.schemes import (
    Adversarial,
    AssistantChain,
    MultiTeacher,
    MutualLearning,
    SelfDistillation,
    build_scheme,
    scheme_from_recipe,
)
from kd_tasks.shared.training import TrainConfig, Trainer

C = 5  # classes


def mlp(hidden: int = 16, inputs: int = 12, classes: int = C, seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(inputs, hidden), nn.ReLU(), nn.Linear(hidden, classes))


# ----------------------------------------------------------------------------- NumPy references


def np_softmax(z, T=1.0):
    z = np.asarray(z, dtype=np.float64) / T
    e = np.exp(z - z.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def np_kl_T(teacher_logits, student_logits, T):
    """T² · mean_b Σ_c p_t log(p_t / p_s), one sample at a time."""
    total = 0.0
    for t_row, s_row in zip(teacher_logits, student_logits):
        pt, ps = np_softmax(t_row, T), np_softmax(s_row, T)
        total += sum(pt[c] * np.log(pt[c] / ps[c]) for c in range(len(pt)))
    return T * T * total / len(teacher_logits)


def np_kl_probs(p_teacher, student_logits, T):
    total = 0.0
    for pt, s_row in zip(p_teacher, student_logits):
        ps = np_softmax(s_row, T)
        total += sum(pt[c] * np.log(pt[c] / ps[c]) for c in range(len(pt)))
    return T * T * total / len(p_teacher)


def np_ce(logits, target):
    return float(np.mean([-np.log(np_softmax(row)[y]) for row, y in zip(logits, target)]))


def np_log_sigmoid(x):
    return -np.log1p(np.exp(-np.asarray(x, dtype=np.float64)))


def close(ref):
    """float32 against float64 references: KL terms near 0 lose relative precision."""
    return pytest.approx(ref, rel=1e-4, abs=1e-6)


def arr(t):
    return t.detach().double().numpy()


@pytest.fixture
def batch():
    g = torch.Generator().manual_seed(3)
    return torch.randn(6, 12, generator=g), torch.randint(0, C, (6,), generator=g)


# ----------------------------------------------------------------------------- mutual


@pytest.mark.parametrize("n", [2, 3])
def test_dml_loss_is_ce_plus_averaged_pairwise_kl(batch, n):
    x, y = batch
    peers = [mlp(8 + 4 * i, seed=i) for i in range(n)]
    s = MutualLearning(peers, temperature=2.0, task_weight=0.7, kd_weight=0.9)
    out = s(x, y)
    z = [arr(p(x)) for p in peers]
    ce = sum(np_ce(zi, y.numpy()) for zi in z)
    kd = sum(np_kl_T(z[j], z[i], 2.0) for i in range(n) for j in range(n) if i != j) / (n - 1)
    assert out["task"].item() == close(ce)
    assert out["kd"].item() == close(kd)
    assert out["loss"].item() == close(0.7 * ce + 0.9 * kd)


def test_dml_identical_peers_have_zero_kd_and_targets_are_detached(batch):
    x, y = batch
    a, b = mlp(seed=1), mlp(seed=1)
    s = MutualLearning([a, b], temperature=3.0, task_weight=0.0)
    out = s(x, y)
    assert out["kd"].item() == pytest.approx(0.0, abs=1e-7)
    # peer b's parameters receive only the gradient of KL(p_a || p_b) (b as student), not of b as target
    s2 = MutualLearning([mlp(seed=1), mlp(seed=2)], temperature=3.0, task_weight=0.0)
    s2(x, y)["loss"].backward()
    pa, pb = s2.peers
    za, zb = pa(x), pb(x)
    ref_b = 9.0 * (F.softmax(za.detach() / 3, 1) * (F.log_softmax(za.detach() / 3, 1) - F.log_softmax(zb / 3, 1))).sum(1).mean()
    grad_b = torch.autograd.grad(ref_b, list(pb.parameters()))
    for g_ref, p in zip(grad_b, pb.parameters()):
        assert torch.allclose(p.grad, g_ref, atol=1e-6)


def test_one_gate_ensemble_formula(batch):
    x, y = batch
    peers = [mlp(8, seed=1), mlp(12, seed=2), mlp(16, seed=3)]
    s = MutualLearning(peers, aggregate="one", temperature=3.0)
    s.prepare(x, y)
    out = s(x, y)
    z = [arr(p(x)) for p in peers]
    W, bias = arr(s.gate.weight), arr(s.gate.bias)
    gate = np_softmax(np.concatenate(z, axis=1) @ W.T + bias)  # (B, N)
    z_e = sum(gate[:, i:i + 1] * z[i] for i in range(3))
    ce = sum(np_ce(zi, y.numpy()) for zi in z) + np_ce(z_e, y.numpy())
    kd = sum(np_kl_T(z_e, zi, 3.0) for zi in z)
    assert out["task"].item() == close(ce)
    assert out["kd"].item() == close(kd)


def test_okddip_attention_targets_formula(batch):
    x, y = batch
    peers = [mlp(8, seed=1), mlp(12, seed=2), mlp(16, seed=3), mlp(10, seed=4)]
    s = MutualLearning(peers, aggregate="okddip", temperature=3.0, attention_dim=4)
    s.prepare(x, y)
    out = s(x, y)
    z = [arr(p(x)) for p in peers]
    Wq, Wk = arr(s.query.weight), arr(s.key.weight)
    kd = 0.0
    aux = z[1:]
    for i in range(len(aux)):
        target = np.zeros_like(aux[i])
        for b in range(x.shape[0]):
            energy = np.array([(Wq @ aux[i][b]) @ (Wk @ aux[j][b]) for j in range(len(aux))])
            a = np_softmax(energy)
            target[b] = sum(a[j] * aux[j][b] for j in range(len(aux)))
        kd += np_kl_T(target, aux[i], 3.0)
    kd += np_kl_T(np.mean(aux, axis=0), z[0], 3.0)
    assert out["kd"].item() == close(kd)
    assert out["task"].item() == close(sum(np_ce(zi, y.numpy()) for zi in z))
    out["loss"].backward()  # the attention projections learn through the first-level targets
    assert s.query.weight.grad.abs().sum() > 0 and s.key.weight.grad.abs().sum() > 0


def test_mutual_config_errors():
    with pytest.raises(KDConfigError, match="aggregate"):
        MutualLearning([mlp(), mlp()], aggregate="avg")
    with pytest.raises(KDConfigError, match="at least 3"):
        MutualLearning([mlp(), mlp()], aggregate="okddip")
    with pytest.raises(KDConfigError, match="export_peer"):
        MutualLearning([mlp(), mlp()], export_peer=2)


# ----------------------------------------------------------------------------- self-distillation


def test_byot_heads_formula(batch):
    x, y = batch
    model = mlp(16, seed=5)
    s = SelfDistillation(model, num_classes=C, shallow_taps=["1"], feature_tap="3@input",
                         temperature=3.0, alpha=0.3, feature_weight=0.05)
    s.prepare(x, y)
    out = s(x, y)
    head = s.heads[0]
    z_c = arr(model(x))
    f_c = arr(model[2](model[1](model[0](x))))  # input of the final classifier
    tapped = arr(model[1](model[0](x)))
    f_1 = np.maximum(tapped @ arr(head.proj.weight).T + arr(head.proj.bias), 0)
    z_1 = f_1 @ arr(head.fc.weight).T + arr(head.fc.bias)
    ce_c, ce_1 = np_ce(z_c, y.numpy()), np_ce(z_1, y.numpy())
    kd = np_kl_T(z_c, z_1, 3.0)
    feat = np.mean(((f_1 - f_c) ** 2).sum(axis=1))
    assert out["task"].item() == close(ce_c)
    assert out["heads_task"].item() == close(ce_1)
    assert out["heads_kd"].item() == close(kd)
    assert out["heads_feature"].item() == close(feat)
    assert out["loss"].item() == close(0.7 * (ce_c + ce_1) + 0.3 * kd + 0.05 * feat)
    assert s.export_model() is model


def test_previous_epoch_term_uses_last_epoch_predictions(batch):
    x, y = batch
    model = mlp(16, seed=6)
    s = SelfDistillation(model, num_classes=C, temperature=2.0, previous_weight=0.5, num_samples=10)
    s.train()
    index = torch.tensor([0, 1, 2, 3, 4, 5])
    first = s(x, y, index=index)
    assert first["previous"].item() == 0.0  # nothing seen in the first epoch
    old_logits = arr(model(x))
    s.on_epoch_end(0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.3)
    # a batch with samples 0..2 seen last epoch and 6..8 never seen
    index2 = torch.tensor([0, 1, 2, 6, 7, 8])
    out = s(x, y, index=index2)
    new_logits = arr(model(x))
    expected = np_kl_T(old_logits[:3], new_logits[:3], 2.0)
    assert out["previous"].item() == close(expected)
    assert out["loss"].item() == close(np_ce(new_logits, y.numpy()) + 0.5 * expected)
    with pytest.raises(KDConfigError, match="index"):
        s(x, y)


def test_self_config_errors():
    with pytest.raises(KDConfigError, match="num_samples"):
        SelfDistillation(mlp(), num_classes=C, previous_weight=1.0)
    with pytest.raises(KDConfigError, match="feature_tap"):
        SelfDistillation(mlp(), num_classes=C, shallow_taps=["1"], feature_weight=0.1)


# ----------------------------------------------------------------------------- multi-teacher


@pytest.mark.parametrize("weighting,weights", [("mean", None), ("fixed", [3.0, 1.0]), ("confidence", None)])
def test_multi_teacher_ensemble_target_formula(batch, weighting, weights):
    x, y = batch
    student, t1, t2 = mlp(8, seed=1), mlp(32, seed=2), mlp(24, seed=3)
    s = MultiTeacher(student, [t1, t2], temperature=4.0, weighting=weighting, weights=weights, kd_weight=0.5)
    out = s(x, y)
    zs, z1, z2 = arr(student(x)), arr(t1(x)), arr(t2(x))
    if weighting == "mean":
        w = np.full((6, 2), 0.5)
    elif weighting == "fixed":
        w = np.tile([0.75, 0.25], (6, 1))
    else:  # CA-MKD: w_k = (1 - exp(CE_k) / sum_j exp(CE_j)) / (n - 1)
        ce = np.array([[-np.log(np_softmax(z[b])[y[b]]) for z in (z1, z2)] for b in range(6)])
        w = (1 - np.exp(ce) / np.exp(ce).sum(axis=1, keepdims=True)) / 1
    p_e = w[:, :1] * np_softmax(z1, 4.0) + w[:, 1:] * np_softmax(z2, 4.0)
    kd = np_kl_probs(p_e, zs, 4.0)
    assert out["kd"].item() == close(kd)
    assert out["loss"].item() == close(np_ce(zs, y.numpy()) + 0.5 * kd)


@pytest.mark.parametrize("weights", [None, [3.0, 1.0]])
def test_multi_teacher_logit_space_and_teacher_freezing(batch, weights):
    x, y = batch
    student, t1, t2 = mlp(8, seed=1), mlp(32, seed=2), mlp(24, seed=3)
    s = MultiTeacher(student, [t1, t2], temperature=2.0, space="logit", weighting="fixed" if weights else "mean",
                     weights=weights)
    out = s(x, y)
    w1 = 0.75 if weights else 0.5
    z_e = w1 * arr(t1(x)) + (1 - w1) * arr(t2(x))
    assert out["kd"].item() == close(np_kl_T(z_e, arr(student(x)), 2.0))
    out["loss"].backward()
    assert all(p.grad is None and not p.requires_grad for t in (t1, t2) for p in t.parameters())
    assert not any(k.startswith(("teacher", "_frozen")) for k in s.state_dict())
    s.train()
    assert not t1.training and not t2.training


def test_multi_teacher_errors(batch):
    x, y = batch
    with pytest.raises(KDConfigError, match="labels"):
        MultiTeacher(mlp(), [mlp(seed=2), mlp(seed=3)], weighting="confidence")(x)
    with pytest.raises(ShapeMismatchError, match="teacher #1"):
        MultiTeacher(mlp(), [mlp(seed=2), mlp(classes=7, seed=3)])(x, y)
    with pytest.raises(KDConfigError, match="2 weights"):
        MultiTeacher(mlp(), [mlp(seed=2), mlp(seed=3)], weighting="fixed", weights=[1.0])


# ----------------------------------------------------------------------------- adversarial


@pytest.mark.parametrize("kind", ["non_saturating", "minimax"])
def test_adversarial_student_and_discriminator_losses(batch, kind):
    x, y = batch
    student, teacher = mlp(8, seed=1), mlp(32, seed=2)
    s = Adversarial(student, teacher, temperature=2.0, adv_weight=0.3, kd_weight=0.6, hidden=7, generator_loss=kind)
    s.prepare(x, y)
    s.train()
    out = s(x, y)
    zs, zt = arr(student(x)), arr(teacher(x))
    lin1, lin2 = s.discriminator.net[0], s.discriminator.net[2]

    def d(h):
        hidden = h @ arr(lin1.weight).T + arr(lin1.bias)
        hidden = np.where(hidden > 0, hidden, 0.2 * hidden)
        return (hidden @ arr(lin2.weight).T + arr(lin2.bias))[:, 0]

    adv = -np.mean(np_log_sigmoid(d(zs))) if kind == "non_saturating" else np.mean(np_log_sigmoid(-d(zs)))
    ce, kd = np_ce(zs, y.numpy()), np_kl_T(zt, zs, 2.0)
    assert out["adversarial"].item() == close(adv)
    assert out["loss"].item() == close(ce + 0.6 * kd + 0.3 * adv)
    # the discriminator gets no gradient from the student's loss ...
    out["loss"].backward()
    assert all(p.grad is None for p in s.discriminator.parameters())
    assert all(p.grad is not None for p in student.parameters())
    # ... and the student none from the discriminator's: -[log D(h_t) + log(1 - D(h_s))]
    for p in student.parameters():
        p.grad = None
    aux = s.auxiliary_loss("discriminator")
    d_ref = -(np.mean(np_log_sigmoid(d(zt))) + np.mean(np_log_sigmoid(-d(zs))))
    assert aux["loss"].item() == close(d_ref)
    aux["loss"].backward()
    assert all(p.grad is None for p in student.parameters())
    assert all(p.grad is not None for p in s.discriminator.parameters())
    assert {id(p) for p in s.trainable_parameters()}.isdisjoint({id(p) for p in s.discriminator.parameters()})


def test_adversarial_on_features_uses_a_connector(batch):
    x, y = batch
    s = Adversarial(mlp(8, seed=1), mlp(32, seed=2), level="features", student_tap="2", teacher_tap="2")
    s.prepare(x, y)
    assert s.connector.materialized and tuple(s.connector.inner.proj.weight.shape) == (32, 8)
    assert s.export_connectors() is s.connector
    with pytest.raises(KDConfigError, match="student_tap"):
        Adversarial(mlp(), mlp(), level="features")


# ----------------------------------------------------------------------------- assistant chain


def test_takd_chain_passes_each_trained_student_on_as_teacher():
    teacher, a1, a2, student = mlp(64, seed=1), mlp(32, seed=2), mlp(16, seed=3), mlp(8, seed=4)
    chain = AssistantChain(teacher, [a1, a2], student, terms=[{"name": "kd", "loss": {"type": "kd", "temperature": 2}}])
    seen = []

    def train_fn(scheme, name):
        seen.append((name, scheme.student, scheme.teacher))
        with torch.no_grad():
            for p in scheme.student.parameters():
                p.add_(1.0)  # "training"
        return name

    final = chain.run(train_fn)
    assert [s[0] for s in seen] == ["assistant1", "assistant2", "student"]
    assert seen[0][1:] == (a1, teacher) and seen[1][1:] == (a2, a1) and seen[2][1:] == (student, a2)
    assert final is student and all(p.requires_grad for p in student.parameters())
    assert not any(p.requires_grad for p in a1.parameters())  # became a frozen teacher
    assert chain.results == {"assistant1": "assistant1", "assistant2": "assistant2", "student": "student"}
    with pytest.raises(KDConfigError, match="assistant"):
        AssistantChain(teacher, [], student)


# ----------------------------------------------------------------------------- registry and loop


def test_registry_names_and_option_errors():
    for name in ("offline", "mutual", "dml", "self", "multi_teacher", "assistant", "takd", "adversarial", "gan"):
        assert name in SCHEMES
    with pytest.raises(KDConfigError, match="temprature"):
        build_scheme({"type": "dml", "temprature": 2.0}, peers=[mlp(), mlp()])
    with pytest.raises(KDConfigError, match="scheme"):
        build_scheme({"type": "mutal"}, peers=[mlp(), mlp()])


def test_non_finite_term_is_named(batch):
    x, y = batch
    s = MutualLearning([mlp(), mlp(seed=2)])
    with pytest.raises(NonFiniteLossError, match="'task'"):
        s(x * float("nan"), y)


class Blobs(torch.utils.data.Dataset):
    def __init__(self, n=48):
        g = torch.Generator().manual_seed(0)
        self.y = torch.randint(0, C, (n,), generator=g)
        self.x = torch.randn(n, 12, generator=g) + F.one_hot(self.y, 12).float() * 3

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        return self.x[i], self.y[i]


def _schemes():
    return {
        "offline": lambda: build_scheme({"type": "offline", "terms": [{"name": "kd", "loss": "kd"}],
                                         "task_loss": nn.CrossEntropyLoss()}, student=mlp(8), teacher=mlp(32, seed=9)),
        "dml": lambda: build_scheme({"type": "dml", "aggregate": "one"}, peers=[mlp(8), mlp(12, seed=2)]),
        "self": lambda: build_scheme({"type": "self", "num_classes": C, "shallow_taps": ["1"], "previous_weight": 1.0,
                                      "num_samples": 48}, model=mlp(8)),
        "multi_teacher": lambda: build_scheme({"type": "multi_teacher", "weighting": "confidence"}, student=mlp(8),
                                              teachers=[mlp(32, seed=9), mlp(24, seed=8)]),
        "gan": lambda: build_scheme({"type": "gan"}, student=mlp(8), teacher=mlp(32, seed=9)),
    }


def _teachers(scheme):
    if hasattr(scheme, "frozen_models"):
        return list(scheme.frozen_models().values())
    return [scheme.teacher]


@pytest.mark.parametrize("name", list(_schemes()))
def test_each_scheme_trains_a_few_steps_in_the_loop(tmp_path, name):
    scheme = _schemes()[name]()
    exported = scheme.export_model()
    before = {k: v.clone() for k, v in exported.state_dict().items()}
    frozen = [p.clone() for m in _teachers(scheme) for p in m.parameters()]
    assert frozen or name in ("dml", "self")
    cfg = TrainConfig(output_dir=str(tmp_path), max_steps=9, batch_size=8, lr=0.05, log_every=2,
                      progress=False, console=False, tensorboard=False)
    d_before = []
    if name == "gan":  # build the lazy discriminator to record its initial weights
        scheme.prepare(Blobs().x[:8], Blobs().y[:8])
        d_before = [p.clone() for p in scheme.discriminator.parameters()]
    result = Trainer(scheme, Blobs(), cfg).fit()
    assert result.step == 9 and result.model is exported
    assert any(not torch.equal(before[k], v) for k, v in exported.state_dict().items())
    after_frozen = [p for m in _teachers(scheme) for p in m.parameters()]
    assert all(torch.equal(a, b) for a, b in zip(frozen, after_frozen))
    assert all(np.isfinite(h["loss"]) for h in result.history if "loss" in h)
    if name == "gan":
        assert any(not torch.equal(a, b) for a, b in zip(d_before, scheme.discriminator.parameters()))
        assert "discriminator/d_loss" in result.history[-1]
    if name == "self":  # 6 batches an epoch: the previous-epoch term starts in the second
        assert result.history[0]["previous"] == 0 and result.history[-1]["previous"] > 0


# ----------------------------------------------------------------------------- shipped recipes

RECIPES = sorted((Path(__file__).parents[2] / "configs" / "shared").glob("scheme_*.yaml"))


class TinyResNetLike(nn.Module):
    """Module names of a torchvision ResNet (layer1, layer2, fc), as the recipes tap them."""

    def __init__(self, width: int, classes: int = 10):
        super().__init__()
        self.layer1 = nn.Sequential(nn.Conv2d(1, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU())
        self.layer2 = nn.Sequential(nn.Conv2d(width, 2 * width, 3, stride=2, padding=1), nn.ReLU())
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(2 * width, classes)

    def forward(self, x):
        return self.fc(torch.flatten(self.avgpool(self.layer2(self.layer1(x))), 1))


class Images(torch.utils.data.Dataset):
    def __init__(self, n=32):
        g = torch.Generator().manual_seed(0)
        self.x, self.y = torch.randn(n, 1, 8, 8, generator=g), torch.randint(0, 10, (n,), generator=g)

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        return self.x[i], self.y[i]


def test_scheme_recipes_exist():
    kinds = {load_config(p)["scheme"]["type"] for p in RECIPES}
    assert {"mutual", "self", "multi_teacher", "takd", "adversarial"} <= kinds


@pytest.mark.parametrize("precision", ["no", "bf16"])
@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.stem)
def test_scheme_recipe_builds_and_trains(path, tmp_path, precision):
    """Every scheme recipe trains a few steps, in float32 and under CPU bf16 autocast (mixed precision:
    the losses compute in float32 inside; the adversarial discriminator step runs in float32)."""
    recipe = load_config(path)
    teacher, extra, assistant = TinyResNetLike(8), TinyResNetLike(6), TinyResNetLike(5)
    scheme = scheme_from_recipe(recipe, lambda: TinyResNetLike(4), teacher=teacher, teachers=[extra],
                                assistants=[assistant], num_samples=32)
    cfg = TrainConfig(output_dir=str(tmp_path), max_steps=2, batch_size=8, progress=False, console=False,
                      tensorboard=False, **dict(recipe.get("train") or {}, mixed_precision=precision, cpu=True))
    if isinstance(scheme, AssistantChain):
        stages = []
        student = scheme.run(lambda s, name: stages.append(name) or Trainer(
            s, Images(), dataclasses.replace(cfg, output_dir=str(tmp_path / name))).fit())  # a directory per stage
        assert stages == ["assistant1", "student"] and isinstance(student, TinyResNetLike)
        return
    trainer = Trainer(scheme, Images(), cfg)
    result = trainer.fit()
    assert trainer.accelerator.mixed_precision == precision
    assert result.step == 2 and isinstance(result.model, TinyResNetLike)
    assert all(np.isfinite(v) for row in result.history for k, v in row.items() if isinstance(v, float))
