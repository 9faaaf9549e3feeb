"""Mixed-precision training on a CUDA device: run by benchmarks/gpu_check.sh on a machine with a GPU,
skipped elsewhere. fp16 trains with a GradScaler, bf16 without; the losses compute in float32 inside."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


def _schemes_module():
    """The CPU scheme tests' tiny models and data (tests/shared/test_schemes.py)."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parent / "shared" / "test_schemes.py"
    spec = importlib.util.spec_from_file_location("scheme_tests", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


SCHEMES = _schemes_module()


@pytest.mark.parametrize("precision", ["fp16", "bf16"])
@pytest.mark.parametrize("path", [p for p in SCHEMES.RECIPES if "takd" not in p.stem], ids=lambda p: p.stem)
def test_scheme_trains_under_cuda_amp(path, precision, tmp_path):
    from kd_tasks.shared.config import load_config
    from kd_tasks.shared.schemes import scheme_from_recipe
    from kd_tasks.shared.train_config import TrainConfig
    from kd_tasks.shared.training import Trainer

    if precision == "bf16" and not torch.cuda.is_bf16_supported():
        pytest.skip("this GPU has no bf16")
    recipe = load_config(path)
    net = SCHEMES.TinyResNetLike
    scheme = scheme_from_recipe(recipe, lambda: net(4), teacher=net(8), teachers=[net(6)], assistants=[net(5)],
                                num_samples=32)
    cfg = TrainConfig(output_dir=str(tmp_path), max_steps=3, batch_size=8, progress=False, console=False,
                      tensorboard=False, **dict(recipe.get("train") or {}, mixed_precision=precision))
    trainer = Trainer(scheme, SCHEMES.Images(), cfg)
    result = trainer.fit()
    assert trainer.accelerator.mixed_precision == precision
    assert trainer.accelerator.device.type == "cuda"
    assert (trainer.accelerator.scaler is not None) == (precision == "fp16")
    assert all(np.isfinite(v) for row in result.history for v in row.values() if isinstance(v, float))


class Tiny(nn.Module):
    def __init__(self, width):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(1, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(),
                                  nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.fc = nn.Linear(width, 10)

    def forward(self, x):
        return self.fc(self.body(x))


def test_bf16_teacher_and_cached_teacher_steps_on_cuda():
    from kd_tasks.shared import Distiller

    torch.manual_seed(0)
    student, teacher = Tiny(8).cuda(), Tiny(32).cuda()
    x, y = torch.randn(16, 1, 8, 8, device="cuda"), torch.randint(0, 10, (16,), device="cuda")
    kd = [{"name": "kd", "loss": {"type": "kd", "temperature": 4}}]
    live = Distiller(student, teacher, terms=kd, task_loss=nn.CrossEntropyLoss(), teacher_dtype=torch.bfloat16)
    out = live(x, y)
    out["loss"].backward()
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        t_logits = teacher(x)
    cached = Distiller(student, None, terms=kd, task_loss=nn.CrossEntropyLoss())
    again = cached(x, y, teacher_outputs={"output": t_logits})
    assert again["kd"].item() == pytest.approx(out["kd"].item(), rel=1e-5)
    assert all(torch.isfinite(p.grad).all() for p in student.parameters() if p.grad is not None)
