"""`kd-tasks detect` end to end with MMEngine's Runner: train, resume, export; and its error messages."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import build
from det_helpers import make_images, raw_batch

from kd_tasks.detection.checkpoint import extract_state_dict
from kd_tasks.detection.train import main

RECIPES = Path(__file__).resolve().parents[2] / "configs" / "detection"


def args(det_dir: Path, work_dir: Path, ckpt: Path, recipe: Path | None = None, *more: str) -> list[str]:
    return ["--teacher-config", str(det_dir / "teacher.py"), "--teacher-checkpoint", str(ckpt),
            "--student-config", str(det_dir / "student.py"), "--recipe", str(recipe or RECIPES / "cwd_retinanet_fpn.py"),
            "--work-dir", str(work_dir), *more]


def logged(work_dir: Path) -> dict[int, dict]:
    """Per-iteration training scalars of every run in ``work_dir`` (MMEngine's vis_data/scalars.json)."""
    rows = {}
    for f in sorted(work_dir.glob("*/vis_data/scalars.json")):
        for line in f.read_text().splitlines():
            row = json.loads(line)
            if "loss" in row:
                rows[row["step"]] = row
    return rows


def distill_loss(row: dict) -> float:
    return sum(v for k, v in row.items() if k.startswith("loss_cwd"))


def test_train_resume_and_export(det_dir, trained_teacher_ckpt, tmp_path, capsys):
    work = tmp_path / "run"
    assert main(args(det_dir, work, trained_teacher_ckpt, None, "--max-iters", "4")) == 0
    assert (work / "iter_4.pth").is_file()
    # the checkpoint reads with torch's safe loader as it is: that is what MMEngine's resume does
    first = torch.load(work / "iter_4.pth", weights_only=True)
    assert "distiller.connectors.cwd_p3.inner.body.0.weight" in first["state_dict"]
    assert not any("teacher" in k for k in first["state_dict"])

    capsys.readouterr()
    assert main(args(det_dir, work, trained_teacher_ckpt, None, "--max-iters", "8")) == 2  # neither --resume nor --overwrite
    err = capsys.readouterr().err
    assert "holds an earlier run (iter_4.pth" in err and "--resume" in err and "--overwrite" in err and "Traceback" not in err
    assert (work / "iter_4.pth").is_file() and (work / "student.pth").is_file()  # nothing of the first run lost
    assert main(args(det_dir, work, trained_teacher_ckpt, None, "--max-iters", "8", "--resume")) == 0
    assert (work / "iter_8.pth").is_file()
    rows = logged(work)
    assert sorted(rows) == list(range(1, 9))  # the second run went on from iteration 5
    for row in rows.values():
        assert all(k in row for k in ("loss_cls", "loss_bbox", *(f"loss_cwd_p{i}" for i in range(3, 8))))
        assert all(v == v and abs(v) < 1e6 for k, v in row.items() if k.startswith("loss"))
    assert distill_loss(rows[8]) < 0.9 * distill_loss(rows[1])
    log = "\n".join(f.read_text() for f in work.glob("*/*.log"))
    assert "resumed epoch: 0, iter: 4" in log
    assert "TeacherCheckHook: the teacher's own detection loss" in log and "TEACHER CHECK FAILED" not in log

    # student.pth: plain MMDetection keys, strict load, same outputs as the student inside the run
    exported = torch.load(work / "student.pth", weights_only=True)
    final = extract_state_dict(torch.load(work / "iter_8.pth", weights_only=True), prefix="distiller.student.")
    assert set(exported["state_dict"]) == set(final)
    plain = build(work / "student_config.py", seed=5)  # the config written next to it builds the student
    plain.load_state_dict(exported["state_dict"], strict=True)
    reference = build(det_dir / "student.py", seed=6)
    reference.load_state_dict(final, strict=True)
    plain.eval()
    reference.eval()
    x = plain.data_preprocessor(raw_batch(make_images(2, seed=9)), False)["inputs"]
    with torch.no_grad():
        a, b = plain(x, mode="tensor"), reference(x, mode="tensor")
    assert all(torch.equal(p, q) for p, q in zip(a[0] + a[1], b[0] + b[1]))


def test_help_shows_an_example(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    out = capsys.readouterr().out
    assert e.value.code == 0
    assert "kd-tasks detect" in out and "--teacher-checkpoint" in out and "--launcher pytorch" in out


@pytest.mark.parametrize("mistake, message", [
    ("missing_checkpoint", "--teacher-checkpoint '.*nope.pth' does not exist"),
    ("missing_config", "--student-config '.*nope.py' does not exist"),
    ("broken_config", "cannot read the student config"),
    ("unknown_tap", "did you mean 'neck'"),
    ("config_key", "unknown option 'distil'.*did you mean 'distill'"),
    ("recipe_key", "unknown key 'distil'"),
])
def test_cli_errors_name_the_problem(det_dir, trained_teacher_ckpt, tmp_path, capsys, mistake, message):
    ckpt, recipe, more = trained_teacher_ckpt, None, []
    argv = args(det_dir, tmp_path / "w", ckpt)
    if mistake == "missing_checkpoint":
        argv = args(det_dir, tmp_path / "w", tmp_path / "nope.pth")
    elif mistake == "missing_config":
        argv[argv.index("--student-config") + 1] = str(tmp_path / "nope.py")
    elif mistake == "broken_config":
        broken = tmp_path / "broken.py"
        broken.write_text("model = dict(type='RetinaNet'\n")
        argv[argv.index("--student-config") + 1] = str(broken)
    elif mistake == "unknown_tap":
        recipe = tmp_path / "r.yaml"
        recipe.write_text("distill:\n  terms:\n    - {name: c, loss: cwd, student: 'nek:0', teacher: 'neck:0'}\n")
        argv = args(det_dir, tmp_path / "w", ckpt, recipe)
    elif mistake == "config_key":
        more = ["--cfg-options", "model.distil=1"]
    elif mistake == "recipe_key":
        recipe = tmp_path / "r.yaml"
        recipe.write_text("distil:\n  terms: []\n")
        argv = args(det_dir, tmp_path / "w", ckpt, recipe)
    assert main(argv + more) == 2
    err = capsys.readouterr().err
    assert err.startswith("kd-tasks detect: error:")
    assert __import__("re").search(message, err), err


def test_checkpoints_are_atomic_and_a_damaged_newest_one_is_skipped_on_resume(det_dir, trained_teacher_ckpt,
                                                                            tmp_path, capsys):
    work = tmp_path / "run"
    every2 = ["--cfg-options", "default_hooks.checkpoint.interval=2"]
    assert main(args(det_dir, work, trained_teacher_ckpt, None, "--max-iters", "4", *every2)) == 0
    assert (work / "iter_2.pth").is_file() and (work / "iter_4.pth").is_file()
    assert not list(work.glob(".*tmp*"))  # written under a temporary name, renamed into place
    data = (work / "iter_4.pth").read_bytes()
    (work / "iter_4.pth").write_bytes(data[: len(data) // 3])  # a kill during a (non-atomic) write
    capsys.readouterr()
    assert main(args(det_dir, work, trained_teacher_ckpt, None, "--max-iters", "6", "--resume", *every2)) == 0
    err = capsys.readouterr().err
    assert "damaged checkpoint iter_4.pth" in err and "resuming from iter_2.pth" in err
    log = "\n".join(f.read_text() for f in work.glob("*/*.log"))
    assert "resumed epoch: 0, iter: 2" in log
    assert (work / "iter_6.pth").is_file()
