import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from kd_tasks.shared.config import distiller_from_config, load_config
from kd_tasks.shared.distiller import Distiller
from kd_tasks.shared.errors import KDConfigError, NonFiniteLossError, ShapeMismatchError, UnknownTapError
from kd_tasks.shared.schedules import build_schedule


def cnn(width: int, classes: int = 5) -> nn.Sequential:
    return nn.Sequential(
        nn.Sequential(nn.Conv2d(3, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU()),
        nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, classes)),
    )


def kl_ref(s, t, T):
    """Hinton KD written out: T^2 * sum_i p_t log(p_t / p_s), averaged over the batch."""
    pt = torch.softmax(t / T, 1)
    ps = torch.softmax(s / T, 1)
    return (T * T) * (pt * (pt.log() - ps.log())).sum(1).mean()


def test_gradients_reach_student_and_connector_never_teacher():
    torch.manual_seed(0)
    student, teacher = cnn(4), cnn(8)
    d = Distiller(
        student, teacher,
        terms=[
            {"name": "kd", "loss": {"type": "kd", "temperature": 2.0}},
            {"name": "hint", "loss": "mse", "student": "0", "teacher": "0", "connector": "conv1x1"},
        ],
        task_loss=nn.CrossEntropyLoss(),
    )
    x, y = torch.randn(6, 3, 8, 8), torch.randint(0, 5, (6,))
    d.prepare(x)
    d.train()
    out = d(x, y)
    out["loss"].backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in student.parameters() if p.dim() > 1)
    assert all(p.grad is not None for p in d.connectors.parameters())
    assert all(p.grad is None and not p.requires_grad for p in teacher.parameters())
    assert set(out) >= {"loss", "task", "kd", "hint", "student_output"}
    # the teacher is not part of the saved/trained state
    assert not any(k.startswith("_teacher") or "teacher" in k for k in d.state_dict())


def test_kd_term_equals_formula_and_total_is_weighted_sum():
    torch.manual_seed(1)
    student, teacher = cnn(4), cnn(8)
    d = Distiller(student, teacher, terms=[{"name": "kd", "loss": {"type": "kd", "temperature": 3.0}, "weight": 0.7}],
                  task_loss=nn.CrossEntropyLoss(), task_weight=0.3)
    x, y = torch.randn(5, 3, 8, 8), torch.randint(0, 5, (5,))
    d.eval()
    out = d(x, y)
    with torch.no_grad():
        s, t = student(x), teacher(x)
    assert torch.allclose(out["kd"], kl_ref(s, t, 3.0), atol=1e-5)
    assert torch.allclose(out["task"], F.cross_entropy(s, y), atol=1e-6)
    assert torch.allclose(out["loss"], 0.7 * out["kd"] + 0.3 * out["task"], atol=1e-6)


def test_teacher_stays_in_eval_mode_and_its_bn_stats_do_not_move():
    student, teacher = cnn(4), cnn(8)
    teacher.train()
    d = Distiller(student, teacher, terms=[{"loss": "kd"}])
    d.train()
    assert not teacher.training and student.training
    before = copy.deepcopy(teacher.state_dict())
    d(torch.randn(4, 3, 8, 8))
    for k, v in teacher.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_weight_zero_equals_plain_training():
    torch.manual_seed(0)
    base = cnn(4)
    teacher = cnn(8)
    data = [(torch.randn(8, 3, 8, 8), torch.randint(0, 5, (8,))) for _ in range(5)]

    plain = copy.deepcopy(base)
    opt = torch.optim.SGD(plain.parameters(), lr=0.1)
    for x, y in data:
        opt.zero_grad()
        F.cross_entropy(plain(x), y).backward()
        opt.step()

    kd_student = copy.deepcopy(base)
    d = Distiller(kd_student, teacher, terms=[{"loss": "kd", "weight": 0.0}], task_loss=nn.CrossEntropyLoss())
    opt = torch.optim.SGD(d.trainable_parameters(), lr=0.1)
    d.train()
    for x, y in data:
        opt.zero_grad()
        d(x, y)["loss"].backward()
        opt.step()
    for a, b in zip(plain.state_dict().values(), kd_student.state_dict().values()):
        assert torch.equal(a, b)


def test_short_run_lowers_kd_loss():
    torch.manual_seed(0)
    teacher = cnn(16)
    student = cnn(4)
    x = torch.randn(64, 3, 8, 8)
    d = Distiller(student, teacher, terms=[{"name": "kd", "loss": {"type": "kd", "temperature": 4.0}}])
    d.eval()
    before = d(x)["kd"].item()
    opt = torch.optim.Adam(d.trainable_parameters(), lr=1e-2)
    d.train()
    for step in range(50):
        idx = torch.randint(0, 64, (16,))
        out = d(x[idx])
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
    d.eval()
    after = d(x)["kd"].item()
    assert after < 0.5 * before, (before, after)


def test_shape_mismatch_without_connector_is_clear():
    d = Distiller(cnn(4), cnn(8), terms=[{"name": "hint", "loss": "mse", "student": "0", "teacher": "0"}])
    with pytest.raises(ShapeMismatchError, match="hint"):
        d(torch.randn(2, 3, 8, 8))


def test_config_errors_are_clear(tmp_path):
    with pytest.raises(KDConfigError, match="did you mean 'kd'"):
        Distiller(cnn(4), cnn(8), terms=[{"loss": "kdd"}])
    with pytest.raises(KDConfigError, match="temperature"):
        Distiller(cnn(4), cnn(8), terms=[{"loss": {"type": "kd", "temprature": 4}}])
    with pytest.raises(KDConfigError, match="did you mean 'weight'"):
        Distiller(cnn(4), cnn(8), terms=[{"loss": "kd", "wieght": 1.0}])
    with pytest.raises(UnknownTapError, match="did you mean"):
        Distiller(cnn(4), cnn(8), terms=[{"loss": "mse", "student": "0.3", "teacher": "0"}])
    with pytest.raises(KDConfigError, match="did you mean 'terms'"):
        distiller_from_config({"distill": {"trems": []}}, cnn(4), cnn(8))
    with pytest.raises(KDConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("distill: [unclosed")
    with pytest.raises(KDConfigError, match="not valid YAML"):
        load_config(bad)
    with pytest.raises(KDConfigError, match="unique"):
        Distiller(cnn(4), cnn(8), terms=[{"loss": "kd", "name": "a"}, {"loss": "kd", "name": "a"}])


def test_yaml_and_python_configs_build_the_same_distiller(tmp_path):
    yml = tmp_path / "r.yaml"
    yml.write_text(
        "distill:\n  task_loss: cross_entropy\n  task_weight: 0.5\n  terms:\n"
        "    - {name: kd, loss: {type: kd, temperature: 2.0}, weight: 0.5}\n"
    )
    py = tmp_path / "r.py"
    py.write_text(
        "distill = dict(task_loss='cross_entropy', task_weight=0.5,\n"
        "               terms=[dict(name='kd', loss=dict(type='kd', temperature=2.0), weight=0.5)])\n"
    )
    torch.manual_seed(0)
    student, teacher = cnn(4), cnn(8)
    x, y = torch.randn(3, 3, 8, 8), torch.randint(0, 5, (3,))
    a = distiller_from_config(load_config(yml), student, teacher).eval()(x, y)
    b = distiller_from_config(load_config(py), student, teacher).eval()(x, y)
    assert torch.allclose(a["loss"], b["loss"]) and torch.allclose(a["kd"], b["kd"])


def test_precomputed_teacher_outputs_skip_the_teacher():
    student = cnn(4)
    d = Distiller(student, None, terms=[{"name": "kd", "loss": "kd"}])
    x = torch.randn(3, 3, 8, 8)
    t_logits = torch.randn(3, 5)
    out = d(x, teacher_outputs={"output": t_logits})
    assert torch.allclose(out["kd"], kl_ref(student(x).detach(), t_logits, d.losses["kd"].temperature), atol=1e-5)
    with pytest.raises(KDConfigError, match="no teacher"):
        d(x)


def test_teacher_forward_stops_after_last_tap_when_logits_unused():
    teacher = cnn(8)
    calls = []
    teacher[1].register_forward_hook(lambda *a: calls.append(1))
    d = Distiller(cnn(4), teacher, terms=[{"name": "h", "loss": "mse", "student": "0", "teacher": "0", "connector": "auto"}])
    d(torch.randn(2, 3, 8, 8))  # the first teacher forward runs to the end: it counts each module's calls
    assert calls == [1]
    calls.clear()
    d(torch.randn(2, 3, 8, 8))
    assert calls == []


def test_non_finite_loss_names_the_term():
    class Bad(nn.Module):
        def forward(self, s, t):
            return (s * float("nan")).sum()

    d = Distiller(cnn(4), cnn(8), terms=[{"name": "broken", "loss": Bad()}])
    with pytest.raises(NonFiniteLossError, match="broken"):
        d(torch.randn(2, 3, 8, 8))


def test_weight_schedules():
    lin = build_schedule({"schedule": "linear", "start": 0.0, "end": 1.0, "steps": 10})
    assert lin(0) == 0.0 and lin(5) == 0.5 and lin(20) == 1.0
    cos = build_schedule({"schedule": "cosine", "start": 1.0, "end": 0.0, "steps": 10})
    assert cos(0) == pytest.approx(1.0) and cos(5) == pytest.approx(0.5) and cos(10) == pytest.approx(0.0)
    st = build_schedule({"schedule": "step", "values": [1.0, 0.5], "milestones": [3]})
    assert st(2) == 1.0 and st(3) == 0.5
    with pytest.raises(KDConfigError, match="steps"):
        build_schedule({"schedule": "linear", "start": 0, "end": 1, "step": 3})
    d = Distiller(cnn(4), cnn(8), terms=[{"name": "kd", "loss": "kd", "weight": {"schedule": "linear", "start": 0, "end": 1, "steps": 4}}])
    d.train()
    x = torch.randn(2, 3, 8, 8)
    seen = []
    for _ in range(3):
        seen.append(d.weights()["kd"])
        d(x)
    assert seen == [0.0, 0.25, 0.5]


def test_user_loss_plugs_in_by_name():
    from kd_tasks.shared.registry import LOSSES

    @LOSSES.register("test_l1_logits")
    class L1Logits(nn.Module):
        def forward(self, s, t):
            return (s - t).abs().mean()

    student, teacher = cnn(4), cnn(8)
    d = Distiller(student, teacher, terms=[{"name": "l1", "loss": "test_l1_logits"}]).eval()
    x = torch.randn(3, 3, 8, 8)
    with torch.no_grad():
        ref = (student(x) - teacher(x)).abs().mean()
    assert torch.allclose(d(x)["l1"], ref)


def test_works_on_a_wrapped_student():
    student, teacher = cnn(4), cnn(8)
    wrapped = nn.DataParallel(student)
    d = Distiller(wrapped, teacher, terms=[{"name": "h", "loss": "mse", "student": "module.0", "teacher": "0",
                                            "connector": "conv1x1"}])
    d.prepare(torch.randn(2, 3, 8, 8))
    out = d.train()(torch.randn(2, 3, 8, 8))
    out["loss"].backward()
    assert student[0][0].weight.grad is not None
    assert d.export_model() is student


def test_crd_term_prepares_and_trains_with_indices():
    torch.manual_seed(0)
    student, teacher = cnn(4), cnn(8)
    d = Distiller(student, teacher, terms=[
        {"name": "crd", "loss": {"type": "crd", "num_data": 32, "num_negatives": 8, "embed_dim": 8},
         "student": "1.2@input", "teacher": "1.2@input"}])
    x = torch.randn(32, 3, 8, 8)
    d.prepare(x[:4])
    opt = torch.optim.Adam(d.trainable_parameters(), lr=1e-2)
    d.train()
    idx = torch.arange(8)
    out = d(x[idx], index=idx)
    opt.zero_grad()
    out["loss"].backward()
    opt.step()
    assert torch.isfinite(out["crd"]) and student[0][0].weight.grad is not None
    with pytest.raises(KDConfigError, match="index"):
        d(x[idx])


def test_prepare_builds_connectors_from_a_generator_of_its_own():
    """Building connectors must not move the global random stream (the student's init and data order)."""
    import kd_tasks.shared as shared

    def run(seed):
        torch.manual_seed(seed)
        student, teacher = nn.Sequential(nn.Linear(4, 3)), nn.Sequential(nn.Linear(4, 6), nn.Linear(6, 3))
        d = shared.Distiller(student, teacher, terms=[
            {"name": "kd", "loss": "kd"},
            {"name": "h", "loss": "mse", "student": "0", "teacher": "0", "connector": "linear"}])
        x = torch.randn(2, 4)
        before = torch.get_rng_state()
        d.prepare(x)
        assert torch.equal(before, torch.get_rng_state())
        return d.connectors["h"].inner.proj.weight.detach().clone()

    assert torch.equal(run(3), run(3))  # reproducible for a seed
    assert not torch.equal(run(3), run(4))  # and follows the seed
