"""``kd-tasks classify``: recipes run end to end on real digits and on a generated ImageFolder tree."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, load_model

from kd_tasks.classify import accuracy, build_model, build_parser, digits, main, near_chance
from kd_tasks.cli import COMMANDS

torch.set_num_threads(1)

RECIPES = Path(__file__).parents[1] / "configs" / "shared"
FAST = ["--batch-size", "64", "--quiet"]


def classify(tmp: Path, recipe: str, *extra: str, report: bool = False) -> tuple[int, dict]:
    code = main(["--recipe", str(RECIPES / recipe), "--output-dir", str(tmp), *FAST, *extra,
                 *([] if report else ["--no-report"])])
    results = json.loads((tmp / "results.json").read_text()) if code == 0 else {}
    return code, results


@pytest.fixture(scope="module")
def offline_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("offline")
    code, results = classify(out, "offline_hinton.yaml", *OFFLINE, report=True)
    assert code == 0
    return out, results


OFFLINE = ["--dataset", "digits", "--teacher", "cnn:8", "--train-teacher-epochs", "3", "--student", "cnn:4", "--epochs",
           "2", "--export", "onnx", "--quantize"]


def test_offline_recipe_exports_a_student_that_reproduces_the_reported_accuracy(offline_run):
    out, results = offline_run
    teacher_acc, student_acc = results["teachers"]["cnn:8"], results["student"]["cnn:4"]
    assert teacher_acc > 0.5  # a CNN trained for 3 epochs on digits; chance is 0.1
    student = build_model("cnn:4", 10, in_channels=1, image_size=8)
    load_model(student, results["student_weights"])
    _, val, _ = digits()
    assert accuracy(student, val) == pytest.approx(student_acc, abs=1e-9)
    assert Path(results["student_weights"]) == out / "student" / "export" / "model.safetensors"


def test_teacher_weights_from_a_file_are_used(offline_run, tmp_path, capsys):
    out, results = offline_run
    teacher = build_model("cnn:8", 10, in_channels=1, image_size=8)
    load_model(teacher, str(out / "teacher" / "export" / "model.safetensors"))
    torch.save({"state_dict": teacher.state_dict()}, tmp_path / "teacher.pth")
    code, again = classify(tmp_path / "run", "offline_hinton.yaml", "--dataset", "digits", "--teacher", "cnn:8",
                           "--teacher-weights", str(tmp_path / "teacher.pth"), "--student", "cnn:4", "--epochs", "0.1")
    assert code == 0
    assert again["teachers"]["cnn:8"] == pytest.approx(results["teachers"]["cnn:8"], abs=1e-9)
    assert "WARNING" not in capsys.readouterr().err
    assert not (tmp_path / "run" / "teacher").exists()  # loaded, not trained


def test_untrained_teacher_weights_give_a_loud_warning(tmp_path, capsys):
    torch.manual_seed(5)
    torch.save(build_model("cnn:4", 10, in_channels=1, image_size=8).state_dict(), tmp_path / "random.pt")
    code, _ = classify(tmp_path / "run", "offline_hinton.yaml", "--dataset", "digits", "--teacher", "cnn:4",
                       "--teacher-weights", str(tmp_path / "random.pt"), "--student", "cnn:4", "--epochs", "0.05")
    assert code == 0
    err = capsys.readouterr().err
    assert "WARNING" in err and "chance" in err and "--teacher-weights" in err


def test_near_chance_rule():
    assert near_chance(0.11, 10, 256) and not near_chance(0.5, 10, 256)
    assert near_chance(0.002, 1000, 256) and not near_chance(0.1, 1000, 256)
    assert near_chance(0.6, 2, 64) and not near_chance(0.9, 2, 64)


def write_image_folder(root: Path, per_class: int = 32) -> None:
    """Two classes of 16x16 PNGs: a bright square in the top-left or in the bottom-right corner (plus noise)."""
    from PIL import Image
    import numpy as np

    g = np.random.default_rng(0)
    for split in ("train", "val"):
        for label, corner in (("topleft", 0), ("bottomright", 8)):
            folder = root / split / label
            folder.mkdir(parents=True)
            for i in range(per_class):
                img = g.integers(0, 60, size=(16, 16, 3), dtype=np.uint8)
                img[corner:corner + 8, corner:corner + 8] = 230
                Image.fromarray(img).save(folder / f"{i}.png")


def test_takd_chain_trains_every_stage_in_one_command(tmp_path):
    write_image_folder(tmp_path / "imgs")
    out = tmp_path / "run"
    code, results = classify(out, "scheme_takd.yaml", "--data", str(tmp_path / "imgs"), "--image-size", "16",
                             "--teacher", "cnn:8", "--train-teacher-epochs", "6", "--assistant", "cnn:6",
                             "--student", "cnn:2", "--epochs", "2", "--batch-size", "8", "--num-classes", "2",
                             "--seed", "1")
    assert code == 0
    for stage in ("teacher", "assistant1", "student"):
        assert (out / stage / "export" / "model.safetensors").is_file(), stage
    torch.manual_seed(1 * 1000 + 200)  # the assistant's initialisation (seed * 1000 + 200 + index)
    initial = build_model("cnn:6", 2, in_channels=3, image_size=16).state_dict()
    trained = load_file(str(out / "assistant1" / "export" / "model.safetensors"))
    assert set(trained) == set(initial)
    assert not torch.equal(trained["layer1.0.weight"], initial["layer1.0.weight"])
    assert not torch.equal(trained["fc.weight"], initial["fc.weight"])
    assert set(results["assistants"]) == {"cnn:6 (assistant1)"} and set(results["student"]) == {"cnn:2"}
    logs = [json.loads(line) for line in (out / "student" / "log.jsonl").read_text().splitlines()]
    assert any("kd" in entry for entry in logs)  # the student stage was distilled, from the assistant
    assert results["teachers"]["cnn:8"] > 0.9  # the corner is easy to see


def test_dml_recipe_runs_without_a_teacher(tmp_path):
    code, results = classify(tmp_path, "scheme_dml.yaml", "--dataset", "digits", "--student", "cnn:4", "--epochs", "1")
    assert code == 0
    assert results["teachers"] == {} and 0.0 <= results["student"]["cnn:4"] <= 1.0
    student = build_model("cnn:4", 10, in_channels=1, image_size=8)
    load_model(student, results["student_weights"])
    logs = [json.loads(line) for line in (tmp_path / "student" / "log.jsonl").read_text().splitlines()]
    assert all("kd" in entry and "task" in entry for entry in logs)  # the peers' mutual KL and their CE


def test_missing_teacher_weights_file_exits_2_naming_the_path(tmp_path, capsys):
    missing = tmp_path / "nowhere" / "teacher.pth"
    code, _ = classify(tmp_path / "run", "offline_hinton.yaml", "--dataset", "digits", "--teacher", "cnn:8",
                       "--teacher-weights", str(missing), "--student", "cnn:4")
    assert code == 2
    err = capsys.readouterr().err
    assert str(missing) in err and "does not exist" in err


def test_teacher_weights_of_another_architecture_exit_2_with_the_keys(tmp_path, capsys):
    torch.save(build_model("cnn:4-8", 10, in_channels=1, image_size=8).state_dict(), tmp_path / "small.pt")
    code, _ = classify(tmp_path / "run", "offline_hinton.yaml", "--dataset", "digits", "--teacher", "cnn:8",
                       "--teacher-weights", str(tmp_path / "small.pt"), "--student", "cnn:4")
    assert code == 2
    err = capsys.readouterr().err
    assert "does not fit" in err and "missing" in err and "layer3" in err and "other shape" in err


def test_unknown_recipe_key_is_a_clear_error(tmp_path, capsys):
    recipe = tmp_path / "typo.yaml"
    recipe.write_text("distil:\n  terms:\n    - {name: kd, loss: kd}\n")
    code = main(["--recipe", str(recipe), "--dataset", "digits", "--teacher", "cnn:8", "--train-teacher-epochs", "1",
                 "--student", "cnn:4", "--output-dir", str(tmp_path / "run"), "--quiet"])
    assert code == 2
    err = capsys.readouterr().err
    assert "'distil'" in err and "did you mean 'distill'" in err
    assert not (tmp_path / "run").exists()  # rejected before any training


@pytest.mark.parametrize("extra, message", [
    (["--teacher", "resnet1800"], "did you mean 'resnet18'"),
    (["--teacher", "cnn:8"], "--train-teacher-epochs"),
])
def test_bad_teacher_options_are_clear_errors(tmp_path, capsys, extra, message):
    code, _ = classify(tmp_path, "offline_hinton.yaml", "--dataset", "digits", *extra, "--train-teacher-epochs",
                       "1" if "resnet1800" in extra else "0", "--student", "cnn:4")
    assert code == 2
    assert message in capsys.readouterr().err


def test_takd_without_assistant_is_a_clear_error(tmp_path, capsys):
    code, _ = classify(tmp_path, "scheme_takd.yaml", "--dataset", "digits", "--teacher", "cnn:8",
                       "--train-teacher-epochs", "1", "--student", "cnn:4")
    assert code == 2 and "--assistant" in capsys.readouterr().err


def test_registered_in_the_cli_with_examples():
    assert COMMANDS["classify"][0] == "kd_tasks.classify"
    epilog = build_parser().epilog
    assert "scheme_takd.yaml" in epilog and "--dataset digits" in epilog and "--teacher-weights" in epilog


def test_resume_after_a_finished_run_trains_nothing_more(offline_run):
    out, results = offline_run
    before = load_file(results["student_weights"])
    states = sorted(out.glob("*/checkpoints/*/state.pt"))
    assert [s.parents[2].name for s in states] == ["baseline", "student", "teacher"]
    saved = [s.stat().st_mtime_ns for s in states]
    code, again = classify(out, "offline_hinton.yaml", *OFFLINE, "--resume", report=True)
    assert code == 0 and again == results
    after = load_file(results["student_weights"])
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert [s.stat().st_mtime_ns for s in states] == saved  # both stages resumed at their end: no new checkpoint


# ------------------------------------------------------------------ runs that must not mix

DIGITS = ["--dataset", "digits", "--teacher", "cnn:4", "--train-teacher-epochs", "0.2", "--student", "cnn:2"]


def test_ctrl_c_exits_130_naming_the_step_and_resume_is_bit_identical(tmp_path, monkeypatch, capsys):
    import os
    import signal

    from kd_tasks.shared.training import Trainer

    code, _ = classify(tmp_path / "straight", "offline_hinton.yaml", *DIGITS, "--epochs", "0.5")
    assert code == 0
    original = Trainer._after_step

    def interrupt_student_step_3(self):
        if self.step == 3 and self.config.output_dir.endswith("student"):
            os.kill(os.getpid(), signal.SIGINT)
        return original(self)

    monkeypatch.setattr(Trainer, "_after_step", interrupt_student_step_3)
    code, _ = classify(tmp_path / "run", "offline_hinton.yaml", *DIGITS, "--epochs", "0.5")
    err = capsys.readouterr().err
    assert code == 130 and "Traceback" not in err
    assert "kd-tasks classify: interrupted: saved step 3; continue with --resume" in err
    monkeypatch.setattr(Trainer, "_after_step", original)
    code, _ = classify(tmp_path / "run", "offline_hinton.yaml", *DIGITS, "--epochs", "0.5")
    assert code == 2 and "--resume" in capsys.readouterr().err  # the interrupted run is not silently restarted
    code, results = classify(tmp_path / "run", "offline_hinton.yaml", *DIGITS, "--epochs", "0.5", "--resume")
    assert code == 0
    a = load_file(str(tmp_path / "straight" / "student" / "export" / "model.safetensors"))
    b = load_file(results["student_weights"])
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    steps = [json.loads(line)["step"] for line in (tmp_path / "run" / "student" / "log.jsonl").read_text().splitlines()]
    assert steps == sorted(set(steps))  # one run's log: no step logged twice


def test_a_second_run_into_a_used_directory_is_refused_then_overwritten(tmp_path, capsys):
    code, first = classify(tmp_path, "offline_hinton.yaml", *DIGITS, "--epochs", "0.2")
    assert code == 0
    weights = Path(first["student_weights"]).read_bytes()
    code, _ = classify(tmp_path, "offline_hinton.yaml", *DIGITS, "--epochs", "0.2", "--seed", "1")
    err = capsys.readouterr().err
    assert code == 2 and "already holds a run" in err and "--overwrite" in err
    assert Path(first["student_weights"]).read_bytes() == weights  # the first run is untouched
    code, second = classify(tmp_path, "offline_hinton.yaml", *DIGITS, "--epochs", "0.2", "--seed", "1", "--overwrite")
    assert code == 0 and Path(second["student_weights"]).read_bytes() != weights
    steps = [json.loads(line)["step"] for line in (tmp_path / "student" / "log.jsonl").read_text().splitlines()]
    assert steps == sorted(set(steps))


def test_resume_with_another_teacher_or_student_is_refused_naming_the_part(tmp_path, capsys):
    code, _ = classify(tmp_path / "run", "offline_hinton.yaml", *DIGITS, "--epochs", "0.2")
    assert code == 0
    teacher = build_model("cnn:4", 10, in_channels=1, image_size=8)
    torch.save(teacher.state_dict(), tmp_path / "other_teacher.pt")  # same shape, other weights
    code, _ = classify(tmp_path / "run", "offline_hinton.yaml", "--dataset", "digits", "--teacher", "cnn:4",
                       "--teacher-weights", str(tmp_path / "other_teacher.pt"), "--student", "cnn:2", "--epochs", "0.4",
                       "--resume")
    err = capsys.readouterr().err
    assert code == 2 and "belongs to another run" in err and "teacher weights" in err and "Traceback" not in err
    code, _ = classify(tmp_path / "run", "offline_hinton.yaml", *DIGITS[:-1], "cnn:3", "--epochs", "0.4", "--resume")
    err = capsys.readouterr().err
    assert code == 2 and "student architecture" in err and "Traceback" not in err


# ------------------------------------------------------------------ report, plots, ONNX


def test_report_compares_teacher_distilled_student_and_paired_baseline(offline_run):
    out, results = offline_run
    report = json.loads((out / "report.json").read_text())
    rows = {r["role"]: r for r in report["rows"] if r["role"] != "quantized"}
    assert set(rows) == {"teacher", "student", "baseline"}
    assert rows["student"]["metric"] == pytest.approx(results["student"]["cnn:4"])
    assert rows["baseline"]["metric"] == pytest.approx(results["baseline"]["cnn:4"])
    assert rows["student"]["params"] == rows["baseline"]["params"] < rows["teacher"]["params"]
    assert rows["teacher"]["retained"] == 1.0 and rows["student"]["speedup"] > 1
    assert [r["name"] for r in report["rows"] if r["role"] == "quantized"] == [
        "student cnn:4 (distilled) int8", "student cnn:4 alone int8"]
    for f in ("report.md", "report.png", "teacher/loss_curves.png", "student/loss_curves.png",
              "baseline/loss_curves.png"):
        assert (out / f).read_bytes()[:4] in (b"\x89PNG", b"| mo"), f
    # the baseline started from the student's initial weights (offset 300) and trained alone
    logs = [json.loads(line) for line in (out / "baseline" / "log.jsonl").read_text().splitlines()]
    assert logs and all("kd" not in entry for entry in logs)


def test_onnx_export_of_the_student_matches_pytorch(offline_run):
    import numpy as np

    from kd_tasks.shared.export import run_onnx

    out, results = offline_run
    assert results["student_onnx"] == str(out / "student" / "export" / "model.onnx")
    student = build_model("cnn:4", 10, in_channels=1, image_size=8)
    load_model(student, results["student_weights"])
    student.eval()
    _, val, _ = digits()
    x = val.x[:33]
    with torch.no_grad():
        ref = student(x).numpy()
    np.testing.assert_allclose(run_onnx(results["student_onnx"], x)[0], ref, atol=1e-4, rtol=1e-3)


def test_report_subcommand_rebuilds_a_classify_run(offline_run, tmp_path, capsys):
    from kd_tasks.cli import main as cli

    out, results = offline_run
    assert cli(["report", "--run", str(out), "--output-dir", str(tmp_path)]) == 0
    assert "FoM" in capsys.readouterr().out
    again = json.loads((tmp_path / "report.json").read_text())
    first = json.loads((out / "report.json").read_text())
    metric = lambda rep: {r["name"]: (r["metric"], r["params"], r["flops"], r["size_bytes"]) for r in rep["rows"]}  # noqa: E731
    assert metric(again) == {k: v for k, v in metric(first).items() if not k.endswith("int8")}


def test_learning_rate_and_config_aliases(tmp_path):
    a = build_parser().parse_args(["--config", "r.yaml", "--dataset", "digits", "--student", "cnn:2",
                                   "--learning-rate", "0.01"])
    assert a.recipe == Path("r.yaml") and a.lr == 0.01
