"""Wrong inputs through the Python API: each raises a kd-tasks error (a ``KDError``) whose message names the
offending argument, key or value; none is a raw TypeError/KeyError from deep inside."""

from __future__ import annotations

import re

import pytest
import torch
from torch import nn

from kd_tasks.shared import Distiller
from kd_tasks.shared.config import distiller_from_config
from kd_tasks.shared.errors import KDError
from kd_tasks.shared.registry import CONNECTORS, LOSSES
from kd_tasks.shared.schedules import build_schedule
from kd_tasks.shared.train_config import TrainConfig


def pair():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3)), nn.Sequential(nn.Linear(4, 16), nn.Linear(16, 3))


def distiller(**kw):
    s, t = pair()
    return Distiller(s, t, **kw)


def run_terms(terms, x=None):
    d = distiller(terms=terms)
    d(torch.randn(2, 4) if x is None else x)


CASES = [
    ("unknown loss", lambda: LOSSES.build({"type": "kld"}), r"unknown loss 'kld'"),
    ("loss without type", lambda: LOSSES.build({"temperature": 4}), r"has no 'type'"),
    ("misspelt loss option", lambda: LOSSES.build({"type": "kd", "temprature": 4}), r"temprature.*temperature"),
    ("string temperature", lambda: LOSSES.build({"type": "kd", "temperature": "hot"}), r"temperature"),
    ("zero temperature", lambda: LOSSES.build({"type": "kd", "temperature": 0}), r"temperature"),
    ("negative temperature", lambda: LOSSES.build({"type": "cwd", "temperature": -1}), r"temperature"),
    ("unknown connector", lambda: CONNECTORS.build({"type": "conv9x9"}), r"unknown connector 'conv9x9'"),
    ("unknown schedule", lambda: build_schedule({"schedule": "zigzag"}), r"zigzag"),
    ("string weight", lambda: build_schedule("heavy"), r"weight"),
    ("step schedule lengths", lambda: build_schedule({"schedule": "step", "values": [1.0], "milestones": [3]}),
     r"len\(values\)"),
    ("linear schedule steps 0", lambda: build_schedule({"schedule": "linear", "start": 0, "end": 1, "steps": 0}),
     r"steps"),
    ("term is not a dict", lambda: distiller(terms=["kd"]), r"term #0"),
    ("term without loss", lambda: distiller(terms=[{"name": "x"}]), r"no 'loss'"),
    ("misspelt term key", lambda: distiller(terms=[{"name": "x", "loss": "kd", "wieght": 1}]), r"wieght"),
    ("duplicate term names", lambda: distiller(terms=[{"name": "a", "loss": "kd"}, {"name": "a", "loss": "kd"}]),
     r"unique"),
    ("term named loss", lambda: distiller(terms=[{"name": "loss", "loss": "kd"}]), r"'loss'"),
    ("unknown tap", lambda: distiller(terms=[{"name": "h", "loss": "mse", "student": "9", "teacher": "0"}]),
     r"unknown module name.*'9'"),
    ("tap index out of range", lambda: run_terms([{"name": "h", "loss": "mse", "student": "0:5", "teacher": "0:5"}]),
     r"0:5"),
    ("bad call number", lambda: distiller(terms=[{"name": "h", "loss": "mse", "student": "0#one"}]), r"#"),
    ("shape mismatch without connector",
     lambda: run_terms([{"name": "h", "loss": "mse", "student": "0", "teacher": "0"}]), r"term 'h'.*connector"),
    ("connector for a tuple", lambda: run_terms([{"name": "f", "loss": "fsp", "student": ["0", "2"],
                                                  "teacher": ["0", "1"], "connector": "auto"}]), r"connector"),
    ("recipe scheme unknown", lambda: distiller_from_config({"scheme": {"type": "telepathy"}}, *pair()),
     r"telepathy"),
    ("recipe key misspelt", lambda: distiller_from_config({"distil": {"terms": []}}, *pair()), r"distil"),
    ("train lr string", lambda: TrainConfig(output_dir="x", max_steps=5, lr="fast").validate(), r"lr"),
    ("train batch size 0", lambda: TrainConfig(output_dir="x", max_steps=5, batch_size=0).validate(), r"batch_size"),
    ("train max_steps negative", lambda: TrainConfig(output_dir="x", max_steps=-1).validate(), r"max_steps"),
    ("train precision unknown", lambda: TrainConfig(output_dir="x", max_steps=5, mixed_precision="fp8").validate(),
     r"mixed_precision"),
    ("needs target", lambda: distiller(terms=[{"name": "d", "loss": "dkd"}])(torch.randn(2, 4)), r"target"),
    ("crd without index", lambda: LOSSES.build({"type": "crd", "num_data": 8})(torch.randn(2, 4), torch.randn(2, 4)),
     r"index"),
]


@pytest.mark.parametrize("what, call, message", CASES, ids=[c[0] for c in CASES])
def test_api_mistake_is_a_named_kd_error(what, call, message):
    with pytest.raises(KDError) as info:
        call()
    assert re.search(message, str(info.value), re.S), f"{what}: {info.value}"
