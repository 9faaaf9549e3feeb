"""Every shipped detection recipe on a real (tiny) detector pair: builds, gives finite terms, sends gradient
to the student and never to the teacher, and a few optimiser steps on the distillation terms lower them."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from det_helpers import tiny_faster_rcnn, tiny_gfl
from mmengine.config import ConfigDict

from kd_tasks.detection import DetectionDistiller
from kd_tasks.shared.config import load_config

RECIPES = Path(__file__).resolve().parents[2] / "configs" / "detection"
RETINA = ["cwd_retinanet_fpn.py", "fitnet_retinanet_fpn.yaml", "defeat_retinanet_fpn.py", "pkd_fpn.py", "mgd_fpn.py",
          "fgd_fpn.py", "dense_kd_heads.py"]
GFL = ["ld_gfl.py", "crosskd_gfl.py", "dense_kd_heads.py", "pkd_fpn.py"]


def built(cfg: dict, seed: int):
    from mmdet.registry import MODELS

    torch.manual_seed(seed)
    model = MODELS.build(ConfigDict(cfg))
    model.init_weights()
    return model


def pairs(kind: str, make_model):
    if kind == "retinanet":
        return make_model("student", 1), make_model("teacher", 2)
    if kind == "gfl-narrow":  # a narrower FPN and head too: CrossKD maps the width inside its loss
        return built(tiny_gfl(8, 16), 1), pairs("gfl", make_model)[1]
    if kind == "gfl":  # a narrower backbone, the same head width (as R101 -> R50 GFL, both 256 wide)
        teacher = built(tiny_gfl(16, 32), 2)
        with torch.no_grad():  # a random head predicts near-uniform distributions: give the teacher opinions
            g = torch.Generator().manual_seed(0)
            for conv in (teacher.bbox_head.gfl_cls, teacher.bbox_head.gfl_reg):
                conv.weight.add_(torch.randn(conv.weight.shape, generator=g) * 3.0)
                conv.bias.add_(torch.randn(conv.bias.shape, generator=g) * 2.0)
        return built(tiny_gfl(8, 32), 1), teacher
    if kind == "faster_rcnn->retinanet":  # heterogeneous: two-stage teacher (P2-P6), one-stage student (P3-P7)
        return make_model("student", 1), built(tiny_faster_rcnn(16, 32), 2)
    raise ValueError(kind)


def test_every_shipped_recipe_passes_the_command_line_checks():
    from kd_tasks.detection.train import RECIPE_KEYS
    from kd_tasks.shared.config import check_keys

    paths = sorted(p for p in RECIPES.iterdir() if p.suffix in (".py", ".yaml", ".yml", ".json"))
    assert {p.name for p in paths} >= set(RETINA) | set(GFL)
    for path in paths:
        recipe = load_config(path)
        check_keys(recipe, RECIPE_KEYS, f"recipe {path.name}")  # what kd-tasks detect checks
        assert recipe["distill"]["terms"], path.name


def distill_total(losses: dict, names: set[str]) -> torch.Tensor:
    return sum(losses[n] for n in names)


@pytest.mark.parametrize("kind, recipe", [("retinanet", r) for r in RETINA] + [("gfl", r) for r in GFL]
                         + [("faster_rcnn->retinanet", "pkd_fpn.py"), ("gfl-narrow", "crosskd_gfl.py")])
def test_recipe_trains_the_student_only(make_model, batch, kind, recipe):
    student, teacher = pairs(kind, make_model)
    distill = load_config(RECIPES / recipe)["distill"]
    model = DetectionDistiller(student, teacher, distill=distill).train()
    names = {f"loss_{t['name']}" for t in distill["terms"]}
    teacher_state = {k: v.clone() for k, v in teacher.state_dict().items()}
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    values = []
    for step in range(6):
        losses = model(batch["inputs"], batch["data_samples"], mode="loss")
        assert names <= set(losses), sorted(losses)
        assert all(torch.isfinite(losses[n]) for n in names)
        total = distill_total(losses, names)
        values.append(total.item())
        opt.zero_grad()
        total.backward()
        if step == 0:
            assert total.item() > 0
            assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in student.neck.parameters()), \
                "no gradient reached the student's FPN"
            assert all(p.grad is None for p in teacher.parameters())
        opt.step()
    assert values[-1] < values[0], values  # the distillation terms go down when trained on
    assert all(torch.equal(v, teacher_state[k]) for k, v in teacher.state_dict().items())
