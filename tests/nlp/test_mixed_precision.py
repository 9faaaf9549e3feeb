"""`kd-tasks nlp --bf16` trains on the CPU under bf16 autocast (the Trainer's own flag) with finite loss terms;
the same with --fp16 on a CUDA device (marked gpu)."""

from __future__ import annotations

import glob
import json
import math
import os

import pytest
import torch

from kd_tasks.nlp.distill import main


def _run(tmp_path, teacher_dir, sentiment_csv, flag, cpu=True):
    out = tmp_path / flag.strip("-")
    argv = ["--teacher", teacher_dir, "--train-file", sentiment_csv["train"], "--validation-file",
            sentiment_csv["validation"], "--output-dir", str(out), "--max-length", "16", "--eval-batch-size", "32",
            "--latency-batch-size", "4", "--seed", "0", "--student-layers", "2", "--epochs", "1", "--batch-size", "16",
            "--logging-steps", "1", "--alpha-hidden", "1.0", flag] + (["--cpu"] if cpu else [])
    assert main(argv) == 0
    checkpoints = sorted(glob.glob(os.path.join(out, "checkpoint-*")), key=lambda p: int(p.rsplit("-", 1)[1]))
    with open(os.path.join(checkpoints[-1], "trainer_state.json")) as f:
        history = json.load(f)["log_history"]
    terms = [v for row in history for k, v in row.items() if k.startswith("loss")]
    assert terms and all(math.isfinite(v) for v in terms)
    return out


def test_bf16_on_cpu(tmp_path, teacher_dir, sentiment_csv):
    out = _run(tmp_path, teacher_dir, sentiment_csv, "--bf16")
    assert json.loads((out / "kd_report.json").read_text())["student"]["parameters"] > 0


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_fp16_on_cuda(tmp_path, teacher_dir, sentiment_csv):
    _run(tmp_path, teacher_dir, sentiment_csv, "--fp16", cpu=False)
