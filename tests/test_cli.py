import subprocess
import sys

import pytest

from kd_tasks import __version__
from kd_tasks.cli import main


def test_version(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0
    assert __version__ in capsys.readouterr().out


def test_help_lists_subcommands_with_examples(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    for cmd in ("demo", "nlp", "detect", "face"):
        assert cmd in out
    assert "kd-tasks nlp --teacher" in out


def test_core_import_stays_light():
    code = (
        "import sys, kd_tasks, kd_tasks.shared, kd_tasks.shared.distiller, kd_tasks.shared.losses, kd_tasks.cli;"
        "heavy=[m for m in ('mmdet','mmcv','mmengine','transformers','insightface','datasets') if m in sys.modules];"
        "print(heavy); sys.exit(1 if heavy else 0)"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def test_demo_runs_on_real_digits(capsys):
    from kd_tasks.demo import run

    r = run(seeds=1, epochs=4, student_width=4, teacher_width=16)
    assert r["teacher_acc"] > 0.85  # a small CNN on real digits, 4 epochs
    assert r["student_params"] < r["teacher_params"] / 5
    assert 0.0 < r["kd"][0] <= 1.0 and 0.0 < r["alone"][0] <= 1.0


@pytest.mark.parametrize("cmd", ["nlp", "detect", "face"])
def test_task_subcommands_show_help_with_an_example(cmd, capsys):
    with pytest.raises(SystemExit) as e:
        main([cmd, "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "example" in out.lower() and f"kd-tasks {cmd}" in out



@pytest.mark.parametrize("cmd", ["demo", "classify", "report", "search"])
def test_own_subcommands_share_flag_names_and_show_defaults(cmd, capsys):
    with pytest.raises(SystemExit) as e:
        main([cmd, "--help"])
    assert e.value.code == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "--output-dir" in out and f"kd-tasks {cmd}" in out
    if cmd != "report":
        assert "--lr LR, --learning-rate LR" in out and "--seed" in out
    if cmd in ("classify", "search"):
        assert "--recipe RECIPE, --config RECIPE" in out
    if cmd == "demo":
        assert "(default: 0)" in out and "(default: runs/demo)" in out
    if cmd == "search":
        assert "(default: 600.0)" in out and "(default: runs/search)" in out


def test_seed_defaults_to_zero_everywhere():
    from kd_tasks import classify, demo, search

    assert demo.build_parser().parse_args([]).seed == 0
    assert search.build_parser().parse_args(["--dataset", "digits", "--teacher", "cnn:8"]).seed == 0
    # classify: the recipe's train.seed if it has one, else TrainConfig's default 0
    from kd_tasks.shared.train_config import TrainConfig

    assert TrainConfig().seed == 0
    assert classify.build_parser().parse_args(["--recipe", "r", "--dataset", "digits", "--student", "cnn:2"]).seed is None
