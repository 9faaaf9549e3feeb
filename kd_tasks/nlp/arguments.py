"""The Trainer-native interface: every ``transformers.TrainingArguments`` flag on the ``kd-tasks nlp`` command
line, and :class:`DistillationArguments`, a ``TrainingArguments`` subclass carrying the distillation options.

* :func:`add_training_arguments` adds each ``TrainingArguments`` field the kd-tasks parser does not
  already define, through ``transformers.HfArgumentParser``'s own field parser, so ``--lr_scheduler_type``,
  ``--gradient-checkpointing``, ``--eval_steps``, ``--torch_compile`` ... are read exactly as the Trainer's
  example scripts read them, in ``--snake_case`` and ``--kebab-case``. kd-tasks' own options accept both
  spellings too, and its short names are aliases of the Trainer's: ``--epochs`` = ``--num_train_epochs``,
  ``--batch-size`` = ``--per_device_train_batch_size``, ``--eval-batch-size`` =
  ``--per_device_eval_batch_size``, ``--cpu`` = ``--use_cpu``, ``--warmup`` = ``--warmup_steps``.
* :class:`DistillationArguments` (``TrainingArguments`` + every kd-tasks option as a field) is the same
  set of options as a dataclass: ``HfArgumentParser(DistillationArguments).parse_yaml_file(recipe)`` reads a
  recipe, ``DistillationArguments(output_dir=..., teacher=..., student_layers=3)`` builds one in Python,
  and :func:`kd_tasks.nlp.distill.run_arguments` runs it.

Naming: trl also ships a ``DistillationTrainer`` (on-policy generative distillation of causal LMs from
sampled sequences). ``kd_tasks.nlp.DistillationTrainer`` is another class: offline distillation of
encoder models (classification, regression, token classification, extractive QA) on a fixed dataset, with
logit, hidden-state, attention and relation terms. ``kd_tasks.nlp.KDTrainer`` is the same class under a
name that cannot be confused with trl's.
"""

from __future__ import annotations

import argparse
import dataclasses
from typing import Any, Optional

# kd-tasks option -> the TrainingArguments field it sets (its aliases on the command line)
ALIASES = {
    "epochs": "num_train_epochs",
    "batch_size": "per_device_train_batch_size",
    "eval_batch_size": "per_device_eval_batch_size",
    "cpu": "use_cpu",
    "warmup": "warmup_steps",
}
# TrainingArguments fields kd-tasks sets itself from its own options (not offered twice)
OWNED = set(ALIASES.values()) | {"resume_from_checkpoint", "output_dir", "eval_strategy", "do_train", "do_eval",
                                 "do_predict", "overwrite_output_dir"}


def training_fields() -> list[dataclasses.Field]:
    from transformers import TrainingArguments

    return [f for f in dataclasses.fields(TrainingArguments) if f.init and not f.name.startswith("_")]


def add_training_arguments(parser: argparse.ArgumentParser) -> list[str]:
    """Add snake-case aliases to the parser's options, the Trainer's names to kd-tasks' short names, and every
    other ``TrainingArguments`` field (HfArgumentParser's field parser). Returns the added field names."""
    from typing import get_type_hints

    from transformers import HfArgumentParser, TrainingArguments

    for action in parser._actions:
        extra = []
        for opt in action.option_strings:
            if opt.startswith("--") and "-" in opt[2:]:
                extra.append("--" + opt[2:].replace("-", "_"))
        if action.dest in ALIASES:
            name = ALIASES[action.dest]
            extra += [f"--{name}", f"--{name.replace('_', '-')}"]
        for opt in extra:
            if opt not in parser._option_string_actions:
                action.option_strings.append(opt)
                parser._option_string_actions[opt] = action
    taken = {a.dest for a in parser._actions} | OWNED
    hints = get_type_hints(TrainingArguments)
    group = parser.add_argument_group("transformers.TrainingArguments (every Trainer flag; see its documentation)")
    added = []
    for field in training_fields():
        if field.name in taken:
            continue
        copy = _clone(field, hints[field.name])
        try:
            HfArgumentParser._parse_dataclass_field(group, copy)
        except (ValueError, RuntimeError, argparse.ArgumentError):
            continue  # a field argparse cannot express (e.g. a Union of several types): set it in Python
        added.append(field.name)
    return added


def _short_help(field: dataclasses.Field) -> str:
    text = " ".join(str(field.metadata.get("help", "")).split())
    return (text[:140] + "…") if len(text) > 140 else text


def _clone(field: dataclasses.Field, resolved_type: Any) -> dataclasses.Field:
    """A copy of a dataclass field with its type resolved and a short help (the original is left untouched)."""
    new = dataclasses.field(default=field.default, default_factory=field.default_factory,
                            metadata={**{k: v for k, v in field.metadata.items() if k != "help"},
                                      "help": _short_help(field)})
    new.name = field.name
    new.type = resolved_type
    return new


def training_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """The ``TrainingArguments`` fields the user set (values other than the field's default)."""
    from .distill import kd_parser

    own = {a.dest for a in kd_parser()._actions}  # kd-tasks' options of the same name are applied by the caller
    out = {}
    for field in training_fields():
        if field.name in OWNED or field.name in own or not hasattr(args, field.name):
            continue
        default = field.default if field.default is not dataclasses.MISSING else (
            field.default_factory() if field.default_factory is not dataclasses.MISSING else None)
        value = getattr(args, field.name)
        if value != default:
            out[field.name] = value
    return out


_CLASS = None


def _kd_fields(parser: argparse.ArgumentParser) -> list[tuple[str, Any, dataclasses.Field]]:
    from transformers import TrainingArguments

    ta = {f.name for f in dataclasses.fields(TrainingArguments)}
    out = []
    for action in parser._actions:
        if action.dest in ("help", "config") or action.dest in ta or action.dest in ALIASES or not action.option_strings:
            continue
        default = action.default
        kind = bool if isinstance(default, bool) else (action.type or str)
        out.append((action.dest, Optional[kind] if not isinstance(default, bool) else bool,
                    dataclasses.field(default=default, metadata={"help": action.help or ""})))
    return out


def distillation_arguments_class():
    """``DistillationArguments``: ``TrainingArguments`` plus every kd-tasks option as a field (built once from the
    command line's own option table, so the two never disagree)."""
    global _CLASS
    if _CLASS is None:
        from transformers import TrainingArguments

        from .distill import kd_parser

        _CLASS = dataclasses.make_dataclass(
            "DistillationArguments", _kd_fields(kd_parser()), bases=(TrainingArguments,),
            namespace={"__doc__": "TrainingArguments plus the kd-tasks distillation options (see kd_tasks.nlp.arguments)",
                       "__module__": __name__},
        )
    return _CLASS


def __getattr__(name: str):
    if name == "DistillationArguments":
        return distillation_arguments_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
