"""``kd-tasks``: one command, a subcommand per task. Parses, then calls one adapter entry point."""

from __future__ import annotations

import argparse
import importlib
import sys

from . import __version__

EXAMPLES = """examples:
  kd-tasks demo                                   distil a CNN on bundled digits images (offline)
  kd-tasks nlp --teacher ./bert-sst2 --task sst2 --student-layers 6 --output-dir out/
  kd-tasks nlp --config configs/nlp/sst2_minilm.yaml
  kd-tasks detect --teacher-config T.py --teacher-checkpoint T.pth --student-config S.py \
      --recipe configs/detection/cwd_retinanet_fpn.py --work-dir work/
  kd-tasks face --teacher teacher.onnx --data faces/ --student mobilefacenet --output-dir out/
  kd-tasks classify --recipe configs/shared/scheme_takd.yaml --data imgs/ --teacher resnet50 --teacher-weights T.pth --assistant resnet34 --student resnet18
"""

# subcommand -> (module with main(argv), one-line help, example)
COMMANDS = {
    "demo": ("kd_tasks.demo", "distil a small CNN on scikit-learn's bundled digits (the built-in default)"),
    "nlp": ("kd_tasks.nlp.distill", "compress a BERT-family model (Hugging Face Trainer)"),
    "detect": ("kd_tasks.detection.train", "distil an MMDetection 3.x detector"),
    "face": ("kd_tasks.face.train", "train a face-embedding student from a face-recognition teacher"),
    "classify": ("kd_tasks.classify", "distil an image classifier with any scheme recipe (torchvision models, ImageFolder data)"),
}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="kd-tasks",
        description="Knowledge distillation for object detection, face recognition and BERT-style NLP.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--version", action="version", version=f"kd-tasks {__version__}")
    sub = p.add_subparsers(dest="command", metavar="{" + ",".join(COMMANDS) + "}")
    for name, (_, help_) in COMMANDS.items():
        sub.add_parser(name, help=help_, add_help=False)
    return p


EXTRAS = {"nlp": "nlp", "detect": "detection", "face": "face"}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    if not argv or argv[0] not in COMMANDS:
        parser.parse_args(argv)  # handles --help / --version / errors
        parser.print_help()
        return 2
    cmd, rest = argv[0], argv[1:]
    try:
        module = importlib.import_module(COMMANDS[cmd][0])
    except ImportError as e:
        if e.name and e.name.startswith("kd_tasks"):
            raise
        extra = EXTRAS.get(cmd, "all")
        print(f"kd-tasks {cmd}: error: needs {e.name!r}, which is not installed; "
              f"pip install 'kd-tasks[{extra}]'", file=sys.stderr)
        return 2
    return int(module.main(rest) or 0)


if __name__ == "__main__":
    raise SystemExit(main())
