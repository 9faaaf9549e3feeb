"""``kd-tasks face`` end to end on a tiny generated identity folder with an ONNX teacher."""

import json

import pytest
import torch
from safetensors.torch import load_file

from face_helpers import embedding_net, export_onnx, make_identity_folder
from kd_tasks.cli import main as cli_main
from kd_tasks.face.data import IdentityFolder
from kd_tasks.face.models import load_student
from kd_tasks.face.train import main
from kd_tasks.face.verify import embed, evaluate_embeddings


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("face")
    make_identity_folder(root / "data", identities=6, images=6, size=24)
    export_onnx(embedding_net(16), root / "teacher.onnx")
    return root


def args(root, out, *extra):
    return ["--teacher", str(root / "teacher.onnx"), "--data", str(root / "data"), "--output-dir", str(out),
            "--student", "mobilefacenet_s", "--image-size", "16", "--batch-size", "8", "--val-identities", "2",
            "--log-every", "1", "--quiet", "--cpu", *extra]


def test_train_end_to_end_loss_falls_and_student_reloads(setup, tmp_path):
    out = tmp_path / "run"
    rc = main(args(setup, out, "--epochs", "4", "--margin", "arcface", "--scale", "16", "--kd", "cosine",
                   "--optimizer", "adam", "--lr", "0.01"))
    assert rc == 0
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    kd = [e["kd_cosine"] for e in log if "kd_cosine" in e]
    task = [e["task"] for e in log if "task" in e]
    assert len(kd) == 12
    assert sum(kd[-3:]) < sum(kd[:3]) and sum(task[-3:]) < sum(task[:3])
    report = json.loads((out / "verification.json").read_text())
    assert report["train_identities"] == 4 and report["val_identities"] == 2 and report["steps"] == 12
    assert 0.5 < report["teacher"]["auc"] <= 1
    # the exported student reloads and reproduces the reported verification
    student = load_student(out / "export")
    val = IdentityFolder(setup / "data", 16, report_val_ids(setup))
    from kd_tasks.face.data import verification_pairs

    pairs = verification_pairs(val.labels, max_pairs=6000, seed=0)
    again = evaluate_embeddings(embed(student, val), pairs)
    assert again["auc"] == pytest.approx(report["student"]["auc"], abs=1e-9)
    assert again["accuracy"] == pytest.approx(report["student"]["accuracy"], abs=1e-9)
    # the compression report: the teacher (onnxruntime) by its graph, the student measured, AUCs as verified
    comp = json.loads((out / "report.json").read_text())
    t_row, s_row = comp["rows"]
    assert t_row["params"] == sum(p.numel() for p in embedding_net(16).parameters()) and t_row["flops"] is None
    assert s_row["params"] == sum(p.numel() for p in student.parameters())
    assert s_row["metric"] == pytest.approx(again["auc"]) and t_row["metric"] == pytest.approx(report["teacher"]["auc"])
    assert report["compression_report"]["png"].endswith("report.png") and (out / "report.png").is_file()
    # a second run hits the teacher cache
    cache_meta = json.loads((out / "teacher_cache" / "train" / "meta.json").read_text())
    assert cache_meta["count"] == 24


def report_val_ids(root):
    from kd_tasks.face.data import split_identities

    return split_identities(root / "data", num_test=2, seed=0)[1]


def test_resume_equals_an_uninterrupted_run(setup, tmp_path, monkeypatch):
    from kd_tasks.shared.training import Trainer

    steps_run = []
    original = Trainer._after_step
    monkeypatch.setattr(Trainer, "_after_step", lambda self: (steps_run.append(self.step), original(self))[1])
    common = ("--margin", "cosface", "--kd", "margin_rkd", "--scheduler", "constant", "--lr", "0.02")
    assert main(args(setup, tmp_path / "full", "--max-steps", "6", *common)) == 0
    assert main(args(setup, tmp_path / "part", "--max-steps", "3", *common)) == 0
    steps_run.clear()
    assert main(args(setup, tmp_path / "part", "--max-steps", "6", "--resume", *common)) == 0
    assert steps_run == [4, 5, 6]  # continued from the step-3 checkpoint
    full = load_file(str(tmp_path / "full" / "export" / "model.safetensors"))
    resumed = load_file(str(tmp_path / "part" / "export" / "model.safetensors"))
    assert full.keys() == resumed.keys()
    for k in full:
        torch.testing.assert_close(resumed[k], full[k])
    steps = [json.loads(line)["step"] for line in (tmp_path / "part" / "log.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5, 6]


def test_clear_errors_and_help(setup, tmp_path, capsys):
    assert main(["--teacher", str(tmp_path / "missing.onnx"), "--data", str(setup / "data"),
                 "--output-dir", str(tmp_path / "x")]) == 2
    assert "missing.onnx" in capsys.readouterr().err
    assert main(["--teacher", str(setup / "teacher.onnx"), "--data", str(tmp_path / "nodata"),
                 "--output-dir", str(tmp_path / "x")]) == 2
    assert "nodata" in capsys.readouterr().err
    assert main(args(setup, tmp_path / "x", "--margin", "none", "--kd", "none")) == 2
    assert "nothing to train" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        cli_main(["face", "--help"])
    assert e.value.code == 0
    assert "example:" in capsys.readouterr().out


def test_yaml_config(setup, tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("margin: cosface\nkd: l2\nmax-steps: 2\nstudent: mobilefacenet_s\n")
    assert main(args(setup, tmp_path / "y", "--config", str(cfg))) == 0
    report = json.loads((tmp_path / "y" / "verification.json").read_text())
    assert report["args"]["margin"] == "cosface" and report["steps"] == 2
    cfg.write_text("margn: cosface\n")
    assert main(args(setup, tmp_path / "z", "--config", str(cfg))) == 2
    assert "margin" in capsys.readouterr().err


def test_shipped_configs_are_valid():
    from pathlib import Path

    from kd_tasks.face.train import build_parser, load_config

    configs = sorted((Path(__file__).resolve().parents[2] / "configs" / "face").glob("*.yaml"))
    assert configs
    for path in configs:
        values = load_config(str(path), build_parser())
        assert values["student"] in ("mobilefacenet", "mobilefacenet_s", "resnet_face")


def test_recipe_is_the_config_flag_and_learning_rate_is_lr(setup, tmp_path):
    from kd_tasks.face.train import build_parser, parse_args

    cfg = tmp_path / "c.yaml"
    cfg.write_text("margin: cosface\nkd: l2\nlearning-rate: 0.02\n")  # a key may be any spelling of an option
    by_recipe = parse_args(args(setup, tmp_path / "r", "--recipe", str(cfg)))
    by_config = parse_args(args(setup, tmp_path / "r", "--config", str(cfg)))
    assert (by_recipe.margin, by_recipe.kd, by_recipe.lr) == ("cosface", "l2", 0.02)
    assert vars(by_recipe) == vars(by_config)
    assert parse_args(args(setup, tmp_path / "r", "--recipe", str(cfg), "--learning-rate", "0.3")).lr == 0.3
    assert parse_args(args(setup, tmp_path / "r", "--lr", "0.4")).lr == 0.4
    assert parse_args(args(setup, tmp_path / "r")).lr == 0.05  # the default is unchanged
    text = build_parser().format_help()
    assert "--config CONFIG, --recipe CONFIG" in text and "--lr LR, --learning-rate LR" in text
