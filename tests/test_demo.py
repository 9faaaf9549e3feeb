"""``kd-tasks demo``: paired arms, the same numbers on 1 or 2 threads, a gain beyond 2 std, the report at the end."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import kd_tasks.demo as demo

ROOT = Path(__file__).resolve().parents[1]


def run_in_subprocess(threads: int) -> dict:
    code = ("import json, torch; torch.set_num_threads(%d); from kd_tasks.demo import run; "
            "r = run(seeds=2, epochs=3); print(json.dumps({'t': r['teacher_acc'], 'rows': r['per_seed'], "
            "'threads': torch.get_num_threads()}))" % threads)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_same_numbers_on_one_and_two_threads():
    one, two = run_in_subprocess(1), run_in_subprocess(2)
    assert one["threads"] == 1 and two["threads"] == 2  # the caller's setting is restored afterwards
    assert one["t"] == two["t"] and one["rows"] == two["rows"]


def test_arms_are_paired_a_zero_kd_weight_reproduces_the_student_alone(monkeypatch):
    recipe = {"distill": {"task_loss": "cross_entropy", "task_weight": 1.0,
                          "terms": [{"name": "kd", "loss": {"type": "kd", "temperature": 4.0}, "weight": 0.0}]}}
    monkeypatch.setattr(demo, "RECIPE", recipe)
    r = demo.run(seeds=2, epochs=2, teacher_width=4)
    assert r["alone"] == r["kd"]  # same initial weights, same batches: identical students
    assert r["alone"][0] != r["alone"][1]  # while the seeds differ


def test_default_demo_shows_a_gain_beyond_two_std():
    r = demo.run()  # the defaults `make demo` runs: 5 paired seeds, 60 epochs
    v = r["verdict"]
    assert r["seeds"] == 5 and len(v["diffs"]) == 5
    assert v["gain_shown"] and v["mean"] > 2 * v["std"] > 0
    assert r["teacher_acc"] > max(r["kd"]) - 0.02 and r["teacher_params"] > 2 * r["student_params"]


def test_paired_verdict_rule():
    assert demo.paired_verdict([0.90, 0.91, 0.92], [0.92, 0.93, 0.94])["gain_shown"]
    noisy = demo.paired_verdict([0.90, 0.91, 0.92], [0.93, 0.90, 0.93])
    assert not noisy["gain_shown"] and not noisy["loss_shown"]
    assert demo.paired_verdict([0.9, 0.9, 0.9], [0.8, 0.81, 0.8])["loss_shown"]
    assert not demo.paired_verdict([0.9], [0.99])["gain_shown"]  # one seed shows nothing


def test_main_prints_the_verdict_and_writes_the_report(tmp_path, capsys):
    assert demo.main(["--seeds", "2", "--epochs", "2", "--teacher-width", "4", "--output-dir", str(tmp_path),
                      "--learning-rate", "0.003"]) == 0
    out = capsys.readouterr().out
    assert "verdict:" in out and "KD - alone" in out and "Pareto plot:" in out and "FoM" in out
    report = json.loads((tmp_path / "report.json").read_text())
    assert [r["role"] for r in report["rows"]] == ["teacher", "student", "baseline", "quantized"]
    assert len(report["rows"][1]["per_seed"]) == 2
    for f in ("report.md", "report.png", "student_kd/loss_curves.png", "teacher/loss_curves.png"):
        assert (tmp_path / f).stat().st_size > 0, f
    assert torch.get_num_threads() >= 1
