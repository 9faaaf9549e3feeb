"""Fixtures for the detection adapter: tiny RetinaNets from mmdet's bundled configs, generated images."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import pytest

pytest.importorskip("mmdet", reason="the detection adapter needs kd-tasks[detection]")

import numpy as np  # noqa: E402
import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from det_helpers import draw_dataset, make_images, raw_batch, write_config  # noqa: E402

torch.set_num_threads(1)  # tiny models: threads only contend on a shared CPU

STUDENT = dict(base_channels=8, out_channels=16)
TEACHER = dict(base_channels=16, out_channels=32)


@pytest.fixture(scope="session", autouse=True)
def mmdet_scope():
    import kd_tasks.detection  # noqa: F401  registers the model, hooks and the fg_feature loss
    from mmengine.logging import MMLogger
    from mmengine.registry import init_default_scope

    init_default_scope("mmdet")
    MMLogger.get_current_instance().setLevel(logging.WARNING)  # init_weights reports every parameter


@pytest.fixture(scope="session")
def det_dir(tmp_path_factory) -> Path:
    """4 generated 64x64 images with a COCO file, and student / teacher config files (batch 4)."""
    root = tmp_path_factory.mktemp("det")
    draw_dataset(root / "data", 4, seed=0)
    write_config(root / "student.py", root / "data", batch_size=4, **STUDENT)
    write_config(root / "teacher.py", root / "data", batch_size=4, **TEACHER)
    return root


def build(config_path: Path, seed: int = 0):
    from mmdet.registry import MODELS
    from mmengine.config import Config

    torch.manual_seed(seed)
    model = MODELS.build(Config.fromfile(str(config_path)).model)
    model.init_weights()
    return model


@pytest.fixture
def make_model(det_dir):
    """``make_model("student" | "teacher", seed)``: a freshly initialised tiny RetinaNet."""
    return lambda role, seed=0: build(det_dir / f"{role}.py", seed)


@pytest.fixture(scope="session")
def trained_teacher_ckpt(det_dir) -> Path:
    """The tiny teacher trained for 40 SGD steps on the dataset's images, saved the way MMEngine's Runner
    saves (state dict next to a MessageHub with HistoryBuffer objects and NumPy values)."""
    from mmengine.logging import HistoryBuffer

    teacher = build(det_dir / "teacher.py", seed=0)
    batch = raw_batch(make_images(4, seed=0))
    opt = torch.optim.SGD(teacher.parameters(), lr=0.02, momentum=0.9)
    for _ in range(40):
        losses = teacher(**teacher.data_preprocessor(batch, True), mode="loss")
        loss = sum(sum(v) if isinstance(v, list) else v for v in losses.values())
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(teacher.parameters(), 10)
        opt.step()
    path = det_dir / "teacher_trained.pth"
    torch.save({
        "meta": {"iter": 40, "seed": np.int64(0), "dataset_meta": {"classes": ("square", "disc")}},
        "state_dict": teacher.state_dict(),
        "message_hub": {"log_scalars": {"train/loss": HistoryBuffer([2.0, 1.0], [1, 1])},
                        "runtime_info": {"iter": 40, "lr": np.float64(0.02)}},
    }, path)
    return path


@pytest.fixture
def batch(make_model):
    """A preprocessed batch of 2 generated images (student normalisation) with boxes."""
    student = make_model("student")
    return student.data_preprocessor(raw_batch(make_images(2, seed=3)), True)
