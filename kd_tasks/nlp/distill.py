"""Compress a fine-tuned BERT-family teacher into a smaller student, saved in Hugging Face format.

    python -m kd_tasks.nlp.distill --teacher ./bert-sst2 --task sst2 --student-layers 6 --output-dir out/
    kd-tasks nlp --config configs/nlp/sst2_distilbert.yaml --output-dir out/

Steps: load the teacher (local directory or hub name) and the data (a GLUE task, or local files);
build the student (a given model, teacher layers copied, or a narrower shape from scratch); check
that both tokenizers agree; score the teacher on the validation split (a teacher that failed to
load shows here, before any training); train with :class:`DistillationTrainer`; save the student
(config, weights, tokenizer) to ``--output-dir``; write ``kd_report.json`` / ``kd_report.md``:
parameters, size on disk, CPU latency per batch, task metric and the share of the teacher's metric
the student keeps.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any, Sequence

from ..shared.errors import ArgumentParser, KDConfigError, KDError, run_cli, suggest
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
"""

REQUIRED = ("teacher", "output_dir")


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(
        prog="kd-tasks nlp",
        description="Distil a fine-tuned BERT-family teacher into a smaller student (Hugging Face Trainer).",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--config", help="YAML/JSON recipe whose keys are the option names below")

    g = p.add_argument_group("models")
    g.add_argument("--teacher", help="fine-tuned teacher: a local directory or a hub name")
    g.add_argument("--teacher-tokenizer", help="tokenizer of the teacher if not in its directory")
    g.add_argument("--student", help="a student model directory or hub name (trained further here)")
    g.add_argument("--student-layers", type=int, help="keep N evenly spaced teacher layers, copying their weights")
    g.add_argument("--student-layer-ids", help="keep these 0-based teacher layers, e.g. 0,2,4,7,9,11")
    g.add_argument("--student-shape", help="a narrower student from scratch: tinybert-4l-312, minilm-6l-384, ...")
    g.add_argument("--student-hidden-size", type=int, help="override the width of --student-shape")
    g.add_argument("--student-heads", type=int, help="override the head count of --student-shape")
    g.add_argument("--student-intermediate-size", type=int, help="override the feed-forward width of --student-shape")

    g = p.add_argument_group("data")
    g.add_argument("--task", help="a GLUE task name (cola, sst2, mrpc, qqp, stsb, mnli, qnli, rte, wnli)")
    g.add_argument("--task-type", default="classification",
                   choices=["classification", "regression", "multilabel", "token", "qa"], help="head for local data")
    g.add_argument("--train-file", help="local training data (.csv, .tsv, .json, .jsonl, .parquet)")
    g.add_argument("--validation-file", help="local validation data (default: 10%% of the training file)")
    g.add_argument("--text-column", help="text column (token task: list of words; qa: the question)")
    g.add_argument("--text-pair-column", help="second text column (qa: the context)")
    g.add_argument("--label-column", help="label column (default: label; token: ner_tags; qa: answers)")
    g.add_argument("--max-length", type=int, default=128, help="tokens per example after truncation")
    g.add_argument("--max-train-samples", type=int, help="use at most this many training examples")
    g.add_argument("--max-eval-samples", type=int, help="use at most this many validation examples")

    g = p.add_argument_group("distillation")
    g.add_argument("--temperature", type=float, default=2.0, help="softmax temperature of the logit KD term")
    g.add_argument("--alpha-task", type=float, default=0.5, help="weight of the task loss on the labels")
    g.add_argument("--alpha-kd", type=float, default=0.5, help="weight of the logit KD term")
    g.add_argument("--hidden-loss", default="mse", choices=["mse", "cosine"], help="TinyBERT mse or DistilBERT cosine")
    g.add_argument("--alpha-hidden", type=float, default=0.0, help="weight of the hidden-state term")
    g.add_argument("--attention-loss", default="mse", choices=["mse", "kl"], help="TinyBERT mse or MiniLM kl")
    g.add_argument("--alpha-attention", type=float, default=0.0, help="weight of the attention-map term")
    g.add_argument("--alpha-value-relation", type=float, default=0.0, help="weight of MiniLM's value relation")
    g.add_argument("--alpha-qkv-relation", type=float, default=0.0, help="weight of MiniLMv2's Q/K/V relations")
    g.add_argument("--relation-heads", type=int, help="MiniLMv2 relation heads (default: the teacher's heads)")
    g.add_argument("--layer-map", default="uniform", help="uniform, last, last-k, '1:2,2:4' or '2,4,6'")
    g.add_argument("--teacher-inputs", default="shared", choices=["shared", "separate"],
                   help="separate: the teacher tokenises the text itself (different tokenizers; logit KD only)")
    g.add_argument("--cache-teacher-logits", help="directory caching the teacher's logits on disk (logit KD only)")
    g.add_argument("--rebuild-cache", action="store_true", help="rebuild the teacher-logits cache if stale")

    g = p.add_argument_group("training")
    g.add_argument("--output-dir", help="where the student, checkpoints and report go")
    g.add_argument("--epochs", type=float, default=3.0)
    g.add_argument("--max-steps", type=int, default=-1, help="stop after this many optimiser steps (overrides --epochs)")
    g.add_argument("--batch-size", type=int, default=32)
    g.add_argument("--eval-batch-size", type=int, default=64)
    g.add_argument("--gradient-accumulation-steps", type=int, default=1)
    g.add_argument("--learning-rate", type=float, default=5e-5)
    g.add_argument("--weight-decay", type=float, default=0.01)
    g.add_argument("--warmup", type=float, default=0.1, help="warm-up steps, or a fraction of all steps if < 1")
    g.add_argument("--max-grad-norm", type=float, default=1.0)
    g.add_argument("--seed", type=int, default=42)
    g.add_argument("--fp16", action="store_true", help="mixed precision fp16 (student and teacher)")
    g.add_argument("--bf16", action="store_true", help="mixed precision bf16 (student and teacher)")
    g.add_argument("--cpu", action="store_true", help="train on the CPU even if a GPU is present")
    g.add_argument("--logging-steps", type=int, default=50)
    g.add_argument("--save-steps", type=int, help="checkpoint every N steps (default: every epoch)")
    g.add_argument("--save-total-limit", type=int, default=2)
    g.add_argument("--resume", nargs="?", const="latest", default=None,
                   help="continue the run in --output-dir from its latest checkpoint (alone or 'latest'), "
                        "or from the given checkpoint directory")
    g.add_argument("--overwrite", action="store_true",
                   help="replace the run already in --output-dir (its checkpoint-* directories and report are removed)")
    g.add_argument("--report-to", default="none", help="none, tensorboard, ...")
    g.add_argument("--latency-batch-size", type=int, default=32, help="batch size of the CPU latency measurement")
    g.add_argument("--no-report", action="store_true", help="skip the teacher-vs-student report")
    return p


def option_names(parser: argparse.ArgumentParser) -> list[str]:
    return [a.dest for a in parser._actions if a.dest not in ("help", "config")]


def recipe_defaults(path: str, parser: argparse.ArgumentParser) -> dict[str, Any]:
    """Read a recipe; keys are option names (``student-layers`` or ``student_layers``)."""
    from ..shared.config import load_config

    names = [n for n in option_names(parser) if n != "overwrite"]
    out = {}
    for key, value in load_config(path).items():
        dest = str(key).replace("-", "_")
        if dest not in names:
            raise KDConfigError(f"recipe {path!r}: " + suggest(str(key), [n.replace("_", "-") for n in names], "option"))
        out[dest] = value
    return out


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse the command line; a ``--config`` recipe supplies defaults that explicit options override."""
    parser = build_parser()
    first, _ = parser.parse_known_args(argv)
    if first.config:
        parser.set_defaults(**recipe_defaults(first.config, parser))
    args = parser.parse_args(argv)
    missing = [f"--{n.replace('_', '-')}" for n in REQUIRED if not getattr(args, n)]
    if missing:
        parser.error(f"missing {', '.join(missing)} (on the command line or in the --config recipe)")
    check_options(args, parser, first.config)
    return args


OPTION_RULES = {
    "student_layers": POS_INT, "student_hidden_size": POS_INT, "student_heads": POS_INT,
    "student_intermediate_size": POS_INT, "max_length": ("int", 8, None, False), "max_train_samples": POS_INT,
    "max_eval_samples": POS_INT, "temperature": POSITIVE, "alpha_task": NON_NEGATIVE, "alpha_kd": NON_NEGATIVE,
    "alpha_hidden": NON_NEGATIVE, "alpha_attention": NON_NEGATIVE, "alpha_value_relation": NON_NEGATIVE,
    "alpha_qkv_relation": NON_NEGATIVE, "relation_heads": POS_INT, "epochs": POSITIVE, "batch_size": POS_INT,
    "eval_batch_size": POS_INT, "gradient_accumulation_steps": POS_INT, "learning_rate": POSITIVE,
    "weight_decay": NON_NEGATIVE, "warmup": NON_NEGATIVE, "max_grad_norm": NON_NEGATIVE, "seed": NON_NEG_INT,
    "logging_steps": POS_INT, "save_steps": POS_INT, "save_total_limit": POS_INT, "latency_batch_size": POS_INT,
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
    choices = {a.dest: a.choices for a in parser._actions if a.choices}
    strings = [a.dest for a in parser._actions if a.type is None and a.nargs is None and a.const is None
               and not isinstance(a.default, bool) and a.dest not in ("help",)]
    where = f" (in {config})" if config else ""
    for dest, allowed in choices.items():
        if getattr(args, dest) is not None and getattr(args, dest) not in allowed:
            raise KDConfigError(f"--{dest.replace('_', '-')}{where} must be one of {', '.join(map(str, allowed))}, "
                                f"got {getattr(args, dest)!r}")
    for dest in ("student_layer_ids", "layer_map"):  # a recipe may list them: [0, 5, 11]
        value = getattr(args, dest, None)
        if isinstance(value, (list, tuple)) and all(isinstance(v, int) and not isinstance(v, bool) for v in value):
            setattr(args, dest, ",".join(str(v) for v in value))
    for dest in strings:
        value = getattr(args, dest, None)
        if value is not None and not isinstance(value, str):
            raise KDConfigError(f"--{dest.replace('_', '-')}{where} must be text, got {value!r}")
    for flag in ("fp16", "bf16", "cpu", "no_report", "rebuild_cache", "overwrite"):
        if not isinstance(getattr(args, flag), bool):
            raise KDConfigError(f"--{flag.replace('_', '-')}{where} must be true or false, got {getattr(args, flag)!r}")
    if args.fp16 and args.bf16:
        raise KDConfigError("--fp16 and --bf16 both given", hint="choose one precision")
    if args.resume and args.overwrite:
        raise KDConfigError("--resume and --overwrite both given",
                            hint="--resume continues the run in --output-dir, --overwrite replaces it: give one")


# ----------------------------------------------------------------------------- the run

RUN_FILE = "kd_run.json"  # the run's identity, written next to the Trainer's checkpoint-* directories
OWN_OUTPUTS = ("kd_report.json", "kd_report.md", RUN_FILE)
# options a resumed run may change (more epochs / steps move the end of the LR schedule; intervals)
CHANGEABLE = ("epochs", "max_steps", "logging_steps", "save_steps", "save_total_limit", "resume", "overwrite",
              "report_to", "no_report", "latency_batch_size", "eval_batch_size", "output_dir", "config")


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
    used = [os.path.basename(c) for c in checkpoints[-2:]] + [f for f in ("config.json", "model.safetensors", *OWN_OUTPUTS)
                                                              if os.path.exists(os.path.join(out, f))]
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
        for c in checkpoints:
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

    per_epoch = args.save_steps is None
    return TrainingArguments(
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
        save_strategy="epoch" if per_epoch else "steps",
        save_steps=args.save_steps or 500,
        save_total_limit=args.save_total_limit,
        report_to=[] if args.report_to == "none" else [args.report_to],
        disable_tqdm=True,
    )


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


def _set_problem(model, spec) -> None:
    problem = {"regression": "regression", "multilabel": "multi_label_classification",
               "classification": "single_label_classification"}.get(spec.task_type)
    if problem:
        model.config.problem_type = problem
    if spec.label_names:
        model.config.id2label = dict(enumerate(spec.label_names))
        model.config.label2id = {n: i for i, n in enumerate(spec.label_names)}


def _subset(dataset, n: int | None, seed: int):
    return dataset if not n or n >= len(dataset) else dataset.shuffle(seed=seed).select(range(n))


def _teacher_view(dataset):
    """The ``teacher_*`` columns renamed to model inputs (to score a teacher with its own tokenizer)."""
    from .data import TEACHER_PREFIX

    cols = [c for c in dataset.column_names if c.startswith(TEACHER_PREFIX)]
    keep = cols + [c for c in ("labels",) if c in dataset.column_names]
    view = dataset.select_columns(keep)
    return view.rename_columns({c: c[len(TEACHER_PREFIX):] for c in cols})


def _evaluate(model, dataset, collator, spec, args) -> dict[str, float]:
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
                          compute_metrics=metrics_fn(spec.task_type, spec.label_names))
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


def run(args: argparse.Namespace) -> dict:
    """Everything after argument parsing; returns the report (or ``{}`` with ``--no-report``)."""
    from transformers import set_seed

    from .data import KDCollator, add_teacher_inputs, check_tokenizers, load_raw, task_spec, tokenize
    from .extract import load_model, load_tokenizer, resolve_model_source, student_from_spec
    from .report import build_report, format_report, metrics_fn, model_stats
    from .trainer import DistillationTrainer, KDArguments, teacher_logits_from_cache

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
    _set_problem(teacher, spec)

    student = _load("--student", args.student or "(built from the teacher)",
                    lambda: student_from_spec(teacher, vars(args), spec.task_type, len(teacher_tok)))
    _set_problem(student, spec)
    student_tok = (load_tokenizer(args.student, "student", required=False) if args.student else None) or teacher_tok
    separate = args.teacher_inputs == "separate"
    differences = check_tokenizers(teacher_tok, student_tok, separate_teacher_inputs=separate)

    datasets = {}
    for split in ("train", "validation"):
        datasets[split] = tokenize(raw[split], student_tok, spec, args.max_length)
        if separate:
            datasets[split] = add_teacher_inputs(datasets[split], raw[split], teacher_tok, spec, args.max_length)
    collator = KDCollator(student_tok, spec.task_type, teacher_tok if separate else None)
    teacher_eval = _teacher_view(datasets["validation"]) if separate else datasets["validation"]
    teacher_collator = KDCollator(teacher_tok, spec.task_type)

    teacher_metrics = _evaluate(teacher, teacher_eval, teacher_collator, spec, args)
    print(f"[kd-tasks nlp] teacher on validation: {json.dumps(teacher_metrics)}", flush=True)

    kd_args = KDArguments(
        task_type=spec.task_type, temperature=args.temperature, alpha_task=args.alpha_task, alpha_kd=args.alpha_kd,
        hidden_loss=args.hidden_loss, alpha_hidden=args.alpha_hidden, attention_loss=args.attention_loss,
        alpha_attention=args.alpha_attention, alpha_value_relation=args.alpha_value_relation,
        alpha_qkv_relation=args.alpha_qkv_relation, relation_heads=args.relation_heads, layer_map=args.layer_map,
        teacher_inputs=args.teacher_inputs,
    )
    logits_fn = None
    if args.cache_teacher_logits:
        if kd_args.intermediate:
            raise KDConfigError("--cache-teacher-logits stores logits only; intermediate terms need a live teacher")
        logits_fn = teacher_logits_from_cache(
            args.cache_teacher_logits, teacher, datasets["train"], collator, args.eval_batch_size,
            device=None, rebuild=args.rebuild_cache,
        )
    trainer = DistillationTrainer(
        model=student, teacher=teacher, kd_args=kd_args, args=_training_arguments(args),
        train_dataset=datasets["train"], eval_dataset=datasets["validation"], processing_class=student_tok,
        data_collator=collator, compute_metrics=metrics_fn(spec.task_type, spec.label_names),
        teacher_logits_fn=logits_fn,
    )
    check_run_identity(args, resume, teacher, student, datasets["train"])
    trainer.train(resume_from_checkpoint=resume)
    trainer.save_model(args.output_dir)
    student_metrics = _metrics_only(trainer.evaluate())
    print(f"[kd-tasks nlp] student on validation: {json.dumps(student_metrics)}", flush=True)
    if args.no_report:
        return {}

    report = build_report(
        model_stats(teacher, _latency_batch(teacher_eval, teacher_collator, args.latency_batch_size), teacher_metrics),
        model_stats(trainer.model, _latency_batch(datasets["validation"], collator, args.latency_batch_size),
                    student_metrics),
        spec.metric,
    )
    report["task"] = spec.glue_task or spec.task_type
    report["tokenizer_differences"] = differences
    report["student_saved_to"] = os.path.abspath(args.output_dir)
    with open(os.path.join(args.output_dir, "kd_report.json"), "w") as f:
        json.dump(report, f, indent=2)
    table = format_report(report)
    with open(os.path.join(args.output_dir, "kd_report.md"), "w") as f:
        f.write(table + "\n")
    print(table, flush=True)
    return report


def _main(argv: list[str]) -> int:
    run(parse_args(argv))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``kd-tasks nlp`` and ``python -m kd_tasks.nlp.distill``; returns the exit code
    (2 with one line for any input error: :func:`kd_tasks.shared.errors.run_cli`)."""
    return run_cli("nlp", _main, None if argv is None else list(argv))


if __name__ == "__main__":
    raise SystemExit(main())
