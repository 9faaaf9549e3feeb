"""Two CPU processes (gloo) train the same student as one process with the same global batch; only rank 0
prints, evaluates into the report and writes files."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _argv(out, teacher_dir, sentiment_csv, batch):
    return ["--teacher", teacher_dir, "--train-file", sentiment_csv["train"], "--validation-file",
            sentiment_csv["validation"], "--output-dir", str(out), "--cpu", "--max-length", "16", "--seed", "0",
            "--student-layers", "2", "--batch-size", str(batch), "--max-steps", "3", "--learning-rate", "1e-3",
            "--alpha-hidden", "1", "--save-strategy", "no", "--disable-tqdm", "--latency-batch-size", "4",
            "--eval-batch-size", "16", "--threads", "1", "--logging-steps", "1"]


def test_two_gloo_processes_equal_one_process_with_the_same_global_batch(tmp_path, teacher_dir, sentiment_csv):
    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    if not os.path.exists(torchrun):
        pytest.skip("torchrun not installed")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    one, two = tmp_path / "one", tmp_path / "two"
    code = "import sys; from kd_tasks.nlp.distill import main; raise SystemExit(main(sys.argv[1:]))"
    script = tmp_path / "run_nlp.py"
    script.write_text(code + "\n")
    single = subprocess.run([sys.executable, str(script)] + _argv(one, teacher_dir, sentiment_csv, 16),
                            env=env, capture_output=True, text=True, timeout=240)
    assert single.returncode == 0, single.stderr[-2000:]
    double = subprocess.run([torchrun, "--nproc_per_node", "2", "--master_port", str(_free_port()), str(script)]
                            + _argv(two, teacher_dir, sentiment_csv, 8), env=env, capture_output=True, text=True,
                            timeout=240)
    assert double.returncode == 0, double.stderr[-3000:]
    # every rank ends the process group before exiting (an early rank used to abort at exit, racily)
    assert "terminate called" not in double.stderr, double.stderr[-3000:]
    a, b = load_file(str(one / "model.safetensors")), load_file(str(two / "model.safetensors"))
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-5, msg=key)
    # one report, one summary line: rank 1 neither prints nor writes
    assert double.stdout.count("[kd-tasks nlp] teacher on validation") == 1
    assert double.stdout.count("student on validation") == 1
    assert (two / "kd_report.json").is_file() and (two / "README.md").is_file()
