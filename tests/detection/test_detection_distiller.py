"""DetectionDistiller on tiny RetinaNets: loss dict, gradients, teacher isolation, inputs, errors, recipes."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
import torch
from det_helpers import make_images, raw_batch
from mmengine.config import Config

from kd_tasks.detection import DetectionDistiller
from kd_tasks.shared.config import load_config
from kd_tasks.shared.errors import KDConfigError, UnknownTapError

RECIPES = Path(__file__).resolve().parents[2] / "configs" / "detection"


def cwd_reference(student: np.ndarray, teacher: np.ndarray, tau: float) -> float:
    """Channel-wise distillation written out with loops: T²/(N·C) Σ_{n,c} KL(softmax(t/T) ‖ softmax(s/T))."""
    n, c = student.shape[:2]
    total = 0.0
    for i in range(n):
        for j in range(c):
            s, t = student[i, j].ravel() / tau, teacher[i, j].ravel() / tau
            p_t = np.exp(t - t.max()) / np.exp(t - t.max()).sum()
            log_p_s = s - s.max() - np.log(np.exp(s - s.max()).sum())
            log_p_t = np.log(p_t)
            total += float((p_t * (log_p_t - log_p_s)).sum())
    return total * tau**2 / (n * c)


def total(losses: dict) -> torch.Tensor:
    return sum(sum(v) if isinstance(v, list) else v for k, v in losses.items() if "loss" in k)


def cwd_term(level: int, weight: float = 1.0, **extra) -> dict:
    return dict(name=f"cwd_p{level + 3}", loss=dict(type="cwd", temperature=2.0), student=f"neck:{level}",
                teacher=f"neck:{level}", connector="auto", weight=weight, **extra)


def test_loss_dict_holds_student_losses_and_weighted_terms(make_model, batch):
    student, teacher = make_model("student", 1), make_model("teacher", 2)
    terms = [cwd_term(0, weight=3.0),
             dict(name="mse_p4", loss="mse", student="neck:1", teacher="neck:1", connector="auto", weight=0.5)]
    model = DetectionDistiller(student, teacher, distill=dict(terms=terms)).train()
    x, samples = batch["inputs"], batch["data_samples"]
    losses = model(x, samples, mode="loss")
    assert set(losses) == {"loss_cls", "loss_bbox", "loss_cwd_p3", "loss_mse_p4"}

    with torch.no_grad():  # recompute every term from features extracted separately
        s_feats, t_feats = student.extract_feat(x), teacher.extract_feat(x)
        s3 = model.distiller.connectors["cwd_p3"](s_feats[0], t_feats[0].shape).numpy()
        s4 = model.distiller.connectors["mse_p4"](s_feats[1], t_feats[1].shape).numpy()
        plain = student(x, samples, mode="loss")
    assert s3.shape == (2, 32, 8, 8)  # the 1x1 connector maps 16 -> 32 channels
    expected_cwd = 3.0 * cwd_reference(s3, t_feats[0].numpy(), tau=2.0)
    expected_mse = 0.5 * float(((s4 - t_feats[1].numpy()) ** 2).mean())
    assert losses["loss_cwd_p3"].item() == pytest.approx(expected_cwd, rel=1e-4)
    assert losses["loss_mse_p4"].item() == pytest.approx(expected_mse, rel=1e-4)
    for key in ("loss_cls", "loss_bbox"):  # the student's own losses, unchanged
        assert sum(losses[key]).item() == pytest.approx(sum(plain[key]).item(), rel=1e-5)


def test_gradients_reach_student_and_connectors_never_teacher(make_model, batch):
    student, teacher = make_model("student"), make_model("teacher")
    model = DetectionDistiller(student, teacher, distill=dict(terms=[cwd_term(0), cwd_term(1)]))
    model.train()
    assert model.student.training and not model.teacher.training  # the teacher stays in eval mode
    assert not any(n.startswith("teacher") or ".teacher." in n for n in model.state_dict())
    teacher_ids = {id(p) for p in teacher.parameters()}
    assert not teacher_ids & {id(p) for p in model.parameters()}  # not in the optimiser / DDP's view

    losses = model(batch["inputs"], batch["data_samples"], mode="loss")
    (losses["loss_cwd_p3"] + losses["loss_cwd_p4"]).backward()
    assert student.backbone.conv1.weight.grad.abs().sum() > 0
    assert student.neck.fpn_convs[0].conv.weight.grad.abs().sum() > 0
    assert model.distiller.connectors["cwd_p3"].inner.body[0].weight.grad.abs().sum() > 0
    assert student.bbox_head.retina_cls.weight.grad is None  # the head is not in these terms
    assert all(p.grad is None and not p.requires_grad for p in teacher.parameters())


def test_zero_weight_equals_plain_training_and_skips_teacher(make_model, batch):
    student, teacher = make_model("student"), make_model("teacher")
    plain = copy.deepcopy(student).train()
    model = DetectionDistiller(student, teacher, distill=dict(terms=[cwd_term(0, weight=0.0)])).train()
    calls = []
    teacher.backbone.register_forward_hook(lambda *a: calls.append(1))
    x, samples = batch["inputs"], batch["data_samples"]
    losses, reference = model(x, samples, mode="loss"), plain(x, samples, mode="loss")
    assert set(losses) == set(reference) | {"loss_idle_terms"} and not calls
    assert losses["loss_idle_terms"].item() == 0.0  # keeps the idle connector in the graph (DDP), adds nothing
    total(losses).backward()
    total(reference).backward()
    for (name, p), q in zip(student.named_parameters(), plain.parameters()):
        assert torch.allclose(p.grad, q.grad, atol=1e-6), name


def test_teacher_runs_only_up_to_its_last_tap(make_model, batch):
    student, teacher = make_model("student"), make_model("teacher")
    head_calls = []
    teacher.bbox_head.register_forward_hook(lambda *a: head_calls.append(1))
    neck_only = DetectionDistiller(student, teacher, distill=dict(terms=[cwd_term(2)])).train()
    head_calls.clear()  # the construction dry run
    neck_only(batch["inputs"], batch["data_samples"], mode="loss")
    assert head_calls == []
    scores = dict(name="cls_p3", loss="mse", student="bbox_head:0.0", teacher="bbox_head:0.0")
    with_head = DetectionDistiller(make_model("student"), teacher, distill=dict(terms=[scores])).train()
    head_calls.clear()
    losses = with_head(batch["inputs"], batch["data_samples"], mode="loss")
    assert head_calls == [1] and losses["loss_cls_p3"] > 0


def test_predict_and_tensor_modes_are_the_students(make_model, batch):
    student = make_model("student")
    model = DetectionDistiller(student, make_model("teacher"), distill=dict(terms=[cwd_term(0)])).eval()
    assert model.data_preprocessor is student.data_preprocessor
    x, samples = batch["inputs"], batch["data_samples"]
    with torch.no_grad():
        ours, theirs = model(x, samples, mode="tensor"), student(x, samples, mode="tensor")
        preds = model(x, copy.deepcopy(samples), mode="predict")
    assert all(torch.equal(a, b) for a, b in zip(ours[0], theirs[0]))
    assert len(preds) == 2 and hasattr(preds[0], "pred_instances")


def test_teacher_inputs_follow_the_teachers_own_normalisation(det_dir, make_model):
    from mmdet.registry import MODELS

    cfg = Config.fromfile(str(det_dir / "teacher.py")).model
    cfg.data_preprocessor.update(mean=[100.0, 110.0, 120.0], std=[50.0, 60.0, 70.0], bgr_to_rgb=False)
    teacher = MODELS.build(cfg)
    student = make_model("student")
    model = DetectionDistiller(student, teacher, distill=dict(terms=[cwd_term(0)]))
    raw = raw_batch(make_images(2, seed=5))
    x_student = student.data_preprocessor(copy.deepcopy(raw), False)["inputs"]
    x_teacher = teacher.data_preprocessor(copy.deepcopy(raw), False)["inputs"]
    assert not torch.allclose(x_student, x_teacher)
    assert torch.allclose(model.teacher_inputs(x_student), x_teacher, atol=1e-4)
    same = DetectionDistiller(make_model("student"), make_model("teacher"), distill=dict(terms=[cwd_term(0)]))
    assert same.teacher_inputs(x_student) is x_student


def test_wrong_tap_name_lists_close_matches(make_model):
    term = dict(name="cwd", loss="cwd", student="nek:0", teacher="neck:0")
    with pytest.raises(UnknownTapError, match="did you mean 'neck'"):
        DetectionDistiller(make_model("student"), make_model("teacher"), distill=dict(terms=[term]))


@pytest.mark.parametrize("distill, message", [
    (dict(terms=[dict(name="kd", loss="kd")]), "does not apply to detectors"),
    (dict(terms=[]), "has no 'terms'"),
    (dict(terms=[cwd_term(0)], temperature=2), "unknown key 'temperature'"),
    (dict(terms=[dict(name="cls", loss="mse", student="neck:0", teacher="neck:0", connector="auto")]), "clashes"),
])
def test_recipe_mistakes_are_named(make_model, batch, distill, message):
    with pytest.raises(KDConfigError, match=message):
        model = DetectionDistiller(make_model("student"), make_model("teacher"), distill=distill).train()
        model(batch["inputs"], batch["data_samples"], mode="loss")


@pytest.mark.parametrize("recipe", ["cwd_retinanet_fpn.py", "fitnet_retinanet_fpn.yaml", "defeat_retinanet_fpn.py"])
def test_shipped_recipes_build_and_give_finite_terms(make_model, batch, recipe):
    distill = load_config(RECIPES / recipe)["distill"]
    model = DetectionDistiller(make_model("student"), make_model("teacher"), distill=distill).train()
    losses = model(batch["inputs"], batch["data_samples"], mode="loss")
    names = {f"loss_{t['name']}" for t in distill["terms"]}
    assert names <= set(losses)
    assert all(torch.isfinite(losses[n]) for n in names)
    assert sum(losses[n] for n in names) > 0


def test_teacher_checkpoint_loads_and_mismatches_are_reported(det_dir, make_model, trained_teacher_ckpt, tmp_path):
    terms = dict(terms=[cwd_term(0)])
    model = DetectionDistiller(make_model("student"), make_model("teacher", seed=9), teacher_ckpt=str(trained_teacher_ckpt),
                               distill=terms)
    state = torch.load(trained_teacher_ckpt, weights_only=False)["state_dict"]
    assert model.teacher_load_report.ok
    assert all(torch.equal(v, state[k]) for k, v in model.teacher.state_dict().items())

    partial = tmp_path / "partial.pth"
    torch.save({"state_dict": {k: v for k, v in state.items() if not k.startswith("bbox_head.")}}, partial)
    with pytest.raises(KDConfigError, match="NOT in the checkpoint: bbox_head"):
        DetectionDistiller(make_model("student"), make_model("teacher"), teacher_ckpt=str(partial), distill=terms)
    loose = DetectionDistiller(make_model("student"), make_model("teacher"), teacher_ckpt=str(partial),
                               teacher_strict=False, distill=terms)
    assert not loose.teacher_load_report.ok and "bbox_head.retina_cls.weight" in loose.teacher_load_report.missing

    wrong = tmp_path / "student.pth"  # a checkpoint of another architecture
    torch.save({"state_dict": make_model("student").state_dict()}, wrong)
    with pytest.raises(KDConfigError, match="does not fit the model built from its config"):
        DetectionDistiller(make_model("student"), make_model("teacher"), teacher_ckpt=str(wrong), distill=terms)
    with pytest.raises(KDConfigError, match="does not exist"):
        DetectionDistiller(make_model("student"), make_model("teacher"), teacher_ckpt=str(tmp_path / "nope.pth"),
                           distill=terms)


def test_fcos_teacher_with_caffe_normalisation_teaches_a_retinanet(make_model, batch):
    """Heterogeneous pair from mmdet's bundled FCOS config: BGR input with caffe mean/std 1, GroupNorm head."""
    from det_helpers import mmdet_config_dir
    from mmdet.registry import MODELS

    cfg = Config.fromfile(str(mmdet_config_dir() / "fcos" / "fcos_r50-caffe_fpn_gn-head_1x_coco.py")).model
    cfg.backbone.update(depth=18, base_channels=16, init_cfg=None, frozen_stages=-1)
    cfg.neck.update(in_channels=[16, 32, 64, 128], out_channels=32)
    cfg.bbox_head.update(num_classes=2, in_channels=32, feat_channels=32, stacked_convs=1)
    torch.manual_seed(0)
    teacher = MODELS.build(cfg)
    student = make_model("student")
    model = DetectionDistiller(student, teacher, distill=dict(terms=[cwd_term(0), cwd_term(1)])).train()
    x = batch["inputs"]
    assert not torch.allclose(model.teacher_inputs(x), x)  # channel order, mean and scale differ
    losses = model(batch["inputs"], batch["data_samples"], mode="loss")
    assert {"loss_cls", "loss_bbox", "loss_cwd_p3", "loss_cwd_p4"} <= set(losses)
    with torch.no_grad():
        t_feats = teacher.extract_feat(model.teacher_inputs(batch["inputs"]))
        s = model.distiller.connectors["cwd_p4"](student.extract_feat(batch["inputs"])[1], t_feats[1].shape)
    assert losses["loss_cwd_p4"].item() == pytest.approx(cwd_reference(s.numpy(), t_feats[1].numpy(), 2.0), rel=1e-4)
