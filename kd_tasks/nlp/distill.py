"""Compress a fine-tuned BERT-family teacher into a smaller student, saved in Hugging Face format.

    python -m kd_tasks.nlp.distill --teacher ./bert-sst2 --task sst2 --student-layers 6 --output-dir out/
    kd-tasks nlp --config configs/nlp/sst2_distilbert.yaml --output-dir out/

Steps: load the teacher (local directory or hub name) and the data (a GLUE task, or local files; local
files on the command line win over a recipe's GLUE ``task``); add transfer data (``--unlabeled-file``,
``--augment-copies``: the teacher's soft labels only, no task loss; :mod:`.augment`);
build the student (a given model, teacher layers copied, or a narrower shape from scratch); check
that both tokenizers agree; score the teacher on the validation split (a teacher that failed to
load shows here, before any training); train with :class:`DistillationTrainer`; save the student
(config, weights, tokenizer) to ``--output-dir``; write the shared compression report
(:mod:`kd_tasks.shared.report`: ``report.md``, ``report.json``, ``report.png``) of the teacher and the
student measured on the CPU -- parameters, FLOPs, size on disk, batch-1 latency, throughput at
``--latency-batch-size``, peak memory, the task metric (the validation scores above, not recomputed),
the share of the teacher's metric kept, the figure of merit, the Pareto front -- and, from the same
measurements, ``kd_report.json`` / ``kd_report.md`` with the recipe; ``README.md`` (a model card); with
``--quantize``, an int8 dynamically quantised copy of the saved student as a third row, scored on the
validation split on the CPU; with ``--export onnx``,
``onnx/model.onnx`` checked against PyTorch with onnxruntime (:mod:`.export`). A recipe with ``stages`` runs each stage
in ``<output-dir>/stage<N>-<name>/`` (resumable; a finished stage is reused). Every
``transformers.TrainingArguments`` flag is accepted (:mod:`.arguments`). Under ``torchrun`` / ``accelerate
launch`` only the main process prints, evaluates into the report and writes it.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any, Sequence

from ..shared.errors import KDConfigError, KDError, run_cli, suggest
from ..shared.validate import NON_NEG_INT, NON_NEGATIVE, POS_INT, POSITIVE, check_rules, number

EPILOG = """examples:
  # DistilBERT-style: keep 6 of the teacher's layers, distil the logits
  python -m kd_tasks.nlp.distill --teacher ./bert-sst2 --task sst2 --student-layers 6 --output-dir out/
  # local csv data, TinyBERT-style hidden-state + attention terms on a 4-layer, 312-wide student
  kd-tasks nlp --teacher ./bert-reviews --train-file train.csv --validation-file dev.csv \\
      --text-column sentence --label-column label --student-shape tinybert-4l-312 \\
      --alpha-hidden 1 --alpha-attention 1 --output-dir out/
  # a recipe (keys are these option names); command-line options override it
  kd-tasks nlp --config configs/nlp/sst2_distilbert.yaml --teacher ./bert-sst2 --output-dir out/
  # transfer data + two stages (intermediate layers, then logits), each resumable
  kd-tasks nlp --config configs/nlp/transfer_two_stage.yaml --teacher ./my-teacher --train-file train.csv \
      --validation-file dev.csv --unlabeled-file reviews.txt --output-dir out/
  # any transformers.TrainingArguments flag, --snake_case or --kebab-case (torchrun / accelerate launch work)
  kd-tasks nlp --teacher ./bert-sst2 --task sst2 --student-layers 6 --lr_scheduler_type cosine \
      --per-device-train-batch-size 16 --output-dir out/
"""

REQUIRED = ("teacher", "output_dir")


USAGE = "%(prog)s --teacher DIR --output-dir DIR [--config RECIPE] [options]"


def build_parser() -> argparse.ArgumentParser:
    """The command line: ``HfArgumentParser(DistillationArguments)`` -- kd-tasks' options, then every other
    ``TrainingArguments`` field -- plus ``--config`` / ``--recipe`` (:mod:`.arguments`)."""
    from .arguments import argument_parser_class

    return argument_parser_class()(
        prog="kd-tasks nlp", usage=USAGE, epilog=EPILOG,
        description="Distil a fine-tuned BERT-family teacher into a smaller student (Hugging Face Trainer).",
    )


def option_names(parser: argparse.ArgumentParser) -> list[str]:
    """The parser's options by destination (the dataclass field names)."""
    return [a.dest for a in parser._actions if a.dest not in ("help", "config")]


def recipe_defaults(path: str, parser: argparse.ArgumentParser) -> dict[str, Any]:
    """Read a recipe; keys are option names in any spelling (``student-layers``, ``student_layers``, ``lr``,
    ``batch_size``, ``per_device_train_batch_size``); values by field name."""
    from ..shared.config import load_config
    from .arguments import KD_NAME, is_flag

    names = [n for n in option_names(parser) if n != "overwrite"]
    known = sorted({KD_NAME.get(n, n).replace("_", "-") for n in names} | {n.replace("_", "-") for n in names})
    out = {}
    for key, value in load_config(path).items():
        dest = str(key).replace("-", "_")
        action = parser._option_string_actions.get(f"--{key}")
        if dest not in names and action is not None and action.dest in names:
            dest = action.dest  # any spelling of an option, e.g. lr for learning_rate
        if dest not in names:
            raise KDConfigError(f"recipe {path!r}: " + suggest(str(key), known, "option"))
        if is_flag(parser._option_string_actions[f"--{dest}"]) and value is not None and not isinstance(value, bool):
            raise not_a_flag(KD_NAME.get(dest, dest), value, f" (in {path})")  # argparse would read "no" as true
        out[dest] = value
    return out


def not_a_flag(name: str, value: Any, where: str = "") -> KDConfigError:
    """The error for a true/false option given something else (``where``: the recipe it came from)."""
    return KDConfigError(f"--{name.replace('_', '-')}{where} must be true or false, got {value!r}")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse the command line; a ``--config`` recipe supplies defaults that explicit options override.
    Returns the namespace the run reads (:func:`kd_tasks.nlp.arguments.run_namespace`)."""
    from .arguments import run_namespace

    parser = build_parser()
    first, _ = parser.parse_known_args(argv)
    if first.config:
        parser.set_defaults(**recipe_defaults(first.config, parser))
    args = run_namespace(parser.parse_args(argv))
    if first.train_file and not first.task and args.task:  # local files on the command line win over a recipe's task
        print(f"[kd-tasks nlp] --train-file given: the recipe's GLUE task {args.task!r} is not used", file=sys.stderr)
        args.task = None
    missing = [f"--{n.replace('_', '-')}" for n in REQUIRED if not getattr(args, n)]
    if missing:
        parser.error(f"missing {', '.join(missing)} (on the command line or in the --config recipe)")
    args.stages = _read_stages(args.stages, first.config)
    check_options(args, parser, first.config)
    for stage in args.stages or []:
        try:
            check_options(stage_args(args, stage), parser, f"{first.config or '--stages'}, stage {stage['name']!r}")
        except KDConfigError as e:
            raise KDConfigError(f"stage {stage['name']!r}: {e}") from None
    return args


STAGE_KEYS = ("name", "epochs", "max_steps", "learning_rate", "warmup", "weight_decay", "batch_size", "temperature",
              "alpha_task", "alpha_kd", "alpha_hidden", "alpha_attention", "alpha_value_relation",
              "alpha_qkv_relation", "hidden_loss", "attention_loss", "layer_map", "relation_heads",
              "cache_teacher_logits", "cache_top_k", "kd_divergence", "jsd_beta", "logit_standardization")


def _read_stages(value, config: str | None) -> list[dict] | None:
    """The ``stages`` list of a recipe (or JSON text): mappings of per-stage options, each named."""
    if value is None or value == []:
        return None
    where = f" (in {config})" if config else ""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError:
            raise KDConfigError(f"--stages{where} is not a JSON list of mappings: {value[:80]!r}") from None
    if not isinstance(value, list) or not all(isinstance(v, dict) for v in value):
        raise KDConfigError(f"--stages{where} must be a list of mappings (one per stage), got {value!r}")
    stages = []
    for i, raw in enumerate(value):
        stage = {}
        for key, v in raw.items():
            dest = str(key).replace("-", "_")
            if dest not in STAGE_KEYS:
                raise KDConfigError(f"stage {i + 1}{where}: " + suggest(str(key), [k.replace("_", "-") for k in STAGE_KEYS],
                                                                      "stage option"))
            stage[dest] = v
        stage["name"] = str(stage.get("name") or f"stage{i + 1}")
        if not all(c.isalnum() or c in "-_" for c in stage["name"]):
            raise KDConfigError(f"stage name {stage['name']!r}{where}: use letters, digits, '-' and '_'")
        stages.append(stage)
    if len({s["name"] for s in stages}) != len(stages):
        raise KDConfigError(f"--stages{where}: stage names must differ")
    return stages


def stage_args(args: argparse.Namespace, stage: dict) -> argparse.Namespace:
    """The options of one stage: the run's, overridden by the stage's keys."""
    out = argparse.Namespace(**{**vars(args), **{k: v for k, v in stage.items() if k != "name"}})
    out.stages = None
    return out


OPTION_RULES = {
    "student_layers": POS_INT, "student_hidden_size": POS_INT, "student_heads": POS_INT,
    "student_intermediate_size": POS_INT, "max_length": ("int", 8, None, False), "max_train_samples": POS_INT,
    "max_eval_samples": POS_INT, "temperature": POSITIVE, "alpha_task": NON_NEGATIVE, "alpha_kd": NON_NEGATIVE,
    "alpha_hidden": NON_NEGATIVE, "alpha_attention": NON_NEGATIVE, "alpha_value_relation": NON_NEGATIVE,
    "alpha_qkv_relation": NON_NEGATIVE, "relation_heads": POS_INT, "epochs": POSITIVE, "batch_size": POS_INT,
    "eval_batch_size": POS_INT, "gradient_accumulation_steps": POS_INT, "learning_rate": POSITIVE,
    "weight_decay": NON_NEGATIVE, "warmup": NON_NEGATIVE, "max_grad_norm": NON_NEGATIVE, "seed": NON_NEG_INT,
    "logging_steps": POS_INT, "save_steps": POS_INT, "save_total_limit": POS_INT, "latency_batch_size": POS_INT,
    "unlabeled_ratio": POSITIVE, "augment_copies": NON_NEG_INT, "augment_prob": POSITIVE, "augment_k": POS_INT,
    "threads": POS_INT, "jsd_beta": ("float", 0.0, 1.0, True), "doc_stride": POS_INT,
}
ALPHAS = ("alpha_task", "alpha_kd", "alpha_hidden", "alpha_attention", "alpha_value_relation", "alpha_qkv_relation")


def check_options(args: argparse.Namespace, parser: argparse.ArgumentParser, config: str | None = None) -> None:
    """Every setting, named, before any model or data is loaded (recipe values are not converted by
    argparse unless they are strings, so their types are checked here too)."""
    check_rules(vars(args), OPTION_RULES)
    if args.max_steps is not None and args.max_steps != -1:
        number(args.max_steps, "--max-steps", low=1, integer=True, hint="give --max-steps N >= 1 (or -1: use --epochs)")
    if args.warmup is not None and args.warmup >= 1 and not float(args.warmup).is_integer():
        raise KDConfigError(f"--warmup {args.warmup}: give a whole number of steps, or a fraction below 1")
    if sum(float(getattr(args, a)) for a in ALPHAS) <= 0:
        raise KDConfigError("every loss weight (--alpha-task, --alpha-kd, --alpha-hidden, ...) is 0: nothing to train",
                            hint="give at least one of them a positive value")
    from .arguments import KD_NAME, kd_options_typed

    choices = {KD_NAME.get(a.dest, a.dest): a.choices for a in parser._actions if a.choices}
    where = f" (in {config})" if config else ""
    for dest, allowed in choices.items():
        if getattr(args, dest) is not None and getattr(args, dest) not in allowed:
            raise KDConfigError(f"--{dest.replace('_', '-')}{where} must be one of {', '.join(map(str, allowed))}, "
                                f"got {getattr(args, dest)!r}")
    for dest in ("student_layer_ids", "layer_map"):  # a recipe may list them: [0, 5, 11]
        value = getattr(args, dest, None)
        if isinstance(value, (list, tuple)) and all(isinstance(v, int) and not isinstance(v, bool) for v in value):
            setattr(args, dest, ",".join(str(v) for v in value))
    for dest in kd_options_typed(str):
        value = getattr(args, dest, None)
        if value is not None and not isinstance(value, str) and dest not in ("stages", "resume"):
            raise KDConfigError(f"--{dest.replace('_', '-')}{where} must be text, got {value!r}")
    for flag in kd_options_typed(bool):
        if not isinstance(getattr(args, flag), bool):
            raise not_a_flag(flag, getattr(args, flag), where)
    if args.fp16 and args.bf16:
        raise KDConfigError("--fp16 and --bf16 both given", hint="choose one precision")
    if args.quantize and args.no_report:
        raise KDConfigError("--quantize and --no-report both given: the int8 student is a row of the report",
                            hint="drop --no-report to get the report, or --quantize to skip it")
    if args.augment_prob is not None and args.augment_prob > 1:
        raise KDConfigError(f"--augment-prob{where} is a probability: give a number in (0, 1], got {args.augment_prob}")
    if args.resume and args.overwrite:
        raise KDConfigError("--resume and --overwrite both given",
                            hint="--resume continues the run in --output-dir, --overwrite replaces it: give one")


# ----------------------------------------------------------------------------- the run

RUN_FILE = "kd_run.json"  # the run's identity, written next to the Trainer's checkpoint-* directories
ONNX_DIR = "onnx"  # --export onnx writes <output-dir>/onnx/model.onnx
OWN_OUTPUTS = ("kd_report.json", "kd_report.md", "report.md", "report.json", "report.png", RUN_FILE)
# options a resumed run may change (more epochs / steps move the end of the LR schedule; intervals)
CHANGEABLE = ("epochs", "max_steps", "logging_steps", "save_steps", "save_total_limit", "resume", "overwrite",
              "report_to", "no_report", "latency_batch_size", "eval_batch_size", "output_dir", "config", "export",
              "quantize")


def _checkpoints(output_dir: str) -> list[str]:
    import glob

    found = [p for p in glob.glob(os.path.join(output_dir, "checkpoint-*")) if p.rsplit("-", 1)[1].isdigit()]
    return sorted(found, key=lambda p: int(p.rsplit("-", 1)[1]))


def prepare_output_dir(args: argparse.Namespace) -> str | bool | None:
    """Refuse an --output-dir holding another run unless --resume / --overwrite; return what to resume.

    The Hugging Face Trainer would otherwise mix the runs (its checkpoint rotation sorts every
    ``checkpoint-*`` by step and deletes the oldest, whichever run wrote it). ``--overwrite`` removes
    the earlier run's ``checkpoint-*`` directories and report (transformers 5 has no
    ``overwrite_output_dir``: this is its meaning here); the saved model files are replaced at the end.
    """
    import shutil

    from ..shared.checkpoint import check_writable_dir
    from ..shared.errors import OutputDirInUseError

    out = args.output_dir
    check_writable_dir(out, "--output-dir")
    checkpoints = _checkpoints(out)
    stage_dirs = [d for d in _stage_dirs(args) if os.path.isdir(d)]
    used = [os.path.basename(c) for c in checkpoints[-2:]] + [f for f in ("config.json", "model.safetensors", *OWN_OUTPUTS)
                                                              if os.path.exists(os.path.join(out, f))]
    used += [os.path.basename(d) for d in stage_dirs]
    if args.resume:
        if args.resume != "latest":
            if not os.path.isdir(args.resume):
                raise KDConfigError(f"--resume {args.resume!r}: no such checkpoint directory",
                                    hint="give a checkpoint-N directory, or --resume alone for the latest in --output-dir")
            return args.resume
        if not checkpoints:
            print(f"[kd-tasks nlp] --resume: no checkpoint in {out}; starting from scratch", file=sys.stderr, flush=True)
            return None
        return True
    if used and not args.overwrite:
        raise OutputDirInUseError(f"--output-dir {out!r} already holds a run ({', '.join(used)})",
                                  hint="pass --resume to continue it, --overwrite to replace it, or choose another "
                                       "--output-dir")
    if args.overwrite:
        for c in checkpoints + stage_dirs + [d for d in [os.path.join(out, ONNX_DIR)] if os.path.isdir(d)]:
            shutil.rmtree(c)
        for f in OWN_OUTPUTS:
            if os.path.exists(os.path.join(out, f)):
                os.remove(os.path.join(out, f))
    return None


def check_run_identity(args: argparse.Namespace, resume: str | bool | None, teacher, student, train_set) -> None:
    """Write ``kd_run.json`` (fingerprints of teacher weights, student architecture and initial weights,
    training data, settings) for a new run; on resume, refuse a run whose identity differs."""
    from ..shared.checkpoint import atomic_write_bytes, check_identity, digest, state_digest

    settings = {k: v for k, v in sorted(vars(args).items()) if k not in CHANGEABLE}
    identity = {
        "teacher": state_digest(teacher.state_dict()),
        "student_architecture": digest([type(student).__name__, state_digest(student.state_dict(), with_values=False)]),
        "student_init": state_digest(student.state_dict()),
        "data": digest([len(train_set), getattr(train_set, "_fingerprint", None)]),
        "settings": digest(settings),
    }
    path = os.path.join(args.output_dir, RUN_FILE)
    if resume:
        saved = None
        if os.path.isfile(path):
            try:
                saved = json.loads(open(path).read())
            except ValueError:
                raise KDConfigError(f"{path!r} is damaged", hint="resume is not possible; start again with --overwrite")
        details = {}
        if saved and saved.get("options"):
            changed = [f"{k} {saved['options'].get(k)!r} -> {v!r}" for k, v in settings.items()
                       if k in saved["options"] and saved["options"][k] != v]
            if changed:
                details["settings"] = "changed: " + ", ".join(changed)
        check_identity((saved or {}).get("identity"), identity, resume if isinstance(resume, str) else args.output_dir,
                       details)
        return
    record = {"identity": identity, "options": json.loads(json.dumps(settings, default=str))}
    atomic_write_bytes(path, json.dumps(record, indent=1).encode())


def _load(flag: str, name: str, load):
    """Run a model loader; a file that is not a model (truncated weights, garbage) is named with ``flag``."""
    try:
        return load()
    except (KDError, ImportError):
        raise
    except Exception as e:  # noqa: BLE001 -- a damaged model directory is an input error
        raise KDConfigError(f"{flag} {name!r} cannot be loaded ({type(e).__name__}: {' '.join(str(e).split())[:300]})",
                            hint="give a directory saved with save_pretrained (config.json + weights) that is intact") from None


def _training_arguments(args: argparse.Namespace):
    from transformers import TrainingArguments

    from .arguments import training_overrides

    per_epoch = args.save_steps is None
    save = getattr(args, "save_strategy", None) or ("epoch" if per_epoch else "steps")
    settings = dict(
        output_dir=args.output_dir,
        num_train_epochs=args.epochs,
        max_steps=args.max_steps,
        per_device_train_batch_size=args.batch_size,
        per_device_eval_batch_size=args.eval_batch_size,
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        learning_rate=args.learning_rate,
        weight_decay=args.weight_decay,
        warmup_steps=args.warmup,
        max_grad_norm=args.max_grad_norm,
        seed=args.seed,
        fp16=args.fp16,
        bf16=args.bf16,
        use_cpu=args.cpu,
        logging_steps=args.logging_steps,
        eval_strategy="epoch" if per_epoch else "steps",
        eval_steps=None if per_epoch else args.save_steps,
        save_strategy=save,
        save_steps=args.save_steps or 500,
        save_total_limit=args.save_total_limit,
        report_to=[] if args.report_to == "none" else [args.report_to],
        disable_tqdm=bool(getattr(args, "disable_tqdm", False)),
        logging_first_step=True,
    )
    settings.update(training_overrides(args))  # any other Trainer flag the user gave wins
    return TrainingArguments(**settings)


def _align_labels(spec, teacher) -> None:
    """Use the teacher's label order when its config names the labels the data has."""
    names = [teacher.config.id2label[i] for i in range(len(teacher.config.id2label))]
    if spec.label_names and not spec.labels_are_ids and sorted(map(str, names)) == sorted(spec.label_names):
        spec.label_names = [str(n) for n in names]


def _check_head(spec, teacher) -> None:
    if spec.task_type in ("classification", "multilabel", "token") and teacher.config.num_labels != spec.num_labels:
        raise KDConfigError(
            f"the teacher predicts {teacher.config.num_labels} labels but the data has {spec.num_labels} "
            f"({spec.label_names[:10]}); give the teacher fine-tuned on this task"
        )


def _named_labels(config) -> list[str] | None:
    """The teacher's label names when they are real names (not transformers' ``LABEL_i`` defaults)."""
    names = [str(config.id2label[i]) for i in range(len(config.id2label or {}))]
    if not names or all(n == f"LABEL_{i}" for i, n in enumerate(names)):
        return None
    return names


def _set_problem(model, spec, teacher=None) -> None:
    """Problem type and label names; with integer labels in the data the teacher's names are kept."""
    problem = {"regression": "regression", "multilabel": "multi_label_classification",
               "classification": "single_label_classification"}.get(spec.task_type)
    if problem:
        model.config.problem_type = problem
    if spec.label_names:
        names = list(spec.label_names)
        teacher_names = _named_labels(teacher.config) if teacher is not None else None
        ids = names == [str(i) for i in range(len(names))]
        if (spec.labels_are_ids or ids) and teacher_names and len(teacher_names) == len(names):
            names = teacher_names
        model.config.id2label = dict(enumerate(names))
        model.config.label2id = {n: i for i, n in enumerate(names)}


def _subset(dataset, n: int | None, seed: int):
    return dataset if not n or n >= len(dataset) else dataset.shuffle(seed=seed).select(range(n))


def _teacher_view(dataset):
    """The ``teacher_*`` columns renamed to model inputs (to score a teacher with its own tokenizer)."""
    from .data import TEACHER_PREFIX

    cols = [c for c in dataset.column_names if c.startswith(TEACHER_PREFIX)]
    keep = cols + [c for c in ("labels",) if c in dataset.column_names]
    view = dataset.select_columns(keep)
    return view.rename_columns({c: c[len(TEACHER_PREFIX):] for c in cols})


def _evaluate(model, dataset, collator, spec, args, qa_ref=None) -> dict[str, float]:
    """Task metrics of any model on ``dataset`` through a plain Trainer (same device/precision rules)."""
    import tempfile

    from transformers import Trainer, TrainingArguments

    from .report import metrics_fn

    with tempfile.TemporaryDirectory() as tmp:
        eval_args = TrainingArguments(
            output_dir=tmp, per_device_eval_batch_size=args.eval_batch_size, report_to=[], use_cpu=args.cpu,
            disable_tqdm=True,
        )
        trainer = Trainer(model=model, args=eval_args, data_collator=collator,
                          compute_metrics=metrics_fn(spec.task_type, spec.label_names, qa_ref))
        return _metrics_only(trainer.evaluate(dataset))


def _metrics_only(metrics: dict) -> dict[str, float]:
    """``eval_*`` task metrics and loss, without the Trainer's timing entries."""
    timing = ("runtime", "samples_per_second", "steps_per_second", "model_preparation_time")
    out = {k[len("eval_"):]: float(v) for k, v in metrics.items() if k.startswith("eval_")}
    return {k: v for k, v in out.items() if k not in timing}


def _latency_batch(dataset, collator, size: int) -> dict:
    from .data import INDEX_COLUMN

    rows = [dataset[i] for i in range(min(size, len(dataset)))]
    batch = collator(rows)
    drop = ("labels", "start_positions", "end_positions", INDEX_COLUMN)
    return {k: v for k, v in batch.items() if k not in drop and not k.startswith("teacher_")}


def _quiet_progress_bars() -> None:
    import datasets
    from transformers.utils import logging as hf_logging

    datasets.disable_progress_bars()
    hf_logging.disable_progress_bar()


def _is_main_process() -> bool:
    """True on the process that prints, evaluates the teacher and writes the report (rank 0, or alone)."""
    try:
        from accelerate import PartialState

        return PartialState().is_main_process
    except Exception:  # noqa: BLE001 -- no accelerate state: a single process
        return True


def _say(message: str) -> None:
    if _is_main_process():
        print(f"[kd-tasks nlp] {message}", flush=True)


def kept_teacher_layers(args: argparse.Namespace, teacher_layers: int) -> list[int] | None:
    """The 0-based teacher layers the student was cut from (``--student-layers`` / ``--student-layer-ids``)."""
    from .layer_map import evenly_spaced_layers

    if args.student_layers:
        return evenly_spaced_layers(int(args.student_layers), teacher_layers)
    if args.student_layer_ids:
        ids = args.student_layer_ids
        return [int(x) for x in ids.split(",")] if isinstance(ids, str) else [int(x) for x in ids]
    return None


def resolve_layer_map(spec, kept: list[int] | None, student_layers: int, teacher_layers: int):
    """``auto``: the extraction map for a student cut from the teacher, else ``uniform``; other specs as given."""
    from .layer_map import build_layer_map, extraction_map

    name = spec.strip().lower() if isinstance(spec, str) else None
    if name in ("auto", "extraction"):
        if kept is not None:
            return extraction_map(kept, teacher_layers)
        if name == "extraction":
            raise KDConfigError("--layer-map extraction needs a student cut from the teacher (--student-layers or "
                                "--student-layer-ids)", hint="use --layer-map uniform or an explicit map")
        return build_layer_map("uniform", student_layers, teacher_layers)
    return build_layer_map(spec, student_layers, teacher_layers)


def _mixed_train_set(tokenized, texts: list[str], tokenizer, spec, max_length: int):
    """The labelled set followed by the transfer texts (label -100, or nan for regression: teacher only)."""
    import datasets

    from .data import INDEX_COLUMN, tokenize

    if spec.task_type not in ("classification", "regression"):
        raise KDConfigError(f"transfer data (--unlabeled-file, --augment-copies) is for sequence classification and "
                            f"regression; the task is {spec.task_type!r}")
    if spec.text_pair_column:
        raise KDConfigError("transfer data holds single texts; the task reads text pairs "
                            f"({spec.text_column!r}, {spec.text_pair_column!r})")
    extra = tokenize(datasets.Dataset.from_dict({spec.text_column: texts}), tokenizer, spec, max_length,
                     with_index=False)
    fill = float("nan") if spec.task_type == "regression" else -100
    extra = extra.add_column("labels", [fill] * len(extra))
    base = tokenized.remove_columns([INDEX_COLUMN])
    extra = extra.cast(base.features)
    mixed = datasets.concatenate_datasets([base, extra])
    return mixed.add_column(INDEX_COLUMN, list(range(len(mixed))))


STAGE_DONE = "kd_stage_done.json"


def _stage_dirs(args: argparse.Namespace) -> list[str]:
    return [os.path.join(args.output_dir, f"stage{i + 1}-{st['name']}") for i, st in enumerate(args.stages or [])]


def run(args: argparse.Namespace) -> dict:
    """Everything after argument parsing; returns the report (or ``{}`` with ``--no-report``)."""
    import torch
    from transformers import set_seed

    from .augment import transfer_texts
    from .data import QA_META, KDCollator, add_teacher_inputs, check_tokenizers, load_raw, qa_reference, task_spec, tokenize
    from .extract import load_model, load_tokenizer, resolve_model_source, student_from_spec
    from .report import compression_report, evaluate_model, format_report, metrics_fn, write_model_card
    from .trainer import DistillationTrainer, KDArguments, teacher_logits_from_cache

    if args.threads:
        torch.set_num_threads(int(args.threads))
    set_seed(args.seed)
    _quiet_progress_bars()
    resume = prepare_output_dir(args)
    resolve_model_source(args.teacher, "teacher")  # a missing path fails here, named
    teacher_tok = load_tokenizer(args.teacher_tokenizer or args.teacher, "teacher tokenizer")
    raw = load_raw(args.task, args.train_file, args.validation_file, seed=args.seed)
    raw["train"] = _subset(raw["train"], args.max_train_samples, args.seed)
    raw["validation"] = _subset(raw["validation"], args.max_eval_samples, args.seed)
    spec = task_spec(raw, args.task_type, args.task, args.text_column, args.text_pair_column, args.label_column)
    teacher = _load("--teacher", args.teacher, lambda: load_model(args.teacher, spec.task_type, "teacher"))
    _check_head(spec, teacher)
    _align_labels(spec, teacher)
    _set_problem(teacher, spec, teacher)

    student = _load("--student", args.student or "(built from the teacher)",
                    lambda: student_from_spec(teacher, vars(args), spec.task_type, len(teacher_tok)))
    _set_problem(student, spec, teacher)
    student_tok = (load_tokenizer(args.student, "student", required=False) if args.student else None) or teacher_tok
    separate = args.teacher_inputs == "separate"
    differences = check_tokenizers(teacher_tok, student_tok, separate_teacher_inputs=separate)
    t_layers, s_layers = int(teacher.config.num_hidden_layers), int(student.config.num_hidden_layers)
    kept = kept_teacher_layers(args, t_layers)
    if kept is not None:
        _say(f"student: teacher layers {kept} kept (0-based), weights copied")

    spec.doc_stride = args.doc_stride
    datasets = {}
    qa_ref = None
    for split in ("train", "validation"):
        datasets[split] = tokenize(raw[split], student_tok, spec, args.max_length)
        if spec.task_type == "qa":
            if split == "validation":
                qa_ref = qa_reference(raw[split], datasets[split], spec)
            datasets[split] = datasets[split].remove_columns(list(QA_META))
        if separate:
            datasets[split] = add_teacher_inputs(datasets[split], raw[split], teacher_tok, spec, args.max_length)
    transfer = None
    if args.unlabeled_file or args.augment_copies:
        if separate:
            raise KDConfigError("transfer data needs one tokenizer for both models (not --teacher-inputs separate)")
        texts, transfer = transfer_texts(args, teacher, teacher_tok, list(raw["train"][spec.text_column]),
                                         log=lambda m: _say(m[len("[kd-tasks nlp] "):]))
        datasets["train"] = _mixed_train_set(datasets["train"], texts, student_tok, spec, args.max_length)
    collator = KDCollator(student_tok, spec.task_type, teacher_tok if separate else None)
    teacher_eval = _teacher_view(datasets["validation"]) if separate else datasets["validation"]
    teacher_collator = KDCollator(teacher_tok, spec.task_type)

    teacher_metrics = _evaluate(teacher, teacher_eval, teacher_collator, spec, args, qa_ref)
    _say(f"teacher on validation: {json.dumps(teacher_metrics)}")

    stages = args.stages or [None]
    stage_dirs = _stage_dirs(args) or [args.output_dir]
    recipe_stages = []
    trainer = None
    for i, stage in enumerate(stages):
        sargs = stage_args(args, stage) if stage else args
        sdir = stage_dirs[i]
        pairs = None
        kd_args = _kd_arguments(sargs, spec)
        if kd_args.intermediate:
            pairs = resolve_layer_map(sargs.layer_map, kept, s_layers, t_layers)
            kd_args.layer_map = [list(p) for p in pairs]
        recipe_stages.append({"name": stage["name"] if stage else "distill", "output_dir": sdir,
                              **_stage_recipe(sargs, pairs)})
        if stage and os.path.isfile(os.path.join(sdir, STAGE_DONE)):
            _say(f"stage {i + 1}/{len(stages)} {stage['name']!r} already done in {sdir}; its student is reused")
            student = _load("stage student", sdir, lambda: load_model(sdir, spec.task_type, "student"))
            continue
        if stage:
            _say(f"stage {i + 1}/{len(stages)} {stage['name']!r}: " + json.dumps(_stage_recipe(sargs, pairs)))
        elif pairs:
            _say(f"layer map (student:teacher hidden states, 0 = embeddings): "
                 + ", ".join(f"{a}:{b}" for a, b in pairs))
        stage_resume = resume
        if stage:
            os.makedirs(sdir, exist_ok=True)
            stage_resume = (True if _checkpoints(sdir) else None) if args.resume else None
        use_cache = sargs.cache_teacher_logits and not (stage and kd_args.intermediate)
        if use_cache and kd_args.intermediate:
            raise KDConfigError("--cache-teacher-logits stores logits only; intermediate terms need a live teacher")
        logits_fn = None
        if use_cache and kd_args.alpha_kd > 0:
            logits_fn = teacher_logits_from_cache(
                sargs.cache_teacher_logits, teacher, datasets["train"], collator, args.eval_batch_size,
                device=None, rebuild=args.rebuild_cache, top_k=getattr(sargs, "cache_top_k", None),
            )
        sargs_dir = argparse.Namespace(**{**vars(sargs), "output_dir": sdir})
        trainer = DistillationTrainer(
            model=student, teacher=teacher, kd_args=kd_args, args=_training_arguments(sargs_dir),
            train_dataset=datasets["train"], eval_dataset=datasets["validation"], processing_class=student_tok,
            data_collator=collator, compute_metrics=metrics_fn(spec.task_type, spec.label_names, qa_ref),
            teacher_logits_fn=logits_fn,
        )
        check_run_identity(sargs_dir, stage_resume, teacher, student, datasets["train"])
        trainer.train(resume_from_checkpoint=stage_resume)
        student = trainer.model
        if stage:
            trainer.save_model(sdir)
            if trainer.args.should_save:
                with open(os.path.join(sdir, STAGE_DONE), "w") as f:
                    json.dump({"stage": stage["name"], "global_step": trainer.state.global_step}, f)
    if trainer is None:  # every stage was already done: evaluate the last stage's student
        trainer = DistillationTrainer(model=student, teacher=None, kd_args=KDArguments(task_type=spec.task_type,
                                      alpha_kd=0.0, alpha_task=1.0), args=_training_arguments(args),
                                      eval_dataset=datasets["validation"], processing_class=student_tok,
                                      data_collator=collator, compute_metrics=metrics_fn(spec.task_type, spec.label_names, qa_ref))
    trainer.save_model(args.output_dir)
    student_metrics = _metrics_only(trainer.evaluate())
    _say(f"student on validation: {json.dumps(student_metrics)}")
    onnx = None
    saved = None
    if (args.export == "onnx" or args.quantize) and _is_main_process():  # --quantize implies a report (checked)
        saved = _load("saved student", args.output_dir, lambda: load_model(args.output_dir, spec.task_type, "student"))
    if args.export == "onnx" and _is_main_process():
        from .export import export_student_onnx

        onnx = export_student_onnx(saved, _latency_batch(datasets["validation"], collator, args.latency_batch_size),
                                   args.output_dir, spec.task_type)
        _say(f"ONNX: {onnx['path']} (inputs {', '.join(onnx['inputs'])}; dynamic batch and sequence; "
             f"onnxruntime vs PyTorch max |diff| {onnx['max_abs_diff_vs_pytorch']:.2g})")
    if args.no_report or not _is_main_process():
        return {}

    quantized = quantized_metrics = None
    if args.quantize:
        from ..shared.export import quantize_dynamic_int8

        quantized = quantize_dynamic_int8(saved)
        quantized_metrics = evaluate_model(quantized, datasets["validation"], collator, spec.task_type,
                                           spec.label_names, qa_ref, batch_size=args.eval_batch_size)
        _say(f"student int8 (dynamic quantisation, CPU) on validation: {json.dumps(quantized_metrics)}")
    # one measurement code path: the shared report, every model on the CPU, on a tokenised validation batch
    shared, report = compression_report(
        teacher, trainer.model, teacher_metrics, student_metrics, main_metric=spec.metric, task_type=spec.task_type,
        example=_latency_batch(datasets["validation"], collator, args.latency_batch_size),
        teacher_example=_latency_batch(teacher_eval, teacher_collator, args.latency_batch_size) if separate else None,
        quantized=quantized, quantized_metrics=quantized_metrics, batch_size=args.latency_batch_size,
    )
    paths = shared.write(args.output_dir)
    report["compression_report"] = {k: str(v) for k, v in paths.items()}
    report["task"] = spec.glue_task or spec.task_type
    report["tokenizer_differences"] = differences
    report["student_saved_to"] = os.path.abspath(args.output_dir)
    if onnx:
        report["onnx"] = onnx
    report["recipe"] = {
        "teacher": args.teacher, "student_source": _student_source(args), "kept_teacher_layers": kept,
        "seed": args.seed, "config": args.config, "transfer_data": transfer, "stages": recipe_stages,
        "max_length": args.max_length, "batch_size": args.batch_size, "learning_rate": args.learning_rate,
    }
    with open(os.path.join(args.output_dir, "kd_report.json"), "w") as f:
        json.dump(report, f, indent=2)
    table = format_report(report)
    with open(os.path.join(args.output_dir, "kd_report.md"), "w") as f:
        f.write(table + "\n")
    write_model_card(args.output_dir, report)
    print(shared.to_text(), flush=True)
    print(f"[kd-tasks nlp] report: {paths['markdown']}  {paths['json']}  plot: {paths['png']}", flush=True)
    return report


def _student_source(args: argparse.Namespace) -> str:
    if args.student:
        return f"pretrained model {args.student}"
    if args.student_layers or args.student_layer_ids:
        return "teacher layers copied (DistilBERT-style extraction)"
    return f"shape {args.student_shape} from scratch"


def _kd_arguments(sargs: argparse.Namespace, spec):
    from .trainer import KDArguments  # noqa: F811

    return KDArguments(
        task_type=spec.task_type, temperature=sargs.temperature, alpha_task=sargs.alpha_task, alpha_kd=sargs.alpha_kd,
        hidden_loss=sargs.hidden_loss, alpha_hidden=sargs.alpha_hidden, attention_loss=sargs.attention_loss,
        alpha_attention=sargs.alpha_attention, alpha_value_relation=sargs.alpha_value_relation,
        alpha_qkv_relation=sargs.alpha_qkv_relation, relation_heads=sargs.relation_heads, layer_map=sargs.layer_map,
        teacher_inputs=sargs.teacher_inputs, kd_divergence=sargs.kd_divergence, jsd_beta=sargs.jsd_beta,
        logit_standardization=sargs.logit_standardization,
    )


def _stage_recipe(sargs: argparse.Namespace, pairs) -> dict:
    keys = ("epochs", "max_steps", "learning_rate", "temperature", "alpha_task", "alpha_kd", "alpha_hidden",
            "hidden_loss", "alpha_attention", "attention_loss", "alpha_value_relation", "alpha_qkv_relation")
    out = {k: getattr(sargs, k) for k in keys}
    out["layer_map"] = [list(p) for p in pairs] if pairs else None
    out["cached_teacher_logits"] = bool(sargs.cache_teacher_logits) and not pairs
    return out


def arguments_namespace(dargs) -> argparse.Namespace:
    """The checked namespace the run reads, from a :class:`~kd_tasks.nlp.arguments.DistillationArguments`
    (the same as :func:`parse_args` gives for the same options on the command line)."""
    from .arguments import run_namespace

    args = run_namespace(dargs)
    if getattr(dargs, "resume_from_checkpoint", None) and not args.resume:
        args.resume = dargs.resume_from_checkpoint
    missing = [n for n in REQUIRED if not getattr(args, n)]
    if missing:
        raise KDConfigError(f"DistillationArguments: missing {', '.join(missing)}")
    args.stages = _read_stages(args.stages, None)
    check_options(args, build_parser())
    return args


def run_arguments(dargs) -> dict:
    """Run from a :class:`~kd_tasks.nlp.arguments.DistillationArguments` (a ``TrainingArguments`` subclass)."""
    return run(arguments_namespace(dargs))


def _main(argv: list[str]) -> int:
    run(parse_args(argv))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``kd-tasks nlp`` and ``python -m kd_tasks.nlp.distill``; returns the exit code
    (2 with one line for any input error: :func:`kd_tasks.shared.errors.run_cli`)."""
    return run_cli("nlp", _main, None if argv is None else list(argv))


if __name__ == "__main__":
    raise SystemExit(main())
