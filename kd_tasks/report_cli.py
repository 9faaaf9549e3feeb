"""``kd-tasks report``: the compression report of trained classifiers (teacher, students, plain baseline).

Two ways to name the models:

- ``--run DIR``: a ``kd-tasks classify`` output directory; its ``results.json`` lists every model of the
  run (architecture, role, weights file) and the evaluation data;
- explicitly: ``--teacher NAME --teacher-weights PATH``, one or more ``--student NAME
  --student-weights PATH`` (paired by order), optionally ``--baseline NAME --baseline-weights PATH``
  (a student architecture trained alone), on ``--dataset digits`` or ``--data DIR`` (ImageFolder,
  evaluated on ``DIR/val``).

Writes ``report.md``, ``report.json`` and ``report.png`` (metric vs size and vs latency, Pareto front)
to ``--output-dir`` (the run directory itself with ``--run`` unless given), and prints the table.
See :mod:`kd_tasks.shared.report` for what is measured and the figure of merit.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import torch

from .classify import HelpFormatter, build_model, check_model_name, digits, image_folder, load_weights, report_models, spread
from .shared.errors import ArgumentParser, KDConfigError, run_cli
from .shared.validate import POS_INT, check_rules

EXAMPLES = """examples:
  kd-tasks report --run runs/classify                     # every model of a classify run
  kd-tasks report --dataset digits --teacher cnn:32 --teacher-weights T.safetensors \\
      --student cnn:4 --student-weights S.safetensors --baseline cnn:4 --baseline-weights B.safetensors --quantize
"""


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(prog="kd-tasks report", description="Compression report of a teacher and its students: "
                       "parameters, FLOPs, size, latency, throughput, peak memory, accuracy, share of the teacher's "
                       "accuracy kept, figure of merit, Pareto plot.", epilog=EXAMPLES, formatter_class=HelpFormatter)
    p.add_argument("--run", type=Path, metavar="DIR", help="a kd-tasks classify output directory (its results.json)")
    data = p.add_mutually_exclusive_group()
    data.add_argument("--data", type=Path, metavar="DIR", help="ImageFolder tree; evaluated on DIR/val")
    data.add_argument("--dataset", choices=("digits",), help="scikit-learn's bundled digits (test split of classify)")
    p.add_argument("--image-size", type=int, help="images resized to SIZE x SIZE (default 224 for --data, 8 for digits)")
    p.add_argument("--teacher", metavar="NAME", help="teacher architecture (torchvision name or cnn:...)")
    p.add_argument("--teacher-weights", type=Path, metavar="PATH")
    p.add_argument("--student", action="append", metavar="NAME", help="student architecture; repeat for several")
    p.add_argument("--student-weights", action="append", type=Path, metavar="PATH", help="one per --student")
    p.add_argument("--baseline", metavar="NAME", help="a student architecture trained alone")
    p.add_argument("--baseline-weights", type=Path, metavar="PATH")
    p.add_argument("--quantize", action="store_true", help="add int8 dynamic quantised copies of the students")
    p.add_argument("--batch-size", type=int, default=256, help="batch of the throughput and memory measurement")
    p.add_argument("--output-dir", type=Path, help="where report.md/.json/.png go (default: --run DIR, else "
                   "runs/report)")
    return p


def _specs_from_run(run: Path) -> tuple[list[dict], dict]:
    path = run / "results.json"
    if not path.is_file():
        raise KDConfigError(f"--run {str(run)!r} holds no results.json", hint="give the --output-dir of a finished "
                            "kd-tasks classify run")
    results = json.loads(path.read_text())
    if "models" not in results or "data_spec" not in results:
        raise KDConfigError(f"{str(path)!r} lists no models (written by an older kd-tasks classify)",
                            hint="name the models with --teacher/--student and their --*-weights")
    return results["models"], results["data_spec"]


def _specs_from_args(a: argparse.Namespace) -> tuple[list[dict], dict]:
    if not a.teacher or not a.teacher_weights:
        raise KDConfigError("give --run DIR, or --teacher NAME with --teacher-weights PATH")
    students, weights = a.student or [], a.student_weights or []
    if not students or len(students) != len(weights):
        raise KDConfigError(f"give one --student-weights per --student ({len(students)} students, {len(weights)} files)")
    if (a.baseline is None) != (a.baseline_weights is None):
        raise KDConfigError("give --baseline and --baseline-weights together")
    if a.data is None and a.dataset is None:
        raise KDConfigError("give the evaluation data: --dataset digits or --data DIR")
    specs = [{"name": f"teacher {a.teacher}", "arch": a.teacher, "role": "teacher", "weights": str(a.teacher_weights)}]
    specs += [{"name": f"student {n}" if students.count(n) == 1 else f"student {n} #{i}", "arch": n, "role": "student",
               "weights": str(w)} for i, (n, w) in enumerate(zip(students, weights))]
    if a.baseline:
        specs.append({"name": f"{a.baseline} alone", "arch": a.baseline, "role": "baseline",
                      "weights": str(a.baseline_weights)})
    return specs, {"data": str(a.data) if a.data else None, "dataset": a.dataset, "image_size": a.image_size}


def run(a: argparse.Namespace) -> Any:
    check_rules(vars(a), {"batch_size": POS_INT, "image_size": POS_INT})
    specs, spec = _specs_from_run(a.run) if a.run is not None else _specs_from_args(a)
    for s in specs:
        check_model_name(s["arch"])
    if spec.get("data"):
        size = spec.get("image_size") or 224
        _, eval_set, classes = image_folder(spec["data"], size)
        num_classes, channels = len(classes), 3
    else:
        channels = spec.get("channels") or (1 if all(s["arch"].startswith("cnn") for s in specs) else 3)
        _, eval_set, _ = digits(spec.get("image_size") if spec.get("image_size") not in (None, 8) else None, channels)
        size, num_classes = eval_set.x.shape[-1], 10
    entries = []
    for s in specs:
        model = build_model(s["arch"], num_classes, channels, size)
        load_weights(model, s["weights"], s["name"])
        entries.append((s["name"], model.eval(), s["role"]))
    example = next(iter(torch.utils.data.DataLoader(spread(eval_set, 64), batch_size=64)))[0]
    out = a.output_dir or a.run or Path("runs/report")
    rep, paths = report_models(entries, eval_set, example, Path(out), quantize=a.quantize, batch_size=a.batch_size,
                               metric_name="accuracy")
    print(rep.to_text())
    print(f"report: {paths['markdown']}  {paths['json']}  plot: {paths['png']}")
    return rep


def _main(argv: list[str]) -> int:
    run(build_parser().parse_args(argv))
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_cli("report", _main, argv)


if __name__ == "__main__":
    raise SystemExit(main())
