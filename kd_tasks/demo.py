"""The built-in default job: what distillation buys on scikit-learn's bundled digits (real, offline).

The setting is Hinton et al.'s (2015) MNIST experiment in miniature: a convolutional teacher, and a
student without convolutions -- a one-hidden-layer MLP (64-256-10) that needs 65x fewer FLOPs per
image -- trained on few labelled images, where it overfits the hard labels and the teacher's soft
targets carry what one-hot labels do not (which wrong digits an image resembles).

Data: the 1,797 8x8 digits split once, stratified (seed 0), into 808 training, 270 validation and
719 test images. The teacher (CNN, 53k parameters) and every student train on the same 808 images
for the same number of epochs (Adam, lr 3e-3, cosine decay to 0, batch 32).

Paired seeds: for each seed the student starts from the same initial weights and sees the same
batches in both arms -- alone (cross-entropy) and distilled (Hinton KD through the shared
:class:`~kd_tasks.shared.distiller.Distiller`: ``0.1 * CE + 0.9 * T^2 * KL(p_t || p_s)`` at T = 4, the
standard weights of the KD baseline in Tian et al. 2020, not tuned here). The teacher's logits on
the training images are computed once (the data are not augmented, so they are exact) and handed to
the Distiller, so both arms cost the same. The student's width (256 hidden units) and the schedule
(60 epochs) were chosen on the validation split; the test split is used only for the reported numbers.

Verdict: the KD gain is claimed only if the mean paired difference (KD - alone, test accuracy)
exceeds two standard deviations of the paired differences; otherwise "no effect shown".

Reproducible on any number of threads: every model trains with one intra-op thread (the models are
tiny, more threads do not make them faster), so the numbers do not depend on the machine's core
count; the thread count in force is restored afterwards.

At the end, the compression report (:mod:`kd_tasks.shared.report`) of the teacher, the distilled
student, the student alone and the distilled student in int8 is printed and written with its Pareto
plot and the loss curves of seed 0 to ``--output-dir``.
"""

from __future__ import annotations

import contextlib
import json
import math
import statistics
import time
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .shared.config import distiller_from_config
from .shared.errors import ArgumentParser, run_cli
from .shared.validate import NON_NEG_INT, POS_INT, POSITIVE, check_rules

OPTION_RULES = {"seeds": POS_INT, "epochs": POS_INT, "student_width": POS_INT, "teacher_width": POS_INT,
                "seed": NON_NEG_INT, "lr": POSITIVE}
DEFAULTS = {"seeds": 5, "epochs": 60, "student_width": 256, "teacher_width": 32, "seed": 0, "lr": 3e-3}
TEMPERATURE, KD_WEIGHT = 4.0, 0.9
RECIPE = {
    "distill": {
        "task_loss": "cross_entropy",
        "task_weight": 1 - KD_WEIGHT,
        "terms": [{"name": "kd", "loss": {"type": "kd", "temperature": TEMPERATURE}, "weight": KD_WEIGHT}],
    }
}


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


def mlp(hidden: int, n_classes: int = 10) -> nn.Module:
    """The student: 8x8 image -> 64 pixels -> ``hidden`` ReLU units -> class logits."""
    return nn.Sequential(nn.Flatten(), nn.Linear(64, hidden), nn.ReLU(), nn.Linear(hidden, n_classes))


def load_digits_split() -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Digits in [0, 1], split once (stratified, seed 0): 40% test, then 25% of the rest validation."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(d.target, dtype=torch.long)
    rest, test = train_test_split(range(len(y)), test_size=0.4, random_state=0, stratify=d.target)
    train, val = train_test_split(rest, test_size=0.25, random_state=0, stratify=d.target[rest])
    return {name: (x[idx], y[idx]) for name, idx in (("train", train), ("val", val), ("test", test))}


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    was = model.training
    model.eval()
    acc = (model(x).argmax(1) == y).float().mean().item()
    model.train(was)
    return acc


def fit(step_fn: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], dict], params, x, y, epochs: int, seed: int,
        lr: float = 3e-3, batch_size: int = 32) -> list[dict]:
    """Adam with cosine decay to 0 over shuffled mini-batches (order drawn from ``seed``);
    ``step_fn(xb, yb, idx)`` returns ``{"loss": ..., <term>: ...}``. Returns the per-epoch mean terms."""
    params = list(params)
    opt = torch.optim.Adam(params, lr=lr)
    g = torch.Generator().manual_seed(seed)
    steps_per_epoch = math.ceil(len(y) / batch_size)
    total, step, log = epochs * steps_per_epoch, 0, []
    for epoch in range(epochs):
        sums: dict[str, float] = {}
        for idx in torch.randperm(len(y), generator=g).split(batch_size):
            for group in opt.param_groups:
                group["lr"] = lr * 0.5 * (1 + math.cos(math.pi * step / total))
            out = step_fn(x[idx], y[idx], idx)
            opt.zero_grad(set_to_none=True)
            out["loss"].backward()
            opt.step()
            step += 1
            for k, v in out.items():
                if isinstance(v, torch.Tensor) and v.dim() == 0:
                    sums[k] = sums.get(k, 0.0) + float(v.detach())
        log.append({"step": step, "epoch": epoch + 1, **{k: v / steps_per_epoch for k, v in sums.items()}})
    return log


@contextlib.contextmanager
def one_thread():
    """Train on one intra-op thread (thread-count-independent reductions), then restore the setting."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def n_params(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


def paired_verdict(alone: list[float], kd: list[float]) -> dict:
    """Mean and std of the paired differences ``kd - alone`` and whether the mean exceeds 2 std."""
    diffs = [k - a for a, k in zip(alone, kd)]
    mean = statistics.mean(diffs)
    sd = statistics.stdev(diffs) if len(diffs) > 1 else float("nan")
    shown = len(diffs) > 1 and mean > 2 * sd
    worse = len(diffs) > 1 and -mean > 2 * sd
    return {"diffs": diffs, "mean": mean, "std": sd, "gain_shown": shown, "loss_shown": worse}


def run(seeds: int = 5, epochs: int = 60, student_width: int = 256, teacher_width: int = 32, *, seed: int = 0,
        lr: float = 3e-3, keep_models: bool = False) -> dict:
    """Teacher, then ``seeds`` paired students (alone / + KD); test accuracies per seed and the verdict."""
    check_rules({"seeds": seeds, "epochs": epochs, "student_width": student_width, "teacher_width": teacher_width,
                 "seed": seed, "lr": lr}, OPTION_RULES)
    data = load_digits_split()
    x_tr, y_tr = data["train"]
    (x_va, y_va), (x_te, y_te) = data["val"], data["test"]
    with one_thread():
        t0 = time.perf_counter()
        torch.manual_seed(seed)
        teacher = conv_net(teacher_width, 128)
        ce = lambda model: lambda xb, yb, idx: {"loss": F.cross_entropy(model.train()(xb), yb)}  # noqa: E731
        teacher_log = fit(ce(teacher), teacher.parameters(), x_tr, y_tr, epochs, seed, lr)
        t_teacher = time.perf_counter() - t0
        teacher.eval()
        with torch.no_grad():
            teacher_logits = teacher(x_tr)  # exact for every epoch: the training images are not augmented

        rows, models, logs = [], [], {}
        t_alone = t_kd = 0.0
        for s in range(seed, seed + seeds):
            torch.manual_seed(10_000 + s)
            init = mlp(student_width).state_dict()
            alone = mlp(student_width)
            alone.load_state_dict(init)
            t0 = time.perf_counter()
            log_alone = fit(ce(alone), alone.parameters(), x_tr, y_tr, epochs, s, lr)
            t_alone += time.perf_counter() - t0

            student = mlp(student_width)
            student.load_state_dict(init)  # the same initial weights as the student alone
            distiller = distiller_from_config(RECIPE, student, teacher).prepare(x_tr[:2])

            def kd_step(xb, yb, idx):
                out = distiller.train()(xb, yb, teacher_outputs={"logits": teacher_logits[idx],
                                                                  "output": teacher_logits[idx]})
                return {k: v for k, v in out.items() if k in ("loss", "task", "kd")}

            t0 = time.perf_counter()
            log_kd = fit(kd_step, distiller.trainable_parameters(), x_tr, y_tr, epochs, s, lr)
            t_kd += time.perf_counter() - t0
            rows.append({"seed": s, "alone": accuracy(alone, x_te, y_te), "kd": accuracy(student, x_te, y_te),
                         "alone_val": accuracy(alone, x_va, y_va), "kd_val": accuracy(student, x_va, y_va)})
            models.append((alone, student))
            if s == seed:
                logs = {"teacher": teacher_log, "student_alone": log_alone, "student_kd": log_kd}
        teacher_acc, teacher_val = accuracy(teacher, x_te, y_te), accuracy(teacher, x_va, y_va)
    alone_acc, kd_acc = [r["alone"] for r in rows], [r["kd"] for r in rows]
    result = {
        "teacher_acc": teacher_acc, "teacher_val": teacher_val,
        "alone": alone_acc, "kd": kd_acc, "per_seed": rows, "verdict": paired_verdict(alone_acc, kd_acc),
        "teacher_params": n_params(teacher), "student_params": n_params(mlp(student_width)),
        "teacher_time": t_teacher, "alone_time": t_alone / seeds, "kd_time": t_kd / seeds,
        "n_train": len(y_tr), "n_val": len(y_va), "n_test": len(y_te), "epochs": epochs, "seeds": seeds,
        "student_width": student_width, "teacher_width": teacher_width, "logs": logs,
    }
    if keep_models:
        result["models"] = {"teacher": teacher, "pairs": models, "test": (x_te, y_te)}
    return result


def report(result: dict, output_dir: str | Path):
    """The compression report of the run (teacher, student + KD, student alone, student + KD int8)."""
    from .shared.export import quantize_dynamic_int8
    from .shared.report import ModelEntry, build_report, plot_loss_curves

    m = result["models"]
    x_te, y_te = m["test"]
    with one_thread():
        quantized = [quantize_dynamic_int8(kd) for _, kd in m["pairs"]]
        q_acc = [accuracy(q, x_te, y_te) for q in quantized]

    def stats(xs):
        return {"metric": statistics.mean(xs), "metric_std": statistics.stdev(xs) if len(xs) > 1 else None,
                "per_seed": list(xs)}

    w = result["student_width"]
    entries = [
        ModelEntry(f"teacher CNN w{result['teacher_width']}", m["teacher"], "teacher", metric=result["teacher_acc"]),
        ModelEntry(f"student MLP-{w} + KD", m["pairs"][0][1], "student", **stats(result["kd"])),
        ModelEntry(f"student MLP-{w} alone", m["pairs"][0][0], "baseline", **stats(result["alone"])),
        ModelEntry(f"student MLP-{w} + KD int8", quantized[0], "quantized", flops_from=f"student MLP-{w} + KD",
                   note="torch.ao dynamic int8 (Linear)", **stats(q_acc)),
    ]
    with one_thread():
        rep = build_report(entries, x_te[:64], metric_name="test accuracy", batch_size=256,
                           notes=[f"Students: mean ± std over {result['seeds']} paired seeds (timings: seed 0's model)."])
    out = Path(output_dir)
    paths = rep.write(out)
    for name, log in result["logs"].items():
        (out / name).mkdir(parents=True, exist_ok=True)
        (out / name / "log.jsonl").write_text("".join(json.dumps(e) + "\n" for e in log))
        paths[f"loss_{name}"] = plot_loss_curves(out / name / "log.jsonl")
    return rep, paths


def _pm(xs: list[float]) -> str:
    sd = statistics.stdev(xs) if len(xs) > 1 else 0.0
    return f"{100 * statistics.mean(xs):.2f} ± {100 * sd:.2f}"


def main(argv: list[str] | None = None) -> int:
    """``kd-tasks demo`` inside the shared error boundary (one line, exit 2, for a bad option)."""
    return run_cli("demo", _main, argv)


def build_parser() -> ArgumentParser:
    import argparse

    p = ArgumentParser(
        prog="kd-tasks demo",
        description="What distillation buys, offline in about a minute: a CNN teacher and an MLP student on "
        "scikit-learn's bundled 8x8 digits; the student trained alone and with Hinton KD (T=4, 0.1 CE + 0.9 KD) from "
        "the same initial weights and batch order per seed; paired verdict; compression report with Pareto plot.",
        epilog="example: kd-tasks demo --seeds 5 --epochs 60 --output-dir runs/demo",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--seeds", type=int, default=DEFAULTS["seeds"], help="paired seeds: students per arm (>= 1)")
    p.add_argument("--seed", type=int, default=DEFAULTS["seed"], help="first seed (teacher and data order)")
    p.add_argument("--epochs", type=int, default=DEFAULTS["epochs"], help="training epochs of every model (>= 1)")
    p.add_argument("--lr", "--learning-rate", dest="lr", type=float, default=DEFAULTS["lr"],
                   help="Adam learning rate (cosine decay to 0)")
    p.add_argument("--student-width", type=int, default=DEFAULTS["student_width"],
                   help="hidden units of the student MLP (>= 1)")
    p.add_argument("--teacher-width", type=int, default=DEFAULTS["teacher_width"],
                   help="channels of the teacher's first conv (>= 1)")
    p.add_argument("--output-dir", default="runs/demo", help="report.md/.json/.png and loss curves")
    p.add_argument("--no-report", action="store_true", help="skip the compression report")
    return p


def _main(argv: list[str]) -> int:
    a = build_parser().parse_args(argv)
    r = run(a.seeds, a.epochs, a.student_width, a.teacher_width, seed=a.seed, lr=a.lr, keep_models=not a.no_report)
    v = r["verdict"]
    print(f"digits: {r['n_train']} train / {r['n_val']} validation / {r['n_test']} test images, {r['epochs']} epochs, "
          f"{r['seeds']} paired seeds (same initial weights and batch order in both arms)")
    print(f"teacher  CNN w{r['teacher_width']}   {r['teacher_params']:>7,} params   test accuracy "
          f"{100 * r['teacher_acc']:.2f} %   ({r['teacher_time']:.1f}s)")
    print(f"student  MLP-{r['student_width']:<5} {r['student_params']:>7,} params   "
          f"alone {r['alone_time']:.1f}s, + KD (T={TEMPERATURE:g}, {1 - KD_WEIGHT:.1f} CE + {KD_WEIGHT:.1f} KD) "
          f"{r['kd_time']:.1f}s per seed")
    print(f"{'seed':>6}  {'alone':>8}  {'+ KD':>8}  {'KD - alone':>10}   (test accuracy, %)")
    for row, d in zip(r["per_seed"], v["diffs"]):
        print(f"{row['seed']:>6}  {100 * row['alone']:8.2f}  {100 * row['kd']:8.2f}  {100 * d:+10.2f}")
    sd = f"{100 * v['std']:.2f}" if not math.isnan(v["std"]) else "n/a"
    print(f"{'mean':>6}  {_pm(r['alone']):>8}  {_pm(r['kd']):>8}  {100 * v['mean']:+.2f} ± {sd}")
    if v["gain_shown"]:
        verdict = (f"KD gain shown: mean paired difference {100 * v['mean']:+.2f} points > 2 std of the differences "
                   f"({2 * 100 * v['std']:.2f})")
    elif v["loss_shown"]:
        verdict = f"KD is worse: mean paired difference {100 * v['mean']:+.2f} points beyond 2 std ({2 * 100 * v['std']:.2f})"
    else:
        bound = "n/a, one seed" if sd == "n/a" else f"{2 * 100 * v['std']:.2f}"
        verdict = (f"no effect shown: mean paired difference {100 * v['mean']:+.2f} points is within 2 std of the "
                   f"differences ({bound})")
    print(f"verdict: {verdict}")
    if not a.no_report:
        rep, paths = report(r, a.output_dir)
        print()
        print(rep.to_text())
        print(f"report: {paths['markdown']}  {paths['json']}")
        print(f"Pareto plot: {paths['png']}")
        print(f"loss curves: {'  '.join(str(p) for k, p in paths.items() if k.startswith('loss_') and p)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
