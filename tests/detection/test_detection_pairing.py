"""Safe pairing: FPN levels by stride, per-level head calls, the teacher check against its own untrained
copy, the student's own initialisation (seed, load_from) equal to plain MMDetection's, idle terms for DDP."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from det_helpers import make_images, raw_batch, tiny_faster_rcnn
from mmengine.config import ConfigDict
from test_detection_distiller import cwd_reference

from kd_tasks.detection import DetectionDistiller
from kd_tasks.detection.hooks import TeacherCheckHook
from kd_tasks.detection.levels import split_level
from kd_tasks.detection.train import build_config, build_parser, main, run
from kd_tasks.shared.errors import KDConfigError

RECIPES = Path(__file__).resolve().parents[2] / "configs" / "detection"


def faster_rcnn(seed: int = 0):
    from mmdet.registry import MODELS

    torch.manual_seed(seed)
    model = MODELS.build(ConfigDict(tiny_faster_rcnn()))
    model.init_weights()
    return model


def term(name, student, teacher=None, loss="mse", **extra):
    return dict(name=name, loss=loss, student=student, teacher=teacher or student, connector="auto", **extra)


def test_levels_pair_by_stride_across_detector_families(make_model, batch):
    """Faster R-CNN's FPN is P2-P6, RetinaNet's P3-P7: 'neck:0' on both would pair P3 with P2."""
    student = make_model("student")
    with pytest.raises(KDConfigError, match=r"pairs the student's 'neck:0' \(P3, stride 8\) with the teacher's "
                                            r"'neck:0' \(P2, stride 4\).*neck@P3"):
        DetectionDistiller(student, faster_rcnn(), distill=dict(terms=[term("p3", "neck:0")]))

    model = DetectionDistiller(make_model("student"), faster_rcnn(),
                               distill=dict(terms=[term("p3", "neck@P3"), term("p6", "neck@P6")]))
    resolved = {t["name"]: (t["student"], t["teacher"]) for t in model.resolved_terms}
    assert resolved == {"p3": ("neck:0", "neck:1"), "p6": ("neck:3", "neck:4")}
    losses = model.train()(batch["inputs"], batch["data_samples"], mode="loss")
    with torch.no_grad():
        s = model.student.extract_feat(batch["inputs"])[0]
        t = model.teacher.extract_feat(model.teacher_inputs(batch["inputs"]))[1]
        s = model.distiller.connectors["p3"](s, t.shape)
    assert s.shape[-2:] == t.shape[-2:] == (8, 8)  # 64 px / stride 8, no resize involved
    assert losses["loss_p3"].item() == pytest.approx(float(((s - t) ** 2).mean()), rel=1e-5)

    with pytest.raises(KDConfigError, match=r"teacher has no level of stride 128.*offers P2, P3, P4, P5, P6"):
        DetectionDistiller(make_model("student"), faster_rcnn(), distill=dict(terms=[term("p7", "neck@P7")]))
    assert split_level("bbox_head:0@P3") == ("bbox_head:0", 3) and split_level("neck:0") == ("neck:0", None)


def test_a_head_conv_run_per_level_is_compared_level_by_level(make_model, batch):
    """RetinaNet runs retina_cls once per FPN level; an unnumbered tap would mix the student's last call
    with the early-stopped teacher's first. It is refused; '@P4' picks the stride-16 call on each side."""
    with pytest.raises(KDConfigError, match=r"'bbox_head.retina_cls' runs 5 times.*'bbox_head.retina_cls#0'"):
        DetectionDistiller(make_model("student"), make_model("teacher"),
                           distill=dict(terms=[term("cls", "bbox_head.retina_cls", loss="mse")]))
    cls_terms = [dict(name="cls_p4", loss="mse", student="bbox_head.retina_cls@P4"),
                 dict(name="out_p4", loss="mse", student="bbox_head:0@P4")]
    student, teacher = make_model("student"), make_model("teacher")
    model = DetectionDistiller(student, teacher, distill=dict(terms=cls_terms)).train()
    assert [t["student"] for t in model.resolved_terms] == ["bbox_head.retina_cls#1", "bbox_head:0.1"]
    losses = model(batch["inputs"], batch["data_samples"], mode="loss")
    with torch.no_grad():
        s_cls = student(batch["inputs"], mode="tensor")[0][1]
        t_cls = teacher(model.teacher_inputs(batch["inputs"]), mode="tensor")[0][1]
    assert s_cls.shape[-2:] == (4, 4)  # 64 px / stride 16
    expected = float(((s_cls.double() - t_cls.double()) ** 2).mean())
    assert losses["loss_cls_p4"].item() == pytest.approx(expected, rel=1e-5)
    assert losses["loss_out_p4"].item() == pytest.approx(expected, rel=1e-5)


def test_teacher_check_compares_the_teacher_with_its_own_untrained_copy(make_model, trained_teacher_ckpt):
    from test_detection_parts import _runner

    batches = [raw_batch(make_images(4, seed=0))]
    terms = dict(terms=[term("p3", "neck@P3")])
    # a random two-stage teacher next to a one-stage student: summed losses of different heads are not
    # comparable, the teacher's own loss against its own random copy is
    random_frcnn = DetectionDistiller(make_model("student"), tiny_faster_rcnn(), teacher_ckpt=None, distill=terms)
    hook = TeacherCheckHook(num_batches=1)
    with pytest.raises(KDConfigError, match="no teacher checkpoint"):
        hook.before_train(_runner(random_frcnn, batches))
    random_frcnn.teacher_load_report = type("Loaded", (), {"ok": True})()  # pretend a checkpoint loaded
    with pytest.raises(KDConfigError, match=r"not clearly below that of the same detector with random weights"):
        TeacherCheckHook(num_batches=1).before_train(_runner(random_frcnn, batches))
    warn = TeacherCheckHook(num_batches=1, on_fail="warn")
    warn.before_train(_runner(random_frcnn, batches))
    assert not warn.result["ok"]

    trained = DetectionDistiller(make_model("student"), make_model("teacher"), teacher_ckpt=str(trained_teacher_ckpt),
                                 distill=terms)
    rng = torch.get_rng_state()
    ok = TeacherCheckHook(num_batches=1)
    ok.before_train(_runner(trained, batches))
    assert ok.result["ok"] and ok.result["teacher_loss"] < 0.9 * ok.result["untrained_loss"]
    assert torch.equal(rng, torch.get_rng_state())


def _cli(det_dir, work, ckpt, recipe=None, *more):
    return ["--teacher-config", str(det_dir / "teacher.py"), "--teacher-checkpoint", str(ckpt),
            "--student-config", str(det_dir / "student.py"), "--recipe", str(recipe or RECIPES / "cwd_retinanet_fpn.py"),
            "--work-dir", str(work), *more]


def test_user_settings_of_kd_hooks_are_kept(det_dir, trained_teacher_ckpt, tmp_path):
    student = tmp_path / "student.py"
    student.write_text(f"_base_ = [{str(det_dir / 'student.py')!r}]\n"
                       "custom_hooks = [dict(type='TeacherCheckHook', on_fail='warn', num_batches=3)]\n")
    argv = _cli(det_dir, tmp_path / "w", trained_teacher_ckpt)
    argv[argv.index("--student-config") + 1] = str(student)
    hooks = build_config(build_parser().parse_args(argv)).custom_hooks
    assert [h["type"] for h in hooks].count("TeacherCheckHook") == 1
    assert dict(type="TeacherCheckHook", on_fail="warn", num_batches=3) in hooks
    assert {"DistillStepHook", "SafeCheckpointHook", "StudentExportHook"} <= {h["type"] for h in hooks}
    hooks = build_config(build_parser().parse_args(argv + ["--teacher-check", "raise"])).custom_hooks
    assert dict(type="TeacherCheckHook", on_fail="raise", num_batches=3) in hooks


def _final_student(work: Path) -> dict:
    from kd_tasks.detection.checkpoint import extract_state_dict, load_checkpoint_file

    state = load_checkpoint_file(sorted(work.glob("iter_*.pth"))[-1])  # plain MMEngine files hold NumPy objects
    plain = extract_state_dict(state)
    return extract_state_dict(state, prefix="distiller.student.") if any(k.startswith("distiller.") for k in plain) else plain


def test_weight_zero_run_equals_plain_mmdetection_bit_for_bit(det_dir, trained_teacher_ckpt, tmp_path):
    """Same seed: the student starts from the same weights and sees the same batches as a plain MMDetection
    run of its own config (the stock AspectRatioBatchSampler included), so every paired comparison is fair."""
    from mmengine.config import Config
    from mmengine.runner import Runner

    from kd_tasks.detection.train import _iteration_schedule

    recipe = tmp_path / "zero.yaml"
    recipe.write_text("distill:\n  terms:\n    - {name: c, loss: cwd, student: 'neck@P3', teacher: 'neck@P3', "
                      "connector: conv1x1, weight: 0.0}\n")
    assert main(_cli(det_dir, tmp_path / "kd", trained_teacher_ckpt, recipe, "--max-iters", "3")) == 0
    cfg = Config.fromfile(str(det_dir / "student.py"))
    _iteration_schedule(cfg, 3)
    cfg.work_dir = str(tmp_path / "plain")
    cfg.visualizer.pop("name", None)
    runner = Runner.from_cfg(cfg)
    runner.train()
    kd, plain = _final_student(tmp_path / "kd"), _final_student(tmp_path / "plain")
    assert set(kd) == set(plain)
    differ = [k for k in plain if not torch.equal(kd[k], plain[k])]
    assert differ == []


def test_student_load_from_is_applied(det_dir, trained_teacher_ckpt, tmp_path, make_model):
    start = make_model("student", seed=7)
    ckpt = tmp_path / "student_start.pth"
    torch.save({"state_dict": start.state_dict()}, ckpt)
    student_cfg = tmp_path / "student.py"
    student_cfg.write_text(f"_base_ = [{str(det_dir / 'student.py')!r}]\nload_from = {str(ckpt)!r}\n")
    argv = _cli(det_dir, tmp_path / "w", trained_teacher_ckpt)
    argv[argv.index("--student-config") + 1] = str(student_cfg)
    cfg = build_config(build_parser().parse_args(argv))
    assert cfg.load_from is None and cfg.model.student_ckpt == str(ckpt)
    from mmdet.registry import MODELS

    model = MODELS.build(cfg.model)
    model.init_weights()
    assert all(torch.equal(v, start.state_dict()[k]) for k, v in model.student.state_dict().items())


def test_zero_weight_terms_keep_their_parameters_in_the_graph(make_model, batch):
    """DDP needs a gradient (zero is fine) for every parameter: a term at weight 0 still reaches its connector."""
    ramp = {"schedule": "linear", "start": 0.0, "end": 1.0, "steps": 10}
    model = DetectionDistiller(make_model("student"), make_model("teacher"),
                               distill=dict(terms=[term("p3", "neck@P3", weight=ramp)])).train()
    losses = model(batch["inputs"], batch["data_samples"], mode="loss")
    assert "loss_p3" not in losses and losses["loss_idle_terms"].item() == 0.0
    sum(v if torch.is_tensor(v) else sum(v) for k, v in losses.items() if "loss" in k).backward()
    weight = model.distiller.connectors["p3"].inner.body[0].weight
    assert weight.grad is not None and torch.count_nonzero(weight.grad) == 0


def test_stock_coco_dataset_config_runs_the_whole_path(det_dir, trained_teacher_ckpt, tmp_path):
    """mmdet's coco_detection base sets AspectRatioBatchSampler (DataLoader.batch_size is None)."""
    cfg = build_config(build_parser().parse_args(_cli(det_dir, tmp_path / "w", trained_teacher_ckpt,
                                                      None, "--max-iters", "1")))
    assert cfg.train_dataloader.batch_sampler.type == "AspectRatioBatchSampler"
    runner = run(cfg)
    check = next(h for h in runner.hooks if type(h).__name__ == "TeacherCheckHook")
    assert check.result["ok"] and check.result["teacher_loss"] < check.result["untrained_loss"]


def test_two_cpu_processes_over_gloo(det_dir, trained_teacher_ckpt, tmp_path):
    """`torchrun --nproc_per_node 2 ... --launcher pytorch` on a CPU machine, with a term at weight 0 for
    the first iterations (its connector would otherwise have no gradient and DDP would fail)."""
    import os
    import socket
    import subprocess
    import sys

    recipe = tmp_path / "ramp.yaml"
    recipe.write_text("distill:\n  terms:\n    - {name: c, loss: cwd, student: 'neck@P3', teacher: 'neck@P3', "
                      "connector: conv1x1, weight: {schedule: step, milestones: [2], values: [0.0, 1.0]}}\n")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join(sys.path))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port),
           "-m", "kd_tasks.detection.train", *_cli(det_dir, tmp_path / "ddp", trained_teacher_ckpt, recipe,
                                                 "--max-iters", "3", "--launcher", "pytorch")]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    log = "\n".join(f.read_text() for f in (tmp_path / "ddp").glob("*/*.log"))
    assert "Distributed launcher: pytorch" in log and "Distributed training: True" in log
    assert (tmp_path / "ddp" / "iter_3.pth").is_file() and (tmp_path / "ddp" / "student.pth").is_file()


def test_resume_refuses_a_checkpoint_of_another_run(det_dir, trained_teacher_ckpt, tmp_path, capsys, make_model):
    work = tmp_path / "run"
    assert main(_cli(det_dir, work, trained_teacher_ckpt, None, "--max-iters", "2")) == 0
    saved = torch.load(work / "iter_2.pth", weights_only=True)["meta"]["kd_run_identity"]
    assert set(saved) == {"student_architecture", "teacher", "recipe"}
    capsys.readouterr()
    other_recipe = RECIPES / "pkd_fpn.py"  # same models, another recipe
    assert main(_cli(det_dir, work, trained_teacher_ckpt, other_recipe, "--max-iters", "4", "--resume")) == 2
    err = capsys.readouterr().err
    assert "belongs to another run" in err and "recipe" in err and "Traceback" not in err
    other_teacher = tmp_path / "other_teacher.pth"  # same shapes, other weights
    torch.save({"state_dict": make_model("teacher", seed=9).state_dict()}, other_teacher)
    assert main(_cli(det_dir, work, other_teacher, None, "--max-iters", "4", "--resume", "--teacher-check", "warn")) == 2
    err = capsys.readouterr().err
    assert "belongs to another run" in err and "teacher weights" in err
    assert main(_cli(det_dir, work, trained_teacher_ckpt, None, "--max-iters", "4", "--resume")) == 0  # the same run


def test_one_name_per_concept_aliases(det_dir, trained_teacher_ckpt, tmp_path):
    argv = _cli(det_dir, tmp_path / "w", trained_teacher_ckpt)
    argv[argv.index("--work-dir")] = "--output-dir"
    argv[argv.index("--recipe")] = "--config"
    cfg = build_config(build_parser().parse_args(argv + ["--seed", "7"]))
    assert cfg.work_dir == str((tmp_path / "w").resolve()) and cfg.randomness.seed == 7
    assert cfg.model.distill["terms"][0]["name"] == "cwd_p3"
    text = build_parser().format_help()
    assert "--output-dir" in text and "--config" in text and "--seed" in text
