"""Every shipped offline recipe builds and trains one step on torchvision ResNets."""

from pathlib import Path

import pytest
import torch
import torchvision

from kd_tasks.shared.config import distiller_from_config, load_config

RECIPES = sorted((Path(__file__).parents[2] / "configs" / "shared").glob("offline_*.yaml"))


@pytest.fixture(scope="module")
def nets():
    torch.manual_seed(0)
    teacher = torchvision.models.resnet34(num_classes=10)
    student = torchvision.models.resnet18(num_classes=10)
    # make the stages differ in width so connectors are exercised
    return teacher, student


def test_recipes_exist():
    assert len(RECIPES) >= 4


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.stem)
def test_recipe_builds_and_trains_one_step(path, nets):
    teacher, _ = nets
    student = torchvision.models.resnet18(num_classes=10, width_per_group=64)
    recipe = load_config(path)
    d = distiller_from_config(recipe, student, teacher)
    x, y = torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,))
    d.prepare(x)
    opt = torch.optim.SGD(d.trainable_parameters(), lr=1e-3)
    d.train()
    d.set_step(10**6)  # schedules at their final weight, so every term is computed
    out = d(x, y)
    names = [t["name"] for t in recipe["distill"]["terms"]]
    assert all(torch.isfinite(out[n]) for n in names)
    opt.zero_grad()
    out["loss"].backward()
    opt.step()
    assert all(p.grad is None for p in teacher.parameters())
    assert student.fc.weight.grad is not None
