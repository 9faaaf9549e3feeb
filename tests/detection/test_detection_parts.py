"""The detection adapter's parts: safe checkpoint reading, the box-masked feature loss, the hooks."""

from __future__ import annotations

import pickle
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from det_helpers import make_images, raw_batch
from mmengine.logging import HistoryBuffer

from kd_tasks.detection import DetectionDistiller, ForegroundFeatureLoss, boxes_to_mask
from kd_tasks.detection.checkpoint import (Placeholder, extract_state_dict, load_checkpoint_file, make_weights_only,
                                           restore_weights_only)
from kd_tasks.detection.hooks import DistillStepHook, TeacherCheckHook, export_student
from kd_tasks.shared.errors import KDConfigError
from kd_tasks.shared.registry import LOSSES

# ------------------------------------------------------------------------------------ checkpoints


class _Touch:
    """Unpickling this object creates a file: a stand-in for code a malicious checkpoint would run."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return open, (self.path, "w")


def test_restricted_loader_builds_tensors_and_runs_no_code(tmp_path):
    weights = {"conv.weight": torch.randn(2, 3), "bn.num_batches_tracked": torch.tensor(4)}
    path = tmp_path / "ckpt.pth"
    torch.save({"state_dict": weights, "meta": {"payload": _Touch(tmp_path / "pwned"), "seed": np.int64(3)},
                "message_hub": {"log_scalars": {"loss": HistoryBuffer([1.0], [1])}}}, path)
    with pytest.raises(pickle.UnpicklingError):  # the default safe loader refuses the file outright
        torch.load(path, weights_only=True)
    loaded = load_checkpoint_file(path)
    assert not (tmp_path / "pwned").exists()
    assert isinstance(loaded["meta"]["payload"], Placeholder) and "open" in repr(loaded["meta"]["payload"])
    assert isinstance(loaded["message_hub"]["log_scalars"]["loss"], Placeholder)
    assert all(torch.equal(loaded["state_dict"][k], v) for k, v in weights.items())
    torch.load(path, weights_only=False)  # the unrestricted loader does run the payload
    assert (tmp_path / "pwned").exists()


def test_extract_state_dict_strips_wrappers_and_prefixes():
    t = torch.zeros(1)
    ckpt = {"state_dict": {"module.distiller.student.a": t, "module.distiller.connectors.c": t, "n": 3}}
    assert set(extract_state_dict(ckpt)) == {"distiller.student.a", "distiller.connectors.c"}
    assert set(extract_state_dict(ckpt, prefix="distiller.student.")) == {"a"}
    with pytest.raises(KDConfigError, match="no tensors under 'teacher.'"):
        extract_state_dict(ckpt, prefix="teacher.")


def test_mmengine_state_round_trips_through_weights_only_load(tmp_path):
    buffer = HistoryBuffer([3.0, 2.5, 2.0], [1, 1, 2], max_length=50)
    checkpoint = {"meta": {"iter": 3, "seed": np.int64(7), "dataset_meta": {"classes": ("a", "b")}},
                  "state_dict": {"w": torch.ones(2)},
                  "message_hub": {"log_scalars": {"train/loss": buffer},
                                  "runtime_info": {"lr": np.float64(0.1), "hist": np.arange(3)},
                                  "resumed_keys": {"train/loss": True}}}
    path = tmp_path / "c.pth"
    torch.save(make_weights_only(checkpoint), path)
    loaded = restore_weights_only(torch.load(path, weights_only=True))  # no allow-list needed
    restored = loaded["message_hub"]["log_scalars"]["train/loss"]
    assert isinstance(restored, HistoryBuffer) and restored.max_length == 50
    np.testing.assert_array_equal(restored.data[0], buffer.data[0])
    np.testing.assert_array_equal(restored.data[1], buffer.data[1])
    assert restored.mean() == pytest.approx(buffer.mean())
    assert loaded["message_hub"]["runtime_info"] == {"lr": 0.1, "hist": [0, 1, 2]}
    assert loaded["meta"]["seed"] == 7 and loaded["meta"]["dataset_meta"]["classes"] == ("a", "b")


# ------------------------------------------------------------------------------------ fg_feature


def test_boxes_to_mask_marks_the_cells_a_box_overlaps():
    boxes = [torch.tensor([[0.0, 0.0, 16.0, 16.0]]), torch.tensor([[15.0, 17.0, 17.0, 33.0]]), torch.zeros(0, 4)]
    mask = boxes_to_mask(boxes, (3, 8, 4, 4), (64, 64))  # stride 16
    expected = torch.zeros(3, 1, 4, 4)
    expected[0, 0, 0, 0] = 1  # exactly one cell
    expected[1, 0, 1:3, 0:2] = 1  # x 15..17 crosses columns 0|1, y 17..33 crosses rows 1|2
    assert torch.equal(mask, expected)


def _fg_reference(s, t, boxes, input_shape, fg_w, bg_w):
    """Loops over cells: a cell is foreground if its [j*sx, (j+1)*sx) x [i*sy, (i+1)*sy) overlaps a box."""
    b, c, h, w = s.shape
    sy, sx = input_shape[0] / h, input_shape[1] / w
    fg_sum = bg_sum = fg_n = bg_n = 0.0
    for n in range(b):
        for i in range(h):
            for j in range(w):
                inside = any(j * sx < x2 and (j + 1) * sx > x1 and i * sy < y2 and (i + 1) * sy > y1
                             for x1, y1, x2, y2 in boxes[n].tolist())
                sq = float(((s[n, :, i, j] - t[n, :, i, j]) ** 2).sum())
                if inside:
                    fg_sum, fg_n = fg_sum + sq, fg_n + c
                else:
                    bg_sum, bg_n = bg_sum + sq, bg_n + c
    return fg_w * (fg_sum / fg_n if fg_n else 0.0) + bg_w * (bg_sum / bg_n if bg_n else 0.0)


@pytest.mark.parametrize("batch", [1, 3])
def test_fg_feature_matches_a_loop_over_cells(batch):
    g = torch.Generator().manual_seed(batch)
    s, t = torch.randn(batch, 5, 6, 7, generator=g), torch.randn(batch, 5, 6, 7, generator=g)
    boxes = [torch.rand(2, 2, generator=g).mul(40).repeat(1, 2) + torch.tensor([0.0, 0.0, 12.0, 9.0])
             for _ in range(batch)]
    loss = LOSSES.build({"type": "fg_feature", "fg_weight": 2.0, "bg_weight": 0.5})
    s.requires_grad_(True)
    t.requires_grad_(True)
    value = loss(s, t, gt_boxes=boxes, input_shape=(48, 56))
    assert value.item() == pytest.approx(_fg_reference(s.detach(), t.detach(), boxes, (48, 56), 2.0, 0.5), rel=1e-5)
    value.backward()
    assert s.grad.abs().sum() > 0 and t.grad is None


def test_fg_feature_known_values_and_errors():
    loss = ForegroundFeatureLoss(fg_weight=1.0, bg_weight=1.0)
    x = torch.randn(2, 4, 5, 5)
    boxes = [torch.tensor([[0.0, 0.0, 10.0, 10.0]]), torch.zeros(0, 4)]
    assert loss(x, x.clone(), gt_boxes=boxes, input_shape=(20, 20)).item() == 0.0
    only_fg = ForegroundFeatureLoss(fg_weight=1.0, bg_weight=0.0)
    t = x.clone()
    t[:, :, 3:, :] += 1.0  # differs only on rows 3-4, all background (the box covers rows 0-2)
    assert only_fg(x, t, gt_boxes=boxes, input_shape=(20, 20)).item() == 0.0
    with pytest.raises(KDConfigError, match="needs gt_boxes"):
        only_fg(x, t)
    with pytest.raises(ValueError, match="conv1x1"):
        only_fg(x, torch.randn(2, 8, 5, 5), gt_boxes=boxes, input_shape=(20, 20))


# ------------------------------------------------------------------------------------ hooks


def _runner(model, batches, iteration=0):
    return SimpleNamespace(model=model, train_dataloader=batches, iter=iteration,
                           message_hub=SimpleNamespace(scalars={}, update_scalar=lambda k, v: None))


def test_teacher_check_passes_a_trained_teacher_and_flags_a_random_one(make_model, trained_teacher_ckpt):
    batches = [raw_batch(make_images(4, seed=0))]
    terms = dict(terms=[dict(name="cwd", loss="cwd", student="neck:0", teacher="neck:0", connector="auto")])
    trained = DetectionDistiller(make_model("student"), make_model("teacher"), teacher_ckpt=str(trained_teacher_ckpt),
                                 distill=terms)
    student_state = {k: v.clone() for k, v in trained.student.state_dict().items()}
    hook = TeacherCheckHook(num_batches=1, on_fail="raise")
    hook.before_train(_runner(trained, batches))
    assert hook.result["ok"] and hook.result["teacher_loss"] < 0.9 * hook.result["untrained_loss"]
    assert trained.student.training  # restored
    assert all(torch.equal(v, student_state[k]) for k, v in trained.student.state_dict().items())  # BN untouched

    untrained = DetectionDistiller(make_model("student"), make_model("teacher"), teacher_ckpt=None, distill=terms)
    with pytest.raises(KDConfigError, match="no teacher checkpoint"):
        TeacherCheckHook(num_batches=1, on_fail="raise").before_train(_runner(untrained, batches))
    warn = TeacherCheckHook(num_batches=1, on_fail="warn")
    warn.before_train(_runner(untrained, batches))
    assert not warn.result["ok"] and warn.result["teacher_loss"] > 0.9 * warn.result["untrained_loss"]


def test_step_hook_drives_weight_schedules(make_model):
    ramp = {"schedule": "linear", "start": 0.0, "end": 2.0, "steps": 10}
    terms = [dict(name="cwd", loss="cwd", student="neck:0", teacher="neck:0", connector="auto", weight=ramp)]
    model = DetectionDistiller(make_model("student"), make_model("teacher"), distill=dict(terms=terms))
    logged = {}
    runner = _runner(model, [], iteration=5)
    runner.message_hub.update_scalar = lambda key, value: logged.__setitem__(key, value)
    DistillStepHook().before_train_iter(runner, 0)
    assert model.step == 5 and model.weights()["cwd"] == pytest.approx(1.0)
    assert logged == {"train/weight_cwd": pytest.approx(1.0)}


def test_exported_student_loads_strictly_into_plain_mmdet(make_model, tmp_path, batch):
    model = DetectionDistiller(make_model("student", seed=4), make_model("teacher"),
                               distill=dict(terms=[dict(name="m", loss="mse", student="neck:0", teacher="neck:0",
                                                        connector="auto")]))
    path = export_student(model, tmp_path / "student.pth", {"iter": 1})
    plain = make_model("student", seed=11)
    ckpt = torch.load(path, weights_only=True)
    assert not any(k.startswith(("student.", "distiller.")) for k in ckpt["state_dict"])
    plain.load_state_dict(ckpt["state_dict"], strict=True)
    plain.eval()
    model.eval()
    with torch.no_grad():
        ours, theirs = model(batch["inputs"], mode="tensor"), plain(batch["inputs"], mode="tensor")
    assert all(torch.equal(a, b) for a, b in zip(ours[0] + ours[1], theirs[0] + theirs[1]))
