"""``kd-tasks``: one command, a subcommand per task. Parses, then calls one adapter entry point.

Every subcommand runs inside the shared error boundary (:func:`kd_tasks.shared.errors.run_cli`):
an input error is one line ``kd-tasks <cmd>: error: <what> — <fix>`` with exit code 2; ``--debug``
(anywhere on the line) or ``KD_TASKS_DEBUG=1`` adds the traceback.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import Callable

from . import __version__
from .shared.errors import DEBUG_FLAG, ArgumentParser, KDError, run_cli

EXAMPLES = """examples:
  kd-tasks demo                                   distil a CNN on bundled digits images (offline)
  kd-tasks nlp --teacher ./bert-sst2 --task sst2 --student-layers 6 --output-dir out/
  kd-tasks nlp --config configs/nlp/sst2_minilm.yaml
  kd-tasks detect --teacher-config T.py --teacher-checkpoint T.pth --student-config S.py \
      --recipe configs/detection/cwd_retinanet_fpn.py --work-dir work/
  kd-tasks face --teacher teacher.onnx --data faces/ --student mobilefacenet --output-dir out/
  kd-tasks classify --recipe configs/shared/scheme_takd.yaml --data imgs/ --teacher resnet50 --teacher-weights T.pth --assistant resnet34 --student resnet18
  kd-tasks report --run runs/classify                 compression report + Pareto plot of a classify run
  kd-tasks search --dataset digits --teacher cnn:32 --train-teacher-epochs 10 --widths 2 4 8 --budget 120
"""

# subcommand -> (module with main(argv), one-line help, example)
COMMANDS = {
    "demo": ("kd_tasks.demo", "distil a small CNN on scikit-learn's bundled digits (the built-in default)"),
    "nlp": ("kd_tasks.nlp.distill", "compress a BERT-family model (Hugging Face Trainer)"),
    "detect": ("kd_tasks.detection.train", "distil an MMDetection 3.x detector"),
    "face": ("kd_tasks.face.train", "train a face-embedding student from a face-recognition teacher"),
    "classify": ("kd_tasks.classify", "distil an image classifier with any scheme recipe (torchvision models, ImageFolder data)"),
    "report": ("kd_tasks.report_cli", "compression report of trained classifiers: size, FLOPs, latency, accuracy, Pareto plot"),
    "search": ("kd_tasks.search", "search a student family with short distillations (successive halving, time budget)"),
}


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(
        prog="kd-tasks",
        description="Knowledge distillation for object detection, face recognition and BERT-style NLP.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--version", action="version", version=f"kd-tasks {__version__}")
    p.add_argument("--debug", action="store_true",
                   help="show the Python traceback of an error (also: environment KD_TASKS_DEBUG=1)")
    sub = p.add_subparsers(dest="command", metavar="{" + ",".join(COMMANDS) + "}")
    for name, (_, help_) in COMMANDS.items():
        sub.add_parser(name, help=help_, add_help=False)
    return p


EXTRAS = {"nlp": "nlp", "detect": "detection", "face": "face"}


def _subcommand(cmd: str) -> Callable[[list[str]], int | None]:
    def body(rest: list[str]) -> int | None:
        try:
            module = importlib.import_module(COMMANDS[cmd][0])
        except ImportError as e:
            if not e.name or e.name.startswith("kd_tasks"):
                raise
            extra = EXTRAS.get(cmd, "all")
            raise KDError(f"needs {e.name!r}, which is not installed",
                          hint=f"pip install 'kd-tasks[{extra}]'") from e
        return module.main(rest)

    return body


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = DEBUG_FLAG in argv
    argv = [a for a in argv if a != DEBUG_FLAG]
    parser = build_parser()
    if not argv or argv[0] not in COMMANDS:
        parser.parse_args(argv)  # handles --help / --version / errors
        parser.print_help()
        return 2
    cmd, rest = argv[0], argv[1:]
    # the subcommand's own main() runs its boundary too; this outer one catches what happens before
    # (importing the adapter) and passes --debug on
    return run_cli(cmd, _subcommand(cmd), rest + ([DEBUG_FLAG] if debug else []))


if __name__ == "__main__":
    raise SystemExit(main())
