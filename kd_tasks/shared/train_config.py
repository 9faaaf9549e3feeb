"""Settings of a training run, and the optimisers and LR schedules built from them.

A recipe's ``train`` section is a :class:`TrainConfig` given as a dict; unknown keys are rejected
with the closest valid names.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Any, Mapping

import torch
from torch import nn

from .config import check_keys
from .errors import KDConfigError
from .validate import NON_NEG_INT, NON_NEGATIVE, POS_INT, POSITIVE, check_rules, number

OPTIMIZERS = ("sgd", "adamw", "adam")
LR_SCHEDULES = ("cosine", "linear", "constant")
PRECISIONS = ("auto", "no", "bf16", "fp16")


@dataclass
class TrainConfig:
    """Everything the loop needs besides the scheme and the data (recipes give it as a dict).

    ``max_steps`` counts optimiser updates; give it or ``epochs`` (then ``max_steps`` is
    ``ceil(epochs * batches_per_epoch / gradient_accumulation_steps)``). ``batch_size`` is per
    process. ``resume``: ``False``, ``True`` (latest checkpoint in ``output_dir``, or a fresh start if
    there is none) or a checkpoint directory.

    Less obvious fields: ``aux_optimizer`` / ``aux_lr`` -- optimiser of a scheme's auxiliary step
    (default: as the main one); ``max_grad_norm`` -- clipping norm, ``None`` turns clipping off;
    ``keep_checkpoints`` -- how many recent checkpoints stay on disk; ``seed_samples`` -- seed the
    generators per sample read so random augmentation is reproducible and resumable (costs tens of
    microseconds per sample; turn off for datasets without randomness); ``console`` / ``progress`` /
    ``tensorboard`` -- the run's outputs; ``export_connectors`` -- also save the scheme's connectors;
    ``find_unused_parameters`` -- passed to DDP (for schemes whose forward skips some trainable
    modules, e.g. a term with weight 0); ``cpu`` -- train on the CPU even when a GPU is present;
    ``overwrite`` -- an ``output_dir`` holding another run is refused unless ``resume`` (continue it)
    or ``overwrite`` (its checkpoints, logs and export are removed first).
    """

    output_dir: str = "runs/kd"
    max_steps: int | None = None
    epochs: float | None = None
    batch_size: int = 32
    optimizer: str = "sgd"
    lr: float = 0.05
    momentum: float = 0.9
    nesterov: bool = False
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 5e-4
    scheduler: str = "cosine"
    warmup_steps: int = 0
    min_lr_ratio: float = 0.0
    aux_optimizer: str | None = None
    aux_lr: float | None = None
    mixed_precision: str = "auto"
    gradient_accumulation_steps: int = 1
    max_grad_norm: float | None = 10.0
    eval_every: int | None = None
    save_every: int | None = None
    keep_checkpoints: int = 2
    log_every: int = 10
    seed: int = 0
    shuffle: bool = True
    drop_last: bool = True
    num_workers: int = 0
    seed_samples: bool = True
    resume: bool | str = False
    tensorboard: bool = True
    progress: bool = True
    console: bool = True
    export: bool = True
    export_connectors: bool = False
    find_unused_parameters: bool = False
    cpu: bool = False
    overwrite: bool = False

    @classmethod
    def from_dict(cls, cfg: Mapping[str, Any]) -> "TrainConfig":
        """Build from a recipe's ``train`` section; unknown keys are rejected with close matches."""
        names = [f.name for f in fields(cls)]
        check_keys(cfg, names, "train section")
        return cls(**dict(cfg))

    NUMERIC_RULES = {
        "max_steps": POS_INT, "epochs": POSITIVE, "batch_size": POS_INT, "lr": POSITIVE, "momentum": ("number", 0, 1, False),
        "weight_decay": NON_NEGATIVE, "warmup_steps": NON_NEG_INT, "min_lr_ratio": ("number", 0, 1, False),
        "aux_lr": POSITIVE, "gradient_accumulation_steps": POS_INT, "max_grad_norm": POSITIVE, "eval_every": POS_INT,
        "save_every": POS_INT, "keep_checkpoints": POS_INT, "log_every": POS_INT, "seed": NON_NEG_INT,
        "num_workers": NON_NEG_INT,
    }
    FLAGS = ("nesterov", "shuffle", "drop_last", "seed_samples", "tensorboard", "progress", "console", "export",
             "export_connectors", "find_unused_parameters", "cpu", "overwrite")

    def validate(self) -> None:
        """Check every setting up front; errors name the key (``train.<key>``) and the value."""
        if self.max_steps is None and self.epochs is None:
            raise KDConfigError("train: give max_steps or epochs")
        check_rules(vars(self), self.NUMERIC_RULES, "train.{}")
        for key in self.FLAGS:
            if not isinstance(getattr(self, key), bool):
                raise KDConfigError(f"train.{key} must be true or false, got {getattr(self, key)!r}")
        if not isinstance(self.betas, (tuple, list)) or len(self.betas) != 2:
            raise KDConfigError(f"train.betas must be two numbers in [0, 1), got {self.betas!r}")
        for i, b in enumerate(self.betas):
            number(b, f"train.betas[{i}]", low=0, high=1, high_open=True)
        if not isinstance(self.output_dir, (str, bytes)) and not hasattr(self.output_dir, "__fspath__"):
            raise KDConfigError(f"train.output_dir must be a path, got {self.output_dir!r}")
        if not (isinstance(self.resume, bool) or isinstance(self.resume, str) or hasattr(self.resume, "__fspath__")):
            raise KDConfigError(f"train.resume must be true, false or a checkpoint directory, got {self.resume!r}")
        if self.resume and self.overwrite:
            raise KDConfigError("resume and overwrite both given: resume continues the run in output_dir, overwrite "
                                "replaces it", hint="give one of them (--resume or --overwrite)")
        for name, value, choices in (("optimizer", self.optimizer, OPTIMIZERS),
                                     ("scheduler", self.scheduler, LR_SCHEDULES),
                                     ("mixed_precision", self.mixed_precision, PRECISIONS)):
            if value not in choices:
                raise KDConfigError(f"train: {name} must be one of {', '.join(choices)}; got {value!r}")
        if self.aux_optimizer is not None and self.aux_optimizer not in OPTIMIZERS:
            raise KDConfigError(f"train: aux_optimizer must be one of {', '.join(OPTIMIZERS)}; got {self.aux_optimizer!r}")
        if self.gradient_accumulation_steps < 1 or self.batch_size < 1:
            raise KDConfigError("train: batch_size and gradient_accumulation_steps must be >= 1")


class LRLambda:
    """Multiplier of the base LR at optimiser step ``s``: linear warm-up, then cosine/linear/constant.

    ``cosine``: ``m + (1 - m)·(1 + cos(π·t))/2``; ``linear``: ``1 - (1 - m)·t``; with
    ``t = (s - warmup) / (total - warmup)`` clipped to [0, 1] and ``m = min_lr_ratio``.
    """

    def __init__(self, kind: str, total_steps: int, warmup_steps: int = 0, min_ratio: float = 0.0):
        self.kind, self.total, self.warmup, self.min_ratio = kind, int(total_steps), int(warmup_steps), float(min_ratio)

    def __call__(self, step: int) -> float:
        if step < self.warmup:
            return (step + 1) / self.warmup
        t = min(max(step - self.warmup, 0) / max(self.total - self.warmup, 1), 1.0)
        if self.kind == "constant":
            return 1.0
        if self.kind == "linear":
            return 1.0 - (1.0 - self.min_ratio) * t
        return self.min_ratio + (1.0 - self.min_ratio) * (1 + math.cos(math.pi * t)) / 2


def build_optimizer(kind: str, params: list[nn.Parameter], cfg: TrainConfig, lr: float) -> torch.optim.Optimizer:
    if not params:
        raise KDConfigError(
            "the scheme has no trainable parameters: is the student frozen (requires_grad=False)?"
        )
    if kind == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=cfg.momentum, nesterov=cfg.nesterov,
                               weight_decay=cfg.weight_decay)
    optim_cls = torch.optim.AdamW if kind == "adamw" else torch.optim.Adam
    return optim_cls(params, lr=lr, betas=tuple(cfg.betas), weight_decay=cfg.weight_decay)


def resolve_mixed_precision(spec: str, cpu: bool = False) -> str:
    """``"auto"`` -> ``"bf16"`` on a bf16-capable GPU, ``"fp16"`` on another GPU, ``"no"`` on CPU."""
    if spec != "auto":
        return spec
    if not cpu and torch.cuda.is_available():
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "no"


__all__ = ["TrainConfig", "LRLambda", "build_optimizer", "resolve_mixed_precision", "OPTIMIZERS", "LR_SCHEDULES",
           "PRECISIONS"]
