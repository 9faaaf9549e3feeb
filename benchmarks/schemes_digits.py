"""Distillation schemes and losses on real images, mean ± std over seeds.

Data (real, offline): scikit-learn's bundled digits (1,797 8×8 grey images of handwritten digits,
10 classes; a copy of the UCI "Optical Recognition of Handwritten Digits" test set), split 70/30
stratified with a fixed seed; or, with ``--dataset fashion``, a subset of Fashion-MNIST from the Debian
package ``dataset-fashion-mnist`` (``apt-get install dataset-fashion-mnist``).

Models: small CNNs with ResNet-style module names (``layer1..3``, ``fc``), so the shipped recipes'
tap names apply: teacher widths 32-64-128, TAKD assistant 16-32-48, student 8-16-16 (about 1/50 of
the teacher's parameters); two more teachers of other architectures for multi-teacher (an MLP and a
24-48-96 CNN). Every row trains the same student for the same number of steps with the same
optimiser through :class:`kd_tasks.shared.training.Trainer`; only the scheme / loss differs.

Rows: the teacher; the student alone (cross-entropy); the student with each logit, feature and
relational loss (offline Distiller, teacher of the same seed); each scheme from
``configs/shared/scheme_*.yaml``; and Hinton KD from the teacher-output cache (same accuracy, less
time). Test accuracy in %, mean ± sample std over ``--seeds`` seeds; "time" is the mean wall time of
one training run on this machine (shared CPU: compare times within one run only).

Run:  .venv/bin/python benchmarks/schemes_digits.py --seeds 5 --epochs 20 --out benchmarks/RESULTS_schemes.md
      .venv/bin/python benchmarks/schemes_digits.py --dataset fashion ... --out benchmarks/RESULTS_schemes.md --append
"""

from __future__ import annotations

import argparse
import gzip
import platform
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from kd_tasks.classify import Net, Pairs, digits
from kd_tasks.shared.cache import TeacherCache
from kd_tasks.shared.config import load_config
from kd_tasks.shared.distiller import Distiller
from kd_tasks.shared.schedules import build_schedule
from kd_tasks.shared.schemes import scheme_from_recipe
from kd_tasks.shared.training import TrainConfig, Trainer

ROOT = Path(__file__).resolve().parents[1]
RECIPES = ROOT / "configs" / "shared"


# ----------------------------------------------------------------------------- data


def _idx(path: Path) -> np.ndarray:
    with gzip.open(path) if path.suffix == ".gz" else open(path, "rb") as f:
        data = f.read()
    dims = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(dims))
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * dims).reshape(shape)


def fashion(train_size: int, test_size: int) -> tuple[Pairs, Pairs, str]:
    roots = [Path("/usr/share/datasets/fashion-mnist"), Path("/usr/share/dataset-fashion-mnist")]
    files = {}
    for root in roots:
        for p in root.rglob("*") if root.is_dir() else []:
            for key in ("train-images", "train-labels", "t10k-images", "t10k-labels"):
                if p.name.startswith(key):
                    files[key] = p
    if len(files) < 4:
        sys.exit("Fashion-MNIST not found: apt-get install dataset-fashion-mnist (see `dpkg -L dataset-fashion-mnist`)")
    g = np.random.default_rng(0)
    out = []
    for split, n in (("train", train_size), ("t10k", test_size)):
        x, y = _idx(files[f"{split}-images"]), _idx(files[f"{split}-labels"])
        keep = np.sort(g.choice(len(y), size=min(n, len(y)), replace=False))
        out.append((torch.tensor(x[keep], dtype=torch.float32)[:, None] / 255.0, torch.tensor(y[keep], dtype=torch.long)))
    (xtr, ytr), (xte, yte) = out
    mean, std = xtr.mean(), xtr.std()
    return (Pairs((xtr - mean) / std, ytr), Pairs((xte - mean) / std, yte),
            f"Fashion-MNIST subset: {len(ytr)} train / {len(yte)} test, 28x28")


# ----------------------------------------------------------------------------- models


class MLP(nn.Module):
    def __init__(self, size: int, classes: int = 10, hidden: int = 256):
        super().__init__()
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(size * size, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU())
        self.fc = nn.Linear(hidden, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.body(x))


TEACHER, ASSISTANT, STUDENT, TEACHER_B = (32, 64, 128), (16, 32, 48), (8, 16, 16), (24, 48, 96)


def params(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


# ----------------------------------------------------------------------------- losses (offline rows)

CE = nn.CrossEntropyLoss


def term(name: str, loss: Any, weight: float = 1.0, **taps: Any) -> dict:
    return {"name": name, "loss": loss, "weight": weight, **taps}


def offline_rows(num_train: int, steps: int) -> dict[str, tuple[list[dict], float, str]]:
    """name -> (terms, task weight, family). Logit losses: the papers' settings; feature and relational
    losses: weights set by :func:`balance` (their scales differ by orders of magnitude)."""
    emb = {"student": "fc@input", "teacher": "fc@input"}
    return {
        "KD (Hinton, T=4)": ([term("kd", {"type": "kd", "temperature": 4.0}, 0.9)], 0.1, "logit"),
        "DKD (a=1, b=8, T=4)": ([term("dkd", {"type": "dkd", "temperature": 4.0},
                                      {"schedule": "linear", "start": 0.0, "end": 1.0, "steps": max(steps // 5, 1)})], 1.0, "logit"),
        "DIST": ([term("dist", "dist")], 1.0, "logit"),
        "logit MSE": ([term("mse", "logit_mse")], 1.0, "logit"),
        "FitNet hint (layer3)": ([term("hint", "fitnet", 1.0, student="layer3", teacher="layer3")], 1.0, "feature"),
        "AT (layer2+3)": ([term("at2", "at", 1.0, student="layer2", teacher="layer2"),
                           term("at3", "at", 1.0, student="layer3", teacher="layer3")], 1.0, "feature"),
        "CWD (layer3, T=4)": ([term("cwd", {"type": "cwd", "temperature": 4.0}, 3.0, student="layer3", teacher="layer3",
                                    connector="conv1x1")], 1.0, "feature"),
        "RKD (embeddings)": ([term("rkd", "rkd", 1.0, **emb)], 1.0, "relational"),
        "SP (layer3)": ([term("sp", "sp", 1.0, student="layer3", teacher="layer3")], 1.0, "relational"),
        "PKT (embeddings)": ([term("pkt", "pkt", 1.0, **emb)], 1.0, "relational"),
        "CC (embeddings)": ([term("cc", "cc", 1.0, **emb)], 1.0, "relational"),
        "CRD (embeddings)": ([term("crd", {"type": "crd", "num_data": num_train, "num_negatives": 256}, 0.8, **emb)],
                             1.0, "relational"),
    }


def balance(d: Distiller, data: Pairs, batch: int = 64) -> None:
    """Set each term's weight so that, on the first batch with the student at its initial weights,
    the distillation terms together equal the cross-entropy (each an equal share)."""
    x, y = data.x[:batch], data.y[:batch]
    d.prepare(x, y, index=torch.arange(batch))
    d.eval()
    with torch.no_grad():
        out = d(x, y, index=torch.arange(batch))
    d.train()
    for t in d.terms:
        t.weight = build_schedule(out["task"].item() / (len(d.terms) * out[t.name].item()))


SCHEME_RECIPES = {
    "DML (2 peers)": "scheme_dml.yaml",
    "ONE-style (3 peers)": "scheme_one.yaml",
    "OKDDip-style (leader + 3)": "scheme_okddip.yaml",
    "BYOT (heads on layer1, layer2)": "scheme_byot.yaml",
    "previous-epoch self-KD": "scheme_self_previous.yaml",
    "multi-teacher (3 archs, confidence)": "scheme_multi_teacher.yaml",
    "TAKD (teacher -> 16-32-48 -> student)": "scheme_takd.yaml",
    "adversarial (logit discriminator)": "scheme_gan.yaml",
}


# ----------------------------------------------------------------------------- runs


class Bench:
    def __init__(self, args: argparse.Namespace):
        self.args = args
        if args.dataset == "digits":
            self.train_set, self.test_set, self.data_note = digits()
            self.size = 8
        else:
            self.train_set, self.test_set, self.data_note = fashion(args.train_size, args.test_size)
            self.size = 28
        self.steps_per_epoch = len(self.train_set) // args.batch_size
        self.steps = self.steps_per_epoch * args.epochs
        self.tmp = tempfile.TemporaryDirectory()

    def config(self, seed: int, name: str, **overrides: Any) -> TrainConfig:
        a = self.args
        cfg = dict(output_dir=f"{self.tmp.name}/{name}-{seed}", epochs=a.epochs, batch_size=a.batch_size, lr=a.lr,
                   seed=seed, seed_samples=False, progress=False, console=False, tensorboard=False, export=False,
                   keep_checkpoints=1)
        cfg.update(overrides)
        return TrainConfig(**cfg)

    def accuracy(self, model: nn.Module) -> float:
        model.eval()
        with torch.no_grad():
            pred = model(self.test_set.x).argmax(1)
        return 100.0 * (pred == self.test_set.y).float().mean().item()

    def fit(self, scheme: nn.Module, seed: int, name: str, **kw: Any) -> nn.Module:
        overrides = kw.pop("train", {})
        result = Trainer(scheme, self.train_set, self.config(seed, name, **overrides), **kw).fit()
        return result.model

    def student(self, seed: int) -> Callable[[], nn.Module]:
        counter = iter(range(1000))

        def make() -> nn.Module:
            torch.manual_seed(seed * 1000 + next(counter))
            return Net(STUDENT, self.size)

        return make

    def plain(self, model: nn.Module, seed: int, name: str) -> nn.Module:
        return self.fit(Distiller(model, None, terms=[], task_loss=CE()), seed, name)

    def teacher(self, seed: int, kind: str = "teacher") -> nn.Module:
        """The trained teacher of one kind and seed (trained on first use, then reused)."""
        if not hasattr(self, "_teachers"):
            self._teachers = {}
        if (kind, seed) not in self._teachers:
            offset, make = {"teacher": (10_000, lambda: Net(TEACHER, self.size)),
                            "mlp": (20_000, lambda: MLP(self.size)),
                            "cnn_b": (30_000, lambda: Net(TEACHER_B, self.size))}[kind]
            torch.manual_seed(offset + seed)
            self._teachers[kind, seed] = self.plain(make(), seed, kind)
        return self._teachers[kind, seed]

    def run_offline(self, seed: int, terms: list[dict], task_weight: float, name: str, family: str) -> nn.Module:
        teacher = self.teacher(seed)
        d = Distiller(self.student(seed)(), teacher, terms=terms, task_loss=CE(), task_weight=task_weight)
        if family in ("feature", "relational"):
            balance(d, self.train_set)
        return self.fit(d, seed, name)

    def run_cached(self, seed: int) -> nn.Module:
        teacher = self.teacher(seed)
        cache = TeacherCache.load_or_build(teacher, self.train_set, f"{self.tmp.name}/cache-{seed}",
                                           preprocessing="standardised, no augmentation", batch_size=256)
        terms, task_weight, _ = offline_rows(len(self.train_set), self.steps)["KD (Hinton, T=4)"]
        d = Distiller(self.student(seed)(), None, terms=terms, task_loss=CE(), task_weight=task_weight)
        return self.fit(d, seed, "kd-cached", teacher_cache=cache)

    def run_scheme(self, seed: int, recipe_file: str, name: str) -> nn.Module:
        recipe = load_config(RECIPES / recipe_file)
        make = self.student(seed)
        train = dict(recipe.get("train") or {})
        if recipe["scheme"]["type"] == "takd":
            torch.manual_seed(40_000 + seed)
            chain = scheme_from_recipe(recipe, make, teacher=self.teacher(seed), assistants=[Net(ASSISTANT, self.size)])
            return chain.run(lambda scheme, stage: self.fit(scheme, seed, f"{name}-{stage}", train=train))
        extra = [self.teacher(seed, "mlp"), self.teacher(seed, "cnn_b")] if recipe["scheme"]["type"] == "multi_teacher" else []
        scheme = scheme_from_recipe(recipe, make, teacher=self.teacher(seed), teachers=extra,
                                    num_samples=len(self.train_set))
        return self.fit(scheme, seed, name, train=train)

    def rows(self) -> list[tuple[str, str, Callable[[int], nn.Module]]]:
        rows: list[tuple[str, str, Callable[[int], nn.Module]]] = [
            ("teacher (CNN 32-64-128)", "reference", lambda s: self.teacher(s)),
            ("teacher B (MLP 256-256), multi-teacher only", "reference", lambda s: self.teacher(s, "mlp")),
            ("teacher C (CNN 24-48-96), multi-teacher only", "reference", lambda s: self.teacher(s, "cnn_b")),
            ("student alone (CNN 8-16-16)", "reference", lambda s: self.plain(self.student(s)(), s, "student")),
        ]
        for name, (terms, tw, family) in offline_rows(len(self.train_set), self.steps).items():
            rows.append((name, family, lambda s, t=terms, w=tw, n=name, f=family: self.run_offline(s, t, w, n, f)))
        rows.append(("KD from the teacher-output cache", "logit", self.run_cached))
        for name, recipe in SCHEME_RECIPES.items():
            rows.append((name, "scheme", lambda s, r=recipe, n=name: self.run_scheme(s, r, n)))
        return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", choices=("digits", "fashion"), default="digits")
    p.add_argument("--train-size", type=int, default=6000, help="Fashion-MNIST training subset")
    p.add_argument("--test-size", type=int, default=2000, help="Fashion-MNIST test subset")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--only", nargs="*", help="substrings of row names to run (teacher rows run as needed)")
    p.add_argument("--out", type=Path, help="write the Markdown table here")
    p.add_argument("--append", action="store_true", help="append to --out instead of replacing it")
    args = p.parse_args()
    torch.set_num_threads(1)

    bench = Bench(args)
    t_probe = Net(TEACHER, bench.size)
    print(f"{bench.data_note}; teacher {params(t_probe)} params, student {params(Net(STUDENT, bench.size))}, "
          f"{bench.steps} steps per run", flush=True)
    results = []
    start = time.time()
    for name, family, run in bench.rows():
        if args.only and not any(o.lower() in name.lower() for o in args.only) and family != "reference":
            continue
        accs, times = [], []
        for seed in range(args.seeds):
            t0 = time.time()
            model = run(seed)
            times.append(time.time() - t0)
            accs.append(bench.accuracy(model))
        mean, std = statistics.mean(accs), (statistics.stdev(accs) if len(accs) > 1 else 0.0)
        results.append((name, family, mean, std, accs, statistics.mean(times)))
        print(f"{name:42s} {mean:6.2f} ± {std:4.2f}   {['%.2f' % a for a in accs]}  {statistics.mean(times):5.1f}s",
              flush=True)
    total = time.time() - start
    print(f"total {total / 60:.1f} min")
    if args.out:
        write_markdown(args, bench, results, total)


SOURCES = {
    "digits": "scikit-learn's bundled copy of the UCI *Optical Recognition of Handwritten Digits* data "
              "(Alpaydin & Kaynak, 1998; `sklearn.datasets.load_digits`), shipped with scikit-learn (BSD-3-Clause); "
              "the UCI data set is licensed CC BY 4.0.",
    "fashion": "Fashion-MNIST (Xiao, Rasul & Vollgraf, 2017, Zalando Research), MIT licence, from the Debian package "
               "`dataset-fashion-mnist`.",
}

NOTES = """\
How to read it:

- One row = one way of training the same student; every run has the same steps, optimiser and data
  order for a given seed. Δ is the difference of means against the student alone; with this few
  seeds a Δ smaller than about two standard deviations is not evidence of a difference.
- Logit losses use their papers' usual settings (KD: 0.1·CE + 0.9·KD, T = 4; DKD: α = 1, β = 8,
  T = 4, its weight ramped up over the first 20 % of the steps; DIST and logit MSE: weight 1 next to
  CE). Feature and relational losses differ in scale by orders of magnitude, so their weights were set
  by one rule: on the first batch, with the student at its initial weights, the distillation terms
  together equal the cross-entropy (each an equal share). No per-method tuning was done.
- Schemes use the shipped recipes `configs/shared/scheme_*.yaml` unchanged (weights and temperatures
  are written there). Online schemes (DML, ONE, OKDDip) use no teacher; their peers are copies of the
  student architecture and the exported peer is peer 0 (the leader for OKDDip). Multi-teacher uses the
  three teachers listed above. TAKD trains the assistant from the teacher, then the student from the
  assistant, each for the full number of steps (its time covers both stages).
- "KD from the teacher-output cache" is the KD row with the teacher's logits read from a
  `TeacherCache` (built once per seed, its time included) instead of running the teacher.
"""


def write_markdown(args, bench, results, total) -> None:
    base = next(r for r in results if r[0].startswith("student alone"))
    cmd = ".venv/bin/python benchmarks/schemes_digits.py " + shlex.join(sys.argv[1:])
    lines = [
        f"# Distillation schemes and losses on real images ({args.dataset})",
        "",
        f"Command: `{cmd}`",
        "",
        f"Data: {bench.data_note}. Source: {SOURCES[args.dataset]}",
        "",
        f"Models: student CNN 8-16-16 ({params(Net(STUDENT, bench.size))} parameters); teacher CNN 32-64-128 "
        f"({params(Net(TEACHER, bench.size))}); assistant CNN 16-32-48 ({params(Net(ASSISTANT, bench.size))}). "
        f"Every run: {args.epochs} epochs ({bench.steps} steps) of SGD (lr {args.lr}, momentum 0.9, weight decay 5e-4, "
        f"cosine schedule, gradient clipping at 10), batch {args.batch_size}, through "
        "`kd_tasks.shared.training.Trainer`.",
        "",
        f"Seeds 0..{args.seeds - 1} (the teachers of seed s teach the students of seed s). Test accuracy in %, "
        f"mean ± sample standard deviation over seeds. Measured {time.strftime('%Y-%m-%d')} on a shared "
        f"{platform.machine()} CPU, torch {torch.__version__}, 1 thread; the whole table took {total / 60:.1f} min.",
        "",
        "| method | family | accuracy % | Δ vs student alone | per seed | time / run (s) |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for name, family, mean, std, accs, t in results:
        delta = "" if family == "reference" else f"{mean - base[2]:+.2f}"
        lines.append(f"| {name} | {family} | {mean:.2f} ± {std:.2f} | {delta} | {', '.join('%.1f' % a for a in accs)} | {t:.1f} |")
    if args.append and args.out.exists():  # the notes are already in the first section
        text = args.out.read_text().rstrip("\n") + "\n\n" + "\n".join(lines) + "\n"
    else:
        text = "\n".join(lines + ["", NOTES])
    args.out.write_text(text)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
