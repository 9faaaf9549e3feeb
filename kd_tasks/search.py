"""``kd-tasks search``: find the students worth distilling into -- successive halving under a time budget.

A student family is a grid of width and depth multipliers:

- ``cnn`` (built in): ``cnn:W-2W-4W...`` with ``depth`` stages of base width ``W`` (``--widths 2 4 8
  --depths 2 3 4``);
- ``mobilenet_v2`` (torchvision): ``width_mult`` from ``--widths`` (``0.25 0.5 1.0``; depth fixed);
- ``resnet`` (torchvision ``ResNet`` with ``BasicBlock``): base width ``--widths`` (64 is ResNet-18)
  and ``--depths`` blocks per stage (2 is ResNet-18).

Successive halving (Jamieson & Talwalkar 2016; Li et al. 2017): every candidate is distilled from the
teacher (``--recipe``, Hinton KD by default) for a short schedule and scored on the validation data;
the better ``1/eta`` go on to a schedule ``eta`` times longer, until one rung is left or the budget
(``--budget`` seconds of training) is spent -- a candidate whose run would start after the budget is
not trained, and the last completed scores stand. Candidates are ranked by the figure of merit of
:func:`kd_tasks.shared.report.figure_of_merit` (share of the teacher's accuracy kept against log2 of
the FLOPs speed-up), so cheap students that keep most of the accuracy survive next to accurate ones;
the most accurate member of each rung is always kept. The students returned are the finalists on the
Pareto front of validation accuracy against FLOPs.

Teacher-assistant rule (Mirzadeh et al. 2020): a student is also tried through an assistant when the
gap is large -- after its last rung it keeps less than ``--ta-retained`` (0.9) of the teacher's
accuracy, and the teacher needs at least ``--ta-ratio`` (16) times its FLOPs. The assistant is the family
member whose FLOPs are closest to the geometric mean of teacher's and student's; it is distilled from
the teacher, then the student from it, with the student's final-rung schedule; the better of direct
and chained distillation is kept (``via`` in ``search.json``).

Outputs in ``--output-dir``: ``search.json`` (every run of every rung, the Pareto students) and the
compression report of the teacher and the Pareto students (``report.md/.json/.png``).
"""

from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch import nn

from .classify import HelpFormatter, accuracy, build_model, check_model_name, digits, image_folder, load_weights, report_models, spread
from .shared.config import distiller_from_config, load_config
from .shared.distiller import Distiller
from .shared.errors import ArgumentParser, KDConfigError, run_cli
from .shared.report import count_flops, figure_of_merit, pareto_front
from .shared.validate import NON_NEG_INT, POS_INT, POSITIVE, check_rules

FAMILIES = ("cnn", "mobilenet_v2", "resnet")
HINTON = {"distill": {"task_loss": "cross_entropy", "task_weight": 0.1,
                      "terms": [{"name": "kd", "loss": {"type": "kd", "temperature": 4.0}, "weight": 0.9}]}}


def family_members(family: str, widths: Sequence[float], depths: Sequence[int] | None) -> list[dict]:
    """The grid as ``{"name", "family", "width", "depth"}`` entries."""
    if family not in FAMILIES:
        raise KDConfigError(f"--family {family!r} is not one of {', '.join(FAMILIES)}")
    if family == "mobilenet_v2":
        return [{"name": f"mobilenet_v2@{w:g}", "family": family, "width": float(w), "depth": None} for w in widths]
    for w in widths:
        if float(w) != int(w) or w < 1:
            raise KDConfigError(f"--widths: {family} widths are whole numbers >= 1, got {w!r}")
    depths = depths or ([2] if family == "resnet" else [4])
    if family == "cnn":
        return [{"name": "cnn:" + "-".join(str(int(w) * 2 ** i) for i in range(d)), "family": family,
                 "width": int(w), "depth": d} for d in depths for w in widths]
    return [{"name": f"resnet(w{int(w)},d{d})", "family": family, "width": int(w), "depth": d}
            for d in depths for w in widths]


def build_member(m: dict, num_classes: int, channels: int, size: int) -> nn.Module:
    if m["family"] == "cnn":
        return build_model(m["name"], num_classes, channels, size)
    if channels != 3:
        raise KDConfigError(f"--family {m['family']}: torchvision models take 3-channel images, the data has {channels}")
    import torchvision

    if m["family"] == "mobilenet_v2":
        return torchvision.models.mobilenet_v2(num_classes=num_classes, width_mult=m["width"])
    from torchvision.models.resnet import BasicBlock, ResNet

    net = ResNet(BasicBlock, [m["depth"]] * 4, num_classes=num_classes, width_per_group=64)
    if m["width"] != 64:  # rebuild with a narrower base width: ResNet's stage widths are 64, 128, 256, 512
        net = _narrow_resnet(m["width"], m["depth"], num_classes)
    return net


def _narrow_resnet(width: int, depth: int, num_classes: int) -> nn.Module:
    from torchvision.models.resnet import BasicBlock, ResNet

    class Narrow(ResNet):
        def __init__(self):
            nn.Module.__init__(self)
            self._norm_layer, self.inplanes, self.dilation, self.groups, self.base_width = nn.BatchNorm2d, width, 1, 1, 64
            self.conv1 = nn.Conv2d(3, width, 7, 2, 3, bias=False)
            self.bn1, self.relu, self.maxpool = nn.BatchNorm2d(width), nn.ReLU(inplace=True), nn.MaxPool2d(3, 2, 1)
            self.layer1 = self._make_layer(BasicBlock, width, depth)
            self.layer2 = self._make_layer(BasicBlock, 2 * width, depth, stride=2)
            self.layer3 = self._make_layer(BasicBlock, 4 * width, depth, stride=2)
            self.layer4 = self._make_layer(BasicBlock, 8 * width, depth, stride=2)
            self.avgpool, self.fc = nn.AdaptiveAvgPool2d(1), nn.Linear(8 * width, num_classes)

    return Narrow()


@dataclass
class Candidate:
    member: dict
    flops: float = 0.0
    params: int = 0
    runs: list[dict] = field(default_factory=list)  # {"rung", "epochs", "metric", "seconds", "via"}
    model: nn.Module | None = None

    @property
    def metric(self) -> float:
        return self.runs[-1]["metric"] if self.runs else float("nan")


def successive_halving(candidates: list[Candidate], train: Callable[[Candidate, float], tuple[float, nn.Module]], *,
                       min_epochs: float, eta: int = 2, budget_s: float = float("inf"),
                       score: Callable[[Candidate], float] = lambda c: c.metric,
                       keep: Callable[[list[Candidate]], list[bool]] | None = None,
                       after_rung: Callable[[int, list[Candidate]], None] | None = None,
                       log: Callable[[str], None] = print) -> list[Candidate]:
    """Run rungs of ``train(candidate, epochs) -> (metric, model)``: rung r trains the survivors for
    ``min_epochs * eta**r`` epochs; the best ``ceil(n / eta)`` by ``score`` (plus those ``keep`` marks)
    survive. Stops when no candidate would be dropped (one left, or all protected by ``keep``) or
    ``budget_s`` seconds are spent (no run starts after that; the candidates keep their last scores).
    Returns the finalists."""
    start = time.perf_counter()
    alive, rung = list(candidates), 0
    while alive:
        epochs = min_epochs * eta ** rung
        done = []
        for c in alive:
            if time.perf_counter() - start >= budget_s:
                log(f"budget of {budget_s:g}s spent: {c.member['name']} not trained at rung {rung}")
                break
            t0 = time.perf_counter()
            metric, model = train(c, epochs)
            c.runs.append({"rung": rung, "epochs": epochs, "metric": metric, "seconds": time.perf_counter() - t0,
                           "via": "teacher"})
            c.model = model
            done.append(c)
            log(f"rung {rung}: {c.member['name']:<28} {epochs:g} epochs  metric {100 * metric:6.2f} %")
        if after_rung is not None and done:
            after_rung(rung, done)
        if len(done) < len(alive):  # the budget ran out in this rung: the others keep their last scores
            return done + [c for c in alive if c not in done and c.runs]
        if len(done) <= 1:
            return done
        ranked = sorted(done, key=score, reverse=True)
        kept = {id(c) for c in ranked[:math.ceil(len(done) / eta)]}
        if keep is not None:
            kept |= {id(c) for c, flag in zip(done, keep(done)) if flag}
        if len(kept) == len(done):  # nothing left to drop: these are the finalists
            return done
        alive = [c for c in done if id(c) in kept]
        rung += 1
    return alive


def pareto_students(cands: Sequence[Candidate]) -> list[Candidate]:
    flags = pareto_front([c.metric for c in cands], [c.flops for c in cands])
    return [c for c, f in zip(cands, flags) if f]


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(prog="kd-tasks search", description="Search a student family (width/depth multipliers) with "
                       "short distillations and successive halving under a time budget; returns the Pareto students "
                       "(accuracy vs FLOPs) with their compression report.", formatter_class=HelpFormatter,
                       epilog="examples:\n  kd-tasks search --dataset digits --teacher cnn:32 --train-teacher-epochs 10 "
                       "--family cnn --widths 2 4 8 --depths 2 3 4 --budget 120\n  kd-tasks search --data DIR --teacher "
                       "resnet50 --teacher-weights T.pth --family mobilenet_v2 --widths 0.25 0.5 0.75 1.0 --budget 3600")
    p.add_argument("--recipe", "--config", dest="recipe", type=Path,
                   help="distillation recipe with a distill: section (default: Hinton KD, T=4, 0.1 CE + 0.9 KD)")
    data = p.add_mutually_exclusive_group(required=True)
    data.add_argument("--data", type=Path, metavar="DIR", help="ImageFolder tree with train/ and val/")
    data.add_argument("--dataset", choices=("digits",), help="scikit-learn's bundled digits (no download)")
    p.add_argument("--image-size", type=int, help="images resized to SIZE x SIZE (default 224 for --data, 8 for digits)")
    p.add_argument("--teacher", required=True, metavar="NAME", help="teacher: torchvision model name or cnn:...")
    p.add_argument("--teacher-weights", type=Path, metavar="PATH", help="teacher state_dict (.pth or .safetensors)")
    p.add_argument("--train-teacher-epochs", type=float, default=0, metavar="N",
                   help="without --teacher-weights: train the teacher for N epochs first")
    p.add_argument("--family", choices=FAMILIES, default="cnn", help="the student family")
    p.add_argument("--widths", type=float, nargs="+", default=[2, 4, 8],
                   help="width multipliers (cnn/resnet: base width; mobilenet_v2: width_mult)")
    p.add_argument("--depths", type=int, nargs="+", help="depths (cnn: stages, default 4; resnet: blocks per stage, "
                   "default 2)")
    p.add_argument("--min-epochs", type=float, default=1.0, help="epochs of the first rung")
    p.add_argument("--eta", type=int, default=2, help="keep 1/eta per rung, schedules eta times longer")
    p.add_argument("--budget", type=float, default=600.0, help="seconds of student training before the search stops")
    p.add_argument("--ta-retained", type=float, default=0.9, help="teacher-assistant rule: kept share below this ...")
    p.add_argument("--ta-ratio", type=float, default=16.0, help="... and teacher/student FLOPs at least this")
    p.add_argument("--batch-size", type=int, default=64, help="training batch size")
    p.add_argument("--lr", "--learning-rate", dest="lr", type=float, default=0.05, help="SGD learning rate")
    p.add_argument("--seed", type=int, default=0, help="seed of initialisation and data order")
    p.add_argument("--output-dir", type=Path, default=Path("runs/search"), help="search.json and the report")
    return p


OPTION_RULES = {"image_size": POS_INT, "train_teacher_epochs": ("number", 0, None, False), "min_epochs": POSITIVE,
                "eta": ("int", 2, None, False), "budget": POSITIVE, "ta_retained": POSITIVE, "ta_ratio": POSITIVE,
                "batch_size": POS_INT, "lr": POSITIVE, "seed": NON_NEG_INT}


def run(a: argparse.Namespace, log: Callable[[str], None] = print) -> dict:
    from .shared.training import TrainConfig, Trainer

    check_rules(vars(a), OPTION_RULES)
    for i, w in enumerate(a.widths):
        if not math.isfinite(w) or w <= 0:
            raise KDConfigError(f"--widths must be numbers > 0, got {w!r}")
    for d in a.depths or []:
        if d < 1:
            raise KDConfigError(f"--depths must be whole numbers >= 1, got {d!r}")
    members = family_members(a.family, a.widths, a.depths)
    check_model_name(a.teacher)
    recipe = load_config(a.recipe) if a.recipe else HINTON
    if not isinstance(recipe, dict) or "distill" not in recipe:
        raise KDConfigError(f"--recipe {str(a.recipe)!r} must have a distill: section (offline distillation)")
    if not a.teacher_weights and not a.train_teacher_epochs:
        raise KDConfigError("the teacher has no weights: give --teacher-weights PATH, or --train-teacher-epochs N")
    if a.data is not None:
        size = a.image_size or 224
        train_set, val_set, classes = image_folder(a.data, size)
        num_classes, channels = len(classes), 3
    else:
        channels = 1 if a.family == "cnn" and a.teacher.startswith("cnn") else 3
        train_set, val_set, _ = digits(a.image_size, channels)
        size, num_classes = train_set.x.shape[-1], 10
    out = Path(a.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    example = next(iter(torch.utils.data.DataLoader(spread(val_set, 64), batch_size=64)))[0]

    def fit(scheme: nn.Module, stage: str, epochs: float) -> nn.Module:
        cfg = TrainConfig(output_dir=str(out / "runs" / stage), epochs=epochs, batch_size=a.batch_size, lr=a.lr,
                          seed=a.seed, progress=False, console=False, tensorboard=False, overwrite=True,
                          seed_samples=a.data is not None, keep_checkpoints=1, cpu=not torch.cuda.is_available())
        return Trainer(scheme, train_set, cfg).fit().model

    def fresh(arch: Callable[[], nn.Module], offset: int) -> nn.Module:
        torch.manual_seed(a.seed * 1000 + offset)
        return arch()

    teacher = fresh(lambda: build_model(a.teacher, num_classes, channels, size), 100)
    if a.teacher_weights:
        load_weights(teacher, a.teacher_weights, f"teacher {a.teacher!r}")
    else:
        log(f"training teacher {a.teacher!r} for {a.train_teacher_epochs:g} epochs")
        fit(Distiller(teacher, None, terms=[], task_loss=nn.CrossEntropyLoss()), "teacher", a.train_teacher_epochs)
    teacher.eval()
    t_metric, t_flops = accuracy(teacher, val_set), count_flops(teacher, example)
    log(f"teacher {a.teacher}: val accuracy {100 * t_metric:.2f} %, {t_flops / 1e6:.3f} MFLOPs/input")

    cands = []
    for i, m in enumerate(members):
        net = build_member(m, num_classes, channels, size)
        cands.append(Candidate(m, flops=count_flops(net, example), params=sum(p.numel() for p in net.parameters())))

    def distil(c: Candidate, epochs: float, source: nn.Module | None = None, tag: str = "") -> tuple[float, nn.Module]:
        idx = cands.index(c)
        student = fresh(lambda: build_member(c.member, num_classes, channels, size), 300 + idx)
        scheme = distiller_from_config(recipe, student, source if source is not None else teacher).prepare(example[:2])
        model = fit(scheme, f"{idx:02d}{tag}", epochs)
        return accuracy(model, val_set), model

    def fom(c: Candidate) -> float:
        return figure_of_merit(c.metric / t_metric, t_flops / c.flops)

    gap_tried: list[dict] = []

    finalists = successive_halving(cands, distil, min_epochs=a.min_epochs, eta=a.eta, budget_s=a.budget, score=fom,
                                   keep=lambda cs: [c is max(cs, key=lambda o: o.metric) for c in cs],
                                   log=log)
    # teacher-assistant rule on the finalists
    for c in finalists:
        retained = c.metric / t_metric
        if retained < a.ta_retained and t_flops / c.flops >= a.ta_ratio:
            target = math.sqrt(t_flops * c.flops)
            others = [o for o in cands if c.flops < o.flops < t_flops]
            if not others:
                continue
            ta = min(others, key=lambda o: abs(math.log(o.flops / target)))
            epochs = c.runs[-1]["epochs"]
            log(f"teacher-assistant rule: {c.member['name']} kept {100 * retained:.1f}% at {t_flops / c.flops:.0f}x "
                f"fewer FLOPs; trying {ta.member['name']} as assistant")
            _, ta_model = distil(ta, epochs, tag="-assistant")
            metric, model = distil(c, epochs, source=ta_model.eval(), tag=f"-via-{cands.index(ta):02d}")
            gap_tried.append({"student": c.member["name"], "assistant": ta.member["name"], "direct": c.metric,
                              "via_assistant": metric})
            if metric > c.metric:
                c.runs.append({"rung": c.runs[-1]["rung"], "epochs": epochs, "metric": metric, "seconds": None,
                               "via": ta.member["name"]})
                c.model = model
    pareto = pareto_students(finalists)
    entries = [(f"teacher {a.teacher}", teacher, "teacher")]
    entries += [(f"{c.member['name']} (KD{'' if c.runs[-1]['via'] == 'teacher' else ' via ' + c.runs[-1]['via']})",
                 c.model, "student") for c in pareto]
    rep, paths = report_models(entries, val_set, example, out, metric_name="val accuracy")
    result = {
        "teacher": {"name": a.teacher, "metric": t_metric, "flops": t_flops},
        "candidates": [{**c.member, "flops": c.flops, "params": c.params, "runs": c.runs} for c in cands],
        "finalists": [c.member["name"] for c in finalists],
        "pareto": [{"name": c.member["name"], "metric": c.metric, "flops": c.flops, "params": c.params,
                    "epochs": c.runs[-1]["epochs"], "via": c.runs[-1]["via"], "fom": fom(c)} for c in pareto],
        "teacher_assistant": gap_tried,
        "report": str(paths["json"]),
    }
    (out / "search.json").write_text(json.dumps(result, indent=2) + "\n")
    log(rep.to_text())
    log(f"Pareto students: {', '.join(p['name'] for p in result['pareto'])}")
    log(f"search: {out / 'search.json'}  report: {paths['markdown']}  plot: {paths['png']}")
    return result


def _main(argv: list[str]) -> int:
    run(build_parser().parse_args(argv))
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_cli("search", _main, argv)


if __name__ == "__main__":
    raise SystemExit(main())
