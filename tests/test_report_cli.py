"""``kd-tasks report`` (kd_tasks/report_cli.py) with models named on the command line: the accuracies it
reports are the models' own on the digits test split, and wrong arguments are one-line errors."""

from __future__ import annotations

import json

import pytest
import torch

from kd_tasks.classify import build_model, digits
from kd_tasks.report_cli import main


@pytest.fixture
def weights(tmp_path):
    torch.manual_seed(0)
    paths = {}
    for arch in ("cnn:8", "cnn:2"):
        model = build_model(arch, 10, 1, 8)
        path = tmp_path / f"{arch.replace(':', '_')}.pt"
        torch.save(model.state_dict(), path)
        paths[arch] = (model, path)
    return paths


def accuracy(model) -> float:
    _, test, _ = digits(None, 1)
    with torch.no_grad():
        return float((model.eval()(test.x).argmax(1) == test.y).float().mean())


def test_explicit_models_are_measured_and_scored(weights, tmp_path, capsys):
    (teacher, t_path), (student, s_path) = weights["cnn:8"], weights["cnn:2"]
    argv = ["--dataset", "digits", "--teacher", "cnn:8", "--teacher-weights", str(t_path), "--student", "cnn:2",
            "--student-weights", str(s_path), "--batch-size", "16", "--output-dir", str(tmp_path / "rep")]
    assert main(argv) == 0
    assert "FoM" in capsys.readouterr().out
    rows = {r["name"]: r for r in json.loads((tmp_path / "rep" / "report.json").read_text())["rows"]}
    assert rows["teacher cnn:8"]["metric"] == pytest.approx(accuracy(teacher))
    assert rows["student cnn:2"]["metric"] == pytest.approx(accuracy(student))
    assert rows["teacher cnn:8"]["params"] == sum(p.numel() for p in teacher.parameters())
    assert (tmp_path / "rep" / "report.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize("extra, message", [
    ([], "give --run DIR, or --teacher NAME with --teacher-weights PATH"),
    (["--teacher", "cnn:8", "--teacher-weights", "T", "--student", "cnn:2"], "one --student-weights per --student"),
    (["--run", "nowhere"], "holds no results.json"),
])
def test_wrong_arguments_are_one_line_errors(extra, message, capsys):
    assert main(extra) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and err.startswith("kd-tasks report: error:")
