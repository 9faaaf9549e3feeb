"""The built-in default job: distil a CNN on scikit-learn's bundled digits images (real, offline).

Trains a teacher CNN, then the same small student twice per seed -- alone and with Hinton KD through the shared :class:`~kd_tasks.shared.distiller.Distiller` -- and prints
teacher / student alone / student + KD accuracy (mean +- std over seeds), parameter counts and time.
"""

from __future__ import annotations

import statistics
import time
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .shared.config import distiller_from_config
from .shared.errors import ArgumentParser, run_cli
from .shared.validate import POS_INT, check_rules

OPTION_RULES = {"seeds": POS_INT, "epochs": POS_INT, "student_width": POS_INT, "teacher_width": POS_INT}


def conv_net(width: int, hidden: int, n_classes: int = 10) -> nn.Module:
    """A small CNN for 1x8x8 images: two conv blocks (``features``) and a classifier (``head``)."""
    return nn.Sequential(
        nn.Sequential(
            nn.Conv2d(1, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(),
            nn.Conv2d(width, 2 * width, 3, padding=1), nn.BatchNorm2d(2 * width), nn.ReLU(),
        ),
        nn.Sequential(nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(8 * width, hidden), nn.ReLU(),
                      nn.Linear(hidden, n_classes)),
    )


def load_digits_split(seed: int = 0, train_fraction: float = 0.6):
    """Digits as (x_train, y_train, x_test, y_test) float tensors in [0, 1], stratified split."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(d.target, dtype=torch.long)
    idx_tr, idx_te = train_test_split(
        range(len(y)), train_size=train_fraction, random_state=seed, stratify=d.target
    )
    return x[idx_tr], y[idx_tr], x[idx_te], y[idx_te]


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    return (model(x).argmax(1) == y).float().mean().item()


def fit(step_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], params, x, y, epochs: int,
        seed: int, lr: float = 3e-3, batch_size: int = 64) -> None:
    """Adam over shuffled mini-batches; ``step_fn(xb, yb)`` returns the loss to minimise."""
    opt = torch.optim.Adam(params, lr=lr)
    g = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        for idx in torch.randperm(len(y), generator=g).split(batch_size):
            loss = step_fn(x[idx], y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 10.0)
            opt.step()


RECIPE = {
    "distill": {
        "task_loss": "cross_entropy",
        "task_weight": 0.5,
        "terms": [
            {"name": "kd", "loss": {"type": "kd", "temperature": 4.0}, "weight": 0.5},
        ],
    }
}


def n_params(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


def run(seeds: int = 3, epochs: int = 30, student_width: int = 4, teacher_width: int = 32) -> dict:
    check_rules({"seeds": seeds, "epochs": epochs, "student_width": student_width, "teacher_width": teacher_width},
                OPTION_RULES)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    x_tr, y_tr, x_te, y_te = load_digits_split(seed=0)
    t0 = time.perf_counter()
    torch.manual_seed(0)
    teacher = conv_net(teacher_width, 128)
    fit(lambda xb, yb: F.cross_entropy(teacher.train()(xb), yb), list(teacher.parameters()), x_tr, y_tr, epochs, seed=0)
    t_teacher = time.perf_counter() - t0
    acc_t = accuracy(teacher, x_te, y_te)

    alone, kd = [], []
    t_alone = t_kd = 0.0
    for seed in range(seeds):
        torch.manual_seed(100 + seed)
        student = conv_net(student_width, 16)
        t0 = time.perf_counter()
        fit(lambda xb, yb: F.cross_entropy(student.train()(xb), yb), list(student.parameters()), x_tr, y_tr, epochs, seed)
        t_alone += time.perf_counter() - t0
        alone.append(accuracy(student, x_te, y_te))

        torch.manual_seed(100 + seed)
        student = conv_net(student_width, 16)
        distiller = distiller_from_config(RECIPE, student, teacher).prepare(x_tr[:2])
        t0 = time.perf_counter()
        fit(lambda xb, yb: distiller.train()(xb, yb)["loss"], distiller.trainable_parameters(), x_tr, y_tr, epochs, seed)
        t_kd += time.perf_counter() - t0
        kd.append(accuracy(student, x_te, y_te))
    return {
        "teacher_acc": acc_t, "alone": alone, "kd": kd,
        "teacher_params": n_params(teacher), "student_params": n_params(conv_net(student_width, 16)),
        "teacher_time": t_teacher, "alone_time": t_alone / seeds, "kd_time": t_kd / seeds,
        "n_train": len(y_tr), "n_test": len(y_te), "epochs": epochs,
    }


def _fmt(xs: list[float]) -> str:
    sd = statistics.stdev(xs) if len(xs) > 1 else 0.0
    return f"{100 * statistics.mean(xs):6.2f} +- {100 * sd:4.2f} %"


def main(argv: list[str] | None = None) -> int:
    """``kd-tasks demo`` inside the shared error boundary (one line, exit 2, for a bad option)."""
    return run_cli("demo", _main, argv)


def _main(argv: list[str]) -> int:
    p = ArgumentParser(
        prog="kd-tasks demo",
        description="Distil a CNN on scikit-learn's bundled 8x8 digits (real data, offline): teacher, "
        "student alone and student + Hinton KD (T=4, half CE, half KD).",
        epilog="example: kd-tasks demo --seeds 3 --epochs 30",
    )
    p.add_argument("--seeds", type=int, default=3, help="students trained per variant (>= 1)")
    p.add_argument("--epochs", type=int, default=30, help="training epochs of every model (>= 1)")
    p.add_argument("--student-width", type=int, default=4, help="channels of the student's first conv (>= 1)")
    p.add_argument("--teacher-width", type=int, default=32, help="channels of the teacher's first conv (>= 1)")
    a = p.parse_args(argv)
    r = run(a.seeds, a.epochs, a.student_width, a.teacher_width)
    print(f"digits: {r['n_train']} train / {r['n_test']} test images, {r['epochs']} epochs, {a.seeds} seeds")
    print(f"{'model':<22}{'params':>9}  {'test accuracy':>18}  {'train time':>10}")
    print(f"{'teacher':<22}{r['teacher_params']:>9}  {100 * r['teacher_acc']:15.2f} %  {r['teacher_time']:9.1f}s")
    print(f"{'student alone':<22}{r['student_params']:>9}  {_fmt(r['alone']):>18}  {r['alone_time']:9.1f}s")
    print(f"{'student + KD':<22}{r['student_params']:>9}  {_fmt(r['kd']):>18}  {r['kd_time']:9.1f}s")
    print(f"compression: {r['teacher_params'] / r['student_params']:.1f}x fewer parameters")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
