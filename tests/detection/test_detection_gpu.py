"""`kd-tasks detect` under MMEngine's AmpOptimWrapper (fp16 with loss scaling) with distillation terms on a CUDA
device; MMEngine's AMP wrapper exists only for accelerators, so this runs in benchmarks/gpu_check.sh."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from kd_tasks.detection.train import main

RECIPES = Path(__file__).resolve().parents[2] / "configs" / "detection"
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


@pytest.mark.parametrize("recipe", ["cwd_retinanet_fpn.py", "pkd_fpn.py", "dense_kd_heads.py"])
def test_amp_optim_wrapper_with_distillation_terms(det_dir, trained_teacher_ckpt, tmp_path, recipe):
    work = tmp_path / "amp"
    argv = ["--teacher-config", str(det_dir / "teacher.py"), "--teacher-checkpoint", str(trained_teacher_ckpt),
            "--student-config", str(det_dir / "student.py"), "--recipe", str(RECIPES / recipe),
            "--work-dir", str(work), "--max-iters", "3",
            "--cfg-options", "optim_wrapper.type=AmpOptimWrapper", "optim_wrapper.dtype=float16"]
    assert main(argv) == 0
    rows = [json.loads(line) for f in work.glob("*/vis_data/scalars.json") for line in f.read_text().splitlines()]
    losses = [v for row in rows for k, v in row.items() if k.startswith("loss")]
    assert losses and all(v == v and abs(v) < 1e6 for v in losses)
    assert (work / "student.pth").is_file()
