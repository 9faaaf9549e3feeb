"""After `kd-tasks detect`: the student's tensor forward as ONNX (checked with onnxruntime) and the compression
report of teacher and student; the `--export` / `--no-report` options."""

from __future__ import annotations

import json
import re
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from conftest import build
from det_helpers import make_images, mmdet_config_dir, raw_batch, tiny_faster_rcnn

from kd_tasks.detection.export import (NOT_END_TO_END, config_input_size, detection_report, export_detector_onnx,
                                       pick_metric)
from kd_tasks.detection.hooks import CompressionReportHook
from kd_tasks.detection.train import build_config, build_parser, main
from kd_tasks.shared.errors import KDConfigError

ort = pytest.importorskip("onnxruntime")
RECIPE = Path(__file__).resolve().parents[2] / "configs" / "detection" / "cwd_retinanet_fpn.py"
LEVELS = [f"{group}_p{level}" for group in ("cls_score", "bbox_pred") for level in range(3, 8)]


def cli_args(det_dir: Path, work_dir: Path, ckpt: Path, *more: str) -> list[str]:
    return ["--teacher-config", str(det_dir / "teacher.py"), "--teacher-checkpoint", str(ckpt),
            "--student-config", str(det_dir / "student.py"), "--recipe", str(RECIPE), "--work-dir", str(work_dir),
            *more]


def tensor_outputs(detector, x: torch.Tensor) -> list[np.ndarray]:
    """PyTorch reference: MMDetection's own tensor mode, per-level lists flattened (class scores, then boxes)."""
    detector.eval()
    with torch.no_grad():
        groups = detector(x, mode="tensor")
    return [t.numpy() for group in groups for t in group]


def onnxruntime_outputs(path: Path, x: torch.Tensor) -> dict[str, np.ndarray]:
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [o.name for o in sess.get_outputs()]
    return dict(zip(names, sess.run(None, {sess.get_inputs()[0].name: x.numpy()})))


def images(seed: int, detector) -> torch.Tensor:
    """Two generated 64x64 images through the detector's data preprocessor."""
    with torch.no_grad():
        return detector.data_preprocessor(raw_batch(make_images(2, seed=seed)), False)["inputs"]


def last_logged(work_dir: Path, key: str) -> float:
    values = [row[key] for f in sorted(work_dir.glob("*/vis_data/scalars.json"))
              for row in map(json.loads, f.read_text().splitlines()) if key in row]
    return values[-1]


def teacher_map_by_plain_mmengine(det_dir: Path, ckpt: Path, work_dir: Path) -> float:
    """The teacher's COCO mAP from MMEngine's own Runner.val() on the teacher config's validation set."""
    from mmengine.config import Config
    from mmengine.runner import Runner

    from kd_tasks.detection.checkpoint import extract_state_dict, load_checkpoint_file

    teacher = build(det_dir / "teacher.py")
    teacher.load_state_dict(extract_state_dict(load_checkpoint_file(ckpt)), strict=True)
    cfg = Config.fromfile(str(det_dir / "teacher.py"))
    runner = Runner(model=teacher, work_dir=str(work_dir), val_dataloader=cfg.val_dataloader, val_cfg=cfg.val_cfg,
                    val_evaluator=cfg.val_evaluator, default_scope="mmdet")
    return float(runner.val()["coco/bbox_mAP"])


# ------------------------------------------------------------------------------------ end to end


def test_detect_exports_onnx_and_writes_the_report(det_dir, trained_teacher_ckpt, tmp_path):
    work = tmp_path / "run"
    # a score threshold low enough that the barely trained student detects something (else COCO gives no mAP)
    assert main(cli_args(det_dir, work, trained_teacher_ckpt, "--max-iters", "2", "--export", "onnx",
                         "--cfg-options", "model.student.test_cfg.score_thr=0.001")) == 0

    student = build(work / "student_config.py", seed=3)  # the exported student, in plain MMDetection
    student.load_state_dict(torch.load(work / "student.pth", weights_only=True)["state_dict"], strict=True)

    # ONNX: every raw head tensor equals PyTorch's tensor mode, at the export size and at another (dynamic) shape
    record = json.loads((work / "student_onnx.json").read_text())
    assert record["graph"] == NOT_END_TO_END and "NOT an end-to-end detector" in record["graph"]
    assert [o["name"] for o in record["outputs"]] == LEVELS
    assert [o["stride"] for o in record["outputs"]] == [8, 16, 32, 64, 128] * 2
    assert record["input"]["shape"] == [1, 3, 64, 64]  # the test pipeline's Resize scale, padded to 32
    assert 0 <= record["check"]["max_abs_diff"] <= record["check"]["atol"]
    x = images(9, student)
    for inputs in (x[:1], torch.cat([x, x.flip(-1)], dim=-1)):  # (1, 3, 64, 64) and (2, 3, 64, 128)
        got = onnxruntime_outputs(work / "student.onnx", inputs)
        assert list(got) == LEVELS
        for name, ref in zip(LEVELS, tensor_outputs(student, inputs)):
            assert got[name].shape == ref.shape
            np.testing.assert_allclose(got[name], ref, atol=1e-4, rtol=1e-4)

    # the report: files, a real PNG, rows measured on the models themselves
    for name in ("report.md", "report.json", "report.png"):
        assert (work / name).is_file()
    png = (work / "report.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    import matplotlib.image

    assert matplotlib.image.imread(str(work / "report.png")).shape[0] > 100
    report = json.loads((work / "report.json").read_text())
    rows = {r["role"]: r for r in report["rows"]}
    assert rows["student"]["params"] == sum(p.numel() for p in student.parameters())
    teacher = build(det_dir / "teacher.py")
    assert rows["teacher"]["params"] == sum(p.numel() for p in teacher.parameters())
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        student.eval()(torch.zeros(1, 3, 64, 64), mode="tensor")
    assert rows["student"]["flops"] == counter.get_total_flops()  # per image, at the test input size
    assert rows["teacher"]["flops"] > rows["student"]["flops"] and rows["student"]["peak_bytes"] > 0
    # metrics: the student's last validation mAP of the run; the teacher's equals a plain MMEngine validation
    assert rows["student"]["metric"] == pytest.approx(last_logged(work, "coco/bbox_mAP"))
    assert rows["teacher"]["metric"] == pytest.approx(teacher_map_by_plain_mmengine(det_dir, trained_teacher_ckpt,
                                                                                    tmp_path / "plain"))
    assert rows["teacher"]["metric"] > 0.3
    assert report["metric_name"] == "val coco/bbox_mAP"
    md = (work / "report.md").read_text()
    assert "student (distilled)" in md and "box decoding and NMS not included" in md and "64x64" in md


# ------------------------------------------------------------------------------------ ONNX parts


def test_onnx_round_trip_of_a_fresh_detector(make_model, tmp_path):
    student = make_model("student", seed=1)
    before = {k: v.clone() for k, v in student.state_dict().items()}
    x = images(4, student)
    record = export_detector_onnx(student, x[:1], tmp_path / "s.onnx")
    assert student.training and all(torch.equal(v, before[k]) for k, v in student.state_dict().items())
    assert record["input"]["dynamic_axes"] == ["batch", "height", "width"]
    assert json.loads((tmp_path / "s_onnx.json").read_text())["outputs"] == record["outputs"]
    wide = torch.nn.functional.pad(x, (0, 32, 0, 64))  # (2, 3, 128, 96)
    got = onnxruntime_outputs(tmp_path / "s.onnx", wide)
    for name, ref in zip(LEVELS, tensor_outputs(student, wide)):
        np.testing.assert_allclose(got[name], ref, atol=1e-4, rtol=1e-4)


def test_an_onnx_graph_that_differs_from_pytorch_is_refused(make_model, tmp_path, monkeypatch):
    import kd_tasks.shared.export as shared_export

    run_onnx = shared_export.run_onnx
    monkeypatch.setattr(shared_export, "run_onnx", lambda *a, **k: [o + 0.01 for o in run_onnx(*a, **k)])
    student = make_model("student")
    with pytest.raises(KDConfigError, match=r"differs from PyTorch beyond the tolerance.*cls_score_p3.*s.onnx removed"):
        export_detector_onnx(student, images(4, student)[:1], tmp_path / "s.onnx")
    assert not (tmp_path / "s.onnx").exists()


class _FFTReal(torch.nn.Module):
    """A layer ONNX has no form for (``aten::fft_fft2``) that keeps the shape."""

    def forward(self, x):
        return torch.fft.fft2(x).real


def test_ops_onnx_cannot_express_are_named_with_mmdeploy_as_the_fix(det_dir, make_model, tmp_path):
    from mmdet.registry import MODELS
    from mmengine.config import Config

    x = torch.zeros(1, 3, 64, 64)
    cfg = Config.fromfile(str(det_dir / "student.py")).model
    cfg.backbone.update(depth=50, dcn=dict(type="DCN", deform_groups=1, fallback_on_stride=False),
                        stage_with_dcn=(False, False, False, True))  # a deformable-conv ResNet-50, made tiny
    cfg.neck.in_channels = [32, 64, 128, 256]
    with pytest.raises(KDConfigError, match=r"RetinaNet fails on an input of shape \(1, 3, 64, 64\).*input_size"):
        export_detector_onnx(MODELS.build(cfg), x, tmp_path / "dcn.onnx")  # its last stage is too small for DCN
    with pytest.raises(KDConfigError, match=r"mmcv::MMCVDeformConv2d.*custom ops onnxruntime cannot run.*mmdeploy"):
        export_detector_onnx(MODELS.build(cfg), torch.zeros(1, 3, 128, 128), tmp_path / "dcn.onnx")
    assert not (tmp_path / "dcn.onnx").exists()

    student = make_model("student")
    student.bbox_head.retina_cls = torch.nn.Sequential(_FFTReal(), student.bbox_head.retina_cls)
    with pytest.raises(KDConfigError, match=r"the op aten::fft_fft2 has no ONNX form.*mmdeploy") as e:
        export_detector_onnx(student, x, tmp_path / "fft.onnx")
    assert "\n" not in str(e.value)

    with pytest.raises(KDConfigError, match=r"FasterRCNN needs per-image metadata.*not a fixed ONNX graph.*mmdeploy"):
        export_detector_onnx(MODELS.build(Config(tiny_faster_rcnn())), x, tmp_path / "frcnn.onnx")


def test_test_input_size_comes_from_the_test_pipeline(det_dir):
    from mmengine.config import Config

    stock = Config.fromfile(str(mmdet_config_dir() / "retinanet" / "retinanet_r50_fpn_1x_coco.py"))
    assert config_input_size(stock, 32)[0] == (800, 1344)  # Resize scale (1333, 800) is (w, h)
    assert config_input_size(Config.fromfile(str(det_dir / "student.py")), 32)[0] == (64, 64)
    wrapped = {"test_dataloader": {"dataset": {"type": "RepeatDataset", "dataset": {"pipeline": [
        {"type": "LoadImageFromFile"}, {"type": "mmdet.FixShapeResize", "width": 100, "height": 60}]}}}}
    assert config_input_size(wrapped, 32)[0] == (64, 128)
    assert config_input_size({"test_dataloader": {"dataset": {"pipeline": []}}}) is None


# ------------------------------------------------------------------------------------ report parts


def test_report_with_an_empty_teacher_metric_says_why(make_model, tmp_path):
    student, teacher = make_model("student"), make_model("teacher")
    x = images(4, student)[:1]
    report, paths = detection_report(student, teacher, x, tmp_path, student_metric=0.25, teacher_metric=None,
                                     notes=["The teacher's metric is empty: its validation pass was skipped."],
                                     batch_size=2, warmup=0, repeats=2)
    rows = {r["role"]: r for r in json.loads(paths["json"].read_text())["rows"]}
    assert rows["teacher"]["metric"] is None and rows["student"]["metric"] == 0.25  # unknown: JSON null
    assert rows["student"]["params"] == sum(p.numel() for p in student.parameters())
    assert "validation pass was skipped" in paths["markdown"].read_text()
    assert paths["png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # neither metric known (a barely trained student detects nothing; teacher not validated): tables, no plot
    _, paths = detection_report(student, teacher, x, tmp_path / "none", student_metric=None, teacher_metric=None,
                                batch_size=2, warmup=0, repeats=2)
    assert "png" not in paths and "No report.png: neither model has a metric." in paths["markdown"].read_text()
    assert all(r["metric"] is None for r in json.loads(paths["json"].read_text())["rows"])


def test_metric_choice_and_refusals():
    assert pick_metric({"coco/bbox_mAP_50": 0.9, "coco/bbox_mAP": 0.4}) == ("coco/bbox_mAP", 0.4)
    assert pick_metric({"pascal_voc/AP50": 0.7, "pascal_voc/mAP": 0.6}) == ("pascal_voc/mAP", 0.6)
    assert pick_metric({}) == (None, None)  # COCO gives no metrics when nothing was detected: nothing made up
    with pytest.raises(KDConfigError, match="no mAP among the validation results"):
        pick_metric({"accuracy/top1": 0.5})
    with pytest.raises(KDConfigError, match=r"'coco/segm_mAP' is not among"):
        pick_metric({"coco/bbox_mAP": 0.4}, "coco/segm_mAP")
    with pytest.raises(KDConfigError, match=r"no validation.*--no-report"):
        CompressionReportHook().before_train(SimpleNamespace(_val_loop=None))


# ------------------------------------------------------------------------------------ command line


def test_export_and_report_options(det_dir, trained_teacher_ckpt, tmp_path, capsys):
    argv = cli_args(det_dir, tmp_path / "w", trained_teacher_ckpt)
    with pytest.raises(SystemExit) as e:
        main([*argv, "--export", "tflite"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("kd-tasks detect: error: argument --export: invalid choice: 'tflite'") and "onnx" in err
    assert "Traceback" not in err

    def hooks(*more: str) -> dict[str, dict]:
        cfg = build_config(build_parser().parse_args([*argv, *more]))
        return {h["type"]: h for h in cfg.custom_hooks}

    default = hooks()
    assert "CompressionReportHook" in default and "OnnxExportHook" not in default
    with_onnx = hooks("--export", "onnx", "--no-teacher-val")
    assert list(with_onnx)[-2:] == ["CompressionReportHook", "OnnxExportHook"]  # after StudentExportHook
    assert with_onnx["CompressionReportHook"]["teacher_metric"] is False
    assert "CompressionReportHook" not in hooks("--no-report")
    with pytest.raises(SystemExit):
        main(["--help"])
    assert "--export {onnx}" in capsys.readouterr().out
